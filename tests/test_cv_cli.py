"""Cross-validation files and resume; the CLI's exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nucseg.learn.demo import make_demo_dataset
from nucseg_cli.main import main

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

TINY = ["--model", "vit_tiny", "--device", "cpu", "--epochs", "1", "--batch-size", "4", "--points-per-side", "8"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", tiles_per_organ=3, size=128)


def test_cv_writes_every_file_and_resumes(demo, tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["-q", "cv", "--data", str(demo), "--out", str(out), "--folds", "2", "--zero-shot", *TINY]) == 0
    for f in (1, 2):
        d = out / f"fold_{f}"
        for name in ("metrics.json", "zero_shot_metrics.json", "train/curves.png", "train/history.json",
                     "train/adapter/nucseg.json", "train/adapter/adapter.safetensors"):
            assert (d / name).is_file(), name
        assert len(list((d / "overlays").glob("*.png"))) == 3
        meta = json.loads((d / "train/adapter/nucseg.json").read_text())
        assert meta["cv"]["fold"] == f and set(meta["metrics"]) >= {"dice", "aji", "pq"}
        card = (d / "train/adapter/README.md").read_text()  # the model card shows the fold's metrics too
        assert f"fold {f} of a 2-fold" in card and meta["weights_sha256"] in card
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds_total"] == 2 and len(summary["folds"]) == 2
    for m in ("dice", "iou", "aji", "dq", "sq", "pq", "f1", "hd95"):
        vals = [f["mean"][m] for f in summary["folds"]]
        assert set(summary["fine_tuned"][m]) == {"mean", "std"}
        if all(v is not None and np.isfinite(v) for v in vals):
            assert summary["fine_tuned"][m]["mean"] == pytest.approx(np.mean(vals))
    assert "| fine-tuned |" in (out / "summary.md").read_text() and "| zero-shot |" in (out / "summary.md").read_text()
    # the base is scored with thresholds calibrated on the fold's own held-back images, as the adapter is
    for z, fold in zip(summary["zero_shot_thresholds"], summary["folds"]):
        assert {v["source"] for v in z["thresholds"].values()} == {"calibrated"}
        assert {v["source"] for v in fold["thresholds"].values()} == {"adapter"}
        assert json.loads((out / f"fold_{z['fold']}/zero_shot_metrics.json").read_text())["thresholds"] == z["thresholds"]
    assert "Zero-shot base, thresholds per fold" in (out / "summary.md").read_text()
    # a rerun skips finished folds: nothing is retrained or rewritten
    stamp = (out / "fold_1/metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["-q", "cv", "--data", str(demo), "--out", str(out), "--folds", "2", "--zero-shot", *TINY]) == 0
    assert "skipped" in capsys.readouterr().err
    assert (out / "fold_1/metrics.json").stat().st_mtime_ns == stamp


def test_eval_json_on_real_nuinsseg_examples(nuinsseg_gt, capsys):
    assert main(["eval", "--gt", str(nuinsseg_gt), "--pred", str(nuinsseg_gt / "predictions"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"per_image", "mean"} and set(out["per_image"]) == {"human_bladder_01", "human_bladder_02"}
    assert set(out["mean"]) >= {"dice", "iou", "aji", "dq", "sq", "pq", "f1", "hd95"}
    from nucseg.io import read_label_map
    from nucseg.learn.metrics import score_image

    gt = read_label_map(nuinsseg_gt / "label masks modify" / "human_bladder_01.tif")
    pred = read_label_map(nuinsseg_gt / "predictions" / "human_bladder_01.npy")
    amb = read_label_map(nuinsseg_gt / "vague areas" / "mask binary" / "human_bladder_01.png") > 0
    direct = score_image(gt, pred, amb)  # the vague mask was found automatically from the NuInsSeg layout
    assert out["per_image"]["human_bladder_01"]["pq"] == pytest.approx(direct["pq"])
    assert direct["n_gt"] < len(np.unique(gt)) - 1  # and it did remove ambiguous nuclei


@pytest.mark.parametrize("args,code,needle", [
    (["train", "--data", "/nonexistent/x", "--out", "{tmp}/o", "--model", "vit_tiny"], 2, "dataset folder not found"),
    (["train", "--data", "{missing_label}", "--out", "{tmp}/o", "--model", "vit_tiny"], 3, "missing label file"),
    (["train", "--data", "{demo}", "--out", "{tmp}/o", "--model", "vit_tiny", "--checkpoint", "{junk}"], 4,
     "cannot read checkpoint"),
    (["eval", "--gt", "{demo}", "--pred", "{tmp}"], 3, "no prediction"),
    (["segment", "{tmp}/none.png", "-o", "{tmp}/s", "--model", "vit_tiny"], 2, "input not found"),
    (["weights", "fetch", "vit_b", "--dest", "{tmp}/w"], 1, "--checkpoint"),
])
def test_bad_input_is_one_line_and_exit_code(args, code, needle, demo, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad"
    (bad / "organ" / "tissue images").mkdir(parents=True)
    (bad / "organ" / "label masks modify").mkdir()
    (bad / "organ" / "tissue images" / "a.png").write_bytes((demo / "demo organ a" / "tissue images" /
                                                            "demo_organ_a_01.png").read_bytes())
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    fill = {"tmp": str(tmp_path), "demo": str(demo), "missing_label": str(bad), "junk": str(junk)}
    argv = [a.format(**fill) for a in args]
    if argv[0] == "weights":  # this workplace has no internet anyway: a mirror that refuses at once
        monkeypatch.setenv("NUCSEG_WEIGHTS_URL", "http://127.0.0.1:9")
        for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(var, raising=False)
    rc = main(["-q", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, err
    assert err[-1].startswith("nucseg: error: ") and needle in err[-1]
    assert not any("Traceback" in line for line in err)


def test_console_script_has_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("nucseg")
    r = subprocess.run([str(exe), "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"nucseg: error: dataset folder not found: {tmp_path / 'none'}"]


def test_outputs_respect_umask(tmp_path):
    from nucseg.io import atomic_path, new_only, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": float("nan")}, new_only)
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None}  # strict JSON: NaN -> null
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.txt", owned=new_only) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == [tmp_path / "a.json"]  # nothing half-written left behind


def test_predict_cli_on_real_svs_and_shards(cmu_svs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmu.geojson"
    assert main(["-q", "predict", str(cmu_svs), "-o", str(out), "--segmenter", "threshold", "--csv"]) == 0
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) > 1000
    assert (tmp_path / "cmu.csv").is_file()
    assert "nuclei" in capsys.readouterr().out
    # shards split a list between array jobs; SLURM's variables pick the shard when --shard is absent
    lst = tmp_path / "slides.txt"
    lst.write_text(f"# slides\n{cmu_svs}\n{tmp_path / 'missing.svs'}\n")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    rc = main(["-q", "predict", "--input-list", str(lst), "-o", str(tmp_path / "batch"), "--segmenter", "threshold"])
    err = capsys.readouterr().err
    assert rc == 9 and "missing.svs" in err and not (tmp_path / "batch" / "CMU-1-Small-Region.geojson").exists()
    assert main(["-q", "predict", str(cmu_svs), "-o", str(out), "--shard", "3/2"]) == 2
