"""Thread pools on a loaded machine: the demo's training steps and tile inference, with torch's defaults
("before": OpenMP's default spin-waiting, one thread per visible core) and with nucseg.threads ("after":
threads from the CPUs the process may use, OMP_WAIT_POLICY=PASSIVE), each alone and beside ``--load``
CPU-bound busy loops (``python -c 'while True: pass'``, started and stopped by this script).

Each configuration runs in a fresh process (OpenMP reads its wait policy once, when torch loads), in the
same invocation, so the ratios are fair on a shared machine; wall and process CPU time are reported.

    .venv/bin/python bench/bench_threads.py --load 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, provenance, write_report  # noqa: E402

CHILD = r"""
import json, os, sys, time
mode, steps = sys.argv[1], int(sys.argv[2])
policy = os.environ.get("OMP_WAIT_POLICY")  # as OpenMP sees it when torch loads (None: spin, then sleep)
if mode == "before":
    import torch  # loads OpenMP with the environment as it is: spin-waiting, one thread per visible core
    import nucseg
else:
    from nucseg.threads import configure_threads
    configure_threads()
    policy = os.environ.get("OMP_WAIT_POLICY")
    import torch
import dataclasses

import numpy as np
from nucseg.learn.data import load_dataset
from nucseg.learn.demo import QUICK, make_demo_dataset
from nucseg.model.infer import InferConfig, SamTileSegmenter, segment_tiles
from nucseg.model.lora import apply_method
from nucseg.model.sam import load_sam
from nucseg.learn.train import Trainer

r = QUICK
tiles = load_dataset(make_demo_dataset(sys.argv[3], tiles_per_organ=4, size=r.size, zoom=r.zoom), tile_size=r.size)
model, _ = load_sam("vit_tiny", None, img_size=r.size, seed=0)
apply_method(model, dataclasses.replace(r, pretrained=False).method())  # as recorded: every weight trained
trainer = Trainer(model, tiles, r.train_config(), sys.argv[3] + "/run")
rng = np.random.default_rng(0)
trainer.step(tiles[: r.batch_size], rng)  # warm-up
c0, t0 = time.process_time(), time.perf_counter()
for _ in range(steps):
    trainer.step(tiles[: r.batch_size], rng)
train = (time.perf_counter() - t0, time.process_time() - c0)
seg = SamTileSegmenter(model.eval(), InferConfig(points_per_side=r.points_per_side, pred_iou_thresh=0.0,
                                                 stability_thresh=0.0), device="cpu")
c0, t0 = time.process_time(), time.perf_counter()
segment_tiles(seg, [t.image for t in tiles], 8)
infer = (time.perf_counter() - t0, time.process_time() - c0)
print(json.dumps({"threads": torch.get_num_threads(), "wait_policy": policy or "default",
                  "train_wall_s": train[0], "train_cpu_s": train[1], "infer_wall_s": infer[0],
                  "infer_cpu_s": infer[1], "train_steps": steps, "infer_tiles": len(tiles)}))
"""


def run_child(mode: str, steps: int, work: Path, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")}
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(steps), str(work)], capture_output=True,
                             text=True, env=env, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": timeout}
    if out.returncode:
        raise SystemExit(out.stderr)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_wall_s": time.perf_counter() - t0}


def _terminate(signum, frame):
    raise KeyboardInterrupt  # so that the busy loops are stopped (finally below) when this script is


def main() -> int:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", type=int, default=2, help="busy loops running beside the loaded runs")
    ap.add_argument("--steps", type=int, default=10, help="training steps timed per run")
    ap.add_argument("--timeout", type=float, default=600, help="give up on one run after this many seconds")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nucseg-bench-threads"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "threads_cpu.json")
    args = ap.parse_args()
    report = {**provenance(), "load_processes": args.load, "runs": []}
    for loaded in (False, True):
        hogs = []
        if loaded:
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
        try:
            for mode in ("before", "after"):
                res = run_child(mode, args.steps, args.work, args.timeout)
                res.update(mode=mode, loaded=loaded, load_1min=round(os.getloadavg()[0], 2))
                print(json.dumps(res), flush=True)
                report["runs"].append(res)
        finally:
            for h in hogs:  # only the processes this script started, by their handle
                h.kill()
                h.wait()
    write_report(args.out, report)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
