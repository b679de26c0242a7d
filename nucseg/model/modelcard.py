"""The README.md model card written into every adapter folder (and every PEFT export).

Everything on the card comes from ``nucseg.json`` (the same facts, for people): the base model and its
SHA-256, the method, rank and targets, trainable / total parameters, the training data, µm/px, cv metrics
and the nucseg version, then how to load the adapter with nucseg and with peft. The YAML front matter makes it
a valid Hugging Face model card.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_path

CARD = "README.md"
_METRICS = ("dice", "iou", "aji", "dq", "sq", "pq", "f1", "hd95")


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "—"
    return str(value)


def render_model_card(meta: dict, peft_export: bool = False) -> str:
    """Markdown for ``meta`` (the adapter's nucseg.json). ``peft_export``: the card of a PEFT export folder."""
    base, method = meta.get("base", {}), meta.get("method", {})
    params, data, train = meta.get("parameters", {}), meta.get("data", {}), meta.get("training", {})
    model = base.get("model", "?")
    ckpt_name = base.get("checkpoint_name")
    ckpt_sha = base.get("checkpoint_sha256")
    ckpt = ckpt_name or "sam_<model>.pth"
    kind = method.get("method", "?")
    rank = method.get("rank")
    alpha = method.get("alpha")
    targets = method.get("targets", [])
    if kind == "lora":
        what = (f"LoRA rank {rank} (alpha {_fmt(alpha if alpha is not None else rank)}) on "
                f"{', '.join(targets)} of the image encoder")
    elif kind == "decoder":
        what = "mask decoder only (image encoder frozen)"
    else:
        what = "full fine-tune of the image encoder"
    trained = [m for m, on in (("mask decoder", method.get("train_decoder") or kind == "decoder"),
                               ("prompt encoder", method.get("train_prompt_encoder"))) if on]
    trainable, total = params.get("trainable"), params.get("total")
    share = f" ({100 * trainable / total:.2f} %)" if trainable and total else ""
    mpp = meta.get("mpp")
    lines = [
        "---",
        f"library_name: {'peft' if peft_export else 'nucseg'}",
        "pipeline_tag: image-segmentation",
        "tags: [segment-anything, sam, lora, histopathology, nuclei, nucseg]",
        "---",
        "",
        f"# nucseg adapter: SAM {model}, {kind}" + (" (PEFT export)" if peft_export else ""),
        "",
        "Fine-tuned Segment Anything for nucleus instance segmentation in H&E images, written by "
        f"nucseg {meta.get('nucseg_version', '?')}. This folder holds only the trained tensors, never the base "
        "model: load the base checkpoint below, then this adapter.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | SAM `{model}`, built at {meta.get('input_size', '?')} px input |",
        f"| base checkpoint | `{ckpt_name}` |" if ckpt_name else
        f"| base checkpoint | none: seeded random initialisation (`{base.get('fingerprint', '?')}`) |",
        f"| base SHA-256 | `{ckpt_sha}` |" if ckpt_sha else "| base SHA-256 | — |",
        f"| method | {what} |",
        f"| also trained | {', '.join(trained) or '—'} |",
        f"| trainable / total parameters | {_fmt(trainable)} / {_fmt(total)}{share} |",
        f"| µm/px of the training images | {_fmt(mpp) if mpp else 'not recorded (pass --mpp to predict)'} |",
        f"| training data | {_fmt(data.get('tiles'))} tiles of {_fmt(data.get('tile_size'))} px from "
        f"{_fmt(data.get('images'))} images, {_fmt(data.get('nuclei'))} nuclei; organs: {_fmt(data.get('organs'))} |",
        f"| training | {_fmt(train.get('epochs'))} epochs, batch {_fmt(train.get('batch_size'))}, "
        f"lr {_fmt(train.get('lr'))}, seed {_fmt(train.get('seed'))}; final loss {_fmt(meta.get('final_loss'))} |",
        f"| {'source adapter' if peft_export else 'adapter'} weights SHA-256 | `{meta.get('weights_sha256', '—')}` "
        "(nucseg's `adapter.safetensors`) |",
        f"| nucseg version | {meta.get('nucseg_version', '?')} |",
    ]
    if meta.get("prompt_modes"):  # the learned prompt modes (nucseg.model.heads) and their calibrated scores
        scored = {"auto": meta.get("thresholds") or {}, **(meta.get("mode_thresholds") or {})}
        scores = ", ".join(f"{m} {t['metric']} {_fmt(t['score'])}" for m, t in scored.items() if "score" in t)
        lines.insert(-1, f"| prompt modes | {', '.join(meta['prompt_modes'])}"
                         + (f"; calibrated on held-back tiles: {scores}" if scores else "") + " |")
    metrics, cv = meta.get("metrics"), meta.get("cv")
    lines += ["", "## Evaluation", ""]
    if metrics:
        where = (f"fold {cv.get('fold')} of a {cv.get('folds')}-fold cross-validation (grouped by "
                 f"{cv.get('group_by', '?')}, seed {cv.get('seed', '?')}), on that fold's held-out tiles"
                 if cv else "held-out tiles")
        lines += [f"Mean metrics on {where}:", "",
                  "| " + " | ".join(m for m in _METRICS if m in metrics) + " |",
                  "|" + "---|" * sum(m in metrics for m in _METRICS),
                  "| " + " | ".join(_fmt(metrics[m]) for m in _METRICS if m in metrics) + " |"]
    else:
        lines.append("No cross-validation metrics are recorded for this adapter (`nucseg cv` writes adapters "
                     "that carry their fold's metrics).")
    sha_note = f" (SHA-256 `{ckpt_sha[:16]}…`)" if ckpt_sha else ""
    lines += ["", "## Use", ""]
    if not peft_export:
        lines += [
            f"With nucseg (the base checkpoint{sha_note} is checked against the adapter):",
            "",
            "```bash",
            f"nucseg predict slide.svs -o slide.geojson --adapter ADAPTER_DIR --checkpoint {ckpt}",
            "```",
            "",
            "```python",
            "from nucseg.model.adapter import load_adapter",
            f'model, info = load_adapter("ADAPTER_DIR", "{ckpt}")',
            "```",
            "",
            "With peft: export it first (`nucseg export-peft ADAPTER_DIR PEFT_DIR`), then",
        ]
    else:
        lines += ["With peft alone (the foreground head nucseg uses for prompt pruning is in "
                  "`nucseg_fg_head.safetensors`; SAM itself does not need it):"]
    lines += [
        "",
        "```python",
        "from nucseg.model.sam import load_sam; from peft import PeftModel",
        f'sam, _ = load_sam("{model}", "{ckpt}", img_size={meta.get("input_size", 512)})',
        f'model = PeftModel.from_pretrained(sam, "{"PEFT_DIR" if not peft_export else "THIS_DIR"}")',
        "```",
        "",
        "`load_sam` builds segment-anything's `Sam` at the adapter's input size and interpolates the official "
        "checkpoint's position tables to it; the encoder then runs at the tile's native size, as in training.",
    ]
    if mpp:
        lines += ["", f"Slides and tiles should be at {_fmt(mpp)} µm/px; `nucseg predict` resamples slides to it."]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | os.PathLike, meta: dict, peft_export: bool = False) -> Path:
    """Write ``folder/README.md`` atomically from ``meta``."""
    path = Path(folder) / CARD
    with atomic_path(path) as tmp:
        tmp.write_text(render_model_card(meta, peft_export), encoding="utf-8")
    return path
