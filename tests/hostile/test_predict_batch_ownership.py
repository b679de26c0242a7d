"""A batch run's bookkeeping files (run-summary.json, nucseg-run.jsonl, <stem>.summary.json) are replaced or
appended to only if nucseg wrote them; a symlinked log is not followed (issue 24, class 4)."""

from __future__ import annotations

import json
import os

import pytest

from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main
from hostile_helpers import one_error


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    paths = []
    for i in range(2):
        paths.append(root / f"s{i}.tif")
        make_synthetic_slide(paths[-1], 300, 260, mpp=0.5, nuclei=8, tissue_fraction=1.0, pyramid=False, seed=i)
    return paths


def _argv(slides, out):
    return ["-q", "predict", *map(str, slides), "--out-dir", str(out), "--segmenter", "threshold"]


@pytest.mark.parametrize("name", ["run-summary.json", "nucseg-run.jsonl"])
def test_foreign_bookkeeping_files_are_refused_before_any_slide(name, slides, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text('{"mine": true}\n')
    one_error(main(_argv(slides, out)), capsys.readouterr().err, 6, str(out / name))
    assert (out / name).read_text() == '{"mine": true}\n'
    assert not list(out.glob("*.geojson"))


def test_a_symlinked_run_log_is_not_followed(slides, tmp_path, capsys):
    victim = tmp_path / "elsewhere.jsonl"
    victim.write_text("")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "nucseg-run.jsonl")
    one_error(main(_argv(slides, out)), capsys.readouterr().err, 6, "nucseg-run.jsonl")
    assert victim.read_text() == ""


def test_a_foreign_slide_summary_fails_that_slide_only_and_stays(slides, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / "s0.summary.json"
    theirs.write_text('{"slide": "someone else", "nuclei": 3}')
    rc = main(_argv(slides, out))
    err = capsys.readouterr().err
    assert rc == 9 and "s0.summary.json" in err and "Traceback" not in err
    assert theirs.read_text() == '{"slide": "someone else", "nuclei": 3}'
    assert json.loads((out / "s1.summary.json").read_text())["nucseg_file"] == "slide-summary"


def test_a_rerun_appends_to_its_own_log_and_replaces_its_summary(slides, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(slides, out)) == 0 and main(_argv(slides, out)) == 0
    lines = [json.loads(line) for line in (out / "nucseg-run.jsonl").read_text().splitlines()]
    assert [e["event"] for e in lines].count("run-start") == 2 and {e["nucseg_file"] for e in lines} == {"run-log"}
    assert json.loads((out / "run-summary.json").read_text())["skipped"] == 2


def test_a_symlinked_output_is_not_written_through(slides, tmp_path, capsys):
    """``<stem>.geojson`` is a link to someone's file: that slide fails, the file it points to is untouched."""
    victim = tmp_path / "theirs.geojson"
    victim.write_text('{"type": "FeatureCollection", "features": []}')
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "s0.geojson")
    rc = main(_argv(slides, out))
    assert rc == 9 and "s0.geojson" in capsys.readouterr().err
    assert victim.read_text() == '{"type": "FeatureCollection", "features": []}' and (out / "s0.geojson").is_symlink()
