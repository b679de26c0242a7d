"""The contract between tile inference and everything that consumes it (cv, eval, segment, predict).

Whole-slide code only needs "a batch of RGB tiles in, instance label maps and per-instance scores out", so
it is written against :class:`TileSegmenter` and can be tested with any implementation: the SAM-based one
in :mod:`nucseg.model.infer`, or the classical one in :mod:`nucseg.model.classical` for stitching proofs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class TileBatchResult:
    """Instance segmentation of a batch of tiles.

    labels: (B, H, W) int32; 0 is background, instances are numbered 1..n_i in each tile.
    scores: one float32 array per tile, shape (n_i,); ``scores[b][k - 1]`` is the confidence of label k.
    """

    labels: np.ndarray
    scores: list[np.ndarray]


class TileSegmenter(Protocol):
    """Anything that turns (B, H, W, 3) uint8 RGB tiles of side ``tile_size`` into a TileBatchResult."""

    tile_size: int

    def __call__(self, tiles: np.ndarray) -> TileBatchResult: ...
