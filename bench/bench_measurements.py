"""Cost per nucleus of ``--measurements shape`` and ``full`` against ``none``, same run, alternating.

``predict_slide`` with the classical ThresholdSegmenter (real nuclei, no model cost worth mentioning) on the
real ``CMU-1-Small-Region.svs`` at its native µm/px, one export process (the export thread does all the export
work, so the process CPU time holds everything). Each mode runs ``--repeat`` times in turn (none, shape, full,
none, ...), each with a fresh work dir; the fastest run per mode is reported, all runs are kept. Reported per
nucleus: the ``measure`` stage's CPU time (the measurements alone) and the whole run's extra process CPU and
wall time over ``none``.

    .venv/bin/python bench/bench_measurements.py    # about 2 minutes on 2 cores -> bench/results/measurements_cpu.json

``--legacy COMMIT`` also times ``measure_tile`` of that commit (its nucseg/measure.py, read from git) against
today's on the same label maps (the slide's tiles through the same segmenter), alternating, same process:
the before/after of a change to the measurements.
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
    ap.add_argument("--legacy", default=None, help="a commit whose measure_tile to time against today's")
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
              "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_measurements.py"
                         + (f" --legacy {args.legacy}" if args.legacy else ""),
              "load_1min_end": round(os.getloadavg()[0], 2),
              "summary": summary, "runs": runs}
    if args.legacy:
        result["kernel_vs_legacy"] = kernel_vs_legacy(args.legacy, seg, args.repeat)
        print(json.dumps(result["kernel_vs_legacy"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


def kernel_vs_legacy(commit: str, seg, repeat: int) -> dict:
    """CPU µs per nucleus of measure_tile, ``commit``'s vs today's, on the slide's tiles at native µm/px, and
    how far apart their values are (the names both write).

    As in ``predict_slide``, both get the tile's outlines (traced once for the polygons too) and today's the
    exported polygons' perimeters, made outside the timed calls.
    """
    import importlib.util
    import subprocess
    import sys

    import numpy as np
    import shapely

    from nucseg.wsi import measure
    from nucseg.wsi.export import outline_rings, tile_polygons
    from nucseg.wsi.slide import open_slide

    src = None
    for where in ("nucseg/wsi/measure.py", "nucseg/measure.py"):  # the package layout before and after issue 17
        r = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{commit}:{where}"], capture_output=True, text=True)
        if r.returncode == 0:
            src = r.stdout.replace("from .export import", "from nucseg.wsi.export import")
            break
    if src is None:
        raise SystemExit(f"no measure.py at commit {commit}")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "legacy_measure.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("legacy_measure", path)
        legacy = importlib.util.module_from_spec(spec)
        sys.modules["legacy_measure"] = legacy
        spec.loader.exec_module(legacy)
    slide = open_slide(SLIDE)
    T = 512
    tiles = [np.asarray(slide.read_region((x, y), 0, (T, T)).convert("RGB"))
             for y in range(0, slide.dimensions[1] - T + 1, T) for x in range(0, slide.dimensions[0] - T + 1, T)]
    maps = []
    for lab, rgb in zip(seg(np.stack(tiles)).labels, tiles):
        ids = np.unique(lab)[1:]
        if not len(ids):
            continue
        keep = np.zeros(int(lab.max()) + 1, bool)
        keep[ids] = True
        rings = outline_rings(lab, keep)
        perim = shapely.length(tile_polygons(lab, keep, rings=rings)[1]) * 0.5
        maps.append((lab, rgb, ids, rings, perim))
    nuclei = sum(len(m[2]) for m in maps)
    out = {"tiles": len(maps), "nuclei": nuclei}
    calls = {"legacy": lambda m, mode: legacy.measure_tile(m[0], m[2], 0.5, mode, m[1], m[3]),
             "new": lambda m, mode: measure.measure_tile(m[0], m[2], 0.5, mode, m[1], m[3], m[4])}
    for mode in ("shape", "full"):
        best = {"legacy": np.inf, "new": np.inf}
        for _ in range(repeat):
            for name, call in calls.items():
                c0 = time.process_time()
                for m in maps:
                    call(m, mode)
                best[name] = min(best[name], time.process_time() - c0)
        out[mode] = {k: round(1e6 * v / nuclei, 1) for k, v in best.items()}
        out[mode]["speedup"] = round(best["legacy"] / best["new"], 2)
    diff = {}
    for m in maps:
        a, b = calls["legacy"](m, "full"), calls["new"](m, "full")
        for k in set(a) & set(b):
            d = diff.setdefault(k, {"max_abs_diff": 0.0, "differ_at_6_decimals": 0})
            d["max_abs_diff"] = max(d["max_abs_diff"], float(np.abs(a[k] - b[k]).max()))
            d["differ_at_6_decimals"] += sum(round(x, 6) != round(y, 6) for x, y in zip(a[k].tolist(), b[k].tolist()))
    out["values"] = {k: diff[k] for k in sorted(diff)}
    return out


if __name__ == "__main__":
    main()
