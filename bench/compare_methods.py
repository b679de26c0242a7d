"""Every fine-tuning method on the same grouped folds: trainable parameters, training time, peak memory, accuracy.

Methods (README, "Models and adapters"): the base zero-shot; decoder only; LoRA r4 on q,v (SAMed); LoRA r4
+ DoRA on the whole qkv (through peft); SAM-Adapter; Med-SA (2D parts); full fine-tuning. Each method is
``nucseg.learn.cv.run_cv`` with the same folds (grouped by source image, seed 42), the same training settings and the
same automatic prompting, run in a fresh process so that its peak memory is its own.

CPU run on the shared real tiles with the tiny glioblastoma-pretrained base (bench/pretrain_tiny.py), the
glioma tiles being the new task, as bench/bench_learning.py:

    python bench/compare_methods.py --folds 3 --epochs 3 --jobs 2

vit_b on NuInsSeg on a GPU (official checkpoint; not run here, no GPU in this session):

    python bench/compare_methods.py --data NuInsSeg/ --model vit_b --base sam_vit_b_01ec64.pth \
        --tile-size 512 --folds 5 --epochs 40 --lr 1e-4 --points-per-side 32 --pred-iou-thresh 0.5 \
        --stability-thresh 0.8 --zero-shot-multimask --device cuda --out runs/compare_vitb

Writes bench/results/methods_<device>.json / .md / .png (PQ against trainable parameters, fold spread).
A rerun skips finished folds (run_cv resumes), so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, SAMPLE, TINY_BASE, bench_weights, provenance, write_report  # noqa: E402

from nucseg.model.lora import MethodConfig  # noqa: E402

METHODS: dict[str, tuple[MethodConfig | None, str]] = {
    "zero-shot": (None, "the base model, no training"),
    "decoder": (MethodConfig(method="decoder"), "mask decoder only (MedSAM-style decoder tuning)"),
    "lora": (MethodConfig(), "LoRA r4 on q,v + decoder (SAMed, Zhang & Liu 2023)"),
    "lora-dora": (MethodConfig(targets=["qkv"], dora=True),
                  "LoRA r4 + DoRA on qkv via peft + decoder (DoRA, Liu et al. 2024)"),
    "adapter": (MethodConfig(method="adapter"), "SAM-Adapter + decoder (Chen et al. 2023)"),
    "medsa": (MethodConfig(method="medsa"), "Med-SA 2D adapters + decoder (Wu et al. 2023)"),
    "full": (MethodConfig(method="full"), "full fine-tuning of encoder + decoder (MedSAM, Ma et al. 2024)"),
}
SHOWN = ("dice", "aji", "pq", "f1")


def _configs(args):
    from nucseg.model.infer import InferConfig
    from nucseg.learn.train import TrainConfig

    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                        balance_ce=not args.no_balance_ce, seed=42)
    infer = InferConfig(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                        stability_thresh=args.stability_thresh)
    return train, infer


def _peak_memory_mib(device: str) -> tuple[float, str]:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS of the process"


def run_one(name: str, args) -> dict:
    """One method's cross-validation in this process; returns its row of the table."""
    from nucseg.learn.cv import CVConfig, make_folds, run_cv, score
    from nucseg.learn.data import load_dataset
    from nucseg.model.infer import InferConfig, SamTileSegmenter
    from nucseg.model.sam import load_sam
    from nucseg.device import pick_device

    torch.set_num_threads(args.threads)
    tiles = load_dataset(args.data, tile_size=args.tile_size, drop_empty=True)
    train, infer = _configs(args)
    device = pick_device(args.device)
    cfg, _ = METHODS[name]
    t0 = time.perf_counter()
    folds: list[dict] = []
    train_seconds: list[float] = []
    if cfg is None:
        base, _ = load_sam(args.model, args.base, img_size=args.tile_size, seed=42)
        zcfg = InferConfig(**{**infer.to_dict(), "multimask": args.zero_shot_multimask})
        seg = SamTileSegmenter(base, zcfg, device=device)
        for f, val_idx in enumerate(make_folds(tiles, args.folds, 42, "image"), start=1):
            result, _ = score(seg, [tiles[i] for i in val_idx], train.batch_size)
            folds.append({"fold": f, "val_tiles": len(val_idx), "mean": result["mean"]})
        trainable, total = 0, sum(p.numel() for p in base.parameters())
    else:
        out = args.out / name
        summary = run_cv(tiles, out, args.model, args.base, cfg, train, infer,
                         CVConfig(folds=args.folds, seed=42, group_by="image", overlays_per_fold=0),
                         on_fold=lambda f, n, what: print(f"{name} fold {f}/{n}: {what}", file=sys.stderr, flush=True))
        folds = summary["folds"]
        meta = json.loads((out / "fold_1" / "train" / "adapter" / "nucseg.json").read_text())
        trainable, total = meta["parameters"]["trainable"], meta["parameters"]["total"]
        for f in range(1, args.folds + 1):
            hist = json.loads((out / f"fold_{f}" / "train" / "history.json").read_text())["epochs"]
            train_seconds.append(sum(h["seconds"] for h in hist))
    peak, how = _peak_memory_mib(device.type)
    pq = [f["mean"]["pq"] for f in folds]
    return {
        "method": name,
        "description": METHODS[name][1],
        "config": None if cfg is None else cfg.to_dict(),
        "trainable": trainable,
        "total": total,
        "train_seconds_per_fold": float(np.mean(train_seconds)) if train_seconds else 0.0,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "peak_memory_mib": round(peak, 1),
        "peak_memory_kind": how,
        "folds": folds,
        "mean": {m: float(np.nanmean([f["mean"][m] for f in folds])) for m in SHOWN},
        "std": {m: float(np.nanstd([f["mean"][m] for f in folds], ddof=1)) if len(folds) > 1 else 0.0 for m in SHOWN},
        "pq_per_fold": pq,
    }


