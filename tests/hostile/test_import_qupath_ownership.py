"""import-qupath replaces its report only if nucseg wrote it (issue 24, class 4)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from nucseg_cli.main import main
from hostile_helpers import one_error


def _inputs(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 230, np.uint8)).save(tmp_path / "img.png")
    square = [[[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]]]
    (tmp_path / "x.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"objectType": "detection"}}]}))
    return ["-q", "import-qupath", str(tmp_path / "img.png"), str(tmp_path / "x.geojson"), "--out", str(tmp_path / "ds")]


def test_a_foreign_report_of_that_name_is_refused_before_anything_is_written(tmp_path, capsys):
    argv = _inputs(tmp_path)
    report = tmp_path / "ds" / "qupath" / "qupath-import.json"
    report.parent.mkdir(parents=True)
    report.write_text('{"my": "notes"}')
    one_error(main(argv), capsys.readouterr().err, 6, str(report))
    assert report.read_text() == '{"my": "notes"}'
    assert sorted(p.name for p in report.parent.iterdir()) == ["qupath-import.json"]  # no tiles either


def test_its_own_report_is_replaced_on_a_rerun(tmp_path, capsys):
    argv = _inputs(tmp_path)
    assert main(argv) == 0 and main(argv) == 0
    report = json.loads((tmp_path / "ds" / "qupath" / "qupath-import.json").read_text())
    assert report["nucseg_file"] == "qupath-import" and report["tiles"] == 1
