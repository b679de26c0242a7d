"""Tile inference shared by cv, eval, segment and predict: a batch of tiles -> instance label maps.

Automatic prompting, as SAM's automatic mask generator, but built for dense nuclei and batches:

1. encode the whole batch once at the native tile size;
2. a regular point grid per tile (``points_per_side``²); with ``prompts="auto"`` it is pruned before any
   decoding: points where the adapter's foreground map says no nucleus can be are dropped, then the grid is
   decoded in two rounds (every other point first) and second-round points inside or within ``skip_margin``
   pixels of an accepted mask are skipped, since they would only find the same nucleus again (or a fragment
   of its border);
3. all surviving prompts of all tiles go through the decoder together, in chunks of ``decoder_batch``,
   on the decoder fast path of :mod:`nucseg.model.fastdecode` (same outputs as segment-anything's decoder);
4. masks are kept if their predicted IoU and their stability at tile resolution pass thresholds, duplicates
   are removed by box NMS, and the label maps are painted best-score first (a pixel belongs to the first
   mask that claims it); masks left with less than ``min_keep`` of their own area were overlapping
   duplicates and are dropped. Stability and painting upsample each mask only inside a window around its
   box, not over the whole tile (a nucleus covers well under 1 % of a tile).

Two learned modes replace the grid (:mod:`nucseg.model.heads`, heads stored in the adapter):
``prompts="centers"`` decodes one point per nucleus predicted by the adapter's centre head (optionally with
the ``negative_prompts`` nearest other centres as negative points), then steps 3-4 as above;
``prompts="none"`` calls no decoder: the instance head's foreground / centre / boundary-distance maps are
split into nuclei by a seeded watershed.

Everything is array arithmetic over all masks of all tiles; there is no Python loop over nuclei or tiles.
Out of memory (CUDA, or a CPU allocation failure), the decoder chunk is halved, or the tile batch split for
the encoder, with one warning, and the work goes on with the smaller size.
"""

from __future__ import annotations

import math

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torchvision.ops import batched_nms

from ..errors import InputError
from ..segmenter import TileBatchResult
from .fastdecode import ImageContext, decode_points, prepare
from .heads import CENTER_HEAD, INSTANCE_HEAD, center_points, instance_maps, negative_points, watershed_instances
from .sam import encode

from ..choices import PROMPT_MODES  # noqa: F401 - defined there for the CLI

HEAD_OF_MODE = {"centers": CENTER_HEAD, "none": INSTANCE_HEAD}  # the adapter head each learned mode needs
# On CPU the decoder is memory-bound: chunks whose per-prompt image tokens fit in about this many bytes stay
# in cache (vit_tiny at 256 px: 32 prompts per call, vit_b at 512 px: 2; bench/bench_decoder.py measured
# 1.2-2x less time per prompt at 4-16 prompts than at 512 on CPU). ``decoder_batch`` stays the upper bound.
CPU_DECODER_BYTES = 2 << 20
SIZE_STEP = 4  # window sides are multiples of this many low-res pixels (see upsampled_windows)
T = TypeVar("T")


