"""Shared by the benchmark scripts: the real tiles, the model under test, and the record of where a figure
was measured (machine, software, date, command), so every number in docs/PERFORMANCE.md can be traced."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
import time
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
BASE_ORGAN = "human glioblastoma"  # the tiny base is trained on the other organ


@dataclass(frozen=True)
class Recipe:
    """A pinned training recipe of a benchmark model: `make bench BENCH_ARGS=--train` builds exactly this.

    One torch thread: the training loop is then deterministic on a given CPU type and torch build (two threads
    already differ by ~1e-6 after a few steps, CPU reduction order; other CPUs may pick other kernels), and it
    costs the same on a shared machine. No calibration hold-back: the
    benchmarks pass their mask filters explicitly, so every training image is used.
    """

    epochs: int
    batch_size: int
    lr: float
    seed: int = 0
    tile_size: int = 256
    box_fraction: float = 0.0
    balance_ce: bool = True  # from scratch, plain CE collapses to empty masks (docs/BENCHMARKS.md)
    calibration_fraction: float = 0.0
    threads: int = 1

    def train_config(self):
        from nucseg.learn.train import TrainConfig

        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           box_fraction=self.box_fraction, balance_ce=self.balance_ce,
                           calibration_fraction=self.calibration_fraction, device="cpu")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


# vit_tiny trained fully on the BASE_ORGAN tiles (bench/pretrain_tiny.py), then a LoRA adapter with its
# foreground head on the BENCH_ORGAN images the benchmarks do not segment (bench/make_bench_adapter.py).
BASE_RECIPE = Recipe(epochs=20, batch_size=4, lr=1e-3, box_fraction=0.5)
ADAPTER_RECIPE = Recipe(epochs=6, batch_size=8, lr=5e-4)
# µm/px of the he-nuclei-sample tiles, recorded in the bench adapter: neither the data's README nor its source
# repository (pengyzhang/cell_seg_matlab) states it, so it is recorded as unknown (null) rather than guessed.
BENCH_MPP: float | None = None


def epoch_printer(t0: float):
    """``finetune``'s on_step: one stderr line per finished epoch (a long training run shows it is alive)."""

    def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
        if step + 1 == steps:
            print(f"epoch {epoch + 1}: loss {loss:.4f}, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    return on_step


def sha256(path: Path) -> str | None:
    """SHA-256 of a weights file (None if absent), for the results JSON of every figure that uses it."""
    from nucseg.io import sha256_file

    return sha256_file(path) if Path(path).is_file() else None


def bench_weights(adapter: Path | None, checkpoint: Path | None) -> dict:
    """The SHA-256s of the weights behind a figure and, for the pinned bench models, the record of how they were
    built (recipe, command, date: runs/*/pretrain.json, bench_adapter.json)."""
    import json

    from nucseg.model.adapter import WEIGHTS

    out: dict = {"checkpoint": None if checkpoint is None else str(checkpoint),
                 "checkpoint_sha256": None if checkpoint is None else sha256(Path(checkpoint)),
                 "adapter": None if adapter is None else str(adapter),
                 "adapter_weights_sha256": None if adapter is None else sha256(Path(adapter) / WEIGHTS)}
    built = {"base": (checkpoint, TINY_BASE, TINY_BASE.parent / "pretrain.json"),
             "adapter": (adapter, BENCH_ADAPTER, BENCH_ADAPTER.parent / "bench_adapter.json")}
    for name, (given, pinned, record) in built.items():
        if given is not None and Path(given).resolve() == pinned.resolve() and record.is_file():
            rec = json.loads(record.read_text())
            out[f"{name}_built_by"] = {k: rec.get(k) for k in ("command", "date", "recipe", "sha256", "seconds")}
            out[f"{name}_built_by"]["matches"] = rec.get("sha256") == out[
                "checkpoint_sha256" if name == "base" else "adapter_weights_sha256"]
    return out


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


def load_tiles(data: Path, n: int | None, tile_size: int) -> list:
    """The first ``n`` tiles (None: all) with nuclei, cut to ``tile_size``, of the held-out images of ``data``."""
    from nucseg.learn.data import load_dataset

    keep = set(bench_images(data, HELD_OUT_IMAGES))
    tiles = [t for t in load_dataset(data, tile_size=tile_size, drop_empty=True) if t.stem in keep]
    if n is None:
        return tiles
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
