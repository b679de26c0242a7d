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

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import shape

from ..errors import InputError
from ..io import (JsonMark, check_not_input, check_output, is_nucseg_png, is_nucseg_tiff, read_json, remove_owned,
                  save_png, write_json)
from ..learn.data import IMAGES_DIR, LABELS_DIR, VAGUE_DIR

POLYGONAL = ("Polygon", "MultiPolygon")
MAX_COORD = 1e9  # |level-0 px|: no slide is a thousandth of this; beyond it a coordinate is not a pixel's
REPORT, REPORT_MARK = "qupath-import.json", JsonMark("qupath-import")  # the import's report, and its marker
MAX_VERTICES = 50_000_000  # all outlines of one export: ~1 GB as shapely geometry and the scanline's crossings


def check_vertex_count(geoms: list, path) -> None:
    """InputError if ``geoms`` hold more than :data:`MAX_VERTICES` vertices in all (checked before rasterising
    or any union, whose memory grows with them)."""
    n = int(shapely.get_num_coordinates(np.asarray(geoms, dtype=object)).sum()) if len(geoms) else 0
    if n > MAX_VERTICES:
        raise InputError(f"{path} holds {n:,} outline vertices, more than the {MAX_VERTICES:,} nucseg reads from one "
                         "export; export a smaller region (or simplify the outlines in QuPath)")


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
        cls = cls.get("name")
    return cls if isinstance(cls, str) else None