@dataclass
class InferConfig:
    points_per_side: int = 32  # 16 px spacing on a 512 px tile: every nucleus gets at least one point
    prompts: str = "auto"  # "auto" prunes (foreground map + in-mask skipping), "grid" decodes every point
    fg_threshold: float = 0.2  # foreground probability below which a grid point is skipped
    skip_margin: int = 8  # second-round points within this many pixels of an accepted mask are skipped too
    # (both chosen on validation tiles with bench/sweep_pruning.py; docs/PERFORMANCE.md)
    pred_iou_thresh: float = 0.5
    stability_thresh: float = 0.8
    stability_offset: float = 1.0
    nms_iou: float = 0.6
    min_area: int = 12  # pixels at tile resolution
    min_keep: float = 0.5  # fraction of its own area a mask must keep after painting
    multimask: bool = False  # zero-shot SAM needs its 3 ambiguity masks; fine-tuned decoders need one
    decoder_batch: int = 512  # prompts per decoder call (memory knob)
    bf16: bool = True  # on CUDA
    # prompts="centers": centre-head probability a cell needs to become a prompt, the point-NMS distance (px)
    # and how many nearest other centres go in as negative points
    center_threshold: float = 0.5
    center_nms_px: int = 6
    negative_prompts: int = 0
    # prompts="none": seeded watershed on the instance head's maps (micro-sam's AIS thresholds): foreground
    # probability, and the seeds' centre distance below / boundary distance above these
    ais_foreground: float = 0.5
    ais_center: float = 0.5
    ais_boundary: float = 0.5

    def validate(self) -> "InferConfig":
        if self.prompts not in PROMPT_MODES:
            raise InputError(f"--prompts must be one of {', '.join(PROMPT_MODES)}")
        if self.points_per_side < 1 or self.decoder_batch < 1:
            raise InputError("--points-per-side and --decoder-batch must be >= 1")
        if self.skip_margin < 0:
            raise InputError("skip_margin must be >= 0")
        for name, hi in (("negative_prompts", 64), ("center_nms_px", 1 << 12)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
                raise InputError(f"--{name.replace('_', '-')} must be a whole number in [0, {hi}], not {value!r}")
        # predicted IoU is a regression output (an untrained head strays outside [0, 1]): any finite bound
        for name, lo, hi in (("pred_iou_thresh", -math.inf, math.inf), ("stability_thresh", 0, 1), ("nms_iou", 0, 1),
                             ("center_threshold", 0, 1), ("ais_foreground", 0, 1), ("ais_center", 0, 1),
                             ("ais_boundary", 0, 1)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
                raise InputError(f"--{name.replace('_', '-')} must be a finite number in [{lo}, {hi}], not {value!r}")
        if self.min_area < 0:
            raise InputError(f"--min-area must be >= 0, not {self.min_area!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def grid_points(size: int, n: int) -> torch.Tensor:
    """(n*n, 2) xy cell centres of an n x n grid over a size x size tile (as SAM's build_point_grid)."""
    c = (torch.arange(n, dtype=torch.float32) + 0.5) * size / n
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.ravel(), yy.ravel()], 1)


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks thresholded at threshold±offset: high when the mask edge is sharp."""
    hi = (logits > threshold + offset).flatten(1).sum(1)
    lo = (logits > threshold - offset).flatten(1).sum(1)
    return stability_from_counts(hi, lo)


def stability_from_counts(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Stability from the pixel counts above threshold+offset (``hi``) and threshold-offset (``lo``)."""
    hi, lo = hi.float(), lo.float()
    return torch.where(lo > 0, hi / lo.clamp(min=1), torch.zeros_like(lo))


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes (exclusive max) of (N, H, W) boolean masks."""
    n, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values + 1
    x0 = torch.where(cols, ar_w, w).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values + 1
    return torch.stack([x0, y0, x1, y1], 1).float()


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError saying memory ran out (CPU allocator, MPS)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def upsampled_windows(logits: torch.Tensor, boxes: torch.Tensor, scale: int, budget: int = 1 << 24
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Bilinear ``scale``x upsampling (align_corners=False) of low-res logits (M, L, L), window by window.

    Yields ``(sel, top, left, up)``: mask indices (k,), the full-resolution origin of each window (k,) (may be
    negative: windows extend one low-res pixel past the tile border) and the upsampled logits (k, S, S).

    Why windows: a nucleus covers a few hundred of a tile's 262,144 pixels, so upsampling whole masks (what
    SAM's automatic mask generator does for every prompt) is almost all wasted work. Each window is the mask's
    low-res ``boxes`` (xyxy, exclusive max, enclosing every logit above the lowest threshold the caller will
    apply) plus a 1-pixel margin: outside the box every logit is at or below that threshold, so the window's
    clamped edges agree with the full upsampling wherever a value can exceed it. The logits are
    replicate-padded (what bilinear interpolation does at the tile border). Windows share a side per size
    class (multiples of ``SIZE_STEP`` low-res pixels), so one large mask does not enlarge all the others,
    and are processed in chunks of at most ``budget`` upsampled pixels.
    """
    m, low = logits.shape[0], logits.shape[-1]
    if m == 0:
        return
    device = logits.device
    padded = F.pad(logits[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0]
    x0, y0 = boxes[:, 0].long(), boxes[:, 1].long()
    extent = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).long().clamp(min=0) + 2
    sides = (-(-extent // SIZE_STEP) * SIZE_STEP).clamp(max=low + 2)
    for side in torch.unique(sides).tolist():  # a few dozen size classes at most, not a loop over masks
        ar = torch.arange(side, device=device)
        members = (sides == side).nonzero(as_tuple=True)[0]
        for sel in members.split(max(1, budget // (side * scale) ** 2)):
            wy = y0[sel].clamp(0, low + 2 - side)  # padded coordinates: the box starts at y0 + 1
            wx = x0[sel].clamp(0, low + 2 - side)
            win = padded[sel[:, None, None], (wy[:, None] + ar)[:, :, None], (wx[:, None] + ar)[:, None, :]]
            up = F.interpolate(win[:, None], scale_factor=scale, mode="bilinear", align_corners=False)[:, 0]
            yield sel, (wy - 1) * scale, (wx - 1) * scale, up


def upsampled_counts(logits: torch.Tensor, thresholds: tuple[float, ...], scale: int, h: int, w: int) -> torch.Tensor:
    """(M, T) pixels of each mask's ``scale``x upsampling, cropped to h x w, above each of T thresholds.

    These are the full-resolution areas SAM's automatic mask generator measures stability and size on;
    computed here in windows (:func:`upsampled_windows`) instead of on whole upsampled masks.
    """
    counts = torch.zeros(logits.shape[0], len(thresholds), dtype=torch.long, device=logits.device)
    boxes = mask_boxes(logits > min(thresholds))
    for sel, top, left, up in upsampled_windows(logits, boxes, scale):
        ar = torch.arange(up.shape[-1], device=up.device)
        rows = ((top[:, None] + ar) >= 0) & ((top[:, None] + ar) < h)
        cols = ((left[:, None] + ar) >= 0) & ((left[:, None] + ar) < w)
        up = up.masked_fill_(~(rows[:, :, None] & cols[:, None, :]), float("-inf"))  # outside the tile
        counts[sel] = torch.stack([(up > t).flatten(1).sum(1) for t in thresholds], 1)
    return counts


def paint_claims(logits: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor, b: int, h: int, w: int,
                 scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint low-res mask logits (M, L, L), ranked best-first, into ``b`` label maps of h x w at ``scale``x.

    ``boxes`` are the masks' low-res boxes of logits > 0 and ``index`` (M,) their tiles. Returns ``claim``
    (b*h*w,) the rank of the first mask covering each pixel (M where none) and ``area`` (M,) each mask's own
    pixel count, exactly as upsampling every whole mask and cropping it to h x w would give them.
    """
    m = logits.shape[0]
    claim = torch.full((b * h * w,), m, dtype=torch.long, device=logits.device)
    area = torch.zeros(m, dtype=torch.long, device=logits.device)
    for sel, top, left, up in upsampled_windows(logits, boxes, scale):
        k, yy, xx = (up > 0).nonzero(as_tuple=True)
        ys, xs = top[k] + yy, left[k] + xx
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        rank = sel[k[inside]]
        flat = (index[rank] * h + ys[inside]) * w + xs[inside]
        claim.scatter_reduce_(0, flat, rank, reduce="amin")
        area += torch.bincount(rank, minlength=m)
    return claim, area


class SamTileSegmenter:
    """A :class:`nucseg.segmenter.TileSegmenter` backed by a (fine-tuned) SAM."""

    def __init__(self, model: Sam, cfg: InferConfig | None = None, device: str | torch.device = "cpu",
                 mpp: float | None = None, identity: str = ""):
        """``identity`` names the weights (base fingerprint + adapter hash); with the settings it forms
        ``fingerprint``, which keys the whole-slide prediction cache so that stale predictions are never reused."""
        self.cfg = (cfg or InferConfig()).validate()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        head = HEAD_OF_MODE.get(self.cfg.prompts)
        if head is not None and getattr(model, head, None) is None:
            raise InputError(f"--prompts {self.cfg.prompts} needs an adapter trained with its head ({head}); this "
                             f"model has none: use --prompts auto or grid, or train an adapter with nucseg train")
        self.tile_size = model.image_encoder.img_size
        self.mpp = mpp
        self.grid = grid_points(self.tile_size, self.cfg.points_per_side).to(self.device)
        self.stats = {"tiles": 0, "prompts_grid": 0, "prompts_decoded": 0, "decoder_calls": 0}
        # seconds per stage, filled only when ``profile`` is set (benchmarks): on CUDA each stage is synchronised
        self.profile = False
        self.timings = {"encoder": 0.0, "heads": 0.0, "decoder": 0.0, "post": 0.0}
        self._last_tick = 0.0
        # {field: {"value", "source"}} for the run summary; set by whoever resolved the thresholds
        # (nucseg.learn.calibrate.resolve_infer: command line > adapter > default)
        self.thresholds_used: dict | None = None
        self.prompt_mode: tuple[str, str] | None = None  # (mode, why it was chosen), set by sam_segmenter
        settings = json.dumps(self.cfg.to_dict(), sort_keys=True)
        self.fingerprint = hashlib.sha256(f"{identity}|{self.tile_size}|{settings}".encode()).hexdigest()
        self.identity = identity
        # Work sizes: cache-sized decoder chunks on CPU, halved on out-of-memory and kept small afterwards. Not
        # part of the fingerprint: results do not depend on them.
        self.decoder_chunk = self.cfg.decoder_batch
        if self.device.type == "cpu":
            tokens = (self.tile_size // 16) ** 2 * model.prompt_encoder.embed_dim * 4
            self.decoder_chunk = max(1, min(self.cfg.decoder_batch, CPU_DECODER_BYTES // tokens))
        self.encoder_chunk: int | None = None  # None: the whole batch at once
        self._warned_oom = False

    @property
    def provenance(self) -> dict:
        """What the whole-slide outputs record about the model (nucseg.wsi.predict.provenance): the weights'
        identity (for an adapter: ``<base checkpoint fingerprint>+<adapter weights SHA-256>``), the tile size,
        µm/px, and every inference setting (prompting, IoU / stability thresholds, NMS)."""
        base, _, adapter = str(self.identity).partition("+")
        return {"type": "sam", "weights": self.identity, "base_fingerprint": base,
                "adapter_sha256": adapter or None, "tile_size": int(self.tile_size), "mpp": self.mpp,
                "fingerprint": self.fingerprint, "settings": self.cfg.to_dict()}

    @property
    def autocast(self) -> bool:
        return self.device.type == "cuda" and self.cfg.bf16

    def _amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    # -- memory --------------------------------------------------------------------------------------
    def _shrunk(self, err: BaseException, what: str, size: int) -> int:
        """The halved work size after an out-of-memory ``err``; re-raises if it cannot shrink further."""
        if not is_out_of_memory(err) or size <= 1:
            raise err
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self._warned_oom:
            warnings.warn(f"out of memory on {self.device}: halving the {what} ({size} -> {size // 2}) and "
                          "continuing; later batches use the smaller size", RuntimeWarning, stacklevel=4)
            self._warned_oom = True
        return size // 2

    def _chunked(self, n: int, attr: str, what: str, run: Callable[[int, int], T]) -> list[T]:
        """``run(start, stop)`` over [0, n) in chunks of ``self.<attr>`` (None: all n), halving it on OOM.

        ``what`` names that size in the warning.
        """
        out: list[T] = []
        start = 0
        while start < n:
            size = getattr(self, attr) or n
            try:
                out.append(run(start, min(start + size, n)))
            except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
                setattr(self, attr, self._shrunk(err, what, min(size, n - start)))
                continue
            start += size
        return out

    # -- encoding / decoding -------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        def run(s: int, e: int) -> torch.Tensor:
            with self._amp():
                return encode(self.model, x[s:e])

        return torch.cat(self._chunked(len(x), "encoder_chunk", "encoder batch", run))

    def _tick(self, stage: str | None = None) -> None:
        """With ``profile``: add the time since the last tick to ``timings[stage]``."""
        if not self.profile:
            return
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if stage is not None:
            self.timings[stage] += now - self._last_tick
        self._last_tick = now

    def _decode(self, ctx: ImageContext, points: torch.Tensor, index: torch.Tensor,
                labels: torch.Tensor | None = None):
        """Decode points of tiles ``index`` in chunks -> low-res logits (N, h, w) float, iou (N,).

        ``points`` (N, 2), one positive point each, or (N, K, 2) with SAM point ``labels`` (N, K)."""
        self.stats["prompts_decoded"] += len(points)
        if len(points) == 0:
            low = self.tile_size // 4
            return torch.zeros(0, low, low, device=self.device), torch.zeros(0, device=self.device)

        def run(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
            self.stats["decoder_calls"] += 1
            extra = {} if labels is None else {"labels": labels[s:e]}  # single positive points: the plain call
            with self._amp():
                lg, iou = decode_points(self.model, ctx, points[s:e], index[s:e], multimask=self.cfg.multimask, **extra)
            best = iou.argmax(1)  # with multimask, SAM's most confident of its 3 ambiguity masks
            ar = torch.arange(e - s, device=self.device)
            return lg[ar, best].float(), iou[ar, best].float()

        parts = self._chunked(len(points), "decoder_chunk", "decoder chunk", run)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _accept(self, logits: torch.Tensor, iou: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Predicted IoU, then stability and area of the mask at tile resolution (cropped to h x w).

        Stability is measured on the upsampled mask, as SAM's automatic mask generator does: on the 4x
        coarser decoder output a nucleus is a few pixels wide and its stability mostly noise (PQ 0.38 vs
        0.43 on the benchmark tiles, docs/PERFORMANCE.md).
        """
        ok = iou >= self.cfg.pred_iou_thresh
        cand = ok.nonzero(as_tuple=True)[0]
        off = self.cfg.stability_offset
        counts = upsampled_counts(logits[cand], (off, 0.0, -off), self.tile_size // logits.shape[-1], h, w)
        stab = stability_from_counts(counts[:, 0], counts[:, 2])
        ok[cand] = (stab >= self.cfg.stability_thresh) & (counts[:, 1] >= self.cfg.min_area)
        return ok

    def foreground_at_grid(self, emb: torch.Tensor) -> torch.Tensor | None:
        """(B, G) foreground probability at each grid point, or None when pruning is off or there is no head."""
        head = getattr(self.model, "fg_head", None)
        if self.cfg.prompts != "auto" or head is None:
            return None
        with self._amp():
            fg = torch.sigmoid(head(emb).float())  # (B, 1, h, w)
        # the probability at the point itself: a prompt off every nucleus decodes nothing useful, so
        # dilating the map (as an earlier version did) only adds prompts
        norm = self.grid / self.tile_size * 2 - 1
        val = F.grid_sample(fg, norm[None, None].expand(emb.shape[0], -1, -1, -1), align_corners=False)
        return val[:, 0, 0]

    def _prompts(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, G) boolean: which grid points of each tile are worth decoding at all."""
        b, g = emb.shape[0], len(self.grid)
        keep = torch.ones(b, g, dtype=torch.bool, device=self.device)
        fg = self.foreground_at_grid(emb)
        if fg is not None:
            keep &= fg >= self.cfg.fg_threshold
        return keep

    def center_prompts(self, emb: torch.Tensor, h: int, w: int, threshold: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``prompts="centers"``: (points (N, 1+K, 2), SAM labels (N, 1+K), tile index (N,), centre probability
        (N,)) from the centre head, one positive point per predicted nucleus centre of the h x w tiles, at
        ``threshold`` (default the config's)."""
        with self._amp():
            out = getattr(self.model, CENTER_HEAD)(emb)
        pts, index, prob = center_points(out, self.cfg.center_threshold if threshold is None else threshold,
                                         self.cfg.center_nms_px, valid=(h, w))
        coords, labels = negative_points(pts, index, self.cfg.negative_prompts)
        return coords, labels, index, prob

    def instance_maps(self, x: torch.Tensor, emb: torch.Tensor, h: int, w: int) -> np.ndarray:
        """``prompts="none"``: the instance head's (B, 3, h, w) foreground / centre / boundary maps (numpy)."""
        size = self.tile_size
        img = F.pad(x.permute(0, 3, 1, 2).float(), (0, size - w, 0, size - h))  # padded as encode pads
        with self._amp():
            out = getattr(self.model, INSTANCE_HEAD)(emb, img)
        return instance_maps(out, (h, w)).cpu().numpy()

    @torch.no_grad()
    def __call__(self, tiles: np.ndarray) -> TileBatchResult:
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise InputError(f"expected (B, H, W, 3) RGB tiles, got {tiles.shape}")
        b, h, w = tiles.shape[:3]
        x = torch.from_numpy(np.ascontiguousarray(tiles))
        if self.device.type == "cuda":  # asynchronous from the pinned buffers nucseg.wsi.predict reads tiles into
            x = x.to(self.device, non_blocking=x.is_pinned())
        self._tick()
        emb = self._encode(x)
        self._tick("encoder")
        self.stats["tiles"] += b
        if self.cfg.prompts == "none":
            maps = self.instance_maps(x, emb, h, w)
            self._tick("heads")
            c = self.cfg
            labels, scores = watershed_instances(maps, c.ais_foreground, c.ais_center, c.ais_boundary, c.min_area)
            self._tick("post")
            return TileBatchResult(labels, scores)
        if self.cfg.prompts == "centers":
            coords, labels, index, _ = self.center_prompts(emb, h, w)
            self._tick("heads")
            with self._amp():
                ctx = prepare(self.model, emb)
            logits, iou = self._decode(ctx, coords, index, labels)
            self._tick("decoder")
            ok = self._accept(logits, iou, h, w)
            out = self._paint(logits[ok], iou[ok], index[ok], b, h, w)
            self._tick("post")
            return out
        with self._amp():
            ctx = prepare(self.model, emb)
        keep = self._prompts(emb)
        self._tick("heads")
        n = self.cfg.points_per_side
        self.stats["prompts_grid"] += b * len(self.grid)
        if self.cfg.prompts == "auto":
            yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            first = ((yy % 2 == 0) & (xx % 2 == 0)).ravel().to(self.device)
            rounds = [keep & first, keep & ~first]
        else:
            rounds = [keep]
        all_logits, all_iou, all_index = [], [], []
        low_res = self.tile_size // 4
        covered = torch.zeros(b, low_res, low_res, dtype=torch.int32, device=self.device)
        for r, sel in enumerate(rounds):
            if r > 0:  # skip points inside (or within skip_margin of) an accepted mask of this tile
                near = covered[:, None].float()
                grow = -(-self.cfg.skip_margin // 4)  # in low-res (4 px) cells
                if grow:
                    near = F.max_pool2d(near, 2 * grow + 1, stride=1, padding=grow)
                cell = (self.grid // 4).long().clamp(max=low_res - 1)
                sel = sel & ~(near[:, 0, cell[:, 1], cell[:, 0]] > 0)
            index, point = sel.nonzero(as_tuple=True)
            logits, iou = self._decode(ctx, self.grid[point], index)
            self._tick("decoder")
            ok = self._accept(logits, iou, h, w)
            logits, iou, index = logits[ok], iou[ok], index[ok]
            if len(index):
                covered.index_add_(0, index, (logits > 0).to(torch.int32))
            all_logits.append(logits)
            all_iou.append(iou)
            all_index.append(index)
            self._tick("post")
        out = self._paint(torch.cat(all_logits), torch.cat(all_iou), torch.cat(all_index), b, h, w)
        self._tick("post")
        return out

    def _paint(self, logits, iou, index, b, h, w, cfg: InferConfig | None = None) -> TileBatchResult:
        """NMS, then best-first painting of all tiles at once, with consecutive ids per tile.

        ``cfg`` (default ``self.cfg``) supplies nms_iou, min_keep and min_area (calibration varies them)."""
        cfg = cfg or self.cfg
        if len(index) == 0:
            return TileBatchResult(np.zeros((b, h, w), np.int32), [np.zeros(0, np.float32) for _ in range(b)])
        scale = self.tile_size // logits.shape[-1]
        boxes = mask_boxes(logits > 0)
        kept = batched_nms(boxes * scale, iou, index, cfg.nms_iou)  # sorted by score, descending
        logits, iou, index, boxes = logits[kept], iou[kept], index[kept], boxes[kept]
        claim, area = paint_claims(logits, boxes, index, b, h, w, scale)
        m = len(index)
        claimed = claim < m
        kept_area = torch.bincount(claim[claimed], minlength=m)
        good = (kept_area >= cfg.min_keep * area) & (kept_area >= cfg.min_area)
        # ids 1..k per tile in score order: rank among the tile's good masks
        per_tile = torch.bincount(index, weights=good.float(), minlength=b).long()
        offset = torch.cumsum(per_tile, 0) - per_tile
        order = torch.argsort(index, stable=True)  # tile-major, best-first within a tile
        new_id = torch.zeros(m, dtype=torch.long, device=logits.device)
        new_id[order] = torch.cumsum(good[order].long(), 0) - offset[index[order]]
        new_id = new_id * good
        lab = torch.where(claimed, new_id[claim.clamp(max=m - 1)], torch.zeros_like(claim))
        labels = lab.view(b, h, w).to(torch.int32).cpu().numpy()
        kept_scores = iou[order][good[order]].float().cpu().numpy().astype(np.float32)
        scores = np.split(kept_scores, np.cumsum(per_tile.cpu().numpy())[:-1])
        return TileBatchResult(labels, scores)


def segment_tiles(segmenter: SamTileSegmenter, images: list[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
    """Label maps for a list of images of possibly different sizes.

    Images up to the model input of the same shape are batched together (in input order within a shape), so a
    set of mixed sizes does not fall back to one tile per model call. Larger images go through the seam-correct
    overlapping grid and stitcher that whole slides use (:func:`nucseg.wsi.stitch.stitch_image`).
    """
    from ..wsi.stitch import stitch_image

    out: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        if max(im.shape[:2]) > segmenter.tile_size:
            out[i] = stitch_image(segmenter, im, batch_size=batch_size).astype(np.int32)
            continue
        groups.setdefault(im.shape, []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            for i, lab in zip(chunk, segmenter(np.stack([images[i] for i in chunk])).labels):
                out[i] = lab
    return out
