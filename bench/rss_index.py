"""Peak memory of a pairs dataset read by DataLoader workers: the list-of-dicts reader vs the index (Records).

    python bench/rss_index.py                       # 1M images x 5 captions = 5M pairs, 4 workers (~5 min, 2 cores)
    python bench/rss_index.py --images 100000       # a quick look

Writes a synthetic canonical pairs JSONL (--file with the size appended: by default
/tmp/rss_pairs_1000000x5.jsonl, kept for reruns), then runs each reader in a fresh process (so each
main-process peak is its own): read the file, build a Dataset with one item per (image, caption)
pair -- `before` as the scripts did (a list of dicts + a list of (record, caption) index tuples),
`after` with Records + `pairs()` -- and iterate one shuffled epoch with 4 DataLoader workers.  Each
worker reports its peak RSS (VmHWM) and its private memory (Private_Clean + Private_Dirty from
/proc/self/smaps_rollup: the pages it does not share with the main process, i.e. what copy-on-write
duplicated); the table goes to docs/data.md.  Linux only.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.data import DataError, read_pairs  # noqa: E402

WORDS = ("a red blue green large small circle square dog cat man woman street car tree house sitting standing "
         "next to on top of the with two three near beach table plate food running white black".split())


def old_read_pairs(path):
    """common/data.py's reader before the index (kept for this comparison): every record a Python dict."""
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            for key, typ in (("image", str), ("captions", list)):
                if not isinstance(rec.get(key), typ):
                    raise DataError(f"{path}:{lineno}: field '{key}' missing or not {typ.__name__}")
            records.append(rec)
    for i, r in enumerate(records):
        if not r["captions"] or not all(isinstance(c, str) for c in r["captions"]):
            raise DataError(f"{path}: record {i + 1}: field 'captions' is empty or not strings")
    return records


def write_jsonl(path, n_images, n_caps):
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_images):
            caps = [" ".join(rng.choices(WORDS, k=rng.randint(6, 12))) for _ in range(n_caps)]
            f.write(json.dumps({"image": f"images/{i // 10000:03d}/{i:09d}.jpg", "captions": caps}) + "\n")


def proc_mem(pid="self"):
    """(VmRSS, VmHWM, private) in MiB of a process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    priv = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                priv += int(line.split()[1]) / 1024
    return out["VmRSS"], out["VmHWM"], priv


class BeforeSet(torch.utils.data.Dataset):
    """blip2_pformer.PairDataset's old layout (before Records): records as dicts, one tuple per pair."""

    def __init__(self, records):
        self.records = records
        self.items = [(i, j) for i, r in enumerate(records) for j in range(len(r["captions"]))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        i, j = self.items[k]
        rec = self.records[i]
        return rec["image"], rec["captions"][j]


class AfterSet(torch.utils.data.Dataset):
    """The same items from the index: Records + the pairs() arrays."""

    def __init__(self, records):
        self.records = records
        self.rec, self.cap = records.pairs()

    def __len__(self):
        return len(self.rec)

    def __getitem__(self, k):
        rec = self.records[int(self.rec[k])]
        return rec["image"], rec["captions"][int(self.cap[k])]


class Shuffled(torch.utils.data.Sampler):
    """A seeded permutation kept as one int64 tensor (a Python list of 5M ints would itself cost 180 MiB)."""

    def __init__(self, n, take):
        self.perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:take]

    def __len__(self):
        return len(self.perm)

    def __iter__(self):
        for chunk in self.perm.split(1 << 16):
            yield from chunk.tolist()


class Collate:
    """Runs in the worker: counts the batch and, every `every` batches, samples the worker's memory."""

    def __init__(self, every):
        self.every, self.n = every, 0

    def __call__(self, batch):
        self.n += 1
        mem = proc_mem() if (self.n - 1) % self.every == 0 else None
        return len(batch), os.getpid(), mem


def phase(which, path, workers, batch, frac):
    torch.set_num_threads(1)
    base = proc_mem()[0]
    t0 = time.time()
    records = old_read_pairs(path) if which == "before" else read_pairs(path)
    t_read = time.time() - t0
    ds = (BeforeSet if which == "before" else AfterSet)(records)
    after_build = proc_mem()
    n_items = int(len(ds) * frac)
    sampler = Shuffled(len(ds), n_items)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         collate_fn=Collate(every=max(1, n_items // batch // workers // 20)))
    t0, seen, peaks = time.time(), 0, {}
    for n, pid, mem in loader:
        seen += n
        if mem is not None:
            old = peaks.get(pid, (0, 0, 0))
            peaks[pid] = tuple(max(a, b) for a, b in zip(old, mem))
    t_iter = time.time() - t0
    main = proc_mem()
    res = {"phase": which, "records": len(records), "pairs": len(ds), "iterated": seen, "read_s": round(t_read, 1),
           "iter_s": round(t_iter, 1), "main_base_mib": round(base), "main_after_read_mib": round(after_build[0]),
           "main_peak_mib": round(main[1]),
           "worker_peak_rss_mib": [round(p[1]) for p in peaks.values()],
           "worker_private_mib": [round(p[2]) for p in peaks.values()]}
    if which == "after":
        res["index_bytes_per_record"] = round(records.nbytes / len(records), 1)
        res["pairs_bytes_per_record"] = round((ds.rec.nbytes + ds.cap.nbytes) / len(records), 1)
    print("RESULT " + json.dumps(res), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--captions", type=int, default=5)
    p.add_argument("--before_images", type=int, default=0, help="a smaller file for `before` (0: the same)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--frac", type=float, default=1.0, help="fraction of the shuffled epoch to iterate")
    p.add_argument("--file", default="/tmp/rss_pairs.jsonl")
    p.add_argument("--phase", choices=["before", "after"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        return phase(a.phase, a.file, a.workers, a.batch, a.frac)
    results = []
    for which in ("after", "before"):
        n = a.before_images if which == "before" and a.before_images else a.images
        path = f"{os.path.splitext(a.file)[0]}_{n}x{a.captions}.jsonl"
        if not os.path.isfile(path):
            t0 = time.time()
            write_jsonl(path + ".tmp", n, a.captions)
            os.replace(path + ".tmp", path)
            print(f"wrote {path} ({os.path.getsize(path) / 2**20:.0f} MiB) in {time.time() - t0:.0f}s", flush=True)
        cmd = [sys.executable, __file__, "--phase", which, "--file", path, "--workers", str(a.workers),
               "--batch", str(a.batch), "--frac", str(a.frac)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        res = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        print(json.dumps(res), flush=True)
        results.append(res)
    print("\n| reader | pairs | read s | main peak RSS MiB | worker peak RSS MiB (max) | worker private MiB "
          "(max) | main + workers private MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results[::-1]:
        total = r["main_peak_mib"] + sum(r["worker_private_mib"])
        print(f"| {r['phase']} | {r['pairs']:,} | {r['read_s']} | {r['main_peak_mib']:,} | "
              f"{max(r['worker_peak_rss_mib']):,} | {max(r['worker_private_mib']):,} | {total:,} |")
    after = results[0]
    print(f"\nindex: {after['index_bytes_per_record']} bytes per record "
          f"(+ pairs() arrays {after['pairs_bytes_per_record']} bytes per record)")


if __name__ == "__main__":
    main()