def table(rows: list[dict]) -> str:
    lines = ["| method | trainable params | % of total | train s / fold | peak MiB | Dice | AJI | PQ | F1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r['mean'][m]:.3f} ± {r['std'][m]:.3f}" for m in SHOWN]
        lines.append(f"| {r['method']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f} | "
                     f"{r['train_seconds_per_fold']:.0f} | {r['peak_memory_mib']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        x = max(r["trainable"], 1)
        ax.errorbar([x], [r["mean"]["pq"]], yerr=[r["std"]["pq"]], fmt="o", capsize=4, label=r["method"])
        ax.scatter([x] * len(r["pq_per_fold"]), r["pq_per_fold"], s=10, color="grey", alpha=0.6, zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log; zero-shot drawn at 1)")
    ax.set_ylabel("PQ (mean ± std over folds; grey: folds)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wait_first(running: list[tuple[str, subprocess.Popen]]) -> None:
    """Wait until one of the running method processes ends; a failed one stops the comparison."""
    while True:
        for i, (name, proc) in enumerate(running):
            if proc.poll() is not None:
                running.pop(i)
                if proc.returncode:
                    raise SystemExit(f"method {name} failed (exit {proc.returncode})")
                return
        time.sleep(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SAMPLE / "human glioma", help="NuInsSeg-layout folder")
    ap.add_argument("--model", default="vit_tiny", help="SAM variant of the base")
    ap.add_argument("--base", type=Path, default=TINY_BASE, help="base checkpoint (official keys)")
    ap.add_argument("--out", type=Path, default=REPO / "runs/compare", help="run folder (one cv folder per method)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--tile-size", type=int, default=256, help="tile side (the tiny base was trained at 256)")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--no-balance-ce", action="store_true", help="plain CE (the tiny base needs the balanced one)")
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.3, help="0.3 for the tiny base, 0.5 for SAM")
    ap.add_argument("--stability-thresh", type=float, default=0.5, help="0.5 for the tiny base, 0.8 for SAM")
    ap.add_argument("--zero-shot-multimask", action="store_true",
                    help="zero-shot with SAM's 3 ambiguity masks (official SAM); the tiny base trained output 0 only")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per method process")
    ap.add_argument("--jobs", type=int, default=1,
                    help="methods run at the same time (each in its own process; timings then share the CPU)")
    ap.add_argument("--results", type=Path, default=None, help="output prefix (default bench/results/methods_<device>)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        row = run_one(args.child, args)
        args.child_out.write_text(json.dumps(row, indent=2))
        return 0
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if not args.base.is_file():
        print(f"base checkpoint {args.base} missing: run bench/pretrain_tiny.py first", file=sys.stderr)
        return 2
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    prefix = args.results or REPO / "bench" / "results" / f"methods_{device}"
    args.out.mkdir(parents=True, exist_ok=True)
    started = provenance()  # machine load at the start; the run takes a while
    running: list[tuple[str, subprocess.Popen]] = []
    for name in names:  # each method in its own process (its own peak memory), --jobs at a time
        while len(running) >= args.jobs:
            _wait_first(running)
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", name, "--child-out", str(args.out / f"{name}.json")]
        print(f"== {name}", file=sys.stderr, flush=True)
        running.append((name, subprocess.Popen(cmd)))
    while running:
        _wait_first(running)
    rows = [json.loads((args.out / f"{name}.json").read_text()) for name in names]
    ok = [r for r in rows if all(math.isfinite(r["mean"][m]) for m in SHOWN)]
    title = (f"{args.model} on {args.data.name}: {args.folds} folds by image, {args.epochs} epochs, "
             f"{args.tile_size} px tiles ({device})")
    report = {**started, "finished": provenance()["date"], "jobs": args.jobs, "threads": args.threads, "title": title, "data": str(args.data),
              "model": args.model, "base": args.base.name, "weights": bench_weights(None, args.base), "tile_size": args.tile_size, "folds": args.folds,
              "training": _configs(args)[0].to_dict(), "inference": _configs(args)[1].to_dict(), "methods": rows}
    write_report(prefix.with_suffix(".json"), report)
    md = f"# {title}\n\n{table(rows)}\n\nMean ± std over folds of the per-fold mean over validation tiles.\n"
    prefix.with_suffix(".md").write_text(md)
    plot(ok, prefix.with_suffix(".png"), title)
    print(md)
    print(prefix.with_suffix(".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
