"""Cost of the prompt heads (nucseg/model/heads.py) against the image encoder, per tile, in one process.

CPU, 1 torch thread, seeded random weights (cost does not depend on the values), best of a few calls; head
widths 32 / 64 / 128 at vit_tiny 256 px and vit_b 512 px. Prints JSON (bench/results/heads_cost_cpu.json).

    .venv/bin/python bench/bench_heads_cost.py > bench/results/heads_cost_cpu.json
"""
import json
import time

import torch

torch.set_num_threads(1)
from nucseg.model.sam import build_sam, encode
from nucseg.model.heads import CenterHead, InstanceHead
out = {"command": "bench/bench_heads_cost.py", "machine": "2-core AMD EPYC VM, shared with other jobs",
       "loadavg_start": open("/proc/loadavg").read().split()[:3]}
for name, size in (("vit_tiny", 256), ("vit_b", 512)):
    torch.manual_seed(0)
    m = build_sam(name, img_size=size).eval()
    x = torch.randint(0, 255, (1, size, size, 3), dtype=torch.uint8)
    img = x.permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        emb = encode(m, x)
        def best(fn, n=3):
            ts = []
            for _ in range(n):
                t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
            return min(ts)
        enc = best(lambda: encode(m, x), 2 if name == "vit_b" else 5)
        row = {"encoder_s": round(enc, 4)}
        for hidden in (32, 64, 128):
            c, i = CenterHead(256 if name == "vit_b" else 64, hidden).eval(), InstanceHead(256 if name == "vit_b" else 64, hidden).eval()
            tc, ti = best(lambda: c(emb), 5), best(lambda: i(emb, img), 5)
            row[f"hidden{hidden}"] = {"center_s": round(tc, 5), "instance_s": round(ti, 5),
                                      "center_over_encoder": round(tc / enc, 4), "instance_over_encoder": round(ti / enc, 4),
                                      "params_center": sum(p.numel() for p in c.parameters()),
                                      "params_instance": sum(p.numel() for p in i.parameters())}
        out[f"{name}@{size}"] = row
out["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
print(json.dumps(out, indent=1))
