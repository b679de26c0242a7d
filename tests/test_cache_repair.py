"""A damaged --work-dir cache is repaired, never fatal, and never a reason to delete what nucseg did not make.

Each case damages one kind of chunk of a finished slide's zarr cache on disk (truncated, or overwritten with
random bytes), reruns, and checks: one warning, only the damaged work redone, outputs byte-identical to the
clean run, and a clean cache afterwards. Batches record a slide whose cache stays damaged, or a bug met on
one slide, as failed in run-summary.json and go on with the next slide.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import nucseg.wsi.predict as predict_mod
from nucseg.model.classical import ThresholdSegmenter
from nucseg.errors import OutputError
from nucseg.wsi.predict import PredictConfig, predict_slide
from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg.wsi.cache import CHUNK_TILES, TileCache, is_nucseg_cache
from nucseg_cli.main import main

T, OVERLAP = 128, 24
SEG = ThresholdSegmenter(tile_size=T)


def _cfg(out: Path, work: Path, **kw) -> PredictConfig:
    return PredictConfig(tile_size=T, overlap=OVERLAP, work_dir=work, csv=out / "s.csv", labels=out / "s.labels.zarr",
                         **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(slide: Path, out: Path, work: Path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = predict_slide(slide, out / "s.geojson", SEG, _cfg(out, work, **kw))
    return summary, [str(w.message) for w in caught if "tile cache" in str(w.message)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("repair")
    slide = root / "s.tif"
    make_synthetic_slide(slide, 600, 500, mpp=0.5, nuclei=60, tissue_fraction=1.0, pyramid=False, seed=5)
    summary, notes = _run(slide, root / "out", root / "work")
    assert notes == [] and summary.predicted_tiles == summary.tissue_tiles == 30
    [cache] = (root / "work").glob("*.zarr")
    return {"slide": slide, "out": _files(root / "out"), "work": root / "work", "cache": cache.name,
            "nuclei": summary.nuclei}


def _truncate(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)


def _garbage(f: Path) -> None:
    f.write_bytes(np.random.default_rng(1).integers(0, 256, max(os.path.getsize(f), 16), np.uint8).tobytes())


def _pred(cache: Path) -> Path:
    [pred] = (p for p in (cache / "pred").iterdir() if p.is_dir())
    return pred


CASES = [
    # (id, chunk file under the cache, damage, tiles predicted again, other model fingerprint); predictions are
    # chunked by CHUNK_TILES = 8 tiles, so a damaged one costs its 8 tiles (the last chunk of 30 holds 6)
    ("labels-truncated", lambda c: _pred(c) / "labels/c.1.0.0", _truncate, CHUNK_TILES, None),
    ("labels-garbage", lambda c: _pred(c) / "labels/c.3.0.0", _garbage, 30 - 3 * CHUNK_TILES, None),
    ("scores-truncated", lambda c: _pred(c) / "scores/c.0.0", _truncate, CHUNK_TILES, None),
    ("done-flags-truncated", lambda c: _pred(c) / "done/c.0", _truncate, 30, None),
    ("n_inst-garbage", lambda c: _pred(c) / "n_inst/c.0", _garbage, 30, None),
    ("tiles_done-garbage", lambda c: c / "tiles_done/c.0", _garbage, 0, None),
    ("coords-garbage", lambda c: c / "coords/c.0.0", _garbage, 0, None),
    ("pred-metadata-garbage", lambda c: _pred(c) / "zarr.json", _garbage, 30, None),
    # tiles are only read back when a prediction is missing: predict with another model fingerprint
    ("tile-truncated", lambda c: c / "tiles/c.1.0.0.0", _truncate, 30, "another-model"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_chunks_are_recomputed_and_outputs_identical(case, clean, tmp_path):
    _, chunk, damage, redone, model = case
    work = tmp_path / "work"
    shutil.copytree(clean["work"], work)
    f = chunk(work / clean["cache"])
    assert f.is_file(), f
    damage(f)
    out = tmp_path / "out"
    summary, notes = _run(clean["slide"], out, work, model_fingerprint=model)
    assert summary.predicted_tiles == redone
    if model is None and redone == 0:
        assert len(notes) == 1  # flags of tiles whose predictions are all there: the tiles are merely re-read
        assert summary.read_tiles == 0
    if model is not None:
        assert summary.read_tiles == CHUNK_TILES  # only the damaged chunk's tiles came from the slide again
    assert len(notes) == 1 and "its tiles are read and predicted again" in notes[0]
    assert _files(out) == clean["out"]  # byte-identical to the clean run
    again, notes = _run(clean["slide"], tmp_path / "again", work, model_fingerprint=model)
    assert notes == [] and again.predicted_tiles == 0 and again.read_tiles == 0  # the cache is whole again
    assert _files(tmp_path / "again") == clean["out"]


def _set_done(cache: Path, tiles: slice, value: bool) -> None:
    """Mark predictions done / not done on disk, as a run killed before (or after) writing them leaves them."""
    import zarr

    done = zarr.open_array(str(_pred(cache) / "done"), mode="r+")
    flags = done[:]
    flags[tiles] = value
    done[:] = flags


def test_batches_that_split_prediction_chunks_merge_them(clean, tmp_path):
    """Batches not aligned to the prediction chunks (another batch size, or a resumed run whose missing tiles
    start mid-chunk) merge each chunk's done tiles with the new ones: same outputs, and a rerun redoes nothing."""
    summary, notes = _run(clean["slide"], tmp_path / "out", tmp_path / "work", batch_size=3)
    assert notes == [] and summary.predicted_tiles == 30
    assert _files(tmp_path / "out") == clean["out"]
    work = tmp_path / "resumed"
    shutil.copytree(clean["work"], work)
    _set_done(work / clean["cache"], slice(5, 19), False)  # killed after tile 4: chunks 0 and 2 are split
    summary, notes = _run(clean["slide"], tmp_path / "out2", work, batch_size=5)
    assert notes == [] and summary.predicted_tiles == 14
    assert _files(tmp_path / "out2") == clean["out"]
    again, _ = _run(clean["slide"], tmp_path / "out3", work)
    assert again.predicted_tiles == 0 and _files(tmp_path / "out3") == clean["out"]


