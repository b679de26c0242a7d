"""Score folders (or in-memory sets) of instance label maps against ground truth.

One aggregation path: :func:`evaluate_dirs` discovers and reads files, then hands the images one by one to
:func:`evaluate_arrays`, which cross-validation also calls directly without writing files.

Discovery rules for :func:`evaluate_dirs`:

* label files are ``.tif/.tiff/.png/.npy`` found recursively (hidden files skipped), keyed by file stem; a
  stem found twice on one side is an error, because silently picking one would score the wrong file;
* if the GT tree follows the NuInsSeg layout (``<organ>/label masks modify/<stem>.tif``), only files inside
  ``label masks modify`` folders are ground truth (the same tree also holds tissue images and binary masks
  under the same stems), and when no ``ambiguous_dir`` is given the sibling
  ``<organ>/vague areas/mask binary/<stem>.png`` is used as the ambiguous mask where it exists;
* files under ``pred_dir`` or ``ambiguous_dir`` are never taken as ground truth, so predictions may live
  inside the GT folder;
* with an explicit ``ambiguous_dir``, masks are matched by stem; an image without one has no ambiguous
  area, but a folder that matches no GT stem at all is an error (almost certainly the wrong folder).

Aggregation: ``mean`` is the unweighted mean over images of every float metric, skipping NaN (``hd95`` is
NaN when exactly one side is empty; a metric that is NaN for every image stays NaN). Counts are not
averaged: ``total`` holds their sums plus ``n_images``, from which pooled detection rates can be derived.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import DataError
from ..io import LABEL_SUFFIXES, read_label_map, read_mask
from .data import LABELS_DIR, VAGUE_DIR
from .metrics import AMBIGUOUS_THRESHOLD, COUNT_KEYS, FLOAT_KEYS, score_image


Pair = tuple[str, np.ndarray, np.ndarray, "np.ndarray | None"]


def evaluate_arrays(
    pairs: Iterable[Pair],
    iou_threshold: float = 0.5,
    ambiguous_threshold: float = AMBIGUOUS_THRESHOLD,
) -> dict:
    """Score ``(stem, gt, pred, ambiguous_or_None)`` tuples.

    Returns ``{"per_image": {stem: metrics} (sorted stems), "mean": {...}, "total": {...}}``.

    Raises :class:`DataError` for an empty input, a repeated stem, or maps whose shapes differ.
    """
    per_image: dict[str, dict[str, float | int]] = {}
    for stem, gt, pred, ambiguous in pairs:
        if stem in per_image:
            raise DataError(f"image {stem!r} appears twice")
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise DataError(f"image {stem!r}: ground truth shape {gt.shape} != prediction shape {pred.shape}")
        if ambiguous is not None and np.shape(ambiguous) != gt.shape:
            raise DataError(
                f"image {stem!r}: ambiguous mask shape {np.shape(ambiguous)} != label shape {gt.shape}"
            )
        try:
            per_image[stem] = score_image(
                gt, pred, ambiguous, iou_threshold=iou_threshold, ambiguous_threshold=ambiguous_threshold
            )
        except ValueError as err:  # non-integer or negative labels: the data, not the code, is wrong
            raise DataError(f"image {stem!r}: {err}") from None
    if not per_image:
        raise DataError("no images to evaluate")
    per_image = {stem: per_image[stem] for stem in sorted(per_image)}
    return {"per_image": per_image, "mean": _mean(per_image), "total": _total(per_image)}


def evaluate_dirs(
    gt_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    ambiguous_dir: str | os.PathLike | None = None,
    iou_threshold: float = 0.5,
    ambiguous_threshold: float = AMBIGUOUS_THRESHOLD,
) -> dict:
    """Score every ground-truth label map under ``gt_dir`` against the prediction of the same stem.

    A GT stem without a prediction, no GT files, duplicate stems or shape mismatches raise :class:`DataError`
    naming the files. Extra predictions (stems absent from the GT) are ignored. See the module docstring.
    """
    gt_dir, pred_dir = _existing_dir(gt_dir, "ground-truth"), _existing_dir(pred_dir, "prediction")
    amb_root = _existing_dir(ambiguous_dir, "ambiguous-mask") if ambiguous_dir is not None else None
    excluded = [pred_dir] + ([amb_root] if amb_root is not None else [])
    gt_files = _ground_truth_files(gt_dir, excluded)
    if not gt_files:
        raise DataError(f"no ground-truth label maps (.tif/.tiff/.png/.npy) under {gt_dir}")
    pred_files = _index_by_stem(_label_files(pred_dir), "prediction")
    missing = [stem for stem in gt_files if stem not in pred_files]
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"no prediction in {pred_dir} for ground truth {gt_files[missing[0]]} (missing stems: {listed})"
        )

    if amb_root is not None:
        amb_files = _index_by_stem(_label_files(amb_root), "ambiguous mask")
        if not any(stem in amb_files for stem in gt_files):
            raise DataError(f"no ambiguous mask in {amb_root} matches any ground-truth stem")
    else:
        amb_files = {stem: m for stem, path in gt_files.items() if (m := _nuinsseg_vague_mask(path)) is not None}

    def pairs() -> Iterator[Pair]:
        for stem in sorted(gt_files):
            gt_path, pred_path = gt_files[stem], pred_files[stem]
            gt, pred = read_label_map(gt_path), read_label_map(pred_path)
            if gt.shape != pred.shape:
                raise DataError(
                    f"shape mismatch: ground truth {gt_path} is {gt.shape}, prediction {pred_path} is {pred.shape}"
                )
            ambiguous = None
            if stem in amb_files:
                ambiguous = read_mask(amb_files[stem])
                if ambiguous.shape != gt.shape:
                    raise DataError(
                        f"shape mismatch: ambiguous mask {amb_files[stem]} is {ambiguous.shape}, "
                        f"ground truth {gt_path} is {gt.shape}"
                    )
            yield stem, gt, pred, ambiguous

    return evaluate_arrays(pairs(), iou_threshold=iou_threshold, ambiguous_threshold=ambiguous_threshold)


def _existing_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} folder not found: {path}")
    return path.resolve()


def _label_files(root: Path) -> list[Path]:
    """Label-map files under ``root`` in sorted order (deterministic errors), hidden files skipped."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in LABEL_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def _index_by_stem(files: Iterable[Path], what: str) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in files:
        if path.stem in index:
            raise DataError(f"{what} stem {path.stem!r} found twice: {index[path.stem]} and {path}")
        index[path.stem] = path
    return index


