"""One function per subcommand: turn parsed arguments into library calls, draw progress, print results."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nucseg.errors import EXIT_SOME_FAILED, InputError

from .progress import SlideProgressView
from .progress import bar as progress_bar

if TYPE_CHECKING:
    from tqdm import tqdm  # imported where a bar is drawn: building the parser imports this module



def _emit_json(obj) -> None:
    """``--json``: one JSON object on stdout (strict: NaN becomes null); everything else goes to stderr."""
    from nucseg.io import json_safe

    print(json.dumps(json_safe(obj), sort_keys=True, allow_nan=False))


def _bar(args: argparse.Namespace, **kw) -> tqdm:
    return progress_bar(args, **kw)


def _method(args: argparse.Namespace):
    from nucseg.model.lora import MethodConfig

    return MethodConfig(method=args.method, rank=args.rank, alpha=args.alpha,
                        targets=[t.strip() for t in args.targets.split(",") if t.strip()],
                        train_decoder=not args.freeze_decoder,
                        train_prompt_encoder=args.train_prompt_encoder, adapter_dim=args.adapter_dim,
                        adapter_scale=args.adapter_scale, dora=args.dora, rslora=args.rslora).validate()


def _train_cfg(args: argparse.Namespace):
    from nucseg.learn.augment import AugmentConfig
    from nucseg.learn.train import TrainConfig

    aug = AugmentConfig(flip=False, rot90=False, stain_jitter=0, brightness=0, contrast=0, saturation=0) \
        if args.no_augment else AugmentConfig()
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       dice_weight=args.dice_weight, balance_ce=args.balance_ce,
                       positive_prompts=args.prompts_per_tile,
                       box_fraction=args.box_fraction, seed=args.seed, device=args.device,
                       prompt_heads=not args.no_prompt_heads,
                       calibration_fraction=args.calibration_fraction, calibration_metric=args.calibration_metric,
                       bf16=not args.no_bf16, augment=aug).validate()


THRESHOLD_OPTIONS = ("pred_iou_thresh", "stability_thresh", "fg_threshold", "nms_iou", "min_area", "center_threshold")


def _infer_cfg(args: argparse.Namespace) -> dict:
    """The inference settings given on the command line; thresholds left unset (None) are not in it, so the
    adapter's calibrated ones (or the global defaults) apply (nucseg.learn.calibrate.resolve_infer)."""
    from nucseg.model.infer import InferConfig

    explicit = {"points_per_side": args.points_per_side, "decoder_batch": args.decoder_batch,
                "negative_prompts": args.negative_prompts}
    if args.prompts is not None:  # unset: the adapter's best calibrated mode (nucseg.learn.calibrate.choose_mode)
        explicit["prompts"] = args.prompts
    explicit.update({k: getattr(args, k) for k in THRESHOLD_OPTIONS if getattr(args, k, None) is not None})
    InferConfig(**explicit).validate()
    return explicit


def _say_thresholds(spec) -> dict | None:
    """Which prompt mode and thresholds this run uses, and from where (stderr, so stdout stays machine-readable)."""
    mode = spec.prompt_mode()
    if mode:
        print(f"prompts: {mode[0]} ({mode[1]})", file=sys.stderr)
    used = spec.thresholds_used()
    if used:
        from nucseg.learn.calibrate import describe_thresholds

        print(f"thresholds: {describe_thresholds(used)}", file=sys.stderr)
    return used


def _tiles(args: argparse.Namespace, input_size: int | None = 512):
    from nucseg.learn.data import few_shot, load_dataset

    tiles = load_dataset(args.data, tile_size=input_size, drop_empty=args.drop_empty and input_size is not None)
    if args.exemplars:
        tiles = few_shot(tiles, args.exemplars, args.synthesize, args.seed)
    elif args.synthesize:
        raise InputError("--synthesize needs --exemplars N")
    return tiles


