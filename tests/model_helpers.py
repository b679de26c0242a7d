"""Helpers shared by tests that build small trained-looking models (imported as a plain module: tests/ is on
pytest's path)."""

from __future__ import annotations


def tiny_trained_lora(checkpoint, method, size: int, seed: int = 3, scale: float = 0.05):
    """vit_tiny from ``checkpoint`` at ``size`` px with ``method`` applied and a foreground head, every trainable
    tensor moved off its (often zero) start by seeded noise, so outputs depend on the adapter. Returns
    ``(model, base fingerprint)``."""
    import torch

    from nucseg.model.lora import apply_method
    from nucseg.model.sam import attach_foreground_head, load_sam

    model, fp = load_sam("vit_tiny", checkpoint, img_size=size)
    apply_method(model, method)
    attach_foreground_head(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model, fp
