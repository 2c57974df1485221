"""Checkpoints: atomic writes, weights-only loads, RNG state for exact resume.

A checkpoint is a plain dict (trainable weights, optimizer, scaler, step, RNG states, data position, config).
`save_checkpoint` writes to a temporary file in the same folder and renames it, so a crash mid-write never
leaves a truncated file under the real name.  `load_checkpoint` uses `weights_only=True`: only tensors and
plain Python containers can come back, never arbitrary pickled objects.
"""
import os
import random

import numpy as np
import torch


def rng_state():
    """Python, numpy and torch (CPU + CUDA) generator states, as tensors/plain types (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    py = state["python"]
    random.setstate((state["python_version"], tuple(py[:-1]), py[-1]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    """torch.save `state` to `path` atomically (temp file + fsync + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def restore(path, model, optimizer, scaler, strict=True):
    """Load a training checkpoint into the model, optimizer and grad scaler; return the whole dict, from which the
    caller takes its step, RNG state and data position."""
    ck = load_checkpoint(path)
    model.load_state_dict(ck["model"], strict=strict)
    optimizer.load_state_dict(ck["optimizer"])
    if ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    return ck
