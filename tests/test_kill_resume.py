"""SIGKILL the real CLI at random moments, rerun the same command, and get exactly the uninterrupted outputs.

Each test first runs the command once without interruption (the reference, and the measure of how long a
run takes), then runs it again in a fresh folder, killing it with SIGKILL at seeded random moments spread
over that duration, and finally lets it finish. Kill moments are cumulative: run *i* is killed after half
the startup time plus the next slice of the reference's work, so the kills fall throughout the run (startup,
reading, predicting, stitching, writing; early and late epochs, scoring, summaries), not all at the start.

Stress it: ``NUCSEG_KILL_SEED=7 NUCSEG_KILLS=20 pytest tests/test_kill_resume.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nucseg.wsi.synthslide import make_synthetic_slide

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

NUCSEG = str(Path(sys.executable).with_name("nucseg"))
SEED = int(os.environ.get("NUCSEG_KILL_SEED", "20240611"))
KILLS = int(os.environ.get("NUCSEG_KILLS", "0")) or None
TEMP = re.compile(r"^\..+\.tmp-[0-9a-f]{12}|^\.nucseg-probe-")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
ENV.pop("SLURM_ARRAY_TASK_ID", None)


def _run(argv: list[str], cwd: Path, env: dict = ENV) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([NUCSEG, "-q", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return time.perf_counter() - t0


def _startup(modules: str, env: dict = ENV) -> float:
    """Seconds before a fresh process starts working: interpreter plus the command's imports."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {modules}"], check=True, env=env)
    return time.perf_counter() - t0


