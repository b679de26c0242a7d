"""Machine-readable record of a batch run: one JSON line per slide event, and a summary when the run ends.

    <out_dir>/nucseg-run.jsonl      appended, one object per line, flushed per line
    <out_dir>/run-summary.json      written atomically when the run ends (also when interrupted or failing)

Events: ``run-start`` (slides), ``start`` (slide; with Dask: sent to the cluster), ``done`` (the slide's
summary: nuclei, tiles, seconds, output, ...; ``skipped: true`` when its outputs were already complete),
``failed`` (slide, error), ``run-end`` (the run summary). Every line carries ``time`` (UTC, ISO 8601), ``host``, ``pid`` and
``shard``, so logs of many jobs can be concatenated and still be told apart, and ``"nucseg_file": "run-log"``:
an existing log is appended to only if its first line carries that marker, and ``run-summary.json`` is
replaced only if it carries ``"nucseg_file": "run-summary"`` (:mod:`nucseg.io`: never a user's file of that name).

A sharded run (``--shard i/n`` or a SLURM array task) writes ``nucseg-run.<i>of<n>.jsonl`` and
``run-summary.<i>of<n>.json`` instead: array tasks share ``out_dir``, appends from several nodes to one file
on NFS can interleave, and each task's summary must survive the others.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .io import JsonMark, check_output, disk_full_error, is_disk_full, json_safe, open_append, write_json


RUN_LOG, RUN_SUMMARY = JsonMark("run-log"), JsonMark("run-summary")


@dataclass
class RunSummary:
    """Totals of one run: slides asked for, done now, skipped (done before), failed; nuclei in all done slides."""

    slides: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    nuclei: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    shard: str | None = None
    failures: list[dict] = field(default_factory=list)
    thresholds: dict | None = None  # inference thresholds used, each with its source (command line/adapter/default)


class RunLog:
    """Append-only JSON-lines log of one run plus its summary; use as a context manager around the run."""

    def __init__(self, out_dir: str | os.PathLike, slides: int, shard: tuple[int, int] | None = None):
        self.out_dir = Path(out_dir)
        tag = f".{shard[0]}of{shard[1]}" if shard else ""
        self.path = self.out_dir / f"nucseg-run{tag}.jsonl"
        self.summary_path = self.out_dir / f"run-summary{tag}.json"
        self.summary = RunSummary(slides=slides, shard=f"{shard[0]}/{shard[1]}" if shard else None)
        self._base = {"host": socket.gethostname(), "pid": os.getpid(), "shard": self.summary.shard}
        self._t0 = time.perf_counter()
        self._fh = None

    def __enter__(self) -> "RunLog":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        check_output(self.summary_path, RUN_SUMMARY)  # written at the end: refuse a user's file before any work
        self._fh = open_append(self.path, RUN_LOG.first_line)
        if self._fh.tell() > 0 and not _ends_with_newline(self.path):
            self._fh.write("\n")  # a killed writer's unfinished line stays on its own line
        self.event("run-start", slides=self.summary.slides)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.summary.interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.summary.seconds = time.perf_counter() - self._t0
        try:
            self.event("run-end", **asdict(self.summary))
            write_json(self.summary_path, asdict(self.summary), RUN_SUMMARY)
        finally:
            self._fh.close()
        return False

    def event(self, kind: str, **fields: Any) -> None:
        """Append one event as one line, written by a single flushed write (no torn lines between runs)."""
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        record = RUN_LOG.line({"time": now, "event": kind, **self._base, **fields})
        try:
            self._fh.write(json.dumps(json_safe(record), sort_keys=True, allow_nan=False) + "\n")
            self._fh.flush()
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(err, self.path) from None
            raise

    def start(self, slide: str | os.PathLike) -> None:
        self.event("start", slide=str(slide))

    def finish(self, summary: dict) -> None:
        """Record a slide's outcome from its ``SlideSummary.to_dict()``: failed if it has an error, else done."""
        s = self.summary
        if summary.get("error"):
            s.failed += 1
            s.failures.append({"slide": summary["slide"], "error": summary["error"]})
            self.event("failed", slide=summary["slide"], error=summary["error"])
            return
        if summary.get("skipped"):
            s.skipped += 1
        else:
            s.done += 1
        s.nuclei += int(summary.get("nuclei") or 0)
        self.event("done", **summary)


def read_runlog(path: str | os.PathLike) -> Iterator[dict]:
    """The events of a log, oldest first; a line cut short by a killed writer is skipped."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"
