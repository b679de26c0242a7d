"""Every kind of bad input through the CLI: one line ``nucseg: error: ...`` naming the file, the documented exit
code (docs/CLI.md), no traceback unless ``--debug``, and nothing half-written where the outputs go.

Cases already covered in test_cv_cli.py (missing dataset folder, missing label file, corrupt checkpoint for
train, missing image for segment) are not repeated here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nucseg.learn.demo import make_demo_dataset
from nucseg.errors import NucsegError
from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

NUCSEG = str(Path(sys.executable).with_name("nucseg"))
THRESHOLD = ["--segmenter", "threshold", "--tile-size", "256", "--overlap", "32"]
TINY = ["--model", "vit_tiny", "--device", "cpu", "--epochs", "1", "--batch-size", "2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Good and bad inputs, made once: slides, a dataset, an adapter and damaged copies."""
    from nucseg.learn.data import load_dataset
    from nucseg.model.lora import MethodConfig
    from nucseg.learn.train import TrainConfig, finetune

    root = tmp_path_factory.mktemp("inputs")
    p = {"root": root}
    p["slide"] = root / "good.tif"
    make_synthetic_slide(p["slide"], 600, 500, mpp=0.5, nuclei=40, tissue_fraction=1.0, pyramid=False, seed=1)
    p["nompp"] = root / "nompp.tif"
    make_synthetic_slide(p["nompp"], 600, 500, mpp=None, nuclei=40, tissue_fraction=1.0, pyramid=False, seed=2)
    p["blank"] = root / "blank.tif"
    make_synthetic_slide(p["blank"], 700, 600, empty=True, pyramid=False)
    p["notslide"] = root / "notes.svs"
    p["notslide"].write_text("this is a text file, not a slide\n")
    p["junk_ckpt"] = root / "junk.pth"
    p["junk_ckpt"].write_bytes(b"\x00" * 256)
    p["blocker"] = root / "blocker"
    p["blocker"].write_text("a file where a folder should be")
    p["data"] = make_demo_dataset(root / "data", tiles_per_organ=2, size=128)
    tiles = load_dataset(p["data"])[:2]
    p["adapter"] = finetune(tiles, root / "run", "vit_tiny", None, MethodConfig(),
                            TrainConfig(epochs=1, batch_size=2, device="cpu")).adapter
    p["bad_adapter"] = root / "bad_adapter"
    shutil.copytree(p["adapter"], p["bad_adapter"])
    weights = p["bad_adapter"] / "adapter.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-8:] = b"\xff" * 8  # damaged in transfer: same size, different bytes
    weights.write_bytes(bytes(raw))
    return p


def _dataset_variant(src: Path, dst: Path, kind: str) -> Path:
    """A copy of the demo dataset with one defect."""
    if kind == "empty":
        dst.mkdir()
        return dst
    shutil.copytree(src, dst)
    organ = sorted(p for p in dst.iterdir() if p.is_dir())[0]
    images, labels = organ / "tissue images", organ / "label masks modify"
    first = sorted(images.glob("*.png"))[0]
    if kind == "no-label":
        (labels / f"{first.stem}.tif").unlink()
    elif kind == "size":
        tifffile.imwrite(labels / f"{first.stem}.tif", np.zeros((64, 100), np.uint16))
    elif kind == "not-image":
        first.write_text("not a PNG at all")
    elif kind == "no-images":
        for f in images.iterdir():
            f.unlink()
        (images / "README.txt").write_text("images go here")
    return dst


def _written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _check(rc: int, err: str, code: int, needle: str) -> None:
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("nucseg: error: ")]
    assert rc == code, err
    assert len(errors) == 1 and needle in errors[0], err
    assert lines[-1] == errors[0]
    assert "Traceback" not in err


