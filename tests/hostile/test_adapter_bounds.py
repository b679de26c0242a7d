"""Hostile adapters and base checkpoints (issue 24, classes 12, 14): a tampered model name or a checkpoint of
another architecture is refused before any model is built, and a deeply nested ``nucseg.json`` is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import nucseg.model.sam as sam
from nucseg.learn.demo import make_demo_dataset
from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main
from hostile_helpers import one_error_line


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from nucseg.learn.data import load_dataset
    from nucseg.learn.train import TrainConfig, finetune
    from nucseg.model.lora import MethodConfig

    root = tmp_path_factory.mktemp("adapter")
    p = {"slide": root / "s.tif"}
    make_synthetic_slide(p["slide"], 300, 300, mpp=0.5, nuclei=10, tissue_fraction=1.0, pyramid=False, seed=1)
    tiles = load_dataset(make_demo_dataset(root / "data", tiles_per_organ=1, size=64))[:2]
    p["adapter"] = finetune(tiles, root / "run", "vit_tiny", None, MethodConfig(),
                            TrainConfig(epochs=1, batch_size=2, device="cpu", calibration_fraction=0)).adapter
    return p


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """Every model build_sam is asked for; anything but vit_tiny is refused on the spot (never allocated)."""
    asked: list[str] = []
    real = sam.build_sam

    def build(spec, img_size=512):
        name = spec if isinstance(spec, str) else spec.name
        asked.append(name)
        if name != "vit_tiny":
            raise AssertionError(f"a {name} was built")
        return real(spec, img_size)

    monkeypatch.setattr(sam, "build_sam", build)
    return asked


def _predict(inputs, out: Path, *extra: str) -> list[str]:
    return ["-q", "predict", str(inputs["slide"]), "-o", str(out / "x.geojson"), "--tile-size", "256", *extra]


def test_a_tampered_base_model_is_refused_before_it_is_built(inputs, tmp_path, builds, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(inputs["adapter"], adapter)
    meta = json.loads((adapter / "nucseg.json").read_text())
    meta["base"]["model"] = "vit_h"  # the fingerprint still says random-init:vit_tiny
    (adapter / "nucseg.json").write_text(json.dumps(meta))
    rc = main(_predict(inputs, tmp_path / "out", "--adapter", str(adapter)))
    one_error_line(rc, capsys.readouterr().err, 4, "do not match the recorded base")
    assert builds == []


def test_a_checkpoint_of_another_architecture_is_refused_before_the_model_is_built(
        inputs, tiny_official_ckpt, tmp_path, builds, capsys):
    rc = main(_predict(inputs, tmp_path / "out", "--model", "vit_b", "--checkpoint", str(tiny_official_ckpt)))
    one_error_line(rc, capsys.readouterr().err, 4, "which does not fit --model vit_b")
    assert builds == []


def test_the_untampered_adapter_still_loads(inputs, tmp_path, builds):
    from nucseg.model.adapter import load_adapter

    model, info = load_adapter(inputs["adapter"])
    assert info.model_type == "vit_tiny" and builds == ["vit_tiny"]


@pytest.mark.parametrize("where", ["nucseg.json", "method.json"])
def test_deeply_nested_adapter_json_is_one_line(where, inputs, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(inputs["adapter"], adapter)
    text = (adapter / where).read_text()
    (adapter / where).write_text(text.rstrip().rstrip("}") + ', "notes": ' + "[" * 100_000 + "]" * 100_000 + "}")
    if where == "method.json":  # the tamperer updates the recorded hash too
        from nucseg.io import sha256_file

        meta = json.loads((adapter / "nucseg.json").read_text())
        meta["method_sha256"] = sha256_file(adapter / where)
        (adapter / "nucseg.json").write_text(json.dumps(meta))
    rc = main(_predict(inputs, tmp_path / "out", "--adapter", str(adapter)))
    one_error_line(rc, capsys.readouterr().err, 4, "nested more than 64 levels")


def test_deeply_nested_nucseg_json_in_train_out_is_not_a_traceback(inputs, tmp_path, capsys):
    """``train --out`` asks whether the adapter folder there is nucseg's: a planted deep nucseg.json is simply
    not an adapter nucseg wrote (exit 6, untouched), not a RecursionError."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "nucseg.json").write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    data = inputs["adapter"].parent.parent / "data"
    rc = main(["-q", "train", "--data", str(data), "--out", str(run), "--model", "vit_tiny", "--device", "cpu",
               "--epochs", "1", "--batch-size", "2"])
    one_error_line(rc, capsys.readouterr().err, 6, f"refusing to replace {run / 'adapter'}")
