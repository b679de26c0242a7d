"""Hostile adapters (``--adapter`` of predict, segment, merge, ...): tensors that match their recorded SHA-256
but are not what the method creates (issue 24, class 9): NaN or infinite weights, int8 or float64 weights,
another shape. Each is a CheckpointError (exit 4) with one line naming the tensor, never a model that gives
0 nuclei. See tests/hostile/CATALOGUE.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nucseg.errors import CheckpointError
from nucseg.io import sha256_file
from nucseg.model.adapter import load_adapter, save_adapter
from nucseg.model.lora import MethodConfig, apply_method
from nucseg.model.sam import load_sam
from nucseg_cli.main import main

SIZE = 256


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A small LoRA adapter on the seeded random vit_tiny base (no checkpoint file needed)."""
    model, fp = load_sam("vit_tiny", None, img_size=SIZE)
    apply_method(model, MethodConfig())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    meta = {"base": {"model": "vit_tiny", "fingerprint": fp, "init_seed": 0}, "input_size": SIZE, "mpp": 0.5}
    return save_adapter(tmp_path_factory.mktemp("adapter") / "ad", model, MethodConfig(), meta)


def _tampered(adapter: Path, tmp_path: Path, change) -> tuple[Path, str]:
    """A copy of the adapter with one LoRA tensor changed and its SHA-256 updated to match (the hash passes)."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    tensors = load_file(str(bad / "adapter.safetensors"))
    name = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[name] = change(tensors[name])
    save_file(tensors, str(bad / "adapter.safetensors"), metadata={"format": "nucseg-adapter"})
    meta = json.loads((bad / "nucseg.json").read_text())
    meta["weights_sha256"] = sha256_file(bad / "adapter.safetensors")
    (bad / "nucseg.json").write_text(json.dumps(meta))
    return bad, name


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[-1] = float("-inf")
    return t


CASES = [
    ("nan", _nan, "NaN or infinite"),
    ("infinite", _inf, "NaN or infinite"),
    ("int8", lambda t: (t * 100).to(torch.int8), "is int8, the method creates float32"),
    ("float64", lambda t: t.to(torch.float64), "is float64, the method creates float32"),
    ("shape", lambda t: t[:, :-1].contiguous(), "has shape"),
]


def test_the_untampered_adapter_loads(adapter):
    model, info = load_adapter(adapter)
    assert info.input_size == SIZE


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tensors_the_method_does_not_create_are_refused(case, adapter, tmp_path):
    _, change, message = case
    bad, name = _tampered(adapter, tmp_path, change)
    with pytest.raises(CheckpointError, match=message) as err:
        load_adapter(bad)
    assert name in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_the_cli_says_one_line_and_exits_4(case, adapter, tmp_path, capsys):
    _, change, message = case
    bad, name = _tampered(adapter, tmp_path, change)
    assert main(["-q", "merge", "--adapter", str(bad), "-o", str(tmp_path / "merged.safetensors")]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nucseg: error: ") and message in err[0] and name in err[0]
    assert not (tmp_path / "merged.safetensors").exists()
