"""docs/CLI.md's exit-code table is nucseg.errors' (issue 24, "What to build" 4): the same codes with the
same meanings, every error class's code documented, and the CLI returns the codes of that one table."""

from __future__ import annotations

import re
from pathlib import Path

import nucseg.errors as errors

CLI_MD = Path(__file__).resolve().parents[2] / "docs" / "CLI.md"


def _doc_table() -> dict[int, str]:
    text = CLI_MD.read_text(encoding="utf-8")
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| *(\d+) *\| *([^|]+?) *\|", section, flags=re.M)
    assert rows, "no exit-code table under '## Exit codes' in docs/CLI.md"
    table: dict[int, str] = {}
    for code, meaning in rows:
        assert int(code) not in table, f"exit code {code} is documented twice"
        table[int(code)] = meaning
    return table


def _error_classes() -> list[type]:
    found, todo = [], [errors.NucsegError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__ == errors.__name__]


def test_the_documented_table_is_the_one_in_errors_py():
    assert _doc_table() == errors.EXIT_CODES


def test_every_error_class_has_a_documented_code():
    for cls in _error_classes():
        assert cls.exit_code in errors.EXIT_CODES, f"{cls.__name__}.exit_code {cls.exit_code} is not documented"
    by_code = {cls.exit_code for cls in _error_classes()}
    assert {1, 2, 3, 4, 5, 6} <= by_code  # each kind of user error has its class


def test_the_cli_uses_the_same_codes():
    import nucseg_cli.commands as commands
    import nucseg_cli.main as cli

    assert cli.EXIT_INTERRUPTED == errors.EXIT_INTERRUPTED and errors.EXIT_CODES[130] == "interrupted"
    assert cli.EXIT_OUT_OF_MEMORY == errors.EXIT_OUT_OF_MEMORY and errors.EXIT_CODES[7] == "out of memory"
    assert commands.EXIT_SOME_FAILED == errors.EXIT_SOME_FAILED
    assert errors.EXIT_CODES[9].startswith("some slides")
