"""Canonical dataset readers (pairs, vqa, video) and bad-image handling shared by the scripts.

Formats (DESIGN.md): JSON Lines, one record per line:
    pairs  {"image": path, "captions": [str, ...]}
    vqa    {"image": path, "question": str, "answers": [str x 10], "question_id": int|str}
    video  {"frames": [path, ...], "captions": [str, ...]}
Paths are relative to an image root.  Errors name the file, the line and the field.
"""
import json
import os
import re

import torch

from common.image import load_image


class DataError(ValueError):
    pass


def read_jsonl(path, required=(), types=None):
    """Read JSON Lines; check each record has `required` fields (of `types[field]` when given)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    types = types or {}
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in required:
                if key not in rec:
                    raise DataError(f"{path}:{lineno}: missing field '{key}'")
                if key in types and not isinstance(rec[key], types[key]):
                    raise DataError(f"{path}:{lineno}: field '{key}' should be {types[key].__name__}, "
                                    f"got {type(rec[key]).__name__}")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records (empty dataset)")
    return records


def _check_strings(path, i, rec, field):
    for j, c in enumerate(rec[field]):
        if not isinstance(c, str):
            raise DataError(f"{path}: record {i + 1}: field '{field}'[{j}] should be str, got {type(c).__name__}")


def read_pairs(path):
    recs = read_jsonl(path, ("image", "captions"), {"image": str, "captions": list})
    for i, r in enumerate(recs):
        if not r["captions"]:
            raise DataError(f"{path}: record {i + 1}: field 'captions' is empty")
        _check_strings(path, i, r, "captions")
    return recs


def read_vqa(path):
    recs = read_jsonl(path, ("image", "question", "answers", "question_id"),
                      {"image": str, "question": str, "answers": list})
    for i, r in enumerate(recs):
        _check_strings(path, i, r, "answers")
    return recs


def read_video(path):
    """Video records; a record may instead name a folder of frames ({"folder": dir}) which is listed in order."""
    recs = read_jsonl(path, ("captions",), {"captions": list})
    root = os.path.dirname(os.path.abspath(path))
    for i, r in enumerate(recs):
        if "frames" not in r:
            if "folder" not in r:
                raise DataError(f"{path}:{i + 1}: missing field 'frames' (or 'folder')")
            folder = r["folder"]
            full = folder if os.path.isabs(folder) else os.path.join(root, folder)
            names = sorted(n for n in os.listdir(full) if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
            r["frames"] = [os.path.join(folder, n) for n in names]
        if not r["frames"]:
            raise DataError(f"{path}:{i + 1}: field 'frames' is empty")
        _check_strings(path, i, r, "captions")
    return recs


def pre_caption(caption, max_words=30):
    """BLIP's caption cleaning (salesforce/BLIP data/utils.py `pre_caption`): lowercase, the marks . ! " ( ) * # : ;
    ~ become spaces, runs of spaces collapse, keep the first `max_words` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


