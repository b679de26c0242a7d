"""Calibrated thresholds: pick an adapter's automatic-segmentation thresholds on held-back annotated tiles.

The scale of a fine-tuned model's predicted IoU and stability depends on the model and on how long it
trained: global defaults made for official SAM can reject nearly every mask of a small model (PQ 0.003
where thresholds chosen for it give 0.25). As micro-sam does, the thresholds are grid-searched on validation
tiles to maximise a metric (PQ by default) and stored with the adapter (``nucseg.json`` key ``"thresholds"``),
and the inference commands use them unless told otherwise.

Cheap by construction: every tile is encoded, and every grid point decoded, **once**; each mask's predicted
IoU, stability, area and foreground probability are recorded, and each threshold setting only re-filters
those masks, removes duplicates and paints the label maps (no model call per setting). Decoding every grid
point is what ``prompts="grid"`` does; ``prompts="auto"`` skips second-round points that fall on accepted
masks, which would mostly be removed as duplicates anyway, so the estimate is close to, not identical with,
an ``auto`` run (the cv scores of a fold are always measured with a real run).

Search: the (predicted IoU, stability) pair jointly, then the foreground, NMS and min-area thresholds one at
a time, then one more pass over every parameter alone; a setting replaces the current one only if it scores
strictly higher, so ties keep the global defaults.

The learned modes (:mod:`nucseg.model.heads`) are calibrated the same way, each on its own fields
(:data:`MODE_FIELDS`): ``centers`` decodes every centre above the loosest centre threshold once (its
negative prompts are the nearest centres of that loosest set, so the estimate is close to, not identical with,
a run at a stricter threshold) and searches its centre threshold where ``auto`` searches the foreground one;
``none`` computes the instance maps once and re-runs only the watershed per setting (the seeds' centre and
boundary distances jointly, then the foreground threshold and min-area). An adapter stores the thresholds and
the score of each mode; inference defaults to the best-scoring one (:func:`choose_mode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..model.heads import watershed_instances
from ..model.infer import InferConfig, SamTileSegmenter, stability_from_counts, upsampled_counts
from .data import Tile
from .metrics import aji, binary_dice_iou, panoptic_quality, remove_ambiguous

# The InferConfig fields a calibration sets (and an adapter's "thresholds" may hold), with their ranges.
THRESHOLD_FIELDS = ("pred_iou_thresh", "stability_thresh", "fg_threshold", "nms_iou", "min_area")
# ... per prompt mode (auto and grid share THRESHOLD_FIELDS, the adapter's "thresholds")
MODE_FIELDS: dict[str, tuple[str, ...]] = {
    "auto": THRESHOLD_FIELDS,
    "grid": THRESHOLD_FIELDS,
    "centers": ("pred_iou_thresh", "stability_thresh", "center_threshold", "nms_iou", "min_area"),
    "none": ("ais_foreground", "ais_center", "ais_boundary", "min_area"),
}
ALL_FIELDS = tuple(dict.fromkeys(f for fields in MODE_FIELDS.values() for f in fields))
_GATE = {"auto": "fg_threshold", "centers": "center_threshold"}  # the per-prompt probability a mode filters on
_PAIR = {"none": ("ais_center", "ais_boundary")}  # searched jointly first (others: predicted IoU x stability)
METRICS = ("pq", "aji", "f1", "dice")
_RANGES: dict[str, tuple[float, float]] = {
    "pred_iou_thresh": (0.0, 1.0),
    "stability_thresh": (0.0, 1.0),
    "fg_threshold": (0.0, 1.0),
    "center_threshold": (0.0, 1.0),
    "ais_foreground": (0.0, 1.0),
    "ais_center": (0.0, 1.0),
    "ais_boundary": (0.0, 1.0),
    "nms_iou": (0.0, 1.0),  # > 0
    "min_area": (0.0, 1e6),  # integer pixels
    "score": (0.0, 1.0),
    "default_score": (0.0, 1.0),
    "tiles": (1.0, 1e9),  # integer
}
_INTEGERS = ("min_area", "tiles")


def validate_thresholds(d: object, where: str = "thresholds") -> dict:
    """Check an adapter's ``"thresholds"`` dict by type and range; returns it, raises InputError naming the key.

    Allowed keys (all optional except ``metric`` and ``score`` once any threshold is present): the
    :data:`THRESHOLD_FIELDS` (numbers: ``pred_iou_thresh``, ``stability_thresh``, ``fg_threshold`` in [0, 1],
    ``nms_iou`` in (0, 1], ``min_area`` an integer >= 0), ``metric`` (one of :data:`METRICS`), ``score`` and
    ``default_score`` (the metric with these thresholds and with the global defaults, in [0, 1]) and
    ``tiles`` (how many tiles they were chosen on, integer >= 1). Booleans are not numbers here.
    """
    if not isinstance(d, dict):
        raise InputError(f"{where} must be a JSON object, got {type(d).__name__}")
    allowed = set(ALL_FIELDS) | set(_RANGES) | {"metric"}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise InputError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    for key, value in d.items():
        if key == "metric":
            if value not in METRICS:
                raise InputError(f"{where}.metric must be one of {', '.join(METRICS)}, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{where}.{key} must be a finite number, got {value!r}")
        lo, hi = _RANGES[key]
        if not lo <= value <= hi or (key == "nms_iou" and value == 0):
            raise InputError(f"{where}.{key} = {value} is out of range [{lo:g}, {hi:g}]")
        if key in _INTEGERS and float(value) != int(value):
            raise InputError(f"{where}.{key} must be an integer, got {value}")
    if any(k in d for k in ALL_FIELDS) and not {"metric", "score"} <= set(d):
        raise InputError(f"{where} must say which metric chose it and its score ('metric', 'score')")
    return d


def thresholds_to_infer(d: dict) -> dict:
    """The InferConfig fields of a validated thresholds dict (``min_area`` as int)."""
    return {k: (int(d[k]) if k == "min_area" else float(d[k])) for k in ALL_FIELDS if k in d}


@dataclass
class CalibrationConfig:
    metric: str = "pq"
    # down to 0: a model trained briefly predicts low IoUs and stabilities for its good masks too
    pred_iou_thresh: Sequence[float] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    stability_thresh: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    fg_threshold: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5)
    nms_iou: Sequence[float] = (0.3, 0.45, 0.6, 0.75)
    min_area: Sequence[int] = (0, 6, 12, 24, 48)
    center_threshold: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    ais_foreground: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7)
    ais_center: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    ais_boundary: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    batch_size: int = 4  # tiles encoded together

    def validate(self) -> "CalibrationConfig":
        if self.metric not in METRICS:
            raise InputError(f"calibration metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        for name in ALL_FIELDS:
            grid = getattr(self, name)
            if not grid:
                raise InputError(f"calibration grid for {name} is empty")
            validate_thresholds({name: grid[0], "metric": self.metric, "score": 0.0})
            validate_thresholds({name: grid[-1], "metric": self.metric, "score": 0.0})
        return self


@dataclass
class _Candidates:
    """Every decoded grid mask of a batch of tiles that passes the loosest setting of the grid."""

    logits: torch.Tensor  # (M, L, L) low-res logits
    iou: torch.Tensor  # (M,) predicted IoU
    stability: torch.Tensor  # (M,)
    area: torch.Tensor  # (M,) pixels at tile resolution
    fg: torch.Tensor  # (M,) foreground (auto) or centre (centers) probability at the prompt; 1 without a head
    index: torch.Tensor  # (M,) tile within the batch
    b: int
    h: int
    w: int


@torch.no_grad()
def _candidates(seg: SamTileSegmenter, tiles: np.ndarray, cfg: CalibrationConfig) -> _Candidates:
    """Encode a batch once, decode every grid point once, record what the thresholds filter on."""
    b, h, w = tiles.shape[:3]
    x = torch.from_numpy(np.ascontiguousarray(tiles)).to(seg.device)
    emb = seg._encode(x)
    from ..model.fastdecode import prepare

    with seg._amp():
        ctx = prepare(seg.model, emb)
    if seg.cfg.prompts == "centers":  # every centre above the loosest threshold, decoded once
        coords, labels, index, fgv = seg.center_prompts(emb, h, w, threshold=min(cfg.center_threshold))
        logits, iou = seg._decode(ctx, coords, index, labels)
        return _filtered(seg, cfg, logits, iou, index, fgv, b, h, w)
    fg = seg.foreground_at_grid(emb)  # (B, G) or None
    g = len(seg.grid)
    index = torch.arange(b, device=seg.device).repeat_interleave(g)
    point = torch.arange(g, device=seg.device).repeat(b)
    fgv = torch.ones(b * g, device=seg.device) if fg is None else fg.reshape(-1)
    keep = fgv >= min(cfg.fg_threshold)
    index, point, fgv = index[keep], point[keep], fgv[keep]
    logits, iou = seg._decode(ctx, seg.grid[point], index)
    return _filtered(seg, cfg, logits, iou, index, fgv, b, h, w)


def _filtered(seg: SamTileSegmenter, cfg: CalibrationConfig, logits, iou, index, fgv, b, h, w) -> _Candidates:
    """The decoded masks that pass the loosest predicted-IoU, stability and area settings of the grid."""
    keep = iou >= min(cfg.pred_iou_thresh)
    logits, iou, index, fgv = logits[keep], iou[keep], index[keep], fgv[keep]
    off = seg.cfg.stability_offset
    counts = upsampled_counts(logits, (off, 0.0, -off), seg.tile_size // logits.shape[-1], h, w)
    stab = stability_from_counts(counts[:, 0], counts[:, 2])
    keep = (stab >= min(cfg.stability_thresh)) & (counts[:, 1] >= max(1, min(cfg.min_area)))
    return _Candidates(logits[keep], iou[keep], stab[keep], counts[keep, 1], fgv[keep], index[keep], b, h, w)


def _paint(seg: SamTileSegmenter, c: _Candidates, setting: dict) -> np.ndarray:
    """Label maps (b, h, w) of the candidates that pass ``setting`` (what the segmenter would paint)."""
    gate = _GATE.get(seg.cfg.prompts, "fg_threshold")
    ok = ((c.iou >= setting["pred_iou_thresh"]) & (c.stability >= setting["stability_thresh"])
          & (c.area >= setting["min_area"]) & (c.fg >= setting[gate]))
    cfg = replace(seg.cfg, **setting)
    return seg._paint(c.logits[ok], c.iou[ok], c.index[ok], c.b, c.h, c.w, cfg=cfg).labels


def metric_value(metric: str, gt: np.ndarray, pred: np.ndarray, ambiguous: np.ndarray | None) -> float:
    """One image's ``metric`` after NuInsSeg's ambiguous-area rule (as :func:`nucseg.learn.metrics.score_image`)."""
    if ambiguous is not None:
        gt, pred = remove_ambiguous(gt, pred, ambiguous)
    if metric in ("pq", "f1"):
        return float(panoptic_quality(gt, pred)[metric])
    if metric == "aji":
        return float(aji(gt, pred))
    return float(binary_dice_iou(gt, pred)[0])


@dataclass
class CalibrationResult:
    thresholds: dict  # the "thresholds" dict stored in nucseg.json (validated)
    evaluated: int  # settings scored
    seconds: float


def calibrate(seg: SamTileSegmenter, tiles: list[Tile], cfg: CalibrationConfig | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> CalibrationResult:
    """Grid-search ``seg``'s thresholds for its prompt mode on annotated ``tiles``; ``seg.cfg`` supplies
    everything else.

    The starting point (and the tie-breaker) is ``seg.cfg``'s own values, normally the global defaults.
    ``on_progress(done, total)`` is called after each batch of tiles is decoded.
    """
    import time

    t0 = time.perf_counter()
    cfg = (cfg or CalibrationConfig()).validate()
    if not tiles:
        raise InputError("calibration needs at least one annotated tile")
    mode = seg.cfg.prompts
    fields = MODE_FIELDS[mode]
    groups: dict[tuple, list[Tile]] = {}
    for t in tiles:
        groups.setdefault(t.image.shape, []).append(t)
    batches: list[tuple[object, list[Tile]]] = []
    total = len(tiles)
    for same in groups.values():
        for s in range(0, len(same), cfg.batch_size):
            chunk = same[s : s + cfg.batch_size]
            images = np.stack([t.image for t in chunk])
            batches.append((_maps(seg, images) if mode == "none" else _candidates(seg, images, cfg), chunk))
            if on_progress:
                on_progress(sum(len(c) for _, c in batches), total)

    def labels_of(cand, setting: dict) -> np.ndarray:
        if mode == "none":
            return watershed_instances(cand, setting["ais_foreground"], setting["ais_center"],
                                       setting["ais_boundary"], int(setting["min_area"]))[0]
        return _paint(seg, cand, setting)

    cache: dict[tuple, float] = {}

    def score(setting: dict) -> float:
        key = tuple(setting[k] for k in fields)
        if key not in cache:
            vals = []
            for cand, chunk in batches:
                for t, pred in zip(chunk, labels_of(cand, setting)):
                    vals.append(metric_value(cfg.metric, t.labels, pred, t.ambiguous))
            cache[key] = float(np.mean(vals))
        return cache[key]

    start = {k: getattr(seg.cfg, k) for k in fields}
    best, best_score = dict(start), score(start)
    default_score = best_score

    def try_all(settings: list[dict]) -> None:
        nonlocal best, best_score
        for s in settings:
            v = score(s)
            if v > best_score + 1e-12:
                best, best_score = s, v

    a, b = _PAIR.get(mode, ("pred_iou_thresh", "stability_thresh"))
    try_all([{**best, a: i, b: j} for i in getattr(cfg, a) for j in getattr(cfg, b)])
    gate = _GATE.get(mode)
    has_gate = gate == "center_threshold" or (gate == "fg_threshold" and getattr(seg.model, "fg_head", None) is not None)
    rest = [k for k in fields if k not in (a, b) and (k not in _GATE.values() or (has_gate and k == gate))]
    for _ in range(2):
        for name in rest + [a, b]:
            try_all([{**best, name: v} for v in getattr(cfg, name)])
    thresholds = {**{k: (int(best[k]) if k == "min_area" else float(best[k])) for k in fields},
                  "metric": cfg.metric, "score": round(best_score, 6), "default_score": round(default_score, 6),
                  "tiles": len(tiles)}
    return CalibrationResult(validate_thresholds(thresholds), len(cache), time.perf_counter() - t0)


@torch.no_grad()
def _maps(seg: SamTileSegmenter, tiles: np.ndarray) -> np.ndarray:
    """``prompts="none"``: the instance head's maps of a batch, computed once for every setting."""
    x = torch.from_numpy(np.ascontiguousarray(tiles)).to(seg.device)
    return seg.instance_maps(x, seg._encode(x), *tiles.shape[1:3])


