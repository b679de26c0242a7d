"""Per-image segmentation metrics on instance label maps (2-D integer arrays, 0 = background).

Every instance metric is derived from one GT x prediction intersection matrix, built with a single
``np.bincount`` over combined (relabelled) ids, so a 512 x 512 tile with a few hundred nuclei costs a few
milliseconds and no Python loop runs over nuclei.

Metrics (:func:`score_image` returns all of them):

* ``dice`` / ``iou`` -- binary foreground Dice and IoU (instance ids ignored).
* ``aji`` -- Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017): each GT instance is paired with the
  prediction of highest IoU (a prediction may serve several GT instances; GT instances touching no
  prediction stay unpaired); the index is sum(|G n P|) over pairs divided by sum(|G u P|) over pairs plus the
  areas of unpaired GT instances and of predictions paired with no GT instance. Exact IoU ties are broken
  towards the lowest prediction id, as in the reference implementation.
* ``dq`` / ``sq`` / ``pq`` -- panoptic quality (Kirillov et al., CVPR 2019). A GT and a predicted instance
  match when IoU > ``iou_threshold``; at >= 0.5 a match is necessarily unique, below 0.5 a maximum-IoU
  one-to-one assignment (Hungarian) is made first. DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of matches,
  PQ = DQ x SQ.
* ``f1`` -- detection F1 = 2TP / (2TP + FP + FN) with the same matching; it equals DQ by definition and is
  reported under its detection name for readers who expect it.
* ``hd95`` -- 95th-percentile symmetric Hausdorff distance in pixels between the binary foreground
  boundaries (foreground pixels with a 4-connected background neighbour or on the image edge, as in medpy):
  the larger of the two directed 95th percentiles of boundary-to-nearest-boundary distances (MONAI's
  definition; medpy pools both directions instead).
* ``tp``, ``fp``, ``fn``, ``n_gt``, ``n_pred`` -- integer counts (after ambiguous-area removal).

Edge cases (the convention of the NuInsSeg authors' ``nuc_eval``, see below):

* both maps empty: ``dice = iou = aji = dq = sq = pq = f1 = 1.0`` and ``hd95 = 0.0`` -- a tile with no
  nucleus segmented as empty is a perfect answer, and scoring it 0 would punish correct empty tiles when
  averaging over a dataset;
* exactly one map empty: every overlap metric is 0.0 and ``hd95`` is NaN (no boundary to measure to);
  dataset means skip NaN (see :mod:`nucseg.learn.evaluate`);
* both non-empty but no match: ``dq = sq = pq = f1 = 0.0`` (SQ of zero matches is taken as 0).

Ambiguous areas. NuInsSeg marks regions its annotators could not resolve (``vague areas/mask binary``).
:func:`remove_ambiguous` reproduces the rule of the dataset authors' evaluation code, repository
``masih4/nuc_eval`` (MIT), function ``_remove_ambiguous`` in ``nuceval.py`` (same rule as
``remove_ambiguous_and_remap`` in ``nuclei_eval/metrics.py``; ``evaluate_dataset.py`` runs it with
``overlap_thresh_amb = 0.25``): on each side independently, an instance is deleted when the fraction of its
area inside the ambiguous mask is strictly greater than the threshold (default 0.25); then every ambiguous
pixel is set to background in both maps, so surviving instances lose their ambiguous pixels as well. All
metrics are computed after this. This module is an independent implementation of that rule, not their code;
tests/test_metrics.py reproduces the numbers their README publishes for its ``human_bladder_01`` example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

AMBIGUOUS_THRESHOLD = 0.25
"""Default fraction of an instance's area inside the ambiguous mask above which it is removed (nuc_eval)."""

FLOAT_KEYS = ("dice", "iou", "aji", "dq", "sq", "pq", "f1", "hd95")
COUNT_KEYS = ("tp", "fp", "fn", "n_gt", "n_pred")


