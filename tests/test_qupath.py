"""QuPath round trip: nucleus outlines (as QuPath exports them) become NuInsSeg-layout training tiles, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from scipy import ndimage as ndi
from shapely.geometry import mapping

from nucseg.errors import InputError, OutputError
from nucseg.wsi.export import instance_polygons
from nucseg.io import read_label_map, read_rgb
from nucseg.wsi.qupath import ImportConfig, import_qupath, rasterize, read_qupath_objects


def _canonical(labels: np.ndarray) -> np.ndarray:
    """What a Feature can carry of each instance: its largest 8-connected piece, holes filled."""
    out = np.zeros_like(labels)
    for lid in np.unique(labels[labels > 0]):
        comp, n = ndi.label(labels == lid, structure=np.ones((3, 3)))
        if n > 1:
            comp = comp == np.argmax(np.bincount(comp.ravel())[1:]) + 1
        out[ndi.binary_fill_holes(comp > 0) & (out == 0)] = lid
    return out


def _same_instances(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering: a one-to-one map between the ids of a and of b."""
    if a.shape != b.shape or ((a > 0) != (b > 0)).any():
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def _qupath_export(path: Path, polys: list, object_type: str = "detection", extra: list | None = None) -> Path:
    """A FeatureCollection as QuPath 0.4+ writes it."""
    feats = [{"type": "Feature", "id": f"{i:08x}-0000-4000-8000-000000000000", "geometry": mapping(p),
              "properties": {"objectType": object_type, "classification": {"name": "Nucleus", "color": [200, 0, 120]},
                             "isLocked": False}} for i, p in enumerate(polys)]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats + (extra or [])}))
    return path


@pytest.fixture(scope="module")
def real_tile(he_sample):
    organ = he_sample / "human glioma"
    image = sorted((organ / "tissue images").glob("*.png"))[0]
    labels = read_label_map(organ / "label masks modify" / f"{image.stem}.tif")
    return image, _canonical(labels)


def test_round_trip_labels_polygons_import_is_exact(real_tile, tmp_path):
    image, labels = real_tile
    ids = np.unique(labels[labels > 0])
    polys = instance_polygons(labels, ids, 0, 0, 1.0)  # nucseg's own export
    geo = _qupath_export(tmp_path / "nuclei.geojson", polys)
    report = import_qupath(image, geo, tmp_path / "ds", ImportConfig(organ="glioma", tile_size=512))
    assert report["tiles"] == 1 and report["nuclei"] == len(ids) and report["overlap_pixels"] == 0
    tif = next((tmp_path / "ds" / "glioma" / "label masks modify").glob("*.tif"))
    x0, y0 = (int(v[1:]) for v in tif.stem.split("_")[-2:])
    got = tifffile.imread(tif)
    h, w = got.shape
    assert _same_instances(got.astype(np.int64), labels[y0 : y0 + h, x0 : x0 + w])
    png = next((tmp_path / "ds" / "glioma" / "tissue images").glob("*.png"))
    assert np.array_equal(read_rgb(png), read_rgb(image)[y0 : y0 + h, x0 : x0 + w])
    # and nucseg's own loader reads it unchanged
    from nucseg.learn.data import load_dataset

    tiles = load_dataset(tmp_path / "ds")
    assert len(tiles) == 1 and tiles[0].labels.max() == len(ids)


