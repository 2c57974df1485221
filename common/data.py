"""Canonical dataset readers (pairs, vqa, video) and bad-image handling shared by the scripts.

Formats (data/README.md, "Canonical formats"): JSON Lines, one record per line:
    pairs  {"image": path, "captions": [str, ...]}
    vqa    {"image": path, "question": str, "answers": [str x 10], "question_id": int|str}
           (answers: [] for the unanswered test questions data/convert.py --allow_unanswered writes)
    video  {"frames": [path, ...], "captions": [str, ...]}
Paths are relative to an image root.  Errors name the file, the line and the field.
The readers return `Records`: a numpy index of byte offsets into the file, each record parsed
when it is read (list-like; docs/data.md).  Web-scale sets stay in img2dataset's webdataset tar
shards, streamed by `ShardStream` (split over ranks and DataLoader workers, bounded shuffle buffer,
unreadable samples counted, exact resume via `StreamTracker`).
"""
import dataclasses
import glob
import hashlib
import io
import json
import os
import random
import re
import tarfile
from array import array

import numpy as np
import torch

from common.image import load_image


class DataError(ValueError):
    pass


class Records:
    """The records of one or more JSON Lines files, indexed rather than loaded: a drop-in for a list
    of dicts.

    Held per record: its byte offset (int64) and length (int32) in its file, and for pairs and video
    its caption count (int32, `n_captions`); 16 bytes, plus an int32 file id once files are
    concatenated.  A record is parsed when it is read (`recs[i]` returns a fresh dict each time, so
    writing into it changes nothing).  A list of Python dicts costs about a kilobyte per record and,
    read by DataLoader workers, is copied into each of them (every access writes the objects'
    reference counts, so copy-on-write duplicates their pages); numpy arrays are single buffers that
    no access writes, so forked workers keep sharing them.  Supports len, int indexing (negative
    too), slices (`recs[:n]`: a view sharing the arrays), integer lists/arrays, boolean masks,
    iteration, `Records.concat` (of one reader's Records: Lines stay Lines), and `pairs()` (every
    (record, caption) pair as two numpy arrays, no Python tuples).  Pickles as paths + arrays; each
    process opens the files itself on first read, never using a descriptor it inherited through
    fork, and refuses a file whose size or mtime changed since it was indexed.
    """

    def __init__(self, paths, stamps, offsets, lengths, n_captions=None, file_ids=None, expand=None):
        self.paths, self.stamps = tuple(paths), tuple(stamps)
        self.offsets, self.lengths = offsets, lengths
        self.n_captions, self.file_ids, self.expand = n_captions, file_ids, expand
        self._fds, self._pid = {}, None

    def __len__(self):
        return len(self.offsets)

    def __repr__(self):
        more = f" (+{len(self.paths) - 1} files)" if len(self.paths) > 1 else ""
        return f"Records({len(self)} records of {self.paths[0]}{more})"

    @property
    def nbytes(self):
        """Bytes held by the index arrays (what a record costs in memory)."""
        arrays = (self.offsets, self.lengths, self.n_captions, self.file_ids)
        return sum(a.nbytes for a in arrays if a is not None)

    def _view(self, sel):
        pick = (lambda a: None if a is None else a[sel])
        return type(self)(self.paths, self.stamps, self.offsets[sel], self.lengths[sel], pick(self.n_captions),
                       pick(self.file_ids), self.expand)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._view(key)  # numpy basic slicing: views, no copy
        if isinstance(key, (list, tuple, np.ndarray)) and np.ndim(key):
            sel = np.asarray(key)
            if sel.dtype == bool:  # a mask, as numpy reads it (int64 would make it indices 0 and 1)
                if sel.shape != (len(self),):
                    raise IndexError(f"boolean index of shape {sel.shape} for {len(self)} records")
                return self._view(np.flatnonzero(sel))
            return self._view(sel.astype(np.int64))
        i = int(key)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range ({n} records)")
        i %= n
        f = 0 if self.file_ids is None else int(self.file_ids[i])
        raw = os.pread(self._fd(f), int(self.lengths[i]), int(self.offsets[i]))
        try:
            rec = self._parse(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{self.paths[f]}:{self.line(i)}: unreadable record ({e})") from None
        return self.expand(rec, self.paths[f]) if self.expand else rec

    def _parse(self, raw):
        return json.loads(raw.decode("utf-8"))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def _fd(self, f):
        if self._pid != os.getpid():  # a new process (or a fork): open our own descriptors
            for fd in self._fds.values():
                os.close(fd)  # in a forked child this closes only the child's copy
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(f)
        if fd is None:
            fd = os.open(self.paths[f], os.O_RDONLY)
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != self.stamps[f]:
                os.close(fd)
                raise DataError(f"{self.paths[f]}: changed since it was indexed (size or mtime); "
                                "read it again")
            self._fds[f] = fd
        return fd

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_pid")}

    def __setstate__(self, state):
        self.__dict__.update(state, _fds={}, _pid=None)

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def path(self, i):
        """The file record `i` comes from."""
        return self.paths[0 if self.file_ids is None else int(self.file_ids[i])]

    def line(self, i):
        """1-based line number of record `i` (counted on demand: only error messages need it)."""
        f = 0 if self.file_ids is None else int(self.file_ids[i])
        end, n, pos = int(self.offsets[i]), 0, 0
        with open(self.paths[f], "rb") as fh:
            while pos < end:
                chunk = fh.read(min(1 << 24, end - pos))
                n, pos = n + chunk.count(b"\n"), pos + len(chunk)
        return n + 1

    def pairs(self):
        """Every (record, caption) pair as two arrays: record index (int32; int64 past 2**31
        records) and caption index (int32), in file order -- 8 bytes a pair instead of a Python
        tuple of two ints (about 100)."""
        if self.n_captions is None:
            raise TypeError("pairs() needs caption counts: records from read_pairs or read_video")
        counts = self.n_captions.astype(np.int64)
        dtype = np.int32 if len(self) < 2 ** 31 else np.int64
        rec = np.repeat(np.arange(len(self), dtype=dtype), counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)  # pair number of its record's caption 0
        return rec, (np.arange(len(rec), dtype=np.int64) - first).astype(np.int32)

    @staticmethod
    def concat(parts):
        """One Records over several, files in order (the index arrays are concatenated: a copy)."""
        parts = list(parts)
        if not parts:
            raise ValueError("Records.concat needs at least one Records")
        if len({p.expand for p in parts}) > 1 or len({type(p) for p in parts}) > 1:
            raise ValueError("Records.concat: parts were read by different readers")
        slots, paths, stamps, ids = {}, [], [], []
        for p in parts:
            where = []
            for path, stamp in zip(p.paths, p.stamps):
                if (path, stamp) not in slots:
                    slots[(path, stamp)] = len(paths)
                    paths.append(path)
                    stamps.append(stamp)
                where.append(slots[(path, stamp)])
            where = np.asarray(where, dtype=np.int32)
            ids.append(where[p.file_ids] if p.file_ids is not None else np.full(len(p), where[0], np.int32))
        caps = [p.n_captions for p in parts]
        caps = None if any(c is None for c in caps) else np.concatenate(caps)
        return type(parts[0])(paths, stamps, np.concatenate([p.offsets for p in parts]),
                              np.concatenate([p.lengths for p in parts]), caps,
                              None if len(paths) == 1 else np.concatenate(ids), parts[0].expand)


def read_jsonl(path, required=(), types=None, check=None, expand=None):
    """Index JSON Lines -> Records; each record must have the `required` fields (of `types[field]`).

    Validation is one streaming pass at start-up (not lazily when a sample is drawn): every line is
    decoded and parsed once, so a bad line stops the run before training with the same one-line
    error naming file, line and field, instead of at step 900k of a long run; the pass is also where
    the caption counts (for `pairs()`) come from, and its cost is in docs/data.md.  `check(rec, i,
    lineno)` adds a reader's own checks and returns the record's caption count (or None).
    `expand(rec, path)` is applied to each record when it is read.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    types = types or {}
    offsets, lengths, counts = array("q"), array("i"), array("i")
    pos = 0
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        for lineno, raw in enumerate(f, 1):
            start, pos = pos, pos + len(raw)
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
            n = check(rec, len(offsets), lineno) if check else None
            offsets.append(start)
            lengths.append(len(raw) - raw.endswith(b"\n"))
            if n is not None:
                counts.append(n)
    if not offsets:
        raise DataError(f"{path}: no records (empty dataset)")
    as_np = (lambda a, t: np.frombuffer(a, dtype=t).copy())  # noqa: E731  (own the buffer)
    return Records([path], [(st.st_size, st.st_mtime_ns)], as_np(offsets, np.int64),
                   as_np(lengths, np.int32), as_np(counts, np.int32) if len(counts) == len(offsets) else None,
                   expand=expand)


class Lines(Records):
    """The non-blank lines of a plain-text file, indexed like Records (`read_lines`): `lines[i]` is
    the i-th one, stripped."""

    def _parse(self, raw):
        return raw.decode("utf-8").strip()


def read_lines(path):
    """Index a text file of one item per line (e.g. sentences) -> Lines: what `[s.strip() for s in
    open(path, encoding="utf-8") if s.strip()]` holds, in the same order (universal newlines: a lone
    "\r" ends a line too), at 12 bytes a line instead of a Python string each."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    offsets, lengths, pos = array("q"), array("i"), 0
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        for lineno, raw in enumerate(f, 1):
            for piece in raw.split(b"\r"):  # (UTF-8: byte 13 is only ever "\r")
                try:
                    text = piece.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 (byte {e.start})") from None
                if text.strip():
                    offsets.append(pos)
                    lengths.append(len(piece))
                pos += len(piece) + 1
            pos -= 1  # the last piece had no "\r" after it
    if not offsets:
        raise DataError(f"{path}: no lines (empty file)")
    as_np = (lambda a, t: np.frombuffer(a, dtype=t).copy())  # noqa: E731
    return Lines([path], [(st.st_size, st.st_mtime_ns)], as_np(offsets, np.int64), as_np(lengths, np.int32))


def _check_strings(path, lineno, rec, field):
    for j, c in enumerate(rec[field]):
        if not isinstance(c, str):
            raise DataError(f"{path}:{lineno}: field '{field}'[{j}] should be str, got {type(c).__name__}")


def read_pairs(path):
    """Canonical pairs -> Records with `n_captions` (so `recs.pairs()` works)."""
    def check(rec, i, lineno):
        if not rec["captions"]:
            raise DataError(f"{path}:{lineno}: field 'captions' is empty")
        _check_strings(path, lineno, rec, "captions")
        return len(rec["captions"])
    return read_jsonl(path, ("image", "captions"), {"image": str, "captions": list}, check)


def read_vqa(path):
    """Canonical vqa -> Records.  question_id must be an int or a str: it names the prediction in
    the run's vqa.json, so null, a fraction, true/false, a list or an object is refused here."""
    def check(rec, i, lineno):
        qid = rec["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise DataError(f"{path}:{lineno}: field 'question_id' should be int or str, "
                            f"got {type(qid).__name__}")
        _check_strings(path, lineno, rec, "answers")
    return read_jsonl(path, ("image", "question", "answers", "question_id"),
                      {"image": str, "question": str, "answers": list}, check)


FRAME_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def natural_key(name):
    """Sort key comparing digit runs as numbers ("2.png" < "10.png"): frames named without zero padding,
    as ffmpeg's `%d` pattern and data/toy.py write them, sort in frame order (plain string order gives
    0, 1, 10, 11, 2, ...).  Equal keys ("01" vs "1") fall back to the name, so the order is total."""
    return [int(t) if k % 2 else t for k, t in enumerate(re.split(r"(\d+)", name))], name


def frame_paths(folder, root=""):
    """The frames (image files) of `root/folder` in frame order (`natural_key`), as `folder/<name>`.
    Hidden files are no frames: macOS puts an AppleDouble `._<name>` beside a file (one with
    extended attributes) on a foreign volume and in the tars it makes; it would lengthen the clip
    and sort before the frames."""
    names = [n for n in os.listdir(os.path.join(root, folder))
             if n.lower().endswith(FRAME_EXTS) and not n.startswith(".")]
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def _list_frames(folder, root, where):
    full = os.path.join(root, folder)  # an absolute folder stays as it is
    if not os.path.isdir(full):
        raise DataError(f"{where}: frame folder '{folder}' not found (looked for {full})")
    return frame_paths(folder, root)


@dataclasses.dataclass(frozen=True)
class _VideoFolders:
    """read_video's `expand`: lists a folder record's frames under `root` (None: the JSONL's folder) when
    the record is read.  A value (equal for equal roots), so Records of one root concatenate."""
    root: str = None

    def __call__(self, rec, path):
        if "frames" not in rec:
            root = os.path.dirname(os.path.abspath(path)) if self.root is None else self.root
            rec["frames"] = _list_frames(rec["folder"], root, path)
            if not rec["frames"]:  # emptied since read_video checked it: a clip of no frames
                raise DataError(f"{path}: frame folder '{rec['folder']}' holds no frames")
        return rec


def read_video(path, image_root=None):
    """Video records; a record may instead name a folder of frames ({"folder": dir}) which is listed
    in frame order (checked at start-up, listed again each time the record is read: only the name is
    kept).  The folder, like every frame path, is relative to `image_root`, the root the frames are
    loaded from (None: the JSONL's own folder, for callers without one); the returned frame paths are
    `dir/<name>`, relative to that root too.
    """
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root

    def check(rec, i, lineno):
        frames = rec.get("frames")
        if "frames" in rec and not (isinstance(frames, list) and all(isinstance(f, str) for f in frames)):
            raise DataError(f"{path}:{lineno}: field 'frames' should be a list of str (frame paths), "
                            f"got {type(frames).__name__} {str(frames)[:40]!r}")
        if "frames" not in rec:
            if "folder" not in rec:
                raise DataError(f"{path}:{lineno}: missing field 'frames' (or 'folder')")
            if not isinstance(rec["folder"], str):
                got = type(rec["folder"]).__name__
                raise DataError(f"{path}:{lineno}: field 'folder' should be str, got {got}")
            frames = _list_frames(rec["folder"], root, f"{path}:{lineno}")
        if not frames:
            raise DataError(f"{path}:{lineno}: field 'frames' is empty")
        if not rec["captions"]:
            raise DataError(f"{path}:{lineno}: field 'captions' is empty")
        _check_strings(path, lineno, rec, "captions")
        return len(rec["captions"])
    return read_jsonl(path, ("captions",), {"captions": list}, check, _VideoFolders(image_root))


def pre_caption(caption, max_words=30):
    """BLIP's caption cleaning (salesforce/BLIP data/utils.py `pre_caption`): lowercase, the marks
    . ! " ( ) * # : ; ~ become spaces, runs of spaces collapse, keep the first `max_words` words.
    30 is what BLIP's caption datasets pass (data/coco_karpathy_dataset.py, flickr30k_dataset.py);
    utils.py's own default is 50."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def too_many_bad(tried, bad, max_bad_frac, min_tried, final=False):
    """The project's one bad-sample rule: more than `max_bad_frac` of what was tried is unreadable, once at
    least `min_tried` were tried (so one early bad file does not stop a run), or at any count when `final`."""
    return bool(tried) and (final or tried >= min_tried) and bad / tried > max_bad_frac


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

    def gather(self):
        """Merge every rank's counts into this one (each rank reads its own images); returns self."""
        from common.dist import all_gather_object
        for tried, bad in all_gather_object((sorted(self.tried_set), self.bad_paths)):
            self.merge(tried, bad)
        return self

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
        if too_many_bad(self.tried, self.bad, self.max_bad_frac, self.min_tried, final):
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
        return max(0, self.total - self.start) * self.accum  # a resume past total_steps: no steps


def fit_micro_batch(global_batch, micro_batch, world):
    """The micro batch (rows per process per forward) that `world` processes run: the largest divisor of
    global_batch // world that is at most the requested `micro_batch`, so that global_batch = micro x world x
    accumulation (StepSampler).  The global batch is unchanged; only its split (so the memory per GPU) is.  An
    error, naming both numbers, when global_batch is not a multiple of world."""
    if world < 1 or global_batch < world or global_batch % world:
        raise ValueError(f"global_batch {global_batch} must be a multiple of the world size {world} "
                         "(each process takes an equal share of a step)")
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
    share = global_batch // world
    return max(d for d in range(1, min(micro_batch, share) + 1) if share % d == 0)


def fit_micro(cfg, world, log=print, batch="global_batch", micro="micro_batch"):
    """cfg.<micro> <- fit_micro_batch(cfg.<batch>, cfg.<micro>, world), called where a script knows its world
    size, before it builds any model or data, so its sampler, loaders, logs, checkpoints and resume checks all
    see the micro batch that runs; one `log` line when that is not the requested one."""
    asked, total = getattr(cfg, micro), getattr(cfg, batch)
    fit = fit_micro_batch(total, asked, world)
    if fit != asked and log:
        log(f"--{micro} {fit}, not {asked}: {world} processes x {fit} x accumulation {total // (world * fit)} "
            f"= --{batch} {total} (the global batch unchanged)")
    setattr(cfg, micro, fit)
    return cfg


def draw(seed, epoch, index, n):
    """A reproducible choice in range(n) for sample `index` in `epoch` (e.g. which of its captions): the same in
    any worker, on any rank, after any resume."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + index)
    return int(torch.randint(n, (1,), generator=g))


def make_loader(dataset, batch_sampler, collate_fn=None, workers=0, seed=0, rank=0, pin_memory=False):
    """DataLoader over a batch sampler with its *own* seeded generator: worker seeds (and anything the loader
    draws) never come from the global torch RNG, so a resumed run draws exactly what the unbroken one drew.

    With workers > 1 a micro-batch is not handed to one worker (which would decode all of its images while the
    others wait): it is cut into one chunk per worker, the workers load their chunks side by side, and the main
    process collates the chunks' samples in their order -- the same batches as one worker would make, since
    every sample's randomness is seeded by the sample.  pin_memory pins the collated batch (page-locked host
    memory lets the copy to the GPU run asynchronously)."""
    gen = torch.Generator().manual_seed(seed * 7919 + rank)
    if workers <= 1:
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=workers,
            pin_memory=pin_memory, generator=gen, persistent_workers=False)
    return ChunkedLoader(dataset, batch_sampler, collate_fn, workers, gen, pin_memory)


def _chunks(batch_sampler, n):
    for batch in batch_sampler:
        batch = list(batch)
        size = -(-len(batch) // n)  # ceil: exactly n chunks, the last ones shorter (or empty)
        yield from (batch[i * size:(i + 1) * size] for i in range(n))


def pin(batch):
    """Pin every tensor of a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: pin(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(pin(v) for v in batch)
    return batch


class ChunkedLoader:
    """make_loader's loader for workers > 1: iterates like a DataLoader over whole micro-batches."""

    def __init__(self, dataset, batch_sampler, collate_fn, workers, generator, pin_memory):
        self.batch_sampler, self.collate, self.n, self.pin = batch_sampler, collate_fn, workers, pin_memory
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_Chunked(batch_sampler, workers), collate_fn=_as_list, num_workers=workers,
            generator=generator, persistent_workers=False)

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        it = iter(self.loader)
        for chunk in it:
            samples = chunk + [s for _ in range(self.n - 1) for s in next(it)]
            batch = self.collate(samples) if self.collate is not None else \
                torch.utils.data.default_collate(samples)
            yield pin(batch) if self.pin else batch


