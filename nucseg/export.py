"""Streaming outputs: QuPath-ready GeoJSON (optionally gzipped), CSV, a preview PNG, OME-Zarr labels.

Nothing here holds a whole slide's worth of nuclei or pixels: features are written one at a time, the label
image chunk by chunk. Every output goes through :func:`nucseg.io.atomic_path`, so a killed job leaves no
partial file.

Coordinates are **level-0 pixels** with QuPath's convention (origin at the top-left corner of the
full-resolution image, pixel (r, c) covering [c, c+1) x [r, r+1)). Measurements follow QuPath's GeoJSON:
``properties.measurements`` is a list of ``{"name", "value"}`` objects, the form every QuPath version reads
(0.2/0.3 read only lists; 0.4+ read lists and maps).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely import affinity
from shapely.geometry import Polygon
from shapely.geometry.polygon import orient
from skimage.measure import find_contours

from . import __version__
from .io import atomic_path, save_png

NUCLEUS_COLOR = [200, 0, 120]
_UUID_NS = uuid.UUID("5b7cf0a4-53c1-4f4c-9d57-0c1e7a1f2b10")


@dataclass
class NucleusRecord:
    """One kept nucleus, ready to be written (all coordinates level-0 pixels)."""

    id: int
    polygon: Polygon
    centroid_x: float
    centroid_y: float
    area_um2: float
    perimeter_um: float
    score: float


# ---------------------------------------------------------------------------------------------- polygons
def instance_polygons(
    labels: np.ndarray,
    local_ids: np.ndarray,
    x0: float,
    y0: float,
    scale: float,
    tolerance: float = 0.25,
) -> list[Polygon]:
    """Outline each kept instance of a tile as a valid polygon in level-0 pixel coordinates.

    The contour is traced by marching squares at 0.5 on the instance's 1-px-padded binary crop, so it runs
    half-way between inside and outside pixel centres and every pixel centre of the instance lies inside
    (diagonal neighbours count as connected, as in the stitcher). An instance made of several separate
    pieces is exported as its largest piece: a Feature is one Polygon.
    (x0, y0): the tile origin in target pixels; scale: level-0 pixels per target pixel. Simplification
    (``tolerance`` target px, topology-preserving) only drops near-collinear vertices.
    """
    slices = ndi.find_objects(labels)
    polys: list[Polygon] = []
    for lid in np.asarray(local_ids, dtype=np.int64):
        sl = slices[lid - 1]
        crop = np.pad(labels[sl] == lid, 1)
        contours = find_contours(crop.astype(np.uint8), 0.5, fully_connected="high")  # 8-connected objects
        # target pixel-edge coordinates: pixel centre c sits at c + 0.5; undo the 1-px pad.
        ox, oy = x0 + sl[1].start - 1 + 0.5, y0 + sl[0].start - 1 + 0.5
        rings = [Polygon(np.column_stack([c[:, 1] + ox, c[:, 0] + oy])) for c in contours if len(c) >= 4]
        poly = _largest(rings)
        if poly is None:  # degenerate crop: fall back to the union of pixel squares
            rr, cc = np.nonzero(crop)
            boxes = shapely.box(cc + ox - 0.5, rr + oy - 0.5, cc + ox + 0.5, rr + oy + 0.5)
            poly = _largest([shapely.unary_union(boxes)])
        poly = poly.simplify(tolerance, preserve_topology=True)
        if not poly.is_valid:
            poly = _largest([shapely.make_valid(poly)])
        poly = orient(affinity.scale(poly, scale, scale, origin=(0, 0)), sign=1.0)
        polys.append(poly)
    return polys


def _largest(geoms: list) -> Polygon | None:
    """The largest polygon among geometries (MultiPolygons and collections are flattened)."""
    parts: list[Polygon] = []
    for g in geoms:
        if g is None or g.is_empty:
            continue
        if isinstance(g, Polygon):
            parts.append(g if g.is_valid else _largest([shapely.make_valid(g)]) or g)
        elif hasattr(g, "geoms"):
            parts.extend(p for p in (_largest([h]) for h in g.geoms) if p is not None)
    parts = [p for p in parts if isinstance(p, Polygon) and not p.is_empty and p.area > 0]
    if not parts:
        return None
    best = max(parts, key=lambda p: p.area)
    return Polygon(best.exterior)  # nuclei are filled: holes would only be segmentation noise


# ---------------------------------------------------------------------------------------------- writers
def _head_text(path: Path, n: int = 1 << 16) -> str:
    """The first ``n`` characters of a text file (gunzipped when named .gz); "" when unreadable."""
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            return fh.read(n)
    except (OSError, EOFError, ValueError):
        return ""


def is_nucseg_geojson(path: Path) -> bool:
    """A FeatureCollection whose header carries nucseg's foreign member (what :class:`GeoJSONWriter` writes)."""
    head = _head_text(path).lstrip()
    return path.is_file() and head.startswith('{"type": "FeatureCollection"') and '"nucseg":' in head.split(
        '"features"', 1)[0]