def test_region_bounds_the_labelled_area_and_overlaps_stay_ambiguous(tmp_path):
    rgb = np.full((100, 120, 3), 230, np.uint8)
    from PIL import Image

    Image.fromarray(rgb).save(tmp_path / "img.png")
    a = shapely.Polygon([(10, 10), (30, 10), (30, 30), (10, 30)])
    b = shapely.Polygon([(25, 25), (45, 25), (45, 45), (25, 45)])  # overlaps a in a 5x5 square
    c = shapely.Polygon([(80, 60), (95, 60), (95, 75), (80, 75)])  # outside the region
    bowtie = shapely.Polygon([(50, 10), (60, 20), (60, 10), (50, 20)])  # self-intersecting: repaired
    region = {"type": "Feature", "geometry": mapping(shapely.box(0, 0, 70, 70)),
              "properties": {"objectType": "annotation", "classification": {"name": "Region*"}}}
    geo = _qupath_export(tmp_path / "x.geojson", [a, b, c, bowtie], "annotation", [region])
    objs = read_qupath_objects(geo)
    assert objs.report["regions"] == 1 and objs.report["nuclei"] == 4 and objs.report["repaired_invalid"] == 1
    report = import_qupath(tmp_path / "img.png", geo, tmp_path / "ds", ImportConfig(tile_size=512))
    assert report["overlap_pixels"] == 25
    organ = tmp_path / "ds" / "qupath"
    labels = tifffile.imread(next((organ / "label masks modify").glob("*.tif")))
    vague = read_rgb(next((organ / "vague areas" / "mask binary").glob("*.png")))[..., 0] > 0
    assert labels.shape == (70, 70)  # the region's extent
    assert vague[25:30, 25:30].all() and (labels[25:30, 25:30] == 0).all()  # shared pixels: ambiguous, unlabelled
    assert not vague[:25, :25].any()
    assert len(np.unique(labels[labels > 0])) == 3  # a, b and the repaired bow-tie; c lies outside the region
    assert (labels[10:25, 10:25] > 0).all()


def test_bad_exports_are_one_line(tmp_path, real_tile):
    image, _ = real_tile
    (tmp_path / "x.geojson").write_text("not json")
    with pytest.raises(InputError, match="not a QuPath GeoJSON export"):
        import_qupath(image, tmp_path / "x.geojson", tmp_path / "ds")
    (tmp_path / "pts.geojson").write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Point",
                                                        "coordinates": [1, 2]}, "properties": {}}]))
    with pytest.raises(InputError, match="no nucleus outlines"):
        import_qupath(image, tmp_path / "pts.geojson", tmp_path / "ds")
    geo = _qupath_export(tmp_path / "n.geojson", [shapely.box(5, 5, 15, 15)])
    with pytest.raises(OutputError, match="input"):  # the dataset folder would be (or hold) an input
        import_qupath(image, geo, tmp_path)
    assert not (tmp_path / "qupath").exists() and not (tmp_path / "ds").exists()


def test_rasterize_uses_pixel_centres():
    labels, overlap = rasterize([shapely.box(0, 0, 3, 2)], 0, 0, 4, 4)
    assert labels.sum() == 6 and labels[:2, :3].all() and not overlap.any()
    labels, _ = rasterize([shapely.box(0.6, 0.6, 2.4, 2.4)], 0, 0, 4, 4)  # centres at 1.5 only
    assert np.array_equal(np.argwhere(labels), [[1, 1]])


def test_import_from_a_whole_slide_in_several_tiles(small_slide, tmp_path):
    """A pyramidal slide read through openslide, outlines over several tiles: every tile's labels are the true
    instances there (cut at tile edges), and the images are the slide's pixels."""
    slide, gt = small_slide
    sub = np.zeros_like(gt)
    sub[:400, :500] = _canonical(gt[:400, :500])  # outlined in part of the slide only
    ids = np.unique(sub[sub > 0])
    polys = instance_polygons(sub, ids, 0, 0, 1.0)
    geo = _qupath_export(tmp_path / "n.geojson", polys)
    report = import_qupath(slide, geo, tmp_path / "ds", ImportConfig(organ="syn", tile_size=256))
    assert report["tiles"] >= 4 and report["nuclei"] == len(ids)
    import openslide

    osl = openslide.OpenSlide(str(slide))
    for tif in (tmp_path / "ds" / "syn" / "label masks modify").glob("*.tif"):
        x0, y0 = (int(v[1:]) for v in tif.stem.split("_")[-2:])
        got = tifffile.imread(tif).astype(np.int64)
        h, w = got.shape
        assert _same_instances(got, sub[y0 : y0 + h, x0 : x0 + w]), tif.name
        png = tif.parent.parent / "tissue images" / f"{tif.stem}.png"
        want = np.asarray(osl.read_region((x0, y0), 0, (w, h)).convert("RGB"))
        assert np.array_equal(read_rgb(png), want)
