"""Shared by the benchmark scripts: the real tiles, the model under test, and the record of where a figure
was measured (machine, software, date, command), so every number in docs/PERFORMANCE.md can be traced."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NUCSEG_SHARED_DATA", REPO.parent / "shared" / "data"))  # as tests/conftest.py
SAMPLE = SHARED / "he-nuclei-sample"
BENCH_ORGAN = "human glioma"
# The first images of BENCH_ORGAN (sorted) are what the speed benchmarks segment; make_bench_adapter.py
# trains only on the others, so the benchmark tiles are never training data.
HELD_OUT_IMAGES = 8
TINY_BASE = REPO / "runs" / "tiny-base" / "sam_vit_tiny_he.pth"
BENCH_ADAPTER = REPO / "runs" / "bench-adapter" / "adapter"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict:
    """Where a figure was measured. ``load_1min`` is recorded because timings on a shared machine depend on it."""
    import psutil

    info = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_1min": round(os.getloadavg()[0], 2),
    }
    return info


def write_report(path: Path, report: dict) -> None:
    """A benchmark's JSON result (keys in the order the script built them, unlike nucseg.io.write_json)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def provenance() -> dict:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
    }


def bench_images(data: Path, n_images: int) -> list[str]:
    """Stems of the first ``n_images`` images of a NuInsSeg organ folder (sorted)."""
    from nucseg.learn.data import discover

    return [s.stem for s in discover(data)][:n_images]


def load_tiles(data: Path, n: int, tile_size: int) -> list:
    """The first ``n`` tiles with nuclei, cut to ``tile_size``, of the held-out images of ``data``."""
    from nucseg.learn.data import load_dataset

    keep = set(bench_images(data, HELD_OUT_IMAGES))
    tiles = [t for t in load_dataset(data, tile_size=tile_size, drop_empty=True) if t.stem in keep]
    if len(tiles) < n:
        raise SystemExit(f"only {len(tiles)} benchmark tiles of {tile_size} px in the held-out images of {data}")
    return tiles[:n]


@dataclass
class ModelUnderTest:
    model: torch.nn.Module
    name: str  # what the results say was run
    mpp: float | None
    identity: str


def load_model(adapter: Path | None, checkpoint: Path | None, model_type: str, img_size: int, seed: int = 0
               ) -> ModelUnderTest:
    """An adapter on its base (``--adapter [--checkpoint]``), a base checkpoint, or a seeded random model."""
    from nucseg.model.adapter import load_adapter
    from nucseg.model.sam import load_sam

    if adapter is not None:
        model, info = load_adapter(adapter, checkpoint)
        head = "with" if getattr(model, "fg_head", None) is not None else "without"
        name = f"adapter {adapter} ({info.model_type}, {info.input_size} px, {head} foreground head)"
        return ModelUnderTest(model, name, info.mpp, info.meta["weights_sha256"])
    model, fingerprint = load_sam(model_type, checkpoint, img_size=img_size, seed=seed)
    name = f"{model_type} {'from ' + str(checkpoint) if checkpoint else f'random init (seed {seed})'}, {img_size} px"
    return ModelUnderTest(model, name, None, fingerprint)
