"""Seam proofs: every nucleus is kept exactly once, whole, wherever it falls relative to tile edges/corners."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pytest
import zarr
from skimage.draw import ellipse
from skimage.segmentation import relabel_sequential

from nucseg.model.classical import ThresholdSegmenter
from nucseg.wsi.predict import PredictConfig, predict_slide
from nucseg.wsi.stitch import StitchedLabels, Stitcher, keep_mask, label_moments
from nucseg.wsi.synthslide import make_synthetic_slide, match_instances, seam_positions
from nucseg.wsi.tiling import make_grid

TILE, OVERLAP = 512, 64


# ------------------------------------------------------------------------------------------- grid & rule
def test_owned_boxes_partition_the_slide():
    grid = make_grid(1300, 1000, 256, 64)
    owner_count = np.zeros((1000, 1300), dtype=np.int32)
    for iy in range(grid.ny):
        for ix in range(grid.nx):
            x_lo, x_hi, y_lo, y_hi = grid.owned(ix, iy)
            owner_count[max(y_lo, 0) : min(y_hi, 1000), max(x_lo, 0) : min(x_hi, 1300)] += 1
            x0, y0 = grid.origin(iy * grid.nx + ix)
            # the owned box lies inside the tile, at least overlap/2 from every interior side
            assert max(x_lo, 0) >= x0 and min(x_hi, 1300) <= x0 + grid.tile_size
    assert (owner_count == 1).all()
    # the last row/column reaches the slide edge
    last = grid.origin(grid.n - 1)
    assert last[0] + grid.tile_size >= 1300 and last[1] + grid.tile_size >= 1000


def test_tiles_overlapping_matches_brute_force():
    grid = make_grid(2000, 1500, 512, 64)
    rng = np.random.default_rng(1)
    xy = grid.origin(np.arange(grid.n))
    for _ in range(50):
        x0, y0 = rng.integers(0, 1900), rng.integers(0, 1400)
        x1, y1 = x0 + rng.integers(1, 600), y0 + rng.integers(1, 600)
        brute = np.flatnonzero((xy[:, 0] < x1) & (xy[:, 0] + 512 > x0) & (xy[:, 1] < y1) & (xy[:, 1] + 512 > y0))
        assert sorted(grid.tiles_overlapping(x0, x1, y0, y1).tolist()) == brute.tolist()


def _global_truth(height: int, width: int, seed: int) -> np.ndarray:
    """Ellipses on every seam crossing and along seams, plus odd-width blocks whose centroid is *exactly* on an
    ownership line (the tie the half-open rule must break the same way in both tiles)."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((height, width), dtype=np.int32)
    nid = 0

    def put(rr, cc):
        nonlocal nid
        ok = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        rr, cc = rr[ok], cc[ok]
        r0, r1, c0, c1 = max(rr.min() - 2, 0), rr.max() + 3, max(cc.min() - 2, 0), cc.max() + 3
        if (gt[r0:r1, c0:c1] > 0).any():  # keep nuclei 2 px apart so each stays one object
            return
        nid += 1
        gt[rr, cc] = nid

    ys, xs = seam_positions(height, 256, 64), seam_positions(width, 256, 64)
    for y in ys:
        for x in xs:
            rr, cc = ellipse(y + rng.uniform(-1, 1), x + rng.uniform(-1, 1), rng.uniform(4, 12), rng.uniform(4, 12),
                             shape=gt.shape, rotation=rng.uniform(0, np.pi))
            put(rr, cc)
    half = 32
    for k in range(1, 5):  # ownership lines x = k * 192 + 32, y likewise
        line = k * 192 + half
        for other in rng.uniform(20, min(height, width) - 20, size=4).astype(int):
            put(*np.mgrid[other - 3 : other + 4, line - 4 : line + 5].reshape(2, -1))  # centroid x == line
            put(*np.mgrid[line - 2 : line + 3, other - 6 : other + 7].reshape(2, -1))  # centroid y == line
    for _ in range(150):
        rr, cc = ellipse(rng.uniform(0, height), rng.uniform(0, width), rng.uniform(3, 12), rng.uniform(3, 12),
                         shape=gt.shape, rotation=rng.uniform(0, np.pi))
        if len(rr):
            put(rr, cc)
    return gt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rule_keeps_every_nucleus_exactly_once(seed):
    """Pure rule, no model: tiles are crops of a known label image; the stitch must reproduce it exactly."""
    height, width = 900, 1000
    gt = _global_truth(height, width, seed)
    grid = make_grid(width, height, 256, 64)
    index = np.arange(grid.n)
    stitcher = Stitcher(grid, index)
    tiles = []
    kept_per_gt = np.zeros(int(gt.max()) + 1, dtype=np.int64)
    for ci in index:
        x0, y0 = (int(v) for v in grid.origin(ci))
        crop = np.zeros((256, 256), dtype=np.int32)
        part = gt[y0 : y0 + 256, x0 : x0 + 256]
        crop[: part.shape[0], : part.shape[1]] = part
        local, fw, _ = relabel_sequential(crop)
        tiles.append(local.astype(np.int32))
        kept = stitcher.add(int(ci), local, np.ones(int(local.max()), np.float32))
        inv = np.zeros(int(local.max()) + 1, dtype=np.int64)
        inv[fw.out_values] = fw.in_values
        np.add.at(kept_per_gt, inv[kept.local_ids], 1)
    assert (kept_per_gt[1:] == 1).all(), "a nucleus was dropped or duplicated"
    assert stitcher.count == gt.max()
    stitched = StitchedLabels(grid, index, stitcher.kept, lambda ci: tiles[ci]).region(0, height, 0, width)
    ia, ib, iou = match_instances(gt, stitched)
    assert len(ia) == gt.max() and np.all(iou == 1.0)
    # the exact-on-line blocks exist, so the tie-break was exercised
    assert gt.max() > 60


