"""One attention function for every script: PyTorch's fused scaled_dot_product_attention.

q: (B, H, Lq, D), k and v: (B, H, Lk, D).  `mask` is bool (True = may attend) or an additive float
tensor, broadcastable to (B, H, Lq, Lk).  Boolean masks are turned into additive ones so a fully
masked row (e.g. a padded query) yields a finite, uniform average instead of NaN.
`attention_math` is the explicit softmax(QK^T / sqrt(D)) V that the fused path is tested against;
`split_heads` and `merge_heads` go from (B, L, H*D) to those shapes and back.
"""
import math

import torch
import torch.nn.functional as F


def _additive(mask, dtype):
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _with_causal(mask, lq, lk, dtype, device):
    """Fold a causal (lower-triangular, aligned to the end of the keys) mask into `mask`."""
    causal = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
    causal = _additive(causal, dtype)
    return causal if mask is None else (mask + causal).clamp(min=torch.finfo(dtype).min)  # no -inf overflow


def split_heads(x, h):  # Dh spelled out, not -1: a tensor of 0 rows has no -1 to infer
    return x.unflatten(-1, (h, x.shape[-1] // h)).transpose(1, 2)  # (B, N, H*Dh) -> (B, H, N, Dh)


def merge_heads(x):
    return x.transpose(1, 2).flatten(2)  # (B, H, N, Dh) -> (B, N, H*Dh)


def attention(q, k, v, mask=None, causal=False, dropout_p=0.0):
    mask = _additive(mask, q.dtype)
    if causal and mask is not None:  # SDPA takes either is_causal or a mask: combine them ourselves
        mask, causal = _with_causal(mask, q.shape[-2], k.shape[-2], q.dtype, q.device), False
    if causal and q.shape[-2] != k.shape[-2]:
        mask, causal = _with_causal(None, q.shape[-2], k.shape[-2], q.dtype, q.device), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


def attention_math(q, k, v, mask=None, causal=False, dropout_p=0.0):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    mask = _additive(mask, scores.dtype)
    if causal:
        mask = _with_causal(mask, q.shape[-2], k.shape[-2], scores.dtype, q.device)
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v  # (B, H, Lq, D)
