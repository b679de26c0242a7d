"""``nucseg`` command line: argument parsing, progress bars and exit codes. All work happens in the library.

Every user-caused failure is a :class:`nucseg.errors.NucsegError`: it prints one line ``nucseg: error: ...``
and exits with the error's code (docs/CLI.md, "Exit codes"); ``--debug`` shows the traceback instead.
SIGTERM (what SLURM sends at the time limit or on preemption) is handled like Ctrl-C, so temporaries are
removed and the run log is closed before exiting with 130.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import commands

EXIT_INTERRUPTED = 130
EXIT_OUT_OF_MEMORY = 7


def _terminate(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _add_model(p: argparse.ArgumentParser, model_default: str | None = "vit_b") -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--model", default=model_default, choices=["vit_b", "vit_l", "vit_h", "vit_tiny"],
                   help="SAM variant (vit_tiny: small model of the same architecture for tests and demos)")
    g.add_argument("--checkpoint", type=Path, help="base weights: an official sam_vit_*.pth (see 'nucseg weights')"
                   " or a file with the same keys; without it the model is randomly initialised (seeded)")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default="lora", choices=["lora", "decoder", "full"],
                   help="lora: LoRA on the image encoder + trainable mask decoder (SAMed); decoder: decoder only")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank, i.e. scale 1)")
    g.add_argument("--targets", default="q,v", help="LoRA targets, comma-separated: q,k,v (slices of the fused "
                   "qkv), qkv, proj, mlp")
    g.add_argument("--train-prompt-encoder", action="store_true", help="also train the prompt encoder")
    g.add_argument("--freeze-decoder", action="store_true", help="keep the mask decoder frozen (LoRA only)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--dice-weight", type=float, default=0.8, help="λ in CE + λ·Dice")
    t.add_argument("--balance-ce", action="store_true",
                   help="class-balanced CE (nucleus pixels weigh as much as background); for models trained "
                        "from scratch, which otherwise settle on empty masks")
    t.add_argument("--prompts-per-tile", type=int, default=16, help="nuclei prompted per tile and step")
    t.add_argument("--box-fraction", type=float, default=0.0, help="share of prompts that also get their box")
    t.add_argument("--seed", type=int, default=42)
    _add_calibration_split(t)
    t.add_argument("--no-augment", action="store_true", help="no flips, rotations or stain jitter")
    t.add_argument("--no-bf16", action="store_true", help="train in fp32 on CUDA")
    t.add_argument("--drop-empty", action="store_true", help="remove tiles with no nuclei")
    t.add_argument("--mpp", type=float, default=None,
                   help="µm/px of the training images, stored in the adapter so predict can match slides to it")
    t.add_argument("--exemplars", type=int, default=None, help="few-shot: train on N exemplar images only")
    t.add_argument("--synthesize", type=int, nargs="?", const=8, default=None, metavar="PER_EXEMPLAR",
                   help="with --exemplars: add exemplar-guided synthetic tiles (default 8 per exemplar)")


def _add_inference(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("automatic prompting")
    g.add_argument("--points-per-side", type=int, default=32, help="grid density per tile")
    g.add_argument("--prompts", default="auto", choices=["auto", "grid"],
                   help="auto: prune the grid (foreground map, in-mask skipping); grid: decode every point")
    g.add_argument("--pred-iou-thresh", type=float, default=None)
    g.add_argument("--stability-thresh", type=float, default=None)
    g.add_argument("--nms-iou", type=float, default=None)
    g.add_argument("--min-area", type=int, default=None)
    _add_threshold_note(g)
    g.add_argument("--decoder-batch", type=int, default=512, help="prompts per decoder call")


def _add_threshold_note(g) -> None:
    """--fg-threshold, and the rule for all thresholds: unset = the adapter's calibrated value or the default."""
    g.add_argument("--fg-threshold", type=float, default=None,
                   help="foreground probability below which a grid point is not decoded")
    g.description = ("--pred-iou-thresh, --stability-thresh, --fg-threshold, --nms-iou, --min-area: when not "
                     "given, the adapter's calibrated thresholds (nucseg.json 'thresholds'), else the global "
                     "defaults 0.5, 0.8, 0.2, 0.6, 12; the run says which were used")


