"""Outputs on the real Aperio slide: QuPath GeoJSON, CSV, preview, OME-Zarr labels; polygon fidelity."""

from __future__ import annotations

import csv
import gzip
import json
import uuid

import numpy as np
import pytest
import shapely
import zarr
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon
from skimage.io import imread

from nucseg.wsi import measure
from nucseg.model.classical import ThresholdSegmenter
from nucseg.wsi.export import GeoJSONWriter, NucleusRecord, feature_id, feature_ids, instance_polygons
from nucseg.wsi.predict import PredictConfig, predict_slide
from nucseg.wsi.synthslide import make_synthetic_slide

W0, H0 = 2220, 2967


@pytest.fixture(scope="module")
def cmu_run(cmu_svs, tmp_path_factory):
    d = tmp_path_factory.mktemp("cmu")
    cfg = PredictConfig(work_dir=d / "work", csv=d / "cmu.csv", labels=d / "cmu.labels.zarr", preview=d / "cmu.png")
    summary = predict_slide(cmu_svs, d / "cmu.geojson", ThresholdSegmenter(), cfg)
    fc = json.loads((d / "cmu.geojson").read_text(encoding="utf-8"))
    labels = np.asarray(zarr.open_group(str(d / "cmu.labels.zarr"), mode="r")["labels/nuclei/0"][:])
    return d, summary, fc, labels


def test_geojson_is_valid_qupath_detections_on_the_slide(cmu_run):
    _, summary, fc, _ = cmu_run
    assert fc["type"] == "FeatureCollection"
    feats = fc["features"]
    assert len(feats) == summary.nuclei > 500  # a real H&E region has thousands of nuclei
    assert summary.tissue_tiles <= summary.tiles and summary.tissue_area_mm2 > 0.2
    for f in feats:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        uuid.UUID(f["id"])  # QuPath >= 0.4 keeps UUID ids as object ids
        ring = f["geometry"]["coordinates"][0]
        assert len(ring) >= 4 and ring[0] == ring[-1]  # closed
        geom = shapely.geometry.shape(f["geometry"])
        assert geom.is_valid and geom.area > 0
        x0, y0, x1, y1 = geom.bounds
        assert 0 <= x0 and 0 <= y0 and x1 <= W0 and y1 <= H0  # level-0 pixels, on the slide
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus" and len(props["classification"]["color"]) == 3
        meas = props["measurements"]  # the map form QuPath 0.4+ writes
        assert list(meas) == ["Area µm^2", "Perimeter µm", "Score", *measure.names("full")]  # the default
        assert props["metadata"] == {"nucleusId": str(props["nucleusId"])}  # where QuPath keeps the id
        assert meas["Area µm^2"] > 0 and meas["Perimeter µm"] > 0 and 0 <= meas["Score"] <= 1
    assert len({f["id"] for f in feats}) == len(feats)


def test_feature_ids_are_the_uuid5_of_each_nucleus():
    """The batched ids are exactly uuid5(namespace, "<slide key>:<id>"), as the per-nucleus form (and files
    written before the batched form) have them: a rerun or another output of the same slide keeps its ids."""
    ids = [0, 1, 9, 10, 99, 12345, 2**31, 2**53]
    for key in ("", "CMU-1-Small-Region.svs:1a2b", "slide é/ü:", "x" * 300):
        got = feature_ids(key, ids)
        assert got == [feature_id(key, i) for i in ids]
        assert all(uuid.UUID(g).version == 5 and uuid.UUID(g).variant == uuid.RFC_4122 for g in got)
    assert feature_ids("k", np.array([3, 4])) == [feature_id("k", 3), feature_id("k", 4)]
    assert feature_ids("k", []) == []


def _raster_iou(ring: np.ndarray, labels: np.ndarray, gid: int, scale: float = 1.0) -> float:
    """Rasterise a level-0 polygon at the label image's resolution (pixel centres inside) vs label == gid."""
    c = ring[:, 0] / scale - 0.5
    r = ring[:, 1] / scale - 0.5
    H, W = labels.shape
    r0, c0 = max(int(np.floor(r.min())) - 1, 0), max(int(np.floor(c.min())) - 1, 0)
    r1, c1 = min(int(np.ceil(r.max())) + 2, H), min(int(np.ceil(c.max())) + 2, W)
    rr, cc = draw_polygon(r - r0, c - c0, shape=(r1 - r0, c1 - c0))
    mask = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    mask[rr, cc] = True
    inst = labels[r0:r1, c0:c1] == gid
    return float((mask & inst).sum() / (mask | inst).sum())


