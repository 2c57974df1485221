"""Training plumbing shared by the scripts: parameter groups, LR schedule, grad clipping, finiteness checks,
step timing, MFU and `--bench`."""
import math
import time

import torch


def param_groups(module, weight_decay):
    """AdamW groups: decay on matrices, none on biases, norms, embeddings' 1-d params (as BERT/CLIP recipes)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step, total, warmup, base_lr, min_lr=0.0):
    """Linear warm-up over `warmup` steps, then cosine decay from base_lr to min_lr at `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_grad(params, max_norm):
    """Clip to max_norm (<= 0: measure only) and return the pre-clip global grad norm as a float."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm)


class NonFiniteLossError(RuntimeError):
    pass


def check_finite(step, terms):
    """Stop the run on a NaN/inf loss, naming the step and every loss term (caller keeps its last checkpoint)."""
    vals = {k: float(v) for k, v in terms.items()}
    if not all(math.isfinite(v) for v in vals.values()):
        raise NonFiniteLossError(f"non-finite loss at step {step}: " + ", ".join(f"{k}={v}" for k, v in vals.items()))


# Dense bf16 peak FLOP/s (no sparsity) of GPUs whose name we recognise, for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "A6000": 155e12, "4090": 165e12, "V100": 125e12}


def peak_flops(device):
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None


def mfu(flops_per_step, seconds_per_step, device):
    peak = peak_flops(device)
    if peak is None or not flops_per_step or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wall time per step (synchronising CUDA) -> ms/step and samples/s for the log line."""

    def __init__(self, device):
        self.device, self.t = device, None

    def start(self):
        _sync(self.device)
        self.t = time.perf_counter()

    def stop(self, samples):
        _sync(self.device)
        dt = time.perf_counter() - self.t
        return {"ms_step": 1000 * dt, "samples_s": samples / dt if dt > 0 else 0.0}


def count_flops(fn):
    """FLOPs of one call of fn() by torch's FlopCounterMode (matmuls/convs/SDPA; forward+backward if fn does both)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def run_bench(step_fn, n, samples_per_step, device, warmup=3, flops_per_step=None):
    """Time `n` calls of step_fn() after `warmup` untimed ones: the `--bench N` report."""
    for _ in range(warmup):
        step_fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step_fn()
    _sync(device)
    sec = (time.perf_counter() - t0) / max(1, n)
    out = {"bench_steps": n, "ms_step": 1000 * sec, "samples_s": samples_per_step / sec}
    m = mfu(flops_per_step, sec, device)
    if m is not None:
        out["mfu"] = m
    if torch.device(device).type == "cuda":
        out["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print("bench | " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()),
          flush=True)
    return out
