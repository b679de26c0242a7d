"""Cost per nucleus of ``--measurements shape`` and ``full`` against ``none``, same run, alternating.

``predict_slide`` with the classical ThresholdSegmenter (real nuclei, no model cost worth mentioning) on the
real ``CMU-1-Small-Region.svs`` at its native µm/px, one export process (the export thread does all the export
work, so the process CPU time holds everything). Each mode runs ``--repeat`` times in turn (none, shape, full,
none, ...), each with a fresh work dir; the fastest run per mode is reported, all runs are kept. Reported per
nucleus: the ``measure`` stage's CPU time (the measurements alone) and the whole run's extra process CPU and
wall time over ``none``.

    .venv/bin/python bench/bench_measurements.py    # about 2 minutes on 2 cores -> bench/results/measurements_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("NUCSEG_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
SLIDE = SHARED / "wsi" / "CMU-1-Small-Region.svs"
MODES = ("none", "shape", "full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode (the fastest is reported)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "measurements_cpu.json")
    args = ap.parse_args()

    from nucseg.model.classical import ThresholdSegmenter
    from nucseg.wsi.predict import PredictConfig, predict_slide

    seg = ThresholdSegmenter()
    runs: dict[str, list] = {m: [] for m in MODES}
    for _ in range(args.repeat):
        for mode in MODES:
            with tempfile.TemporaryDirectory(prefix="nucseg-meas-") as d:
                cfg = PredictConfig(work_dir=Path(d) / "work", export_workers=1, measurements=mode)
                c0, w0 = time.process_time(), time.perf_counter()
                s = predict_slide(SLIDE, Path(d) / "out.geojson", seg, cfg)
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                runs[mode].append({"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "nuclei": s.nuclei,
                                   "tiles": s.tissue_tiles,
                                   "measure_cpu_s": round(s.stages.get("measure", {}).get("cpu", 0.0), 4),
                                   "output_bytes": (Path(d) / "out.geojson").stat().st_size})
    best = {m: min(r, key=lambda x: x["cpu_s"]) for m, r in runs.items()}
    n = best["none"]["nuclei"]
    summary = {}
    for m in MODES:
        b = best[m]
        summary[m] = {
            "nuclei": b["nuclei"], "tiles": b["tiles"], "cpu_s": b["cpu_s"], "wall_s": b["wall_s"],
            "measure_cpu_us_per_nucleus": round(1e6 * min(r["measure_cpu_s"] for r in runs[m]) / n, 1),
            "extra_cpu_us_per_nucleus_vs_none": round(1e6 * (b["cpu_s"] - best["none"]["cpu_s"]) / n, 1),
            "extra_wall_us_per_nucleus_vs_none": round(1e6 * (min(r["wall_s"] for r in runs[m])
                                                             - min(r["wall_s"] for r in runs["none"])) / n, 1),
            "output_bytes": b["output_bytes"],
        }
    result = {"slide": SLIDE.name, "segmenter": "ThresholdSegmenter", "export_workers": 1,
              "machine": f"{platform.node()} {os.cpu_count()} CPUs (shared with other jobs)",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_measurements.py",
              "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
