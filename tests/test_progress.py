"""Progress for batch logs: the library's SlideProgress events, drawn by the CLI as one plain line per
interval when stderr is not a terminal (SLURM logs), per slide and per batch."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from nucseg.progress import SlideProgress, SlideReporter, in_batch
from nucseg_cli.main import main
from nucseg_cli.progress import SlideProgressView, mode

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

LINE = re.compile(r"^nucseg: progress: (.+): tiles (\d+)/(\d+) \((\d+)%\), (\S+) tiles/s, ([\d,]+) nuclei, ETA (\S+)")


def test_non_tty_predict_of_the_real_slide_logs_progress_lines(cmu_svs, tmp_path, capsys):
    out = tmp_path / "cmu.geojson"
    rc = main(["predict", str(cmu_svs), "-o", str(out), "--segmenter", "threshold", "--measurements", "none",
               "--progress-interval", "0.01", "--json"])  # stderr is captured (not a terminal): --progress auto = log
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)["slides"][0]
    lines = [m.groups() for m in map(LINE.match, captured.err.splitlines()) if m]
    assert len(lines) >= 3, captured.err
    total = summary["tissue_tiles"]
    assert {int(t) for _, _, t, *_ in lines} == {total}
    done = [int(d) for _, d, *_ in lines]
    assert done == sorted(done) and done[0] < total and done[-1] == total
    assert all(s == str(cmu_svs) for s, *_ in lines)
    assert int(lines[-1][5].replace(",", "")) == summary["nuclei"]  # the last line has the final count
    assert lines[-1][6] == "0:00:00"
    assert "\r" not in captured.err  # no bar redraws in a log


def test_a_batch_logs_each_slide_and_the_batch(small_slide, tmp_path, capsys):
    slides = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.tif").symlink_to(small_slide[0])
        slides.append(str(tmp_path / f"{name}.tif"))
    rc = main(["predict", *slides, "--out-dir", str(tmp_path / "out"), "--segmenter", "threshold",
               "--measurements", "none", "--progress", "log", "--progress-interval", "3600"])
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("nucseg: progress: ")]
    # an interval longer than the run: a line as each slide starts, and one as it ends
    starts = [ln for ln in lines if " tiles " in ln]
    assert [ln.split(":")[2].strip() for ln in starts] == ["slide 1/2 " + slides[0], "slide 2/2 " + slides[1]]
    assert all("; batch: " in ln and " slides finished" in ln for ln in starts)
    assert "batch: 1/2 slides finished" in starts[1]
    ends = [ln for ln in lines if ": done, " in ln]
    assert [ln.split(": done")[0].removeprefix("nucseg: progress: ") for ln in ends] == slides
    assert ends[-1].endswith("batch: 2 slides finished")


def test_events_rate_eta_and_batch_placement():
    events = []
    rep = SlideReporter("s.svs", in_batch(events.append, 1, 3))
    rep.tiles(10, 50)  # 10 resumed from the cache
    rep.nuclei(7)
    assert events[-1] == SlideProgress("s.svs", 10, 50, 7, events[-1].seconds, 10, 1, 3)
    assert events[-1].rate is None and events[-1].eta is None  # no tile of this pass yet
    ev = SlideProgress("s.svs", 30, 50, 100, 10.0, tiles_resumed=10)
    assert ev.rate == 2.0 and ev.eta == 10.0  # resumed tiles are not part of the rate


def test_log_lines_respect_the_interval_and_batch_eta(capsys):
    view = SlideProgressView(argparse.Namespace(progress="log", progress_interval=3600.0, quiet=False))
    view.event(SlideProgress("a.svs", 0, 10, 0, 0.0, slides=2))
    view.event(SlideProgress("a.svs", 5, 10, 50, 5.0, slides=2))  # within the interval: not written
    view.slide_done({"slide": "a.svs", "nuclei": 90, "seconds": 10.0, "tissue_tiles": 10})
    view.event(SlideProgress("b.svs", 2, 10, 20, 2.0, slide_index=1, slides=2))  # a new slide: written
    view.event(SlideProgress("b.svs", 6, 10, 60, 6.0, slide_index=1, slides=2))
    view.close()  # the last state, not shown yet, is written at the end
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4
    assert lines[1] == "nucseg: progress: a.svs: done, 90 nuclei in 0:00:10; batch: 1 slides finished"
    assert lines[3] == ("nucseg: progress: slide 2/2 b.svs: tiles 6/10 (60%), 1.00 tiles/s, 60 nuclei, ETA 0:00:04; "
                        "batch: 1/2 slides finished, 16 tiles, 150 nuclei, ETA 0:00:04")


def test_auto_mode_follows_the_terminal(monkeypatch):
    import sys

    class Tty:
        def isatty(self):
            return True

    ns = argparse.Namespace(progress="auto", quiet=False)
    assert mode(ns) == "log"  # pytest's captured stderr is no terminal
    monkeypatch.setattr(sys, "stderr", Tty())
    assert mode(ns) == "bar"
    assert mode(argparse.Namespace(progress="auto", quiet=True)) == "none"
    assert mode(argparse.Namespace(progress="log", quiet=True)) == "log"
