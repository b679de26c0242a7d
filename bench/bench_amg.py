"""nucseg's tile inference against segment-anything's SamAutomaticMaskGenerator: same weights, same tiles.

Both run side by side in one process on the same device, each warmed up first, on real held-out tiles of
he-nuclei-sample. Wall time is the figure; the process's CPU time is recorded beside it because on a shared
machine other jobs stretch wall time but not the work done (``machine.load_1min`` says how busy it was). Reported per method: seconds per tile, prompts decoded, and Dice / AJI / PQ / F1 against
the hand-drawn ground truth (``nucseg.learn.evaluate.evaluate_arrays``).

Methods:
* ``nucseg-auto``: SamTileSegmenter, ``--prompts auto`` (foreground-head pruning when the weights have a
  head, two rounds with in-mask skipping), batched decoder, window painting;
* ``nucseg-grid``: the same with every grid point decoded (``--prompts grid``);
* ``amg``: SamAutomaticMaskGenerator(points_per_side=32, points_per_batch=64) with nucseg's thresholds
  (predicted IoU, stability, box NMS), and the decoder output the weights were trained for: a fine-tuned
  nucseg decoder gives one mask per prompt, so AMG's predictor is asked for that one (SAM's own three
  ambiguity masks are untrained there); zero-shot official weights (``--multimask``) keep AMG's three;
* ``amg-stock`` (``--amg-stock``): AMG exactly as shipped (three masks per prompt, 0.88 / 0.95 / 0.7).

AMG's list of masks becomes a label map the way nucseg paints: best predicted IoU first, a pixel belongs to
the first mask claiming it, masks left with less than ``min_keep`` of their area (or ``min_area`` pixels) are
dropped. That conversion is included in AMG's time (a label map is the product both must deliver).

    .venv/bin/python bench/bench_amg.py --adapter runs/bench-adapter/adapter --checkpoint runs/tiny-base/sam_vit_tiny_he.pth
    .venv/bin/python bench/bench_amg.py --model vit_tiny              # seeded random weights: speed only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_ORGAN, REPO, SAMPLE, bench_weights, load_model, load_tiles, provenance, write_report  # noqa: E402

from nucseg.learn.evaluate import evaluate_arrays  # noqa: E402
from nucseg.model.infer import InferConfig, SamTileSegmenter, segment_tiles  # noqa: E402


def amg_label_map(anns: list[dict], shape: tuple[int, int], min_keep: float, min_area: int) -> np.ndarray:
    """AMG's masks -> one instance label map, best predicted IoU first (nucseg's painting rule)."""
    if not anns:
        return np.zeros(shape, np.int32)
    anns = sorted(anns, key=lambda a: -a["predicted_iou"])
    masks = torch.from_numpy(np.stack([a["segmentation"] for a in anns]))
    claim = masks.to(torch.uint8).argmax(0)
    claimed = masks.any(0)
    kept = torch.bincount(claim[claimed], minlength=len(anns))
    area = masks.flatten(1).sum(1)
    good = (kept >= min_keep * area) & (kept >= min_area)
    new_id = torch.cumsum(good.long(), 0) * good
    return torch.where(claimed, new_id[claim], 0).numpy().astype(np.int32)


def make_amg(model, cfg, stock: bool):
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    class SingleMaskPredictor(SamPredictor):
        """SAM's predictor asked for the decoder's single-mask output, the one a nucseg decoder is trained on."""

        def predict_torch(self, *args, multimask_output: bool = True, **kwargs):
            return super().predict_torch(*args, multimask_output=False, **kwargs)

    if stock:
        return SamAutomaticMaskGenerator(model, points_per_side=cfg.points_per_side)
    amg = SamAutomaticMaskGenerator(
        model, points_per_side=cfg.points_per_side, points_per_batch=64, pred_iou_thresh=cfg.pred_iou_thresh,
        stability_score_thresh=cfg.stability_thresh, stability_score_offset=cfg.stability_offset,
        box_nms_thresh=cfg.nms_iou, min_mask_region_area=0,
    )
    if not cfg.multimask:
        amg.predictor = SingleMaskPredictor(model)
    return amg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amg_table(report: dict) -> str:
    """The markdown table of a report (also printed by run_all.py's summary)."""
    lines = ["| method | s/tile | vs AMG | prompts/tile | PQ | AJI | Dice |", "|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        up = report["speedup_vs_amg"].get(name, 1.0)
        lines.append(f"| {name} | {r['s_per_tile']:.3f} | {up:.1f}x | {r['prompts_decoded_per_tile']:.0f} | "
                     f"{r['pq']:.3f} | {r['aji']:.3f} | {r['dice']:.3f} |")
    return "\n".join(lines)


def run_amg(amg, images: list[np.ndarray], cfg) -> tuple[list[np.ndarray], float]:
    """Label maps, and the seconds spent converting AMG's masks to them (part of the total)."""
    out, convert = [], 0.0
    for im in images:
        anns = amg.generate(im)
        t0 = time.perf_counter()
        out.append(amg_label_map(anns, im.shape[:2], cfg.min_keep, cfg.min_area))
        convert += time.perf_counter() - t0
    return out, convert


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SAMPLE / BENCH_ORGAN)
    ap.add_argument("--tiles", type=int, default=8, help="model-input-size tiles, from held-out images")
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--checkpoint", type=Path, help="base weights (of the adapter, or of --model)")
    ap.add_argument("--model", default="vit_tiny", help="without --adapter: vit_tiny|vit_b|...")
    ap.add_argument("--img-size", type=int, default=512, help="without --adapter: encoder input size")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--multimask", action="store_true", help="zero-shot official weights: 3 ambiguity masks")
    ap.add_argument("--pred-iou-thresh", type=float, default=InferConfig.pred_iou_thresh,
                    help="mask filter for both methods (a weak model predicts low IoU for good masks)")
    ap.add_argument("--stability-thresh", type=float, default=InferConfig.stability_thresh)
    ap.add_argument("--fg-thresholds", default=str(InferConfig.fg_threshold),
                    help="comma-separated: one nucseg-auto run per foreground threshold (the first is the headline)")
    ap.add_argument("--batch-size", type=int, default=8, help="tiles per nucseg call")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per method (interleaved)")
    ap.add_argument("--amg-stock", action="store_true", help="also run AMG with its own defaults")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "amg_cpu.json")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); recorded")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    mut = load_model(args.adapter, args.checkpoint, args.model, args.img_size)
    model = mut.model.to(device).eval()
    size = model.image_encoder.img_size
    tiles = load_tiles(args.data, args.tiles, size)
    images = [t.image for t in tiles]
    base = dict(points_per_side=args.points_per_side, multimask=args.multimask, pred_iou_thresh=args.pred_iou_thresh,
                stability_thresh=args.stability_thresh)
    cfg = InferConfig(**base)
    thresholds = [float(t) for t in args.fg_thresholds.split(",")]
    segs = {("auto" if i == 0 else f"auto-fg{t:g}"): SamTileSegmenter(
        model, InferConfig(prompts="auto", fg_threshold=t, **base), device=device, mpp=mut.mpp)
        for i, t in enumerate(thresholds)}
    segs["grid"] = SamTileSegmenter(model, InferConfig(prompts="grid", **base), device=device, mpp=mut.mpp)
    amgs = {"amg": make_amg(model, cfg, stock=False)}
    if args.amg_stock:
        amgs["amg-stock"] = make_amg(model, cfg, stock=True)

    def run(name: str) -> tuple[list[np.ndarray], float]:
        if name.startswith("nucseg-"):
            return segment_tiles(segs[name.split("-", 1)[1]], images, args.batch_size), 0.0
        return run_amg(amgs[name], images, cfg)

    names = [f"nucseg-{k}" for k in segs] + list(amgs)
    with torch.inference_mode():
        for name in names:  # warm-up: one tile each (allocations, kernel selection)
            if name.startswith("nucseg-"):
                segs[name.split("-", 1)[1]](images[0][None])
            else:
                amgs[name].generate(images[0])
        for seg in segs.values():
            seg.stats.update(tiles=0, prompts_grid=0, prompts_decoded=0)
        seconds = {n: [] for n in names}
        cpu_seconds = {n: [] for n in names}
        convert = {n: 0.0 for n in names}
        preds: dict[str, list[np.ndarray]] = {}
        for _ in range(args.repeats):
            for name in names:
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                preds[name], conv = run(name)
                sync(device)
                seconds[name].append(time.perf_counter() - t0)
                cpu_seconds[name].append(time.process_time() - c0)
                convert[name] += conv
                print(f"{name}: {seconds[name][-1] / len(images):.2f} s/tile", file=sys.stderr, flush=True)

    results = {}
    for name in names:
        scores = evaluate_arrays((t.name, t.labels, p, t.ambiguous) for t, p in zip(tiles, preds[name]))["mean"]
        per_tile = min(seconds[name]) / len(images)
        row = {"s_per_tile": round(per_tile, 4), "tiles_per_s": round(1 / per_tile, 3),
               "s_per_tile_all_repeats": [round(s / len(images), 4) for s in seconds[name]],
               "cpu_s_per_tile": round(min(cpu_seconds[name]) / len(images), 4),
               "instances_per_tile": round(float(np.mean([p.max() for p in preds[name]])), 1),
               **{k: round(float(scores[k]), 4) for k in ("dice", "aji", "pq", "dq", "sq", "f1")}}
        if name.startswith("nucseg-"):
            st = segs[name.split("-", 1)[1]].stats
            row["prompts_decoded_per_tile"] = round(st["prompts_decoded"] / st["tiles"], 1)
        else:
            masks_per_prompt = 3 if (name == "amg-stock" or args.multimask) else 1
            row["prompts_decoded_per_tile"] = args.points_per_side**2
            row["masks_decoded_per_tile"] = args.points_per_side**2 * masks_per_prompt
            row["label_map_s_per_tile"] = round(convert[name] / args.repeats / len(images), 4)
        results[name] = row

    amg = results["amg"]
    report = {
        "benchmark": "nucseg tile inference vs segment-anything SamAutomaticMaskGenerator",
        **provenance(),
        "device": str(device),
        "model": mut.name,
        "weights": bench_weights(args.adapter, args.checkpoint),
        "tiles": {"data": str(args.data.relative_to(REPO.parent) if args.data.is_relative_to(REPO.parent) else args.data),
                  "n": len(tiles), "size": size, "names": [t.name for t in tiles],
                  "gt_nuclei_per_tile": round(float(np.mean([len(np.unique(t.labels)) - 1 for t in tiles])), 1)},
        "settings": {"infer": cfg.to_dict(), "fg_thresholds": thresholds, "batch_size": args.batch_size,
                     "repeats": args.repeats,
                     "timing": "best of repeats, after one warm-up tile per method"},
        "results": results,
        "speedup_vs_amg": {n: round(amg["s_per_tile"] / r["s_per_tile"], 2) for n, r in results.items() if n != "amg"},
        "cpu_time_ratio_vs_amg": {n: round(amg["cpu_s_per_tile"] / r["cpu_s_per_tile"], 2)
                                  for n, r in results.items() if n != "amg"},
        "pq_minus_amg": {n: round(r["pq"] - amg["pq"], 4) for n, r in results.items() if n != "amg"},
    }
    write_report(args.out, report)
    print(amg_table(report))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
