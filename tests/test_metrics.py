"""Per-image metrics: hand-computed cases, conventions, real NuInsSeg maps, nuc_eval's published numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage.io import imread

from nucseg.learn.metrics import (
    COUNT_KEYS,
    FLOAT_KEYS,
    aji,
    binary_dice_iou,
    hd95,
    panoptic_quality,
    remove_ambiguous,
    score_image,
)

EXACT = 1e-6


def _box(shape: tuple[int, int], boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """Label map with ``id -> (row0, row1, col0, col1)`` inclusive rectangles."""
    out = np.zeros(shape, np.int32)
    for label, (r0, r1, c0, c1) in boxes.items():
        out[r0 : r1 + 1, c0 : c1 + 1] = label
    return out


def _real(nuinsseg_gt: Path, stem: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gt = tifffile.imread(nuinsseg_gt / "label masks modify" / f"{stem}.tif").astype(np.int32)
    pred = np.load(nuinsseg_gt / "predictions" / f"{stem}.npy").astype(np.int32)
    amb = imread(nuinsseg_gt / "vague areas" / "mask binary" / f"{stem}.png") > 0
    return gt, pred, amb


def _naive(gt: np.ndarray, pred: np.ndarray, thr: float = 0.5) -> dict[str, float]:
    """Slow, obviously-correct reference: one boolean mask per instance, Kumar's AJI loop, PQ by threshold."""
    gids = [int(i) for i in np.unique(gt) if i]
    pids = [int(i) for i in np.unique(pred) if i]
    gm = {g: gt == g for g in gids}
    pm = {p: pred == p for p in pids}
    iou = {(g, p): (gm[g] & pm[p]).sum() / (gm[g] | pm[p]).sum() for g in gids for p in pids}
    matches = [(g, p) for (g, p), v in iou.items() if v > thr]
    tp = len(matches)
    fp, fn = len(pids) - tp, len(gids) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = sum(iou[m] for m in matches) / tp if tp else 0.0
    c = u = 0
    used: set[int] = set()
    for g in gids:
        best = max(pids, key=lambda p: (iou[g, p], -p))  # ties -> lowest id
        if iou[g, best] > 0:
            c += (gm[g] & pm[best]).sum()
            u += (gm[g] | pm[best]).sum()
            used.add(best)
        else:
            u += gm[g].sum()
    u += sum(pm[p].sum() for p in pids if p not in used)
    return {"dq": dq, "sq": sq, "pq": dq * sq, "aji": c / u, "tp": tp, "fp": fp, "fn": fn}


# ---------------------------------------------------------------- hand-computed cases


def test_three_boxes_by_hand() -> None:
    # GT 1: rows 0-3 x cols 0-3 (16 px); GT 2: rows 6-8 x cols 6-8 (9 px); GT 3: rows 8-9 x cols 0-1 (4 px).
    # Pred 5: rows 0-3 x cols 1-4 (16 px) -> with GT 1: inter 12, union 20, IoU 0.6 (match).
    # Pred 7: rows 6-7 x cols 6-8 (6 px)  -> with GT 2: inter 6, union 9, IoU 2/3 (match).
    # Pred 9: rows 0-1 x cols 8-9 (4 px)  -> touches nothing (FP). GT 3 has no prediction (FN).
    # TP 2, FP 1, FN 1: DQ = F1 = 2 / (2 + 0.5 + 0.5) = 2/3; SQ = (0.6 + 2/3) / 2 = 19/30; PQ = 19/45.
    # Binary: |G| = 29, |P| = 26, |G n P| = 18 -> Dice = 36/55, IoU = 18/37.
    # AJI: pairs (1,5) and (2,7): C = 12 + 6 = 18; U = 20 + 9 + |GT 3| 4 + |pred 9| 4 = 37 -> 18/37.
    gt = _box((10, 10), {1: (0, 3, 0, 3), 2: (6, 8, 6, 8), 3: (8, 9, 0, 1)})
    pred = _box((10, 10), {5: (0, 3, 1, 4), 7: (6, 7, 6, 8), 9: (0, 1, 8, 9)})
    s = score_image(gt, pred)
    assert (s["tp"], s["fp"], s["fn"], s["n_gt"], s["n_pred"]) == (2, 1, 1, 3, 3)
    assert s["dq"] == pytest.approx(2 / 3, abs=EXACT)
    assert s["f1"] == pytest.approx(2 / 3, abs=EXACT)
    assert s["sq"] == pytest.approx(19 / 30, abs=EXACT)
    assert s["pq"] == pytest.approx(19 / 45, abs=EXACT)
    assert s["dice"] == pytest.approx(36 / 55, abs=EXACT)
    assert s["iou"] == pytest.approx(18 / 37, abs=EXACT)
    assert s["aji"] == pytest.approx(18 / 37, abs=EXACT)
    assert binary_dice_iou(gt, pred) == pytest.approx((36 / 55, 18 / 37), abs=EXACT)
    assert aji(gt, pred) == pytest.approx(18 / 37, abs=EXACT)


