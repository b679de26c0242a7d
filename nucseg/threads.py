"""Thread pools sized to the CPUs this process was given, not to the CPUs the machine has.

torch, BLAS, OpenCV and dask all default to one thread per core they can see. On a SLURM node (4 CPUs of a
64-core node), in a container with a CPU quota, or on a CI runner shared with other jobs, that is far more
threads than the process may run at once; OpenMP workers then spin-wait at every barrier for threads that
are not scheduled, and a job can run many times slower while burning CPU time. :func:`configure_threads`
sizes every pool from :func:`allowed_cpus` (or an explicit count, ``nucseg --threads N``).

Spinning is the larger half of the problem: with its default (active) wait policy, torch's OpenMP runtime
spins at each of the thousands of barriers per training step, and when another process holds a core the
spinning threads wait for a thread that is not running. On 2 cores shared with other CPU-bound work, 8
training steps of the demo model took 177 s wall / 35 s CPU with the default policy and 8.6 s / 2.5 s with
``OMP_WAIT_POLICY=PASSIVE`` (docs/PERFORMANCE.md). The runtime reads the policy once, when torch is
imported, so importing :mod:`nucseg` sets it (unless the environment already does) and so does
:func:`configure_threads` when it runs first.

Sources, smallest wins: the CPU affinity mask (``os.sched_getaffinity``, what ``taskset``, cgroup cpusets and
SLURM's task binding set), ``SLURM_CPUS_PER_TASK``, the cgroup v2 CPU quota (``cpu.max``, what
``docker --cpus`` and Kubernetes CPU limits set), and ``OMP_NUM_THREADS`` if the environment sets it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

# Environment variables read by OpenMP / BLAS runtimes when they load; set for libraries loaded later and for
# child processes (dask workers, subprocesses), which inherit them.
_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")

_current: "ThreadSettings | None" = None
# OMP_NUM_THREADS as the user's environment had it when nucseg was imported (configure_threads overwrites it
# for child processes, so it is read once): an explicit choice that the default respects.
_USER_OMP = os.environ.get("OMP_NUM_THREADS", "").strip()


@dataclass(frozen=True)
class ThreadSettings:
    threads: int  # intra-op threads (torch, BLAS, OpenCV) and dask's local worker count
    interop: int  # torch inter-op threads
    source: str  # where the count came from: "--threads", "affinity", "SLURM_CPUS_PER_TASK", "cgroup quota"


def _slurm_cpus() -> int | None:
    value = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    try:
        return max(1, int(value)) if value else None
    except ValueError:
        return None


def _cgroup_quota() -> int | None:
    """CPUs allowed by a cgroup v2 quota (``"<quota> <period>"``; ``"max ..."`` means none), rounded up."""
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def allowed_cpus() -> tuple[int, str]:
    """(CPUs this process may use, which limit decided it)."""
    try:
        found = [(len(os.sched_getaffinity(0)), "affinity")]
    except (AttributeError, OSError):  # not on Linux
        found = [(os.cpu_count() or 1, "cpu count")]
    slurm = _slurm_cpus()
    if slurm is not None:
        found.append((slurm, "SLURM_CPUS_PER_TASK"))
    if _USER_OMP.isdigit() and int(_USER_OMP) > 0:
        found.append((int(_USER_OMP), "OMP_NUM_THREADS"))
    quota = _cgroup_quota()
    if quota is not None:
        found.append((quota, "cgroup quota"))
    return min(found)


def configure_threads(threads: int | None = None) -> ThreadSettings:
    """Size torch's intra/inter-op pools, BLAS/OpenMP (threadpoolctl), OpenCV and dask's local scheduler.

    ``threads``: an explicit count (``--threads``); None: :func:`allowed_cpus`. Returns what was set. Safe to
    call more than once (torch's inter-op pool can only be sized before its first use; later calls keep it).
    """
    global _current
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    n, source = (threads, "--threads") if threads is not None else allowed_cpus()
    interop = max(1, min(n, 4))  # inter-op parallelism is rare in nucseg's graphs; a few threads suffice
    for var in _ENV_VARS:
        os.environ[var] = str(n)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # effective only if torch is not imported yet

    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(interop)
    except RuntimeError:  # already sized, or inter-op work has started in this process
        interop = torch.get_num_interop_threads()
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)  # BLAS and OpenMP runtimes already loaded (numpy's OpenBLAS, scipy's)
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass
    import dask

    dask.config.set(num_workers=n)
    _current = ThreadSettings(n, interop, source)
    return _current


def current_threads() -> int:
    """The count set by :func:`configure_threads`, or the allowed CPUs if it was never called."""
    return _current.threads if _current is not None else allowed_cpus()[0]
