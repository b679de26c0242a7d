"""bench/compare_methods.py runs every method on the same folds and writes one table, JSON and plot (issue 16).
A small run on generated tiles checks the plumbing; the recorded figures are in docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

REPO = Path(__file__).resolve().parents[1]


def test_compare_methods_writes_one_table(tmp_path, tiny_official_ckpt):
    from nucseg.learn.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "demo", tiles_per_organ=2, size=128, seed=1)
    prefix = tmp_path / "methods"
    cmd = [sys.executable, str(REPO / "bench" / "compare_methods.py"), "--data", str(data), "--base",
           str(tiny_official_ckpt), "--tile-size", "128", "--folds", "2", "--epochs", "1", "--points-per-side", "4",
           "--methods", "zero-shot,lora,medsa", "--jobs", "2", "--out", str(tmp_path / "runs"), "--results", str(prefix)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(prefix.with_suffix(".json").read_text())
    rows = {row["method"]: row for row in report["methods"]}
    assert list(rows) == ["zero-shot", "lora", "medsa"]
    assert rows["zero-shot"]["trainable"] == 0 < rows["lora"]["trainable"] < rows["medsa"]["trainable"]
    assert all(len(row["folds"]) == 2 and row["peak_memory_mib"] > 0 for row in rows.values())
    assert rows["medsa"]["config"]["method"] == "medsa" and report["machine"]["torch"]
    # every trained method used the same folds as the zero-shot row
    for name in ("lora", "medsa"):
        assert [f["val_tiles"] for f in rows[name]["folds"]] == [f["val_tiles"] for f in rows["zero-shot"]["folds"]]
    md = prefix.with_suffix(".md").read_text()
    assert md.count("\n| ") == 4 and "| medsa | " in md
    assert prefix.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
