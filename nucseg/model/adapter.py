"""The adapter folder: what fine-tuning produces, small enough to mail, never the base model.

    <adapter>/adapter.safetensors   the trained tensors only (LoRA factors, decoder, foreground head, and
                                    the prompt heads of nucseg.model.heads when trained with them)
    <adapter>/method.json           the MethodConfig that says where those tensors go
    <adapter>/nucseg.json           provenance: base model + checkpoint SHA-256, input size, µm/px,
                                    parameter counts, training config, data summary, cv metrics, version

Applying an adapter rebuilds the base (from the same checkpoint, verified by hash), applies the method and
loads the tensors; the base checkpoint file itself is never written. See adapters/README.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam

from .. import __version__
from ..errors import CheckpointError, InputError
from ..io import atomic_path, check_output, new_only, read_json, sha256_file, write_json
from ..wsi.slide import MPP_RANGE
from .lora import MethodConfig, apply_method, merge, trainable_state_dict
from .heads import HEAD_NAMES, attach_prompt_heads
from .sam import PATCH, SPECS, attach_foreground_head, load_sam, random_init_fingerprint

FORMAT = "nucseg-adapter"
FORMAT_VERSION = 1
MERGED_FORMAT = "nucseg-merged"
MIN_INPUT, MAX_INPUT = 64, 4096  # encoder input side (px): what a SAM encoder can sensibly run at
MIN_MPP, MAX_MPP = MPP_RANGE
WEIGHTS = "adapter.safetensors"
METHOD = "method.json"
META = "nucseg.json"
THRESHOLDS = "thresholds"  # calibrated inference thresholds (nucseg.learn.calibrate) of prompts auto / grid
MODES = "prompt_modes"  # the prompt modes the adapter's heads support (absent: auto and grid)
MODE_THRESHOLDS = "mode_thresholds"  # {"centers": thresholds, "none": thresholds}, calibrated like THRESHOLDS
HEAD_PREFIXES = ("fg_head.",) + tuple(f"{h}." for h in HEAD_NAMES)  # nucseg's heads: not part of SAM


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
        from ..learn.calibrate import validate_thresholds

        try:
            return validate_thresholds(self.meta[THRESHOLDS], f"{self.path / META}: thresholds")
        except InputError as err:
            raise CheckpointError(str(err)) from None

    @property
    def modes(self) -> list[str]:
        """The prompt modes this adapter supports (``auto`` and ``grid`` for one without prompt heads)."""
        return list(self.meta.get(MODES) or ["auto", "grid"])

    @property
    def mode_thresholds(self) -> dict[str, dict]:
        """Calibrated thresholds of every mode (``"auto"``: :attr:`thresholds`, then the learned modes')."""
        out = {"auto": self.thresholds} if self.thresholds is not None else {}
        return {**out, **(self.meta.get(MODE_THRESHOLDS) or {})}


def save_adapter(path: str | Path, model: Sam, method: MethodConfig, meta: dict) -> Path:
    """Write the adapter folder atomically (a killed job leaves the previous adapter or none)."""
    path = Path(path)
    tensors = trainable_state_dict(model)
    with atomic_path(path, is_dir=True, owned=is_adapter_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        write_json(tmp / METHOD, method.to_dict(), new_only)
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "nucseg_version": __version__,
            "method": method.to_dict(),
            "method_sha256": sha256_file(tmp / METHOD),
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "tensors": len(tensors),
            **meta,
        }
        write_json(tmp / META, full, new_only)
        from .modelcard import write_model_card

        write_model_card(tmp, full)  # README.md: the same provenance, for people
    return path


def is_adapter_dir(path: Path) -> bool:
    """A folder nucseg wrote as an adapter (what a rerun of training may replace): its ``nucseg.json`` says
    ``"format": "nucseg-adapter"``, an entry nucseg alone writes."""
    try:
        return path.is_dir() and not path.is_symlink() and read_json(path / META).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def is_adapter_meta(path: Path) -> bool:
    """The ``nucseg.json`` of an adapter folder nucseg wrote (calibration and cv rewrite it in place)."""
    return path.name == META and not path.is_symlink() and is_adapter_dir(path.parent)


def _is(value, kinds, lo=None, hi=None) -> bool:
    """``value`` has one of ``kinds`` (bool never counts as a number) and lies in [lo, hi]."""
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def validate_meta(meta) -> dict:
    """Check nucseg.json by type and range before anything is built from it; ValueError says what is wrong.

    Unknown keys are allowed (later minor versions add some); the keys nucseg reads are not optional.
    """
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
    if not _is(meta.get("format_version"), (int,), 1):
        raise ValueError(f"format_version must be a whole number >= 1, not {meta.get('format_version')!r}")
    base = meta.get("base")
    if not isinstance(base, dict) or base.get("model") not in SPECS or not _is(base.get("fingerprint"), (str,)) \
            or len(base["fingerprint"]) > 256:
        raise ValueError(f"base must name a model ({', '.join(SPECS)}) and a fingerprint")
    if base["fingerprint"].startswith("random-init:") and base["fingerprint"] != random_init_fingerprint(
            base["model"], base.get("init_seed", 0)):  # the model name is what decides the size of what is built
        raise ValueError(f"base.model {base['model']!r} and init_seed {base.get('init_seed', 0)!r} do not match "
                         f"the recorded base {base['fingerprint']!r}")
    if not _is(base.get("init_seed", 0), (int,), 0, 2**63 - 1):
        raise ValueError(f"base.init_seed must be a whole number >= 0, not {base.get('init_seed')!r}")
    size = meta.get("input_size")
    if not _is(size, (int,), MIN_INPUT, MAX_INPUT) or size % PATCH:
        raise ValueError(f"input_size must be a multiple of {PATCH} in {MIN_INPUT}..{MAX_INPUT}, not {size!r}")
    if meta.get("mpp") is not None and not _is(meta["mpp"], (int, float), MIN_MPP, MAX_MPP):
        raise ValueError(f"mpp must be null or a number of µm/px in {MIN_MPP}..{MAX_MPP}, not {meta['mpp']!r}")
    for key in ("weights_sha256", "method_sha256"):
        value = meta.get(key)
        if (key in meta or key == "weights_sha256") and not (isinstance(value, str) and len(value) == 64
                                                            and all(c in "0123456789abcdef" for c in value)):
            raise ValueError(f"{key} must be 64 hex digits, not {value!r}")
    if not isinstance(meta.get("method"), dict):
        raise ValueError("method must be a JSON object")
    try:  # method, rank, adapter width and scale, DoRA/rsLoRA flags: by type and range, before anything is built
        MethodConfig.from_dict(meta["method"])
    except (InputError, TypeError) as err:
        raise ValueError(f"method: {err}") from None
    if meta.get(THRESHOLDS) is not None:  # calibrated inference thresholds (nucseg.learn.calibrate)
        from ..learn.calibrate import validate_thresholds

        try:
            validate_thresholds(meta[THRESHOLDS], f"{META}: thresholds")
        except InputError as err:
            raise ValueError(str(err)) from None
    validate_modes(meta)
    return meta


def validate_modes(meta: dict) -> None:
    """``prompt_modes`` (a list of known modes) and ``mode_thresholds`` (thresholds of learned modes it lists)."""
    from ..learn.calibrate import validate_thresholds
    from .infer import PROMPT_MODES

    modes = meta.get(MODES)
    if modes is not None and not (isinstance(modes, list) and modes and all(m in PROMPT_MODES for m in modes)
                                  and len(set(modes)) == len(modes)):
        raise ValueError(f"{MODES} must be a list of distinct modes from {', '.join(PROMPT_MODES)}, not {modes!r}")
    per_mode = meta.get(MODE_THRESHOLDS)
    if per_mode is None:
        return
    if not isinstance(per_mode, dict):
        raise ValueError(f"{MODE_THRESHOLDS} must be a JSON object")
    for mode, t in per_mode.items():
        if mode not in ("centers", "none") or mode not in (modes or []):
            raise ValueError(f"{MODE_THRESHOLDS} has thresholds for {mode!r}, which is not a learned mode of "
                             f"this adapter ({MODES}: {modes})")
        try:
            validate_thresholds(t, f"{META}: {MODE_THRESHOLDS}.{mode}")
        except InputError as err:
            raise ValueError(str(err)) from None


def read_adapter(path: str | Path) -> AdapterInfo:
    """Read and check an adapter's description (types, ranges, the method file's hash) before anything is built.

    A tampered or damaged nucseg.json / method.json is a CheckpointError (exit 4), never a traceback, and never
    a model of absurd size: the rank is bounded here, before :func:`apply_adapter` allocates anything.
    """
    path = Path(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not a nucseg adapter (expected {META} and {WEIGHTS})")
    try:
        meta = read_json(path / META)  # strict and depth-limited: never a RecursionError
        if isinstance(meta, dict) and _is(meta.get("format_version"), (int,)) and meta["format_version"] > FORMAT_VERSION:
            raise CheckpointError(f"adapter {path} needs a newer nucseg (format {meta['format_version']})")
        validate_meta(meta)
        method_raw = meta["method"]
        if (path / METHOD).is_file():
            if "method_sha256" in meta and sha256_file(path / METHOD) != meta["method_sha256"]:
                raise ValueError(f"{METHOD} does not match its SHA-256 recorded in {META}")
            method_raw = read_json(path / METHOD)
            if method_raw != meta["method"]:
                raise ValueError(f"{METHOD} and the method recorded in {META} differ")
        if not isinstance(method_raw, dict):
            raise ValueError("method must be a JSON object")
        method = MethodConfig.from_dict(method_raw)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, InputError, UnicodeDecodeError) as err:
        raise CheckpointError(f"adapter {path} has an invalid {META} or {METHOD}: {err}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read adapter {path}: {err.strerror or err}") from None
    return AdapterInfo(path, meta, method)


def write_thresholds(path: str | Path, thresholds: dict, mode_thresholds: dict | None = None) -> dict:
    """Store calibrated thresholds in the adapter's nucseg.json, atomically; every other key is kept as is.

    ``thresholds``: those of prompts auto / grid; ``mode_thresholds``: those of the learned modes
    (``{"centers": ..., "none": ...}``), replacing the stored ones mode by mode.
    The weights and their recorded SHA-256 are untouched (the hash covers ``adapter.safetensors`` only), so
    the adapter stays loadable; prediction caches key on the thresholds through the segmenter's settings.
    """
    from ..learn.calibrate import validate_thresholds

    info = read_adapter(path)
    meta = dict(info.meta, **{THRESHOLDS: validate_thresholds(dict(thresholds))})
    if mode_thresholds:
        meta[MODE_THRESHOLDS] = {**(info.meta.get(MODE_THRESHOLDS) or {}), **mode_thresholds}
    validate_modes(meta)
    write_json(info.path / META, meta, is_adapter_meta)
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
    model, _ = load_sam(base["model"], checkpoint, img_size=info.input_size, seed=seed,
                        check=lambda fingerprint: check_base(info, base["model"], fingerprint))  # before building
    apply_adapter(model, info)
    return model.eval(), info


def apply_adapter(model: Sam, info: AdapterInfo) -> Sam:
    """Load the adapter's tensors into an already-built base (hash checked before the method is applied)."""
    weights = info.path / WEIGHTS
    if sha256_file(weights) != info.meta.get("weights_sha256"):
        raise CheckpointError(f"adapter weights {weights} do not match their recorded SHA-256 (corrupt copy?)")
    apply_method(model, info.method)
    try:
        tensors = load_file(str(weights))
    except Exception as err:
        raise CheckpointError(f"cannot read adapter weights {weights}: {err}") from None
    if any(k.startswith("fg_head.") for k in tensors):
        attach_foreground_head(model)
    heads = tuple(h for h in HEAD_NAMES if any(k.startswith(f"{h}.") for k in tensors))
    if heads:
        attach_prompt_heads(model, heads)
    expected = {n for n, p in model.named_parameters() if p.requires_grad} | {
        n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIXES)}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise CheckpointError(f"adapter {info.path} does not fit its method (missing {missing}, unexpected {extra})")
    own = dict(model.named_parameters())
    for name, value in sorted(tensors.items()):  # all checked before any is copied
        check_tensor(info.path, name, value, own[name])
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)
    return model


