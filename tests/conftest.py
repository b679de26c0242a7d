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
    """The committed demo base (``adapters/demo-base``, checked against its recorded SHA-256) and six demo tiles
    it never saw, of the demo's own recipe (``nucseg.learn.demo.QUICK``: three per organ).

    Returns (model, validation tiles, checkpoint path). No training: the base's recipe is guarded at reduced
    size by tests/test_demo_quality.py.
    """
    from nucseg.learn.data import load_dataset
    from nucseg.learn.demo import QUICK, demo_base, make_demo_dataset
    from nucseg.model.sam import load_sam

    path = demo_base()
    model, _ = load_sam("vit_tiny", path, img_size=QUICK.size)
    model.eval()
    data = make_demo_dataset(tmp_path_factory.mktemp("demo_tiles") / "data", tiles_per_organ=3, size=QUICK.size,
                             seed=QUICK.seed, zoom=QUICK.zoom, stain=QUICK.stain, cells=QUICK.cells)
    return model, load_dataset(data, tile_size=QUICK.size), path
