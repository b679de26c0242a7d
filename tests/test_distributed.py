"""Dask distributed scale-out on a local cluster of two worker processes (CPU, threshold segmenter):
identical outputs to the single-process run, failures recorded without stopping, finished slides skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nucseg.segmenter import SegmenterDefaults, SegmenterSpec
from nucseg.wsi.distributed import predict_distributed, worker_segmenter
from nucseg.errors import CheckpointError, DataError, InputError
from nucseg.wsi.batch import predict_slides
from nucseg.wsi.predict import PredictConfig, SlideOutputs
from nucseg.runlog import read_runlog
from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

THRESHOLD = ["--segmenter", "threshold", "--tile-size", "256", "--overlap", "48"]


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("slides")
    paths = [root / "a.tif", root / "b.tif", root / "c.tif"]
    for i, p in enumerate(paths):
        make_synthetic_slide(p, 900 + 100 * i, 800, mpp=0.5, nuclei=120, tissue_fraction=0.9, pyramid=False, seed=i)
    broken = root / "broken.svs"
    broken.write_text("not a slide")
    return [*paths, broken]


def test_cli_on_a_dask_cluster_matches_one_process(cluster, slides, tmp_path, capsys):
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main(["-q", "predict", *map(str, slides), "--out-dir", str(local), "--work-dir", str(tmp_path / "w1"),
                 *THRESHOLD]) == 9
    capsys.readouterr()
    argv = ["-q", "predict", *map(str, slides), "--out-dir", str(remote), "--work-dir", str(tmp_path / "w2"),
            "--scheduler", cluster.scheduler_address, *THRESHOLD]
    assert main(argv) == 9  # the broken slide fails, the others are done
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("nucseg: error: ")] == [
        f"nucseg: error: {slides[3]}: cannot open slide {slides[3]}: not a supported whole-slide format, or "
        "truncated/corrupt"]
    for s in slides[:3]:
        assert (remote / f"{s.stem}.geojson").read_bytes() == (local / f"{s.stem}.geojson").read_bytes()
        assert json.loads((remote / f"{s.stem}.summary.json").read_text())["nuclei"] > 50
    done = [e for e in read_runlog(remote / "nucseg-run.jsonl") if e["event"] == "done"]
    assert sorted(Path(e["slide"]).stem for e in done) == ["a", "b", "c"]
    assert {e["worker"] for e in done} == set(cluster.scheduler_info["workers"])  # both workers took part
    summary = json.loads((remote / "run-summary.json").read_text())
    assert (summary["slides"], summary["done"], summary["failed"], summary["skipped"]) == (4, 3, 1, 0)
    assert summary["nuclei"] == sum(e["nuclei"] for e in done)
    # a rerun skips the finished slides (on the workers, as predict_slides does) and retries the broken one
    stamp = (remote / "a.geojson").stat().st_mtime_ns
    assert main(argv) == 9
    summary = json.loads((remote / "run-summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 3, 1)
    assert (remote / "a.geojson").stat().st_mtime_ns == stamp
    assert [e["event"] for e in read_runlog(remote / "nucseg-run.jsonl")].count("run-end") == 2


def test_workers_build_the_segmenter_once_and_spread_the_slides(cluster, slides, tmp_path):
    from dask.distributed import Client

    spec = SegmenterSpec(kind="threshold", tile_size=256)
    cfg = PredictConfig(tile_size=256, overlap=48, work_dir=tmp_path / "work")
    started, finished = [], []
    with Client(cluster) as client:
        sums = predict_distributed(client, slides[:3], tmp_path / "out", spec, cfg, outputs=SlideOutputs(csv=True),
                                   on_start=started.append, on_result=finished.append)
        cache = client.run(lambda: worker_segmenter.cache_info()._asdict())
    assert [s.slide for s in sums] == [str(p) for p in slides[:3]]  # input order, whatever order they finished in
    assert started == [str(p) for p in slides[:3]] and len(finished) == 3
    assert all(s.error is None and s.nuclei > 50 for s in sums)
    assert all((tmp_path / "out" / f"{p.stem}.csv").is_file() for p in slides[:3])
    # two worker processes, each built the segmenter once and reused it for its later slides
    assert len(cache) == 2 and all(c["misses"] == 1 for c in cache.values())
    assert sum(c["hits"] for c in cache.values()) >= 1
    ref = predict_slides(slides[:3], tmp_path / "ref", spec.build(), cfg, outputs=SlideOutputs(csv=True))
    assert [s.nuclei for s in sums] == [s.nuclei for s in ref]


def test_client_side_checks(cluster, slides, tmp_path):
    from dask.distributed import Client

    with Client(cluster) as client:
        with pytest.raises(InputError, match="--work-dir"):
            predict_distributed(client, slides[:1], tmp_path / "o", SegmenterSpec(kind="threshold"), PredictConfig())
        with pytest.raises(InputError, match="share output names"):
            predict_distributed(client, [slides[0], slides[0]], tmp_path / "o", SegmenterSpec(kind="threshold"),
                                PredictConfig(work_dir=tmp_path / "w"))
    with pytest.raises(CheckpointError, match="not a nucseg adapter"):
        SegmenterSpec(adapter=str(tmp_path)).check()
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        SegmenterSpec(model="vit_tiny", checkpoint=str(tmp_path / "none.pth")).check()


def test_a_large_slide_is_split_over_the_workers(cluster, tmp_path):
    """One slide's tiles in ranges on both workers, then one stitching task: the single-process outputs."""
    import dataclasses

    from dask.distributed import Client

    slide = tmp_path / "big.tif"
    make_synthetic_slide(slide, 1400, 1400, mpp=0.5, nuclei=300, tissue_fraction=0.9, pyramid=False, seed=5)
    spec = SegmenterSpec(kind="threshold", tile_size=128)
    cfg = PredictConfig(tile_size=128, overlap=24, work_dir=tmp_path / "work")
    finished = []
    with Client(cluster) as client:
        [s] = predict_distributed(client, [slide], tmp_path / "out", spec, cfg, outputs=SlideOutputs(csv=True),
                                  tiles_per_task=50, on_result=finished.append)
    [ref] = predict_slides([slide], tmp_path / "ref", spec.build(), dataclasses.replace(cfg, work_dir=tmp_path / "w"),
                           outputs=SlideOutputs(csv=True))
    for name in ("big.geojson", "big.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert s.error is None and s.nuclei == ref.nuclei > 100
    parts = finished[0]["parts"]
    assert [(p["start"], p["stop"]) for p in parts] == [(a, min(a + 64, s.tissue_tiles))
                                                       for a in range(0, s.tissue_tiles, 64)]  # 50 -> 64 (flag chunk)
    assert len(parts) >= 3 and all("error" not in p for p in parts)
    assert sum(p["predicted"] for p in parts) == s.tissue_tiles == s.predicted_tiles  # the stitch task: no model
    assert json.loads((tmp_path / "out" / "big.summary.json").read_text())["predicted_tiles"] == 0
    assert {p["worker"] for p in parts} == set(cluster.scheduler_info["workers"])  # both workers took ranges
    # rerun: complete outputs are skipped (the planning task sees them and no range is sent)
    again = []
    with Client(cluster) as client:
        [s2] = predict_distributed(client, [slide], tmp_path / "out", spec, cfg, outputs=SlideOutputs(csv=True),
                                   tiles_per_task=50, on_result=again.append)
    assert s2.skipped and "parts" not in again[0]


def test_tile_ranges_must_be_aligned_to_flag_chunks(tmp_path):
    from nucseg.wsi.predict import predict_tile_range
    from nucseg.wsi.cache import FLAG_CHUNK

    slide = tmp_path / "s.tif"
    make_synthetic_slide(slide, 600, 600, mpp=0.5, nuclei=40, pyramid=False, seed=1)
    seg = SegmenterSpec(kind="threshold", tile_size=128).build()
    cfg = PredictConfig(tile_size=128, overlap=24, work_dir=tmp_path / "w")
    with pytest.raises(InputError, match="aligned"):
        predict_tile_range(slide, seg, cfg, 1, FLAG_CHUNK)
    with pytest.raises(InputError, match="work dir"):
        predict_tile_range(slide, seg, PredictConfig(tile_size=128, overlap=24), 0, 0)
    with pytest.raises(DataError, match="missing"):  # what range tasks use: never create the shared cache
        predict_tile_range(slide, seg, cfg, 0, FLAG_CHUNK, create=False)
    class NoFingerprint(SegmenterDefaults):  # no identity (fingerprint None): its predictions can never be shared
        tile_size, mpp = seg.tile_size, seg.mpp

        def __call__(self, tiles):
            return seg(tiles)

    volatile = NoFingerprint()
    with pytest.raises(InputError, match="fingerprint"):
        predict_tile_range(slide, volatile, cfg, 0, 0)
    n, predicted = predict_tile_range(slide, seg, cfg, 0, 0)  # creates the cache only
    assert n > 0 and predicted == 0
    assert predict_tile_range(slide, seg, cfg) == (n, n)  # then all of it
    assert predict_tile_range(slide, seg, cfg) == (n, 0)  # and nothing twice
