"""How far can prompt pruning go? Prompts decoded and quality for foreground thresholds x skip margins.

Run on *validation* tiles: held-out glioma images that bench_amg.py does not segment (images 3-8 of the
held-out eight; bench_amg.py's default 8 tiles of 256 px come from images 1-2), so the defaults chosen from
this table are not tuned on the benchmark's own tiles. ``--prompts grid`` is the reference row.

    .venv/bin/python bench/sweep_pruning.py --adapter runs/bench-adapter/adapter \
        --checkpoint runs/tiny-base/sam_vit_tiny_he.pth --pred-iou-thresh 0.3 --stability-thresh 0.6
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_ORGAN, REPO, SAMPLE, bench_weights, load_model, load_tiles, provenance, write_report  # noqa: E402

from nucseg.learn.cv import score  # noqa: E402
from nucseg.model.infer import InferConfig, SamTileSegmenter  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SAMPLE / BENCH_ORGAN)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--model", default="vit_tiny")
    ap.add_argument("--img-size", type=int, default=512)
    ap.add_argument("--skip-tiles", type=int, default=8, help="the benchmark's own tiles, left out")
    ap.add_argument("--tiles", type=int, default=24)
    ap.add_argument("--fg-thresholds", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--skip-margins", default="0,4,8")
    ap.add_argument("--pred-iou-thresh", type=float, default=InferConfig.pred_iou_thresh)
    ap.add_argument("--stability-thresh", type=float, default=InferConfig.stability_thresh)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pruning_sweep_cpu.json")
    args = ap.parse_args()

    mut = load_model(args.adapter, args.checkpoint, args.model, args.img_size)
    size = mut.model.image_encoder.img_size
    tiles = load_tiles(args.data, args.skip_tiles + args.tiles, size)[args.skip_tiles :]
    base = dict(pred_iou_thresh=args.pred_iou_thresh, stability_thresh=args.stability_thresh)
    runs = [("grid", None, None)] + [("auto", float(f), int(m)) for m in args.skip_margins.split(",")
                                     for f in args.fg_thresholds.split(",")]
    rows = []
    with torch.inference_mode():
        for mode, fg, margin in runs:
            extra = {} if mode == "grid" else {"fg_threshold": fg, "skip_margin": margin}
            seg = SamTileSegmenter(mut.model, InferConfig(prompts=mode, **base, **extra))
            mean = score(seg, list(tiles), 8)[0]["mean"]
            row = {"prompts": mode, "fg_threshold": fg, "skip_margin": margin,
                   "prompts_per_tile": round(seg.stats["prompts_decoded"] / len(tiles), 1),
                   **{k: round(float(mean[k]), 4) for k in ("pq", "aji", "dice", "f1")}}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    report = {"benchmark": "prompt pruning sweep (validation tiles)", **provenance(), "model": mut.name, "weights": bench_weights(args.adapter, args.checkpoint),
              "tiles": {"n": len(tiles), "size": size, "images": sorted({t.stem for t in tiles})},
              "settings": base, "results": rows}
    write_report(args.out, report)
    print("| prompts | fg threshold | skip margin | prompts/tile | PQ | AJI | Dice |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompts']} | {r['fg_threshold'] if r['fg_threshold'] is not None else '–'} | "
              f"{r['skip_margin'] if r['skip_margin'] is not None else '–'} | {r['prompts_per_tile']:.0f} | "
              f"{r['pq']:.3f} | {r['aji']:.3f} | {r['dice']:.3f} |")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
