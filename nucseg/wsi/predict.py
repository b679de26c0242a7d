"""Whole-slide prediction: slide -> tissue tiles -> any TileSegmenter -> seam-correct stitch -> outputs.

Memory stays flat in slide size: tiles go through the model ``batch_size`` at a time, per-tile predictions
live in the zarr cache (which is also what makes reruns resume), and the outputs are streamed one nucleus
(GeoJSON/CSV/preview) or one chunk (OME-Zarr labels) at a time. The only per-slide state in memory is a few
integers per kept nucleus (for the label image) and a low-resolution overview.

Target resolution: ``config.target_mpp`` if given, else the segmenter's training µm/px (``segmenter.mpp``),
else the slide's own µm/px.

Tissue selection only drops tiles with no (1-pixel-dilated, low-resolution) tissue anywhere in them; tile
ownership is defined on the full grid, so a dropped tile can only lose nuclei lying outside detected tissue.
Resume: reruns with the same ``work_dir`` reuse read tiles and finished predictions; segmenters should expose
a ``fingerprint`` that changes with their weights/settings, else predictions are redone (the contract:
:class:`nucseg.segmenter.TileSegmenter`).

Overlap: three things run at once. A reader thread reads the next batch of tiles while the segmenter runs on
the current one (into pinned host memory when the segmenter is on CUDA, so the upload is asynchronous), and
the stitch/export pass runs in its own thread, following the inference tile by tile in cache order as
predictions land in the zarr cache, instead of starting after the last tile. The per-tile part of that pass
(ownership rule, outlines, measurements) runs in ``export_workers`` processes on runs of consecutive tiles;
the export thread assigns global ids and writes, in cache order, so outputs do not depend on the number of
workers. Every stage's time (CPU and wall, workers included) is in ``SlideSummary.stages``.

Many slides into one folder: :mod:`nucseg.wsi.batch`; on a Dask cluster: :mod:`nucseg.wsi.distributed`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
import shlex
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import shapely

from ..errors import InputError, OutputError
from ..io import check_output, is_nucseg_png
from ..progress import ProgressCallback, SlideReporter
from ..segmenter import TileSegmenter
from .cache import (FLAG_CHUNK, CHUNK_TILES, CacheDamaged, TileCache, _decode_failed, cache_dir_name, cache_key,
                    check_labels, check_scores, check_tiles)
from .export import (LABEL_IMAGE_MAX_SIDE, CSVWriter, GeoJSONWriter, GeoParquetWriter, NucleusBatch, PreviewWriter,
                     instance_polygons, is_nucseg_csv, is_nucseg_zarr, is_nucseg_table, outline_rings,
                     write_ome_zarr_labels)
from .measure import MODES as MEASUREMENT_MODES
from .measure import measure_tile
from .measure import names as measurement_names
from .slide import (TargetView, TissueMask, check_mpp, detect_tissue, open_slide, read_overview, slide_identity,
                    slide_mpp, write_tissue_preview)
from .stitch import StitchedLabels, Stitcher, keep_mask
from .tiling import TILE_SIZE_RANGE, TileGrid, make_grid, read_tiles_parallel, select_tissue_tiles

if TYPE_CHECKING:
    from .roi import Roi  # imported when a run has a region of interest, not for every run

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
TISSUE_DETECTOR_VERSION = 1
PREVIEW_MAX_SIDE = 2000
# Tile sides the whole-slide path accepts (SAM needs its input size, a multiple of 16; the threshold
# segmenter takes any size in range). A batch buffer is batch_size x T² x 3 bytes.
# Limits of the planned grid, checked before the slide is read: a slide that needs more is (nearly always) a
# wrong µm/px. 10^6 tiles of 512 px at 0.25 µm/px cover 50 cm²; 2e11 target pixels is a 75 x 25 mm glass
# slide at 0.1 µm/px.
MAX_TILES = 1_000_000
MAX_TARGET_PIXELS = 2e11
# Passes over a slide whose cache turned out damaged (each recomputes only the damaged tiles) before giving up.
MAX_CACHE_REPAIRS = 2


def _repairs_failed(err: CacheDamaged, attempts: int) -> OutputError:
    """The one-line error when a cache keeps returning damaged predictions after ``attempts`` repair passes."""
    return OutputError(f"tile cache {err.root} still returns damaged predictions (tiles {err.tiles[:5]}) after "
                       f"{attempts} repairs; its storage may be failing: delete it (it is only a cache) or use "
                       "another --work-dir")


@dataclass
class PredictConfig:
    """Settings of one whole-slide run (the CLI maps its options onto these fields).

    target_mpp: µm/px to segment at (None: the segmenter's ``mpp``, else the slide's).
    slide_mpp: override for slides whose metadata lacks µm/px (``--slide-mpp``).
    tile_size: must match the segmenter's (None: take the segmenter's).
    overlap: target pixels shared by neighbouring tiles; must exceed the largest nucleus diameter.
    batch_size: tiles per segmenter call (and per parallel read).
    tissue_mask: only segment tiles that intersect detected tissue.
    tissue_mpp: µm/px of the low-resolution overview the tissue is detected on.
    work_dir: where the zarr resume cache lives (None: a temporary folder, removed afterwards).
    cache_tiles: keep the tiles read from the slide in the cache (a rerun with another model reuses them; the
    export re-reads them for "full" measurements). None: when they can be used again, i.e. with a ``work_dir``
    (kept for reruns) or "full" measurements; a temporary cache without them holds no RGB tiles, which saves
    10-15 % of the host path's CPU (docs/PERFORMANCE.md, docs/HPC.md) and the disk (~6 GB for a 40x slide).
    read_workers: threads reading tiles from the slide in parallel.
    csv / labels / preview / tissue_preview: optional extra outputs (None = not written).
    model_fingerprint: identity of the model for the cache (None: ``segmenter.fingerprint`` if present).
    simplify_tolerance: polygon simplification (target pixels) of the exported outlines.
    label_chunk: chunk side of the OME-Zarr label image.
    Ranges and types: :meth:`validate`.
    export_workers: processes for the per-tile export work (None: one per CPU but one, up to 8, on slides of at
    least ``EXPORT_PROCESS_MIN_TILES`` tiles, else 1; 1: no extra process, all in the export thread).
    command: the command line recorded in the run summary (None: this process's ``sys.argv``).
    measurements: per-nucleus measurements beyond area, perimeter and score (nucseg.wsi.measure): "none", "shape"
    (QuPath's ``Nucleus:`` shape features) or "full" (shape plus hematoxylin / eosin optical densities).
    roi / roi_class: segment only inside these regions (QuPath GeoJSON annotations, of that class if given, or a
    mask image; nucseg.wsi.roi).
    export_chunk: consecutive tiles per export job (a worker process's unit of work, and how far the export lags
    the inference); best a multiple of the cache's prediction chunk (``CHUNK_TILES``), which a job reads whole.
    Which extra outputs a batch writes, and their names: :class:`SlideOutputs`.
    """

    target_mpp: float | None = None
    slide_mpp: float | None = None
    tile_size: int | None = None
    overlap: int = 64
    batch_size: int = 8
    tissue_mask: bool = True
    tissue_mpp: float = 8.0
    work_dir: str | os.PathLike | None = None
    cache_tiles: bool | None = None
    read_workers: int = 4
    csv: str | os.PathLike | None = None
    labels: str | os.PathLike | None = None
    preview: str | os.PathLike | None = None
    tissue_preview: str | os.PathLike | None = None
    model_fingerprint: str | None = None
    roi: str | os.PathLike | None = None  # QuPath GeoJSON annotations or a mask image (nucseg.wsi.roi)
    roi_class: str | None = None
    simplify_tolerance: float = 0.25
    label_chunk: int = 1024
    export_workers: int | None = None
    export_chunk: int = CHUNK_TILES  # a job reads whole prediction chunks
    command: str | None = None
    measurements: str = "full"

    def keeps_tiles(self) -> bool:
        """Whether the slide's RGB tiles go into the cache (``cache_tiles``, or None: when they can be reused)."""
        if self.cache_tiles is not None:
            return bool(self.cache_tiles)
        return self.work_dir is not None or self.measurements == "full"

    def validate(self) -> "PredictConfig":
        """Every field checked for type and range (one-line InputError naming the field and its CLI option).

        Called before any slide is opened, so a wrong type or an absurd value (``tile_size=100000``, which
        would need a 240 GB batch buffer) is named for what it is instead of failing later as something else.
        The overlap's upper bound depends on the tile size (checked with the segmenter's, in predict_slide).
        Returns self.
        """
        def name(field: str) -> str:
            return f"{field} ({_OPTIONS[field]})" if field in _OPTIONS else field

        if not isinstance(self.tissue_mask, bool):
            raise InputError(f"{name('tissue_mask')} must be True or False, not {self.tissue_mask!r}")
        if self.cache_tiles is not None and not isinstance(self.cache_tiles, bool):
            raise InputError(f"{name('cache_tiles')} must be True, False or None, not {self.cache_tiles!r}")
        for f, lo, hi in (("tile_size", *TILE_SIZE_RANGE), ("overlap", 0, TILE_SIZE_RANGE[1]),
                          ("batch_size", 1, 4096), ("read_workers", 1, 256), ("label_chunk", 64, 16384)):
            value = getattr(self, f)
            if value is None and f == "tile_size":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
                raise InputError(f"{name(f)} must be an integer in [{lo}, {hi}], not {value!r}")
        for f in ("target_mpp", "slide_mpp"):
            if getattr(self, f) is not None:
                check_mpp(getattr(self, f), name(f))
        for f, lo, hi in (("tissue_mpp", 1.0, 100.0), ("simplify_tolerance", 0.0, 100.0)):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not lo <= value <= hi:
                raise InputError(f"{name(f)} must be a number in [{lo:g}, {hi:g}], not {value!r}")
        if self.measurements not in MEASUREMENT_MODES:
            raise InputError(f"measurements (--measurements) must be one of {', '.join(MEASUREMENT_MODES)}, "
                             f"not {self.measurements!r}")
        if self.roi_class is not None and not isinstance(self.roi_class, str):
            raise InputError(f"roi_class (--roi-class) must be a string or None, not {self.roi_class!r}")
        for f in ("work_dir", "csv", "labels", "preview", "tissue_preview", "roi"):
            value = getattr(self, f)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise InputError(f"{name(f)} must be a path or None, not {value!r}")
        if self.model_fingerprint is not None and not isinstance(self.model_fingerprint, str):
            raise InputError(f"model_fingerprint must be a string or None, not {self.model_fingerprint!r}")
        return self


# The command-line option of each PredictConfig field, for messages.
_OPTIONS = {"target_mpp": "--mpp", "slide_mpp": "--slide-mpp", "tile_size": "--tile-size", "overlap": "--overlap",
            "batch_size": "--batch-size", "work_dir": "--work-dir", "labels": "--labels"}

# File name suffixes of a slide's outputs: every output of a slide is named <base><suffix>, where <base> is
# <out_dir>/<slide stem> in a batch, or the nuclei output's path without its suffix for one slide (-o x.geojson).
NUCLEI_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".parquet")
OUTPUT_SUFFIXES = {"summary": ".summary.json", "csv": ".csv", "labels": ".labels.zarr", "preview": ".preview.png",
                   "tissue_preview": ".tissue.png"}


def output_base(out: str | os.PathLike) -> str:
    """``x.geojson``, ``x.geojson.gz``, ``x.json``, ``x.parquet`` -> ``x``: what the other outputs of a one-slide
    run are named after."""
    return str(out).removesuffix(".gz").removesuffix(".geojson").removesuffix(".json").removesuffix(".parquet")


@dataclass(frozen=True)
class SlideOutputs:
    """Which outputs each slide gets besides its nuclei table, and what they are called: the one description
    of a slide's outputs that the CLI, the batch layer and the Dask workers share (small and picklable).

    gz: gzipped GeoJSON nuclei (``.geojson.gz``); parquet: GeoParquet nuclei (``.parquet``) instead.
    csv / labels / preview / tissue_preview: the optional extra outputs (names in ``OUTPUT_SUFFIXES``).
    """

    gz: bool = False
    parquet: bool = False
    csv: bool = False
    labels: bool = False
    preview: bool = False
    tissue_preview: bool = False

    def extras(self, base: str | os.PathLike) -> dict[str, Path]:
        """The optional outputs asked for, ``{kind: <base><suffix>}``."""
        return {k: Path(f"{base}{OUTPUT_SUFFIXES[k]}") for k in ("csv", "labels", "preview", "tissue_preview")
                if getattr(self, k)}

    def for_slide(self, slide: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
        """A batch slide's outputs, ``<out_dir>/<slide stem>.*``: ``"geojson"`` (the nuclei: ``.geojson``,
        ``.geojson.gz`` or GeoParquet ``.parquet``), ``"summary"`` (written last) and the extras asked for."""
        base = Path(out_dir) / Path(slide).stem
        main = ".parquet" if self.parquet else ".geojson.gz" if self.gz else ".geojson"
        return {"geojson": Path(f"{base}{main}"), "summary": Path(f"{base}{OUTPUT_SUFFIXES['summary']}"),
                **self.extras(base)}


@dataclass
class SlideSummary:
    """What one slide run produced; ``to_dict`` is what the CLI prints and predict_slides stores.

    tiles: tiles in the full grid; tissue_tiles: those segmented (all of them when tissue_mask is off, and
    then tissue_area_mm2 is the whole slide's area). read_tiles / predicted_tiles: work done in *this* run
    (0 when everything came from the resume cache). skipped: predict_slides found complete outputs.
    identity: what the outputs were made from, ``{"slide": content identity, "settings": fingerprint of the
    model and the settings}`` (:func:`output_identity`); a batch skips a finished slide only if it matches.
    provenance: what produced the outputs (:func:`provenance`, plus the command line). stages: seconds per
    stage of this run, ``{"read": {"cpu": .., "wall": ..}, ...}`` (plan: opening, tissue detection; read,
    cache, infer, stitch, polygons, write; CPU is the thread's own, so zarr's codec threads are not in
    "cache"; wall times of concurrent stages overlap; worker_cpu: the export processes' CPU).
    """

    slide: str
    nuclei: int
    tiles: int
    tissue_tiles: int
    tissue_area_mm2: float
    seconds: float
    output: str = ""
    slide_mpp: float = float("nan")
    target_mpp: float = float("nan")
    read_tiles: int = 0
    predicted_tiles: int = 0
    skipped: bool = False
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SlideSummary":
        """From ``to_dict()`` output, ignoring extra keys (a worker's name, a split slide's ranges)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def failed(cls, slide: str | os.PathLike, error: str, seconds: float = 0.0) -> "SlideSummary":
        """A slide that produced nothing because of a user-facing error."""
        return cls(slide=str(slide), nuclei=0, tiles=0, tissue_tiles=0, tissue_area_mm2=float("nan"),
                   seconds=seconds, error=error)


def model_fingerprint(segmenter: TileSegmenter, override: str | None = None) -> str:
    """The cache identity of a segmenter; without one, predictions are never reused (safe, not fast)."""
    if override:
        return str(override)
    fp = segmenter.fingerprint
    if fp:
        return str(fp)
    return f"volatile:{type(segmenter).__qualname__}:{uuid.uuid4()}"


def settings_fingerprint(segmenter: TileSegmenter, cfg: PredictConfig) -> str:
    """SHA-256 of everything a slide's outputs depend on besides the slide: the model (its fingerprint, or for
    one without a fingerprint its class, and its provenance: thresholds, µm/px) and every setting that changes
    what is written (not where: output paths, work dir, batch size, workers). With ``"slide":``
    :func:`nucseg.wsi.slide.slide_identity` it is what a batch's done-check compares."""
    import hashlib
    import json

    model = cfg.model_fingerprint or segmenter.fingerprint or f"unknown:{type(segmenter).__qualname__}"
    roi = None
    if cfg.roi is not None:
        try:
            roi = hashlib.sha256(Path(cfg.roi).read_bytes()).hexdigest()
        except OSError:
            roi = str(cfg.roi)  # unreadable: the run itself reports it
    fields = {
        "model": str(model), "provenance": segmenter.provenance, "model_mpp": segmenter.mpp,
        "tile_size": int(cfg.tile_size or segmenter.tile_size), "target_mpp": cfg.target_mpp,
        "slide_mpp": cfg.slide_mpp, "overlap": cfg.overlap, "tissue_mask": cfg.tissue_mask,
        "tissue_mpp": cfg.tissue_mpp, "tissue_version": TISSUE_DETECTOR_VERSION, "roi": roi,
        "roi_class": cfg.roi_class, "simplify_tolerance": cfg.simplify_tolerance, "label_chunk": cfg.label_chunk,
        "measurements": cfg.measurements,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def output_identity(slide_path: str | os.PathLike, segmenter: TileSegmenter, cfg: PredictConfig) -> dict:
    """``{"slide": content identity, "settings": settings_fingerprint}``: what :attr:`SlideSummary.identity` of
    a run of this slide with this segmenter and settings would be, without running it (opens the slide)."""
    slide = open_slide(slide_path)
    try:
        return {"slide": slide_identity(slide, slide_path), "settings": settings_fingerprint(segmenter, cfg)}
    finally:
        slide.close()


def predict_slide(
    slide_path: str | os.PathLike,
    out_geojson: str | os.PathLike,
    segmenter: TileSegmenter,
    config: PredictConfig | None = None,
    progress: Progress | None = None,
    *,
    on_progress: ProgressCallback | None = None,
) -> SlideSummary:
    """Segment every nucleus of one slide and write ``out_geojson``: GeoJSON (``.geojson``, ``.geojson.gz``)
    or, for a name ending ``.parquet``, GeoParquet.

    ``progress(tiles done, total)`` is called as tiles are predicted; ``on_progress`` gets the fuller
    :class:`nucseg.progress.SlideProgress` events (tiles, rate, nuclei written so far) as tiles are predicted
    and nuclei written.

    Raises InputError (bad path/arguments), SlideError (unreadable slide, missing µm/px), OutputError
    (unwritable output); a no-tissue slide writes an empty FeatureCollection and warns.
    """
    t0 = time.perf_counter()
    cfg = config or PredictConfig()
    slide_path = Path(slide_path)
    out_geojson = Path(out_geojson)
    tile_size = _check_settings(segmenter, cfg)
    check_outputs(slide_path, out_geojson, cfg)
    times = StageTimes(STAGES)

    with times("plan"):
        slide = open_slide(slide_path)
    try:
        with times("plan"):  # µm/px, tissue detection, grid
            plan = _plan(slide, slide_path, segmenter, cfg, tile_size, warn_empty=True)
        view, grid, selected = plan.view, plan.grid, plan.selected
        prov = provenance(segmenter, cfg, plan)
        log.info("%s: plan: %d x %d px at %.3f µm/px, %d tiles of %d px, %d with tissue (%.2f mm²)", slide_path.name,
                 view.width, view.height, view.target_mpp, grid.n, tile_size, len(selected), plan.tissue_area)
        reporter = SlideReporter(str(slide_path), on_progress) if on_progress is not None else None
        if reporter is not None:
            progress = _both(progress, reporter.tiles)
        read_n = pred_n = 0
        with _work_dir(cfg.work_dir) as work:
            cache = plan.open_cache(work)
            _log_cache(slide_path, cache, cfg)
            for attempt in range(MAX_CACHE_REPAIRS + 1):
                try:
                    nuclei, reads, preds = _infer_and_export(cache, plan, segmenter, out_geojson, cfg, progress,
                                                             times, prov, reporter.nuclei if reporter else None)
                    read_n, pred_n = read_n + reads, pred_n + preds
                    break
                except CacheDamaged as err:
                    # The damaged tiles are marked not done; the outputs of this pass were discarded (atomic),
                    # so another pass predicts only those tiles and writes the outputs whole.
                    read_n, pred_n = read_n + err.work[0], pred_n + err.work[1]
                    if attempt == MAX_CACHE_REPAIRS:
                        raise _repairs_failed(err, attempt) from None
                    cache.scan_predictions()  # whatever else is damaged is redone in the same repair pass
        if cfg.tissue_preview and plan.tissue is not None:  # with the other outputs: a failed run leaves none
            boxes = _tile_boxes(grid, selected, view.target_mpp / plan.tissue.mpp)
            write_tissue_preview(cfg.tissue_preview, plan.tissue, boxes)
    finally:
        slide.close()
    notes = plan.notes + _few_nuclei_notes(slide_path, nuclei, len(selected), float(plan.tissue_area), view)
    return SlideSummary(
        slide=str(slide_path), nuclei=nuclei, tiles=grid.n, tissue_tiles=int(len(selected)),
        tissue_area_mm2=float(plan.tissue_area), seconds=time.perf_counter() - t0, output=str(out_geojson),
        slide_mpp=view.mpp0, target_mpp=view.target_mpp, read_tiles=read_n, predicted_tiles=pred_n,
        warnings=notes, provenance={**prov, "command": cfg.command or shlex.join(sys.argv)},
        stages=times.to_dict(), identity={"slide": plan.identity, "settings": settings_fingerprint(segmenter, cfg)},
    )


def _infer_and_export(cache: TileCache, plan: "_Plan", segmenter: TileSegmenter, out_geojson: Path,
                      cfg: PredictConfig, progress: Progress | None, times: "StageTimes",
                      prov: dict, on_nuclei: Callable[[int], None] | None = None) -> tuple[int, int, int]:
    """Inference over the tiles not done, with the export pass following it: (nuclei, tiles read, predicted)."""
    handoff = 4 * max(cfg.batch_size, cfg.export_chunk) if export_workers(cfg, cache.n) == 1 else 0
    ready = _Ready(cache.pred_done, keep=handoff)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nucseg-export") as pool:
        export = pool.submit(_stitch_and_export, cache, plan, out_geojson, cfg, ready.wait, times, prov, ready.take,
                             on_nuclei)
        counts = [0, 0]  # tiles read, predicted (kept when the pass ends in CacheDamaged)
        try:
            _run_segmenter(cache, plan.view, segmenter, cfg, progress, ready, export.done, times=times,
                           counts=counts)
            return export.result(), counts[0], counts[1]
        except BaseException as err:
            ready.abort()  # the export thread stops waiting and discards its partial outputs
            if isinstance(err, CacheDamaged):
                err.work = (counts[0], counts[1])
            raise


def _both(first: Progress | None, second: Progress) -> Progress:
    """One ``Progress`` callback calling both (``first`` may be None)."""
    if first is None:
        return second

    def call(done: int, total: int) -> None:
        first(done, total)
        second(done, total)

    return call


def _log_cache(slide_path: Path, cache: TileCache, cfg: PredictConfig) -> None:
    """INFO milestones before the inference: what the cache already holds, and the lanes that will run."""
    n = max(cache.n, 1)
    predicted, read = int(cache.pred_done.sum()), int(cache.tiles_done.sum())
    log.info("%s: cache %s: %d/%d tiles predicted already (%.0f%%), %d/%d read", slide_path.name, cache.root,
             predicted, cache.n, 100 * predicted / n, read, cache.n)
    workers = export_workers(cfg, cache.n)
    log.info("%s: lanes: %d reader threads, model (batch %d), cache writer, export (%s)", slide_path.name,
             cfg.read_workers, cfg.batch_size, f"{workers} processes" if workers > 1 else "its thread")


# H&E tissue holds thousands of nuclei per mm² (≈ 3,000 in the real tiles of tests/; stroma fewer). Far fewer
# over a real area of tissue means the run did not see nuclei: wrong scale, wrong adapter, or another stain.
MIN_NUCLEI_PER_MM2 = 50.0
MIN_AREA_FOR_DENSITY_MM2 = 0.25


def _few_nuclei_notes(slide_path: Path, nuclei: int, tissue_tiles: int, area_mm2: float, view: TargetView) -> list[str]:
    """A warning (also returned for the summary) when tissue tiles gave no or implausibly few nuclei."""
    if tissue_tiles == 0:
        return []
    density = nuclei / area_mm2 if area_mm2 > 0 else float("inf")
    if nuclei and (area_mm2 < MIN_AREA_FOR_DENSITY_MM2 or density >= MIN_NUCLEI_PER_MM2):
        return []
    found = "no nuclei" if not nuclei else f"only {nuclei} nuclei ({density:.0f} per mm² of tissue)"
    msg = (f"{slide_path}: {found} in {tissue_tiles} tissue tiles ({area_mm2:.2f} mm²); check the µm/px (slide "
           f"{view.mpp0:.3f}, target {view.target_mpp:.3f}), that the adapter suits this scanner and stain, and "
           f"the inference thresholds")
    warnings.warn(msg, UserWarning, stacklevel=3)
    return [msg]


def provenance(segmenter: TileSegmenter, cfg: PredictConfig, plan: "_Plan") -> dict:
    """What produced a slide's outputs, written into them (GeoJSON member / GeoParquet metadata ``nucseg``).

    Deterministic on purpose (no time, host or command line: those go to the run summary only), so that
    reruns, resumed runs and cluster runs keep producing byte-identical files. ``segmenter`` is the
    segmenter's own ``provenance`` (for SAM: weights identity = base checkpoint fingerprint + adapter
    SHA-256, prompt settings and thresholds) where it has one.
    """
    from .. import __version__

    seg = segmenter.provenance
    return {
        "nucseg_version": __version__,
        "segmenter": seg,  # None where the segmenter does not describe itself
        "slide_mpp": plan.view.mpp0,
        "target_mpp": plan.view.target_mpp,
        "tile_size": int(plan.grid.tile_size),
        "overlap": int(plan.grid.overlap),
        "tissue_mask": bool(cfg.tissue_mask),
        "simplify_tolerance": cfg.simplify_tolerance,
        "measurements": cfg.measurements,
        "coordinates": "level-0 pixels, pixel (r, c) covers [c, c+1) x [r, r+1)",
    }


STAGES = ("plan", "read", "cache", "infer", "stitch", "polygons", "measure", "write")


class StageTimes:
    """CPU (this thread's) and wall seconds per named stage, summed over threads and worker processes.

    ``stages``: names reported even when they took no time (so every summary has the same keys).
    """

    def __init__(self, stages: tuple[str, ...] = ()):
        self._lock = threading.Lock()
        self.cpu: dict[str, float] = dict.fromkeys(stages, 0.0)
        self.wall: dict[str, float] = dict.fromkeys(stages, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.thread_time() - c0, time.perf_counter() - w0)

    def add(self, stage: str, cpu: float, wall: float) -> None:
        with self._lock:
            self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu
            self.wall[stage] = self.wall.get(stage, 0.0) + wall

    def merge(self, other: dict) -> None:
        for stage, v in other.items():
            self.add(stage, v["cpu"], v["wall"])

    def to_dict(self) -> dict:
        with self._lock:
            return {k: {"cpu": round(self.cpu[k], 4), "wall": round(self.wall[k], 4)} for k in self.cpu}


def _check_settings(segmenter: TileSegmenter, cfg: PredictConfig) -> int:
    """The tile size, after checking the settings that do not need the slide."""
    cfg.validate()
    tile_size = int(cfg.tile_size or segmenter.tile_size)
    if tile_size != int(segmenter.tile_size):
        raise InputError(f"tile size {tile_size} does not match the model's ({segmenter.tile_size})")
    if cfg.batch_size < 1:
        raise InputError(f"batch size must be >= 1, not {cfg.batch_size}")
    if not 0 <= cfg.overlap < tile_size // 2:
        raise InputError(f"overlap must be in [0, {tile_size // 2}) for tile size {tile_size}, not {cfg.overlap}")
    return tile_size


@dataclass
class _Plan:
    """What a slide run works on: the target-resolution view, the grid, the tissue tiles and the cache key."""

    view: TargetView
    grid: TileGrid
    selected: np.ndarray
    tissue: TissueMask | None  # None when neither the tissue mask nor its preview is asked for
    tissue_area: float
    identity: str
    key: dict
    digest: str
    model: str
    notes: list[str]
    roi: Roi | None = None  # nuclei are kept only if their centroid lies inside

    def open_cache(self, work: Path, create: bool = True) -> TileCache:
        T = self.grid.tile_size
        return TileCache(work / cache_dir_name(self.view.path, self.digest), self.key, self.grid.origin(self.selected),
                         T, self.model, max_instances=T * T // 16, create=create)


def _plan(slide, slide_path: Path, segmenter: TileSegmenter, cfg: PredictConfig, tile_size: int,
          warn_empty: bool = False) -> _Plan:
    mpp0 = slide_mpp(slide, cfg.slide_mpp, slide_path)
    if cfg.target_mpp:
        target = check_mpp(cfg.target_mpp, "target_mpp (--mpp)")
    elif segmenter.mpp:
        target = check_mpp(segmenter.mpp, "the model's training µm/px (its adapter's mpp)")
    else:
        target = mpp0
    view = TargetView.create(slide, slide_path, mpp0, float(target))
    grid = make_grid(view.width, view.height, tile_size, cfg.overlap)
    check_grid(grid, view)  # before the tissue detection reads the slide and anything is allocated
    roi = None
    if cfg.roi is not None:  # before the tissue mask: a bad ROI fails before any pixel is read
        from .roi import load_roi

        roi = load_roi(cfg.roi, *slide.level_dimensions[0], roi_class=cfg.roi_class)
    notes: list[str] = []
    tissue = None
    if cfg.tissue_mask or cfg.tissue_preview:
        tissue = detect_tissue(slide, slide_path, mpp0, cfg.tissue_mpp)
    if cfg.tissue_mask and tissue is not None:
        selected = select_tissue_tiles(grid, tissue.mask, tissue.mpp / view.target_mpp)
        tissue_area = tissue.area_mm2
    else:
        selected = select_tissue_tiles(grid, None, 1.0)
        tissue_area = view.width * view.height * (view.target_mpp / 1000.0) ** 2
    if len(selected) == 0 and warn_empty:
        msg = f"no tissue found in {slide_path}; writing an empty FeatureCollection"
        warnings.warn(msg, UserWarning, stacklevel=3)  # once: the CLI shows warnings, so no log line as well
        notes.append(msg)
    if roi is not None:
        if tissue is not None and cfg.tissue_mask:  # the tissue inside the region
            rr, cc = np.nonzero(tissue.mask)
            f = tissue.mpp / view.mpp0  # level-0 px per mask px
            tissue_area = float(roi.contains((cc + 0.5) * f, (rr + 0.5) * f).sum()) * (tissue.mpp / 1000.0) ** 2
        else:
            tissue_area = float(roi.geometry.area if roi.geometry is not None else roi.mask.sum() * roi.mask_px**2) \
                * (view.mpp0 / 1000.0) ** 2
        xy = grid.origin(selected).astype(np.float64) * view.scale
        side = grid.tile_size * view.scale
        selected = selected[roi.meets(xy[:, 0], xy[:, 1], xy[:, 0] + side, xy[:, 1] + side)]
    identity = slide_identity(slide, slide_path)
    key, digest = cache_key(
        **({"roi": roi.digest} if roi is not None else {}),
        slide=identity, target_mpp=view.target_mpp, level=view.level, factor=view.factor,
        width=view.width, height=view.height, tile_size=tile_size, overlap=cfg.overlap,
        tissue_mask=bool(cfg.tissue_mask), tissue_mpp=float(cfg.tissue_mpp), tissue_version=TISSUE_DETECTOR_VERSION,
    )
    model = model_fingerprint(segmenter, cfg.model_fingerprint)
    return _Plan(view, grid, selected, tissue, tissue_area, identity, key, digest, model, notes, roi)


def check_grid(grid: TileGrid, view: TargetView) -> None:
    """Refuse a planned grid beyond MAX_TILES / MAX_TARGET_PIXELS, naming the numbers (one line)."""
    pixels = float(view.width) * float(view.height)
    if grid.n <= MAX_TILES and pixels <= MAX_TARGET_PIXELS:
        return
    raise InputError(f"slide {view.path} at {view.target_mpp:.4g} µm/px (slide {view.mpp0:.4g} µm/px) would be "
                     f"{view.width:,} x {view.height:,} target pixels ({pixels:.3g}) in {grid.n:,} tiles of "
                     f"{grid.tile_size} px; the limits are {MAX_TILES:,} tiles and {MAX_TARGET_PIXELS:.3g} pixels: "
                     "check the µm/px (--slide-mpp, --mpp) and --tile-size")


def predict_tile_range(
    slide_path: str | os.PathLike,
    segmenter: TileSegmenter,
    config: PredictConfig,
    start: int = 0,
    stop: int | None = None,
    progress: Progress | None = None,
    create: bool = True,
) -> tuple[int, int]:
    """Predict tissue tiles [start, stop) of a slide into the ``work_dir`` cache; write no outputs.

    For spreading the tiles of one large slide over several processes (:mod:`nucseg.wsi.distributed`): each fills
    its range, then :func:`predict_slide` with the same settings finds those predictions and only stitches
    (and predicts whatever is still missing). Ranges must start on a multiple of ``FLAG_CHUNK`` tiles (and
    end on one, or at the last tile) so that concurrent processes never share a flag chunk.
    ``stop=start`` only creates the cache; ``create=False`` (what concurrent range tasks use) refuses to create
    or rebuild it, so a process that sees a different cache never wipes the others' work.
    Returns (tissue tiles of the slide, tiles predicted now).
    """
    cfg = config
    if cfg.work_dir is None:
        raise InputError("predicting part of a slide needs a work dir (the cache the parts share)")
    if model_fingerprint(segmenter, cfg.model_fingerprint).startswith("volatile:"):
        raise InputError("predicting part of a slide needs a segmenter with a fingerprint (or "
                         "config.model_fingerprint): without one, each part would start a fresh cache")
    tile_size = _check_settings(segmenter, cfg)
    slide_path = Path(slide_path)
    slide = open_slide(slide_path)
    try:
        plan = _plan(slide, slide_path, segmenter, cfg, tile_size)
        n = len(plan.selected)
        stop = n if stop is None else min(int(stop), n)
        if start < 0 or start % FLAG_CHUNK or (stop % FLAG_CHUNK and stop != n) or stop < min(start, n):
            raise InputError(f"tile range [{start}, {stop}) must be aligned to {FLAG_CHUNK} tiles")
        with _work_dir(cfg.work_dir) as work:
            cache = plan.open_cache(work, create=create)
            predicted = 0
            for attempt in range(MAX_CACHE_REPAIRS + 1):
                counts = [0, 0]
                try:  # a damaged chunk met while merging a batch: its tiles are marked not done, predict them
                    _run_segmenter(cache, plan.view, segmenter, cfg, progress, tiles=(start, stop), counts=counts)
                    predicted += counts[1]
                    break
                except CacheDamaged as err:
                    predicted += counts[1]
                    if attempt == MAX_CACHE_REPAIRS:
                        raise _repairs_failed(err, attempt) from None
    finally:
        slide.close()
    return n, predicted


class _Aborted(Exception):
    """Inference failed; the export thread gives up (its atomic outputs are discarded)."""


class _Ready:
    """Which cache tiles have predictions; the export pass waits on it while inference is still running.

    It also hands the export the predictions it has just seen written (at most ``keep`` tiles), so that an
    export following the inference need not read them back from the cache.
    """

    def __init__(self, done: np.ndarray, keep: int = 0):
        self._done = np.array(done, dtype=bool)
        self._cond = threading.Condition()
        self._aborted = False
        self._keep = keep
        self._recent: dict[int, tuple] = {}

    def mark(self, idx: np.ndarray, labels: np.ndarray | None = None, scores: list | None = None,
             tiles: np.ndarray | None = None) -> None:
        """``tiles``: the batch's RGB pixels (the ones the model saw), handed over for the stain measurements."""
        with self._cond:
            self._done[idx] = True
            if labels is not None:
                for j, i in enumerate(np.asarray(idx).tolist()):
                    if len(self._recent) < self._keep:  # full: the export reads the rest from the cache
                        self._recent[i] = (np.asarray(labels[j], dtype=np.int32), np.asarray(scores[j], dtype=np.float32),
                                           None if tiles is None else np.array(tiles[j], dtype=np.uint8))
            self._cond.notify_all()

    def take(self, start: int, stop: int) -> tuple[np.ndarray, list, np.ndarray | None] | None:
        """Predictions (and RGB tiles, where handed over) of tiles [start, stop) as written to the cache, if all
        were handed over (else None)."""
        with self._cond:
            got = [self._recent.pop(i, None) for i in range(start, stop)]
        if any(g is None for g in got):
            return None
        rgb = None if any(g[2] is None for g in got) else np.stack([g[2] for g in got])
        return np.stack([g[0] for g in got]), [g[1] for g in got], rgb

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def wait(self, ci: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._done[ci] or self._aborted)
            if not self._done[ci]:
                raise _Aborted()


def _host_buffer(shape: tuple[int, ...], segmenter: TileSegmenter) -> np.ndarray:
    """Tile buffer for one batch: page-locked when the segmenter runs on CUDA (asynchronous upload)."""
    if str(segmenter.device).startswith("cuda"):  # a torch.device or its name
        import torch

        return torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()
    return np.empty(shape, dtype=np.uint8)


def _run_segmenter(cache: TileCache, view: TargetView, segmenter: TileSegmenter, cfg: PredictConfig,
                   progress: Progress | None, ready: _Ready | None = None,
                   stopped: Callable[[], bool] = lambda: False,
                   tiles: tuple[int, int] | None = None, times: StageTimes | None = None,
                   counts: list[int] | None = None) -> None:
    """Predict every tile not done yet (of cache range ``tiles`` if given), batch by batch, reading (and
    caching) the next batch while the model runs, and writing predictions to the cache in a third thread.

    ``ready`` is told about every finished batch; ``stopped()`` true (the export thread failed) ends early.
    ``counts`` ([tiles read from the slide, tiles predicted]) grows as the pass goes, so a caller whose pass ends
    in an exception (CacheDamaged) still knows the work done.
    """
    counts = counts if counts is not None else [0, 0]
    T = cache.tile_size
    todo = np.flatnonzero(~cache.pred_done)
    if tiles is not None:
        todo = todo[(todo >= tiles[0]) & (todo < tiles[1])]
    total = cache.n if tiles is None else tiles[1] - tiles[0]
    done = total - len(todo)
    if progress is not None:
        progress(done, total)
    batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    times = times or StageTimes()
    timed_view = _TimedView(view, times)
    keep_tiles = cfg.keeps_tiles()

    def load(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read a batch (reader thread) and cache the freshly read tiles right here, off the model's thread."""
        have = cache.tiles_done[idx]
        tiles = _host_buffer((len(idx), T, T, 3), segmenter)
        with times("cache"):
            for j in np.flatnonzero(have):
                tile = cache.get_tile(int(idx[j]))
                if tile is None:  # a damaged chunk: read it from the slide again
                    have[j] = False
                else:
                    tiles[j] = tile
        fresh = np.flatnonzero(~have)
        if len(fresh):
            tiles[fresh] = read_tiles_parallel(timed_view, cache.coords[idx[fresh]], T, cfg.read_workers)
            if keep_tiles:
                with times("cache"):
                    cache.put_tiles(idx[fresh], tiles[fresh], defer=True)
        return tiles, idx[fresh]

    def store(idx: np.ndarray, labels: np.ndarray, scores: list, tiles: np.ndarray | None) -> None:
        """Write a batch's predictions (cache-writer thread), then tell the export pass and the progress bar."""
        nonlocal done
        try:
            with times("cache"):
                cache.put_predictions(idx, labels, scores, defer=True)
                if done + len(idx) >= total:  # the last batch: every flag on disk before the export may finish
                    cache.flush()
        finally:  # also when it raises CacheDamaged: the batch was written, other tiles of a chunk were damaged
            counts[1] += len(idx)
        if ready is not None:
            ready.mark(idx, labels, scores, tiles)
        done += len(idx)
        if progress is not None:
            progress(done, total)

    try:
        _segment_batches(batches, load, store, segmenter, cfg, T, stopped, counts, times)
    except BaseException:
        with contextlib.suppress(Exception):  # what was written stays usable; the first error is the one to report
            cache.flush()
        raise
    cache.flush()  # the deferred flags: the cache on disk now says all this pass wrote


def _segment_batches(batches: list[np.ndarray], load: Callable, store: Callable, segmenter: TileSegmenter,
                     cfg: PredictConfig, T: int, stopped: Callable[[], bool], counts: list[int],
                     times: StageTimes) -> None:
    """The three lanes of :func:`_run_segmenter`: ``load`` the next batch in a reader thread while the model runs
    on this one, ``store`` its predictions in a writer thread."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nucseg-read") as pool, \
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nucseg-cache") as writer:
        future = pool.submit(load, batches[0]) if batches else None
        writes: deque = deque()
        for b, idx in enumerate(batches):
            if stopped():
                break
            tiles, fresh = future.result()
            future = pool.submit(load, batches[b + 1]) if b + 1 < len(batches) else None
            counts[0] += len(fresh)
            with times("infer"):
                result = segmenter(tiles)
                labels = np.asarray(result.labels)
            if labels.shape != (len(idx), T, T) or len(result.scores) != len(idx):
                raise ValueError(f"segmenter returned labels {labels.shape} and {len(result.scores)} score arrays "
                                 f"for a batch of {len(idx)} tiles of {T} px")
            rgb = tiles if cfg.measurements == "full" else None  # the export's stain measurements need them
            writes.append(writer.submit(store, idx, labels, list(result.scores), rgb))
            while len(writes) > 2 or (writes and writes[0].done()):  # bounded; raises a failed write's error
                writes.popleft().result()
        while writes:
            writes.popleft().result()


class _TimedView:
    """A TargetView whose reads count toward the "read" stage (reads run in dask's threads)."""

    def __init__(self, view: TargetView, times: StageTimes):
        self._view, self._times = view, times

    def read(self, x: int, y: int, size: int) -> np.ndarray:
        with self._times("read"):
            return self._view.read(x, y, size)


EXPORT_PROCESS_MIN_TILES = 64


def export_workers(cfg: PredictConfig, n_tiles: int) -> int:
    """How many processes do the per-tile export work (1: none, the export thread does it).

    Daemonic processes (a dask worker under a nanny) may not start children: there it is always 1.
    """
    import multiprocessing

    if cfg.export_workers is not None and cfg.export_workers < 1:
        raise InputError(f"export workers must be >= 1, not {cfg.export_workers}")
    if multiprocessing.current_process().daemon:
        return 1
    if cfg.export_workers is not None:
        return int(cfg.export_workers)
    if n_tiles < EXPORT_PROCESS_MIN_TILES:
        return 1  # a process pool costs about a second to start: not worth it on small slides
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # one CPU stays with this process (reading, feeding the model, caching, writing); with 2 CPUs that leaves
    # one worker, i.e. the export thread itself (measured faster than 2 processes on 2 busy cores)
    return max(1, min(8, cpus - 1))


@dataclass(frozen=True)
class _ExportJob:
    """What the per-tile export needs, small and picklable: where the predictions are, how tiles sit."""

    cache_root: str
    pred_path: str
    grid: object
    grid_index: np.ndarray
    coords: np.ndarray
    scale: float
    target_mpp: float
    mpp0: float
    tolerance: float
    roi: object = None  # nucseg.wsi.roi.Roi (picklable): a nucleus is kept only if its centroid lies inside
    measurements: str = "none"  # nucseg.wsi.measure mode
    pred_salt: bytes = b""  # the cache's checksum salts (TileCache.pred_salt / tile_salt): reads are verified
    tile_salt: bytes = b""


@dataclass
class _TileNuclei:
    """The kept nuclei of one cache tile, measured and outlined; ids are assigned by the export thread."""

    ci: int
    local_ids: np.ndarray
    batch: NucleusBatch


_ARRAYS: dict[tuple[str, str], tuple] = {}


def _pred_arrays(job: _ExportJob) -> tuple:
    """(labels, scores, tiles) arrays of the cache, opened once per worker process (read-only)."""
    import zarr

    key = (job.cache_root, job.pred_path)
    if key not in _ARRAYS:
        group = zarr.open_group(job.cache_root, mode="r")
        pred = group[job.pred_path]
        _ARRAYS.clear()
        _ARRAYS[key] = (pred["labels"], pred["scores"], group["tiles"])
    return _ARRAYS[key]


def _export_chunk(job: _ExportJob, start: int, stop: int, pred: tuple | None = None,
                  preloaded: tuple | None = None, rgb: np.ndarray | None = None,
                  expect: tuple | None = None) -> tuple[list[_TileNuclei], dict]:
    """Ownership rule, outlines and measurements of cache tiles [start, stop) (in a worker or the export thread).

    pred: the cache's (labels, scores, tiles) arrays (None in a worker: it opens them). preloaded: (labels,
    scores, rgb or None) handed over by the inference. rgb: the tiles' pixels (the export thread reads them from
    the cache or the slide); for "full" measurements with neither, they are read from the cache here.
    expect: :meth:`TileCache.checksums` of the tiles; what is read from the cache is verified against it (a
    mismatch raises ChecksumMismatch, which the export thread turns into CacheDamaged as for a decode failure).
    Returns the tiles' nuclei and this call's stage times (thread CPU and wall, plus the process CPU time as
    ``worker_cpu`` so that a benchmark can count what worker processes spent).
    """
    times = StageTimes()
    cpu0 = time.process_time()
    in_worker = pred is None
    labels_arr, scores_arr, tiles_arr = _pred_arrays(job) if in_worker else pred
    if preloaded is not None:  # handed over by the inference (the same values as in the cache)
        labels_all, scores_all, handed = preloaded
        rgb = handed if rgb is None else rgb
    else:
        with times("cache"):
            labels_all = np.asarray(labels_arr[start:stop])
            scores_all = np.asarray(scores_arr[start:stop])
            if expect is not None:
                check_labels(job.pred_salt, start, labels_all, expect[0], expect[1])
                check_scores(job.pred_salt, start, scores_all, expect[0])
    if job.measurements == "full" and rgb is None:
        with times("cache"):
            rgb = np.asarray(tiles_arr[start:stop])
            if expect is not None:
                check_tiles(job.tile_salt, start, rgb, expect[2])
    out = []
    grid = job.grid
    for k, ci in enumerate(range(start, stop)):
        labels = labels_all[k]
        g = int(job.grid_index[ci])
        ix, iy = g % grid.nx, g // grid.nx
        x0, y0 = (int(v) for v in grid.origin(g))
        with times("stitch"):
            keep, area, sx, sy = keep_mask(labels, x0, y0, grid, ix, iy)
            if job.roi is not None and keep.any():  # before ids are given, so they stay consecutive
                cand = np.flatnonzero(keep)
                cx, cy = (sx[cand] / area[cand] + 0.5) * job.scale, (sy[cand] / area[cand] + 0.5) * job.scale
                keep[cand] = job.roi.contains(cx, cy)
            local = np.flatnonzero(keep).astype(np.int32)
        if not len(local):
            continue
        with times("polygons"):
            # the outlines serve the polygons and the shape measurements: traced once
            rings = outline_rings(labels, keep) if job.measurements != "none" else None
            polys = instance_polygons(labels, local, x0, y0, job.scale, job.tolerance, rings)
            a = area[local]
            scale = job.scale
            batch = NucleusBatch.from_polygons(
                np.zeros(len(local), np.int64), polys,
                (sx[local] / a + 0.5) * scale, (sy[local] / a + 0.5) * scale,
                a * job.target_mpp**2, shapely.length(polys) * job.mpp0, scores_all[k][local - 1])
        if job.measurements != "none":
            with times("measure"):
                batch.measurements = measure_tile(labels, local, job.target_mpp, job.measurements,
                                                  None if rgb is None else rgb[k], rings, batch.perimeter_um)
        out.append(_TileNuclei(ci, local, batch))
    if in_worker:
        times.add("worker_cpu", time.process_time() - cpu0, 0.0)
    return out, times.to_dict()


def _process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """Worker processes from a fork server (never fork this threaded process: zarr, dask and openslide hold
    threads and locks); the server is started once per process and preloads the export modules."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["nucseg.wsi.predict", "scipy.sparse.csgraph"])  # outline_rings needs it
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _open_output(out: Path, slide_key: str, prov: dict, measurements: Sequence[str] = ()):
    if out.name.lower().endswith(".parquet"):
        return GeoParquetWriter(out, slide_key=slide_key, provenance=prov, measurements=measurements)
    return GeoJSONWriter(out, slide_key=slide_key, provenance=prov)


def _stitch_and_export(cache: TileCache, plan: _Plan, out_geojson: Path, cfg: PredictConfig,
                       wait: Callable[[int], None] = lambda ci: None, times: StageTimes | None = None,
                       prov: dict | None = None, take: Callable[[int, int], tuple | None] = lambda a, b: None,
                       on_nuclei: Callable[[int], None] | None = None) -> int:
    """One pass over the tiles in order: ownership rule, global ids, polygons, streamed to every writer.
    ``on_nuclei(count)`` hears the nuclei written so far after each run of tiles.

    ``wait(ci)`` returns once tile ci's prediction is in the cache (so the pass can follow a running inference).
    Runs of ``export_chunk`` tiles go to worker processes (at most two runs per worker in flight, so memory
    stays flat); results come back in cache order, get their global ids here and are written.
    """
    view, grid, selected = plan.view, plan.grid, plan.selected
    slide, mpp0 = view.slide, view.mpp0
    times = times or StageTimes()
    stitcher = Stitcher(grid, selected)
    import scipy.sparse.csgraph  # noqa: F401 - outline_rings' ring walk; imported (~0.2 s) while tile 0 is read
    job = _ExportJob(str(cache.root), cache.pred.path, grid, np.asarray(selected), cache.coords, view.scale,
                     view.target_mpp, mpp0, cfg.simplify_tolerance, plan.roi, cfg.measurements, cache.pred_salt,
                     cache.tile_salt)
    extra = measurement_names(cfg.measurements)
    full = cfg.measurements == "full"
    workers = export_workers(cfg, cache.n)
    chunk = max(1, int(cfg.export_chunk))
    with contextlib.ExitStack() as stack:
        writers: list = [stack.enter_context(_open_output(out_geojson, plan.identity, prov, extra))]
        if cfg.csv:
            writers.append(stack.enter_context(CSVWriter(cfg.csv, extra)))
        if cfg.preview:
            W0, H0 = slide.level_dimensions[0]
            preview_mpp = max(mpp0, max(W0, H0) * mpp0 / PREVIEW_MAX_SIDE)
            overview, ov_mpp = read_overview(slide, view.path, mpp0, preview_mpp)
            writers.append(stack.enter_context(PreviewWriter(cfg.preview, overview, ov_mpp / mpp0)))

        def finish(result: tuple[list[_TileNuclei], dict]) -> None:
            tiles, t = result
            times.merge(t)
            for tile in tiles:
                with times("stitch"):
                    tile.batch.ids = stitcher.add_kept(tile.ci, tile.local_ids)
                with times("write"):
                    for w in writers:
                        w.write_batch(tile.batch)
            if on_nuclei is not None:
                on_nuclei(stitcher.count)

        def result(start: int, stop: int, get: Callable[[], tuple]) -> tuple:
            """A chunk's result; a prediction chunk that does not decode or match its checksums becomes the
            cache's CacheDamaged (its tiles marked not done), so predict_slide predicts it again."""
            try:
                return get()
            except Exception as err:  # noqa: BLE001 - only decode failures are converted
                if not _decode_failed(err):
                    raise
                for ci in range(start, stop):
                    cache.get_prediction(ci)  # raises CacheDamaged for the damaged tile(s)
                raise

        def chunk_rgb(start: int, stop: int, handed: tuple | None) -> np.ndarray | None:
            """The tiles' pixels for the stain measurements, unless the inference handed them over: from the
            cache where it holds them (a damaged chunk: get_tile warns and returns None), else read from the
            slide again (``cache_tiles`` off). Here in the export thread, so worker processes need no slide
            and a damaged tile chunk costs a re-read instead of the run."""
            if not full or (handed is not None and handed[2] is not None):
                return None
            rgb = np.empty((stop - start, cache.tile_size, cache.tile_size, 3), np.uint8)
            cached = cache.tiles_done[start:stop]
            missing = []
            with times("cache"):
                for j in range(stop - start):
                    tile = cache.get_tile(start + j) if cached[j] else None
                    if tile is None:
                        missing.append(j)
                    else:
                        rgb[j] = tile
            if missing:
                with times("read"):
                    rgb[missing] = read_tiles_parallel(view, cache.coords[start + np.asarray(missing)],
                                                       cache.tile_size, cfg.read_workers)
            return rgb

        pool = stack.enter_context(_process_pool(workers)) if workers > 1 else None
        pending: deque = deque()
        arrays = (*cache.prediction_arrays, cache.tiles)
        for start in range(0, cache.n, chunk):
            stop = min(start + chunk, cache.n)
            for ci in range(start, stop):
                wait(ci)
            if pool is None:
                handed = take(start, stop)
                rgb = chunk_rgb(start, stop, handed)
                finish(result(start, stop, lambda: _export_chunk(job, start, stop, arrays, handed, rgb,
                                                                 cache.checksums(start, stop))))
                continue
            rgb = chunk_rgb(start, stop, None)
            pending.append((start, stop, pool.submit(_export_chunk, job, start, stop, None, None, rgb,
                                                     cache.checksums(start, stop))))
            while len(pending) > 2 * workers or (pending and pending[0][2].done()):
                a, b, fut = pending.popleft()
                finish(result(a, b, fut.result))
        while pending:
            a, b, fut = pending.popleft()
            finish(result(a, b, fut.result))
        stitcher.finish(cache.n)
    if cfg.labels:
        stitched = StitchedLabels(grid, selected, stitcher.kept, cache.get_labels)
        W0, H0 = slide.level_dimensions[0]  # the RGB image beneath the labels, downsampled to a bounded size
        image, image_mpp = read_overview(slide, view.path, mpp0,
                                         max(view.target_mpp, max(W0, H0) * mpp0 / LABEL_IMAGE_MAX_SIDE))
        with times("write"):
            write_ome_zarr_labels(cfg.labels, view.height, view.width, stitched.region, view.target_mpp,
                                  image=image, image_mpp=image_mpp, level0_scale=view.scale, chunk=cfg.label_chunk,
                                  provenance=prov)
    return stitcher.count


def _tile_boxes(grid: TileGrid, selected: np.ndarray, factor: float) -> np.ndarray:
    xy = grid.origin(selected).astype(np.float64)
    return np.column_stack([xy * factor, (xy + grid.tile_size) * factor]) if len(xy) else np.zeros((0, 4))


@contextlib.contextmanager
def _work_dir(work_dir: str | os.PathLike | None):
    if work_dir is not None:
        from ..io import writable_dir

        path = Path(work_dir)
        writable_dir(path)  # created and proven to take new files (not a read-only mount) before a slide is read
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="nucseg-work-", ignore_cleanup_errors=True) as tmp:
        yield Path(tmp)  # a private folder made here: removing it afterwards removes only what this run wrote


def check_outputs(slide_path: Path, out_geojson: Path, cfg: PredictConfig) -> None:
    """Fail before any work if an output cannot be created (missing permission, parent is a file...), would
    replace something nucseg did not write, would overwrite the slide, or two outputs share one path."""
    kinds = [(out_geojson, is_nucseg_table), (cfg.csv, is_nucseg_csv), (cfg.labels, is_nucseg_zarr),
             (cfg.preview, is_nucseg_png), (cfg.tissue_preview, is_nucseg_png)]
    paths = [Path(p) for p, _ in kinds if p is not None]
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise InputError(f"two outputs would be written to {paths[i]}; give each its own path")
    for p, owned in kinds:
        if p is not None:
            check_output(p, owned, inputs=[slide_path])

