"""BLIP-2 stage 1, old code against new, side by side in one run: losses, FLOPs and wall time (on
the CPU) of a forward+backward of the stage-1 losses (ITC + ITM + ITG, the frozen ViT excluded: its
features are the input) on the same random weights and inputs.

    python bench/blip2_stage1.py --old 12c4d55                  # paper size: BERT-base Q-Former, 32 queries,
                                                                # 257 x 1408 features, batch 8, 32 text tokens
    python bench/blip2_stage1.py --old 12c4d55 --size tiny      # seconds; what tests/ can afford
    python bench/blip2_stage1.py --old 12c4d55 --size tiny --dropout 0.1 --draws 300   # dropout on

With dropout on the new ITG reuses the query pass's dropout draw for the query rows (as LAVIS does) instead of a
fresh one, so single losses differ; `--draws N` compares the two sides' loss distributions over N dropout draws
(means, standard deviations, the two-sample Kolmogorov-Smirnov statistic and its 5% critical value).

`--old REV`: the git revision whose blip2_pformer.py is the "old" side (12c4d55 = before ITG/ITM reused the query
pass); the "new" side is the working tree.  Time is the median of `--reps` interleaved old/new steps.
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SIZES = {  # (hidden, layers, heads, ffn, vision width, image tokens, queries, vocab, batch, text tokens)
    "paper": (768, 12, 12, 3072, 1408, 257, 32, 30523, 8, 32),
    "tiny": (64, 2, 4, 128, 96, 17, 8, 300, 8, 12),
}


def load(rev, script="blip2_pformer"):
    """The script as of git revision `rev` (None: the working tree) as a module of its own."""
    if rev is None:
        path = os.path.join(REPO, f"{script}.py")
    else:
        path = os.path.join("/tmp", f"{script}_{rev}.py")
        with open(path, "w") as f:
            f.write(subprocess.check_output(["git", "-C", REPO, "show", f"{rev}:{script}.py"], text=True))
    spec = importlib.util.spec_from_file_location(f"{script}_{rev or 'new'}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def setup(bp, size, state=None, dropout=0.0):
    C, n_layers, heads, ffn, W, N, Nq, V, B, L = SIZES[size]
    torch.manual_seed(0)
    qf = bp.QFormer(C, n_layers, heads, ffn, W, Nq, V, 512, dropout=dropout)
    model = bp.Blip2Trainable(qf, W, 0)
    if state is not None:
        model.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000 % V, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    # columns L - 1 - b % (L // 2), b < B, padded in every row: one text length for all (paper size:
    # 24 of 32 tokens, tiny: 6 of 12), not a length per row
    mask[:, L - 1 - torch.arange(B) % (L // 2)] = 0
    batch = {"pixels": torch.randn(B, N, W, generator=g), "ids": ids, "mask": mask,
             "image_ids": torch.arange(B), "dec_id": 1, "pad_id": 0, "noise_seed": 7,
             "noise": [bp.gumbel_noise(7 + k, B, B, 0, "cpu") for k in (0, 1)]}  # (the old side reads the seed)
    frozen = bp.Frozen(torch.float32, vision=torch.nn.Identity())  # the features stand in for the ViT
    return model, batch, frozen


def step(bp, model, batch, frozen):
    model.zero_grad(set_to_none=True)
    losses = bp.stage1_losses(model, batch, frozen)
    sum(losses.values()).backward()
    return {k: v.item() for k, v in losses.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default="12c4d55")
    ap.add_argument("--size", default="paper", choices=sorted(SIZES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--draws", type=int, default=0)
    args = ap.parse_args()
    from torch.utils.flop_counter import FlopCounterMode
    sides = {"old": load(args.old), "new": load(None)}
    runs = {}
    state = None
    for name, bp in sides.items():
        model, batch, frozen = setup(bp, args.size, state, args.dropout)
        state = model.state_dict()  # the new side gets the old side's weights
        runs[name] = (bp, model, batch, frozen)
    if args.draws:
        return compare_distributions(runs, args.draws)
    out = {}
    for name, (bp, model, batch, frozen) in runs.items():
        counter = FlopCounterMode(display=False)
        with counter:
            losses = step(bp, model, batch, frozen)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        out[name] = {"losses": losses, "flops": counter.get_total_flops() / batch["ids"].shape[0], "grads": grads,
                     "sec": []}
    for _ in range(args.reps):  # interleaved, so load on the machine hits both sides alike
        for name, (bp, model, batch, frozen) in runs.items():
            t = time.perf_counter()
            step(bp, model, batch, frozen)
            out[name]["sec"].append(time.perf_counter() - t)
    o, n = out["old"], out["new"]
    diff = max(abs(o["losses"][k] - n["losses"][k]) for k in o["losses"])
    gdiff = max((o["grads"][k] - n["grads"][k]).abs().max().item() for k in o["grads"])
    same_keys = sorted(o["grads"]) == sorted(n["grads"])
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"size {args.size} {SIZES[args.size]}, torch threads {torch.get_num_threads()}, old = {args.old}")
    print("| side | losses (itc, itm, itg) | GFLOP / sample | s / step (median of %d) |" % args.reps)
    print("|---|---|---|---|")
    for name in ("old", "new"):
        r = out[name]
        ls = ", ".join(f"{r['losses'][k]:.6f}" for k in ("itc", "itm", "itg"))
        print(f"| {name} | {ls} | {r['flops'] / 1e9:.1f} | {med(r['sec']):.3f} |")
    print(f"FLOP ratio old/new {o['flops'] / n['flops']:.3f}; time ratio old/new "
          f"{med(o['sec']) / med(n['sec']):.3f}; max |loss diff| {diff:.2e}; max |grad diff| {gdiff:.2e}; "
          f"same parameters receive gradients: {same_keys}")
    return out


def compare_distributions(runs, draws):
    """Each side's losses over `draws` dropout draws (seeds 0..draws-1, forward only)."""
    vals = {name: {} for name in runs}
    for name, (bp, model, batch, frozen) in runs.items():
        model.train()
        for seed in range(draws):
            torch.manual_seed(seed)
            with torch.no_grad():
                for k, v in bp.stage1_losses(model, batch, frozen).items():
                    vals[name].setdefault(k, []).append(v.item())
    crit = 1.358 * (2 / draws) ** 0.5  # two-sample KS, alpha 0.05, equal sizes
    print(f"{draws} dropout draws per side; KS 5% critical value {crit:.3f}")
    print("| loss | old mean (sd) | new mean (sd) | KS statistic |")
    print("|---|---|---|---|")
    for k in ("itc", "itm", "itg"):
        a, b = torch.tensor(vals["old"][k]), torch.tensor(vals["new"][k])
        grid = torch.cat([a, b]).sort().values
        ks = ((a[None] <= grid[:, None]).float().mean(1) - (b[None] <= grid[:, None]).float().mean(1)).abs().max()
        print(f"| {k} | {a.mean():.4f} ({a.std():.4f}) | {b.mean():.4f} ({b.std():.4f}) | {ks:.3f} |")
    return vals


if __name__ == "__main__":
    main()