def test_polygons_cover_their_stitched_pixels(cmu_run):
    _, summary, fc, labels = cmu_run
    ious = np.array([_raster_iou(np.asarray(f["geometry"]["coordinates"][0]), labels, f["properties"]["nucleusId"])
                     for f in fc["features"]])
    assert ious.min() >= 0.9, f"{(ious < 0.9).sum()} polygons do not match their pixels"


def test_ome_zarr_labels_are_the_stitched_ids(cmu_run):
    d, summary, fc, labels = cmu_run
    root = d / "cmu.labels.zarr"
    assert json.loads((root / ".zgroup").read_text())["zarr_format"] == 2
    assert json.loads((root / "labels" / ".zattrs").read_text()) == {"labels": ["nuclei"]}
    zattrs = json.loads((root / "labels" / "nuclei" / ".zattrs").read_text())
    ms = zattrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert zattrs["image-label"]["source"] == {"image": "../../"}
    # provenance: the same record as the GeoJSON's "nucseg" member, on the store's root
    assert json.loads((root / ".zattrs").read_text())["nucseg"]["provenance"] == fc["nucseg"]
    scales = [ds["coordinateTransformations"][0]["scale"] for ds in ms["datasets"]]
    assert scales[0] == pytest.approx([0.499, 0.499]) and all(
        s[0] == pytest.approx(scales[0][0] * 2**i) for i, s in enumerate(scales))
    assert len(ms["datasets"]) >= 2 and labels.shape == (H0, W0)
    group = zarr.open_group(str(root), mode="r")
    lvl1 = np.asarray(group["labels/nuclei/1"][:])
    np.testing.assert_array_equal(lvl1, labels[::2, ::2])
    # level 0 holds exactly the exported nuclei, each with the area its Feature reports
    ids = np.array([f["properties"]["nucleusId"] for f in fc["features"]])
    present = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(np.sort(ids), present)
    counts = np.bincount(labels.ravel())
    for f in fc["features"][::25]:
        area = f["properties"]["measurements"]["Area µm^2"]
        assert counts[f["properties"]["nucleusId"]] * 0.499**2 == pytest.approx(area, abs=1e-3)
    # every nucleus is one 8-connected region
    objs = ndi.find_objects(labels)
    for gid in ids[::50]:
        sl = objs[gid - 1]
        assert ndi.label(labels[sl] == gid, structure=np.ones((3, 3)))[1] == 1


def test_ome_zarr_is_an_image_with_a_nuclei_labels_child_for_ome_zarr_py(cmu_run, cmu_svs):
    """What napari's OME-Zarr plugin sees: ome-zarr-py reads the store as an RGB image whose labels child is
    the nuclei, with colours, both in micrometres and overlaying exactly."""
    import openslide
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Labels, Multiscales, OMERO, Reader

    d, summary, fc, labels = cmu_run
    nodes = list(Reader(parse_url(str(d / "cmu.labels.zarr")))())
    image = nodes[0]
    assert image.load(Multiscales) is not None and image.load(OMERO) is not None and image.load(Label) is None
    assert [a["name"] for a in image.metadata["axes"]] == ["c", "y", "x"]
    assert image.metadata["channel_names"] == ["red", "green", "blue"]
    rgb = np.asarray(image.data[0])
    assert rgb.shape == (3, H0, W0) and rgb.dtype == np.uint8  # the CMU region is small: full target resolution
    with openslide.OpenSlide(str(cmu_svs)) as s:
        ref = np.asarray(s.read_region((0, 0), 0, (W0, H0)).convert("RGB"))
    assert np.abs(rgb.transpose(1, 2, 0).astype(int) - ref).mean() < 1.0  # it is the slide
    children = [n for n in nodes if n.load(Label) is not None]
    assert len(children) == 1 and any(n.load(Labels) is not None for n in nodes)
    nuclei = children[0]
    assert nuclei.metadata["name"] == "nuclei"
    np.testing.assert_array_equal(np.asarray(nuclei.data[0]), labels)
    assert len(nuclei.data) == len(image.data)  # here the image is at the labels' resolution: same pyramid
    colors = nuclei.metadata["color"]
    assert colors[0][3] == 0 and len(colors) == labels.max() + 1 and all(c[3] == 1 for k, c in colors.items() if k)
    # and the NGFF 0.4 schema validators agree
    from ome_zarr_models.v04.image import Image
    from ome_zarr_models.v04.image_label import ImageLabel

    group = zarr.open_group(str(d / "cmu.labels.zarr"), mode="r")
    Image.from_zarr(group)
    ImageLabel.from_zarr(group["labels/nuclei"])
    img_t = image.metadata["coordinateTransformations"]
    lab_t = nuclei.metadata["coordinateTransformations"]
    for lvl in range(len(image.data)):
        assert img_t[lvl][0]["scale"][1:] == pytest.approx(lab_t[lvl][0]["scale"])


