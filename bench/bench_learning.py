"""Learning benchmark: does LoRA fine-tuning improve on the base, measured by cross-validation on real tiles?

Base: vit_tiny (SAM architecture) trained fully on the real *glioblastoma* tiles of he-nuclei-sample and
exported with official SAM keys (bench/pretrain_tiny.py) — the official SAM weights cannot be downloaded here.
Task: the *glioma* tiles, which the base has never seen. `nucseg cv` (LoRA r4 on q,v + decoder + foreground
head, grouped by source image) against the base zero-shot through the same inference path.

    python bench/bench_learning.py --base runs/tiny-base/sam_vit_tiny_he.pth --out runs/learning

Writes bench/results/learning_<device>.json and prints a markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

from nucseg.learn.cv import CVConfig, run_cv
from nucseg.learn.data import load_dataset
from nucseg.model.infer import InferConfig
from nucseg.model.lora import MethodConfig
from nucseg.learn.train import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, SAMPLE, TINY_BASE, bench_weights, cpu_name  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SAMPLE / "human glioma")
    ap.add_argument("--base", type=Path, default=TINY_BASE)
    ap.add_argument("--out", type=Path, default=REPO / "runs/learning")
    ap.add_argument("--tile-size", type=int, default=256, help="the size the tiny base was trained at")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.3,
                    help="the tiny base reaches train IoU ~0.5; the 0.5 default suits official SAM")
    ap.add_argument("--stability-thresh", type=float, default=0.5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if not args.base.is_file():
        print(f"base checkpoint {args.base} missing: run bench/pretrain_tiny.py first", file=sys.stderr)
        return 2
    tiles = load_dataset(args.data, tile_size=args.tile_size, drop_empty=True)
    t0 = time.time()
    train = TrainConfig(epochs=args.epochs, batch_size=8, lr=args.lr, device=args.device, balance_ce=True)
    infer = InferConfig(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                        stability_thresh=args.stability_thresh)
    summary = run_cv(tiles, args.out, "vit_tiny", args.base, MethodConfig(), train, infer,
                     CVConfig(folds=args.folds, seed=42, group_by="image", zero_shot=True,
                              zero_shot_multimask=False),
                     on_fold=lambda f, n, what: print(f"fold {f}/{n}: {what}", file=sys.stderr, flush=True))
    device = "cuda" if (args.device != "cpu" and torch.cuda.is_available()) else "cpu"
    result = {
        "date": dt.date.today().isoformat(),
        "machine": torch.cuda.get_device_name(0) if device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]),
        "data": str(args.data.name),
        "tiles": len(tiles),
        "tile_size": args.tile_size,
        "base": args.base.name,
        "weights": bench_weights(None, args.base),
        "seconds": round(time.time() - t0, 1),
        "fine_tuned": summary["fine_tuned"],
        "zero_shot": summary["zero_shot"],
        "folds": summary["folds"],
        "training": summary["training"],
        "inference": summary["inference"],
    }
    out = REPO / "bench/results" / f"learning_{device}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print("| model | Dice | AJI | PQ | F1 |\n|---|---|---|---|---|")
    for name in ("fine_tuned", "zero_shot"):
        m = summary[name]
        print(f"| {name.replace('_', '-')} | " + " | ".join(
            f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in ("dice", "aji", "pq", "f1")) + " |")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