def _ground_truth_files(gt_dir: Path, excluded: list[Path]) -> dict[str, Path]:
    files = [p for p in _label_files(gt_dir) if not any(p.is_relative_to(ex) for ex in excluded)]
    nuinsseg = [p for p in files if p.parent.name == LABELS_DIR]
    return _index_by_stem(nuinsseg or files, "ground-truth")


def _nuinsseg_vague_mask(gt_path: Path) -> Path | None:
    """``<organ>/vague areas/mask binary/<stem>.png`` beside ``<organ>/label masks modify/<stem>.tif``."""
    if gt_path.parent.name != LABELS_DIR:
        return None
    candidate = gt_path.parent.parent / VAGUE_DIR / f"{gt_path.stem}.png"
    return candidate if candidate.is_file() else None


def _mean(per_image: dict[str, dict[str, float | int]]) -> dict[str, float]:
    mean: dict[str, float] = {}
    for key in FLOAT_KEYS:
        values = [v for v in (float(m[key]) for m in per_image.values()) if not math.isnan(v)]
        mean[key] = math.fsum(values) / len(values) if values else math.nan
    return mean


def _total(per_image: dict[str, dict[str, float | int]]) -> dict[str, int]:
    total = {key: int(sum(int(m[key]) for m in per_image.values())) for key in COUNT_KEYS}
    total["n_images"] = len(per_image)
    return total