class ImageFolderLoader:
    """Load + transform images under a root; an unreadable one returns None and is counted.

    The project's one bad-image rule: each distinct image is counted once however often it is drawn, the count is
    reported in the log (`report()`), and `check()` raises once more than `max_bad_frac` of the distinct images
    tried so far were unreadable (after at least `min_tried` of them, so one early bad file does not stop a run).
    A wrong --image_root thus fails loudly instead of training on nothing.  With DataLoader workers each worker
    holds its own copy: send the bad paths back with the batch and `merge()` them in the main process.
    """

    def __init__(self, image_root, transform, max_bad_frac=0.05, min_tried=20):
        self.root, self.transform, self.max_bad_frac, self.min_tried = image_root, transform, max_bad_frac, min_tried
        self.tried_set, self.bad_set = set(), set()

    def __call__(self, rel_path):
        self.tried_set.add(rel_path)
        if rel_path in self.bad_set:
            return None
        img = load_image(os.path.join(self.root, rel_path))
        if img is None:
            self.bad_set.add(rel_path)
            return None
        return self.transform(img)

    def merge(self, tried, bad):
        """Add counts gathered elsewhere (a worker's batch, another rank)."""
        self.tried_set.update(tried)
        self.bad_set.update(bad)
        self.tried_set.update(bad)

    @property
    def tried(self):
        return len(self.tried_set)

    @property
    def bad(self):
        return len(self.bad_set)

    @property
    def bad_paths(self):
        return sorted(self.bad_set)

    def report(self):
        return (f"{self.bad} of {self.tried} images unreadable"
                + (f" (e.g. {self.bad_paths[:3]})" if self.bad else ""))

    def check(self, final=False):
        """Raise DataError when too many distinct images were unreadable (`final`: whatever the count tried)."""
        n = self.tried
        if n and (final or n >= self.min_tried) and self.bad / n > self.max_bad_frac:
            raise DataError(f"too many unreadable images under {self.root}: {self.report()} "
                            f"(max_bad_frac {self.max_bad_frac})")


def collate_skip_none(batch):
    """Default-collate the samples that are not None (a None sample is an unreadable image)."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)


class StepSampler(torch.utils.data.Sampler):
    """Step -> global batch -> rank: the one training sampler of the project.

    Step s of a run takes positions s*G .. s*G+G-1 of an endless stream of epochs, each epoch a permutation of
    range(n) seeded by (seed, epoch) (drop_last: an epoch has n // G steps).  A global batch is cut into `accum`
    micro steps of micro_batch x world rows; rank r takes its micro_batch rows of each.  So one process and N
    processes with the same global batch see the same samples, and resuming needs only the step number.
    Yields, per micro step, this rank's list of (epoch, index) pairs: the epoch lets a dataset draw per-epoch
    choices (which caption, which augmentation) reproducibly.
    """

    def __init__(self, n, global_batch, micro_batch, world=1, rank=0, seed=0, start_step=0, total_steps=0):
        self.n, self.G, self.micro, self.world, self.rank = n, global_batch, micro_batch, world, rank
        self.seed, self.start, self.total = seed, start_step, total_steps
        self.accum = global_batch // (micro_batch * world) if micro_batch * world else 0
        if self.accum < 1 or global_batch != self.accum * micro_batch * world:
            raise ValueError(f"global_batch {global_batch} must be a multiple of micro_batch {micro_batch} "
                             f"x world size {world}")
        self.steps_per_epoch = n // global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"{n} training samples: fewer than one global batch ({global_batch})")
        self._epoch, self._perm = None, None

    def permutation(self, epoch):
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
            self._epoch = epoch
        return self._perm

    def micro_batches(self, step):
        """This rank's `accum` micro batches of step `step`, each a list of (epoch, index)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        g = self.permutation(epoch)[pos * self.G:(pos + 1) * self.G]
        rows = self.micro * self.world
        return [[(epoch, int(i)) for i in g[a * rows + self.rank * self.micro:a * rows + (self.rank + 1) * self.micro]]
                for a in range(self.accum)]

    def __iter__(self):
        for step in range(self.start, self.total):
            yield from self.micro_batches(step)

    def __len__(self):
        return (self.total - self.start) * self.accum


def draw(seed, epoch, index, n):
    """A reproducible choice in range(n) for sample `index` in `epoch` (e.g. which of its captions): the same in
    any worker, on any rank, after any resume."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + index)
    return int(torch.randint(n, (1,), generator=g))


def make_loader(dataset, batch_sampler, collate_fn=None, workers=0, seed=0, rank=0, pin_memory=False):
    """DataLoader over a batch sampler with its *own* seeded generator: worker seeds (and anything the loader
    draws) never come from the global torch RNG, so a resumed run draws exactly what the unbroken one drew."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=workers, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed * 7919 + rank), persistent_workers=False)
