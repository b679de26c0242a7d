"""Per-nucleus measurements named as QuPath names them, in one vectorised pass per tile.

``--measurements none|shape|full``:

* ``none``: only the three measurements nucseg always writes (``Area µm^2``, ``Perimeter µm``, ``Score``).
* ``shape`` adds :data:`SHAPE` from ``skimage.measure.regionprops_table`` on the tile's label map (at the
  target µm/px, converted to µm). ``Nucleus: Min diameter µm`` is the minimum caliper width of the convex hull
  of the nucleus's marching-squares outline (level 0.5, the same contour scikit-image's
  ``feret_diameter_max`` takes its convex hull of), computed for all nuclei of a tile at once in numpy.
  ``Nucleus: Circularity`` is 4πA/P² with scikit-image's area and perimeter (its perimeter is an estimate of
  the digital boundary, so a digital disk scores within a few percent of 1, possibly slightly above).
* ``full`` adds :data:`STAIN`: optical densities from ``skimage.color.rgb2hed`` (Ruifrok & Johnston colour
  deconvolution) of the tile's RGB pixels; per-nucleus mean, standard deviation (population, ddof=0) and
  maximum over the nucleus's pixels by ``np.bincount`` / ``scipy.ndimage.maximum``. These are scikit-image's
  stain vectors, not QuPath's per-image estimated ones, so values are comparable between nucseg runs, not
  numerically equal to QuPath's own.

CSV and GeoParquet name the columns in snake case (:data:`COLUMNS`).
"""

from __future__ import annotations

import numpy as np
import shapely

MODES = ("none", "shape", "full")

SHAPE = ("Nucleus: Area µm^2", "Nucleus: Perimeter µm", "Nucleus: Circularity", "Nucleus: Solidity",
         "Nucleus: Max diameter µm", "Nucleus: Min diameter µm", "Nucleus: Eccentricity")
STAIN = ("Nucleus: Hematoxylin OD mean", "Nucleus: Hematoxylin OD std dev", "Nucleus: Hematoxylin OD max",
         "Nucleus: Eosin OD mean")

