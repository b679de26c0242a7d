"""QuPath in, NuInsSeg layout out: nucleus outlines drawn in QuPath become training tiles.

QuPath exports objects as GeoJSON in level-0 pixel coordinates: a FeatureCollection (0.4+), or a bare list of
Features (0.2/0.3). Each Feature's ``properties.objectType`` is ``annotation``, ``detection`` or ``cell`` (a
cell's nucleus is its ``nucleusGeometry``), and ``properties.classification`` names its class.

Rasterisation is exact and vectorised: a pixel belongs to a nucleus iff its centre lies inside the outline
(one STRtree query of all pixel centres of a tile), which is the inverse of nucseg's own export (outlines run
between inside and outside pixel centres), so labels -> polygons -> import gives back the same instances.

What is drawn is never silently merged: overlapping outlines leave their shared pixels ambiguous (written to
``vague areas/``, which training and evaluation leave out), self-intersecting outlines are repaired with
shapely's ``make_valid`` and counted, holes are kept as drawn and counted. A region annotation (one that
contains other objects, or of ``region_class``) bounds what counts as labelled: outside it is ambiguous too.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import shape

from ..errors import InputError
from ..io import JsonMark, check_not_input, check_output, is_nucseg_png, is_nucseg_tiff, save_png, write_json
from ..learn.data import IMAGES_DIR, LABELS_DIR, VAGUE_DIR

POLYGONAL = ("Polygon", "MultiPolygon")
REPORT, REPORT_MARK = "qupath-import.json", JsonMark("qupath-import")  # the import's report, and its marker


@dataclass
class QuPathObjects:
    """Outlines from one QuPath export, in level-0 pixels."""

    nuclei: list  # shapely (Multi)Polygons
    regions: list  # shapely (Multi)Polygons bounding the labelled area (may be empty)
    report: dict = field(default_factory=dict)


def _features(doc) -> list[dict]:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" and isinstance(doc.get("features"), list):
        return doc["features"]
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    raise ValueError("not a GeoJSON Feature, FeatureCollection or list of Features")


def class_name(feature: dict) -> str | None:
    """QuPath's classification name (0.4+: {"name", "color"}; older exports: {"name", "colorRGB"} or a string)."""
    cls = (feature.get("properties") or {}).get("classification")
    if isinstance(cls, dict):
        return cls.get("name")
    return cls if isinstance(cls, str) else None


def read_features(path: str | os.PathLike) -> list[dict]:
    """The Features of a QuPath GeoJSON export; InputError (one line) for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GeoJSON not found: {path}")
    try:
        return [f for f in _features(json.loads(path.read_text(encoding="utf-8-sig"))) if isinstance(f, dict)]
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not a QuPath GeoJSON export: {' '.join(str(err).split())[:200]}") from None


def _geometry(feature: dict, report: dict):
    """The feature's (nucleus) outline as a valid (Multi)Polygon, or None for points, lines and empty shapes."""
    props = feature.get("properties") or {}
    geom = feature.get("nucleusGeometry") or props.get("nucleusGeometry") or feature.get("geometry")
    if not isinstance(geom, dict) or geom.get("type") not in POLYGONAL:
        report["ignored_not_polygons"] += 1
        return None
    try:
        g = shape(geom)
    except (ValueError, TypeError, AttributeError, IndexError):
        report["ignored_unreadable"] += 1
        return None
    if not g.is_valid:
        report["repaired_invalid"] += 1
        g = shapely.make_valid(g)
        polys = [p for p in getattr(g, "geoms", [g]) if p.geom_type in POLYGONAL and p.area > 0]
        g = shapely.unary_union(polys) if polys else None
    if g is None or g.is_empty or g.area <= 0:
        report["ignored_empty"] += 1
        return None
    report["with_holes"] += sum(len(p.interiors) for p in getattr(g, "geoms", [g])) > 0
    return g


def read_qupath_objects(path: str | os.PathLike, region_class: str | None = None) -> QuPathObjects:
    """Nuclei and labelled regions of a QuPath export.

    Regions: annotations of ``region_class`` if given; otherwise annotations that contain another object's
    representative point (a region drawn around the nuclei that were outlined inside it).
    """
    report = {k: 0 for k in ("features", "ignored_not_polygons", "ignored_unreadable", "ignored_empty",
                             "repaired_invalid", "with_holes")}
    feats = read_features(path)
    report["features"] = len(feats)
    geoms, annotation = [], []
    for f in feats:
        g = _geometry(f, report)
        if g is not None:
            geoms.append((f, g))
            annotation.append((f.get("properties") or {}).get("objectType", "annotation") == "annotation")
    if region_class is not None:
        is_region = np.array([a and class_name(f) == region_class for (f, _), a in zip(geoms, annotation)], bool)
    else:
        is_region = np.zeros(len(geoms), bool)
        if geoms:
            shapes = np.array([g for _, g in geoms], dtype=object)
            tree = shapely.STRtree(shapes)
            inner, outer = tree.query(shapely.point_on_surface(shapes), predicate="within")
            area = shapely.area(shapes)
            contains = np.zeros(len(geoms), bool)  # holds a smaller object (a nucleus inside the drawn region)
            contains[outer[(inner != outer) & (area[outer] > area[inner])]] = True
            is_region = contains & np.array(annotation, bool)
    nuclei = [g for (_, g), r in zip(geoms, is_region) if not r]
    regions = [g for (_, g), r in zip(geoms, is_region) if r]
    report.update(nuclei=len(nuclei), regions=len(regions))
    return QuPathObjects(nuclei, regions, report)


