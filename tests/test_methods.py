"""SAM-Adapter, Med-SA, DoRA and rsLoRA (issue 16): exact parameter counts, fresh = base, save/load bit-exact,
frozen weights stay frozen, shapes, merge refused where it cannot be done."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nucseg.model.adapter import export_merged, load_adapter, read_adapter, save_adapter
from nucseg.model.adapters_sam import SAMAdapterEncoder, high_frequency, sam_adapter_parameters
from nucseg.errors import CheckpointError, InputError
from nucseg.model.fastdecode import decode_points, has_fast_path, prepare
from nucseg.model.lora import MethodConfig, QKVLoRA, apply_method, count_parameters
from nucseg.model.medsa import MedSABlock, MedSADecoderBlock, hidden_dims, medsa_parameters
from nucseg.model.sam import attach_foreground_head, build_sam, decode, encode, load_sam

VIT_B_512 = 91_343_408  # vit_b built at 512 px (tests/test_sam.py derives it from the official 93,735,472)
DECODER = 4_058_340  # vit_b's mask decoder

NEW_METHODS = [
    MethodConfig(method="adapter"),
    MethodConfig(method="medsa"),
    MethodConfig(dora=True),  # nucseg's own q,v slices
    MethodConfig(targets=["qkv"], dora=True, rslora=True),  # peft
    MethodConfig(targets=["q", "v", "proj"], dora=True),  # both at once
]
IDS = ["adapter", "medsa", "dora-qv", "dora-rslora-qkv", "dora-qv-proj"]


def _vit_b(cfg: MethodConfig | None):
    with torch.device("meta"):
        model = build_sam("vit_b", img_size=512)
        if cfg is not None:
            apply_method(model, cfg)
    return model


@pytest.mark.parametrize("cfg,added,trainable", [
    # decoder only: the 4,058,340 decoder parameters; full: everything but the prompt encoder (6,220)
    (MethodConfig(method="decoder"), 0, DECODER),
    (MethodConfig(method="full"), 0, VIT_B_512 - 6_220),
    # LoRA r4 on q,v: 12 blocks x 2 slices x (4x768 + 768x4) = 147,456; rsLoRA only changes the scale
    (MethodConfig(), 147_456, 147_456 + DECODER),
    (MethodConfig(rslora=True), 147_456, 147_456 + DECODER),
    # DoRA adds one magnitude per output row of each adapted slice: 12 x 2 x 768 = 18,432
    (MethodConfig(dora=True), 147_456 + 18_432, 147_456 + 18_432 + DECODER),
    # peft DoRA on the whole qkv: 12 x (4x768 + 2304x4) = 147,456 + 12 x 2304 magnitudes = 27,648
    (MethodConfig(targets=["qkv"], dora=True), 147_456 + 27_648, 147_456 + 27_648 + DECODER),
    # SAM-Adapter, d = 768/32 = 24: patch-embedding tune 768x24+24 = 18,456; FFT patch conv 3x16x16x24+24 =
    # 18,456; 12 tuning MLPs 12 x (24x24+24) = 7,200; shared up-projection 24x768+768 = 19,200
    (MethodConfig(method="adapter"), 63_312, 63_312 + DECODER),
    # Med-SA, encoder 768 -> 192: 12 blocks x 2 adapters x (768x192+192+192x768+768) = 7,100,928; decoder 256 -> 64,
    # 2 blocks x (HyP-Adpt 256x64+64 + 256x4096+4096 (hyper-network) + 2x64 (norm) + 64x256+256 = 1,085,888
    # + 2 adapters x 33,088) = 2,304,128
    (MethodConfig(method="medsa"), 9_405_056, 9_405_056 + DECODER),
    (MethodConfig(method="medsa", train_decoder=False), 9_405_056, 9_405_056),
])
def test_vit_b_parameter_counts_exact(cfg, added, trainable):
    trained, total = count_parameters(_vit_b(cfg))
    assert total == VIT_B_512 + added
    assert trained == trainable


def test_closed_forms_agree_with_the_modules():
    assert sam_adapter_parameters(768, 12, 24) == 63_312
    assert hidden_dims(768, 256, None) == (192, 64)
    assert hidden_dims(768, 256, 96) == (96, 32)
    assert medsa_parameters(768, 12, 256, 2, 256, 192, 64) == 9_405_056
    for cfg in (MethodConfig(method="adapter", adapter_dim=40), MethodConfig(method="medsa", adapter_dim=96)):
        model = _vit_b(cfg)
        added = count_parameters(model)[1] - VIT_B_512
        want = sam_adapter_parameters(768, 12, 40) if cfg.method == "adapter" else \
            medsa_parameters(768, 12, 256, 2, 256, 96, 32)
        assert added == want


@pytest.mark.parametrize("cfg", NEW_METHODS, ids=IDS)
def test_a_fresh_method_equals_its_base_exactly(cfg):
    base, _ = load_sam("vit_tiny", img_size=256, seed=3)
    model, _ = load_sam("vit_tiny", img_size=256, seed=3)
    torch.manual_seed(0)
    apply_method(model, cfg)
    x = torch.randint(0, 255, (2, 256, 256, 3), dtype=torch.uint8)
    pts, labels = torch.rand(6, 1, 2) * 256, torch.ones(6, 1, dtype=torch.long)
    idx = torch.tensor([0, 0, 0, 1, 1, 1])
    with torch.no_grad():
        e0, e1 = encode(base, x), encode(model.eval(), x)
        assert torch.equal(e0, e1)
        for a, b in zip(decode(base, e0, pts, labels, idx, multimask=True), decode(model, e1, pts, labels, idx, multimask=True)):
            assert torch.equal(a, b)


def _perturb(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("cfg", NEW_METHODS, ids=IDS)
def test_round_trip_bit_exact_and_frozen_weights_stay_frozen(cfg, tmp_path, tiny_official_ckpt):
    model, fp = load_sam("vit_tiny", tiny_official_ckpt, img_size=256)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    apply_method(model, cfg)
    attach_foreground_head(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # one real optimisation step: only the method's tensors move, the base's stay bit-identical
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 255, (1, 256, 256, 3), dtype=torch.uint8)
    pts, labels, idx = torch.tensor([[[100.0, 120.0]]]), torch.ones(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    model.train()
    emb = encode(model, x)
    logits, iou = decode(model, emb, pts, labels, idx)
    (logits.sigmoid().mean() + iou.sum() + model.fg_head(emb).mean()).backward()
    opt.step()
    _perturb(model)  # zero-initialised up-projections (one step moves them little): make the check meaningful
    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert p.grad is None, n
        key = n
        if key not in frozen_before:  # peft moves a wrapped Linear's weight under base_layer.
            key = n.replace(".base_layer", "")
        assert torch.equal(p, frozen_before[key]), n
    expected = {"adapter": "image_encoder.sam_adapter.", "medsa": "medsa_"}.get(cfg.method, "lora_")
    assert any(expected in n for n in trainable)
    assert not any(n.startswith("prompt_encoder.") for n in trainable)
    meta = {"base": {"model": "vit_tiny", "fingerprint": fp, "init_seed": 0}, "input_size": 256}
    path = save_adapter(tmp_path / "ad", model, cfg, meta)
    assert json.loads((path / "method.json").read_text()) == cfg.to_dict()
    loaded, info = load_adapter(path, tiny_official_ckpt)
    assert info.method == cfg
    model.eval()
    with torch.no_grad():
        e0, e1 = encode(model, x), encode(loaded, x)
        assert torch.equal(e0, e1)
        assert torch.equal(decode(model, e0, pts, labels, idx)[0], decode(loaded, e1, pts, labels, idx)[0])
    assert count_parameters(loaded) == count_parameters(model)
    # the method changed the model: perturbed adapters do not compute what the base computes
    base, _ = load_sam("vit_tiny", tiny_official_ckpt, img_size=256)
    with torch.no_grad():
        assert not torch.equal(encode(base, x), e1) or cfg.method == "medsa" and not torch.equal(
            decode(base, encode(base, x), pts, labels, idx)[0], decode(loaded, e1, pts, labels, idx)[0])


def test_sam_adapter_shapes_and_high_frequency_input():
    model, _ = load_sam("vit_tiny", img_size=256)
    apply_method(model, MethodConfig(method="adapter", adapter_dim=5, adapter_scale=2.0))
    enc = model.image_encoder
    assert isinstance(enc, SAMAdapterEncoder) and "image_encoder.blocks.0.attn.qkv.weight" in model.state_dict()
    image = torch.randn(2, 3, 256, 256)
    patches = enc.patch_embed(image)
    task = enc.sam_adapter.task_input(image, patches)
    assert task.shape == (2, 16, 16, 5)
    with torch.no_grad():
        enc.sam_adapter.up.weight.fill_(0.1)
    prompt = enc.sam_adapter.prompt(3, task)
    assert prompt.shape == patches.shape == (2, 16, 16, 96)
    torch.testing.assert_close(prompt, enc.sam_adapter.up(enc.sam_adapter.tune[3](task)) * 2.0)
    # the high-pass removes the constant (and every low-frequency) part: a flat image has no high frequencies
    assert high_frequency(torch.full((1, 3, 64, 64), 7.0)).abs().max() < 1e-5
    stripes = torch.zeros(1, 1, 64, 64)
    stripes[..., ::2] = 1.0  # the highest frequency there is survives, minus its mean (the DC term)
    torch.testing.assert_close(high_frequency(stripes), torch.full_like(stripes, 0.5))


def test_medsa_shapes_adapters_where_the_paper_puts_them():
    model, _ = load_sam("vit_tiny", img_size=256)
    apply_method(model, MethodConfig(method="medsa", adapter_dim=8, adapter_scale=0.25))
    blocks = model.image_encoder.blocks
    layers = model.mask_decoder.transformer.layers
    assert all(isinstance(b, MedSABlock) for b in blocks) and all(isinstance(lay, MedSADecoderBlock) for lay in layers)
    b = blocks[0]
    assert b.medsa_attn.skip and not b.medsa_mlp.skip and b.medsa_scale == 0.25
    assert b.medsa_attn.down.weight.shape == (8, 96) and b.medsa_mlp.up.weight.shape == (96, 8)
    lay = layers[0]
    h = hidden_dims(96, 64, 8)[1]
    assert h == 5 and lay.medsa_hyper.hyper.weight.shape == (h * h, 64) and lay.medsa_keys.skip
    assert lay.medsa_output_tokens == 5  # iou token + 4 mask tokens; the rest is the prompt
    # HyP-Adpt really depends on the prompt: two prompts, same tokens, different outputs
    with torch.no_grad():
        lay.medsa_hyper.up.weight.normal_()
    x = torch.randn(1, 7, 64).expand(2, -1, -1)
    out = lay.medsa_hyper(x, torch.randn(2, 64))
    assert out.shape == (2, 7, 64) and not torch.allclose(out[0], out[1])
    assert not has_fast_path(model)


def test_medsa_inference_goes_through_its_decoder_adapters(tiny_official_ckpt):
    """The decoder fast path skips adapted blocks' code, so Med-SA models are decoded on the reference path."""
    model, _ = load_sam("vit_tiny", tiny_official_ckpt, img_size=256)
    apply_method(model, MethodConfig(method="medsa"))
    _perturb(model, 1)
    model.eval()
    x = torch.randint(0, 255, (2, 256, 256, 3), dtype=torch.uint8)
    pts = torch.rand(5, 2) * 256
    idx = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        emb = encode(model, x)
        got = decode_points(model, prepare(model, emb), pts, idx, multimask=True)
        want = decode(model, emb, pts[:, None], torch.ones(5, 1, dtype=torch.long), idx, multimask=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_slice_dora_is_dora_as_peft_computes_it():
    """DoRA on the q rows of the fused qkv = peft's DoRA on a separate q Linear, forward and merged weight."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    fused = torch.nn.Linear(16, 48)
    lora = QKVLoRA(fused, ["q"], rank=3, scale=2.0 / math.sqrt(3), dora=True)
    with torch.no_grad():
        lora.lora_B["q"].normal_()
        lora.lora_magnitude["q"].mul_(torch.rand(16) + 0.5)
    holder = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with torch.no_grad():
        holder[0].weight.copy_(fused.weight[:16])
        holder[0].bias.copy_(fused.bias[:16])
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=2, use_dora=True, use_rslora=True, target_modules=["0"]), holder)
    layer = holder[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora.lora_A["q"])
        layer.lora_B["default"].weight.copy_(lora.lora_B["q"])
        layer.lora_magnitude_vector["default"].weight.copy_(lora.lora_magnitude["q"])
    x = torch.randn(5, 16)
    with torch.no_grad():
        ours = lora(x)
        torch.testing.assert_close(ours[:, :16], layer(x))
        torch.testing.assert_close(ours[:, 16:], torch.nn.functional.linear(x, fused.weight[16:], fused.bias[16:]))
        torch.testing.assert_close(lora.merged()(x), ours, atol=1e-5, rtol=1e-5)
    assert MethodConfig(rank=3, alpha=2, rslora=True).scale == pytest.approx(2 / math.sqrt(3))
    assert MethodConfig(rank=16, rslora=True).scale == pytest.approx(4.0)


def test_dora_merge_export_equals_the_adapted_model(tmp_path):
    model, _ = load_sam("vit_tiny", img_size=256)
    apply_method(model, MethodConfig(targets=["q", "v", "proj"], dora=True, rslora=True))
    _perturb(model, 2)
    x = torch.randint(0, 255, (1, 256, 256, 3), dtype=torch.uint8)
    with torch.no_grad():
        want = encode(model.eval(), x)
    out = export_merged(model, tmp_path / "merged.pth")
    merged, _ = load_sam("vit_tiny", out, img_size=256)
    with torch.no_grad():
        torch.testing.assert_close(encode(merged, x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["adapter", "medsa"])
def test_adapter_methods_are_not_merged(method, tmp_path, tiny_official_ckpt, capsys):
    from nucseg_cli.main import main

    model, fp = load_sam("vit_tiny", tiny_official_ckpt, img_size=256)
    cfg = MethodConfig(method=method)
    apply_method(model, cfg)
    path = save_adapter(tmp_path / "ad", model, cfg,
                        {"base": {"model": "vit_tiny", "fingerprint": fp}, "input_size": 256})
    with pytest.raises(CheckpointError, match="cannot be folded into SAM's weights"):
        export_merged(model, tmp_path / "m.pth")
    rc = main(["merge", "--adapter", str(path), "--checkpoint", str(tiny_official_ckpt), "-o", str(tmp_path / "m.pth")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == CheckpointError.exit_code and len(err) == 1 and "cannot be folded" in err[0]
    rc = main(["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "run"), "--method", method,
               "--merge", str(tmp_path / "m2.pth")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == InputError.exit_code and "cannot be folded" in err[0]
    assert not (tmp_path / "m.pth").exists() and not (tmp_path / "m2.pth").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs,needle", [
    ({"method": "decoder", "dora": True}, "do not apply"),
    ({"method": "adapter", "rslora": True}, "do not apply"),
    ({"adapter_dim": 8}, "apply to --method adapter or medsa"),
    ({"method": "medsa", "adapter_dim": 0}, "adapter dim"),
    ({"method": "medsa", "adapter_dim": 10**9}, "adapter dim"),
    ({"method": "medsa", "adapter_dim": True}, "adapter dim"),
    ({"method": "adapter", "adapter_scale": float("nan")}, "adapter scale"),
    ({"method": "adapter", "adapter_scale": 0}, "adapter scale"),
    ({"method": "adapter", "adapter_scale": "1"}, "adapter scale"),
    ({"dora": "yes"}, "true or false"),
])
def test_bad_new_settings_are_refused(kwargs, needle):
    with pytest.raises(InputError, match=needle):
        MethodConfig(**kwargs).validate()


def test_a_tampered_adapter_width_is_refused_before_anything_is_built(tmp_path, tiny_official_ckpt):
    model, fp = load_sam("vit_tiny", tiny_official_ckpt, img_size=256)
    cfg = MethodConfig(method="medsa", adapter_dim=4)
    apply_method(model, cfg)
    path = save_adapter(tmp_path / "ad", model, cfg, {"base": {"model": "vit_tiny", "fingerprint": fp}, "input_size": 256})
    meta = json.loads((path / "nucseg.json").read_text())
    meta["method"]["adapter_dim"] = 10**9
    (path / "nucseg.json").write_text(json.dumps(meta))
    (path / "method.json").unlink()
    with pytest.raises(CheckpointError, match="adapter dim"):
        read_adapter(path)


def test_old_method_files_still_load():
    """method.json written before issue 16 has none of the new keys: the defaults are the old behaviour."""
    old = {"method": "lora", "rank": 4, "alpha": None, "targets": ["q", "v"], "dropout": 0.0, "train_decoder": True,
           "train_prompt_encoder": False}
    cfg = MethodConfig.from_dict(old)
    assert not cfg.dora and not cfg.rslora and cfg.adapter_dim is None and cfg.scale == 1.0


@pytest.mark.parametrize("flags", [["--method", "adapter", "--adapter-dim", "4"],
                                   ["--method", "medsa", "--adapter-scale", "0.25", "--freeze-decoder"],
                                   ["--dora", "--rslora", "--targets", "q,v,proj"]],
                         ids=["adapter", "medsa", "dora-rslora"])
def test_each_method_trains_saves_reloads_and_segments_through_the_cli(flags, tmp_path, tiny_official_ckpt, capsys):
    from nucseg.learn.demo import make_demo_dataset
    from nucseg.io import read_label_map
    from nucseg_cli.main import main

    data = make_demo_dataset(tmp_path / "demo", organs=("organ",), tiles_per_organ=2, size=128, seed=2)
    run = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--out", str(run), "--model", "vit_tiny", "--checkpoint",
               str(tiny_official_ckpt), "--epochs", "1", "--batch-size", "2", "--json", "-q", *flags])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads(out)
    info = read_adapter(run / "adapter")
    assert info.meta["parameters"]["trainable"] == summary["trainable"] > 0
    assert info.method.to_dict() == info.meta["method"]
    image = next((data / "organ" / "tissue images").iterdir())
    rc = main(["segment", str(image), "-o", str(tmp_path / "labels"), "--adapter", str(run / "adapter"),
               "--checkpoint", str(tiny_official_ckpt), "--points-per-side", "4", "-q"])
    assert rc == 0
    labels = read_label_map(tmp_path / "labels" / f"{image.stem}.tif")
    assert labels.shape == (128, 128)
