"""Tile inference shared by cv, eval, segment and predict: a batch of tiles -> instance label maps.

Automatic prompting, as SAM's automatic mask generator, but built for dense nuclei and batches:

1. encode the whole batch once at the native tile size;
2. a regular point grid per tile (``points_per_side``²); with ``prompts="auto"`` it is pruned before any
   decoding: points where the adapter's foreground map says no nucleus can be are dropped, then the grid is
   decoded in two rounds (every other point first) and second-round points already inside an accepted mask
   are skipped, since they would only find the same nucleus again;
3. all surviving prompts of all tiles go through the decoder together, in chunks of ``decoder_batch``;
4. masks are kept if their predicted IoU and stability pass thresholds, duplicates are removed by box NMS,
   and the label map is painted best-score first (a pixel belongs to the first mask that claims it); masks
   left with less than ``min_keep`` of their own area were overlapping duplicates and are dropped.

Everything per tile is array arithmetic; there is no Python loop over nuclei.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torchvision.ops import batched_nms

from .errors import InputError
from .sam import decode, encode
from .segmenter import TileBatchResult

PROMPT_MODES = ("auto", "grid")


@dataclass
class InferConfig:
    points_per_side: int = 32  # 16 px spacing on a 512 px tile: every nucleus gets at least one point
    prompts: str = "auto"  # "auto" prunes (foreground map + in-mask skipping), "grid" decodes every point
    fg_threshold: float = 0.2  # foreground probability below which a grid point is skipped
    pred_iou_thresh: float = 0.5
    stability_thresh: float = 0.8
    stability_offset: float = 1.0
    nms_iou: float = 0.6
    min_area: int = 12  # pixels at tile resolution
    min_keep: float = 0.5  # fraction of its own area a mask must keep after painting
    multimask: bool = False  # zero-shot SAM needs its 3 ambiguity masks; fine-tuned decoders need one
    decoder_batch: int = 512  # prompts per decoder call (memory knob)
    bf16: bool = True  # on CUDA

    def validate(self) -> "InferConfig":
        if self.prompts not in PROMPT_MODES:
            raise InputError(f"--prompts must be one of {', '.join(PROMPT_MODES)}")
        if self.points_per_side < 1 or self.decoder_batch < 1:
            raise InputError("--points-per-side and --decoder-batch must be >= 1")
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
    hi = (logits > threshold + offset).flatten(1).sum(1).float()
    lo = (logits > threshold - offset).flatten(1).sum(1).float()
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


class SamTileSegmenter:
    """A :class:`nucseg.segmenter.TileSegmenter` backed by a (fine-tuned) SAM."""

    def __init__(self, model: Sam, cfg: InferConfig | None = None, device: str | torch.device = "cpu",
                 mpp: float | None = None, identity: str = ""):
        """``identity`` names the weights (base fingerprint + adapter hash); with the settings it forms
        ``fingerprint``, which keys the whole-slide prediction cache so that stale predictions are never reused."""
        self.cfg = (cfg or InferConfig()).validate()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tile_size = model.image_encoder.img_size
        self.mpp = mpp
        self.grid = grid_points(self.tile_size, self.cfg.points_per_side).to(self.device)
        self.stats = {"tiles": 0, "prompts_grid": 0, "prompts_decoded": 0}
        settings = json.dumps(self.cfg.to_dict(), sort_keys=True)
        self.fingerprint = hashlib.sha256(f"{identity}|{self.tile_size}|{settings}".encode()).hexdigest()

    @property
    def autocast(self) -> bool:
        return self.device.type == "cuda" and self.cfg.bf16

    # -- decoding ------------------------------------------------------------------------------------
    def _decode(self, emb: torch.Tensor, points: torch.Tensor, index: torch.Tensor):
        """Decode (N, 2) points of tiles ``index`` in chunks -> low-res logits (N, h, w) float, iou (N,)."""
        logits, ious = [], []
        for s in range(0, len(points), self.cfg.decoder_batch):
            p = points[s : s + self.cfg.decoder_batch]
            i = index[s : s + self.cfg.decoder_batch]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                lg, iou = decode(self.model, emb, p[:, None, :], torch.ones(len(p), 1, dtype=torch.long,
                                 device=self.device), i, multimask=self.cfg.multimask)
            best = iou.argmax(1)  # with multimask, SAM's most confident of its 3 ambiguity masks
            ar = torch.arange(len(p), device=self.device)
            logits.append(lg[ar, best].float())
            ious.append(iou[ar, best].float())
        self.stats["prompts_decoded"] += len(points)
        if not logits:
            low = self.tile_size // 4
            return torch.zeros(0, low, low, device=self.device), torch.zeros(0, device=self.device)
        return torch.cat(logits), torch.cat(ious)

    def _accept(self, logits: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
        stab = stability_score(logits, 0.0, self.cfg.stability_offset)
        area = (logits > 0).flatten(1).sum(1) * (self.tile_size // logits.shape[-1]) ** 2
        return (iou >= self.cfg.pred_iou_thresh) & (stab >= self.cfg.stability_thresh) & (area >= self.cfg.min_area)

    def _prompts(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, G) boolean: which grid points of each tile are worth decoding at all."""
        b, g = emb.shape[0], len(self.grid)
        keep = torch.ones(b, g, dtype=torch.bool, device=self.device)
        head = getattr(self.model, "fg_head", None)
        if self.cfg.prompts == "auto" and head is not None:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                fg = torch.sigmoid(head(emb).float())  # (B, 1, h, w)
            # max-pool so a point near (not only on) a nucleus survives, then sample at each grid point
            fg = F.max_pool2d(fg, 3, stride=1, padding=1)
            norm = self.grid / self.tile_size * 2 - 1
            val = F.grid_sample(fg, norm[None, None].expand(b, -1, -1, -1), align_corners=False)
            keep &= val[:, 0, 0] >= self.cfg.fg_threshold
        return keep

    @torch.no_grad()
    def __call__(self, tiles: np.ndarray) -> TileBatchResult:
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise InputError(f"expected (B, H, W, 3) RGB tiles, got {tiles.shape}")
        b, h, w = tiles.shape[:3]
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            emb = encode(self.model, x)
        keep = self._prompts(emb)
        n = self.cfg.points_per_side
        self.stats["tiles"] += b
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
            if r > 0:  # skip points already inside an accepted mask of this tile
                cell = (self.grid // 4).long().clamp(max=low_res - 1)
                inside = covered[:, cell[:, 1], cell[:, 0]] > 0
                sel = sel & ~inside
            index, point = sel.nonzero(as_tuple=True)
            logits, iou = self._decode(emb, self.grid[point], index)
            ok = self._accept(logits, iou)
            logits, iou, index = logits[ok], iou[ok], index[ok]
            if len(index):
                covered.index_add_(0, index, (logits > 0).to(torch.int32))
            all_logits.append(logits)
            all_iou.append(iou)
            all_index.append(index)
        return self._paint(torch.cat(all_logits), torch.cat(all_iou), torch.cat(all_index), b, h, w)

    def _paint(self, logits, iou, index, b, h, w) -> TileBatchResult:
        size = self.tile_size
        labels = np.zeros((b, h, w), np.int32)
        scores: list[np.ndarray] = [np.zeros(0, np.float32) for _ in range(b)]
        if len(index) == 0:
            return TileBatchResult(labels, scores)
        boxes = mask_boxes(logits > 0) * (size / logits.shape[-1])
        kept = batched_nms(boxes, iou, index, self.cfg.nms_iou)  # sorted by score, descending
        logits, iou, index = logits[kept], iou[kept], index[kept]
        for t in range(b):
            sel = (index == t).nonzero(as_tuple=True)[0]
            if len(sel) == 0:
                continue
            up = F.interpolate(logits[sel, None], size=(size, size), mode="bilinear", align_corners=False)
            masks = up[:, 0, :h, :w] > 0  # (M, h, w), best score first
            area = masks.flatten(1).sum(1)
            claim = masks.to(torch.uint8).argmax(0)  # first (best) mask covering each pixel
            claimed = masks.any(0)
            kept_area = torch.bincount(claim[claimed], minlength=len(sel))
            good = (kept_area >= self.cfg.min_keep * area) & (kept_area >= self.cfg.min_area)
            new_id = torch.cumsum(good.long(), 0) * good  # consecutive ids 1..k for kept masks, 0 otherwise
            lab = torch.where(claimed, new_id[claim], torch.zeros_like(claim))
            labels[t] = lab.cpu().numpy().astype(np.int32)
            scores[t] = iou[sel][good].cpu().numpy().astype(np.float32)
        return TileBatchResult(labels, scores)


def segment_tiles(segmenter: SamTileSegmenter, images: list[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
    """Label maps for a list of tiles of possibly different sizes (each at most the model input)."""
    out: list[np.ndarray] = []
    for s in range(0, len(images), batch_size):
        chunk = images[s : s + batch_size]
        if len({im.shape for im in chunk}) == 1:
            out.extend(segmenter(np.stack(chunk)).labels)
        else:
            out.extend(segmenter(im[None]).labels[0] for im in chunk)
    return out
