"""Hostile inputs of ``nucseg predict`` (one slide): identity, not names (issue 24, classes 5 and 9).

The resume cache must give a slide its own nuclei whatever its name, and a cache whose chunks decode to
other values than were written (swapped, deleted, a tampered ``zarr.json``) is damage: recomputed with a
warning, never read as data. See tests/hostile/CATALOGUE.md.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nucseg.model.classical import ThresholdSegmenter
from nucseg.wsi.cache import CHUNK_TILES
from nucseg.wsi.predict import PredictConfig, predict_slide
from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main

T, OVERLAP = 128, 24
SEG = ThresholdSegmenter(tile_size=T)


def _two_level_tiff(path: Path, level0: np.ndarray, level1: np.ndarray) -> None:
    """A generic tiled TIFF of two levels at 0.5 µm/px (what OpenSlide's quickhash hashes is the smaller)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, level in enumerate((level0, level1)):
            px_per_cm = 1e4 / (0.5 * 2**k)
            tw.write(level, photometric="rgb", tile=(256, 256), compression="zlib", subfiletype=0 if k == 0 else 1,
                     metadata=None, resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")


def _features(path: Path) -> list:
    return json.loads(path.read_text())["features"]


def test_two_slides_sharing_name_and_quickhash_each_get_their_own_nuclei(tmp_path, capsys):
    """Same file stem, same OpenSlide quickhash (identical smallest level), different level 0, one --work-dir:
    the second slide's outputs are its own, as a run with a fresh work dir makes them."""
    import openslide

    rendered = []
    for seed in (1, 2):
        src = tmp_path / f"src{seed}.tif"
        make_synthetic_slide(src, 512, 512, mpp=0.5, nuclei=40, tissue_fraction=1.0, pyramid=False, seed=seed)
        rendered.append(tifffile.imread(src))
    small = np.full((256, 256, 3), (232, 162, 198), np.uint8)  # the same smallest level for both
    a, b = tmp_path / "a" / "slide.tif", tmp_path / "b" / "slide.tif"
    _two_level_tiff(a, rendered[0], small)
    _two_level_tiff(b, rendered[1], small)
    quick = [openslide.OpenSlide(str(p)).properties["openslide.quickhash-1"] for p in (a, b)]
    assert quick[0] == quick[1]  # the trap: name and quickhash agree, the slides do not

    def run(slide: Path, out: Path, work: Path) -> list:
        argv = ["-q", "predict", str(slide), "-o", str(out), "--work-dir", str(work), "--segmenter", "threshold",
                "--tile-size", str(T), "--overlap", str(OVERLAP)]
        assert main(argv) == 0, capsys.readouterr().err
        return _features(out)

    first = run(a, tmp_path / "a.geojson", tmp_path / "work")
    second = run(b, tmp_path / "b.geojson", tmp_path / "work")
    fresh = run(b, tmp_path / "b-fresh.geojson", tmp_path / "fresh-work")
    assert [f["geometry"] for f in first] != [f["geometry"] for f in fresh]  # the slides' nuclei differ
    assert second == fresh


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    slide = root / "s.tif"
    make_synthetic_slide(slide, 600, 500, mpp=0.5, nuclei=60, tissue_fraction=1.0, pyramid=False, seed=5)
    summary, notes = _run(slide, root / "out", root / "work")
    assert notes == [] and summary.predicted_tiles == summary.tissue_tiles == 30
    [cache] = (root / "work").glob("*.zarr")
    return {"slide": slide, "out": _files(root / "out"), "work": root / "work", "cache": cache.name}


def _run(slide: Path, out: Path, work: Path, **kw):
    cfg = PredictConfig(tile_size=T, overlap=OVERLAP, work_dir=work, labels=out / "s.labels.zarr", **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = predict_slide(slide, out / "s.geojson", SEG, cfg)
    return summary, [str(w.message) for w in caught if "tile cache" in str(w.message)]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pred(cache: Path) -> Path:
    [pred] = (p for p in (cache / "pred").iterdir() if p.is_dir())
    return pred


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)


def _separator(meta: Path) -> None:
    doc = json.loads(meta.read_text())
    doc["chunk_key_encoding"]["configuration"]["separator"] = "/"  # every chunk now "missing": reads as fill
    meta.write_text(json.dumps(doc))


TAMPER = [
    # (id, damage, tiles predicted again)
    ("labels-chunks-swapped", lambda p: _swap(p / "labels/c.0.0.0", p / "labels/c.1.0.0"), 2 * CHUNK_TILES),
    ("scores-chunks-swapped", lambda p: _swap(p / "scores/c.1.0", p / "scores/c.2.0"), 2 * CHUNK_TILES),
    ("labels-chunk-deleted", lambda p: (p / "labels/c.2.0.0").unlink(), CHUNK_TILES),
    ("labels-zarr-json-separator", lambda p: _separator(p / "labels/zarr.json"), 30),
]


@pytest.mark.parametrize("case", TAMPER, ids=[c[0] for c in TAMPER])
def test_cache_chunks_that_decode_to_other_values_are_recomputed(case, clean, tmp_path):
    import shutil

    _, damage, redone = case
    work = tmp_path / "work"
    shutil.copytree(clean["work"], work)
    damage(_pred(work / clean["cache"]))
    summary, notes = _run(clean["slide"], tmp_path / "out", work)
    assert len(notes) == 1 and "its tiles are read and predicted again" in notes[0]
    assert summary.predicted_tiles == redone
    assert _files(tmp_path / "out") == clean["out"]  # byte-identical to the clean run
    again, notes = _run(clean["slide"], tmp_path / "again", work)
    assert notes == [] and again.predicted_tiles == 0 and _files(tmp_path / "again") == clean["out"]


def test_swapped_tile_chunks_are_read_from_the_slide_again(clean, tmp_path):
    """Another model reads the cached RGB tiles back: two swapped tile chunks are read from the slide instead."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(clean["work"], work)
    _swap(work / clean["cache"] / "tiles/c.0.0.0.0", work / clean["cache"] / "tiles/c.1.0.0.0")
    summary, notes = _run(clean["slide"], tmp_path / "out", work, model_fingerprint="another-model")
    assert len(notes) == 1 and summary.read_tiles == 2 * CHUNK_TILES and summary.predicted_tiles == 30
    assert _files(tmp_path / "out") == clean["out"]


class _FakeSlide:
    """What slide_identity reads of an open slide: properties and the pyramid."""

    def __init__(self, vendor: str):
        self.properties = {"openslide.vendor": vendor}
        self.level_dimensions = [(512, 512)]
        self.level_downsamples = [1.0]


def test_identity_covers_the_companion_files_of_a_mirax_slide(tmp_path):
    """A MIRAX slide's pixels live in the folder beside its .mrxs: a change there is a change of the slide."""
    from nucseg.wsi.slide import slide_identity

    mrxs = tmp_path / "x.mrxs"
    mrxs.write_bytes(b"[GENERAL]\nSLIDE_ID=1\n")
    (tmp_path / "x").mkdir()
    data = tmp_path / "x" / "Data0000.dat"
    data.write_bytes(b"\x01" * 4096)
    before = slide_identity(_FakeSlide("mirax"), mrxs)
    data.write_bytes(b"\x02" * 4096)
    assert slide_identity(_FakeSlide("mirax"), mrxs) != before
    assert before.startswith("content:")


def test_identity_of_a_large_file_samples_its_bytes(tmp_path, monkeypatch):
    """Over WHOLE_FILE_BYTES only head, tail and sampled blocks are hashed: a change in a sampled block (where a
    level-0 tile lies) changes the identity; the name and the path never do."""
    import nucseg.wsi.slide as slide_mod

    monkeypatch.setattr(slide_mod, "WHOLE_FILE_BYTES", 1 << 16)
    monkeypatch.setattr(slide_mod, "IDENTITY_EDGE", 1 << 12)
    monkeypatch.setattr(slide_mod, "IDENTITY_BLOCK", 1 << 10)
    raw = bytearray(np.random.default_rng(0).integers(0, 256, 1 << 20, np.uint8).tobytes())
    a, b = tmp_path / "a.svs", tmp_path / "elsewhere" / "b.svs"
    b.parent.mkdir()
    a.write_bytes(raw)
    b.write_bytes(raw)
    seen = slide_mod.slide_identity(_FakeSlide("aperio"), a)
    assert slide_mod.slide_identity(_FakeSlide("aperio"), b) == seen  # content, not name or place
    step = ((1 << 20) - 2 * (1 << 12)) / (slide_mod.IDENTITY_BLOCKS + 1)
    raw[(1 << 12) + int(step * 5) + 7] ^= 0xFF  # a byte inside the 5th sampled block
    a.write_bytes(raw)
    assert slide_mod.slide_identity(_FakeSlide("aperio"), a) != seen


def test_the_same_slide_moved_elsewhere_reuses_its_cache(clean, tmp_path):
    """The identity is the content: a copy of the slide under another folder finds its predictions."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(clean["work"], work)
    moved = tmp_path / "moved" / "s.tif"
    moved.parent.mkdir()
    shutil.copyfile(clean["slide"], moved)
    summary, notes = _run(moved, tmp_path / "out", work)
    assert notes == [] and summary.predicted_tiles == 0 and summary.read_tiles == 0
    assert _files(tmp_path / "out") == clean["out"]