def rasterize(geoms: list, x0: float, y0: float, h: int, w: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels (h, w) of ``geoms`` (level-0 px) over the target box at (x0, y0), and a mask of pixels
    claimed by more than one outline. Pixel (r, c) has its centre at target (x0 + c + 0.5, y0 + r + 0.5), i.e.
    level-0 ((x0 + c + 0.5) * scale, ...). Label k + 1 is ``geoms[k]``."""
    labels = np.zeros((h, w), np.int64)
    overlap = np.zeros((h, w), bool)
    if not geoms or not h or not w:
        return labels, overlap
    rr, cc = np.divmod(np.arange(h * w), w)
    pts = shapely.points((x0 + cc + 0.5) * scale, (y0 + rr + 0.5) * scale)
    pix, gi = shapely.STRtree(np.asarray(geoms, dtype=object)).query(pts, predicate="within")
    claims = np.bincount(pix, minlength=h * w)
    flat = labels.ravel()
    flat[pix] = gi + 1
    flat[claims > 1] = 0
    overlap.ravel()[claims > 1] = True
    return labels, overlap


def covered(region, x0: float, y0: float, h: int, w: int, scale: float = 1.0) -> np.ndarray:
    """Boolean (h, w): pixel centres inside ``region`` (one geometry: the union of the labelled regions)."""
    return rasterize([region], x0, y0, h, w, scale)[0] > 0


@dataclass
class ImportConfig:
    organ: str = "qupath"
    tile_size: int = 512
    mpp: float | None = None  # target µm/px (slides); None: the image's own
    slide_mpp: float | None = None
    region_class: str | None = None
    margin: int = 16  # px around the nuclei's bounding box when no region is drawn

    def validate(self) -> "ImportConfig":
        from .tiling import TILE_SIZE_RANGE
        from .slide import MPP_RANGE

        lo, hi = TILE_SIZE_RANGE
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or not lo <= self.tile_size <= hi:
            raise InputError(f"--tile-size must be a whole number in {lo}..{hi}, not {self.tile_size!r}")
        if not self.organ or any(c in self.organ for c in "/\\\0") or self.organ in (".", ".."):
            raise InputError(f"--organ must be a plain folder name, not {self.organ!r}")
        for name in ("mpp", "slide_mpp"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and MPP_RANGE[0] <= v <= MPP_RANGE[1]):
                raise InputError(f"--{name.replace('_', '-')} must be in {MPP_RANGE[0]}..{MPP_RANGE[1]} µm/px, not {v!r}")
        return self


class _PlainImage:
    """A plain RGB image seen through the same read(x, y, size) call as a slide (white outside)."""

    def __init__(self, rgb: np.ndarray):
        self.rgb, self.height, self.width, self.scale = rgb, rgb.shape[0], rgb.shape[1], 1.0

    def read(self, x: int, y: int, size: int) -> np.ndarray:
        out = np.full((size, size, 3), 255, np.uint8)
        ys, xs = slice(max(y, 0), min(y + size, self.height)), slice(max(x, 0), min(x + size, self.width))
        if ys.start < ys.stop and xs.start < xs.stop:
            out[ys.start - y : ys.stop - y, xs.start - x : xs.stop - x] = self.rgb[ys, xs]
        return out


def _open_image(path: Path, cfg: ImportConfig):
    """(view with read/width/height/scale, µm/px or None, closer). Slides through openslide; plain images whole."""
    from ..io import IMAGE_SUFFIXES, read_rgb

    from ..errors import SlideError
    from .slide import TargetView, open_slide, slide_mpp

    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):  # never whole-slide formats
        return _PlainImage(read_rgb(path)), cfg.mpp, lambda: None
    try:
        slide = open_slide(path)
    except SlideError:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise
        return _PlainImage(read_rgb(path)), cfg.mpp, lambda: None  # a plain (untiled) TIFF
    if slide.level_count == 1 and max(slide.dimensions) <= 8192 and cfg.slide_mpp is None \
            and "openslide.mpp-x" not in slide.properties:
        slide.close()
        return _PlainImage(read_rgb(path)), cfg.mpp, lambda: None
    mpp0 = slide_mpp(slide, cfg.slide_mpp, path)
    view = TargetView.create(slide, path, mpp0, cfg.mpp or mpp0)
    return view, view.target_mpp, slide.close


def import_qupath(image: str | os.PathLike, geojson_path: str | os.PathLike, out: str | os.PathLike,
                  config: ImportConfig | None = None) -> dict:
    """Write NuInsSeg-layout tiles of ``image`` with the nuclei outlined in ``geojson_path`` under ``out``.

    Returns the import report (also written as ``<out>/<organ>/qupath-import.json``): tiles written, nuclei,
    repaired or ignored outlines, overlapping pixels, and the µm/px of the tiles.
    """
    cfg = (config or ImportConfig()).validate()
    image, geojson_path, out = Path(image), Path(geojson_path), Path(out)
    if not image.exists():
        raise InputError(f"image not found: {image}")
    check_not_input(out, [image, geojson_path])
    objs = read_qupath_objects(geojson_path, cfg.region_class)
    if not objs.nuclei:
        raise InputError(f"{geojson_path} holds no nucleus outlines (polygons) to import")
    view, mpp, close = _open_image(image, cfg)
    try:
        return _write_tiles(view, mpp, image, objs, out, cfg)
    finally:
        close()


def _write_tiles(view, mpp, image: Path, objs: QuPathObjects, out: Path, cfg: ImportConfig) -> dict:
    import tifffile

    from ..io import SOFTWARE, atomic_path

    scale = float(view.scale)  # level-0 px per target px
    bounds = shapely.bounds(shapely.unary_union(objs.regions or objs.nuclei)) / scale
    margin = 0 if objs.regions else cfg.margin
    x0, y0 = (max(0, int(math.floor(v)) - margin) for v in bounds[:2])
    x1, y1 = (min(lim, int(math.ceil(v)) + margin) for v, lim in zip(bounds[2:], (view.width, view.height)))
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"the outlines lie outside {image} ({view.width}x{view.height} px)")
    T = cfg.tile_size
    organ = out / cfg.organ
    tys, txs = np.meshgrid(np.arange(y0, y1, T), np.arange(x0, x1, T), indexing="ij")
    tys, txs = tys.ravel(), txs.ravel()
    hs, ws = np.minimum(T, y1 - tys), np.minimum(T, x1 - txs)
    boxes = shapely.box(txs * scale, tys * scale, (txs + ws) * scale, (tys + hs) * scale)
    # a tile is written if it meets a labelled region (or, without regions, a nucleus): one tree query
    hit = np.unique(shapely.STRtree(np.asarray(objs.regions or objs.nuclei, dtype=object)).query(
        boxes, predicate="intersects")[0])
    plan = [(int(txs[i]), int(tys[i]), int(hs[i]), int(ws[i]), f"{image.stem}_x{txs[i]}_y{tys[i]}") for i in hit]
    check_output(organ / REPORT, REPORT_MARK)
    for *_, stem in plan:  # every output checked before anything is written
        check_output(organ / IMAGES_DIR / f"{stem}.png", is_nucseg_png)
        check_output(organ / LABELS_DIR / f"{stem}.tif", is_nucseg_tiff)
        check_output(organ / VAGUE_DIR / f"{stem}.png", is_nucseg_png)
    report = dict(objs.report, image=str(image), mpp=mpp, tile_size=T, tiles=0, overlap_pixels=0,
                  instances_written=0)  # a nucleus cut by a tile edge counts once per tile
    nuclei = objs.nuclei
    from skimage.segmentation import relabel_sequential

    region = shapely.unary_union(objs.regions) if objs.regions else None  # once, not per tile
    for tx, ty, h, w, stem in plan:
        labels, overlap = rasterize(nuclei, tx, ty, h, w, scale)
        vague = overlap.copy()
        if region is not None:
            vague |= ~covered(region, tx, ty, h, w, scale)
            labels[vague] = 0
        labels = relabel_sequential(labels)[0]
        rgb = view.read(tx, ty, max(h, w))[:h, :w]
        save_png(organ / IMAGES_DIR / f"{stem}.png", rgb)
        with atomic_path(organ / LABELS_DIR / f"{stem}.tif", owned=is_nucseg_tiff) as tmp:
            dtype = np.uint32 if labels.max(initial=0) > 65535 else np.uint16
            tifffile.imwrite(tmp, labels.astype(dtype), software=SOFTWARE)
        if vague.any():
            save_png(organ / VAGUE_DIR / f"{stem}.png", np.where(vague, 255, 0).astype(np.uint8))
        report["tiles"] += 1
        report["overlap_pixels"] += int(overlap.sum())
        report["instances_written"] += int(labels.max(initial=0))
    write_json(organ / REPORT, report, REPORT_MARK)
    return report
