"""Time per tile versus quality: nucseg's prompt settings against a *tuned* SamAutomaticMaskGenerator.

One point is not a comparison: AMG with a sparser grid is much faster too (issue 14). So this sweeps AMG's grid
density and nucseg's prompt and pruning settings, in one process on the same held-out tiles (all tiles of the
held-out images, ``bench/common.py:HELD_OUT_IMAGES``), with the same weights and mask filters, and reports
each method's Pareto front of time per tile against PQ. The headline is the speed ratio **at equal PQ on the
fronts**: at the highest PQ both fronts reach, AMG's front time over nucseg's, each front linearly
interpolated between its points (mixing two settings over the tiles reaches every point of that segment).
Its uncertainty comes from the tiles: a paired bootstrap resamples tiles, recomputes every setting's mean PQ
and time, both fronts and the ratio (median and 95 % interval).

Fairness: tiles are run tile by tile, every setting on a tile before the next tile (so load changes on a shared
machine hit all settings alike), each setting warmed up on one tile first, one tile per call for both methods
(per-tile times are what the bootstrap resamples). Wall time and the process's CPU time are both recorded;
fronts and ratios are computed for both. AMG's masks become a label map by nucseg's painting rule
(``bench_amg.amg_label_map``), inside its time; AMG decodes the single-mask output a nucseg decoder is trained
for (``bench_amg.make_amg``).

    .venv/bin/python bench/bench_pareto.py --adapter runs/bench-adapter/adapter \\
        --checkpoint runs/tiny-base/sam_vit_tiny_he.pth --pred-iou-thresh 0.3 --stability-thresh 0.6
    .venv/bin/python bench/bench_pareto.py --model vit_tiny --tiles 2 ...    # seeded random weights: plumbing

The learned modes (``--prompts centers`` / ``none``, issue 23) and nucseg's classical threshold segmenter are
put on the same tiles in the same run when the adapter has the heads (``--nucseg-centers``, ``--nucseg-none``,
``--threshold``): each gets its own front, its ratio at equal PQ against the tuned AMG front and against
nucseg ``auto``/``grid`` (``"learned"`` in the report), prompts per ground-truth nucleus, decoder calls, and
time per tile split into encoder / heads / decoder / post-processing (``SamTileSegmenter.profile``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BENCH_ORGAN, HELD_OUT_IMAGES, REPO, SAMPLE, bench_weights, load_model, load_tiles,  # noqa: E402
                    provenance, write_report)

RESULTS = REPO / "bench" / "results"
METRICS = ("pq", "aji", "f1", "dice")


# ---------------------------------------------------------------- fronts, ratios, bootstrap (pure numpy)

def pareto_front(times: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats (as fast or faster *and* as good or better, one strictly),
    ordered by time; along them score strictly increases. Of exactly equal points the first is kept."""
    times, scores = np.asarray(times, float), np.asarray(scores, float)
    order = np.lexsort((-scores, times))  # by time, then best score first
    keep, best = [], -np.inf
    for i in order:
        if scores[i] > best:
            keep.append(i)
            best = scores[i]
    return np.asarray(keep, dtype=int)


def time_at(front_t: np.ndarray, front_s: np.ndarray, q: float) -> float:
    """Time a front needs to reach score ``q``: its cheapest point if that already reaches ``q``, linear between
    the two points around ``q``, NaN above its best score. ``front_*`` as from :func:`pareto_front` (sorted)."""
    front_t, front_s = np.asarray(front_t, float), np.asarray(front_s, float)
    if q > front_s[-1]:
        return float("nan")
    if q <= front_s[0]:
        return float(front_t[0])
    return float(np.interp(q, front_s, front_t))