def test_split_nucleus_by_hand() -> None:
    # GT 1: rows 0-3 x cols 0-7 (32 px). Pred 1: cols 0-4 (20 px), pred 2: cols 5-7 (12 px).
    # IoU(1,1) = 20/32 = 0.625 (match), IoU(1,2) = 12/32 = 0.375. TP 1, FP 1, FN 0.
    # DQ = 1 / 1.5 = 2/3, SQ = 0.625, PQ = 5/12. Foreground identical: Dice = IoU = 1, hd95 = 0.
    # AJI: GT 1 -> pred 1 (C 20, U 32); pred 2 unused adds 12 -> 20/44 = 5/11: the split is penalised.
    gt = _box((10, 10), {1: (0, 3, 0, 7)})
    pred = _box((10, 10), {1: (0, 3, 0, 4), 2: (0, 3, 5, 7)})
    s = score_image(gt, pred)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["dq"] == pytest.approx(2 / 3, abs=EXACT)
    assert s["sq"] == pytest.approx(0.625, abs=EXACT)
    assert s["pq"] == pytest.approx(5 / 12, abs=EXACT)
    assert s["aji"] == pytest.approx(5 / 11, abs=EXACT)
    assert s["dice"] == s["iou"] == 1.0
    assert s["hd95"] == 0.0


def test_merged_nuclei_by_hand_and_low_threshold_matching() -> None:
    # GT 1: rows 0-3 x cols 0-3 (16), GT 2: rows 0-3 x cols 5-8 (16); pred 1 covers rows 0-3 x cols 0-8 (36).
    # IoU = 16/36 = 4/9 for both GT: no match at 0.5 -> TP 0, FP 1, FN 2, DQ = SQ = PQ = 0.
    # AJI: both GT pair with pred 1 -> C = 32, U = 36 + 36 = 72 -> 4/9. Dice = 64/68 = 16/17, IoU = 32/36.
    # At iou_threshold 0.4 the one-to-one assignment keeps one pair (IoU 4/9): TP 1, FP 0, FN 1,
    # DQ = 1/1.5 = 2/3, SQ = 4/9, PQ = 8/27.
    gt = _box((10, 10), {1: (0, 3, 0, 3), 2: (0, 3, 5, 8)})
    pred = _box((10, 10), {1: (0, 3, 0, 8)})
    s = score_image(gt, pred)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 2)
    assert (s["dq"], s["sq"], s["pq"], s["f1"]) == (0.0, 0.0, 0.0, 0.0)
    assert s["aji"] == pytest.approx(4 / 9, abs=EXACT)
    assert s["dice"] == pytest.approx(16 / 17, abs=EXACT)
    assert s["iou"] == pytest.approx(8 / 9, abs=EXACT)
    low = panoptic_quality(gt, pred, iou_threshold=0.4)
    assert (low["tp"], low["fp"], low["fn"]) == (1, 0, 1)
    assert low["dq"] == pytest.approx(2 / 3, abs=EXACT)
    assert low["sq"] == pytest.approx(4 / 9, abs=EXACT)
    assert low["pq"] == pytest.approx(8 / 27, abs=EXACT)