def _kill_and_finish(argv: list[str], cwd: Path, duration: float, startup: float, kills: int, seed: int,
                     env: dict = ENV) -> int:
    """Kill the command ``kills`` times at seeded moments, then run it to completion; returns kills that hit."""
    rng = np.random.default_rng([SEED, seed])
    work = max(duration - startup, 0.1)
    # Up to 90 % of the reference's work, and only half the measured startup per run: the machine's load
    # changes between runs, and a schedule that ran ahead of the real progress would find runs finished.
    moments = np.sort(rng.uniform(0.02, 0.9, KILLS or kills)) * work
    hits = 0
    for prev, at in zip(np.concatenate([[0.0], moments[:-1]]), moments):
        proc = subprocess.Popen([NUCSEG, "-q", *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=startup / 2 + (at - prev))
            finished = True
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            finished = False
        _, err = proc.communicate()
        if finished:  # it completed before its kill moment: a valid run, but no kill
            assert proc.returncode == 0, err
        else:
            hits += 1
            assert proc.returncode == -signal.SIGKILL
    _run(argv, cwd, env)
    return hits


def _temps(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if TEMP.match(p.name))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("slides")
    a, b = root / "alpha.tif", root / "beta.tif"
    make_synthetic_slide(a, 1800, 1500, mpp=0.5, nuclei=420, tissue_fraction=0.8, seed=3)
    make_synthetic_slide(b, 1300, 1100, mpp=0.5, nuclei=220, tissue_fraction=0.9, seed=4)
    return [a, b]


PREDICT = ["--segmenter", "threshold", "--tile-size", "256", "--overlap", "48", "--batch-size", "2"]


def test_predict_one_slide_survives_random_kills(slides, tmp_path):
    argv = ["predict", str(slides[0]), "-o", "out/alpha.geojson", "--csv", "--labels", "out/alpha.labels.zarr",
            "--work-dir", "work", *PREDICT]
    (tmp_path / "ref").mkdir()
    (tmp_path / "kill").mkdir()
    duration = _run(argv, tmp_path / "ref")
    hits = _kill_and_finish(argv, tmp_path / "kill", duration, _startup("nucseg.wsi.predict, nucseg.model.classical"), 6, 1)
    print(f"{hits} SIGKILLs landed before the run finished")  # shown by pytest -rP
    assert hits >= 3, f"only {hits} kills landed before the run finished"
    ref, got = _files(tmp_path / "ref" / "out"), _files(tmp_path / "kill" / "out")
    assert {"alpha.geojson", "alpha.csv", "alpha.labels.zarr/.zattrs"} <= set(ref)
    assert got.keys() == ref.keys()
    assert [k for k in ref if got[k] != ref[k]] == []  # byte-identical, the label image included
    assert _temps(tmp_path / "kill") == []


def test_predict_input_list_batch_survives_random_kills(slides, tmp_path):
    for run in ("ref", "kill"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "slides.txt").write_text("".join(f"{s}\n" for s in slides))
    argv = ["predict", "--input-list", "slides.txt", "--out-dir", "out", "--work-dir", "work", *PREDICT]
    duration = _run(argv, tmp_path / "ref")
    hits = _kill_and_finish(argv, tmp_path / "kill", duration, _startup("nucseg.wsi.predict, nucseg.model.classical"), 6, 2)
    print(f"{hits} SIGKILLs landed before the run finished")  # shown by pytest -rP
    assert hits >= 3, f"only {hits} kills landed before the run finished"
    ref_dir, got_dir = tmp_path / "ref" / "out", tmp_path / "kill" / "out"
    assert sorted(_files(got_dir)) == sorted(_files(ref_dir))
    for s in slides:
        assert (got_dir / f"{s.stem}.geojson").read_bytes() == (ref_dir / f"{s.stem}.geojson").read_bytes()
        # Per-slide summaries differ only in what the run that finished the slide measured: its time and how
        # many tiles it read and predicted itself (fewer when it resumed from the cache), and the time of each
        # stage (SlideSummary.stages, issue 9).
        volatile = ("seconds", "read_tiles", "predicted_tiles", "stages")
        ref_sum = json.loads((ref_dir / f"{s.stem}.summary.json").read_text())
        got_sum = json.loads((got_dir / f"{s.stem}.summary.json").read_text())
        assert _without(got_sum, *volatile) == _without(ref_sum, *volatile) and got_sum["error"] is None
    ref_run = json.loads((ref_dir / "run-summary.json").read_text())
    got_run = json.loads((got_dir / "run-summary.json").read_text())
    assert (got_run["slides"], got_run["failed"], got_run["nuclei"]) == (2, 0, ref_run["nuclei"])
    assert got_run["done"] + got_run["skipped"] == 2
    events = [json.loads(line) for line in (got_dir / "nucseg-run.jsonl").read_text().splitlines()]
    done = {Path(e["slide"]).stem: e["nuclei"] for e in events if e["event"] == "done"}
    assert done == {s.stem: json.loads((ref_dir / f"{s.stem}.summary.json").read_text())["nuclei"] for s in slides}
    assert _temps(tmp_path / "kill") == []


def test_cv_survives_random_kills(tmp_path):
    for run in ("ref", "kill"):
        (tmp_path / run).mkdir()
    subprocess.run([NUCSEG, "demo-data", str(tmp_path / "data"), "--size", "128", "--tiles-per-organ", "3"],
                   check=True, env=ENV, capture_output=True)
    argv = ["cv", "--data", str(tmp_path / "data"), "--out", "cv", "--model", "vit_tiny", "--device", "cpu",
            "--epochs", "2", "--folds", "2", "--points-per-side", "8", "--batch-size", "4"]
    # One thread: with two, MKL/oneDNN training on CPU is not bitwise reproducible from one process to the
    # next on a loaded machine (two *uninterrupted* runs then differ by ~1e-11 in the LoRA weights), which
    # would hide what this test checks: that resuming changes nothing.
    env = {**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    duration = _run(argv, tmp_path / "ref", env)
    hits = _kill_and_finish(argv, tmp_path / "kill", duration, _startup("nucseg.learn.cv, nucseg.learn.data", env), 5, 3, env)
    print(f"{hits} SIGKILLs landed before the run finished")  # shown by pytest -rP
    assert hits >= 3, f"only {hits} kills landed before the run finished"
    ref, got = _files(tmp_path / "ref" / "cv"), _files(tmp_path / "kill" / "cv")
    assert got.keys() == ref.keys()
    assert {"summary.json", "summary.md", "fold_2/metrics.json", "fold_2/train/adapter/adapter.safetensors",
            "fold_2/train/curves.png"} <= set(ref)
    # history.json and checkpoint.safetensors record each epoch's wall time; everything else is byte-identical
    # (adapter weights, metrics, summaries, overlay and curve pictures).
    timed = {k for k in ref if k.endswith(("history.json", "checkpoint.safetensors"))}
    assert [k for k in ref if k not in timed and got[k] != ref[k]] == []
    for k in timed:
        ref_h, got_h = _history(tmp_path / "ref" / "cv" / k), _history(tmp_path / "kill" / "cv" / k)
        assert [_without(h, "seconds") for h in got_h] == [_without(h, "seconds") for h in ref_h]
        assert len(ref_h) == 2
    for k in (k for k in timed if k.endswith("checkpoint.safetensors")):
        _same_checkpoint(tmp_path / "ref" / "cv" / k, tmp_path / "kill" / "cv" / k)
    assert _temps(tmp_path / "kill") == []


def _history(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text())["epochs"]
    from nucseg.learn.train import load_training_state

    return load_training_state(path)["history"]


def _same_checkpoint(a: Path, b: Path) -> None:
    """Same weights, optimiser state and schedule (the exact training state a resumed run continues from)."""
    import torch

    from nucseg.learn.train import load_training_state

    sa, sb = (load_training_state(p) for p in (a, b))
    assert sa["epoch"] == sb["epoch"] and sa["fingerprint"] == sb["fingerprint"]
    assert sa["trainable"].keys() == sb["trainable"].keys()
    assert all(torch.equal(sa["trainable"][n], sb["trainable"][n]) for n in sa["trainable"])
    assert sa["scheduler"] == sb["scheduler"]
    for key, st in sa["optimizer"]["state"].items():
        other = sb["optimizer"]["state"][key]
        assert all(torch.equal(st[k], other[k]) for k in st)


def test_sigterm_stops_cleanly_and_the_rerun_finishes(slides, tmp_path):
    """SLURM's SIGTERM (time limit, preemption) is Ctrl-C: temporaries removed, log closed, exit 130."""
    (tmp_path / "slides.txt").write_text("".join(f"{s}\n" for s in slides))
    argv = ["predict", "--input-list", "slides.txt", "--out-dir", "out", "--work-dir", "work", *PREDICT]
    proc = subprocess.Popen([NUCSEG, "-q", *argv], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "out" / "nucseg-run.jsonl"
    deadline = time.monotonic() + 60
    while not (log.exists() and '"start"' in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the first slide
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "nucseg: interrupted; rerun the same command to resume"
    summary = json.loads((tmp_path / "out" / "run-summary.json").read_text())
    assert summary["interrupted"] is True and summary["done"] < 2
    assert _temps(tmp_path) == []
    _run(argv, tmp_path)
    summary = json.loads((tmp_path / "out" / "run-summary.json").read_text())
    assert summary["interrupted"] is False and summary["done"] + summary["skipped"] == 2 and summary["failed"] == 0
    events = [e["event"] for e in map(json.loads, log.read_text().splitlines())]
    assert events.count("run-start") == events.count("run-end") == 2


@pytest.mark.parametrize("killed_at", range(1, 8))
def test_cache_killed_while_being_created_is_rebuilt(tmp_path, monkeypatch, killed_at):
    """A kill between the zarr calls that create a slide's cache (rare for a random kill, so forced here):
    the next run must rebuild the half-made group, not trust it or crash on a missing array."""
    import zarr

    from nucseg.wsi.cache import TileCache

    coords = np.array([[0, 0], [200, 0], [0, 200]])
    real = zarr.Group.create_array
    calls = {"n": 0}

    def create_array(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == killed_at:
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", create_array)
    with pytest.raises(KeyboardInterrupt):
        TileCache(tmp_path / "s.zarr", {"k": 1}, coords, 256, "model-a", 16)
    monkeypatch.setattr(zarr.Group, "create_array", real)
    cache = TileCache(tmp_path / "s.zarr", {"k": 1}, coords, 256, "model-a", 16)
    assert not cache.pred_done.any() and not cache.tiles_done.any()
    cache.put_predictions(np.array([1]), np.ones((1, 256, 256), np.int32), [np.array([0.9], np.float32)])
    again = TileCache(tmp_path / "s.zarr", {"k": 1}, coords, 256, "model-a", 16)
    assert again.pred_done.tolist() == [False, True, False]  # a complete cache is reused as before
