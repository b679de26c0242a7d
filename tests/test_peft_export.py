"""`nucseg export-peft`: plain peft.PeftModel.from_pretrained loads the export onto SAM and gives nucseg's
image embeddings and mask logits; methods PEFT cannot express are refused; every adapter has a model card."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nucseg.model.adapter import load_adapter, save_adapter
from nucseg.errors import InputError, OutputError
from nucseg.model.lora import MethodConfig, apply_method
from nucseg.model.sam import ForegroundHead, attach_foreground_head, build_sam, decode, encode, load_sam
from nucseg_cli.main import main

SIZE = 512


@pytest.fixture(scope="module")
def ckpt512(tmp_path_factory):
    """A vit_tiny base saved at the 512 px geometry, so the peft side needs nothing but build_sam + torch."""
    torch.manual_seed(5)
    model = build_sam("vit_tiny", SIZE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("base") / "sam_vit_tiny_512.pth"
    torch.save(model.state_dict(), path)
    return path


def _make_adapter(path, ckpt, method: MethodConfig, meta_extra=None):
    model, fp = load_sam("vit_tiny", ckpt, img_size=SIZE)
    apply_method(model, method)
    attach_foreground_head(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: perturb everything trainable so the adapter matters
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    meta = {"base": {"model": "vit_tiny", "fingerprint": fp, "init_seed": 0, "checkpoint_sha256": fp,
                     "checkpoint_name": ckpt.name},
            "input_size": SIZE, "mpp": 0.5, "parameters": {"trainable": 1, "total": 2},
            "data": {"tiles": 3, "images": 3, "nuclei": 40, "organs": ["x"], "tile_size": SIZE}, **(meta_extra or {})}
    return save_adapter(path, model, method, meta)


def _inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (1, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)
    pts = torch.rand(6, 1, 2, generator=g) * SIZE
    return x, pts, torch.ones(6, 1, dtype=torch.long)


def _peft_outputs(ckpt, export_dir, x, pts, labels):
    """PEFT only: segment-anything's model from build_sam, official-key weights via torch, the export via peft."""
    from peft import PeftModel

    sam = build_sam("vit_tiny", SIZE)
    sam.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    model = PeftModel.from_pretrained(sam, str(export_dir)).eval()
    s = model.base_model.model
    with torch.no_grad():
        emb = s.image_encoder(s.preprocess(x.permute(0, 3, 1, 2).float()))
        sparse, dense = s.prompt_encoder(points=(pts, labels), boxes=None, masks=None)
        logits, iou = s.mask_decoder(image_embeddings=emb, image_pe=s.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=True)
    return model, emb, logits, iou


