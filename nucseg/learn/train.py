"""Fine-tuning: prompts sampled from ground-truth nuclei, CE + λ·Dice on the masks, a calibrated IoU head.

Each step encodes a batch of tiles once and decodes many prompts per tile through the shared batched decoder
(:func:`nucseg.model.sam.decode`). Positive prompts are points inside ground-truth nuclei (optionally with their
boxes); negative prompts are background points whose target is an empty mask and whose IoU target is 0, so
the IoU head learns "is there a nucleus here, and how good is my mask" — which is what automatic grid
prompting filters on. Losses are computed at the decoder's low resolution (input/4), as in SAMed; ambiguous
areas are left out of the mask loss.

Reproducible: every epoch draws from ``np.random.default_rng([seed, epoch])`` and the model is seeded, so a
run resumed from its per-epoch checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from .augment import AugmentConfig, augment
from .data import Tile
from ..device import pick_device
from ..errors import CheckpointError, InputError
from ..model.infer import InferConfig, mask_boxes
from ..model.lora import MethodConfig
from ..io import SOFTWARE, JsonMark, atomic_path, check_output, is_nucseg_png, parse_json, write_json
from ..model.heads import CELL, HEAD_NAMES, attach_prompt_heads, center_cell_targets, instance_targets
from ..model.sam import attach_foreground_head, decode, encode

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # nucseg < 0.2 pickled its training state; never loaded (it could run code)
_STATE_KEY = "nucseg_training_state"


@dataclass
class TrainConfig:
    """Defaults follow SAMed / the NuInsSeg fine-tuning literature (AdamW 1e-4, batch 8, 40 epochs)."""

    epochs: int = 40
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    dice_weight: float = 0.8
    balance_ce: bool = False  # weight nucleus pixels by background/nucleus ratio (helps models trained from scratch)
    iou_weight: float = 1.0
    fg_weight: float = 1.0
    positive_prompts: int = 16  # nuclei prompted per tile per step
    negative_prompts: int = 4  # background points per tile per step
    box_fraction: float = 0.0  # share of positive prompts that also get their box
    foreground_head: bool = True  # train the cheap foreground map used for prompt pruning
    # the prompt heads (nucseg.model.heads): centre head (prompts="centers") and instance head (prompts="none")
    prompt_heads: bool = True
    head_weight: float = 1.0  # weight of the heads' losses in the total
    head_lr: float = 1e-3  # the heads start from scratch: Adam's usual rate, whatever the method's lr (same schedule)
    # False: the heads learn from the embedding as the method shapes it, without shaping it themselves, so the
    # masks train exactly as without heads; True: their losses reach the encoder too (joint features)
    head_gradients: bool = False
    seed: int = 42
    # share of the source images held back from training to calibrate the inference thresholds on
    # (nucseg.learn.calibrate; stored in the adapter); 0 = no calibration, the global defaults apply
    calibration_fraction: float = 0.1
    calibration_metric: str = "pq"
    device: str = "auto"
    bf16: bool = True  # autocast on CUDA only
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> "TrainConfig":
        """Library callers get the checks the CLI's argument types make (names are the CLI's options)."""
        option = {"positive_prompts": "prompts-per-tile", "negative_prompts": "negative prompts"}
        for name in ("epochs", "batch_size", "positive_prompts", "negative_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "negative_prompts" else 1):
                raise InputError(f"--{option.get(name, name.replace('_', '-'))} must be a whole number >= 1, not {value!r}")
        for name, lo, hi in (("lr", 0, 1), ("weight_decay", 0, 10), ("dice_weight", 0, 100), ("box_fraction", 0, 1),
                             ("warmup_fraction", 0, 1), ("iou_weight", 0, 100), ("fg_weight", 0, 100),
                             ("head_weight", 0, 100), ("head_lr", 0, 1)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi) \
                    or (name == "lr" and value == 0):
                raise InputError(f"--{name.replace('_', '-')} must be a finite number in [{lo}, {hi}], not {value!r}")
        if not (isinstance(self.calibration_fraction, (int, float)) and 0.0 <= self.calibration_fraction < 1.0):
            raise InputError(f"--calibration-fraction must be in [0, 1), got {self.calibration_fraction!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EpochLog:
    epoch: int
    loss: float
    mask_loss: float
    iou_loss: float
    fg_loss: float
    train_iou: float  # mean IoU of the masks predicted for positive prompts (is it segmenting at all?)
    lr: float
    seconds: float
    head_loss: float = 0.0  # centre + instance heads (0 without them, and in histories of older runs)


def sample_prompts(
    labels: np.ndarray, ambiguous: np.ndarray | None, rng: np.random.Generator, n_pos: int, n_neg: int
) -> tuple[np.ndarray, np.ndarray]:
    """Points (n, 2) xy and their instance id (0 = background) for one tile.

    Positive points are uniform over the pixels of randomly chosen nuclei (with replacement when a tile has
    fewer nuclei than prompts); negatives are uniform over background outside ambiguous areas.
    """
    flat = labels.ravel()
    ids = np.unique(flat)
    ids = ids[ids > 0]
    points, targets = [], []
    if len(ids):
        chosen = rng.choice(ids, size=n_pos, replace=len(ids) < n_pos)
        order = np.argsort(flat, kind="stable")
        starts = np.searchsorted(flat[order], chosen, side="left")
        ends = np.searchsorted(flat[order], chosen, side="right")
        pix = order[starts + (rng.random(n_pos) * (ends - starts)).astype(np.int64)]
        points.append(np.stack([pix % labels.shape[1], pix // labels.shape[1]], 1))
        targets.append(chosen)
    n_neg = n_neg if len(ids) else n_neg + n_pos
    bg = (flat == 0) if ambiguous is None else ((flat == 0) & ~ambiguous.ravel())
    bg_idx = np.flatnonzero(bg)
    if len(bg_idx) and n_neg:
        pix = bg_idx[rng.integers(0, len(bg_idx), n_neg)]
        points.append(np.stack([pix % labels.shape[1], pix // labels.shape[1]], 1))
        targets.append(np.zeros(n_neg, np.int64))
    return np.concatenate(points).astype(np.float32) + 0.5, np.concatenate(targets).astype(np.int64)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits) * weight
    target = target * weight
    inter = (prob * target).flatten(1).sum(1)
    denom = prob.flatten(1).sum(1) + target.flatten(1).sum(1)
    return (1 - (2 * inter + 1) / (denom + 1)).mean()


def head_losses(center_out: torch.Tensor, inst_out: torch.Tensor, lab: torch.Tensor, amb: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
    """Loss of the prompt heads on one batch of (padded) label maps ``lab`` (B, S, S).

    Centre head (per 16 px cell): sigmoid focal loss on objectness (a cell is positive when a nucleus centre
    lies in it; normalised by the positives, as RetinaNet) + smooth-L1 on the offset of positive cells, in
    cells. Instance head (at S/4): BCE on foreground and on the two per-nucleus normalised distance maps
    (soft targets pooled to S/4), ambiguous and padding pixels left out.
    """
    from torchvision.ops import sigmoid_focal_loss

    b, s = lab.shape[0], lab.shape[-1]
    g = center_out.shape[-1]
    targets = [instance_targets(t) for t in lab.cpu().numpy()]
    dev = center_out.device
    obj, off = center_cell_targets([t.centers for t in targets], b, g, dev)
    cell_ok = F.max_pool2d(valid[:, None].float(), CELL)[:, 0]
    npos = obj.sum().clamp(min=1)
    focal = (sigmoid_focal_loss(center_out[:, 0], obj, reduction="none") * cell_ok).sum() / npos
    pos = obj > 0
    offset = F.smooth_l1_loss(center_out[:, 1:].permute(0, 2, 3, 1)[pos], off.permute(0, 2, 3, 1)[pos], beta=0.05) \
        if pos.any() else center_out.sum() * 0
    maps = torch.stack([torch.from_numpy(np.stack([(t.boundary_dist > 0), t.center_dist, t.boundary_dist]))
                        .float() for t in targets]).to(dev)  # (B, 3, S, S)
    factor = s // inst_out.shape[-1]
    soft = F.avg_pool2d(maps, factor)
    weight = 1.0 - F.avg_pool2d((amb | ~valid)[:, None].float(), factor)
    inst = (F.binary_cross_entropy_with_logits(inst_out, soft, reduction="none") * weight).sum() \
        / (3 * weight.sum()).clamp(min=1)
    return focal + offset + inst


class Trainer:
    """Owns the optimisation of one model on one set of tiles; the CLI and cv drive it."""

    def __init__(self, model: Sam, tiles: list[Tile], cfg: TrainConfig, out_dir: str | Path):
        self.cfg = cfg.validate()
        self.tiles = tiles
        self.out_dir = Path(out_dir)
        self.device = pick_device(cfg.device)
        if cfg.foreground_head:
            torch.manual_seed(cfg.seed)
            attach_foreground_head(model)
        if cfg.prompt_heads:  # seeded on their own: every other tensor starts exactly as without them
            torch.manual_seed(cfg.seed + 1)
            attach_prompt_heads(model)
        self.model = model.to(self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise InputError("nothing to train: the method leaves no trainable parameters")
        heads = {id(p) for h in HEAD_NAMES if getattr(model, h, None) is not None for p in getattr(model, h).parameters()}
        groups = [{"params": [p for p in self.params if id(p) not in heads]},
                  {"params": [p for p in self.params if id(p) in heads], "lr": cfg.head_lr}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(len(tiles) / cfg.batch_size)
        total = cfg.epochs * self.steps_per_epoch
        warmup = max(1, int(cfg.warmup_fraction * total))

        def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 0
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.history: list[EpochLog] = []
        self.start_epoch = 0
        self.autocast = self.device.type == "cuda" and cfg.bf16

    # -- checkpoints ---------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, epoch: int, fingerprint: dict) -> None:
        state = {
            "epoch": epoch,
            "trainable": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": [asdict(h) for h in self.history],
            "fingerprint": fingerprint,
        }
        save_training_state(self.out_dir / CHECKPOINT, state)

    def resume(self, fingerprint: dict) -> bool:
        """Continue from the last finished epoch; refuse a checkpoint of a different run.

        The checkpoint is checked for belonging to this run before any of its tensors is used, and every tensor
        must fit the parameter it restores: a planted or damaged file is an error, never silently half-loaded.
        """
        path = self.out_dir / CHECKPOINT
        refuse_legacy_checkpoint(self.out_dir)
        if not path.is_file():
            return False
        state = load_training_state(path)
        if state["fingerprint"] != fingerprint:
            raise CheckpointError(
                f"{path} belongs to a different run (other data, method or settings); use another --out or remove it"
            )
        own = dict(self.model.named_parameters())
        expected = {n for n, p in own.items() if p.requires_grad}
        if set(state["trainable"]) != expected:
            raise CheckpointError(f"{path} does not hold this run's trainable parameters")
        for name, value in state["trainable"].items():
            if value.shape != own[name].shape or value.dtype != own[name].dtype:
                raise CheckpointError(f"{path}: tensor {name} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(own[name].shape)}")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                own[name].copy_(value)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.history = [EpochLog(**h) for h in state["history"]]
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            raise CheckpointError(f"{path} holds an unusable optimiser state or history: {err}") from None
        self.start_epoch = int(state["epoch"]) + 1
        return True

    # -- one step ---------------------------------------------------------------------------------------
    def _batch(self, tiles: list[Tile], rng: np.random.Generator):
        images, points, targets, index, labels, ambig = [], [], [], [], [], []
        for i, tile in enumerate(tiles):
            stacked = tile.labels if tile.ambiguous is None else np.dstack([tile.labels, tile.ambiguous.astype(np.int32)])
            image, stacked = augment(tile.image, stacked, rng, self.cfg.augment)  # ambiguous rides along
            lab, amb = (stacked, None) if stacked.ndim == 2 else (stacked[..., 0], stacked[..., 1] > 0)
            pts, tgt = sample_prompts(lab, amb, rng, self.cfg.positive_prompts, self.cfg.negative_prompts)
            images.append(image)
            labels.append(lab)
            ambig.append(np.zeros_like(lab, bool) if amb is None else amb)
            points.append(pts)
            targets.append(tgt)
            index.append(np.full(len(tgt), i))
        size = self.model.image_encoder.img_size
        pad = [(0, size - lab.shape[0], 0, size - lab.shape[1]) for lab in labels]
        lab_t = torch.stack([F.pad(torch.from_numpy(lab), (p[2], p[3], p[0], p[1])) for lab, p in zip(labels, pad)])
        amb_t = torch.stack([F.pad(torch.from_numpy(a), (p[2], p[3], p[0], p[1])) for a, p in zip(ambig, pad)])
        valid = torch.stack([F.pad(torch.ones(lab.shape, dtype=torch.bool), (p[2], p[3], p[0], p[1]))
                             for lab, p in zip(labels, pad)])
        img_t = torch.stack([F.pad(torch.from_numpy(im).permute(2, 0, 1), (p[2], p[3], p[0], p[1]))
                             for im, p in zip(images, pad)])
        return (img_t, lab_t, amb_t & valid, valid,
                torch.from_numpy(np.concatenate(points)), torch.from_numpy(np.concatenate(targets)),
                torch.from_numpy(np.concatenate(index)))

    def losses(self, tiles: list[Tile], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Loss terms of one batch (prompts and augmentation drawn from ``rng``); no optimiser step."""
        dev = self.device
        img, lab, amb, valid, pts, tgt, idx = (t.to(dev) for t in self._batch(tiles, rng))
        full = (lab[idx] == tgt[:, None, None]) & (tgt[:, None, None] > 0)  # (N, H, W)
        coords, labels = pts[:, None, :], torch.ones(len(tgt), 1, dtype=torch.long, device=dev)
        boxes = use = None
        if self.cfg.box_fraction > 0:  # background prompts (target 0) never get a box
            use = torch.from_numpy(rng.random(len(tgt)) < self.cfg.box_fraction).to(dev) & (tgt > 0)
            boxes = mask_boxes(full)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            emb = encode(self.model, img)
            logits, iou_pred = decode(self.model, emb, coords, labels, idx, boxes=boxes, box_mask=use)
            fg_logits = self.model.fg_head(emb) if self.cfg.foreground_head else None
            if self.cfg.prompt_heads:
                head_in = emb if self.cfg.head_gradients else emb.detach()
                center_out = self.model.center_head(head_in)
                inst_out = self.model.instance_head(head_in, img)
        logits, iou_pred = logits[:, 0].float(), iou_pred[:, 0].float()
        low = logits.shape[-1]
        factor = full.shape[-1] // low
        target = F.avg_pool2d(full[:, None].float(), factor)[:, 0]  # soft low-res target
        weight = 1.0 - F.avg_pool2d((amb[idx] | ~valid[idx])[:, None].float(), factor)[:, 0]
        pix_weight = weight
        if self.cfg.balance_ce:  # per prompt: nucleus pixels weigh as much, in total, as background pixels
            fg = (target * weight).flatten(1).sum(1)
            bg = ((1 - target) * weight).flatten(1).sum(1)
            ratio = torch.where(fg > 0, bg / fg.clamp(min=1e-6), torch.ones_like(fg))[:, None, None]
            pix_weight = weight * (1 + (ratio - 1) * target)
        bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * pix_weight).sum() \
            / pix_weight.sum().clamp(min=1)
        mask_loss = bce + self.cfg.dice_weight * dice_loss(logits, target, weight)
        with torch.no_grad():
            pred = logits > 0
            hard = target > 0.5
            inter = (pred & hard).flatten(1).sum(1).float()
            union = (pred | hard).flatten(1).sum(1).float()
            real_iou = torch.where(tgt > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
        iou_loss = F.mse_loss(iou_pred, real_iou)
        loss = mask_loss + self.cfg.iou_weight * iou_loss
        fg_loss = torch.zeros((), device=dev)
        if fg_logits is not None:
            fg_factor = lab.shape[-1] // fg_logits.shape[-1]
            fg_target = F.avg_pool2d((lab > 0)[:, None].float(), fg_factor)
            fg_loss = F.binary_cross_entropy_with_logits(fg_logits.float(), fg_target)
            loss = loss + self.cfg.fg_weight * fg_loss
        head_loss = torch.zeros((), device=dev)
        if self.cfg.prompt_heads:
            head_loss = head_losses(center_out.float(), inst_out.float(), lab, amb, valid)
            loss = loss + self.cfg.head_weight * head_loss
        pos = tgt > 0
        train_iou = real_iou[pos].mean() if pos.any() else torch.zeros((), device=dev)
        return {"loss": loss, "mask_loss": mask_loss, "iou_loss": iou_loss, "fg_loss": fg_loss,
                "train_iou": train_iou, "head_loss": head_loss}

    def step(self, tiles: list[Tile], rng: np.random.Generator) -> dict[str, float]:
        out = self.losses(tiles, rng)
        out = {k: v if k == "loss" else v.detach() for k, v in out.items()}
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        return {k: v.item() for k, v in out.items()}

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self, fingerprint: dict, on_step: Callable[[int, int, int, float], None] | None = None) -> list[EpochLog]:
        """Train the remaining epochs; checkpoint after each one. ``on_step(epoch, step, steps, loss)``."""
        self.model.train()
        for epoch in range(self.start_epoch, self.cfg.epochs):
            rng = np.random.default_rng([self.cfg.seed, epoch])
            torch.manual_seed(self.cfg.seed * 1000 + epoch)
            order = rng.permutation(len(self.tiles))
            t0 = time.perf_counter()
            sums = {"loss": 0.0, "mask_loss": 0.0, "iou_loss": 0.0, "fg_loss": 0.0, "train_iou": 0.0, "head_loss": 0.0}
            for s in range(self.steps_per_epoch):
                batch = [self.tiles[i] for i in order[s * self.cfg.batch_size : (s + 1) * self.cfg.batch_size]]
                out = self.step(batch, rng)
                for k in sums:
                    sums[k] += out[k] / self.steps_per_epoch
                if on_step:
                    on_step(epoch, s, self.steps_per_epoch, out["loss"])
            self.history.append(EpochLog(epoch, **sums, lr=self.scheduler.get_last_lr()[0],
                                         seconds=time.perf_counter() - t0))
            log.info("epoch %d/%d loss %.4f train IoU %.3f", epoch + 1, self.cfg.epochs, sums["loss"], sums["train_iou"])
            # The checkpoint is the commit point of an epoch: what derives from it is written first, so a run
            # killed in between redoes the epoch and rewrites both (a resumed run never replots). With many
            # short epochs (the demo's), plotting is most of an epoch's time: at most ~20 plots per run, always
            # after the last epoch (a fixed rule, so a resumed run writes the same file).
            if (epoch + 1) % max(1, self.cfg.epochs // 20) == 0 or epoch + 1 == self.cfg.epochs:
                plot_curves(self.history, self.out_dir / "curves.png")
            self.save_checkpoint(epoch, fingerprint)
        self.model.eval()
        return self.history


def save_training_state(path: Path, state: dict) -> None:
    """Training state as safetensors (tensors) + JSON (everything else) in its metadata: nothing is pickled,
    so a checkpoint found in a shared or unpacked run folder can never run code when a run resumes from it."""
    from safetensors.torch import save_file

    tensors = {f"trainable.{n}": t for n, t in state["trainable"].items()}
    opt_state: dict[str, dict] = {}
    for idx, entry in state["optimizer"]["state"].items():
        plain = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain[k] = v
        opt_state[str(idx)] = plain
    meta = {"epoch": int(state["epoch"]), "fingerprint": state["fingerprint"], "history": state["history"],
            "scheduler": state["scheduler"], "param_groups": state["optimizer"]["param_groups"],
            "optimizer_plain": opt_state, "format_version": 1}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path, owned=is_training_state) as tmp:
        save_file(tensors, str(tmp), metadata={_STATE_KEY: json.dumps(meta, sort_keys=True)})


