"""Images and label maps are decoded honestly: scaled or refused with a message, never silently damaged.

16-bit RGB is scaled to 8 bits (it used to be clipped to white), float images outside [0, 1] are refused,
fractional or colour-coded label maps are refused (they used to be truncated / reduced to channel 0), and ids
beyond int32 get an honest message (they used to wrap around and be called "negative").
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

import nucseg.io as nio
from nucseg.errors import DataError, InputError
from nucseg.io import read_label_map, read_mask, read_rgb

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch):
    monkeypatch.setattr(nio, "_WARNED_DEPTH", set())


@pytest.mark.parametrize("kind", ["rgb.tif", "grey.png", "grey.tif"])
def test_16bit_images_are_scaled_not_clipped(tmp_path, kind):
    """(Pillow itself reduces 16-bit RGB PNGs to 8 bits; 16-bit grey PNGs and 16-bit TIFFs come as uint16.)"""
    path = tmp_path / kind
    want = RGB8 if kind.startswith("rgb") else np.repeat(RGB8[..., :1], 3, axis=-1)
    deep = want.astype(np.uint16) * 257 if kind.startswith("rgb") else RGB8[..., 0].astype(np.uint16) * 257
    (imsave(path, deep, check_contrast=False) if kind.endswith(".png") else tifffile.imwrite(path, deep))
    with pytest.warns(UserWarning, match=r"is a 16-bit image: scaled to 8 bits \(0-65535 -> 0-255\)"):
        img = read_rgb(path)
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img, want)  # exactly the 8-bit picture, not white


def test_the_depth_warning_is_given_once(tmp_path):
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"t{k}.tif")
        tifffile.imwrite(paths[-1], RGB8.astype(np.uint16) * 257)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for p in paths:
            read_rgb(p)
    assert len([w for w in caught if "16-bit" in str(w.message)]) == 1


def test_float_images(tmp_path):
    ok = tmp_path / "unit.tif"
    tifffile.imwrite(ok, RGB8.astype(np.float32) / 255.0, photometric="rgb")
    np.testing.assert_array_equal(read_rgb(ok), RGB8)
    for name, arr in (("big", RGB8.astype(np.float32)), ("neg", RGB8.astype(np.float32) / 255 - 0.5)):
        bad = tmp_path / f"{name}.tif"
        tifffile.imwrite(bad, arr, photometric="rgb")
        with pytest.raises(InputError, match=rf"image {bad} has float values outside \[0, 1\]"):
            read_rgb(bad)
    nan = tmp_path / "nan.tif"
    arr = RGB8.astype(np.float32) / 255.0
    arr[0, 0, 0] = np.nan
    tifffile.imwrite(nan, arr, photometric="rgb")
    with pytest.raises(InputError, match="outside"):
        read_rgb(nan)


def test_signed_images(tmp_path):
    ok = tmp_path / "ok.tif"
    tifffile.imwrite(ok, RGB8.astype(np.int16), photometric="rgb")
    np.testing.assert_array_equal(read_rgb(ok), RGB8)
    bad = tmp_path / "bad.tif"
    tifffile.imwrite(bad, RGB8.astype(np.int16) - 100, photometric="rgb")
    with pytest.raises(InputError, match="has signed int16 values in"):
        read_rgb(bad)


LABELS = np.zeros((30, 40), np.int32)
LABELS[2:8, 3:9] = 1
LABELS[10:20, 10:30] = 2
LABELS[22:28, 30:38] = 7


def test_integral_float_label_maps_are_read(tmp_path):
    p = tmp_path / "f.npy"
    np.save(p, LABELS.astype(np.float64))
    out = read_label_map(p)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, LABELS)


@pytest.mark.parametrize("value", [0.4, 1.6, 2.5])
def test_fractional_label_maps_are_refused(tmp_path, value):
    arr = LABELS.astype(np.float32)
    arr[LABELS == 2] = value
    p = tmp_path / "f.tif"
    tifffile.imwrite(p, arr)
    with pytest.raises(InputError, match=rf"label map {p} has non-integer values \(e.g. {value:g}\)"):
        read_label_map(p)
    arr[0, 0] = np.nan
    tifffile.imwrite(p, arr)
    with pytest.raises(InputError, match="NaN or infinite"):
        read_label_map(p)


def test_grey_label_maps_saved_as_rgb_are_read(tmp_path):
    p = tmp_path / "grey.png"
    imsave(p, np.repeat(LABELS.astype(np.uint8)[..., None], 3, axis=-1), check_contrast=False)
    np.testing.assert_array_equal(read_label_map(p), LABELS)
    rgba = tmp_path / "grey.tif"
    tifffile.imwrite(rgba, np.dstack([LABELS.astype(np.uint8)] * 3 + [np.full(LABELS.shape, 255, np.uint8)]))
    np.testing.assert_array_equal(read_label_map(rgba), LABELS)


def test_colour_coded_label_maps_are_refused(tmp_path):
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]] + [[0, 0, 255]] * 5, np.uint8)
    p = tmp_path / "colour.png"
    imsave(p, colours[LABELS], check_contrast=False)  # ids as colours: channel 0 alone would merge 2 and 7
    with pytest.raises(InputError, match=rf"label map {p} is a colour image \(its R, G and B differ\)"):
        read_label_map(p)


def test_uint32_ids_beyond_int32(tmp_path):
    fits = tmp_path / "fits.tif"
    tifffile.imwrite(fits, (LABELS.astype(np.uint32) * 1000))
    assert read_label_map(fits).max() == 7000
    big = tmp_path / "big.tif"
    arr = LABELS.astype(np.uint32)
    arr[LABELS == 7] = 2**31 + 5
    tifffile.imwrite(big, arr)
    with pytest.raises(InputError) as err:
        read_label_map(big)
    msg = str(err.value)
    assert "instance ids up to 2147483653, more than the 2,147,483,647 nucseg handles" in msg
    assert "negative" not in msg


def test_a_dataset_with_big_ids_is_not_called_negative(tmp_path):
    from nucseg.learn.data import SampleFiles, load_sample

    img, lab = tmp_path / "a.png", tmp_path / "a.tif"
    imsave(img, np.full((30, 40, 3), 200, np.uint8), check_contrast=False)
    arr = LABELS.astype(np.uint32)
    arr[LABELS == 2] = 3_000_000_000
    tifffile.imwrite(lab, arr)
    with pytest.raises(DataError, match="more than the 2,147,483,647") as err:
        load_sample(SampleFiles("organ", "a", img, lab, None))
    assert "negative" not in str(err.value)


def test_a_16bit_training_tile_is_not_white(tmp_path):
    from nucseg.learn.data import SampleFiles, load_sample

    img, lab = tmp_path / "a.tif", tmp_path / "a_labels.tif"
    tifffile.imwrite(img, RGB8[:30, :40].astype(np.uint16) * 257)
    tifffile.imwrite(lab, LABELS.astype(np.uint16))
    with pytest.warns(UserWarning, match="16-bit"):
        tile = load_sample(SampleFiles("organ", "a", img, lab, None))
    np.testing.assert_array_equal(tile.image, RGB8[:30, :40])


def test_masks_accept_any_binary_encoding(tmp_path):
    m = LABELS > 0
    for name, arr in (("grey.png", m.astype(np.uint8) * 255),
                      ("red.png", np.dstack([m.astype(np.uint8) * 255, np.zeros_like(m, np.uint8),
                                             np.zeros_like(m, np.uint8)])),
                      ("float.tif", m.astype(np.float32))):
        p = tmp_path / name
        (tifffile.imwrite(p, arr) if name.endswith(".tif") else imsave(p, arr, check_contrast=False))
        np.testing.assert_array_equal(read_mask(p), m)
