"""The tile grid at target resolution, tissue-tile selection, and reading tiles from a slide.

Grid: tiles of ``tile_size`` start every ``stride = tile_size - overlap`` target pixels from (0, 0); the last
row/column reaches past the slide edge and is padded white. The overlap must exceed the largest nucleus so
that every nucleus lies whole in the tile that owns its centroid (see :mod:`nucseg.wsi.stitch`).

The zarr resume cache that tiles and predictions go into: :mod:`nucseg.wsi.cache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..choices import TILE_SIZE_RANGE  # noqa: F401 - defined there for the CLI


@dataclass(frozen=True)
class TileGrid:
    """Regular overlapping tiles covering a ``width`` x ``height`` (target pixels) slide."""

    width: int
    height: int
    tile_size: int
    overlap: int

    def __post_init__(self) -> None:
        if self.tile_size <= 0:
            raise ValueError(f"tile_size must be positive, not {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be in [0, tile_size), not {self.overlap}")

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    @property
    def nx(self) -> int:
        return _n_tiles(self.width, self.tile_size, self.stride)

    @property
    def ny(self) -> int:
        return _n_tiles(self.height, self.tile_size, self.stride)

    @property
    def n(self) -> int:
        return self.nx * self.ny

    def origin(self, index: np.ndarray | int) -> np.ndarray:
        """(x, y) target-pixel origins of full-grid tile indices (row-major: index = iy * nx + ix)."""
        index = np.asarray(index, dtype=np.int64)
        return np.stack([(index % self.nx) * self.stride, (index // self.nx) * self.stride], axis=-1)

    def owned(self, ix: int, iy: int) -> tuple[int, int, int, int]:
        """Half-open owned box (x_lo, x_hi, y_lo, y_hi): the tile minus half the overlap toward each neighbour.

        The boxes of all grid tiles partition the plane's slide area exactly (edges extend to infinity).
        """
        half = self.overlap // 2
        s = self.stride
        x_lo = ix * s + half if ix > 0 else -(2**40)
        x_hi = (ix + 1) * s + half if ix < self.nx - 1 else 2**40
        y_lo = iy * s + half if iy > 0 else -(2**40)
        y_hi = (iy + 1) * s + half if iy < self.ny - 1 else 2**40
        return x_lo, x_hi, y_lo, y_hi

    def interior_sides(self, ix: int, iy: int) -> tuple[bool, bool, bool, bool]:
        """(top, bottom, left, right): True where another tile lies beyond that side (not a slide border)."""
        return iy > 0, iy < self.ny - 1, ix > 0, ix < self.nx - 1

    def tiles_overlapping(self, x0: int, x1: int, y0: int, y1: int) -> np.ndarray:
        """Full-grid indices of tiles intersecting the target box [x0, x1) x [y0, y1), row-major order."""
        ix = _axis_range(x0, x1, self.tile_size, self.stride, self.nx)
        iy = _axis_range(y0, y1, self.tile_size, self.stride, self.ny)
        return (iy[:, None] * self.nx + ix[None, :]).ravel()


def _n_tiles(extent: int, tile: int, stride: int) -> int:
    if extent <= tile:
        return 1
    return int(math.ceil((extent - tile) / stride)) + 1


def _axis_range(a0: int, a1: int, tile: int, stride: int, n: int) -> np.ndarray:
    lo = max(0, -(-(a0 - tile + 1) // stride))  # first k with k*stride + tile > a0
    hi = min(n - 1, (a1 - 1) // stride)  # last k with k*stride < a1
    return np.arange(lo, hi + 1, dtype=np.int64) if hi >= lo else np.zeros(0, np.int64)


def make_grid(width: int, height: int, tile_size: int = 512, overlap: int = 64) -> TileGrid:
    return TileGrid(int(width), int(height), int(tile_size), int(overlap))


def select_tissue_tiles(grid: TileGrid, mask: np.ndarray | None, mask_px: float) -> np.ndarray:
    """Full-grid indices of tiles whose box intersects tissue, row-major.

    mask: boolean tissue mask (or None = keep all); mask_px: target pixels per mask pixel. The mask is
    dilated by one pixel so that nuclei on the tissue border are not lost to the coarse resolution. Counting
    uses an integral image, so it is one array operation for all tiles.
    """
    if mask is None:
        return np.arange(grid.n, dtype=np.int64)
    from scipy import ndimage as ndi

    m = ndi.binary_dilation(mask, iterations=1)
    idx = np.arange(grid.n, dtype=np.int64)
    xy = grid.origin(idx).astype(np.float64)
    count = mask_count_in_boxes(m, xy[:, 0], xy[:, 1], xy[:, 0] + grid.tile_size, xy[:, 1] + grid.tile_size, mask_px)
    return idx[count > 0]


def mask_count_in_boxes(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray,
                        mask_px: float) -> np.ndarray:
    """True pixels of a coarse boolean ``mask`` under each box [x0, x1) x [y0, y1) (in units of which one mask
    pixel covers ``mask_px``; boxes widened to whole mask pixels), for all boxes in one integral-image lookup."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    h, w = mask.shape
    cx0 = np.clip(np.floor(np.asarray(x0) / mask_px), 0, w).astype(np.int64)
    cy0 = np.clip(np.floor(np.asarray(y0) / mask_px), 0, h).astype(np.int64)
    cx1 = np.clip(np.ceil(np.asarray(x1) / mask_px), 0, w).astype(np.int64)
    cy1 = np.clip(np.ceil(np.asarray(y1) / mask_px), 0, h).astype(np.int64)
    return integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]


def read_tiles_parallel(view, coords: np.ndarray, tile_size: int, workers: int) -> np.ndarray:
    """Read tiles (n, T, T, 3) from the slide with dask's threaded scheduler (OpenSlide reads are thread-safe)."""
    import dask

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if not len(coords):
        return np.zeros((0, tile_size, tile_size, 3), np.uint8)
    tasks = [dask.delayed(view.read)(int(x), int(y), tile_size) for x, y in coords]
    out = dask.compute(*tasks, scheduler="threads", num_workers=max(1, workers))
    return np.stack(out)