def _training_callbacks(args: argparse.Namespace, total_epochs: int):
    state: dict = {}

    def on_start(trainable: int, total: int) -> None:
        print(f"trainable parameters: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)", file=sys.stderr)

    def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
        if state.get("epoch") != epoch:
            if "bar" in state:
                state["bar"].close()
            state["bar"] = _bar(args, total=steps, desc=f"epoch {epoch + 1}/{total_epochs}", leave=False)
            state["epoch"] = epoch
        state["bar"].update(1)
        state["bar"].set_postfix(loss=f"{loss:.4f}")

    def close() -> None:
        if "bar" in state:
            state["bar"].close()
            state.clear()

    return on_start, on_step, close


def train(args: argparse.Namespace) -> int:
    from nucseg.model.adapter import check_merge_output
    from nucseg.io import check_not_input, writable_dir
    from nucseg.learn.train import finetune

    method, cfg = _method(args), _train_cfg(args)
    check_not_input(args.out, [args.data])
    if args.merge:
        from nucseg.model.lora import check_mergeable

        check_mergeable(method)
        check_merge_output(args.merge, [args.data, args.checkpoint])
    tiles = _tiles(args, args.tile_size)
    writable_dir(args.out)  # after the data checks (a bad dataset leaves no folder), before any training
    print(f"data: {len(tiles)} tiles from {args.data}", file=sys.stderr)
    on_start, on_step, close = _training_callbacks(args, cfg.epochs)
    try:
        res = finetune(tiles, args.out, args.model, args.checkpoint, method, cfg, mpp=args.mpp, resume=True,
                       on_start=on_start, on_step=on_step)
    finally:
        close()
    print(f"final loss {res.history[-1].loss:.4f}; curves: {args.out / 'curves.png'}", file=sys.stderr)
    if args.merge:
        from nucseg.model.adapter import export_merged, load_adapter

        model, _ = load_adapter(res.adapter, args.checkpoint)
        print(f"merged model: {export_merged(model, args.merge)}", file=sys.stderr)
    if args.json:
        _emit_json({"adapter": res.adapter, "run": args.out, "trainable": res.trainable, "total": res.total,
                    "epochs": len(res.history), "final_loss": res.history[-1].loss if res.history else None,
                    "history": [vars(h) for h in res.history], "merged": args.merge})
    else:
        print(res.adapter)
    return 0


def cv(args: argparse.Namespace) -> int:
    from nucseg.learn.cv import CVConfig, run_cv, summary_markdown
    from nucseg.io import check_not_input, writable_dir

    method, cfg, icfg = _method(args), _train_cfg(args), _infer_cfg(args)
    check_not_input(args.out, [args.data])
    tiles = _tiles(args, None)  # whole images: run_cv cuts the training ones and scores validation whole
    writable_dir(args.out)
    on_start, on_step, close = _training_callbacks(args, cfg.epochs)

    def on_fold(fold: int, folds: int, what: str) -> None:
        close()
        print(f"fold {fold}/{folds}: {what}", file=sys.stderr)

    try:
        summary = run_cv(tiles, args.out, args.model, args.checkpoint, method, cfg, icfg,
                         CVConfig(folds=args.folds, seed=args.seed, group_by=args.group_by,
                                  overlays_per_fold=args.overlays, zero_shot=args.zero_shot,
                                  zero_shot_multimask=not args.zero_shot_single_mask, tile_size=args.tile_size,
                                  drop_empty=args.drop_empty),
                         mpp=args.mpp, on_fold=on_fold, on_start=on_start, on_step=on_step)
    finally:
        close()
    if args.json:
        _emit_json(json.loads((args.out / "summary.json").read_text()))
    else:
        print(summary_markdown(summary))
    print(f"summary: {args.out / 'summary.json'}", file=sys.stderr)
    return 0 if summary else 1


