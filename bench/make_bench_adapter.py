"""The model the CPU speed benchmarks run: a LoRA adapter (with its foreground head) on the tiny base.

Trained on the glioma images that the benchmarks do *not* segment (all but the first
``bench/common.py:HELD_OUT_IMAGES``), at the tiny base's 256 px, so the benchmark tiles are held out and
the quality figures (PQ, AJI, Dice) mean something. Needs the base from bench/pretrain_tiny.py. The recipe is
pinned (``bench/common.py:ADAPTER_RECIPE``); ``bench_adapter.json`` records it, the command, the SHA-256 of the
adapter weights and of the base, and the µm/px recorded in the adapter (``common.BENCH_MPP``).

    .venv/bin/python bench/make_bench_adapter.py            # -> runs/bench-adapter/adapter
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ADAPTER_RECIPE, BENCH_ADAPTER, BENCH_MPP, BENCH_ORGAN, HELD_OUT_IMAGES, SAMPLE,  # noqa: E402
                    TINY_BASE, bench_images, epoch_printer, provenance, sha256)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SAMPLE / BENCH_ORGAN)
    ap.add_argument("--base", type=Path, default=TINY_BASE)
    ap.add_argument("--out", type=Path, default=BENCH_ADAPTER.parent)
    args = ap.parse_args()
    recipe = ADAPTER_RECIPE
    if not args.base.is_file():
        print(f"base checkpoint {args.base} missing: run bench/pretrain_tiny.py first", file=sys.stderr)
        return 2

    from nucseg.threads import configure_threads

    configure_threads(recipe.threads)
    from nucseg.model.adapter import WEIGHTS
    from nucseg.learn.data import load_dataset
    from nucseg.model.lora import MethodConfig
    from nucseg.learn.train import finetune

    held_out = set(bench_images(args.data, HELD_OUT_IMAGES))
    tiles = [t for t in load_dataset(args.data, tile_size=recipe.tile_size, drop_empty=True) if t.stem not in held_out]
    t0 = time.time()
    res = finetune(tiles, args.out, "vit_tiny", args.base, MethodConfig(), recipe.train_config(), mpp=BENCH_MPP,
                   on_step=epoch_printer(t0))
    info = {**provenance(), "recipe": recipe.to_dict(), "adapter": str(res.adapter),
            "sha256": sha256(res.adapter / WEIGHTS), "base": str(args.base), "base_sha256": sha256(args.base),
            "mpp": BENCH_MPP, "mpp_source": "not stated by the data's README nor its source; see common.BENCH_MPP"
            if BENCH_MPP is None else "common.BENCH_MPP",
            "train_tiles": len(tiles), "held_out_images": sorted(held_out), "seconds": round(time.time() - t0, 1),
            "train_iou": [round(h.train_iou, 4) for h in res.history]}
    (args.out / "bench_adapter.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
