"""Cold-process start-up of the CLI: ``nucseg --help``, ``--version`` and ``predict --help``, each a fresh
interpreter (what a user or a shell completion pays), against the bare interpreter and against ``import torch``
(what building the parser cost when it imported the model code). Interleaved rounds, median and fastest.

    python bench/bench_cli_startup.py [--rounds 7] [--baseline-repo /path/to/older/checkout]

``--baseline-repo`` also times that checkout's CLI (its ``nucseg_cli`` found through its ``.pyshim`` or
``cli`` folder) in the same rounds, so before/after are a ratio from one run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env(repo: Path) -> dict:
    shim = repo / ".pyshim"
    path = [str(repo), str(shim if shim.is_dir() else repo)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _time(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--baseline-repo", type=Path, default=None)
    args = ap.parse_args()
    py = sys.executable
    cli = [py, "-m", "nucseg_cli.main"]
    cases = {
        "python -c pass": ([py, "-c", "pass"], _env(REPO)),
        "nucseg --help": ([*cli, "--help"], _env(REPO)),
        "nucseg --version": ([*cli, "--version"], _env(REPO)),
        "nucseg predict --help": ([*cli, "predict", "--help"], _env(REPO)),
        "python -m nucseg --help": ([py, "-m", "nucseg", "--help"], _env(REPO)),
        "python -c 'import torch'": ([py, "-c", "import torch"], _env(REPO)),
    }
    if args.baseline_repo:
        cases["baseline: nucseg --help"] = ([*cli, "--help"], _env(args.baseline_repo.resolve()))
    times: dict[str, list[float]] = {k: [] for k in cases}
    for name, (cmd, env) in cases.items():  # warm the file cache once
        _time(cmd, env)
    for _ in range(args.rounds):
        for name, (cmd, env) in cases.items():
            times[name].append(_time(cmd, env))
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
        "command": " ".join(sys.argv),
        "rounds": args.rounds,
        "seconds": {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3)} for k, v in times.items()},
    }
    help_s = statistics.median(times["nucseg --help"])
    result["help_over_import_torch"] = round(help_s / statistics.median(times["python -c 'import torch'"]), 3)
    if args.baseline_repo:
        result["baseline_over_help"] = round(statistics.median(times["baseline: nucseg --help"]) / help_s, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
