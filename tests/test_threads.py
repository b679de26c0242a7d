"""Thread pools sized from the CPUs a process is given (nucseg.threads) and the CLI's --threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nucseg import threads
from nucseg.errors import InputError

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)


def test_allowed_cpus_follow_affinity_slurm_and_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(threads, "_USER_OMP", "")
    monkeypatch.setattr(threads, "_CGROUP_CPU_MAX", tmp_path / "missing")
    assert threads.allowed_cpus() == (6, "affinity")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert threads.allowed_cpus() == (4, "SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")  # more than the affinity mask allows: the mask wins
    assert threads.allowed_cpus() == (6, "affinity")
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # docker --cpus 1.5
    monkeypatch.setattr(threads, "_CGROUP_CPU_MAX", quota)
    assert threads.allowed_cpus() == (2, "cgroup quota")
    quota.write_text("max 100000\n")
    assert threads.allowed_cpus() == (6, "affinity")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "garbage")
    assert threads.allowed_cpus() == (6, "affinity")
    monkeypatch.setattr(threads, "_USER_OMP", "3")  # the user's own OMP_NUM_THREADS at start-up
    assert threads.allowed_cpus() == (3, "OMP_NUM_THREADS")


def test_configure_sets_torch_blas_dask_and_env(monkeypatch):
    import dask
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        s = threads.configure_threads(1)
        assert (s.threads, s.source) == (1, "--threads")
        assert torch.get_num_threads() == 1
        assert dask.config.get("num_workers") == 1
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OPENBLAS_NUM_THREADS"] == "1"
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
        assert threads.current_threads() == 1
    finally:
        torch.set_num_threads(before)
        dask.config.set(num_workers=None)
    with pytest.raises(InputError):
        threads.configure_threads(0)


def _cli_threads(*args: str, env: dict | None = None) -> str:
    """Run the CLI in a fresh process (inter-op pools can be sized only once) and report torch's pools."""
    code = ("import sys, torch; from nucseg_cli.main import main; "
            "rc = main(list(sys.argv[1:])); print('T', torch.get_num_threads(), torch.get_num_interop_threads())")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                         env={**base, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_cli_threads_before_or_after_the_command(tmp_path):
    data = tmp_path / "d"
    assert _cli_threads("--threads", "1", "demo-data", str(data), "--tiles-per-organ", "1", "--size", "64") == "T 1 1"
    assert _cli_threads("demo-data", str(data), "--tiles-per-organ", "1", "--size", "64", "--threads", "1") == "T 1 1"
    # without --threads: the CPUs the process may use, here SLURM's allocation of one CPU
    env = {"SLURM_CPUS_PER_TASK": "1"}
    assert _cli_threads("demo-data", str(data), "--tiles-per-organ", "1", "--size", "64", env=env) == "T 1 1"


def test_cli_rejects_zero_threads(tmp_path, capsys):
    from nucseg_cli.main import main

    assert main(["--threads", "0", "demo-data", str(tmp_path / "x")]) == InputError.exit_code
    assert "argument --threads: must be a whole number in 1..4096" in capsys.readouterr().err
