"""SAM-Adapter (Chen et al., 2023, "SAM Fails to Segment Anything? SAM-Adapter: Adapting SAM in Underperformed
Scenes", arXiv:2304.09148): task-specific information fed into every block of the frozen image encoder.

What the paper (and its code, which builds on Explicit Visual Prompting, Liu et al., CVPR 2023) does, and what
is done here:

- The task input is the sum of two projections to a small width ``d``: the *patch embedding* (after SAM's
  own patch embedding, a Linear C -> d, "embedding tune") and the image's *high-frequency component* (the
  normalised input with the centre of its centred 2D FFT spectrum zeroed — a square covering a fraction
  ``FFT_MASK_RATE`` = 0.25 of the spectrum, the code's default — inverted, absolute value, then a 16 px,
  stride-16 patch convolution 3 -> d, "handcrafted tune").
- Each encoder block i has its own tuning MLP (Linear d -> d, GELU); one up-projection d -> C is *shared* by
  all blocks. Block i's prompt is ``shared_up(tune_i(task input))`` and is added to the block's input tokens
  (after the position embedding for block 0, as in the code).
- SAM's weights are frozen; the mask decoder is trained (``train_decoder``, the default), as in the paper.

Choices of nucseg: ``d`` defaults to C/32 (the code's ``scale_factor`` 32: 24 for vit_b); ``adapter_scale``
multiplies the prompts (1.0 = the paper; it has no such factor). The shared up-projection is zero-initialised
(the code initialises it randomly), so an untrained adapter computes exactly what the base computes and
training starts from the base model. Used prompt-free in the paper; nucseg keeps SAM's point prompts, like
every other method here. Not mergeable into SAM's weights: the prompts depend on the image's spectrum.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT, Sam

FFT_MASK_RATE = 0.25  # share of the (centred) spectrum removed as "low frequency"; SAM-Adapter's freq_nums


def high_frequency(x: torch.Tensor, rate: float = FFT_MASK_RATE) -> torch.Tensor:
    """|IFFT(FFT(x) with the central low-frequency square zeroed)| per image and channel, in float32.

    Square of side 2*floor(sqrt(h*w*rate)/2) around the centre of the shifted spectrum, as SAM-Adapter's code.
    """
    h, w = x.shape[-2:]
    half = int((h * w * rate) ** 0.5 // 2)
    spec = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="forward"), dim=(-2, -1))
    keep = torch.ones(h, w, device=x.device)
    keep[h // 2 - half : h // 2 + half, w // 2 - half : w // 2 + half] = 0
    spec = torch.fft.ifftshift(spec * keep, dim=(-2, -1))
    return torch.fft.ifft2(spec, norm="forward").real.abs()


class SAMAdapterPrompts(nn.Module):
    """The task-specific prompts of every encoder block (SAM-Adapter's PromptGenerator)."""

    def __init__(self, embed_dim: int, depth: int, dim: int, patch: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.embed = nn.Linear(embed_dim, dim)  # patch embedding -> d ("embedding tune")
        self.hfc = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)  # high-frequency image -> d ("handcrafted")
        self.tune = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for _ in range(depth))
        self.up = nn.Linear(dim, embed_dim)  # shared by all blocks
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def task_input(self, image: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised input and (B, h, w, C) patch embedding -> (B, h, w, d)."""
        with torch.autocast(image.device.type, enabled=False):  # no half-precision FFT
            hfc = high_frequency(image)
        hfc = self.hfc(hfc.to(self.hfc.weight.dtype)).permute(0, 2, 3, 1)
        return self.embed(patches) + hfc.to(patches.dtype)

    def prompt(self, i: int, task: torch.Tensor) -> torch.Tensor:
        return self.up(self.tune[i](task)) * self.scale


class SAMAdapterEncoder(ImageEncoderViT):
    """segment-anything's encoder with SAM-Adapter's prompts added to each block's input.

    Applied by swapping the class of an existing encoder (:func:`apply_sam_adapter`), so every base weight
    keeps its official key; the new tensors live under ``image_encoder.sam_adapter.``.
    """

    sam_adapter: SAMAdapterPrompts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x
        x = self.patch_embed(x)
        task = self.sam_adapter.task_input(image, x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for i, blk in enumerate(self.blocks):
            x = blk(x + self.sam_adapter.prompt(i, task))
        return self.neck(x.permute(0, 3, 1, 2))


def default_dim(embed_dim: int) -> int:
    return max(1, embed_dim // 32)


def apply_sam_adapter(model: Sam, dim: int | None, scale: float | None) -> list[nn.Parameter]:
    """Insert SAM-Adapter into ``model``'s encoder in place; returns the new (trainable) parameters."""
    enc = model.image_encoder
    if isinstance(enc, SAMAdapterEncoder):
        raise ValueError("the encoder already has SAM-Adapter prompts")
    embed_dim = enc.patch_embed.proj.out_channels
    patch = enc.patch_embed.proj.kernel_size[0]
    ref = enc.patch_embed.proj.weight
    prompts = SAMAdapterPrompts(embed_dim, len(enc.blocks), dim or default_dim(embed_dim), patch,
                                1.0 if scale is None else scale).to(device=ref.device, dtype=ref.dtype)
    enc.__class__ = SAMAdapterEncoder
    enc.sam_adapter = prompts
    return list(prompts.parameters())


def sam_adapter_parameters(embed_dim: int, depth: int, dim: int, patch: int = 16) -> int:
    """Closed form of the parameter count (tests compare it with the modules)."""
    return (embed_dim * dim + dim) + (3 * patch * patch * dim + dim) + depth * (dim * dim + dim) + (dim * embed_dim + embed_dim)

