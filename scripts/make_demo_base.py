"""Build the demo's small pre-trained base: vit_tiny trained from scratch on synthetic nuclei.

``make demo`` fine-tunes this base with the product's default method (LoRA rank 4 on the encoder's q and v
plus the mask decoder), as a user fine-tunes the official vit_b; training a SAM from scratch takes far longer
than a first run should (docs/BENCHMARKS.md, "Demo recipe"). The base is trained on tiles of the demo's
renderer with other seeds and a third, intermediate organ style, never on the demo's own tiles.

    .venv/bin/python scripts/make_demo_base.py --install     # writes runs/demo-base/ and adapters/demo-base/

The base is committed (adapters/demo-base/, the one weight file in git; ``make demo`` only uses it): this
script is the documented way to rebuild it, and ``--install`` replaces the committed file and its record
``base.json`` (commit both together; tests/test_demo_quality.py checks the file against the record).

The recipe is pinned (nucseg.learn.demo.BASE: seeds, data, 50 epochs, lr 4e-3, the prompt encoder's Fourier
scale 0.5 that ends the "every nucleus" plateau early; one torch thread by default); ``adapters/demo-base/base.json``
records it with the checkpoint's SHA-256, the training curve, time, machine and date. The rebuilt weights
match the reference build in quality, not necessarily bit for bit (other CPUs, thread counts, BLAS kernels).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from nucseg.threads import configure_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo-base"))
    ap.add_argument("--epochs", type=int, default=None, help="default: the pinned recipe's (BaseRecipe)")
    ap.add_argument("--tiles-per-organ", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--pe-scale", type=float, default=None, help="prompt encoder Fourier scale at init")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible numerics)")
    ap.add_argument("--install", action="store_true", help="also write the base into adapters/demo-base/")
    a = ap.parse_args()
    configure_threads(a.threads)

    import torch

    from nucseg import __version__
    from nucseg.model.adapter import export_merged, is_merged_checkpoint, load_adapter
    from nucseg.learn.data import load_dataset
    from nucseg.learn.demo import (BASE, BASE_DIR, BASE_FILE, BASE_INFO, BASE_ORGANS, BASE_SEED, BASE_STAIN, KIND,
                                   QUICK, make_demo_dataset)
    from nucseg.io import atomic_path, sha256_file, write_json
    from nucseg.model.lora import MethodConfig
    from nucseg.learn.train import finetune

    r = QUICK
    base = dataclasses.replace(BASE, **{k: v for k, v in (("epochs", a.epochs), ("tiles_per_organ", a.tiles_per_organ),
                                                          ("lr", a.lr), ("pe_scale", a.pe_scale)) if v is not None})
    t0, c0 = time.time(), time.process_time()
    data = make_demo_dataset(a.out / "data", organs=BASE_ORGANS, tiles_per_organ=base.tiles_per_organ, size=r.size,
                             seed=BASE_SEED, zoom=r.zoom, stain=BASE_STAIN)
    tiles = load_dataset(data, tile_size=r.size)
    cfg = base.train_config()
    init = base.init_checkpoint(a.out / "init.safetensors", r.size)

    def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
        if step == steps - 1:
            spent = time.time() - t0
            left = spent / (epoch + 1) * (base.epochs - epoch - 1)
            print(f"   demo base: epoch {epoch + 1}/{base.epochs}, loss {loss:.3f} [{spent:.0f} s, ETA "
                  f"{left:.0f} s]", file=sys.stderr, flush=True)

    res = finetune(tiles, a.out / "train", "vit_tiny", init, MethodConfig(method="full"), cfg, mpp=r.mpp,
                   on_step=on_step)
    model, adapter_info = load_adapter(res.adapter, init)
    ckpt = export_merged(model, a.out / BASE_FILE)
    info = {
        "kind": KIND,
        "file": BASE_FILE,
        "sha256": sha256_file(ckpt),
        "model": "vit_tiny",
        "input_size": r.size,
        "mpp": r.mpp,
        "recipe": {"organs": list(BASE_ORGANS), "seed": BASE_SEED, "stain": BASE_STAIN,
                   "tiles_per_organ": base.tiles_per_organ, "size": r.size, "zoom": r.zoom, "method": "full",
                   "init": {"seed": base.seed, "pe_scale": base.pe_scale}, "training": cfg.to_dict()},
        "command": "python scripts/make_demo_base.py " + " ".join(sys.argv[1:]),
        "training_images": len(tiles),
        "seconds": round(sum(h.seconds for h in res.history), 1),  # a resumed run counts every epoch once
        # the whole build in this process (data, init, training, calibration, export): wall and CPU seconds
        "build_wall_seconds": round(time.time() - t0, 1),
        "build_cpu_seconds": round(time.process_time() - c0, 1),
        "threads": a.threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 min, at the end of the build
        "train_iou": [round(h.train_iou, 4) for h in res.history],
        "loss": [round(h.loss, 4) for h in res.history],
        "thresholds": adapter_info.thresholds,
        "nucseg_version": __version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    write_json(a.out / BASE_INFO, info, is_base_info)
    print(json.dumps({k: v for k, v in info.items() if k not in ("train_iou", "loss", "recipe")}))
    if a.install:
        BASE_DIR.mkdir(parents=True, exist_ok=True)
        with atomic_path(BASE_DIR / BASE_FILE, owned=is_merged_checkpoint) as tmp:
            shutil.copyfile(ckpt, tmp)
        with atomic_path(BASE_DIR / BASE_INFO, owned=is_base_info) as tmp:
            tmp.write_text(json.dumps(info, indent=2) + "\n")
        print(f"installed into {BASE_DIR}")


def is_base_info(path: Path) -> bool:
    from nucseg.learn.demo import KIND

    try:
        return json.loads(path.read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    main()
