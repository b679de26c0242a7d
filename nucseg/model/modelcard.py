"""The README.md model card written into every adapter folder (and every PEFT export).

Everything on the card comes from ``nucseg.json`` (the same facts, for people): the base model and its
SHA-256, the method, rank and targets, trainable / total parameters, the training data, µm/px, cv metrics
and the nucseg version, then how to load the adapter with nucseg and with peft. The YAML front matter makes it
a valid Hugging Face model card.

A PEFT export's card (:class:`PeftCard`) adds ``base_model``, ``license`` and ``datasets`` to the front matter
and carries Python that needs only peft, torch and segment-anything (or transformers): it builds the base as a
user would (the official checkpoint by name, else segment-anything's classes with the widths) and resizes the
position tables to the adapter's input size, as :func:`nucseg.model.sam.adapt_state_dict` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..io import TextMark, write_text

CARD = "README.md"
BASE_LICENSE = "apache-2.0"  # Segment Anything's code and weights
MODEL_CARD = TextMark("model-card")  # how a rerun (cv writes the fold's metrics in) knows the card is nucseg's
_METRICS = ("dice", "iou", "aji", "dq", "sq", "pq", "f1", "hd95")


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "—"
    return str(value)


@dataclass
class PeftCard:
    """What the card of a PEFT export says beyond ``nucseg.json``: the flavour and a base a user can build
    without nucseg (an official checkpoint by name, else the architecture's widths), licence and datasets."""

    flavour: str  # "sam" (segment-anything's Sam) or "transformers" (SamModel)
    model_type: str
    input_size: int
    official: str | None  # "vit_b" etc. when the base is an official checkpoint (recognised by its SHA-256)
    hub_id: str | None  # the base on the Hugging Face Hub (the official conversion, or --base-model)
    base_model_name_or_path: str | None
    checkpoint: str | None  # the base file name for the segment-anything flavour
    license: str | None = None  # the user's (the training data's terms); None: not stated
    datasets: list[str] = field(default_factory=list)

    @classmethod
    def for_adapter(cls, meta: dict, options) -> "PeftCard":
        """From the adapter's ``nucseg.json`` and :class:`nucseg.model.peft_export.ExportOptions`."""
        from .hf_sam import HUB_IDS
        from .weights import REGISTRY

        base = meta.get("base", {})
        model = base.get("model", "?")
        sha = base.get("checkpoint_sha256")
        official = next((w.model_type for w in REGISTRY.values() if sha and w.sha256 == sha), None)
        official_hub = HUB_IDS.get(official) if official else None
        if options.flavour == "transformers" and not (options.base_model or official_hub):
            raise InputError(f"the base of this adapter ({base.get('checkpoint_name') or base.get('fingerprint')}) is "
                             "not an official SAM checkpoint, so no transformers model of it is on the Hub: pass "
                             "--base-model with its transformers folder (nucseg.model.hf_sam.save_transformers_base "
                             "writes one)")
        hub = options.base_model or official_hub
        ckpt = REGISTRY[official].filename if official else base.get("checkpoint_name")
        return cls(options.flavour, model, int(meta.get("input_size", 1024)), official, hub,
                   hub if options.flavour == "transformers" else (official_hub or ckpt), ckpt,
                   options.license, list(options.datasets))

    def front_matter(self) -> list[str]:
        lines = ["library_name: peft"]
        if self.hub_id and not Path(self.hub_id).is_absolute():
            lines.append(f"base_model: {json.dumps(self.hub_id)}")
        lines.append(f"license: {json.dumps(self.license or BASE_LICENSE)}")
        if self.datasets:
            lines.append(f"datasets: {json.dumps(self.datasets)}")
        return lines + ["pipeline_tag: mask-generation"]

    def snippet(self) -> list[str] | None:
        """Python that loads the export with peft + torch + the flavour's package only; None where the base
        exists only inside nucseg (a seeded random initialisation)."""
        if self.flavour == "transformers":
            return _hf_snippet(self)
        if not self.checkpoint:
            return None
        return _sam_snippet(self)


_SIZE_NOTE = "the adapter's input size: tiles go in at their native size, not at SAM's 1024 px"
_NORM = ("mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)",
         "std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)")


def _sam_snippet(card: PeftCard) -> list[str]:
    from .sam import get_spec

    lines = ["import torch", "import torch.nn.functional as F", "from peft import PeftModel"]
    if card.official:
        lines.append("from segment_anything import sam_model_registry")
    else:
        lines += ["from functools import partial",
                  "from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, "
                  "TwoWayTransformer"]
    lines += [
        "",
        'ADAPTER = "path/to/this/folder"',
        f"CHECKPOINT = {json.dumps(card.checkpoint)}  # the base checkpoint",
        f"SIZE = {card.input_size}  # {_SIZE_NOTE}",
        "",
        "",
        "def at_input_size(sam, size):",
        '    """Run the encoder at `size` px as the adapter was trained: resize the position tables (as nucseg)."""',
        "    enc, grid = sam.image_encoder, size // 16",
        "    pe = enc.pos_embed.detach().permute(0, 3, 1, 2)",
        "    pe = F.interpolate(pe, size=(grid, grid), mode=\"bicubic\", align_corners=False)",
        "    enc.pos_embed = torch.nn.Parameter(pe.permute(0, 2, 3, 1).contiguous())",
        "    for block in enc.blocks:",
        "        if block.window_size == 0:  # global attention: relative tables of 2 * grid - 1 rows",
        "            for name in (\"rel_pos_h\", \"rel_pos_w\"):",
        "                t = getattr(block.attn, name).detach().T[None]",
        "                t = F.interpolate(t, size=2 * grid - 1, mode=\"linear\", align_corners=False)[0].T",
        "                setattr(block.attn, name, torch.nn.Parameter(t.contiguous()))",
        "    enc.img_size = size",
        "    sam.prompt_encoder.image_embedding_size = (grid, grid)",
        "    sam.prompt_encoder.input_image_size = (size, size)",
        "    sam.prompt_encoder.mask_input_size = (4 * grid, 4 * grid)",
        "    return sam",
        "",
        "",
    ]
    if card.official:
        lines.append(f'sam = at_input_size(sam_model_registry["{card.official}"](checkpoint=CHECKPOINT), SIZE)')
    else:
        spec = get_spec(card.model_type)
        load = ('from safetensors.torch import load_file\nstate = load_file(CHECKPOINT)'
                if str(card.checkpoint).endswith(".safetensors")
                else 'state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)')
        lines += [
            f"# nucseg's {card.model_type} (not an official SAM): segment-anything's classes with these widths,",
            "# built at the checkpoint's own input size",
            *load.split("\n"),
            'size = 16 * state["image_encoder.pos_embed"].shape[1]',
            "sam = Sam(",
            f"    image_encoder=ImageEncoderViT(depth={spec.depth}, embed_dim={spec.embed_dim}, img_size=size, "
            f"mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads={spec.num_heads}, "
            f"patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes={tuple(spec.global_attn_indexes)}, "
            f"window_size={spec.window_size}, out_chans={spec.prompt_dim}),",
            f"    prompt_encoder=PromptEncoder(embed_dim={spec.prompt_dim}, image_embedding_size=(size // 16, size // 16), "
            "input_image_size=(size, size), mask_in_chans=16),",
            f"    mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, "
            f"embedding_dim={spec.prompt_dim}, mlp_dim={spec.decoder_mlp_dim}, num_heads={spec.decoder_heads}), "
            f"transformer_dim={spec.prompt_dim}, iou_head_depth=3, iou_head_hidden_dim={spec.iou_hidden_dim}),",
            "    pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])",
            "sam.load_state_dict(state)",
            "sam = at_input_size(sam.eval(), SIZE)",
        ]
    lines += [
        "model = PeftModel.from_pretrained(sam, ADAPTER).eval()",
        "sam = model.base_model.model  # segment-anything's Sam, adapted",
        "",
        "# an RGB tile (H, W, 3) uint8, H, W <= SIZE; prompts: N points (x, y) in pixels, label 1 = nucleus",
        "tile = torch.zeros(SIZE, SIZE, 3, dtype=torch.uint8)",
        "points, labels = torch.tensor([[[SIZE / 2, SIZE / 2]]]), torch.ones(1, 1, dtype=torch.long)",
        "with torch.no_grad():",
        "    embeddings = sam.image_encoder(sam.preprocess(tile.permute(2, 0, 1)[None].float()))",
        "    sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)",
        "    logits, iou = sam.mask_decoder(image_embeddings=embeddings, image_pe=sam.prompt_encoder.get_dense_pe(),",
        "                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,",
        "                                   multimask_output=True)",
        "# logits (N, 3, SIZE / 4, SIZE / 4): low-resolution mask logits; iou (N, 3): predicted IoU",
    ]
    return lines


def _hf_snippet(card: PeftCard) -> list[str]:
    return [
        "import copy",
        "",
        "import torch",
        "import torch.nn.functional as F",
        "from peft import PeftModel",
        "from transformers import SamModel",
        "",
        'ADAPTER = "path/to/this/folder"',
        f"BASE = {json.dumps(card.hub_id)}  # the base in transformers' format",
        f"SIZE = {card.input_size}  # {_SIZE_NOTE}",
        "",
        "",
        "def at_input_size(sam, size):",
        '    """SamModel rebuilt at `size` px as the adapter was trained: position tables resized (as nucseg)."""',
        "    config = copy.deepcopy(sam.config)",
        "    config.vision_config.image_size = config.prompt_encoder_config.image_size = size",
        "    config.prompt_encoder_config.image_embedding_size = size // config.vision_config.patch_size",
        "    config.mask_decoder_config.layer_norm_eps = 1e-5  # segment-anything's (the Hub's configs say 1e-6)",
        "    with torch.device(\"meta\"):",
        "        out = SamModel(config)",
        "    want, state = out.state_dict(), sam.state_dict()",
        "    for key, value in state.items():",
        "        shape = want[key].shape",
        "        if value.shape == shape:",
        "            continue",
        "        if key.endswith(\"pos_embed\"):  # (1, H, W, C): bicubic on its grid",
        "            value = F.interpolate(value.permute(0, 3, 1, 2), size=shape[1:3], mode=\"bicubic\",",
        "                                  align_corners=False).permute(0, 2, 3, 1)",
        "        else:  # rel_pos_h / rel_pos_w (2 S - 1, head_dim) of a global-attention layer: linear",
        "            value = F.interpolate(value.T[None], size=shape[0], mode=\"linear\", align_corners=False)[0].T",
        "        state[key] = value.contiguous()",
        "    out.load_state_dict(state, assign=True)",
        "    return out.eval()",
        "",
        "",
        "sam = at_input_size(SamModel.from_pretrained(BASE), SIZE)",
        "model = PeftModel.from_pretrained(sam, ADAPTER).eval()",
        "",
        "# an RGB tile (H, W, 3) uint8, padded to SIZE x SIZE at the bottom/right; no SamProcessor (it resizes to",
        "# 1024 px); prompts: N points (x, y) in pixels, label 1 = nucleus",
        "tile = torch.zeros(SIZE, SIZE, 3, dtype=torch.uint8)",
        *_NORM,
        "pixel_values = (tile.permute(2, 0, 1)[None].float() - mean) / std",
        "points, labels = torch.tensor([[[[SIZE / 2, SIZE / 2]]]]), torch.ones(1, 1, 1, dtype=torch.long)",
        "with torch.no_grad():",
        "    out = model(pixel_values=pixel_values, input_points=points, input_labels=labels, multimask_output=True)",
        "# out.pred_masks (1, N, 3, SIZE / 4, SIZE / 4): low-resolution mask logits; out.iou_scores (1, N, 3)",
    ]


def render_model_card(meta: dict, peft: PeftCard | None = None) -> str:
    """Markdown for ``meta`` (the adapter's nucseg.json). ``peft``: the card of a PEFT export folder."""
    peft_export = peft is not None
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
        *(peft.front_matter() if peft else ["library_name: nucseg", "pipeline_tag: image-segmentation"]),
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
    if peft:
        lines += _peft_rows(peft, meta)
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
            "With peft: export it first (`nucseg export-peft ADAPTER_DIR PEFT_DIR`, add `--flavour transformers` "
            "for transformers' `SamModel`); the export's own card has code that needs no nucseg. With nucseg "
            "at hand:",
        ]
    else:
        return "\n".join(lines + _peft_use(peft, meta)) + "\n"
    lines += [
        "",
        "```python",
        "from nucseg.model.sam import load_sam; from peft import PeftModel",
        f'sam, _ = load_sam("{model}", "{ckpt}", img_size={meta.get("input_size", 512)})',
        'model = PeftModel.from_pretrained(sam, "PEFT_DIR")',
        "```",
        "",
        "`load_sam` builds segment-anything's `Sam` at the adapter's input size and interpolates the official "
        "checkpoint's position tables to it; the encoder then runs at the tile's native size, as in training.",
    ]
    if mpp:
        lines += ["", f"Slides and tiles should be at {_fmt(mpp)} µm/px; `nucseg predict` resamples slides to it."]
    return "\n".join(lines) + "\n"


