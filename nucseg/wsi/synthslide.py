"""Synthetic whole-slide images whose every nucleus is known, for proving the whole-slide pipeline.

Real slides come without complete ground truth, so the stitching proofs (every nucleus found exactly once,
also across tile seams and corners) run on generated slides: dark purple ellipses on pink tissue, white
glass outside the tissue, written as a tiled, pyramidal (Big)TIFF that OpenSlide opens as "generic tiled
TIFF" with µm/px in the TIFF resolution tags. Compression is lossless by default so that the ground truth is
pixel-exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import ellipse
from skimage.transform import downscale_local_mean

from .tiling import make_grid

BACKGROUND_RGB = (255, 255, 255)
TISSUE_RGB = (232, 162, 198)
NUCLEUS_RGB = (72, 38, 128)


@dataclass(frozen=True)
class Nucleus:
    """An ellipse in level-0 pixels: centre (cy, cx), semi-axes (ry, rx), rotation in radians."""

    cy: float
    cx: float
    ry: float
    rx: float
    angle: float = 0.0


def seam_positions(extent: int, tile_size: int, overlap: int) -> list[int]:
    """Coordinates along one axis where tiling is delicate: tile starts, tile ends and ownership lines.

    Uses the same grid as :func:`nucseg.wsi.tiling.make_grid` at native resolution (stride = tile - overlap).
    """
    grid = make_grid(extent, 1, tile_size, overlap)
    stride, n = grid.stride, grid.nx
    pos: set[int] = set()
    for k in range(n):
        start = k * stride
        pos.update((start, start + tile_size, start + overlap // 2, start + tile_size - overlap // 2))
    return sorted(p for p in pos if 0 < p < extent)


def make_synthetic_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    mpp: float | None = 0.5,
    nuclei: int | list[Nucleus] | None = None,
    seed: int = 0,
    pyramid: bool = True,
    tissue_fraction: float = 0.7,
    seams: tuple[int, int] | None = None,
    diameter: tuple[float, float] = (8.0, 24.0),
    gap: int = 3,
    empty: bool = False,
    compression: str = "zlib",
    noise: float = 4.0,
) -> np.ndarray:
    """Write a synthetic H&E-like slide to ``path`` and return its ground-truth instance labels (H, W) int32.

    nuclei: how many random nuclei to place in tissue (None: one per ~1200 px² of tissue), or an explicit list
    (placed as given, no tissue or overlap checks). Nuclei never touch each other (``gap`` px apart) and lie
    wholly inside tissue, so each is one connected object.
    seams: (tile_size, overlap) -- first place nuclei centred on tile starts/ends, ownership lines and their
    crossings (corners) of that grid, then the random ones.
    mpp: µm/px written to the resolution tags; None writes no physical size (the "no µm/px" case).
    empty: an all-white slide (no tissue, no nuclei).
    Label ids are 1..n in placement order.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), dtype=np.int32)
    if empty:
        tissue = np.zeros((height, width), dtype=bool)
    else:
        tissue = _tissue_region(height, width, tissue_fraction, rng)
        if isinstance(nuclei, list):
            for i, nuc in enumerate(nuclei, start=1):
                rr, cc = _ellipse_pixels(nuc, labels.shape)
                labels[rr, cc] = i
        else:
            _place_nuclei(labels, tissue, nuclei, seams, diameter, gap, rng)
    rgb = _render(tissue, labels, noise, rng)
    _write_tiff(path, rgb, mpp, pyramid, compression)
    return labels


