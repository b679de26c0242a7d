"""Automatic prompting and label painting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucseg.errors import InputError
from nucseg.infer import InferConfig, SamTileSegmenter, grid_points, mask_boxes, stability_score
from nucseg.sam import attach_foreground_head, load_sam


def _disk(cy, cx, r, n=128):
    yy, xx = np.mgrid[:n, :n]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float32)


def test_grid_and_helpers():
    g = grid_points(512, 4)
    assert g.shape == (16, 2) and g[0].tolist() == [64.0, 64.0] and g[-1].tolist() == [448.0, 448.0]
    m = torch.zeros(2, 10, 10, dtype=torch.bool)
    m[0, 2:5, 3:7] = True
    assert mask_boxes(m)[0].tolist() == [3, 2, 7, 5]
    logits = torch.full((1, 8, 8), -5.0)
    logits[0, :4, :4] = 5.0
    assert stability_score(logits, 0.0, 1.0).item() == 1.0  # sharp edge: stable


def test_painting_keeps_best_mask_and_drops_duplicates():
    """Three candidate masks on one tile: two nuclei, and a weaker near-duplicate of the first. The duplicate
    loses its pixels to the better mask and is dropped; the result has exactly two instances."""
    model, _ = load_sam("vit_tiny")
    seg = SamTileSegmenter(model, InferConfig(min_area=4, nms_iou=0.99))
    a, b, dup = _disk(30, 30, 8), _disk(80, 90, 10), _disk(31, 31, 8)
    logits = torch.from_numpy(np.stack([a, b, dup]) * 20 - 10)
    res = seg._paint(logits, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 0]), 1, 512, 512)
    lab = res.labels[0]
    assert sorted(np.unique(lab).tolist()) == [0, 1, 2]
    assert res.scores[0].tolist() == pytest.approx([0.9, 0.8])
    assert lab[120, 120] == 1 and lab[320, 360] == 2  # low-res (x4) positions of the two disks
    # a tile with no accepted masks is empty, with no scores
    empty = seg._paint(torch.zeros(0, 128, 128), torch.zeros(0), torch.zeros(0, dtype=torch.long), 2, 512, 512)
    assert not empty.labels.any() and all(len(s) == 0 for s in empty.scores)


def test_segmenter_contract_and_pruning_counts():
    model, _ = load_sam("vit_tiny", seed=0)
    attach_foreground_head(model)
    with torch.no_grad():  # a foreground map that says "nucleus" only in the left half of the tile
        model.fg_head.net[-1].weight.zero_()
        model.fg_head.net[-1].bias.fill_(-10.0)
    tiles = np.random.default_rng(0).integers(0, 255, (2, 256, 256, 3), dtype=np.uint8)
    cfg = dict(points_per_side=8, pred_iou_thresh=-1e9, stability_thresh=0.0, min_area=1)
    grid = SamTileSegmenter(model, InferConfig(prompts="grid", **cfg))
    res = grid(tiles)
    assert res.labels.shape == (2, 256, 256) and res.labels.dtype == np.int32
    for lab, sc in zip(res.labels, res.scores):
        assert lab.max() == len(sc) and set(np.unique(lab)) == set(range(lab.max() + 1))
    assert grid.stats["prompts_decoded"] == 2 * 64
    auto = SamTileSegmenter(model, InferConfig(prompts="auto", **cfg))
    auto(tiles)
    assert auto.stats["prompts_decoded"] == 0  # the foreground map ruled every point out
    with pytest.raises(InputError):
        grid(np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(InputError):
        InferConfig(prompts="dense").validate()
