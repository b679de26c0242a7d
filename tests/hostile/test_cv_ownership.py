"""cv replaces summary.json / summary.md only if nucseg wrote them, and says so before any training (issue 24,
class 4)."""

from __future__ import annotations

import pytest

from nucseg_cli.main import main
from hostile_helpers import one_error


@pytest.mark.parametrize("name", ["summary.json", "summary.md"])
def test_a_foreign_summary_is_refused_before_training(name, tmp_path, capsys):
    from nucseg.learn.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", tiles_per_organ=1, size=64)
    out = tmp_path / "cv"
    out.mkdir()
    (out / name).write_text("my own notes\n")
    rc = main(["-q", "cv", "--data", str(data), "--out", str(out), "--folds", "2", "--model", "vit_tiny",
               "--device", "cpu", "--epochs", "1", "--batch-size", "2"])
    one_error(rc, capsys.readouterr().err, 6, str(out / name))
    assert (out / name).read_text() == "my own notes\n"
    assert sorted(p.name for p in out.iterdir()) == [name]  # no fold was trained


def test_markers_are_what_recognises_the_files():
    """summary.json carries a key, summary.md an HTML comment as its last line (invisible when rendered)."""
    from nucseg.learn.cv import SUMMARY_JSON, SUMMARY_MD

    assert SUMMARY_JSON.stamp({"a": 1}) == {"a": 1, "nucseg_file": "cv-summary"}
    text = SUMMARY_MD.stamp("| table |\n")
    assert text.endswith("<!-- nucseg_file: cv-summary -->\n") and SUMMARY_MD.strip(text) == "| table |\n"


def test_a_foreign_fold_metrics_file_is_neither_used_nor_replaced(tmp_path, capsys):
    """A ``fold_1/metrics.json`` nucseg did not write does not make the fold "done", and stays."""
    from nucseg.learn.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", tiles_per_organ=1, size=64)
    theirs = tmp_path / "cv" / "fold_1" / "metrics.json"
    theirs.parent.mkdir(parents=True)
    theirs.write_text('{"mean": {"dice": 1.0}}')
    rc = main(["-q", "cv", "--data", str(data), "--out", str(tmp_path / "cv"), "--folds", "2", "--model",
               "vit_tiny", "--device", "cpu", "--epochs", "1", "--batch-size", "2"])
    one_error(rc, capsys.readouterr().err, 6, str(theirs))
    assert theirs.read_text() == '{"mean": {"dice": 1.0}}' and not (theirs.parent / "train").exists()
