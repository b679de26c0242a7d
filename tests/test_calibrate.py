"""Calibrated thresholds: validation of the stored dict, precedence (command line > adapter > defaults), the
grid search's estimate against a real segmenter run, and `nucseg calibrate` rewriting nucseg.json."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nucseg.learn.calibrate import (THRESHOLD_FIELDS, CalibrationConfig, calibrate, metric_value, resolve_infer,
                              split_for_calibration, validate_thresholds)
from nucseg.learn.data import load_dataset
from nucseg.learn.demo import make_demo_dataset
from nucseg.errors import InputError
from nucseg.model.infer import InferConfig
from nucseg_cli.main import main

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

GOOD = {"pred_iou_thresh": 0.3, "stability_thresh": 0.6, "fg_threshold": 0.1, "nms_iou": 0.5, "min_area": 6,
        "metric": "pq", "score": 0.41, "default_score": 0.2, "tiles": 3}


def test_validate_accepts_a_calibration_and_rejects_bad_types_and_ranges():
    assert validate_thresholds(dict(GOOD)) == GOOD
    assert validate_thresholds({}) == {}
    bad = [
        ({"pred_iou_thresh": "0.3"}, "finite number"),
        ({"stability_thresh": True}, "finite number"),
        ({"fg_threshold": float("nan")}, "finite number"),
        ({"pred_iou_thresh": 1.5}, "out of range"),
        ({"nms_iou": 0.0}, "out of range"),
        ({"min_area": -1}, "out of range"),
        ({"min_area": 2.5}, "integer"),
        ({"tiles": 0}, "out of range"),
        ({"metric": "accuracy"}, "metric must be one of"),
        ({"score": 1.2}, "out of range"),
        ({"pred_iou_thres": 0.3}, "unknown key"),
    ]
    for change, message in bad:
        with pytest.raises(InputError, match=message):
            validate_thresholds({**GOOD, **change})
    with pytest.raises(InputError, match="which metric"):
        validate_thresholds({"pred_iou_thresh": 0.3})
    with pytest.raises(InputError, match="JSON object"):
        validate_thresholds([0.3])


def test_precedence_command_line_then_adapter_then_default():
    cfg, used = resolve_infer({"stability_thresh": 0.9, "points_per_side": 8}, GOOD)
    defaults = InferConfig()
    assert cfg.stability_thresh == 0.9 and used["stability_thresh"]["source"] == "command line"
    assert cfg.pred_iou_thresh == 0.3 and used["pred_iou_thresh"]["source"] == "adapter"
    assert cfg.min_area == 6 and isinstance(cfg.min_area, int) and cfg.points_per_side == 8
    cfg, used = resolve_infer({}, None)
    assert all(used[k] == {"value": getattr(defaults, k), "source": "default"} for k in THRESHOLD_FIELDS)


def test_split_holds_back_whole_images(tmp_path):
    tiles = load_dataset(make_demo_dataset(tmp_path / "d", tiles_per_organ=5, size=64))
    train, held = split_for_calibration(tiles, 0.2, seed=1)
    assert len(held) == 2 and len(train) == 8 and not {t.stem for t in train} & {t.stem for t in held}
    assert split_for_calibration(tiles, 0.2, seed=1) == (train, held)  # seeded
    assert split_for_calibration(tiles, 0.0, seed=1) == (tiles, [])
    assert split_for_calibration(tiles[:1], 0.5, seed=1) == (tiles[:1], [])  # one image: nothing to hold back
    with pytest.raises(InputError):
        split_for_calibration(tiles, 1.0, seed=1)


def test_grid_estimate_equals_a_real_run(demo_model):
    """With prompts="grid" every point is decoded in a real run too, so the label maps the search paints for a
    setting from its one decoding pass must be exactly the segmenter's, and its scores exactly the real ones."""
    from nucseg.learn.calibrate import _candidates, _paint
    from nucseg.model.infer import SamTileSegmenter, segment_tiles

    model, val, _ = demo_model
    val = val[:4]
    seg = SamTileSegmenter(model, InferConfig(points_per_side=16, prompts="grid"), device="cpu")
    cal_cfg = CalibrationConfig(batch_size=4)
    res = calibrate(seg, val, cal_cfg)
    t = res.thresholds
    assert t["score"] >= t["default_score"] and res.evaluated > 20
    cand = _candidates(seg, np.stack([v.image for v in val]), cal_cfg)
    loosest = {"pred_iou_thresh": 0.0, "stability_thresh": 0.1, "fg_threshold": 0.05, "nms_iou": 0.6, "min_area": 1}
    defaults = {k: getattr(seg.cfg, k) for k in THRESHOLD_FIELDS}
    chosen = {k: t[k] for k in THRESHOLD_FIELDS}
    for setting in (defaults, chosen, loosest):
        cfg = replace(seg.cfg, **setting)
        real = segment_tiles(SamTileSegmenter(model, cfg, device="cpu"), [v.image for v in val], 4)
        estimate = _paint(seg, cand, setting)
        assert all(np.array_equal(r, e) for r, e in zip(real, estimate)), setting
        if setting is loosest:
            assert sum(int(r.max()) for r in real) > 0  # the trained model does mark nuclei
        if setting is not loosest:
            score = float(np.mean([metric_value("pq", v.labels, r, v.ambiguous) for v, r in zip(val, real)]))
            assert score == pytest.approx(t["default_score" if setting is defaults else "score"], abs=1e-6)


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cal")
    data = make_demo_dataset(root / "data", tiles_per_organ=3, size=128)
    out = root / "run"
    assert main(["-q", "train", "--data", str(data), "--out", str(out), "--model", "vit_tiny", "--device", "cpu",
                 "--epochs", "1", "--batch-size", "4", "--method", "full", "--calibration-fraction", "0.2"]) == 0
    return out / "adapter", data


