"""Per-nucleus measurements named as QuPath names them, in one vectorised pass per tile; each defined once.

``--measurements none|shape|full``:

* ``none``: only the three measurements nucseg always writes: ``Area µm^2`` (pixel count x (µm/px)², at the
  target µm/px: rasterising the exported polygon gives back those pixels), ``Perimeter µm`` (length of the
  exported polygon) and ``Score``. They are the nucleus's one area and one perimeter: nothing below repeats
  them under another name or another estimator.
* ``shape`` adds :data:`SHAPE`, for all nuclei of a tile at once in numpy (no loop over nuclei; the label
  map is at the target µm/px, converted to µm). ``Nucleus: Circularity`` is 4π·Area/Perimeter² of those two
  (QuPath's formula, on its ROI's area and length); a digital disk scores 0.90-0.91 (its outline's 45° steps
  are longer than the arc). Solidity, max and min
  diameter are QuPath's definitions on the nucleus's outline (the marching-squares contour at level 0.5 that
  the polygons are made from): outline area over its convex hull's area, and the largest and smallest caliper
  widths of that hull. On compact shapes they agree with scikit-image's ``solidity`` (pixel counts) within
  about 0.01 and its ``feret_diameter_max`` within a pixel; thin, branched regions differ more (their outline
  area is well below their pixel count). ``Nucleus: Eccentricity`` is scikit-image's ``regionprops`` value:
  that of the ellipse with the same second central moments.
* ``full`` adds :data:`STAIN`: optical densities from ``skimage.color.rgb2hed`` (Ruifrok & Johnston colour
  deconvolution) of the tile's RGB pixels; per-nucleus mean, standard deviation (population, ddof=0) and
  maximum over the nucleus's pixels (``np.bincount``, ``np.maximum.reduceat``). These are scikit-image's
  stain vectors, not QuPath's per-image estimated ones, so values are comparable between nucseg runs, not
  numerically equal to QuPath's own.

CSV and GeoParquet name the columns in snake case (:data:`COLUMNS`).
"""

from __future__ import annotations

import numpy as np
import shapely

from ..choices import MEASUREMENT_MODES as MODES  # noqa: F401 - defined there for the CLI

SHAPE = ("Nucleus: Circularity", "Nucleus: Solidity", "Nucleus: Max diameter µm", "Nucleus: Min diameter µm",
         "Nucleus: Eccentricity")
STAIN = ("Nucleus: Hematoxylin OD mean", "Nucleus: Hematoxylin OD std dev", "Nucleus: Hematoxylin OD max",
         "Nucleus: Eosin OD mean")

# QuPath measurement name -> CSV / GeoParquet column name
COLUMNS = {
    "Nucleus: Circularity": "nucleus_circularity",
    "Nucleus: Solidity": "nucleus_solidity",
    "Nucleus: Max diameter µm": "nucleus_max_diameter_um",
    "Nucleus: Min diameter µm": "nucleus_min_diameter_um",
    "Nucleus: Eccentricity": "nucleus_eccentricity",
    "Nucleus: Hematoxylin OD mean": "nucleus_hematoxylin_od_mean",
    "Nucleus: Hematoxylin OD std dev": "nucleus_hematoxylin_od_std",
    "Nucleus: Hematoxylin OD max": "nucleus_hematoxylin_od_max",
    "Nucleus: Eosin OD mean": "nucleus_eosin_od_mean",
}


def names(mode: str) -> tuple[str, ...]:
    """The extra measurement names a mode writes, in output order."""
    return {"none": (), "shape": SHAPE, "full": SHAPE + STAIN}[mode]


