"""Host path of whole-slide prediction with the model taken out: today's code vs the legacy one, same run.

An instant segmenter (a fixed dense label map: 217 round nuclei on every 512 px tile, returned without any
work; the ownership rule keeps about 166 of them per tile, the rest belong to neighbouring tiles) runs through ``predict_slide`` on the real ``CMU-1-Small-Region.svs``, read at 0.25 µm/px (the
slide is 0.499 µm/px: every tile goes through the resampling path) and at its native µm/px. What remains is
the host path: opening and tissue detection ("plan"), reading, the zarr cache, stitching, polygons, writing.

Two implementations, each in its own fresh process, alternating, in the same run:

* ``legacy``: the package as it was at commit ``LEGACY_COMMIT`` (before issue 9), extracted with
  ``git archive`` into a temporary folder and imported from there (so a clean clone with its history
  reproduces the comparison); its stages are timed by wrapping its functions;
* ``new``: this checkout, with 1 export process (the export thread does everything) and 2 worker processes;
  its stages come from ``SlideSummary.stages``. It runs once per ``--measurements`` mode: ``none`` (like
  with like: the legacy code wrote only area, perimeter and score) and ``full`` (the default of
  ``nucseg predict``), so the cost of the default measurements is read off the same run.

The configurations are interleaved: in each of ``--repeat`` rounds every configuration runs once (legacy in the
first ``--legacy-repeat`` rounds only), each in a fresh process that makes a cold run (the process's first:
first-call costs included, as a one-slide ``nucseg predict`` pays them) and then a warm run; both are reported
(``cpu_us_per_nucleus_cold`` and ``cpu_us_per_nucleus``, warm; the speed-ups compare warm runs). So a slow spell of a shared or throttled machine falls on all configurations
alike, rather than on whichever ran then (the blocks-in-sequence version of this script gave 7.6x and 9.3x for
the same code an hour apart). The fastest and the median run are reported, all runs are kept.

Both run as ``nucseg predict`` does without ``--work-dir``: the cache is a fresh temporary folder (under the
run's own temporary folder, so on the same disk), every tile is read, its predictions cached, stitched; the
legacy code also caches every RGB tile there, today's keeps RGB tiles only where they can be used again (a
``--work-dir``, or the stain measurements; ``cache_tiles=None``). ``--work-dir`` runs both with a persistent
work dir instead (today's code then caches the RGB tiles too). CPU is the process's CPU time plus the export
worker processes'. The outputs are compared: same nuclei (ids, areas), polygons overlapping (IoU), and the
new outputs with 1 and 2 workers byte-identical.

    .venv/bin/python bench/bench_host.py          # a few minutes on 2 cores -> bench/results/host_cpu.json
    .venv/bin/python bench/bench_host.py --mpps 0.125 --workers 1 --legacy-repeat 0 --out bench/results/host_cpu_0125.json
                                                   # issue 23's figure: the default measurements' cost at 0.125 µm/px
    .venv/bin/python bench/bench_host.py --work-dir --out bench/results/host_cpu_workdir.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("NUCSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDE = SHARED / "wsi" / "CMU-1-Small-Region.svs"
LEGACY_COMMIT = "a55d5467c65ccde7c6a3379c3425bf15e9419705"  # main before issue 9 (host path as reported there)
STAGES = ("plan", "read", "cache", "infer", "stitch", "polygons", "measure", "write")


# ------------------------------------------------------------------------------------------- the segmenter
def instant_label_map(tile_size: int = 512, spacing: float = 34.0, seed: int = 0) -> np.ndarray:
    """Round nuclei (radius 8-13 px) on a jittered grid, about 218 per 512 px tile (a few grid points dropped)."""
    rng = np.random.default_rng(seed)
    c = np.arange(spacing / 2, tile_size, spacing)
    cy, cx = (v.ravel() for v in np.meshgrid(c, c, indexing="ij"))
    keep = rng.random(cx.size) > 0.03
    cy = cy[keep] + rng.uniform(-4, 4, keep.sum())
    cx = cx[keep] + rng.uniform(-4, 4, keep.sum())
    r = rng.uniform(8, 13, cx.size)
    labels = np.zeros((tile_size, tile_size), np.int32)
    for k in range(cx.size - 1, -1, -1):  # a pixel in several disks gets the first one's label
        y0, y1 = max(int(cy[k] - r[k]) - 1, 0), min(int(cy[k] + r[k]) + 2, tile_size)
        x0, x1 = max(int(cx[k] - r[k]) - 1, 0), min(int(cx[k] + r[k]) + 2, tile_size)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        labels[y0:y1, x0:x1][(yy - cy[k]) ** 2 + (xx - cx[k]) ** 2 <= r[k] ** 2] = k + 1
    return labels


class InstantSegmenter:
    """The TileSegmenter contract (nucseg/segmenter.py) with no model: the same label map for every tile."""

    mpp = None
    device = None  # declared here, not inherited: the legacy package has no SegmenterDefaults
    provenance = None

    def __init__(self, tile_size: int = 512):
        from nucseg.segmenter import TileBatchResult

        self._result = TileBatchResult
        self.tile_size = tile_size
        self.labels = instant_label_map(tile_size)
        self.n = int(self.labels.max())
        self.scores = np.linspace(0.5, 0.99, self.n).astype(np.float32)
        self.fingerprint = f"instant:{tile_size}:{self.n}"

    def __call__(self, tiles: np.ndarray):
        labels = np.broadcast_to(self.labels, (len(tiles), *self.labels.shape)).copy()
        return self._result(labels, [self.scores] * len(tiles))


# ------------------------------------------------------------------------------------------------ a child
class Times:
    """Thread-CPU and wall seconds per stage (the legacy code has no timers of its own)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.d: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            with self.lock:
                s = self.d.setdefault(stage, {"cpu": 0.0, "wall": 0.0})
                s["cpu"] += time.thread_time() - c0
                s["wall"] += time.perf_counter() - w0

    def wrap(self, owner, name: str, stage: str) -> None:
        fn = getattr(owner, name)

        def timed(*a, **k):
            with self(stage):
                return fn(*a, **k)

        setattr(owner, name, timed)


