"""Safety of the user's files and machine: nothing nucseg reads can run code, no output replaces a file nucseg
did not write, and a tampered adapter is refused before anything is built from it (issue 10).

Each planted payload is a real pickle whose unpickling would create a marker file: the tests assert the
command fails with its documented code and one line, and that the marker never appears.
"""

from __future__ import annotations

import builtins
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nucseg.learn.demo import make_demo_dataset
from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main

THRESHOLD = ["--segmenter", "threshold", "--tile-size", "256", "--overlap", "32"]
TINY = ["--model", "vit_tiny", "--device", "cpu", "--epochs", "1", "--batch-size", "2"]


class _Payload:
    """Unpickling this opens (creates) ``marker``: proof that foreign code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "trainable": {}, "x": _Payload(marker)}, path)
    return path


def _one_error(rc: int, err: str, code: int, needle: str = "") -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("nucseg: error: ")]
    assert rc == code, err
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from nucseg.learn.data import load_dataset
    from nucseg.model.lora import MethodConfig
    from nucseg.learn.train import TrainConfig, finetune

    root = tmp_path_factory.mktemp("safety")
    p = {"root": root}
    p["slide"] = root / "slide.tif"
    make_synthetic_slide(p["slide"], 600, 500, mpp=0.5, nuclei=40, tissue_fraction=1.0, pyramid=False, seed=1)
    p["data"] = make_demo_dataset(root / "data", tiles_per_organ=2, size=128)
    tiles = load_dataset(p["data"])[:2]
    p["adapter"] = finetune(tiles, root / "run", "vit_tiny", None, MethodConfig(),
                            TrainConfig(epochs=1, batch_size=2, device="cpu")).adapter
    return p


# ------------------------------------------------------------------------------------------ no unpickling
def test_the_payload_is_real(tmp_path):
    """Control: unpickling the planted file does run its code, so the tests below prove something."""
    marker = tmp_path / "PWNED"
    torch.load(_plant(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.safetensors"])
def test_planted_training_checkpoint_never_runs(name, inputs, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    out = tmp_path / "run"
    _plant(out / name, marker)
    rc = main(["-q", "train", "--data", str(inputs["data"]), "--out", str(out), *TINY])
    _one_error(rc, capsys.readouterr().err, 4, str(out / name))
    assert not marker.exists()
    assert not (out / "adapter").exists()


def test_planted_cv_fold_checkpoint_never_runs(inputs, tmp_path, capsys):
    """cv resumes folds by default: a pickle planted in a fold's run folder must not run either."""
    marker = tmp_path / "PWNED"
    out = tmp_path / "cv"
    _plant(out / "fold_1" / "train" / "checkpoint.pt", marker)
    _plant(out / "fold_2" / "train" / "checkpoint.safetensors", marker)
    rc = main(["-q", "cv", "--data", str(inputs["data"]), "--out", str(out), "--folds", "2", *TINY])
    _one_error(rc, capsys.readouterr().err, 4, "checkpoint")
    assert not marker.exists()


