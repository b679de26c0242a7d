"""Hostile inputs to ``nucseg predict`` (issue 24, classes 11, 13, 14, 15, 18, 20): an ROI mask is size-checked
from its header before it is decoded, ROI JSON is strict, a read-only ``--work-dir`` is exit 6, and a pickled
checkpoint is exit 4 whatever else is missing."""

from __future__ import annotations

import errno
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from shapely.geometry import mapping

from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main
from hostile_helpers import one_error_line

THRESHOLD = ["--segmenter", "threshold", "--tile-size", "256", "--overlap", "32"]



@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "s.tif"
    make_synthetic_slide(path, 600, 500, mpp=0.5, nuclei=40, tissue_fraction=1.0, pyramid=False, seed=1)
    return path


def _annotation(path: Path, geom) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": mapping(geom), "properties": {"objectType": "annotation"}}]}))
    return path


def _predict(slide: Path, out: Path, *extra: str) -> int:
    return main(["-q", "predict", str(slide), "-o", str(out / "x.geojson"), *extra, *THRESHOLD])


# ------------------------------------------------------------------------------ class 11: mask bombs
def test_a_huge_compressed_tiff_mask_is_refused_before_it_is_decoded(slide, tmp_path, capsys):
    """14000² pixels in a ~0.2 MB tiled TIFF: refused from its header (Pillow's decompression-bomb limit, as for
    PNG), with no allocation of the mask (main decoded it: hundreds of MB; 30000² took 5.4 GB)."""
    mask = tmp_path / "roi.tif"
    tile = np.zeros((1024, 1024), np.uint8)
    with tifffile.TiffWriter(mask) as tw:
        tw.write((tile for _ in range(14 * 14)), shape=(14 * 1024, 14 * 1024), dtype=np.uint8, tile=(1024, 1024),
                 compression="zlib")
    assert mask.stat().st_size < 2_000_000
    out = tmp_path / "out"
    rc = _predict(slide, out, "--roi", str(mask))
    one_error_line(rc, capsys.readouterr().err, 2, "more than the 178,956,970")
    assert not out.exists()
    from nucseg.errors import InputError
    from nucseg.wsi.roi import load_roi

    with pytest.raises(InputError):  # warm-up: every module imported before memory is traced
        load_roi(mask, 600, 500)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="decompression-bomb limit"):
            load_roi(mask, 600, 500)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MB"  # the mask itself would be 196 MB


# ------------------------------------------------------------------------------ class 20: ROI edges
def test_a_1x1_mask_is_a_valid_roi(slide, tmp_path, capsys):
    """A 1x1 mask covers the whole (square-enough) slide at 1/500: it is 2-D, not "shape ()"."""
    mask = tmp_path / "one.tif"
    tifffile.imwrite(mask, np.ones((1, 1), np.uint8))
    from nucseg.wsi.roi import load_roi

    roi = load_roi(mask, 600, 600)
    assert roi.mask.shape == (1, 1) and roi.contains(np.array([10.0, 599.0]), np.array([10.0, 599.0])).all()


def test_an_roi_that_only_touches_a_corner_is_refused(slide, tmp_path, capsys):
    roi = _annotation(tmp_path / "roi.geojson", shapely.box(-100, -100, 0, 0))  # meets the slide in one point
    out = tmp_path / "out"
    rc = _predict(slide, out, "--roi", str(roi))
    one_error_line(rc, capsys.readouterr().err, 2, "lies outside the slide")
    assert not out.exists()


def test_a_lon_lat_roi_is_refused_not_an_empty_result(slide, tmp_path, capsys):
    """Degrees east/north are small positive numbers: a region of 1e-4 px² near the origin would keep no nucleus
    and exit 0 [8]."""
    roi = _annotation(tmp_path / "roi.geojson", shapely.box(10.12, 45.31, 10.13, 45.32))
    out = tmp_path / "out"
    rc = _predict(slide, out, "--roi", str(roi))
    one_error_line(rc, capsys.readouterr().err, 2, "less than one pixel")
    assert not out.exists()


# ------------------------------------------------------------------------------ classes 14, 15: ROI JSON
@pytest.mark.parametrize("kind,needle", [
    ("deep", "nested more than 64 levels"),
    ("nan", "NaN and Infinity are not JSON numbers"),
    ("properties-string", 'feature 0 has "properties" of type str'),
])
def test_hostile_roi_json_is_one_line(kind, needle, slide, tmp_path, capsys):
    roi = tmp_path / "roi.geojson"
    if kind == "deep":
        roi.write_text('{"type": "FeatureCollection", "features": [' + "[" * 100_000 + "]" * 100_000 + "]}")
    elif kind == "nan":
        roi.write_text('{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": '
                       '[[[10, 10], [200, 10], [200, NaN], [10, 200], [10, 10]]]}}')
    else:
        roi.write_text(json.dumps({"type": "Feature", "properties": "Tumor",
                                   "geometry": mapping(shapely.box(10, 10, 200, 200))}))
    out = tmp_path / "out"
    rc = _predict(slide, out, "--roi", str(roi), *(["--roi-class", "Tumor"] if kind == "properties-string" else []))
    one_error_line(rc, capsys.readouterr().err, 2, needle)
    assert not out.exists()


# ------------------------------------------------------------------------------ class 13: read-only work dir
def test_a_read_only_work_dir_is_exit_6(slide, tmp_path, monkeypatch, capsys):
    """The work dir exists on a read-only mount: every new file there fails with EROFS (simulated: the tests may
    run as root, which a chmod does not stop)."""
    work = tmp_path / "work"
    work.mkdir()
    prefix = str(work)
    real_open, real_mkdir, real_builtin_open = os.open, os.mkdir, open

    def refuse(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(prefix)

    def ro_open(path, flags, *a, **k):
        if refuse(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_open(path, flags, *a, **k)

    def ro_mkdir(path, *a, **k):
        if refuse(path):
            if os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path))
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_mkdir(path, *a, **k)

    def ro_builtin_open(file, mode="r", *a, **k):
        if not isinstance(file, int) and refuse(file) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(file))
        return real_builtin_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    monkeypatch.setattr("builtins.open", ro_builtin_open)
    out = tmp_path / "out"
    rc = _predict(slide, out, "--work-dir", str(work))
    monkeypatch.undo()
    one_error_line(rc, capsys.readouterr().err, 6, str(work))
    assert not out.exists()


# ------------------------------------------------------------------------------ class 18: pickled checkpoint
def test_a_pickled_checkpoint_without_model_is_exit_4(slide, tmp_path, capsys):
    """The file at fault first: a pickle given as --checkpoint is a bad checkpoint (4), never unpickled, even
    when --model is missing too (main answered 2, "give --adapter DIR, or --model")."""
    import builtins

    import torch

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (builtins.open, (str(marker), "w"))

    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"x": Payload()}, ckpt)
    out = tmp_path / "out"
    rc = main(["-q", "predict", str(slide), "-o", str(out / "x.geojson"), "--checkpoint", str(ckpt)])
    one_error_line(rc, capsys.readouterr().err, 4, f"cannot read checkpoint {ckpt}")
    assert not marker.exists() and not out.exists()