def test_hd95_by_hand_uses_directed_percentiles() -> None:
    # GT: one pixel at (0, 0). Pred: pixels (0, 0) and (0, 10); every pixel is its own boundary.
    # GT -> pred distances: [0]; pred -> GT distances: [0, 10], 95th percentile (linear) = 9.5.
    # hd95 = max(0, 9.5) = 9.5 (pooling both directions, as medpy does, would give 9.0; the max would be 10).
    gt = np.zeros((3, 12), np.int32)
    gt[0, 0] = 1
    pred = np.zeros((3, 12), np.int32)
    pred[0, 0] = 1
    pred[0, 10] = 2
    assert hd95(gt, pred) == pytest.approx(9.5, abs=EXACT)
    assert hd95(pred, gt) == pytest.approx(9.5, abs=EXACT)


def test_hd95_matches_brute_force_on_real_maps(nuinsseg_gt: Path) -> None:
    gt, pred, _ = _real(nuinsseg_gt, "human_bladder_01")
    a, b = gt > 0, pred > 0
    # Boundary by morphological erosion (4-connectivity, outside the image counts as background), as medpy.
    cross = ndimage.generate_binary_structure(2, 1)
    ea = np.argwhere(a & ~ndimage.binary_erosion(a, cross, border_value=0))
    eb = np.argwhere(b & ~ndimage.binary_erosion(b, cross, border_value=0))
    d = np.sqrt(((ea[:, None, :] - eb[None, :, :]) ** 2).sum(-1))
    expected = max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))
    assert hd95(gt, pred) == pytest.approx(expected, abs=EXACT)


# ---------------------------------------------------------------- edge-case conventions


def test_both_empty_is_perfect() -> None:
    empty = np.zeros((8, 8), np.int32)
    s = score_image(empty, empty)
    assert {k: s[k] for k in FLOAT_KEYS} == {
        "dice": 1.0, "iou": 1.0, "aji": 1.0, "dq": 1.0, "sq": 1.0, "pq": 1.0, "f1": 1.0, "hd95": 0.0
    }
    assert {k: s[k] for k in COUNT_KEYS} == {"tp": 0, "fp": 0, "fn": 0, "n_gt": 0, "n_pred": 0}


def test_empty_gt_with_predictions_scores_zero() -> None:
    gt = np.zeros((8, 8), np.int32)
    pred = _box((8, 8), {1: (0, 1, 0, 1), 2: (5, 6, 5, 6)})
    s = score_image(gt, pred)
    for key in ("dice", "iou", "aji", "dq", "sq", "pq", "f1"):
        assert s[key] == 0.0, key
    assert math.isnan(s["hd95"])
    assert (s["tp"], s["fp"], s["fn"], s["n_gt"], s["n_pred"]) == (0, 2, 0, 0, 2)


def test_empty_prediction_scores_zero() -> None:
    gt = _box((8, 8), {3: (0, 2, 0, 2)})
    s = score_image(gt, np.zeros((8, 8), np.uint8))
    for key in ("dice", "iou", "aji", "dq", "sq", "pq", "f1"):
        assert s[key] == 0.0, key
    assert math.isnan(s["hd95"])
    assert (s["tp"], s["fp"], s["fn"], s["n_gt"], s["n_pred"]) == (0, 0, 1, 1, 0)


def test_no_overlap_at_all() -> None:
    # GT 1 rows 0-1 x cols 0-1, pred 1 rows 6-7 x cols 6-7; every pixel of a 2x2 square is boundary.
    # GT -> pred nearest distances: (1,1) sqrt(50), (0,1) and (1,0) sqrt(61), (0,0) sqrt(72); the same the
    # other way by symmetry. 95th percentile of 4 sorted values: position 0.95 * 3 = 2.85 ->
    # sqrt(61) + 0.85 * (sqrt(72) - sqrt(61)). Every overlap metric is 0, TP 0, FP 1, FN 1.
    gt = _box((8, 8), {1: (0, 1, 0, 1)})
    pred = _box((8, 8), {1: (6, 7, 6, 7)})
    s = score_image(gt, pred)
    assert (s["dice"], s["aji"], s["pq"], s["tp"], s["fp"], s["fn"]) == (0.0, 0.0, 0.0, 0, 1, 1)
    assert s["hd95"] == pytest.approx(math.sqrt(61) + 0.85 * (math.sqrt(72) - math.sqrt(61)), abs=EXACT)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        score_image(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="integer"):
        score_image(np.zeros((4, 4), float), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="negative"):
        score_image(-np.ones((4, 4), int), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="iou_threshold"):
        panoptic_quality(np.ones((4, 4), int), np.ones((4, 4), int), iou_threshold=1.0)