def evaluate(args: argparse.Namespace) -> int:
    from nucseg.learn.evaluate import evaluate_dirs
    from nucseg.io import json_safe

    result = evaluate_dirs(args.gt, args.pred, args.ambiguous)
    if args.json:
        print(json.dumps(json_safe({"per_image": result["per_image"], "mean": result["mean"]}), sort_keys=True))
        return 0
    keys = ("dice", "iou", "aji", "dq", "sq", "pq", "f1", "hd95")
    print("image".ljust(28) + "".join(k.rjust(8) for k in keys))
    for stem, m in result["per_image"].items():
        print(stem[:27].ljust(28) + "".join(f"{m[k]:8.3f}" for k in keys))
    print("mean".ljust(28) + "".join(f"{result['mean'][k]:8.3f}" for k in keys))
    return 0


def _segmenter_spec(args: argparse.Namespace):
    """What builds the segmenter, from the CLI flags; small and picklable, so dask workers build their own."""
    from nucseg.segmenter import SegmenterSpec

    kind = getattr(args, "segmenter", "sam")
    if kind == "threshold":
        return SegmenterSpec(kind="threshold", tile_size=args.tile_size, mpp=args.mpp)
    return SegmenterSpec.sam(args.adapter, args.checkpoint, args.model, args.device, _infer_cfg(args),
                             single_mask=getattr(args, "single_mask", False))


def segment(args: argparse.Namespace) -> int:
    from nucseg.io import read_rgb
    from nucseg.segment import plan_outputs, segment_image, write_label_map

    plan = plan_outputs(args.inputs, args.out)  # every output decided and checked before the model is built
    spec = _segmenter_spec(args)
    seg = spec.build()
    _say_thresholds(spec)
    done = []
    for path, out in _bar(args, iterable=plan, desc="segment", unit="image"):
        labels = segment_image(seg, read_rgb(path), args.batch_size)
        write_label_map(out, labels)
        done.append({"image": path, "labels": out, "nuclei": int(labels.max(initial=0))})
    if args.json:
        _emit_json({"out": args.out, "images": done, "nuclei": sum(d["nuclei"] for d in done)})
    else:
        print(args.out)
    return 0


def _slide_list(args: argparse.Namespace) -> tuple[list[Path], tuple[int, int] | None]:
    """Positional slides + --input-list, then this job's shard (--shard i/n, or the SLURM array task for lists)."""
    from nucseg.wsi.shard import read_slide_list, select

    listed = [Path(p) for p in read_slide_list(args.input_list)] if args.input_list else []
    if not args.slides and not listed:
        raise InputError("no slides given (positional paths or --input-list FILE)")
    return select(list(args.slides), listed, args.shard)


