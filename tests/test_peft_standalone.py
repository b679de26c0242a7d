"""The PEFT export stands alone: the Python on each export's model card, run in a subprocess where
``import nucseg`` is impossible, loads the export onto segment-anything's ``Sam`` or transformers' ``SamModel``
(a tiny one built offline, no Hub) and gives nucseg's embeddings, mask logits and IoU to 1e-5."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from nucseg.model.adapter import load_adapter, save_adapter
from nucseg.model.lora import MethodConfig, apply_method
from nucseg.model.modelcard import PeftCard, render_model_card
from nucseg.model.peft_export import ExportOptions, export_peft
from nucseg.model.sam import attach_foreground_head, build_sam, decode, encode, load_sam
from nucseg.model.weights import REGISTRY
from model_helpers import tiny_trained_lora

pytestmark = pytest.mark.slow  # `make test-fast` skips it (the full suite and CI run it)

SIZE = 256  # the adapter's input size; the base checkpoint is at SAM's 1024 px, as official ones are
N = 5

# No nucseg in the child: a meta-path finder refuses it (an installed copy would otherwise be found).
BLOCKER = """
import sys
class _NoNucseg:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nucseg", "nucseg_cli"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the card must not need nucseg)")
sys.meta_path.insert(0, _NoNucseg())
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A vit_tiny checkpoint at 1024 px with non-trivial position tables, and an adapter trained at SIZE."""
    torch.manual_seed(7)
    sam = build_sam("vit_tiny", 1024)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.05)
    root = tmp_path_factory.mktemp("standalone")
    ckpt = root / "sam_vit_tiny_1024.pth"
    torch.save(sam.state_dict(), ckpt)
    model, fp = load_sam("vit_tiny", ckpt, img_size=SIZE)
    method = MethodConfig(rank=3, alpha=5.0, targets=["q", "v"])
    apply_method(model, method)
    attach_foreground_head(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: perturb everything trainable so the adapter matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    meta = {"base": {"model": "vit_tiny", "fingerprint": fp, "init_seed": 0, "checkpoint_sha256": fp,
                     "checkpoint_name": ckpt.name}, "input_size": SIZE, "mpp": 0.5}
    adapter = save_adapter(root / "adapter", model, method, meta)
    return root, ckpt, sam, adapter


def _inputs(path):
    g = torch.Generator().manual_seed(2)
    inputs = {"x": torch.randint(0, 256, (1, SIZE, SIZE, 3), dtype=torch.uint8, generator=g),
              "pts": torch.rand(N, 1, 2, generator=g) * SIZE, "lab": torch.ones(N, 1, dtype=torch.long)}
    torch.save(inputs, path)
    return inputs


def _nucseg_outputs(adapter, ckpt, inputs, dtype):
    ours, _ = load_adapter(adapter, ckpt)
    # segment-anything's prompt encoder works in float32 only (it casts); decode() casts its outputs
    ours.image_encoder.to(dtype), ours.mask_decoder.to(dtype)
    ours.pixel_mean, ours.pixel_std = ours.pixel_mean.to(dtype), ours.pixel_std.to(dtype)
    with torch.no_grad():
        emb = encode(ours, inputs["x"])
        logits, iou = decode(ours, emb, inputs["pts"], inputs["lab"], torch.zeros(N, dtype=torch.long),
                             multimask=True)
    return emb, logits, iou


def _card_code(folder, **values) -> str:
    """The card's Python block, with its documented inputs (ADAPTER, CHECKPOINT or BASE) set."""
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    for name, value in values.items():
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {json.dumps(str(value))}", code, count=1, flags=re.M)
        assert n == 1, name
    return code


