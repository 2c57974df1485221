"""Canonical dataset readers (pairs, vqa, video) and bad-image handling shared by the scripts.

Formats (DESIGN.md): JSON Lines, one record per line:
    pairs  {"image": path, "captions": [str, ...]}
    vqa    {"image": path, "question": str, "answers": [str x 10], "question_id": int|str}
    video  {"frames": [path, ...], "captions": [str, ...]}
Paths are relative to an image root.  Errors name the file, the line and the field.
"""
import json
import os

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
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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


def read_pairs(path):
    recs = read_jsonl(path, ("image", "captions"), {"image": str, "captions": list})
    for i, r in enumerate(recs):
        if not r["captions"]:
            raise DataError(f"{path}: record {i + 1}: field 'captions' is empty")
    return recs


def read_vqa(path):
    return read_jsonl(path, ("image", "question", "answers", "question_id"),
                      {"image": str, "question": str, "answers": list})


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
    return recs


class ImageFolderLoader:
    """Load + transform images under a root; unreadable ones return None and are counted.

    Call `check()` (e.g. once per epoch or at the end of a loop): it raises when more than `max_bad_frac` of
    the images tried so far were unreadable, so a wrong --image_root fails loudly instead of training on nothing.
    """

    def __init__(self, image_root, transform, max_bad_frac=0.05):
        self.root, self.transform, self.max_bad_frac = image_root, transform, max_bad_frac
        self.tried, self.bad, self.bad_paths = 0, 0, []

    def __call__(self, rel_path):
        self.tried += 1
        img = load_image(os.path.join(self.root, rel_path))
        if img is None:
            self.bad += 1
            if len(self.bad_paths) < 20:
                self.bad_paths.append(rel_path)
            return None
        return self.transform(img)

    def report(self):
        return f"{self.bad} of {self.tried} images unreadable" + (f" (e.g. {self.bad_paths[:3]})" if self.bad else "")

    def check(self):
        if self.tried and self.bad / self.tried > self.max_bad_frac:
            raise DataError(f"too many unreadable images under {self.root}: {self.report()}")


def collate_skip_none(batch):
    """Default-collate the samples that are not None (a None sample is an unreadable image)."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)