# ---------------------------------------------------------------- ambiguous areas (nuc_eval rule)


def test_ambiguous_rule_by_hand() -> None:
    # Each instance is 4 px (2x2). The ambiguous mask covers column 1 of rows 0-1 (2 px of GT 1, ratio 0.5 ->
    # removed), pixel (4, 4) (1 px of GT 2, ratio 0.25, not > 0.25 -> kept, that pixel zeroed) and nothing of
    # GT 3. Pred 8 = GT 1's box (removed), pred 9 = GT 2's box (kept minus (4, 4)).
    gt = _box((8, 8), {1: (0, 1, 0, 1), 2: (4, 5, 4, 5), 3: (6, 7, 0, 1)})
    pred = _box((8, 8), {8: (0, 1, 0, 1), 9: (4, 5, 4, 5)})
    amb = np.zeros((8, 8), np.uint8)
    amb[0:2, 1] = 255
    amb[4, 4] = 255
    g2, p2 = remove_ambiguous(gt, pred, amb)
    assert sorted(np.unique(g2).tolist()) == [0, 2, 3]
    assert sorted(np.unique(p2).tolist()) == [0, 9]
    assert (g2 == 2).sum() == 3 and g2[4, 4] == 0
    assert (p2 == 9).sum() == 3 and p2[4, 4] == 0
    s = score_image(gt, pred, amb)
    # After removal: GT {2 (3 px), 3 (4 px)}, pred {9 (3 px)}: TP 1 (IoU 1), FN 1. DQ = 1/1.5, SQ = 1.
    assert (s["n_gt"], s["n_pred"], s["tp"], s["fp"], s["fn"]) == (2, 1, 1, 0, 1)
    assert s["pq"] == pytest.approx(2 / 3, abs=EXACT)
    assert s["dice"] == pytest.approx(6 / 10, abs=EXACT)  # |G| = 7, |P| = 3, inter 3
    # The threshold is a parameter: at 0.5 GT 1 (ratio 0.5) survives, minus its ambiguous pixels.
    g3, _ = remove_ambiguous(gt, pred, amb, threshold=0.5)
    assert (g3 == 1).sum() == 2
    assert score_image(gt, pred, amb, ambiguous_threshold=0.5)["n_gt"] == 3


def test_ambiguous_counts_on_real_maps(nuinsseg_gt: Path) -> None:
    for stem in ("human_bladder_01", "human_bladder_02"):
        gt, pred, amb = _real(nuinsseg_gt, stem)
        # Independent count of instances with at most 25 % of their area in the ambiguous mask.
        expect_gt = sum(1 for i in np.unique(gt)[1:] if (amb & (gt == i)).sum() <= 0.25 * (gt == i).sum())
        expect_pred = sum(1 for i in np.unique(pred)[1:] if (amb & (pred == i)).sum() <= 0.25 * (pred == i).sum())
        plain, cleaned = score_image(gt, pred), score_image(gt, pred, amb)
        assert cleaned["n_gt"] == expect_gt and cleaned["n_pred"] == expect_pred
        assert cleaned["n_gt"] <= plain["n_gt"] and cleaned["n_pred"] <= plain["n_pred"]
        g2, p2 = remove_ambiguous(gt, pred, amb)
        assert not g2[amb].any() and not p2[amb].any()
        kept = np.isin(gt, np.unique(g2)) & ~amb  # survivors are untouched outside the ambiguous area
        assert np.array_equal(g2[kept], gt[kept])
    gt, pred, amb = _real(nuinsseg_gt, "human_bladder_01")
    plain, cleaned = score_image(gt, pred), score_image(gt, pred, amb)
    assert (plain["n_gt"], plain["n_pred"]) == (24, 27)
    assert (cleaned["n_gt"], cleaned["n_pred"]) == (19, 23)  # 5 GT and 4 predicted nuclei are ambiguous
    assert cleaned["pq"] > plain["pq"]  # the removed instances were mostly unmatched


