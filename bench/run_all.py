"""`make bench`: the CPU benchmarks with modest defaults, then a summary table; the GPU one only with CUDA.

Each benchmark is its own script (run in a fresh process, results with machine, date and command in
bench/results/*.json); this only runs them in turn and prints the headline figures.

* bench_pareto.py: time per tile vs PQ, nucseg's prompt settings against SamAutomaticMaskGenerator's grid
  densities, on all held-out real tiles; Pareto fronts and the speed ratio at equal PQ with a bootstrap
  interval (the headline of docs/PERFORMANCE.md). Weights: the bench adapter (bench/make_bench_adapter.py) on
  the tiny base (bench/pretrain_tiny.py), both from pinned recipes (bench/common.py). ``--train`` builds
  whichever is missing first (20 min on the shared 2-core machine, one torch thread) and refuses weights in
  runs/ that a different recipe built; without them the sweep runs on a seeded random vit_tiny (timings only)
  and goes to amg_pareto_untrained.json, never over the recorded result;
* bench_amg.py: the single-point comparison at AMG's default 32 x 32 grid (same weights, 8 tiles), likewise
  amg_cpu_untrained.json without trained weights;
* bench_decoder.py: mask decoder cost per prompt, segment-anything's vs nucseg's fast path;
* bench_native_vs_1024.py: encoder at 512 px vs 1024 px, vit_tiny and vit_b (one tile each);
  (bench_amg_1024.py, vit_b end to end, AMG at 1024 px vs nucseg at 512 px, ~10 min: not run here);
* bench_slide_scaling.py: slides of area A and 4A, wall time and peak RSS;
* bench_host.py: the whole-slide host path (read, cache, stitch, polygons, write) with an instant segmenter
  on the real .svs, the legacy code (from git) vs today's, 1 and 2 export processes;
* bench_measurements.py (with host): cost per nucleus of --measurements shape / full vs none;
* bench_geoparquet.py (with host): GeoParquet bytes/nucleus and 1 mm² window reads of a million nuclei;
* bench_gpu.py: only when torch sees a CUDA device.

    .venv/bin/python bench/run_all.py [--only pareto,amg,decoder,native,slide,host,gpu] [--threads 1] [--train]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import ADAPTER_RECIPE, BASE_RECIPE, BENCH_ADAPTER, TINY_BASE, sha256  # noqa: E402

RESULTS = HERE / "results"


# The tiny model predicts IoU ~0.45 and stability ~0.65 for good nuclei masks, so SAM's vit_b-level filters
# (0.5 / 0.8) reject almost everything; both methods get the same, looser filters.
TINY_FILTERS = ["--pred-iou-thresh", "0.3", "--stability-thresh", "0.6"]


def amg_model_args(untrained: str) -> list[str]:
    if BENCH_ADAPTER.is_dir() and TINY_BASE.is_file():
        return ["--adapter", str(BENCH_ADAPTER), "--checkpoint", str(TINY_BASE), *TINY_FILTERS]
    if TINY_BASE.is_file():
        return ["--model", "vit_tiny", "--checkpoint", str(TINY_BASE), "--img-size", "256", *TINY_FILTERS]
    print("no trained tiny model (make bench BENCH_ARGS=--train, or bench/pretrain_tiny.py and "
          "bench/make_bench_adapter.py): AMG comparison on a random vit_tiny, timings only, written to "
          f"bench/results/{untrained}", file=sys.stderr)
    return ["--model", "vit_tiny", "--out", str(RESULTS / untrained)]


def built_by_other_recipe(record: Path, recipe) -> str | None:
    """Why weights present in runs/ are not what the pinned recipe builds (None if they are)."""
    if not record.is_file():
        return f"{record} is missing (built before recipes were pinned, or by hand)"
    rec = json.loads(record.read_text())
    if rec.get("recipe") != recipe.to_dict():
        return f"{record} records recipe {rec.get('recipe')}, the pinned one is {recipe.to_dict()}"
    return None


def train_models() -> None:
    """The benchmark weights, if missing: the tiny base (glioblastoma tiles), then the adapter (glioma).

    Weights already in runs/ are used only if their record says the pinned recipe built them; otherwise this
    stops (it never replaces a folder it cannot vouch for) and says which folder to move away.
    """
    for weights, record, recipe in ((TINY_BASE, TINY_BASE.parent / "pretrain.json", BASE_RECIPE),
                                    (BENCH_ADAPTER, BENCH_ADAPTER.parent / "bench_adapter.json", ADAPTER_RECIPE)):
        why = built_by_other_recipe(record, recipe) if weights.exists() else None
        if why:
            raise SystemExit(f"{weights} was not built by the pinned recipe: {why}. Move {weights.parent} away "
                             "and rerun with --train to build the weights the recorded figures used.")
    record = BENCH_ADAPTER.parent / "bench_adapter.json"
    if BENCH_ADAPTER.exists() and (not TINY_BASE.is_file()
                                   or json.loads(record.read_text()).get("base_sha256") != sha256(TINY_BASE)):
        raise SystemExit(f"{BENCH_ADAPTER} was trained on another base than {TINY_BASE}. Move {BENCH_ADAPTER.parent} "
                         "away and rerun with --train.")
    if not TINY_BASE.is_file():
        run("pretrain_tiny.py", "--out", str(TINY_BASE.parent))
    if not BENCH_ADAPTER.is_dir():
        run("make_bench_adapter.py")


def run(script: str, *args: str) -> None:
    cmd = [sys.executable, str(HERE / script), *args]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def summary() -> None:
    """The headline figures of whatever results exist."""
    from bench_amg import amg_table
    from bench_pareto import headline, pareto_table

    for pareto in (RESULTS / "amg_pareto_cpu.json", RESULTS / "amg_pareto_untrained.json"):
        if not pareto.is_file():
            continue
        r = json.loads(pareto.read_text())
        print(f"\ntime per tile vs PQ, nucseg vs SamAutomaticMaskGenerator ({r['model']}, {r['tiles']['n']} tiles of "
              f"{r['tiles']['size']} px, {r['machine']['cpu']}, load {r['machine']['load_1min']}; "
              f"{pareto.relative_to(HERE.parent)}, measured {r['date']}):")
        print(pareto_table(r))
        print(headline(r))
    for amg in (RESULTS / "amg_cpu.json", RESULTS / "amg_cpu_untrained.json"):
        if not amg.is_file():
            continue
        r = json.loads(amg.read_text())
        print(f"\nnucseg vs SamAutomaticMaskGenerator ({r['model']}, {r['tiles']['n']} tiles of {r['tiles']['size']} px, "
              f"{r['machine']['cpu']}; {amg.relative_to(HERE.parent)}, measured {r['date']}):")
        print(amg_table(r))
    native = RESULTS / "native_vs_1024_cpu.json"
    if native.is_file():
        r = json.loads(native.read_text())
        print("\nencoder at 512 px vs 1024 px (tile upsampled 2x), one tile:")
        for row in r["results"]:
            e = row["encoder_s"]
            line = f"  {row['model']}: {e['native_512']:.2f} s vs {e['upsampled_1024']:.2f} s ({row['encoder_ratio_1024_over_512']:.1f}x)"
            if "end_to_end_s" in row:
                line += f"; end to end {row['end_to_end_ratio_1024_over_512']:.1f}x"
            print(line)
    host = RESULTS / "host_cpu.json"
    if host.is_file():
        from bench_host import table as host_table

        r = json.loads(host.read_text())
        print(f"\nwhole-slide host path, instant segmenter ({r['slide']}; {host.relative_to(HERE.parent)}, "
              f"measured {r['date']}):")
        print(host_table(r))
    scaling = RESULTS / "slide_scaling_cpu.json"
    if scaling.is_file():
        r = json.loads(scaling.read_text())
        q = r["ratios_4A_over_A"]
        print(f"\nslide scaling 4A/A: tiles x{q['tissue_tiles']}, wall x{q['wall']}, peak RSS x{q['peak_rss']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="pareto,amg,decoder,native,slide,host,gpu")
    ap.add_argument("--train", action="store_true", help="first train the benchmark weights if they are missing")
    ap.add_argument("--threads", type=int, help="torch CPU threads for the CPU benchmarks (1 on a shared machine)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    threads = ["--threads", str(args.threads)] if args.threads else []
    if args.train:
        train_models()
    if "pareto" in only:
        run("bench_pareto.py", *amg_model_args("amg_pareto_untrained.json"), *threads)
    if "amg" in only:
        run("bench_amg.py", *amg_model_args("amg_cpu_untrained.json"), *threads)
    if "decoder" in only:
        run("bench_decoder.py", *threads)
    if "native" in only:
        run("bench_native_vs_1024.py", "--models", "vit_tiny,vit_b", "--e2e-models", "vit_tiny", *threads)
    if "slide" in only:
        run("bench_slide_scaling.py", "--side", "3072")
    if "host" in only:
        run("bench_host.py")
        run("bench_measurements.py")
        run("bench_geoparquet.py")
    if "gpu" in only:
        if torch.cuda.is_available():
            run("bench_gpu.py", "--out", str(RESULTS / "gpu.json"))
        else:
            print("\nbench_gpu.py skipped: no CUDA device", file=sys.stderr)
    summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