class _Chunked:
    def __init__(self, batch_sampler, n):
        self.batch_sampler, self.n = batch_sampler, n

    def __iter__(self):
        return _chunks(self.batch_sampler, self.n)

    def __len__(self):
        return len(self.batch_sampler) * self.n


def _as_list(samples):
    return list(samples)


# ------------------------------------------------------------------------------------------------ webdataset shards
# img2dataset's `--output_format webdataset` writes NNNNN.tar shards whose members are key.jpg (or
# png/webp), key.txt (the caption) and key.json (its metadata), a sample's members side by side.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key: up to the basename's first dot (webdataset)


def _braces(spec):
    """Brace expansion of one spec as bash (and braceexpand, which webdataset uses) does it: the
    leftmost outermost group first, so groups nest ("{a,b{1..2}}": a, b1, b2); a range counts up or
    down and keeps the first number's zero padding; a "{" without its "}" stays as it is."""
    for start in (i for i, c in enumerate(spec) if c == "{"):
        depth, cuts = 0, [start]  # cuts: the group's "{" and its top-level commas
        for end in range(start, len(spec)):
            depth += (spec[end] == "{") - (spec[end] == "}")
            if spec[end] == "," and depth == 1:
                cuts.append(end)
            if depth == 0:
                break
        if depth:  # no matching "}"
            continue
        head, tail = spec[:start], spec[end + 1:]
        items = [spec[a + 1:b] for a, b in zip(cuts, cuts[1:] + [end])]
        r = re.fullmatch(r"(\d+)\.\.(\d+)", items[0]) if len(items) == 1 else None
        if r:
            lo, hi = int(r.group(1)), int(r.group(2))
            step = 1 if hi >= lo else -1
            items = [str(k).zfill(len(r.group(1))) for k in range(lo, hi + step, step)]
        return [x for item in items for x in _braces(head + item + tail)]
    return [spec]


