"""What the repository tracks: no model weights but the demo base (issue 27).

Weights trained on users' data and the official SAM checkpoints never go into git. The one exception is the
demo's small base, built by the project's own pinned recipe from synthetic tiles (safetensors runs no code;
its SHA-256 is checked on every use, tests/test_demo_quality.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt", ".onnx", ".h5", ".pkl", ".npz", ".gguf")
ALLOWED_WEIGHTS = {"adapters/demo-base/sam_vit_tiny_demo.safetensors"}
MAX_DEMO_BASE_BYTES = 5 * 2**20


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]


def test_only_the_demo_base_is_a_tracked_weight_file():
    tracked = _tracked()
    weights = {p for p in tracked if p.lower().endswith(WEIGHT_SUFFIXES)}
    assert weights == ALLOWED_WEIGHTS, sorted(weights ^ ALLOWED_WEIGHTS)
    assert "adapters/demo-base/base.json" in tracked  # the record its SHA-256 is checked against
    for p in ALLOWED_WEIGHTS:
        assert (REPO / p).stat().st_size <= MAX_DEMO_BASE_BYTES
