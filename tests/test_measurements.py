"""QuPath-named per-nucleus measurements (nucseg.wsi.measure): values against scikit-image's own on known shapes and
pixels, the same numbers in GeoJSON, CSV and GeoParquet, ``--measurements none``, and independence from the
export processes and from where the tile pixels come from (cache, inference hand-over, the slide)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from skimage.color import rgb2hed
from skimage.draw import disk, ellipse, polygon
from skimage.measure import find_contours, regionprops_table
import shapely

from nucseg.wsi import measure
from nucseg.model.classical import ThresholdSegmenter
from nucseg.errors import InputError
from nucseg.wsi.export import tile_polygons
from nucseg.wsi.measure import measure_tile, min_caliper
from nucseg.wsi.predict import PredictConfig, predict_slide

PROPS = ("label", "area", "perimeter", "solidity", "feret_diameter_max", "eccentricity")


def _shapes() -> np.ndarray:
    L = np.zeros((160, 160), np.int32)
    L[disk((40, 40), 25)] = 1
    L[ellipse(110, 50, 10, 25)] = 2  # semi-axes 10 (rows) and 25 (cols)
    L[10:30, 90:130] = 3  # 20 x 40 rectangle
    L[polygon([90, 150, 150], [100, 100, 150])] = 4  # a triangle
    return L


def test_shape_values_are_scikit_images_own_in_micrometres():
    L, mpp = _shapes(), 0.25
    ids = np.array([1, 2, 3, 4])
    m = measure_tile(L, ids, mpp, "shape")
    assert list(m) == list(measure.SHAPE)
    ref = regionprops_table(L, properties=PROPS)
    assert list(ref["label"]) == list(ids)
    # circularity: QuPath's 4πA/P² of the area written (pixel count) and the perimeter written (the exported,
    # simplified polygon's length), nothing else
    _, polys = tile_polygons(L, np.arange(5) > 0)
    np.testing.assert_allclose(m["Nucleus: Circularity"], 4 * np.pi * ref["area"] / shapely.length(polys) ** 2,
                               rtol=1e-12)
    given = measure_tile(L, ids, mpp, "shape", perimeter_um=np.array([10.0, 20.0, 30.0, 40.0]))
    np.testing.assert_allclose(given["Nucleus: Circularity"], 4 * np.pi * ref["area"] * mpp**2 / [100, 400, 900, 1600])
    np.testing.assert_allclose(m["Nucleus: Eccentricity"], ref["eccentricity"], atol=1e-12)
    # solidity and max diameter are QuPath's, on the outline: close to scikit-image's pixel-count solidity and
    # its Feret diameter (of the contour of the convex-hull image), and exactly what they say they are
    np.testing.assert_allclose(m["Nucleus: Solidity"], ref["solidity"], atol=0.01)
    np.testing.assert_allclose(m["Nucleus: Max diameter µm"], ref["feret_diameter_max"] * mpp, atol=0.7 * mpp)
    for i, k in enumerate(ids):
        ring = find_contours(np.pad(L == k, 1).astype(float), 0.5, fully_connected="high")[0][:, ::-1] - 1
        poly = shapely.Polygon(ring)
        hull = np.asarray(poly.convex_hull.exterior.coords)
        assert m["Nucleus: Solidity"][i] == pytest.approx(poly.area / poly.convex_hull.area, rel=1e-9)
        longest = np.max(np.hypot(*(hull[:, None, :] - hull[None, :, :]).transpose(2, 0, 1)))
        assert m["Nucleus: Max diameter µm"][i] == pytest.approx(longest * mpp, rel=1e-9)
    # only some ids, in any subset: the same values for those
    sub = measure_tile(L, np.array([2, 4]), mpp, "shape")
    for k in measure.SHAPE:
        np.testing.assert_allclose(sub[k], m[k][[1, 3]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_measures_equal_regionprops_on_random_label_maps(seed):
    """Area and eccentricity, computed for every label of a tile at once, are scikit-image's own,
    for irregular, touching, holed and tile-edge regions and single pixels."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    lab, n = ndi.label(ndi.gaussian_filter(rng.standard_normal((200, 230)), 2.5) > 0.1)
    lab[rng.random(lab.shape) < 0.002] = n + 1  # scattered single pixels of one more label
    lab[lab % 5 == 0] = 0  # and some regions removed again
    ids = np.unique(lab)[1:]
    m = measure_tile(lab, ids, 1.0, "shape")
    area, ecc = measure.pixel_measures(lab, n + 2)
    ref = regionprops_table(lab, properties=("label", "area", "eccentricity"))
    assert list(ref["label"]) == list(ids) and len(ids) > 50
    np.testing.assert_array_equal(area[ids], ref["area"])
    np.testing.assert_allclose(m["Nucleus: Eccentricity"], ref["eccentricity"], atol=1e-9)