def convex_hulls(xy: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The convex hull of each ring, all rings at once in numpy: (vertices (h, 2), offsets (k+1,)).

    Ring i is ``xy[offsets[i]:offsets[i+1]]``. Each hull is clockwise in (x right, y up) axes (counter-clockwise
    as an image is drawn), not closed, without collinear vertices; a hull of collinear points is its one or two
    end points. How: a hull vertex is the leftmost or rightmost point at its height, so each ring is first cut to
    those (a few per row of pixels for an outline); the left ends, taken by height, are a chain whose hull side
    is what remains after dropping every point that is not strictly left of its neighbours' chord, again and
    again (all chains at once, a handful of passes for a nucleus); the same for the right ends.
    """
    k = len(offsets) - 1
    nv = np.diff(offsets)
    ring = np.repeat(np.arange(k), nv)
    x, y = xy[:, 0], xy[:, 1]
    y2 = y * 2
    if len(xy) and np.array_equal(y2, np.floor(y2)) and np.abs(y2).max() < 2**40:
        # outline vertices: heights on a half-pixel grid, so a level is a slot in a per-ring table
        y2 = y2.astype(np.int64)
        nz = nv > 0
        lo = np.zeros(k, np.int64)
        hi = np.full(k, -1, np.int64)
        lo[nz] = np.minimum.reduceat(y2, offsets[:-1][nz])
        hi[nz] = np.maximum.reduceat(y2, offsets[:-1][nz])
        nl = hi - lo + 1
        base = np.cumsum(nl) - nl
        slot = base[ring] + y2 - lo[ring]
        left = np.full(int(nl.sum()), np.inf)
        right = np.full(len(left), -np.inf)
        np.minimum.at(left, slot, x)
        np.maximum.at(right, slot, x)
        filled = np.flatnonzero(left <= right)
        lvl_ring = np.repeat(np.arange(k), nl)[filled]
        ly = (filled - base[lvl_ring] + lo[lvl_ring]) * 0.5
        left, right = left[filled], right[filled]
    else:  # any coordinates: sort by ring, height, x
        order = np.lexsort((x, y, ring))
        rs, ys, xs = ring[order], y[order], x[order]
        first = np.r_[True, (rs[1:] != rs[:-1]) | (ys[1:] != ys[:-1])] if len(rs) else np.zeros(0, bool)
        st = np.flatnonzero(first)
        lvl_ring, ly, left = rs[st], ys[st], xs[st]
        right = xs[np.r_[st[1:], len(xs)] - 1] if len(st) else xs[:0]
    # both chains of every ring in one array: left chains (sign +1), then right chains (sign -1)
    m = len(ly)
    cx = np.concatenate([left, right])
    cy = np.concatenate([ly, ly])
    chain = np.concatenate([lvl_ring, lvl_ring + k])
    sign = np.r_[np.ones(m), -np.ones(m)]
    end = np.r_[True, chain[1:] != chain[:-1]] if len(chain) else np.zeros(0, bool)
    end |= np.r_[end[1:], True] if len(chain) else end
    alive = np.arange(2 * m)
    while True:
        inner = np.flatnonzero(~end[alive])
        if not len(inner):
            break
        i, p, q = alive[inner], alive[inner - 1], alive[inner + 1]
        cross = (cx[q] - cx[p]) * (cy[i] - cy[p]) - (cy[q] - cy[p]) * (cx[i] - cx[p])
        drop = sign[i] * cross <= 0
        if not drop.any():
            break
        keep = np.ones(len(alive), bool)
        keep[inner[drop]] = False
        alive = alive[keep]
    # a ring's hull: its left chain top to bottom, then its right chain bottom to top, less the end points the
    # right chain shares with the left one (a top or bottom level with one point)
    is_right = alive >= m
    ca = chain[alive]
    first = np.r_[True, ca[1:] != ca[:-1]] if len(alive) else np.zeros(0, bool)
    last = np.r_[first[1:], True] if len(alive) else first
    twin = alive - m * is_right  # the same level's left end
    shared = is_right & (first | last) & (cx[alive] == cx[twin])
    alive, ca, is_right = alive[~shared], ca[~shared], is_right[~shared]
    cr = ca - k * is_right
    n_left = np.bincount(cr[~is_right], minlength=k)
    n_all = np.bincount(cr, minlength=k)
    start = np.cumsum(n_all) - n_all
    idx = np.arange(len(alive))
    first = np.r_[True, ca[1:] != ca[:-1]] if len(alive) else np.zeros(0, bool)
    rank = idx - np.maximum.accumulate(np.where(first, idx, 0)) if len(alive) else idx
    pos = np.where(is_right, start[cr] + n_all[cr] - 1 - rank, start[cr] + rank)
    out = np.empty(len(alive), np.int64)
    out[pos] = alive
    return np.c_[cx[out], cy[out]], np.r_[0, np.cumsum(n_all)].astype(np.int64)


def _ring_areas(xy: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Unsigned shoelace area of each (unclosed) ring; exact for vertices on a half-pixel grid."""
    k = len(offsets) - 1
    if not len(xy):
        return np.zeros(k)
    nxt = np.arange(1, len(xy) + 1)
    nxt[offsets[1:][np.diff(offsets) > 0] - 1] = offsets[:-1][np.diff(offsets) > 0]
    term = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1]
    return np.abs(np.bincount(np.repeat(np.arange(k), np.diff(offsets)), weights=term, minlength=k)) / 2