def _peft_rows(card: PeftCard, meta: dict) -> list[str]:
    method = meta.get("method", {})
    slices = [t for t in method.get("targets", []) if t in ("q", "k", "v")] if method.get("method") == "lora" else []
    rank = method.get("rank")
    if slices:
        peft_rank = (f"`r` = {rank} (yours); `rank_pattern` gives the fused `attn.qkv` rank {len(slices) * rank} = "
                     f"{rank} per slice x {len(slices)} ({', '.join(slices)}): PEFT sees q, k, v as one Linear, so "
                     f"`lora_B` holds each slice's factor in its rows and zeros elsewhere (exact)")
    elif method.get("method") == "lora":
        peft_rank = f"`r` = {rank}"
    else:
        peft_rank = "no LoRA layer (`dummy-target-modules`); the trained modules are `modules_to_save`"
    base = (f"`{card.hub_id}`" if card.flavour == "transformers" else
            f"`{card.checkpoint}` (segment-anything)" if card.checkpoint else "none outside nucseg")
    return [
        f"| PEFT flavour | {'transformers `SamModel`' if card.flavour == 'transformers' else 'segment-anything `Sam`'} |",
        f"| PEFT base | {base}{f'; on the Hub: `{card.hub_id}`' if card.flavour == 'sam' and card.hub_id else ''} |",
        f"| PEFT rank | {peft_rank} |",
        "| `task_type` | null: PEFT has no segmentation task type" + (
            "; `auto_mapping` names `SamModel`, so `peft.AutoPeftModel` builds the base (at its own 1024 px)"
            if card.flavour == "transformers" else "") + " |",
        f"| licence | base model (SAM): Apache-2.0; this export: `{card.license}` (set at export with `--license`, "
        "for the training data's terms) |" if card.license else
        "| licence | base model (SAM): Apache-2.0; the training data's terms were not stated at export "
        "(`--license`): check them before sharing |",
        f"| datasets | {', '.join(card.datasets) or 'not stated (`--dataset`)'} |",
    ]


