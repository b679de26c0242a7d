"""Every numeric option of every command, given an absurd value, is one line and exit 2 with nothing written;
every option explains itself in --help; logging options work before and after the command (issues 10, 12)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from nucseg_cli.main import build_parser, main

# What each command needs besides the option under test (paths need not exist: values are checked first).
REQUIRED = {
    "train": ["--data", "d", "--out", "o"],
    "cv": ["--data", "d", "--out", "o"],
    "eval": ["--gt", "g", "--pred", "p"],
    "segment": ["x.png", "-o", "o"],
    "predict": ["x.svs", "-o", "o.geojson"],
    "merge": ["--adapter", "a", "-o", "o.pth"],
    "demo-data": ["o"],
    "import-qupath": ["x.svs", "x.geojson", "--out", "o"],
    "calibrate": ["a", "--data", "d"],
    "weights": ["list"],
    "export-peft": ["a", "o"],
    "data": ["fetch", "nuinsseg", "d"],
}
BAD = ["-1", "nan", "inf", "-inf", "abc", "1e400", "", "0x10"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _numeric_options() -> list[tuple[str, str]]:
    cases = []
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            kind = getattr(action.type, "__qualname__", "")
            if action.option_strings and kind.startswith(("count.", "number.")):
                cases.append((name, action.option_strings[-1]))
    return cases


NUMERIC = _numeric_options()


def test_the_table_covers_the_numeric_options():
    names = {f"{c} {o}" for c, o in NUMERIC}
    for expected in ("train --lr", "train --epochs", "train --rank", "train --exemplars", "train --box-fraction",
                     "train --prompts-per-tile", "cv --folds", "predict --mpp", "predict --slide-mpp",
                     "predict --tile-size", "predict --overlap", "predict --batch-size", "predict --pred-iou-thresh",
                     "segment --min-area", "demo-data --size"):
        assert expected in names
    assert len(NUMERIC) >= 50  # the introspection finds them all (56 today)


@pytest.mark.parametrize("command,option", NUMERIC, ids=[f"{c}{o}" for c, o in NUMERIC])
def test_absurd_numbers_are_one_line_and_nothing_is_written(command, option, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in BAD:
        rc = main([command, *REQUIRED[command], f"{option}={value}"])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2, (value, err)
        assert len(lines) == 1 and lines[0].startswith(f"nucseg: error: argument {option}"), (value, err)
        assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,needle", [
    (["predict", "x.svs", "-o", "o.geojson", "--mpp", "0"], "--mpp"),
    (["predict", "x.svs", "-o", "o.geojson", "--mpp", "352.8"], "--mpp"),  # a 72-dpi TIFF's "µm/px"
    (["predict", "x.svs", "-o", "o.geojson", "--tile-size", "0"], "--tile-size"),
    (["predict", "x.svs", "-o", "o.geojson", "--tile-size", "100000"], "--tile-size"),
    (["train", "--data", "d", "--out", "o", "--exemplars", "0"], "--exemplars"),
    (["train", "--data", "d", "--out", "o", "--box-fraction", "2"], "--box-fraction"),
    (["train", "--data", "d", "--out", "o", "--prompts-per-tile", "0"], "--prompts-per-tile"),
    (["train", "--data", "d", "--out", "o", "--lr", "nan"], "--lr"),
    (["cv", "--data", "d", "--out", "o", "--folds", "1"], "--folds"),
    (["train", "--data", "d", "--out", "o", "--model", "vit_q"], "--model"),
    (["predict", "--nonsense"], "unrecognized arguments"),
])
def test_values_the_issue_named(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("nucseg: error:") and needle in err[0], err
    assert os.listdir(tmp_path) == []


def test_library_configs_check_what_the_cli_checks():
    from nucseg.errors import InputError
    from nucseg.model.infer import InferConfig
    from nucseg.learn.train import TrainConfig

    for bad in ({"lr": float("nan")}, {"lr": 0.0}, {"box_fraction": 2.0}, {"positive_prompts": 0}):
        with pytest.raises(InputError, match="must be"):
            TrainConfig(**bad).validate()
    with pytest.raises(InputError, match="--prompts-per-tile"):
        TrainConfig(positive_prompts=0).validate()
    for bad in ({"pred_iou_thresh": float("nan")}, {"pred_iou_thresh": float("inf")}, {"stability_thresh": 2.0},
                {"min_area": -1}):
        with pytest.raises(InputError):
            InferConfig(**bad).validate()


def _all_parsers():
    root = build_parser()
    out = [("nucseg", root)]
    for name, sub in _subparsers(root).items():
        out.append((name, sub))
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                out += [(f"{name} {n}", p) for n, p in action.choices.items()]
    return out


def test_every_option_has_help_and_examples(capsys):
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in _all_parsers() for a in p._actions
               if not (a.help and a.help.strip()) and not isinstance(a, argparse._SubParsersAction)]
    assert missing == []
    for name, sub in _subparsers(build_parser()).items():
        assert sub.epilog and "examples:" in sub.epilog and f"nucseg {name}" in sub.epilog, name
    assert main(["predict", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: 64)" in text and "examples:" in text and "in pixels" not in text.split("--overlap")[0]


@pytest.mark.parametrize("argv", [["-q", "eval"], ["eval", "-q"], ["eval", "-v"], ["-v", "eval", "--log-level", "info"]])
def test_logging_options_before_or_after_the_command(argv, tmp_path, capsys):
    rc = main([*argv, "--gt", str(tmp_path / "none"), "--pred", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and err == [f"nucseg: error: ground-truth folder not found: {tmp_path / 'none'}"], err


def test_quiet_after_the_command_is_kept(monkeypatch):
    args = build_parser().parse_args(["-q", "eval", "--gt", "g", "--pred", "p"])
    assert args.quiet is True and args.verbose == 0 and args.debug is False
    args = build_parser().parse_args(["eval", "-q", "--debug", "--gt", "g", "--pred", "p"])
    assert args.quiet is True and args.debug is True


def _choices(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, list]:
    """{"<command> <option>": choices} of every option with choices, subcommands included."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_choices(sub, f"{prefix}{name} "))
        elif action.choices is not None:
            out[f"{prefix}{(action.option_strings or [action.dest])[-1]}"] = list(action.choices)
    return out