SLIDE_CASES = [
    # (id, argv builder, exit code, text the error line must contain)
    ("missing-slide", lambda p, o: ["predict", str(p["root"] / "nope.svs"), "-o", str(o / "x.geojson"), *THRESHOLD],
     2, "slide not found: {root}/nope.svs"),
    ("not-a-slide", lambda p, o: ["predict", str(p["notslide"]), "-o", str(o / "x.geojson"), *THRESHOLD],
     5, "cannot open slide {notslide}"),
    ("no-mpp", lambda p, o: ["predict", str(p["nompp"]), "-o", str(o / "x.geojson"), *THRESHOLD],
     5, "slide {nompp} has no µm/px"),
    ("missing-input-list", lambda p, o: ["predict", "--input-list", str(p["root"] / "list.txt"), "--out-dir", str(o),
                                         *THRESHOLD], 2, "input list not found: {root}/list.txt"),
    ("corrupt-checkpoint", lambda p, o: ["predict", str(p["slide"]), "-o", str(o / "x.geojson"), "--model", "vit_tiny",
                                         "--checkpoint", str(p["junk_ckpt"])], 4, "cannot read checkpoint {junk_ckpt}"),
    ("corrupt-adapter", lambda p, o: ["predict", str(p["slide"]), "-o", str(o / "x.geojson"),
                                      "--adapter", str(p["bad_adapter"])], 4, "{bad_adapter}/adapter.safetensors"),
    ("adapter-other-model", lambda p, o: ["predict", str(p["slide"]), "-o", str(o / "x.geojson"),
                                          "--adapter", str(p["adapter"]), "--model", "vit_b"], 4,
     "adapter {adapter} is for vit_tiny"),
    ("not-an-adapter", lambda p, o: ["predict", str(p["slide"]), "-o", str(o / "x.geojson"),
                                     "--adapter", str(p["data"])], 4, "{data} is not a nucseg adapter"),
    ("bad-scheduler", lambda p, o: ["predict", str(p["slide"]), str(p["nompp"]), "--out-dir", str(o),
                                    "--work-dir", str(o / "w"), "--scheduler", "nowhere", *THRESHOLD], 2,
     "cannot reach the dask scheduler nowhere"),
    ("tiles-per-task-alone", lambda p, o: ["predict", str(p["slide"]), "-o", str(o / "x.geojson"),
                                           "--tiles-per-task", "64", *THRESHOLD], 2, "--tiles-per-task N (N >= 0) goes with"),
    ("unwritable-geojson", lambda p, o: ["predict", str(p["slide"]), "-o", str(p["blocker"] / "x.geojson"),
                                         *THRESHOLD], 6, "{blocker}"),
    ("unwritable-out-dir", lambda p, o: ["predict", str(p["slide"]), str(p["nompp"]), "--out-dir",
                                         str(p["blocker"] / "out"), *THRESHOLD], 6, "cannot write to {blocker}/out"),
    ("unwritable-train-out", lambda p, o: ["train", "--data", str(p["data"]), "--out", str(p["blocker"] / "run"),
                                           *TINY], 6, "cannot write to {blocker}/run"),
    ("unwritable-cv-out", lambda p, o: ["cv", "--data", str(p["data"]), "--out", str(p["blocker"] / "cv"), "--folds",
                                        "2", *TINY], 6, "cannot write to {blocker}/cv"),
    ("unwritable-segment-out", lambda p, o: ["segment", str(next(p["data"].glob("*/tissue images"))), "-o", str(p["blocker"] / "seg"),
                                             "--adapter", str(p["adapter"])], 6, "cannot write to {blocker}/seg"),
]


@pytest.mark.parametrize("case", SLIDE_CASES, ids=[c[0] for c in SLIDE_CASES])
def test_slide_model_and_output_errors(case, inputs, tmp_path, capsys):
    _, argv, code, needle = case
    out = tmp_path / "out"
    rc = main(["-q", *argv(inputs, out)])
    _check(rc, capsys.readouterr().err, code, needle.format(**{k: str(v) for k, v in inputs.items()}))
    assert _written(out) == []  # nothing half-written where the outputs go
    assert _written(tmp_path) == []


