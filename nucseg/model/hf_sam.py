"""segment-anything's ``Sam`` in transformers' terms: the ``SamModel`` config and state-dict key names.

The Hugging Face Hub's SAM checkpoints (``facebook/sam-vit-base`` etc.) are the official ``sam_vit_*.pth``
weights under transformers' module names (``vision_encoder.layers.N.attn.qkv`` for
``image_encoder.blocks.N.attn.qkv``, ``mask_decoder.upscale_conv1`` for ``mask_decoder.output_upscaling.0``,
...). Renaming the keys is all a PEFT export needs to target ``SamModel``; the tensors are the same.
:func:`to_transformers` converts a whole model (a non-official base such as ``vit_tiny``, which has no Hub
checkpoint), so the same adapter can be used with transformers. transformers is imported only here, lazily.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from ..errors import OutputError
from ..io import atomic_path, new_only
from .sam import PATCH, ModelSpec, get_spec

# the Hub's conversions of the official checkpoints (same weights as sam_vit_*.pth, transformers' names)
HUB_IDS = {"vit_b": "facebook/sam-vit-base", "vit_l": "facebook/sam-vit-large", "vit_h": "facebook/sam-vit-huge"}

_RENAMES = [  # (segment-anything pattern, transformers replacement), applied in order
    (r"^image_encoder\.", "vision_encoder."),
    (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"\.norm(\d)\.", r".layer_norm\1."),
    (r"\.neck\.0\.", ".neck.conv1."), (r"\.neck\.1\.", ".neck.layer_norm1."),
    (r"\.neck\.2\.", ".neck.conv2."), (r"\.neck\.3\.", ".neck.layer_norm2."),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
     "prompt_encoder.shared_embedding.positional_embedding"),
    (r"\.point_embeddings\.", ".point_embed."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."), (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."), (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    (r"\.norm_final_attn\.", ".layer_norm_final_attn."),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."), (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
]
_MLP = re.compile(r"((?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.")
MLP_DEPTH = 3  # SAM's hypernetwork and IoU-head MLPs: proj_in, one hidden layer, proj_out
# segment-anything's two-way transformer uses nn.LayerNorm's default eps; transformers' configs (the Hub's
# included) say 1e-6 there, which moves mask logits by ~1e-5. Set to SAM's, the port is exact.
DECODER_LN_EPS = 1e-5


def transformers_key(key: str) -> str:
    """The ``SamModel`` name of a segment-anything ``Sam`` state-dict key (PEFT prefixes are kept)."""
    prefix = "base_model.model." if key.startswith("base_model.model.") else ""
    key = key[len(prefix):]
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)

    def mlp(m: re.Match) -> str:
        i = int(m.group(2))
        name = "proj_in" if i == 0 else "proj_out" if i == MLP_DEPTH - 1 else f"layers.{i - 1}"
        return f"{m.group(1)}.{name}."

    return prefix + _MLP.sub(mlp, key)


def transformers_config(spec: ModelSpec | str, img_size: int = 1024):
    """``transformers.SamConfig`` of ``spec`` with the encoder (and prompt encoder) at ``img_size`` px."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    spec = get_spec(spec) if isinstance(spec, str) else spec
    return SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=spec.embed_dim, output_channels=spec.prompt_dim, num_hidden_layers=spec.depth,
            num_attention_heads=spec.num_heads, image_size=img_size, patch_size=PATCH, mlp_ratio=4.0,
            window_size=spec.window_size, global_attn_indexes=list(spec.global_attn_indexes),
            num_pos_feats=spec.prompt_dim // 2),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=spec.prompt_dim, image_size=img_size,
                                                     patch_size=PATCH),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=spec.prompt_dim, mlp_dim=spec.decoder_mlp_dim,
                                                 num_attention_heads=spec.decoder_heads,
                                                 iou_head_hidden_dim=spec.iou_hidden_dim, iou_head_depth=MLP_DEPTH,
                                                 layer_norm_eps=DECODER_LN_EPS),
    )


def transformers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole segment-anything state dict under ``SamModel``'s keys (the Fourier matrix also as the model's
    ``shared_image_embedding``, which transformers ties to the prompt encoder's)."""
    out = {transformers_key(k): v for k, v in state.items()}
    gauss = out.get("prompt_encoder.shared_embedding.positional_embedding")
    if gauss is not None:
        out["shared_image_embedding.positional_embedding"] = gauss
    return out


def to_transformers(sam: Sam, model_type: str):
    """A ``transformers.SamModel`` with ``sam``'s weights at ``sam``'s input size (for non-official bases)."""
    from transformers import SamModel

    model = SamModel(transformers_config(model_type, sam.image_encoder.img_size))
    state = transformers_state_dict(sam.state_dict())
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_transformers_base(sam: Sam, model_type: str, out: str | Path) -> Path:
    """Write ``sam`` as a new transformers model folder (``SamModel.from_pretrained(out)`` loads it), e.g.
    ``save_transformers_base(load_sam("vit_tiny", ckpt, img_size=1024)[0], "vit_tiny", "sam-vit-tiny-hf")``
    for ``nucseg export-peft --flavour transformers --base-model sam-vit-tiny-hf``."""
    out = Path(out)
    if out.exists():
        raise OutputError(f"{out} exists; choose a new folder for the transformers model")
    with atomic_path(out, is_dir=True, owned=new_only) as tmp:
        to_transformers(sam, model_type).save_pretrained(str(tmp))
    return out
