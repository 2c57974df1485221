"""dlip's pretraining step, old against new side by side in one run: loss terms, FLOPs (FlopCounterMode) and
CPU time.  Paper preset sizes (DeiT-S-shaped student, 6 x 384 text stack; BLIP-base ITM + caption teachers from
the released configs, common.hf.published_config), random weights, dropout off; one step = student forward +
BLIP losses + frozen teachers + every default distillation term + backward.

    python bench/dlip_step.py --old 021eb53 --reps 7     # 021eb53: before the ITM pass reused the image keys/values
"""
import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
from blip2_stage1 import load  # noqa: E402  (a script as of a git revision, as a module of its own)

ap = argparse.ArgumentParser()
ap.add_argument("--old", required=True)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--tiny", action="store_true")
ap.add_argument("--dropout", type=float, default=0.0)
a = ap.parse_args()
old, new = load(a.old, "dlip"), load(None, "dlip")
from common.hf import published_config  # noqa: E402
special = dict(enc_id=30523, dec_id=30522, sep_id=102, pad_id=0, cls_id=101, vocab_size=30524)
P = dict(new.PRESETS["paper"])
size = {f.name: P.get(f.name, f.default) for f in new.fields(new.Size)}
size.update(dropout=a.dropout, queue_size=57600)
if a.tiny:
    size.update(image_size=64, vit_width=64, vit_layers=2, vit_heads=4, vit_mlp=128, text_width=64, text_layers=2,
                text_heads=4, text_ffn=128, queue_size=64)
B, L, S = a.batch, 30, size["image_size"]


def build(mod, seed=0):
    torch.manual_seed(seed)
    st = mod.BLIP(mod.ModelConfig(**size, **special))
    if a.tiny:
        tc = [mod.ModelConfig(**dict(size, vit_width=96, text_width=96, momentum=False), **special)] * 2
        tc = [mod.replace(tc[0], has_decoder=False), mod.replace(tc[1], has_encoder=False, tie_decoder=False)]
    else:
        tc = [mod.set_image_size(mod.BLIP(mod.blip_config(published_config(n).to_dict(), r, special)), S).c
              for n, r in (("Salesforce/blip-itm-base-coco", True), ("Salesforce/blip-image-captioning-base", False))]
    ret, cap = (mod.BLIP(c).requires_grad_(False).eval() for c in tc)
    return st, ret, cap


models = {"old": build(old), "new": build(new)}
for k in range(3):  # the same weights on both sides
    models["old"][k].load_state_dict(models["new"][k].state_dict())
g = torch.Generator().manual_seed(1)
image = torch.randn(B, 3, S, S, generator=g)
ids = torch.randint(1000, 30000, (B, L), generator=g)
ids[:, 0] = special["cls_id"]
mask = torch.ones(B, L, dtype=torch.long)
mask[:, L - 1 - torch.arange(B) % 10] = 0
idx = torch.arange(B)
w = {k: 1.0 for k in ("itc_kd", "rep_img", "rep_txt", "rep_fus", "rep_dec", "lm_kd", "attn_sa", "attn_ca", "attn_dec")}
w.update(itm_kd=0.0, itc_kd_kind="v2")
states = {k: {n: v.clone() for n, v in m[0].state_dict().items()} for k, m in models.items()}


def step(tag):
    mod, (st, ret, cap) = (old if tag == "old" else new), models[tag]
    st.load_state_dict(states[tag])  # queues and momentum copies back to the start: every step is the same
    st.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout draws on both sides
    s = st(image, ids, mask, need_attn=True)
    terms = mod.blip_losses(st, s, ids, mask, idx, 0.4, torch.Generator().manual_seed(3), 0)
    t = mod.teacher_features(ret, cap, image, ids, mask, s, False, need_attn=True)
    terms.update(mod.distill_losses(s, t, w, 0.4))
    sum(terms.values()).backward()
    return {k: v.item() for k, v in terms.items()}


from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
res = {}
for tag in ("old", "new"):
    with FlopCounterMode(display=False) as fc:
        res[tag] = step(tag)
    res[tag + "_flops"] = fc.get_total_flops()
times = {"old": [], "new": []}
for r in range(a.reps):
    for tag in ("old", "new"):
        t0 = time.process_time()  # CPU time of this process: less sensitive to other jobs than wall time
        step(tag)
        times[tag].append(time.process_time() - t0)
diff = max(abs(res["old"][k] - res["new"][k]) for k in res["old"])
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {B}, {L} tokens, {S} px, "
      f"{'tiny' if a.tiny else 'paper'} sizes")
print("terms:", {k: round(v, 6) for k, v in res["new"].items()})
print(f"max |loss term old - new| = {diff:.2e}")
med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
for tag in ("old", "new"):
    print(f"{tag}: {res[tag + '_flops'] / B / 1e9:.2f} GFLOP/sample, {med[tag]:.3f} CPU s/step (median of {a.reps}: "
          f"{', '.join(f'{x:.2f}' for x in times[tag])})")
print(f"FLOPs old/new {res['old_flops'] / res['new_flops']:.4f}, time old/new {med['old'] / med['new']:.3f}")
