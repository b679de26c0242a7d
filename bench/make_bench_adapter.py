"""The model the CPU speed benchmarks run: a LoRA adapter (with its foreground head) on the tiny base.

Trained on the glioma images that the benchmarks do *not* segment (all but the first
``bench/common.py:HELD_OUT_IMAGES``), at the tiny base's 256 px, so the benchmark tiles are held out and
the quality figures (PQ, AJI, Dice) mean something. Needs the base from bench/pretrain_tiny.py.

    .venv/bin/python bench/make_bench_adapter.py            # -> runs/bench-adapter/adapter
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_ADAPTER, BENCH_ORGAN, HELD_OUT_IMAGES, SAMPLE, TINY_BASE, bench_images, provenance  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SAMPLE / BENCH_ORGAN)
    ap.add_argument("--base", type=Path, default=TINY_BASE)
    ap.add_argument("--out", type=Path, default=BENCH_ADAPTER.parent)
    ap.add_argument("--tile-size", type=int, default=256, help="the size the tiny base was trained at")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-4)
    args = ap.parse_args()
    if not args.base.is_file():
        print(f"base checkpoint {args.base} missing: run bench/pretrain_tiny.py first", file=sys.stderr)
        return 2

    from nucseg.learn.data import load_dataset
    from nucseg.model.lora import MethodConfig
    from nucseg.learn.train import TrainConfig, finetune

    held_out = set(bench_images(args.data, HELD_OUT_IMAGES))
    tiles = [t for t in load_dataset(args.data, tile_size=args.tile_size, drop_empty=True) if t.stem not in held_out]
    t0 = time.time()
    res = finetune(tiles, args.out, "vit_tiny", args.base, MethodConfig(),
                   TrainConfig(epochs=args.epochs, batch_size=8, lr=args.lr, balance_ce=True, seed=0, device="cpu"),
                   on_step=None)
    info = {**provenance(), "adapter": str(res.adapter), "train_tiles": len(tiles), "held_out_images": sorted(held_out),
            "epochs": args.epochs, "seconds": round(time.time() - t0, 1),
            "train_iou": [round(h.train_iou, 4) for h in res.history]}
    (args.out / "bench_adapter.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