def _add_calibration_split(t) -> None:
    t.add_argument("--calibration-fraction", type=float, default=0.1, metavar="F",
                   help="share of the images held back from training to calibrate the adapter's inference "
                        "thresholds on (0: no calibration, the global defaults apply)")
    t.add_argument("--calibration-metric", default="pq", choices=["pq", "aji", "f1", "dice"],
                   help="metric the threshold calibration maximises")


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="re-pick an adapter's inference thresholds on your annotated tiles")
    p.add_argument("adapter", type=Path, help="adapter folder; its nucseg.json is rewritten (atomically)")
    p.add_argument("--data", required=True, type=Path, help="NuInsSeg-layout annotated tiles (or one organ)")
    p.add_argument("--checkpoint", type=Path, help="the base checkpoint the adapter was trained on")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--metric", default="pq", choices=["pq", "aji", "f1", "dice"], help="what to maximise")
    p.add_argument("--points-per-side", type=int, default=32, help="grid density per tile, as for predict")
    p.add_argument("--dry-run", action="store_true", help="print the thresholds, leave nucseg.json as it is")
    p.set_defaults(func=commands.calibrate)


def _add_threads(p: argparse.ArgumentParser, default=None) -> None:
    """--threads, accepted before the subcommand and after it (the later one wins)."""
    p.add_argument("--threads", type=int, default=default, metavar="N",
                   help="CPU threads for torch, BLAS, OpenCV and dask (default: the CPUs this process may use: "
                        "affinity mask, SLURM_CPUS_PER_TASK, cgroup quota; docs/HPC.md)")