def test_train_stores_thresholds_and_calibrate_rewrites_them(tiny_adapter, tmp_path, capsys):
    from nucseg.model.adapter import load_adapter, read_adapter

    adapter, data = tiny_adapter
    meta = json.loads((adapter / "nucseg.json").read_text())
    validate_thresholds(meta["thresholds"])
    assert meta["thresholds"]["tiles"] == 1 and meta["data"]["tiles"] == 5  # one of 6 images held back
    # dry run: prints, writes nothing
    before = (adapter / "nucseg.json").read_bytes()
    capsys.readouterr()
    assert main(["-q", "calibrate", str(adapter), "--data", str(data), "--points-per-side", "8", "--dry-run",
                 "--metric", "aji"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["metric"] == "aji" and printed["tiles"] == 6
    assert (adapter / "nucseg.json").read_bytes() == before
    assert main(["-q", "calibrate", str(adapter), "--data", str(data), "--points-per-side", "8"]) == 0
    after = json.loads((adapter / "nucseg.json").read_text())
    assert after["thresholds"]["tiles"] == 6 and after["thresholds"]["metric"] == "pq"
    assert {m: t["tiles"] for m, t in after["mode_thresholds"].items()} == {"centers": 6, "none": 6}  # heads too
    rewritten = ("thresholds", "mode_thresholds")
    assert {k: v for k, v in after.items() if k not in rewritten} == {k: v for k, v in meta.items() if k not in rewritten}
    load_adapter(adapter)  # the recorded weights hash still matches: the adapter loads
    assert not [p for p in adapter.iterdir() if p.name.startswith(".")]  # atomic: no temporaries left
    # a hand-edited, invalid value is refused with the key named
    bad = dict(after, thresholds={**after["thresholds"], "nms_iou": 7})
    (tmp_path / "bad").mkdir()
    for f in adapter.iterdir():
        (tmp_path / "bad" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "bad" / "nucseg.json").write_text(json.dumps(bad))
    from nucseg.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nms_iou"):
        read_adapter(tmp_path / "bad").thresholds


def test_segment_uses_adapter_thresholds_unless_given(tiny_adapter, tmp_path, capsys):
    adapter, data = tiny_adapter
    images = next(data.iterdir()) / "tissue images"
    t = json.loads((adapter / "nucseg.json").read_text())["thresholds"]
    capsys.readouterr()
    assert main(["-q", "segment", str(images), "--adapter", str(adapter), "-o", str(tmp_path / "a"),
                 "--points-per-side", "8", "--prompts", "auto"]) == 0
    err = capsys.readouterr().err
    assert f"pred_iou_thresh {t['pred_iou_thresh']:g} (adapter)" in err and "(default)" not in err
    assert main(["-q", "segment", str(images), "--adapter", str(adapter), "-o", str(tmp_path / "b"),
                 "--points-per-side", "8", "--stability-thresh", "0.77", "--prompts", "auto"]) == 0
    err = capsys.readouterr().err
    assert "stability_thresh 0.77 (command line)" in err and f"min_area {t['min_area']:g} (adapter)" in err


def test_thresholds_read_back_from_json_are_described_the_same():
    """cv's summary.md lists resumed folds' thresholds from metrics.json (sorted keys): same line as in memory."""
    from nucseg.learn.calibrate import describe_thresholds, resolve_infer

    _, used = resolve_infer({"pred_iou_thresh": 0.5}, {"stability_thresh": 0.7})
    back = json.loads(json.dumps(used, sort_keys=True))
    assert list(back) != list(used)  # the order did change on the way through JSON
    assert describe_thresholds(back) == describe_thresholds(used)
    assert describe_thresholds(used).startswith("pred_iou_thresh 0.5 (command line), stability_thresh 0.7 (adapter)")
