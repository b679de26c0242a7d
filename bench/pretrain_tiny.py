"""Make a small *base* SAM for CPU benchmarks: vit_tiny trained fully on one real organ, exported with
official SAM state-dict keys.

Why: the official checkpoints cannot be downloaded in every environment (not in ours), and zero-shot numbers
of a randomly initialised model mean nothing. A tiny SAM trained on glioblastoma tiles is a real (weak) base:
LoRA cross-validation on the *other* organ (glioma) then measures adaptation to a new domain against that
base's zero-shot performance, through exactly the code paths used with vit_b/l/h.

    python bench/pretrain_tiny.py --data ../shared/data/he-nuclei-sample/"human glioblastoma" \
        --out runs/tiny-base --epochs 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nucseg.model.adapter import export_merged, load_adapter
from nucseg.learn.data import load_dataset
from nucseg.model.lora import MethodConfig
from nucseg.learn.train import TrainConfig, finetune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/tiny-base")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tile-size", type=int, default=256, help="cut tiles to this size (4x cheaper than 512)")
    ap.add_argument("--box-fraction", type=float, default=0.5, help="prompts that also get their box")
    ap.add_argument("--no-balance-ce", action="store_true",
                    help="plain CE; from scratch it collapses to empty masks (train IoU 0), see docs/BENCHMARKS.md")
    ap.add_argument("--export-checkpoint", action="store_true",
                    help="export the base from the last finished epoch of an interrupted run (out/train/checkpoint.safetensors)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.export_checkpoint:
        return export_from_checkpoint(out, args.tile_size)
    tiles = load_dataset(args.data, tile_size=args.tile_size, drop_empty=True)
    t0 = time.time()
    res = finetune(tiles, out / "train", "vit_tiny", None, MethodConfig(method="full"),
                   TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=0,
                                                          box_fraction=args.box_fraction,
                                                          balance_ce=not args.no_balance_ce))
    model, _ = load_adapter(res.adapter)
    ckpt = export_merged(model, out / "sam_vit_tiny_he.pth")
    info = {"checkpoint": str(ckpt), "tiles": len(tiles), "tile_size": args.tile_size, "epochs": args.epochs,
            "seconds": time.time() - t0, "losses": [h.loss for h in res.history],
            "train_iou": [h.train_iou for h in res.history]}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


def export_from_checkpoint(out: Path, tile_size: int) -> None:
    """The base as it was after the last finished epoch (when a run is stopped early for time)."""
    import torch

    from nucseg.model.lora import apply_method
    from nucseg.model.sam import attach_foreground_head, load_sam

    from nucseg.learn.train import CHECKPOINT, load_training_state

    state = load_training_state(out / "train" / CHECKPOINT)
    model, _ = load_sam("vit_tiny", img_size=tile_size, seed=0)
    apply_method(model, MethodConfig(method="full"))
    attach_foreground_head(model)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            own[name].copy_(value)
    ckpt = export_merged(model, out / "sam_vit_tiny_he.pth")
    info = {"checkpoint": str(ckpt), "stopped_after_epoch": state["epoch"] + 1,
            "losses": [h["loss"] for h in state["history"]], "train_iou": [h["train_iou"] for h in state["history"]],
            "seconds": sum(h["seconds"] for h in state["history"])}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
