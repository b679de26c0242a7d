"""Native 512 px encoder against SAM's usual 1024 px input (512 px tiles upsampled 2x), same weights.

nucseg builds the model at the tile's size and interpolates the checkpoint's position tables on load
(nucseg.model.sam); the alternative is the official 1024 px geometry with every tile upsampled. For each model the
weights are built (or loaded) at 1024 px and the 512 px model is loaded from exactly that state dict, as an
official checkpoint would be. Timed: the image encoder alone on one tile, and end to end (SamTileSegmenter,
``--prompts grid`` so both decode the same number of prompts) for the models in ``--e2e-models``.

    .venv/bin/python bench/bench_native_vs_1024.py --models vit_tiny,vit_b --e2e-models vit_tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_ORGAN, REPO, SAMPLE, load_tiles, provenance, write_report  # noqa: E402


def weights_pair(name: str, checkpoint: Path | None, seed: int):
    """(model at 512, model at 1024) with the same weights: the 1024 one's state dict loaded into 512."""
    from nucseg.model.sam import load_sam

    big, _ = load_sam(name, checkpoint, img_size=1024, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}_1024.pth"
        torch.save(big.state_dict(), path)
        small, _ = load_sam(name, path, img_size=512)
    return small.eval(), big.eval()


def timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_tiny,vit_b")
    ap.add_argument("--e2e-models", default="vit_tiny", help="models also timed end to end (slow at 1024 on CPU)")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=FILE",
                    help="weights for a model (default: seeded random init, fine for timing)")
    ap.add_argument("--points-per-side", type=int, default=16, help="grid for the end-to-end timing")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--data", type=Path, default=SAMPLE / BENCH_ORGAN)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "native_vs_1024_cpu.json")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); recorded")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from nucseg.model.infer import InferConfig, SamTileSegmenter
    from nucseg.model.sam import encode

    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    tile = load_tiles(args.data, 1, 512)[0]
    x512 = torch.from_numpy(tile.image)[None]
    x1024 = F.interpolate(x512.permute(0, 3, 1, 2).float(), scale_factor=2, mode="bilinear", align_corners=False)
    x1024 = x1024.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    cfg = InferConfig(points_per_side=args.points_per_side, prompts="grid")
    rows = []
    with torch.inference_mode():
        for name in args.models.split(","):
            ckpt = checkpoints.get(name)
            small, big = weights_pair(name, Path(ckpt) if ckpt else None, seed=0)
            row = {"model": name, "weights": ckpt or "random init (seed 0)",
                   "encoder_s": {"native_512": round(timed(lambda: encode(small, x512), args.repeats), 3),
                                 "upsampled_1024": round(timed(lambda: encode(big, x1024), args.repeats), 3)}}
            row["encoder_ratio_1024_over_512"] = round(row["encoder_s"]["upsampled_1024"] / row["encoder_s"]["native_512"], 2)
            if name in args.e2e_models.split(","):
                s512, s1024 = SamTileSegmenter(small, cfg), SamTileSegmenter(big, cfg)
                row["end_to_end_s"] = {"native_512": round(timed(lambda: s512(x512.numpy()), args.repeats), 3),
                                       "upsampled_1024": round(timed(lambda: s1024(x1024.numpy()), args.repeats), 3)}
                row["end_to_end_ratio_1024_over_512"] = round(
                    row["end_to_end_s"]["upsampled_1024"] / row["end_to_end_s"]["native_512"], 2)
                row["prompts_per_tile"] = args.points_per_side**2
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del small, big
    report = {"benchmark": "native 512 px encoder vs 1024 px (tiles upsampled 2x), same weights", **provenance(),
              "device": "cpu", "tile": tile.name,
              "settings": {"repeats": args.repeats, "timing": "best of repeats after one warm-up call, one tile",
                           "end_to_end": cfg.to_dict()},
              "results": rows}
    write_report(args.out, report)
    print("| model | encoder 512 | encoder 1024 | ratio | end to end 512 | end to end 1024 | ratio |\n|---|---|---|---|---|---|---|")
    for r in rows:
        e2e = r.get("end_to_end_s")
        tail = (f"{e2e['native_512']:.2f} s | {e2e['upsampled_1024']:.2f} s | {r['end_to_end_ratio_1024_over_512']:.1f}x"
                if e2e else "– | – | –")
        print(f"| {r['model']} | {r['encoder_s']['native_512']:.2f} s | {r['encoder_s']['upsampled_1024']:.2f} s | "
              f"{r['encoder_ratio_1024_over_512']:.1f}x | {tail} |")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
