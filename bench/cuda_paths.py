"""The CUDA-only code paths of the five scripts, each run once: the NCCL process group (init, an
all-reduce, common.dist's gather-with-gradient, a DDP backward), fused SDPA kernels behind
common.attention, pinned-memory loading through common.data.make_loader, and bf16 frozen towers
(common.amp's dtype choice applied to a model folder).

    torchrun --nproc_per_node 1 bench/cuda_paths.py --clip runs/bench/models/clip-vit-base-patch32

One process: the scripts open a process group only for world > 1, so this opens it itself (NCCL on
a GPU; two processes cannot share one GPU in one NCCL communicator).  Without CUDA the same checks
run on gloo / fp32 and the CUDA-only ones say `skipped`.  Prints one line per check,
`cuda_path | name | ok|skipped|FAIL | detail`, and exits 1 when one failed.
"""
import argparse
import os
import sys
import traceback

import torch
import torch.distributed as tdist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import amp, data, dist  # noqa: E402
from common.attention import attention, attention_math  # noqa: E402


def check_process_group(device):
    """init_process_group with the backend common.dist picks, its collectives, a DDP backward.

    common.dist.all_reduce_mean and all_gather_with_grad return their input untouched in a group of
    one process (they skip the collective where world <= 1), so at world 1 they would pass without
    NCCL running: the collectives are called here directly, and the gather through common.dist's
    autograd function (_GatherWithGrad: all_gather forward, all_reduce of the gradient backward)."""
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                 rank=int(os.environ.get("RANK", 0)),
                                 world_size=int(os.environ.get("WORLD_SIZE", 1)))
    world = tdist.get_world_size()
    x = torch.arange(4.0, device=device, requires_grad=True)
    total = x.detach().clone()
    tdist.all_reduce(total)  # every rank holds the same x: the sum is world * x
    gathered = dist._GatherWithGrad.apply(x)  # (world * 4,)
    gathered.sum().backward()  # backward: the all_reduce of the gradient, this rank's slice
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2).to(device), device_ids=ids)
    ddp(x.detach()[None]).sum().backward()
    ok = (torch.equal(total, world * x.detach())
          and torch.equal(gathered.detach(), x.detach().repeat(world))
          and x.grad is not None and torch.equal(x.grad, torch.full_like(x, world))
          and ddp.module.weight.grad is not None)
    return ok, f"{tdist.get_backend()} world {world}: all_reduce, gather with grad, DDP backward"


def check_sdpa(device):
    """common.attention.attention with only the fused kernels allowed (no math fallback), causal
    and with the scripts' boolean padding mask: the bf16 output and the q, k, v gradients of its
    backward (the fused kernels' backward) against the explicit softmax's in fp32."""
    if device.type != "cuda":
        return None, "no CUDA"
    from torch.nn.attention import SDPBackend
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    out_err, grad_err = sdpa_errors(device, fused)
    ok = out_err < 5e-2 and grad_err < 5e-2
    return ok, (f"fused kernels only, bf16 vs fp32 math: max |d| {out_err:.2e} (output), "
                f"{grad_err:.2e} (gradients, relative to their largest)")


def sdpa_errors(device, backends, dtype=torch.bfloat16):
    """(largest |output - reference|, largest |grad - reference grad| / largest |reference grad|)
    of attention() under sdpa_kernel(backends), over the causal and the padding-mask case; the
    reference: attention_math on the same inputs in fp32."""
    from torch.nn.attention import sdpa_kernel
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(4, 12, 40, 64, device=device, generator=g, dtype=dtype)
               for _ in range(3))
    mask = torch.ones(4, 1, 1, 40, dtype=torch.bool, device=device)
    mask[:, :, :, 30:] = False  # padded keys
    out_err = grad_err = 0.0
    for kw in (dict(causal=True), dict(mask=mask)):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        with sdpa_kernel(backends):
            out = attention(qq, kk, vv, **kw)
        out.float().sum().backward()
        rq, rk, rv = (t.float().clone().requires_grad_(True) for t in (q, k, v))
        ref = attention_math(rq, rk, rv, **kw)
        ref.sum().backward()
        out_err = max(out_err, (out.float() - ref).abs().max().item())
        for got, want in ((qq, rq), (kk, rk), (vv, rv)):
            err = (got.grad.float() - want.grad).abs().max() / want.grad.abs().max()
            grad_err = max(grad_err, err.item())
    return out_err, grad_err


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.full((3, 32, 32), float(i))


def check_pinned(device):
    """make_loader(pin_memory=True) with workers: pinned batches, copied non_blocking, unchanged."""
    if device.type != "cuda":
        return None, "no CUDA"
    batches = [list(range(i, i + 16)) for i in range(0, 64, 16)]
    loader = data.make_loader(_Rows(), batches, workers=2, pin_memory=True)
    pinned, same = [], []
    for b in loader:
        pinned.append(b.is_pinned())
        same.append(torch.equal(b.to(device, non_blocking=True).cpu(), b))
    return all(pinned) and all(same), f"{len(pinned)} batches, 2 workers, copied non_blocking"


def check_frozen_bf16(device, clip):
    """The scripts' precision choice (bf16 autocast and bf16 frozen towers on a bf16 GPU, fp32 on
    CPU) on a CLIP vision tower loaded as perceiver_caption.py loads it, run under no_grad."""
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # the vision tower of a full CLIPModel: text keys unused
    hf_logging.disable_progress_bar()
    dtype = amp.pick_dtype(device)
    fdt = amp.frozen_dtype(device, dtype)
    tower = CLIPVisionModel.from_pretrained(clip, dtype=fdt).to(device).eval().requires_grad_(False)
    size = tower.config.image_size
    pixels = torch.randn(2, 3, size, size, device=device, dtype=fdt)
    with torch.no_grad(), amp.autocast(device, dtype):
        out = tower(pixel_values=pixels).last_hidden_state
    want = torch.bfloat16 if device.type == "cuda" else torch.float32
    ok = dtype == want and fdt == want and out.dtype == want and bool(torch.isfinite(out).all())
    return ok, f"autocast {dtype}, frozen tower stored and run in {out.dtype}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip", required=True, help="a CLIP folder (bench/random_models.py writes one)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    device = dist._pick_device(a.device, int(os.environ.get("LOCAL_RANK", 0)))
    checks = {"process_group": lambda: check_process_group(device),
              "fused_sdpa": lambda: check_sdpa(device),
              "pinned_memory": lambda: check_pinned(device),
              "bf16_frozen_tower": lambda: check_frozen_bf16(device, a.clip)}
    failed = 0
    for name, fn in checks.items():
        try:
            ok, detail = fn()
        except Exception as e:  # report every check, then fail
            traceback.print_exc()
            ok, detail = False, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        status = "skipped" if ok is None else "ok" if ok else "FAIL"
        failed += status == "FAIL"
        print(f"cuda_path | {name} | {status} | {detail}", flush=True)
    if tdist.is_initialized():
        tdist.destroy_process_group()
    return failed


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
