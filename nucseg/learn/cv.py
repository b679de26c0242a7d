"""k-fold cross-validation: every fold fine-tunes the same base, is scored through the shared tile inference,
and leaves its adapter, metrics and overlay pictures behind.

    <out>/fold_1/train/{adapter/, checkpoint.safetensors, curves.png, history.json}
    <out>/fold_1/metrics.json            per-image and mean metrics of the fine-tuned model
    <out>/fold_1/zero_shot_metrics.json  the base model through the same inference (with --zero-shot), its
                                         thresholds calibrated on the same held-back images as the fold's
    <out>/fold_1/overlays/<tile>.png     tile | truth | prediction
    <out>/summary.json, summary.md       mean ± std of every metric over folds

Folds are grouped by source image (tiles cut from one image never straddle train and validation) or by
organ (leave-organs-out). A rerun skips finished folds and resumes an interrupted one from its checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..device import pick_device
from ..errors import DataError, InputError
from ..io import SOFTWARE, JsonMark, TextMark, atomic_path, check_output, is_nucseg_png, read_json, write_json, write_text
from ..model.adapter import is_adapter_meta, load_adapter, read_adapter
from ..model.infer import HEAD_OF_MODE, InferConfig, SamTileSegmenter, segment_tiles
from ..model.lora import MethodConfig
from ..model.modelcard import write_model_card
from ..model.sam import load_sam
from ..segmenter import sam_segmenter, zero_shot_settings
from .data import Tile, cut_tiles
from .evaluate import evaluate_arrays
from .train import TrainConfig, finetune

METRICS = ("dice", "iou", "aji", "dq", "sq", "pq", "f1", "hd95")
GROUP_BY = ("image", "organ")  # what stays together in one fold: the tiles of one image, or one organ's images
# markers of the files cv writes (nucseg.io: a rerun replaces only files carrying them, never a user's summary.json)
SUMMARY_JSON, SUMMARY_MD = JsonMark("cv-summary"), TextMark("cv-summary")
METRICS_JSON, ZERO_SHOT_JSON = JsonMark("cv-metrics"), JsonMark("cv-zero-shot-metrics")


@dataclass
class CVConfig:
    folds: int = 5
    seed: int = 42
    group_by: str = "image"  # image | organ
    overlays_per_fold: int = 3
    zero_shot: bool = False
    # Official SAM answers a point with 3 ambiguity masks (SAM's automatic generator uses them all); a base
    # trained by nucseg only ever trained output 0, so its other heads are untrained.
    zero_shot_multimask: bool = True
    # Training cuts images larger than this into tiles (the model's input size); validation scores whole images
    # through the seam-correct stitcher, so a nucleus on a seam is one nucleus, as in the papers' metrics.
    tile_size: int = 512
    drop_empty: bool = False  # training tiles without nuclei are left out


def make_folds(tiles: list[Tile], k: int, seed: int, group_by: str) -> list[np.ndarray]:
    """Validation indices of each fold; groups (images or organs) are shuffled with ``seed`` and dealt out."""
    if group_by not in GROUP_BY:
        raise InputError("--group-by must be 'image' or 'organ'")
    keys = [t.stem if group_by == "image" else t.organ for t in tiles]
    groups = sorted(set(keys))
    if k < 2:
        raise InputError("--folds must be at least 2")
    if len(groups) < k:
        raise DataError(f"--folds {k} needs at least {k} {group_by}s, the data has {len(groups)}")
    order = np.random.default_rng(seed).permutation(len(groups))
    fold_of = {groups[g]: i % k for i, g in enumerate(order)}
    return [np.array([j for j, key in enumerate(keys) if fold_of[key] == f]) for f in range(k)]


def overlay(tile: Tile, pred: np.ndarray, path: Path) -> None:
    """tile | truth | prediction, instance outlines in colour; one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    panels = [("tile", tile.image), ("truth", tile.labels), ("prediction", pred)]
    for ax, (title, img) in zip(axes, panels):
        if img.ndim == 2:
            shown = label2rgb(img, image=tile.image, bg_label=0, alpha=0.35)
            shown[find_boundaries(img, mode="inner")] = (1.0, 1.0, 0.0)
            n = len(np.unique(img)) - 1
            title = f"{title} ({n} nuclei)"
            img = shown
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path, owned=is_nucseg_png) as tmp:
        fig.savefig(tmp, dpi=90, format="png", metadata={"Software": SOFTWARE})
    plt.close(fig)


def score(segmenter: SamTileSegmenter, tiles: list[Tile], batch_size: int) -> tuple[dict, list[np.ndarray]]:
    preds = segment_tiles(segmenter, [t.image for t in tiles], batch_size)
    result = evaluate_arrays((t.name, t.labels, p, t.ambiguous) for t, p in zip(tiles, preds))
    return result, preds


