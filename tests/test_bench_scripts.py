"""The GPU benchmark cannot run here (no GPU on CI); its --device cpu mode runs the same code path on a tiny
model, so a lent GPU finds a script that works. The figures of this run are not measurements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_end_to_end_on_cpu(shared_data: Path, tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--device", "cpu", "--model", "vit_tiny",
           "--batch-sizes", "1,2", "--prompts", "auto,grid,centers,none", "--points-per-side", "4", "--seconds", "0.1",
           "--slide-side", "900", "--out", str(out)]
    env = {**os.environ, "NUCSEG_SHARED_DATA": str(shared_data)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["machine"]["torch"] == __import__("torch").__version__
    assert [row["batch"] for row in report["encoder"]] == [1, 2]
    assert all(row["tiles_per_s"] > 0 and row["peak_gib"] is None for row in report["encoder"])
    rows = {(row["prompts"], row["batch"]): row for row in report["end_to_end"]}
    assert set(rows) == {(m, b) for m in ("auto", "grid", "centers", "none") for b in (1, 2)}
    assert rows[("grid", 1)]["prompts_decoded_per_tile"] == 16  # 4 x 4 grid, every point decoded
    assert rows[("centers", 1)]["random_heads"] and rows[("centers", 1)]["prompts_decoded_per_tile"] > 512  # of 32²
    assert rows[("none", 2)]["decoder_calls_per_tile"] == 0  # no SAM decoder call at all
    assert {s["prompts"] for s in report["stages"]} == {"auto", "grid", "centers", "none"}
    assert all(s["encoder_ms_per_tile"] > 0 for s in report["stages"])
    slide = report["slide"]
    assert slide["tissue_tiles"] >= 1 and slide["wall_s"] > 0 and slide["s_per_mm2"] > 0
    assert slide["bound_by"] in slide["lanes_wall_s"] and {"read", "infer", "polygons", "write"} <= set(slide["stages"])
