"""`make demo`: the main job end to end on data the project makes itself, in about 2 minutes on 2 CPU cores.

1. a small synthetic NuInsSeg-layout dataset (two "organs") and a synthetic pyramidal slide;
0. on the first run only, the demo base is built (scripts/make_demo_base.py; weights are never committed);
2. cross-validation: each fold fine-tunes the small pre-trained vit_tiny base of adapters/demo-base (SAM's
   architecture; no official weights are needed on a fresh machine) with LoRA, as a user fine-tunes vit_b,
   calibrates its inference thresholds on tiles held back from its training set, and is scored on its
   validation tiles — per-fold metrics, overlays, curves, mean ± std, and the base (zero-shot, thresholds
   calibrated on the same held-back tiles) beside it;
3. whole-slide prediction with fold 1's adapter and its calibrated thresholds — GeoJSON, CSV and a preview;
4. REPORT.md tying it together. The last line printed is the report's path.

The recipe is nucseg.learn.demo.QUICK; ``--full`` runs nucseg.learn.demo.FULL (more tiles, 5 folds, longer
training).
The numbers are those of a tiny model on synthetic tiles: they show the pipeline working, not SAM's accuracy
on real tissue (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (nucseg.threads)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from nucseg.threads import configure_threads  # noqa: E402

# Work units of the phases after training, in training steps (measured on the QUICK recipe, 2 CPU cores):
# for the ETA only.
CALIBRATE_UNITS, SCORE_UNITS, ZERO_SHOT_UNITS, SLIDE_UNITS = 12, 4, 16, 30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--full", action="store_true", help="the long demo (nucseg.learn.demo.FULL): tens of minutes")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs per fold")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the CPUs given)")
    args = ap.parse_args()
    threads = configure_threads(args.threads)

    from nucseg.learn.cv import run_cv
    from nucseg.learn.cv import CVConfig
    from nucseg.learn.data import load_dataset
    from nucseg.errors import CheckpointError
    from nucseg.learn.demo import BASE_DIR, BASE_FILE, FULL, QUICK, Eta, make_demo_dataset
    from nucseg.segmenter import SegmenterSpec
    from nucseg.io import JsonMark, write_json
    from nucseg.wsi.predict import PredictConfig, predict_slide
    from nucseg.wsi.synthslide import make_synthetic_slide

    recipe = FULL if args.full else QUICK
    if args.epochs:
        recipe = dataclasses.replace(recipe, epochs=args.epochs)
    out = args.out.resolve()
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:5.0f} s] {msg}", file=sys.stderr, flush=True)

    if recipe.pretrained and not (BASE_DIR / BASE_FILE).is_file():
        say("0/4 building the demo base once (weights are not kept in the repository): vit_tiny from scratch on "
            "synthetic tiles, about 5 min on one CPU core; later runs reuse it")
        # One thread whatever the CPUs: the pinned recipe's numerics (those of the reference build), and on this
        # small model a second thread does not help (fresh clones on the idle 2-core VM, 2026-12-01: 6.7 s per
        # epoch with 2 threads, 6.3 s with 1; README "The demo").
        cmd = [sys.executable, str(Path(__file__).with_name("make_demo_base.py")), "--install",
               "--out", str(out / "demo-base-build"), "--threads", "1"]
        if subprocess.run(cmd).returncode:
            raise CheckpointError("building the demo base failed (see above); rerun make demo to resume it")
    base = recipe.checkpoint()  # checked (SHA-256 of the build's record) before any work
    folds = recipe.folds
    eta = Eta(recipe.steps() + folds * (CALIBRATE_UNITS + SCORE_UNITS + ZERO_SHOT_UNITS) + SLIDE_UNITS, say)
    say(f"1/4 generating demo data ({threads.threads} threads: {threads.source})")
    data = make_demo_dataset(out / "data", tiles_per_organ=recipe.tiles_per_organ, size=recipe.size,
                             seed=recipe.seed, zoom=recipe.zoom, stain=recipe.stain)
    slide, truth = out / "demo_slide.tif", out / "demo_slide.truth.json"
    if not (slide.exists() and truth.exists()):
        labels = make_synthetic_slide(slide, recipe.slide_px, recipe.slide_px, mpp=0.5, seed=1)
        write_json(truth, {"nuclei": int(labels.max())}, JsonMark("demo-truth"))
    true_nuclei = json.loads(truth.read_text())["nuclei"]

    say(f"2/4 cross-validation: {'LoRA on the pre-trained vit_tiny demo base' if base else 'vit_tiny from scratch'}, "
        f"{folds} folds x {recipe.epochs} epochs, {recipe.size} px tiles")
    tiles = load_dataset(data, tile_size=recipe.size)
    train = recipe.train_config()

    def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
        eta.add(1, f"   epoch {epoch + 1}/{recipe.epochs}, loss {loss:.3f}")

    calibrated = set()

    def on_fold(f: int, n: int, what: str) -> None:
        if what.startswith("calibrated"):  # first the adapter's, then the zero-shot base's thresholds
            eta.add(CALIBRATE_UNITS + SCORE_UNITS if f not in calibrated else ZERO_SHOT_UNITS)
            calibrated.add(f)
        elif what.startswith("done already"):
            eta.add(recipe.steps() / folds + CALIBRATE_UNITS + SCORE_UNITS + ZERO_SHOT_UNITS)
        eta.add(0, f"   fold {f}/{n}: {what}", every=0)

    summary = run_cv(tiles, out / "cv", "vit_tiny", base, recipe.method(), train, recipe.infer(),
                     CVConfig(folds=folds, seed=recipe.seed, zero_shot=True, zero_shot_multimask=False),
                     mpp=recipe.mpp, on_fold=on_fold, on_step=on_step)

    say("3/4 whole-slide prediction with fold 1's adapter and its calibrated thresholds")
    spec = SegmenterSpec.sam(adapter=out / "cv" / "fold_1" / "train" / "adapter", checkpoint=base, device="cpu",
                             infer=recipe.infer())
    seg = spec.build()
    res = predict_slide(slide, out / "demo_slide.geojson", seg,
                        PredictConfig(batch_size=8, overlap=recipe.overlap, csv=out / "demo_slide.csv", preview=out / "demo_slide.preview.png",
                                      work_dir=out / "work"),
                        progress=lambda done, total: eta.add(0, f"   slide tiles {done}/{total}"))
    eta.add(SLIDE_UNITS)

    say("4/4 writing the report")
    seconds = time.time() - t0
    report = write_report(out, recipe, summary, res, true_nuclei, spec.thresholds_used(), seconds, threads,
                          args.full)
    (out / "demo_summary.json").write_text(json.dumps(
        {"cv": summary["fine_tuned"], "zero_shot": summary["zero_shot"], "slide": res.to_dict(),
         "recipe": dataclasses.asdict(recipe), "seconds": seconds}, indent=2, default=str))
    say(f"done in {seconds:.0f} s")
    print(report)
    return 0


def write_report(out: Path, recipe, summary: dict, res, true_nuclei: int, thresholds: dict, seconds: float, threads,
                 full: bool) -> Path:
    from nucseg.learn.calibrate import describe_thresholds
    from nucseg.io import TextMark, write_text

    ft, zs = summary["fine_tuned"], summary["zero_shot"]
    if recipe.pretrained:
        model = ("the pre-trained demo base `adapters/demo-base` (built by `scripts/make_demo_base.py` from "
                 "synthetic tiles of other seeds, with Macenko's stain vectors; the demo tiles use Ruifrok & Johnston's) "
                 "fine-tuned with LoRA rank 4 on q, v and the mask decoder")
        zero_what = "pre-trained, not fine-tuned"
    else:
        model = "random init, every weight trained from scratch"
        zero_what = "untrained"
    rows = "\n".join(f"| {m} | {ft[m]['mean']:.3f} ± {ft[m]['std']:.3f} | {zs[m]['mean']:.3f} |"
                     for m in ("pq", "f1", "dq", "sq", "aji", "dice"))
    per_fold = "\n".join(f"- fold {f['fold']} ({f['val_tiles']} validation tiles): PQ {f['mean']['pq']:.3f}, "
                         f"F1 {f['mean']['f1']:.3f}; thresholds {describe_thresholds(f['thresholds'])}"
                         for f in summary["folds"] if f.get("thresholds"))
    text = f"""# nucseg demo report