def predict(args: argparse.Namespace) -> int:
    from nucseg.wsi.predict import NUCLEI_SUFFIXES, PredictConfig, SlideOutputs, output_base, predict_slide

    slides, shard = _slide_list(args)
    if not args.out:
        raise InputError("give -o OUT.geojson (one slide) or --out-dir FOLDER (several)")
    _check_out_suffix(args.out, NUCLEI_SUFFIXES)
    if not slides:  # a spare task of a SLURM array (or --shard) with more tasks than slides: not an error
        print(f"nucseg: nothing to do for task {shard[0]} of {shard[1]}: fewer slides than tasks", file=sys.stderr)
        return _report([], args.json)
    spec = _segmenter_spec(args)
    cfg = PredictConfig(target_mpp=args.mpp, slide_mpp=args.slide_mpp, tile_size=args.tile_size,
                        overlap=args.overlap, batch_size=args.batch_size, tissue_mask=not args.no_tissue_mask,
                        cache_tiles=False if args.no_tile_cache else None, work_dir=args.work_dir, export_workers=args.export_workers,
                        measurements=args.measurements,
                        command=shlex.join(sys.argv)).validate()  # a bad value fails the run here, not every slide
    if args.tiles_per_task is not None and not args.scheduler:
        raise InputError("--tiles-per-task N (N >= 0) goes with --scheduler")
    single = len(slides) == 1 and args.out.name.endswith(NUCLEI_SUFFIXES)
    if single and not args.scheduler:
        named = SlideOutputs(csv=args.csv, preview=args.preview, tissue_preview=args.tissue_preview).extras(
            output_base(args.out))
        cfg.csv, cfg.preview, cfg.tissue_preview = named.get("csv"), named.get("preview"), named.get("tissue_preview")
        cfg.labels = args.labels
        cfg.roi, cfg.roi_class = args.roi, args.roi_class
        seg = spec.build()
        _say_thresholds(spec)
        view = SlideProgressView(args)
        try:
            summaries = [predict_slide(slides[0], args.out, seg, cfg, on_progress=view.event)]
        finally:
            view.close()
        return _report(summaries, args.json)
    if single or args.out.suffix in {"." + s.rsplit(".", 1)[1] for s in NUCLEI_SUFFIXES}:
        raise InputError(f"{args.out} looks like a file; several slides (or --scheduler) write into --out-dir FOLDER")
    if args.labels:
        raise InputError("--labels PATH is for one slide; with several, use --labels-all")
    if args.roi or args.roi_class:
        raise InputError("--roi is for one slide (its polygons are in that slide's pixels)")
    return _predict_batch(args, slides, shard, spec, cfg)


def _check_out_suffix(out: Path, known: tuple[str, ...]) -> None:
    """``-o`` ends in a known output suffix, or names a folder: ``-o x.shp`` is a mistake, not a folder."""
    if out.suffix and not out.name.endswith(known) and not out.is_dir():
        raise InputError(f"unknown output suffix {out.suffix!r} in {out}: name a file ending {', '.join(known)}, "
                         "or a folder (several slides; create it first if its name has a dot)")


def _predict_batch(args: argparse.Namespace, slides: list[Path], shard: tuple[int, int] | None, spec, cfg) -> int:
    """Many slides into --out-dir: skip finished ones, log every slide (JSON lines), write a run summary."""
    import contextlib

    from nucseg.io import writable_dir
    from nucseg.wsi.batch import check_output_names, predict_slides
    from nucseg.wsi.predict import SlideOutputs
    from nucseg.runlog import RunLog

    check_output_names(slides, args.out)
    outputs = SlideOutputs(gz=args.gz, parquet=args.parquet, csv=args.csv, labels=args.labels_all,
                           preview=args.preview)
    # Everything that would fail every slide fails here, before anything is written.
    if args.scheduler:
        from nucseg.wsi.distributed import check_cluster_settings

        check_cluster_settings(cfg, *([] if args.tiles_per_task is None else [args.tiles_per_task]))
        spec.check()  # the workers load the weights; the client only checks what it cheaply can
        client, seg = _connect(args.scheduler), None
    else:
        client, seg = None, spec.build()
    with client or contextlib.nullcontext():
        out = writable_dir(args.out)
        summaries = []
        with RunLog(out, len(slides), shard) as runlog:
            runlog.summary.thresholds = _say_thresholds(spec)
            if client is not None:
                summaries = _predict_on_cluster(args, client, slides, spec, cfg, outputs, runlog)
            else:
                view = SlideProgressView(args)

                def finished(summary: dict) -> None:
                    runlog.finish(summary)
                    view.slide_done(summary)

                try:
                    summaries = predict_slides(slides, out, seg, cfg, on_start=runlog.start, on_result=finished,
                                               outputs=outputs, on_progress=view.event,
                                               overwrite=args.overwrite)
                finally:
                    view.close()
    print(f"run log: {runlog.path}; summary: {runlog.summary_path}", file=sys.stderr)
    return _report(summaries, args.json)


