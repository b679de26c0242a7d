"""Mask decoder cost per prompt: segment-anything's decoder (nucseg.model.sam.decode) vs nucseg's fast path
(nucseg.model.fastdecode), same weights and prompts, at several prompts per call.

Grid prompting is decoder-bound (1,024 prompts per tile), so this is the per-prompt price every benchmark
above pays. Random weights are fine: the cost does not depend on them. Process CPU time is reported (robust
to other jobs on a shared machine) next to wall time.

    .venv/bin/python bench/bench_decoder.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, provenance, write_report  # noqa: E402


def per_prompt(fn, points: torch.Tensor, index: torch.Tensor, chunk: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per prompt of decoding all ``points`` ``chunk`` at a time, after a warm-up chunk."""
    fn(points[:chunk], index[:chunk])
    c0, t0 = time.process_time(), time.perf_counter()
    for s in range(0, len(points), chunk):
        fn(points[s : s + chunk], index[s : s + chunk])
    n = len(points)
    return (time.process_time() - c0) / n * 1e3, (time.perf_counter() - t0) / n * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="vit_tiny:256:1024,vit_tiny:512:512,vit_b:512:64",
                    help="model:input_px:prompts, comma-separated")
    ap.add_argument("--chunks", default="4,16,64,512", help="prompts per decoder call")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decoder_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from nucseg.model.fastdecode import decode_points, prepare
    from nucseg.model.sam import build_sam, decode

    rows = []
    with torch.inference_mode():
        for item in args.configs.split(","):
            name, size, n = item.split(":")
            size, n = int(size), int(n)
            torch.manual_seed(0)
            model = build_sam(name, size)
            grid = size // 16
            emb = torch.randn(4, model.prompt_encoder.embed_dim, grid, grid)
            points = torch.rand(n, 2) * size
            index = torch.sort(torch.randint(0, 4, (n,))).values
            ctx = prepare(model, emb)
            ones = torch.ones(n, 1, dtype=torch.long)

            def reference(p, i):
                return decode(model, emb, p[:, None], ones[: len(p)], i)

            def fast(p, i):
                return decode_points(model, ctx, p, i)

            for chunk in (int(c) for c in args.chunks.split(",")):
                if chunk > n:
                    continue
                ref_cpu, ref_wall = per_prompt(reference, points, index, chunk)
                fast_cpu, fast_wall = per_prompt(fast, points, index, chunk)
                row = {"model": name, "input_px": size, "prompts": n, "chunk": chunk,
                       "reference_cpu_ms": round(ref_cpu, 3), "fast_cpu_ms": round(fast_cpu, 3),
                       "reference_wall_ms": round(ref_wall, 3), "fast_wall_ms": round(fast_wall, 3),
                       "speedup_cpu": round(ref_cpu / fast_cpu, 2)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    report = {"benchmark": "mask decoder per prompt: segment-anything vs nucseg fast path", **provenance(),
              "device": "cpu", "results": rows}
    write_report(args.out, report)
    print("| model | input | prompts/call | reference ms/prompt | fast ms/prompt | speed-up |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input_px']} | {r['chunk']} | {r['reference_cpu_ms']:.2f} | {r['fast_cpu_ms']:.2f} | "
              f"{r['speedup_cpu']:.2f}x |")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
