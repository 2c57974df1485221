"""Logging: one readable stdout line per log step plus a JSON Lines file, written by rank 0 only."""
import json
import os
import sys
import time

from tqdm import tqdm


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Logger:
    def __init__(self, run_dir, is_main=True, filename="metrics.jsonl"):
        self.is_main, self.path = is_main, None
        if is_main and run_dir:
            os.makedirs(run_dir, exist_ok=True)
            self.path = os.path.join(run_dir, filename)

    def resumed(self, step):
        """A run resumed at `step`: drop the records of steps after it (the killed run logged them, the resumed
        run logs them again) and mark the resume, so metrics.jsonl holds each step once."""
        if not self.path:
            return
        kept = []
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by the kill
                    if not isinstance(rec.get("step"), int) or rec["step"] <= step:
                        kept.append(json.dumps(rec))
        kept.append(json.dumps({"step": step, "time": time.time(), "event": "resume"}))
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(kept) + "\n")
        os.replace(tmp, self.path)

    def log(self, step, **scalars):
        """`step 120 | loss 2.31 | itc 1.02 | lr 0.0001 | ...` to stdout and one JSON object to metrics.jsonl."""
        if not self.is_main:
            return
        scalars = {k: (float(v) if hasattr(v, "item") else v) for k, v in scalars.items()}
        print(f"step {step} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in scalars.items()), flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")

    def info(self, msg):
        if self.is_main:
            print(msg, flush=True)


def progress(iterable, is_main=True, **kw):
    """tqdm progress bar on rank 0 (to stderr, off when stderr is not a terminal unless forced)."""
    if not is_main:
        return iterable
    kw.setdefault("disable", not sys.stderr.isatty())
    kw.setdefault("leave", False)
    return tqdm(iterable, **kw)