def _as_label_map(labels: np.ndarray, name: str) -> np.ndarray:
    """Check that ``labels`` is a 2-D non-negative integer map; metrics are meaningless on anything else."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label map, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer instance ids, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} has negative instance ids")
    return arr


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = _as_label_map(gt, "gt")
    pred = _as_label_map(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt shape {gt.shape} != pred shape {pred.shape}")
    return gt, pred


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map instance ids to 1..n (order kept, 0 stays 0); return the flat relabelled map and n.

    Consecutive ids keep the joint bincount small whatever ids the producer used (e.g. 65535, 10**9).
    """
    flat = labels.ravel().astype(np.int64, copy=False)
    if flat.size == 0:
        return flat, 0
    top = int(flat.max())
    if top <= 4 * flat.size + 65536:  # a lookup table is O(pixels), cheaper than np.unique's sort
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        n = int(present.sum())
        lut = np.zeros(top + 1, np.int64)
        lut[present] = np.arange(1, n + 1)
        return lut[flat], n
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids[0] == 0:
        return inverse.astype(np.int64), len(ids) - 1
    return inverse.astype(np.int64) + 1, len(ids)


@dataclass(frozen=True)
class _Overlap:
    """Pixel counts shared by every metric: per-pair intersections and per-instance areas."""

    inter: np.ndarray  # (n_gt, n_pred) intersection areas
    gt_area: np.ndarray  # (n_gt,)
    pred_area: np.ndarray  # (n_pred,)

    @property
    def n_gt(self) -> int:
        return len(self.gt_area)

    @property
    def n_pred(self) -> int:
        return len(self.pred_area)

    @property
    def union(self) -> np.ndarray:
        return self.gt_area[:, None] + self.pred_area[None, :] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union  # every union >= the instance's area > 0


def _overlap(gt: np.ndarray, pred: np.ndarray) -> _Overlap:
    """One bincount over combined ids gives the full (n_gt + 1) x (n_pred + 1) contingency table.

    The table is dense: a few MB for a tile with a thousand nuclei per side. Slides are scored tile by tile.
    """
    g, n_gt = _relabel(gt)
    p, n_pred = _relabel(pred)
    table = np.bincount(g * (n_pred + 1) + p, minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)
    return _Overlap(inter=table[1:, 1:], gt_area=table[1:].sum(axis=1), pred_area=table[:, 1:].sum(axis=0))


def _dice_iou(ov: _Overlap) -> tuple[float, float]:
    inter = int(ov.inter.sum())
    total = int(ov.gt_area.sum() + ov.pred_area.sum())
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / (total - inter)


def _aji(ov: _Overlap) -> float:
    if ov.n_gt == 0 and ov.n_pred == 0:
        return 1.0
    if ov.n_gt == 0 or ov.n_pred == 0:
        return 0.0  # nothing can intersect; the union is all the pixels of the non-empty side
    iou, union = ov.iou, ov.union
    rows = np.arange(ov.n_gt)
    best = iou.argmax(axis=1)
    paired = iou[rows, best] > 0
    r, c = rows[paired], best[paired]
    used = np.zeros(ov.n_pred, bool)
    used[c] = True
    agg_inter = ov.inter[r, c].sum()
    agg_union = union[r, c].sum() + ov.gt_area[~paired].sum() + ov.pred_area[~used].sum()
    return float(agg_inter / agg_union)


def _pq(ov: _Overlap, iou_threshold: float) -> dict[str, float | int]:
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    if ov.n_gt == 0 and ov.n_pred == 0:
        return {"dq": 1.0, "sq": 1.0, "pq": 1.0, "f1": 1.0, "tp": 0, "fp": 0, "fn": 0}
    iou = ov.iou
    if iou_threshold >= 0.5:
        r, c = np.nonzero(iou > iou_threshold)  # IoU > 0.5 admits at most one partner per instance
    else:
        r, c = linear_sum_assignment(-iou)
        keep = iou[r, c] > iou_threshold
        r, c = r[keep], c[keep]
    tp = len(r)
    fp, fn = ov.n_pred - tp, ov.n_gt - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou[r, c].mean()) if tp else 0.0
    return {"dq": dq, "sq": sq, "pq": dq * sq, "f1": dq, "tp": tp, "fp": fp, "fn": fn}