def ratio_at_equal_score(t_ref: np.ndarray, s_ref: np.ndarray, t_new: np.ndarray, s_new: np.ndarray,
                         q: float | None = None) -> tuple[float, float]:
    """(ratio, q): the reference front's time over the new front's time at score ``q`` (default: the highest
    score both fronts reach). Points need not be fronts; they are reduced to them here."""
    fr, fn = pareto_front(t_ref, s_ref), pareto_front(t_new, s_new)
    tr, sr = np.asarray(t_ref, float)[fr], np.asarray(s_ref, float)[fr]
    tn, sn = np.asarray(t_new, float)[fn], np.asarray(s_new, float)[fn]
    if q is None:
        q = float(min(sr[-1], sn[-1]))
    return time_at(tr, sr, q) / time_at(tn, sn, q), q


def bootstrap_ratio(t_ref: np.ndarray, s_ref: np.ndarray, t_new: np.ndarray, s_new: np.ndarray,
                    n: int = 2000, seed: int = 0, q: float | None = None, groups=None) -> dict:
    """Paired bootstrap over tiles of :func:`ratio_at_equal_score`.

    ``*_ref`` / ``*_new``: (settings, tiles) per-tile times and scores, same tiles in the same column order.
    Each resample draws tiles with replacement, takes every setting's mean over them, and recomputes both fronts
    and the ratio: at score ``q``, or (None) at each resample's highest common score. ``groups`` (one label per
    tile, e.g. its source image): resample whole groups instead, for tiles that are not independent. Returns
    the median and 2.5 / 97.5 % percentiles of the ratios where both fronts reach the score, and the share of
    resamples where they do.
    """
    arrays = [np.asarray(a, float) for a in (t_ref, s_ref, t_new, s_new)]
    n_tiles = arrays[0].shape[1]
    if any(a.shape[1] != n_tiles for a in arrays):
        raise ValueError("every array needs one column per tile, the same tiles")
    members = [np.arange(n_tiles)] if groups is None else None
    if groups is not None:
        labels = np.asarray(groups)
        if len(labels) != n_tiles:
            raise ValueError("one group label per tile")
        members = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
    rng = np.random.default_rng(seed)
    ratios, qs = np.empty(n), np.empty(n)
    for b in range(n):
        if groups is None:
            idx = rng.integers(0, n_tiles, n_tiles)
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        ratios[b], qs[b] = ratio_at_equal_score(*(a[:, idx].mean(1) for a in arrays), q=q)
    ok = np.isfinite(ratios)
    if not ok.any():
        return {"median": None, "ci95": [None, None], "resamples": n, "seed": seed, "defined": 0.0}
    lo, med, hi = np.percentile(ratios[ok], [2.5, 50, 97.5])
    out = {"median": float(med), "ci95": [float(lo), float(hi)], "resamples": n, "seed": seed,
           "defined": float(ok.mean())}
    if q is None:
        out.update(score_median=float(np.median(qs)), score_ci95=[float(v) for v in np.percentile(qs, [2.5, 97.5])])
    return out


# ---------------------------------------------------------------- the sweep

@dataclass(frozen=True)
class Setting:
    method: str  # "nucseg" (auto / grid) | "amg" | "centers" | "none" | "threshold" (the classical segmenter)
    points_per_side: int
    prompts: str = "grid"  # nucseg: auto | grid (AMG always decodes its whole grid)
    fg_threshold: float | None = None
    skip_margin: int | None = None
    points_per_batch: int | None = None  # AMG
    center_threshold: float | None = None  # centers
    negative_prompts: int = 0  # centers
    ais: tuple[float, float, float] | None = None  # none: foreground, centre, boundary thresholds

    @property
    def name(self) -> str:
        if self.method == "amg":
            return f"amg-{self.points_per_side}"
        if self.method == "threshold":
            return "threshold"
        if self.method == "centers":
            return f"centers-c{self.center_threshold:g}-n{self.negative_prompts}"
        if self.method == "none":
            return "none-f{:g}-c{:g}-b{:g}".format(*self.ais)
        if self.prompts == "grid":
            return f"nucseg-grid-{self.points_per_side}"
        return f"nucseg-auto-{self.points_per_side}-fg{self.fg_threshold:g}-m{self.skip_margin}"


LEARNED = ("centers", "none", "threshold")  # the families compared against AMG and nucseg auto/grid


