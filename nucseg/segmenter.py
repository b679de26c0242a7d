"""The contract between tile inference and everything that consumes it (cv, eval, segment, predict), and the
one place segmenters are built (:func:`sam_segmenter`, :class:`SegmenterSpec`).

Whole-slide code only needs "a batch of RGB tiles in, instance label maps and per-instance scores out", so
it is written against :class:`TileSegmenter` and can be tested with any implementation: the SAM-based one
in :mod:`nucseg.model.infer`, or the classical one in :mod:`nucseg.model.classical` for stitching proofs.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import CheckpointError, InputError

from .choices import SEGMENTER_KINDS  # noqa: F401 - SegmenterSpec.kind: a SAM model, or the threshold baseline


@dataclass
class TileBatchResult:
    """Instance segmentation of a batch of tiles.

    labels: (B, H, W) int32; 0 is background, instances are numbered 1..n_i in each tile.
    scores: one float32 array per tile, shape (n_i,); ``scores[b][k - 1]`` is the confidence of label k.
    """

    labels: np.ndarray
    scores: list[np.ndarray]


class TileSegmenter(Protocol):
    """Anything that turns (B, H, W, 3) uint8 RGB tiles of side ``tile_size`` into a TileBatchResult.

    Everything whole-slide prediction reads from a segmenter is declared here; :class:`SegmenterDefaults`
    gives the optional ones their "not known" values, for simple segmenters to inherit.

    tile_size: side of the (square) tiles it takes.
    mpp: µm/px it was trained at (slides are resampled to it unless ``--mpp`` says otherwise); None: segment
    at the slide's own µm/px.
    fingerprint: identity of its weights and settings, the key of the resume cache; None: predictions are
    never reused (safe, not fast), and a Dask run cannot split the slide.
    device: the torch device it runs on (on CUDA, tiles are read into pinned memory); None for CPU-only code.
    provenance: what the outputs record about the model (JSON-able dict); None: nothing.
    """

    tile_size: int
    mpp: float | None
    fingerprint: str | None
    device: Any
    provenance: dict | None

    def __call__(self, tiles: np.ndarray) -> TileBatchResult: ...


class SegmenterDefaults:
    """The optional parts of :class:`TileSegmenter` with their "not known" values (see there)."""

    mpp: float | None = None
    fingerprint: str | None = None
    device: Any = None
    provenance: dict | None = None


def zero_shot_settings(settings: dict, single_mask: bool = False) -> dict:
    """Inference settings for a base model run zero-shot: SAM's own base needs its 3 ambiguity masks
    (multimask); a base nucseg trained (``single_mask``) answers with output 0. Decided here only."""
    return {**settings, "multimask": not single_mask}


def sam_segmenter(model, settings: dict, thresholds: dict | None = None, device="auto", *,
                  mpp: float | None = None, identity: str = "", mode_thresholds: dict | None = None,
                  modes: list[str] | None = None):
    """A :class:`nucseg.model.infer.SamTileSegmenter` around ``model``: inference settings are the
    ``settings`` given explicitly, over the adapter's calibrated ``thresholds`` (``mode_thresholds``: those
    of every calibrated prompt mode of the ``modes`` it supports; without ``prompts`` in ``settings`` the best
    one is used), over the global defaults (:func:`nucseg.learn.calibrate.resolve_infer`);
    ``thresholds_used`` records which came from where, ``prompt_mode`` the mode and why.
    ``device``: a name for :func:`nucseg.device.pick_device` ("auto", "cpu", "cuda"...) or a torch.device."""
    from .device import pick_device
    from .learn.calibrate import choose_mode, resolve_infer
    from .model.infer import SamTileSegmenter

    cfg, used = resolve_infer(settings, thresholds, mode_thresholds, modes)
    seg = SamTileSegmenter(model, cfg, device=pick_device(device) if isinstance(device, str) else device, mpp=mpp,
                           identity=identity)
    seg.thresholds_used = used
    seg.prompt_mode = choose_mode(settings.get("prompts"), mode_thresholds, modes)
    return seg


@dataclass(frozen=True)
class SegmenterSpec:
    """How to build a segmenter: ``kind`` "sam" (``adapter`` and/or ``model`` + ``checkpoint``) or "threshold".

    infer: the explicitly set :class:`nucseg.model.infer.InferConfig` fields as sorted (name, value) pairs (hashable,
    picklable); thresholds not set here come from the adapter's calibrated ones, else the global defaults.
    tile_size / mpp: the threshold segmenter's tile side and µm/px.
    """

    kind: str = "sam"
    adapter: str | None = None
    checkpoint: str | None = None
    model: str | None = None
    device: str = "auto"
    infer: tuple[tuple[str, Any], ...] = ()
    tile_size: int | None = None
    mpp: float | None = None
    single_mask: bool = False  # a base model run zero-shot: output 0 only (bases nucseg trained) instead of SAM's 3

    @classmethod
    def sam(cls, adapter: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
            model: str | None = None, device: str = "auto", infer=None,
            single_mask: bool = False) -> "SegmenterSpec":
        """A SAM segmenter's spec. ``infer``: an :class:`nucseg.model.infer.InferConfig` (every field set explicitly,
        so an adapter's calibrated thresholds are not used), or a dict of only the fields to set (the others
        from the adapter's thresholds or the defaults), or None (all from the adapter or the defaults)."""
        if infer is None:
            settings = ()
        elif isinstance(infer, dict):
            settings = tuple(sorted(infer.items()))
        else:
            settings = tuple(sorted(infer.to_dict().items()))
        return cls(kind="sam", adapter=None if adapter is None else str(adapter),
                   checkpoint=None if checkpoint is None else str(checkpoint), model=model, device=device,
                   infer=settings, single_mask=single_mask)

    def check(self) -> None:
        """Cheap checks the client can make before sending work out (no weights are loaded)."""
        if self.kind not in SEGMENTER_KINDS:
            raise InputError(f"unknown segmenter {self.kind!r}; choose 'sam' or 'threshold'")
        if self.kind == "threshold":
            return
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise CheckpointError(f"checkpoint not found: {self.checkpoint}")
        if self.adapter:
            from .model.adapter import read_adapter

            info = read_adapter(self.adapter)
            if self.model and self.model != info.model_type:
                raise CheckpointError(f"--model {self.model} but adapter {self.adapter} is for {info.model_type}")
        elif not self.model:
            if self.checkpoint:  # the file at fault first: a pickled or corrupt checkpoint is exit 4 (docs/CLI.md)
                from .model.sam import read_state_dict

                read_state_dict(self.checkpoint)
            raise InputError("give --adapter DIR, or --model (and --checkpoint) to run the base model zero-shot")

    def thresholds_used(self) -> dict | None:
        """{threshold: {"value", "source"}} a SAM segmenter of this spec uses (command line > adapter >
        default), read without loading any weights; None for the threshold segmenter."""
        if self.kind != "sam":
            return None
        from .learn.calibrate import resolve_infer

        thresholds = per_mode = modes = None
        if self.adapter:
            from .model.adapter import read_adapter

            info = read_adapter(self.adapter)
            thresholds, per_mode, modes = info.thresholds, info.mode_thresholds, info.modes
        return resolve_infer(dict(self.infer), thresholds, per_mode, modes)[1]

    def prompt_mode(self) -> tuple[str, str] | None:
        """(prompt mode, why) a SAM segmenter of this spec uses (``--prompts``, else the adapter's best
        calibrated mode, else the default), read without loading any weights; None for the threshold one."""
        if self.kind != "sam":
            return None
        from .learn.calibrate import choose_mode

        explicit = dict(self.infer).get("prompts")
        if not self.adapter:
            return choose_mode(explicit, None)
        from .model.adapter import read_adapter

        info = read_adapter(self.adapter)
        return choose_mode(explicit, info.mode_thresholds, info.modes)

    def build(self) -> TileSegmenter:
        """The segmenter itself; checkpoint and adapter problems raise CheckpointError, bad settings InputError."""
        self.check()
        if self.kind == "threshold":
            from .model.classical import ThresholdSegmenter

            return ThresholdSegmenter(tile_size=self.tile_size or 512, mpp=self.mpp)
        settings = dict(self.infer)
        if self.adapter:
            from .model.adapter import load_adapter

            model, info = load_adapter(self.adapter, self.checkpoint)
            if info.mpp is None:
                warnings.warn(f"adapter {self.adapter} records no µm/px: slides are segmented at their own µm/px "
                              f"unless --mpp says otherwise (train with --mpp to record it)", UserWarning, stacklevel=2)
            identity = f"{info.meta['base']['fingerprint']}+{info.meta['weights_sha256']}"
            return sam_segmenter(model, settings, info.thresholds, self.device, mpp=info.mpp, identity=identity,
                                 mode_thresholds=info.mode_thresholds, modes=info.modes)
        from .model.sam import load_sam

        model, fingerprint = load_sam(self.model, self.checkpoint)
        return sam_segmenter(model, zero_shot_settings(settings, self.single_mask), None, self.device,
                             identity=fingerprint)