def _run(codes: list[str], tmp_path) -> None:
    """Run each code in its own namespace, all in one fresh interpreter (one start-up: peft imports
    transformers, seconds of CPU) where nucseg cannot be imported."""
    script = tmp_path / "cards.py"
    script.write_text(BLOCKER + f"for code in {codes!r}:\n    exec(code, {{'__name__': '__main__'}})\n"
                      "assert not any(m.split('.')[0] == 'nucseg' for m in sys.modules)\n")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # -I: no PYTHONPATH, no user site, not the test's folder; the venv's packages only
    proc = subprocess.run([sys.executable, "-I", str(script)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


SAM_HARNESS = """
inp = torch.load(INPUTS)
with torch.no_grad():
    emb = sam.image_encoder(sam.preprocess(inp["x"].permute(0, 3, 1, 2).float()))
    sparse, dense = sam.prompt_encoder(points=(inp["pts"], inp["lab"]), boxes=None, masks=None)
    logits, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
torch.save({"emb": emb, "logits": logits, "iou": iou}, RESULT)
"""
HF_HARNESS = """
inp = torch.load(INPUTS)
model = model.double()
pixel_values = (inp["x"].permute(0, 3, 1, 2).double() - mean.double()) / std.double()
with torch.no_grad():
    emb = model.base_model.model.get_image_embeddings(pixel_values)
    o = model(pixel_values=pixel_values, input_points=inp["pts"][None].double(), input_labels=inp["lab"][None],
              multimask_output=True)
torch.save({"emb": emb, "logits": o.pred_masks[0], "iou": o.iou_scores[0]}, RESULT)
"""


@pytest.fixture(scope="module")
def cards(base, tmp_path_factory):
    """Both flavours exported; each card's code run (plus a harness on fixed inputs) without nucseg."""
    from nucseg.model.hf_sam import save_transformers_base

    root, ckpt, sam1024, adapter = base
    tmp = tmp_path_factory.mktemp("cards")
    sam_dir, hf_dir = tmp / "peft", tmp / "peft_hf"
    export_peft(adapter, sam_dir, options=ExportOptions(license="cc-by-4.0", datasets=("NuInsSeg",)))
    hf_base = save_transformers_base(sam1024, "vit_tiny", tmp / "hf_base")
    export_peft(adapter, hf_dir, options=ExportOptions(flavour="transformers", base_model=str(hf_base)))
    inputs = _inputs(tmp / "inputs.pt")
    io = lambda name: f"INPUTS, RESULT = {str(tmp / 'inputs.pt')!r}, {str(tmp / name)!r}\n"
    _run([_card_code(sam_dir, ADAPTER=sam_dir, CHECKPOINT=ckpt) + io("sam.pt") + SAM_HARNESS,
          _card_code(hf_dir, ADAPTER=hf_dir, BASE=hf_base) + io("hf.pt") + HF_HARNESS], tmp)
    return {"sam": sam_dir, "hf": hf_dir, "hf_base": hf_base, "inputs": inputs,
            "sam_out": torch.load(tmp / "sam.pt"), "hf_out": torch.load(tmp / "hf.pt")}


def test_blocker_really_blocks(tmp_path):
    with pytest.raises(AssertionError, match="blocked"):
        _run(["import nucseg\n"], tmp_path)


def test_sam_card_runs_without_nucseg(base, cards):
    root, ckpt, _, adapter = base
    cfg = json.loads((cards["sam"] / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["rank_pattern"] == {"attn.qkv": 6}  # reads as the user's rank; qkv fused: q + v
    assert cfg["base_model_name_or_path"] == ckpt.name and cfg["task_type"] is None
    card = (cards["sam"] / "README.md").read_text()
    assert 'license: "cc-by-4.0"' in card and 'datasets: ["NuInsSeg"]' in card and "Apache-2.0" in card
    got = cards["sam_out"]
    emb, logits, iou = _nucseg_outputs(adapter, ckpt, cards["inputs"], torch.float32)
    torch.testing.assert_close(got["emb"], emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["iou"], iou, atol=1e-5, rtol=1e-5)
    base_emb = encode(load_sam("vit_tiny", ckpt, img_size=SIZE)[0], cards["inputs"]["x"])
    assert (base_emb - emb).abs().max() > 1e-3  # not vacuous: the adapter changes the encoder


def test_transformers_card_runs_without_nucseg(base, cards):
    """A tiny transformers SamModel of the same base, built offline; compared in float64 so that the two
    libraries' float32 rounding cannot hide or fake a mapping error."""
    root, ckpt, _, adapter = base
    cfg = json.loads((cards["hf"] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(cards["hf_base"]) and cfg["task_type"] is None
    assert cfg["auto_mapping"]["base_model_class"] == "SamModel" and "vision_encoder" in cfg["target_modules"]
    from peft import AutoPeftModel

    auto = AutoPeftModel.from_pretrained(str(cards["hf"]))  # builds the base from base_model_name_or_path
    assert type(auto.base_model.model).__name__ == "SamModel"
    got = cards["hf_out"]
    emb, logits, iou = _nucseg_outputs(adapter, ckpt, cards["inputs"], torch.float64)
    torch.testing.assert_close(got["emb"], emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["iou"], iou, atol=1e-5, rtol=1e-5)


def test_official_bases_name_the_hub_checkpoint():
    """Cards of adapters on an official checkpoint build it the usual way; the code is valid Python."""
    meta = {"base": {"model": "vit_b", "checkpoint_sha256": REGISTRY["vit_b"].sha256,
                     "checkpoint_name": "renamed.pth"}, "input_size": 512,
            "method": {"method": "lora", "rank": 4, "targets": ["q", "v"]}}
    for flavour, line in (("sam", 'sam_model_registry["vit_b"](checkpoint=CHECKPOINT)'),
                          ("transformers", 'BASE = "facebook/sam-vit-base"')):
        card = PeftCard.for_adapter(meta, ExportOptions(flavour=flavour))
        text = render_model_card(meta, card)
        assert 'base_model: "facebook/sam-vit-base"' in text and line in text and "rank 8 = 4 per slice" in text
        compile(re.search(r"```python\n(.*?)```", text, re.S).group(1), "card", "exec")
    assert card.base_model_name_or_path == "facebook/sam-vit-base"


def test_cli_options_reach_the_card(tmp_path, base, capsys):
    from nucseg_cli.main import main

    adapter = base[3]
    assert main(["-q", "export-peft", str(adapter), str(tmp_path / "x"), "--flavour", "transformers"]) == 2
    assert "--base-model" in capsys.readouterr().err and not (tmp_path / "x").exists()  # no Hub model of it
    out = tmp_path / "hf"
    assert main(["-q", "export-peft", str(adapter), str(out), "--flavour", "transformers", "--base-model",
                 "me/sam-vit-tiny", "--license", "cc-by-nc-4.0", "--dataset", "NuInsSeg", "--dataset", "mine"]) == 0
    card = (out / "README.md").read_text()
    for line in ('base_model: "me/sam-vit-tiny"', 'license: "cc-by-nc-4.0"', 'datasets: ["NuInsSeg", "mine"]',
                 'BASE = "me/sam-vit-tiny"'):
        assert line in card, line
    assert json.loads((out / "nucseg_export.json").read_text())["flavour"] == "transformers"


@pytest.mark.parametrize("method", [
    MethodConfig(rank=2, targets=["qkv", "mlp"]),
    MethodConfig(rank=2, alpha=3.0, targets=["v", "proj"], train_prompt_encoder=True),
    MethodConfig(method="decoder"),
], ids=["peft-targets", "v-proj-prompt-encoder", "decoder"])
def test_transformers_flavour_of_every_peft_method(tmp_path, base, method):
    """In process: the SamModel export of other methods (whole-module targets with rank_pattern, a trained
    prompt encoder as modules_to_save, decoder only) gives nucseg's outputs, in float64."""
    from peft import PeftModel

    from nucseg.model.hf_sam import to_transformers

    root, ckpt, _, _ = base
    model, fp = tiny_trained_lora(ckpt, method, SIZE)
    meta = {"base": {"model": "vit_tiny", "fingerprint": fp, "init_seed": 0, "checkpoint_sha256": fp,
                     "checkpoint_name": ckpt.name}, "input_size": SIZE}
    adapter = save_adapter(tmp_path / "ad", model, method, meta)
    out = tmp_path / "hf"
    export_peft(adapter, out, ckpt, ExportOptions(flavour="transformers", base_model="local/tiny"))
    hf = PeftModel.from_pretrained(to_transformers(load_sam("vit_tiny", ckpt, img_size=SIZE)[0], "vit_tiny"),
                                   str(out)).eval().double()
    inputs = _inputs(tmp_path / "inputs.pt")
    mean = torch.tensor([123.675, 116.28, 103.53], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        o = hf(pixel_values=(inputs["x"].permute(0, 3, 1, 2).double() - mean) / std,
               input_points=inputs["pts"][None].double(), input_labels=inputs["lab"][None], multimask_output=True)
    _, logits, iou = _nucseg_outputs(adapter, ckpt, inputs, torch.float64)
    torch.testing.assert_close(o.pred_masks[0], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.iou_scores[0], iou, atol=1e-5, rtol=1e-5)


def test_vit_b_config_is_transformers_default_sam():
    """transformers' SamConfig defaults are facebook/sam-vit-base's widths: ours for vit_b equal them (only the
    decoder LayerNorm eps is segment-anything's), so the key mapping tested on vit_tiny meets the Hub's layout."""
    from transformers import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    from nucseg.model.hf_sam import DECODER_LN_EPS, transformers_config

    ours = transformers_config("vit_b", 1024)
    for got, default in ((ours.vision_config, SamVisionConfig()), (ours.prompt_encoder_config, SamPromptEncoderConfig()),
                         (ours.mask_decoder_config, SamMaskDecoderConfig(layer_norm_eps=DECODER_LN_EPS))):
        a, b = got.to_dict(), default.to_dict()
        diff = {k for k in a.keys() | b.keys() if k not in ("global_attn_indexes", "transformers_version")
                and a.get(k) != b.get(k)}
        assert not diff, (type(default).__name__, {k: (a.get(k), b.get(k)) for k in diff})
        if "global_attn_indexes" in b:
            assert list(a["global_attn_indexes"]) == list(b["global_attn_indexes"])
