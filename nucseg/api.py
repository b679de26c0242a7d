"""The short way in: one RGB image to labels, or a segmenter to pass to ``nucseg.predict_slide``.

``nucseg.segment_image(rgb, adapter=..., checkpoint=...)`` builds the segmenter the CLI would build for the
same options (:class:`nucseg.segmenter.SegmenterSpec`) and keeps the last one, so a loop over many images
loads the weights once. The submodules stay the full API (README.md, "Python API").
"""

from __future__ import annotations

import functools
import os

import numpy as np

from .errors import InputError
from .segmenter import SegmenterSpec, TileSegmenter


def load_segmenter(adapter: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None, *,
                   model: str | None = None, device: str = "auto", single_mask: bool = False,
                   **infer) -> TileSegmenter:
    """The segmenter of ``nucseg predict --adapter ... --checkpoint ...``: a fine-tuned adapter on its base
    checkpoint, or (no adapter) the base ``model`` zero-shot. ``infer``: InferConfig fields to set
    (``points_per_side=16``, ``pred_iou_thresh=0.7``, ...); the others come from the adapter's calibrated
    thresholds or the defaults. Raises CheckpointError/InputError as the CLI reports them."""
    return _build(SegmenterSpec.sam(adapter, checkpoint, model, device, dict(infer) or None, single_mask))


@functools.lru_cache(maxsize=1)
def _build(spec: SegmenterSpec) -> TileSegmenter:
    return spec.build()


def segment_image(rgb: np.ndarray, adapter: str | os.PathLike | None = None,
                  checkpoint: str | os.PathLike | None = None, *, segmenter: TileSegmenter | None = None,
                  batch_size: int = 8, **options) -> np.ndarray:
    """Instance labels (H, W; 0 = background, 1..n = nuclei) of one (H, W, 3) uint8 RGB image of any size
    (larger than the model's input: the seam-correct overlapping grid whole slides use).

    The segmenter is ``segmenter`` if given, else ``load_segmenter(adapter, checkpoint, **options)``.
    """
    from .segment import segment_image as segment_with

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 1:
        raise InputError(f"segment_image takes an (H, W, 3) uint8 RGB array, not {rgb.dtype} {rgb.shape}")
    if segmenter is None:
        segmenter = load_segmenter(adapter, checkpoint, **options)
    elif adapter is not None or checkpoint is not None or options:
        raise InputError("give segmenter= or adapter=/checkpoint=/options, not both")
    return segment_with(segmenter, rgb, batch_size)
