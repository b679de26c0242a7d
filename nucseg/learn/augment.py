"""Training augmentation for (RGB tile, instance label map) pairs.

Geometry (flips, 90° rotations) is applied identically to image and labels and never resamples, so label ids
stay exact; colour changes touch only the image. The stain jitter follows Tellez et al. (2018/2019, "HED"
augmentation): each stain channel of the Ruifrok–Johnston colour deconvolution (the space of
:func:`skimage.color.rgb2hed`) is scaled by α ∈ [1−σ, 1+σ] and shifted by β ∈ [−σ, σ], then recombined as
in :func:`skimage.color.hed2rgb`. That mimics lab-to-lab stain variation, the main domain shift in H&E.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

from ..errors import InputError

# rgb2hed/hed2rgb divide optical density by -log(1e-6), so stain values of real H&E are O(0.01-0.25); we
# keep that scale so σ means what it means on skimage's HED. σ ≈ 0.03 already spans pale-pink to
# deep-purple slides.
_LOG_ADJUST = float(-np.log(1e-6))
_HED_FROM_RGB = hed_from_rgb.astype(np.float32)
_RGB_FROM_HED = rgb_from_hed.astype(np.float32)


@dataclass
class AugmentConfig:
    """What :func:`augment` may do. Amounts are half-widths of uniform ranges; 0 disables that jitter."""

    flip: bool = True
    rot90: bool = True
    stain_jitter: float = 0.03
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1


def augment(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return an augmented copy of ``(image, labels)``; the same ``rng`` state gives the same result."""
    cfg = cfg or AugmentConfig()
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InputError(f"augment expects an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    if labels.shape[:2] != image.shape[:2]:  # extra trailing channels (e.g. an ambiguous mask) ride along
        raise InputError(f"label map {labels.shape} does not match image {image.shape[:2]}")

    if cfg.flip:
        if rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        if rng.random() < 0.5:
            image, labels = image[::-1], labels[::-1]
    if cfg.rot90:
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k, axes=(0, 1)), np.rot90(labels, k, axes=(0, 1))

    image, labels = np.ascontiguousarray(image), labels.copy()  # compact arrays, never the caller's

    rgb = image.astype(np.float32) / 255.0
    if cfg.stain_jitter > 0:
        s = cfg.stain_jitter
        rgb = hed_jitter(rgb, rng.uniform(1 - s, 1 + s, 3), rng.uniform(-s, s, 3))
    if cfg.brightness > 0:
        rgb = rgb * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    if cfg.contrast > 0:
        mean = rgb.mean()
        rgb = (rgb - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
    if cfg.saturation > 0:
        grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        rgb = grey[..., None] + (rgb - grey[..., None]) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    out = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return out, labels


def hed_jitter(rgb: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Scale and shift the H, E, D stain channels of float RGB in [0, 1]: ``hed * alpha + beta``.

    Same transform as ``hed2rgb(rgb2hed(x) * alpha + beta)`` but in float32 and without rgb2hed's clamp of
    negative stain values, so alpha=1, beta=0 is an exact identity (the clamp would tint near-white pixels).
    """
    od = np.log(np.maximum(rgb, 1e-6, dtype=np.float32)) / -_LOG_ADJUST
    hed = od @ _HED_FROM_RGB
    hed = hed * np.asarray(alpha, np.float32) + np.asarray(beta, np.float32)
    return np.clip(np.exp(-_LOG_ADJUST * (hed @ _RGB_FROM_HED)), 0.0, 1.0)
