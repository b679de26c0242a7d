"""nucseg: fine-tune Segment Anything with LoRA on H&E nuclei, segment every nucleus of whole slides.

The entry points are importable from here (``nucseg.segment_image``, ``nucseg.load_segmenter``,
``nucseg.predict_slide``, ``nucseg.PredictConfig``, ...) but loaded lazily, on first use, so that
``import nucseg`` stays cheap (no openslide, zarr or torch).
"""

import os as _os

# Before torch is imported: OpenMP threads that sleep at barriers instead of spinning. Spinning saves a few
# microseconds per barrier on idle cores and costs 10-20x the run time when the cores are shared with other
# work (nucseg.threads, docs/PERFORMANCE.md). An explicit OMP_WAIT_POLICY in the environment is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"

_LAZY = {
    "segment_image": "nucseg.api",
    "load_segmenter": "nucseg.api",
    "predict_slide": "nucseg.wsi.predict",
    "predict_slides": "nucseg.wsi.batch",
    "PredictConfig": "nucseg.wsi.predict",
    "SlideSummary": "nucseg.wsi.predict",
    "SlideOutputs": "nucseg.wsi.predict",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'nucseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