def summarize_folds(rows: list[dict]) -> dict:
    """Mean and sample std over folds of each metric (NaN-aware: hd95 is undefined on empty images)."""
    out = {}
    for m in METRICS:
        vals = np.array([r[m] for r in rows if r.get(m) is not None], float)
        vals = vals[np.isfinite(vals)]
        out[m] = {"mean": float(vals.mean()) if len(vals) else math.nan,
                  "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out


def _fmt(value: float | None) -> str:
    """hd95 is undefined (None/NaN) when one side of every image is empty."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def write_summary_md(summary: dict, path: Path) -> None:
    write_text(path, summary_markdown(summary), SUMMARY_MD)


def summary_markdown(summary: dict) -> str:
    """The table of ``summary.md`` (what ``nucseg cv`` prints)."""
    cols = METRICS
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, key in (("fine-tuned", "fine_tuned"), ("zero-shot", "zero_shot")):
        if summary.get(key):
            cells = [f"{_fmt(summary[key][m]['mean'])} ± {_fmt(summary[key][m]['std'])}" for m in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per fold (fine-tuned):", "", "| fold | tiles | " + " | ".join(cols) + " |",
              "|---" * (len(cols) + 2) + "|"]
    for f in summary["folds"]:
        lines.append(f"| {f['fold']} | {f['val_tiles']} | " + " | ".join(_fmt(f["mean"][m]) for m in cols) + " |")
    used = [(f["fold"], f["thresholds"]) for f in summary["folds"] if f.get("thresholds")]
    if used:
        from .calibrate import describe_thresholds

        lines += ["", "Inference thresholds per fold (calibrated on images held back from the fold's training "
                  "set, unless given on the command line):", ""]
        lines += [f"- fold {fold}: {describe_thresholds(t)}" for fold, t in used]
        zero = [(z["fold"], z["thresholds"]) for z in summary.get("zero_shot_thresholds") or () if z["thresholds"]]
        if zero:
            lines += ["", "Zero-shot base, thresholds per fold (calibrated on the same held-back images):", ""]
            lines += [f"- fold {fold}: {describe_thresholds(t)}" for fold, t in zero]
    text = (f"# Cross-validation: {summary['folds_total']} folds, grouped by {summary['group_by']}, "
            f"seed {summary['seed']}\n\nModel {summary['model']}, method "
            f"{MethodConfig.from_dict(summary['method']).describe()}.\n"
            "Mean ± std over folds of the per-fold mean over validation tiles.\n\n" + "\n".join(lines) + "\n")
    return text


def score_zero_shot(base, train: list[Tile], val: list[Tile], explicit: dict, base_infer: InferConfig,
                    train_cfg: TrainConfig, cv_cfg: CVConfig, device, mpp: float | None,
                    on_calibrate: Callable[[str], None] | None = None) -> dict:
    """Score the untrained base on a fold's validation tiles, on the same footing as the fine-tuned model.

    When the fold's adapter was calibrated, the base's thresholds are calibrated too, on the very images
    held back for that (same split, same seed): otherwise the comparison would credit fine-tuning with what
    calibration alone gains (the scale of predicted IoU and stability differs between models).
    """
    from .calibrate import split_for_calibration
    from .train import calibrate_model

    single = not cv_cfg.zero_shot_multimask
    if explicit.get("prompts") in HEAD_OF_MODE:  # a base has no prompt heads: it keeps auto
        explicit, base_infer = {**explicit, "prompts": "auto"}, replace(base_infer, prompts="auto")
    zcfg = InferConfig(**zero_shot_settings(asdict(base_infer), single))
    held = split_for_calibration(train, train_cfg.calibration_fraction, train_cfg.seed)[1]
    thresholds = calibrate_model(base, held, train_cfg, zcfg, device, mpp, on_calibrate) if held else None
    seg = sam_segmenter(base, zero_shot_settings(explicit, single), thresholds, device, mpp=mpp)
    zres, _ = score(seg, val, train_cfg.batch_size)
    zres["thresholds"] = {k: {**v, "source": "calibrated" if v["source"] == "adapter" else v["source"]}
                          for k, v in seg.thresholds_used.items()}
    return zres


def run_cv(
    tiles: list[Tile],
    out_dir: str | Path,
    model_type: str,
    checkpoint: str | Path | None,
    method: MethodConfig,
    train_cfg: TrainConfig,
    infer_cfg: InferConfig | dict,
    cv_cfg: CVConfig,
    mpp: float | None = None,
    on_fold: Callable[[int, int, str], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, int, int, float], None] | None = None,
) -> dict:
    """Run (or finish) every fold and write the summary. Returns the summary dict.

    ``infer_cfg``: an InferConfig (every setting fixed), or a dict of the settings to fix, the thresholds
    not in it coming from each fold's calibration (``train_cfg.calibration_fraction`` of the fold's training
    images held back for it) or, without one, the global defaults.
    """
    explicit = infer_cfg.to_dict() if isinstance(infer_cfg, InferConfig) else dict(infer_cfg)
    base_infer = InferConfig(**explicit).validate()
    out_dir = Path(out_dir)
    folds = make_folds(tiles, cv_cfg.folds, cv_cfg.seed, cv_cfg.group_by)
    # before any training: the files written at the end must not replace anything nucseg did not write
    check_output(out_dir / "summary.json", SUMMARY_JSON)
    check_output(out_dir / "summary.md", SUMMARY_MD)
    device = pick_device(train_cfg.device)
    rows, zero_rows, fold_info, zero_used = [], [], [], []
    for f, val_idx in enumerate(folds, start=1):
        fdir = out_dir / f"fold_{f}"
        val = [tiles[i] for i in val_idx]
        train = [c for i, t in enumerate(tiles) if i not in set(val_idx.tolist())
                 for c in cut_tiles(t, cv_cfg.tile_size) if c.labels.any() or not cv_cfg.drop_empty]
        metrics_path = fdir / "metrics.json"
        if METRICS_JSON(metrics_path):  # finished by nucseg (a foreign metrics.json is refused below, never used)
            if on_fold:
                on_fold(f, len(folds), "done already, skipped")
            result = read_json(metrics_path)
        else:
            check_output(metrics_path, METRICS_JSON)  # before the fold's training
            if on_fold:
                on_fold(f, len(folds), f"training on {len(train)} tiles, validating on {len(val)}")
            res = finetune(train, fdir / "train", model_type, checkpoint, method, train_cfg, mpp=mpp,
                           extra_meta={"cv": {"fold": f, "folds": len(folds), "seed": cv_cfg.seed,
                                              "group_by": cv_cfg.group_by}},
                           on_start=on_start, on_step=on_step, infer=base_infer,
                           on_calibrate=(lambda msg, f=f: on_fold(f, len(folds), msg)) if on_fold else None)
            model, info = load_adapter(res.adapter, checkpoint)
            seg = sam_segmenter(model, explicit, info.thresholds, device, mpp=mpp,
                                mode_thresholds=info.mode_thresholds, modes=info.modes)
            result, preds = score(seg, val, train_cfg.batch_size)
            result["thresholds"] = seg.thresholds_used
            result["prompts"] = {"mode": seg.prompt_mode[0], "why": seg.prompt_mode[1]}
            for t, p in list(zip(val, preds))[: cv_cfg.overlays_per_fold]:
                overlay(t, p, fdir / "overlays" / f"{t.name.replace('@', '_').replace(',', '-')}.png")
            meta = dict(info.meta, metrics=result["mean"])  # adapters from cv carry their fold's metrics
            write_json(res.adapter / "nucseg.json", meta, is_adapter_meta)
            write_model_card(res.adapter, meta)  # the card shows the fold's metrics too
            write_json(metrics_path, result, METRICS_JSON)
        rows.append(result["mean"])
        fold_info.append({"fold": f, "val_tiles": len(val), "mean": result["mean"],
                          "thresholds": result.get("thresholds"), "prompts": result.get("prompts")})
        if cv_cfg.zero_shot:
            zpath = fdir / "zero_shot_metrics.json"
            if ZERO_SHOT_JSON(zpath):
                zres = read_json(zpath)
            else:
                check_output(zpath, ZERO_SHOT_JSON)
                base, _ = load_sam(model_type, checkpoint, img_size=read_adapter(fdir / "train" / "adapter").input_size,
                                   seed=train_cfg.seed)
                zres = score_zero_shot(base, train, val, explicit, base_infer, train_cfg, cv_cfg, device, mpp,
                                       (lambda msg, f=f: on_fold(f, len(folds), msg)) if on_fold else None)
                write_json(zpath, zres, ZERO_SHOT_JSON)
            zero_rows.append(zres["mean"])
            zero_used.append({"fold": f, "thresholds": zres.get("thresholds")})
    from .. import __version__

    summary = {
        "nucseg_version": __version__,
        "folds_total": len(folds),
        "group_by": cv_cfg.group_by,
        "seed": cv_cfg.seed,
        "model": model_type,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "method": method.to_dict(),
        "training": train_cfg.to_dict(),
        "inference": base_infer.to_dict(),  # fine-tuned folds: thresholds per fold in "folds"
        "inference_explicit": sorted(explicit),
        "tiles": len(tiles),  # whole images (validation scores them whole)
        "tile_size": cv_cfg.tile_size,
        "folds": fold_info,
        "zero_shot_thresholds": zero_used,
        "fine_tuned": summarize_folds(rows),
        "zero_shot": summarize_folds(zero_rows) if zero_rows else None,
    }
    write_json(out_dir / "summary.json", summary, SUMMARY_JSON)
    write_summary_md(summary, out_dir / "summary.md")
    return summary
