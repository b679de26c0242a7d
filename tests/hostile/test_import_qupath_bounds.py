"""Hostile inputs to ``nucseg import-qupath`` (issue 24, classes 7, 8, 10, 14, 15, 16): bounded work, one line
and the documented exit code for every bad export, never "exit 0 and an all-zero label map"."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image
from shapely.geometry import mapping

from nucseg_cli.main import main
from hostile_helpers import one_error_line



def _feature(geom, object_type: str = "detection", name: str = "Nucleus", props=None) -> dict:
    return {"type": "Feature", "geometry": geom if isinstance(geom, dict) else mapping(geom),
            "properties": props if props is not None else {"objectType": object_type,
                                                           "classification": {"name": name, "color": [200, 0, 120]}}}


def _export(path: Path, feats: list) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "img.png"
    Image.fromarray(np.full((120, 140, 3), 230, np.uint8)).save(path)
    return path


def _import(image: Path, geo: Path, out: Path, *extra: str) -> int:
    return main(["-q", "import-qupath", str(image), str(geo), "--out", str(out), *extra])


# ----------------------------------------------------------------------------------- class 7: stale outputs
def test_rerun_into_the_same_out_leaves_no_stale_vague_mask_or_tile(image, tmp_path, capsys):
    """A rerun must not keep the previous run's ``vague areas`` mask while reporting 0 overlapping pixels, nor
    tiles the new outlines no longer reach."""
    a, b = shapely.box(10, 10, 30, 30), shapely.box(25, 25, 45, 45)  # overlap: 25 ambiguous pixels
    far = shapely.box(100, 90, 110, 100)
    out = tmp_path / "ds"
    geo = _export(tmp_path / "n.geojson", [_feature(a), _feature(b), _feature(far)])
    assert _import(image, geo, out, "--tile-size", "64") == 0
    organ = out / "qupath"
    vague = sorted((organ / "vague areas" / "mask binary").glob("*.png"))
    assert len(vague) == 1 and len(list((organ / "tissue images").glob("*.png"))) == 2
    geo = _export(tmp_path / "n.geojson", [_feature(shapely.box(10, 10, 20, 20))])  # no overlap, one tile
    assert _import(image, geo, out, "--tile-size", "64") == 0
    report = json.loads((organ / "qupath-import.json").read_text())
    assert report["overlap_pixels"] == 0
    assert list((organ / "vague areas" / "mask binary").glob("*.png")) == []
    tiles = sorted(p.name for p in (organ / "tissue images").glob("*.png"))
    labels = sorted(p.name for p in (organ / "label masks modify").glob("*.tif"))
    assert tiles == ["img_x0_y0.png"] and labels == ["img_x0_y0.tif"]
    from nucseg.learn.data import load_dataset

    tiles = load_dataset(out)
    assert len(tiles) == 1 and tiles[0].labels.max() == 1  # what training reads: this import only


def test_rerun_keeps_files_nucseg_did_not_write(image, tmp_path):
    """Only nucseg's own tiles of this image are cleared: a user's file of a tile name stays (and is refused)."""
    out = tmp_path / "ds"
    geo = _export(tmp_path / "n.geojson", [_feature(shapely.box(10, 10, 20, 20))])
    assert _import(image, geo, out, "--tile-size", "64") == 0
    mine = out / "qupath" / "tissue images" / "img_x64_y64.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(mine)  # not tagged by nucseg
    assert _import(image, geo, out, "--tile-size", "64") == 0
    assert mine.exists()


# ----------------------------------------------------------------------------------- class 8: wrong units
@pytest.mark.parametrize("kind,needle", [
    ("lonlat-west", "lies on"),  # negative longitudes: every outline off the image
    ("lonlat-east", "covers a pixel centre"),  # small positive degrees: on the image, each smaller than a pixel
])
def test_lon_lat_coordinates_are_an_error_not_an_empty_label_map(kind, needle, image, tmp_path, capsys):
    lon, lat = (-73.985, 40.748) if kind == "lonlat-west" else (10.12, 45.31)
    polys = [shapely.Point(lon + i * 1e-4, lat).buffer(2e-5) for i in range(2)]
    geo = _export(tmp_path / "n.geojson", [_feature(p) for p in polys])
    out = tmp_path / "ds"
    rc = _import(image, geo, out)
    one_error_line(rc, capsys.readouterr().err, 2, needle)
    assert not out.exists()


def test_one_outline_at_1e300_is_ignored_with_a_warning(image, tmp_path, capsys):
    good = [shapely.box(10, 10, 20, 20), shapely.box(40, 40, 52, 50)]
    far = shapely.box(1e300, 1e300, 2e300, 2e300)
    geo = _export(tmp_path / "n.geojson", [_feature(p) for p in [*good, far]])
    out = tmp_path / "ds"
    with pytest.warns(UserWarning, match="1 of the 3 outlines .* lie outside"):
        rc = _import(image, geo, out)
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err, err
    labels = tifffile.imread(next((out / "qupath" / "label masks modify").glob("*.tif")))
    assert labels.max() == 2  # both real nuclei, not an all-zero map
    assert json.loads((out / "qupath" / "qupath-import.json").read_text())["ignored_outside"] == 1


# ----------------------------------------------------------------------------------- class 10: linear cost
@pytest.mark.timeout(120)
def test_a_region_of_1e5_vertices_rasterises_in_linear_time(tmp_path):
    """pixels x vertices took 59 s for this (one 512² tile); the scanline is O(vertices + pixels). The result is
    still shapely's exact pixel-centre convention."""
    from nucseg.wsi.qupath import rasterize

    t = np.linspace(0, 2 * np.pi, 100_000, endpoint=False)
    r = 200 + 30 * np.sin(500 * t)
    poly = shapely.Polygon(np.c_[256 + r * np.cos(t), 256 + r * np.sin(t)])
    assert poly.is_valid and len(poly.exterior.coords) > 100_000
    start = time.perf_counter()
    labels, overlap = rasterize([poly], 0, 0, 512, 512)
    seconds = time.perf_counter() - start
    assert seconds < 10, f"{seconds:.1f} s"  # ~0.1 s here; pixels x vertices is minutes
    rr, cc = np.mgrid[:512, :512]
    shapely.prepare(poly)
    want = shapely.contains_xy(poly, cc.ravel() + 0.5, rr.ravel() + 0.5).reshape(512, 512)
    assert np.array_equal(labels > 0, want) and not overlap.any()


