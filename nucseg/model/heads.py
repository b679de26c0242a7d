"""Learned prompting heads on SAM's image embedding: one prompt per nucleus, or no prompt at all.

Grid prompting decodes ~4.5 prompts per nucleus (docs/PERFORMANCE.md); two heads trained beside the method
remove that loop:

* :class:`CenterHead` (``prompts="centers"``, PromptNucSeg / P2PNet style): per embedding cell (16 px) an
  objectness logit and a sub-cell offset to the centre of the nucleus whose centre lies in that cell. Peaks
  above a threshold, after point NMS, become one positive point prompt each for SAM's decoder; optionally the
  K nearest other centres go in as negative points so touching nuclei separate (PromptNucSeg's trick).
* :class:`InstanceHead` (``prompts="none"``, PathoSAM / micro-sam AIS style): a small decoder from the
  embedding, with a shallow path from the image at 1/4 resolution, predicting foreground, distance-to-centre
  and distance-to-boundary maps (both normalised per nucleus to [0, 1]); instances come from a seeded
  watershed (scikit-image) and SAM's decoder is never called.

Targets (:func:`instance_targets`) are computed from the label maps of a training batch; the centre of a
nucleus is its pole of inaccessibility (the pixel farthest from its boundary), which always lies inside it,
so a centre prompt is always on the nucleus even for a concave one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import nn

CELL = 16  # input pixels per embedding cell (SAM's patch size)
CENTER_HEAD = "center_head"
INSTANCE_HEAD = "instance_head"
HEAD_NAMES = (CENTER_HEAD, INSTANCE_HEAD)
# widths: at 64 both heads cost ~2 % of a vit_tiny encoder pass, <0.3 % of vit_b (bench/bench_heads_cost.py,
# docs/PERFORMANCE.md "Learned prompt modes"); 128 costs 8x more for the instance head. PQ against width is not
# measured yet.
CENTER_HIDDEN = 64
INSTANCE_HIDDEN = 64
IMAGE_CHANNELS = 16  # width of the instance head's shallow image path


class CenterHead(nn.Module):
    """Embedding (B, C, h, w) -> (B, 3, h, w): objectness logit, and x/y offset of the centre from the cell's
    centre in cells (bounded to the cell, [-0.5, 0.5], by a scaled tanh)."""

    def __init__(self, dim: int, hidden: int = CENTER_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, 3, 1))
        with torch.no_grad():  # RetinaNet's prior: few cells hold a centre, so start near p = 0.01
            self.net[-1].bias[0].fill_(-4.6)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        out = self.net(embeddings)
        return torch.cat([out[:, :1], 0.5 * torch.tanh(out[:, 1:])], 1)


class InstanceHead(nn.Module):
    """Embedding (B, C, h, w) + image (B, 3, H, W) in [0, 255] -> (B, 3, H/4, W/4) logits of foreground,
    centre distance and boundary distance (sigmoid gives the maps). The embedding is upsampled 4x by two
    transposed convolutions, as SAM's own mask decoder does; the image path adds the edges a 16 px token
    grid cannot resolve (nuclei are 10-30 px across)."""

    def __init__(self, dim: int, hidden: int = INSTANCE_HIDDEN, image_channels: int = IMAGE_CHANNELS):
        super().__init__()
        self.up = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.GELU(),
                                nn.ConvTranspose2d(hidden, hidden // 2, 2, stride=2), nn.GELU(),
                                nn.ConvTranspose2d(hidden // 2, hidden // 4, 2, stride=2), nn.GELU())
        self.image = nn.Sequential(nn.Conv2d(3, image_channels, 3, stride=2, padding=1), nn.GELU(),
                                   nn.Conv2d(image_channels, image_channels, 3, stride=2, padding=1), nn.GELU())
        self.out = nn.Sequential(nn.Conv2d(hidden // 4 + image_channels, hidden // 4, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(hidden // 4, 3, 1))

    def forward(self, embeddings: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        feats = self.up(embeddings)
        img = self.image(images.to(feats.dtype) / 255.0 - 0.5)
        return self.out(torch.cat([feats, img[..., : feats.shape[-2], : feats.shape[-1]]], 1))


def attach_prompt_heads(model: nn.Module, names: tuple[str, ...] = HEAD_NAMES) -> nn.Module:
    """Give ``model`` the trainable heads in ``names`` (kept out of exported official state dicts)."""
    dim = model.prompt_encoder.embed_dim
    device = model.pixel_mean.device
    for name in names:
        if getattr(model, name, None) is None:
            setattr(model, name, (CenterHead(dim) if name == CENTER_HEAD else InstanceHead(dim)).to(device))
    return model


def head_modes(model: nn.Module) -> list[str]:
    """The prompt modes ``model`` can run: auto and grid always, centers / none with their heads."""
    return ["auto", "grid"] + [m for m, h in (("centers", CENTER_HEAD), ("none", INSTANCE_HEAD))
                               if getattr(model, h, None) is not None]


# ---------------------------------------------------------------------------------------------- targets
@dataclass
class InstanceTargets:
    """Per-tile training targets of the heads (numpy, tile resolution unless said otherwise)."""

    centers: np.ndarray  # (n, 2) xy pixel coordinates of each nucleus's centre (+0.5: pixel centres)
    center_dist: np.ndarray  # (H, W) float32: distance to the nucleus's centre / its largest; 1 on background
    boundary_dist: np.ndarray  # (H, W) float32: distance to its boundary / its largest; 0 on background


def instance_targets(labels: np.ndarray) -> InstanceTargets:
    """Centres and normalised distance maps of one label map (0 = background), vectorised over nuclei."""
    labels = np.asarray(labels)
    fg = labels > 0
    h, w = labels.shape
    if not fg.any():
        return InstanceTargets(np.zeros((0, 2), np.float32), np.ones((h, w), np.float32), np.zeros((h, w), np.float32))
    # boundary distance inside each nucleus: touching nuclei are split by the pixels whose 4-neighbour differs
    padded = np.pad(labels, 1, mode="edge")
    edge = np.zeros_like(fg)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[dy : dy + h, dx : dx + w] != labels
    bd = ndi.distance_transform_edt(fg & ~edge) + fg  # boundary pixels 1, inside grows
    ids, lab = np.unique(labels, return_inverse=True)
    lab = lab.reshape(h, w)  # 0 = background, 1..n consecutive
    index = np.arange(1, len(ids))
    bmax = np.asarray(ndi.maximum(bd, lab, index), np.float64)
    pos = np.asarray(ndi.maximum_position(bd, lab, index), np.float64).reshape(-1, 2)  # (n, 2) row, col
    table = np.concatenate([[1.0], bmax])
    boundary = np.where(fg, bd / table[lab], 0.0)
    yy, xx = np.indices((h, w))
    cy = np.concatenate([[0.0], pos[:, 0]])[lab]
    cx = np.concatenate([[0.0], pos[:, 1]])[lab]
    dist = np.hypot(yy - cy, xx - cx)
    cmax = np.concatenate([[1.0], np.asarray(ndi.maximum(dist, lab, index), np.float64)])
    center = np.where(fg, dist / np.maximum(cmax[lab], 1.0), 1.0)
    return InstanceTargets(pos[:, ::-1].astype(np.float32) + 0.5, center.astype(np.float32),
                           boundary.astype(np.float32))


def center_cell_targets(centers: list[np.ndarray], b: int, grid: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Objectness (B, g, g) and offsets (B, 2, g, g) from each tile's centres: a cell is positive when a centre
    lies in it (of several, the one nearest the cell's centre), its offset that centre's, in cells."""
    obj = torch.zeros(b, grid, grid, device=device)
    off = torch.zeros(b, 2, grid, grid, device=device)
    for i, c in enumerate(centers):  # one small array per tile (a batch holds a few tiles)
        if not len(c):
            continue
        cell = np.clip(np.floor(c / CELL).astype(np.int64), 0, grid - 1)
        rel = c / CELL - (cell + 0.5)
        order = np.argsort(np.abs(rel).max(1), kind="stable")  # nearest first: the first per cell wins
        flat = cell[order, 1] * grid + cell[order, 0]
        _, first = np.unique(flat, return_index=True)
        pick = order[first]
        gy, gx = torch.from_numpy(cell[pick, 1]), torch.from_numpy(cell[pick, 0])
        obj[i, gy, gx] = 1.0
        off[i, :, gy, gx] = torch.from_numpy(rel[pick].T.astype(np.float32)).to(device)
    return obj, off


