"""The top-level API: ``nucseg.segment_image`` / ``nucseg.load_segmenter`` / ``nucseg.predict_slide``, and the
README's notebook-style example run as written (with a tiny model, a real tile and a small slide)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import nucseg
from nucseg.errors import InputError
from model_helpers import tiny_trained_lora

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

REPO = Path(__file__).resolve().parents[1]
SIZE = 512


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_official_ckpt):
    """A vit_tiny LoRA adapter with perturbed weights (no training: the API is under test, not the model)."""
    from nucseg.model.adapter import save_adapter
    from nucseg.model.lora import MethodConfig

    method = MethodConfig(method="lora", rank=2)
    model, fp = tiny_trained_lora(tiny_official_ckpt, method, SIZE)
    meta = {"base": {"model": "vit_tiny", "fingerprint": fp, "init_seed": 0, "checkpoint_sha256": fp,
                     "checkpoint_name": tiny_official_ckpt.name},
            "input_size": SIZE, "mpp": 0.5, "parameters": {"trainable": 1, "total": 2},
            "data": {"tiles": 3, "images": 3, "nuclei": 40, "organs": ["x"], "tile_size": SIZE}}
    return save_adapter(tmp_path_factory.mktemp("api") / "adapter", model, method, meta)


def _readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [b for b in blocks if "nucseg.segment_image(" in b]
    assert len(found) == 1, "README.md has one Python example using nucseg.segment_image"
    return found[0]


def test_readme_example_runs(tiny_adapter, tiny_official_ckpt, he_sample, tmp_path, capsys):
    from nucseg.wsi.synthslide import make_synthetic_slide

    tile = sorted((he_sample / "human glioma" / "tissue images").glob("*.png"))[0]
    slide = tmp_path / "slide.tif"
    make_synthetic_slide(slide, 400, 300, mpp=0.5, nuclei=20, tissue_fraction=1.0, seed=1)
    out = tmp_path / "slide.geojson"
    code = _readme_example()
    for name, value in {"tile.png": tile, "runs/lora/adapter": tiny_adapter, "sam_vit_b_01ec64.pth": tiny_official_ckpt,
                        "slide.svs": slide, "slide.geojson": out}.items():
        assert f'"{name}"' in code
        code = code.replace(f'"{name}"', repr(str(value)))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    from nucseg.io import read_rgb

    assert re.fullmatch(rf"{re.escape(str(read_rgb(tile).shape[:2]))} \d+ nuclei", printed.splitlines()[0]), printed
    assert out.is_file() and f"-> {out}" in printed
    assert re.search(r"^\d+/\d+ tiles, \d+ nuclei$", printed, re.M), printed  # the progress callback ran


def test_segment_image_matches_the_library_path(tiny_adapter, tiny_official_ckpt, real_tiles):
    from nucseg.segment import segment_image
    from nucseg.segmenter import SegmenterSpec

    rgb = np.ascontiguousarray(np.tile(real_tiles[0].image, (2, 1, 1))[:700, :300])  # taller than the input: tiled
    labels = nucseg.segment_image(rgb, adapter=tiny_adapter, checkpoint=tiny_official_ckpt, points_per_side=8)
    seg = SegmenterSpec.sam(tiny_adapter, tiny_official_ckpt, infer={"points_per_side": 8}).build()
    assert labels.shape == rgb.shape[:2]
    np.testing.assert_array_equal(labels, segment_image(seg, rgb))
    # the segmenter is kept: the same options give the same object, no second load
    assert nucseg.load_segmenter(tiny_adapter, tiny_official_ckpt, points_per_side=8) is \
        nucseg.load_segmenter(tiny_adapter, tiny_official_ckpt, points_per_side=8)
    np.testing.assert_array_equal(nucseg.segment_image(rgb, segmenter=seg), labels)


def test_segment_image_refuses_what_is_not_rgb():
    with pytest.raises(InputError, match=r"\(H, W, 3\) uint8"):
        nucseg.segment_image(np.zeros((8, 8), np.uint8), model="vit_tiny")
    with pytest.raises(InputError, match=r"\(H, W, 3\) uint8"):
        nucseg.segment_image(np.zeros((8, 8, 3), np.float32), model="vit_tiny")
    with pytest.raises(InputError, match="not both"):
        nucseg.segment_image(np.zeros((8, 8, 3), np.uint8), adapter="x", segmenter=object())
