"""`make demo`: the main job end to end on data the project makes itself, in about 2 minutes on 2 CPU cores.

1. a small synthetic NuInsSeg-layout dataset (two "organs") and a synthetic pyramidal slide of the same tissue,
   unlike what the base was trained on (another stain, large vesicular nuclei next to small dark lymphocytes,
   many touching: nucseg.learn.demo, cells="mixed");
2. cross-validation: each fold fine-tunes the small pre-trained vit_tiny base of adapters/demo-base (SAM's
   architecture, committed to the repository, never built here; no official weights are needed on a fresh
   machine), calibrates its inference thresholds on tiles held back from its training set, and is scored on
   its validation tiles — per-fold metrics, overlays, curves, mean ± std, and the base (zero-shot, thresholds
   calibrated on the same held-back tiles) beside it;
3. whole-slide prediction with fold 1's adapter and with the zero-shot base, each with its calibrated
   thresholds — GeoJSON, CSV and a preview each, and the true nuclei found by size class;
4. the before/after pictures (a validation tile, the slide) and REPORT.md tying it together, with the time of
   each step. The last line printed is the report's path.

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
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

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
    from nucseg.learn.demo import FULL, QUICK, Eta, make_demo_dataset, make_demo_slide
    from nucseg.io import SOFTWARE, JsonMark, atomic_path, is_nucseg_tiff, write_json

    recipe = FULL if args.full else QUICK
    if args.epochs:
        recipe = dataclasses.replace(recipe, epochs=args.epochs)
    out = args.out.resolve()
    t0 = time.time()
    steps: dict[str, dict] = {}  # wall and CPU seconds of each step (CPU: this process's threads), for the report

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:5.0f} s] {msg}", file=sys.stderr, flush=True)

    cpu = [time.process_time()]

    def lap(name: str, since: float) -> float:
        now, c = time.time(), time.process_time()
        steps[name] = {"wall": now - since, "cpu": c - cpu[0]}
        cpu[0] = c
        return now

    # the committed base (adapters/demo-base), checked against its recorded SHA-256 before any work; never built
    # here (scripts/make_demo_base.py is the documented rebuild)
    base = recipe.checkpoint()
    folds = recipe.folds
    eta = Eta(recipe.steps() + folds * (CALIBRATE_UNITS + SCORE_UNITS + ZERO_SHOT_UNITS) + 2 * SLIDE_UNITS, say)
    say(f"1/4 generating demo data ({threads.threads} threads: {threads.source})")
    data = make_demo_dataset(out / "data", tiles_per_organ=recipe.tiles_per_organ, size=recipe.size,
                             seed=recipe.seed, zoom=recipe.zoom, stain=recipe.stain, cells=recipe.cells)
    slide, truth_path = out / "demo_slide.tif", out / "demo_slide.truth.tif"
    if not (slide.exists() and truth_path.exists()):
        truth = make_demo_slide(slide, recipe.slide_px, seed=1, stain=recipe.stain, cells=recipe.cells,
                                mpp=recipe.mpp * recipe.zoom)
        with atomic_path(truth_path, owned=is_nucseg_tiff) as tmp:  # replaces only a truth map nucseg wrote
            tifffile.imwrite(tmp, truth.astype(np.uint16), software=SOFTWARE)
    # the truth at the tiles' resolution (the slide is their render, scanned at zoom x): nuclei are matched
    # there, as on the tiles, not on the coarser slide pixels
    truth = np.kron(tifffile.imread(truth_path).astype(np.int32), np.ones((recipe.zoom,) * 2, np.int32))
    t = lap("1. demo data and slide", t0)

    what = f"fine-tuning ({recipe.method().describe()}) the pre-trained vit_tiny demo base" if base else \
        "vit_tiny from scratch"
    say(f"2/4 cross-validation: {what}, "
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

    cv_cfg = CVConfig(folds=folds, seed=recipe.seed, zero_shot=True, zero_shot_multimask=False)
    summary = run_cv(tiles, out / "cv", "vit_tiny", base, recipe.method(), train, recipe.infer(), cv_cfg,
                     mpp=recipe.mpp, on_fold=on_fold, on_step=on_step)
    t = lap("2. cross-validation (fine-tune, calibrate, score; zero-shot base calibrated and scored)", t)

    say("3/4 whole-slide prediction with fold 1's adapter and with the zero-shot base, each with its thresholds")
    fine, zero = fold_segmenters(out, recipe, base, summary)
    slides = {}
    for name, seg in (("fine-tuned", fine), ("zero-shot", zero)):
        stem = out / ("demo_slide" if name == "fine-tuned" else "demo_slide.zero_shot")
        slides[name] = predict_demo_slide(slide, stem, seg, recipe, truth,
                                          lambda done, total, n=name: eta.add(0, f"   {n}: slide tiles {done}/{total}"))
        eta.add(SLIDE_UNITS)
    t = lap("3. whole-slide prediction (fine-tuned and zero-shot)", t)

    say("4/4 writing the pictures and the report")
    pictures = {"tile": compare_tile(out / "compare_tile.png", tiles, recipe, cv_cfg, fine, zero),
                "slide": compare_slide(out / "compare_slide.png", slide, truth, slides)}
    lap("4. pictures and report", t)
    seconds = time.time() - t0
    report = write_report(out, recipe, summary, slides, int(truth.max()), fine.thresholds_used, steps, pictures,
                          seconds, threads, args.full)
    write_json(out / "demo_summary.json", json.loads(json.dumps(  # default=str: paths in the recipe as text
        {"cv": summary["fine_tuned"], "zero_shot": summary["zero_shot"],
         "slide": {k: {"result": v["result"].to_dict(), "recall_by_size": v["recall"]} for k, v in slides.items()},
         "steps_seconds": steps, "recipe": dataclasses.asdict(recipe), "seconds": seconds}, default=str)),
        JsonMark("demo-summary"))
    say(f"done in {seconds:.0f} s")
    print(report)
    return 0


def fold_segmenters(out: Path, recipe, base: Path, summary: dict):
    """Fold 1's fine-tuned segmenter (its adapter's calibrated thresholds) and the zero-shot base's (the
    thresholds calibrated for it on the same held-back tiles; one mask per prompt: a base nucseg trained)."""
    from nucseg.model.adapter import load_adapter
    from nucseg.model.sam import load_sam
    from nucseg.segmenter import sam_segmenter, zero_shot_settings

    model, info = load_adapter(out / "cv" / "fold_1" / "train" / "adapter", base)
    fine = sam_segmenter(model, recipe.infer(), info.thresholds, "cpu", mpp=recipe.mpp,
                         identity=f"{info.meta['base']['fingerprint']}+{info.meta['weights_sha256']}")
    zt = {k: v["value"] for k, v in (summary["zero_shot_thresholds"][0]["thresholds"] or {}).items()}
    base_model, fingerprint = load_sam("vit_tiny", base, img_size=recipe.size)
    zero = sam_segmenter(base_model, zero_shot_settings({**recipe.infer(), **zt}, True), None, "cpu",
                         mpp=recipe.mpp, identity=f"{fingerprint}+zero-shot")
    return fine, zero


def predict_demo_slide(slide: Path, stem: Path, seg, recipe, truth: np.ndarray, progress) -> dict:
    """Predict the slide (GeoJSON, CSV, preview) and count the true nuclei (``truth``, at the tiles' resolution)
    found, by size class."""
    from nucseg.learn.demo import recall_by_size
    from nucseg.wsi.predict import PredictConfig, predict_slide
    from nucseg.wsi.qupath import rasterize, read_qupath_objects

    geojson = Path(f"{stem}.geojson")
    res = predict_slide(slide, geojson, seg,
                        PredictConfig(batch_size=8, overlap=recipe.overlap, csv=Path(f"{stem}.csv"),
                                      preview=Path(f"{stem}.preview.png"), work_dir=stem.parent / "work"),
                        progress=progress)
    pred, _ = rasterize(read_qupath_objects(geojson).nuclei, 0, 0, *truth.shape, scale=1 / recipe.zoom)
    return {"result": res, "labels": pred, "geojson": geojson, "recall": recall_by_size(truth, pred, recipe.mpp)}


def _outlines(ax, image: np.ndarray, labels: np.ndarray, truth: np.ndarray | None, title: str) -> None:
    """``image`` with ``labels`` outlined in yellow and, given ``truth``, the true nuclei no instance matches
    (IoU >= 0.5) outlined in red."""
    from skimage.segmentation import find_boundaries

    from nucseg.wsi.synthslide import match_instances

    shown = image.astype(np.float32) / 255
    shown[find_boundaries(labels, mode="inner")] = (1.0, 1.0, 0.0)
    if truth is not None:
        ia, _, iou = match_instances(truth, labels)
        missed = np.isin(truth, np.setdiff1d(np.unique(truth[truth > 0]), ia[iou >= 0.5]))
        shown[find_boundaries(np.where(missed, truth, 0), mode="inner")] = (1.0, 0.0, 0.0)
    ax.imshow(shown)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _save(fig, path: Path) -> Path:
    from nucseg.io import SOFTWARE, atomic_path, is_nucseg_png

    fig.tight_layout()
    with atomic_path(path, owned=is_nucseg_png) as tmp:  # tagged, so a rerun knows the picture is its own
        fig.savefig(tmp, dpi=100, format="png", metadata={"Software": SOFTWARE})
    return path


def compare_tile(path: Path, tiles: list, recipe, cv_cfg, fine, zero) -> dict:
    """Zero-shot vs fine-tuned on fold 1's validation tile with the most nuclei (never trained on by either)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nucseg.learn.cv import make_folds
    from nucseg.learn.calibrate import metric_value
    from nucseg.model.infer import segment_tiles

    val = [tiles[i] for i in make_folds(tiles, cv_cfg.folds, cv_cfg.seed, cv_cfg.group_by)[0]]
    tile = max(val, key=lambda t: (int(t.labels.max()), t.name))
    preds = {name: segment_tiles(seg, [tile.image], 1)[0] for name, seg in (("zero-shot", zero), ("fine-tuned", fine))}
    pq = {name: metric_value("pq", tile.labels, p, tile.ambiguous) for name, p in preds.items()}
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    _outlines(axes[0], tile.image, tile.labels, None, f"truth ({int(tile.labels.max())} nuclei)")
    for ax, (name, p) in zip(axes[1:], preds.items()):
        _outlines(ax, tile.image, p, tile.labels, f"{name}: PQ {pq[name]:.2f}")
    _save(fig, path)
    plt.close(fig)
    return {"path": path.name, "tile": tile.name, "pq": pq}


def compare_slide(path: Path, slide: Path, truth: np.ndarray, slides: dict) -> dict:
    """Zero-shot vs fine-tuned outlines on the whole demo slide, missed true nuclei in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = tifffile.imread(slide, key=0)
    zoom = truth.shape[0] // image.shape[0]
    image = np.repeat(np.repeat(image, zoom, 0), zoom, 1)  # at the resolution the labels are compared at
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.3))
    for ax, name in zip(axes, ("zero-shot", "fine-tuned")):
        rows = slides[name]["recall"]
        found = sum(r["found"] for r in rows)
        _outlines(ax, image, slides[name]["labels"], truth, f"{name}: {found} of {int(truth.max())} nuclei found "
                  "(red: missed)")
    _save(fig, path)
    plt.close(fig)
    return {"path": path.name}


def write_report(out: Path, recipe, summary: dict, slides: dict, true_nuclei: int, thresholds: dict,
                 steps: dict, pictures: dict, seconds: float, threads, full: bool) -> Path:
    from nucseg.learn.calibrate import describe_thresholds
    from nucseg.learn.demo import BASE_STAIN
    from nucseg.io import TextMark, write_text

    ft, zs = summary["fine_tuned"], summary["zero_shot"]
    if recipe.pretrained:
        model = (f"the pre-trained demo base `adapters/demo-base` (committed; built by `scripts/make_demo_base.py` "
                 f"from synthetic tiles of other seeds with one kind of nucleus, 4-10 µm, and {BASE_STAIN.title()}'s "
                 f"stain vectors) fine-tuned: method {recipe.method().describe()}")
        zero_what = "pre-trained, not fine-tuned"
    else:
        model = "random init, every weight trained from scratch"
        zero_what = "untrained"
    rows = "\n".join(f"| {m} | {ft[m]['mean']:.3f} ± {ft[m]['std']:.3f} | {zs[m]['mean']:.3f} ± {zs[m]['std']:.3f} |"
                     for m in ("pq", "f1", "dq", "sq", "aji", "dice"))
    per_fold = "\n".join(f"- fold {f['fold']} ({f['val_tiles']} validation tiles): PQ {f['mean']['pq']:.3f}, "
                         f"F1 {f['mean']['f1']:.3f}; thresholds {describe_thresholds(f['thresholds'])}"
                         for f in summary["folds"] if f.get("thresholds"))
    zero_thr = "\n".join(f"- fold {z['fold']}: {describe_thresholds(z['thresholds'])}"
                         for z in summary["zero_shot_thresholds"] if z.get("thresholds"))
    fine, zero = slides["fine-tuned"], slides["zero-shot"]

    def pct(r):
        return "-" if r is None else f"{100 * r:.0f} %"

    size_rows = "\n".join(f"| {f['size']} | {f['nuclei']} | {z['missed']} ({pct(z['recall'])}) | "
                          f"{f['missed']} ({pct(f['recall'])}) |" for f, z in zip(fine["recall"], zero["recall"]))
    step_rows = "\n".join(f"| {name} | {t['wall']:.0f} s | {t['cpu']:.0f} s |" for name, t in steps.items())
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    tile = pictures["tile"]
    text = f"""# nucseg demo report

{'`scripts/demo.py --full`' if full else '`make demo`'}: synthetic data made by `nucseg.learn.demo`
({summary['tiles']} tiles of {recipe.size} px at {recipe.mpp} µm/px, 2 organs: large vesicular nuclei next to small
dark lymphocytes, about half of them touching, {recipe.stain.title()}'s stain vectors) and a synthetic
{recipe.slide_px}² slide of the same tissue at {recipe.mpp * recipe.zoom} µm/px; model vit_tiny (SAM architecture),
{model}, {recipe.epochs} epochs per fold, lr {recipe.lr}, batch {recipe.batch_size}, CPU with {threads.threads}
threads. Total {seconds:.0f} s.

The base saw neither this stain, nor nuclei this large or this small, nor this much touching: as the official
SAM has never seen H&E. This is what fine-tuning is for.

## Cross-validation ({summary['folds_total']} folds) — `cv/summary.md`

Validation tiles of each fold were never trained on; each fold's inference thresholds were calibrated on tiles
held back from its own training set, and so were the zero-shot base's (on the same tiles; one mask per prompt,
every grid point decoded: the base has no foreground head to prune prompts with).

| metric | fine-tuned (mean ± std) | zero-shot base ({zero_what}) |
|---|---|---|
{rows}

{per_fold}

Zero-shot base's thresholds:

{zero_thr}

Zero-shot (left) and fine-tuned (right) on fold 1's validation tile with the most nuclei (`{tile['tile']}`);
yellow: predicted outlines, red: true nuclei no prediction matches (IoU >= 0.5):

![zero-shot vs fine-tuned on a validation tile]({tile['path']})

Training curve of fold 1 (loss and train IoU per epoch):

![training curve](cv/fold_1/train/curves.png)

Per fold: `cv/fold_*/metrics.json`; pictures (tile | truth | prediction): `cv/fold_*/overlays/`;
training curves: `cv/fold_*/train/curves.png`; adapters: `cv/fold_*/train/adapter/`.

## Whole slide — `demo_slide.geojson`

Fine-tuned (fold 1's adapter): {fine['result'].nuclei} nuclei predicted (the slide has {true_nuclei}) in
{fine['result'].tissue_tiles} tissue tiles ({fine['result'].tissue_area_mm2:.2f} mm²) in {fine['result'].seconds:.1f} s,
read at {recipe.mpp} µm/px (the adapter's), thresholds {describe_thresholds(thresholds)}. The zero-shot base's
prediction is `demo_slide.zero_shot.geojson` ({zero['result'].nuclei} nuclei predicted, {zero['result'].seconds:.1f} s).
True nuclei found (a predicted outline with IoU >= 0.5) by size, equivalent diameter:

| size | true nuclei | missed zero-shot (recall) | missed fine-tuned (recall) |
|---|---|---|---|
{size_rows}

![zero-shot vs fine-tuned on the slide]({pictures['slide']['path']})

Open `demo_slide.geojson` in QuPath (File > Import objects) over `demo_slide.tif`; `demo_slide.csv` has one row
per nucleus; `demo_slide.preview.png` shows the outlines.

## Time of each step

| step | wall time | CPU time |
|---|---|---|
{step_rows}
| total | {seconds:.0f} s | {sum(t['cpu'] for t in steps.values()):.0f} s |

CPU time is this process's, all its threads together; wall time above CPU time means the cores were shared
(load average at the end, 1 / 5 / 15 min: {load}).

## The same on real data

The numbers above are those of a tiny model on synthetic tiles: they show the pipeline and what adaptation
does, not SAM's accuracy on real tissue (docs/BENCHMARKS.md). With the official weights and NuInsSeg
(a GPU helps; see README):

```bash
nucseg weights fetch vit_b                       # ~375 MB into ~/.cache/nucseg, SHA-256 checked
nucseg data fetch nuinsseg data/                 # from Zenodo, checked, unpacked into data/NuInsSeg
nucseg train --data data/NuInsSeg/ --out runs/lora --checkpoint ~/.cache/nucseg/sam_vit_b_01ec64.pth --mpp 0.25
nucseg cv    --data data/NuInsSeg/ --out runs/cv   --checkpoint ~/.cache/nucseg/sam_vit_b_01ec64.pth --zero-shot
nucseg predict slide.svs -o slide.geojson --adapter runs/lora/adapter --checkpoint ~/.cache/nucseg/sam_vit_b_01ec64.pth
```
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