@pytest.mark.parametrize("r", [8, 15, 25, 40])
def test_disk_circularity_is_about_one(r):
    """4πA/P² of a digital disk, A its pixel count and P its polygon's length: 0.90-0.91 for radii 8-40 px (the
    outline's 45° steps are longer than the arc they follow, as for any polygon traced from pixels; QuPath
    measures the same polygon). A 1:4 rectangle, for contrast, is far from 1 (0.5 ideally)."""
    L = np.zeros((100, 100), np.int32)
    L[disk((50, 50), r)] = 1
    m = measure_tile(L, np.array([1]), 1.0, "shape")
    assert 0.89 < m["Nucleus: Circularity"][0] < 0.92
    assert m["Nucleus: Eccentricity"][0] < 0.05
    assert m["Nucleus: Min diameter µm"][0] == pytest.approx(2 * r - 1)  # outline half-way between pixel centres
    sq = np.zeros((100, 100), np.int32)
    sq[10:10 + r, 10:10 + 4 * r] = 1
    assert measure_tile(sq, np.array([1]), 1.0, "shape")["Nucleus: Circularity"][0] < 0.7


def test_ellipse_eccentricity_and_rectangle_diameters():
    L = _shapes()
    m = measure_tile(L, np.array([2, 3]), 0.5, "shape")
    assert m["Nucleus: Eccentricity"][0] == pytest.approx(np.sqrt(1 - (10 / 25) ** 2), abs=0.01)
    # the rectangle: min caliper is its short side exactly, max diameter its diagonal (within a pixel: the
    # contour scikit-image takes the Feret diameter of cuts the corners)
    assert m["Nucleus: Min diameter µm"][1] == pytest.approx(20 * 0.5)
    assert m["Nucleus: Max diameter µm"][1] == pytest.approx(np.hypot(20, 40) * 0.5, abs=0.5)


def test_min_caliper_matches_a_brute_force_over_directions():
    rng = np.random.default_rng(3)
    rings, n = [], []
    for _ in range(25):
        k = int(rng.integers(3, 12))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(5, 20, k)
        xy = np.c_[rad * np.cos(ang) * rng.uniform(0.3, 1), rad * np.sin(ang)]
        rings.append(xy)
        n.append(k)
    xy = np.concatenate(rings)
    got = min_caliper(xy, np.r_[0, np.cumsum(n)])
    theta = np.linspace(0, np.pi, 20001)
    d = np.c_[np.cos(theta), np.sin(theta)]
    for ring, w in zip(rings, got):
        proj = ring @ d.T
        brute = (proj.max(0) - proj.min(0)).min()
        # the sampled directions miss the exact one by at most half a step: width error <= diameter * step / 2
        assert w <= brute + 1e-9 and w == pytest.approx(brute, abs=40 * np.pi / 20000)


@pytest.mark.parametrize("seed", [0, 1])
def test_convex_hulls_are_shapelys_for_outlines_and_any_points(seed):
    """The numpy hulls (all rings at once) are GEOS's own: the same vertices, no collinear ones, for the
    outlines of irregular, touching and single-pixel regions (half-pixel grid) and for arbitrary points; the
    solidity and caliper widths built on them equal the per-ring shapely values."""
    from scipy import ndimage as ndi

    from nucseg.wsi.export import outline_rings
    from nucseg.wsi.measure import convex_hulls, hull_measures

    rng = np.random.default_rng(seed)
    lab, n = ndi.label(ndi.gaussian_filter(rng.standard_normal((150, 170)), 2.5) > 0.1)
    lab[rng.random(lab.shape) < 0.002] = n + 1
    labs, xy, off = outline_rings(lab, np.ones(n + 2, bool) & (np.arange(n + 2) > 0))
    pts = [rng.normal(size=(int(rng.integers(1, 30)), 2)) * rng.uniform(1, 20) for _ in range(40)]
    pts += [np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), np.array([[3.0, 1.0], [3.0, 1.0]])]  # degenerate
    for xy_, off_ in ((xy, off), (np.concatenate(pts), np.r_[0, np.cumsum([len(q) for q in pts])])):
        hxy, hoff = convex_hulls(xy_, off_)
        width, longest, solidity = hull_measures(xy_, off_)
        for i in range(len(off_) - 1):
            ring = xy_[off_[i]:off_[i + 1]]
            ref = shapely.MultiPoint(ring).convex_hull
            mine = hxy[hoff[i]:hoff[i + 1]]
            if ref.geom_type == "Polygon":
                assert len(mine) == len(ref.exterior.coords) - 1
                assert shapely.Polygon(mine).equals(ref)
                if len(ring) >= 3:
                    assert solidity[i] == pytest.approx(abs(shapely.Polygon(ring).area) / ref.area, rel=1e-12)
            else:  # a point or a segment: its end points, width 0, the segment's length
                assert shapely.MultiPoint(mine).convex_hull.equals(ref) and width[i] == 0
                assert longest[i] == pytest.approx(ref.length, abs=1e-12)
            if ref.geom_type == "Polygon":
                hull = np.asarray(ref.exterior.coords)
                assert longest[i] == pytest.approx(np.hypot(*(hull[:, None] - hull[None]).transpose(2, 0, 1)).max(),
                                                   rel=1e-12)