def parse_learned(centers: str, none: str, threshold: bool, modes: list[str]) -> list[Setting]:
    """``--nucseg-centers 0.3:0,0.5:2`` (centre threshold:negative prompts), ``--nucseg-none 0.5:0.5:0.3``
    (foreground:centre:boundary), ``--threshold``; modes the model has no head for are left out."""
    out = []
    if "centers" in modes:
        for spec in filter(None, centers.split(",")):
            c, k = spec.split(":")
            out.append(Setting("centers", 0, "centers", center_threshold=float(c), negative_prompts=int(k)))
    if "none" in modes:
        for spec in filter(None, none.split(",")):
            out.append(Setting("none", 0, "none", ais=tuple(float(v) for v in spec.split(":"))))
    if threshold:
        out.append(Setting("threshold", 0, "none"))
    return out


def parse_settings(amg_pps: str, nucseg_grid: str, nucseg_auto: str, amg_batch: int) -> list[Setting]:
    """``--amg-points 8,16``, ``--nucseg-grid 16,32``, ``--nucseg-auto 32:0.2:8,16:0.3:8`` (pps:fg:margin)."""
    out = [Setting("amg", int(p), points_per_batch=amg_batch) for p in filter(None, amg_pps.split(","))]
    out += [Setting("nucseg", int(p), "grid") for p in filter(None, nucseg_grid.split(","))]
    for spec in filter(None, nucseg_auto.split(",")):
        p, fg, m = spec.split(":")
        out.append(Setting("nucseg", int(p), "auto", float(fg), int(m)))
    return out


STAGES = ("encoder", "heads", "decoder", "post")


