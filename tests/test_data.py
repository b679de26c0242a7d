"""NuInsSeg loader on the real tiles, its errors, tiling of large images, few-shot selection."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile

from nucseg.learn.data import Tile, cut_tiles, discover, few_shot, load_dataset, summarize
from nucseg.errors import DataError, InputError


def test_real_tiles_load_with_manifest_counts(he_sample):
    manifest = {m["image"]: m for m in json.loads((he_sample / "manifest.json").read_text())}
    tiles = load_dataset(he_sample)
    assert len(tiles) == len(manifest) == 76
    assert {t.organ for t in tiles} == {"human glioblastoma", "human glioma"}
    for t in tiles:
        assert t.image.shape == (512, 512, 3) and t.image.dtype == np.uint8
        assert t.labels.shape == (512, 512) and t.ambiguous is None  # these organs have no vague areas
        assert len(np.unique(t.labels)) - 1 == manifest[t.name]["nuclei"]
        assert manifest[t.name]["organ"] == t.organ
    s = summarize(tiles)
    assert s["nuclei"] == sum(m["nuclei"] for m in manifest.values()) and s["tile_size"] == 512


def _copy_organ(he_sample, tmp_path, n=2):
    src = he_sample / "human glioma"
    dst = tmp_path / "data" / "organ"
    for sub in ("tissue images", "label masks modify"):
        (dst / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir())[:n]:
            shutil.copy(f, dst / sub / f.name)
    return dst


def test_layout_errors_name_the_file(he_sample, tmp_path):
    organ = _copy_organ(he_sample, tmp_path)
    (organ / "tissue images" / "notes.txt").write_text("not an image")  # ignored with a warning
    assert len(discover(tmp_path / "data")) == 2
    assert len(discover(organ)) == 2  # a single organ folder works too
    label = sorted((organ / "label masks modify").iterdir())[0]
    tifffile.imwrite(label, np.zeros((100, 80), np.uint16))
    with pytest.raises(DataError, match=f"size mismatch: .* but {label}"):
        load_dataset(tmp_path / "data")
    label.unlink()
    with pytest.raises(DataError, match=f"missing label file {label.with_suffix('.tif')}"):
        discover(tmp_path / "data")
    img = sorted((organ / "tissue images").glob("*.png"))[1]
    img.write_bytes(b"\x89PNG broken")
    (organ / "label masks modify" / label.name).write_bytes(b"")  # restore a (bad) label for the first
    with pytest.raises(DataError):
        load_dataset(tmp_path / "data")
    with pytest.raises(InputError, match="not found"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no NuInsSeg organ folders"):
        discover(tmp_path / "empty")
    (tmp_path / "e2" / "o" / "tissue images").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        discover(tmp_path / "e2")


def test_large_images_are_cut_and_padded():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (700, 600, 3), dtype=np.uint8)
    lab = rng.integers(0, 5, (700, 600)).astype(np.int32)
    parts = cut_tiles(Tile("big", "o", img, lab, None), 512)
    assert [p.name for p in parts] == ["big@0,0", "big@0,512", "big@512,0", "big@512,512"]
    assert all(p.image.shape == (512, 512, 3) for p in parts)
    assert np.array_equal(parts[3].labels[:188, :88], lab[512:, 512:]) and not parts[3].labels[188:].any()
    assert (parts[3].image[188:] == 255).all()  # padding is white background
    assert parts[0].stem == "big"
    small = Tile("s", "o", img[:100, :100], lab[:100, :100], None)
    assert cut_tiles(small, 512) == [small]


def test_few_shot_selects_exemplars_and_synthesizes(real_tiles):
    out = few_shot(real_tiles, 2, synthesize_per=3, seed=0)
    assert len(out) == 2 + 6 and [t.organ for t in out[2:]] == ["synthetic"] * 6
    assert all(t.labels.max() > 0 and t.labels.shape == t.image.shape[:2] for t in out)
    assert [t.name for t in few_shot(real_tiles, 2, None, seed=0)] == [t.name for t in out[:2]]
    with pytest.raises(DataError):
        few_shot(real_tiles, 99, None, seed=0)