def _tissue_region(height: int, width: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random blob covering about ``fraction`` of the slide (all of it when fraction >= 1)."""
    if fraction >= 1.0:
        return np.ones((height, width), dtype=bool)
    if fraction <= 0.0:
        return np.zeros((height, width), dtype=bool)
    step = 32
    small = rng.standard_normal((height // step + 2, width // step + 2))
    small = ndi.gaussian_filter(small, sigma=3, mode="reflect")
    # A centred bump keeps tissue away from the slide edge, as on real slides.
    yy, xx = np.mgrid[0 : small.shape[0], 0 : small.shape[1]]
    bump = -(((yy / small.shape[0] - 0.5) ** 2) + ((xx / small.shape[1] - 0.5) ** 2)) * 4 * small.std()
    small = small + bump
    big = ndi.zoom(small, step, order=1)[:height, :width]
    thr = np.quantile(big, 1.0 - fraction)
    return big > thr


def _ellipse_pixels(nuc: Nucleus, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return ellipse(nuc.cy, nuc.cx, nuc.ry, nuc.rx, shape=shape, rotation=nuc.angle)


def _place_nuclei(
    labels: np.ndarray,
    tissue: np.ndarray,
    count: int | None,
    seams: tuple[int, int] | None,
    diameter: tuple[float, float],
    gap: int,
    rng: np.random.Generator,
) -> None:
    """Rejection-sample non-touching ellipses inside tissue: seam sites first, then ``count`` random ones."""
    height, width = labels.shape
    if count is None:
        count = int(tissue.sum() / 1200)
    occupied = np.zeros_like(tissue)
    placed = 0

    def try_place(cy: float, cx: float) -> bool:
        nonlocal placed
        iy, ix = int(cy), int(cx)
        if not (0 <= iy < height and 0 <= ix < width) or occupied[iy, ix] or not tissue[iy, ix]:
            return False  # cheap early rejection before drawing the ellipse
        ry, rx = rng.uniform(diameter[0] / 2, diameter[1] / 2, size=2)
        nuc = Nucleus(float(cy), float(cx), float(ry), float(rx), float(rng.uniform(0, np.pi)))
        rr, cc = _ellipse_pixels(nuc, labels.shape)
        if len(rr) < 16 or len(rr) < 0.9 * np.pi * ry * rx:  # clipped by the slide edge, or degenerate
            return False
        if not tissue[rr, cc].all():
            return False
        r0, r1 = max(int(rr.min()) - gap, 0), min(int(rr.max()) + gap + 1, height)
        c0, c1 = max(int(cc.min()) - gap, 0), min(int(cc.max()) + gap + 1, width)
        if occupied[r0:r1, c0:c1].any():
            return False
        local = np.zeros((r1 - r0, c1 - c0), dtype=bool)
        local[rr - r0, cc - c0] = True
        occupied[r0:r1, c0:c1] |= ndi.binary_dilation(local, iterations=gap)  # neighbours never touch
        placed += 1
        labels[rr, cc] = placed
        return True

    if seams is not None:
        ys = seam_positions(height, *seams)
        xs = seam_positions(width, *seams)
        sites = [(float(y), float(x)) for y in ys for x in xs]  # corners: crossings of the seam lines
        sites += [(float(y), x) for y in ys for x in rng.uniform(0, width, size=max(1, width // 120))]
        sites += [(y, float(x)) for x in xs for y in rng.uniform(0, height, size=max(1, height // 120))]
        for cy, cx in sites:
            for _ in range(4):  # jitter within a pixel so centroids fall on both sides of each line
                if try_place(cy + rng.uniform(-0.5, 0.5), cx + rng.uniform(-0.5, 0.5)):
                    break
    target = placed + count
    attempts = 0
    while placed < target and attempts < 30 * count + 100:
        attempts += 1
        try_place(rng.uniform(0, height), rng.uniform(0, width))


def _render(tissue: np.ndarray, labels: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Colour the label map: white glass, pink tissue, purple nuclei, mild noise; built in row strips."""
    height, width = labels.shape
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    strip = 512
    for y0 in range(0, height, strip):
        y1 = min(y0 + strip, height)
        base = np.empty((y1 - y0, width, 3), dtype=np.float32)
        base[:] = BACKGROUND_RGB
        base[tissue[y0:y1]] = TISSUE_RGB
        base[labels[y0:y1] > 0] = NUCLEUS_RGB
        if noise > 0:
            jitter = rng.normal(0.0, noise, size=base.shape[:2] + (1,)).astype(np.float32)
            inside = (tissue[y0:y1] | (labels[y0:y1] > 0))[..., None]
            base += np.where(inside, jitter, 0.0)
        rgb[y0:y1] = np.clip(np.rint(base), 0, 255).astype(np.uint8)
    return rgb


def _write_tiff(path: str | os.PathLike, rgb: np.ndarray, mpp: float | None, pyramid: bool, compression: str) -> None:
    """Tiled (Big)TIFF, one IFD per level (what OpenSlide's generic-tiff reader expects)."""
    import tifffile

    from ..io import SOFTWARE, atomic_path, is_nucseg_tiff

    path = Path(path)
    kwargs: dict = {"photometric": "rgb", "tile": (256, 256), "compression": compression, "software": SOFTWARE}
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": 92}
    level = rgb
    downsample = 1
    with atomic_path(path, owned=is_nucseg_tiff) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        while True:
            extra: dict = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * downsample)
                extra = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(level, subfiletype=0 if downsample == 1 else 1, metadata=None, **kwargs, **extra)
            if not pyramid or max(level.shape[:2]) <= 512:
                break
            h2, w2 = level.shape[0] // 2, level.shape[1] // 2
            level = downscale_local_mean(level[: 2 * h2, : 2 * w2], (2, 2, 1)).round().astype(np.uint8)
            downsample *= 2


def match_instances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All overlapping instance pairs of two label maps: (ids in a, ids in b, IoU), one array operation.

    With IoU >= 0.5 a pair is necessarily unique on both sides, so thresholding gives a matching.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    both = (a > 0) & (b > 0)
    k = int(b.max()) + 1
    pair, inter = np.unique(a[both] * k + b[both], return_counts=True)
    ia, ib = pair // k, pair % k
    area_a = np.bincount(a.ravel(), minlength=int(a.max()) + 1)
    area_b = np.bincount(b.ravel(), minlength=k)
    return ia, ib, inter / (area_a[ia] + area_b[ib] - inter)