def is_training_state(path: Path) -> bool:
    """A training checkpoint nucseg wrote: a safetensors file whose metadata has nucseg's ``_STATE_KEY`` entry."""
    from safetensors import safe_open

    try:
        if Path(path).is_symlink():
            return False
        with safe_open(str(path), framework="pt") as fh:
            return _STATE_KEY in (fh.metadata() or {})
    except Exception:  # not safetensors, unreadable: not ours
        return False


def load_training_state(path: Path) -> dict:
    """The state :func:`save_training_state` wrote, in torch's ``state_dict`` shapes; CheckpointError if the file
    is not one (damaged, foreign, or of an unknown format)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = parse_json((fh.metadata() or {})[_STATE_KEY])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        if not isinstance(meta, dict) or meta.get("format_version") != 1:
            raise ValueError("unknown format")
        epoch = meta["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < 1_000_000:
            raise ValueError(f"bad epoch {epoch!r}")
        if not isinstance(meta["fingerprint"], dict) or not isinstance(meta["history"], list):
            raise ValueError("bad fingerprint or history")
        opt_state: dict[int, dict] = {int(i): dict(plain) for i, plain in meta["optimizer_plain"].items()}
        trainable = {}
        for key, value in tensors.items():
            kind, _, rest = key.partition(".")
            if kind == "trainable":
                trainable[rest] = value
            elif kind == "optimizer":
                idx, _, name = rest.partition(".")
                opt_state.setdefault(int(idx), {})[name] = value
            else:
                raise ValueError(f"unexpected tensor {key}")
    except Exception as err:  # not safetensors, no/garbled state, wrong types: all mean "not our checkpoint"
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot read training checkpoint {path}: {why}") from None
    optimizer = {"state": opt_state, "param_groups": meta["param_groups"]}
    return {"epoch": epoch, "trainable": trainable, "optimizer": optimizer, "scheduler": meta["scheduler"],
            "history": meta["history"], "fingerprint": meta["fingerprint"]}


def refuse_legacy_checkpoint(out_dir: Path) -> None:
    """A pickled ``checkpoint.pt`` (older nucseg, or planted) is never unpickled: say so instead."""
    legacy = Path(out_dir) / LEGACY_CHECKPOINT
    if legacy.exists():
        raise CheckpointError(f"{legacy} is a pickled training checkpoint, which nucseg does not load (it could run "
                              f"code); remove it to start again, or use another --out")


def plot_curves(history: list[EpochLog], path: Path) -> None:
    """Loss components and learning rate per epoch, one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h.epoch + 1 for h in history]
    fig, (ax, ax3, ax2) = plt.subplots(1, 3, figsize=(12, 3.2))
    for key in ("loss", "mask_loss", "iou_loss", "fg_loss", "head_loss"):
        ax.plot(epochs, [getattr(h, key) for h in history], marker="o", ms=3, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax3.plot(epochs, [h.train_iou for h in history], marker="o", ms=3)
    ax3.set_xlabel("epoch")
    ax3.set_ylabel("train IoU (positive prompts)")
    ax3.set_ylim(0, 1)
    ax2.plot(epochs, [h.lr for h in history])
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("learning rate")
    fig.tight_layout()
    with atomic_path(path, owned=is_nucseg_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Software": SOFTWARE})
    plt.close(fig)


HISTORY = JsonMark("train-history")  # history.json: {"epochs": [...], "nucseg_file": "train-history"}


def write_history(history: list[EpochLog], path: Path) -> None:
    write_json(path, {"epochs": [asdict(h) for h in history]}, HISTORY)


@dataclass
class FinetuneResult:
    adapter: Path
    history: list[EpochLog]
    trainable: int
    total: int


def finetune(
    tiles: list[Tile],
    out_dir: str | Path,
    model_type: str,
    checkpoint: str | Path | None,
    method: MethodConfig,
    cfg: TrainConfig,
    mpp: float | None = None,
    resume: bool = True,
    extra_meta: dict | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, int, int, float], None] | None = None,
    infer: InferConfig | None = None,
    on_calibrate: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a fresh base on ``tiles`` and write ``out_dir/adapter`` (plus checkpoint and curves).

    ``cfg.calibration_fraction`` of the source images are held back from training; after training the
    inference thresholds are grid-searched on them (:mod:`nucseg.learn.calibrate`, starting from ``infer``, whose
    other settings such as the point grid are used as they are) and stored in the adapter's ``thresholds``.
    ``on_start(trainable, total)`` is called once the method is applied, so the caller can print the counts;
    ``on_calibrate(message)`` before and after calibrating.
    """
    from ..model.adapter import MODE_THRESHOLDS, MODES, THRESHOLDS, is_adapter_dir, save_adapter
    from ..model.heads import head_modes
    from .calibrate import split_for_calibration
    from .data import summarize
    from ..model.lora import apply_method, count_parameters
    from ..model.sam import load_sam

    out_dir = Path(out_dir)
    check_output(out_dir / "adapter", is_adapter_dir)  # before any training: never replace a folder we did not write
    check_output(out_dir / "curves.png", is_nucseg_png)
    check_output(out_dir / "history.json", HISTORY)  # (a foreign checkpoint is refused by resume, exit 4)
    tiles, held_back = split_for_calibration(tiles, cfg.calibration_fraction, cfg.seed)
    size = max(max(t.labels.shape) for t in tiles)
    input_size = int(math.ceil(size / 16) * 16)
    model, fingerprint = load_sam(model_type, checkpoint, img_size=input_size, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # LoRA factor init is random: seed it for reproducible runs
    apply_method(model, method)
    trainer = Trainer(model, tiles, cfg, out_dir)
    trainable, total = count_parameters(model)
    if on_start:
        on_start(trainable, total)
    data = summarize(tiles)
    run_id = {"base": fingerprint, "method": method.to_dict(), "train": cfg.to_dict(), "data": data,
              "tiles": [t.name for t in tiles]}
    if resume:
        trainer.resume(run_id)
    history = trainer.fit(run_id, on_step)
    write_history(history, out_dir / "history.json")
    meta = {
        "base": {"model": model_type, "fingerprint": fingerprint, "init_seed": cfg.seed,
                 "checkpoint_sha256": None if checkpoint is None else fingerprint,
                 "checkpoint_name": None if checkpoint is None else Path(checkpoint).name},
        "input_size": input_size,
        "mpp": mpp,
        "parameters": {"trainable": trainable, "total": total},
        "training": cfg.to_dict(),
        "data": data,
        "final_loss": history[-1].loss if history else None,
        **(extra_meta or {}),
    }
    if cfg.prompt_heads:
        meta[MODES] = head_modes(trainer.model)
    if held_back:
        meta[THRESHOLDS] = calibrate_model(trainer.model, held_back, cfg, infer, trainer.device, mpp, on_calibrate)
        if cfg.prompt_heads:
            meta[MODE_THRESHOLDS] = calibrate_heads(trainer.model, held_back, cfg, infer, trainer.device, mpp,
                                                    on_calibrate)
    adapter = save_adapter(out_dir / "adapter", trainer.model.cpu(), method, meta)
    return FinetuneResult(adapter, history, trainable, total)


def calibrate_model(model: Sam, tiles: list[Tile], cfg: TrainConfig, infer: InferConfig | None,
                    device: torch.device, mpp: float | None = None,
                    on_calibrate: Callable[[str], None] | None = None) -> dict:
    """The calibrated ``thresholds`` dict of a freshly trained model on its held-back ``tiles``."""
    from .calibrate import CalibrationConfig, calibrate
    from ..model.infer import SamTileSegmenter

    if on_calibrate:
        on_calibrate(f"calibrating thresholds on {len(tiles)} held-back tiles")
    from dataclasses import replace

    infer = infer or InferConfig()
    if infer.prompts not in ("auto", "grid"):  # these are the thresholds of auto / grid (learned modes: calibrate_heads)
        infer = replace(infer, prompts="auto")
    seg = SamTileSegmenter(model.eval(), infer, device=device, mpp=mpp)
    res = calibrate(seg, tiles, CalibrationConfig(metric=cfg.calibration_metric))
    t = res.thresholds
    if on_calibrate:
        on_calibrate(f"calibrated: {t['metric']} {t['default_score']:.3f} at the defaults -> {t['score']:.3f} "
                     f"({res.evaluated} settings, {res.seconds:.0f} s)")
    return t


def calibrate_heads(model: Sam, tiles: list[Tile], cfg: TrainConfig, infer: InferConfig | None,
                    device: torch.device, mpp: float | None = None,
                    on_calibrate: Callable[[str], None] | None = None) -> dict:
    """The calibrated thresholds of each learned prompt mode (``{"centers": ..., "none": ...}``) the model has a
    head for, on its held-back ``tiles`` (the adapter's ``mode_thresholds``)."""
    from dataclasses import replace

    from .calibrate import CalibrationConfig, calibrate
    from ..model.heads import head_modes
    from ..model.infer import SamTileSegmenter

    out = {}
    for mode in head_modes(model)[2:]:
        seg = SamTileSegmenter(model.eval(), replace(infer or InferConfig(), prompts=mode), device=device, mpp=mpp)
        res = calibrate(seg, tiles, CalibrationConfig(metric=cfg.calibration_metric))
        out[mode] = t = res.thresholds
        if on_calibrate:
            on_calibrate(f"prompts {mode} calibrated: {t['metric']} {t['default_score']:.3f} at the defaults -> "
                         f"{t['score']:.3f} ({res.evaluated} settings, {res.seconds:.0f} s)")
    return out