def instrument_legacy(times: Times) -> None:
    """Stage timers around the legacy functions (the same boundaries as the new code's own timers); the legacy
    package has the flat layout (nucseg.predict, not nucseg.wsi.predict)."""
    import nucseg.export as E
    import nucseg.predict as P
    import nucseg.slide as S
    import nucseg.stitch as ST
    import nucseg.tiling as TI

    times.wrap(P, "open_slide", "plan")
    times.wrap(P, "_plan", "plan")
    times.wrap(S.TargetView, "read", "read")
    for name in ("put_tiles", "put_predictions", "get_tile", "get_prediction"):
        times.wrap(TI.TileCache, name, "cache")
    times.wrap(ST.Stitcher, "add", "stitch")
    times.wrap(P, "instance_polygons", "polygons")
    times.wrap(E.GeoJSONWriter, "write", "write")


def child(args: argparse.Namespace) -> int:
    import importlib

    import nucseg

    P = importlib.import_module("nucseg.predict" if args.impl == "legacy" else "nucseg.wsi.predict")

    where = Path(nucseg.__file__).resolve()
    if args.impl == "legacy" and not str(where).startswith(str(Path(args.legacy_root).resolve())):
        raise SystemExit(f"legacy run imported {where}, not the archived package")
    times = Times()
    seg = InstantSegmenter()
    if args.impl == "legacy":
        instrument_legacy(times)
        inner = seg.__call__

        class Timed:
            tile_size, mpp, fingerprint = seg.tile_size, seg.mpp, seg.fingerprint

            def __call__(self, tiles):
                with times("infer"):
                    return inner(tiles)

        seg = Timed()
    runs, cold = [], []  # cold: the process's first run(s), ``--warmup`` of them
    for r in range(args.warmup + args.repeat):
        with tempfile.TemporaryDirectory(prefix="nucseg-host-", dir=args.tmp) as d:
            times.d.clear()
            # the legacy code wrote only area, perimeter and score: it is compared with measurements "none"
            extra = {} if args.impl == "legacy" else {"export_workers": int(args.workers),
                                                      "measurements": args.measurements}
            if args.work_dir:  # a persistent cache (``--work-dir``)
                extra["work_dir"] = Path(d) / "work"
            cfg = P.PredictConfig(target_mpp=args.mpp, **extra)  # else no work_dir: a temporary cache, as the CLI
            out = Path(d) / "out.geojson"
            c0, w0 = time.process_time(), time.perf_counter()
            summary = P.predict_slide(SLIDE, out, seg, cfg)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            stages = dict(times.d) if args.impl == "legacy" else dict(summary.stages)
            worker = stages.pop("worker_cpu", {"cpu": 0.0})["cpu"]
            plan_wall = stages.get("plan", {}).get("wall", 0.0)
            (cold if r < args.warmup else runs).append({
                "wall_s": round(wall, 3), "cpu_s": round(cpu + worker, 3), "worker_cpu_s": round(worker, 3),
                "plan_wall_s": round(plan_wall, 3), "tiles": summary.tissue_tiles, "nuclei": summary.nuclei,
                "target_mpp": summary.target_mpp, "output_bytes": out.stat().st_size,
                "stages": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in stages.items()},
            })
            last = r == args.warmup + args.repeat - 1
            if last and args.keep:
                shutil.copyfile(out, args.keep)
            if last and args.impl == "new":  # GeoParquet of the same run (from a --work-dir cache, else predicted again)
                pq = Path(d) / "out.parquet"
                P.predict_slide(SLIDE, pq, seg, cfg)
                runs[-1]["parquet_bytes"] = pq.stat().st_size
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the export processes are not included
    print(json.dumps({"impl": args.impl, "workers": int(args.workers), "measurements": args.measurements,
                      "nucseg_file": str(where), "runs": runs, "cold_runs": cold,
                      "peak_rss_mib_main_process": round(rss, 1)}))
    return 0