# QuPath measurement name -> CSV / GeoParquet column name
COLUMNS = {
    "Nucleus: Area µm^2": "nucleus_area_um2",
    "Nucleus: Perimeter µm": "nucleus_perimeter_um",
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


def min_caliper(xy: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Minimum caliper width (smallest distance between two parallel supporting lines) of each ring's convex hull.

    xy: (m, 2) vertices; ring i is ``xy[offsets[i]:offsets[i+1]]``. For a convex polygon the minimum width is
    attained with one line through a hull edge, so it is min over edges of the max vertex distance to that
    edge's line: every (edge, vertex) pair of a hull at once (hulls have few vertices), no loop over rings.
    """
    k = len(offsets) - 1
    if k == 0:
        return np.zeros(0)
    polys = shapely.polygons(shapely.linearrings(xy, indices=np.repeat(np.arange(k), np.diff(offsets))))
    hull = shapely.convex_hull(polys)
    pts, idx = shapely.get_coordinates(shapely.get_exterior_ring(hull), return_index=True)
    n = np.bincount(idx, minlength=k)  # closed rings: n[i] - 1 edges, n[i] - 1 distinct vertices
    start = np.r_[0, np.cumsum(n)[:-1]]
    ok = n >= 4  # a hull of one point or a segment (degenerate hull) has width 0
    e = np.maximum(n - 1, 0) * ok
    # pairs (edge j, vertex v) of hull i: e[i]**2 per hull
    pairs = e * e
    hull_of = np.repeat(np.arange(k), pairs)
    within = np.arange(pairs.sum()) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    ej, vj = np.divmod(within, np.maximum(e[hull_of], 1))
    a = pts[start[hull_of] + ej]
    d = pts[start[hull_of] + ej + 1] - a
    p = pts[start[hull_of] + vj] - a
    dist = np.abs(d[:, 0] * p[:, 1] - d[:, 1] * p[:, 0]) / np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-12)
    # max over vertices per edge, then min over edges per hull
    edge_of = np.repeat(np.arange(e.sum()), np.repeat(e, e))
    per_edge = np.full(e.sum(), -np.inf)
    np.maximum.at(per_edge, edge_of, dist)
    width = np.zeros(k)
    if e.sum():
        hull_edge = np.repeat(np.arange(k), e)
        width[:] = np.inf
        np.minimum.at(width, hull_edge, per_edge)
        width[~ok] = 0.0
    return width


def measure_tile(labels: np.ndarray, local: np.ndarray, mpp: float, mode: str,
                 rgb: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The ``mode`` measurements of instances ``local`` (ascending label ids) of one tile's label map.

    labels: (T, T) int label map at ``mpp`` µm/px; rgb: the tile's (T, T, 3) uint8 pixels (``full`` only).
    Returns name -> float64 array in the order of ``local``.
    """
    if mode == "none" or not len(local):
        return {n: np.zeros(0) for n in names(mode)}
    from skimage.measure import regionprops_table

    from .export import outline_rings

    local = np.asarray(local, dtype=np.int64)
    lut = np.zeros(max(int(labels.max()), int(local.max())) + 1, dtype=np.int32)
    lut[local] = local
    kept = lut[labels]  # only the kept instances (the others lie in a neighbour's share of the overlap)
    t = regionprops_table(kept, properties=("label", "area", "perimeter", "solidity", "feret_diameter_max",
                                            "eccentricity"))
    order = np.searchsorted(t["label"], local)
    area = t["area"][order].astype(np.float64)
    perim = t["perimeter"][order].astype(np.float64)
    out = {
        "Nucleus: Area µm^2": area * mpp**2,
        "Nucleus: Perimeter µm": perim * mpp,
        "Nucleus: Circularity": np.where(perim > 0, 4 * np.pi * area / np.maximum(perim, 1e-12) ** 2, 0.0),
        "Nucleus: Solidity": t["solidity"][order].astype(np.float64),
        "Nucleus: Max diameter µm": t["feret_diameter_max"][order].astype(np.float64) * mpp,
    }
    keep = np.zeros(len(lut), dtype=bool)
    keep[local] = True
    labs, xy, offsets = outline_rings(labels, keep)
    out["Nucleus: Min diameter µm"] = min_caliper(xy, offsets)[np.searchsorted(labs, local)] * mpp
    out["Nucleus: Eccentricity"] = t["eccentricity"][order].astype(np.float64)
    if mode == "full":
        if rgb is None:
            raise ValueError("full measurements need the tile's RGB pixels")
        out.update(stain_od(kept, local, rgb))
    return {n: out[n] for n in names(mode)}


def stain_od(kept: np.ndarray, local: np.ndarray, rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Hematoxylin OD mean / std / max and Eosin OD mean of each instance ``local`` of label map ``kept``."""
    from scipy import ndimage
    from skimage.color import rgb2hed

    inside = kept.ravel() > 0  # only the nuclei's pixels are deconvolved (a fraction of the tile)
    flat = kept.ravel()[inside]
    hed = rgb2hed(np.asarray(rgb)[..., :3].reshape(-1, 3)[inside][None])[0]
    n = int(local.max()) + 1
    count = np.maximum(np.bincount(flat, minlength=n), 1).astype(np.float64)
    h = hed[:, 0]
    mean = np.bincount(flat, weights=h, minlength=n) / count
    # two passes (deviations from the mean), not E[x²] - E[x]², which cancels badly for near-uniform nuclei
    h_var = np.bincount(flat, weights=(h - mean[flat]) ** 2, minlength=n)[local] / count[local]
    h_mean = mean[local]
    e_mean = np.bincount(flat, weights=hed[:, 1], minlength=n)[local] / count[local]
    h_max = np.asarray(ndimage.maximum(h, flat, index=local), dtype=np.float64)
    return {"Nucleus: Hematoxylin OD mean": h_mean, "Nucleus: Hematoxylin OD std dev": np.sqrt(h_var),
            "Nucleus: Hematoxylin OD max": h_max, "Nucleus: Eosin OD mean": e_mean}
