"""Outputs follow the user's umask (0644 under 022), whatever library wrote them: colleagues on shared lab
storage must be able to read an adapter. safetensors' own writer creates 0600 files; atomic_path fixes that."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nucseg.learn.demo import make_demo_dataset
from nucseg.io import apply_umask, atomic_path, current_umask, new_only
from nucseg_cli.main import main

TINY = ["--model", "vit_tiny", "--device", "cpu", "--epochs", "1", "--batch-size", "4"]


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def _modes(*roots: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(files, folders) under ``roots`` -> permission bits."""
    files, dirs = {}, {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            (dirs if p.is_dir() else files)[str(p)] = stat.S_IMODE(p.stat().st_mode)
    return files, dirs


def test_safetensors_alone_writes_private_files_atomic_path_does_not(tmp_path, umask):
    umask(0o022)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "raw.safetensors"))
    raw = stat.S_IMODE((tmp_path / "raw.safetensors").stat().st_mode)
    with atomic_path(tmp_path / "ours.safetensors", owned=new_only) as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))
    assert stat.S_IMODE((tmp_path / "ours.safetensors").stat().st_mode) == 0o644
    if raw == 0o644:
        pytest.skip("this safetensors version already follows the umask")  # the fix above still holds
    assert raw == 0o600


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_file_train_writes_follows_the_umask(tmp_path, umask, mask):
    data = make_demo_dataset(tmp_path / "data", tiles_per_organ=2, size=128)
    umask(mask)
    assert current_umask() == mask
    out, merged = tmp_path / "run", tmp_path / "export"
    assert main(["-q", "train", "--data", str(data), "--out", str(out), "--merge", str(merged / "m.safetensors"),
                 *TINY]) == 0
    files, dirs = _modes(out, merged)
    assert {str(out / "adapter/adapter.safetensors"), str(merged / "m.safetensors")} <= set(files)
    assert all(v == 0o666 & ~mask for v in files.values()), {k: oct(v) for k, v in files.items()}
    assert all(v == 0o777 & ~mask for v in dirs.values()), {k: oct(v) for k, v in dirs.items()}


def test_apply_umask_keeps_executables_and_links(tmp_path, umask):
    umask(0o022)
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("x")
    (d / "x").write_text("#!/bin/sh\n")
    os.chmod(d / "f", 0o600)
    os.chmod(d / "x", 0o700)
    (d / "link").symlink_to(d / "f")
    apply_umask(d)
    assert stat.S_IMODE((d / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE((d / "x").stat().st_mode) == 0o755
    assert (d / "link").is_symlink()
