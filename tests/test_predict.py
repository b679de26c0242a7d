"""predict_slide / predict_slides end to end: µm/px, errors, atomic outputs, resume, batches of slides."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon

from nucseg.model.classical import ThresholdSegmenter
from nucseg.errors import InputError, OutputError, SlideError
from nucseg.wsi.batch import predict_slides
from nucseg.wsi.predict import PredictConfig, SlideOutputs, SlideSummary, predict_slide
from nucseg.segmenter import SegmenterDefaults, TileBatchResult
from nucseg.wsi.synthslide import make_synthetic_slide, match_instances


class Counting(SegmenterDefaults):
    """Wraps a segmenter and counts calls/tiles, optionally failing after some calls (a 'killed' job)."""

    def __init__(self, inner, fail_after: int | None = None, fingerprint: str | None = None):
        self.inner = inner
        self.tile_size = inner.tile_size
        self.mpp = inner.mpp
        self.fingerprint = fingerprint or inner.fingerprint
        self.calls = 0
        self.tiles = 0
        self.fail_after = fail_after

    def __call__(self, tiles: np.ndarray) -> TileBatchResult:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.tiles += len(tiles)
        return self.inner(tiles)


def _rasterise(fc: dict, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int32)
    for f in fc["features"]:
        ring = np.asarray(f["geometry"]["coordinates"][0])
        rr, cc = draw_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape=shape)
        out[rr, cc] = f["properties"]["nucleusId"]
    return out


def test_native_prediction_recovers_every_nucleus(small_slide, tmp_path):
    path, gt = small_slide
    seen = []
    summary = predict_slide(path, tmp_path / "o.geojson", ThresholdSegmenter(), PredictConfig(batch_size=3),
                            progress=lambda d, t: seen.append((d, t)))
    assert isinstance(summary, SlideSummary)
    assert summary.nuclei == gt.max() and summary.tiles == 9 and summary.tissue_tiles == 9
    assert summary.target_mpp == 0.5 and summary.seconds > 0
    assert seen[0] == (0, 9) and seen[-1] == (9, 9) and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    pred = _rasterise(json.loads((tmp_path / "o.geojson").read_text()), gt.shape)
    ia, ib, iou = match_instances(gt, pred)
    assert (iou >= 0.9).sum() == gt.max() == len(np.unique(ia[iou >= 0.9]))


@pytest.mark.parametrize("pyramid", [True, False])
def test_target_mpp_scales_back_to_level0(small_slide, tmp_path, pyramid):
    """1.0 µm/px on a 0.5 µm/px slide (pyramid level 1, or resampled level 0 when there is no pyramid):
    polygons are in level-0 pixels, so every nucleus lands on its own level-0 pixels."""
    if pyramid:
        path, gt = small_slide  # the same slide, pyramidal
    else:
        path = tmp_path / "m.tif"
        gt = make_synthetic_slide(path, 1200, 1000, mpp=0.5, nuclei=250, tissue_fraction=1.0, pyramid=False, seed=7)
    out = tmp_path / "m.geojson"
    summary = predict_slide(path, out, ThresholdSegmenter(min_size=6), PredictConfig(target_mpp=1.0))
    assert summary.target_mpp == pytest.approx(1.0) and summary.tiles == 2  # 600 x 500 target px
    pred = _rasterise(json.loads(out.read_text()), gt.shape)
    ia, ib, iou = match_instances(gt, pred)
    good = iou >= 0.6  # half-resolution outlines are coarser, but on the right pixels
    assert good.sum() == gt.max() == summary.nuclei
    cg = np.array(ndi.center_of_mass(gt > 0, gt, ia[good]))
    cp = np.array(ndi.center_of_mass(pred > 0, pred, ib[good]))
    assert np.hypot(*(cg - cp).T).max() < 1.5  # level-0 pixels


def test_segmenter_mpp_is_the_default_target(small_slide, tmp_path):
    path, gt = small_slide
    summary = predict_slide(path, tmp_path / "o.geojson", ThresholdSegmenter(mpp=1.0, min_size=6))
    assert summary.target_mpp == pytest.approx(1.0) and summary.nuclei == gt.max()
    summary = predict_slide(path, tmp_path / "o.geojson", ThresholdSegmenter(mpp=1.0), PredictConfig(target_mpp=0.5))
    assert summary.target_mpp == 0.5


def test_empty_slide_gives_empty_collection_and_warning(tmp_path):
    path = tmp_path / "empty.tif"
    make_synthetic_slide(path, 1000, 800, empty=True)
    out = tmp_path / "empty.geojson"
    with pytest.warns(UserWarning, match="no tissue"):
        summary = predict_slide(path, out, ThresholdSegmenter(), PredictConfig(labels=tmp_path / "e.zarr"))
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"] == []  # plus the "nucseg" provenance member
    assert set(fc) == {"type", "nucseg", "features"} and fc["nucseg"]["target_mpp"] == summary.target_mpp
    assert summary.nuclei == 0 and summary.tissue_tiles == 0 and summary.tiles > 0
    assert (tmp_path / "e.zarr" / ".zattrs").exists()


def test_missing_mpp_needs_override(tmp_path):
    path = tmp_path / "nompp.tif"
    gt = make_synthetic_slide(path, 800, 700, mpp=None, nuclei=80, tissue_fraction=1.0, pyramid=False)
    out = tmp_path / "o.geojson"
    with pytest.raises(SlideError, match="--slide-mpp"):
        predict_slide(path, out, ThresholdSegmenter())
    assert not out.exists()
    summary = predict_slide(path, out, ThresholdSegmenter(), PredictConfig(slide_mpp=0.5))
    assert summary.slide_mpp == 0.5 and summary.nuclei == gt.max()


def test_unreadable_slides_raise_slide_error_without_output(tmp_path, cmu_svs):
    out = tmp_path / "o.geojson"
    text = tmp_path / "fake.svs"
    text.write_bytes(b"II*\x00garbage" * 100)
    with pytest.raises(SlideError, match="fake.svs"):
        predict_slide(text, out, ThresholdSegmenter())
    trunc = tmp_path / "cut.svs"
    shutil.copyfile(cmu_svs, trunc)
    os.chmod(trunc, 0o644)
    with open(trunc, "r+b") as fh:
        fh.truncate(os.path.getsize(trunc) * 2 // 3)
    with pytest.raises(SlideError, match="cut.svs"):
        predict_slide(trunc, out, ThresholdSegmenter())
    with pytest.raises(InputError, match="not found"):
        predict_slide(tmp_path / "missing.svs", out, ThresholdSegmenter())
    assert not out.exists()


def test_unwritable_output_and_mid_run_failure_leave_no_partial_file(small_slide, tmp_path, monkeypatch):
    path, _ = small_slide
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OutputError, match="blocker"):
        predict_slide(path, blocker / "out.geojson", ThresholdSegmenter())
    with pytest.raises(OutputError):
        predict_slide(path, tmp_path / "ok.geojson", ThresholdSegmenter(), PredictConfig(csv=blocker / "x.csv"))
    assert not (tmp_path / "ok.geojson").exists()
    # a failure while features are being streamed out: no output file, no temporary left behind
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    import nucseg.wsi.predict as P

    real = P.instance_polygons
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "instance_polygons", flaky)
    with pytest.raises(OSError, match="disk full"):
        predict_slide(path, out_dir / "o.geojson", ThresholdSegmenter(), PredictConfig(csv=out_dir / "o.csv"))
    assert list(out_dir.iterdir()) == []


def test_resume_reuses_cache_and_is_byte_identical(small_slide, tmp_path):
    path, _ = small_slide
    cfg = PredictConfig(work_dir=tmp_path / "work", batch_size=2)
    first = Counting(ThresholdSegmenter())
    s1 = predict_slide(path, tmp_path / "a.geojson", first, cfg)
    assert first.tiles == 9 and s1.read_tiles == 9 and s1.predicted_tiles == 9
    again = Counting(ThresholdSegmenter())
    s2 = predict_slide(path, tmp_path / "b.geojson", again, cfg)
    assert again.calls == 0 and s2.read_tiles == 0 and s2.predicted_tiles == 0
    assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()
    # another model: predictions are redone, the tiles read from the slide are reused
    other = Counting(ThresholdSegmenter(threshold=0.12))
    s3 = predict_slide(path, tmp_path / "c.geojson", other, cfg)
    assert other.tiles == 9 and s3.read_tiles == 0
    # another geometry: a separate cache entry, nothing reused
    geo = Counting(ThresholdSegmenter())
    s4 = predict_slide(path, tmp_path / "d.geojson", geo, PredictConfig(work_dir=tmp_path / "work", overlap=96))
    assert geo.tiles == s4.tissue_tiles and s4.read_tiles == s4.tissue_tiles
    assert len(list((tmp_path / "work").glob("*.zarr"))) == 2


def test_killed_run_resumes_where_it_stopped(small_slide, tmp_path):
    path, _ = small_slide
    cfg = PredictConfig(work_dir=tmp_path / "work", batch_size=2)
    out = tmp_path / "o.geojson"
    with pytest.raises(KeyboardInterrupt):
        predict_slide(path, out, Counting(ThresholdSegmenter(), fail_after=2), cfg)
    assert not out.exists()
    rest = Counting(ThresholdSegmenter())
    summary = predict_slide(path, out, rest, cfg)
    assert rest.tiles == 9 - 4 and summary.predicted_tiles == 5  # 2 batches of 2 were already done
    fresh = tmp_path / "fresh.geojson"
    predict_slide(path, fresh, ThresholdSegmenter(), PredictConfig(batch_size=5))
    assert out.read_bytes() == fresh.read_bytes()


def test_tile_size_must_match_the_model(small_slide, tmp_path):
    path, _ = small_slide
    with pytest.raises(InputError, match="tile size"):
        predict_slide(path, tmp_path / "o.geojson", ThresholdSegmenter(tile_size=512), PredictConfig(tile_size=256))


def test_predict_slides_batch_skip_and_errors(small_slide, tmp_path):
    path, gt = small_slide
    second = tmp_path / "in" / "second.tif"
    make_synthetic_slide(second, 700, 600, nuclei=60, tissue_fraction=1.0, pyramid=False, seed=9)
    bad = tmp_path / "in" / "broken.svs"
    bad.write_text("nope")
    out = tmp_path / "out"
    seg = Counting(ThresholdSegmenter())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here should warn
        sums = predict_slides([path, second, bad], out, seg, PredictConfig(work_dir=tmp_path / "w"),
                              outputs=SlideOutputs(csv=True))
    assert [s.error is None for s in sums] == [True, True, False]
    assert "broken.svs" in sums[2].error
    assert sums[0].nuclei == gt.max() and sums[1].nuclei > 40
    assert (out / "small.geojson").exists() and (out / "second.csv").exists()
    assert json.loads((out / "small.summary.json").read_text())["nuclei"] == gt.max()
    calls = seg.calls
    again = predict_slides([path, second, bad], out, seg, PredictConfig(work_dir=tmp_path / "w"),
                           outputs=SlideOutputs(csv=True))
    assert [s.skipped for s in again] == [True, True, False]
    assert again[0].nuclei == gt.max() and seg.calls == calls
    with pytest.raises(InputError, match="share output names"):
        predict_slides([path, path], out, seg)


def test_slide_outputs_name_every_output_in_one_place(tmp_path):
    """One-slide (-o x.geojson) and batch (--out-dir) runs name their outputs from the same suffix table."""
    from nucseg.wsi.predict import output_base

    assert SlideOutputs(gz=True, csv=True, labels=True, preview=True).for_slide("/data/a.svs", tmp_path) == {
        "geojson": tmp_path / "a.geojson.gz", "summary": tmp_path / "a.summary.json", "csv": tmp_path / "a.csv",
        "labels": tmp_path / "a.labels.zarr", "preview": tmp_path / "a.preview.png"}
    assert SlideOutputs().for_slide("b.tiff", tmp_path) == {"geojson": tmp_path / "b.geojson",
                                                           "summary": tmp_path / "b.summary.json"}
    assert SlideOutputs(gz=True, parquet=True).for_slide("b.tiff", tmp_path)["geojson"] == tmp_path / "b.parquet"
    for name in ("x.geojson", "x.geojson.gz", "x.json", "x.parquet"):
        assert output_base(tmp_path / name) == str(tmp_path / "x")
    assert SlideOutputs(csv=True, tissue_preview=True).extras(output_base("r/x.geojson")) == {
        "csv": Path("r/x.csv"), "tissue_preview": Path("r/x.tissue.png")}


def test_rgb_tiles_are_cached_only_where_they_can_be_used_again(small_slide, tmp_path, monkeypatch):
    """``cache_tiles=None`` (the default): a temporary cache keeps no RGB tiles unless the stain measurements may
    read them back; a --work-dir keeps them for reruns. The outputs do not depend on it."""
    import nucseg.wsi.cache as cache_mod

    slide, _ = small_slide
    put = {"n": 0}
    real = cache_mod.TileCache.put_tiles

    def counted(self, *args, **kwargs):
        put["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cache_mod.TileCache, "put_tiles", counted)
    outputs = {}
    for name, kw, kept in [("temp-none", dict(measurements="none"), False),
                           ("work-none", dict(measurements="none", work_dir=tmp_path / "w"), True),
                           ("temp-full", dict(measurements="full"), True),
                           ("temp-full-off", dict(measurements="full", cache_tiles=False), False)]:
        put["n"] = 0
        cfg = PredictConfig(target_mpp=0.5, **kw)
        assert cfg.keeps_tiles() is kept
        predict_slide(slide, tmp_path / f"{name}.geojson", ThresholdSegmenter(), cfg)
        assert (put["n"] > 0) is kept, name
        outputs[name] = (tmp_path / f"{name}.geojson").read_bytes()
    assert outputs["temp-none"] == outputs["work-none"] and outputs["temp-full"] == outputs["temp-full-off"]


def test_no_tile_cache_writes_the_same_nuclei_and_still_resumes(small_slide, tmp_path):
    """`predict --no-tile-cache`: no RGB tile is kept in the work dir, the output is byte-identical to a run
    that keeps them (full measurements re-read the pixels), and a rerun resumes from the cached predictions."""
    from nucseg_cli.main import main

    slide, _ = small_slide
    args = ["-q", "predict", str(slide), "--segmenter", "threshold", "--mpp", "0.5"]
    assert main([*args, "-o", str(tmp_path / "kept.geojson"), "--work-dir", str(tmp_path / "w1")]) == 0
    assert main([*args, "-o", str(tmp_path / "lean.geojson"), "--work-dir", str(tmp_path / "w2"),
                 "--no-tile-cache"]) == 0
    assert (tmp_path / "lean.geojson").read_bytes() == (tmp_path / "kept.geojson").read_bytes()

    def tile_chunks(work: Path) -> int:
        return sum(1 for p in work.rglob("*") if p.is_file() and "/tiles/c." in p.as_posix())

    assert tile_chunks(tmp_path / "w1") > 0 and tile_chunks(tmp_path / "w2") == 0
    out = tmp_path / "lean.geojson"
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "w2").rglob("*")
             if p.is_file() and "/labels/c." in p.as_posix()}
    assert stamp
    assert main([*args, "-o", str(out), "--work-dir", str(tmp_path / "w2"), "--no-tile-cache"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())  # nothing predicted again
    assert out.read_bytes() == (tmp_path / "kept.geojson").read_bytes()
