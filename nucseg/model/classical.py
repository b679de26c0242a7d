"""A classical, deterministic :class:`~nucseg.segmenter.TileSegmenter`: haematoxylin threshold + watershed.

It exists for two reasons: as a baseline to compare the fine-tuned model against, and as a *tile-invariant*
segmenter for proving the whole-slide stitching. With a fixed threshold every step is local (per-pixel
colour deconvolution and threshold, per-component hole filling, size filtering, distance transform and
h-maxima watershed), so a nucleus that lies wholly inside a tile gets exactly the same pixels whichever tile,
or the whole image, it is segmented in. ``threshold="otsu"`` adapts to each tile and gives up that property.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.measure import label as label_connected
from skimage.morphology import local_maxima, reconstruction, remove_small_objects
from skimage.segmentation import watershed

from ..segmenter import SegmenterDefaults, TileBatchResult

# 8-connectivity for objects, so diagonal pixels belong to the same nucleus in every step.
_CONN8 = np.ones((3, 3), dtype=bool)


@dataclass
class ThresholdSegmenter(SegmenterDefaults):
    """Nuclei = connected regions of strong haematoxylin (or darkness), split by a distance watershed.

    tile_size: side of the tiles it is given (the whole-slide tiler uses it).
    channel: "hematoxylin" (optical density from :func:`skimage.color.rgb2hed`) or "darkness" (1 - grey).
    threshold: fixed value on that channel, or "otsu" to compute one per tile (not tile-invariant).
    min_size: connected regions smaller than this many pixels are noise, not nuclei.
    split: split touching nuclei with a watershed on the distance transform seeded by h-maxima.
    h: depth (px) a distance-transform neck needs before two nuclei are split; shallow necks are kept whole.
    softness: width of the logistic that turns the channel into a foreground probability for the score.
    mpp: µm/px the thresholds were tuned at (whole-slide prediction resamples to it); None = native.
    """

    tile_size: int = 512
    channel: str = "hematoxylin"
    threshold: float | str = 0.09
    min_size: int = 24
    split: bool = True
    h: float = 2.0
    softness: float = 0.02
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.channel not in ("hematoxylin", "darkness"):
            raise ValueError(f"channel must be 'hematoxylin' or 'darkness', not {self.channel!r}")
        if isinstance(self.threshold, str) and self.threshold != "otsu":
            raise ValueError(f"threshold must be a number or 'otsu', not {self.threshold!r}")

    @property
    def fingerprint(self) -> str:
        """Stable identity of this configuration, so the prediction cache never mixes settings."""
        return "ThresholdSegmenter-" + hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:16]

    def __call__(self, tiles: np.ndarray) -> TileBatchResult:
        tiles = np.asarray(tiles)
        if tiles.ndim == 3:
            tiles = tiles[None]
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"expected (B, H, W, 3) uint8 tiles, got {tiles.shape} {tiles.dtype}")
        labels = np.zeros(tiles.shape[:3], dtype=np.int32)
        scores: list[np.ndarray] = []
        for b in range(tiles.shape[0]):
            labels[b], sc = self.segment(tiles[b])
            scores.append(sc)
        return TileBatchResult(labels=labels, scores=scores)

    def channel_image(self, rgb: np.ndarray) -> np.ndarray:
        """The per-pixel stain signal the threshold applies to (higher = more nucleus-like)."""
        if self.channel == "hematoxylin":
            return rgb2hed(rgb)[..., 0].astype(np.float32)
        return (1.0 - rgb.astype(np.float32).mean(axis=-1) / 255.0).astype(np.float32)

    def segment(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One image (any size) -> (labels int32 numbered 1..n in raster order of first pixel, scores (n,))."""
        signal = self.channel_image(rgb)
        if self.threshold == "otsu":
            thr = float(threshold_otsu(signal)) if np.ptp(signal) > 0 else float("inf")
        else:
            thr = float(self.threshold)
        fg = signal > thr
        fg = ndi.binary_fill_holes(fg)
        fg = remove_small_objects(fg, max_size=self.min_size - 1, connectivity=2) if self.min_size > 1 else fg
        if not fg.any():
            return np.zeros(fg.shape, np.int32), np.zeros(0, np.float32)
        if self.split:
            labels = self._split(fg)
        else:
            labels, _ = ndi.label(fg, structure=_CONN8)
        labels = _renumber_raster(labels)
        n = int(labels.max())
        prob = 1.0 / (1.0 + np.exp(-(signal.astype(np.float64) - thr) / self.softness))
        flat = labels.ravel()
        area = np.bincount(flat, minlength=n + 1)[1:]
        psum = np.bincount(flat, weights=prob.ravel(), minlength=n + 1)[1:]
        scores = (psum / np.maximum(area, 1)).astype(np.float32)
        return labels.astype(np.int32, copy=False), scores

    def _split(self, fg: np.ndarray) -> np.ndarray:
        """Distance-transform watershed; components without an h-maximum stay whole."""
        dist = ndi.distance_transform_edt(fg)
        # h-maxima as *plateaus* of the reconstruction: equal-height peaks joined by a saddle shallower than
        # h are one marker (skimage's h_maxima returns their separate tops, which over-splits ellipses).
        rec = reconstruction(dist - self.h, dist, method="dilation")
        peaks = local_maxima(rec, connectivity=2, allow_borders=True) & fg
        markers, _ = ndi.label(peaks, structure=_CONN8)
        labels = watershed(-dist, markers, mask=fg, connectivity=2)
        rest = fg & (labels == 0)
        if rest.any():
            extra, _ = ndi.label(rest, structure=_CONN8)
            labels = np.where(extra > 0, extra + labels.max(), labels)
        # A watershed basin can be cut into pieces by its neighbours: each 8-connected piece becomes its own
        # object (and pieces below the size limit are dropped next), so every nucleus is one connected region.
        labels = label_connected(labels, connectivity=2, background=0)
        # Drop watershed fragments below the size limit (a corner split off a blob is not a nucleus).
        if self.min_size > 1:
            area = np.bincount(labels.ravel())
            small = area < self.min_size
            small[0] = False
            if small.any():
                labels = np.where(small[labels], 0, labels)
        return labels


def _renumber_raster(labels: np.ndarray) -> np.ndarray:
    """Renumber 1..n in raster order of each object's first pixel, so ids do not depend on seed order."""
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids > 0
    ids, first = ids[keep], first[keep]
    order = ids[np.argsort(first, kind="stable")]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[labels]
