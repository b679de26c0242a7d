"""LoRA placement, adapter save/load round trip, base protection, merge export."""

from __future__ import annotations

import json

import pytest
import torch

from nucseg.io import sha256_file
from nucseg.model.adapter import export_merged, load_adapter, read_adapter, save_adapter
from nucseg.errors import CheckpointError, InputError
from nucseg.model.lora import MethodConfig, QKVLoRA, apply_method, count_parameters, merge
from nucseg.model.sam import attach_foreground_head, encode, load_sam


def _perturb_trainables(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_qv_lora_touches_only_q_and_v_slices():
    model, _ = load_sam("vit_tiny")
    apply_method(model, MethodConfig(rank=2))
    qkv = model.image_encoder.blocks[0].attn.qkv
    assert isinstance(qkv, QKVLoRA) and set(qkv.lora_A) == {"q", "v"}
    with torch.no_grad():
        qkv.lora_B["q"].fill_(1.0)
        qkv.lora_B["v"].fill_(1.0)
    delta = qkv.delta_weight()
    d = qkv.dim
    assert delta[:d].abs().sum() > 0 and delta[2 * d :].abs().sum() > 0
    assert torch.count_nonzero(delta[d : 2 * d]) == 0  # k untouched
    assert "image_encoder.blocks.0.attn.qkv.weight" in model.state_dict()  # official key kept


@pytest.mark.parametrize("method,targets", [("decoder", ["q", "v"]), ("full", ["q", "v"]),
                                             ("lora", ["qkv", "proj", "mlp"])])
def test_methods_train_what_they_say(method, targets):
    model, _ = load_sam("vit_tiny")
    apply_method(model, MethodConfig(method=method, targets=targets))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("mask_decoder.") for n in names) if method == "decoder" else True
    assert not any(n.startswith("prompt_encoder.") for n in names)
    if method == "full":
        assert any(n.startswith("image_encoder.") and "lora" not in n for n in names)
    if method == "lora":  # peft-wrapped whole modules
        assert any(".attn.proj.lora_A" in n for n in names) and any(".mlp.lin2.lora_B" in n for n in names)
        assert any(".attn.qkv.lora_A" in n for n in names)


def test_bad_method_configs():
    with pytest.raises(InputError):
        MethodConfig(targets=["q", "qkv"]).validate()
    with pytest.raises(InputError):
        MethodConfig(targets=["banana"]).validate()
    with pytest.raises(InputError):
        MethodConfig(method="prefix").validate()


def test_adapter_round_trip_identical_outputs_and_base_untouched(tmp_path, tiny_official_ckpt):
    before = tiny_official_ckpt.read_bytes()
    model, fp = load_sam("vit_tiny", tiny_official_ckpt)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_method(model, MethodConfig(targets=["q", "v", "proj"]))
    attach_foreground_head(model)
    _perturb_trainables(model)
    # the frozen base tensors were not modified by adapting
    for k, v in model.state_dict().items():
        if k in base_state and "mask_decoder" not in k:
            assert torch.equal(v, base_state[k]), k
    meta = {"base": {"model": "vit_tiny", "fingerprint": fp, "init_seed": 0}, "input_size": 512, "mpp": 0.5}
    path = save_adapter(tmp_path / "ad", model, MethodConfig(targets=["q", "v", "proj"]), meta)
    assert tiny_official_ckpt.read_bytes() == before
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 0.5 * tiny_official_ckpt.stat().st_size  # small: never the whole base
    info = read_adapter(path)
    assert info.meta["base"]["fingerprint"] == fp and info.mpp == 0.5 and info.meta["weights_sha256"]
    loaded, _ = load_adapter(path, tiny_official_ckpt)
    x = torch.randint(0, 255, (1, 512, 512, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(encode(loaded, x), encode(model.eval(), x), atol=0, rtol=0)
        torch.testing.assert_close(loaded.fg_head(encode(loaded, x)), model.fg_head(encode(model, x)))


def test_adapter_on_another_base_is_refused(tmp_path, tiny_official_ckpt):
    model, fp = load_sam("vit_tiny", tiny_official_ckpt)
    apply_method(model, MethodConfig())
    path = save_adapter(tmp_path / "ad", model, MethodConfig(),
                        {"base": {"model": "vit_tiny", "fingerprint": fp}, "input_size": 512})
    with pytest.raises(CheckpointError, match="trained on base weights"):
        load_adapter(path)  # random init is another base
    other = tmp_path / "other.pth"
    m2, _ = load_sam("vit_tiny", seed=9)
    torch.save(m2.state_dict(), other)
    with pytest.raises(CheckpointError, match="pass the --checkpoint it was trained with"):
        load_adapter(path, other)
    with pytest.raises(CheckpointError, match="not a nucseg adapter"):
        load_adapter(tmp_path)
    # a corrupted weights file is caught by its recorded hash
    (path / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_adapter(path, tiny_official_ckpt)


def test_merge_export_equals_adapted_model_and_uses_official_keys(tmp_path, tiny_official_ckpt):
    model, fp = load_sam("vit_tiny", tiny_official_ckpt)
    apply_method(model, MethodConfig(targets=["q", "v", "mlp"]))
    _perturb_trainables(model, 1)
    x = torch.randint(0, 255, (1, 512, 512, 3), dtype=torch.uint8)
    with torch.no_grad():
        want = encode(model.eval(), x)
    out = export_merged(model, tmp_path / "merged.pth")
    state = torch.load(out, weights_only=True)
    fresh, _ = load_sam("vit_tiny")
    assert set(state) == set(fresh.state_dict())  # exactly the official key set
    merged, _ = load_sam("vit_tiny", out)
    with torch.no_grad():
        torch.testing.assert_close(encode(merged, x), want, atol=1e-4, rtol=1e-4)
    assert count_parameters(merge(merged))[1] == count_parameters(fresh)[1]
    assert json.loads(json.dumps(MethodConfig().to_dict()))["targets"] == ["q", "v"]
    # the same tensors give the same file (a benchmark records its weights by SHA-256), whatever the file name
    again = export_merged(merged, tmp_path / "again.pth")
    assert sha256_file(again) == sha256_file(out)
