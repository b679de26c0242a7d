"""Progress of whole-slide runs as events: the library reports where a run stands, a front end draws it.

:func:`nucseg.wsi.predict.predict_slide` and :func:`nucseg.wsi.batch.predict_slides` take
``on_progress(SlideProgress)``; the CLI turns the events into a bar on a terminal or into one plain line per
interval in a batch log (``--progress``, cli/progress.py). Events come from two threads (the cache writer, as
tiles are predicted, and the export pass, as nuclei are written), so a callback must be thread-safe and quick.
Stdlib only: importing this costs nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Callable


@dataclass(frozen=True)
class SlideProgress:
    """Where one slide's run stands.

    ``tiles_done``/``tiles_total``: tissue tiles predicted of those to predict (resumed ones count as done);
    ``nuclei``: nuclei written so far (the export follows the inference tile by tile); ``seconds``: since
    the inference pass began; ``tiles_resumed``: tiles done before it began (from the cache), left out of
    the rate. ``slide_index``/``slides``: this slide's place in a batch (0-based; 0 of 1 for one slide).
    """

    slide: str
    tiles_done: int
    tiles_total: int
    nuclei: int
    seconds: float
    tiles_resumed: int = 0
    slide_index: int = 0
    slides: int = 1

    @property
    def rate(self) -> float | None:
        """Tiles per second of this pass; None before the first tile."""
        new = self.tiles_done - self.tiles_resumed
        return new / self.seconds if new > 0 and self.seconds > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds until the last tile is predicted at the rate so far (the export ends soon after); None
        while there is no rate yet."""
        if self.tiles_done >= self.tiles_total:
            return 0.0
        rate = self.rate
        return (self.tiles_total - self.tiles_done) / rate if rate else None


ProgressCallback = Callable[[SlideProgress], None]


class SlideReporter:
    """Builds one slide's :class:`SlideProgress` events from the threads that know each part."""

    def __init__(self, slide: str, callback: ProgressCallback):
        self._slide, self._callback = slide, callback
        self._lock = threading.Lock()
        self._t0: float | None = None
        self._done = self._total = self._resumed = self._nuclei = 0

    def tiles(self, done: int, total: int) -> None:
        """A ``Progress`` callback (tiles done, total): the first call starts the clock."""
        with self._lock:
            if self._t0 is None:
                self._t0, self._resumed = time.monotonic(), done
            self._done, self._total = done, total
            event = self._event()
        self._callback(event)

    def nuclei(self, count: int) -> None:
        """Nuclei written so far."""
        with self._lock:
            self._nuclei = count
            event = self._event()
        self._callback(event)

    def _event(self) -> SlideProgress:
        seconds = time.monotonic() - self._t0 if self._t0 is not None else 0.0
        return SlideProgress(self._slide, self._done, self._total, self._nuclei, seconds, self._resumed)


def in_batch(callback: ProgressCallback, index: int, slides: int) -> ProgressCallback:
    """``callback`` with each event placed at ``index`` of ``slides`` (what predict_slides passes down)."""
    return lambda event: callback(replace(event, slide_index=index, slides=slides))
