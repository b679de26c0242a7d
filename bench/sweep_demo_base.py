"""Screen one demo-base recipe: build it (CPU and wall seconds, train IoU per epoch), then run a reduced demo
cross-validation on it (16 demo tiles per organ, 2 folds, QUICK's LoRA fine-tune, calibration and zero-shot row).

Used to choose nucseg.learn.demo.BASE (docs/BENCHMARKS.md, "Demo recipe"); one run per recipe, e.g.

    .venv/bin/python bench/sweep_demo_base.py pe0.5 --epochs 15 --lr 4e-3 --pe 0.5
    .venv/bin/python bench/sweep_demo_base.py first --ckpt adapters/demo-base/sam_vit_tiny_demo.safetensors

Work files go to /tmp/nucseg-sweep-base/; one JSON line per run is appended to its results.jsonl.
"""
import os, time, json, argparse, dataclasses
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ap = argparse.ArgumentParser()
ap.add_argument("name")
ap.add_argument("--epochs", type=int, default=15)
ap.add_argument("--tpo", type=int, default=64)
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--warmup", type=float, default=0.05)
ap.add_argument("--box", type=float, default=0.5)
ap.add_argument("--box-first", type=int, default=0, help="epochs with box_fraction 1.0 first")
ap.add_argument("--box-first-frac", type=float, default=1.0)
ap.add_argument("--pos", type=int, default=16)
ap.add_argument("--neg", type=int, default=4)
ap.add_argument("--bs", type=int, default=8)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--dice", type=float, default=0.8)
ap.add_argument("--iouw", type=float, default=1.0)
ap.add_argument("--nobal", action="store_true")
ap.add_argument("--fg", action="store_true")
ap.add_argument("--wd", type=float, default=1e-4)
ap.add_argument("--size", type=int, default=128)
ap.add_argument("--evaltpo", type=int, default=16)
ap.add_argument("--ftepochs", type=int, default=20)
ap.add_argument("--noeval", action="store_true")
ap.add_argument("--ckpt", default=None)
ap.add_argument("--pe", type=float, default=1.0)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--qk", type=float, default=0.0, help="decoder cross-attention: k = q weights, both x this, at init")
ap.add_argument("--onecycle", action="store_true")
a = ap.parse_args()
from nucseg.threads import configure_threads
configure_threads(a.threads)
import torch
from nucseg.learn.data import load_dataset
from nucseg.learn.demo import make_demo_dataset, BASE, BASE_ORGANS, BASE_SEED, BASE_STAIN, QUICK
from nucseg.model.lora import MethodConfig, apply_method
from nucseg.model.adapter import export_merged
from nucseg.learn.train import Trainer, TrainConfig
from nucseg.learn.calibrate import split_for_calibration
W = f"/tmp/nucseg-sweep-base/runs/{a.name}"
os.makedirs(W, exist_ok=True)
d = make_demo_dataset(f"/tmp/nucseg-sweep-base/base{a.tpo}_{a.size}", organs=BASE_ORGANS, tiles_per_organ=a.tpo, size=a.size, seed=BASE_SEED, zoom=2, stain=BASE_STAIN)
tiles = load_dataset(d, tile_size=a.size)
cfg = TrainConfig(epochs=a.epochs, batch_size=a.bs, lr=a.lr, box_fraction=a.box, balance_ce=not a.nobal, positive_prompts=a.pos,
                  negative_prompts=a.neg, calibration_fraction=0.1, seed=a.seed, device="cpu", foreground_head=a.fg,
                  warmup_fraction=a.warmup, dice_weight=a.dice, iou_weight=a.iouw, weight_decay=a.wd)
train, held = split_for_calibration(tiles, 0.1, 0)
c0, w0 = time.process_time(), time.time()
if a.ckpt: a.epochs = 0
model = dataclasses.replace(BASE, seed=a.seed, pe_scale=a.pe).init_model(a.size)  # the recipe's own init
if a.qk:
    t = model.mask_decoder.transformer
    mods = [m for l in t.layers for m in (l.cross_attn_token_to_image, l.cross_attn_image_to_token)] + [t.final_attn_token_to_image]
    with torch.no_grad():
        for m in mods:
            m.q_proj.weight.mul_(a.qk); m.k_proj.weight.copy_(m.q_proj.weight)
torch.manual_seed(a.seed)
apply_method(model, MethodConfig(method="full"))
tr = Trainer(model, train, cfg, W)
if a.box_first:
    tr.cfg.box_fraction = a.box_first_frac
def on_step(e, s, n, loss):
    if s == n - 1:
        tr.cfg.box_fraction = a.box_first_frac if e + 1 < a.box_first else a.box
hist = tr.fit({}, on_step) if not a.ckpt else []
cpu, wall = time.process_time() - c0, time.time() - w0
ious = [round(h.train_iou, 3) for h in hist]
print(f"{a.name}: {len(train)} tiles, {a.epochs * tr.steps_per_epoch} steps, build cpu {cpu:.0f} s wall {wall:.0f} s; IoU {ious}", flush=True)
ckpt = a.ckpt or export_merged(model, f"{W}/base.safetensors")
res = {"name": a.name, "args": vars(a), "steps": a.epochs * tr.steps_per_epoch, "cpu": cpu, "wall": wall, "iou": ious,
       "load": os.getloadavg()}
if not a.noeval:
    from nucseg.learn.cv import run_cv, CVConfig
    r = dataclasses.replace(QUICK, tiles_per_organ=a.evaltpo, epochs=a.ftepochs)
    dd = make_demo_dataset(f"/tmp/nucseg-sweep-base/demo{a.evaltpo}", tiles_per_organ=r.tiles_per_organ, size=r.size, seed=r.seed, zoom=r.zoom, stain=r.stain)
    t1 = time.time()
    s = run_cv(load_dataset(dd, tile_size=r.size), f"{W}/cv", "vit_tiny", ckpt, r.method(), r.train_config(), r.infer(),
               CVConfig(folds=2, seed=r.seed, zero_shot=True, zero_shot_multimask=False), mpp=r.mpp)
    ft, zs = s["fine_tuned"], s["zero_shot"]
    res.update(ft_pq=ft["pq"]["mean"], ft_pq_std=ft["pq"]["std"], ft_f1=ft["f1"]["mean"], zs_pq=zs["pq"]["mean"], zs_f1=zs["f1"]["mean"], eval_wall=time.time() - t1)
    print(f"{a.name}: FT PQ {ft['pq']['mean']:.3f}±{ft['pq']['std']:.3f} F1 {ft['f1']['mean']:.3f} | ZS PQ {zs['pq']['mean']:.3f} F1 {zs['f1']['mean']:.3f} (eval {time.time()-t1:.0f} s)", flush=True)
with open("/tmp/nucseg-sweep-base/results.jsonl", "a") as fh:
    fh.write(json.dumps(res) + "\n")
