"""Regions of interest for whole-slide prediction: "only the nuclei in the tumour region I drew".

An ROI is either a QuPath GeoJSON export of annotations (Feature, FeatureCollection or a bare list; Polygon or
MultiPolygon; level-0 pixels; optionally only the annotations of one classification), or a binary mask image
covering the whole slide at any scale (non-zero = inside). Two questions are asked of it, both vectorised:
which tiles meet it (only those are read and segmented) and which nucleus centroids lie inside it (only those
are kept).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely

from ..errors import InputError


@dataclass
class Roi:
    """A region in level-0 pixels of a slide of ``width`` x ``height``: a geometry or a mask (one of the two)."""

    source: str
    digest: str  # identity for the resume cache: the file's bytes and the class filter
    geometry: object | None = None
    mask: np.ndarray | None = None
    mask_px: float = 1.0  # level-0 px per mask px

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which level-0 points (x, y) are inside."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if self.geometry is not None:
            return shapely.contains_xy(self.geometry, x, y)
        c = np.floor(x / self.mask_px).astype(np.int64)
        r = np.floor(y / self.mask_px).astype(np.int64)
        h, w = self.mask.shape
        ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        out = np.zeros(x.shape, bool)
        out[ok] = self.mask[r[ok], c[ok]]
        return out

    def meets(self, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
        """Which level-0 boxes [x0, x1) x [y0, y1) intersect the region."""
        if self.geometry is not None:
            boxes = shapely.box(x0, y0, x1, y1)
            hit = np.zeros(len(boxes), bool)
            hit[shapely.STRtree(boxes).query(self.geometry, predicate="intersects")] = True
            return hit
        from .tiling import mask_count_in_boxes

        return mask_count_in_boxes(self.mask, x0, y0, x1, y1, self.mask_px) > 0


def load_roi(path: str | os.PathLike, width: int, height: int, roi_class: str | None = None) -> Roi:
    """Read ``path`` (GeoJSON annotations or a mask image) for a slide of level-0 ``width`` x ``height``.

    InputError (exit 2, one line) for a missing file, a file that is neither, an empty or invalid region, a
    class that no annotation has, or a region that lies outside the slide.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ROI file not found: {path}")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw + b"\0" + (roi_class or "").encode()).hexdigest()[:16]
    suffix = path.suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        if roi_class is not None:
            raise InputError("--roi-class applies to a GeoJSON ROI, not to a mask image")
        return _mask_roi(path, digest, width, height)
    from .qupath import MAX_COORD, check_vertex_count, class_name, read_features

    feats = read_features(path)
    if roi_class is not None:
        feats = [f for f in feats if class_name(f) == roi_class]
        if not feats:
            raise InputError(f"no annotation of class {roi_class!r} in {path}")
    geoms, far = [], 0
    for f in feats:
        g = f.get("geometry")
        if isinstance(g, dict) and g.get("type") in ("Polygon", "MultiPolygon"):
            try:
                geom = shapely.geometry.shape(g)
            except (ValueError, TypeError, AttributeError, IndexError):
                raise InputError(f"{path} has an unreadable polygon") from None
            if not geom.is_empty and not (np.abs(geom.bounds) <= MAX_COORD).all():
                far += 1  # 1e300 and the like: no pixel of any slide
                continue
            geoms.append(geom if geom.is_valid else shapely.make_valid(geom))
    if far:
        import warnings

        warnings.warn(f"{far} outline(s) in {path} lie beyond {MAX_COORD:g} px, outside any slide, and are ignored",
                      UserWarning, stacklevel=2)
    check_vertex_count(geoms, path)
    region = shapely.unary_union(geoms) if geoms else None
    if region is None or region.is_empty or region.area <= 0:
        raise InputError(f"{path} holds no polygon area to use as a region of interest")
    inside = shapely.intersection(region, shapely.box(0, 0, width, height)).area
    if inside <= 0:  # touching an edge or a corner is not being in it
        raise InputError(f"the region of interest in {path} lies outside the slide ({width}x{height} px)")
    if inside < 1.0:  # an ROI smaller than a pixel is a unit mistake, not a region: it would keep no nucleus
        raise InputError(f"the region of interest in {path} covers {inside:.3g} px² of the slide, less than one "
                         "pixel: QuPath exports level-0 pixel coordinates, and these are not (longitude/latitude?)")
    shapely.prepare(region)
    return Roi(str(path), digest, geometry=region)


def _mask_roi(path: Path, digest: str, width: int, height: int) -> Roi:
    from ..io import read_mask

    try:  # at most io.max_image_pixels(), checked from the file's header before it is decoded
        mask = read_mask(path)
    except InputError as err:
        msg = str(err)
        raise InputError(f"ROI {msg}" if msg.startswith(f"mask {path}") else f"ROI mask {path}: {msg}") from None
    if not mask.any():
        raise InputError(f"ROI mask {path} is empty (no non-zero pixel)")
    sx, sy = width / mask.shape[1], height / mask.shape[0]
    if abs(sx - sy) > 0.02 * max(sx, sy):
        raise InputError(f"ROI mask {path} ({mask.shape[1]}x{mask.shape[0]}) does not have the slide's aspect "
                         f"({width}x{height}); it must cover the whole slide")
    return Roi(str(path), digest, mask=mask, mask_px=(sx + sy) / 2)
