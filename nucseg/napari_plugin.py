"""napari readers for nucseg's outputs (npe2 manifest: ``nucseg/napari.yaml``; ``pip install nucseg[napari]``).

- An OME-Zarr written by ``nucseg predict -o x.zarr`` opens as **one RGB image** layer (napari-ome-zarr
  shows its three channels as separate additive layers) and the ``nuclei`` labels layer, visible, both in
  micrometres as the file's coordinate transformations say.
- ``.geojson`` (``.geojson.gz``) and ``.parquet`` results open as a **shapes** layer of nucleus outlines or,
  above :data:`SHAPES_LIMIT` nuclei (napari triangulates every polygon), a **points** layer at the centroids
  (sized as each nucleus' equivalent circle);
  the measurements are the layer's ``features`` (one row per nucleus).

Coordinates: the files hold level-0 pixel-edge (x, y) coordinates (pixel (r, c) covers [c, c+1) x [r, r+1));
napari wants (row, col) with pixel *centres* at integers, so vertices are swapped to (y, x) and the layer is
translated by half a pixel. Where the file records the slide's µm/px (nucseg's provenance), the layer is scaled
to micrometres and placed exactly over the OME-Zarr of the same run (whose origin is the centre of its first
label pixel, at ``target_mpp``).

napari itself is never imported: readers return napari's plain layer-data tuples. Other files (another
tool's zarr, GeoJSON or Parquet) get ``None``, so napari asks its other readers.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

# More nuclei than this open as points. napari triangulates every polygon of a shapes layer: with its compiled
# bermuda backend (napari[bermuda], in nucseg[napari]) 2,367 real nuclei took 0.4 s CPU and 20,000 took 4.6 s;
# with the numba fallback the 2,367 took 15 s (2026-12-08, 2-core shared VM, load ~10).
SHAPES_LIMIT = 20000
NUCLEUS_EDGE = "#c80078"  # nucseg's nucleus colour (nucseg.wsi.export.NUCLEUS_COLOR)


def napari_get_reader(path):
    """npe2 reader hook: a reader for ``path`` if it is one of nucseg's outputs, else None."""
    from .wsi.export import is_nucseg_geojson, is_nucseg_parquet, is_nucseg_zarr

    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_dir():
        return read_ome_zarr if is_nucseg_zarr(p) else None
    name = p.name.lower()
    if name.endswith((".geojson", ".geojson.gz")) and is_nucseg_geojson(p):
        return read_nuclei
    if name.endswith(".parquet") and is_nucseg_parquet(p):
        return read_nuclei
    return None


def _one(path) -> Path:
    return Path(path[0] if isinstance(path, list) else path)


def read_ome_zarr(path) -> list[tuple]:
    """nucseg's OME-Zarr as [(RGB image pyramid, kwargs, "image"), (labels pyramid, kwargs, "labels")]."""
    import dask.array as da
    import zarr

    root = zarr.open_group(str(_one(path)), mode="r")
    attrs = root.attrs.asdict()
    ms = attrs["multiscales"][0]
    image = [da.from_zarr(root[d["path"]]).transpose(1, 2, 0) for d in ms["datasets"]]  # (c, y, x) -> RGB last
    scale, translate = _transform(ms["datasets"][0], spatial=2)
    layers = [(image if len(image) > 1 else image[0],
               {"name": ms.get("name", "slide"), "rgb": True, "multiscale": len(image) > 1, "scale": scale,
                "translate": translate, "axis_labels": ("y", "x"), "units": ("micrometer", "micrometer")},
               "image")]
    name = attrs.get("nucseg", {}).get("labels", "labels/nuclei")
    group = root[name]
    lms = group.attrs.asdict()["multiscales"][0]
    labels = [da.from_zarr(group[d["path"]]) for d in lms["datasets"]]
    scale, translate = _transform(lms["datasets"][0], spatial=2)
    layers.append((labels if len(labels) > 1 else labels[0],
                   {"name": lms.get("name", "nuclei"), "multiscale": len(labels) > 1, "scale": scale,
                    "translate": translate, "visible": True, "opacity": 0.5, "axis_labels": ("y", "x"),
                    "units": ("micrometer", "micrometer")},
                   "labels"))
    return layers


def _transform(dataset: dict, spatial: int) -> tuple[list[float], list[float]]:
    """The last ``spatial`` axes' scale and translation of an NGFF dataset."""
    scale, translate = [1.0] * spatial, [0.0] * spatial
    for t in dataset.get("coordinateTransformations", []):
        if t["type"] == "scale":
            scale = [float(v) for v in t["scale"][-spatial:]]
        elif t["type"] == "translation":
            translate = [float(v) for v in t["translation"][-spatial:]]
    return scale, translate