{'`scripts/demo.py --full`' if full else '`make demo`'}: synthetic data made by `nucseg.learn.demo`
({summary['tiles']} tiles of {recipe.size} px, 2 organs, nuclei 8-20 px rendered at
{recipe.zoom}x) and a synthetic {recipe.slide_px}² slide at 0.5 µm/px; model vit_tiny (SAM architecture), {model},
{recipe.epochs} epochs per fold, lr {recipe.lr}, batch {recipe.batch_size}, CPU with {threads.threads} threads.
Total {seconds:.0f} s.

## Cross-validation ({summary['folds_total']} folds) — `cv/summary.md`

Validation tiles of each fold were never trained on; each fold's inference thresholds were calibrated on tiles
held back from its own training set, and so were the zero-shot base's (on the same tiles).

| metric | fine-tuned (mean ± std) | zero-shot base ({zero_what}) |
|---|---|---|
{rows}

{per_fold}

Per fold: `cv/fold_*/metrics.json`; pictures (tile | truth | prediction): `cv/fold_*/overlays/`;
training curves: `cv/fold_*/train/curves.png`; adapters: `cv/fold_*/train/adapter/`.

## Whole slide — `demo_slide.geojson`

{res.nuclei} nuclei found (the slide has {true_nuclei}) in {res.tissue_tiles} tissue tiles ({res.tissue_area_mm2:.2f} mm²) in {res.seconds:.1f} s,
read at {recipe.mpp} µm/px (the adapter's), thresholds {describe_thresholds(thresholds)}.
Open `demo_slide.geojson` in QuPath (File > Import objects) over `demo_slide.tif`; `demo_slide.csv` has one row
per nucleus; `demo_slide.preview.png` shows the outlines.
"""
    report = out / "REPORT.md"
    write_text(report, text, TextMark("demo-report"))
    return report


if __name__ == "__main__":
    from nucseg.errors import NucsegError

    try:
        sys.exit(main())
    except NucsegError as err:  # a missing or altered demo base, a full disk...: one line, its exit code
        print(f"demo: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
