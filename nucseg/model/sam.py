"""Build Segment Anything models at the tile's native size and load official checkpoints into them.

SAM's encoder was trained at 1024 px. H&E tiles are 512 px; upsampling them costs about 7x the encoder
compute (attention is quadratic in tokens), so instead the model is *built* at the native size and the
checkpoint's absolute position embedding (64x64 grid) and the global-attention relative-position tables
(2*64-1 rows) are interpolated to the smaller grid when the state dict is loaded. Windowed blocks keep their
14x14 tables unchanged. Key names are those of the official ``sam_vit_*.pth`` files.

Everything here is plain tensors in, plain tensors out, so that training, tile inference and benchmarks share
one encode/decode path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ..errors import CheckpointError, InputError
from ..io import sha256_file

PATCH = 16


@dataclass(frozen=True)
class ModelSpec:
    """Widths and depths of one SAM variant; all variants use segment-anything's own classes."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_hidden_dim: int = 256
    window_size: int = 14


SPECS: dict[str, ModelSpec] = {
    "vit_b": ModelSpec("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ModelSpec("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ModelSpec("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    # Same architecture, small widths: for tests, the demo and CPU benchmarks. Not a substitute for the
    # official weights, which cannot be downloaded in every environment.
    "vit_tiny": ModelSpec(
        "vit_tiny", 96, 4, 4, (1, 3), prompt_dim=64, decoder_mlp_dim=256, decoder_heads=4, iou_hidden_dim=64
    ),
}


def build_sam(spec: ModelSpec | str, img_size: int = 512) -> Sam:
    """A randomly initialised SAM of ``spec`` whose encoder runs at ``img_size`` (a multiple of 16)."""
    if isinstance(spec, str):
        spec = get_spec(spec)
    if img_size % PATCH:
        raise InputError(f"input size must be a multiple of {PATCH}, got {img_size}")
    grid = img_size // PATCH
    model = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.depth,
            embed_dim=spec.embed_dim,
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.num_heads,
            patch_size=PATCH,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=spec.prompt_dim, mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_heads
            ),
            transformer_dim=spec.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return model.eval()


def get_spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; choose one of {', '.join(SPECS)}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official ``.pth`` (or a ``.safetensors``) SAM state dict, with one clear error if it cannot."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle garbage, wrong format: all mean "bad file"
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid PyTorch/safetensors file ({reason})") from None
    for key in ("model", "state_dict"):  # common wrappers around a plain state dict
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def describe_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Human description of which SAM a state dict is, for mismatch errors."""
    w = state.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        return "not a SAM checkpoint (no image_encoder.patch_embed.proj.weight)"
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, spec in SPECS.items():
        if spec.embed_dim == w.shape[0] and spec.depth == depth:
            return f"a {name} checkpoint ({w.shape[0]}-dim, {depth} blocks)"
    return f"an unknown SAM variant ({w.shape[0]}-dim, {depth} blocks)"


def adapt_state_dict(state: dict[str, torch.Tensor], model: Sam) -> dict[str, torch.Tensor]:
    """Resize position tables of ``state`` to ``model``'s input size; leave everything else untouched.

    pos_embed (1, H, W, C) is resized bicubically on its grid; rel_pos_h / rel_pos_w (2S-1, head_dim) of the
    global-attention blocks linearly along their length, as segment-anything itself does when the sizes
    differ at run time.
    """
    target = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue
        want = target[key].shape
        if key == "image_encoder.pos_embed" and value.ndim == 4 and value.shape[-1] == want[-1]:
            grid = value.permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=want[1:3], mode="bicubic", align_corners=False)
            out[key] = grid.permute(0, 2, 3, 1).to(value.dtype).contiguous()
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2 and value.shape[1] == want[1]:
            table = value.float().T.unsqueeze(0)
            table = F.interpolate(table, size=want[0], mode="linear", align_corners=False)
            out[key] = table[0].T.to(value.dtype).contiguous()
    return out


def random_init_fingerprint(model_type: str, seed: int) -> str:
    """The fingerprint of a seeded random initialisation (what adapters trained without a checkpoint record)."""
    return f"random-init:{model_type}:seed{seed}"


def load_sam(
    model_type: str, checkpoint: str | Path | None = None, img_size: int = 512, seed: int = 0,
    check: Callable[[str], None] | None = None,
) -> tuple[Sam, str]:
    """Build ``model_type`` at ``img_size`` and load ``checkpoint`` (official keys) into it.

    Returns the model and a fingerprint of the base weights: the checkpoint's SHA-256, or
    ``random-init:<model>:seed<N>`` for a seeded random initialisation (reproducible, so adapters trained on
    it can be re-applied). ``check`` is called with the fingerprint before anything is read or built (an
    adapter refuses a base it was not trained on), and a checkpoint's architecture is compared with
    ``model_type`` before the model is built: a wrong or tampered model name never allocates a model.
    """
    spec = get_spec(model_type)
    if checkpoint is None:
        fingerprint = random_init_fingerprint(spec.name, seed)
        if check is not None:
            check(fingerprint)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_sam(spec, img_size)
        return model, fingerprint
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    fingerprint = sha256_file(checkpoint)
    if check is not None:
        check(fingerprint)
    state = read_state_dict(checkpoint)
    w = state.get("image_encoder.patch_embed.proj.weight")
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    if w is None or w.ndim != 4 or w.shape[0] != spec.embed_dim or depth != spec.depth:
        raise CheckpointError(f"checkpoint {checkpoint} is {describe_state_dict(state)}, which does not fit --model "
                              f"{spec.name} ({spec.embed_dim}-dim, {spec.depth} blocks)")
    model = build_sam(spec, img_size)
    state = adapt_state_dict(state, model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        what = describe_state_dict(state)
        detail = (wrong or missing or unexpected)[:3]
        raise CheckpointError(
            f"checkpoint {checkpoint} is {what}, which does not fit --model {spec.name} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped keys, e.g. {detail})"
        )
    model.load_state_dict(state)
    return model, fingerprint


# --------------------------------------------------------------------------------------------------------
# Batched encode / decode shared by training, tile inference and benchmarks.
# --------------------------------------------------------------------------------------------------------


def encode(model: Sam, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 or (B, 3, H, W) float RGB in [0, 255] -> (B, C, h, w) image embeddings.

    Tiles smaller than the model's input are padded at the bottom/right (as SAM does); larger ones are an
    error, because the caller is expected to tile.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images, got shape {tuple(images.shape)}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    x = (images.float() - model.pixel_mean) / model.pixel_std
    size = model.image_encoder.img_size
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"tile {h}x{w} is larger than the model input {size}")
    x = F.pad(x, (0, size - w, 0, size - h))
    return model.image_encoder(x)


def decode(
    model: Sam,
    embeddings: torch.Tensor,
    points: torch.Tensor,
    point_labels: torch.Tensor,
    image_index: torch.Tensor,
    boxes: torch.Tensor | None = None,
    multimask: bool = False,
    box_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode N prompts spread over B images in one pass.

    embeddings (B, C, h, w); points (N, K, 2) xy in input pixels; point_labels (N, K) with 1 = positive,
    0 = negative, -1 = padding; image_index (N,) the image each prompt belongs to; boxes optional (N, 4)
    xyxy; box_mask optional (N,) bool: only those prompts get their box (a batch mixing boxed and unboxed
    prompts, as training draws them). Returns low-resolution mask logits (N, M, 4h, 4w) and predicted IoU (N, M), M = 3 with
    ``multimask`` else 1.

    segment-anything's MaskDecoder assumes one image per call; indexing the embeddings by ``image_index``
    instead lets the decoder run once over all tiles of a batch, with a different number of prompts per tile
    (what prompt pruning leaves).
    """
    pe = model.prompt_encoder
    if boxes is not None and box_mask is not None:
        # SAM embeds a box as two corner points labelled 2 and 3; prompts without a box get padding points
        # (label -1) there, so boxed and unboxed prompts share one call.
        corner_labels = torch.tensor([2, 3], device=points.device)
        points = torch.cat([points, boxes.reshape(-1, 2, 2).to(points.dtype)], 1)
        point_labels = torch.cat([point_labels, torch.where(box_mask[:, None], corner_labels, -1)], 1)
        boxes = None
    sparse, dense = pe(points=(points, point_labels), boxes=boxes, masks=None)
    dec = model.mask_decoder
    n = points.shape[0]
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat([tokens.unsqueeze(0).expand(n, -1, -1), sparse.to(tokens.dtype)], dim=1)
    src = embeddings[image_index] + dense.to(embeddings.dtype)
    pos = pe.get_dense_pe().to(embeddings.dtype).expand(n, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = dec.transformer(src, pos, tokens)
    iou_out = hs[:, 0, :]
    mask_tokens = hs[:, 1 : 1 + dec.num_mask_tokens, :]
    up = dec.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    hyper = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
    _, c2, h2, w2 = up.shape
    masks = (hyper @ up.reshape(n, c2, h2 * w2)).reshape(n, -1, h2, w2)
    iou = dec.iou_prediction_head(iou_out)
    sel = slice(1, None) if multimask else slice(0, 1)
    return masks[:, sel], iou[:, sel]


class ForegroundHead(torch.nn.Module):
    """A cheap nucleus-foreground map from the image embedding (B, C, h, w) -> logits (B, 1, h, w).

    Trained beside the decoder; at inference it tells which grid prompts can hit a nucleus at all, so the
    (expensive) decoder runs only there. A few thousand parameters, stored in the adapter.
    """

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(dim, hidden, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(hidden, 1, 1)
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings)


def attach_foreground_head(model: Sam) -> Sam:
    """Give ``model`` a trainable ``fg_head`` (kept out of exported official state dicts)."""
    if getattr(model, "fg_head", None) is None:
        dim = model.prompt_encoder.embed_dim
        device = model.pixel_mean.device
        model.fg_head = ForegroundHead(dim).to(device)
    return model
