"""A conventional CLI: a parser built without the heavy libraries (--help/--version fast; the timing itself is
bench/bench_cli_startup.py), ``python -m nucseg``, shell completion, an unknown output suffix refused, a spare
array task that exits 0, and nucseg's own log levels apart from other libraries'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nucseg_cli.main import main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "segment_anything", "zarr", "dask", "numpy", "shapely", "openslide", "tqdm", "shtab")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], capture_output=True, text=True,
                          env=os.environ, timeout=120)


def test_building_the_parser_imports_no_heavy_library():
    code = ("import sys; from nucseg_cli.main import build_parser; build_parser(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    run = _python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_python_dash_m_nucseg_is_the_command():
    from nucseg import __version__

    run = _python("", "-m", "nucseg", "--version")
    assert (run.returncode, run.stdout.strip()) == (0, f"nucseg {__version__}")
    run = _python("", "-m", "nucseg", "predict", "--mpp", "0")
    assert run.returncode == 2 and run.stderr.startswith("nucseg: error: argument --mpp")
    # importing nucseg (or its __main__ module) loads no CLI: the library never imports it
    run = _python("import sys, nucseg, nucseg.__main__; print('nucseg_cli' in sys.modules)")
    assert run.stdout.strip() == "False", run.stderr


OPTIONS = ("predict", "export-peft", "--progress-interval", "--input-list", "vit_tiny")


@pytest.mark.parametrize("shell, marker, words", [("bash", "complete -o", OPTIONS), ("zsh", "#compdef nucseg", OPTIONS),
                                                  ("tcsh", "complete nucseg", ("predict", "export-peft", "vit_tiny"))])
def test_shell_completion_covers_commands_and_options(shell, marker, words, capsys):
    assert main(["--print-completion", shell]) == 0
    script = capsys.readouterr().out
    assert marker in script
    for word in words:  # shtab's tcsh script completes commands and choices, not every long option
        assert word in script, word


def test_unknown_output_suffix_is_refused(cmu_svs, tmp_path, capsys):
    out = tmp_path / "x.shp"
    rc = main(["predict", str(cmu_svs), "-o", str(out), "--segmenter", "threshold"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith("nucseg: error: unknown output suffix '.shp'")
    for suffix in (".geojson", ".geojson.gz", ".parquet"):
        assert suffix in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_spare_array_task_has_nothing_to_do(tmp_path, monkeypatch, capsys):
    listed = tmp_path / "slides.txt"
    listed.write_text("a.svs\nb.svs\n")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    out = tmp_path / "out"
    rc = main(["predict", "--input-list", str(listed), "--out-dir", str(out), "--segmenter", "threshold", "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "nothing to do for task 3 of 4" in captured.err
    assert json.loads(captured.out)["slides"] == []
    assert not out.exists()


@pytest.mark.parametrize("flags, ours, theirs", [([], False, False), (["-v"], True, False), (["-vv"], True, False),
                                                 (["--debug"], True, True)])
def test_verbosity_is_nucseg_own_unless_debug(flags, ours, theirs):
    """-v/-vv raise nucseg's log level only; zarr's or asyncio's debug messages need --debug."""
    code = ("import logging; from nucseg_cli.main import build_parser, _configure_logging; "
            f"args = build_parser().parse_args({flags!r} + ['demo-data', 'x']); _configure_logging(args); "
            "print(logging.getLogger('nucseg.wsi.predict').isEnabledFor(logging.INFO), "
            "logging.getLogger('zarr').isEnabledFor(logging.DEBUG), logging.getLogger('asyncio').isEnabledFor(logging.DEBUG))")
    run = _python(code)
    assert run.stdout.split() == [str(ours), str(theirs), str(theirs)], run.stderr
