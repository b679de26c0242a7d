"""Slide access: formats, µm/px, pyramid level choice, resampled reads, tissue detection, clear errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest

from nucseg.errors import InputError, SlideError
from nucseg.wsi.slide import (TargetView, _block_mean, _mpp_from_tiff_tags, best_level, detect_tissue, open_slide,
                              read_overview, slide_mpp)
from nucseg.wsi.synthslide import make_synthetic_slide


@pytest.fixture(scope="module")
def pyramid_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "pyr.tif"
    make_synthetic_slide(path, 2048, 1536, mpp=0.25, nuclei=300, tissue_fraction=0.5, seed=5)
    return path


def test_real_svs_metadata(cmu_svs):
    slide = open_slide(cmu_svs)
    assert slide.level_dimensions[0] == (2220, 2967)
    assert slide_mpp(slide) == pytest.approx(0.499)
    assert slide_mpp(slide, override=0.3) == 0.3
    view = TargetView.create(slide, cmu_svs, 0.499, 0.5)  # within 2 %: native read, no resampling
    assert (view.factor, view.scale, view.width, view.height) == (1.0, 1.0, 2220, 2967)
    tile = view.read(1800, 2600, 512)  # runs past both edges: padded white
    assert tile.shape == (512, 512, 3) and tile.dtype == np.uint8
    assert (tile[367:, :] == 255).all() and (tile[:, 420:] == 255).all()
    direct = np.asarray(slide.read_region((1800, 2600), 0, (420, 367)).convert("RGB"))
    np.testing.assert_array_equal(tile[:367, :420], direct)


def test_generated_tiff_is_a_pyramidal_generic_tiff_with_mpp(pyramid_slide):
    slide = openslide.OpenSlide(str(pyramid_slide))
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert slide.level_count >= 3
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert slide_mpp(slide) == pytest.approx(0.25)


def test_tiff_tag_fallback():
    assert _mpp_from_tiff_tags({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}) == pytest.approx(0.5)
    assert _mpp_from_tiff_tags({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}) == pytest.approx(0.5)
    assert _mpp_from_tiff_tags({"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"}) is None


def test_best_level_is_largest_mpp_not_above_target(pyramid_slide):
    slide = openslide.OpenSlide(str(pyramid_slide))  # levels: 0.25, 0.5, 1.0, 2.0 µm/px
    assert best_level(slide, 0.25, 0.25) == 0
    assert best_level(slide, 0.25, 0.5) == 1
    assert best_level(slide, 0.25, 0.9) == 1
    assert best_level(slide, 0.25, 1.0) == 2
    assert best_level(slide, 0.25, 0.1) == 0
    view = TargetView.create(slide, pyramid_slide, 0.25, 1.0)
    assert view.level == 2 and view.factor == 1.0 and view.scale == pytest.approx(4.0)
    assert (view.width, view.height) == (512, 384)


def test_resampled_reads_agree_across_tiles(pyramid_slide):
    """A target pixel has the same value whichever tile reads it: the property seam-exact stitching needs."""
    slide = openslide.OpenSlide(str(pyramid_slide))
    view = TargetView.create(slide, pyramid_slide, 0.25, 0.8)  # level 1 (0.5) resampled by 1.6
    assert view.level == 1 and view.factor == pytest.approx(1.6)
    big = view.read(0, 0, 700)
    for x, y in [(100, 60), (320, 200), (448, 448)]:
        tile = view.read(x, y, 200)
        np.testing.assert_array_equal(tile, big[y : y + 200, x : x + 200])
    # and it is a faithful resampling: close to skimage's anti-aliased resize of the whole level
    from skimage.transform import resize

    level1 = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB"))
    ref = resize(level1, (view.height, view.width), anti_aliasing=True, preserve_range=True)
    assert (view.width, view.height) == (640, 480)
    assert np.abs(big[:480, :640].astype(float) - ref).mean() < 3.0
    assert (big[480:, :] == 255).all() and (big[:, 640:] == 255).all()  # past the slide: white


def test_tissue_detection_matches_truth(tmp_path):
    path = tmp_path / "t.tif"
    make_synthetic_slide(path, 1600, 1200, mpp=0.5, nuclei=200, tissue_fraction=0.4, seed=2)
    slide = openslide.OpenSlide(str(path))
    tissue = detect_tissue(slide, path, 0.5, mpp=8.0)
    # truth: overview pixels (16x16 block means) that are mostly tissue -- pink (mean 197) vs glass (255)
    truth = tissue.overview.mean(axis=-1) < 226
    inter, union = (truth & tissue.mask).sum(), (truth | tissue.mask).sum()
    assert inter / union > 0.9
    assert tissue.area_mm2 == pytest.approx(1600 * 1200 * 0.4 * 0.25e-6, rel=0.15)


@pytest.mark.parametrize("block", [1, 2, 3, 4, 6, 16, 22, 31, 48, 63, 64])
@pytest.mark.parametrize("opaque", [True, False])
def test_overview_block_mean_is_the_exact_rounded_mean(block, opaque):
    """The overview's fast path (OpenCV's area resize) equals the integer block sum's mean rounded half to
    even, ties included (every 2x2 block below is a tie candidate), and transparency composites over white."""
    rng = np.random.default_rng(block)
    h, w = 40 * block, 30 * block  # 1,200 blocks, ~1,200 / (2 * block^2) of them exact ties for even blocks
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    if not opaque:
        rgba[: h // 3, :, 3] = 0  # outside the scanned area
        rgba[h // 3 : h // 2, :, 3] = 128
    rgb = rgba[..., :3].astype(np.float64)
    a = rgba[..., 3:].astype(np.float64) / 255.0
    over = np.clip(np.rint(rgb * a + 255.0 * (1.0 - a)), 0, 255)  # over white, as composite_white rounds it
    expect = np.rint(over.reshape(40, block, 30, block, 3).sum(axis=(1, 3)) / block**2)
    got = _block_mean(rgba, block)
    assert got.dtype == np.uint8 and got.shape == (40, 30, 3)
    np.testing.assert_array_equal(got, expect.astype(np.uint8))


@pytest.mark.parametrize("target, block_px", [(8.0, 4096), (8.0, 200), (2.0, 4096), (0.6, 512), (3.1, 300)])
def test_overview_is_the_same_whatever_the_threads_and_blocks(cmu_svs, monkeypatch, target, block_px):
    """Row strips read side by side (one per thread) and small read blocks give the overview read in one piece."""
    import nucseg.threads

    slide = openslide.OpenSlide(str(cmu_svs))
    mpp0 = slide_mpp(slide, path=cmu_svs)
    monkeypatch.setattr(nucseg.threads, "current_threads", lambda: 1)
    one, mpp_one = read_overview(slide, cmu_svs, mpp0, target, block_px=1 << 20)
    for cpus in (2, 3, 4):
        monkeypatch.setattr(nucseg.threads, "current_threads", lambda: cpus)
        got, mpp = read_overview(slide, cmu_svs, mpp0, target, block_px=block_px)
        assert mpp == mpp_one
        np.testing.assert_array_equal(got, one)


@pytest.mark.parametrize("target, block_px", [(2.0, 256), (4.0, 300), (2.0, 4096)])
def test_overview_of_fractional_levels_does_not_depend_on_the_threads(tmp_path, monkeypatch, target, block_px):
    """Levels whose downsample is not an integer (odd slide sizes) are read at interpolated positions: their
    blocks must start where they always did, whatever the number of threads (the tissue mask and the cache key
    must not change with the machine)."""
    import nucseg.threads

    path = tmp_path / "odd.tif"
    make_synthetic_slide(path, 1203, 1001, mpp=0.5, nuclei=200, tissue_fraction=0.6, pyramid=True, seed=3)
    slide = openslide.OpenSlide(str(path))
    assert any(not float(d).is_integer() for d in slide.level_downsamples)
    monkeypatch.setattr(nucseg.threads, "current_threads", lambda: 1)
    one, _ = read_overview(slide, path, 0.5, target, block_px=block_px)
    for cpus in (2, 3, 4):
        monkeypatch.setattr(nucseg.threads, "current_threads", lambda: cpus)
        np.testing.assert_array_equal(read_overview(slide, path, 0.5, target, block_px=block_px)[0], one)


def test_full_tissue_and_empty_slide(tmp_path):
    full = tmp_path / "full.tif"
    make_synthetic_slide(full, 1024, 1024, tissue_fraction=1.0, nuclei=300, pyramid=False)
    t = detect_tissue(openslide.OpenSlide(str(full)), full, 0.5)
    assert t.mask.mean() > 0.95  # no glass at all: Otsu must not split pink tissue from nuclei
    empty = tmp_path / "empty.tif"
    make_synthetic_slide(empty, 1024, 1024, empty=True, pyramid=False)
    t = detect_tissue(openslide.OpenSlide(str(empty)), empty, 0.5)
    assert not t.mask.any() and t.area_mm2 == 0.0


def test_missing_mpp_is_an_error_unless_overridden(tmp_path):
    path = tmp_path / "nompp.tif"
    make_synthetic_slide(path, 600, 600, mpp=None, nuclei=10, pyramid=False)
    slide = open_slide(path)
    with pytest.raises(SlideError, match="--slide-mpp") as err:
        slide_mpp(slide, path=path)
    assert "nompp.tif" in str(err.value) and "\n" not in str(err.value)
    assert slide_mpp(slide, override=0.5) == 0.5
    with pytest.raises(InputError):
        slide_mpp(slide, override=-1.0)


def test_bad_files_raise_one_line_errors(tmp_path, cmu_svs):
    with pytest.raises(InputError, match="not found"):
        open_slide(tmp_path / "nope.svs")
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    with pytest.raises(SlideError, match="notes.svs"):
        open_slide(text)
    trunc = tmp_path / "trunc.svs"
    shutil.copyfile(cmu_svs, trunc)
    os.chmod(trunc, 0o644)
    with open(trunc, "r+b") as fh:
        fh.truncate(os.path.getsize(trunc) // 2)
    with pytest.raises(SlideError, match="trunc.svs") as err:
        open_slide(trunc)
    assert "\n" not in str(err.value)


def test_corrupt_tile_data_raises_slide_error_on_read(tmp_path):
    """A file that opens but whose tile data is damaged fails at read time, also as a SlideError."""
    import tifffile

    path = tmp_path / "corrupt.tif"
    make_synthetic_slide(path, 1024, 1024, nuclei=50, tissue_fraction=1.0, pyramid=True)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offset, count = page.dataoffsets[5], page.databytecounts[5]
    with open(path, "r+b") as fh:  # overwrite one level-0 tile's compressed bytes with garbage
        fh.seek(offset)
        fh.write(b"\xff" * count)
    slide = open_slide(path)
    view = TargetView.create(slide, path, 0.5, 0.5)
    with pytest.raises(SlideError, match="corrupt.tif"):
        view.read(0, 0, 1024)
