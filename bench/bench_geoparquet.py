"""GeoParquet by region: bytes per nucleus and the time to read a 1 mm² window from a million-nucleus file.

The file is written by nucseg's own ``GeoParquetWriter`` (the bbox covering column, rows in tile order, row
groups of ``ROW_GROUP`` rows) from synthetic nuclei: a raster of 512 px tiles at 0.25 µm/px level-0 (40x),
``--per-tile`` nuclei per tile (65: ~4,000 nuclei/mm², dense tissue), each an ellipse of 24 vertices with
radii of 3-5 µm rounded to 0.01 px like real outlines, written one tile per batch as ``predict`` writes them,
with the default (``full``) measurement columns filled with random values (full float64 mantissas, as real
measurements have). For each row-group size in ``--row-groups``, in the same run:

* bytes per nucleus of the file;
* ``geopandas.read_parquet(path, bbox=window)`` of ``--windows`` random 1 mm² windows inside the slide
  (median wall time and process CPU time; the file is in the OS page cache after writing, so this is the
  decode cost, not the disk's), the nuclei returned, the row groups a ``bbox`` filter keeps (pyarrow's
  row-group statistics) and the rows they hold;
* for contrast, a full ``geopandas.read_parquet(path)`` and the same window cut from it (no covering use).

    .venv/bin/python bench/bench_geoparquet.py          # ~2-4 min on 2 cores -> bench/results/geoparquet_cpu.json
    .venv/bin/python bench/bench_geoparquet.py --nuclei 20000 --windows 3   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MPP0 = 0.25  # level-0 µm per pixel
TILE = 512  # level-0 pixels per tile
VERTS = 24


def tile_batches(n_nuclei: int, per_tile: int, seed: int = 0):
    """NucleusBatch per tile, in raster tile order, on a square-ish raster holding ``n_nuclei`` in all."""
    from nucseg.wsi import measure
    from nucseg.wsi.export import COORD_DIGITS, NucleusBatch

    rng = np.random.default_rng(seed)
    n_tiles = -(-n_nuclei // per_tile)
    nx = int(np.ceil(np.sqrt(n_tiles)))
    names = measure.names("full")
    ang = np.linspace(0, 2 * np.pi, VERTS, endpoint=False)
    gid, left = 1, n_nuclei
    for t in range(n_tiles):
        k = min(per_tile, left)
        tx, ty = t % nx, t // nx
        cx = tx * TILE + rng.uniform(0, TILE, k)
        cy = ty * TILE + rng.uniform(0, TILE, k)
        rx, ry = (rng.uniform(3, 5, (2, k)) / MPP0)
        theta = rng.uniform(0, np.pi, k)
        ex, ey = rx[:, None] * np.cos(ang), ry[:, None] * np.sin(ang)
        x = cx[:, None] + ex * np.cos(theta)[:, None] - ey * np.sin(theta)[:, None]
        y = cy[:, None] + ex * np.sin(theta)[:, None] + ey * np.cos(theta)[:, None]
        ring = np.stack([x, y], axis=-1)
        ring = np.concatenate([ring, ring[:, :1]], axis=1)  # closed, counter-clockwise
        coords = np.round(ring.reshape(-1, 2), COORD_DIGITS)
        b = NucleusBatch(np.arange(gid, gid + k), coords, np.arange(k + 1) * (VERTS + 1), cx, cy,
                         np.pi * rx * ry * MPP0**2, 2 * np.pi * np.sqrt((rx**2 + ry**2) / 2) * MPP0,
                         rng.uniform(0.5, 1, k), {m: rng.random(k) for m in names})
        yield b, (nx * TILE, -(-n_tiles // nx) * TILE)
        gid += k
        left -= k


def write_file(path: Path, n_nuclei: int, per_tile: int, row_group: int) -> dict:
    from nucseg.wsi import measure
    from nucseg.wsi.export import GeoParquetWriter

    class Writer(GeoParquetWriter):
        ROW_GROUP = row_group

    c0, w0 = time.process_time(), time.perf_counter()
    extent = None
    with Writer(path, slide_key="bench", measurements=measure.names("full")) as w:
        for b, extent in tile_batches(n_nuclei, per_tile):
            w.write_batch(b)
    return {"write_wall_s": round(time.perf_counter() - w0, 2), "write_cpu_s": round(time.process_time() - c0, 2),
            "extent_px": list(extent)}


def windows(extent: tuple[int, int], n: int, seed: int = 1) -> list[tuple[float, float, float, float]]:
    side = 1000.0 / MPP0  # 1 mm in level-0 pixels
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, extent[0] - side, n)
    y0 = rng.uniform(0, extent[1] - side, n)
    return [(float(a), float(b), float(a + side), float(b + side)) for a, b in zip(x0, y0)]


def read_windows(path: Path, boxes: list) -> dict:
    import geopandas as gpd
    import pyarrow.dataset as ds

    [frag] = ds.dataset(path).get_fragments()
    groups = frag.metadata.num_row_groups
    walls, cpus, found, kept_groups, kept_rows = [], [], [], [], []
    for box in boxes:
        c0, w0 = time.process_time(), time.perf_counter()
        df = gpd.read_parquet(path, bbox=box)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        found.append(len(df))
        f = ((ds.field("bbox", "xmin") <= box[2]) & (ds.field("bbox", "xmax") >= box[0])
             & (ds.field("bbox", "ymin") <= box[3]) & (ds.field("bbox", "ymax") >= box[1]))
        kept = frag.split_by_row_group(f)
        kept_groups.append(len(kept))
        kept_rows.append(sum(rg.num_rows for g in kept for rg in g.row_groups))
    return {"row_groups": groups, "window_read_wall_s_median": round(float(np.median(walls)), 4),
            "window_read_cpu_s_median": round(float(np.median(cpus)), 4),
            "window_nuclei_median": int(np.median(found)),
            "window_row_groups_read_median": int(np.median(kept_groups)),
            "window_rows_read_median": int(np.median(kept_rows)),
            "window_read_wall_s_all": [round(w, 4) for w in walls]}


def full_read(path: Path, box: tuple) -> dict:
    import geopandas as gpd
    import shapely

    c0, w0 = time.process_time(), time.perf_counter()
    df = gpd.read_parquet(path)
    cut = df[shapely.intersects(df.geometry.values, shapely.box(*box))]
    return {"full_read_then_cut_wall_s": round(time.perf_counter() - w0, 3),
            "full_read_then_cut_cpu_s": round(time.process_time() - c0, 3), "cut_nuclei": len(cut)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nuclei", type=int, default=1_000_000)
    ap.add_argument("--per-tile", type=int, default=65, help="nuclei per 512 px tile (65: ~4,000/mm² at 40x)")
    ap.add_argument("--row-groups", default="4096,16384,65536", help="row-group sizes to compare")
    ap.add_argument("--windows", type=int, default=9, help="random 1 mm² windows read per file")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "geoparquet_cpu.json")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from common import provenance, write_report

    rows = []
    with tempfile.TemporaryDirectory(prefix="nucseg-bench-gpq-") as tmp:
        for rg in (int(v) for v in args.row_groups.split(",")):
            path = Path(tmp) / f"n{rg}.parquet"
            w = write_file(path, args.nuclei, args.per_tile, rg)
            boxes = windows(tuple(w["extent_px"]), args.windows)
            row = {"row_group": rg, "nuclei": args.nuclei, "bytes": path.stat().st_size,
                   "bytes_per_nucleus": round(path.stat().st_size / args.nuclei, 1), **w, **read_windows(path, boxes)}
            row.update(full_read(path, boxes[0]))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "window_read_wall_s_all"}), file=sys.stderr,
                  flush=True)
            path.unlink()
    report = {"benchmark": "GeoParquet region reads (bbox covering)", **provenance(),
              "settings": {"nuclei": args.nuclei, "per_tile": args.per_tile, "tile_px": TILE, "mpp0": MPP0,
                           "vertices_per_nucleus": VERTS, "window_mm2": 1.0, "windows": args.windows,
                           "measurements": "full"},
              "load_1min_end": round(os.getloadavg()[0], 2), "results": rows}
    write_report(args.out, report)
    print(table(report))
    return 0


def table(report: dict) -> str:
    lines = ["| rows per row group | row groups | bytes/nucleus | 1 mm² window: wall s (median) | CPU s | nuclei | "
             "row groups read | rows read | full read + cut: wall s |", "|" + "---:|" * 9]
    for r in report["results"]:
        lines.append(f"| {r['row_group']} | {r['row_groups']} | {r['bytes_per_nucleus']} | "
                     f"{r['window_read_wall_s_median']} | {r['window_read_cpu_s_median']} | {r['window_nuclei_median']} | "
                     f"{r['window_row_groups_read_median']} | {r['window_rows_read_median']} | "
                     f"{r['full_read_then_cut_wall_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
