from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from nucseg.errors import DataError, InputError
from nucseg.io import read_label_map, read_rgb
from nucseg.learn.synthesis import (
    SynthesisConfig,
    compose,
    extract_nuclei,
    remove_nuclei,
    synthesize,
    transform_nucleus,
)


@pytest.fixture(scope="module")
def exemplars(he_sample: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two real tiles, one from each organ of the sample."""
    out = []
    for organ in sorted(p for p in he_sample.iterdir() if p.is_dir())[:2]:
        image_path = sorted((organ / "tissue images").glob("*.png"))[0]
        labels = read_label_map(organ / "label masks modify" / f"{image_path.stem}.tif")
        out.append((read_rgb(image_path), labels))
    return out


@pytest.fixture(scope="module")
def background(exemplars) -> np.ndarray:
    return remove_nuclei(*exemplars[0], np.random.default_rng(0))


def _assert_consecutive(labels: np.ndarray) -> int:
    ids = np.unique(labels)
    k = int(labels.max())
    assert np.array_equal(ids, np.arange(k + 1)), "instance ids must be 0..k without gaps"
    return k


def test_extract_nuclei_takes_every_whole_annotated_nucleus(exemplars):
    image, labels = exemplars[0]
    nuclei = extract_nuclei(image, labels, min_area=16, source=3)
    H, W = labels.shape
    expected = 0
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        touches = sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == H or sl[1].stop == W
        expected += (not touches) and (labels[sl] == lab).sum() >= 16
    assert len(nuclei) == expected > 50
    for nuc in nuclei:
        assert nuc.image.shape[:2] == nuc.mask.shape and nuc.image.dtype == np.uint8
        assert nuc.mask.sum() >= 16 and nuc.source == 3
        # the cut-out keeps a margin of tissue around the mask for the soft edge
        assert not nuc.mask[0].any() and not nuc.mask[-1].any()
        assert not nuc.mask[:, 0].any() and not nuc.mask[:, -1].any()


def test_remove_nuclei_fills_nuclei_and_keeps_the_rest(exemplars, background):
    image, labels = exemplars[0]
    assert background.shape == image.shape and background.dtype == np.uint8
    hole = ndi.binary_dilation(labels > 0, iterations=2)
    assert np.array_equal(background[~hole], image[~hole])  # tissue outside the nuclei is untouched
    nuclei = labels > 0
    # nuclei are dark (haematoxylin); after filling they look like the surrounding tissue
    before, after, tissue = image[nuclei].mean(), background[nuclei].mean(), image[~hole].mean()
    assert after > before + 20
    assert abs(after - tissue) < 15
    # the fill has texture, not a flat colour
    assert background[nuclei].astype(float).std(axis=0).min() > 3


def test_transform_nucleus_scales_and_keeps_a_soft_edge(exemplars):
    image, labels = exemplars[0]
    nuclei = extract_nuclei(image, labels)
    cfg = SynthesisConfig(scale=(0.8, 1.25))
    rng = np.random.default_rng(0)
    for nuc in nuclei[:40]:
        img_t, mask_t, alpha = transform_nucleus(nuc, rng, cfg)
        assert img_t.shape[:2] == mask_t.shape == alpha.shape
        ratio = mask_t.sum() / nuc.mask.sum()
        assert 0.8**2 * 0.75 < ratio < 1.25**2 * 1.3  # area follows the scale (pixelisation aside)
        assert (alpha[mask_t] == 1).all() and alpha.min() >= 0 and alpha.max() <= 1
        assert ndi.label(mask_t)[1] == 1
        ring = ndi.binary_dilation(mask_t, iterations=2) & ~mask_t
        assert 0 < alpha[ring].mean() < 1  # soft edge just outside the mask
        assert alpha[~ndi.binary_dilation(mask_t, iterations=5)].max() < 0.05


def test_compose_reports_what_it_pastes(exemplars, background):
    pool = extract_nuclei(*exemplars[0]) + extract_nuclei(*exemplars[1])
    image, labels, placed = compose(background, pool, 60, np.random.default_rng(1))
    assert image.shape == background.shape and labels.shape == background.shape[:2]
    assert labels.dtype == np.int32
    assert placed == _assert_consecutive(labels)
    assert 50 <= placed <= 60
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.min() >= 8  # every reported instance is really there (half of a >=16 px nucleus at least)
    near = ndi.binary_dilation(labels > 0, iterations=5)
    assert np.array_equal(image[~near], background[~near])  # only the pasted places changed
    diff = np.abs(image.astype(int) - background.astype(int)).mean(-1)
    per_nucleus = ndi.mean(diff, labels, np.arange(1, placed + 1))
    assert (per_nucleus > 10).mean() > 0.9  # pasted nuclei are visible on the filled background
    assert image[labels > 0].mean() < image[~near].mean() - 20  # and they are dark, as nuclei are


def test_compose_never_overlaps_and_respects_the_gap(exemplars, background):
    pool = extract_nuclei(*exemplars[0])
    cfg = SynthesisConfig(min_gap=2)
    _, labels, placed = compose(background, pool, 150, np.random.default_rng(2), cfg)
    assert placed == _assert_consecutive(labels) > 40
    # two different instances never come within the gap (diamond neighbourhood, as the dilation)
    H, W = labels.shape
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            if (dy, dx) == (0, 0) or abs(dy) + abs(dx) > 2:
                continue
            a = labels[max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)]
            b = labels[max(-dy, 0) : H + min(-dy, 0), max(-dx, 0) : W + min(-dx, 0)]
            assert not ((a > 0) & (b > 0) & (a != b)).any()
    # each pasted nucleus away from the tile edge is one connected piece: none was cut by a later one
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl[0].start > 0 and sl[1].start > 0 and sl[0].stop < H and sl[1].stop < W:
            assert ndi.label(labels[sl] == k)[1] == 1


def test_synthesize_counts_sizes_and_density(exemplars):
    cfg = SynthesisConfig(n_per_exemplar=2, nuclei_per_tile=(20, 30))
    out = synthesize(exemplars, rng=np.random.default_rng(0), cfg=cfg)
    assert len(out) == 4
    for (image, labels), (ex_img, _) in zip(out, exemplars * 2):
        assert image.shape == ex_img.shape and image.dtype == np.uint8
        assert labels.dtype == np.int32
        assert 20 <= _assert_consecutive(labels) <= 30

    dens = synthesize(exemplars, n=2, rng=np.random.default_rng(0), cfg=SynthesisConfig())
    for (_, labels), (_, ex_lab) in zip(dens, exemplars):
        n_ex = len(np.unique(ex_lab)) - 1
        assert 0.6 * n_ex <= labels.max() <= 1.25 * n_ex + 1  # density of the exemplar used as background


def test_synthesize_is_deterministic(exemplars):
    cfg = SynthesisConfig(nuclei_per_tile=(15, 25))
    a = synthesize(exemplars, n=2, rng=np.random.default_rng(5), cfg=cfg)
    b = synthesize(exemplars, n=2, rng=np.random.default_rng(5), cfg=cfg)
    c = synthesize(exemplars, n=2, rng=np.random.default_rng(6), cfg=cfg)
    for (ia, la), (ib, lb) in zip(a, b):
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
    assert not np.array_equal(a[0][1], c[0][1])
    # without an rng the config seed decides
    d = synthesize(exemplars, n=1, cfg=SynthesisConfig(nuclei_per_tile=(5, 5), seed=3))
    e = synthesize(exemplars, n=1, cfg=SynthesisConfig(nuclei_per_tile=(5, 5), seed=3))
    assert np.array_equal(d[0][0], e[0][0])


def test_synthesize_rejects_unusable_exemplars(exemplars):
    image, labels = exemplars[0]
    with pytest.raises(InputError):
        synthesize([], n=1)
    with pytest.raises(DataError):
        synthesize([(image, np.zeros_like(labels))], n=1)
    with pytest.raises(InputError):
        synthesize([(image, labels[:10])], n=1)