def choose_mode(explicit: str | None, mode_thresholds: dict | None, modes: list[str] | None = None
                ) -> tuple[str, str]:
    """The prompt mode a run uses, and why (one phrase for the terminal): ``explicit`` (the command line),
    else the adapter's best calibrated mode (``mode_thresholds``: mode -> thresholds with their score, of the
    ``modes`` it supports; a tie keeps auto), else InferConfig's default."""
    if explicit:
        return explicit, "--prompts"
    default = InferConfig().prompts
    scored = {m: t for m, t in (mode_thresholds or {}).items()
              if t and "score" in t and (modes is None or m in modes)}
    if len(scored) < 2:
        return default, "the default" + (" (the adapter has no calibrated learned mode)" if modes and
                                        len(modes) > 2 else "")
    metric = scored.get(default, next(iter(scored.values())))["metric"]
    scored = {m: t for m, t in scored.items() if t["metric"] == metric}
    order = [default] + [m for m in scored if m != default]
    best = max(order, key=lambda m: (scored[m]["score"] if m in scored else -1.0, -order.index(m)))
    others = ", ".join(f"{m} {scored[m]['score']:.3f}" for m in order if m in scored)
    tiles = scored[best].get("tiles")
    return best, (f"the adapter's best calibrated mode ({metric} {others}"
                  + (f" on {tiles} held-back tiles" if tiles else "") + "; --prompts overrides)")