def test_stain_od_is_rgb2hed_of_the_pixels():
    L = _shapes()
    rgb = np.full(L.shape + (3,), 235, np.uint8)
    pixel = np.array([160, 90, 180], np.uint8)  # a haematoxylin-purple H&E pixel
    rgb[L == 1] = pixel
    rgb[L == 3] = (120, 60, 160)
    rgb[13:20, 90:130] = (200, 120, 190)  # part of the rectangle paler: a spread of values
    m = measure_tile(L, np.array([1, 3]), 0.5, "full", rgb)
    assert list(m) == list(measure.SHAPE + measure.STAIN)
    hed = rgb2hed(pixel[None, None])[0, 0]
    assert m["Nucleus: Hematoxylin OD mean"][0] == pytest.approx(hed[0], rel=1e-12)
    assert m["Nucleus: Hematoxylin OD max"][0] == pytest.approx(hed[0], rel=1e-12)
    assert m["Nucleus: Hematoxylin OD std dev"][0] == pytest.approx(0, abs=1e-9)
    assert m["Nucleus: Eosin OD mean"][0] == pytest.approx(hed[1], rel=1e-12)
    full = rgb2hed(rgb)
    inside = L == 3
    assert m["Nucleus: Hematoxylin OD mean"][1] == pytest.approx(full[..., 0][inside].mean(), rel=1e-9)
    assert m["Nucleus: Hematoxylin OD std dev"][1] == pytest.approx(full[..., 0][inside].std(), rel=1e-6)
    assert m["Nucleus: Hematoxylin OD max"][1] == pytest.approx(full[..., 0][inside].max(), rel=1e-12)
    assert m["Nucleus: Eosin OD mean"][1] == pytest.approx(full[..., 1][inside].mean(), rel=1e-9)
    assert m["Nucleus: Hematoxylin OD std dev"][1] > 0.001
    with pytest.raises(ValueError):
        measure_tile(L, np.array([1]), 0.5, "full")  # full without pixels is a programming error


def test_modes_and_config_validation():
    assert measure.names("none") == () and measure.names("full") == measure.SHAPE + measure.STAIN
    assert measure_tile(_shapes(), np.array([1]), 0.5, "none") == {}
    assert all(len(v) == 0 for v in measure_tile(_shapes(), np.array([], np.int64), 0.5, "full").values())
    assert set(measure.COLUMNS) == set(measure.names("full"))
    assert PredictConfig().measurements == "full"
    with pytest.raises(InputError, match="--measurements"):
        PredictConfig(measurements="all").validate()


def _run(slide, out, **kw):
    seg = ThresholdSegmenter(tile_size=128)
    return predict_slide(slide, out, seg, PredictConfig(tile_size=128, overlap=24, **kw))


