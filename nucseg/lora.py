"""Which parameters of SAM are trained: LoRA on the image encoder (SAMed), decoder only, or everything.

SAM fuses q, k and v into one ``qkv`` Linear, so LoRA on q and v alone (SAMed's recipe) cannot be expressed
as a peft target: :class:`QKVLoRA` is a drop-in ``nn.Linear`` that keeps the base ``weight``/``bias`` under
their official names and adds low-rank updates to the q and/or v slices. Whole-module targets (``qkv``,
``proj``, ``mlp``) go through peft. The base weights are frozen and never written to; ``merge`` folds the
updates into a copy for export.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import Sam

from .errors import InputError

METHODS = ("lora", "decoder", "full")
MAX_RANK = 256  # far above any rank used for SAM (4-32); a larger one in an adapter is tampering or a mistake
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
        if not all(isinstance(v, bool) for v in (self.train_decoder, self.train_prompt_encoder)):
            raise InputError("train_decoder and train_prompt_encoder must be true or false")
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
        return self

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

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
    """

    def __init__(self, base: nn.Linear, parts: list[str], rank: int, scale: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.dim = base.in_features
        self.parts = [p for p in SLICE_TARGETS if p in parts]
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for p in self.parts:
            a = torch.empty(rank, self.dim, device=base.weight.device, dtype=base.weight.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft/LoRA: A random, B zero, so delta starts at 0
            self.lora_A[p] = nn.Parameter(a)
            self.lora_B[p] = nn.Parameter(torch.zeros(self.dim, rank, device=a.device, dtype=a.dtype))

    def delta_weight(self) -> torch.Tensor:
        """The (3*dim, dim) update that the LoRA factors add to the fused weight."""
        blocks = []
        for p in SLICE_TARGETS:
            if p in self.lora_A:
                blocks.append(self.lora_B[p] @ self.lora_A[p] * self.scale)
            else:
                blocks.append(self.weight.new_zeros(self.dim, self.dim))
        return torch.cat(blocks, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = self.dropout(x)
        updates = []
        for p in SLICE_TARGETS:
            if p in self.lora_A:
                updates.append(F.linear(F.linear(h, self.lora_A[p]), self.lora_B[p]) * self.scale)
            else:
                updates.append(out.new_zeros(()).expand(*out.shape[:-1], self.dim))
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
    if cfg.method == "lora":
        parts = [t for t in cfg.targets if t in SLICE_TARGETS]
        if parts:
            for block in model.image_encoder.blocks:
                block.attn.qkv = QKVLoRA(block.attn.qkv, parts, cfg.rank, cfg.scale, cfg.dropout)
        peft_targets = [PEFT_TARGETS[t] for t in cfg.targets if t in PEFT_TARGETS]
        if peft_targets:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(
                LoraConfig(
                    r=cfg.rank,
                    lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                    lora_dropout=cfg.dropout,
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


def merge(model: Sam) -> Sam:
    """Fold every LoRA update into plain Linear layers, in place: official state-dict keys again."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QKVLoRA):
                setattr(parent, name, child.merged())
            elif isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    return model