def check_tensor(path: Path, name: str, value: torch.Tensor, param: torch.Tensor) -> None:
    """An adapter tensor must be what the method creates for ``name``: its shape, its dtype (``copy_`` would
    silently cast int8 or float64 weights) and finite values (a NaN weight gives 0 nuclei, not an error). The
    recorded SHA-256 only proves the file is the one described, not that what was hashed is sane."""
    if param.shape != value.shape:
        raise CheckpointError(f"adapter {path}: tensor {name} has shape {tuple(value.shape)}, the method creates "
                              f"{tuple(param.shape)}")
    if value.dtype != param.dtype:
        raise CheckpointError(f"adapter {path}: tensor {name} is {str(value.dtype).removeprefix('torch.')}, the "
                              f"method creates {str(param.dtype).removeprefix('torch.')}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise CheckpointError(f"adapter {path}: tensor {name} holds {bad} NaN or infinite values (a damaged or "
                              "diverged training run)")


def is_merged_checkpoint(path: Path) -> bool:
    """A merged model nucseg exported (.safetensors tagged as such; a .pth cannot be told apart, so never)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("format") == MERGED_FORMAT
    except Exception:
        return False


def check_merge_output(out: str | Path, inputs: list = ()) -> Path:
    """Before any work: the merged-model path must not replace a file nucseg did not export, nor be, lie inside or
    hold one of ``inputs`` (the adapter folder, the base checkpoint: ``--checkpoint M -o M`` is refused even
    when M is a merged model nucseg wrote, since every adapter trained on M would stop loading)."""
    return check_output(out, is_merged_checkpoint, inputs=[p for p in inputs if p is not None])


def export_merged(model: Sam, out: str | Path) -> Path:
    """Fold the adapter into the base and save a full state dict with official SAM keys (one file)."""
    merge(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
    with atomic_path(out, owned=is_merged_checkpoint) as tmp:
        if str(out).endswith(".safetensors"):
            save_file(state, str(tmp), metadata={"format": MERGED_FORMAT})
        else:  # through a handle: torch names the zip's records after a path (here a random temporary one),
            with open(tmp, "wb") as fh:  # so the same tensors would give a different file every time
                torch.save(state, fh)
    return Path(out)
