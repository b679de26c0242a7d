"""The decoder fast path computes what segment-anything's decoder computes."""

from __future__ import annotations

import pytest
import torch

from nucseg.model.fastdecode import decode_points, prepare
from nucseg.model.sam import build_sam, decode


@pytest.mark.parametrize("multimask", [False, True])
def test_fast_decoder_matches_the_reference_decoder(multimask):
    """Same masks and IoU as nucseg.model.sam.decode (itself checked against segment-anything per image), for
    prompts of several tiles in any order, one tile without prompts, and non-trivial decoder weights."""
    torch.manual_seed(0)
    model = build_sam("vit_tiny", img_size=256)
    with torch.no_grad():
        for p in model.mask_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        emb = torch.randn(3, 64, 16, 16)
        points = torch.rand(23, 2) * 256
        index = torch.tensor([2, 0, 2, 2, 0] * 4 + [0, 2, 0])  # tile 1 has no prompts
        ref_masks, ref_iou = decode(model, emb, points[:, None], torch.ones(23, 1, dtype=torch.long), index,
                                    multimask=multimask)
        masks, iou = decode_points(model, prepare(model, emb), points, index, multimask=multimask)
    assert masks.shape == ref_masks.shape == (23, 3 if multimask else 1, 64, 64)
    torch.testing.assert_close(masks, ref_masks, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-4)
