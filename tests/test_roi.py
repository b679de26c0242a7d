"""predict --roi: only tiles meeting the drawn region are read, only nuclei whose centroid is inside are kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import mapping, shape

from nucseg.model.classical import ThresholdSegmenter
from nucseg.errors import InputError
from nucseg.wsi.predict import PredictConfig, predict_slide
from nucseg_cli.main import main

THRESHOLD = ["--segmenter", "threshold", "--tile-size", "256", "--overlap", "32"]
REGION = shapely.Polygon([(100, 80), (560, 120), (500, 430), (140, 400)])  # level-0 px of the 1200 x 1000 slide


def _annotations(path: Path, polys: dict[str, shapely.Polygon]) -> Path:
    """An annotation export as QuPath 0.4+ writes it."""
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": f"{i:08x}-0000-4000-8000-000000000000", "geometry": mapping(p),
         "properties": {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]}}}
        for i, (name, p) in enumerate(polys.items())]}))
    return path


def _centroids(geojson: Path) -> np.ndarray:
    fc = json.loads(geojson.read_text())
    return np.array([shape(f["geometry"]).centroid.coords[0] for f in fc["features"]]).reshape(-1, 2)


def _run(slide, out: Path, **cfg):
    return predict_slide(slide, out, ThresholdSegmenter(tile_size=256),
                         PredictConfig(tile_size=256, overlap=32, **cfg))


def test_roi_keeps_the_nuclei_inside_and_reads_only_its_tiles(small_slide, tmp_path):
    slide, _ = small_slide
    full = _run(slide, tmp_path / "full.geojson")
    roi = _annotations(tmp_path / "roi.geojson", {"Tumor": REGION, "Stroma": shapely.box(900, 700, 1100, 900)})
    part = _run(slide, tmp_path / "part.geojson", roi=roi, roi_class="Tumor")
    assert 0 < part.nuclei < full.nuclei
    assert part.read_tiles == part.tissue_tiles < full.tissue_tiles  # only tiles meeting the region were read
    inside = _centroids(tmp_path / "part.geojson")
    assert shapely.contains_xy(REGION.buffer(1.0), inside[:, 0], inside[:, 1]).all()
    # the same nuclei as the full run's whose centroid is inside (the ROI changes nothing else)
    every = _centroids(tmp_path / "full.geojson")
    expected = every[shapely.contains_xy(REGION, every[:, 0], every[:, 1])]
    assert len(expected) == part.nuclei
    assert np.allclose(np.sort(expected, axis=0), np.sort(inside, axis=0), atol=0.01)


def test_mask_image_roi_at_another_scale(small_slide, tmp_path):
    slide, _ = small_slide
    mask = np.zeros((100, 120), np.uint8)  # the slide at 1/10
    mask[10:40, 10:60] = 255
    Image.fromarray(mask).save(tmp_path / "roi.png")
    part = _run(slide, tmp_path / "m.geojson", roi=tmp_path / "roi.png")
    pts = _centroids(tmp_path / "m.geojson")
    assert part.nuclei > 0 and ((pts[:, 0] >= 100) & (pts[:, 0] < 600) & (pts[:, 1] >= 100) & (pts[:, 1] < 400)).all()


def test_roi_is_part_of_the_cache_key(small_slide, tmp_path):
    slide, _ = small_slide
    work = tmp_path / "work"
    a = _annotations(tmp_path / "a.geojson", {"Tumor": REGION})
    b = _annotations(tmp_path / "b.geojson", {"Tumor": shapely.box(600, 500, 1100, 900)})
    _run(slide, tmp_path / "a1.geojson", roi=a, work_dir=work)
    again = _run(slide, tmp_path / "a2.geojson", roi=a, work_dir=work)
    other = _run(slide, tmp_path / "b-out.geojson", roi=b, work_dir=work)
    assert again.read_tiles == 0 and other.read_tiles == other.tissue_tiles > 0
    assert len(list(work.glob("*.zarr"))) == 2


@pytest.mark.parametrize("kind,needle", [
    ("outside", "lies outside the slide"),
    ("not-geojson", "is not a QuPath GeoJSON export"),
    ("no-class", "no annotation of class 'Tumour'"),
    ("points", "holds no polygon area"),
    ("empty-mask", "is empty"),
    ("missing", "ROI file not found"),
])
def test_bad_roi_is_one_line_and_writes_nothing(kind, needle, small_slide, tmp_path, capsys):
    slide, _ = small_slide
    roi = tmp_path / ("roi.png" if kind == "empty-mask" else "roi.geojson")
    extra = []
    if kind == "outside":
        _annotations(roi, {"Tumor": shapely.box(5000, 5000, 6000, 6000)})
    elif kind == "not-geojson":
        roi.write_text("<xml/>")
    elif kind == "no-class":
        _annotations(roi, {"Tumor": REGION})
        extra = ["--roi-class", "Tumour"]
    elif kind == "points":
        roi.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]},
                                   "properties": {}}))
    elif kind == "empty-mask":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(roi)
    out = tmp_path / "out"
    rc = main(["-q", "predict", str(slide), "-o", str(out / "x.geojson"), "--roi", str(roi), *extra, *THRESHOLD])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("nucseg: error:") and needle in err[0], err
    assert not out.exists()


def test_roi_with_several_slides_is_refused(small_slide, tmp_path, capsys):
    slide, _ = small_slide
    rc = main(["-q", "predict", str(slide), str(slide), "--out-dir", str(tmp_path / "o"), "--roi", "x.geojson",
               *THRESHOLD])
    assert rc == 2 and "--roi is for one slide" in capsys.readouterr().err


def test_load_roi_directly(tmp_path):
    from nucseg.wsi.roi import load_roi

    roi = load_roi(_annotations(tmp_path / "r.geojson", {"A": REGION}), 1200, 1000)
    assert roi.contains(np.array([300.0, 50.0]), np.array([250.0, 50.0])).tolist() == [True, False]
    with pytest.raises(InputError):
        load_roi(tmp_path / "r.geojson", 1200, 1000, roi_class="B")