def test_tile_chunks_split_by_batches_keep_their_cached_tiles(clean, tmp_path):
    """Tiles cached by batches of 3 (chunks written in parts, merged), then another model reads every tile back
    from the cache, none from the slide; outputs as the clean run's."""
    work = tmp_path / "work"
    s1, _ = _run(clean["slide"], tmp_path / "out1", work, batch_size=3)
    assert s1.read_tiles == 30 and _files(tmp_path / "out1") == clean["out"]
    s2, notes = _run(clean["slide"], tmp_path / "out2", work, batch_size=5, model_fingerprint="another-model")
    assert notes == [] and s2.predicted_tiles == 30 and s2.read_tiles == 0
    assert _files(tmp_path / "out2") == clean["out"]


def test_a_damaged_tile_chunk_found_while_merging_is_read_from_the_slide(clean, tmp_path):
    """Tiles 8-10 to read (batches of 3), 11-15 cached in the same chunk, which is damaged: the merge keeps what
    it can, marks 11-15 not read, and they come from the slide; one warning, outputs as the clean run's."""
    import zarr

    work = tmp_path / "work"
    shutil.copytree(clean["work"], work)
    cache = work / clean["cache"]
    flags = zarr.open_array(str(cache / "tiles_done"), mode="r+")
    done = flags[:]
    done[CHUNK_TILES : CHUNK_TILES + 3] = False
    flags[:] = done
    _truncate(cache / "tiles/c.1.0.0.0")
    summary, notes = _run(clean["slide"], tmp_path / "out", work, batch_size=3, model_fingerprint="another-model")
    assert len(notes) == 1 and summary.read_tiles == CHUNK_TILES and summary.predicted_tiles == 30
    assert _files(tmp_path / "out") == clean["out"]
    again, notes = _run(clean["slide"], tmp_path / "again", work, model_fingerprint="a-third-model")
    assert notes == [] and again.read_tiles == 0  # the chunk was written whole again


