"""Hostile reruns of ``nucseg predict`` on several slides (--out-dir): identity, not names (issue 24, class 6).

A finished slide is skipped only if its outputs were made from this very slide (content) by this model with
these settings. Another model, other settings, another slide of the same name, or a summary that records no
identity: the run is refused with one line naming --overwrite, nothing is touched; --overwrite redoes them.
The Dask path refuses such slides one by one (failed, naming --overwrite). See tests/hostile/CATALOGUE.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nucseg.model.classical import ThresholdSegmenter
from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main


def _slides(root: Path) -> list[Path]:
    paths = [root / "in" / "a.tif", root / "in" / "b.tif"]
    for i, p in enumerate(paths):
        make_synthetic_slide(p, 400, 300, mpp=0.5, nuclei=30, tissue_fraction=1.0, pyramid=False, seed=10 + i)
    return paths


def _argv(slides: list[Path], root: Path, *extra: str, tile: int = 128) -> list[str]:
    return ["-q", "predict", *map(str, slides), "--out-dir", str(root / "out"), "--work-dir", str(root / "work"),
            "--segmenter", "threshold", "--tile-size", str(tile), "--overlap", "24", *extra]


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith(("a.", "b."))}


@pytest.fixture()
def finished(tmp_path, capsys):
    slides = _slides(tmp_path)
    assert main(_argv(slides, tmp_path)) == 0
    capsys.readouterr()
    return slides, _outputs(tmp_path / "out")


RERUNS = [
    # (id, extra options, tile size): another model (the threshold segmenter's tile size is part of its
    # fingerprint), other settings that change the outputs
    ("another-model", (), 256),
    ("other-measurements", ("--measurements", "shape"), 128),
]


@pytest.mark.parametrize("case", RERUNS, ids=[c[0] for c in RERUNS])
def test_a_rerun_with_another_model_or_settings_is_refused_then_overwritten(case, finished, tmp_path, capsys):
    _, extra, tile = case
    slides, before = finished
    assert main(_argv(slides, tmp_path, *extra, tile=tile)) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nucseg: error: ") and "--overwrite" in err[0], err
    assert "by another model or with other settings" in err[0] and "(and 1 more slides)" in err[0]
    assert _outputs(tmp_path / "out") == before  # nothing skipped silently, nothing touched
    assert main(_argv(slides, tmp_path, *extra, "--overwrite", tile=tile)) == 0
    out = capsys.readouterr().out
    assert "skipped" not in out
    after = _outputs(tmp_path / "out")
    assert after["a.geojson"] != before["a.geojson"] or after["a.summary.json"] != before["a.summary.json"]
    assert main(_argv(slides, tmp_path, *extra, tile=tile)) == 0  # now finished with these settings: skipped
    assert capsys.readouterr().out.count("skipped (done)") == 2


def test_the_same_model_and_settings_skip_finished_slides(finished, tmp_path, capsys):
    slides, before = finished
    assert main(_argv(slides, tmp_path)) == 0
    assert capsys.readouterr().out.count("skipped (done)") == 2
    assert _outputs(tmp_path / "out") == before


def test_another_slide_of_the_same_name_is_refused(finished, tmp_path, capsys):
    slides, before = finished
    make_synthetic_slide(slides[1], 400, 300, mpp=0.5, nuclei=30, tissue_fraction=1.0, pyramid=False, seed=99)
    assert main(_argv(slides, tmp_path)) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.summary.json" in err[0] and "from another slide of the same name" in err[0]
    assert "--overwrite" in err[0] and _outputs(tmp_path / "out") == before


def test_a_summary_without_identity_is_not_taken_as_finished(finished, tmp_path, capsys):
    """A summary.json that records no identity (an older nucseg, or edited) cannot prove what made the outputs."""
    slides, before = finished
    summary = tmp_path / "out" / "a.summary.json"
    doc = json.loads(summary.read_text())
    doc.pop("identity", None)
    summary.write_text(json.dumps(doc))
    assert main(_argv(slides, tmp_path)) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.summary.json" in err[0] and "recorded no identity" in err[0]


def test_a_dask_rerun_with_another_model_fails_those_slides_naming_overwrite(finished, tmp_path):
    from dask.distributed import Client, LocalCluster

    from nucseg.segmenter import SegmenterSpec
    from nucseg.wsi.distributed import predict_distributed
    from nucseg.wsi.predict import PredictConfig

    slides, before = finished
    cfg = PredictConfig(tile_size=256, overlap=24, work_dir=tmp_path / "work")
    spec = SegmenterSpec(kind="threshold", tile_size=256)
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        got = predict_distributed(client, slides, tmp_path / "out", spec, cfg, tiles_per_task=0)
        assert all(s.error and "--overwrite" in s.error and not s.skipped for s in got), got
        assert _outputs(tmp_path / "out") == before
        again = predict_distributed(client, slides, tmp_path / "out", spec, cfg, tiles_per_task=0, overwrite=True)
    assert all(s.error is None and not s.skipped for s in again)
    fresh = [json.loads((tmp_path / "out" / f"{p.stem}.summary.json").read_text()) for p in slides]
    assert all(d["provenance"]["tile_size"] == 256 for d in fresh)
    assert ThresholdSegmenter(tile_size=256).fingerprint != ThresholdSegmenter(tile_size=128).fingerprint