def test_scanline_equals_pixel_centre_within_on_random_polygons():
    """The fill against shapely's ``within`` of every pixel centre (the old rasteriser) on random polygons with
    holes and several parts, on grids that put vertices and edges exactly on pixel centres, at several scales."""
    from nucseg.wsi.qupath import Outlines

    rng = np.random.default_rng(24)

    def polygon(grid: int):
        n = int(rng.integers(3, 12))
        c = rng.random(2) * 40
        ang, rad = np.sort(rng.random(n) * 2 * np.pi), rng.random(n) * 12 + 1
        pts = np.c_[c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)]
        if grid:
            pts = np.round(pts * grid) / grid
        p = shapely.make_valid(shapely.Polygon(pts))
        if rng.random() < 0.4:
            p = p.difference(shapely.Point(c).buffer(rng.random() * 4 + 0.5, quad_segs=int(rng.integers(1, 5))))
        if rng.random() < 0.3:
            p = p.union(shapely.box(*np.sort(rng.random(2) * 40), *np.sort(rng.random(2) * 40)))
        parts = [q for q in getattr(p, "geoms", [p]) if q.geom_type in ("Polygon", "MultiPolygon") and q.area > 0]
        return shapely.unary_union(parts) if parts else None

    checked = 0
    for trial in range(150):
        geoms = [g for g in (polygon([0, 1, 2, 4][trial % 4]) for _ in range(int(rng.integers(1, 6))))
                 if g is not None and not g.is_empty]
        if not geoms:
            continue
        scale = [1.0, 2.0, 0.5, 0.25 / 0.37][trial % 4]
        x0, y0, h, w = (int(v) for v in (*rng.integers(-5, 10, 2), *rng.integers(1, 50, 2)))
        labels, overlap = Outlines(geoms).rasterize(x0, y0, h, w, scale)
        rr, cc = np.divmod(np.arange(h * w), w)
        pts = shapely.points((x0 + cc + 0.5) * scale, (y0 + rr + 0.5) * scale)
        pix, gi = shapely.STRtree(np.asarray(geoms, dtype=object)).query(pts, predicate="within")
        claims = np.bincount(pix, minlength=h * w)
        want = np.zeros(h * w, np.int64)
        want[pix] = gi + 1
        want[claims > 1] = 0
        assert np.array_equal(labels.ravel(), want), trial
        assert np.array_equal(overlap.ravel(), claims > 1), trial
        assert np.array_equal(Outlines(geoms).pixel_counts(x0, y0, h, w, scale),
                              np.bincount(gi, minlength=len(geoms))), trial
        checked += 1
    assert checked > 100


# ------------------------------------------------------------------------ classes 14, 15, 16: hostile JSON
def _deep(n: int) -> str:
    return '{"type": "FeatureCollection", "features": [' + "[" * n + "]" * n + "]}"


@pytest.mark.parametrize("kind,needle", [
    ("deep", "nested more than 64 levels"),
    ("nan", "NaN and Infinity are not JSON numbers"),
    ("infinity", "NaN and Infinity are not JSON numbers"),
    ("overflow", "NaN and Infinity are not JSON numbers"),
    ("properties-list", 'feature 0 has "properties" of type list'),
    ("properties-string", 'feature 0 has "properties" of type str'),
])
def test_hostile_json_is_one_line(kind, needle, image, tmp_path, capsys):
    geo = tmp_path / "n.geojson"
    square = '{"type": "Polygon", "coordinates": [[[10, 10], [20, 10], [20, %s], [10, 20], [10, 10]]]}'
    if kind == "deep":
        geo.write_text(_deep(100_000))
    elif kind in ("nan", "infinity", "overflow"):
        value = {"nan": "NaN", "infinity": "Infinity", "overflow": "1e400"}[kind]
        geo.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
                       + square % value + ', "properties": {"objectType": "detection"}}]}')
    else:
        props = ["detection", "Nucleus"] if kind == "properties-list" else "detection"
        _export(geo, [_feature(shapely.box(10, 10, 20, 20), props=props)])
    out = tmp_path / "ds"
    rc = _import(image, geo, out)
    one_error_line(rc, capsys.readouterr().err, 2, needle)
    assert not out.exists()


def test_more_vertices_than_the_limit_is_refused_before_rasterising(image, tmp_path, monkeypatch, capsys):
    """The total vertex count is bounded (MAX_VERTICES, 5·10⁷); lowered here so the test stays small."""
    import nucseg.wsi.qupath as qupath

    monkeypatch.setattr(qupath, "MAX_VERTICES", 100)
    circle = shapely.Point(60, 60).buffer(30, quad_segs=64)  # 257 vertices
    geo = _export(tmp_path / "n.geojson", [_feature(circle)])
    out = tmp_path / "ds"
    rc = _import(image, geo, out)
    one_error_line(rc, capsys.readouterr().err, 2, "outline vertices, more than the 100")
    assert not out.exists()
