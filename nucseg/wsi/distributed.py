"""Scale-out on Dask distributed: one task per slide, the segmenter built on each worker from a small spec.

The client sends each worker a :class:`SegmenterSpec` (paths and settings, a few hundred bytes), never model
weights: the worker builds the segmenter once (cached per process) and reuses it for every slide it is given.
Each worker runs on the GPU its environment shows it (``CUDA_VISIBLE_DEVICES``, which dask-cuda's
``LocalCUDACluster``, dask-jobqueue with ``--gres=gpu:1`` or SLURM set per worker), so one GPU per worker.

A slide's last task is :func:`nucseg.wsi.batch.predict_slides` on that slide, so finished slides are skipped
and failures recorded exactly as in a single-process run, and a slide's outputs are identical whichever
workers make them. Outputs and ``--work-dir`` must be on storage every worker sees. If a worker dies
mid-slide, dask reschedules its task on another worker, which resumes from the zarr cache in the work dir.

Large slides (more than ``tiles_per_task`` tissue tiles) are split: a small planning task counts the tissue
tiles and creates the slide's cache, then one task per range of ``tiles_per_task`` tiles fills the cache
(:func:`nucseg.wsi.predict.predict_tile_range`, on as many workers as are free), and a last task, which dask
starts when every range is done, stitches and writes the outputs. A range that fails with a user-facing
error (an unreadable region, say) leaves its tiles to that last task, which predicts whatever is missing; a
bug in a range fails the slide and is re-raised like any other bug. A split slide's ``summary.json`` is
that of its last task; the result dict (and the run log) add the ranges: ``parts``, and ``predicted_tiles``
and ``seconds`` summed over all of the slide's tasks.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

from ..errors import InputError, NucsegError
from ..segmenter import SegmenterSpec, TileSegmenter
from .batch import StaleOutputsError, check_finished, check_output_names, predict_slides
from .cache import FLAG_CHUNK
from .predict import PredictConfig, SlideOutputs, SlideSummary, predict_tile_range

DEFAULT_TILES_PER_TASK = 2048  # ~20 s of one H100 at the 100 tiles/s target; a 40x slide has ~10-20k tiles


@functools.lru_cache(maxsize=2)
def worker_segmenter(spec: SegmenterSpec) -> TileSegmenter:
    """The segmenter of ``spec``, built once per worker process and reused for every slide it gets."""
    return spec.build()


def _predict_on_worker(slide: str, out_dir: str, spec: SegmenterSpec, config: PredictConfig,
                       outputs: SlideOutputs, overwrite: bool = False) -> dict:
    """One slide on a worker: skip if finished (from this slide, model and settings), else predict; user-facing
    errors come back in the summary, complete outputs of another model or slide as a failure naming --overwrite.

    Returns ``SlideSummary.to_dict()`` plus ``worker`` (the worker's address), which the run log records.
    """
    try:
        segmenter = worker_segmenter(spec)
    except NucsegError as err:  # e.g. a corrupt checkpoint: every slide on this worker fails the same way
        return {**SlideSummary.failed(slide, str(err)).to_dict(), "worker": _worker_name()}
    try:
        [summary] = predict_slides([slide], out_dir, segmenter, config, outputs=outputs, overwrite=overwrite)
    except StaleOutputsError as err:  # never skipped silently; the other slides go on
        return {**SlideSummary.failed(slide, str(err)).to_dict(), "worker": _worker_name()}
    return {**summary.to_dict(), "worker": _worker_name()}


def _plan_on_worker(slide: str, out_dir: str, spec: SegmenterSpec, config: PredictConfig,
                    outputs: SlideOutputs, overwrite: bool = False) -> int:
    """Tissue tiles of ``slide`` (creating its cache), or 0 if its outputs are complete (from this slide, model
    and settings, or not: then the slide's own task refuses it), or it cannot be read (then the slide's own
    task skips it, refuses it or records the error, exactly as without splitting)."""
    try:
        segmenter = worker_segmenter(spec)
        if not overwrite and check_finished([slide], out_dir, segmenter, config, outputs):
            return 0
        n, _ = predict_tile_range(slide, segmenter, config, 0, 0)
    except NucsegError:
        return 0
    return n


def _predict_part_on_worker(slide: str, spec: SegmenterSpec, config: PredictConfig, start: int, stop: int) -> dict:
    """Tiles [start, stop) of ``slide`` into the shared cache. A user-facing error is returned, not raised:
    the slide's last task predicts whatever this range left, and reports the error if it recurs."""
    t0 = time.perf_counter()
    try:
        _, predicted = predict_tile_range(slide, worker_segmenter(spec), config, start, stop, create=False)
    except NucsegError as err:
        return {"start": start, "stop": stop, "predicted": 0, "seconds": time.perf_counter() - t0,
                "error": str(err), "worker": _worker_name()}
    return {"start": start, "stop": stop, "predicted": predicted, "seconds": time.perf_counter() - t0,
            "worker": _worker_name()}


def _finish_on_worker(slide: str, out_dir: str, spec: SegmenterSpec, config: PredictConfig,
                      outputs: SlideOutputs, parts: list[dict], overwrite: bool = False) -> dict:
    """The slide's last task, after its ranges (dask passes their results in ``parts``): stitch and write."""
    d = _predict_on_worker(slide, out_dir, spec, config, outputs, overwrite)
    d["predicted_tiles"] = int(d.get("predicted_tiles") or 0) + sum(p["predicted"] for p in parts)
    d["seconds"] = float(d.get("seconds") or 0.0) + sum(p["seconds"] for p in parts)
    return {**d, "parts": parts}


def _worker_name() -> str:
    """Which worker did the slide (for the run log): its address, which names the host."""
    from dask.distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:  # called outside a worker (tests, a synchronous scheduler)
        return "local"


def check_cluster_settings(config: PredictConfig, tiles_per_task: int = DEFAULT_TILES_PER_TASK) -> None:
    """What a cluster run needs beyond a local one; checked before connecting or writing anything."""
    if config.work_dir is None:
        raise InputError("--scheduler needs --work-dir on storage every worker sees (the resume cache)")
    if tiles_per_task < 0:
        raise InputError(f"--tiles-per-task must be >= 0, not {tiles_per_task}")


def predict_distributed(
    client,
    slides: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    spec: SegmenterSpec,
    config: PredictConfig | None = None,
    *,
    outputs: SlideOutputs = SlideOutputs(),
    tiles_per_task: int = DEFAULT_TILES_PER_TASK,
    overwrite: bool = False,
    on_start: Callable[[str], None] | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> list[SlideSummary]:
    """Predict ``slides`` on the workers of ``client`` (a ``dask.distributed.Client``).

    Same outputs and skipping as :func:`nucseg.wsi.batch.predict_slides` (``overwrite`` too), except that a
    slide whose complete outputs another model or slide made is a failed slide naming ``--overwrite`` (the
    client has no model to check them against before sending work out); results are returned in input order.
    A slide with more than ``tiles_per_task`` tissue tiles is spread over the workers in ranges of that many
    tiles (rounded up to a multiple of ``FLAG_CHUNK``); 0 sends each slide whole to one worker. The result
    dicts of split slides carry ``parts``: each range's tiles, tiles predicted and worker.
    ``on_start(slide)`` is called as each slide is sent to the cluster (in list order) and ``on_result(summary
    dict)`` as each finishes (in the order they finish).
    Bugs on a worker (not user-facing errors) are re-raised here after the other slides have finished.
    """
    from dask.distributed import as_completed

    cfg = config or PredictConfig()
    check_cluster_settings(cfg, tiles_per_task)
    per = -(-tiles_per_task // FLAG_CHUNK) * FLAG_CHUNK
    out = Path(out_dir)
    check_output_names(slides, out)
    stage: dict = {}  # future -> ("plan" | "slide", index into slides)
    pending = as_completed()

    def submit(kind: str, i: int, fn, *args) -> None:
        # A fresh key per submission: a rerun (or another shard's client on the same cluster) must really run
        # the task (the worker decides whether the slide is done), never get a result dask still remembers.
        fut = client.submit(fn, *args, key=f"nucseg-{kind}-{Path(slides[i]).stem}-{uuid.uuid4().hex[:12]}")
        stage[fut] = (kind, i)
        pending.add(fut)

    for i, p in enumerate(slides):
        if on_start:
            on_start(str(p))
        if per:
            submit("plan", i, _plan_on_worker, str(p), str(out), spec, cfg, outputs, overwrite)
        else:
            submit("slide", i, _predict_on_worker, str(p), str(out), spec, cfg, outputs, overwrite)
    results: list[dict | None] = [None] * len(slides)
    bug: BaseException | None = None
    for fut in pending:
        kind, i = stage.pop(fut)
        try:
            value = fut.result()
        except Exception as err:  # a bug on the worker: keep collecting the others, then raise it
            bug = bug or err
            continue
        if kind == "plan":
            p = str(slides[i])
            if value <= per:
                submit("slide", i, _predict_on_worker, p, str(out), spec, cfg, outputs, overwrite)
                continue
            parts = []
            for start in range(0, value, per):  # futures of the ranges; the last task waits for all of them
                key = f"nucseg-part-{Path(p).stem}-{start}-{uuid.uuid4().hex[:12]}"
                parts.append(client.submit(_predict_part_on_worker, p, spec, cfg, start, min(start + per, value),
                                           key=key))
            submit("slide", i, _finish_on_worker, p, str(out), spec, cfg, outputs, parts, overwrite)
            continue
        results[i] = value
        if on_result:
            on_result(value)
    if bug is not None:
        raise bug
    return [SlideSummary.from_dict(d) for d in results]
