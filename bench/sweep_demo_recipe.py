"""One point of the demo-recipe search: train vit_tiny from scratch on demo tiles, report train IoU and the
validation PQ with thresholds calibrated on the validation tiles (an upper bound for the recipe).

Used to choose nucseg.learn.demo.QUICK (docs/BENCHMARKS.md, "Demo recipe"); each run is one recipe, e.g.

    .venv/bin/python bench/sweep_demo_recipe.py --size 128 --zoom 2 --batch-size 8 --steps 300 --lr 2e-3
"""

from __future__ import annotations

import argparse
import time

from nucseg.threads import configure_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="tile side (model input)")
    ap.add_argument("--zoom", type=int, default=1, help="nuclei this many times larger (make_demo_dataset zoom)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--box-fraction", type=float, default=0.5)
    ap.add_argument("--train-tiles", type=int, default=24)
    ap.add_argument("--val-tiles", type=int, default=8)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=0.05)
    ap.add_argument("--pe-scale", type=float, default=1.0, help="multiply the prompt encoder's random Fourier "
                    "feature matrix (sharper positional encodings)")
    ap.add_argument("--work", default="/tmp/nucseg-sweep-demo")
    a = ap.parse_args()
    configure_threads()

    import torch

    from nucseg.learn.calibrate import THRESHOLD_FIELDS, CalibrationConfig, calibrate
    from nucseg.learn.data import load_dataset
    from nucseg.learn.demo import make_demo_dataset
    from nucseg.learn.evaluate import evaluate_arrays
    from nucseg.model.infer import InferConfig, SamTileSegmenter, segment_tiles
    from nucseg.model.lora import MethodConfig, apply_method
    from nucseg.model.sam import load_sam
    from nucseg.learn.train import Trainer, TrainConfig

    n = (a.train_tiles + a.val_tiles) // 2
    tiles = load_dataset(make_demo_dataset(f"{a.work}/data-{a.size}-{a.zoom}-{n}", tiles_per_organ=n, size=a.size,
                                           zoom=a.zoom), tile_size=a.size)
    val = [t for i, t in enumerate(tiles) if i % (len(tiles) // a.val_tiles) == 0][: a.val_tiles]
    train = [t for t in tiles if t.name not in {v.name for v in val}]
    epochs = max(1, round(a.steps / -(-len(train) // a.batch_size)))
    model, _ = load_sam("vit_tiny", None, img_size=a.size, seed=0)
    model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(a.pe_scale)
    torch.manual_seed(0)
    apply_method(model, MethodConfig(method="full"))
    cfg = TrainConfig(epochs=epochs, batch_size=a.batch_size, lr=a.lr, device="cpu", balance_ce=True,
                      box_fraction=a.box_fraction, warmup_fraction=a.warmup)
    trainer = Trainer(model, train, cfg, f"{a.work}/run")
    t0 = time.time()
    history = trainer.fit({})
    print(f"train {len(train)} tiles, {epochs * trainer.steps_per_epoch} steps in {time.time() - t0:.0f} s; "
          f"last train IoU {history[-1].train_iou:.3f}, loss {history[-1].loss:.3f}")
    seg = SamTileSegmenter(model.eval(), InferConfig(points_per_side=a.points_per_side), device="cpu")
    t = calibrate(seg, val, CalibrationConfig()).thresholds
    print(f"thresholds calibrated on the validation tiles: {t}")
    cfg = InferConfig(points_per_side=a.points_per_side, **{k: t[k] for k in THRESHOLD_FIELDS})
    preds = segment_tiles(SamTileSegmenter(model, cfg, device="cpu"), [v.image for v in val], 4)
    r = evaluate_arrays((v.name, v.labels, p, v.ambiguous) for v, p in zip(val, preds))["mean"]
    print("validation: " + " ".join(f"{k} {r[k]:.3f}" for k in ("pq", "f1", "dq", "sq", "dice")))


if __name__ == "__main__":
    main()
