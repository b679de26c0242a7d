"""JSON-lines run log and run summary: events, totals, per-shard names, lines cut short by a killed writer."""

from __future__ import annotations

import json

from nucseg.runlog import RunLog, read_runlog
from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main


def test_events_and_summary(tmp_path):
    with RunLog(tmp_path, slides=3, shard=(3, 16)) as log:
        log.start("a.svs")
        log.finish({"slide": "a.svs", "nuclei": 10, "error": None, "skipped": False, "seconds": 1.5})
        log.start("b.svs")
        log.finish({"slide": "b.svs", "nuclei": 7, "error": None, "skipped": True})
        log.start("c.svs")
        log.finish({"slide": "c.svs", "nuclei": 0, "error": "cannot open slide c.svs"})
    assert log.path.name == "nucseg-run.3of16.jsonl" and log.summary_path.name == "run-summary.3of16.json"
    events = list(read_runlog(log.path))
    assert [e["event"] for e in events] == ["run-start", "start", "done", "start", "done", "start", "failed", "run-end"]
    assert all(e["shard"] == "3/16" and e["pid"] > 0 and e["time"].endswith("+00:00") for e in events)
    assert events[2]["nuclei"] == 10 and events[4]["skipped"] is True and events[6]["error"].startswith("cannot")
    summary = json.loads(log.summary_path.read_text())
    assert {k: summary[k] for k in ("slides", "done", "skipped", "failed", "nuclei", "interrupted")} == {
        "slides": 3, "done": 1, "skipped": 1, "failed": 1, "nuclei": 17, "interrupted": False}
    assert summary["failures"] == [{"slide": "c.svs", "error": "cannot open slide c.svs"}]
    assert summary["seconds"] >= 0 and events[-1]["done"] == 1


def test_a_line_cut_short_stays_apart_from_the_next_run(tmp_path):
    with RunLog(tmp_path, slides=1):
        pass
    path = tmp_path / "nucseg-run.jsonl"
    with open(path, "a") as fh:
        fh.write('{"event": "start", "sli')  # what a writer killed mid-line would leave
    try:
        with RunLog(tmp_path, slides=1):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and lines[2] == '{"event": "start", "sli'
    events = list(read_runlog(path))
    assert [e["event"] for e in events] == ["run-start", "run-end", "run-start", "run-end"]
    assert events[-1]["interrupted"] is True
    assert json.loads((tmp_path / "run-summary.json").read_text())["interrupted"] is True


def test_cli_shard_writes_its_own_log(tmp_path, capsys):
    slides = [tmp_path / "s0.tif", tmp_path / "s1.tif", tmp_path / "s2.tif"]
    for i, p in enumerate(slides):
        make_synthetic_slide(p, 500, 400, mpp=0.5, nuclei=30, tissue_fraction=1.0, pyramid=False, seed=i)
    lst = tmp_path / "slides.txt"
    lst.write_text("".join(f"{p}\n" for p in slides))
    out = tmp_path / "out"
    rc = main(["-q", "predict", "--input-list", str(lst), "--out-dir", str(out), "--shard", "1/2",
               "--segmenter", "threshold", "--tile-size", "256", "--overlap", "32"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["nucseg-run.1of2.jsonl", "run-summary.1of2.json",
                                                     "s1.geojson", "s1.summary.json"]
    done = [e for e in read_runlog(out / "nucseg-run.1of2.jsonl") if e["event"] == "done"]
    assert [e["slide"] for e in done] == [str(slides[1])] and done[0]["nuclei"] > 20