def read_nuclei(path, points: bool | None = None) -> list[tuple]:
    """nucseg's GeoJSON or GeoParquet as [(data, kwargs, "shapes" | "points")]; ``points`` None: points above
    :data:`SHAPES_LIMIT` nuclei. Features: id, classification and every measurement (snake-case columns for
    Parquet, QuPath names for GeoJSON)."""
    p = _one(path)
    rings, features, prov = _read_parquet(p) if p.name.lower().endswith(".parquet") else _read_geojson(p)
    n = len(rings)
    if points is None:
        points = n > SHAPES_LIMIT
    mpp0, target = prov.get("slide_mpp"), prov.get("target_mpp")
    if mpp0 and target:  # micrometres, over the OME-Zarr of the same run (origin: its first pixel's centre)
        scale, translate = [float(mpp0)] * 2, [-0.5 * float(target)] * 2
    else:  # level-0 pixels, pixel centres at integers
        scale, translate = [1.0, 1.0], [-0.5, -0.5]
    kwargs = {"name": p.name, "features": features, "scale": scale, "translate": translate,
              "metadata": {"nucseg": prov, "path": str(p)}}
    if points:
        cy = features.get("centroid_y")
        cx = features.get("centroid_x")
        if cx is None or cy is None:  # GeoJSON features carry no centroid: the vertices' mean
            centre = np.array([r.mean(axis=0) for r in rings]).reshape(-1, 2)
            cx, cy = centre[:, 0], centre[:, 1]
        data = np.stack([cy, cx], axis=1) if n else np.zeros((0, 2))
        return [(data, {**kwargs, "size": _diameters(rings), "face_color": NUCLEUS_EDGE, "border_width": 0},
                 "points")]
    shapes = [r[:-1, ::-1] if len(r) > 1 and np.array_equal(r[0], r[-1]) else r[:, ::-1] for r in rings]
    return [(shapes, {**kwargs, "shape_type": "polygon", "edge_color": NUCLEUS_EDGE, "face_color": "transparent",
                      "edge_width": 1.0}, "shapes")]


def _diameters(rings: list[np.ndarray]) -> np.ndarray:
    """Equivalent-circle diameters (pixels) of the outlines: the points' sizes."""
    area = np.array([0.5 * abs(np.dot(r[:, 0], np.roll(r[:, 1], 1)) - np.dot(r[:, 1], np.roll(r[:, 0], 1)))
                     for r in rings], dtype=np.float64)
    return np.maximum(2 * np.sqrt(area / np.pi), 1.0)


def _read_parquet(path: Path) -> tuple[list[np.ndarray], dict, dict]:
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    table = pq.read_table(str(path))
    meta = table.schema.metadata or {}
    prov = orjson.loads(meta[b"nucseg"]) if b"nucseg" in meta else {}
    geom_col = orjson.loads(meta[b"geo"]).get("primary_column", "geometry") if b"geo" in meta else "geometry"
    geoms = shapely.from_wkb(table.column(geom_col).to_numpy(zero_copy_only=False))
    coords, index = shapely.get_coordinates(shapely.get_exterior_ring(geoms), return_index=True)
    rings = np.split(coords, np.searchsorted(index, np.arange(1, len(geoms))))
    features = {}
    for name in table.column_names:  # scalar columns only (a GeoParquet bbox covering column is a struct)
        col, t = table.column(name), table.schema.field(name).type
        if name != geom_col and (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                                 or pa.types.is_string(t) or pa.types.is_large_string(t)):
            features[name] = col.to_numpy(zero_copy_only=False)
    return rings, features, prov


def _read_geojson(path: Path) -> tuple[list[np.ndarray], dict, dict]:
    import orjson

    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    doc = orjson.loads(raw)
    feats = doc.get("features", [])
    rings = [np.asarray(f["geometry"]["coordinates"][0], dtype=np.float64) for f in feats]
    names: list[str] = []
    for f in feats:  # measurement names in first-seen order (every nucleus has the same in nucseg's files)
        for k in f["properties"].get("measurements", {}):
            if k not in names:
                names.append(k)
    features: dict = {
        "id": np.array([f.get("id", "") for f in feats], dtype=object),
        "nucleus_id": np.array([f["properties"].get("nucleusId", -1) for f in feats], dtype=np.int64),
        "classification": np.array([(f["properties"].get("classification") or {}).get("name", "")
                                    for f in feats], dtype=object),
    }
    for k in names:
        features[k] = np.array([_num(f["properties"]["measurements"].get(k)) for f in feats], dtype=np.float64)
    return rings, features, doc.get("nucseg", {})


def _num(v) -> float:
    return float("nan") if v is None else float(v)
