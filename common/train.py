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


def warmup_lr(schedule, step, total, base_lr, warmup_frac):
    """Linear warm-up over warmup_frac * total steps, then `constant`, `linear_decay` (to 0 at `total`) or
    `cosine` (cosine_lr)."""
    warm = int(warmup_frac * total)
    if schedule == "cosine":
        return cosine_lr(step, total, warm, base_lr)
    if schedule not in ("constant", "linear_decay"):
        raise ValueError(f"--schedule must be constant|cosine|linear_decay, got {schedule!r}")
    if step < warm:
        return base_lr * (step + 1) / warm
    return base_lr * (1.0 if schedule == "constant" else max(0.0, (total - step) / max(1, total - warm)))


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


def optimizer_update(optimizer, scaler, params, max_norm, step, terms):
    """The end of every training step, after the micro-batch backward passes: unscale, clip (returning the
    pre-clip grad norm), stop on a non-finite loss term or grad norm *before* the update (so the last checkpoint
    stays the last good one; an fp16 scaler skips inf-gradient steps itself), step, update the scaler, zero the
    gradients.  `terms`: the step's loss terms (tensors or floats), named in the error."""
    scaler.unscale_(optimizer)
    gnorm = clip_grad(params, max_norm)
    check_finite(step, {**terms, **({} if scaler.is_enabled() else {"grad_norm": gnorm})})
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return gnorm


# Dense (no sparsity) peak FLOP/s per GPU as (bf16/fp16 tensor cores, TF32 tensor cores, plain fp32), from the
# vendors' data sheets.  Matched in order against torch.cuda.get_device_name: the PCIe and NVL parts are slower
# than the SXM ones, so they come first.
PEAKS = (("H100 PCIe", (756e12, 378e12, 51e12)), ("H100 NVL", (835e12, 418e12, 60e12)),
         ("H100", (989e12, 495e12, 67e12)), ("H200 NVL", (835e12, 418e12, 60e12)),
         ("H200", (989e12, 495e12, 67e12)), ("H800", (989e12, 495e12, 67e12)),
         ("A100", (312e12, 156e12, 19.5e12)), ("A800", (312e12, 156e12, 19.5e12)), ("L40S", (362e12, 183e12, 91.6e12)),
         ("A6000", (155e12, 77e12, 38.7e12)), ("4090", (165e12, 83e12, 82.6e12)), ("V100", (125e12, None, 15.7e12)))


def peak_flops(device, dtype=torch.bfloat16):
    """Peak FLOP/s of one GPU for the precision the run computes in (None on CPU or an unknown GPU): bf16/fp16
    autocast -> the tensor-core peak; fp32 -> the TF32 peak when matmuls may use TF32, else plain fp32."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in PEAKS:
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half
            return tf32 if tf32 and torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def mfu(flops_per_step, seconds_per_step, device, world_size=1, dtype=torch.bfloat16):
    """Model FLOPs utilisation: `flops_per_step` is the work of the whole step on all `world_size` GPUs (the global
    batch), so it is divided by the peak of all of them, not of one."""
    peak = peak_flops(device, dtype)
    if peak is None or not flops_per_step or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * world_size)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """ms/step and samples/s for the log line without synchronising the GPU: the wall time from
    the previous stop() (the first start() before any) to this one, over the start()s (steps) in
    between.  Each step already waits for the GPU where it reads its loss or grad norm (.item()),
    so these times add up to the run's wall time, data loading and whatever runs between steps
    (logging, evaluation, checkpoints) included; syncing at start and stop would add two host
    syncs per step.  `samples`: those of one step."""

    def __init__(self, device=None, clock=time.perf_counter):
        self.clock, self.t, self.steps = clock, None, 0  # device: unused, kept for the callers

    def start(self):
        if self.t is None:
            self.t = self.clock()
        self.steps += 1

    def stop(self, samples):
        now = self.clock()
        dt = (now - self.t) / max(1, self.steps)
        self.t, self.steps = now, 0
        return {"ms_step": 1000 * dt, "samples_s": samples / dt if dt > 0 else 0.0}


def count_flops(fn):
    """FLOPs of one call of fn() by torch's FlopCounterMode (matmuls/convs/SDPA; forward+backward if fn does both).

    A torch.compile'd module called under FlopCounterMode runs eagerly, and afterwards (torch 2.13) neither it nor
    another compiled instance of its class ran a compiled graph again: a --bench compile row would time eager
    steps.  Resetting Dynamo's caches after counting makes the next call compile again."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    torch.compiler.reset()
    return counter.get_total_flops()