def binary_dice_iou(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Foreground Dice and IoU, ignoring instance ids: the pixel-level agreement a semantic model would get."""
    gt, pred = _check_pair(gt, pred)
    return _dice_iou(_overlap(gt, pred))


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017): penalises both merges and splits at the pixel level."""
    gt, pred = _check_pair(gt, pred)
    return _aji(_overlap(gt, pred))


def panoptic_quality(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float | int]:
    """DQ, SQ, PQ, F1 and TP/FP/FN: detection and segmentation quality separated, as in Kirillov et al."""
    gt, pred = _check_pair(gt, pred)
    return _pq(_overlap(gt, pred), iou_threshold)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """(row, col) of foreground pixels with a 4-connected background neighbour or on the image edge."""
    interior = mask.copy()
    interior[[0, -1], :] = False
    interior[:, [0, -1]] = False
    interior[1:, :] &= mask[:-1, :]
    interior[:-1, :] &= mask[1:, :]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    return np.argwhere(mask & ~interior)


def hd95(gt: np.ndarray, pred: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance (pixels) between foreground boundaries.

    Reports how far boundaries stray while ignoring a few outlier pixels. Both empty -> 0.0; one empty -> NaN.
    Nearest-boundary distances come from k-d trees over the boundary pixels: a few thousand points per tile,
    several times cheaper than two full-image distance transforms.
    """
    return _hd95(*_check_pair(gt, pred))


def _hd95(gt: np.ndarray, pred: np.ndarray) -> float:
    a, b = gt != 0, pred != 0
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return 0.0
    if not has_a or not has_b:
        return math.nan
    edge_a, edge_b = _boundary(a), _boundary(b)
    a_to_b = cKDTree(edge_b).query(edge_a)[0]
    b_to_a = cKDTree(edge_a).query(edge_b)[0]
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def _drop_ambiguous(labels: np.ndarray, amb: np.ndarray, threshold: float) -> np.ndarray:
    rel, n = _relabel(labels)
    area = np.bincount(rel, minlength=n + 1)
    inside = np.bincount(rel[amb.ravel()], minlength=n + 1)
    keep = inside <= threshold * area  # removed when inside / area > threshold
    keep[0] = False
    keep_px = keep[rel].reshape(labels.shape) & ~amb
    return np.where(keep_px, labels, 0).astype(labels.dtype, copy=False)


def remove_ambiguous(
    gt: np.ndarray, pred: np.ndarray, ambiguous: np.ndarray, threshold: float = AMBIGUOUS_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """Apply nuc_eval's ambiguous-area rule (module docstring) so unresolvable regions neither help nor hurt.

    ``ambiguous`` is any array, non-zero = ambiguous. Instance ids of survivors are kept unchanged.
    """
    return _remove_ambiguous(*_check_pair(gt, pred), ambiguous, threshold)


def _remove_ambiguous(gt: np.ndarray, pred: np.ndarray, ambiguous: np.ndarray, threshold: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    amb = np.asarray(ambiguous) != 0
    if amb.shape != gt.shape:
        raise ValueError(f"ambiguous mask shape {amb.shape} != label map shape {gt.shape}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"ambiguous threshold must be in [0, 1], got {threshold}")
    return _drop_ambiguous(gt, amb, threshold), _drop_ambiguous(pred, amb, threshold)


def score_image(
    gt: np.ndarray,
    pred: np.ndarray,
    ambiguous: np.ndarray | None = None,
    iou_threshold: float = 0.5,
    *,
    ambiguous_threshold: float = AMBIGUOUS_THRESHOLD,
) -> dict[str, float | int]:
    """All metrics of one image (keys :data:`FLOAT_KEYS` + :data:`COUNT_KEYS`), ambiguous areas removed first."""
    gt, pred = _check_pair(gt, pred)
    if ambiguous is not None:
        gt, pred = _remove_ambiguous(gt, pred, ambiguous, ambiguous_threshold)
    ov = _overlap(gt, pred)
    dice, iou = _dice_iou(ov)
    pq = _pq(ov, iou_threshold)
    return {
        "dice": dice,
        "iou": iou,
        "aji": _aji(ov),
        "dq": pq["dq"],
        "sq": pq["sq"],
        "pq": pq["pq"],
        "f1": pq["f1"],
        "hd95": _hd95(gt, pred),
        "tp": pq["tp"],
        "fp": pq["fp"],
        "fn": pq["fn"],
        "n_gt": ov.n_gt,
        "n_pred": ov.n_pred,
    }