def read_features(path: str | os.PathLike) -> list[dict]:
    """The Features of a QuPath GeoJSON export; InputError (one line) for anything that is not one.

    Parsed strictly (:func:`nucseg.io.parse_json`: no NaN/Infinity, bounded nesting). A Feature's
    ``properties`` must be an object or null, as GeoJSON says: a list or a string would silently lose its
    objectType and classification.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GeoJSON not found: {path}")
    try:
        feats = [f for f in _features(read_json(path)) if isinstance(f, dict)]
    except ValueError as err:
        raise InputError(f"{path} is not a QuPath GeoJSON export: {' '.join(str(err).split())[:200]}") from None
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    for i, f in enumerate(feats):
        props = f.get("properties")
        if props is not None and not isinstance(props, dict):
            raise InputError(f"{path}: feature {i} has \"properties\" of type {type(props).__name__}; GeoJSON "
                             "needs a JSON object or null there")
    return feats


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
    if not g.is_empty and not (np.abs(g.bounds) <= MAX_COORD).all():  # not pixels of any image (1e300, ...)
        report["ignored_outside"] += 1
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
                             "ignored_outside", "repaired_invalid", "with_holes")}
    feats = read_features(path)
    report["features"] = len(feats)
    geoms, annotation = [], []
    for f in feats:
        g = _geometry(f, report)
        if g is not None:
            geoms.append((f, g))
            annotation.append((f.get("properties") or {}).get("objectType", "annotation") == "annotation")
    check_vertex_count([g for _, g in geoms], path)
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


class Outlines:
    """The edges of (Multi)Polygons, extracted once, rasterised over any box by a scanline.

    Cost O(vertices + rows crossed + pixels) per box, never pixels x vertices: each edge meets the pixel-centre
    rows it spans (half-open in y, so a ring crosses every row an even number of times), the crossings of one
    geometry on one row pair up into spans of pixel centres strictly between them (even-odd rule: holes and
    the parts of a MultiPolygon come out right for valid geometry), and spans are painted by a difference
    array. The convention is shapely's ``within`` (a centre on an outline is outside), exactly: the few centres
    the float parity could get wrong (within rounding of a crossing of a slanted edge, on a horizontal edge,
    at a vertex) are re-decided by GEOS's exact predicates. tests/hostile/test_import_qupath_bounds.py checks
    the fill against ``within`` of every centre on random polygons.
    """

    def __init__(self, geoms):
        geoms = np.asarray(list(geoms), dtype=object)
        self.geoms, self.n = geoms, len(geoms)
        self.bounds = shapely.bounds(geoms).reshape(-1, 4)
        parts, gi = shapely.get_parts(geoms, return_index=True)
        rings, pi = shapely.get_rings(parts, return_index=True)
        xy, ri = shapely.get_coordinates(rings, return_index=True)
        same = ri[1:] == ri[:-1]  # consecutive vertices of one (closed) ring
        self.k = gi[pi[ri[:-1][same]]].astype(np.int64)  # sorted: parts, rings and vertices come in order
        self.x1, self.y1 = xy[:-1][same, 0], xy[:-1][same, 1]
        self.x2, self.y2 = xy[1:][same, 0], xy[1:][same, 1]
        self.first = np.searchsorted(self.k, np.arange(self.n + 1))  # edges of geometry k: first[k]:first[k+1]

    def _edges(self, ylo: float, yhi: float, xlo: float, xhi: float) -> np.ndarray:
        """Indices of the edges of geometries whose bounding box meets [xlo, xhi] x [ylo, yhi] and that reach
        the rows in [ylo, yhi]."""
        b = self.bounds
        geoms = np.flatnonzero((b[:, 0] <= xhi) & (b[:, 2] >= xlo) & (b[:, 1] <= yhi) & (b[:, 3] >= ylo))
        if not len(geoms):
            return np.empty(0, np.int64)
        counts = self.first[geoms + 1] - self.first[geoms]
        idx = np.repeat(self.first[geoms] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        y1, y2 = self.y1[idx], self.y2[idx]
        return idx[(np.maximum(y1, y2) >= ylo) & (np.minimum(y1, y2) <= yhi)]

    def spans(self, x0: float, y0: float, h: int, w: int, scale: float = 1.0):
        """Pixel spans inside each geometry over the box of ``h`` x ``w`` target pixels at (x0, y0):
        arrays (k, row, lo, hi) meaning pixels [lo, hi) of that row, and (k, row, col, delta): corrections,
        +1 or -1 claim of geometry k on that pixel. Pixel centres as in :func:`rasterize`."""
        ycs = (y0 + np.arange(h) + 0.5) * scale
        xcs = (x0 + np.arange(w) + 0.5) * scale
        empty = np.empty(0, np.int64)
        if not h or not w or not self.n:
            return (empty,) * 4, (empty,) * 4
        e = self._edges(ycs[0], ycs[-1], xcs[0], xcs[-1])
        k, x1, y1, x2, y2 = self.k[e], self.x1[e], self.y1[e], self.x2[e], self.y2[e]
        # crossings: rows with min(y1, y2) <= yc < max(y1, y2) (horizontal edges have none)
        r0 = np.searchsorted(ycs, np.minimum(y1, y2), "left")
        r1 = np.searchsorted(ycs, np.maximum(y1, y2), "left")
        cnt = r1 - r0
        ce = np.repeat(np.arange(len(e)), cnt)
        row = r0[ce] + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        yc = ycs[row]
        xc = x1[ce] + ((yc - y1[ce]) * (x2[ce] - x1[ce])) / (y2[ce] - y1[ce])
        ck = k[ce]
        order = np.lexsort((xc, row, ck))
        ck, row, xc = ck[order], row[order], xc[order]
        exact_x = (x1[ce] == x2[ce])[order]  # a vertical edge's crossing is its x, exactly
        sk, srow = ck[0::2], row[0::2]
        lo = np.searchsorted(xcs, xc[0::2], "right")  # first centre strictly right of the opening crossing
        hi = np.searchsorted(xcs, xc[1::2], "left")  # first centre at or right of the closing crossing
        keep = lo < hi
        sk, srow, lo, hi = sk[keep], srow[keep], lo[keep], hi[keep]
        # Centres the parity cannot be trusted with, decided by GEOS (exact predicates) instead: those within
        # rounding of a crossing, on a horizontal edge, or at a vertex. Almost always none; never more than
        # the pixels on the outlines.
        tol = 1e-9 * (np.abs(xc) + np.abs(scale * (x0 + w)) + 1.0)
        n0 = np.searchsorted(xcs, xc - tol, "left")
        nn = np.where(exact_x, 0, np.searchsorted(xcs, xc + tol, "right") - n0)
        ni = np.repeat(np.arange(len(xc)), nn)
        flat = y1 == y2
        hr = np.searchsorted(ycs, y1[flat])
        hit = hr < h
        hit[hit] = ycs[hr[hit]] == y1[flat][hit]
        fk, fr = k[flat][hit], hr[hit]
        c0 = np.searchsorted(xcs, np.minimum(x1, x2)[flat][hit], "left")
        c1 = np.searchsorted(xcs, np.maximum(x1, x2)[flat][hit], "right")
        fn = np.maximum(c1 - c0, 0)
        fi = np.repeat(np.arange(len(fk)), fn)
        vr, vc = np.searchsorted(ycs, y1), np.searchsorted(xcs, x1)  # every vertex starts an edge of its ring
        vat = (vr < h) & (vc < w)
        vat[vat] = (ycs[vr[vat]] == y1[vat]) & (xcs[vc[vat]] == x1[vat])
        bk = np.r_[ck[ni], fk[fi], k[vat]]
        br = np.r_[row[ni], fr[fi], vr[vat]]
        bc = np.r_[n0[ni] + np.arange(nn.sum()) - np.repeat(np.cumsum(nn) - nn, nn),
                   c0[fi] + np.arange(fn.sum()) - np.repeat(np.cumsum(fn) - fn, fn), vc[vat]]
        delta = np.empty(0, np.int64)
        if len(bk):
            key = np.unique((bk * h + br) * (w + 1) + bc)
            bk, rest = np.divmod(key, h * (w + 1))
            br, bc = np.divmod(rest, w + 1)
            j = np.searchsorted((sk * h + srow) * (w + 1) + lo, key, "right") - 1
            now = j >= 0
            now[now] = (sk[j[now]] == bk[now]) & (srow[j[now]] == br[now]) & (hi[j[now]] > bc[now])
            shapely.prepare(self.geoms[np.unique(bk)])  # O(log vertices) per centre after O(vertices) once
            exact = shapely.contains_xy(self.geoms[bk], xcs[bc], ycs[br])
            delta = exact.astype(np.int64) - now
            fix = delta != 0
            bk, br, bc, delta = bk[fix], br[fix], bc[fix], delta[fix]
        return (sk, srow, lo, hi), (bk, br, bc, delta)

    def rasterize(self, x0: float, y0: float, h: int, w: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(labels, overlap) as :func:`rasterize` gives them."""
        (k, row, lo, hi), (bk, br, bc, delta) = self.spans(x0, y0, h, w, scale)
        size = h * (w + 1)
        claims = np.bincount(row * (w + 1) + lo, minlength=size) - np.bincount(row * (w + 1) + hi, minlength=size)
        ids = np.bincount(row * (w + 1) + lo, k + 1, size) - np.bincount(row * (w + 1) + hi, k + 1, size)
        claims = np.cumsum(claims.reshape(h, w + 1), axis=1)[:, :w]
        ids = np.cumsum(np.rint(ids).astype(np.int64).reshape(h, w + 1), axis=1)[:, :w]
        if len(bk):
            np.add.at(claims, (br, bc), delta)
            np.add.at(ids, (br, bc), delta * (bk + 1))
        labels = np.where(claims == 1, ids, 0).astype(np.int64)
        return labels, claims > 1

    def pixel_counts(self, x0: float, y0: float, h: int, w: int, scale: float = 1.0) -> np.ndarray:
        """(n,) how many pixel centres of the box lie inside each geometry (overlaps counted for each), without
        allocating the box: O(vertices + rows)."""
        (k, _, lo, hi), (bk, _, _, delta) = self.spans(x0, y0, h, w, scale)
        return np.rint(np.bincount(k, hi - lo, self.n) + np.bincount(bk, delta, self.n)).astype(np.int64)