def expand_shards(spec):
    """Shard names from a spec: brace ranges as webdataset writes them ("cc3m/{00000..00331}.tar",
    zero padding kept from the first number), brace lists ("{a,b}.tar"), nested as in bash
    (`_braces`), comma-separated specs,
    globs ("cc3m/*.tar", sorted), or a list of specs.  Order is kept; an empty result or a glob
    matching nothing is a DataError."""
    if isinstance(spec, (list, tuple)):
        return [s for one in spec for s in expand_shards(one)]
    parts, depth, cur = [], 0, ""
    for ch in spec:  # split on the commas outside braces
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    out = []
    for name in (n.strip() for p in parts + [cur] for n in _braces(p)):
        if any(c in name for c in "*?["):
            hits = sorted(glob.glob(name))
            if not hits:
                raise DataError(f"{name}: no shard matches")
            out += hits
        elif name:
            out.append(name)
    if not out:
        raise DataError(f"{spec!r}: no shards")
    return out


def _tar_samples(path, shard):
    """(shard, key, {ext: (offset, size)}, problem) for each sample of one tar, in order, from the
    headers alone: member data is read only for samples that are drawn, so fast-forwarding a resumed
    stream reads no images."""
    key, members, error = None, {}, None
    try:
        with tarfile.open(path, "r:") as tf:
            for ti in tf:  # not iter(tf.next, None): Python 3.10's next() fails on an empty tar
                tf.members = []  # keep no TarInfo per member (as webdataset's tariterators.py does)
                m = _KEY_EXT.match(ti.name) if ti.isfile() else None
                if m is None:
                    continue
                if m.group(1) != key:
                    if key is not None:
                        yield shard, key, members, _incomplete(members)
                    key, members = m.group(1), {}
                members[m.group(2).lower()] = (ti.offset_data, ti.size)
    except (tarfile.TarError, OSError) as e:
        error = f"unreadable tar ({e})"
    if key is not None:
        yield shard, key, members, error or _incomplete(members)
    elif error:
        yield shard, "", {}, error