def is_nucseg_csv(path: Path) -> bool:
    """A CSV whose header row is :class:`CSVWriter`'s."""
    return path.is_file() and _head_text(path, 256).startswith(",".join(CSVWriter.HEADER[:3]) + ",")


def is_nucseg_zarr(path: Path) -> bool:
    """A zarr folder whose root attributes carry nucseg's ``"nucseg"`` entry (v2 ``.zattrs`` or v3 ``zarr.json``)."""
    for name, inner in ((".zattrs", None), ("zarr.json", "attributes")):
        try:
            attrs = json.loads((path / name).read_text())
            attrs = attrs.get(inner, {}) if inner else attrs
            if isinstance(attrs, dict) and "nucseg" in attrs:
                return path.is_dir()
        except (OSError, ValueError, AttributeError):
            continue
    return False


@contextlib.contextmanager
def _text_output(path: Path, owned) -> Iterator[io.TextIOBase]:
    """Atomic text output; gzip (with a fixed mtime, so reruns are byte-identical) when the name ends .gz."""
    with atomic_path(path, owned=owned) as tmp:
        if path.name.endswith(".gz"):
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                with io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as fh:
                    yield fh
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                yield fh


def _round_coords(poly: Polygon, ndigits: int = 2) -> list[list[list[float]]]:
    ring = [[round(float(x), ndigits), round(float(y), ndigits)] for x, y in poly.exterior.coords]
    if ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    return [ring]


def feature(rec: NucleusRecord, slide_key: str) -> dict:
    """One QuPath detection Feature (plain dict; ids are deterministic UUIDs so QuPath keeps them)."""
    import geojson

    geom = geojson.Polygon(_round_coords(rec.polygon))
    return geojson.Feature(
        id=str(uuid.uuid5(_UUID_NS, f"{slide_key}:{rec.id}")),
        geometry=geom,
        properties={
            "objectType": "detection",
            "classification": {"name": "Nucleus", "color": NUCLEUS_COLOR},
            "measurements": [
                {"name": "Area µm^2", "value": round(rec.area_um2, 4)},
                {"name": "Perimeter µm", "value": round(rec.perimeter_um, 4)},
                {"name": "Score", "value": round(rec.score, 5)},
            ],
            "nucleusId": int(rec.id),
        },
    )


class GeoJSONWriter:
    """``{"type":"FeatureCollection","features":[`` + one Feature per line + ``]}``, streamed to disk."""

    def __init__(self, path: str | os.PathLike, slide_key: str = ""):
        self.path = Path(path)
        self.slide_key = slide_key
        self.count = 0
        self._cm = None
        self._fh = None

    def __enter__(self) -> "GeoJSONWriter":
        self._cm = _text_output(self.path, is_nucseg_geojson)
        self._fh = self._cm.__enter__()
        header = json.dumps({"version": __version__}, sort_keys=True)  # how reruns know the file is nucseg's
        self._fh.write(f'{{"type": "FeatureCollection", "nucseg": {header}, "features": [\n')
        return self

    def write(self, rec: NucleusRecord) -> None:
        import geojson

        if self.count:
            self._fh.write(",\n")
        self._fh.write(geojson.dumps(feature(rec, self.slide_key), ensure_ascii=False, sort_keys=True))
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self._fh.write("\n]}\n")
        return bool(self._cm.__exit__(exc_type, exc, tb))


class CSVWriter:
    """One row per nucleus: id, level-0 centroid, area µm², perimeter µm, score."""

    HEADER = ["id", "centroid_x", "centroid_y", "area_um2", "perimeter_um", "score"]

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> "CSVWriter":
        self._cm = _text_output(self.path, is_nucseg_csv)
        fh = self._cm.__enter__()
        self._w = csv.writer(fh, lineterminator="\n")
        self._w.writerow(self.HEADER)
        return self

    def write(self, rec: NucleusRecord) -> None:
        self._w.writerow([rec.id, f"{rec.centroid_x:.2f}", f"{rec.centroid_y:.2f}", f"{rec.area_um2:.4f}",
                          f"{rec.perimeter_um:.4f}", f"{rec.score:.5f}"])

    def __exit__(self, exc_type, exc, tb) -> bool:
        return bool(self._cm.__exit__(exc_type, exc, tb))