def build_parser() -> argparse.ArgumentParser:
    from nucseg import __version__

    ap = argparse.ArgumentParser(prog="nucseg", description="Fine-tune SAM on H&E nuclei; segment whole slides.")
    ap.add_argument("--version", action="version", version=f"nucseg {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_threads(ap)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune on a NuInsSeg-layout dataset and save an adapter")
    p.add_argument("--data", required=True, type=Path, help="NuInsSeg-layout root (or one organ folder)")
    p.add_argument("--out", required=True, type=Path, help="run folder: adapter/, checkpoint.pt, curves.png")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--merge", type=Path, default=None, metavar="FILE",
                   help="also export base+adapter merged into one full checkpoint (.pth or .safetensors)")
    _add_model(p)
    _add_training(p)
    p.set_defaults(func=commands.train)

    p = sub.add_parser("cv", help="k-fold cross-validation with per-fold and mean ± std metrics")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--group-by", default="image", choices=["image", "organ"])
    p.add_argument("--zero-shot", action="store_true", help="also score the base model, same inference path")
    p.add_argument("--zero-shot-single-mask", action="store_true",
                   help="zero-shot with output 0 only (bases trained by nucseg); default: SAM's 3 ambiguity masks")
    p.add_argument("--overlays", type=int, default=3, help="overlay pictures per fold")
    _add_model(p)
    _add_training(p)
    _add_inference(p)
    p.set_defaults(func=commands.cv)

    p = sub.add_parser("eval", help="score predicted label maps against ground truth")
    p.add_argument("--gt", required=True, type=Path, help="ground-truth label maps (.tif/.png/.npy), by stem")
    p.add_argument("--pred", required=True, type=Path, help="predicted label maps, matched by file stem")
    p.add_argument("--ambiguous", type=Path, default=None, help="ambiguous-area masks (NuInsSeg 'vague areas')")
    p.add_argument("--json", action="store_true", help="print one JSON object {per_image, mean}")
    p.set_defaults(func=commands.evaluate)

    p = sub.add_parser("segment", help="label maps for plain images (tiles) with an adapter")
    p.add_argument("inputs", nargs="+", type=Path, help="images or folders of images")
    p.add_argument("--adapter", type=Path, help="adapter folder (omit for the base model, zero-shot)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder for <stem>.tif label maps")
    p.add_argument("--batch-size", type=int, default=8)
    _add_model(p, model_default=None)
    _add_inference(p)
    p.set_defaults(func=commands.segment)

    p = sub.add_parser("predict", help="segment every nucleus of whole-slide images into GeoJSON")
    p.add_argument("slides", nargs="*", type=Path, help="slides (.svs, .ndpi, .mrxs, .scn, tiled .tif, ...)")
    p.add_argument("-o", "--out", "--out-dir", dest="out", type=Path,
                   help="output .geojson[.gz] (one slide) or folder (several slides, --input-list, --scheduler)")
    p.add_argument("--input-list", type=Path, help="text file with one slide path per line")
    p.add_argument("--adapter", type=Path, help="adapter folder (omit for the base model, zero-shot)")
    p.add_argument("--segmenter", default="sam", choices=["sam", "threshold"],
                   help="threshold: classical haematoxylin baseline, no model (for checks and comparisons)")
    p.add_argument("--mpp", type=float, help="target µm/px (default: the adapter's training µm/px)")
    p.add_argument("--slide-mpp", type=float, help="µm/px of slides whose metadata lacks it")
    p.add_argument("--tile-size", type=int, default=None, help="default: the model's input size")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap in px; must exceed the largest nucleus")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--work-dir", type=Path, help="tile/prediction cache (zarr); reruns resume from it")
    p.add_argument("--no-tissue-mask", action="store_true", help="infer every tile, background included")
    p.add_argument("--tissue-preview", action="store_true", help="write <out>.tissue.png")
    p.add_argument("--labels", type=Path, help="also write an OME-Zarr label image (one slide)")
    p.add_argument("--labels-all", action="store_true", help="several slides: an OME-Zarr label image each")
    p.add_argument("--gz", action="store_true", help="several slides: write .geojson.gz")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="process every N-th slide starting at I (default: from SLURM_ARRAY_TASK_ID/COUNT)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on a dask cluster: scheduler address (tcp://host:8786) or scheduler file; slides "
                   "go to the workers, each builds the model once (docs/HPC.md)")
    p.add_argument("--tiles-per-task", type=int, default=None, metavar="N",
                   help="with --scheduler: spread a slide with more than N tissue tiles over the workers in "
                   "ranges of N tiles, then stitch once (0: each slide whole on one worker; default 2048)")
    p.add_argument("--csv", action="store_true", help="also write <out>.csv, one row per nucleus")
    p.add_argument("--preview", action="store_true", help="also write <out>.preview.png with outlines")
    _add_model(p, model_default=None)
    _add_inference(p)
    p.set_defaults(func=commands.predict)

    p = sub.add_parser("weights", help="official SAM checkpoints: list, fetch, verify")
    wsub = p.add_subparsers(dest="action", required=True)
    wsub.add_parser("list", help="names, URLs and SHA-256 of the official checkpoints")
    f = wsub.add_parser("fetch", help="download into the user cache and verify")
    f.add_argument("name", choices=["vit_b", "vit_l", "vit_h"])
    f.add_argument("--dest", type=Path, default=None)
    v = wsub.add_parser("verify", help="which official checkpoint a file is (by SHA-256)")
    v.add_argument("file", type=Path)
    p.set_defaults(func=commands.weights)

    p = sub.add_parser("merge", help="export base + adapter as one full checkpoint with official keys")
    p.add_argument("--adapter", required=True, type=Path)
    p.add_argument("--checkpoint", type=Path, help="the base checkpoint the adapter was trained on")
    p.add_argument("-o", "--out", required=True, type=Path, help=".pth or .safetensors")
    p.set_defaults(func=commands.merge)

    p = sub.add_parser("demo-data", help="write a small synthetic NuInsSeg-layout dataset")
    p.add_argument("out", type=Path)
    p.add_argument("--tiles-per-organ", type=int, default=6)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.demo_data)

    _add_calibrate(sub)
    for name, p in sub.choices.items():
        _add_threads(p, default=argparse.SUPPRESS)  # after the subcommand: overrides the one before it
    return ap


def main(argv: list[str] | None = None) -> int:
    from nucseg.errors import NucsegError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="nucseg: %(levelname)s: %(message)s")
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
        # zarr's I/O runs on an asyncio loop; an interrupted write leaves tasks that asyncio reports as
        # "destroyed but pending" at exit: noise after an interrupt (the cache never trusts unflagged data)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        print("nucseg: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MemoryError, RuntimeError) as err:
        if args.debug or not (isinstance(err, MemoryError) or _is_out_of_memory(err)):
            raise
        print("nucseg: error: out of memory; lower --batch-size or --decoder-batch", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _configure_threads(args: argparse.Namespace) -> None:
    """Size every thread pool to the CPUs given (nucseg.threads) before any work starts."""
    from nucseg.threads import configure_threads

    args.thread_settings = configure_threads(args.threads)


def _is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA) or a RuntimeError saying so; torch is loaded by then if it matters."""
    if "torch" not in sys.modules:
        return False
    from nucseg.infer import is_out_of_memory

    return is_out_of_memory(err)


if __name__ == "__main__":
    sys.exit(main())
