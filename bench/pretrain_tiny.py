"""Make a small *base* SAM for CPU benchmarks: vit_tiny trained fully on one real organ, exported with
official SAM state-dict keys.

Why: the official checkpoints cannot be downloaded in every environment (not in ours), and zero-shot numbers
of a randomly initialised model mean nothing. A tiny SAM trained on glioblastoma tiles is a real (weak) base:
LoRA on the *other* organ (glioma) then measures adaptation to a new domain against that base's zero-shot
performance, through exactly the code paths used with vit_b/l/h.

The recipe is pinned (``bench/common.py:BASE_RECIPE``: seed, epochs, batch, lr, one torch thread), so
``make bench BENCH_ARGS=--train`` builds the same weights every time: there are no options that change it. An
interrupted run resumes from its last finished epoch (``finetune`` resumes exactly) when started again.
``pretrain.json`` records the recipe, the command and the SHA-256 of the exported checkpoint.

    .venv/bin/python bench/pretrain_tiny.py            # -> runs/tiny-base/sam_vit_tiny_he.pth
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BASE_ORGAN, BASE_RECIPE, SAMPLE, TINY_BASE, epoch_printer, provenance, sha256  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SAMPLE / BASE_ORGAN)
    ap.add_argument("--out", type=Path, default=TINY_BASE.parent)
    args = ap.parse_args()
    recipe = BASE_RECIPE

    from nucseg.threads import configure_threads

    configure_threads(recipe.threads)
    from nucseg.model.adapter import export_merged, load_adapter
    from nucseg.learn.data import load_dataset
    from nucseg.model.lora import MethodConfig
    from nucseg.learn.train import finetune

    tiles = load_dataset(args.data, tile_size=recipe.tile_size, drop_empty=True)
    t0 = time.time()
    res = finetune(tiles, args.out / "train", "vit_tiny", None, MethodConfig(method="full"), recipe.train_config(),
                   on_step=epoch_printer(t0))
    model, _ = load_adapter(res.adapter)
    ckpt = export_merged(model, args.out / TINY_BASE.name)
    info = {**provenance(), "recipe": recipe.to_dict(), "checkpoint": str(ckpt), "sha256": sha256(ckpt),
            "data": str(args.data), "tiles": len(tiles), "seconds": round(time.time() - t0, 1),
            "losses": [round(h.loss, 4) for h in res.history],
            "train_iou": [round(h.train_iou, 4) for h in res.history]}
    (args.out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