def test_planted_base_checkpoint_never_runs(inputs, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    ckpt = _plant(tmp_path / "sam_vit_tiny.pth", marker)
    rc = main(["-q", "train", "--data", str(inputs["data"]), "--out", str(tmp_path / "run"), "--checkpoint",
               str(ckpt), *TINY])
    _one_error(rc, capsys.readouterr().err, 4, str(ckpt))
    assert not marker.exists()


def test_planted_adapter_weights_never_run(inputs, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    adapter = tmp_path / "adapter"
    shutil.copytree(inputs["adapter"], adapter)
    _plant(adapter / "adapter.safetensors", marker)
    rc = main(["-q", "predict", str(inputs["slide"]), "-o", str(tmp_path / "x.geojson"), "--adapter", str(adapter)])
    _one_error(rc, capsys.readouterr().err, 4, "adapter.safetensors")
    assert not marker.exists()


def test_training_state_round_trips_without_pickle(inputs, tmp_path):
    """The checkpoint is safetensors + JSON, and holds what exact resume needs."""
    from safetensors import safe_open

    from nucseg.learn.train import load_training_state

    ckpt = inputs["root"] / "run" / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as fh:
        assert "nucseg_training_state" in fh.metadata()
    state = load_training_state(ckpt)
    assert state["epoch"] == 0 and len(state["history"]) == 1
    assert state["trainable"] and state["optimizer"]["state"] and state["scheduler"]["last_epoch"] >= 1
    assert isinstance(state["fingerprint"], dict)


def test_rerun_of_train_resumes_without_flags(inputs, tmp_path, capsys):
    """What a requeued SLURM job does: the same command again finishes from the checkpoint."""
    out = tmp_path / "run"
    argv = ["-q", "train", "--data", str(inputs["data"]), "--out", str(out), *TINY]
    assert main(argv) == 0
    first = (out / "adapter" / "adapter.safetensors").read_bytes()
    t0 = time.perf_counter()
    assert main(argv) == 0  # all epochs done: nothing is retrained, the same adapter is written again
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == first
    capsys.readouterr()
    rc = main(["-q", "train", "--data", str(inputs["data"]), "--out", str(out), *TINY, "--rank", "2"])
    _one_error(rc, capsys.readouterr().err, 4, "belongs to a different run")
    assert time.perf_counter() - t0 < 120


# ------------------------------------------------------------------------------- outputs never destroy
def _predict(inputs, out: Path, *extra: str) -> list[str]:
    return ["-q", "predict", str(inputs["slide"]), "-o", str(out), *THRESHOLD, *extra]


@pytest.mark.parametrize("what", ["labels-file", "labels-slide", "labels-dir", "geojson", "csv", "preview"])
def test_outputs_never_replace_foreign_files(what, inputs, tmp_path, capsys):
    slide_bytes = inputs["slide"].read_bytes()
    out = tmp_path / "x.geojson"
    victim = {"labels-file": tmp_path / "notes.txt", "labels-slide": inputs["slide"], "labels-dir": tmp_path / "mine",
              "geojson": out, "csv": tmp_path / "x.csv", "preview": tmp_path / "x.preview.png"}[what]
    if what == "labels-dir":
        victim.mkdir()
        (victim / "thesis.docx").write_text("years of work")
    elif what == "preview":
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(victim)
    elif what != "labels-slide":
        victim.write_text('{"type": "FeatureCollection", "features": []}' if what == "geojson" else "id,a,b\n1,2,3\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    extra = {"labels-file": ["--labels", str(victim)], "labels-slide": ["--labels", str(victim)],
             "labels-dir": ["--labels", str(victim)], "csv": ["--csv"], "preview": ["--preview"]}.get(what, [])
    rc = main(_predict(inputs, out, *extra))
    err = capsys.readouterr().err
    _one_error(rc, err, 6, str(victim))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing changed or added
    assert inputs["slide"].read_bytes() == slide_bytes


def test_reruns_replace_their_own_outputs(inputs, tmp_path, capsys):
    out = tmp_path / "x.geojson"
    argv = _predict(inputs, out, "--csv", "--preview", "--tissue-preview", "--labels", str(tmp_path / "x.zarr"))
    assert main(argv) == 0
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert set(first) == {"x.geojson", "x.csv", "x.preview.png", "x.tissue.png"}
    assert main(argv) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == first
    capsys.readouterr()
    rc = main(_predict(inputs, out, "--labels", str(out)))
    _one_error(rc, capsys.readouterr().err, 2, "two outputs")


def test_geojson_marker_is_a_foreign_member(inputs, tmp_path):
    """The marker that lets reruns replace the file is a GeoJSON foreign member: readers ignore it."""
    import geojson

    out = tmp_path / "x.geojson"
    assert main(_predict(inputs, out)) == 0
    doc = geojson.loads(out.read_text())
    assert doc.is_valid and doc["nucseg"]["nucseg_version"] and len(doc["features"]) > 0


def test_segment_refuses_to_write_over_its_inputs(inputs, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    src = next(inputs["data"].glob("*/tissue images/*.png"))
    shutil.copy(src, images / "a.png")
    Image.open(src).save(images / "b.tif")
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    adapter = ["--adapter", str(inputs["adapter"])]
    rc = main(["-q", "segment", str(images), "-o", str(images), *adapter])
    _one_error(rc, capsys.readouterr().err, 6, "input")
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    # a.png and a.jpg would both write a.tif
    Image.open(src).convert("RGB").save(tmp_path / "a.jpg")
    rc = main(["-q", "segment", str(images / "a.png"), str(tmp_path / "a.jpg"), "-o", str(tmp_path / "out"), *adapter])
    _one_error(rc, capsys.readouterr().err, 2, "would both write")
    assert not (tmp_path / "out").exists()
    # a foreign a.tif in the output folder is kept; nucseg's own is replaced on a rerun
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.tif").write_bytes(b"someone else's file")
    rc = main(["-q", "segment", str(images / "a.png"), "-o", str(tmp_path / "out"), *adapter])
    _one_error(rc, capsys.readouterr().err, 6, "a.tif")
    assert (tmp_path / "out" / "a.tif").read_bytes() == b"someone else's file"
    (tmp_path / "out" / "a.tif").unlink()
    assert main(["-q", "segment", str(images / "a.png"), "-o", str(tmp_path / "out"), *adapter]) == 0
    assert main(["-q", "segment", str(images / "a.png"), "-o", str(tmp_path / "out"), *adapter]) == 0


def test_train_and_merge_never_replace_foreign_files(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "notes.txt").write_text("mine")
    rc = main(["-q", "train", "--data", str(inputs["data"]), "--out", str(run), *TINY])
    _one_error(rc, capsys.readouterr().err, 6, str(run / "adapter"))
    assert (run / "adapter" / "notes.txt").read_text() == "mine"
    merged = tmp_path / "model.safetensors"
    merged.write_text("not a model nucseg exported")
    rc = main(["-q", "merge", "--adapter", str(inputs["adapter"]), "-o", str(merged)])
    _one_error(rc, capsys.readouterr().err, 6, str(merged))
    assert merged.read_text() == "not a model nucseg exported"
    rc = main(["-q", "train", "--data", str(inputs["data"]), "--out", str(inputs["data"] / "run"), *TINY])
    _one_error(rc, capsys.readouterr().err, 6, "input")
    merged.unlink()
    assert main(["-q", "merge", "--adapter", str(inputs["adapter"]), "-o", str(merged)]) == 0
    assert main(["-q", "merge", "--adapter", str(inputs["adapter"]), "-o", str(merged)]) == 0  # its own: replaced


# ----------------------------------------------------------------------------------- tampered adapters
TAMPER = [
    ("input_size-text", lambda m: m.update(input_size="abc")),
    ("input_size-zero", lambda m: m.update(input_size=0)),
    ("input_size-negative", lambda m: m.update(input_size=-256)),
    ("input_size-huge", lambda m: m.update(input_size=1 << 20)),
    ("mpp-text", lambda m: m.update(mpp="0.5um")),
    ("mpp-huge", lambda m: m.update(mpp=1e300)),
    ("mpp-tiny", lambda m: m.update(mpp=1e-9)),
    ("format_version-text", lambda m: m.update(format_version="2")),
    ("format_version-newer", lambda m: m.update(format_version=99)),
    ("base-string", lambda m: m.update(base="vit_tiny")),
    ("base-model", lambda m: m["base"].update(model="vit_zz")),
    ("weights-sha", lambda m: m.update(weights_sha256=123)),
    ("method-rank-huge", lambda m: m["method"].update(rank=10**7)),
    ("no-format", lambda m: m.pop("format")),
    ("thresholds-text", lambda m: m.update(thresholds={"pred_iou_thresh": "high", "metric": "pq", "score": 0.5})),
    ("thresholds-nan", lambda m: m.update(thresholds={"nms_iou": float("nan"), "metric": "pq", "score": 0.5})),
]


@pytest.mark.parametrize("case", TAMPER, ids=[c[0] for c in TAMPER])
def test_tampered_adapter_description_is_refused(case, inputs, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(inputs["adapter"], adapter)
    meta = json.loads((adapter / "nucseg.json").read_text())
    case[1](meta)
    (adapter / "nucseg.json").write_text(json.dumps(meta))
    t0 = time.perf_counter()
    rc = main(["-q", "predict", str(inputs["slide"]), "-o", str(tmp_path / "x.geojson"), "--adapter", str(adapter)])
    _one_error(rc, capsys.readouterr().err, 4, str(adapter))
    assert time.perf_counter() - t0 < 30  # refused before anything is built
    assert not (tmp_path / "x.geojson").exists()


@pytest.mark.parametrize("how", ["list", "rank", "method-file", "not-json"])
def test_tampered_method_file_is_refused(how, inputs, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(inputs["adapter"], adapter)
    if how == "list":
        (adapter / "nucseg.json").write_text("[1, 2, 3]")
    elif how == "not-json":
        (adapter / "nucseg.json").write_bytes(b"\xff\xfe garbage")
    else:
        method = json.loads((adapter / "method.json").read_text())
        method["rank"] = 10**7 if how == "rank" else 8
        (adapter / "method.json").write_text(json.dumps(method))  # its SHA-256 in nucseg.json no longer matches
    rc = main(["-q", "predict", str(inputs["slide"]), "-o", str(tmp_path / "x.geojson"), "--adapter", str(adapter)])
    _one_error(rc, capsys.readouterr().err, 4, str(adapter))
