"""Shared fixtures. Real data lives in ../shared/data beside the checkout; tests never copy it.

Outside CI a missing shared folder skips the tests that need it; in CI (CI=true) it is a failure, because a
green run without the real data would prove nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NUCSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        msg = f"real test data missing: {path} (expected ../shared/data beside the checkout)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def he_sample(shared_data: Path) -> Path:
    """76 real H&E tiles with instance labels, NuInsSeg layout (two organs)."""
    return _require(shared_data / "he-nuclei-sample")


@pytest.fixture(scope="session")
def nuinsseg_gt(shared_data: Path) -> Path:
    """Two real NuInsSeg ground-truth maps with ambiguous masks and published example predictions."""
    return _require(shared_data / "nuinsseg-gt-examples")


@pytest.fixture(scope="session")
def cmu_svs(shared_data: Path) -> Path:
    """A real Aperio .svs (2220 x 2967 px, 0.499 µm/px)."""
    return _require(shared_data / "wsi" / "CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A generated pyramidal 1200 x 1000 slide at 0.5 µm/px, all tissue, 250 nuclei, and its true labels.
    Read-only: tests that write next to a slide make their own."""
    from nucseg.wsi.synthslide import make_synthetic_slide

    path = tmp_path_factory.mktemp("small") / "small.tif"
    gt = make_synthetic_slide(path, 1200, 1000, mpp=0.5, nuclei=250, tissue_fraction=1.0, seed=7)
    return path, gt


@pytest.fixture(scope="session")
def tiny_official_ckpt(tmp_path_factory) -> Path:
    """A vit_tiny state dict built at SAM's official 1024 px geometry and saved like the official .pth files,
    so loading it exercises the real key names and the position-table interpolation to 512 px."""
    import torch

    from nucseg.model.sam import build_sam

    torch.manual_seed(123)
    model = build_sam("vit_tiny", img_size=1024)
    with torch.no_grad():  # official checkpoints have non-zero relative-position tables
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_tiny_test.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def real_tiles(he_sample):
    """Eight real tiles, four of each organ (deterministic choice)."""
    from nucseg.learn.data import load_dataset

    tiles = load_dataset(he_sample)
    by_organ: dict[str, list] = {}
    for t in tiles:
        by_organ.setdefault(t.organ, []).append(t)
    return [t for organ in sorted(by_organ) for t in by_organ[organ][:4]]


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The demo base's recipe at reduced size (the base is built on a user's first `make demo`, ~5 min, and never
    committed, so CI has none): vit_tiny from the base's own starting point (``BASE.init_checkpoint``: seeded
    random init, prompt-encoder Fourier scale 0.5) at the base's learning rate, method `full`, one fold of
    Macenko-stained demo tiles, 150 epochs of 2 steps, thresholds calibrated on held-back tiles.

    Returns (model, validation tiles, result) where result holds the adapter's calibrated thresholds, the
    validation metrics with them, those with every mask kept, and the training seconds.
    """
    import time
    from dataclasses import replace

    from nucseg.model.adapter import load_adapter
    from nucseg.learn.calibrate import resolve_infer
    from nucseg.learn.cv import score
    from nucseg.learn.data import load_dataset
    from nucseg.learn.demo import BASE, QUICK, make_demo_dataset
    from nucseg.model.infer import InferConfig, SamTileSegmenter
    from nucseg.learn.train import finetune

    recipe = replace(QUICK, pretrained=False, tiles_per_organ=12, epochs=DEMO_GUARD_EPOCHS, lr=BASE.lr, stain="macenko")
    root = tmp_path_factory.mktemp("demo_quality")
    init = BASE.init_checkpoint(root / "init.safetensors", recipe.size)  # the demo base's own starting point
    data = make_demo_dataset(root / "data", tiles_per_organ=recipe.tiles_per_organ, size=recipe.size,
                             seed=recipe.seed, zoom=recipe.zoom, stain=recipe.stain)
    tiles = load_dataset(data, tile_size=recipe.size)
    val_stems = {t.stem for t in tiles if t.stem.endswith(("_01", "_02", "_03"))}  # three images per organ
    val = [t for t in tiles if t.stem in val_stems]
    train = [t for t in tiles if t.stem not in val_stems]
    t0 = time.perf_counter()
    res = finetune(train, root / "run", "vit_tiny", init, recipe.method(), recipe.train_config(),
                   mpp=recipe.mpp, infer=InferConfig(**recipe.infer()))
    seconds = time.perf_counter() - t0
    model, info = load_adapter(res.adapter, init)
    cfg, used = resolve_infer(recipe.infer(), info.thresholds)
    metrics, _ = score(SamTileSegmenter(model, cfg, device="cpu"), val, recipe.batch_size)
    # every mask the model proposes (thresholds at their loosest): does it mark the nuclei at all?
    loose = InferConfig(**{**recipe.infer(), "pred_iou_thresh": 0.0, "stability_thresh": 0.1, "fg_threshold": 0.05})
    marked, _ = score(SamTileSegmenter(model, loose, device="cpu"), val, recipe.batch_size)
    return model, val, {"thresholds": info.thresholds, "used": used, "metrics": metrics["mean"],
                        "loose_metrics": marked["mean"],
                        "train_iou": res.history[-1].train_iou,
                        "train_seconds": seconds,
                        "steps": len(res.history) * -(-info.meta["data"]["tiles"] // recipe.batch_size)}


DEMO_GUARD_EPOCHS = 150  # the reduced from-scratch recipe of the training guard (tests/test_demo_quality.py)
