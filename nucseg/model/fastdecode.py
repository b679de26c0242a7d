"""Inference-only fast path of SAM's mask decoder for single positive point prompts (grid prompting).

Why: with grid prompting the decoder, not the image encoder, dominates the cost of a tile (1,024 prompts on a
512 px tile). segment-anything's decoder treats every prompt as a separate image: it copies the image
embedding once per prompt and recomputes, per prompt, projections that only depend on the image. This module
computes exactly what :func:`nucseg.model.sam.decode` computes for point prompts without boxes or mask inputs (same
weights, same operations up to float rounding; checked in tests), with three changes:

1. layer 0 of the two-way transformer sees the same image tokens for every prompt of a tile (the dense prompt
   embedding is the constant no-mask embedding), so its image-side projections are computed once per tile
   (:func:`prepare`) and per-prompt copies of the image tokens only start after that layer;
2. in the later cross-attentions between the few prompt tokens (7) and the many image tokens, the
   projections of the image side are folded into the token side: ``(x W_k^T) . q = x . (W_k q)`` (the key
   bias shifts all scores of a query equally, which softmax ignores) and ``softmax(.) (x W_v^T) =
   (softmax(.) x) W_v^T``, likewise for the image-to-token queries and output projection, so no per-prompt
   projection of the image tokens is left there (for vit_b 2.3x fewer multiply-adds in those blocks);
   token self-attention and layer 0 use ``F.scaled_dot_product_attention``;
3. the output upscaling runs channels-last as two linear maps (a kernel-2, stride-2 transposed convolution is
   a per-pixel linear map) with a fused layer norm, and hypernetwork masks are made only for the mask tokens
   that are used (one, or SAM's three ambiguity masks).

A decoder whose blocks are not segment-anything's own (Med-SA's adapted blocks, :mod:`nucseg.model.medsa`) is decoded
through the reference path :func:`nucseg.model.sam.decode` instead, so no adapter is silently skipped.

Speed against the reference path: bench/bench_decoder.py, docs/PERFORMANCE.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock


@dataclass
class ImageContext:
    """Decoder state shared by every prompt of a tile: the image tokens and their layer-0 projections.

    keys (B, HW, C) image embedding + no-mask embedding; key_pe (1, HW, C) positional encoding;
    t2i_k / t2i_v (B, heads, HW, d) layer-0 token-to-image keys and values; i2t_q (B, heads, HW, d) layer-0
    image-to-token queries; hw the embedding grid.
    """

    keys: torch.Tensor
    key_pe: torch.Tensor
    t2i_k: torch.Tensor
    t2i_v: torch.Tensor
    i2t_q: torch.Tensor
    hw: tuple[int, int]
    embeddings: torch.Tensor | None = None  # kept for decoders that need the reference path


def has_fast_path(model: Sam) -> bool:
    """The fast path reimplements segment-anything's two-way blocks; adapted blocks take the reference path."""
    return all(type(layer) is TwoWayAttentionBlock for layer in model.mask_decoder.transformer.layers)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, c = x.shape
    return x.reshape(b, t, n, c // n).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, n, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, n * d)


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` with a fused attention kernel (token self-attention)."""
    n = attn.num_heads
    out = F.scaled_dot_product_attention(_heads(attn.q_proj(q), n), _heads(attn.k_proj(k), n), _heads(attn.v_proj(v), n))
    return attn.out_proj(_merge(out))


def _token_to_image(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` for T token queries (N, T, C) against image keys / values (N, HW, C), with the key
    and value projections folded into the token side (no (N, HW, C) projection)."""
    n, t, c = q.shape
    h = attn.num_heads
    d = attn.internal_dim // h
    qh = attn.q_proj(q).view(n, t, h, d)
    folded = torch.einsum("nthj,hjc->nhtc", qh, attn.k_proj.weight.view(h, d, c)).reshape(n, h * t, c)
    scores = torch.softmax(folded @ k.transpose(1, 2) * d**-0.5, dim=-1)  # (N, h*T, HW)
    mixed = (scores @ v).view(n, h, t, c)
    out = torch.einsum("nhtc,hjc->nthj", mixed, attn.v_proj.weight.view(h, d, c)).reshape(n, t, h * d)
    return attn.out_proj(out + attn.v_proj.bias)


def _image_to_token(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` for image queries (N, HW, C) (may be an expanded shared tensor) against T token
    keys / values (N, T, C), with the query and output projections folded into the token side."""
    n, t, c = k.shape
    h = attn.num_heads
    d = attn.internal_dim // h
    kh = attn.k_proj(k).view(n, t, h, d)
    folded = torch.einsum("nthj,hjc->nhtc", kh, attn.q_proj.weight.view(h, d, c)).reshape(n, h * t, c)
    bias = torch.einsum("nthj,hj->nht", kh, attn.q_proj.bias.view(h, d)).reshape(n, 1, h * t)
    scores = torch.baddbmm(bias, q, folded.transpose(1, 2)) * d**-0.5  # (N, HW, h*T)
    scores = torch.softmax(scores.view(n, -1, h, t), dim=-1).view(n, -1, h * t)
    vh = attn.v_proj(v).view(n, t, h, d)
    mixed = torch.einsum("nthj,chj->nhtc", vh, attn.out_proj.weight.view(c, h, d)).reshape(n, h * t, c)
    return torch.baddbmm(attn.out_proj.bias, scores, mixed)


def prepare(model: Sam, embeddings: torch.Tensor) -> ImageContext:
    """Per-tile decoder state for (B, C, h, w) image embeddings; computed once per batch of tiles."""
    pe = model.prompt_encoder
    transformer = model.mask_decoder.transformer
    _, c, h, w = embeddings.shape
    keys = embeddings.flatten(2).transpose(1, 2) + pe.no_mask_embed.weight.to(embeddings.dtype)
    key_pe = pe.get_dense_pe().to(embeddings.dtype).flatten(2).transpose(1, 2)
    if not has_fast_path(model):
        empty = keys.new_zeros(0)
        return ImageContext(keys=keys, key_pe=key_pe, t2i_k=empty, t2i_v=empty, i2t_q=empty, hw=(h, w),
                            embeddings=embeddings)
    first = transformer.layers[0]
    if not first.skip_first_layer_pe:
        raise ValueError("expected SAM's two-way transformer (first layer without positional encoding)")
    t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    with_pe = keys + key_pe
    return ImageContext(
        keys=keys,
        key_pe=key_pe,
        t2i_k=_heads(t2i.k_proj(with_pe), t2i.num_heads),
        t2i_v=_heads(t2i.v_proj(keys), t2i.num_heads),
        i2t_q=_heads(i2t.q_proj(with_pe), i2t.num_heads),
        hw=(h, w),
    )


def _first_layer(model: Sam, ctx: ImageContext, tokens: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0 for prompts sorted by tile (``counts`` per tile): shared image-side projections, no per-prompt
    copy of the image until its image-to-token update."""
    layer = model.mask_decoder.transformer.layers[0]
    queries = layer.norm1(_attend(layer.self_attn, tokens, tokens, tokens))
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    q = _heads(t2i.q_proj(queries + tokens), t2i.num_heads)  # (N, heads, T, d)
    n, heads, t, d = q.shape
    parts, start = [], 0
    for b, count in enumerate(counts):  # one fused attention per tile: its prompts' tokens against its image
        if count:
            qb = q[start : start + count].transpose(0, 1).reshape(1, heads, count * t, d)
            ob = F.scaled_dot_product_attention(qb, ctx.t2i_k[b : b + 1], ctx.t2i_v[b : b + 1])
            parts.append(ob.reshape(heads, count, t, d).transpose(0, 1))
            start += count
    queries = layer.norm2(queries + t2i.out_proj(_merge(torch.cat(parts))))
    queries = layer.norm3(queries + layer.mlp(queries))
    k = _heads(i2t.k_proj(queries + tokens), i2t.num_heads)
    v = _heads(i2t.v_proj(queries), i2t.num_heads)
    keys, start = [], 0
    for b, count in enumerate(counts):  # the tile's image queries (shared, not copied) against its prompts' tokens
        if count:
            qb = ctx.i2t_q[b : b + 1].expand(count, -1, -1, -1)
            out = F.scaled_dot_product_attention(qb, k[start : start + count], v[start : start + count])
            keys.append(layer.norm4(ctx.keys[b] + i2t.out_proj(_merge(out))))
            start += count
    return queries, torch.cat(keys)


def _later_layer(layer, queries, keys, query_pe, key_pe) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's ``TwoWayAttentionBlock.forward`` (with positional encodings), folded cross-attention."""
    q = queries + query_pe
    queries = layer.norm1(queries + _attend(layer.self_attn, q, q, queries))
    k = keys + key_pe
    queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, k, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    keys = layer.norm4(keys + _image_to_token(layer.cross_attn_image_to_token, k, queries + query_pe, queries))
    return queries, keys


def _upscale(model: Sam, src: torch.Tensor, hyper: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Mask logits (N, M, 4h, 4w) from image tokens (N, hw, C) and hypernetwork weights (N, M, C/8).

    The decoder's ConvTranspose2d(k=2, s=2) -> LayerNorm2d -> act -> ConvTranspose2d(k=2, s=2) -> act, done
    as per-pixel linear maps on channels-last tensors; sub-pixel (i, j) of the first and (k, l) of the
    second upsampling land at row 4y + 2i + k, column 4x + 2j + l.
    """
    conv1, norm, act1, conv2, act2 = model.mask_decoder.output_upscaling
    n, _, c = src.shape
    h, w = hw
    c1, c2 = conv1.out_channels, conv2.out_channels
    w1 = conv1.weight.permute(2, 3, 1, 0).reshape(4 * c1, c)  # rows [i, j, c1]
    y = F.linear(src, w1, conv1.bias.repeat(4)).view(n, h * w * 4, c1)
    y = act1(F.layer_norm(y, (c1,), norm.weight, norm.bias, norm.eps))
    w2 = conv2.weight.permute(2, 3, 1, 0).reshape(4 * c2, c1)  # rows [k, l, c2]
    z = act2(F.linear(y, w2, conv2.bias.repeat(4)).view(n, h * w * 16, c2))
    m = hyper.shape[1]
    masks = z @ hyper.transpose(1, 2)  # (N, [y, x, i, j, k, l], M)
    masks = masks.view(n, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(n, m, 4 * h, 4 * w)


def decode_points(
    model: Sam, ctx: ImageContext, points: torch.Tensor, image_index: torch.Tensor, multimask: bool = False,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode N point prompts of tiles ``image_index`` (N,): (N, 2) xy in input pixels, one positive point
    each, or (N, K, 2) with ``labels`` (N, K) (1 positive, 0 negative, -1 padding: SAM's point labels).

    Returns what :func:`nucseg.model.sam.decode` returns for the same prompts: mask logits (N, M, 4h, 4w) and
    predicted IoU (N, M), M = 3 with ``multimask`` else 1.
    """
    dec = model.mask_decoder
    n = len(points)
    if points.ndim == 2:
        points = points[:, None, :]
    if labels is None:
        labels = torch.ones(n, points.shape[1], dtype=torch.long, device=points.device)
    if ctx.embeddings is not None:  # adapted decoder blocks: segment-anything's computation, via nucseg.model.sam
        from .sam import decode

        return decode(model, ctx.embeddings, points, labels, image_index, multimask=multimask)
    ordered = bool((image_index[1:] >= image_index[:-1]).all())
    order = None if ordered else torch.argsort(image_index, stable=True)
    if order is not None:
        points, image_index, labels = points[order], image_index[order], labels[order]
    counts = torch.bincount(image_index, minlength=ctx.keys.shape[0]).tolist()
    sparse, _ = model.prompt_encoder(points=(points, labels), boxes=None, masks=None)
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat([tokens.unsqueeze(0).expand(n, -1, -1), sparse.to(tokens.dtype)], dim=1)
    tokens = tokens.to(ctx.keys.dtype)
    queries, keys = _first_layer(model, ctx, tokens, counts)
    transformer = dec.transformer
    for layer in transformer.layers[1:]:
        queries, keys = _later_layer(layer, queries, keys, tokens, ctx.key_pe)
    k = keys + ctx.key_pe
    queries = queries + _token_to_image(transformer.final_attn_token_to_image, queries + tokens, k, keys)
    queries = transformer.norm_final_attn(queries)
    used = range(1, dec.num_mask_tokens) if multimask else range(1)
    hyper = torch.stack([dec.output_hypernetworks_mlps[i](queries[:, 1 + i]) for i in used], dim=1)
    masks = _upscale(model, keys, hyper, ctx.hw)
    iou = dec.iou_prediction_head(queries[:, 0])[:, 1:] if multimask else dec.iou_prediction_head(queries[:, 0])[:, :1]
    if order is None:
        return masks, iou
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    return masks[inverse], iou[inverse]
