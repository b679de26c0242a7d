from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from nucseg.learn.demo import make_demo_dataset
from nucseg.io import read_label_map, read_rgb

ORGANS = ("demo organ a", "demo organ b")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert make_demo_dataset(root) == root
    return root


def _stems(folder: Path, suffix: str) -> list[str]:
    return sorted(p.stem for p in folder.iterdir() if p.suffix == suffix)


def test_exact_nuinsseg_layout(demo_root):
    assert sorted(p.name for p in demo_root.iterdir()) == list(ORGANS)
    for organ in ORGANS:
        base = demo_root / organ
        folders = sorted(p.name for p in base.iterdir())
        assert folders == ["label masks modify", "mask binary", "tissue images", "vague areas"]
        stems = _stems(base / "tissue images", ".png")
        assert len(stems) == 6 and stems[0] == organ.replace(" ", "_") + "_01"
        assert _stems(base / "label masks modify", ".tif") == stems
        assert _stems(base / "mask binary", ".png") == stems
        assert _stems(base / "vague areas" / "mask binary", ".png") == stems
    # atomic writes leave no temporary files behind
    assert not [p for p in demo_root.rglob(".*")]


def test_files_are_readable_and_consistent(demo_root):
    any_vague = 0
    for organ in ORGANS:
        base = demo_root / organ
        for png in sorted((base / "tissue images").glob("*.png")):
            image = read_rgb(png)
            labels = read_label_map(base / "label masks modify" / f"{png.stem}.tif")
            binary = read_label_map(base / "mask binary" / png.name)
            vague = read_label_map(base / "vague areas" / "mask binary" / png.name)
            assert image.shape == (256, 256, 3) and image.dtype == np.uint8
            assert labels.shape == binary.shape == vague.shape == (256, 256)
            ids = np.unique(labels)
            assert len(ids) > 20 and np.array_equal(ids, np.arange(ids.max() + 1))
            sizes = np.bincount(labels.ravel())[1:]
            assert sizes.min() >= 20 and sizes.max() < np.pi * 10 * 10 * 1.6  # ~8-20 px, irregular outlines
            assert set(np.unique(binary)) <= {0, 255} and np.array_equal(binary > 0, labels > 0)
            assert set(np.unique(vague)) <= {0, 255}
            assert not (labels[vague > 0] > 0).any()  # ambiguous areas carry no instance
            any_vague += bool(vague.any())
            # nuclei are dark and purple, stroma lighter and pink: haematoxylin vs eosin
            nuc, bg = image[labels > 0].astype(float).mean(0), image[labels == 0].astype(float).mean(0)
            assert nuc.sum() < bg.sum() - 120
            assert bg[0] > bg[1] and bg[2] > bg[1]  # pink/magenta tissue: green absorbed most
    assert 0 < any_vague < 12


def test_touching_nuclei_exist(demo_root):
    labels = read_label_map(demo_root / ORGANS[1] / "label masks modify" / "demo_organ_b_01.tif")
    grown = ndi.grey_dilation(labels, size=3)
    touching = (labels > 0) & (grown != labels)
    assert touching.any()


def test_organs_differ_and_dataset_is_deterministic(demo_root, tmp_path):
    a = read_label_map(demo_root / ORGANS[0] / "label masks modify" / "demo_organ_a_01.tif")
    b = read_label_map(demo_root / ORGANS[1] / "label masks modify" / "demo_organ_b_01.tif")
    assert b.max() > 1.3 * a.max()  # organ b is denser
    make_demo_dataset(tmp_path, tiles_per_organ=2)
    for organ, stem in ((ORGANS[0], "demo_organ_a_01"), (ORGANS[1], "demo_organ_b_02")):
        for sub, suffix in (("tissue images", ".png"), ("label masks modify", ".tif")):
            assert (tmp_path / organ / sub / f"{stem}{suffix}").read_bytes() == (
                demo_root / organ / sub / f"{stem}{suffix}"
            ).read_bytes()
    other = tmp_path / "other"
    make_demo_dataset(other, tiles_per_organ=1, seed=1)
    assert not np.array_equal(read_rgb(other / ORGANS[0] / "tissue images" / "demo_organ_a_01.png"),
                              read_rgb(demo_root / ORGANS[0] / "tissue images" / "demo_organ_a_01.png"))


def test_custom_organs_and_size(tmp_path):
    make_demo_dataset(tmp_path, organs=("Kidney (human)",), tiles_per_organ=1, size=128)
    image = read_rgb(tmp_path / "Kidney (human)" / "tissue images" / "kidney_human_01.png")
    assert image.shape == (128, 128, 3)


def test_mixed_cells_span_lymphocytes_to_vesicular_nuclei(tmp_path):
    """The demo's own tiles (cells="mixed") differ from the base's: small dark lymphocytes and large pale
    vesicular nuclei in one tile, and many touching nuclei."""
    from nucseg.learn.demo import QUICK

    make_demo_dataset(tmp_path, tiles_per_organ=4, size=QUICK.size, zoom=QUICK.zoom, stain=QUICK.stain, cells="mixed")
    diameters, touching, nuclei = [], 0, 0
    for organ in ORGANS:
        for tif in sorted((tmp_path / organ / "label masks modify").glob("*.tif")):
            labels = read_label_map(tif)
            image = read_rgb(tmp_path / organ / "tissue images" / f"{tif.stem}.png").astype(float).sum(-1)
            ids = np.unique(labels)[1:]
            area = ndi.sum_labels(np.ones_like(labels), labels, ids)
            diameters += list(2 * np.sqrt(area / np.pi))
            grown = ndi.grey_dilation(labels, size=3)
            touching += len(np.unique(labels[(labels > 0) & (grown != labels)]))
            nuclei += len(ids)
            if len(ids):  # large nuclei are paler inside than small ones: vesicular vs lymphocyte chromatin
                dark = ndi.mean(image, labels, ids)
                big, small = dark[area >= np.pi * 16**2], dark[area <= np.pi * 9**2]
                if len(big) and len(small):
                    assert big.mean() > small.mean() + 60
    diameters = np.array(diameters)
    assert (diameters < 22).mean() > 0.2 and (diameters > 34).mean() > 0.1 and diameters.max() < 58
    assert touching > 0.3 * nuclei


def test_demo_slide_matches_the_tiles_and_recall_counts_by_size(tmp_path):
    from nucseg.learn.demo import SIZE_CLASSES, make_demo_slide, recall_by_size
    from nucseg.wsi.slide import open_slide, slide_mpp

    labels = make_demo_slide(tmp_path / "s.tif", 256, stain="ruifrok", cells="mixed", mpp=0.5)
    assert labels.shape == (256, 256) and labels.max() > 20
    sl = open_slide(tmp_path / "s.tif")
    assert sl.dimensions == (256, 256) and slide_mpp(sl) == pytest.approx(0.5)
    sl.close()
    rows = recall_by_size(labels, labels, mpp=0.5)
    assert [r["size"] for r in rows] == [c[0] for c in SIZE_CLASSES]
    assert sum(r["nuclei"] for r in rows) == labels.max() and all(r["missed"] == 0 for r in rows if r["nuclei"])
    shifted = np.roll(labels, 3, axis=1)  # a shift misses the small nuclei (IoU < 0.5) before the large ones
    rows = recall_by_size(labels, shifted, mpp=0.5)
    assert rows[0]["recall"] < rows[-1]["recall"]
