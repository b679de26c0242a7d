"""One exception family for every failure a user can cause.

The CLI turns a :class:`NucsegError` into one line on stderr and the class's exit code; anything else is a
bug and keeps its traceback. Exit codes are documented in docs/CLI.md ("Exit codes").
"""

from __future__ import annotations

# Every exit code of the ``nucseg`` command and what it means: the first two columns of docs/CLI.md's "Exit
# codes" table, which tests/hostile/test_errors_exit_codes.py checks against this (and the classes below).
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "other failure",
    2: "bad input or arguments",
    3: "bad dataset",
    4: "bad checkpoint or adapter",
    5: "unreadable slide",
    6: "output cannot be written",
    7: "out of memory",
    9: "some slides of a batch failed",
    130: "interrupted",
}
EXIT_OUT_OF_MEMORY = 7  # MemoryError, or a GPU out of memory even after halving the batch
EXIT_SOME_FAILED = 9  # predict on several slides: the others finished, the failed ones are listed
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM


class NucsegError(Exception):
    """Base class: a clear, user-facing problem. ``str(err)`` is the one-line message."""

    exit_code = 1


class InputError(NucsegError):
    """A path that does not exist, a file of the wrong kind, bad arguments."""

    exit_code = 2


class DataError(InputError):
    """A dataset that does not follow the NuInsSeg layout (missing label, size mismatch, empty folder)."""

    exit_code = 3


class CheckpointError(NucsegError):
    """A base checkpoint or adapter that cannot be loaded, or does not match the model asked for."""

    exit_code = 4


class SlideError(NucsegError):
    """A whole-slide image that cannot be read, is truncated, or lacks the metadata we need (µm/px)."""

    exit_code = 5


class OutputError(NucsegError):
    """An output location that cannot be written."""

    exit_code = 6


class DiskFullError(OutputError):
    """The filesystem of an output (or the work dir) is full or over quota: every later write fails as well."""