def test_truncated_svs(cmu_svs, tmp_path, capsys):
    trunc = tmp_path / "cut.svs"
    shutil.copyfile(cmu_svs, trunc)
    os.chmod(trunc, 0o644)
    with open(trunc, "r+b") as fh:
        fh.truncate(os.path.getsize(trunc) // 2)
    out = tmp_path / "out"
    rc = main(["-q", "predict", str(trunc), "-o", str(out / "cut.geojson"), *THRESHOLD])
    _check(rc, capsys.readouterr().err, 5, f"cannot open slide {trunc}")
    assert _written(out) == []


@pytest.mark.parametrize("kind,needle", [
    ("no-label", "missing label file"),
    ("size", "size mismatch"),
    ("not-image", "cannot read image"),
    ("no-images", "no images in"),
    ("empty", "no NuInsSeg organ folders under"),
])
@pytest.mark.parametrize("command", ["train", "cv"])
def test_bad_datasets_fail_before_any_output(command, kind, needle, inputs, tmp_path, capsys):
    data = _dataset_variant(inputs["data"], tmp_path / "data", kind)
    out = tmp_path / "run"
    rc = main(["-q", command, "--data", str(data), "--out", str(out), *TINY, *(["--folds", "2"] if command == "cv" else [])])
    err = capsys.readouterr().err
    _check(rc, err, 3, needle)
    assert str(data) in err  # the message names the file or folder at fault
    assert not out.exists()


def test_slide_without_tissue_is_an_empty_collection_and_a_warning(inputs, tmp_path):
    out = tmp_path / "blank.geojson"
    r = subprocess.run([NUCSEG, "-q", "predict", str(inputs["blank"]), "-o", str(out), *THRESHOLD],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"nucseg: warning: no tissue found in {inputs['blank']}" in r.stderr
    assert "error" not in r.stderr and "Traceback" not in r.stderr
    fc = json.loads(out.read_text())  # an empty collection, with the "nucseg" provenance member (issue 9)
    assert (fc["type"], fc["features"], set(fc)) == ("FeatureCollection", [], {"type", "nucseg", "features"})
    assert "0 nuclei" in r.stdout


def test_batch_with_bad_slides_finishes_the_good_ones(inputs, tmp_path, capsys):
    """In a batch, a bad slide is one failed line and exit 9; the good slides are done and logged."""
    out = tmp_path / "out"
    slides = [inputs["slide"], inputs["notslide"], inputs["nompp"]]
    rc = main(["-q", "predict", *map(str, slides), "--out-dir", str(out), *THRESHOLD])
    err = capsys.readouterr().err
    assert rc == 9
    failed = [line for line in err.splitlines() if line.startswith("nucseg: error: ")]
    assert len(failed) == 2 and str(inputs["notslide"]) in failed[0] and str(inputs["nompp"]) in failed[1]
    assert "Traceback" not in err
    assert _written(out) == ["good.geojson", "good.summary.json", "nucseg-run.jsonl", "run-summary.json"]


def test_debug_shows_the_traceback(inputs, tmp_path):
    with pytest.raises(NucsegError, match="slide not found"):
        main(["--debug", "-q", "predict", str(tmp_path / "nope.svs"), "-o", str(tmp_path / "x.geojson"), *THRESHOLD])
    argv = ["predict", str(inputs["notslide"]), "-o", str(tmp_path / "x.geojson"), *THRESHOLD]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    plain = subprocess.run([NUCSEG, "-q", *argv], capture_output=True, text=True, env=env)
    assert plain.returncode == 5
    assert plain.stderr.strip().splitlines() == [
        f"nucseg: error: cannot open slide {inputs['notslide']}: not a supported whole-slide format, or "
        "truncated/corrupt"]
    debug = subprocess.run([NUCSEG, "--debug", "-q", *argv], capture_output=True, text=True, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "SlideError" in debug.stderr
    assert _written(tmp_path) == []


@pytest.mark.parametrize("err", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_out_of_memory_is_exit_7(err, tmp_path, monkeypatch, capsys):
    """What is left when halving the batch could not help (the inference halves it on a GPU OOM first)."""
    import torch  # noqa: F401  (loaded, as it is whenever a model ran)

    import nucseg_cli.commands as commands

    def predict(args):
        raise err

    monkeypatch.setattr(commands, "predict", predict)  # the parser picks the command up when main() builds it
    assert main(["-q", "predict", "x.svs", "-o", str(tmp_path / "x.geojson")]) == 7
    assert capsys.readouterr().err.strip().splitlines() == [
        "nucseg: error: out of memory; lower --batch-size or --decoder-batch"]

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(commands, "predict", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error is a bug: it keeps its traceback
        main(["-q", "predict", "x.svs", "-o", str(tmp_path / "x.geojson")])