def run_bench(step_fn, n, samples_per_step, device, warmup=3, flops_per_step=None, world_size=1,
              dtype=torch.bfloat16, data_fn=None):
    """Time `n` steps after `warmup` untimed ones: the `--bench N` report.  `flops_per_step`: the step's work on
    all `world_size` processes (MFU divides by all their peaks).

    data_fn given: each step is `step_fn(data_fn())`, and the time spent waiting for the batch (the loader:
    decoding, augmenting, collating) is reported apart from the step's compute (synchronised on a GPU):
    `ms_data`, `ms_step`, and samples/s end to end (`samples_s`) and for compute alone (`samples_s_step`).
    A loader that keeps up shows ms_data near zero; one that does not is the bottleneck the sum shows."""
    if n < 1:  # else a division by zero after the warm-up steps
        raise ValueError(f"--bench must be a number of timed steps >= 1, got {n}")
    if data_fn is None:
        sec = seconds_per_call(step_fn, n, device, warmup)
        out = {"bench_steps": n, "ms_step": 1000 * sec, "samples_s": samples_per_step / sec}
    else:
        for _ in range(warmup):
            step_fn(data_fn())
        _sync(device)
        t_data = t_step = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            batch = data_fn()
            t1 = time.perf_counter()
            step_fn(batch)
            _sync(device)
            t_data, t_step = t_data + t1 - t0, t_step + time.perf_counter() - t1
        sec = (t_data + t_step) / max(1, n)
        out = {"bench_steps": n, "ms_data": 1000 * t_data / max(1, n), "ms_step": 1000 * t_step / max(1, n),
               "samples_s": samples_per_step / sec, "samples_s_step": samples_per_step * max(1, n) / t_step}
    m = mfu(flops_per_step, out["ms_step"] / 1000, device, world_size, dtype)
    if m is not None:
        out["mfu"] = m
    if torch.device(device).type == "cuda":
        out["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print("bench | " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()),
          flush=True)
    return out


def count_params(modules, trainable=None):
    """Parameters of one module or several, each tensor counted once however often it is shared (tied weights);
    trainable=True / False counts only those that do / do not require grad (trainable vs frozen)."""
    modules = [modules] if isinstance(modules, torch.nn.Module) else modules
    params = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in params.values() if trainable is None or p.requires_grad == trainable)


def size_table(parts):
    """The model-size table (`--mode params`, efficiency reports): {part: (modules, fn or None)} ->
    {"params_<part>": parameters of the modules (shared ones once), "gflops_<part>": GFLOPs of one fn() call by
    FlopCounterMode}; fn is the work of one sample (run it under no_grad/autocast as the caller needs)."""
    out = {}
    for name, (modules, fn) in parts.items():
        out[f"params_{name}"] = count_params(modules)
        if fn is not None:
            out[f"gflops_{name}"] = count_flops(fn) / 1e9
    return out


def seconds_per_call(fn, n, device, warmup=1):
    """Mean wall time of `n` calls of fn() after `warmup` untimed ones (CUDA synchronised around the timing)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / max(1, n)


def samples_per_second(fn, samples, device, n=3, warmup=1):
    """Throughput of fn(), which processes `samples` samples: `n` timed calls after `warmup` untimed ones."""
    return samples / seconds_per_call(fn, n, device, warmup)
