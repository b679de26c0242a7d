"""The adapter folder: what fine-tuning produces, small enough to mail, never the base model.

    <adapter>/adapter.safetensors   the trained tensors only (LoRA factors, decoder, foreground head)
    <adapter>/method.json           the MethodConfig that says where those tensors go
    <adapter>/nucseg.json           provenance: base model + checkpoint SHA-256, input size, µm/px,
                                    parameter counts, training config, data summary, cv metrics, version

Applying an adapter rebuilds the base (from the same checkpoint, verified by hash), applies the method and
loads the tensors; the base checkpoint file itself is never written. See adapters/README.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam

from . import __version__
from .errors import CheckpointError, InputError
from .io import atomic_path, sha256_file, write_json
from .lora import MethodConfig, apply_method, merge, trainable_state_dict
from .sam import attach_foreground_head, load_sam

FORMAT = "nucseg-adapter"
FORMAT_VERSION = 1
WEIGHTS = "adapter.safetensors"
METHOD = "method.json"
META = "nucseg.json"
THRESHOLDS = "thresholds"  # calibrated inference thresholds (nucseg.calibrate)


@dataclass
class AdapterInfo:
    path: Path
    meta: dict
    method: MethodConfig

    @property
    def model_type(self) -> str:
        return self.meta["base"]["model"]

    @property
    def mpp(self) -> float | None:
        return self.meta.get("mpp")

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def thresholds(self) -> dict | None:
        """The calibrated inference thresholds (``nucseg.json`` key ``"thresholds"``), validated; None if absent."""
        if self.meta.get(THRESHOLDS) is None:
            return None
        from .calibrate import validate_thresholds

        try:
            return validate_thresholds(self.meta[THRESHOLDS], f"{self.path / META}: thresholds")
        except InputError as err:
            raise CheckpointError(str(err)) from None


def save_adapter(path: str | Path, model: Sam, method: MethodConfig, meta: dict) -> Path:
    """Write the adapter folder atomically (a killed job leaves the previous adapter or none)."""
    path = Path(path)
    tensors = trainable_state_dict(model)
    with atomic_path(path, is_dir=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        write_json(tmp / METHOD, method.to_dict())
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "nucseg_version": __version__,
            "method": method.to_dict(),
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "tensors": len(tensors),
            **meta,
        }
        write_json(tmp / META, full)
    return path


def read_adapter(path: str | Path) -> AdapterInfo:
    path = Path(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not a nucseg adapter (expected {META} and {WEIGHTS})")
    try:
        meta = json.loads((path / META).read_text())
        method = MethodConfig.from_dict(json.loads((path / METHOD).read_text()) if (path / METHOD).is_file()
                                        else meta["method"])
        if meta.get("format") != FORMAT or "base" not in meta or "input_size" not in meta:
            raise ValueError("not a nucseg adapter description")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"adapter {path} has an unreadable {META}: {err}") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"adapter {path} needs a newer nucseg (format {meta['format_version']})")
    return AdapterInfo(path, meta, method)


def write_thresholds(path: str | Path, thresholds: dict) -> dict:
    """Store calibrated thresholds in the adapter's nucseg.json, atomically; every other key is kept as is.

    The weights and their recorded SHA-256 are untouched (the hash covers ``adapter.safetensors`` only), so
    the adapter stays loadable; prediction caches key on the thresholds through the segmenter's settings.
    """
    from .calibrate import validate_thresholds

    info = read_adapter(path)
    meta = dict(info.meta, **{THRESHOLDS: validate_thresholds(dict(thresholds))})
    write_json(info.path / META, meta)
    return meta


def check_base(info: AdapterInfo, model_type: str, fingerprint: str) -> None:
    """Refuse to apply an adapter to a base it was not trained on: the result would be silently wrong."""
    base = info.meta["base"]
    if base["model"] != model_type:
        raise CheckpointError(f"adapter {info.path} was trained on {base['model']}, not {model_type}")
    if base["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"adapter {info.path} was trained on base weights {base['fingerprint'][:24]}, but the given base is "
            f"{fingerprint[:24]}; pass the --checkpoint it was trained with"
        )


def load_adapter(path: str | Path, checkpoint: str | Path | None = None) -> tuple[Sam, AdapterInfo]:
    """Base model (from ``checkpoint`` or the seeded random init recorded in the adapter) + adapter."""
    info = read_adapter(path)
    base = info.meta["base"]
    seed = int(base.get("init_seed", 0))
    model, fingerprint = load_sam(base["model"], checkpoint, img_size=info.input_size, seed=seed)
    check_base(info, base["model"], fingerprint)
    apply_adapter(model, info)
    return model.eval(), info


def apply_adapter(model: Sam, info: AdapterInfo) -> Sam:
    """Apply the method and load the adapter's tensors into an already-built base."""
    apply_method(model, info.method)
    weights = info.path / WEIGHTS
    if sha256_file(weights) != info.meta.get("weights_sha256"):
        raise CheckpointError(f"adapter weights {weights} do not match their recorded SHA-256 (corrupt copy?)")
    try:
        tensors = load_file(str(weights))
    except Exception as err:
        raise CheckpointError(f"cannot read adapter weights {weights}: {err}") from None
    if any(k.startswith("fg_head.") for k in tensors):
        attach_foreground_head(model)
    expected = {n for n, p in model.named_parameters() if p.requires_grad} | {
        n for n, _ in model.named_parameters() if n.startswith("fg_head.")}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise CheckpointError(f"adapter {info.path} does not fit its method (missing {missing}, unexpected {extra})")
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if own[name].shape != value.shape:
                raise CheckpointError(f"adapter tensor {name} has shape {tuple(value.shape)}, "
                                      f"model expects {tuple(own[name].shape)}")
            own[name].copy_(value)
    return model


def export_merged(model: Sam, out: str | Path) -> Path:
    """Fold the adapter into the base and save a full state dict with official SAM keys (one file)."""
    merge(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("fg_head.")}
    with atomic_path(out) as tmp:
        if str(out).endswith(".safetensors"):
            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
    return Path(out)