def _connect(scheduler: str):
    """A dask client for --scheduler: an address (tcp://host:8786) or a scheduler file."""
    from dask.distributed import Client

    target = {"scheduler_file": scheduler} if Path(scheduler).is_file() else {"address": scheduler}
    try:
        return Client(**target, timeout="30s")
    except (OSError, TimeoutError, ValueError) as err:
        raise InputError(f"cannot reach the dask scheduler {scheduler}: {' '.join(str(err).split())}") from None


def _predict_on_cluster(args: argparse.Namespace, client, slides: list[Path], spec, cfg, outputs,
                        runlog) -> list:
    """--scheduler: slides (large ones in tile ranges) on the dask cluster, logged as each finishes."""
    from nucseg.wsi.distributed import predict_distributed

    bar = _bar(args, total=len(slides), unit="slide", desc="slides")

    def done(summary: dict) -> None:
        runlog.finish(summary)
        bar.update(1)
        for note in summary.get("warnings") or []:  # raised on a worker: its log is not this terminal
            print(f"nucseg: warning: {note}", file=sys.stderr)

    try:
        split = {} if args.tiles_per_task is None else {"tiles_per_task": args.tiles_per_task}
        return predict_distributed(client, slides, args.out, spec, cfg, on_start=runlog.start, on_result=done,
                                   outputs=outputs, overwrite=args.overwrite, **split)
    finally:
        bar.close()