_CV2_ELLIPSE_5X5 = np.array(  # cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)), nuc_eval's ring_width=2
    [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], bool
)


def test_reproduces_nuc_eval_published_example(nuinsseg_gt: Path) -> None:
    """masih4/nuc_eval README, "Single image evaluation", case 1 (label-map GT, amb mask, ring_width=2):
    Dice 0.8833, PQ 0.6742, Nuclei 19. Their boundary ring (not part of nucseg) is rebuilt here: per GT
    instance, dilation minus erosion by the 5x5 ellipse, zeroed in both maps after the ambiguous removal."""
    gt, pred, amb = _real(nuinsseg_gt, "human_bladder_01")
    g, p = remove_ambiguous(gt, pred, amb, threshold=0.25)
    ring = np.zeros(g.shape, bool)
    for i in np.unique(g)[1:]:
        m = g == i
        ring |= ndimage.binary_dilation(m, _CV2_ELLIPSE_5X5) & ~ndimage.binary_erosion(
            m, _CV2_ELLIPSE_5X5, border_value=1
        )
    s = score_image(np.where(ring, 0, g), np.where(ring, 0, p))
    assert s["dice"] == pytest.approx(0.8833, abs=5e-5)
    assert s["pq"] == pytest.approx(0.6742, abs=5e-5)
    assert s["n_gt"] == 19


# ---------------------------------------------------------------- real maps, invariances, speed


def test_identity_on_real_ground_truth(nuinsseg_gt: Path) -> None:
    gt = tifffile.imread(nuinsseg_gt / "label masks modify" / "human_bladder_01.tif")
    s = score_image(gt, gt)
    n = len(np.unique(gt)) - 1
    assert n > 10
    for key in ("dice", "iou", "aji", "dq", "sq", "pq", "f1"):
        assert s[key] == pytest.approx(1.0, abs=1e-12), key
    assert s["hd95"] == 0.0
    assert (s["tp"], s["fp"], s["fn"], s["n_gt"], s["n_pred"]) == (n, 0, 0, n, n)


@pytest.mark.parametrize("stem", ["human_bladder_01", "human_bladder_02"])
@pytest.mark.parametrize("with_amb", [False, True])
def test_real_maps_match_naive_reference(nuinsseg_gt: Path, stem: str, with_amb: bool) -> None:
    gt, pred, amb = _real(nuinsseg_gt, stem)
    s = score_image(gt, pred, amb if with_amb else None)
    if with_amb:
        gt, pred = remove_ambiguous(gt, pred, amb)
    ref = _naive(gt, pred)
    for key in ("aji", "dq", "sq", "pq"):
        assert s[key] == pytest.approx(ref[key], abs=1e-9), key
    assert (s["tp"], s["fp"], s["fn"]) == (ref["tp"], ref["fp"], ref["fn"])
    # Sanity: a reasonable published model on bladder tissue.
    assert 0.8 < s["dice"] < 0.95 and 0.5 < s["aji"] < 0.9 and 0.5 < s["pq"] < 0.9
    assert 0.0 < s["hd95"] < 100.0
    assert s["f1"] == s["dq"]


def test_label_permutation_invariance(nuinsseg_gt: Path) -> None:
    gt, pred, amb = _real(nuinsseg_gt, "human_bladder_01")
    rng = np.random.default_rng(7)

    def shuffle(labels: np.ndarray, spread: int) -> np.ndarray:
        ids = np.unique(labels)[1:]
        lut = np.zeros(labels.max() + 1, np.int64)
        lut[ids] = rng.choice(spread - 1, size=len(ids), replace=False) + 1
        return lut[labels]

    base = score_image(gt, pred, amb)
    # Small ids (lookup-table relabelling) and ids up to 1e12 (np.unique relabelling).
    for spread in (200, 10**12):
        permuted = score_image(shuffle(gt, spread), shuffle(pred, spread), amb)
        assert permuted == pytest.approx(base, abs=1e-12), spread
