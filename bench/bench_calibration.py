"""What calibrated thresholds gain over the global defaults, on held-out real tiles.

A small model (vit_tiny, SAM architecture, trained from scratch, method ``full``) is trained on real H&E
tiles of ../shared/data/he-nuclei-sample; the images are split three ways, by image: training, calibration
(thresholds grid-searched there, nucseg.learn.calibrate) and test (never seen by either). On the test tiles the
same adapter is scored through the real inference path (``prompts="auto"``) with the global default
thresholds and with the calibrated ones; the thresholds chosen on the test tiles themselves are reported as
an upper bound for what any threshold choice could give.

    .venv/bin/python bench/bench_calibration.py --steps 300
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, SAMPLE, provenance, write_report  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SAMPLE)
    ap.add_argument("--tile-size", type=int, default=128, help="real tiles are cut to this size")
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--test-images", type=int, default=12)
    ap.add_argument("--calibration-images", type=int, default=6)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/nucseg-bench-calibration"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "calibration_cpu.json")
    args = ap.parse_args()

    import numpy as np

    from nucseg.model.adapter import load_adapter
    from nucseg.learn.calibrate import THRESHOLD_FIELDS, CalibrationConfig, calibrate
    from nucseg.learn.data import load_dataset
    from nucseg.learn.evaluate import evaluate_arrays
    from nucseg.model.infer import InferConfig, SamTileSegmenter, segment_tiles
    from nucseg.model.lora import MethodConfig
    from nucseg.threads import configure_threads
    from nucseg.learn.train import TrainConfig, finetune

    configure_threads()
    tiles = load_dataset(args.data, tile_size=args.tile_size, drop_empty=True)
    stems = sorted({t.stem for t in tiles})
    order = np.random.default_rng(0).permutation(len(stems))
    test = {stems[i] for i in order[: args.test_images]}
    calib = {stems[i] for i in order[args.test_images : args.test_images + args.calibration_images]}
    split = {"train": [t for t in tiles if t.stem not in test | calib],
             "calibration": [t for t in tiles if t.stem in calib], "test": [t for t in tiles if t.stem in test]}
    epochs = max(1, round(args.steps / math.ceil(len(split["train"]) / args.batch_size)))
    cfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, box_fraction=0.5, balance_ce=True,
                      calibration_fraction=0.0, seed=0, device="cpu")
    t0 = time.perf_counter()
    res = finetune(split["train"], args.work, "vit_tiny", None, MethodConfig(method="full"), cfg, resume=False)
    train_s = time.perf_counter() - t0
    model, _ = load_adapter(res.adapter)
    base = InferConfig(points_per_side=args.points_per_side)

    def scored(cfg: InferConfig, on: list) -> dict:
        preds = segment_tiles(SamTileSegmenter(model, cfg, device="cpu"), [t.image for t in on], 8)
        mean = evaluate_arrays((t.name, t.labels, p, t.ambiguous) for t, p in zip(on, preds))["mean"]
        return {k: mean[k] for k in ("pq", "f1", "dq", "sq", "aji", "dice")}

    def with_thresholds(t: dict) -> InferConfig:
        return InferConfig(**{**base.to_dict(), **{k: t[k] for k in THRESHOLD_FIELDS}})

    t0 = time.perf_counter()
    cal = calibrate(SamTileSegmenter(model, base, device="cpu"), split["calibration"], CalibrationConfig())
    calib_s = time.perf_counter() - t0
    oracle = calibrate(SamTileSegmenter(model, base, device="cpu"), split["test"], CalibrationConfig())
    rows = {"defaults": scored(base, split["test"]),
            "calibrated": scored(with_thresholds(cal.thresholds), split["test"]),
            "chosen_on_test_upper_bound": scored(with_thresholds(oracle.thresholds), split["test"])}
    report = {**provenance(), "model": "vit_tiny (SAM architecture, random init), method full",
              "parameters": res.trainable, "tile_size": args.tile_size, "train_steps": epochs * math.ceil(
                  len(split["train"]) / args.batch_size), "train_seconds": round(train_s, 1),
              "final_train_iou": res.history[-1].train_iou,
              "tiles": {k: len(v) for k, v in split.items()}, "images": {k: len({t.stem for t in v})
                                                                        for k, v in split.items()},
              "calibration": {"thresholds": cal.thresholds, "settings": cal.evaluated, "seconds": round(calib_s, 1)},
              "test_thresholds_upper_bound": oracle.thresholds, "test": rows}
    write_report(args.out, report)
    for name, r in rows.items():
        print(f"{name:28s} " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
    print(f"calibrated thresholds: {cal.thresholds}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