@pytest.mark.parametrize("method", [
    MethodConfig(rank=4),  # SAMed: q, v
    MethodConfig(rank=2, alpha=3.0, targets=["q", "k", "v"]),
    MethodConfig(rank=3, alpha=5.0, targets=["q", "v", "proj"]),  # slices + a peft module: per-module rank
    MethodConfig(rank=2, targets=["qkv", "mlp"]),
    MethodConfig(method="decoder"),
    MethodConfig(rank=2, targets=["v"], train_prompt_encoder=True),
], ids=["qv", "qkv-slices-alpha", "qv-proj", "peft-targets", "decoder", "v-prompt-encoder"])
def test_peft_loads_the_export_and_matches_nucseg(tmp_path, ckpt512, method):
    adapter = _make_adapter(tmp_path / "ad", ckpt512, method)
    out = tmp_path / "peft"
    extra = ["--checkpoint", str(ckpt512)] if method.train_prompt_encoder else []
    assert main(["-q", "export-peft", str(adapter), str(out), *extra]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "nucseg_fg_head.safetensors",
            "README.md"} <= {p.name for p in out.iterdir()}
    x, pts, labels = _inputs()
    peft_model, emb, logits, iou = _peft_outputs(ckpt512, out, x, pts, labels)

    ours, _ = load_adapter(adapter, ckpt512)
    with torch.no_grad():
        emb_n = encode(ours, x)
        logits_n, iou_n = decode(ours, emb_n, pts, labels, torch.zeros(6, dtype=torch.long), multimask=True)
        base, _ = load_sam("vit_tiny", ckpt512, img_size=SIZE)
        emb_base = encode(base, x)
    torch.testing.assert_close(emb, emb_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, logits_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou, iou_n, atol=1e-5, rtol=1e-5)
    if method.method == "lora":  # not vacuous: the adapter changes the encoder
        assert (emb_base - emb_n).abs().max() > 1e-3
        scales = {m.scaling["default"] for m in peft_model.modules() if hasattr(m, "scaling") and m.scaling}
        assert scales == {method.scale}  # PEFT's alpha / r is nucseg's scale, to the last bit

    # the foreground head in its side file, with plain torch
    head = ForegroundHead(emb.shape[1])
    head.load_state_dict(load_file(str(out / "nucseg_fg_head.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(head(emb), ours.fg_head(emb_n), atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "library_name: peft" in card


def test_export_config_is_samed_as_rank_2r_on_qkv(tmp_path, ckpt512):
    adapter = _make_adapter(tmp_path / "ad", ckpt512, MethodConfig(rank=4))
    out = tmp_path / "peft"
    assert main(["-q", "export-peft", str(adapter), str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4  # the user's rank
    assert cfg["rank_pattern"] == {"attn.qkv": 8} and cfg["alpha_pattern"] == {"attn.qkv": 8}  # q + v fused
    assert cfg["modules_to_save"] == ["mask_decoder"]
    t = load_file(str(out / "adapter_model.safetensors"))
    b = t["base_model.model.image_encoder.blocks.0.attn.qkv.lora_B.weight"]
    dim = b.shape[0] // 3
    assert b.shape == (3 * dim, 8) and torch.count_nonzero(b[dim : 2 * dim]) == 0  # k rows stay zero
    assert torch.count_nonzero(b[:dim, 4:]) == 0 and torch.count_nonzero(b[2 * dim :, :4]) == 0
    prov = json.loads((out / "nucseg_export.json").read_text())
    assert prov["source_weights_sha256"] == prov["nucseg"]["weights_sha256"]


def test_full_fine_tune_and_foreign_folders_are_refused(tmp_path, ckpt512, capsys):
    from nucseg.model.peft_export import export_peft

    full = _make_adapter(tmp_path / "full", ckpt512, MethodConfig(method="full"))
    with pytest.raises(InputError, match="full fine-tune"):
        export_peft(full, tmp_path / "x")
    assert main(["export-peft", str(full), str(tmp_path / "x")]) == InputError.exit_code
    assert "nucseg merge" in capsys.readouterr().err and not (tmp_path / "x").exists()
    lora = _make_adapter(tmp_path / "lora", ckpt512, MethodConfig(rank=2))
    other = tmp_path / "someone_elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError):
        export_peft(lora, other)
    assert (other / "notes.txt").read_text() == "keep me"
    export_peft(lora, tmp_path / "p")
    export_peft(lora, tmp_path / "p")  # a previous export is replaced
    pe = _make_adapter(tmp_path / "pe", ckpt512, MethodConfig(rank=2, train_prompt_encoder=True))
    with pytest.raises(InputError, match="--checkpoint"):  # its buffers come from the base
        export_peft(pe, tmp_path / "pe_peft")


def test_every_adapter_has_a_model_card(tmp_path, ckpt512):
    meta = {"metrics": {"dice": 0.81, "aji": 0.6, "pq": 0.55},
            "cv": {"fold": 2, "folds": 5, "seed": 0, "group_by": "image"}}
    adapter = _make_adapter(tmp_path / "ad", ckpt512, MethodConfig(rank=4), meta)
    card = (adapter / "README.md").read_text()
    info = json.loads((adapter / "nucseg.json").read_text())
    for fact in (info["base"]["checkpoint_sha256"], info["weights_sha256"], "LoRA rank 4", "q, v",
                 "1 / 2", "0.5 µm/px", "fold 2 of a 5-fold", "0.81", info["nucseg_version"], "load_adapter",
                 "nucseg export-peft", "PeftModel.from_pretrained", "40 nuclei"):
        assert fact in card, fact


@pytest.mark.parametrize("method", [dict(method="adapter"), dict(method="medsa"), dict(method="lora", dora=True)])
def test_methods_without_a_peft_form_are_refused(method, tmp_path):
    from nucseg.model.adapter import AdapterInfo
    from nucseg.errors import InputError
    from nucseg.model.lora import MethodConfig
    from nucseg.model.peft_export import to_peft

    info = AdapterInfo(tmp_path, {"base": {"model": "vit_tiny"}, "input_size": 64}, MethodConfig(**method).validate())
    with pytest.raises(InputError, match="load it with nucseg"):
        to_peft(info, {})
