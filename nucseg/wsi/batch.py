"""Many slides: one :func:`nucseg.wsi.predict.predict_slide` per slide into one folder, finished slides skipped.

Every output is written atomically and the summary last, so a slide whose outputs all exist is complete; a
slide that fails with a user-facing error is recorded in its summary and the batch goes on. The Dask path
(:mod:`nucseg.wsi.distributed`) runs the same per-slide step on its workers.

"Finished" means finished from this very slide (its content, not its name) with this model and these
settings: a summary records both (``identity``), and a complete slide whose identity differs (another model,
other thresholds, another slide of that name) is never skipped: the run is refused before any slide starts,
naming ``overwrite`` (``--overwrite``), which redoes them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from ..errors import DiskFullError, InputError, NucsegError, OutputError
from ..io import JsonMark, check_output, write_json
from ..progress import ProgressCallback, in_batch
from ..segmenter import TileSegmenter
from .predict import PredictConfig, Progress, SlideOutputs, SlideSummary, output_identity, predict_slide

log = logging.getLogger(__name__)
SLIDE_SUMMARY = JsonMark("slide-summary")  # <stem>.summary.json: a rerun replaces only a summary carrying it


def check_output_names(slides: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> None:
    """Two slides with the same file stem would write the same outputs: refuse before any work starts."""
    stems = [Path(p).stem for p in slides]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InputError(f"slides share output names in {out_dir}: {', '.join(dup)} (rename or run separately)")


class StaleOutputsError(OutputError):
    """Complete outputs of a slide made from another slide of that name or by another model or settings."""


def check_finished(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, segmenter: TileSegmenter,
                   cfg: PredictConfig, outputs: SlideOutputs = SlideOutputs()) -> dict[int, SlideSummary]:
    """The slides of ``paths`` whose outputs in ``out_dir`` are complete and were made from that slide with this
    model and settings (index -> stored summary, marked skipped); StaleOutputsError (one line naming
    ``--overwrite``) if any complete ones were not, before anything runs: skipping them would keep another
    model's nuclei under this run's settings. A slide that cannot be opened now is left to its run (which
    records the error)."""
    done: dict[int, SlideSummary] = {}
    stale: list[tuple[Path, str]] = []
    for i, p in enumerate(paths):
        outs = outputs.for_slide(p, out_dir)
        summary = finished_summary(outs)
        if summary is None:
            continue
        try:
            expected = output_identity(p, segmenter, cfg)
        except NucsegError:
            continue
        if summary.identity == expected:
            done[i] = summary
        elif not isinstance(summary.identity, dict) or not summary.identity:
            stale.append((outs["summary"], "by a nucseg that recorded no identity"))
        elif summary.identity.get("slide") != expected["slide"]:
            stale.append((outs["summary"], "from another slide of the same name"))
        else:
            stale.append((outs["summary"], "by another model or with other settings than this run's"))
    if stale:
        (first, why), more = stale[0], f" (and {len(stale) - 1} more slides)" if len(stale) > 1 else ""
        raise StaleOutputsError(f"{first}{more}: its outputs were made {why}, so it is not skipped: pass "
                                "--overwrite to redo them (nucseg replaces only its own outputs), or use another "
                                "--out-dir")
    return done


def finished_summary(outputs: dict[str, Path]) -> SlideSummary | None:
    """The stored summary (marked skipped) if every output of a slide exists and it records no error, else None.

    Every output is written atomically and the summary last, so existence means complete; what they were made
    from is :func:`check_finished`'s question.
    """
    if not all(q.exists() for q in outputs.values()):
        return None
    try:
        from ..io import read_json

        done = read_json(outputs["summary"])
        if done.get("error") is not None:
            return None
        summary = SlideSummary.from_dict(done)
    except (ValueError, TypeError, OSError, AttributeError):
        return None  # unreadable summary: redo the slide
    summary.skipped = True
    return summary


def predict_slides(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    segmenter: TileSegmenter,
    config: PredictConfig | None = None,
    progress: Progress | None = None,
    *,
    outputs: SlideOutputs = SlideOutputs(),
    overwrite: bool = False,
    stop_on_error: bool = False,
    on_start: Callable[[str], None] | None = None,
    on_result: Callable[[dict], None] | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[SlideSummary]:
    """Run :func:`predict_slide` on many slides, one ``<stem>.geojson`` (and the other ``outputs``) per slide in
    ``out_dir``.

    A slide whose outputs and ``<stem>.summary.json`` all exist is skipped (every output is written
    atomically and the summary last, so existence means complete) if they were made from this slide with this
    model and settings, else the batch is refused (:func:`check_finished`); ``overwrite`` redoes it. A slide that
    fails with a user-facing error is recorded in its summary and the batch goes on (unless
    ``stop_on_error``); bugs still raise. ``on_start(slide)`` and ``on_result(summary dict)`` are called around
    each slide, as :func:`nucseg.wsi.distributed.predict_distributed` calls them; ``on_progress`` gets each
    slide's :class:`nucseg.progress.SlideProgress` events, placed in the batch (``slide_index``, ``slides``).
    """
    cfg = (config or PredictConfig()).validate()  # settings that would fail every slide fail the batch at once
    out = Path(out_dir)
    check_output_names(paths, out)
    finished = {} if overwrite else check_finished(paths, out, segmenter, cfg, outputs)
    summaries: list[SlideSummary] = []
    bug: BaseException | None = None
    for k, p in enumerate(paths):
        if on_start:
            on_start(str(p))
        try:
            known = finished.get(k)
            if known is None and not overwrite:  # finished meanwhile by a concurrent run of this batch?
                known = check_finished([p], out, segmenter, cfg, outputs).get(0)
            summary = _one_of_many(p, out, segmenter, cfg, progress, known, stop_on_error, outputs.for_slide(p, out),
                                   in_batch(on_progress, k, len(paths)) if on_progress else None)
        except Exception as err:  # noqa: BLE001 - a bug: this slide failed, the others still get done
            if stop_on_error or not _slide_specific(err):
                if on_result:  # the run stops here: its log and summary still count this slide as failed
                    on_result(SlideSummary.failed(p, " ".join(str(err).split()) or type(err).__name__).to_dict())
                raise
            log.error("%s: internal error (a bug in nucseg; traceback at the end of the run): %s: %s", p,
                      type(err).__name__, " ".join(str(err).split()))
            bug = bug or err
            summary = SlideSummary.failed(p, f"internal error: {type(err).__name__}: {' '.join(str(err).split())}")
        summaries.append(summary)
        if on_result:
            on_result(summary.to_dict())
    if bug is not None:
        raise bug  # after every other slide is done and logged, as predict_distributed does with a worker's bug
    return summaries


def _slide_specific(err: BaseException) -> bool:
    """Whether an unexpected (non-NucsegError) exception is confined to its slide, so the batch can go on.

    A bug met on one slide (say a geometry library error on an odd polygon) should not cost the slides after
    it; running out of memory, or errors that fail every slide, should stop the batch at once.
    """
    if isinstance(err, (MemoryError, NucsegError)):
        return False
    if "torch" in sys.modules:
        from ..model.infer import is_out_of_memory

        if is_out_of_memory(err):
            return False
    return True


def _one_of_many(p, out: Path, segmenter: TileSegmenter, cfg: PredictConfig, progress: Progress | None,
                 finished: SlideSummary | None, stop_on_error: bool, outs: dict[str, Path],
                 on_progress: ProgressCallback | None = None) -> SlideSummary:
    if finished is not None:  # complete, from this slide, model and settings (check_finished)
        return finished
    slide_cfg = dataclasses.replace(cfg, csv=outs.get("csv"), labels=outs.get("labels"), preview=outs.get("preview"),
                                    tissue_preview=outs.get("tissue_preview"))
    t0 = time.perf_counter()
    try:
        check_output(outs["summary"], SLIDE_SUMMARY, inputs=[p])  # as the other outputs, before the slide is read
        summary = predict_slide(p, outs["geojson"], segmenter, slide_cfg, progress, on_progress=on_progress)
    except NucsegError as err:
        if stop_on_error or isinstance(err, DiskFullError):  # a full disk would fail every later slide too
            raise
        log.info("%s failed: %s", p, err)  # the caller reports failures (the CLI: one error line per slide)
        return SlideSummary.failed(p, str(err), time.perf_counter() - t0)
    write_json(outs["summary"], summary.to_dict(), SLIDE_SUMMARY)
    return summary
