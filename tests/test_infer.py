"""Automatic prompting and label painting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucseg.errors import InputError
from nucseg.model.infer import InferConfig, SamTileSegmenter, grid_points, mask_boxes, stability_score
from nucseg.model.sam import attach_foreground_head, load_sam


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


def _blobs(n: int, low: int = 128, seed: int = 0) -> torch.Tensor:
    """Smooth low-res logits of n blobs of various sizes, some touching the tile border, one very large."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(low).float(), torch.arange(low).float(), indexing="ij")
    cy, cx = torch.rand(n, generator=g) * low, torch.rand(n, generator=g) * low
    r = 1 + torch.rand(n, generator=g) * 6
    r[0] = 40.0
    cy[1], cx[2] = 0.0, low - 1.0
    d = ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2).sqrt()
    return (r[:, None, None] - d) * 3


def test_window_painting_matches_full_upsampling():
    """Painting inside box windows gives the same claims and areas as upsampling every mask to the full tile
    (the definition), also for a tile cropped smaller than the model input and masks on the border."""
    from nucseg.model.infer import paint_claims

    logits = _blobs(40)
    index = torch.tensor([0, 1] * 20)
    for h, w in ((512, 512), (500, 437)):
        claim, area = paint_claims(logits, mask_boxes(logits > 0), index, 2, h, w, 4)
        up = torch.nn.functional.interpolate(logits[:, None], size=(512, 512), mode="bilinear", align_corners=False)
        masks = up[:, 0, :h, :w] > 0
        torch.testing.assert_close(area, masks.flatten(1).sum(1))
        for t in range(2):
            sel = (index == t).nonzero()[:, 0]
            m = masks[sel]
            ref = torch.where(m.any(0), sel[m.to(torch.uint8).argmax(0)], len(index))
            assert torch.equal(claim.view(2, h, w)[t], ref)


class _OOMDecode:
    """Stands in for the decoder: raises out-of-memory for chunks above ``limit`` prompts."""

    def __init__(self, real, limit: int, error: type[Exception] = torch.cuda.OutOfMemoryError):
        self.real, self.limit, self.error, self.sizes = real, limit, error, []

    def __call__(self, model, ctx, points, index, multimask=False):
        self.sizes.append(len(points))
        if len(points) > self.limit:
            msg = "CUDA out of memory. Tried to allocate 2.00 GiB" if self.error is not RuntimeError else \
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes"
            raise self.error(msg)
        return self.real(model, ctx, points, index, multimask)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, RuntimeError])
def test_decoder_out_of_memory_halves_the_chunk_and_continues(monkeypatch, error):
    import nucseg.model.infer as infer

    model, _ = load_sam("vit_tiny", seed=0)
    tiles = np.random.default_rng(1).integers(0, 255, (2, 128, 128, 3), dtype=np.uint8)
    cfg = dict(points_per_side=8, prompts="grid", pred_iou_thresh=-1e9, stability_thresh=0.0, min_area=1)
    expected = SamTileSegmenter(model, InferConfig(decoder_batch=4, **cfg))(tiles)
    fake = _OOMDecode(infer.decode_points, limit=5, error=error)
    monkeypatch.setattr(infer, "decode_points", fake)
    seg = SamTileSegmenter(model, InferConfig(decoder_batch=128, **cfg))
    with pytest.warns(RuntimeWarning, match="out of memory") as caught:
        res = seg(tiles)
        seg(tiles)  # the smaller chunk is kept: no second warning
    assert len([w for w in caught if "out of memory" in str(w.message)]) == 1
    assert seg.decoder_chunk == 4 and max(fake.sizes[-4:]) == 4  # 16 (cache-sized on CPU) -> 8 -> 4
    assert seg.stats["prompts_decoded"] == 2 * 2 * 64  # every prompt decoded once per call, none lost or repeated
    np.testing.assert_array_equal(res.labels, expected.labels)
    assert all(np.array_equal(a, b) for a, b in zip(res.scores, expected.scores))


def test_encoder_out_of_memory_splits_the_tile_batch(monkeypatch):
    import nucseg.model.infer as infer

    model, _ = load_sam("vit_tiny", seed=0)
    tiles = np.random.default_rng(2).integers(0, 255, (4, 128, 128, 3), dtype=np.uint8)
    cfg = InferConfig(points_per_side=4, prompts="grid", pred_iou_thresh=-1e9, stability_thresh=0.0, min_area=1)
    expected = SamTileSegmenter(model, cfg)(tiles)
    real, sizes = infer.encode, []

    def encode(m, x):
        sizes.append(len(x))
        if len(x) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(m, x)

    monkeypatch.setattr(infer, "encode", encode)
    seg = SamTileSegmenter(model, cfg)
    with pytest.warns(RuntimeWarning, match="encoder batch"):
        res = seg(tiles)
    assert seg.encoder_chunk == 1 and sizes == [4, 2, 1, 1, 1, 1]
    np.testing.assert_array_equal(res.labels, expected.labels)


def test_other_runtime_errors_are_not_swallowed(monkeypatch):
    import nucseg.model.infer as infer

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(infer, "decode_points", broken)
    model, _ = load_sam("vit_tiny", seed=0)
    seg = SamTileSegmenter(model, InferConfig(points_per_side=4, prompts="grid"))
    with pytest.raises(RuntimeError, match="shapes"):
        seg(np.zeros((1, 64, 64, 3), np.uint8))


def test_segment_tiles_batches_mixed_sizes_by_shape():
    """Tiles of different sizes come back in input order with their own shapes, as one call per tile gives."""
    from nucseg.model.infer import segment_tiles

    model, _ = load_sam("vit_tiny", seed=0)
    seg = SamTileSegmenter(model, InferConfig(points_per_side=4, prompts="grid", pred_iou_thresh=-1e9,
                                              stability_thresh=0.0, min_area=1))
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in
              [(96, 96, 3), (64, 80, 3), (96, 96, 3), (64, 80, 3), (96, 96, 3)]]
    out = segment_tiles(seg, images, batch_size=2)
    assert [o.shape for o in out] == [im.shape[:2] for im in images]
    for im, lab in zip(images, out):
        np.testing.assert_array_equal(lab, seg(im[None]).labels[0])


def test_upsampled_counts_match_full_upsampling():
    """Stability and area at tile resolution, measured in windows, equal those of whole upsampled masks."""
    from nucseg.model.infer import upsampled_counts

    logits = _blobs(30, seed=1)
    up = torch.nn.functional.interpolate(logits[:, None], size=(512, 512), mode="bilinear", align_corners=False)
    for h, w in ((512, 512), (480, 300)):
        counts = upsampled_counts(logits, (1.0, 0.0, -1.0), 4, h, w)
        ref = torch.stack([(up[:, 0, :h, :w] > t).flatten(1).sum(1) for t in (1.0, 0.0, -1.0)], 1)
        assert torch.equal(counts, ref)
    full = stability_score(up[:, 0], 0.0, 1.0)
    counts = upsampled_counts(logits, (1.0, 0.0, -1.0), 4, 512, 512)
    torch.testing.assert_close(counts[:, 0] / counts[:, 2], full)