def make_runner(setting: Setting, model, base: dict, device: torch.device, mpp, learned: dict | None = None):
    """A function image -> (label map, prompts decoded, {decoder_calls, stage seconds}) for one setting.

    ``learned``: the centers / none thresholds not set by the setting (the adapter's calibrated ones)."""
    from bench_amg import amg_label_map, make_amg

    from nucseg.model.infer import InferConfig, SamTileSegmenter

    if setting.method == "amg":
        cfg = InferConfig(points_per_side=setting.points_per_side, **base)
        amg = make_amg(model, cfg, stock=False)
        amg.points_per_batch = setting.points_per_batch

        def run_amg(image: np.ndarray) -> tuple[np.ndarray, int, dict]:
            anns = amg.generate(image)
            return (amg_label_map(anns, image.shape[:2], cfg.min_keep, cfg.min_area), setting.points_per_side ** 2,
                    {"decoder_calls": -(-setting.points_per_side ** 2 // setting.points_per_batch)})
        return run_amg
    if setting.method == "threshold":
        from nucseg.model.classical import ThresholdSegmenter

        classical = ThresholdSegmenter(tile_size=model.image_encoder.img_size)

        def run_threshold(image: np.ndarray) -> tuple[np.ndarray, int, dict]:
            return classical(image[None]).labels[0], 0, {"decoder_calls": 0}
        return run_threshold
    if setting.method == "centers":
        extra = {**(learned or {}).get("centers", {}), "center_threshold": setting.center_threshold,
                 "negative_prompts": setting.negative_prompts}
    elif setting.method == "none":
        extra = {**(learned or {}).get("none", {}),
                 **dict(zip(("ais_foreground", "ais_center", "ais_boundary"), setting.ais))}
    else:
        extra = {} if setting.prompts == "grid" else {"fg_threshold": setting.fg_threshold,
                                                      "skip_margin": setting.skip_margin}
    seg = SamTileSegmenter(model, InferConfig(points_per_side=setting.points_per_side or 32,
                                              prompts=setting.prompts, **{**base, **extra}), device=device, mpp=mpp)
    seg.profile = True

    def run_nucseg(image: np.ndarray) -> tuple[np.ndarray, int, dict]:
        before, calls = seg.stats["prompts_decoded"], seg.stats["decoder_calls"]
        stages = dict(seg.timings)
        lab = seg(image[None]).labels[0]
        return lab, seg.stats["prompts_decoded"] - before, {
            "decoder_calls": seg.stats["decoder_calls"] - calls,
            **{f"{k}_s": seg.timings[k] - stages[k] for k in STAGES}}
    return run_nucseg


def sweep(settings: list[Setting], model, tiles: list, base: dict, device: torch.device, mpp=None,
          repeats: int = 1, log=None, learned: dict | None = None) -> dict:
    """Per setting and tile: wall and CPU seconds (best of ``repeats``), prompts decoded, decoder calls and
    stage seconds (of the fastest repeat), and the metrics."""
    from nucseg.learn.evaluate import evaluate_arrays

    runners = {s.name: make_runner(s, model, base, device, mpp, learned) for s in settings}
    n = len(tiles)
    wall = {k: np.full((repeats, n), np.inf) for k in runners}
    cpu = {k: np.full((repeats, n), np.inf) for k in runners}
    prompts = {k: np.zeros(n) for k in runners}
    extras: dict[str, list] = {k: [{}] * n for k in runners}
    preds: dict[str, list] = {k: [None] * n for k in runners}
    names = list(runners)
    with torch.inference_mode():
        for k in names:  # warm-up: allocations, kernel selection
            runners[k](tiles[0].image)
        for r in range(repeats):
            for i, tile in enumerate(tiles):
                # rotate the order per tile, so no setting always runs first (or right after a given other)
                for k in names[i % len(names):] + names[:i % len(names)]:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    lab, used, extra = runners[k](tile.image)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    elapsed = time.perf_counter() - t0
                    if elapsed < wall[k][:, i].min():
                        extras[k][i] = extra
                    wall[k][r, i], cpu[k][r, i] = elapsed, time.process_time() - c0
                    preds[k][i], prompts[k][i] = lab, used
                if log:
                    log(f"repeat {r + 1}/{repeats}, tile {i + 1}/{n} ({tile.name})")
    out = {}
    for s in settings:
        k = s.name
        per = evaluate_arrays((t.name, t.labels, p, t.ambiguous) for t, p in zip(tiles, preds[k]))["per_image"]
        rows = [per[t.name] for t in tiles]
        keys = sorted({key for e in extras[k] for key in e})
        out[k] = {"setting": asdict(s), "wall_s": wall[k].min(0), "cpu_s": cpu[k].min(0), "prompts": prompts[k],
                  "instances": np.array([float(p.max()) for p in preds[k]]),
                  "gt_nuclei": np.array([float(len(np.unique(t.labels)) - 1) for t in tiles]),
                  **{key: np.array([float(e.get(key, 0.0)) for e in extras[k]]) for key in keys},
                  **{m: np.array([float(row[m]) for row in rows]) for m in METRICS}}
    return out


def fronts_and_ratios(per: dict, time_key: str, bootstrap: int, seed: int, groups: list[str],
                      levels: list[float]) -> dict:
    """Both fronts (setting names in time order); the ratio at equal PQ, at the highest PQ both reach and at
    fixed PQ ``levels``, each with a bootstrap over tiles and one over source images (``groups``); and the ratio
    of every nucseg front point against AMG's front at that point's PQ."""
    names = {m: [k for k, v in per.items() if v["setting"]["method"] == m] for m in ("amg", "nucseg")}
    t = {m: np.array([per[k][time_key] for k in names[m]]) for m in names}  # (settings, tiles)
    s = {m: np.array([per[k]["pq"] for k in names[m]]) for m in names}
    mt, ms = {m: t[m].mean(1) for m in t}, {m: s[m].mean(1) for m in s}
    fronts = {m: [names[m][i] for i in pareto_front(mt[m], ms[m])] for m in names}
    ratio, q = ratio_at_equal_score(mt["amg"], ms["amg"], mt["nucseg"], ms["nucseg"])
    fa = pareto_front(mt["amg"], ms["amg"])
    points = {}
    for k in fronts["nucseg"]:
        i = names["nucseg"].index(k)
        t_amg = time_at(mt["amg"][fa], ms["amg"][fa], ms["nucseg"][i])
        points[k] = None if np.isnan(t_amg) else round(t_amg / mt["nucseg"][i], 3)
    args = (t["amg"], s["amg"], t["nucseg"], s["nucseg"])
    curve = []
    for level in levels:
        r = ratio_at_equal_score(mt["amg"], ms["amg"], mt["nucseg"], ms["nucseg"], q=level)[0]
        curve.append({"pq": level, "ratio": None if np.isnan(r) else round(r, 3),
                      "bootstrap_tiles": bootstrap_ratio(*args, n=bootstrap, seed=seed, q=level),
                      "bootstrap_images": bootstrap_ratio(*args, n=bootstrap, seed=seed, q=level, groups=groups)})
    return {"fronts": fronts, "ratio_at_equal_pq": round(ratio, 3), "equal_pq": round(q, 4),
            "ratio_of_nucseg_front_points": points,
            "bootstrap": bootstrap_ratio(*args, n=bootstrap, seed=seed),
            "bootstrap_images": bootstrap_ratio(*args, n=bootstrap, seed=seed, groups=groups),
            "curve": curve}


def learned_vs(per: dict, time_key: str, bootstrap: int, seed: int, groups: list[str], levels: list[float]) -> dict:
    """Per learned family (centers, none, threshold) present: its front, and its ratio at equal PQ (highest
    common PQ and ``levels``, bootstrap over tiles and images) against the AMG front and nucseg's auto/grid
    front: > 1 means the family is faster there."""
    names = {m: [k for k, v in per.items() if v["setting"]["method"] == m] for m in ("amg", "nucseg", *LEARNED)}
    t = {m: np.array([per[k][time_key] for k in ks]) for m, ks in names.items() if ks}
    s = {m: np.array([per[k]["pq"] for k in ks]) for m, ks in names.items() if ks}
    out = {}
    for fam in LEARNED:
        if fam not in t:
            continue
        entry = {"front": [names[fam][i] for i in pareto_front(t[fam].mean(1), s[fam].mean(1))]}
        for ref in ("amg", "nucseg"):
            if ref not in t:
                continue
            args = (t[ref], s[ref], t[fam], s[fam])
            ratio, q = ratio_at_equal_score(t[ref].mean(1), s[ref].mean(1), t[fam].mean(1), s[fam].mean(1))
            curve = []
            for level in levels:
                r = ratio_at_equal_score(t[ref].mean(1), s[ref].mean(1), t[fam].mean(1), s[fam].mean(1), q=level)[0]
                curve.append({"pq": level, "ratio": None if np.isnan(r) else round(r, 3),
                              "bootstrap_tiles": bootstrap_ratio(*args, n=bootstrap, seed=seed, q=level)})
            entry[f"vs_{ref}"] = {"ratio_at_equal_pq": None if np.isnan(ratio) else round(ratio, 3),
                                  "equal_pq": round(q, 4), "bootstrap": bootstrap_ratio(*args, n=bootstrap, seed=seed),
                                  "bootstrap_images": bootstrap_ratio(*args, n=bootstrap, seed=seed, groups=groups),
                                  "curve": curve}
        out[fam] = entry
    return out


def summarise(per: dict) -> dict:
    def stage(v, key):
        return {f"{k}_s_per_tile": round(float(v[f"{k}_s"].mean()), 4) for k in STAGES if f"{k}_s" in v} \
            if key else {}

    return {k: {"setting": v["setting"], "s_per_tile": round(float(v["wall_s"].mean()), 4),
                "cpu_s_per_tile": round(float(v["cpu_s"].mean()), 4),
                "prompts_decoded_per_tile": round(float(v["prompts"].mean()), 1),
                "prompts_per_gt_nucleus": round(float(v["prompts"].sum() / max(v["gt_nuclei"].sum(), 1)), 3),
                "decoder_calls_per_tile": round(float(v["decoder_calls"].mean()), 2) if "decoder_calls" in v else None,
                **stage(v, "encoder_s" in v),
                "instances_per_tile": round(float(v["instances"].mean()), 1),
                **{m: round(float(v[m].mean()), 4) for m in METRICS}} for k, v in per.items()}


def pareto_table(report: dict) -> str:
    """Markdown: every setting, front membership (wall time) marked."""
    front = {k for f in report["wall"]["fronts"].values() for k in f}
    front |= {k for f in report.get("learned_wall", {}).values() for k in f["front"]}
    lines = ["| setting | s/tile | CPU s/tile | prompts/tile | prompts/GT nucleus | PQ | AJI | F1 | front |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    rows = sorted(report["results"].items(), key=lambda kv: (kv[1]["setting"]["method"], kv[1]["s_per_tile"]))
    for k, r in rows:
        lines.append(f"| {k} | {r['s_per_tile']:.3f} | {r['cpu_s_per_tile']:.3f} | {r['prompts_decoded_per_tile']:.0f} "
                     f"| {r['prompts_per_gt_nucleus']:.2f} | {r['pq']:.3f} | {r['aji']:.3f} | {r['f1']:.3f} "
                     f"| {'✓' if k in front else ''} |")
    return "\n".join(lines)


def headline(report: dict) -> str:
    out = []
    for key, label in (("wall", "wall"), ("cpu", "CPU")):
        h = report[key]
        b, bi = h["bootstrap"], h["bootstrap_images"]
        out.append(f"{label} time: AMG front / nucseg front at the highest PQ both reach ({h['equal_pq']:.3f}) = "
                   f"{h['ratio_at_equal_pq']:.2f}x (bootstrap over tiles: median {b['median']:.2f}x, 95 % "
                   f"{b['ci95'][0]:.2f}-{b['ci95'][1]:.2f}x; over images: {bi['ci95'][0]:.2f}-{bi['ci95'][1]:.2f}x)")
        for c in h["curve"]:
            bt = c["bootstrap_tiles"]
            if c["ratio"] is not None and bt["median"] is not None:
                out.append(f"  at PQ {c['pq']:.3f}: {c['ratio']:.2f}x (tiles 95 % {bt['ci95'][0]:.2f}-{bt['ci95'][1]:.2f}x,"
                           f" defined in {bt['defined']:.0%} of resamples)")
        for fam, entry in report.get(f"learned_{key}", {}).items():
            for ref, label2 in (("amg", "AMG"), ("nucseg", "nucseg auto/grid")):
                v = entry.get(f"vs_{ref}")
                if v and v["ratio_at_equal_pq"] is not None:
                    out.append(f"  {fam}: {label2} front / {fam} front at PQ {v['equal_pq']:.3f} = "
                               f"{v['ratio_at_equal_pq']:.2f}x ({label})")
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    """Both fronts and every setting, PQ against wall time (left) and the process's CPU time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    style = {"amg": ("tab:red", "s", "SamAutomaticMaskGenerator (grid density)"),
             "nucseg": ("tab:blue", "o", "nucseg (prompts, pruning)")}
    res = report["results"]
    for ax, (key, tk, label) in zip(axes, (("wall", "s_per_tile", "wall"), ("cpu", "cpu_s_per_tile", "process CPU"))):
        h = report[key]
        for m, (color, marker, name) in style.items():
            ks = [k for k in res if res[k]["setting"]["method"] == m]
            ax.scatter([res[k][tk] for k in ks], [res[k]["pq"] for k in ks], c=color, marker=marker, alpha=0.45,
                       label=f"{name}, all settings")
            f = h["fronts"][m]
            ax.plot([res[k][tk] for k in f], [res[k]["pq"] for k in f], c=color, marker=marker, lw=2,
                    label=f"{m} Pareto front")
            for k in ks:
                s = res[k]["setting"]
                if m == "amg":
                    tag = str(s["points_per_side"])
                elif s["prompts"] == "grid":
                    tag = f"g{s['points_per_side']}"
                else:
                    tag = f"{s['points_per_side']}/{s['fg_threshold']:g}/{s['skip_margin']}"
                ax.annotate(tag, (res[k][tk], res[k]["pq"]), fontsize=7, xytext=(3, 3), textcoords="offset points",
                            color=color)
        colours = {"centers": ("tab:green", "^"), "none": ("tab:purple", "D"), "threshold": ("black", "x")}
        for fam, entry in report.get(f"learned_{key}", {}).items():
            color, marker = colours[fam]
            ks = [k for k in res if res[k]["setting"]["method"] == fam]
            ax.scatter([res[k][tk] for k in ks], [res[k]["pq"] for k in ks], c=color, marker=marker, alpha=0.45)
            ax.plot([res[k][tk] for k in entry["front"]], [res[k]["pq"] for k in entry["front"]], c=color,
                    marker=marker, lw=2, label=f"nucseg --prompts {fam}" if fam != "threshold" else "threshold segmenter")
        b = h["bootstrap"]
        ax.axhline(h["equal_pq"], color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"seconds per tile ({label}, 1 torch thread)")
        ax.set_title(f"{label}: {h['ratio_at_equal_pq']:.2f}x at PQ {h['equal_pq']:.3f} "
                     f"(bootstrap 95 %: {b['ci95'][0]:.2f}-{b['ci95'][1]:.2f}x)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("PQ (mean over tiles)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{report['tiles']['n']} held-out tiles of {report['tiles']['size']} px, {report['model']}; "
                 "labels: AMG points/side, nucseg g=grid points/side or points/fg threshold/skip margin", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


DEFAULT_AMG = "8,12,16,20,24,28,32"
DEFAULT_GRID = "8,12,16,24,32"
DEFAULT_AUTO = ("32:0.05:8,32:0.1:8,32:0.2:8,32:0.3:8,32:0.4:8,32:0.5:8,32:0.1:4,32:0.2:4,32:0.2:0,"
                "24:0.1:8,24:0.2:8,16:0.2:8,16:0.2:0")


def main() -> int:
    from nucseg.model.infer import InferConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SAMPLE / BENCH_ORGAN)
    ap.add_argument("--tiles", type=int, help="the first N held-out tiles (default: all of them)")
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--checkpoint", type=Path, help="base weights (of the adapter, or of --model)")
    ap.add_argument("--model", default="vit_tiny", help="without --adapter: vit_tiny|vit_b|...")
    ap.add_argument("--img-size", type=int, default=256, help="without --adapter: encoder input size")
    ap.add_argument("--amg-points", default=DEFAULT_AMG, help="AMG points per side, one setting each")
    ap.add_argument("--amg-batch", type=int, default=32,
                    help="AMG points_per_batch (32: fastest of 16-256 on this CPU, and the chunk nucseg decodes)")
    ap.add_argument("--nucseg-grid", default=DEFAULT_GRID, help="nucseg --prompts grid, points per side")
    ap.add_argument("--nucseg-auto", default=DEFAULT_AUTO,
                    help="nucseg --prompts auto settings, points_per_side:fg_threshold:skip_margin, comma-separated")
    ap.add_argument("--nucseg-centers", default="0.2:0,0.3:0,0.4:0,0.5:0,0.6:0,0.3:2,0.5:2",
                    help="--prompts centers settings (adapter with a centre head), centre_threshold:negative_prompts")
    ap.add_argument("--nucseg-none", default="0.5:0.5:0.5,0.4:0.5:0.3,0.5:0.6:0.3,0.6:0.4:0.4",
                    help="--prompts none settings (adapter with an instance head), foreground:centre:boundary")
    ap.add_argument("--threshold", action=argparse.BooleanOptionalAction, default=True,
                    help="also nucseg's classical threshold segmenter")
    ap.add_argument("--pred-iou-thresh", type=float, default=InferConfig.pred_iou_thresh)
    ap.add_argument("--stability-thresh", type=float, default=InferConfig.stability_thresh)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes (per tile: the fastest)")
    ap.add_argument("--pq-levels", default="0.40,0.41,0.42,0.43,0.435,0.44,0.445",
                    help="PQ levels at which the ratio is also reported (with bootstrap)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples over tiles")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed (and random-init seed without weights)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (recorded)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "amg_pareto_cpu.json")
    ap.add_argument("--plot", type=Path, default=RESULTS / "amg_pareto.png")
    args = ap.parse_args()

    from nucseg.threads import configure_threads

    configure_threads(args.threads)
    started = provenance()
    device = torch.device(args.device)
    mut = load_model(args.adapter, args.checkpoint, args.model, args.img_size, seed=args.seed)
    model = mut.model.to(device).eval()
    size = model.image_encoder.img_size
    tiles = load_tiles(args.data, args.tiles, size)
    settings = parse_settings(args.amg_points, args.nucseg_grid, args.nucseg_auto, args.amg_batch)
    from nucseg.model.heads import head_modes

    learned = {}  # the adapter's calibrated thresholds of the learned modes, for what a setting leaves unset
    if args.adapter:
        from nucseg.learn.calibrate import MODE_FIELDS, thresholds_to_infer
        from nucseg.model.adapter import read_adapter

        per_mode = read_adapter(args.adapter).mode_thresholds
        learned = {m: {k: v for k, v in thresholds_to_infer(t).items() if k in MODE_FIELDS[m]}
                   for m, t in per_mode.items() if m in ("centers", "none")}
    settings += parse_learned(args.nucseg_centers, args.nucseg_none, args.threshold, head_modes(model))
    if not any(s.method == "amg" for s in settings) or not any(s.method == "nucseg" for s in settings):
        raise SystemExit("need at least one AMG and one nucseg setting")
    base = dict(pred_iou_thresh=args.pred_iou_thresh, stability_thresh=args.stability_thresh)
    t0 = time.time()
    per = sweep(settings, model, tiles, base, device, mut.mpp, args.repeats,
                log=lambda msg: print(f"{msg}, {time.time() - t0:.0f} s", file=sys.stderr, flush=True),
                learned=learned)
    sweep_s = time.time() - t0
    groups = [t.stem for t in tiles]
    levels = [float(v) for v in args.pq_levels.split(",")] if args.pq_levels else []
    report = {
        "benchmark": "time per tile vs PQ: nucseg prompt settings vs SamAutomaticMaskGenerator grid densities",
        **started,
        "finished": provenance()["date"],
        "load_1min_end": provenance()["machine"]["load_1min"],
        "sweep_seconds": round(sweep_s, 1),
        "device": str(device),
        "model": mut.name,
        "weights": bench_weights(args.adapter, args.checkpoint),
        "tiles": {"data": str(args.data.relative_to(REPO.parent) if args.data.is_relative_to(REPO.parent) else args.data),
                  "held_out_images": HELD_OUT_IMAGES, "n": len(tiles), "size": size,
                  "names": [t.name for t in tiles],
                  "gt_nuclei_per_tile": round(float(np.mean([len(np.unique(t.labels)) - 1 for t in tiles])), 1)},
        "settings": {"filters": InferConfig(**base).to_dict(), "amg_points_per_batch": args.amg_batch,
                     "repeats": args.repeats, "tiles_per_call": 1,
                     "timing": "per tile the fastest of the repeats, after one warm-up tile per setting; "
                               "settings interleaved tile by tile"},
        "results": summarise(per),
        "wall": fronts_and_ratios(per, "wall_s", args.bootstrap, args.seed, groups, levels),
        "cpu": fronts_and_ratios(per, "cpu_s", args.bootstrap, args.seed, groups, levels),
        "learned_wall": learned_vs(per, "wall_s", args.bootstrap, args.seed, groups, levels),
        "learned_cpu": learned_vs(per, "cpu_s", args.bootstrap, args.seed, groups, levels),
        "learned_thresholds": learned,
        "per_tile": {k: {"wall_s": np.round(v["wall_s"], 4).tolist(), "cpu_s": np.round(v["cpu_s"], 4).tolist(),
                         **{m: np.round(v[m], 4).tolist() for m in METRICS}} for k, v in per.items()},
    }
    write_report(args.out, report)
    if args.plot:
        plot(report, args.plot)
    print(pareto_table(report))
    print(headline(report))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
