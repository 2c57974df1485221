"""NegCLIP's training step, old collate (texts padded to 77 tokens) against new (padded to the longest caption),
side by side in one run: the same random CLIP ViT-B/32 (the released architecture, common.hf.published_config),
the same rows of toy captions with word-reversed hard negatives, loss and gradients compared, FLOPs (FlopCounterMode) and
wall time per step on the CPU (median of interleaved reps).

    python bench/negclip_padding.py --old fa7c09f --rows 8     # fa7c09f: the last commit padding to 77
"""
import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
from blip2_stage1 import load  # noqa: E402  (old module from git, new from the tree)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--toy_root", default=os.environ.get("TOY_TINY_ROOT", "data/toy"))
    args = ap.parse_args()
    from transformers import AutoTokenizer, CLIPModel
    from common.hf import published_config
    from common.train import count_flops
    old, new = load(args.old, "negclip"), load(None, "negclip")
    torch.manual_seed(0)
    hf = CLIPModel(published_config("openai/clip-vit-base-patch32"))
    model = new.DualEncoder(hf.vision_model, hf.text_model, hf.visual_projection, hf.text_projection,
                            hf.logit_scale.item(), "clip", image=(224, (0.5,) * 3, (0.5,) * 3))
    tok = AutoTokenizer.from_pretrained(os.path.join(args.toy_root, "models", "clip"))
    from common.data import read_pairs
    caps = [r["captions"] for r in read_pairs(os.path.join(args.toy_root, "pairs_train.jsonl"))[:2 * args.rows]]
    g = torch.Generator().manual_seed(1)
    items = [dict(x=torch.randn(3, 224, 224, generator=g), x2=torch.randn(3, 224, 224, generator=g),
                  t=caps[i][0], t2=caps[args.rows + i][0], n=" ".join(reversed(caps[i][0].split())),
                  n2=" ".join(reversed(caps[args.rows + i][0].split())), img_id=i, img_id2=args.rows + i,
                  hard=True, step=0, tried=set(), bad=set()) for i in range(args.rows)]
    cfg = SimpleNamespace(lock_vision=False, lock_text=False, mask_duplicates=True)
    dev, out = torch.device("cpu"), {}

    def step(batch):
        model.zero_grad(set_to_none=True)
        loss, _ = new.forward_loss(model, model, batch, cfg, dev, torch.float32)
        loss.backward()
        return loss.item()

    batches = {"old": old.collate(items, tok, 77), "new": new.collate(items, tok, 77)}
    for name, b in batches.items():
        flops = count_flops(lambda: step(b))
        loss = step(b)
        out[name] = {"loss": loss, "flops": flops / args.rows, "L": b["ids"].shape[1], "sec": [],
                     "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}}
    for _ in range(args.reps):
        for name, b in batches.items():
            t = time.perf_counter()
            step(b)
            out[name]["sec"].append(time.perf_counter() - t)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    o, n = out["old"], out["new"]
    gdiff = max((o["grads"][k] - n["grads"][k]).abs().max().item() for k in o["grads"])
    print(f"{args.rows} rows (2 images, 4 captions each), CLIP ViT-B/32 random weights, torch threads "
          f"{torch.get_num_threads()}, old = {args.old}")
    print("| collate | text tokens | loss | GFLOP / row | s / step |\n|---|---|---|---|---|")
    for name in ("old", "new"):
        r = out[name]
        print(f"| {name} | {r['L']} | {r['loss']:.6f} | {r['flops'] / 1e9:.1f} | {med(r['sec']):.3f} |")
    print(f"FLOP ratio {o['flops'] / n['flops']:.2f}; time ratio {med(o['sec']) / med(n['sec']):.2f}; "
          f"|loss diff| {abs(o['loss'] - n['loss']):.1e}; max |grad diff| {gdiff:.1e}")


if __name__ == "__main__":
    main()
