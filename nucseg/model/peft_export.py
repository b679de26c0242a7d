"""Export a nucseg adapter in PEFT's format, so ``peft.PeftModel.from_pretrained(sam, OUT)`` loads it.

SAM fuses q, k and v into one ``qkv`` Linear, and nucseg's SAMed LoRA adapts the q and v slices with a
rank-r pair (A_p, B_p) each. That is exactly a PEFT LoRA of rank ``len(parts) * r`` on the whole ``qkv``:

    A = [A_q; A_v]                       (2r, dim)     the factors stacked
    B = [[B_q, 0], [0, 0], [0, B_v]]      (3 dim, 2r)   rows of q from the q factor, zero rows for k

so ``B @ A = [B_q A_q; 0; B_v A_v]``, the update nucseg adds. The config's ``r`` stays the user's rank and
``rank_pattern`` gives ``attn.qkv`` its rank ``len(parts) * r``. PEFT scales by ``lora_alpha / r``; the
exported ``lora_alpha`` (``alpha_pattern``) is chosen so that this quotient is nucseg's scale to the last bit
(checked).
Whole-module targets (``qkv``, ``proj``, ``mlp``) were trained through peft already: their keys only lose
the adapter name. A trained mask decoder (prompt encoder) becomes ``modules_to_save``. A decoder-only
adapter has no LoRA layer at all: it is exported with peft's placeholder target ``dummy-target-modules``,
which makes PEFT wrap nothing but the ``modules_to_save``. A full fine-tune is no adapter; it is refused
(``nucseg merge`` writes it as one checkpoint).

The foreground head used for prompt pruning is not part of SAM, so it goes in a side file
(``nucseg_fg_head.safetensors``, keys of :class:`nucseg.model.sam.ForegroundHead`). The exported tensors are
checked against the key names and shapes that the installed peft itself produces for this config.

Two flavours: segment-anything's ``Sam`` (the keys above) and transformers' ``SamModel`` (the same tensors
under its module names, :mod:`nucseg.model.hf_sam`). The model card (:mod:`nucseg.model.modelcard`) carries
code that builds the base and loads the export without nucseg.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, InputError
from ..io import JsonMark, atomic_path, check_output, sha256_file, write_json
from .adapter import HEAD_PREFIXES, WEIGHTS, AdapterInfo, read_adapter
from .lora import PEFT_TARGETS, SLICE_TARGETS

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FG_HEAD = "nucseg_fg_head.safetensors"
PROVENANCE = "nucseg_export.json"
EXPORT_MARK = JsonMark("peft-export")  # in PROVENANCE: the folder is an export nucseg wrote (adapter_config.json
# alone proves nothing: every PEFT adapter has one)
PREFIX = "base_model.model."  # where PeftModel keeps the wrapped model
QKV = r"image_encoder\.blocks\.\d+\.attn\.qkv"
HF_TARGETS = {  # the same Linear modules under transformers' SamModel names (QKV is PEFT_TARGETS["qkv"])
    PEFT_TARGETS["qkv"]: r"vision_encoder\.layers\.\d+\.attn\.qkv",
    PEFT_TARGETS["proj"]: r"vision_encoder\.layers\.\d+\.attn\.proj",
    PEFT_TARGETS["mlp"]: r"vision_encoder\.layers\.\d+\.mlp\.lin[12]",
}
FLAVOURS = ("sam", "transformers")  # segment-anything's Sam, transformers' SamModel
_SLICE_KEY = re.compile(r"^(image_encoder\.blocks\.\d+\.attn\.qkv)\.lora_([AB])\.([qkv])$")


@dataclass
class PeftExport:
    """What :func:`to_peft` computed: the LoraConfig arguments, PEFT's tensors and the foreground head's."""

    config: dict
    tensors: dict[str, torch.Tensor]
    fg_head: dict[str, torch.Tensor]


def _alpha_for(scale: float, r: int) -> float:
    """A ``lora_alpha`` whose ``lora_alpha / r`` is ``scale`` exactly in float64 (PEFT's scaling)."""
    alpha = scale * r
    for _ in range(4):
        q = alpha / r
        if q == scale:
            return alpha
        alpha = math.nextafter(alpha, math.inf if q < scale else -math.inf)
    raise CheckpointError(f"no PEFT lora_alpha reproduces nucseg's LoRA scale {scale!r} at rank {r} exactly")


def to_peft(info: AdapterInfo, tensors: dict[str, torch.Tensor]) -> PeftExport:
    """Map an adapter's tensors to PEFT's keys and config (pure: nothing is read or written)."""
    cfg = info.method
    if cfg.method in ("adapter", "medsa"):
        raise InputError(f"adapter {info.path} uses --method {cfg.method}: its bottleneck modules have no PEFT "
                         f"equivalent; load it with nucseg (nucseg.model.adapter.load_adapter)")
    if getattr(cfg, "dora", False):
        raise InputError(f"adapter {info.path} uses DoRA, whose magnitude vector is per output row of each adapted "
                         f"slice and has no exact PEFT form on the fused qkv; load it with nucseg")
    if cfg.method == "full":
        raise InputError(f"adapter {info.path} is a full fine-tune (every encoder weight changed): PEFT has no "
                         "adapter form for it; 'nucseg merge' writes it as one checkpoint with official SAM keys")
    fg = {k.removeprefix("fg_head."): v for k, v in tensors.items() if k.startswith("fg_head.")}
    parts = [p for p in SLICE_TARGETS if cfg.method == "lora" and p in cfg.targets]
    whole = [t for t in cfg.targets if cfg.method == "lora" and t in PEFT_TARGETS]
    out: dict[str, torch.Tensor] = {}
    slices: dict[str, dict[str, torch.Tensor]] = {}
    modules: set[str] = set()
    for key, value in tensors.items():
        if key.startswith(HEAD_PREFIXES):  # nucseg's own heads: the foreground head is saved beside, the
            continue  # prompt heads (centers / none modes) need nucseg itself
        m = _SLICE_KEY.match(key)
        if m:
            slices.setdefault(m.group(1), {})[m.group(2) + m.group(3)] = value
        elif ".lora_" in key and ".default." in key:  # a peft-injected layer: drop the adapter name
            out[PREFIX + key.replace(".default.", ".")] = value
        elif key.split(".", 1)[0] in ("mask_decoder", "prompt_encoder"):
            modules.add(key.split(".", 1)[0])
            out[PREFIX + key] = value
        else:
            raise CheckpointError(f"adapter {info.path} holds a tensor PEFT cannot express: {key}")
    for module, f in slices.items():
        if sorted(f) != sorted(f"{ab}{p}" for p in parts for ab in "AB"):
            raise CheckpointError(f"adapter {info.path}: {module} has LoRA factors {sorted(f)}, its method "
                                  f"says {parts}")
        dim, r = f[f"B{parts[0]}"].shape
        a = torch.cat([f[f"A{p}"] for p in parts], 0)  # (len(parts) * r, dim)
        b = a.new_zeros(3 * dim, len(parts) * r)
        for j, p in enumerate(parts):
            i = SLICE_TARGETS.index(p)
            b[i * dim : (i + 1) * dim, j * r : (j + 1) * r] = f[f"B{p}"]
        out[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        out[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()

    patterns = ([QKV] if parts else []) + [PEFT_TARGETS[t] for t in whole]
    config: dict = {
        "r": cfg.rank,
        "lora_alpha": _alpha_for(cfg.scale, cfg.rank),
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "modules_to_save": sorted(modules) or None,
        "base_model_name_or_path": None,  # set by export_peft: the official checkpoint's Hub id, or the user's
    }
    if not patterns:  # decoder only: PEFT needs a target; its placeholder targets nothing
        config["target_modules"] = _dummy_target()
    else:
        config["target_modules"] = "|".join(f"(?:{p})" for p in patterns)
    if parts:  # ``r`` stays the user's rank; the fused qkv gets rank len(parts) * r through rank_pattern
        rq = len(parts) * cfg.rank
        config["rank_pattern"] = {"attn.qkv": rq}
        config["alpha_pattern"] = {"attn.qkv": _alpha_for(cfg.scale, rq)}
    return PeftExport(config, out, fg)


def to_transformers_export(export: PeftExport) -> PeftExport:
    """The same export for transformers' ``SamModel``: its module names, and the ``auto_mapping`` that lets
    ``peft.AutoPeftModel`` build the base (PEFT has no task type for segmentation, so ``task_type`` is null)."""
    from .hf_sam import transformers_key

    config = dict(export.config)
    if config["target_modules"] != _dummy_target():
        patterns = [p for p in HF_TARGETS if f"(?:{p})" in config["target_modules"]]
        config["target_modules"] = "|".join(f"(?:{HF_TARGETS[p]})" for p in patterns)
    config["auto_mapping"] = {"base_model_class": "SamModel", "parent_library": "transformers.models.sam.modeling_sam"}
    return PeftExport(config, {transformers_key(k): v for k, v in export.tensors.items()}, export.fg_head)


def _dummy_target() -> str:
    try:
        from peft.utils.constants import DUMMY_TARGET_MODULES
    except ImportError:
        import peft

        raise CheckpointError(f"peft {peft.__version__} has no placeholder target, so it cannot hold a "
                              "decoder-only adapter; upgrade peft (tested with 0.21)") from None
    return DUMMY_TARGET_MODULES


def check_against_peft(export: PeftExport, model_type: str, input_size: int, flavour: str = "sam") -> list[str]:
    """Build the model (``flavour``: segment-anything's ``Sam`` or transformers' ``SamModel``) on the meta
    device, let peft wrap it with ``export.config`` and compare key names and shapes with what PEFT would save:
    an export that peft cannot load is an error here, not for the user.

    Returns the buffers of ``modules_to_save`` that PEFT wants in the file but an adapter never stores (they
    are the base's: the prompt encoder's random Fourier matrix), for the caller to take from the base."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from .sam import build_sam

    with torch.device("meta"):
        if flavour == "transformers":
            from transformers import SamModel

            from .hf_sam import transformers_config

            base = SamModel(transformers_config(model_type, input_size))
        else:
            base = build_sam(model_type, input_size)
        wrapped = get_peft_model(base, LoraConfig(**export.config))
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(wrapped).items()}
    buffers = {PREFIX + n.replace(".modules_to_save.default.", ".") for n, _ in wrapped.base_model.model.named_buffers()}
    have = {k: tuple(v.shape) for k, v in export.tensors.items()}
    missing = sorted(set(want) - set(have) - buffers)
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
        raise CheckpointError(f"PEFT export does not fit peft's layout (missing {missing[:3]}, unexpected "
                              f"{extra[:3]}, mis-shaped {wrong[:3]})")
    return sorted((set(want) - set(have)) & buffers)


def is_peft_export(path: Path) -> bool:
    """A folder nucseg's export wrote (what a rerun may replace): its ``nucseg_export.json`` carries the marker."""
    return path.is_dir() and not path.is_symlink() and EXPORT_MARK(path / PROVENANCE)


@dataclass
class ExportOptions:
    """What the user says about an export beyond the adapter itself (``nucseg export-peft`` options).

    ``flavour``: the model PEFT wraps, segment-anything's ``Sam`` ("sam") or transformers' ``SamModel``
    ("transformers"). ``base_model``: the Hub id or folder of the base in transformers' format (default: the
    Hub's conversion of an official checkpoint; required for other bases with the transformers flavour).
    ``license``: the export's licence identifier, for the training data's terms (the base, SAM, is
    Apache-2.0). ``datasets``: what it was trained on (Hub ids or names)."""

    flavour: str = "sam"
    base_model: str | None = None
    license: str | None = None
    datasets: tuple[str, ...] = ()


def export_peft(adapter: str | Path, out: str | Path, checkpoint: str | Path | None = None,
                options: ExportOptions | None = None) -> Path:
    """Write ``out/`` with adapter_config.json, adapter_model.safetensors, the foreground head side file,
    the provenance of the source adapter and a model card (README.md). Returns ``out``.

    ``checkpoint`` (the base) is read only for adapters that trained the prompt encoder: PEFT stores that
    whole module, including a buffer the adapter takes from the base."""
    info = read_adapter(adapter)
    # never replace another tool's PEFT folder, nor write into (or over) the adapter or base read here
    out = check_output(out, is_peft_export, inputs=[info.path, *([checkpoint] if checkpoint else [])])
    from peft import LoraConfig  # after the cheap checks: importing peft takes seconds

    from .modelcard import PeftCard, write_model_card

    options = options or ExportOptions()
    if options.flavour not in FLAVOURS:
        raise InputError(f"unknown flavour {options.flavour!r}; choose one of {', '.join(FLAVOURS)}")
    card = PeftCard.for_adapter(info.meta, options)
    weights = info.path / WEIGHTS
    sha = sha256_file(weights)
    if sha != info.meta.get("weights_sha256"):
        raise CheckpointError(f"adapter weights {weights} do not match their recorded SHA-256 (corrupt copy?)")
    try:
        tensors = load_file(str(weights))
    except Exception as err:
        raise CheckpointError(f"cannot read adapter weights {weights}: {err}") from None
    export = to_peft(info, tensors)
    buffers = check_against_peft(export, info.model_type, info.input_size)
    if buffers:
        export.tensors.update(_base_buffers(info, checkpoint, buffers))
    if options.flavour == "transformers":
        export = to_transformers_export(export)
        missing = check_against_peft(export, info.model_type, info.input_size, "transformers")
        if missing:  # the Sam export already holds every base tensor PEFT stores: renamed, nothing is missing
            raise CheckpointError(f"PEFT export for SamModel lacks tensors PEFT stores: {missing[:3]}")
    export.config["base_model_name_or_path"] = card.base_model_name_or_path
    with atomic_path(out, is_dir=True, owned=is_peft_export) as tmp:
        LoraConfig(**export.config).save_pretrained(str(tmp))
        save_file(export.tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        if export.fg_head:
            w = export.fg_head["net.0.weight"]
            save_file(export.fg_head, str(tmp / FG_HEAD), metadata={
                "module": "nucseg.model.sam.ForegroundHead", "in_channels": str(w.shape[1]), "hidden": str(w.shape[0]),
                "layers": "Conv2d(in,hidden,3,padding=1) GELU Conv2d(hidden,1,1)",
                "input": "image embedding (B, C, h, w)", "output": "nucleus foreground logits (B, 1, h, w)"})
        write_json(tmp / PROVENANCE, {
            "flavour": options.flavour,
            "rank_per_slice": export.config["r"] if "rank_pattern" in export.config else None,  # q/k/v slices
            "source_adapter": str(info.path), "source_weights_sha256": sha,
            "peft_weights_sha256": sha256_file(tmp / PEFT_WEIGHTS),
            "fg_head_sha256": sha256_file(tmp / FG_HEAD) if export.fg_head else None,
            "nucseg": info.meta,
        }, EXPORT_MARK)
        write_model_card(tmp, info.meta, peft=card)
    return out


def _base_buffers(info: AdapterInfo, checkpoint: str | Path | None, keys: list[str]) -> dict[str, torch.Tensor]:
    from .adapter import check_base
    from .sam import load_sam

    base = info.meta["base"]
    if checkpoint is None and base.get("checkpoint_sha256"):
        raise InputError(f"adapter {info.path} trained the prompt encoder; PEFT stores it whole, with buffers "
                         f"that come from the base: pass --checkpoint ({base.get('checkpoint_name')})")
    model, _ = load_sam(info.model_type, checkpoint, img_size=info.input_size, seed=int(base.get("init_seed", 0)),
                        check=lambda fingerprint: check_base(info, info.model_type, fingerprint))
    state = model.state_dict()
    return {k: state[k.removeprefix(PREFIX)].detach().clone().contiguous() for k in keys}