def rasterize(geoms: list, x0: float, y0: float, h: int, w: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels (h, w) of ``geoms`` (level-0 px) over the target box at (x0, y0), and a mask of pixels
    claimed by more than one outline. Pixel (r, c) has its centre at target (x0 + c + 0.5, y0 + r + 0.5), i.e.
    level-0 ((x0 + c + 0.5) * scale, ...), and belongs to an outline iff that centre is within it (strictly
    inside, as shapely's ``within``). Label k + 1 is ``geoms[k]``. See :class:`Outlines` for the cost."""
    if not len(geoms) or not h or not w:
        return np.zeros((h, w), np.int64), np.zeros((h, w), bool)
    return Outlines(geoms).rasterize(x0, y0, h, w, scale)


def covered(region, x0: float, y0: float, h: int, w: int, scale: float = 1.0) -> np.ndarray:
    """Boolean (h, w): pixel centres inside ``region`` (one geometry, or its :class:`Outlines`)."""
    outlines = region if isinstance(region, Outlines) else Outlines([region])
    return outlines.rasterize(x0, y0, h, w, scale)[0] > 0


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
        far = objs.report["ignored_outside"]
        raise InputError(f"{geojson_path} holds no nucleus outlines (polygons) to import" + (
            f" ({far} lie beyond {MAX_COORD:g} px: not pixel coordinates)" if far else ""))
    view, mpp, close = _open_image(image, cfg)
    try:
        objs = _on_image(objs, view, image, geojson_path)
        return _write_tiles(view, mpp, image, objs, out, cfg, geojson_path)
    finally:
        close()


def _span(geoms: list) -> str:
    b = shapely.bounds(shapely.GeometryCollection(list(geoms)))
    return f"x {b[0]:.6g}..{b[2]:.6g}, y {b[1]:.6g}..{b[3]:.6g}"


def _on_image(objs: QuPathObjects, view, image: Path, geojson_path: Path) -> QuPathObjects:
    """Only the outlines that lie on the image (level-0 px); the others are counted and warned about, and if
    none is left the coordinates are not pixels of this image (longitude/latitude, µm, another slide): an error,
    never an import of nothing."""
    import warnings

    scale = float(view.scale)
    w0, h0 = view.width * scale, view.height * scale
    frame = shapely.box(0, 0, w0, h0)

    def keep(geoms: list) -> list:
        return list(np.asarray(geoms, dtype=object)[shapely.intersects(geoms, frame)]) if geoms else geoms

    nuclei, regions = keep(objs.nuclei), keep(objs.regions)
    far = objs.report.get("ignored_outside", 0)  # beyond MAX_COORD, dropped when read
    outside = len(objs.nuclei) - len(nuclei) + len(objs.regions) - len(regions) + far
    if not nuclei:
        raise InputError(f"none of the {len(objs.nuclei)} nucleus outlines in {geojson_path} lies on {image} "
                         f"({w0:.0f}x{h0:.0f} px at level 0; the outlines span {_span(objs.nuclei)}): QuPath exports "
                         "level-0 pixel coordinates, and these are not (longitude/latitude, µm, or another image?)")
    if outside:
        warnings.warn(f"{outside} of the {len(objs.nuclei) + len(objs.regions) + far} outlines in {geojson_path} lie "
                      f"outside {image} ({w0:.0f}x{h0:.0f} px at level 0) and are ignored", UserWarning, stacklevel=3)
    report = dict(objs.report, ignored_outside=outside, nuclei=len(nuclei), regions=len(regions))
    return QuPathObjects(nuclei, regions, report)


def _remove_stale(organ: Path, stem: str, planned: set[str]) -> int:
    """Remove the tiles of ``stem`` that an earlier import wrote (nucseg's own PNG/TIFF only) and this one
    does not plan: a rerun with other outlines must not leave old tiles (or their vague areas) to train on."""
    pattern = re.compile(re.escape(stem) + r"_x\d+_y\d+")
    removed = 0
    for sub, suffix, owned in ((IMAGES_DIR, ".png", is_nucseg_png), (LABELS_DIR, ".tif", is_nucseg_tiff),
                               (VAGUE_DIR, ".png", is_nucseg_png)):
        folder = organ / sub
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if f.suffix == suffix and pattern.fullmatch(f.stem) and f.stem not in planned and not f.is_symlink() \
                    and owned(f):
                removed += remove_owned(f, owned)
    return removed


def _write_tiles(view, mpp, image: Path, objs: QuPathObjects, out: Path, cfg: ImportConfig,
                 geojson_path: Path | None = None) -> dict:
    import warnings

    import tifffile

    from ..io import SOFTWARE, atomic_path

    scale = float(view.scale)  # level-0 px per target px
    bounds = shapely.total_bounds(np.asarray(objs.regions or objs.nuclei, dtype=object)) / scale
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
    nuclei = Outlines(objs.nuclei)  # edges once for every tile
    pixels = nuclei.pixel_counts(x0, y0, y1 - y0, x1 - x0, scale)  # before anything is written
    if not pixels.any():
        raise InputError(f"none of the {nuclei.n} nucleus outlines in {geojson_path or 'the GeoJSON'} covers a pixel "
                         f"centre of {image} (they span {_span(objs.nuclei)} at level 0): QuPath exports level-0 "
                         "pixel coordinates, and these are smaller than a pixel (longitude/latitude, mm?)")
    if not pixels.all():
        warnings.warn(f"{int((pixels == 0).sum())} of {nuclei.n} nucleus outlines cover no pixel centre of {image} "
                      "(smaller than a pixel at this µm/px) and give no instance", UserWarning, stacklevel=3)
    stale = _remove_stale(organ, image.stem, {p[-1] for p in plan})  # an earlier import's, not written now
    report = dict(objs.report, image=str(image), mpp=mpp, tile_size=T, tiles=0, overlap_pixels=0,
                  instances_written=0, nuclei_without_pixels=int((pixels == 0).sum()), stale_files_removed=stale)
    # a nucleus cut by a tile edge counts once per tile in instances_written
    from skimage.segmentation import relabel_sequential

    region = Outlines([shapely.unary_union(objs.regions)]) if objs.regions else None  # once, not per tile
    for tx, ty, h, w, stem in plan:
        labels, overlap = nuclei.rasterize(tx, ty, h, w, scale)
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
        vague_png = organ / VAGUE_DIR / f"{stem}.png"
        if vague.any():
            save_png(vague_png, np.where(vague, 255, 0).astype(np.uint8))
        elif not vague_png.is_symlink() and is_nucseg_png(vague_png):
            remove_owned(vague_png, is_nucseg_png)  # an earlier import's: this one has no vague area in this tile
            report["stale_files_removed"] += 1
        report["tiles"] += 1
        report["overlap_pixels"] += int(overlap.sum())
        report["instances_written"] += int(labels.max(initial=0))
    write_json(organ / REPORT, report, REPORT_MARK)
    return report
