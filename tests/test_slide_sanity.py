"""Absurd scales and sizes are refused before any work, and plain images are called what they are.

µm/px outside 0.05-20 (slide metadata, --slide-mpp, --mpp, an adapter's), up-sampling beyond 4x, grids beyond
the tile/pixel limits, PredictConfig fields of the wrong type or range, and PNG/JPEG/untiled TIFF files given
to ``predict``: each is one ``nucseg: error:`` line with the documented exit code and nothing written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

import nucseg.wsi.predict as predict_mod
from nucseg.model.classical import ThresholdSegmenter
from nucseg.errors import InputError, SlideError
from nucseg.wsi.predict import PredictConfig, predict_slide
from nucseg.wsi.slide import MPP_RANGE, TargetView, check_mpp, open_slide, slide_mpp
from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main

THRESHOLD = ["--segmenter", "threshold", "--tile-size", "256", "--overlap", "32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sanity")
    f = {"root": root}
    f["slide"] = root / "good.tif"
    make_synthetic_slide(f["slide"], 600, 500, mpp=0.5, nuclei=30, tissue_fraction=1.0, pyramid=False, seed=1)
    rgb = np.full((300, 400, 3), 200, np.uint8)
    # a tiled TIFF saved by an image editor at 72 dpi: OpenSlide reads it, at 352.8 µm/px
    f["dpi72"] = root / "dpi72.tif"
    tifffile.imwrite(f["dpi72"], rgb, tile=(256, 256), resolution=(72, 72), resolutionunit="INCH")
    f["png"] = root / "photo.png"
    imsave(f["png"], rgb, check_contrast=False)
    f["jpg"] = root / "photo.jpg"
    imsave(f["jpg"], rgb, check_contrast=False)
    f["striped"] = root / "striped.tif"
    tifffile.imwrite(f["striped"], rgb, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    f["fake_png"] = root / "broken.png"
    f["fake_png"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG header, then nothing
    return f


def _check(rc: int, err: str, code: int, needle: str) -> None:
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("nucseg: error: ") and needle in lines[0], err


def _written(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


CASES = [
    # (id, extra argv, slide key, exit code, text of the error line); option values are refused by the CLI's
    # argument types, the library's own checks (PredictConfig.validate, check_mpp) are tested below
    ("metadata-72dpi", [], "dpi72", 5, "reports 352.8 µm/px (from its TIFF resolution tags: 72 pixels per inch), "
                                       "outside the plausible 0.05-20 µm/px; pass the true value with --slide-mpp"),
    ("slide-mpp-huge", ["--slide-mpp", "352.8"], "slide", 2, "argument --slide-mpp: must be a finite number in [0.05, 20], not '352.8'"),
    ("slide-mpp-tiny", ["--slide-mpp", "1e-9"], "slide", 2, "argument --slide-mpp: must be a finite number in [0.05, 20]"),
    ("slide-mpp-zero", ["--slide-mpp", "0"], "slide", 2, "argument --slide-mpp: must be a finite number in [0.05, 20]"),
    ("slide-mpp-nan", ["--slide-mpp", "nan"], "slide", 2, "argument --slide-mpp: must be a finite number in [0.05, 20]"),
    ("mpp-huge", ["--mpp", "1e300"], "slide", 2, "argument --mpp: must be a finite number in [0.05, 20]"),
    ("mpp-zero", ["--mpp", "0"], "slide", 2, "argument --mpp: must be a finite number in [0.05, 20]"),
    ("upsampling", ["--mpp", "0.1"], "slide", 2, "target 0.1 µm/px is 5x finer than slide"),
    ("tile-size-huge", ["--tile-size", "100000"], "slide", 2, "argument --tile-size: must be a whole number in 64..4096"),
    ("batch-size-zero", ["--batch-size", "0"], "slide", 2, "argument --batch-size: must be a whole number in 1..4096"),
    ("png", [], "png", 5, "is not a whole-slide image but a PNG image"),
    ("jpeg", [], "jpg", 5, "is not a whole-slide image but a JPEG image"),
    ("striped-tiff", [], "striped", 5, "is not a whole-slide image but a plain (untiled) TIFF image"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_absurd_scales_sizes_and_plain_images(case, files, tmp_path, capsys):
    _, extra, key, code, needle = case
    argv = ["-q", "predict", str(files[key]), "-o", str(tmp_path / "out" / "x.geojson"), *THRESHOLD, *extra]
    rc = main(argv)
    _check(rc, capsys.readouterr().err, code, needle)
    assert _written(tmp_path) == []


def test_plain_image_message_names_the_alternative(files):
    with pytest.raises(SlideError) as err:
        open_slide(files["png"])
    assert str(err.value) == (
        f"{files['png']} is not a whole-slide image but a PNG image (OpenSlide reads scanner formats and tiled "
        "TIFFs); use `nucseg segment` for plain images, or convert it to a tiled pyramidal TIFF with its µm/px")


def test_a_damaged_file_is_still_called_damaged(files):
    # a PNG signature alone says "PNG", but a TIFF that does not parse, or a tiled one, may be a broken slide
    with pytest.raises(SlideError, match="is not a whole-slide image but a PNG image"):
        open_slide(files["fake_png"])
    cut = files["root"] / "cut.tif"
    cut.write_bytes(files["slide"].read_bytes()[:4000])
    with pytest.raises(SlideError, match=f"^cannot open slide {cut}"):
        open_slide(cut)


def test_the_slide_mpp_override_rescues_a_72dpi_tiff(files, tmp_path):
    slide = open_slide(files["dpi72"])
    try:
        with pytest.raises(SlideError, match="--slide-mpp"):
            slide_mpp(slide, None, files["dpi72"])
        assert slide_mpp(slide, 0.25, files["dpi72"]) == 0.25
    finally:
        slide.close()


@pytest.mark.parametrize("value", [MPP_RANGE[0], 0.25, 1, MPP_RANGE[1], np.float32(0.5)])
def test_check_mpp_accepts_the_plausible_range(value):
    assert check_mpp(value, "x") == pytest.approx(float(value))


@pytest.mark.parametrize("value", [0.049, 20.01, -0.5, float("inf"), float("nan"), "0.5", "0.5um", True, None, [0.5]])
def test_check_mpp_refuses(value):
    with pytest.raises(InputError, match="^x "):
        check_mpp(value, "x")


def test_upsampling_up_to_4x_is_allowed(files):
    slide = open_slide(files["slide"])
    try:
        assert TargetView.create(slide, files["slide"], 0.5, 0.125).width == 2400
        with pytest.raises(InputError, match=r"4.17x finer .* at most 4x up-sampling"):
            TargetView.create(slide, files["slide"], 0.5, 0.12)
    finally:
        slide.close()


def test_an_adapters_absurd_mpp_is_refused(files, tmp_path):
    seg = ThresholdSegmenter(tile_size=256, mpp=1e-9)
    with pytest.raises(InputError, match="the model's training µm/px .* 1e-09 is outside"):
        predict_slide(files["slide"], tmp_path / "x.geojson", seg, PredictConfig(overlap=32))


def test_the_grid_is_checked_before_the_slide_is_read(files, tmp_path, monkeypatch):
    """The limits apply before tissue detection (the first read of pixels) and before any allocation."""
    def no_reading(*a, **k):
        raise AssertionError("the slide was read before the grid was checked")

    monkeypatch.setattr(predict_mod, "detect_tissue", no_reading)
    monkeypatch.setattr(predict_mod, "MAX_TILES", 5)
    seg = ThresholdSegmenter(tile_size=256)
    with pytest.raises(InputError) as err:
        predict_slide(files["slide"], tmp_path / "x.geojson", seg, PredictConfig(overlap=32))
    msg = str(err.value)
    assert "would be 600 x 500 target pixels (3e+05) in 9 tiles of 256 px; the limits are 5 tiles" in msg
    assert "check the µm/px (--slide-mpp, --mpp) and --tile-size" in msg
    monkeypatch.setattr(predict_mod, "MAX_TILES", 1_000_000)
    monkeypatch.setattr(predict_mod, "MAX_TARGET_PIXELS", 1e5)
    with pytest.raises(InputError, match=r"600 x 500 target pixels \(3e\+05\).* and 1e\+05 pixels"):
        predict_slide(files["slide"], tmp_path / "x.geojson", seg, PredictConfig(overlap=32))
    assert _written(tmp_path) == []


def test_the_issue_example_would_be_refused_by_the_grid_limit_as_well():
    """722,488² target px (a 72-dpi TIFF taken at face value, target 0.5 µm/px): refused on both limits."""
    from types import SimpleNamespace

    from nucseg.wsi.tiling import make_grid

    grid = make_grid(722_488, 722_488, 512, 64)
    view = SimpleNamespace(width=722_488, height=722_488, path=Path("x.tif"), target_mpp=0.5, mpp0=352.8)
    assert grid.n > predict_mod.MAX_TILES
    with pytest.raises(InputError, match=r"722,488 x 722,488 target pixels \(5.22e\+11\) in 2,601,769 tiles"):
        predict_mod.check_grid(grid, view)


GOOD = PredictConfig()


@pytest.mark.parametrize("field,value", [
    ("tile_size", 0), ("tile_size", 63), ("tile_size", 4097), ("tile_size", 256.0), ("tile_size", "256"),
    ("tile_size", True), ("overlap", -1), ("overlap", 1.5), ("batch_size", 0), ("batch_size", 10**6),
    ("read_workers", 0), ("label_chunk", 8), ("target_mpp", 0.0), ("target_mpp", "0.5"), ("slide_mpp", -1.0),
    ("slide_mpp", float("inf")), ("tissue_mpp", 0.0), ("tissue_mpp", float("nan")), ("simplify_tolerance", -1.0),
    ("tissue_mask", 1), ("cache_tiles", "yes"), ("work_dir", 3), ("csv", b"x.csv"), ("model_fingerprint", 5),
])
def test_predict_config_validate_refuses(field, value):
    import dataclasses

    cfg = dataclasses.replace(GOOD, **{field: value})
    with pytest.raises(InputError, match=f"^{field}"):
        cfg.validate()


def test_predict_config_validate_accepts_the_defaults_and_sensible_values(tmp_path):
    assert PredictConfig().validate() == PredictConfig()
    PredictConfig(target_mpp=0.25, slide_mpp=0.5, tile_size=np.int64(1024), overlap=0, batch_size=64,
                  work_dir=tmp_path, csv=str(tmp_path / "x.csv"), model_fingerprint="m").validate()


def test_a_bad_setting_fails_a_batch_at_once_not_every_slide(files, tmp_path, capsys):
    from nucseg.wsi.batch import predict_slides

    out = tmp_path / "out"
    rc = main(["-q", "predict", str(files["slide"]), str(files["dpi72"]), "--out-dir", str(out), *THRESHOLD,
               "--tile-size", "100000"])
    _check(rc, capsys.readouterr().err, 2, "argument --tile-size: must be a whole number in 64..4096")
    with pytest.raises(InputError, match=r"tile_size \(--tile-size\) must be an integer in \[64, 4096\]"):
        predict_slides([files["slide"], files["dpi72"]], out, ThresholdSegmenter(tile_size=256),
                       PredictConfig(tile_size=100000))
    assert _written(tmp_path) == []  # not even a run log


def test_a_batch_records_a_72dpi_slide_as_failed_and_does_the_others(files, tmp_path, capsys):
    import json

    out = tmp_path / "out"
    rc = main(["-q", "predict", str(files["slide"]), str(files["dpi72"]), "--out-dir", str(out), *THRESHOLD])
    assert rc == 9
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["done"] == 1 and summary["failed"] == 1 and "--slide-mpp" in summary["failures"][0]["error"]