# ---------------------------------------------------------------------------------------------- inference
def center_points(out: torch.Tensor, threshold: float, nms_px: float, valid: tuple[int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre prompts from a CenterHead output (B, 3, g, g): ``(points (N, 2) xy px, tile index (N,),
    probability (N,))``, sorted by tile then probability (descending).

    Cells with probability >= ``threshold`` give one point each; of points closer than ``nms_px`` (in both
    x and y) the more probable one is kept (greedy point NMS, as box NMS on 2·nms_px squares). ``valid``
    (h, w): points outside the tile's real pixels (padding) are dropped.
    """
    from torchvision.ops import batched_nms

    b, _, g, _ = out.shape
    prob = torch.sigmoid(out[:, 0].float())
    index, gy, gx = (prob >= threshold).nonzero(as_tuple=True)
    score = prob[index, gy, gx]
    x = (gx.float() + 0.5 + out[index, 1, gy, gx].float()) * CELL
    y = (gy.float() + 0.5 + out[index, 2, gy, gx].float()) * CELL
    pts = torch.stack([x, y], 1)
    if valid is not None:
        inside = (x < valid[1]) & (y < valid[0])
        pts, index, score = pts[inside], index[inside], score[inside]
    if len(pts) and nms_px > 0:
        half = nms_px / 2
        boxes = torch.cat([pts - half, pts + half], 1)
        keep = batched_nms(boxes, score, index, 0.0)  # any overlap: closer than nms_px in x and y
        pts, index, score = pts[keep], index[keep], score[keep]
    order = torch.argsort(index * 2 - score, stable=True)  # tile-major, most probable first (score in [0, 1])
    return pts[order], index[order], score[order]


def negative_points(points: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each point, its ``k`` nearest other points of the same tile as negative prompts.

    Returns coordinates (N, 1 + k, 2) (the point itself first) and labels (N, 1 + k): 1, then 0 for the
    negatives, and -1 (SAM's padding point) where the tile has fewer than k other points.
    """
    n = len(points)
    dev = points.device
    labels = torch.ones(n, 1, dtype=torch.long, device=dev)
    if k <= 0 or n == 0:
        return points[:, None], labels
    # distances within each tile only: points padded into (tiles, most per tile, 2), one batched cdist
    counts = torch.bincount(index)
    order = torch.argsort(index, stable=True)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(index)
    slot[order] = torch.arange(n, device=dev) - start[index[order]]
    m = int(counts.max())
    padded = torch.full((len(counts), m, 2), float("inf"), device=dev)
    padded[index, slot] = points.float()
    d = torch.cdist(padded, padded)[index, slot]  # (N, m): to every slot of the point's own tile
    d = torch.nan_to_num(d, nan=float("inf"), posinf=float("inf"))
    d[torch.arange(n, device=dev), slot] = float("inf")  # not itself
    kk = min(k, m)
    dist, near = d.topk(kk, dim=1, largest=False)
    member = torch.full((len(counts), m), -1, dtype=torch.long, device=dev)
    member[index, slot] = torch.arange(n, device=dev)
    neg = points[member[index[:, None], near].clamp(min=0)]
    neg_lab = torch.where(torch.isfinite(dist), 0, -1)
    if kk < k:
        neg = torch.cat([neg, neg.new_zeros(n, k - kk, 2)], 1)
        neg_lab = torch.cat([neg_lab, neg_lab.new_full((n, k - kk), -1)], 1)
    return torch.cat([points[:, None], neg], 1), torch.cat([labels, neg_lab.long()], 1)


def instance_maps(out: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """InstanceHead logits (B, 3, L, L) -> probabilities (B, 3, h, w) at tile resolution (bilinear, cropped)."""
    scale = CELL // 4
    up = F.interpolate(out.float(), scale_factor=scale, mode="bilinear", align_corners=False)
    return torch.sigmoid(up[..., : size[0], : size[1]])


_PLANE = np.zeros((3, 3, 3), bool)
_PLANE[1] = ndi.generate_binary_structure(2, 1)  # 4-connectivity within a tile, never across tiles


def watershed_instances(maps: np.ndarray, foreground: float, center: float, boundary: float, min_area: int
                        ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Seeded watershed on (B, 3, h, w) maps (foreground, centre distance, boundary distance) of a batch.

    Seeds are the connected regions where the nucleus is likely (foreground >= ``foreground``), near its
    centre (centre distance < ``center``) and away from its boundary (boundary distance > ``boundary``);
    they flood the foreground downhill in boundary distance. All tiles at once: a 3-D array whose
    connectivity never crosses tiles. Returns labels (B, h, w) int32 numbered 1..n per tile, and per tile the
    mean foreground probability of each instance (its score). Instances under ``min_area`` pixels are dropped.
    """
    from skimage.segmentation import watershed

    fg, cd, bd = maps[:, 0], maps[:, 1], maps[:, 2]
    b = fg.shape[0]
    mask = fg >= foreground
    seeds = mask & (cd < center) & (bd > boundary)
    markers, n = ndi.label(seeds, structure=_PLANE)
    if n == 0:
        return np.zeros(fg.shape, np.int32), [np.zeros(0, np.float32) for _ in range(b)]
    lab = watershed(1.0 - bd, markers, mask=mask, connectivity=_PLANE)
    flat = lab.ravel()
    area = np.bincount(flat, minlength=n + 1)
    mean_fg = np.bincount(flat, weights=fg.ravel(), minlength=n + 1) / np.maximum(area, 1)
    # marker ids follow raster order, so tile by tile: the tile of each id from its first seed pixel
    tile_of = np.zeros(n + 1, np.int64)
    tile_of[1:] = np.asarray(ndi.minimum(np.broadcast_to(np.arange(b)[:, None, None], fg.shape), markers,
                                         np.arange(1, n + 1)), np.int64)
    good = area >= max(min_area, 1)
    good[0] = False
    per_tile = np.bincount(tile_of[good], minlength=b)
    new = np.zeros(n + 1, np.int64)
    rank = np.cumsum(good) - 1  # rank among good ids, globally
    start = np.concatenate([[0], np.cumsum(per_tile)[:-1]])
    new[good] = rank[good] - start[tile_of[good]] + 1
    out = new[lab].astype(np.int32)
    scores = np.split(mean_fg[good].astype(np.float32), np.cumsum(per_tile)[:-1])
    return out, scores
