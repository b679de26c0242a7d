"""How progress is shown (``--progress``): a tqdm bar on a terminal, one plain line per interval in a batch log
(stderr not a terminal: SLURM, nohup, CI), or nothing. The library reports (:mod:`nucseg.progress`); this draws.

A bar redraws itself with carriage returns, which a log file keeps as one ever-growing line that only shows
up at the end; so in ``log`` mode every line is a whole line, ``nucseg: progress: ...``, at most one per
``--progress-interval`` seconds (and one when each slide starts and ends).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

    from nucseg.progress import SlideProgress

MODES = ("auto", "bar", "log", "none")
DEFAULT_INTERVAL = 30.0
PREFIX = "nucseg: progress: "


def mode(args: argparse.Namespace) -> str:
    """``bar``, ``log`` or ``none``: ``auto`` is a bar on a terminal, log lines elsewhere, nothing with -q."""
    chosen = getattr(args, "progress", "auto")
    if chosen == "auto":
        return "none" if getattr(args, "quiet", False) else "bar" if sys.stderr.isatty() else "log"
    return chosen


def interval(args: argparse.Namespace) -> float:
    return float(getattr(args, "progress_interval", DEFAULT_INTERVAL))


class _Lines:
    """A file for tqdm in log mode: each redraw becomes one whole line, at most one per interval."""

    def __init__(self, every: float):
        self.every, self._last = every, None

    def write(self, text: str) -> None:
        text = text.strip("\r\n").strip()
        now = time.monotonic()
        if text and (self._last is None or now - self._last >= self.every):
            sys.stderr.write(f"{PREFIX}{text}\n")
            sys.stderr.flush()
            self._last = now

    def flush(self) -> None:
        sys.stderr.flush()


def bar(args: argparse.Namespace, **kw) -> tqdm:
    """A tqdm progress bar drawn as ``--progress`` says (the commands' generic bar: epochs, images, bytes)."""
    from tqdm import tqdm

    shown = mode(args)
    if shown == "log":
        return tqdm(file=_Lines(interval(args)), disable=False, mininterval=0,
                    bar_format="{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%), {rate_fmt}, elapsed {elapsed}, "
                               "ETA {remaining}{postfix}", **kw)
    return _terminal_bar(disable=shown == "none", **kw)


def _terminal_bar(**kw) -> tqdm:
    from tqdm import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)


def duration(seconds: float | None) -> str:
    """``1:02:03``; ``?`` when not known yet."""
    return "?" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


class SlideProgressView:
    """predict's progress: the library's :class:`nucseg.progress.SlideProgress` events as a bar (tiles, with
    the nuclei so far) or as log lines: tiles done/total, tiles/s, nuclei so far and ETA for the slide and,
    in a batch, for the batch. ``event`` and ``slide_done`` are called from the library's threads."""

    def __init__(self, args: argparse.Namespace):
        self.mode, self.every = mode(args), interval(args)
        self._lock = threading.Lock()
        self._bar: tqdm | None = None
        self._last: float | None = None  # when the last log line was written
        self._current: tuple[int, str] | None = None  # the slide the last event was about
        self._unwritten: SlideProgress | None = None  # the last event, if no line showed it (written at the end)
        self._finished: list[dict] = []  # summaries of the batch's finished slides

    def event(self, ev: SlideProgress) -> None:
        with self._lock:
            if self.mode == "bar":
                if self._bar is None:
                    self._bar = _terminal_bar(unit="tile", desc="tiles")
                self._bar.total, self._bar.n = ev.tiles_total, ev.tiles_done
                self._bar.set_postfix(nuclei=f"{ev.nuclei:,}", refresh=False)
                self._bar.refresh()
            elif self.mode == "log":
                now, slide = time.monotonic(), (ev.slide_index, ev.slide)
                if slide != self._current or self._last is None or now - self._last >= self.every:
                    self._current, self._last, self._unwritten = slide, now, None
                    self._write(self.line(ev))
                else:
                    self._unwritten = ev

    def slide_done(self, summary: dict) -> None:
        """A slide of the batch finished (its summary dict, as predict_slides' ``on_result`` gives it)."""
        with self._lock:
            self._finished.append(summary)
            self._unwritten = None  # this line says how the slide ended
            if self.mode == "log":
                d = summary
                state = (f"failed: {d['error']}" if d.get("error") else "skipped (done)" if d.get("skipped")
                         else f"done, {d['nuclei'] or 0:,} nuclei in {duration(d['seconds'])}")
                self._write(f"{d['slide']}: {state}; batch: {len(self._finished)} slides finished")

    def line(self, ev: SlideProgress) -> str:
        """One progress line: the slide's figures and, for a batch, the batch's."""
        pct = 100 * ev.tiles_done / ev.tiles_total if ev.tiles_total else 100.0
        rate = f"{ev.rate:.2f} tiles/s" if ev.rate else "? tiles/s"
        where = f"slide {ev.slide_index + 1}/{ev.slides} " if ev.slides > 1 else ""
        text = (f"{where}{ev.slide}: tiles {ev.tiles_done:,}/{ev.tiles_total:,} ({pct:.0f}%), {rate}, "
                f"{ev.nuclei:,} nuclei, ETA {duration(ev.eta)}")
        if ev.slides > 1:
            done = [d for d in self._finished if not d.get("error")]
            worked = [d["seconds"] for d in done if not d.get("skipped") and d.get("seconds")]
            per_slide = sum(worked) / len(worked) if worked else (ev.seconds + ev.eta if ev.eta is not None else None)
            left = ev.slides - ev.slide_index - 1
            eta = None if ev.eta is None or per_slide is None else ev.eta + left * per_slide
            tiles = sum(d.get("tissue_tiles") or 0 for d in done) + ev.tiles_done
            nuclei = sum(d.get("nuclei") or 0 for d in done) + ev.nuclei
            text += (f"; batch: {len(self._finished)}/{ev.slides} slides finished, {tiles:,} tiles, {nuclei:,} nuclei, "
                     f"ETA {duration(eta)}")
        return text

    def close(self) -> None:
        """End the bar; in log mode, write the last state if no line showed it (a slide's final nuclei)."""
        with self._lock:
            if self._unwritten is not None:
                self._write(self.line(self._unwritten))
                self._unwritten = None
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    @staticmethod
    def _write(text: str) -> None:
        sys.stderr.write(f"{PREFIX}{text}\n")
        sys.stderr.flush()