# ------------------------------------------------------------------------------------------------- parent
def legacy_package(dest: Path) -> Path:
    """The nucseg package of LEGACY_COMMIT, extracted from this clone's git history into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", LEGACY_COMMIT, "nucseg"], check=True,
                                 capture_output=True).stdout
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"cannot extract legacy commit {LEGACY_COMMIT} (a shallow clone?): "
                         f"{err.stderr.decode().strip()}") from None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_child(impl: str, mpp: float | None, workers: int, repeat: int, tmp: Path, legacy_root: Path,
              keep: Path | None, warmup: int = 1, work_dir: bool = False, measurements: str = "none") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--impl", impl, "--workers", str(workers),
           "--repeat", str(repeat), "--warmup", str(warmup), "--tmp", str(tmp), "--legacy-root", str(legacy_root),
           "--measurements", measurements]
    if work_dir:
        cmd.append("--work-dir")
    if mpp is not None:
        cmd += ["--mpp", str(mpp)]
    if keep is not None:
        cmd += ["--keep", str(keep)]
    # TMPDIR: the temporary caches go beside the run's other files
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    if impl == "legacy":
        env["PYTHONPATH"] = os.pathsep.join([str(legacy_root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp))
    if r.returncode:
        raise SystemExit(f"{impl} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarise(res: dict) -> dict:
    """The fastest run of a configuration, with the derived figures."""
    best = min(res["runs"], key=lambda r: r["wall_s"])
    walls = [r["wall_s"] for r in res["runs"]]
    st = best["stages"]
    cpu = lambda k: st.get(k, {}).get("cpu", 0.0)  # noqa: E731
    n = best["nuclei"]
    cold = min(res.get("cold_runs") or [None], key=lambda r: r["cpu_s"] if r else 0)
    return {
        "impl": res["impl"], "workers": res["workers"] if res["impl"] != "legacy" else None,
        "measurements": res.get("measurements", "none") if res["impl"] != "legacy" else "-",
        "tiles": best["tiles"], "nuclei": n, "nuclei_per_tile": round(n / best["tiles"], 1),
        "wall_s": best["wall_s"], "tiles_per_s": round(best["tiles"] / best["wall_s"], 1),
        # the spread over the runs, so a reader can tell a difference from the noise
        "wall_s_median": round(float(np.median(walls)), 3),
        "tiles_per_s_median": round(best["tiles"] / float(np.median(walls)), 1),
        "tiles_per_s_after_plan": round(best["tiles"] / max(best["wall_s"] - best["plan_wall_s"], 1e-9), 1),
        "cpu_us_per_nucleus": round(best["cpu_s"] / n * 1e6, 1),
        "cpu_us_per_nucleus_median": round(float(np.median([r["cpu_s"] for r in res["runs"]])) / n * 1e6, 1),
        # the process's first run (first-call costs included); the least of them over the rounds
        "cpu_us_per_nucleus_cold": round(cold["cpu_s"] / cold["nuclei"] * 1e6, 1) if cold else None,
        "polygons_write_cpu_us_per_nucleus": round((cpu("polygons") + cpu("write")) / n * 1e6, 1),
        "stage_cpu_s": {k: round(cpu(k), 3) for k in STAGES if k in st},
        "stage_wall_s": {k: round(st[k]["wall"], 3) for k in STAGES if k in st},
        "bytes_per_nucleus": round(best["output_bytes"] / n, 1),
        "parquet_bytes_per_nucleus": round(res["runs"][-1]["parquet_bytes"] / n, 1) if "parquet_bytes" in res["runs"][-1] else None,
        "peak_rss_mib_main_process": res["peak_rss_mib_main_process"],
        "all_runs_wall_s": [r["wall_s"] for r in res["runs"]],
    }


def compare(legacy: Path, new: Path) -> dict:
    """Same nuclei (ids, areas) and how closely the polygons agree (IoU), legacy vs new output."""
    import shapely

    a, b = json.loads(legacy.read_text()), json.loads(new.read_text())

    def table(fc):
        out = {}
        for f in fc["features"]:
            m = f["properties"]["measurements"]
            area = ({x["name"]: x["value"] for x in m} if isinstance(m, list) else m)["Area µm^2"]
            out[f["properties"]["nucleusId"]] = (area, shapely.geometry.shape(f["geometry"]))
        return out

    ta, tb = table(a), table(b)
    ids = sorted(ta)
    same_ids = ids == sorted(tb)
    ga = np.array([ta[i][1] for i in ids], dtype=object)
    gb = np.array([tb[i][1] for i in ids if i in tb], dtype=object)
    iou = shapely.area(shapely.intersection(ga, gb)) / shapely.area(shapely.union(ga, gb)) if same_ids else np.nan
    return {
        "same_nuclei_ids": same_ids, "nuclei": len(ids),
        "same_areas": same_ids and all(abs(ta[i][0] - tb[i][0]) < 1e-6 for i in ids),
        "polygon_iou_min": round(float(np.min(iou)), 4), "polygon_iou_mean": round(float(np.mean(iou)), 4),
        "vertices_per_nucleus": {"legacy": round(float(shapely.get_num_coordinates(ga).mean()), 1),
                                 "new": round(float(shapely.get_num_coordinates(gb).mean()), 1)},
        "all_new_valid_ccw": bool(shapely.is_valid(gb).all() and shapely.is_ccw(shapely.get_exterior_ring(gb)).all()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mpps", default="0.25,native", help="target µm/px values ('native': the slide's own)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="rounds: timed runs per configuration (the fastest is reported, with the median)")
    ap.add_argument("--legacy-repeat", type=int, default=5, help="rounds that also run the legacy code")
    ap.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)  # untimed runs in a child
    ap.add_argument("--workers", default="1,2", help="export processes of the new code to compare")
    ap.add_argument("--measurements", default="none,full",
                    help="measurement modes of the new code to compare ('none' is the legacy code's like)")
    ap.add_argument("--work-dir", action="store_true",
                    help="run both codes with a persistent work dir (today's code then caches the RGB tiles too), "
                         "not as the CLI does by default (a temporary cache)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "host_cpu.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="new", help=argparse.SUPPRESS)
    ap.add_argument("--mpp", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--legacy-root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--keep", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not SLIDE.is_file():
        raise SystemExit(f"slide not found: {SLIDE} (set NUCSEG_SHARED_DATA)")
    sys.path.insert(0, str(HERE))
    from common import provenance, write_report

    workers = [int(w) for w in args.workers.split(",")]
    modes = args.measurements.split(",")
    legacy_on = args.legacy_repeat > 0 and "none" in modes
    results = []
    with tempfile.TemporaryDirectory(prefix="nucseg-bench-host-") as tmp:
        tmp = Path(tmp)
        root = legacy_package(tmp / "legacy")
        for m in args.mpps.split(","):
            mpp = None if m == "native" else float(m)
            keep = {"legacy": tmp / f"legacy-{m}.geojson",
                    **{(w, mode): tmp / f"new-{m}-{w}-{mode}.geojson" for w in workers for mode in modes}}
            configs = [("legacy", 1, "none")] if legacy_on else []
            configs += [("new", w, mode) for mode in modes for w in workers]
            got: dict = {}
            for r in range(args.repeat):  # rounds: every configuration once per round, in fresh processes
                for c in configs:
                    impl, w, mode = c
                    if impl == "legacy" and r >= args.legacy_repeat:
                        continue
                    res = run_child(impl, mpp, w, 1, tmp, root, keep["legacy" if impl == "legacy" else (w, mode)],
                                    work_dir=args.work_dir, measurements=mode)
                    print(f"round {r + 1}: {impl} {w} {mode}: {res['runs'][0]['wall_s']} s", file=sys.stderr, flush=True)
                    if c in got:
                        got[c]["runs"] += res["runs"]
                        got[c]["cold_runs"] += res["cold_runs"]
                        got[c]["peak_rss_mib_main_process"] = max(
                            got[c]["peak_rss_mib_main_process"], res["peak_rss_mib_main_process"])
                    else:
                        got[c] = res
            rows = [summarise(got[c]) for c in configs]
            none_rows = {r["workers"]: r for r in rows if r["impl"] == "new" and r["measurements"] == "none"}
            for row in rows:
                if legacy_on and row["impl"] == "new":
                    legacy = rows[0]
                    row["speedup_vs_legacy"] = round(legacy["wall_s"] / row["wall_s"], 2)
                    row["speedup_vs_legacy_median"] = round(legacy["wall_s_median"] / row["wall_s_median"], 2)
                    row["cpu_per_nucleus_ratio_vs_legacy"] = round(legacy["cpu_us_per_nucleus"] / row["cpu_us_per_nucleus"], 2)
                base = none_rows.get(row["workers"])
                if row["impl"] == "new" and base is not None and row is not base:  # the measurements' cost
                    row["cpu_ratio_vs_none"] = round(row["cpu_us_per_nucleus"] / base["cpu_us_per_nucleus"], 3)
            check = compare(keep["legacy"], keep[(workers[0], "none")]) if legacy_on else {}
            for mode in modes:
                check[f"new_outputs_identical_across_workers_{mode}"] = \
                    len({keep[(w, mode)].read_bytes() for w in workers}) == 1
            results.append({"target_mpp": rows[0]["tiles"] and (mpp or "native"), "rows": rows, "outputs": check})
    report = {"benchmark": "whole-slide host path, instant segmenter (no model)", **provenance(),
              "slide": str(SLIDE.name), "legacy_commit": LEGACY_COMMIT,
              "settings": {"tile_size": 512, "overlap": 64, "batch_size": 8, "repeat": args.repeat,
                           "work_dir": "persistent (--work-dir)" if args.work_dir else "temporary (the CLI default)",
                           "legacy_repeat": args.legacy_repeat,
                           "timing": "interleaved rounds, every configuration once per round in a fresh process "
                                     "after one untimed warm-up run; fastest and median of the runs; each run with a "
                                     "fresh cache (every tile read, its predictions cached, stitched); CPU = process + "
                                     "export worker processes"},
              "results": results}
    write_report(args.out, report)
    print(table(report))
    return 0


def table(report: dict) -> str:
    lines = ["| µm/px | code | export processes | measurements | tiles | kept nuclei/tile | wall s | tiles/s | "
             "tiles/s (median run) | tiles/s after plan | CPU µs/nucleus warm | cold | polygons+write CPU µs/nucleus | "
             "speed-up |", "|" + "---|" * 14]
    for res in report["results"]:
        for r in res["rows"]:
            lines.append(f"| {res['target_mpp']} | {r['impl']} | {r['workers'] or '-'} | {r.get('measurements', '-')} | "
                         f"{r['tiles']} | "
                         f"{r['nuclei_per_tile']} | {r['wall_s']} | {r['tiles_per_s']} | {r.get('tiles_per_s_median', '-')} | "
                         f"{r['tiles_per_s_after_plan']} | "
                         f"{r['cpu_us_per_nucleus']} | {r.get('cpu_us_per_nucleus_cold', '-')} | "
                         f"{r['polygons_write_cpu_us_per_nucleus']} | {r.get('speedup_vs_legacy', '-')}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