def test_fragment_touching_interior_side_is_rejected():
    """An object larger than the overlap, cut by an interior tile side, is never kept as a fragment even when
    its (truncated) centroid is owned; on a slide border touching is fine."""
    grid = make_grid(1000, 1000, 256, 64)
    labels = np.zeros((256, 256), dtype=np.int32)
    labels[100:110, 150:256] = 1  # centroid x = 202.5 < owned x_hi = 224, but cut by the right (interior) side
    labels[150:160, 0:6] = 2  # on the slide's left border: allowed
    labels[200:210, 100:120] = 3  # ordinary interior nucleus
    keep, area, sx, _ = keep_mask(labels, 0, 0, grid, 0, 0)
    assert sx[1] / area[1] < grid.owned(0, 0)[1]  # owned by centroid ...
    assert not keep[1] and keep[2] and keep[3]  # ... yet rejected for touching


@pytest.mark.parametrize("shape, n, seed", [((64, 64), 1, 0), ((37, 53), 5, 1), ((128, 96), 300, 2), ((1, 7), 3, 3),
                                             ((9, 1), 3, 4), ((0, 5), 0, 5), ((8, 8), 0, 6)])
def test_label_moments_equal_the_pixel_sums(shape, n, seed):
    """The run-length sums equal the per-pixel ones exactly, including runs that reach a row's end and labels
    that continue on the next row (a run never crosses rows), for noise and for blobs."""
    rng = np.random.default_rng(seed)
    for labels in (rng.integers(0, n + 1, shape), np.repeat(rng.integers(0, n + 1, (shape[0], 1)), shape[1], 1)):
        labels = labels.astype(np.int32)
        rr, cc = np.indices(shape)
        top = int(labels.max()) if labels.size else 0
        area, sx, sy = label_moments(labels, top)
        ref = [np.bincount(labels.ravel(), weights=w.ravel(), minlength=top + 1) for w in (np.ones(shape), cc, rr)]
        ref[0][0] = ref[1][0] = ref[2][0] = 0  # background is not summed
        for got, want in zip((area, sx, sy), ref):
            assert got.dtype == np.float64 and np.array_equal(got, want)


# ------------------------------------------------------------------------------------------- whole pipeline
@pytest.fixture(scope="module")
def seam_slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("seams")
    gt = make_synthetic_slide(d / "seams.tif", 1500, 1500, mpp=0.5, seams=(TILE, OVERLAP), tissue_fraction=1.0, seed=3)
    out = d / "seams.geojson"
    cfg = PredictConfig(tile_size=TILE, overlap=OVERLAP, labels=d / "seams.labels.zarr", work_dir=d / "work")
    summary = predict_slide(d / "seams.tif", out, ThresholdSegmenter(), cfg)
    labels = np.asarray(zarr.open_group(str(d / "seams.labels.zarr"), mode="r")["labels/nuclei/0"][:])
    return d, gt, summary, labels, json.loads(out.read_text())


def test_seam_nuclei_are_really_on_seams(seam_slide):
    """Guard that the proof below is not vacuous: many nuclei straddle tile edges, ownership lines, corners."""
    _, gt, *_ = seam_slide
    from scipy import ndimage as ndi

    boxes = ndi.find_objects(gt)
    lines = seam_positions(1500, TILE, OVERLAP)

    def crosses(sl, pos):
        return any(sl.start < p < sl.stop - 1 for p in pos)

    x_cross = np.array([crosses(b[1], lines) for b in boxes])
    y_cross = np.array([crosses(b[0], lines) for b in boxes])
    assert x_cross.sum() > 100 and y_cross.sum() > 100
    assert (x_cross & y_cross).sum() > 20  # corners: crossing both a vertical and a horizontal line


def test_seams_every_nucleus_once_iou(seam_slide):
    _, gt, summary, labels, fc = seam_slide
    assert summary.nuclei == gt.max() == len(fc["features"])
    ia, ib, iou = match_instances(gt, labels)
    good = iou >= 0.9
    assert np.array_equal(np.sort(ia[good]), np.arange(1, gt.max() + 1)), "a GT nucleus is missing or split"
    assert np.array_equal(np.sort(ib[good]), np.arange(1, labels.max() + 1)), "a prediction is duplicated/spurious"
    ids = sorted(f["properties"]["nucleusId"] for f in fc["features"])
    assert ids == list(range(1, gt.max() + 1))


def test_tiled_equals_whole_image_prediction(seam_slide):
    d, gt, summary, labels, _ = seam_slide
    slide = openslide.OpenSlide(str(d / "seams.tif"))
    whole_rgb = np.asarray(slide.read_region((0, 0), 0, (1500, 1500)).convert("RGB"))
    whole, _ = ThresholdSegmenter().segment(whole_rgb)
    ia, ib, iou = match_instances(whole, labels)
    assert whole.max() == labels.max()
    identical = iou == 1.0
    assert identical.sum() == whole.max()
    assert len(np.unique(ia[identical])) == whole.max() and len(np.unique(ib[identical])) == labels.max()
