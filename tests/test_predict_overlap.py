"""Whole-slide inference overlaps with stitching/export: the export pass follows the running inference."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from nucseg.model.classical import ThresholdSegmenter
from nucseg.segmenter import SegmenterDefaults
from nucseg.wsi.predict import PredictConfig, predict_slide


@pytest.fixture
def slide(small_slide) -> Path:
    return small_slide[0]


def test_export_runs_while_inference_is_still_going(slide, tmp_path, monkeypatch):
    """The third segmenter call waits until the export thread has stitched tile 0: with export after
    inference (no overlap) it would wait forever; the output is the same as without any waiting."""
    import nucseg.wsi.predict as P

    stitched = threading.Event()
    real_polygons = P.instance_polygons

    def polygons(*args, **kwargs):
        stitched.set()
        return real_polygons(*args, **kwargs)

    monkeypatch.setattr(P, "instance_polygons", polygons)
    inner = ThresholdSegmenter()

    class WaitsForExport(SegmenterDefaults):
        tile_size, mpp, fingerprint = inner.tile_size, inner.mpp, "waits-for-export"

        def __init__(self):
            self.calls = 0

        def __call__(self, tiles: np.ndarray):
            self.calls += 1
            if self.calls == 3:
                assert stitched.wait(timeout=60), "export did not start before inference finished"
            return inner(tiles)

    seg = WaitsForExport()
    out = tmp_path / "a.geojson"
    summary = predict_slide(slide, out, seg, PredictConfig(batch_size=2, export_chunk=2))  # export by 2 tiles
    assert seg.calls == 5 and summary.predicted_tiles == 9
    ref = tmp_path / "ref.geojson"
    predict_slide(slide, ref, ThresholdSegmenter(), PredictConfig(batch_size=9))
    assert out.read_bytes() == ref.read_bytes()