def test_ome_zarr_downsampled_image_overlays_the_labels(tmp_path, monkeypatch):
    """A slide larger than the image limit: the RGB image is coarser than the labels, and its pixel centres
    (scale + translation) land where the label pixels they summarise are."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    import nucseg.wsi.predict as predict

    slide = tmp_path / "big.tif"
    make_synthetic_slide(slide, 1400, 1000, mpp=0.5, nuclei=120, tissue_fraction=1.0, seed=5)
    monkeypatch.setattr(predict, "LABEL_IMAGE_MAX_SIDE", 350)  # 4x coarser than the labels
    predict_slide(slide, tmp_path / "big.geojson", ThresholdSegmenter(),
                  PredictConfig(labels=tmp_path / "big.zarr", label_chunk=256))
    nodes = list(Reader(parse_url(str(tmp_path / "big.zarr")))())
    image, nuclei = nodes[0], next(n for n in nodes if n.load(Label) is not None)
    rgb, lab = np.asarray(image.data[0]), np.asarray(nuclei.data[0])
    assert lab.shape == (1000, 1400) and rgb.shape == (3, 250, 350)
    t = image.metadata["coordinateTransformations"][0]
    assert t[0]["scale"] == pytest.approx([1, 2.0, 2.0]) and t[1]["translation"] == pytest.approx([0, 0.75, 0.75])
    # nuclei are dark in H&E: image pixels over labelled areas are darker than over background
    fg = lab.reshape(250, 4, 350, 4).mean(axis=(1, 3)) > 0.99
    bg = lab.reshape(250, 4, 350, 4).max(axis=(1, 3)) == 0
    grey = rgb.mean(axis=0)
    assert fg.sum() > 100 and grey[fg].mean() < grey[bg].mean() - 30


def test_csv_matches_features(cmu_run):
    d, summary, fc, labels = cmu_run
    with open(d / "cmu.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(fc["features"])
    assert list(rows[0]) == ["id", "centroid_x", "centroid_y", "area_um2", "perimeter_um", "score",
                             *[measure.COLUMNS[m] for m in measure.names("full")]]
    by_id = {f["properties"]["nucleusId"]: f for f in fc["features"]}
    objs = ndi.find_objects(labels)
    for row in rows[::10]:
        f = by_id[int(row["id"])]
        gid = int(row["id"])
        sl = objs[gid - 1]
        cy, cx = np.add(ndi.center_of_mass(labels[sl] == gid), (sl[0].start, sl[1].start))  # pixel centres
        assert float(row["centroid_x"]) == pytest.approx(cx + 0.5, abs=0.01)  # level-0 pixel-edge coordinates
        assert float(row["centroid_y"]) == pytest.approx(cy + 0.5, abs=0.01)
        meas = f["properties"]["measurements"]
        assert float(row["area_um2"]) == pytest.approx(meas["Area µm^2"], abs=1e-3)


def test_preview_png(cmu_run):
    d, *_ = cmu_run
    img = imread(d / "cmu.png")
    assert img.shape[:2] == (H0, W0)  # small slide: the preview is full resolution
    green = (img[..., 0] == 0) & (img[..., 1] == 220) & (img[..., 2] == 0)
    assert green.sum() > 10000  # outlines were drawn


def test_target_mpp_one_lands_on_the_same_level0_pixels(cmu_run, cmu_svs, tmp_path):
    """Segmenting at 1.0 µm/px on a 0.499 µm/px slide: coordinates are scaled back to level 0, so nuclei
    found at both resolutions sit on the same slide pixels."""
    d, _, fc_native, _ = cmu_run
    out = tmp_path / "cmu1.geojson"
    summary = predict_slide(cmu_svs, out, ThresholdSegmenter(min_size=6), PredictConfig(target_mpp=1.0))
    assert summary.target_mpp == pytest.approx(1.0) and summary.slide_mpp == pytest.approx(0.499)
    fc = json.loads(out.read_text())
    assert len(fc["features"]) > 300
    cents = []
    for f in fc["features"]:
        geom = shapely.geometry.shape(f["geometry"])
        assert geom.is_valid
        x0, y0, x1, y1 = geom.bounds
        assert 0 <= x0 and 0 <= y0 and x1 <= W0 + 1e-6 and y1 <= H0 + 1e-6
        cents.append((geom.centroid.x, geom.centroid.y))
    native = shapely.STRtree([shapely.geometry.shape(f["geometry"]) for f in fc_native["features"]])
    pts = shapely.points(np.asarray(cents))
    hits = native.query(pts, predicate="within")
    frac = len(np.unique(hits[0])) / len(pts)
    assert frac > 0.8, f"only {frac:.0%} of 1.0 µm/px nuclei centres fall inside a native-resolution nucleus"


# ---------------------------------------------------------------------------------------------- unit level
def test_instance_polygons_on_awkward_shapes():
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[5, 5] = 1  # single pixel
    labels[10:30, 10] = 2  # one-pixel-wide line
    for k in range(8):  # diagonal chain: 8-connected only
        labels[20 + k, 20 + k] = 3
    labels[2:12, 25:35] = 4
    labels[5:8, 28:31] = 0  # ring with a hole (exported filled)
    polys = instance_polygons(labels, np.array([1, 2, 3, 4]), x0=100, y0=200, scale=2.0)
    for lid, poly in zip([1, 2, 3, 4], polys):
        assert poly.is_valid and poly.geom_type == "Polygon"
        rr, cc = np.nonzero(labels == lid)
        centres = shapely.points((cc + 100 + 0.5) * 2.0, (rr + 200 + 0.5) * 2.0)
        assert shapely.contains(poly, centres).all(), f"label {lid}: a pixel centre is outside its polygon"
        assert len(poly.interiors) == 0


def test_geojson_writer_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "x.geojson"
    rec = NucleusRecord(1, shapely.box(0, 0, 3, 3), 1.5, 1.5, 2.25, 3.0, 0.9)
    with pytest.raises(RuntimeError):
        with GeoJSONWriter(out) as w:
            w.write(rec)
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with GeoJSONWriter(out) as w:
        w.write(rec)
    assert len(json.loads(out.read_text())["features"]) == 1


def test_gzip_output_is_the_same_collection(tmp_path):
    slide = tmp_path / "s.tif"
    make_synthetic_slide(slide, 900, 900, nuclei=150, tissue_fraction=1.0, pyramid=False, seed=4)
    cfg = PredictConfig(work_dir=tmp_path / "work")
    plain = predict_slide(slide, tmp_path / "a.geojson", ThresholdSegmenter(), cfg)
    gz = predict_slide(slide, tmp_path / "a.geojson.gz", ThresholdSegmenter(), cfg)
    assert plain.nuclei == gz.nuclei > 100
    raw = (tmp_path / "a.geojson.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert gzip.decompress(raw) == (tmp_path / "a.geojson").read_bytes()
    # gzip header carries no timestamp: a rerun is byte-identical
    predict_slide(slide, tmp_path / "b.geojson.gz", ThresholdSegmenter(), cfg)
    assert (tmp_path / "b.geojson.gz").read_bytes() == raw


def test_label_colors_are_distinct_for_neighbouring_ids_and_capped():
    from nucseg.wsi.export import LABEL_COLOR_LIMIT, label_colors

    colors = label_colors(500)
    assert colors[0] == {"label-value": 0, "rgba": [0, 0, 0, 0]} and [c["label-value"] for c in colors] == list(range(501))
    rgb = np.array([c["rgba"][:3] for c in colors[1:]])
    assert (np.abs(np.diff(rgb, axis=0)).sum(axis=1) > 60).all()  # ids n and n+1 (often touching) differ clearly
    assert all(c["rgba"][3] == 255 for c in colors[1:]) and rgb.min() >= 0 and rgb.max() <= 255
    assert label_colors(LABEL_COLOR_LIMIT + 1) == [] and len(label_colors(0)) == 1


def _square_batches(nx: int, ny: int, per_tile: int, tile: float = 100.0) -> list:
    """Batches of small squares, one per tile of an nx x ny raster, in tile order (as predict writes them)."""
    from nucseg.wsi.export import NucleusBatch

    rng = np.random.default_rng(0)
    out, gid = [], 1
    for ty in range(ny):
        for tx in range(nx):
            x = tx * tile + rng.uniform(5, tile - 15, per_tile)
            y = ty * tile + rng.uniform(5, tile - 15, per_tile)
            polys = shapely.box(x, y, x + rng.uniform(2, 8, per_tile), y + rng.uniform(2, 8, per_tile), ccw=True)
            ids = np.arange(gid, gid + per_tile)
            gid += per_tile
            c = shapely.get_coordinates(shapely.centroid(polys))
            out.append(NucleusBatch.from_polygons(ids, polys, c[:, 0], c[:, 1], shapely.area(polys),
                                                  shapely.length(polys), np.full(per_tile, 0.9)))
    return out


def test_geoparquet_bbox_covering_and_region_reads(tmp_path, monkeypatch):
    """GeoParquet 1.1 covering: a ``bbox`` struct column (the polygons' bounds) declared in the ``geo`` metadata,
    rows in tile order in row groups of exactly ROW_GROUP rows, so ``geopandas.read_parquet(bbox=...)`` works
    and a pyarrow filter on ``bbox`` keeps only the row groups the region touches."""
    gpd = pytest.importorskip("geopandas")
    import pyarrow.dataset as ds
    import pyarrow.parquet as papq

    from nucseg.wsi.export import GeoParquetWriter

    monkeypatch.setattr(GeoParquetWriter, "ROW_GROUP", 40)
    path = tmp_path / "n.parquet"
    batches = _square_batches(6, 6, 7)
    with GeoParquetWriter(path, slide_key="s", measurements=measure.names("full")) as w:
        for b in batches:
            w.write_batch(b)
    n = sum(len(b) for b in batches)
    meta = json.loads(papq.read_schema(path).metadata[b"geo"])
    assert meta["version"] == "1.1.0"
    assert meta["columns"]["geometry"]["covering"] == {
        "bbox": {f: ["bbox", f] for f in ("xmin", "ymin", "xmax", "ymax")}}
    md = papq.ParquetFile(path).metadata
    sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    assert sum(sizes) == n == 252 and sizes[:-1] == [40] * (len(sizes) - 1) and 0 < sizes[-1] <= 40
    df = gpd.read_parquet(path)  # geopandas reads the covering, not as a column
    bbox = papq.read_table(path, columns=["bbox"])["bbox"].combine_chunks()
    bounds = np.stack([bbox.field(f).to_numpy() for f in ("xmin", "ymin", "xmax", "ymax")], axis=1)
    np.testing.assert_array_equal(bounds, shapely.bounds(df.geometry.values))
    assert list(df["nucleus_id"]) == list(range(1, n + 1))  # tile order

    box = (120.0, 220.0, 290.0, 330.0)
    got = gpd.read_parquet(path, bbox=box)
    hit = (bounds[:, 0] <= box[2]) & (bounds[:, 2] >= box[0]) & (bounds[:, 1] <= box[3]) & (bounds[:, 3] >= box[1])
    assert 0 < hit.sum() < n and sorted(got["nucleus_id"]) == sorted(df["nucleus_id"][hit])
    # the same filter on the row-group statistics: only the row groups of the region's band of tiles
    f = ((ds.field("bbox", "xmin") <= box[2]) & (ds.field("bbox", "xmax") >= box[0])
         & (ds.field("bbox", "ymin") <= box[3]) & (ds.field("bbox", "ymax") >= box[1]))
    [frag] = ds.dataset(path).get_fragments()
    kept = frag.split_by_row_group(f)
    assert 0 < len(kept) <= len(sizes) // 2
    assert sum(g.count_rows() for g in kept) >= hit.sum()


def test_measurement_rounding_in_numpy_is_pythons_exact_rounding():
    """The vectorised 6-decimal rounding of the measurements equals Python's round value for value (and its
    repr), including decimal half-way cases, signed zeros, huge values and NaN (null)."""
    from nucseg.wsi.export import _json_number, _json_numbers

    rng = np.random.default_rng(0)
    v = np.concatenate([rng.random(20000), rng.normal(0, 100, 20000), (rng.integers(0, 10**7, 20000) + 0.5) / 1e6,
                        [np.nan, 0.0, -0.0, 1e-7, -1e-7, 5e-7, 2.5e-6, 1e300, -1e20, np.inf]])
    got = _json_numbers(v)
    want = [_json_number(x) for x in v.tolist()]
    assert [repr(x) for x in got] == [repr(x) for x in want]