def split_for_calibration(tiles: list[Tile], fraction: float, seed: int) -> tuple[list[Tile], list[Tile]]:
    """(training tiles, held-back calibration tiles): ``fraction`` of the source images, at least one, held
    back whole (tiles of one image never straddle both); no split (empty calibration set) when ``fraction``
    is 0 or there are fewer than 2 images."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"--calibration-fraction must be in [0, 1), got {fraction}")
    stems = sorted({t.stem for t in tiles})
    if fraction == 0 or len(stems) < 2:
        return list(tiles), []
    n = min(len(stems) - 1, max(1, round(fraction * len(stems))))
    held = set(np.random.default_rng([seed, 7]).choice(stems, n, replace=False).tolist())
    return [t for t in tiles if t.stem not in held], [t for t in tiles if t.stem in held]


def resolve_infer(explicit: dict, thresholds: dict | None, mode_thresholds: dict | None = None,
                  modes: list[str] | None = None) -> tuple[InferConfig, dict]:
    """The inference settings: ``explicit`` ones (the command line) over the adapter's calibrated
    thresholds of the prompt mode used over InferConfig's global defaults. Also returns, for each threshold
    field of that mode, the value used and where it came from (``"command line"``, ``"adapter"`` or
    ``"default"``), for the run summary.

    ``thresholds``: the adapter's auto / grid thresholds; ``mode_thresholds``: those of every calibrated mode
    (:attr:`nucseg.model.adapter.AdapterInfo.mode_thresholds`). Without an explicit ``prompts`` the mode is
    the adapter's best calibrated one (:func:`choose_mode`).
    """
    per_mode = {**({"auto": thresholds} if thresholds else {}), **(mode_thresholds or {})}
    mode, _ = choose_mode(explicit.get("prompts"), per_mode, modes)
    own = thresholds if mode in ("auto", "grid") else (mode_thresholds or {}).get(mode)
    from_adapter = {k: v for k, v in thresholds_to_infer(own or {}).items() if k in MODE_FIELDS[mode]}
    cfg = InferConfig(**{**from_adapter, **explicit, "prompts": mode})
    used = {k: {"value": getattr(cfg, k),
                "source": "command line" if k in explicit else "adapter" if k in from_adapter else "default"}
            for k in MODE_FIELDS[mode]}
    return cfg, used


def describe_thresholds(used: dict) -> str:
    """One line for the terminal: ``pred_iou_thresh 0.3 (adapter), ...``, in THRESHOLD_FIELDS order whatever the
    dict's order (cv's summary.md reads resumed folds back from JSON written with sorted keys)."""
    order = {k: i for i, k in enumerate(ALL_FIELDS)}
    items = sorted(used.items(), key=lambda kv: order.get(kv[0], len(order)))
    return ", ".join(f"{k} {v['value']:g} ({v['source']})" for k, v in items)
