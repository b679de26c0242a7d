"""Whole-slide scaling benchmark: does time grow linearly and memory stay flat with slide area?

Generates two synthetic slides, of area A and 4A (side S and 2S), and runs ``predict_slide`` with the
classical ThresholdSegmenter on each in a *fresh subprocess* (so peak RSS belongs to that run alone and is
not inflated by slide generation). Prints and writes JSON with wall time, tiles, nuclei and peak RSS per
slide, plus machine and date.

    .venv/bin/python bench/bench_slide_scaling.py --side 3072 --out bench/results/slide_scaling_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _child(slide: str, work: str, result: str, batch: int) -> None:
    """Run one prediction and report its own wall time and peak RSS."""
    import psutil

    from nucseg.model.classical import ThresholdSegmenter
    from nucseg.wsi.predict import PredictConfig, predict_slide

    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    out = Path(work) / "out.geojson"
    cfg = PredictConfig(batch_size=batch, work_dir=Path(work) / "cache", labels=Path(work) / "labels.zarr")
    t0 = time.perf_counter()
    summary = predict_slide(slide, out, ThresholdSegmenter(), cfg)
    wall = time.perf_counter() - t0
    peak_kb = _peak_rss_kib()
    Path(result).write_text(json.dumps({
        "wall_s": round(wall, 2),
        "tiles": summary.tiles,
        "tissue_tiles": summary.tissue_tiles,
        "nuclei": summary.nuclei,
        "tissue_area_mm2": round(summary.tissue_area_mm2, 4),
        "rss_after_imports_mib": round(rss_before / 2**20, 1),
        "peak_rss_mib": round(peak_kb / 1024, 1),
        "geojson_mib": round(out.stat().st_size / 2**20, 2),
    }))


def _peak_rss_kib() -> int:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so
    a child would report its parent's footprint (here: the slide generator's arrays) as its own peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _machine() -> dict:
    import psutil

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": model or platform.processor(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=3072, help="side of the area-A slide in pixels (4A has 2x side)")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tissue-fraction", type=float, default=0.7)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "slide_scaling_cpu.json")
    ap.add_argument("--child", nargs=3, metavar=("SLIDE", "WORK", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child, batch=args.batch_size)
        return

    from nucseg.wsi.synthslide import make_synthetic_slide

    runs = []
    with tempfile.TemporaryDirectory(prefix="nucseg-bench-") as tmp:
        for label, side in (("A", args.side), ("4A", 2 * args.side)):
            slide = Path(tmp) / f"slide_{label}.tif"
            t0 = time.perf_counter()
            gt = make_synthetic_slide(slide, side, side, mpp=args.mpp, tissue_fraction=args.tissue_fraction, seed=1)
            n_true = int(gt.max())
            del gt
            gen_s = time.perf_counter() - t0
            work = Path(tmp) / f"work_{label}"
            work.mkdir()
            result = Path(tmp) / f"result_{label}.json"
            subprocess.run([sys.executable, __file__, "--batch-size", str(args.batch_size),
                            "--child", str(slide), str(work), str(result)], check=True)
            run = {"slide": label, "width": side, "height": side, "megapixels": round(side * side / 1e6, 2),
                   "true_nuclei": n_true, "generate_s": round(gen_s, 1), **json.loads(result.read_text())}
            run["tiles_per_s"] = round(run["tissue_tiles"] / run["wall_s"], 2)
            runs.append(run)
            print(json.dumps(run), flush=True)
    a, b = runs
    report = {
        "benchmark": "slide_scaling",
        "segmenter": "ThresholdSegmenter (classical, CPU)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "settings": {"tile_size": 512, "overlap": 64, "batch_size": args.batch_size, "mpp": args.mpp,
                     "tissue_fraction": args.tissue_fraction, "outputs": ["geojson", "ome-zarr labels"]},
        "runs": runs,
        "ratios_4A_over_A": {
            "area": 4.0,
            "tissue_tiles": round(b["tissue_tiles"] / a["tissue_tiles"], 2),
            "wall": round(b["wall_s"] / a["wall_s"], 2),
            "peak_rss": round(b["peak_rss_mib"] / a["peak_rss_mib"], 2),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios_4A_over_A"]))


if __name__ == "__main__":
    main()
