"""Model building, official-checkpoint loading at the native 512 px size, batched decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nucseg.errors import CheckpointError
from nucseg.model.lora import MethodConfig, apply_method, count_parameters
from nucseg.io import sha256_file
from nucseg.model.sam import adapt_state_dict, build_sam, decode, encode, load_sam


def test_vit_b_parameter_counts_exact():
    """vit_b at 1024 px is the official 93,735,472 parameters; at 512 px the 64x64 position grid becomes 32x32
    and the four global-attention rel-pos tables shrink from 127 to 63 rows; LoRA r4 on q,v adds
    12 blocks x 2 slices x (4x768 + 768x4) = 147,456, the mask decoder is 4,058,340."""
    with torch.device("meta"):
        full = build_sam("vit_b", img_size=1024)
        native = build_sam("vit_b", img_size=512)
    assert count_parameters(full)[1] == 93_735_472
    shrink = (64 * 64 - 32 * 32) * 768 + 4 * 2 * (127 - 63) * 64
    assert count_parameters(native)[1] == 93_735_472 - shrink == 91_343_408
    apply_method(native, MethodConfig())
    trainable, total = count_parameters(native)
    assert total == 91_343_408 + 147_456
    assert trainable == 147_456 + 4_058_340
    assert sum(p.numel() for n, p in native.named_parameters() if "lora_" in n) == 147_456


def test_official_keys_load_with_interpolated_position_tables(tiny_official_ckpt):
    state = torch.load(tiny_official_ckpt, weights_only=True)
    model, fingerprint = load_sam("vit_tiny", tiny_official_ckpt, img_size=512)
    assert fingerprint == sha256_file(tiny_official_ckpt)
    loaded = model.state_dict()
    assert state["image_encoder.pos_embed"].shape == (1, 64, 64, 96)
    assert loaded["image_encoder.pos_embed"].shape == (1, 32, 32, 96)
    ref = F.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(32, 32), mode="bicubic",
                        align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(loaded["image_encoder.pos_embed"], ref)
    # global blocks (1, 3) have 2*32-1 rows now; windowed blocks keep their 2*14-1
    assert loaded["image_encoder.blocks.1.attn.rel_pos_h"].shape[0] == 63
    assert loaded["image_encoder.blocks.0.attn.rel_pos_h"].shape[0] == 27
    torch.testing.assert_close(loaded["image_encoder.blocks.0.attn.rel_pos_h"],
                               state["image_encoder.blocks.0.attn.rel_pos_h"])
    # everything else is copied verbatim
    for key in ("mask_decoder.iou_token.weight", "image_encoder.blocks.2.attn.qkv.weight"):
        torch.testing.assert_close(loaded[key], state[key])


def test_same_size_state_dict_is_untouched():
    model = build_sam("vit_tiny", img_size=512)
    state = model.state_dict()
    out = adapt_state_dict(state, model)
    assert all(out[k] is state[k] for k in state)


def test_mismatched_checkpoint_is_one_clear_error(tiny_official_ckpt):
    with pytest.raises(CheckpointError, match="vit_tiny checkpoint .* does not fit --model vit_b"):
        load_sam("vit_b", tiny_official_ckpt)


def test_corrupt_and_missing_checkpoints(tmp_path, tiny_official_ckpt):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(tiny_official_ckpt.read_bytes()[:5000])  # truncated download
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_sam("vit_tiny", bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_sam("vit_tiny", tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    torch.save({"a": 1}, junk)
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_sam("vit_tiny", junk)


def test_random_init_is_seeded():
    a, fa = load_sam("vit_tiny", seed=3)
    b, fb = load_sam("vit_tiny", seed=3)
    assert fa == fb == "random-init:vit_tiny:seed3"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_batched_decode_matches_segment_anything_per_image():
    torch.manual_seed(0)
    model = build_sam("vit_tiny")
    x = torch.randint(0, 255, (2, 512, 512, 3), dtype=torch.uint8)
    pts = torch.rand(7, 1, 2) * 512
    idx = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    with torch.no_grad():
        emb = encode(model, x)
        masks, iou = decode(model, emb, pts, torch.ones(7, 1, dtype=torch.long), idx, multimask=True)
        assert masks.shape == (7, 3, 128, 128) and iou.shape == (7, 3)
        for i in range(7):
            sp, de = model.prompt_encoder(points=(pts[i : i + 1], torch.ones(1, 1, dtype=torch.long)),
                                          boxes=None, masks=None)
            ref_m, ref_i = model.mask_decoder(emb[idx[i] : idx[i] + 1], model.prompt_encoder.get_dense_pe(), sp,
                                              de, multimask_output=True)
            torch.testing.assert_close(masks[i : i + 1], ref_m, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(iou[i : i + 1], ref_i, atol=1e-5, rtol=1e-4)


def test_encode_pads_small_tiles_and_rejects_large():
    model = build_sam("vit_tiny")
    with torch.no_grad():
        assert encode(model, torch.zeros(1, 300, 260, 3, dtype=torch.uint8)).shape == (1, 64, 32, 32)
    with pytest.raises(ValueError):
        encode(model, torch.zeros(1, 600, 600, 3, dtype=torch.uint8))
