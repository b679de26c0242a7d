"""Med-SA (Wu et al., 2023, "Medical SAM Adapter: Adapting Segment Anything Model for Medical Image
Segmentation", arXiv:2304.12620), its 2D parts: bottleneck adapters in the image encoder and in the mask
decoder, one of them conditioned on the prompt.

An adapter is down-projection, activation (GELU), up-projection, with or without a skip connection.

Encoder, every ViT block (as the paper and its code):
- after multi-head attention: an adapter with skip, ``x <- x + up(act(down(x)))`` (applied after SAM's window
  un-partitioning; the adapter is per token, so this is the same as applying it inside the windows);
- beside the MLP: an adapter without skip on the same normalised input, scaled by ``s`` (0.5 in the code):
  ``x <- x + MLP(LN(x)) + s * adapter(LN(x))``.

Decoder, each two-way transformer block (the paper's three decoder adapters):
- after the token-to-image cross-attention: the hyper-prompting adapter ("HyP-Adpt"), whose middle weight
  matrix is *generated from the prompt embedding* by a linear hyper-network: ``h = act(down(x))``,
  ``h = ReLU(LN(h W(p)))``, ``x <- x + up(h)``, with ``W(p)`` a (d x d) matrix per prompt and ``p`` the
  mean of that prompt's sparse prompt-encoder tokens;
- beside the token MLP: the same scaled parallel adapter as in the encoder;
- after the image-to-token cross-attention: an adapter with skip on the image tokens.

Simplified or chosen by nucseg (said here and in the README): the depth-attention branch and the 3D parts are
left out (H&E is 2D); HyP-Adpt uses one generated layer, the paper's description allows several; the decoder
adapters use the encoder's bottleneck *ratio* (default 0.25 as the code: 192 for vit_b's 768-dim encoder, 64
for its 256-dim decoder); every up-projection is zero-initialised, so an untrained Med-SA equals its base
exactly. By default the rest of the mask decoder trains too (as Med-SA's code does);
``train_decoder=False`` (``--freeze-decoder``) trains the adapters only. Not mergeable into SAM's weights:
adapters add non-linear branches.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from segment_anything.modeling.transformer import TwoWayAttentionBlock

DEFAULT_RATIO = 0.25  # Med-SA's mlp_ratio of its Adapter
DEFAULT_SCALE = 0.5  # Med-SA's scale of the MLP-parallel adapter


class Adapter(nn.Module):
    """down -> GELU -> up, with an optional skip; ``up`` starts at zero."""

    def __init__(self, dim: int, hidden: int, skip: bool):
        super().__init__()
        self.skip = skip
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(self.act(self.down(x)))
        return x + out if self.skip else out


class HyperAdapter(nn.Module):
    """HyP-Adpt: an adapter (with skip) whose middle (hidden x hidden) weight is generated from the prompt."""

    def __init__(self, dim: int, hidden: int, prompt_dim: int):
        super().__init__()
        self.hidden = hidden
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.hyper = nn.Linear(prompt_dim, hidden * hidden)
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """x (N, T, C) tokens, prompt (N, P) one embedding per prompt."""
        weight = self.hyper(prompt).view(-1, self.hidden, self.hidden)
        h = torch.bmm(self.act(self.down(x)), weight.to(x.dtype))
        return x + self.up(F.relu(self.norm(h)))


class MedSABlock(Block):
    """segment-anything's ViT block with Med-SA's two encoder adapters (class swapped in place)."""

    medsa_attn: Adapter
    medsa_mlp: Adapter
    medsa_scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + self.medsa_attn(x)
        xn = self.norm2(x)
        x = x + self.mlp(xn)
        return x + self.medsa_scale * self.medsa_mlp(xn)


class MedSADecoderBlock(TwoWayAttentionBlock):
    """SAM's two-way attention block with Med-SA's three decoder adapters (class swapped in place).

    ``query_pe`` is the decoder's initial token set: the output tokens, then the prompt's sparse embedding,
    whose mean is the prompt embedding HyP-Adpt is conditioned on.
    """

    medsa_hyper: HyperAdapter
    medsa_mlp: Adapter
    medsa_keys: Adapter
    medsa_scale: float
    medsa_output_tokens: int

    def forward(self, queries, keys, query_pe, key_pe):
        prompt = query_pe[:, self.medsa_output_tokens :].mean(1)
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = queries + self.cross_attn_token_to_image(q=q, k=k, v=keys)
        queries = self.norm2(self.medsa_hyper(queries, prompt))
        mlp_in = queries
        queries = queries + self.mlp(mlp_in)
        queries = self.norm3(queries + self.medsa_scale * self.medsa_mlp(mlp_in))
        q, k = queries + query_pe, keys + key_pe
        keys = keys + self.cross_attn_image_to_token(q=k, k=q, v=queries)
        keys = self.norm4(self.medsa_keys(keys))
        return queries, keys


def hidden_dims(embed_dim: int, decoder_dim: int, dim: int | None) -> tuple[int, int]:
    """Bottleneck widths (encoder, decoder): ``dim`` for the encoder (default 0.25 x width), same ratio in the
    decoder."""
    enc = dim or max(1, round(embed_dim * DEFAULT_RATIO))
    return enc, max(1, round(decoder_dim * enc / embed_dim))


def apply_medsa(model: Sam, dim: int | None, scale: float | None) -> list[nn.Parameter]:
    """Insert Med-SA's adapters into ``model`` in place; returns the new (trainable) parameters."""
    enc, dec = model.image_encoder, model.mask_decoder
    if any(isinstance(b, MedSABlock) for b in enc.blocks):
        raise ValueError("the model already has Med-SA adapters")
    scale = DEFAULT_SCALE if scale is None else scale
    embed_dim = enc.patch_embed.proj.out_channels
    dec_dim = dec.transformer_dim
    h_enc, h_dec = hidden_dims(embed_dim, dec_dim, dim)
    ref = enc.patch_embed.proj.weight
    new: list[nn.Parameter] = []
    for block in enc.blocks:
        block.__class__ = MedSABlock
        block.medsa_attn = Adapter(embed_dim, h_enc, skip=True).to(device=ref.device, dtype=ref.dtype)
        block.medsa_mlp = Adapter(embed_dim, h_enc, skip=False).to(device=ref.device, dtype=ref.dtype)
        block.medsa_scale = scale
        new += [*block.medsa_attn.parameters(), *block.medsa_mlp.parameters()]
    prompt_dim = model.prompt_encoder.embed_dim
    for layer in dec.transformer.layers:
        layer.__class__ = MedSADecoderBlock
        layer.medsa_hyper = HyperAdapter(dec_dim, h_dec, prompt_dim).to(device=ref.device, dtype=ref.dtype)
        layer.medsa_mlp = Adapter(dec_dim, h_dec, skip=False).to(device=ref.device, dtype=ref.dtype)
        layer.medsa_keys = Adapter(dec_dim, h_dec, skip=True).to(device=ref.device, dtype=ref.dtype)
        layer.medsa_scale = scale
        layer.medsa_output_tokens = 1 + dec.num_mask_tokens
        new += [*layer.medsa_hyper.parameters(), *layer.medsa_mlp.parameters(), *layer.medsa_keys.parameters()]
    return new


def medsa_parameters(embed_dim: int, depth: int, decoder_dim: int, decoder_depth: int, prompt_dim: int,
                     h_enc: int, h_dec: int) -> int:
    """Closed form of the parameter count (tests compare it with the modules)."""
    def adapter(d: int, h: int) -> int:
        return d * h + h + h * d + d

    hyper = adapter(decoder_dim, h_dec) + prompt_dim * h_dec * h_dec + h_dec * h_dec + 2 * h_dec
    return depth * 2 * adapter(embed_dim, h_enc) + decoder_depth * (hyper + 2 * adapter(decoder_dim, h_dec))