def test_every_choices_list_is_the_library_constant():
    """The CLI offers exactly the values the library accepts (some lists are spelled out in the parser to keep
    `nucseg --help` from importing the scoring code; this keeps them equal to the library's)."""
    from nucseg.device import DEVICES
    from nucseg.learn.calibrate import METRICS as CALIBRATION_METRICS
    from nucseg.learn.cv import GROUP_BY
    from nucseg.learn.datasets import SOURCES
    from nucseg.model.infer import PROMPT_MODES
    from nucseg.model.lora import METHODS
    from nucseg.model.peft_export import FLAVOURS
    from nucseg.model.sam import SPECS
    from nucseg.model.weights import REGISTRY
    from nucseg.segmenter import SEGMENTER_KINDS
    from nucseg.wsi.measure import MODES

    library = {"--device": DEVICES, "--metric": CALIBRATION_METRICS, "--calibration-metric": CALIBRATION_METRICS,
               "--group-by": GROUP_BY, "--prompts": PROMPT_MODES, "--method": METHODS, "--model": SPECS,
               "--segmenter": SEGMENTER_KINDS, "--measurements": MODES, "weights fetch name": REGISTRY,
               "data fetch name": SOURCES, "--flavour": FLAVOURS}
    found = _choices(build_parser())
    checked = 0
    for key, choices in found.items():
        option = next((k for k in library if key.endswith(k)), None)
        if option is None:
            assert key.endswith(("--log-level", "action", "--progress", "--print-completion")), \
                f"{key}: no library constant checked"  # those four are the CLI's own
            continue
        assert choices == list(library[option]), key
        checked += 1
    assert checked >= len(library)