class PreviewWriter:
    """Slide overview with nucleus outlines drawn as they stream past; saved as PNG on close."""

    def __init__(self, path: str | os.PathLike, overview: np.ndarray, overview_px: float,
                 color: tuple[int, int, int] = (0, 220, 0)):
        self.path = Path(path)
        self.image = overview.copy()
        self.overview_px = float(overview_px)  # level-0 pixels per overview pixel
        self.color = color

    def __enter__(self) -> "PreviewWriter":
        return self

    def write(self, rec: NucleusRecord) -> None:
        xy = np.asarray(rec.polygon.exterior.coords) / self.overview_px - 0.5
        rr, cc = outline_pixels(xy, self.image.shape[:2])
        self.image[rr, cc] = self.color

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            save_png(self.path, self.image)
        return False


def outline_pixels(xy: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels along a closed ring of (x, y) pixel-centre coordinates, sampled every <= 0.5 px (vectorised)."""
    a, b = xy[:-1], xy[1:]
    steps = np.maximum(1, np.ceil(np.abs(b - a).max(axis=1) * 2)).astype(np.int64)
    seg = np.repeat(np.arange(len(a)), steps)
    t = (np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps)) / np.repeat(steps, steps)
    pts = np.rint(a[seg] + (b[seg] - a[seg]) * t[:, None]).astype(np.int64)
    ok = (pts[:, 0] >= 0) & (pts[:, 0] < shape[1]) & (pts[:, 1] >= 0) & (pts[:, 1] < shape[0])
    return pts[ok, 1], pts[ok, 0]


# ---------------------------------------------------------------------------------------------- OME-Zarr
LABEL_IMAGE_MAX_SIDE = 8192  # the RGB image under the labels: at most this many pixels along its longer side
LABEL_COLOR_LIMIT = 65536  # per-nucleus colours in the label metadata up to this many ids (else the viewer's own)


def label_colors(max_id: int) -> list[dict]:
    """NGFF ``image-label`` colours: background transparent, nucleus ids on a golden-ratio hue walk (so
    neighbouring ids, often touching nuclei, differ in colour). Empty above :data:`LABEL_COLOR_LIMIT` ids,
    where the list would bloat the metadata and viewers colour labels themselves."""
    from skimage.color import hsv2rgb

    if max_id > LABEL_COLOR_LIMIT:
        return []
    ids = np.arange(1, max_id + 1)
    hsv = np.stack([(ids * 0.6180339887) % 1.0, np.full(len(ids), 0.8), np.full(len(ids), 1.0)], axis=-1)
    rgb = np.rint(hsv2rgb(hsv[None])[0] * 255).astype(int).tolist() if len(ids) else []
    return [{"label-value": 0, "rgba": [0, 0, 0, 0]}] + [
        {"label-value": i, "rgba": [*c, 255]} for i, c in zip(ids.tolist(), rgb)]


def _halve_mean(img: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> 2x smaller by 2x2 means, rounded (odd edges repeated); integer sums, no floats."""
    h, w = img.shape[:2]
    img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    total = img[0::2, 0::2].astype(np.uint16) + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def write_ome_zarr_labels(
    path: str | os.PathLike,
    height: int,
    width: int,
    region: Callable[[int, int, int, int], np.ndarray],
    mpp: float,
    image: np.ndarray,
    image_mpp: float,
    level0_scale: float = 1.0,
    chunk: int = 1024,
    name: str = "nuclei",
    max_levels: int = 8,
) -> None:
    """Write an NGFF 0.4 OME-Zarr (zarr v2, "/" chunk keys) that napari opens as an image with its labels:

        path/             multiscales: the slide as RGB (c, y, x), downsampled (``image`` at ``image_mpp``),
                          a 2x mean pyramid; omero: red, green and blue channels
        path/labels/      {"labels": [name]}
        path/labels/name  the label image: multiscales (y, x) with a 2x nearest-neighbour pyramid, and
                          ``image-label`` (colours, ``source.image`` pointing at the image)

    ``region(y0, y1, x0, x1)`` returns global ids for a box of the target-resolution label image (``mpp``
    µm/px); it is called once per level-0 chunk, and each coarser level is built chunk by chunk from the one
    above, so memory holds a few chunks only (plus ``image``, at most :data:`LABEL_IMAGE_MAX_SIDE` wide).
    Axes are in micrometres: label pixel (r, c) sits at (r, c) x mpp, the image's pixels at their centres
    relative to that (a translation), so both overlay exactly. ``level0_scale`` (slide level-0 pixels per
    label pixel) is recorded so that pixel-space viewers can align the labels with the slide.
    """
    import numcodecs
    import zarr

    path = Path(path)
    compressor = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    # H&E pixels compress hardly better at higher levels (7.6 vs 7.8 MB on CMU-1-Small-Region), at 2x the time
    rgb_compressor = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.NOSHUFFLE)
    keys = {"name": "v2", "separator": "/"}
    space = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    with atomic_path(path, is_dir=True, owned=is_nucseg_zarr) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        # the image: level 0 as given, then 2x means until it fits one chunk
        levels = [np.ascontiguousarray(image[..., :3])]
        while len(levels) < max_levels and max(levels[-1].shape[:2]) > chunk:
            levels.append(_halve_mean(levels[-1]))
        img_datasets, scale, shift = [], float(image_mpp), 0.5 * (float(image_mpp) - mpp)
        for lvl, arr in enumerate(levels):
            h, w = arr.shape[:2]
            z = root.create_array(str(lvl), shape=(3, h, w), chunks=(3, min(chunk, h), min(chunk, w)), dtype="uint8",
                                  fill_value=0, compressors=rgb_compressor, chunk_key_encoding=keys)
            z[:] = np.moveaxis(arr, -1, 0)
            img_datasets.append({"path": str(lvl), "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, scale, scale]}, {"type": "translation", "translation": [0.0, shift, shift]}]})
            shift, scale = shift + 0.5 * scale, 2 * scale  # a 2x2 mean's centre
        root.attrs.update({
            "multiscales": [{"version": "0.4", "name": "slide", "type": "mean",
                             "axes": [{"name": "c", "type": "channel"}, *space], "datasets": img_datasets}],
            "omero": {"version": "0.4", "name": "slide", "rdefs": {"model": "color"}, "channels": [
                {"label": lab, "color": col, "active": True, "coefficient": 1.0, "family": "linear", "inverted": False,
                 "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                for lab, col in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))]},
            "nucseg": {"image_mpp": float(image_mpp), "labels": f"labels/{name}", "label_mpp": mpp},
        })
        labels_group = root.create_group("labels")
        labels_group.attrs.update({"labels": [name]})
        group = labels_group.create_group(name)
        shapes = [(height, width)]
        while len(shapes) < max_levels and max(shapes[-1]) > chunk:
            h, w = shapes[-1]
            shapes.append((max(1, (h + 1) // 2), max(1, (w + 1) // 2)))
        arrays = []
        for lvl, (h, w) in enumerate(shapes):
            arrays.append(group.create_array(
                str(lvl), shape=(h, w), chunks=(min(chunk, max(h, 1)), min(chunk, max(w, 1))), dtype="int32",
                fill_value=0, compressors=compressor, chunk_key_encoding=keys,
            ))
        max_id = 0
        for y0 in range(0, height, chunk):
            for x0 in range(0, width, chunk):
                y1, x1 = min(y0 + chunk, height), min(x0 + chunk, width)
                block = region(y0, y1, x0, x1)
                if block.any():
                    max_id = max(max_id, int(block.max()))
                    arrays[0][y0:y1, x0:x1] = block.astype(np.int32)
        for lvl in range(1, len(shapes)):
            src, dst = arrays[lvl - 1], arrays[lvl]
            h, w = shapes[lvl]
            for y0 in range(0, h, chunk):
                for x0 in range(0, w, chunk):
                    y1, x1 = min(y0 + chunk, h), min(x0 + chunk, w)
                    block = np.asarray(src[2 * y0 : 2 * y1 : 2, 2 * x0 : 2 * x1 : 2])
                    if block.any():
                        dst[y0:y1, x0:x1] = block
        datasets = [
            {"path": str(lvl), "coordinateTransformations": [{"type": "scale", "scale": [mpp * 2**lvl, mpp * 2**lvl]}]}
            for lvl in range(len(shapes))
        ]
        group.attrs.update({
            "multiscales": [{"version": "0.4", "name": name, "axes": space, "datasets": datasets, "type": "nearest"}],
            "image-label": {"version": "0.4", "colors": label_colors(max_id), "source": {"image": "../../"}},
            "nucseg": {"max_id": max_id, "mpp": mpp, "level0_scale": level0_scale},
        })
