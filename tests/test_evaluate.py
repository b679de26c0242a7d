"""Folder and in-memory evaluation: discovery, NuInsSeg vague masks, aggregation, errors naming files."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

from nucseg.errors import DataError
from nucseg.learn.evaluate import evaluate_arrays, evaluate_dirs
from nucseg.learn.metrics import FLOAT_KEYS, score_image


def _box(boxes: dict[int, tuple[int, int, int, int]], shape: tuple[int, int] = (12, 12)) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    for label, (r0, r1, c0, c1) in boxes.items():
        out[r0 : r1 + 1, c0 : c1 + 1] = label
    return out


GT_A = _box({1: (0, 3, 0, 3), 2: (6, 9, 6, 9)})
PRED_A = _box({4: (0, 3, 1, 4), 9: (6, 9, 6, 9)})  # IoU 0.6 and 1.0
GT_B = _box({1: (2, 5, 2, 5)})
PRED_B = _box({1: (2, 5, 2, 5), 2: (9, 10, 9, 10)})  # one exact match, one false positive


def _write(path: Path, labels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, labels)
    elif path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, labels)
    else:
        imsave(path, labels, check_contrast=False)
    return path


def test_evaluate_dirs_mixed_suffixes(tmp_path: Path) -> None:
    _write(tmp_path / "gt" / "a.npy", GT_A)
    _write(tmp_path / "gt" / "nested" / "b.png", GT_B)
    _write(tmp_path / "pred" / "a.tif", PRED_A)
    _write(tmp_path / "pred" / "b.npy", PRED_B)
    _write(tmp_path / "pred" / "extra.npy", PRED_B)  # predictions without GT are ignored
    out = evaluate_dirs(tmp_path / "gt", tmp_path / "pred")
    assert list(out["per_image"]) == ["a", "b"]
    a, b = out["per_image"]["a"], out["per_image"]["b"]
    assert a == score_image(GT_A, PRED_A) and b == score_image(GT_B, PRED_B)
    # a: TP 2 (IoU 0.6 and 1), PQ = 0.8; b: TP 1 FP 1, DQ = 1/1.5, SQ = 1, PQ = 2/3.
    assert a["pq"] == pytest.approx(0.8, abs=1e-9)
    assert b["pq"] == pytest.approx(2 / 3, abs=1e-9)
    assert out["mean"]["pq"] == pytest.approx((0.8 + 2 / 3) / 2, abs=1e-9)
    assert set(out["mean"]) == set(FLOAT_KEYS)
    for key in FLOAT_KEYS:
        assert out["mean"][key] == pytest.approx((a[key] + b[key]) / 2, abs=1e-12)
    assert out["total"] == {"tp": 3, "fp": 1, "fn": 0, "n_gt": 3, "n_pred": 4, "n_images": 2}


def test_missing_prediction_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "gt" / "a.npy", GT_A)
    _write(tmp_path / "gt" / "b.npy", GT_B)
    _write(tmp_path / "pred" / "a.npy", PRED_A)
    with pytest.raises(DataError, match=r"b\.npy.*missing stems: b"):
        evaluate_dirs(tmp_path / "gt", tmp_path / "pred")


def test_empty_and_absent_folders(tmp_path: Path) -> None:
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "notes.txt").write_text("not a label map")
    _write(tmp_path / "pred" / "a.npy", PRED_A)
    with pytest.raises(DataError, match="no ground-truth label maps"):
        evaluate_dirs(tmp_path / "gt", tmp_path / "pred")
    with pytest.raises(DataError, match="folder not found"):
        evaluate_dirs(tmp_path / "nope", tmp_path / "pred")


def test_duplicate_stem_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "gt" / "a.npy", GT_A)
    _write(tmp_path / "pred" / "a.npy", PRED_A)
    _write(tmp_path / "pred" / "sub" / "a.png", PRED_A)
    with pytest.raises(DataError, match=r"stem 'a' found twice: .*a\.npy and .*a\.png"):
        evaluate_dirs(tmp_path / "gt", tmp_path / "pred")


def test_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    _write(tmp_path / "gt" / "a.npy", GT_A)
    _write(tmp_path / "pred" / "a.npy", PRED_A[:10])
    with pytest.raises(DataError, match=r"gt.a\.npy is \(12, 12\), prediction .*pred.a\.npy is \(10, 12\)"):
        evaluate_dirs(tmp_path / "gt", tmp_path / "pred")


def test_nuinsseg_layout_uses_vague_masks(tmp_path: Path) -> None:
    organ = tmp_path / "gt" / "human bladder"
    _write(organ / "label masks modify" / "a.tif", GT_A)
    _write(organ / "tissue images" / "a.png", np.full((12, 12, 3), 200, np.uint8))  # same stem, not GT
    _write(organ / "mask binary" / "a.png", (GT_A > 0).astype(np.uint8) * 255)
    amb = np.zeros((12, 12), np.uint8)
    amb[6:10, 6:8] = 255  # half of GT 2 and of pred 9 -> both removed (0.5 > 0.25)
    _write(organ / "vague areas" / "mask binary" / "a.png", amb)
    _write(tmp_path / "gt" / "predictions" / "a.npy", PRED_A)  # predictions inside the GT tree
    out = evaluate_dirs(tmp_path / "gt", tmp_path / "gt" / "predictions")
    s = out["per_image"]["a"]
    assert s == score_image(GT_A, PRED_A, amb)
    assert (s["n_gt"], s["n_pred"], s["tp"]) == (1, 1, 1)  # without the mask it would be 2, 2, 2
    assert s["pq"] == pytest.approx(0.6, abs=1e-9)
    # Pointing at the label folder itself finds the sibling vague mask too.
    again = evaluate_dirs(organ / "label masks modify", tmp_path / "gt" / "predictions")
    assert again["per_image"]["a"] == s


def test_explicit_ambiguous_dir(tmp_path: Path) -> None:
    _write(tmp_path / "gt" / "a.npy", GT_A)
    _write(tmp_path / "gt" / "b.npy", GT_B)
    _write(tmp_path / "pred" / "a.npy", PRED_A)
    _write(tmp_path / "pred" / "b.npy", PRED_B)
    amb = np.zeros((12, 12), np.uint8)
    amb[0:4, 0:3] = 255  # 12/16 of GT 1 and 8/16 of pred 4 inside: both removed
    _write(tmp_path / "amb" / "a.png", amb)  # b has no mask: scored without ambiguous area
    out = evaluate_dirs(tmp_path / "gt", tmp_path / "pred", ambiguous_dir=tmp_path / "amb")
    assert out["per_image"]["a"] == score_image(GT_A, PRED_A, amb)
    assert out["per_image"]["a"]["n_gt"] == 1
    assert out["per_image"]["b"] == score_image(GT_B, PRED_B)
    _write(tmp_path / "wrong" / "zzz.png", amb)
    with pytest.raises(DataError, match="matches any ground-truth stem"):
        evaluate_dirs(tmp_path / "gt", tmp_path / "pred", ambiguous_dir=tmp_path / "wrong")


def test_real_nuinsseg_examples_autodiscover_vague_masks(nuinsseg_gt: Path, tmp_path: Path) -> None:
    out = evaluate_dirs(nuinsseg_gt, nuinsseg_gt / "predictions")
    assert list(out["per_image"]) == ["human_bladder_01", "human_bladder_02"]
    s1 = out["per_image"]["human_bladder_01"]
    assert (s1["n_gt"], s1["n_pred"]) == (19, 23)  # 24 GT / 27 predicted before ambiguous removal
    assert out["total"]["n_gt"] == 19 + 3
    assert 0.5 < out["mean"]["pq"] < 0.9 and 0.8 < out["mean"]["dice"] < 0.95
    # The same folders copied without the vague masks score the raw counts.
    shutil.copytree(nuinsseg_gt / "label masks modify", tmp_path / "label masks modify")
    raw = evaluate_dirs(tmp_path, nuinsseg_gt / "predictions")
    raw1 = raw["per_image"]["human_bladder_01"]
    assert (raw1["n_gt"], raw1["n_pred"]) == (24, 27)


def test_evaluate_arrays_in_memory() -> None:
    empty = np.zeros((12, 12), np.uint8)
    out = evaluate_arrays(
        [("z", GT_B, PRED_B, None), ("a", GT_A, PRED_A, None), ("e", empty, PRED_B, None)]
    )
    assert list(out["per_image"]) == ["a", "e", "z"]
    assert math.isnan(out["per_image"]["e"]["hd95"])
    # hd95 mean skips the NaN of image e; every other metric averages all three images.
    assert out["mean"]["hd95"] == pytest.approx(
        (out["per_image"]["a"]["hd95"] + out["per_image"]["z"]["hd95"]) / 2, abs=1e-12
    )
    assert out["mean"]["pq"] == pytest.approx((0.8 + 0.0 + 2 / 3) / 3, abs=1e-9)
    assert out["total"]["n_images"] == 3 and out["total"]["fp"] == 1 + 2


def test_evaluate_arrays_errors() -> None:
    with pytest.raises(DataError, match="no images"):
        evaluate_arrays([])
    with pytest.raises(DataError, match="'a' appears twice"):
        evaluate_arrays([("a", GT_A, PRED_A, None), ("a", GT_A, PRED_A, None)])
    with pytest.raises(DataError, match=r"'a'.*shape"):
        evaluate_arrays([("a", GT_A, PRED_A[:5], None)])
    with pytest.raises(DataError, match=r"'a'.*integer"):
        evaluate_arrays([("a", GT_A.astype(float), PRED_A, None)])