def test_the_three_writers_carry_the_same_numbers(small_slide, tmp_path):
    gpd = pytest.importorskip("geopandas")
    slide, _ = small_slide
    s = _run(slide, tmp_path / "n.geojson", csv=tmp_path / "n.csv", work_dir=tmp_path / "w")
    _run(slide, tmp_path / "n.parquet", work_dir=tmp_path / "w")
    fc = json.loads((tmp_path / "n.geojson").read_text(encoding="utf-8"))
    assert fc["nucseg"]["measurements"] == "full" and s.provenance["measurements"] == "full"
    feats = {f["properties"]["nucleusId"]: f["properties"]["measurements"] for f in fc["features"]}
    assert len(feats) == s.nuclei > 100
    with open(tmp_path / "n.csv", newline="", encoding="utf-8") as fh:
        rows = {int(r["id"]): r for r in csv.DictReader(fh)}
    df = gpd.read_parquet(tmp_path / "n.parquet").set_index("nucleus_id")
    assert set(rows) == set(feats) == set(df.index)
    names = measure.names("full")
    for gid, m in feats.items():
        assert list(m) == ["Area µm^2", "Perimeter µm", "Score", *names]
        for name in names:
            col = measure.COLUMNS[name]
            assert float(rows[gid][col]) == m[name]  # GeoJSON and CSV: the same rounded number
            assert df.at[gid, col] == pytest.approx(m[name], abs=1e-6)  # GeoParquet: full precision
        # one area and one perimeter: circularity is made of the two written (rounded to 4 decimals there)
        assert m["Nucleus: Circularity"] == pytest.approx(4 * np.pi * m["Area µm^2"] / m["Perimeter µm"] ** 2, rel=1e-3)
        assert not any(k.startswith("Nucleus: ") and k[len("Nucleus: "):] in m for k in m)  # no duplicates
        assert 0 < m["Nucleus: Solidity"] <= 1 and 0 <= m["Nucleus: Eccentricity"] < 1
        assert 0 < m["Nucleus: Min diameter µm"] <= m["Nucleus: Max diameter µm"] + 1e-6
        assert m["Nucleus: Hematoxylin OD max"] >= m["Nucleus: Hematoxylin OD mean"] > 0


def test_none_writes_only_the_three_measurements(small_slide, tmp_path):
    gpd = pytest.importorskip("geopandas")
    slide, _ = small_slide
    _run(slide, tmp_path / "n.geojson", csv=tmp_path / "n.csv", work_dir=tmp_path / "w", measurements="none")
    _run(slide, tmp_path / "n.parquet", work_dir=tmp_path / "w", measurements="shape")
    fc = json.loads((tmp_path / "n.geojson").read_text(encoding="utf-8"))
    assert fc["nucseg"]["measurements"] == "none"
    assert all(list(f["properties"]["measurements"]) == ["Area µm^2", "Perimeter µm", "Score"]
               for f in fc["features"])
    header = (tmp_path / "n.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "id,centroid_x,centroid_y,area_um2,perimeter_um,score"
    df = gpd.read_parquet(tmp_path / "n.parquet")
    assert [c for c in df.columns if c.startswith("nucleus_") and c != "nucleus_id"] == \
        [measure.COLUMNS[n] for n in measure.SHAPE]


def test_outputs_do_not_depend_on_workers_or_where_the_pixels_come_from(small_slide, tmp_path):
    """Tile pixels from the cache, handed over by the inference, or read from the slide again (cache_tiles off,
    including a rerun that only exports), in the export thread or in 2 worker processes: the same bytes."""
    slide, _ = small_slide
    outs = {}
    runs = [("cached-w1", dict(export_workers=1)), ("cached-w2", dict(export_workers=2)),
            ("slide-w1", dict(export_workers=1, cache_tiles=False, work_dir=tmp_path / "nt")),
            ("slide-w1-rerun", dict(export_workers=1, cache_tiles=False, work_dir=tmp_path / "nt")),
            ("slide-w2", dict(export_workers=2, cache_tiles=False))]
    for name, kw in runs:
        s = _run(slide, tmp_path / f"{name}.geojson", csv=tmp_path / f"{name}.csv", export_chunk=3, **kw)
        if name == "slide-w1-rerun":
            assert s.predicted_tiles == 0  # only the export ran: its pixels came from the slide
        outs[name] = ((tmp_path / f"{name}.geojson").read_bytes(), (tmp_path / f"{name}.csv").read_bytes())
    first = outs["cached-w1"]
    assert b"Hematoxylin OD mean" in first[0]
    assert all(v == first for v in outs.values())


def test_a_damaged_tile_chunk_is_read_from_the_slide_again(small_slide, tmp_path):
    """Predictions whole, one cached tile chunk (8 tiles) damaged: the stain pass reads those tiles from the
    slide (one warning) instead of failing, and the outputs are the clean run's bytes."""
    import os
    import warnings

    slide, _ = small_slide
    _run(slide, tmp_path / "a.geojson", work_dir=tmp_path / "w", export_workers=2, export_chunk=3)
    [chunk] = (tmp_path / "w").glob("*/tiles/c.0.0.0.0")
    with open(chunk, "r+b") as fh:
        fh.truncate(os.path.getsize(chunk) // 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = _run(slide, tmp_path / "b.geojson", work_dir=tmp_path / "w", export_workers=2, export_chunk=3)
    assert s.predicted_tiles == 0
    assert any("tiles chunk 0" in str(w.message) for w in caught)
    assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()
