"""``nucseg`` command line: argument parsing, progress bars and exit codes. All work happens in the library.

Every user-caused failure is a :class:`nucseg.errors.NucsegError`: it prints one line ``nucseg: error: ...``
and exits with the error's code (docs/CLI.md, "Exit codes"); ``--debug`` shows the traceback instead.
SIGTERM (what SLURM sends at the time limit or on preemption) is handled like Ctrl-C, so temporaries are
removed and the run log is closed before exiting with 130.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import signal
import sys
import textwrap
import threading
import warnings
from pathlib import Path

from nucseg.errors import EXIT_INTERRUPTED, EXIT_OUT_OF_MEMORY  # one table of exit codes: nucseg.errors

from .progress import DEFAULT_INTERVAL as PROGRESS_INTERVAL
from .progress import MODES as PROGRESS_MODES

from . import commands


def _terminate(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option's help where there is one; examples (the epilog) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings \
                and "%(default)" not in text and "default:" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with nucseg's error convention: one line ``nucseg: error: ...`` and exit 2, no usage block."""

    def error(self, message: str):
        command = self.prog.removeprefix("nucseg").strip()
        hint = f" (see nucseg {command + ' ' if command else ''}--help)"
        print(f"nucseg: error: {' '.join(message.split())}{hint}", file=sys.stderr)
        raise SystemExit(2)


def count(lo: int, hi: int | None = None):
    """argparse type: a whole number in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"must be a whole number {span}, not {text!r}")
        return value

    return parse


def number(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite number in the interval (lo/[lo, hi]/hi)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, not {text!r}")
        return value

    return parse


def _mpp_type():
    from nucseg.choices import MPP_RANGE  # plausible µm/px of H&E images; anything else is a unit or metadata mistake

    return number(*MPP_RANGE)


MPP = _mpp_type()
FRACTION = number(0.0, 1.0)
SEED = count(0, 2**32 - 1)


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Logging and debug options, accepted before or after the command (``nucseg -q predict`` and
    ``nucseg predict -q``); after the command they default to "not given", so they never undo the former."""
    p = argparse.ArgumentParser(add_help=False)
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = p.add_argument_group("output and logging")
    g.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks instead of one-line errors")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False), help="no progress bars")
    g.add_argument("--progress", choices=PROGRESS_MODES, default=d("auto"),
                   help="auto: a bar on a terminal, else log (-q: none); log: one plain line per interval "
                        "(tiles done/total, tiles/s, nuclei, ETA; for batch logs such as SLURM's)")
    g.add_argument("--progress-interval", type=number(0, 86400, lo_open=True), default=d(PROGRESS_INTERVAL),
                   metavar="SECONDS", help="--progress log: seconds between lines")
    g.add_argument("-v", "--verbose", action="count", default=d(0),
                   help="more of nucseg's log messages (-v: milestones such as the plan, cache hits, lanes; -vv: "
                        "debug); other libraries' debug logs only with --debug")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=d(None),
                   help="log level of nucseg's messages on stderr (default: warning; -v: info)")
    g.add_argument("--threads", type=count(1, 4096), default=d(None), metavar="N",
                   help="CPU threads for torch, BLAS, OpenCV and dask (default: the CPUs this process may use: "
                        "affinity mask, SLURM_CPUS_PER_TASK, cgroup quota; docs/HPC.md)")
    return p


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the run's summary) on stdout; messages stay on stderr")


def _add_single_mask(p: argparse.ArgumentParser) -> None:
    p.add_argument("--single-mask", action="store_true",
                   help="without --adapter: decode output 0 only (a base trained by nucseg) instead of SAM's 3 "
                        "ambiguity masks")


def _add_model(p: argparse.ArgumentParser, model_default: str | None = "vit_b") -> None:
    from nucseg.choices import DEVICES, MODEL_TYPES

    g = p.add_argument_group("base model")
    g.add_argument("--model", default=model_default, choices=list(MODEL_TYPES),
                   help="SAM variant (vit_tiny: small model of the same architecture for tests and demos)"
                        + ("" if model_default else "; default: the adapter's"))
    g.add_argument("--checkpoint", type=Path, help="base weights: an official sam_vit_*.pth (see 'nucseg weights')"
                   " or a file with the same keys; without it the model is randomly initialised (seeded)")
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: the first CUDA GPU if there is one, else the CPU")