def _has_sample(path):
    """Whether a shard's headers hold a complete sample (a broken tar, keys with a problem: no)."""
    return any(problem is None for *_, problem in _tar_samples(path, 0))


def _incomplete(members):
    if not any(e in members for e in IMAGE_EXTS):
        return "no image member"
    return None if "txt" in members else "no .txt caption member"


def _shuffled(items, size, rng):
    """Bounded-buffer shuffle: fill `size` items, then each new one takes the place of a random one,
    which is yielded; the rest leave in random order at the end.  Bounded as webdataset's `shuffle`
    (filters.py _shuffle) is, not its algorithm: that one starts yielding at 100 items held and
    reads two items a yield until its buffer is full."""
    if size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


class ShardStream(torch.utils.data.IterableDataset):
    """Streaming (image, caption) samples from img2dataset's webdataset tar shards.

    Split: each epoch the shard list is shuffled by (seed, epoch) (kept in order when
    `shuffle_buffer` <= 1) and dealt to the world x workers streams ("slots", slot = rank * workers
    + worker): the k-th shard of that list goes to slot k % slots, so every sample is seen by
    exactly one (rank, worker) per epoch.  Each slot runs through its epochs on
    its own, endlessly (`epochs=None`, what a step-counted training loop wants: no rank runs dry)
    or for `epochs` epochs.  Samples pass a bounded shuffle buffer (`shuffle_buffer`; <= 1: no
    shuffle, shards in order) seeded by (seed, epoch, slot); a transform's `rng` (ImageTransform's)
    is reseeded per sample by (seed, epoch, shard's folder and name, key).

    Unreadable samples (bad image bytes, a caption that is not UTF-8 or empty, a key without image or
    .txt, a broken tar) are skipped and counted with ImageFolderLoader's rule: a DataError once more than
    `max_bad_frac` of at least `min_tried` draws of one stream were bad.  An endless stream whose
    pass yielded no sample stops too: at once when no shard holds a complete sample or shards are
    not shuffled, else after 100 such passes in a row.  Each yielded dict holds
    image (tensor, or PIL without a transform), caption, key, meta (key.json parsed, or {}), shard
    (index), folder (the shard's folder as the spec names it: part of the image id), and for the
    main process (StreamTracker) slot, n_slots, epoch, pos (draws of this slot in this epoch, bad
    ones included), tried (draws since the previous yield) and bad (names of the bad ones among
    them).

    Resume is exact: a slot's stream is a function of (seed, epoch, slot) alone, so skipping the
    `pos` draws it had made (reading tar headers only) puts it where it was; and as DataLoader
    takes the batches from its workers in turn, passing over a worker whose stream has ended
    (finite `epochs`), a resumed worker w plays the slot w places after the one whose batch came
    last (the state's `turns`): endless, after b batches, slot (w + b) % workers.  `resume` is
    StreamTracker.state_dict() (or StreamTracker.merge_states of every rank's); the world size
    and the number of workers must be unchanged (a state saved before any batch was consumed,
    n_slots None, starts afresh with any).
    """

    def __init__(self, shards, transform=None, rank=0, world=1, seed=0, shuffle_buffer=1000,
                 max_bad_frac=0.05, min_tried=20, epochs=None, resume=None):
        self.shards = expand_shards(shards)
        missing = [s for s in self.shards if not os.path.isfile(s)]
        if missing:
            raise DataError(f"{missing[0]}: shard not found "
                            f"({len(missing)} of {len(self.shards)} missing)")
        self.spec = shards if isinstance(shards, str) else f"{len(self.shards)} shards"
        self.transform, self.rank, self.world, self.seed = transform, rank, world, seed
        self.shuffle_buffer, self.max_bad_frac = shuffle_buffer, max_bad_frac
        self.min_tried, self.epochs = min_tried, epochs
        self.resume = resume or {}

    def _draws(self, slot, n_slots, epoch, skip):
        order = list(range(len(self.shards)))
        if self.shuffle_buffer > 1:
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
        source = (item for s in order[slot::n_slots] for item in _tar_samples(self.shards[s], s))
        rng = random.Random(f"{self.seed}-{epoch}-{slot}")
        for pos, item in enumerate(_shuffled(source, self.shuffle_buffer, rng), 1):
            if pos > skip:
                yield pos, item

    def _decode(self, shard, key, members, epoch):
        path = self.shards[shard]
        ext = next(e for e in IMAGE_EXTS if e in members)
        data = {}
        try:
            with open(path, "rb") as f:
                for e in (ext, "txt") + (("json",) if "json" in members else ()):
                    f.seek(members[e][0])
                    data[e] = f.read(members[e][1])
                    if len(data[e]) != members[e][1]:
                        return None, f"truncated .{e}"
        except OSError as e:
            return None, f"unreadable ({e})"
        try:
            caption = data["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, "caption not UTF-8"
        if not caption:  # img2dataset/writer.py writes "" for a null caption; data/convert.py skips it too
            return None, "empty caption"
        img = load_image(io.BytesIO(data[ext]))
        if img is None:
            return None, f"unreadable .{ext}"
        if self.transform is not None:
            if hasattr(self.transform, "rng"):  # the folder too: every img2dataset set has a 00000.tar
                name = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
                self.transform.rng = random.Random(f"{self.seed}-{epoch}-{name}-{key}")
            img = self.transform(img)
        try:  # img2dataset's metadata (url, sizes, ...): informative, so a broken one is no bad sample
            meta = json.loads(data["json"]) if "json" in data else {}
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        return {"image": img, "caption": caption, "meta": meta}, None

    def _check(self, tried, bad, examples, final=False):
        if too_many_bad(tried, bad, self.max_bad_frac, self.min_tried, final):
            raise DataError(f"too many unreadable samples in {self.spec}: {bad} of {tried} samples "
                            f"unreadable in one stream (e.g. {examples[:3]}) "
                            f"(max_bad_frac {self.max_bad_frac})")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        n_slots, state = self.world * n_workers, self.resume
        if len(self.shards) < n_slots:
            raise DataError(f"{self.spec}: {len(self.shards)} shards for {self.world} ranks x "
                            f"{n_workers} workers; each stream needs at least one shard")
        if state.get("n_slots") not in (None, n_slots):  # None: saved before any batch was consumed
            raise DataError(f"resume state is for {state['n_slots']} streams (ranks x workers), this "
                            f"run has {n_slots}: resume with the same world size and workers")
        turns = {int(k): v for k, v in state.get("turns", {}).items()}
        own = [s for s in range(self.rank * n_workers, (self.rank + 1) * n_workers) if s in turns]
        first = state.get("batches", 0) if not own else max(own, key=turns.get) + 1  # the next slot
        slot = self.rank * n_workers + (worker + first) % n_workers
        epoch, skip = {int(k): v for k, v in state.get("slots", {}).items()}.get(slot, (0, 0))
        tried, bad, pending, examples, empty = 0, 0, [], [], 0
        while self.epochs is None or epoch < self.epochs:
            got = 0  # samples yielded in this pass (bad draws, a broken tar's among them, are none)
            for pos, (shard, key, members, problem) in self._draws(slot, n_slots, epoch, skip):
                out = None
                if problem is None:
                    out, problem = self._decode(shard, key, members, epoch)
                tried += 1
                if problem is not None:
                    bad += 1
                    pending.append(f"{os.path.basename(self.shards[shard])}:{key} ({problem})")
                    examples += pending[-1:] if len(examples) < 3 else []
                    self._check(tried, bad, examples)
                    continue
                out.update(key=key, shard=shard, folder=os.path.dirname(self.shards[shard]), slot=slot,
                           n_slots=n_slots, epoch=epoch, pos=pos, tried=1 + len(pending), bad=pending)
                pending, got = [], got + 1
                yield out
            empty = 0 if got or skip else empty + 1
            stuck = empty and self.epochs is None  # endless, yet a whole pass yielded nothing
            if stuck and (self.shuffle_buffer <= 1 or empty > 100  # in order: same shards each pass
                          or not any(_has_sample(p) for p in self.shards)):
                eg = f" that can be read ({bad} of {tried} draws bad, e.g. {examples[:3]})" if bad \
                    else ""
                raise DataError(f"{self.spec}: the shards of stream {slot} hold no samples{eg}")
            epoch, skip = epoch + 1, 0
        self._check(tried, bad, examples, final=True)


def collate_stream(samples):
    """Batch ShardStream samples: images stacked (a list when untransformed); captions, keys and
    meta as lists; the bookkeeping fields as tensors, `tried` summed and `bad` concatenated (for
    StreamTracker.update). `image_id` (ITC positives, never an ITM negative) hashes key.json's
    "image" where the set names one (the toy shards hold an image once per caption), else the
    shard's folder and the key: web data has one caption per image, and img2dataset numbers the
    keys of every set from 000000000, so `cc3m/...` and `sbu/...` shards repeat each other's keys."""
    images = [s["image"] for s in samples]
    out = {"image": torch.stack(images) if isinstance(images[0], torch.Tensor) else images,
           "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples],
           "meta": [s["meta"] for s in samples],
           "n_slots": samples[0]["n_slots"], "tried": sum(s["tried"] for s in samples),
           "bad": [b for s in samples for b in s["bad"]]}
    for k in ("shard", "slot", "epoch", "pos"):
        out[k] = torch.tensor([s[k] for s in samples])
    names = [str(s["meta"]["image"] if "image" in s["meta"] else os.path.join(s.get("folder", ""), s["key"]))
             .encode() for s in samples]
    out["image_id"] = torch.tensor([int.from_bytes(hashlib.blake2b(n, digest_size=7).digest(), "big")
                                    for n in names])
    return out


def stream_loader(stream, micro_batch, workers=0, pin_memory=False):
    """DataLoader over a ShardStream: batches of `micro_batch` samples, made by the workers in turn.
    Its own seeded generator (as make_loader's): starting it draws nothing from the global torch RNG,
    so a resumed run's generators stay where the unbroken run's were."""
    gen = torch.Generator().manual_seed(stream.seed * 7919 + stream.rank)
    return torch.utils.data.DataLoader(stream, batch_size=micro_batch, num_workers=workers,
                                       collate_fn=collate_stream, pin_memory=pin_memory,
                                       persistent_workers=False, generator=gen)


class StreamTracker:
    """The main process's side of a ShardStream: merges the bad-sample counts the consumed batches
    report (the bad-image rule over everything this process consumed: `report()`, `check()`) and
    records how far each slot's consumed samples got and which batch each slot gave last --
    `state_dict()`, the resume state to save with a checkpoint.  Batches prefetched but not
    consumed are not counted, so the state matches the step saved.  Counts restart at zero on
    resume."""

    def __init__(self, spec="shards", max_bad_frac=0.05, min_tried=20, state=None):
        self.spec, self.max_bad_frac, self.min_tried = spec, max_bad_frac, min_tried
        self.tried, self.bad, self.examples = 0, 0, []
        state = state or {}
        self.batches, self.n_slots = state.get("batches", 0), state.get("n_slots")
        self.slots = {int(k): tuple(v) for k, v in state.get("slots", {}).items()}
        self.turns = {int(k): v for k, v in state.get("turns", {}).items()}  # slot: its last batch

    def update(self, batch):
        self.batches += 1
        self.tried, self.bad = self.tried + batch["tried"], self.bad + len(batch["bad"])
        self.n_slots = batch["n_slots"]
        self.examples += batch["bad"][:3 - len(self.examples)]
        positions = zip(batch["slot"].tolist(), batch["epoch"].tolist(), batch["pos"].tolist())
        for slot, epoch, pos in positions:
            self.slots[slot] = max(self.slots.get(slot, (0, 0)), (epoch, pos))
            self.turns[slot] = self.batches

    def state_dict(self):
        return {"batches": self.batches, "n_slots": self.n_slots,
                "slots": {k: list(v) for k, v in sorted(self.slots.items())},
                "turns": dict(sorted(self.turns.items()))}

    @staticmethod
    def merge_states(states):
        """Every rank's state_dict -> one (ranks own disjoint slots and consume equal batches).
        Each slot keeps the furthest (epoch, pos) and the latest turn any state holds: after a
        resume every rank's tracker also holds the other ranks' slots as the resumed state had
        them, stale by now."""
        if len({s["batches"] for s in states}) > 1:
            raise ValueError("ranks consumed different numbers of batches: "
                             f"{[s['batches'] for s in states]}")
        slots, turns = {}, {}
        for s in states:
            for k, v in s["slots"].items():
                slots[k] = max(slots.get(k, v), v, key=tuple)
            for k, v in s.get("turns", {}).items():  # none in a state saved before turns were kept
                turns[k] = max(turns.get(k, v), v)
        return {"batches": states[0]["batches"], "n_slots": states[0]["n_slots"], "slots": slots,
                "turns": turns}

    def report(self):
        eg = f" (e.g. {self.examples})" if self.bad else ""
        return f"{self.bad} of {self.tried} samples unreadable{eg}"

    def check(self, final=False):
        if too_many_bad(self.tried, self.bad, self.max_bad_frac, self.min_tried, final):
            raise DataError(f"too many unreadable samples in {self.spec}: {self.report()} "
                            f"(max_bad_frac {self.max_bad_frac})")


def shard_sample_count(shards):
    """Samples in the shards (for steps per epoch): img2dataset's NNNNN_stats.json `successes` where
    present, otherwise counted from the tar headers."""
    total = 0
    for path in expand_shards(shards):
        stats = os.path.splitext(path)[0] + "_stats.json"
        if os.path.isfile(stats):
            with open(stats, encoding="utf-8") as f:
                total += int(json.load(f)["successes"])
        else:
            total += sum(1 for *_, problem in _tar_samples(path, 0) if problem is None)
    return total
