"""End to end per tile for a vit_b-size model: AMG as users run it (SAM's 1024 px resize) vs nucseg at native 512 px.

Issue 14, item 2: ``bench_pareto.py`` compares both at the same input size with a tiny model, where the encoder
is cheap. For vit_b-size geometry the encoder dominates, and the difference in how the two are run matters:
``SamAutomaticMaskGenerator`` resizes every 512 px tile to SAM's 1024 px input (its predictor's
``ResizeLongestSide``), nucseg builds the model at 512 px and interpolates the position tables. Same weights
(the 1024 px state dict loaded into the 512 px model, as an official checkpoint would be), same tile, same
grid of prompts, one process, wall and process CPU time, one warm-up call per method.

What cannot be measured here: quality. There are no vit_b weights in this workplace (the official checkpoints
cannot be downloaded) and none trained at 512 px, so the weights are a seeded random init and the table is
timing only; with random weights the mask filters keep an arbitrary share of masks, so the label-map work is
not representative either (the masks kept are recorded). AMG runs twice: as shipped (three ambiguity masks
per prompt, its 0.88 / 0.95 filters, 64 points per batch) and with nucseg's single-mask output and filters.

    .venv/bin/python bench/bench_amg_1024.py --model vit_b --grids 8,16 --tiles 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_ORGAN, REPO, SAMPLE, load_tiles, provenance, write_report  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--grids", default="8,16", help="points per side, one run per method each")
    ap.add_argument("--tiles", type=int, default=1, help="512 px held-out tiles")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=SAMPLE / BENCH_ORGAN)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "amg_1024_vs_native_cpu.json")
    args = ap.parse_args()

    from nucseg.threads import configure_threads

    configure_threads(args.threads)
    from bench_amg import amg_label_map, make_amg
    from bench_native_vs_1024 import weights_pair
    from segment_anything import SamAutomaticMaskGenerator

    from nucseg.model.infer import InferConfig, SamTileSegmenter

    started = provenance()
    small, big = weights_pair(args.model, None, seed=0)
    tiles = load_tiles(args.data, args.tiles, 512)
    rows = []
    with torch.inference_mode():
        for i, n in enumerate(int(g) for g in args.grids.split(",")):
            cfg = InferConfig(points_per_side=n, prompts="grid")
            seg = SamTileSegmenter(small, cfg)
            stock = SamAutomaticMaskGenerator(big, points_per_side=n)
            single = make_amg(big, cfg, stock=False)
            runs = {
                "nucseg-512-grid": lambda im: seg(im[None]).labels[0],
                "amg-1024-stock": lambda im: amg_label_map(stock.generate(im), im.shape[:2], cfg.min_keep, cfg.min_area),
                "amg-1024-single-mask": lambda im: amg_label_map(single.generate(im), im.shape[:2], cfg.min_keep,
                                                                 cfg.min_area),
            }
            for name, fn in runs.items():
                if i == 0:
                    fn(tiles[0].image)  # warm-up (first grid only: at vit_b size one call is ~0.5-1 min on CPU)
                wall, cpu, kept = [], [], []
                for t in tiles:
                    t0, c0 = time.perf_counter(), time.process_time()
                    lab = fn(t.image)
                    wall.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                    kept.append(int(lab.max()))
                row = {"method": name, "points_per_side": n, "s_per_tile": round(float(np.mean(wall)), 3),
                       "cpu_s_per_tile": round(float(np.mean(cpu)), 3), "instances_per_tile": float(np.mean(kept))}
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    for row in rows:
        ref = next(r for r in rows if r["method"] == "nucseg-512-grid" and r["points_per_side"] == row["points_per_side"])
        row["vs_nucseg_wall"] = round(row["s_per_tile"] / ref["s_per_tile"], 2)
        row["vs_nucseg_cpu"] = round(row["cpu_s_per_tile"] / ref["cpu_s_per_tile"], 2)
    report = {"benchmark": "end to end per 512 px tile: AMG at SAM's 1024 px vs nucseg at native 512 px, same weights",
              **started, "finished": provenance()["date"], "model": f"{args.model}, seeded random init (timing only)",
              "tiles": [t.name for t in tiles], "results": rows}
    write_report(args.out, report)
    print("| method | points/side | s/tile | CPU s/tile | x nucseg (wall) | x nucseg (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['points_per_side']} | {r['s_per_tile']:.2f} | {r['cpu_s_per_tile']:.2f} | "
              f"{r['vs_nucseg_wall']:.2f} | {r['vs_nucseg_cpu']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
