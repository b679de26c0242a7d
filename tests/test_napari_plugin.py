"""The napari plugin, headless (napari.components.ViewerModel, no Qt): nucseg's OME-Zarr opens as one RGB
image with its labels visible, GeoParquet / GeoJSON nuclei as shapes (or points) with the measurements as
features, all placed over each other; other files are left to other readers; nucseg never imports napari."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely

from nucseg import napari_plugin
from nucseg.wsi.export import GeoJSONWriter, GeoParquetWriter, NucleusBatch, write_ome_zarr_labels
from nucseg.wsi.measure import COLUMNS

# napari and npe2 still use pydantic v1-style APIs: their deprecation warnings are not nucseg's
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.slow]  # slow: `make test-fast` skips it

MPP0, MPP = 0.25, 0.5  # slide level 0 and the labels (target) µm/px: label pixel = 2x2 level-0 pixels
H, W = 60, 90
BOXES = {1: (10, 20, 30, 50), 2: (40, 50, 5, 10), 3: (25, 33, 70, 88)}  # label rows r0:r1, cols c0:c1
EXTRA = next(iter(COLUMNS))  # one measurement beyond the basic ones


@pytest.fixture(scope="module")
def viewer_model():
    from napari.components import ViewerModel
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    try:
        pm.get_manifest("nucseg")  # installed with the napari.manifest entry point
    except KeyError:  # a checkout not (re)installed: register the package's manifest itself
        pm.register(PluginManifest.from_file(Path(napari_plugin.__file__).with_name("napari.yaml")))
    return ViewerModel


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("napari")
    labels = np.zeros((H, W), np.int32)
    for i, (r0, r1, c0, c1) in BOXES.items():
        labels[r0:r1, c0:c1] = i
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    write_ome_zarr_labels(tmp / "slide.zarr", H, W, lambda y0, y1, x0, x1: labels[y0:y1, x0:x1], MPP, rgb, MPP,
                          level0_scale=MPP / MPP0, chunk=32)
    s = MPP / MPP0  # level-0 pixel-edge polygons of each label box
    ids = list(BOXES)
    polys = [shapely.box(c0 * s, r0 * s, c1 * s, r1 * s) for r0, r1, c0, c1 in BOXES.values()]
    batch = NucleusBatch.from_polygons(ids, polys, [p.centroid.x for p in polys], [p.centroid.y for p in polys],
                                       [p.area * MPP0**2 for p in polys], [p.length * MPP0 for p in polys],
                                       [0.9, 0.8, 0.7])
    batch.measurements = {EXTRA: np.array([1.0, 2.0, 3.0])}
    prov = {"slide_mpp": MPP0, "target_mpp": MPP, "nucseg_version": "test"}
    with GeoParquetWriter(tmp / "slide.parquet", provenance=prov, measurements=[EXTRA]) as w:
        w.write_batch(batch)
    for name in ("slide.geojson", "slide.geojson.gz"):
        with GeoJSONWriter(tmp / name, provenance=prov) as w:
            w.write_batch(batch)
    (tmp / "other.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    return tmp, labels, rgb


def _label_under(viewer, layer, data_point) -> int:
    """The nucleus id of the labels layer under ``layer``'s ``data_point``, through world coordinates."""
    lab = next(x for x in viewer.layers if x._type_string == "labels")
    world = layer.data_to_world(data_point)
    r, c = np.floor(np.asarray(lab.world_to_data(world)) + 0.5).astype(int)
    level0 = lab.data[0] if lab.multiscale else lab.data
    return int(np.asarray(level0[r, c]))


def test_ome_zarr_opens_as_one_rgb_image_with_visible_labels(viewer_model, outputs):
    tmp, labels, rgb = outputs
    viewer = viewer_model()
    layers = viewer.open(str(tmp / "slide.zarr"), plugin="nucseg")
    assert [x._type_string for x in layers] == ["image", "labels"]
    image, lab = layers
    assert image.rgb and image.multiscale and lab.visible
    np.testing.assert_array_equal(np.asarray(image.data[0]), rgb)
    np.testing.assert_array_equal(np.asarray(lab.data[0]), labels)
    assert tuple(image.scale) == (MPP, MPP) and tuple(lab.scale) == (MPP, MPP)
    # the image pixel under label pixel (r, c) is image pixel (r, c)
    assert np.allclose(image.world_to_data(lab.data_to_world((12, 40))), (12, 40))


@pytest.mark.parametrize("name", ["slide.parquet", "slide.geojson", "slide.geojson.gz"])
def test_nuclei_open_as_shapes_over_the_labels_with_measurements(viewer_model, outputs, name):
    tmp, labels, _ = outputs
    viewer = viewer_model()
    viewer.open(str(tmp / "slide.zarr"), plugin="nucseg")
    (shapes,) = viewer.open(str(tmp / name), plugin="nucseg")
    assert shapes._type_string == "shapes" and len(shapes.data) == len(BOXES)
    ids = shapes.features["nucleus_id"].tolist()
    assert ids == list(BOXES)
    extra = COLUMNS[EXTRA] if name.endswith(".parquet") else EXTRA  # snake case in Parquet, QuPath's in GeoJSON
    assert shapes.features[extra].tolist() == [1.0, 2.0, 3.0]
    assert any("area" in k.lower() for k in shapes.features)  # the file's own measurement names
    for poly, nid in zip(shapes.data, ids):
        r0, r1, c0, c1 = BOXES[nid]
        # (row, col) order: the rows span the box's height, in level-0 pixels (2 per label pixel)
        assert np.ptp(poly[:, 0]) == pytest.approx(2 * (r1 - r0)) and np.ptp(poly[:, 1]) == pytest.approx(2 * (c1 - c0))
        # the outline lies on the pixel edges of the labels: a fifth of a label pixel inside each corner is the
        # nucleus, a fifth outside is not (a half-pixel shift or a swapped axis fails one of them)
        centre = poly.mean(axis=0)
        assert _label_under(viewer, shapes, centre) == nid
        step = np.sign(centre - poly) * 0.4  # level-0 pixels
        assert [_label_under(viewer, shapes, v) for v in poly + step] == [nid] * len(poly)
        assert nid not in [_label_under(viewer, shapes, v) for v in poly - step]


def test_many_nuclei_open_as_points(viewer_model, outputs, monkeypatch):
    tmp, _, _ = outputs
    monkeypatch.setattr(napari_plugin, "SHAPES_LIMIT", 2)
    viewer = viewer_model()
    viewer.open(str(tmp / "slide.zarr"), plugin="nucseg")
    (points,) = viewer.open(str(tmp / "slide.parquet"), plugin="nucseg")
    assert points._type_string == "points" and len(points.data) == len(BOXES)
    for p, nid in zip(points.data, points.features["nucleus_id"]):
        assert _label_under(viewer, points, p) == nid
    assert points.features["score"].tolist() == pytest.approx([0.9, 0.8, 0.7])


def test_other_files_are_left_to_other_readers(outputs, tmp_path):
    tmp, _, _ = outputs
    (tmp_path / "plain.zarr").mkdir()
    (tmp_path / "plain.parquet").write_bytes(b"PAR1")
    for p in (tmp / "other.geojson", tmp_path / "plain.zarr", tmp_path / "plain.parquet", tmp / "slide.png"):
        assert napari_plugin.napari_get_reader(str(p)) is None, p


def test_nucseg_does_not_import_napari():
    code = "import sys, nucseg, nucseg.napari_plugin; assert 'napari' not in sys.modules and 'npe2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
