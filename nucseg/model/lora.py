"""Which parameters of SAM are trained: LoRA on the image encoder (SAMed; optionally DoRA / rsLoRA), adapter
modules (SAM-Adapter: :mod:`nucseg.model.adapters_sam`; Med-SA: :mod:`nucseg.model.medsa`), decoder only, or everything.

SAM fuses q, k and v into one ``qkv`` Linear, so LoRA on q and v alone (SAMed's recipe) cannot be expressed
as a peft target: :class:`QKVLoRA` is a drop-in ``nn.Linear`` that keeps the base ``weight``/``bias`` under
their official names and adds low-rank updates to the q and/or v slices. Whole-module targets (``qkv``,
``proj``, ``mlp``) go through peft. The base weights are frozen and never written to; ``merge`` folds the
updates into a copy for export
(adapter modules add non-linear branches and cannot be folded: :data:`MERGEABLE`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import Sam

from ..choices import MAX_ADAPTER_DIM, MAX_ADAPTER_SCALE, MAX_RANK, METHODS  # noqa: F401 - defined there for the CLI
from ..errors import CheckpointError, InputError

MERGEABLE = ("lora", "decoder", "full")  # adapter/medsa add modules that no weight of SAM can absorb
ADAPTER_METHODS = ("adapter", "medsa")
SLICE_TARGETS = ("q", "k", "v")  # slices of the fused qkv projection: our own module
PEFT_TARGETS = {  # whole Linear modules of each encoder block: peft
    "qkv": r"image_encoder\.blocks\.\d+\.attn\.qkv",
    "proj": r"image_encoder\.blocks\.\d+\.attn\.proj",
    "mlp": r"image_encoder\.blocks\.\d+\.mlp\.lin[12]",
}


@dataclass
class MethodConfig:
    """How the model is adapted. Saved with every adapter as ``method.json``."""

    method: str = "lora"
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank, i.e. scale 1, as SAMed
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    dropout: float = 0.0
    train_decoder: bool = True
    train_prompt_encoder: bool = False
    adapter_dim: int | None = None  # adapter/medsa bottleneck width; None: the paper's (C/32, resp. 0.25 C)
    adapter_scale: float | None = None  # adapter/medsa branch scale; None: the paper's (1, resp. 0.5)
    dora: bool = False  # lora: weight-decomposed LoRA (Liu et al., 2024)
    rslora: bool = False  # lora: rank-stabilised scale alpha/sqrt(rank) (Kalajdzievski, 2023)

    def validate(self) -> "MethodConfig":
        """Types and ranges first (method.json is a file a user may have been handed), then the combinations."""
        if not isinstance(self.method, str) or not isinstance(self.targets, list) \
                or not all(isinstance(t, str) for t in self.targets):
            raise InputError("method and targets must be text")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise InputError(f"LoRA rank must be a whole number in 1..{MAX_RANK}, got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not 0 < self.alpha <= 1e4):
            raise InputError(f"LoRA alpha must be a number in (0, 10000], got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not all(isinstance(v, bool) for v in (self.train_decoder, self.train_prompt_encoder, self.dora, self.rslora)):
            raise InputError("train_decoder, train_prompt_encoder, dora and rslora must be true or false")
        if self.adapter_dim is not None and (isinstance(self.adapter_dim, bool) or not isinstance(self.adapter_dim, int)
                                             or not 1 <= self.adapter_dim <= MAX_ADAPTER_DIM):
            raise InputError(f"adapter dim must be a whole number in 1..{MAX_ADAPTER_DIM}, got {self.adapter_dim!r}")
        if self.adapter_scale is not None and (isinstance(self.adapter_scale, bool)
                                               or not isinstance(self.adapter_scale, (int, float))
                                               or not math.isfinite(self.adapter_scale)
                                               or not 0 < self.adapter_scale <= MAX_ADAPTER_SCALE):
            raise InputError(f"adapter scale must be a number in (0, {MAX_ADAPTER_SCALE:g}], got {self.adapter_scale!r}")
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "lora":
            bad = [t for t in self.targets if t not in SLICE_TARGETS and t not in PEFT_TARGETS]
            if bad or not self.targets:
                raise InputError(
                    f"unknown LoRA target(s) {bad or self.targets}; choose from "
                    f"{', '.join(SLICE_TARGETS + tuple(PEFT_TARGETS))}"
                )
            if "qkv" in self.targets and any(t in SLICE_TARGETS for t in self.targets):
                raise InputError("LoRA target 'qkv' already covers q, k and v; do not combine them")
            if self.rank < 1:
                raise InputError(f"LoRA rank must be >= 1, got {self.rank}")
        elif self.dora or self.rslora:
            raise InputError(f"--dora and --rslora modify LoRA; they do not apply to --method {self.method}")
        if self.method not in ADAPTER_METHODS and (self.adapter_dim is not None or self.adapter_scale is not None):
            raise InputError(f"--adapter-dim and --adapter-scale apply to --method adapter or medsa, "
                             f"not {self.method}")
        return self

    @property
    def scale(self) -> float:
        """LoRA's alpha/rank, or alpha/sqrt(rank) with rsLoRA (as peft's ``use_rslora``)."""
        alpha = self.alpha if self.alpha is not None else self.rank
        return alpha / math.sqrt(self.rank) if self.rslora else alpha / self.rank

    def describe(self) -> str:
        """One line for tables and summaries."""
        if self.method == "lora":
            extra = "".join(f", {name}" for name, on in (("DoRA", self.dora), ("rsLoRA", self.rslora)) if on)
            return f"lora (rank {self.rank}, targets {','.join(self.targets)}{extra})"
        if self.method in ADAPTER_METHODS:
            dim = "paper default" if self.adapter_dim is None else self.adapter_dim
            scale = "paper default" if self.adapter_scale is None else f"{self.adapter_scale:g}"
            return f"{self.method} (bottleneck {dim}, scale {scale})"
        return self.method

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known).validate()


class QKVLoRA(nn.Linear):
    """SAM's fused qkv Linear with low-rank updates on chosen slices (q, k, v).

    Subclassing nn.Linear keeps ``weight`` and ``bias`` at their official state-dict keys, so an adapted
    model still loads and saves base weights under the names of the official checkpoints.

    With ``dora`` each adapted slice is weight-decomposed as in DoRA (Liu et al., 2024) and peft's
    implementation: ``W' = m * (W + s B A) / ||W + s B A||`` with one magnitude per output row, ``m`` starting
    at the row norms of ``W`` and the norm treated as a constant in the backward pass (DoRA, section 4.3). DoRA's
    norm is per output row, so on a slice of the fused qkv rows it is exactly DoRA on a separate q (or v)
    Linear (checked against peft in the tests).
    """

    def __init__(self, base: nn.Linear, parts: list[str], rank: int, scale: float, dropout: float = 0.0,
                 dora: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.dim = base.in_features
        self.parts = [p for p in SLICE_TARGETS if p in parts]
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dora = dora
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        for p in self.parts:
            a = torch.empty(rank, self.dim, device=base.weight.device, dtype=base.weight.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft/LoRA: A random, B zero, so delta starts at 0
            self.lora_A[p] = nn.Parameter(a)
            self.lora_B[p] = nn.Parameter(torch.zeros(self.dim, rank, device=a.device, dtype=a.dtype))
            if dora:
                with torch.no_grad():
                    self.lora_magnitude[p] = nn.Parameter(torch.linalg.norm(self._rows(p), dim=1))

    def _rows(self, part: str) -> torch.Tensor:
        i = SLICE_TARGETS.index(part)
        return self.weight[i * self.dim : (i + 1) * self.dim]

    def _dora_factor(self, part: str) -> torch.Tensor:
        """m / ||W + s B A|| per output row of ``part``, the norm detached (DoRA section 4.3, as peft)."""
        lora = (self.lora_B[part] @ self.lora_A[part]).detach()
        norm = torch.linalg.norm(self._rows(part) + self.scale * lora, dim=1).detach()
        return self.lora_magnitude[part] / norm

    def delta_weight(self) -> torch.Tensor:
        """The (3*dim, dim) update that the LoRA factors add to the fused weight."""
        blocks = []
        for p in SLICE_TARGETS:
            if p not in self.lora_A:
                blocks.append(self.weight.new_zeros(self.dim, self.dim))
            elif self.dora:
                adapted = self._rows(p) + self.lora_B[p] @ self.lora_A[p] * self.scale
                blocks.append(self._dora_factor(p)[:, None] * adapted - self._rows(p))
            else:
                blocks.append(self.lora_B[p] @ self.lora_A[p] * self.scale)
        return torch.cat(blocks, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = self.dropout(x)
        updates = []
        for i, p in enumerate(SLICE_TARGETS):
            if p not in self.lora_A:
                updates.append(out.new_zeros(()).expand(*out.shape[:-1], self.dim))
                continue
            lora = F.linear(F.linear(h, self.lora_A[p]), self.lora_B[p]) * self.scale
            if self.dora:  # peft's DoRA: (m/n - 1) * (W x) + (m/n) * s B A x on top of the base output
                factor = self._dora_factor(p)
                if isinstance(self.dropout, nn.Identity) or not self.training:
                    base = out[..., i * self.dim : (i + 1) * self.dim]
                    if self.bias is not None:
                        base = base - self.bias[i * self.dim : (i + 1) * self.dim]
                else:
                    base = F.linear(h, self._rows(p))
                lora = (factor - 1) * base + factor * lora
            updates.append(lora)
        return out + torch.cat(updates, dim=-1)

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin = lin.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def apply_method(model: Sam, cfg: MethodConfig) -> Sam:
    """Freeze the base and make the parameters of ``cfg`` trainable, in place. Returns the model."""
    cfg.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "full":
        for p in model.image_encoder.parameters():
            p.requires_grad_(True)
    if cfg.method in ADAPTER_METHODS:
        if cfg.method == "adapter":
            from .adapters_sam import apply_sam_adapter as insert
        else:
            from .medsa import apply_medsa as insert
        for p in insert(model, cfg.adapter_dim, cfg.adapter_scale):
            p.requires_grad_(True)
    if cfg.method == "lora":
        parts = [t for t in cfg.targets if t in SLICE_TARGETS]
        if parts:
            for block in model.image_encoder.blocks:
                block.attn.qkv = QKVLoRA(block.attn.qkv, parts, cfg.rank, cfg.scale, cfg.dropout, cfg.dora)
        peft_targets = [PEFT_TARGETS[t] for t in cfg.targets if t in PEFT_TARGETS]
        if peft_targets:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(
                LoraConfig(
                    r=cfg.rank,
                    lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                    lora_dropout=cfg.dropout,
                    use_dora=cfg.dora,
                    use_rslora=cfg.rslora,
                    target_modules="|".join(f"(?:{t})" for t in peft_targets),
                ),
                model,
            )
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    if cfg.train_decoder or cfg.method == "decoder":
        for p in model.mask_decoder.parameters():
            p.requires_grad_(True)
    if cfg.train_prompt_encoder:
        for p in model.prompt_encoder.parameters():
            p.requires_grad_(True)
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the tensors an adapter has to store: the trainable ones."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def check_mergeable(cfg: MethodConfig, error: type[Exception] = InputError) -> None:
    """Adapter modules cannot be folded into SAM's weights: say so before any work is done."""
    if cfg.method not in MERGEABLE:
        raise error(f"--method {cfg.method} adds adapter modules (non-linear branches{', an FFT input' if cfg.method == 'adapter' else ''}) "
                    f"that cannot be folded into SAM's weights, so it has no merged export; use the adapter folder "
                    f"with --adapter instead")


def merge(model: Sam) -> Sam:
    """Fold every LoRA update into plain Linear layers, in place: official state-dict keys again."""
    from peft.tuners.lora import LoraLayer

    from .adapters_sam import SAMAdapterEncoder
    from .medsa import MedSABlock

    if isinstance(model.image_encoder, SAMAdapterEncoder) or any(isinstance(m, MedSABlock) for m in model.modules()):
        method = "adapter" if isinstance(model.image_encoder, SAMAdapterEncoder) else "medsa"
        check_mergeable(MethodConfig(method=method), CheckpointError)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QKVLoRA):
                setattr(parent, name, child.merged())
            elif isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    return model
