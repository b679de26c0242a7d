"""One seam-correct tiling path for plain images (segment, cv scoring) — the grid, ownership rule and stitcher
of whole slides, in memory (issue 13)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from nucseg.segmenter import SegmenterDefaults, TileBatchResult
from nucseg.wsi.stitch import stitch_image
from nucseg.wsi.synthslide import make_synthetic_slide


class LocalSegmenter(SegmenterDefaults):
    """Purely local: connected components of dark pixels. Its answer for a nucleus depends only on the pixels
    of that nucleus, so a seam-correct stitch must equal one pass over the whole image."""

    def __init__(self, tile_size: int):
        self.tile_size = tile_size
        self.calls = 0

    def __call__(self, tiles: np.ndarray) -> TileBatchResult:
        self.calls += 1
        labels, scores = [], []
        for t in tiles:
            lab, n = ndi.label(t.mean(-1) < 128, structure=np.ones((3, 3)))
            labels.append(lab.astype(np.int32))
            scores.append(np.ones(n, np.float32))
        return TileBatchResult(np.stack(labels), scores)


def _same_instances(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or ((a > 0) != (b > 0)).any():
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_nuclei_on_every_seam_are_whole_and_single(tmp_path):
    T, overlap = 128, 32
    gt = make_synthetic_slide(tmp_path / "s.tif", 700, 530, mpp=0.5, nuclei=40, seams=(T, overlap), pyramid=False,
                              tissue_fraction=1.0, diameter=(8.0, 20.0), seed=3)
    image = np.where((gt > 0)[..., None], 40, 235).astype(np.uint8).repeat(3, -1)[..., :3]
    seg = LocalSegmenter(T)
    got = stitch_image(seg, image, overlap=overlap, batch_size=5)
    whole, n = ndi.label(gt > 0, structure=np.ones((3, 3)))
    assert got.shape == gt.shape
    assert _same_instances(got, whole)  # = one pass over the whole image
    assert _same_instances(got, gt)  # every nucleus, seam ones included, once and whole
    assert len(np.unique(got[got > 0])) == gt.max()
    assert seg.calls == -(-len(range(0, 700 - overlap, T - overlap)) * len(range(0, 530 - overlap, T - overlap)) // 5)


def test_small_images_are_one_call(tmp_path):
    from nucseg.segment import segment_image

    seg = LocalSegmenter(128)
    img = np.full((100, 90, 3), 235, np.uint8)
    img[10:20, 10:20] = 30
    labels = segment_image(seg, img)
    assert seg.calls == 1 and labels.shape == (100, 90) and labels.max() == 1