def _add_training(p: argparse.ArgumentParser) -> None:
    from nucseg.choices import MAX_ADAPTER_DIM, MAX_ADAPTER_SCALE, MAX_RANK, METHODS

    g = p.add_argument_group("method")
    g.add_argument("--method", default="lora", choices=list(METHODS),
                   help="lora: LoRA on the image encoder + trainable mask decoder (SAMed); decoder: decoder only; "
                        "full: every weight; adapter: SAM-Adapter (per-block prompts from patch embedding + "
                        "high-frequency FFT input); medsa: Med-SA (encoder and decoder bottleneck adapters, "
                        "prompt-conditioned decoder adapter)")
    g.add_argument("--rank", type=count(1, MAX_RANK), default=4, help="LoRA rank")
    g.add_argument("--alpha", type=number(0, 1e4, lo_open=True), default=None,
                   help="LoRA alpha (default: rank, i.e. scale 1)")
    g.add_argument("--targets", default="q,v", help="LoRA targets, comma-separated: q,k,v (slices of the fused "
                   "qkv), qkv, proj, mlp")
    g.add_argument("--dora", action="store_true",
                   help="LoRA only: weight-decomposed LoRA (DoRA; q/k/v slices: nucseg's own, exact; qkv/proj/mlp: peft)")
    g.add_argument("--rslora", action="store_true", help="LoRA only: rank-stabilised scale alpha/sqrt(rank)")
    g.add_argument("--adapter-dim", type=count(1, MAX_ADAPTER_DIM), default=None,
                   help="adapter/medsa bottleneck width (default: the paper's, encoder width/32 for adapter, "
                        "width/4 for medsa; medsa's decoder adapters keep the same ratio)")
    g.add_argument("--adapter-scale", type=number(0, MAX_ADAPTER_SCALE, lo_open=True), default=None,
                   help="adapter/medsa: factor on the adapter branch (default: the paper's, 1 for adapter, "
                        "0.5 for medsa's MLP-parallel adapters)")
    g.add_argument("--train-prompt-encoder", action="store_true", help="also train the prompt encoder")
    g.add_argument("--freeze-decoder", action="store_true",
                   help="keep the mask decoder frozen (lora, adapter; medsa: train only its decoder adapters)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=count(1, 100_000), default=40, help="passes over the training tiles")
    t.add_argument("--batch-size", type=count(1, 4096), default=8, help="tiles per optimisation step")
    t.add_argument("--lr", type=number(0, 1, lo_open=True), default=1e-4,
                   help="peak learning rate (AdamW; linear warm-up, then cosine decay)")
    t.add_argument("--weight-decay", type=number(0, 10), default=1e-4, help="AdamW weight decay")
    t.add_argument("--dice-weight", type=number(0, 100), default=0.8, help="λ in CE + λ·Dice")
    t.add_argument("--balance-ce", action="store_true",
                   help="class-balanced CE (nucleus pixels weigh as much as background); for models trained "
                        "from scratch, which otherwise settle on empty masks")
    t.add_argument("--prompts-per-tile", type=count(1, 4096), default=16, help="nuclei prompted per tile and step")
    t.add_argument("--no-prompt-heads", action="store_true",
                   help="do not train the centre and instance heads (--prompts centers / none need them)")
    t.add_argument("--box-fraction", type=FRACTION, default=0.0,
                   help="share of prompts that also get their box (0..1)")
    t.add_argument("--seed", type=SEED, default=42, help="seed of the initialisation, sampling and augmentation")
    _add_calibration_split(t)
    t.add_argument("--no-augment", action="store_true", help="no flips, rotations or stain jitter")
    t.add_argument("--no-bf16", action="store_true", help="train in fp32 on CUDA")
    t.add_argument("--drop-empty", action="store_true", help="remove tiles with no nuclei")
    t.add_argument("--mpp", type=MPP, default=None,
                   help="µm/px of the training images, stored in the adapter so predict can match slides to it")
    t.add_argument("--exemplars", type=count(1), default=None, help="few-shot: train on N exemplar images only")
    t.add_argument("--synthesize", type=count(1, 1000), nargs="?", const=8, default=None, metavar="PER_EXEMPLAR",
                   help="with --exemplars: add exemplar-guided synthetic tiles (8 per exemplar when given bare)")


def _add_inference(p: argparse.ArgumentParser) -> None:
    from nucseg.choices import PROMPT_MODES

    g = p.add_argument_group("automatic prompting")
    g.add_argument("--points-per-side", type=count(1, 256), default=32, help="grid density per tile")
    g.add_argument("--prompts", default=None, choices=PROMPT_MODES,
                   help="auto: prune the grid (foreground map, in-mask skipping); grid: decode every point; centers: "
                        "one point per nucleus from the adapter's centre head; none: no prompts, the adapter's "
                        "instance head and a watershed (default: the adapter's best calibrated mode, else auto)")
    g.add_argument("--negative-prompts", type=count(0, 64), default=0, metavar="K",
                   help="--prompts centers: also give each centre its K nearest other centres as negative points")
    g.add_argument("--center-threshold", type=FRACTION, default=None,
                   help="--prompts centers: centre probability a predicted centre needs to be decoded")
    g.add_argument("--pred-iou-thresh", type=FRACTION, default=None,
                   help="keep masks whose predicted IoU is at least this (0..1)")
    g.add_argument("--stability-thresh", type=FRACTION, default=None,
                   help="keep masks whose stability score (IoU of the mask at two thresholds) is at least this")
    g.add_argument("--nms-iou", type=number(0, 1, lo_open=True), default=None,
                   help="of two masks overlapping more than this (box IoU), keep the better one")
    g.add_argument("--min-area", type=count(0, 1 << 20), default=None,
                   help="smallest nucleus kept, in pixels at the model's input resolution")
    _add_threshold_note(g)
    g.add_argument("--decoder-batch", type=count(1, 1 << 20), default=512,
                   help="prompts per decoder call (halved automatically when memory runs out)")


EXAMPLES = {
    "train": """examples:
  nucseg train --data NuInsSeg/ --out runs/lora --checkpoint sam_vit_b_01ec64.pth --mpp 0.25
  nucseg train --data my_tiles/ --out runs/few --exemplars 4 --synthesize   # few-shot""",
    "cv": """examples:
  nucseg cv --data NuInsSeg/ --out runs/cv --checkpoint sam_vit_b_01ec64.pth --zero-shot
  nucseg cv --data NuInsSeg/ --out runs/cv-organ --group-by organ --folds 3""",
    "eval": """examples:
  nucseg eval --gt "label masks modify/" --pred predictions/ --ambiguous "vague areas/mask binary/"
  nucseg eval --gt gt/ --pred pred/ --json > metrics.json""",
    "segment": """examples:
  nucseg segment tiles/ -o labels/ --adapter runs/lora/adapter --checkpoint sam_vit_b_01ec64.pth""",
    "predict": """examples:
  nucseg predict slide.svs -o slide.geojson --adapter runs/lora/adapter --checkpoint sam_vit_b_01ec64.pth
  nucseg predict slide.svs -o slide.geojson.gz --csv --preview --labels slide.zarr --adapter ...
  nucseg predict --input-list slides.txt --out-dir out/ --work-dir /scratch/nucseg --adapter ...
  sbatch --array=0-99 --wrap 'nucseg predict --input-list slides.txt --out-dir out/ --adapter ...'""",
    "weights": """examples:
  nucseg weights list
  nucseg weights fetch vit_b
  nucseg weights verify ~/Downloads/sam_vit_b_01ec64.pth""",
    "merge": """examples:
  nucseg merge --adapter runs/lora/adapter --checkpoint sam_vit_b_01ec64.pth -o sam_vit_b_nuclei.safetensors""",
    "import-qupath": """examples:
  nucseg import-qupath slide.svs slide-nuclei.geojson --out my_data --organ colon
  nucseg train --data my_data --out runs/colon --checkpoint sam_vit_b_01ec64.pth""",
    "calibrate": """examples:
  nucseg calibrate runs/lora/adapter --data my_annotated_tiles/ --checkpoint sam_vit_b_01ec64.pth
  nucseg calibrate runs/lora/adapter --data my_annotated_tiles/ --metric aji --dry-run""",
    "demo-data": """examples:
  nucseg demo-data demo/ --tiles-per-organ 6 --size 256""",
}


def _add_threshold_note(g) -> None:
    """--fg-threshold, and the rule for all thresholds: unset = the adapter's calibrated value or the default."""
    g.add_argument("--fg-threshold", type=FRACTION, default=None,
                   help="foreground probability below which a grid point is not decoded")
    g.description = ("--pred-iou-thresh, --stability-thresh, --fg-threshold, --nms-iou, --min-area: when not "
                     "given, the adapter's calibrated thresholds (nucseg.json 'thresholds'), else the global "
                     "defaults 0.5, 0.8, 0.2, 0.6, 12; the run says which were used")


def _add_calibration_split(t) -> None:
    t.add_argument("--calibration-fraction", type=number(0, 1, hi_open=True), default=0.1, metavar="F",
                   help="share of the images held back from training to calibrate the adapter's inference "
                        "thresholds on (0: no calibration, the global defaults apply)")
    t.add_argument("--calibration-metric", default="pq", choices=["pq", "aji", "f1", "dice"],
                   help="metric the threshold calibration maximises")


def _add_calibrate(sub, command) -> None:
    from nucseg.choices import DEVICES

    p = command("calibrate", "re-pick an adapter's inference thresholds on your annotated tiles")
    p.add_argument("adapter", type=Path, help="adapter folder; its nucseg.json is rewritten (atomically)")
    p.add_argument("--data", required=True, type=Path, help="NuInsSeg-layout annotated tiles (or one organ)")
    p.add_argument("--checkpoint", type=Path, help="the base checkpoint the adapter was trained on")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: the first CUDA GPU if there is one, else the CPU")
    p.add_argument("--metric", default="pq", choices=["pq", "aji", "f1", "dice"], help="what to maximise")
    p.add_argument("--points-per-side", type=count(1, 256), default=32, help="grid density per tile, as for predict")
    p.add_argument("--negative-prompts", type=count(0, 64), default=0, metavar="K",
                   help="--prompts centers: negative points per centre, as for predict")
    p.add_argument("--dry-run", action="store_true", help="print the thresholds, leave nucseg.json as it is")
    p.set_defaults(func=commands.calibrate)


COMPLETION_SHELLS = ("bash", "zsh", "tcsh")


class _PrintCompletion(argparse.Action):
    """``--print-completion SHELL``: shtab's completion script for the whole parser, path arguments completing
    file names. shtab is imported here, not to build the parser (``--help`` stays fast)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import shtab

        _complete_paths(parser, shtab.FILE)
        print(shtab.complete(parser, shell=values))
        parser.exit(0)


def _complete_paths(parser: argparse.ArgumentParser, files: dict) -> None:
    """Every ``type=Path`` argument (of every command) completes file and folder names."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _complete_paths(sub, files)
        elif action.type is Path and not hasattr(action, "complete"):
            action.complete = files


def build_parser() -> argparse.ArgumentParser:
    from nucseg import __version__
    from nucseg.choices import MEASUREMENT_MODES, SEGMENTER_KINDS, TILE_SIZE_RANGE
    from nucseg.choices import WEIGHT_NAMES as WEIGHTS

    ap = _Parser(prog="nucseg", description="Fine-tune SAM on H&E nuclei; segment whole slides.",
                 parents=[_common(suppress=False)], formatter_class=_Formatter)
    ap.add_argument("--version", action="version", version=f"nucseg {__version__}")
    ap.add_argument("--print-completion", choices=COMPLETION_SHELLS, action=_PrintCompletion,
                    help="print a shell completion script and exit (bash: eval \"$(nucseg --print-completion "
                         "bash)\"; docs/CLI.md)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common(suppress=True)]

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name), parents=common,
                              formatter_class=_Formatter)

    p = command("train", "fine-tune on a NuInsSeg-layout dataset and save an adapter")
    p.add_argument("--data", required=True, type=Path, help="NuInsSeg-layout root (or one organ folder)")
    p.add_argument("--out", required=True, type=Path, help="run folder: adapter/, checkpoint.safetensors, curves.png")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (the default: a rerun of the same command resumes; "
                        "a run with other settings in --out is refused)")
    p.add_argument("--merge", type=Path, default=None, metavar="FILE",
                   help="also export base+adapter merged into one full checkpoint (.pth or .safetensors)")
    p.add_argument("--tile-size", type=count(*TILE_SIZE_RANGE), default=512,
                   help="larger images are cut into tiles of this side, which is also the model's input size")
    _add_json(p)
    _add_model(p)
    _add_training(p)
    p.set_defaults(func=commands.train)

    p = command("cv", "k-fold cross-validation with per-fold and mean ± std metrics")
    p.add_argument("--data", required=True, type=Path, help="NuInsSeg-layout root (or one organ folder)")
    p.add_argument("--out", required=True, type=Path,
                   help="run folder: fold_<k>/ (adapter, metrics, overlays), summary.json, summary.md")
    p.add_argument("--folds", type=count(2, 1000), default=5, help="number of folds (k)")
    p.add_argument("--group-by", default="image", choices=["image", "organ"],
                   help="what stays together in one fold: tiles of one image, or all images of one organ")
    p.add_argument("--zero-shot", action="store_true", help="also score the base model, same inference path")
    p.add_argument("--zero-shot-single-mask", action="store_true",
                   help="zero-shot with output 0 only (bases trained by nucseg); default: SAM's 3 ambiguity masks")
    p.add_argument("--overlays", type=count(0, 1000), default=3, help="overlay pictures per fold")
    p.add_argument("--tile-size", type=count(*TILE_SIZE_RANGE), default=512,
                   help="larger images are cut into tiles of this side, which is also the model's input size")
    _add_json(p)
    _add_model(p)
    _add_training(p)
    _add_inference(p)
    p.set_defaults(func=commands.cv)

    p = command("eval", "score predicted label maps against ground truth")
    p.add_argument("--gt", required=True, type=Path, help="ground-truth label maps (.tif/.png/.npy), by stem")
    p.add_argument("--pred", required=True, type=Path, help="predicted label maps, matched by file stem")
    p.add_argument("--ambiguous", type=Path, default=None, help="ambiguous-area masks (NuInsSeg 'vague areas')")
    p.add_argument("--json", action="store_true", help="print one JSON object {per_image, mean}")
    p.set_defaults(func=commands.evaluate)

    p = command("segment", "label maps for plain images (tiles) with an adapter")
    p.add_argument("inputs", nargs="+", type=Path, help="images or folders of images")
    p.add_argument("--adapter", type=Path, help="adapter folder (omit for the base model, zero-shot)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder for <stem>.tif label maps")
    p.add_argument("--batch-size", type=count(1, 4096), default=8, help="tiles per model call")
    _add_json(p)
    _add_single_mask(p)
    _add_model(p, model_default=None)
    _add_inference(p)
    p.set_defaults(func=commands.segment)

    p = command("predict", "segment every nucleus of whole-slide images into GeoJSON")
    p.add_argument("slides", nargs="*", type=Path, help="slides (.svs, .ndpi, .mrxs, .scn, tiled .tif, ...)")
    p.add_argument("-o", "--out", "--out-dir", dest="out", type=Path,
                   help="output .geojson[.gz] or .parquet (GeoParquet) for one slide, or a folder (several "
                   "slides, --input-list, --scheduler)")
    p.add_argument("--input-list", type=Path, help="text file with one slide path per line (UTF-8; # comments)")
    p.add_argument("--adapter", type=Path, help="adapter folder (omit for the base model, zero-shot)")
    p.add_argument("--segmenter", default="sam", choices=SEGMENTER_KINDS,
                   help="threshold: classical haematoxylin baseline, no model (for checks and comparisons)")
    p.add_argument("--mpp", type=MPP, help="target µm/px (default: the adapter's training µm/px, else the slide's; "
                   "--segmenter threshold: the slide's)")
    p.add_argument("--slide-mpp", type=MPP, help="µm/px of slides whose metadata lacks it (or is wrong)")
    p.add_argument("--tile-size", type=count(*TILE_SIZE_RANGE), default=None,
                   help="tile side in px at the target µm/px (default: the model's input size; 512 for "
                   "--segmenter threshold)")
    p.add_argument("--overlap", type=count(0, 4096), default=64,
                   help="tile overlap in px; must exceed the largest nucleus")
    p.add_argument("--batch-size", type=count(1, 4096), default=8, help="tiles per model call")
    p.add_argument("--work-dir", type=Path, help="tile/prediction cache (zarr); reruns resume from it")
    p.add_argument("--no-tissue-mask", action="store_true", help="infer every tile, background included")
    p.add_argument("--no-tile-cache", action="store_true",
                   help="do not keep the slide's RGB tiles in the work dir (about 0.4 MB per tile on disk, ~13%% "
                   "of the host path's CPU); predictions are still cached, so a rerun still resumes. Without "
                   "--work-dir they are kept only for --measurements full")
    p.add_argument("--roi", type=Path, default=None, metavar="FILE",
                   help="one slide: only nuclei whose centroid lies in this region (QuPath GeoJSON annotations in "
                        "level-0 px, or a binary mask image covering the slide at any scale); only tiles meeting it "
                        "are read")
    p.add_argument("--roi-class", default=None, metavar="NAME",
                   help="with a GeoJSON --roi: only the annotations of this QuPath classification")
    p.add_argument("--tissue-preview", action="store_true", help="write <out>.tissue.png")
    p.add_argument("--labels", type=Path, help="also write an OME-Zarr (one slide): the slide downsampled with the "
                   "nuclei as labels/nuclei, so 'napari out.zarr' shows both")
    p.add_argument("--labels-all", action="store_true", help="several slides: such an OME-Zarr each")
    p.add_argument("--gz", action="store_true", help="several slides: write .geojson.gz")
    p.add_argument("--parquet", action="store_true", help="several slides: write GeoParquet <stem>.parquet")
    p.add_argument("--overwrite", action="store_true",
                   help="several slides: redo slides whose outputs in --out-dir are complete, replacing nucseg's "
                   "own outputs (without it, finished slides of this slide content, model and settings are "
                   "skipped, and finished ones of another model, settings or slide refuse the run)")
    p.add_argument("--export-workers", type=int, default=None, metavar="N",
                   help="processes for outlines and measurements (default: one per CPU but one, up to 8, on "
                   "slides of 64+ tiles; 1: none)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="process every N-th slide of the list starting at I (default: from SLURM_ARRAY_TASK_ID/COUNT)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on a dask cluster: scheduler address (tcp://host:8786) or scheduler file; slides "
                   "go to the workers, each builds the model once (docs/HPC.md)")
    p.add_argument("--tiles-per-task", type=count(0), default=None, metavar="N",
                   help="with --scheduler: spread a slide with more than N tissue tiles over the workers in "
                   "ranges of N tiles, then stitch once (0: each slide whole on one worker; default 2048)")
    p.add_argument("--csv", action="store_true", help="also write <out>.csv, one row per nucleus")
    p.add_argument("--measurements", choices=MEASUREMENT_MODES, default="full",
                   help="per-nucleus measurements, named as QuPath names them: none (area, perimeter, score "
                   "only), shape (+ Nucleus: circularity, solidity, min/max diameter, "
                   "eccentricity) or full (+ hematoxylin OD mean/std dev/max, eosin OD mean; default)")
    p.add_argument("--preview", action="store_true", help="also write <out>.preview.png with outlines")
    _add_json(p)
    _add_single_mask(p)
    _add_model(p, model_default=None)
    _add_inference(p)
    p.set_defaults(func=commands.predict)

    p = command("weights", "official SAM checkpoints: list, fetch, verify")
    wsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    wsub.add_parser("list", help="names, URLs and SHA-256 of the official checkpoints", parents=common)
    f = wsub.add_parser("fetch", help="download into the user cache and verify", parents=common,
                        formatter_class=_Formatter)
    f.add_argument("name", choices=list(WEIGHTS), help="which official checkpoint")
    f.add_argument("--dest", type=Path, default=None, help="folder to download into (default: the user cache)")
    f.add_argument("--base-url", default=None, metavar="URL",
                   help="a mirror holding the official file names (https://..., file:///...); default: "
                        "$NUCSEG_WEIGHTS_URL, else the official address")
    v = wsub.add_parser("verify", help="which official checkpoint a file is (by SHA-256)", parents=common)
    v.add_argument("file", type=Path, help="a checkpoint file")
    p.set_defaults(func=commands.weights)

    p = command("merge", "export base + adapter as one full checkpoint with official keys")
    p.add_argument("--adapter", required=True, type=Path, help="adapter folder")
    p.add_argument("--checkpoint", type=Path, help="the base checkpoint the adapter was trained on")
    p.add_argument("-o", "--out", required=True, type=Path, help=".pth or .safetensors")
    p.set_defaults(func=commands.merge)

    p = command("import-qupath", "turn nuclei outlined in QuPath into NuInsSeg-layout training tiles")
    p.add_argument("image", type=Path, help="the image the outlines were drawn on (whole slide or plain image)")
    p.add_argument("geojson", type=Path, help="QuPath GeoJSON export (annotations, detections or cells)")
    p.add_argument("--out", required=True, type=Path, help="dataset root: <out>/<organ>/tissue images/ ...")
    p.add_argument("--organ", default="qupath", help="organ folder name inside --out")
    p.add_argument("--mpp", type=MPP, default=None, help="µm/px of the tiles (slides are resampled; default: native)")
    p.add_argument("--slide-mpp", type=MPP, default=None, help="µm/px of a slide whose metadata lacks it")
    p.add_argument("--tile-size", type=count(*TILE_SIZE_RANGE), default=512, help="tile side in px")
    p.add_argument("--region-class", default=None, metavar="NAME",
                   help="annotations of this class bound the labelled area (default: annotations that contain "
                        "other outlines)")
    p.set_defaults(func=commands.import_qupath)

    p = command("demo-data", "write a small synthetic NuInsSeg-layout dataset")
    p.add_argument("out", type=Path, help="folder to create")
    p.add_argument("--tiles-per-organ", type=count(1, 1000), default=6, help="images per organ folder")
    p.add_argument("--size", type=count(32, 4096), default=256, help="image side in px")
    p.add_argument("--seed", type=SEED, default=0, help="random seed")
    p.set_defaults(func=commands.demo_data)
    _add_sharing_commands(sub, common)
    _add_calibrate(sub, command)
    return ap


def _add_sharing_commands(sub, common: list) -> None:
    """Commands that make or fetch artifacts shared with other people and tools: export-peft, data fetch."""
    from nucseg.choices import DATASET_NAMES as DATASETS

    p = sub.add_parser(
        "export-peft", help="write an adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)",
        description=textwrap.fill("Convert a nucseg adapter folder into a folder that peft.PeftModel.from_pretrained loads onto "
        "segment-anything's Sam or transformers' SamModel (exact: same embeddings and masks). The foreground head goes in "
        "nucseg_fg_head.safetensors; a model card README.md is written too. Full fine-tunes are refused (use "
        "'nucseg merge').", 100),
        epilog="examples:\n  nucseg export-peft runs/lora/adapter runs/lora/peft --license cc-by-4.0 --dataset NuInsSeg\n"
        "  nucseg export-peft runs/lora/adapter runs/lora/peft-hf --flavour transformers\n\n"
        "the export's README.md holds Python that loads it with peft + torch + segment-anything (or transformers)",
        parents=common, formatter_class=_Formatter)
    p.add_argument("adapter", type=Path, help="nucseg adapter folder (from train or cv)")
    p.add_argument("out", type=Path, help="output folder (new, or a previous PEFT export to replace)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the base checkpoint; needed only for adapters that trained the prompt encoder")
    p.add_argument("--flavour", choices=("sam", "transformers"), default="sam",
                   help="the model PEFT wraps: segment-anything's Sam, or transformers' SamModel (Hub checkpoints "
                        "such as facebook/sam-vit-base)")
    p.add_argument("--base-model", default=None, metavar="ID_OR_DIR",
                   help="transformers flavour: the base as a Hub id or SamModel folder (default: the Hub's "
                        "conversion of the official checkpoint; required for other bases)")
    p.add_argument("--license", default=None, metavar="ID",
                   help="the export's licence (a Hub identifier such as cc-by-4.0), i.e. the training data's "
                        "terms; the card always notes SAM's Apache-2.0 (default: apache-2.0, marked unstated)")
    p.add_argument("--dataset", action="append", default=None, metavar="NAME",
                   help="training dataset for the card's datasets field (Hub id or name; repeatable)")
    p.set_defaults(func=commands.export_peft)

    p = sub.add_parser("data", help="public training data: fetch NuInsSeg into the layout train and cv read",
                       epilog="examples:\n  nucseg data fetch nuinsseg data/", parents=common, formatter_class=_Formatter)
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = dsub.add_parser(
        "fetch", help="download, verify and unpack a public dataset (resumes an interrupted download)",
        description=textwrap.fill("Download the official archive (NuInsSeg: Zenodo record 10518968, DOI "
        "10.5281/zenodo.10518968), check it against the size and checksum the record publishes and every member's CRC, and "
        "unpack it into DIR/NuInsSeg. Rerun the same command after an interruption: the download resumes.", 100),
        epilog="examples:\n  nucseg data fetch nuinsseg data/\n  nucseg train --data data/NuInsSeg --out runs/lora "
        "--checkpoint sam_vit_b_01ec64.pth", parents=common, formatter_class=_Formatter)
    f.add_argument("name", choices=list(DATASETS), help="the dataset")
    f.add_argument("dir", type=Path, help="destination folder; the dataset lands in DIR/NuInsSeg")
    f.add_argument("--keep-archive", action="store_true",
                   help="keep the verified .zip after unpacking (default: remove it if nucseg downloaded it)")
    f.add_argument("--base-url", default=None, metavar="URL",
                   help="a mirror holding NuInsSeg.zip and NuInsSeg.zip.record.json (https://..., file:///...); "
                        "default: $NUCSEG_DATA_URL, else Zenodo")
    p.set_defaults(func=commands.data)


def main(argv: list[str] | None = None) -> int:
    from nucseg.errors import NucsegError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, --version, or one line from _Parser.error
        return int(exit.code or 0)
    _configure_logging(args)
    if not args.debug:
        warnings.simplefilter("ignore", FutureWarning)
        warnings.formatwarning = lambda msg, cat, *a, **k: f"nucseg: warning: {msg}\n"
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        _configure_threads(args)
        return int(args.func(args) or 0)
    except NucsegError as err:
        if args.debug:
            raise
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"nucseg: error: {lines[0]}", file=sys.stderr)  # one line, always
        return err.exit_code
    except KeyboardInterrupt:
        _quiet_after_interrupt()
        print("nucseg: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        from nucseg.errors import OutputError
        from nucseg.io import disk_full_error, is_disk_full

        if args.debug or not (is_disk_full(err) or err.errno == errno.EROFS):
            raise
        # a write the library did not convert (a log line, a library's own file): still one line, exit 6
        err = disk_full_error(err, err.filename or "an output") if is_disk_full(err) else OutputError(
            f"cannot write to {err.filename or 'an output'}: read-only file system")
        print(f"nucseg: error: {err}", file=sys.stderr)
        return err.exit_code
    except (MemoryError, RuntimeError) as err:
        if args.debug or not (isinstance(err, MemoryError) or _is_out_of_memory(err)):
            raise
        print("nucseg: error: out of memory; lower --batch-size or --decoder-batch", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _quiet_after_interrupt() -> None:
    """Silence what an interrupted run's background I/O reports while the interpreter shuts down.

    zarr's I/O runs as coroutines on its own asyncio loop, with file writes in that loop's worker threads. An
    interrupt leaves some in flight; at exit zarr stops and closes the loop under them, and each then reports
    itself: asyncio's "Task was destroyed but it is pending", a worker's "exception calling callback ...
    RuntimeError: Event loop is closed" (concurrent.futures' logger), zarr's "Thread did not finish cleanly",
    or an exception escaping a thread or a finaliser. None of it matters (the cache never trusts unflagged
    data, outputs are atomic) and the one line that does is "interrupted": so only that line is printed.
    """
    for name in ("asyncio", "concurrent.futures", "zarr"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda unraisable: None
    warnings.simplefilter("ignore", RuntimeWarning)  # "coroutine ... was never awaited": zarr writes cut short
def _configure_logging(args: argparse.Namespace) -> None:
    """nucseg's messages at the level asked for (-v: info, -vv or --log-level debug: debug); every other
    library's (zarr, asyncio, numba, dask, ...) at warning, so -vv is not their debug noise. --debug shows
    everything at debug, each line naming its logger."""
    level = args.log_level or {0: "warning", 1: "info"}.get(args.verbose, "debug")
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, format="nucseg: %(levelname)s: %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format="nucseg: %(levelname)s: %(message)s")
    logging.getLogger("nucseg").setLevel(logging.DEBUG if args.debug else getattr(logging, level.upper()))


def _configure_threads(args: argparse.Namespace) -> None:
    """Size every thread pool to the CPUs given (nucseg.threads) before any work starts."""
    from nucseg.threads import configure_threads

    args.thread_settings = configure_threads(args.threads)


def _is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA) or a RuntimeError saying so; torch is loaded by then if it matters."""
    if "torch" not in sys.modules:
        return False
    from nucseg.model.infer import is_out_of_memory

    return is_out_of_memory(err)


if __name__ == "__main__":
    sys.exit(main())