def _report(summaries: list, as_json: bool = False) -> int:
    """One line per slide on stdout (``--json``: one object), failures on stderr; exit 9 when some slides of a
    batch failed."""
    failed = 0
    dicts = [s.to_dict() for s in summaries]
    for d in dicts:
        if d.get("error"):
            failed += 1
            print(f"nucseg: error: {d['slide']}: {d['error']}", file=sys.stderr)
            continue
        state = "skipped (done)" if d.get("skipped") else f"{d['seconds']:.1f} s"
        print(f"{d['slide']}: {d['nuclei']} nuclei, {d['tissue_tiles']}/{d['tiles']} tissue tiles, "
              f"{d['tissue_area_mm2']:.2f} mm² tissue, {state} -> {d['output']}", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        _emit_json({"slides": dicts, "failed": failed, "nuclei": sum(d["nuclei"] or 0 for d in dicts),
                    "warnings": [w for d in dicts for w in d.get("warnings") or []]})
    if failed:
        print(f"nucseg: {failed} of {len(summaries)} slides failed; rerun to retry them", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def weights(args: argparse.Namespace) -> int:
    from nucseg.model import weights as w
    from nucseg.io import sha256_file

    if args.action == "list":
        for info in w.list_weights():
            size = f"{info.size_bytes / 1e6:.0f} MB" if info.size_bytes else "size n/a"
            print(f"{info.name:6} {info.sha256[:12]}  {size:>9}  {info.url}")
        print(f"cache: {w.cache_dir()}")
        return 0
    if args.action == "fetch":
        bar = _bar(args, unit="B", unit_scale=True, desc=args.name)

        def progress(done: int, total: int | None) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            path = w.fetch(args.name, args.dest, progress=progress, base_url=args.base_url)
        finally:
            bar.close()
        print(path)
        return 0
    info = w.verify(args.file)
    if info is None:
        print(f"{args.file}: not an official SAM checkpoint (SHA-256 {sha256_file(args.file)[:12]}...)")
        return 1
    print(f"{args.file}: official {info.name} ({info.sha256[:12]}...)")
    return 0


def merge(args: argparse.Namespace) -> int:
    from nucseg.model.adapter import check_merge_output, export_merged, load_adapter, read_adapter
    from nucseg.errors import CheckpointError
    from nucseg.model.lora import check_mergeable

    check_merge_output(args.out, [args.adapter, args.checkpoint])
    check_mergeable(read_adapter(args.adapter).method, CheckpointError)  # before the base is built
    model, _ = load_adapter(args.adapter, args.checkpoint)
    print(export_merged(model, args.out))
    return 0


def import_qupath(args: argparse.Namespace) -> int:
    from nucseg.wsi.qupath import ImportConfig, import_qupath as run

    report = run(args.image, args.geojson, args.out,
                 ImportConfig(organ=args.organ, tile_size=args.tile_size, mpp=args.mpp, slide_mpp=args.slide_mpp,
                              region_class=args.region_class))
    print(f"{report['tiles']} tiles, {report['nuclei']} nuclei ({report['repaired_invalid']} repaired, "
          f"{report['overlap_pixels']} overlapping pixels left ambiguous) -> {args.out / args.organ}",
          file=sys.stderr)
    print(args.out)
    return 0


def demo_data(args: argparse.Namespace) -> int:
    from nucseg.learn.demo import make_demo_dataset

    print(make_demo_dataset(args.out, tiles_per_organ=args.tiles_per_organ, size=args.size, seed=args.seed))
    return 0


def export_peft(args: argparse.Namespace) -> int:
    from nucseg.model.peft_export import ExportOptions, export_peft as run

    options = ExportOptions(args.flavour, args.base_model, args.license, tuple(args.dataset or ()))
    print(run(args.adapter, args.out, args.checkpoint, options))
    return 0


def data(args: argparse.Namespace) -> int:
    from nucseg.learn.datasets import fetch_dataset

    bar = _bar(args, unit="B", unit_scale=True, desc=args.name)

    def progress(done: int, total: int) -> None:
        bar.total = total or None
        bar.n = done
        bar.refresh()

    try:
        root = fetch_dataset(args.name, args.dir, progress=progress, keep_archive=args.keep_archive,
                             base_url=args.base_url)
    finally:
        bar.close()
    print(root)
def calibrate(args: argparse.Namespace) -> int:
    from nucseg.model.adapter import load_adapter, write_thresholds
    from nucseg.learn.calibrate import CalibrationConfig, calibrate as run_calibration, describe_thresholds, resolve_infer
    from nucseg.learn.data import load_dataset
    from nucseg.segmenter import sam_segmenter

    model, info = load_adapter(args.adapter, args.checkpoint)
    tiles = load_dataset(args.data, tile_size=info.input_size)
    print(f"calibrating on {len(tiles)} tiles from {args.data}", file=sys.stderr)
    results = {}
    for mode in ["auto"] + [m for m in info.modes if m in ("centers", "none")]:  # every mode the adapter supports
        # the search starts from the global defaults, not the adapter's current thresholds
        seg = sam_segmenter(model, {"points_per_side": args.points_per_side, "prompts": mode,
                                    "negative_prompts": args.negative_prompts}, None, args.device, mpp=info.mpp)
        bar = _bar(args, total=len(tiles), unit="tile", desc=f"{mode}")
        try:
            res = run_calibration(seg, tiles, CalibrationConfig(metric=args.metric),
                                  on_progress=lambda done, total: bar.update(done - bar.n))
        finally:
            bar.close()
        t = results[mode] = res.thresholds
        old = info.mode_thresholds.get(mode)
        if old:
            print(f"previous ({mode}): {describe_thresholds(resolve_infer({'prompts': mode}, old, {mode: old})[1])}",
                  file=sys.stderr)
        print(f"prompts {mode}: {t['metric']} {t['default_score']:.3f} with the global defaults -> {t['score']:.3f} "
              f"calibrated ({res.evaluated} settings in {res.seconds:.0f} s)", file=sys.stderr)
    learned = {m: t for m, t in results.items() if m != "auto"}
    print(json.dumps({**results["auto"], **({"mode_thresholds": learned} if learned else {})}, sort_keys=True))
    if not args.dry_run:
        write_thresholds(args.adapter, results["auto"], learned)
        print(f"thresholds written to {args.adapter / 'nucseg.json'}", file=sys.stderr)
    return 0
