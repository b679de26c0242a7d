"""GPU throughput: vit_b at 512 px in bf16, tiles/s for the image encoder alone and end to end.

End to end is SamTileSegmenter on a batch of real 512 px tiles handed over as numpy arrays from pinned
buffers (as nucseg.wsi.predict does): upload, encoder, prompt pruning, decoder, NMS, painting, label maps back on
the host. Batch sizes 1..32; each point is warmed up, bracketed by torch.cuda.synchronize, and reports peak
GPU memory. Random vit_b weights are fine for the encoder; end to end they decode the whole grid (no
foreground head, few accepted masks to skip prompts with), i.e. the worst case of ``--prompts auto``. Pass
``--adapter`` (and ``--checkpoint``) for a trained model. The learned modes (``--prompts centers,none``) run
with the adapter's heads and calibrated thresholds; a model without them gets seeded random heads
(``"random_heads": true`` in the row) and ``centers`` then decodes every embedding cell (centre threshold 0),
its worst case. Each mode's time per tile is also split into encoder / heads / decoder / post-processing (one
profiled pass at the largest batch, every stage synchronised). Then ``predict_slide`` is timed end to end on the
real shared slide at 0.25 µm/px (``--slide``, ``--slide-mpp``; ``--slide-side N``: a generated slide): the real
host path (reading, resampling, cache, stitching, polygons, GeoJSON) with the model, each stage's time, and
which lane (model, reading, export, cache) bounds the whole-slide rate.

Needs a CUDA GPU; on a machine without one it exits with a message and status 2. ``--device cpu`` runs the
same code on the CPU as a smoke test (tests/test_bench_scripts.py), not as a measurement.

    .venv/bin/python bench/bench_gpu.py --out bench/results/gpu_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, SAMPLE, SHARED, load_model, provenance, write_report  # noqa: E402


def real_tiles(n: int, pinned: bool = True) -> np.ndarray:
    """``n`` real 512 px H&E tiles (the sample's 76, repeated as needed) in a pinned host buffer."""
    from nucseg.io import read_rgb

    files = sorted(SAMPLE.glob("*/tissue images/*.png"))
    if not files:
        raise SystemExit(f"no tiles under {SAMPLE}")
    buf = torch.empty((n, 512, 512, 3), dtype=torch.uint8, pin_memory=pinned).numpy()
    for i in range(n):
        buf[i] = read_rgb(files[i % len(files)])[:512, :512]
    return buf


def rate(fn, batch: int, seconds: float, cuda: bool = True, warmup: int = 2) -> tuple[float, float | None]:
    """(tiles/s, peak GiB on the GPU; None on CPU) of ``fn`` on ``batch`` tiles, repeated for >= ``seconds``."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync()
        if time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    return calls * batch / elapsed, (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    ap.add_argument("--prompts", default="auto,grid,centers,none", help="prompt modes timed end to end")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--decoder-batch", type=int, default=1024, help="prompts per decoder call")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed duration per point")
    ap.add_argument("--slide", type=Path, default=SHARED / "wsi" / "CMU-1-Small-Region.svs",
                    help="real slide timed end to end (default: the shared CMU-1-Small-Region.svs)")
    ap.add_argument("--slide-mpp", type=float, default=0.25, help="target µm/px for --slide (0.25: resampled)")
    ap.add_argument("--slide-side", type=int, default=0,
                    help="N > 0: time a generated N x N slide instead of --slide; -1: no whole-slide timing")
    ap.add_argument("--slide-batch", type=int, default=16, help="tiles per model call in the whole-slide timing")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test, not a figure")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU and torch.cuda.is_available() is False here: nothing measured. "
              "Run it on a GPU node (docs/PERFORMANCE.md).", file=sys.stderr)
        return 2

    from nucseg.model.infer import InferConfig, SamTileSegmenter
    from nucseg.model.sam import encode

    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    mut = load_model(args.adapter, args.checkpoint, args.model, 512)
    model = mut.model.to(dev).eval()
    bf16 = not args.no_bf16
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    host = real_tiles(max(sizes), pinned=dev == "cuda")
    device_tiles = torch.from_numpy(host).to(dev)
    encoder, end_to_end, stages = [], [], []
    with torch.inference_mode():
        for b in sizes:
            x = device_tiles[:b]

            def enc():
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16 and dev == "cuda"):
                    encode(model, x)

            tps, peak = rate(enc, b, args.seconds, dev == "cuda")
            encoder.append({"batch": b, "tiles_per_s": round(tps, 1), "peak_gib": peak and round(peak, 2)})
            print(json.dumps({"encoder": encoder[-1]}), file=sys.stderr, flush=True)
        from nucseg.model.heads import head_modes

        native = head_modes(model)  # the modes the loaded weights have heads for
        for mode in args.prompts.split(","):
            cfg, random_heads = learned_config(model, mode, args, bf16, native)
            seg = SamTileSegmenter(model, cfg, device=dev)
            for b in sizes:
                seg.stats.update(tiles=0, prompts_grid=0, prompts_decoded=0, decoder_calls=0)
                tps, peak = rate(lambda: seg(host[:b]), b, args.seconds, dev == "cuda")
                row = {"prompts": mode, "batch": b, "tiles_per_s": round(tps, 1), "peak_gib": peak and round(peak, 2),
                       "prompts_decoded_per_tile": round(seg.stats["prompts_decoded"] / max(seg.stats["tiles"], 1), 1),
                       "decoder_calls_per_tile": round(seg.stats["decoder_calls"] / max(seg.stats["tiles"], 1), 3),
                       "decoder_chunk": seg.decoder_chunk, "random_heads": random_heads}
                end_to_end.append(row)
                print(json.dumps({"end_to_end": row}), file=sys.stderr, flush=True)
            seg.profile, b = True, max(sizes)  # one profiled pass: where a tile's time goes
            seg.timings = dict.fromkeys(seg.timings, 0.0)
            seg(host[:b])
            row = {"prompts": mode, "batch": b, "random_heads": random_heads,
                   **{f"{k}_ms_per_tile": round(1000 * v / b, 2) for k, v in seg.timings.items()}}
            stages.append(row)
            print(json.dumps({"stages": row}), file=sys.stderr, flush=True)
    report = {"benchmark": "GPU throughput, 512 px tiles", **provenance(), "model": mut.name, "device": dev,
              "settings": {"bf16": bf16 and dev == "cuda", "points_per_side": args.points_per_side, "decoder_batch": args.decoder_batch,
                           "timing": f">= {args.seconds} s per point after 2 warm-up calls, cuda.synchronize"},
              "encoder": encoder, "end_to_end": end_to_end, "stages": stages}
    if args.slide_side >= 0 and (args.slide_side or args.slide.is_file()):
        report["slide"] = time_slide(model, mut, args, bf16)
        print(json.dumps({"slide": report["slide"]}), file=sys.stderr, flush=True)
    write_report(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


def learned_config(model, mode: str, args, bf16: bool, native: list[str]):
    """(InferConfig, random heads?) for ``mode``: the adapter's calibrated thresholds of a learned mode, or,
    for a model without the mode's head, seeded random heads (centers: every cell decoded, the worst case)."""
    from nucseg.learn.calibrate import MODE_FIELDS, thresholds_to_infer
    from nucseg.model.heads import attach_prompt_heads
    from nucseg.model.infer import InferConfig

    extra, random_heads = {}, False
    if mode in ("centers", "none"):
        if mode not in native:
            torch.manual_seed(0)
            attach_prompt_heads(model)
            random_heads = True
            extra = {"center_threshold": 0.0} if mode == "centers" else {}
        elif args.adapter:
            from nucseg.model.adapter import read_adapter

            t = read_adapter(args.adapter).mode_thresholds.get(mode) or {}
            extra = {k: v for k, v in thresholds_to_infer(t).items() if k in MODE_FIELDS[mode]}
    return InferConfig(prompts=mode, points_per_side=args.points_per_side, decoder_batch=args.decoder_batch,
                       bf16=bf16, **extra), random_heads


def time_slide(model, mut, args, bf16: bool) -> dict:
    """``predict_slide`` end to end with the real host path: reading (and resampling), the zarr cache,
    inference, stitching, polygons and writing all run, overlapped, as in ``nucseg predict``.

    By default the shared real slide (CMU-1-Small-Region.svs) at ``--slide-mpp`` (0.25: every tile resampled);
    ``--slide-side N`` times a generated N x N slide at 0.5 µm/px instead. Reports tiles/s for the whole run
    and after planning (tissue detection), each stage's wall/CPU seconds, and which lane bounds the run.
    """
    from nucseg.model.infer import InferConfig, SamTileSegmenter
    from nucseg.wsi.predict import PredictConfig, export_workers, predict_slide
    from nucseg.wsi.synthslide import make_synthetic_slide

    with tempfile.TemporaryDirectory(prefix="nucseg-gpu-") as tmp:
        if args.slide_side:
            slide, target = Path(tmp) / "slide.tif", 0.5
            make_synthetic_slide(slide, args.slide_side, args.slide_side, mpp=0.5, tissue_fraction=0.7, seed=1)
        else:
            slide, target = args.slide, args.slide_mpp
        seg = SamTileSegmenter(model, InferConfig(points_per_side=args.points_per_side, decoder_batch=args.decoder_batch,
                                                  bf16=bf16), device=args.device, mpp=target, identity=mut.identity)
        cfg = PredictConfig(batch_size=args.slide_batch, work_dir=Path(tmp) / "work", target_mpp=target)
        t0 = time.perf_counter()
        summary = predict_slide(slide, Path(tmp) / "out.geojson", seg, cfg)
        wall = time.perf_counter() - t0
    st = summary.stages
    w = lambda k: st.get(k, {}).get("wall", 0.0)  # noqa: E731
    workers = export_workers(cfg, summary.tissue_tiles)
    # Stages run in parallel lanes; wall seconds per lane (reads are spread over read_workers threads, the
    # export over its processes). The largest lane is what bounds the run; "cache" is shared by the lanes.
    lanes = {"model (infer)": w("infer"), "reading": w("read") / max(1, cfg.read_workers),
             "export (stitch+polygons+write)": (w("stitch") + w("polygons")) / workers + w("write"),
             "cache (zarr, all lanes)": w("cache")}
    return {"slide": str(slide.name) if not args.slide_side else f"generated {args.slide_side} px",
            "target_mpp": summary.target_mpp, "tissue_tiles": summary.tissue_tiles, "nuclei": summary.nuclei,
            "wall_s": round(wall, 2), "tiles_per_s": round(summary.tissue_tiles / wall, 1),
            "tiles_per_s_after_plan": round(summary.tissue_tiles / max(wall - w("plan"), 1e-9), 1),
            "tissue_mm2": round(summary.tissue_area_mm2, 3), "s_per_mm2": round(wall / summary.tissue_area_mm2, 3),
            "export_workers": workers, "stages": st, "lanes_wall_s": {k: round(v, 3) for k, v in lanes.items()},
            "bound_by": max(lanes, key=lanes.get)}


if __name__ == "__main__":
    sys.exit(main())
