"""Precision choice: bf16 autocast on capable GPUs, fp32 on CPU, fp16 + GradScaler only when asked."""
import contextlib
import random
import types

import numpy as np
import torch

_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_dtype(device, precision="auto"):
    """'auto' -> bf16 on a CUDA device whose tensor cores compute it (Ampere and later), else fp32.  V100/T4 only
    emulate bf16 (slowly), so they get fp32.  CPU autocast is slow, so CPU stays fp32.

    On CUDA this also lets fp32 matmuls and cuDNN convolutions use TF32 tensor cores (Ampere and
    later; inputs rounded to 10 mantissa bits, fp32 accumulation and output), which torch leaves off
    for matmuls: frozen towers kept in fp32 and --precision fp32 runs (not fp32() blocks) compute at
    the TF32 peak, the one train.peak_flops measures their MFU against."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    if precision not in _NAMES:
        raise ValueError(f"precision must be auto|fp32|bf16|fp16, got {precision!r}")
    return _NAMES[precision]


def autocast(device, dtype):
    """Autocast context for the trainable forward; a no-op in fp32."""
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def fp32(device):
    """A block computed in true fp32: autocast off, and on CUDA no TF32 matmuls either (pick_dtype turns TF32 on
    for the other fp32 work).  For contrastive logits and nearest-neighbour searches: bf16's spacing at logits
    of 8-16 is 0.0625, TF32's input rounding still errs by ~1e-3 there.  No autocast on the meta device (--mode
    params): then only the TF32 flag is kept off."""
    kind = torch.device(device).type
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        with torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def fp32_output(linear):
    """Make a frozen nn.Linear (a language model's output layer) compute in true fp32 under autocast too, so
    its logits are not rounded to bf16, whose spacing is 0.25 at |logit| 32-64.  Replaces the module's
    forward (a hook would compute the bf16 output first; bound, so a deepcopy reads its own weight); returns
    the module."""
    def forward(self, x):
        with fp32(x.device):
            bias = None if self.bias is None else self.bias.float()
            return torch.nn.functional.linear(x.float(), self.weight.float(), bias)
    linear.forward = types.MethodType(forward, linear)
    return linear


def make_scaler(dtype, device=None):
    """GradScaler, enabled only for fp16 (bf16 has fp32's exponent range and needs none), for `device`'s type
    (None: cuda where a GPU is visible, else cpu).  GradScaler's default device is cuda, which torch disables
    with a warning where no GPU is visible: --precision fp16 on a CPU would run unscaled."""
    kind = torch.device(device).type if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    return torch.amp.GradScaler(kind, enabled=dtype == torch.float16)


def frozen_dtype(device, dtype):
    """dtype to store frozen backbones in: the autocast dtype on GPU (bf16 halves their memory), fp32 on CPU."""
    return dtype if torch.device(device).type == "cuda" else torch.float32


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