def test_tiles_lost_to_a_damaged_chunk_are_unflagged_before_it_is_rewritten(tmp_path):
    """Merging into a damaged chunk rewrites it with fill for the tiles it lost; those must be marked not done on
    disk first, or a kill between the two writes would leave fill values flagged as predictions / tiles."""
    T, K = 16, 8
    coords = np.zeros((16, 2), np.int64)
    coords[:, 0] = np.arange(16) * T
    root = tmp_path / "c.zarr"
    cache = TileCache(root, {"k": 1}, coords, T, "model", K)
    labels = np.ones((CHUNK_TILES, T, T), np.int32)
    cache.put_predictions(np.arange(CHUNK_TILES), labels, [np.ones(1, np.float32)] * CHUNK_TILES)
    cache.put_tiles(np.arange(CHUNK_TILES), np.zeros((CHUNK_TILES, T, T, 3), np.uint8))
    _truncate(_pred(root) / "labels/c.0.0.0")
    _truncate(root / "tiles/c.0.0.0.0")

    class Killed(Exception):
        pass

    class KilledOnWrite:  # the process dies as it writes the merged chunk
        def __init__(self, array):
            self.array, self.shape, self.dtype = array, array.shape, array.dtype

        def __getitem__(self, key):
            return self.array[key]

        def __setitem__(self, key, value):
            raise Killed

    fresh = TileCache(root, {"k": 1}, coords, T, "model", K)
    fresh._pred_done[:3] = False  # tiles 0-2 to predict again, 3-7 kept from the damaged chunk
    fresh._pred["labels"] = KilledOnWrite(fresh._pred["labels"])
    with pytest.raises(Killed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.put_predictions(np.arange(3), labels[:3], [np.ones(1, np.float32)] * 3)
    fresh._tiles_done[:3] = False
    fresh.tiles = KilledOnWrite(fresh.tiles)
    with pytest.raises(Killed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.put_tiles(np.arange(3), np.zeros((3, T, T, 3), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = TileCache(root, {"k": 1}, coords, T, "model", K)  # what a rerun finds on disk
    assert not after.pred_done[3:CHUNK_TILES].any() and not after.tiles_done[3:CHUNK_TILES].any()


def test_a_split_chunk_found_damaged_when_merging_is_predicted_again(clean, tmp_path):
    """A batch that covers part of a damaged chunk cannot keep the chunk's other tiles: they are marked not done,
    the batch is written (the chunk decodes again) and a repair pass predicts them; outputs unchanged."""
    work = tmp_path / "work"
    shutil.copytree(clean["work"], work)
    cache = work / clean["cache"]
    _set_done(cache, slice(CHUNK_TILES, CHUNK_TILES + 3), False)  # 3 tiles of chunk 1 to predict; 5 kept
    _truncate(_pred(cache) / "labels/c.1.0.0")
    summary, notes = _run(clean["slide"], tmp_path / "out", work)
    assert len(notes) == 1 and "its tiles are read and predicted again" in notes[0]
    assert summary.predicted_tiles == CHUNK_TILES  # the 3, then the 5 the damage took
    assert _files(tmp_path / "out") == clean["out"]
    again, notes = _run(clean["slide"], tmp_path / "again", work)
    assert notes == [] and again.predicted_tiles == 0 and _files(tmp_path / "again") == clean["out"]


def test_damage_that_survives_repair_is_one_error(clean, tmp_path, monkeypatch):
    """Storage that keeps returning damaged bytes: a bounded number of passes, then one OutputError."""
    work = tmp_path / "work"
    shutil.copytree(clean["work"], work)
    calls = []

    def always_damaged(self, i):
        calls.append(i)
        raise self.discard([int(i)], "labels")

    class Damaged:  # what zarr does with a chunk whose bytes do not decode
        def __getitem__(self, key):
            raise ValueError("corrupt chunk")

    monkeypatch.setattr(TileCache, "get_prediction", always_damaged)
    monkeypatch.setattr(TileCache, "prediction_arrays", property(lambda self: (Damaged(), Damaged())))
    with pytest.raises(OutputError, match=r"still returns damaged predictions \(tiles \[0\]\) after 2 repairs"):
        _run(clean["slide"], tmp_path / "out", work)
    assert len(calls) == predict_mod.MAX_CACHE_REPAIRS + 1
    assert not (tmp_path / "out").exists() or _files(tmp_path / "out") == {}


def test_the_cache_never_deletes_a_folder_it_did_not_make(clean, tmp_path):
    work = tmp_path / "work"
    mine = work / clean["cache"]
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my thesis")
    assert not is_nucseg_cache(mine)
    with pytest.raises(OutputError, match=f"{mine} is in the way of the tile cache and is not one"):
        _run(clean["slide"], tmp_path / "out", work)
    assert (mine / "notes.txt").read_text() == "my thesis"
    mine.rename(tmp_path / "moved")
    mine.write_text("a file")  # a file in the way
    with pytest.raises(OutputError, match="is in the way"):
        _run(clean["slide"], tmp_path / "out", work)
    assert mine.read_text() == "a file"


def test_a_half_created_cache_of_ours_is_rebuilt(clean, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(clean["work"], work)
    cache = work / clean["cache"]
    meta = json.loads((cache / "zarr.json").read_text())
    meta["attributes"].pop("key")  # killed before the key was written
    (cache / "zarr.json").write_text(json.dumps(meta))
    assert is_nucseg_cache(cache)
    summary, _ = _run(clean["slide"], tmp_path / "out", work)
    assert summary.predicted_tiles == 30
    assert _files(tmp_path / "out") == clean["out"]
    (cache / "zarr.json").write_bytes(b"\x00garbage")  # our members, metadata unreadable: still ours
    assert is_nucseg_cache(cache)
    summary, _ = _run(clean["slide"], tmp_path / "out2", work)
    assert summary.predicted_tiles == 30


def _batch(tmp_path: Path, slides: list[Path]) -> tuple[Path, list[str]]:
    (tmp_path / "list.txt").write_text("".join(f"{s}\n" for s in slides))
    return tmp_path / "out", ["-q", "predict", "--input-list", str(tmp_path / "list.txt"), "--out-dir",
                              str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--segmenter", "threshold",
                              "--tile-size", str(T), "--overlap", str(OVERLAP)]


def test_a_batch_counts_a_slide_whose_cache_stays_damaged_and_goes_on(clean, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.tif"
    shutil.copyfile(clean["slide"], bad)
    original = TileCache.get_prediction

    def damaged_for_bad(self, i):
        if self.root.name.startswith("bad-"):
            raise self.discard([int(i)], "labels")
        return original(self, i)

    class Damaged:  # what zarr does with a chunk whose bytes do not decode
        def __getitem__(self, key):
            raise ValueError("corrupt chunk")

    arrays = TileCache.prediction_arrays.fget

    monkeypatch.setattr(TileCache, "get_prediction", damaged_for_bad)
    monkeypatch.setattr(predict_mod._Ready, "take", lambda self, a, b: None)  # read every prediction back
    monkeypatch.setattr(TileCache, "prediction_arrays", property(
        lambda self: (Damaged(), Damaged()) if self.root.name.startswith("bad-") else arrays(self)))
    out, argv = _batch(tmp_path, [bad, clean["slide"]])
    assert main(argv) == 9
    err = capsys.readouterr().err
    assert f"nucseg: error: {bad}: tile cache" in err and "Traceback" not in err
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["failed"] == 1 and summary["done"] == 1
    assert summary["failures"][0]["slide"] == str(bad)
    assert (out / "s.geojson").is_file() and not (out / "bad.geojson").exists()


def test_a_bug_on_one_slide_is_counted_the_batch_goes_on_and_the_bug_is_raised(clean, tmp_path, monkeypatch):
    buggy = tmp_path / "buggy.tif"
    shutil.copyfile(clean["slide"], buggy)
    original = predict_mod._stitch_and_export

    def export(cache, plan, out, cfg, *rest):
        if plan.view.path.name == "buggy.tif":
            raise ZeroDivisionError("a bug")
        return original(cache, plan, out, cfg, *rest)

    monkeypatch.setattr(predict_mod, "_stitch_and_export", export)
    out, argv = _batch(tmp_path, [buggy, clean["slide"]])
    with pytest.raises(ZeroDivisionError, match="a bug"):  # a bug keeps its traceback, after the other slides
        main(argv)
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["failed"] == 1 and summary["done"] == 1
    assert summary["failures"][0] == {"slide": str(buggy), "error": "internal error: ZeroDivisionError: a bug"}
    assert (out / "s.geojson").is_file()


def test_deferred_flags_reach_the_disk_on_flush_or_after_the_interval(tmp_path, monkeypatch):
    """A pass writes its done flags at most every FLAG_FLUSH_S seconds (and when it ends); the data always first.
    Without ``defer`` (any other caller) they are written at once, as before."""
    import nucseg.wsi.cache as cache_mod

    n, t = 20, 16
    coords = np.stack([np.arange(n) * t, np.zeros(n, np.int64)], 1)
    root = tmp_path / "c.zarr"
    on_disk = lambda: TileCache(root, {"k": 1}, coords, t, "m", 4)  # noqa: E731 - what a rerun would find
    cache = on_disk()
    labels = np.ones((CHUNK_TILES, t, t), np.int32)
    monkeypatch.setattr(cache_mod, "FLAG_FLUSH_S", 3600.0)
    cache.put_predictions(np.arange(CHUNK_TILES), labels, [np.ones(1, np.float32)] * CHUNK_TILES, defer=True)
    cache.put_tiles(np.arange(CHUNK_TILES), np.zeros((CHUNK_TILES, t, t, 3), np.uint8), defer=True)
    assert cache.pred_done[:CHUNK_TILES].all() and cache.tiles_done[:CHUNK_TILES].all()  # in memory at once
    assert not on_disk().pred_done.any() and not on_disk().tiles_done.any()
    cache.flush()
    again = on_disk()
    assert again.pred_done.tolist() == again.tiles_done.tolist() == [True] * CHUNK_TILES + [False] * (n - CHUNK_TILES)
    np.testing.assert_array_equal(again.get_labels(3), labels[3])
    monkeypatch.setattr(cache_mod, "FLAG_FLUSH_S", 0.0)  # the interval has passed: the next batch writes them
    cache.put_predictions(np.arange(8, 16), labels, [np.ones(1, np.float32)] * CHUNK_TILES, defer=True)
    assert on_disk().pred_done[:16].all()
    cache.put_predictions(np.arange(16, 20), labels[:4], [np.ones(1, np.float32)] * 4)  # not deferred
    assert on_disk().pred_done.all()


def test_a_pass_that_fails_keeps_what_it_wrote(clean, tmp_path, monkeypatch):
    """The flags a pass deferred are written when it fails too: a rerun predicts only the rest."""
    import nucseg.wsi.cache as cache_mod

    monkeypatch.setattr(cache_mod, "FLAG_FLUSH_S", 3600.0)
    calls = {"n": 0}

    class FailsOnThirdBatch(ThresholdSegmenter):
        def __call__(self, tiles):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("the model failed")
            return super().__call__(tiles)

    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="the model failed"):
        predict_slide(clean["slide"], tmp_path / "out" / "s.geojson", FailsOnThirdBatch(tile_size=T),
                      _cfg(tmp_path / "out", work, batch_size=4))
    summary, notes = _run(clean["slide"], tmp_path / "out", work, batch_size=4)
    assert notes == [] and summary.predicted_tiles == 30 - 2 * 4  # the two batches before the failure were kept
    assert _files(tmp_path / "out") == clean["out"]


def test_a_flag_write_that_fails_is_tried_again_by_the_next_flush(tmp_path, monkeypatch):
    """A failed flush (a transient OSError) keeps its chunks pending, so the finished work is still flagged later."""
    import nucseg.wsi.cache as cache_mod

    n, t = 8, 16
    coords = np.stack([np.arange(n) * t, np.zeros(n, np.int64)], 1)
    root = tmp_path / "c.zarr"
    cache = TileCache(root, {"k": 1}, coords, t, "m", 4)
    monkeypatch.setattr(cache_mod, "FLAG_FLUSH_S", 3600.0)
    cache.put_predictions(np.arange(n), np.ones((n, t, t), np.int32), [np.ones(1, np.float32)] * n, defer=True)
    real = cache_mod._write_chunks

    def fails(array, values, indices):
        raise OSError(5, "injected I/O error")

    monkeypatch.setattr(cache_mod, "_write_chunks", fails)
    with pytest.raises(OSError, match="injected"):
        cache.flush()
    monkeypatch.setattr(cache_mod, "_write_chunks", real)
    cache.flush()
    assert TileCache(root, {"k": 1}, coords, t, "m", 4).pred_done.all()
