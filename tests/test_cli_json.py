"""``--json`` summaries on stdout (messages on stderr) and the warning for tissue without nuclei (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nucseg.learn.demo import make_demo_dataset
from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main

THRESHOLD = ["--segmenter", "threshold", "--tile-size", "256", "--overlap", "32"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("json")
    good, bare = root / "good.tif", root / "bare.tif"
    make_synthetic_slide(good, 600, 500, mpp=0.5, nuclei=40, tissue_fraction=1.0, pyramid=False, seed=1)
    make_synthetic_slide(bare, 1200, 1000, mpp=0.5, nuclei=0, tissue_fraction=1.0, pyramid=False, seed=2)
    return {"good": good, "bare": bare}


def test_predict_json_is_one_object_on_stdout(slides, tmp_path, capsys):
    rc = main(["-q", "predict", str(slides["good"]), "-o", str(tmp_path / "g.geojson"), "--json", *THRESHOLD])
    out, err = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out)  # stdout is exactly one JSON document
    assert doc["failed"] == 0 and doc["nuclei"] == doc["slides"][0]["nuclei"] > 20
    assert doc["slides"][0]["output"] == str(tmp_path / "g.geojson")
    assert "nuclei" in err  # the human line moved to stderr


def test_tissue_without_nuclei_warns_and_says_why(slides, tmp_path, capsys, recwarn):
    rc = main(["-q", "predict", str(slides["bare"]), "-o", str(tmp_path / "b.geojson"), "--json", *THRESHOLD])
    out, err = capsys.readouterr()
    shown = [str(w.message) for w in recwarn if "no nuclei in" in str(w.message)]
    assert rc == 0
    doc = json.loads(out)
    assert doc["nuclei"] == 0 and doc["slides"][0]["tissue_tiles"] > 0
    assert len(doc["warnings"]) == 1 and "no nuclei" in doc["warnings"][0] and "µm/px" in doc["warnings"][0]
    assert shown == doc["warnings"]  # warned once, and the same words are in the summary


def test_segment_and_train_json(tmp_path, capsys):
    data = make_demo_dataset(tmp_path / "data", tiles_per_organ=2, size=128)
    tiny = ["--model", "vit_tiny", "--device", "cpu", "--epochs", "1", "--batch-size", "2"]
    assert main(["-q", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--json", *tiny]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["epochs"] == 1 and doc["trainable"] < doc["total"] and Path(doc["adapter"]).is_dir()
    images = next(data.glob("*/tissue images"))
    assert main(["-q", "segment", str(images), "-o", str(tmp_path / "seg"), "--adapter", doc["adapter"],
                 "--json", "--points-per-side", "8"]) == 0
    seg = json.loads(capsys.readouterr().out)
    assert len(seg["images"]) == 2 and all(Path(i["labels"]).is_file() for i in seg["images"])
    assert seg["nuclei"] == sum(i["nuclei"] for i in seg["images"])


def test_single_mask_and_adapter_without_mpp(tmp_path):
    """A base nucseg trained answers with output 0 (--single-mask); SAM's own base needs its 3 masks (default).
    An adapter that records no µm/px says so when it is built."""
    from nucseg.learn.data import load_dataset
    from nucseg.segmenter import SegmenterSpec
    from nucseg.model.lora import MethodConfig
    from nucseg.learn.train import TrainConfig, finetune

    assert SegmenterSpec.sam(model="vit_tiny", device="cpu").build().cfg.multimask is True
    assert SegmenterSpec.sam(model="vit_tiny", device="cpu", single_mask=True).build().cfg.multimask is False
    data = make_demo_dataset(tmp_path / "data", tiles_per_organ=1, size=64)
    adapter = finetune(load_dataset(data), tmp_path / "run", "vit_tiny", None, MethodConfig(),
                       TrainConfig(epochs=1, batch_size=2, device="cpu")).adapter
    with pytest.warns(UserWarning, match="records no µm/px"):
        SegmenterSpec.sam(adapter, device="cpu").build()


def test_cv_tile_size_is_the_model_input(tmp_path, capsys):
    data = make_demo_dataset(tmp_path / "data", tiles_per_organ=2, size=128)
    rc = main(["-q", "cv", "--data", str(data), "--out", str(tmp_path / "cv"), "--folds", "2", "--tile-size", "64",
               "--model", "vit_tiny", "--device", "cpu", "--epochs", "1", "--batch-size", "4", "--points-per-side", "4",
               "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tiles"] == 4 and summary["tile_size"] == 64  # 4 whole images; training cuts 64-px tiles
    meta = json.loads((tmp_path / "cv" / "fold_1" / "train" / "adapter" / "nucseg.json").read_text())
    assert meta["input_size"] == 64
