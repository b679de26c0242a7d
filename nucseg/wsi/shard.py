"""Which share of a slide list one job takes: ``--shard i/n`` or the SLURM array task it runs as.

A SLURM job array runs the same command once per task; each task takes the slides at positions
``i, i+n, i+2n, ...`` of the list. The shard comes from ``--shard i/n`` if given, else from the array
variables, but the implicit (SLURM) shard applies only to a list file (``--input-list``): slides named on the
command line are the task's own work (``nucseg predict "${SLIDES[$SLURM_ARRAY_TASK_ID]}" ...``), and
sharding them would leave every task but one with nothing to do.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence, TypeVar

from ..errors import InputError

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; anything else is a one-line InputError."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise InputError(f"--shard must be i/n with 0 <= i < n, got {text!r}") from None
    if not 0 <= i < n:
        raise InputError(f"--shard must be i/n with 0 <= i < n, got {text!r}")
    return i, n


def slurm_shard(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(i, n) of this SLURM array task, or None outside an array (no ``SLURM_ARRAY_TASK_ID``/``COUNT``).

    i = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP and n = SLURM_ARRAY_TASK_COUNT,
    so ``--array=0-15``, ``--array=1-16`` and ``--array=0-30:2`` all give shards 0..15 of 16. Values that are
    not integers, or a task id outside the array, are an InputError naming the variable (an irregular array
    such as ``--array=1,5,9`` cannot be mapped onto shards: pass ``--shard i/n`` then).
    """
    env = os.environ if environ is None else environ
    task, count = env.get("SLURM_ARRAY_TASK_ID", "").strip(), env.get("SLURM_ARRAY_TASK_COUNT", "").strip()
    if not task or not count:
        return None
    values = {}
    for name, text, default in (("SLURM_ARRAY_TASK_ID", task, None), ("SLURM_ARRAY_TASK_COUNT", count, None),
                                ("SLURM_ARRAY_TASK_MIN", env.get("SLURM_ARRAY_TASK_MIN", "").strip(), 0),
                                ("SLURM_ARRAY_TASK_STEP", env.get("SLURM_ARRAY_TASK_STEP", "").strip(), 1)):
        if not text and default is not None:
            values[name] = default
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise InputError(f"{name}={text!r} is not an integer (or pass --shard i/n)") from None
    tid, n = values["SLURM_ARRAY_TASK_ID"], values["SLURM_ARRAY_TASK_COUNT"]
    first, step = values["SLURM_ARRAY_TASK_MIN"], values["SLURM_ARRAY_TASK_STEP"]
    if n < 1 or step < 1:
        raise InputError(f"SLURM_ARRAY_TASK_COUNT={n} and SLURM_ARRAY_TASK_STEP={step} must be >= 1 "
                         "(or pass --shard i/n)")
    offset = tid - first
    if offset < 0 or offset % step or offset // step >= n:
        raise InputError(f"SLURM_ARRAY_TASK_ID={tid} is not one of the {n} tasks of an array starting at "
                         f"SLURM_ARRAY_TASK_MIN={first} with step {step} (pass --shard i/n for irregular arrays)")
    return offset // step, n


def select(explicit: Sequence[T], listed: Sequence[T], shard: str | None = None,
           environ: Mapping[str, str] | None = None) -> tuple[list[T], tuple[int, int] | None]:
    """This job's slides and shard: ``explicit`` (command line) + ``listed`` (list file), then the shard.

    ``--shard`` (``shard``) applies to all of them; the SLURM array's implicit shard only when a list file
    contributed slides (then to the whole list, command-line slides included, so no slide runs twice), never
    to slides given only on the command line.
    """
    slides = [*explicit, *listed]
    if shard:
        i, n = parse_shard(shard)
    elif listed:
        found = slurm_shard(environ)
        if found is None:
            return slides, None
        i, n = found
    else:
        return slides, None
    return slides[i::n], (i, n)


def read_slide_list(path: str | os.PathLike) -> list[str]:
    """Slide paths of a list file: one per line, blank lines and ``# comments`` skipped, paths stripped.

    Decoded as UTF-8 (a byte-order mark, as Windows editors write, is dropped rather than becoming part of
    the first path); other encodings are refused with the line at fault rather than guessed.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise InputError(f"input list not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(f"input list {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); "
                         "save it as UTF-8") from None
    if "\x00" in text:
        raise InputError(f"input list {path} is not a text file (it contains NUL bytes)")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out