def hull_measures(xy: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(min caliper width, max caliper width, solidity) of each ring, from its convex hull, all rings at once.

    xy: (m, 2) vertices; ring i is ``xy[offsets[i]:offsets[i+1]]``. For a convex polygon the minimum width is
    attained with one line through a hull edge, so it is min over edges of the max vertex distance to that
    edge's line; the maximum width is the largest distance between two hull vertices, an antipodal pair. Both
    by rotating calipers, all hulls at once (O(hull vertices), no pairs of all vertices). Solidity is the
    ring's area over its hull's (1 for a hull with no area). On a half-pixel grid (outlines) every step is
    exact but the square root and the division by the edge length.
    """
    k = len(offsets) - 1
    if k == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    hxy, hoff = convex_hulls(xy, offsets)
    hull_area = _ring_areas(hxy, hoff)
    solidity = np.where(hull_area > 0, _ring_areas(xy, offsets) / np.where(hull_area > 0, hull_area, 1.0), 1.0)
    h = np.diff(hoff)
    width, longest = np.zeros(k), np.zeros(k)
    two = h == 2  # a segment: its length; a point: 0
    if two.any():
        d = hxy[hoff[:-1][two] + 1] - hxy[hoff[:-1][two]]
        longest[two] = np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2)
    poly = np.flatnonzero(h >= 3)
    if not len(poly):
        return width, longest, solidity
    # rotating calipers, all hulls at once: the vertex farthest from edge j's line is where the edge directions
    # pass direction(j) + 180°, found by one searchsorted over the hulls' turning angles; it and its two
    # neighbours are evaluated (so an angle's rounding cannot pick the wrong one), and every pair of a
    # vertex and an edge end it is antipodal to gives the diameter candidates
    hh = h[poly]
    start = hoff[:-1][poly]
    m = int(hh.sum())
    which = np.repeat(np.arange(len(poly)), hh)
    first = np.cumsum(hh) - hh
    j = np.arange(m) - first[which]  # vertex / edge index within its hull
    at = start[which] + j
    nxt = start[which] + (j + 1) % hh[which]
    px, py = hxy[at, 0], hxy[at, 1]
    dx, dy = hxy[nxt, 0] - px, hxy[nxt, 1] - py
    ang = np.arctan2(dy, dx)
    sign = np.sign(np.bincount(which, weights=px * hxy[nxt, 1] - hxy[nxt, 0] * py))  # orientation per hull
    turn = np.mod((ang - ang[first[which]]) * sign[which], 2 * np.pi)  # 0 .. 2π, rising along the hull
    key = np.concatenate([which * 16.0 + turn, which * 16.0 + turn + 2 * np.pi])  # each hull's angles twice
    order = np.argsort(key, kind="stable")
    pos = np.searchsorted(key[order], which * 16.0 + turn + np.pi)
    far = order[np.minimum(pos, 2 * m - 1)] % m  # the first edge past the turn: its start is the far vertex
    far -= first[which]  # (in the same hull: hulls are 16 apart in key, their angles span 4π < 16)
    norm = np.hypot(dx, dy)
    best = np.zeros(m)
    span2 = np.zeros(m)
    for shift in (-1, 0, 1):
        v = start[which] + (far + shift) % hh[which]
        rel_x, rel_y = hxy[v, 0] - px, hxy[v, 1] - py
        cross = np.abs(dx * rel_y - dy * rel_x)
        best = np.maximum(best, cross)
        span2 = np.maximum(span2, np.maximum(rel_x * rel_x + rel_y * rel_y,
                                             (hxy[v, 0] - hxy[nxt, 0]) ** 2 + (hxy[v, 1] - hxy[nxt, 1]) ** 2))
    dist = best / np.maximum(norm, 1e-12)
    width[poly] = np.minimum.reduceat(dist, first)
    longest[poly] = np.sqrt(np.maximum.reduceat(span2, first))
    return width, longest, solidity


def min_caliper(xy: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Minimum caliper width (smallest distance between two parallel supporting lines) of each ring's convex hull."""
    return hull_measures(xy, offsets)[0]


def pixel_measures(labels: np.ndarray, n: int, runs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(area, eccentricity) of every label 0..n-1 of ``labels``, equal to scikit-image's regionprops.

    One pass over the runs of one label along the rows (:func:`nucseg.wsi.stitch.row_runs`; ``runs`` when the
    caller has them) instead of regionprops' Python loop per region: the pixel count and the eccentricity of
    ``inertia_tensor_eigvals``, from the second central moments summed in closed form per run.
    ``n·Σx² − (Σx)²`` is an exact integer (in float64 for any region below ~10^7 / tile side pixels), so
    nothing cancels.
    """
    from .stitch import row_runs

    W = labels.shape[1]
    # moments over the runs c, ..., e = c + l - 1 of row r: Σx = l(c + e)/2, Σx² = S(e) - S(c - 1) with
    # S(m) = m(m + 1)(2m + 1)/6, Σy = rl, Σy² = r²l, Σxy = rΣx (integers)
    starts, length, lab = row_runs(labels) if runs is None else runs
    r, c0 = np.divmod(starts, W)
    e = c0 + length - 1
    sx_run = length * (c0 + e) // 2
    sums = [np.bincount(lab, weights=w, minlength=n) for w in (
        length, sx_run, (e * (e + 1) * (2 * e + 1) - (c0 - 1) * c0 * (2 * c0 - 1)) // 6,
        r * length, r * r * length, r * sx_run)]
    area, sx, sxx, sy, syy, sxy = (v.astype(np.float64, copy=False) for v in sums)
    n2 = np.maximum(area, 1) ** 2
    a = (area * sxx - sx * sx) / n2  # inertia tensor [[mu02, -mu11], [-mu11, mu20]] / mu00
    d = (area * syy - sy * sy) / n2
    b = (area * sxy - sx * sy) / n2
    root = np.sqrt(((a - d) / 2) ** 2 + b * b)
    l1 = np.maximum((a + d) / 2 + root, 0)
    l2 = np.maximum((a + d) / 2 - root, 0)
    eccentricity = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.where(l1 > 0, l1, 1), 0, 1)), 0.0)
    return area, eccentricity


def measure_tile(labels: np.ndarray, local: np.ndarray, mpp: float, mode: str,
                 rgb: np.ndarray | None = None,
                 rings: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 perimeter_um: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The ``mode`` measurements of instances ``local`` (ascending label ids) of one tile's label map.

    labels: (T, T) int label map at ``mpp`` µm/px; rgb: the tile's (T, T, 3) uint8 pixels (``full`` only);
    rings: the tile's :func:`nucseg.wsi.export.outline_rings` when the caller has them; perimeter_um: the
    ``Perimeter µm`` written for each of ``local`` (the exported polygon's length; by default that of the
    outline simplified as the exports do by default, :func:`nucseg.wsi.export.tile_polygons`).
    Returns name -> float64 array in the order of ``local``.
    """
    if mode == "none" or not len(local):
        return {n: np.zeros(0) for n in names(mode)}
    from .export import outline_rings, tile_polygons
    from .stitch import row_runs

    local = np.asarray(local, dtype=np.int64)
    n = max(int(labels.max()), int(local.max())) + 1
    keep = np.zeros(n, dtype=bool)
    keep[local] = True
    # the runs of the kept labels only (the others lie in a neighbour's share of the overlap), shared by the
    # moments and the stain pass: a label's runs, and so its sums, are the same as in the whole map
    starts, length, run_lab = row_runs(labels)
    kept = keep[run_lab]
    runs = starts[kept], length[kept], run_lab[kept]
    area, ecc = (v[local] for v in pixel_measures(labels, n, runs))
    rings = outline_rings(labels, keep) if rings is None else rings
    labs, xy, offsets = rings
    at = np.searchsorted(labs, local)
    width, longest, solidity = (v[at] for v in hull_measures(xy, offsets))
    if perimeter_um is None:
        perimeter_um = shapely.length(tile_polygons(labels, keep, rings=rings)[1][at]) * mpp
    perim = np.asarray(perimeter_um, dtype=np.float64)
    out = {
        "Nucleus: Circularity": np.where(perim > 0, 4 * np.pi * area * mpp**2 / np.maximum(perim, 1e-12) ** 2, 0.0),
        "Nucleus: Solidity": solidity,
        "Nucleus: Max diameter µm": longest * mpp,
        "Nucleus: Min diameter µm": width * mpp,
        "Nucleus: Eccentricity": ecc,
    }
    if mode == "full":
        if rgb is None:
            raise ValueError("full measurements need the tile's RGB pixels")
        out.update(stain_od(labels, local, rgb, runs))
    return {n: out[n] for n in names(mode)}


def _rgb2hed(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hed

    return rgb2hed(rgb)


def _he_od_uint8(rgb: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The H and E optical densities of ``skimage.color.rgb2hed`` at flat pixel indices ``at`` of a (T, T, 3)
    uint8 image (equal to within rounding, ~1e-16).

    rgb2hed is a linear map of each channel's optical density (log of the value in [0, 1], floored at 1e-6,
    over log 1e-6), floored at 0. So H = max(T[r, g] + U[b], 0) with tables of the (red, green) pairs (65,536
    entries, read through a view of each pixel's first two bytes as one little-endian uint16) and of blue:
    two gathers from the image and two from each table per pixel, instead of a log per channel and a matrix
    product.
    """
    global _HE_TABLES
    if _HE_TABLES is None:
        from skimage.color.colorconv import hed_from_rgb

        od = np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)
        r, g = np.meshgrid(np.arange(256), np.arange(256), indexing="xy")  # entry g * 256 + r
        _HE_TABLES = tuple(t for j in (0, 1) for t in (
            (od[r] * hed_from_rgb[0, j] + od[g] * hed_from_rgb[1, j]).ravel(), od * hed_from_rgb[2, j]))
    flat = np.ascontiguousarray(rgb[..., :3]).reshape(-1)
    rg = np.ndarray((flat.size // 3,), dtype="<u2", buffer=flat, strides=(3,))
    i, j = np.take(rg, at), np.take(flat[2::3], at)
    out = []
    for pair, blue in (_HE_TABLES[:2], _HE_TABLES[2:]):
        v = np.take(pair, i)
        v += np.take(blue, j)
        out.append(np.maximum(v, 0, out=v))
    return out[0], out[1]


_HE_TABLES: tuple | None = None


def stain_od(labels: np.ndarray, local: np.ndarray, rgb: np.ndarray,
             runs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Hematoxylin OD mean / std / max and Eosin OD mean of each instance ``local`` of label map ``labels``.

    Only the nuclei's pixels are deconvolved (a fraction of the tile), found from the label map's row runs
    (``runs``: :func:`nucseg.wsi.stitch.row_runs` of ``labels`` when the caller has them); the sums are over
    pixels in raster order, as ``np.bincount`` over the whole map would take them.
    """
    from .stitch import row_runs

    starts, length, run_lab = row_runs(labels) if runs is None else runs
    n = max(int(local.max()), int(run_lab.max()) if len(run_lab) else 0) + 1
    first = np.cumsum(length) - length  # each run's first pixel among the nuclei's pixels
    at = np.repeat(starts - first, length) + np.arange(int(length.sum()))
    lab = np.repeat(run_lab, length)
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        h, e = _he_od_uint8(rgb, at)
    else:
        hed = _rgb2hed(np.take(rgb[..., :3].reshape(-1, 3), at, axis=0)[None])[0]
        h, e = np.ascontiguousarray(hed[:, 0]), hed[:, 1]
    count = np.maximum(np.bincount(run_lab, weights=length, minlength=n), 1).astype(np.float64)
    mean = np.bincount(lab, weights=h, minlength=n) / count
    # two passes (deviations from the mean), not E[x²] - E[x]², which cancels badly for near-uniform nuclei
    dev = h - np.repeat(mean[run_lab], length)
    h_var = np.bincount(lab, weights=dev * dev, minlength=n)[local] / count[local]
    h_mean = mean[local]
    e_mean = np.bincount(lab, weights=e, minlength=n)[local] / count[local]
    top = np.full(n, -np.inf)
    if len(first):  # the maximum of each run, then of each label's runs
        np.maximum.at(top, run_lab, np.maximum.reduceat(h, first))
    h_max = top[local]
    return {"Nucleus: Hematoxylin OD mean": h_mean, "Nucleus: Hematoxylin OD std dev": np.sqrt(h_var),
            "Nucleus: Hematoxylin OD max": h_max, "Nucleus: Eosin OD mean": e_mean}
