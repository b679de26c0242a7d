"""Check that a PEFT export is exact at SAM's real widths (vit_b by default), without the official weights.

A seeded random base stands in for the checkpoint (no download needed): a LoRA q,v adapter with perturbed
factors is saved, exported with export_peft, loaded with plain peft.PeftModel.from_pretrained, and image
embeddings / mask logits / IoU are compared with nucseg's own encode/decode. Prints max absolute differences.

    python bench/check_peft_export.py OUT_DIR [--model vit_b] [--flavour transformers]

``--flavour transformers`` also exports for transformers' ``SamModel`` (the same random base converted with
nucseg.model.hf_sam.to_transformers) and compares its outputs, in float64 (the float32 rounding of two
implementations is not what is checked).
"""
import argparse
import time
from pathlib import Path

import torch
from peft import PeftModel
from nucseg.model.adapter import load_adapter, save_adapter
from nucseg.model.lora import MethodConfig, apply_method, count_parameters
from nucseg.model.peft_export import export_peft
from nucseg.model.sam import attach_foreground_head, decode, encode, load_sam

ap = argparse.ArgumentParser()
ap.add_argument("out", type=Path)
ap.add_argument("--model", default="vit_b")
ap.add_argument("--flavour", choices=("sam", "transformers"), default="sam")
args = ap.parse_args()
out, name = args.out, args.model
torch.manual_seed(0)
model, fp = load_sam(name, None, img_size=512, seed=3)
apply_method(model, MethodConfig(rank=4))
attach_foreground_head(model)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
tr, tot = count_parameters(model)
meta = {"base": {"model": name, "fingerprint": fp, "init_seed": 3}, "input_size": 512, "mpp": 0.5,
        "parameters": {"trainable": tr, "total": tot}}
ad = save_adapter(out / "ad", model, MethodConfig(rank=4), meta)
t = time.perf_counter(); export_peft(ad, out / "peft"); t_export = time.perf_counter() - t
x = torch.randint(0, 256, (1, 512, 512, 3), dtype=torch.uint8, generator=g)
pts, lab = torch.rand(16, 1, 2, generator=g) * 512, torch.ones(16, 1, dtype=torch.long)
ours, _ = load_adapter(ad, None)
sam, _ = load_sam(name, None, img_size=512, seed=3)
pm = PeftModel.from_pretrained(sam, str(out / "peft")).eval()
s = pm.base_model.model
with torch.no_grad():
    e1 = encode(ours, x); m1, i1 = decode(ours, e1, pts, lab, torch.zeros(16, dtype=torch.long), multimask=True)
    e2 = s.image_encoder(s.preprocess(x.permute(0, 3, 1, 2).float()))
    sp, de = s.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
    m2, i2 = s.mask_decoder(image_embeddings=e2, image_pe=s.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sp,
                            dense_prompt_embeddings=de, multimask_output=True)
print(f"trainable/total {tr:,}/{tot:,}; export {t_export:.1f} s; sizes: adapter.safetensors "
      f"{(ad / 'adapter.safetensors').stat().st_size:,} B, adapter_model.safetensors "
      f"{(out / 'peft' / 'adapter_model.safetensors').stat().st_size:,} B")
print(f"max|diff| embeddings {(e1 - e2).abs().max():.3g} (max|emb| {e1.abs().max():.3g}); "
      f"mask logits {(m1 - m2).abs().max():.3g} (max {m1.abs().max():.3g}); iou {(i1 - i2).abs().max():.3g}")

if args.flavour == "transformers":
    from nucseg.model.hf_sam import to_transformers
    from nucseg.model.peft_export import ExportOptions

    export_peft(ad, out / "peft_hf", options=ExportOptions(flavour="transformers", base_model="local/random-base"))
    hf = PeftModel.from_pretrained(to_transformers(load_sam(name, None, img_size=512, seed=3)[0], name),
                                   str(out / "peft_hf")).eval().double()
    for m in (ours.image_encoder, ours.mask_decoder):
        m.double()
    ours.pixel_mean, ours.pixel_std = ours.pixel_mean.double(), ours.pixel_std.double()
    mean, std = ours.pixel_mean.view(1, 3, 1, 1), ours.pixel_std.view(1, 3, 1, 1)
    with torch.no_grad():
        e1 = encode(ours, x); m1, i1 = decode(ours, e1, pts, lab, torch.zeros(16, dtype=torch.long), multimask=True)
        pv = (x.permute(0, 3, 1, 2).double() - mean) / std
        e3 = hf.base_model.model.get_image_embeddings(pv)
        o = hf(pixel_values=pv, input_points=pts[None].double(), input_labels=lab[None], multimask_output=True)
    print(f"transformers SamModel, float64: max|diff| embeddings {(e1 - e3).abs().max():.3g}; mask logits "
          f"{(m1 - o.pred_masks[0]).abs().max():.3g}; iou {(i1 - o.iou_scores[0]).abs().max():.3g}")
