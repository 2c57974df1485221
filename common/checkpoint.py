"""Checkpoints: atomic writes, weights-only loads, RNG state for exact resume.

A checkpoint is a plain dict (trainable weights, optimizer, scaler, step, RNG states, data position, config).
`save_checkpoint` writes to a temporary file in the same folder and renames it, so a crash mid-write never
leaves a truncated file under the real name.  `load_checkpoint` uses `weights_only=True`: only tensors and
plain Python containers can come back, never arbitrary pickled objects.
"""
import glob
import hashlib
import os
import random

import numpy as np
import torch


def rng_state():
    """Python, numpy and torch (CPU + this process's CUDA device) generator states, as tensors/plain types
    (weights_only-safe).  Only the current device's CUDA state: under torchrun each rank owns one GPU, and a
    resume may see fewer GPUs than the run that saved.  For a multi-rank run save every rank's state (gathered,
    a list in rank order); `set_rng_state(state, rank)` takes the rank's own."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _seed_new_rank(state, rank):
    """Seed this process's generators for a `rank` the run that saved did not have: from (rank 0's saved torch
    state, rank), so the rank draws its own dropout / masking stream (not a copy of rank 0's) and a second resume
    from the same checkpoint draws the same one again."""
    h = hashlib.blake2b(state["torch"].numpy().tobytes() + f"/rank {rank}".encode(), digest_size=8).digest()
    seed = int.from_bytes(h, "big")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # (seeds the CUDA generators too)


def set_rng_state(state, rank=0):
    """Restore `rng_state()`'s output; given a list (one state per rank), this `rank`'s.  A rank beyond those
    saved (a resume on more ranks) gets fresh generators seeded by (rank 0's state, rank): `_seed_new_rank`."""
    if isinstance(state, (list, tuple)):
        if rank >= len(state):
            return _seed_new_rank(state[0], rank)
        state = state[rank]
    py = state["python"]
    random.setstate((state["python_version"], tuple(py[:-1]), py[-1]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints held every visible device's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(path):
    """Remove `<path>.tmp.<pid>` files that a killed run (or a full disk) left behind; a file whose writer is
    still alive on this machine is kept.  Returns the removed paths."""
    removed = []
    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        suffix = tmp.rsplit(".tmp.", 1)[1]
        if suffix.isdigit() and (int(suffix) == os.getpid() or not _pid_alive(int(suffix))):
            try:
                os.remove(tmp)
                removed.append(tmp)
            except OSError:
                pass
    return removed


def save_checkpoint(path, state):
    """torch.save `state` to `path` atomically (temp file + fsync + rename).  Stale temp files of earlier,
    killed saves are removed first; a failed write (e.g. a full disk) removes its own temp file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    clean_stale_temps(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


# ---- what a checkpoint is: every script stamps its checkpoints and checks what it is given ----------------------
class CheckpointMismatch(ValueError):
    pass


def describe(ck):
    """'blip2_pformer stage 1' for a stamped checkpoint; a best guess from its keys for an old one."""
    if not isinstance(ck, dict):
        return f"not a checkpoint dict ({type(ck).__name__})"
    if ck.get("script"):
        return f"{ck['script']} {ck.get('kind', '')}".strip()
    cfg = ck.get("config") or {}
    for key, name in (("stage", "blip2_pformer"), ("bridge", "perceiver_caption"), ("tasks", "imagechat_warmup"),
                      ("teacher", "dlip"), ("train_tsv", "negclip")):
        if key in cfg:
            return f"{name} (unstamped)"
    return "an unstamped checkpoint (keys " + ", ".join(sorted(map(str, ck))[:6]) + ")"


def expect_checkpoint(ck, path, script, kinds=None, flag="--init"):
    """Raise one line naming what `path` is and what `script` expected, unless it is `script`'s (and, when
    `kinds` is given, one of those kinds).  Unstamped checkpoints of the same script pass."""
    what = describe(ck)
    ok = isinstance(ck, dict) and (ck.get("script") == script or (not ck.get("script") and what.startswith(script)))
    if ok and kinds and ck.get("script") and ck.get("kind") not in kinds:
        ok = False
    if not ok:
        want = f"{script} " + " or ".join(kinds) if kinds else script
        raise CheckpointMismatch(f"{flag} {path}: this is a {what} checkpoint; {script} expects a {want} checkpoint")


def check_loaded(n_loaded, n_expected, path, what, script, min_frac=0.5):
    """Refuse a weights load that filled fewer than `min_frac` of the expected tensors (a checkpoint of another
    model that happens to load with strict=False)."""
    if n_expected and n_loaded < min_frac * n_expected:
        raise CheckpointMismatch(f"{path}: only {n_loaded} of {n_expected} tensors of {script}'s model match; "
                                 f"this is a {what} checkpoint")


# Fields a resumed run may change without changing what it computes (where it writes, how often it logs...).
# epochs and max_steps only where they just say when to stop: a script whose LR schedule spans
# them takes them out (negclip both, blip2_pformer and perceiver_caption epochs, imagechat_warmup
# max_steps, dlip both under its cosine schedule).
RESUME_FREE = {"resume", "out_dir", "log_every", "save_every", "eval_every", "bench", "device", "num_workers",
               "workers", "max_steps", "epochs", "report", "resume_changes", "eval_batch", "init", "compile"}


def resume_config_diff(saved, current, free=RESUME_FREE):
    """The config fields that differ between a checkpoint and the resuming run: [(field, saved, now), ...]."""
    return [(k, saved.get(k), v) for k, v in current.items()
            if k not in free and k in saved and saved.get(k) != v]


def check_resume_config(saved, current, allow=False, log=print, free=RESUME_FREE):
    """Say in one line what a resumed run changes; refuse it (it would not continue the same run) unless `allow`."""
    diff = resume_config_diff(saved or {}, current, free)
    if not diff:
        return []
    line = "resume changes the config: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diff)
    if not allow:
        raise CheckpointMismatch(line + " (an exact resume needs the same values; pass --resume_changes true "
                                 "to continue anyway)")
    log(line + " (allowed by --resume_changes)")
    return diff