def _peft_use(card: PeftCard, meta: dict) -> list[str]:
    code = card.snippet()
    package = "transformers" if card.flavour == "transformers" else "segment-anything"
    if code is None:
        return ["This adapter was trained on a seeded random initialisation that exists only inside nucseg "
                f"(`{meta.get('base', {}).get('fingerprint')}`), so there is no base to load without it: "
                f"`sam, _ = nucseg.model.sam.load_sam(\"{card.model_type}\", None, img_size={card.input_size}, "
                f"seed={meta.get('base', {}).get('init_seed', 0)})`, then `PeftModel.from_pretrained(sam, THIS_DIR)`.",
                ""]
    return [
        f"With peft, torch and {package} only (no nucseg). The adapter was trained with the encoder at "
        f"{card.input_size} px; SAM's position embedding is for 1024 px, so `at_input_size` resizes it (bicubic) "
        "and the global-attention relative-position tables (linear), exactly as nucseg did in training. The "
        "foreground head nucseg uses for prompt pruning is in `nucseg_fg_head.safetensors`; SAM itself does not "
        "need it.",
        "",
        "```python",
        *code,
        "```",
        "",
    ] + ([f"Slides and tiles should be at {_fmt(meta['mpp'])} µm/px."] if meta.get("mpp") else [])


def write_model_card(folder: str | os.PathLike, meta: dict, peft: PeftCard | None = None) -> Path:
    """Write ``folder/README.md`` atomically from ``meta``, replacing only a card nucseg wrote (``peft``: the card of a PEFT export)."""
    path = Path(folder) / CARD
    write_text(path, render_model_card(meta, peft), MODEL_CARD)
    return path
