"""A full disk (ENOSPC) or an exhausted quota (EDQUOT) is exit 6 with one line naming the path, and nothing
partial is left where the outputs go.

On a real small filesystem where the sandbox allows mounting one (a 16 KiB tmpfs, as root), else skipped; the
same paths are also driven by injecting the OSError at the write calls, which runs everywhere.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import nucseg.wsi.export as export_mod
import nucseg.wsi.cache as cache_mod
from nucseg.errors import DiskFullError
from nucseg.io import atomic_path, new_only
from nucseg.wsi.synthslide import make_synthetic_slide
from nucseg_cli.main import main

THRESHOLD = ["--segmenter", "threshold", "--tile-size", "256", "--overlap", "32"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("full")
    out = []
    for k in range(2):
        out.append(root / f"s{k}.tif")
        make_synthetic_slide(out[-1], 600, 500, mpp=0.5, nuclei=60, tissue_fraction=1.0, pyramid=False, seed=k)
    return out


@pytest.fixture
def tiny_fs(tmp_path):
    """A 16 KiB tmpfs (needs root and a sandbox that allows mounts); skipped where it cannot be made."""
    where = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _one_error(rc: int, err: str, needle: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 6, err
    assert len(lines) == 1 and lines[0].startswith("nucseg: error: ") and needle in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def test_real_full_filesystem_for_the_outputs(slides, tiny_fs, capsys):
    out = tiny_fs / "s0.geojson"
    rc = main(["-q", "predict", str(slides[0]), "-o", str(out), "--csv", *THRESHOLD])
    line = _one_error(rc, capsys.readouterr().err, "no space left on device while writing to")
    assert str(tiny_fs) in line and "free there" in line
    assert _files(tiny_fs) == []  # no output, no temporary


def test_real_full_filesystem_for_the_work_dir(slides, tiny_fs, tmp_path, capsys):
    out = tmp_path / "out" / "s0.geojson"
    rc = main(["-q", "predict", str(slides[0]), "-o", str(out), "--work-dir", str(tiny_fs / "work"), *THRESHOLD])
    _one_error(rc, capsys.readouterr().err, f"no space left on device while writing to {tiny_fs / 'work'}")
    assert _files(tmp_path / "out") == []


def test_real_full_filesystem_stops_a_batch_and_says_so(slides, tiny_fs, capsys):
    out = tiny_fs / "out"
    rc = main(["-q", "predict", *map(str, slides), "--out-dir", str(out), *THRESHOLD])
    _one_error(rc, capsys.readouterr().err, f"no space left on device while writing to {out}")
    assert not [f for f in _files(out) if f.endswith((".geojson", ".summary.json")) or ".tmp-" in f]
    summary = json.loads((out / "run-summary.json").read_text())  # small enough to fit: it says what happened
    assert summary["failed"] == 1 and summary["done"] == 0 and "no space left" in summary["failures"][0]["error"]


@pytest.mark.parametrize("code,text", [(errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded")])
def test_injected_while_writing_the_geojson(slides, tmp_path, monkeypatch, capsys, code, text):
    def full(self, batch):
        raise OSError(code, "injected")

    monkeypatch.setattr(export_mod.GeoJSONWriter, "write_batch", full)
    out = tmp_path / "out"
    rc = main(["-q", "predict", str(slides[0]), "-o", str(out / "s0.geojson"), "--csv", "--preview", *THRESHOLD])
    line = _one_error(rc, capsys.readouterr().err, f"{text} while writing to {out} (")
    assert "free there); free some space or write elsewhere" in line
    assert _files(out) == []  # neither the GeoJSON nor the CSV or preview written beside it


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_injected_while_writing_the_cache(slides, tmp_path, monkeypatch, capsys, code):
    def full(*args):  # _write_chunks(array, values, indices[, checksums])
        raise OSError(code, "injected")

    monkeypatch.setattr(cache_mod, "_write_chunks", full)
    out = tmp_path / "out"
    rc = main(["-q", "predict", str(slides[0]), "-o", str(out / "s0.geojson"), "--work-dir", str(tmp_path / "w"),
               *THRESHOLD])
    _one_error(rc, capsys.readouterr().err, f"while writing to {tmp_path / 'w'}/s0-")
    assert _files(out) == []


def test_an_unconverted_disk_full_error_is_still_one_line(tmp_path, monkeypatch, capsys):
    """The last resort in the CLI, for a write the library does not wrap."""
    import nucseg_cli.commands as commands

    def predict(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "log.jsonl"))

    monkeypatch.setattr(commands, "predict", predict)
    rc = main(["-q", "predict", "x.svs", "-o", str(tmp_path / "x.geojson")])
    _one_error(rc, capsys.readouterr().err, f"no space left on device while writing to {tmp_path / 'log.jsonl'}")

    def other(args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(commands, "predict", other)
    with pytest.raises(OSError, match="I/O error"):  # any other OSError is not ours to explain
        main(["-q", "predict", "x.svs", "-o", str(tmp_path / "x.geojson")])


def test_atomic_path_converts_and_cleans_up(tmp_path):
    target = tmp_path / "x.txt"
    with pytest.raises(DiskFullError, match=f"no space left on device while writing to {tmp_path} "):
        with atomic_path(target, owned=new_only) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_the_run_log_is_one_error(tmp_path):
    from nucseg.runlog import RunLog

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    log = RunLog(tmp_path, slides=1)
    with log:
        real, log._fh = log._fh, Full()
        with pytest.raises(DiskFullError, match=f"while writing to {log.path}"):
            log.start("a.svs")
        log._fh = real
