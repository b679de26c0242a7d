"""One exception family for every failure a user can cause.

The CLI turns a :class:`NucsegError` into one line on stderr and the class's exit code; anything else is a
bug and keeps its traceback. Exit codes are documented in docs/CLI.md ("Exit codes").
"""

from __future__ import annotations


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
