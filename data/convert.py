"""Converters from published dataset layouts to the project's canonical JSON Lines formats.

The five method scripts read three record shapes (data/README.md, "Canonical formats"):

    pairs  {"image": "<path relative to --image_root>", "captions": [str, ...]}
    vqa    {"image": ..., "question": str, "answers": [10 str], "question_id": int | str}
    video  {"frames": ["<path relative to --image_root>", ...], "captions": [str, ...]}

This file turns the layouts the papers actually train and evaluate on into those records:

    coco          official caption annotations (captions_{train,val}{2014,2017}.json), via pycocotools' COCO
    nocaps        NoCaps val captions (nocaps_val_4500_captions.json): pairs with each image's "domain"
    karpathy      Karpathy split files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json)
    blip          BLIP / LAVIS annotation files (coco_karpathy_*.json, flickr30k_*.json)
    flickr30k_csv the Kaggle Flickr30K copy's results.csv, optionally cut to a Karpathy split
    img2dataset   an img2dataset output folder, `--output_format files` or `webdataset` (.tar shards)
    vg            Visual Genome region_descriptions.json (region phrases paired with the whole image)
    vqav2/okvqa   VQA-style questions JSON + annotations JSON, joined on question_id
    gqa           GQA {train,val,testdev}_balanced_questions.json
    mlslt         MLSLT sign-language videos, frames extracted by the ffmpeg command-line tool
    cifar         CIFAR-10 / CIFAR-100 python batches -> an ImageFolder of PNGs (data/benchmarks.py
                  classification reads ImageFolders: ImageNet's train/ and val/ already are one)

Examples (run from the repository root):

    python data/convert.py coco captions_val2017.json --out coco_val2017.jsonl
    python data/convert.py nocaps nocaps_val_4500_captions.json --image_prefix val --out nocaps_val.jsonl
    python data/convert.py karpathy dataset_coco.json --split train --merge_restval --out coco_kp_train.jsonl
    python data/convert.py karpathy dataset_flickr30k.json --split test --image_prefix flickr30k-images \
        --out f30k_test.jsonl
    python data/convert.py flickr30k_csv flickr30k_images/results.csv --karpathy dataset_flickr30k.json \
        --split test --out f30k_test.jsonl        # then --image_root flickr30k_images (the csv's folder)
    python data/convert.py blip coco_karpathy_test.json --out coco_kp_test.jsonl
    python data/convert.py img2dataset cc3m/ --image_prefix cc3m --out cc3m.jsonl --check_images
    python data/convert.py img2dataset laion_wds/ --check_images       # .tar shards: count and check only
    python data/convert.py img2dataset laion_wds/ --extract_to laion_files --out laion.jsonl
    python data/convert.py vg region_descriptions.json --image_root /data/vg --max_regions_per_image 10 --out vg.jsonl
    python data/convert.py vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json \
        --annotations v2_mscoco_val2014_annotations.json --out vqav2_val.jsonl
    python data/convert.py gqa testdev_balanced_questions.json --out gqa_testdev.jsonl
    python data/convert.py mlslt MLSLT/ --split train --frames_dir mlslt_frames --out mlslt_train.jsonl
    python data/convert.py cifar cifar-100-python/ --out data/benchmarks/classification/cifar100

Every converter is also a function returning the records (`convert_coco`, ...; `convert_cifar`: counts);
skipped records are counted by reason in a `Report`.  Bad input (missing file, missing or wrong-typed
field) raises `ConversionError` whose one-line message names the file, the record and the field; the CLI
prints it and exits with status 1.  Nothing runs at import.
"""
import argparse
import contextlib
import io
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

# VQA answers are 10 per question: the official accuracy is min(#humans that said it / 3, 1)
# (Antol et al. 2015, arXiv 1505.00468, Sec. 3 "Answers"), averaged over the 10 leave-one-out
# sets of 9 annotators (visualqa.org/evaluation.html, the official evaluation code; VQAv2:
# arXiv 1612.00837).
VQA_NUM_ANSWERS = 10


class ConversionError(ValueError):
    """Bad input.  The message is one line: '<file>: <record>: <what is wrong with which field>'."""


class Report:
    """What a conversion dropped (counted per reason, with a few example ids) and what it noticed."""

    def __init__(self, max_examples=5):
        self.skipped = Counter()
        self.warnings = Counter()
        self.examples = {}
        self.notes = []
        self.max_examples = max_examples

    def _example(self, reason, example):
        if example is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < self.max_examples:
                ex.append(example)

    def skip(self, reason, example=None, n=1):
        self.skipped[reason] += n
        self._example(reason, example)

    def warn(self, reason, example=None, n=1):
        """Something odd that did not drop the record."""
        self.warnings[reason] += n
        self._example(reason, example)

    def note(self, text):
        self.notes.append(text)

    def merge(self, other):
        """Add another Report's counts, examples and notes (one per worker process)."""
        self.skipped.update(other.skipped)
        self.warnings.update(other.warnings)
        for reason, examples in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(examples[:max(0, self.max_examples - len(mine))])
        self.notes.extend(other.notes)

    @property
    def total_skipped(self):
        return sum(self.skipped.values())

    def lines(self):
        out = []
        for kind, counter in (("skipped", self.skipped), ("warning", self.warnings)):
            for reason, n in counter.most_common():
                ex = self.examples.get(reason)
                tail = f" (e.g. {', '.join(str(e) for e in ex)})" if ex else ""
                out.append(f"{kind} {n}: {reason}{tail}")
        out.extend(self.notes)
        return out


# ---------------------------------------------------------------------------------------------------
# Validation helpers: every error names the file, the record and the field.
# ---------------------------------------------------------------------------------------------------

def _type_names(typ):
    typs = typ if isinstance(typ, tuple) else (typ,)
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object",
             bool: "a boolean"}
    return " or ".join(names.get(t, t.__name__) for t in typs)


def _check_type(value, typ, path, where, key):
    typs = typ if isinstance(typ, tuple) else (typ,)
    # bool is a subclass of int in Python; JSON true/false is never a valid id or count.
    ok = isinstance(value, typs) and not (isinstance(value, bool) and bool not in typs)
    if not ok:
        got = "null" if value is None else type(value).__name__
        raise ConversionError(f"{path}: {where}: field '{key}' should be {_type_names(typ)}, got {got}")
    return value


def _expect_object(rec, path, where):
    if not isinstance(rec, dict):
        raise ConversionError(f"{path}: {where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def _get(rec, key, typ, path, where):
    """rec[key], checked to exist and to have type `typ`; else a one-line ConversionError."""
    _expect_object(rec, path, where)
    if key not in rec:
        raise ConversionError(f"{path}: {where}: missing field '{key}'")
    return _check_type(rec[key], typ, path, where, key)


def _load_json(path, top_type=None):
    path = str(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if top_type is not None and not isinstance(data, top_type):
        raise ConversionError(f"{path}: top level: expected {_type_names(top_type)}, got {type(data).__name__}")
    return data


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
LONE_SURROGATE = "lone UTF-16 surrogate escape in a text (replaced by U+FFFD)"


def _valid_text(text, report, example=None):
    """`text` with each lone UTF-16 surrogate escape ("\\ud83d": half an emoji, cut off in web-scraped
    captions) replaced by U+FFFD, counted: json.load accepts one, but it cannot be written as UTF-8."""
    if _LONE_SURROGATE.search(text) is None:
        return text
    report.warn(LONE_SURROGATE, example)
    return _LONE_SURROGATE.sub("\ufffd", text)


def _clean(text, report, example=None):
    """Captions in COCO / Karpathy / BLIP / VG files often end in ' ' or '\\n' (e.g. COCO ann 2970)."""
    return _valid_text(text.strip(), report, example)


def _join(*parts):
    """Image paths in canonical files are '/'-joined and relative to --image_root; empty parts drop out."""
    parts = [p for p in parts if p]
    return posixpath.join(*parts) if parts else ""


def _image_path(report, prefix, *parts):
    """`_join(prefix, *parts)` for an image path read from an annotation file, with a warning (counted, with
    examples) where the file's path is absolute (a join would silently drop the prefix: it is kept as given, and
    --image_root no longer applies) or climbs out of the image root with '..'."""
    given = _join(*parts)
    if posixpath.isabs(given) or os.path.isabs(given):
        report.warn("absolute image path (--image_prefix and --image_root not applied)", given)
        return given
    path = _join(prefix, given)
    if ".." in path.replace("\\", "/").split("/"):
        report.warn("image path contains '..' (reaches outside the image root)", path)
    return path


# ---------------------------------------------------------------------------------------------------
# Caption pairs
# ---------------------------------------------------------------------------------------------------

def _infer_coco_subdir(ann_path, images):
    """The image folder of a COCO caption file ('val2017', 'train2014', ...).

    2014 file names carry it (COCO_val2014_000000391895.jpg); 2017 names do not (000000397133.jpg), but
    coco_url does (http://images.cocodataset.org/val2017/000000397133.jpg), and so does the file name
    of the annotation file itself (captions_val2017.json).
    """
    pat = re.compile(r"((?:train|val|test)20\d\d)")
    if images:
        m = re.match(r"COCO_((?:train|val|test)20\d\d)_", images[0]["file_name"])
        if m:
            return m.group(1)
        url = images[0].get("coco_url")
        if isinstance(url, str):
            m = pat.fullmatch(posixpath.basename(posixpath.dirname(url)))
            if m:
                return m.group(1)
    m = pat.search(os.path.basename(str(ann_path)))
    if m:
        return m.group(1)
    raise ConversionError(f"{ann_path}: cannot tell the image folder (val2017, train2014, ...) from the file; "
                          f"pass --images_subdir")


def convert_coco(ann_path, images_subdir=None, report=None):
    """Official COCO caption annotations -> pairs, one record per image with all its captions.

    Annotations are interleaved across images in the file; pycocotools' index (imgToAnns) groups them,
    keeping file order.  Most images have 5 captions, some 6 or 7 (val2017 image 431896 has 7): all are
    kept.  `images_subdir` (e.g. 'val2017') is prefixed to file_name; None infers it.
    """
    from pycocotools.coco import COCO  # imported here: nothing heavy at import time

    report = report if report is not None else Report()
    ann_path = str(ann_path)
    data = _load_json(ann_path, dict)
    images = _get(data, "images", list, ann_path, "top level")
    anns = _get(data, "annotations", list, ann_path, "top level")
    # Validate before pycocotools indexes the file: its createIndex would fail with a bare KeyError.
    seen = set()
    for i, img in enumerate(images):
        img_id = _get(img, "id", int, ann_path, f"images[{i}]")
        _get(img, "file_name", str, ann_path, f"images[{i}] (id {img_id})")
        if img_id in seen:
            raise ConversionError(f"{ann_path}: images[{i}] (id {img_id}): field 'id' repeats an earlier image")
        seen.add(img_id)
    for j, ann in enumerate(anns):
        ann_id = _get(ann, "id", int, ann_path, f"annotations[{j}]")
        where = f"annotations[{j}] (id {ann_id})"
        image_id = _get(ann, "image_id", int, ann_path, where)
        _get(ann, "caption", str, ann_path, where)
        if image_id not in seen:
            report.skip("annotation of an image not listed in 'images'", ann_id)
    if images_subdir is None:
        images_subdir = _infer_coco_subdir(ann_path, images)

    coco = COCO()
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.dataset = data
        coco.createIndex()

    records = []
    for img_id in coco.getImgIds():  # insertion order = order of the 'images' list
        img = coco.loadImgs(img_id)[0]
        captions = []
        # imgToAnns holds the annotation objects themselves; loadAnns(getAnnIds(...)) would look
        # them up by id again, and a repeated annotation id would give one image another's caption.
        for ann in coco.imgToAnns[img_id]:
            cap = _clean(ann["caption"], report, ann["id"])
            if cap:
                captions.append(cap)
            else:
                report.skip("empty caption", ann["id"])
        if not captions:
            report.skip("image without captions", img_id)
            continue
        records.append({"image": _image_path(report, images_subdir, img["file_name"]), "captions": captions})
    return records


KARPATHY_SPLITS = ("train", "val", "test", "restval")


def convert_karpathy(json_path, split, image_prefix="", merge_restval=False, report=None):
    """Karpathy split JSON (dataset_coco / dataset_flickr8k / dataset_flickr30k) -> pairs of one split.

    COCO records carry `filepath` ('train2014' / 'val2014') + `filename`; Flickr records only `filename`,
    so give `image_prefix` (e.g. 'flickr30k-images').  Captions come from `raw` (original casing), stripped.
    `merge_restval` adds the 'restval' images (30,504 of val2014) to 'train', as NegCLIP, BLIP and most
    COCO retrieval/caption work do (Karpathy & Fei-Fei 2015 kept them apart only for their own val).
    """
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {KARPATHY_SPLITS}, got {split!r}")
    if merge_restval and split != "train":
        raise ValueError("merge_restval only applies to split 'train'")
    report = report if report is not None else Report()
    json_path = str(json_path)
    data = _load_json(json_path, dict)
    images = _get(data, "images", list, json_path, "top level")
    wanted = {split, "restval"} if merge_restval else {split}
    records = []
    for i, img in enumerate(images):
        _expect_object(img, json_path, f"images[{i}]")
        where = f"images[{i}]" + (f" (imgid {img['imgid']})" if "imgid" in img else "")
        img_split = _get(img, "split", str, json_path, where)
        filename = _get(img, "filename", str, json_path, where)
        filepath = _check_type(img["filepath"], str, json_path, where, "filepath") if "filepath" in img else ""
        sentences = _get(img, "sentences", list, json_path, where)
        if img_split not in wanted:
            if img_split not in KARPATHY_SPLITS:
                report.warn(f"unknown split {img_split!r} (ignored)", filename)
            continue
        captions = []
        for k, sent in enumerate(sentences):
            raw = _clean(_get(sent, "raw", str, json_path, f"{where} sentences[{k}]"), report, filename)
            if raw:
                captions.append(raw)
            else:
                report.skip("empty caption", filename)
        if not captions:
            # e.g. some public copies of dataset_flickr8k.json have empty `sentences` on test images
            report.skip("image without sentences", filename)
            continue
        records.append({"image": _image_path(report, image_prefix, filepath, filename), "captions": captions})
    return records


def convert_blip(json_path, image_prefix="", report=None):
    """BLIP / LAVIS annotation file -> pairs, one record per image.

    Train files (coco_karpathy_train, flickr30k_train) hold one entry per caption,
    {"caption": str, "image": path, "image_id": "coco_522418"}: captions are grouped per image, in file
    order.  Val/test files hold one entry per image, {"image": path, "caption": [str, ...]}, no image_id.
    """
    report = report if report is not None else Report()
    json_path = str(json_path)
    data = _load_json(json_path, list)
    by_image = {}  # image path -> record; dicts keep first-seen order
    image_of_id = {}  # image_id -> image path, to catch an id that names two images
    for i, entry in enumerate(data):
        where = f"[{i}]"
        image = _get(entry, "image", str, json_path, where)
        caption = _get(entry, "caption", (str, list), json_path, where)
        if "image_id" in entry:
            image_id = _check_type(entry["image_id"], (str, int), json_path, where, "image_id")
            where = f"[{i}] (image_id {image_id})"
            first = image_of_id.setdefault(image_id, image)
            if first != image:
                raise ConversionError(f"{json_path}: {where}: field 'image' is {image!r} but an earlier entry "
                                      f"with this image_id has {first!r}")
        captions = [caption] if isinstance(caption, str) else caption
        rec = by_image.setdefault(image, {"image": _image_path(report, image_prefix, image), "captions": []})
        for k, cap in enumerate(captions):
            cap = _clean(_check_type(cap, str, json_path, f"{where} caption[{k}]", "caption"), report, image)
            if cap:
                rec["captions"].append(cap)
            else:
                report.skip("empty caption", image)
    records = []
    for rec in by_image.values():
        if rec["captions"]:
            records.append(rec)
        else:
            report.skip("image without captions", rec["image"])
    return records


NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


def convert_nocaps(json_path, image_prefix="", report=None):
    """NoCaps caption file (nocaps_val_4500_captions.json) -> pairs with the image's "domain", one record per image.

    COCO layout (nocaps.org/download; Agrawal et al., ICCV 2019, arXiv 1812.08658): "images" [{"id", "file_name",
    "open_images_id", "domain": "in-domain" | "near-domain" | "out-domain", "coco_url", "height", "width", ...}],
    "annotations" [{"image_id", "id", "caption"}], 10 captions per image, in file order.  Records also keep
    "image_id" (the id the evaluation server's predictions name).  `image_prefix` is the image folder (file_name is a
    bare Open Images name, e.g. 0013ea2087020901.jpg).  The image-info files (nocaps_{val,test}_image_info.json)
    carry no captions: the converter stops with one line naming the missing field.
    """
    report = report if report is not None else Report()
    json_path = str(json_path)
    data = _load_json(json_path, dict)
    images = _get(data, "images", list, json_path, "top level")
    anns = _get(data, "annotations", list, json_path, "top level")
    by_id = {}  # image id -> record; dicts keep the order of "images"
    for i, img in enumerate(images):
        img_id = _get(img, "id", int, json_path, f"images[{i}]")
        where = f"images[{i}] (id {img_id})"
        file_name = _get(img, "file_name", str, json_path, where)
        domain = _get(img, "domain", str, json_path, where)
        if domain not in NOCAPS_DOMAINS:
            raise ConversionError(f"{json_path}: {where}: field 'domain' is {domain!r}, expected one of "
                                  f"{', '.join(NOCAPS_DOMAINS)}")
        if img_id in by_id:
            raise ConversionError(f"{json_path}: {where}: field 'id' repeats an earlier image")
        by_id[img_id] = {"image": _image_path(report, image_prefix, file_name), "captions": [], "domain": domain,
                         "image_id": img_id}
    for j, ann in enumerate(anns):
        ann_id = _get(ann, "id", int, json_path, f"annotations[{j}]")
        where = f"annotations[{j}] (id {ann_id})"
        image_id = _get(ann, "image_id", int, json_path, where)
        cap = _clean(_get(ann, "caption", str, json_path, where), report, ann_id)
        if image_id not in by_id:
            report.skip("annotation of an image not listed in 'images'", ann_id)
        elif not cap:
            report.skip("empty caption", ann_id)
        else:
            by_id[image_id]["captions"].append(cap)
    records = []
    for img_id, rec in by_id.items():
        if rec["captions"]:
            records.append(rec)
        else:
            report.skip("image without captions", img_id)
    counts = Counter(r["domain"] for r in records)
    report.note("domains: " + ", ".join(f"{d} {counts[d]}" for d in NOCAPS_DOMAINS))
    return records


_F30K_HEADER = ["image_name", "comment_number", "comment"]
_F30K_NUMBER_THEN_COMMENT = re.compile(r"(\d+)\s+(\S.*)")


def convert_flickr30k_csv(csv_path, karpathy_json=None, split=None, image_prefix="flickr30k_images", report=None):
    """The Kaggle copy of Flickr30K (flickr30k_images/results.csv) -> pairs, one record per image.

    Lines read 'image_name| comment_number| comment' (the header too), with a space after each '|'.  It is
    not CSV: captions are tokenised ('... in the yard .') and hold bare '"' that a CSV reader would pair
    across lines, so each line is split at its first two '|' and quotes are kept as text.  Quirks, each
    counted: the row of 2199200615.jpg comment 4 has no second '|' ('2199200615.jpg| 4   A dog runs ...'):
    the number and the comment are split at the first space; runs of spaces are collapsed; rows without a
    comment or not UTF-8 are skipped.  Captions keep file order.  Images: <image_prefix>/<image_name> (the
    Kaggle zip holds flickr30k_images/results.csv next to flickr30k_images/flickr30k_images/*.jpg, so the
    default prefix makes paths relative to the csv's folder).  With a Karpathy split file
    (dataset_flickr30k.json), only the images of `split` are kept; rows of images it does not list are
    counted, and so are images of the split without rows.
    """
    report = report if report is not None else Report()
    csv_path = str(csv_path)
    if (karpathy_json is None) != (split is None):
        raise ValueError("a Karpathy split file and a split go together")
    if split is not None and split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {KARPATHY_SPLITS}, got {split!r}")
    split_of = None
    if karpathy_json is not None:
        karpathy_json = str(karpathy_json)
        images = _get(_load_json(karpathy_json, dict), "images", list, karpathy_json, "top level")
        split_of = {}
        for i, img in enumerate(images):
            filename = _get(img, "filename", str, karpathy_json, f"images[{i}]")
            split_of[filename] = _get(img, "split", str, karpathy_json, f"images[{i}] ({filename})")
    if not os.path.isfile(csv_path):
        raise ConversionError(f"{csv_path}: file not found")
    by_image, unlisted = {}, set()
    header_checked = False
    with open(csv_path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").lstrip("\ufeff").rstrip("\r\n")
            except UnicodeDecodeError as e:
                report.skip(f"line not UTF-8 (byte {e.start})", f"line {lineno}")
                continue
            if not line.strip():
                continue
            fields = line.split("|", 2)
            if not header_checked:
                header_checked = True
                if [x.strip() for x in fields] == _F30K_HEADER:
                    continue
                if not fields[0].strip().lower().endswith((".jpg", ".jpeg", ".png")):
                    raise ConversionError(f"{csv_path}: line {lineno}: expected the header "
                                          f"'image_name| comment_number| comment', got {line[:60]!r}")
                report.warn("no header line (the first line is read as a row)")
            name = fields[0].strip()
            where = f"line {lineno} ({name})"
            number_comment = _F30K_NUMBER_THEN_COMMENT.fullmatch(fields[1].strip()) if len(fields) == 2 else None
            if len(fields) == 3:
                number, comment = fields[1].strip(), fields[2]
            elif number_comment:
                number, comment = number_comment.groups()
                report.warn("row without its second '|' (number and comment split at the first space)", where)
            else:
                report.skip("row without a comment", where)
                continue
            comment = " ".join(comment.split())
            if not name or not comment:
                report.skip("row with an empty image name or comment", where)
                continue
            if not number.isdigit():
                report.warn("comment_number not a number (row kept)", where)
            if split_of is not None:
                if name not in split_of:
                    report.skip("row of an image not in the split file", None if name in unlisted else name)
                    unlisted.add(name)
                    continue
                if split_of[name] != split:
                    continue
            by_image.setdefault(name, []).append(comment)
    if not header_checked:
        raise ConversionError(f"{csv_path}: no rows (empty file)")
    if split_of is not None:
        for name, s in split_of.items():
            if s == split and name not in by_image:
                report.warn(f"image of split {split!r} without rows in the csv", name)
    return [{"image": _image_path(report, image_prefix, name), "captions": caps} for name, caps in by_image.items()]


_IMG2DATASET_IMAGE_EXTS = ("jpg", "png", "webp", "jpeg")
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _load_image(path_or_file):
    """common.image.load_image, imported on first use: it brings torch, which counting samples does not need."""
    from common.image import load_image

    return load_image(path_or_file)


def _img2dataset_layout(folder, layout="auto"):
    """('files' | 'webdataset', shard names): img2dataset writes <shard>/ subfolders for --output_format files and
    <shard>.tar files for --output_format webdataset, next to <shard>.parquet and <shard>_stats.json."""
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder}: folder not found")
    names = os.listdir(folder)
    dirs = sorted(n for n in names if n.isdigit() and os.path.isdir(os.path.join(folder, n)))
    tars = sorted(n[:-4] for n in names if n.endswith(".tar") and n[:-4].isdigit()
                  and os.path.isfile(os.path.join(folder, n)))
    if layout == "auto":
        if dirs and tars:
            raise ConversionError(f"{folder}: holds both shard subfolders and .tar shards; pass --layout files "
                                  f"or --layout webdataset")
        layout = "webdataset" if tars else "files"
    shards = tars if layout == "webdataset" else dirs
    if not shards:
        raise ConversionError(f"{folder}: no shard subfolders or .tar shards (expected 00000/ or 00000.tar, ... "
                              f"from img2dataset)")
    return layout, shards


def _img2dataset_caption(report, key, txt, meta, path, where, txt_example):
    """The caption of one sample with sidecar `meta`, or None when the sample is skipped (counted): the .txt
    bytes (img2dataset writes str(caption), no newline), else the .json "caption" field."""
    status = _get(meta, "status", str, path, where)
    if status != "success":
        report.skip(f"status {status!r}", key)
        return None
    if txt is not None:
        try:
            caption = txt.decode("utf-8")
        except UnicodeDecodeError as e:  # a bad sample, counted like a failed download
            report.skip(f"caption .txt not UTF-8 (byte {e.start})", txt_example)
            return None
    else:
        caption = meta.get("caption")
        if caption is not None:
            _check_type(caption, str, path, where, "caption")
    caption = _clean(caption or "", report, key)
    if not caption:
        report.skip("no caption (.txt absent and no 'caption' in .json)", key)
        return None
    return caption


def _img2dataset_failed(report, folder, shard, keys, container, count_gaps=True):
    """Count the failed samples of a shard; returns its _stats.json (or None).

    img2dataset writes nothing for a failed download/resize in the shard (folder or .tar), only a parquet
    row (img2dataset/writer.py), so failures are the keys missing under <shard>_stats.json "count" (without
    the stats file, the gaps before the last key).  A key is shard_id * 10**digits + index in the shard."""
    reason = f"failed sample: no files in the {container} (failed_to_download/resize)"
    keys = [k for k in keys if k.isdigit() and len(k) > len(shard)]
    found_idx = {int(k) - int(shard) * 10 ** (len(k) - len(shard)) for k in keys}
    stats_path = os.path.join(folder, f"{shard}_stats.json")
    stats, count = None, None
    if os.path.isfile(stats_path):
        stats = _load_json(stats_path, dict)
        count = _get(stats, "count", int, stats_path, "top level")
        status_dict = stats.get("status_dict")
        if isinstance(status_dict, dict):
            fails = {k: v for k, v in status_dict.items() if k != "success"}
            if fails:
                report.note(f"{shard}_stats.json failures: " + ", ".join(f"{k}: {v}" for k, v in fails.items()))
    elif found_idx:
        count = max(found_idx) + 1
    if not count_gaps:
        return stats
    if count is not None and keys:
        digits = len(keys[0]) - len(shard)
        for idx in range(count):
            if idx not in found_idx:
                report.skip(reason, f"{int(shard) * 10 ** digits + idx:0{len(keys[0])}d}")
    elif count:
        report.skip(reason, n=count)
    return stats


def convert_img2dataset(folder, image_prefix="", encode_format="jpg", report=None, layout="auto",
                        check_images=False, extract_to=None, jobs=1):
    """An img2dataset output folder -> pairs with one caption each; `--output_format files` or `webdataset`.

    files: <folder>/<shard>/<key>.{jpg,txt,json}.  Only samples whose sidecar .json says status == "success"
    are kept.  The caption is the .txt, else the .json "caption" field.  The image is <key>.<ext> for
    whichever ext exists, else <key>.<encode_format> (annotation-only copies; `check_images` drops records
    whose image is missing or unreadable).  webdataset: <folder>/<shard>.tar holding the same three members
    per key: see `_img2dataset_tar`.  Failed samples are counted per shard (`_img2dataset_failed`).
    `layout` 'auto' tells the two apart.  Image paths are <image_prefix>/<shard>/<key>.<ext>: in the folder
    itself (files) or under `extract_to` (webdataset), where the kept samples are written in the files layout
    (a file there with other bytes, another set's extraction, is a ConversionError: `_extract_file`).
    `jobs` > 1 reads that many .tar shards at once in worker processes (tar headers are parsed in Python).
    """
    report = report if report is not None else Report()
    folder = str(folder)
    layout, shards = _img2dataset_layout(folder, layout)
    if layout == "webdataset":
        for shard in shards if extract_to else ():  # before anything is written: another set's _stats.json
            stats = os.path.join(folder, f"{shard}_stats.json")  # (img2dataset's timings differ each run)
            if os.path.isfile(stats):
                with open(stats, "rb") as f:
                    _extract_file(extract_to, f"{shard}_stats.json", f.read(), check_only=True)
        records = []
        tasks = [(folder, shard, image_prefix, check_images, extract_to) for shard in shards]
        with ProcessPoolExecutor(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
            for shard_records, shard_report in (pool.map if pool else map)(_img2dataset_tar_job, tasks):
                records += shard_records
                report.merge(shard_report)
        return records
    records = []
    n_missing_images = 0
    for shard in shards:
        shard_dir = os.path.join(folder, shard)
        names = set(os.listdir(shard_dir))
        keys = sorted({os.path.splitext(n)[0] for n in names if os.path.splitext(n)[0].isdigit()})
        for key in keys:
            meta_path = os.path.join(shard_dir, key + ".json")
            if key + ".json" not in names:
                report.skip("no .json sidecar (status unknown)", key)
                continue
            txt = None
            if key + ".txt" in names:
                with open(os.path.join(shard_dir, key + ".txt"), "rb") as f:
                    txt = f.read()
            with open(meta_path, "rb") as f:
                meta = f.read()
            try:  # a sidecar cut short (a crashed download run): one bad sample, as in a .tar shard
                meta = json.loads(meta.decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError(f"a JSON {type(meta).__name__}, not an object")
            except (UnicodeDecodeError, ValueError) as e:
                report.skip(f"unreadable .json sidecar ({type(e).__name__})",
                            os.path.join(shard, key + ".json"))
                continue
            caption = _img2dataset_caption(report, key, txt, meta, meta_path, f"key {key}",
                                           os.path.join(shard, key + ".txt"))
            if caption is None:
                continue
            ext = next((e for e in (encode_format,) + _IMG2DATASET_IMAGE_EXTS if f"{key}.{e}" in names), None)
            if ext is None:
                n_missing_images += 1
                ext = encode_format
            if check_images:
                image_path = os.path.join(shard_dir, f"{key}.{ext}")
                if not os.path.isfile(image_path):
                    report.skip("image file missing", os.path.join(shard, f"{key}.{ext}"))
                    continue
                if _load_image(image_path) is None:
                    report.skip("image unreadable", os.path.join(shard, f"{key}.{ext}"))
                    continue
            records.append({"image": _join(image_prefix, shard, f"{key}.{ext}"), "captions": [caption]})
        _img2dataset_failed(report, folder, shard, keys, "shard folder")
    if n_missing_images and not check_images:
        report.warn(f"image file not present; path assumes .{encode_format}", n=n_missing_images)
    return records


def _tar_samples(tar_path, shard, report, state):
    """Yield (key, {ext: bytes}) per sample of one shard, in file order, one sample in memory at a time.

    Members are grouped as webdataset does: key = the name up to its first '.', ext = the rest, a sample's
    members next to each other.  A corrupt header in the middle of a tar ends Python's tarfile iteration
    silently, so the bytes after the last member must be the end-of-archive zero blocks (two of 512 bytes,
    POSIX ustar); state["broken"] says why the read stopped early (None when it did not)."""
    group, key, parts, seen = None, None, {}, set()
    state["broken"] = None
    with open(tar_path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
            for m in tar:
                example = f"{shard}.tar:{m.name}"
                name_key, _, ext = m.name.partition(".")
                if not m.isfile():
                    report.warn("tar member that is not a regular file (ignored)", example)
                    continue
                if not _SAFE_KEY.fullmatch(name_key) or not ext:
                    report.warn("tar member named otherwise than <key>.<ext> (ignored)", example)
                    continue
                if name_key != group:  # a new sample begins
                    if key is not None:
                        yield key, parts
                    group, key, parts = name_key, (None if name_key in seen else name_key), {}
                    if key is None:
                        report.skip("key repeated apart from its first members (ignored)", example)
                    seen.add(name_key)
                if key is None:
                    continue
                if ext.lower() in parts:
                    report.skip("repeated tar member (the first is kept)", example)
                    continue
                parts[ext.lower()] = tar.extractfile(m).read()
            f.seek(tar.offset)
            tail = f.read(20480)
            if len(tail) < 1024 or tail.strip(b"\0"):
                state["broken"] = f"no end-of-archive blocks after byte {tar.offset}: corrupt or truncated"
        except (tarfile.TarError, OSError, EOFError) as e:
            state["broken"] = f"{type(e).__name__}: {e}"
            key = None  # the sample being read is cut: it counts as lost, not as a sample with a missing member
    if key is not None:
        yield key, parts


def _img2dataset_tar_job(task):
    """One shard with its own Report, so that shards can be read in worker processes."""
    report = Report()
    return _img2dataset_tar(*task[:3], report, *task[3:]), report


def _img2dataset_tar(folder, shard, image_prefix, report, check_images, extract_to):
    """Pairs of one img2dataset webdataset shard <folder>/<shard>.tar (members <key>.<jpg|png|webp>,
    <key>.txt, <key>.json: img2dataset/writer.py WebDatasetSampleWriter).  Unreadable members (a .json that
    is not UTF-8 JSON, a .txt that is not UTF-8, an image that does not decode under `check_images`) and
    orphans (a key without its image or its .json) are skipped and counted; a shard whose read stops early
    is counted, and so are the samples its _stats.json says it holds beyond what could be read."""
    tar_path = os.path.join(folder, f"{shard}.tar")
    if extract_to:
        os.makedirs(os.path.join(extract_to, shard), exist_ok=True)
    records, keys, state = [], [], {}
    for key, parts in _tar_samples(tar_path, shard, report, state):
        keys.append(key)
        example = f"{shard}.tar:{key}"
        for ext in parts:
            if ext not in ("txt", "json") + _IMG2DATASET_IMAGE_EXTS:
                report.warn("tar member of another kind (ignored)", f"{example}.{ext}")
        img_ext = next((e for e in _IMG2DATASET_IMAGE_EXTS if e in parts), None)
        if "json" not in parts:
            report.skip("no .json member (status unknown)", example)
            continue
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        except (UnicodeDecodeError, ValueError) as e:
            report.skip(f"unreadable .json member ({type(e).__name__})", f"{example}.json")
            continue
        caption = _img2dataset_caption(report, key, parts.get("txt"), meta, tar_path, f"member {key}.json",
                                       f"{example}.txt")
        if caption is None:
            continue
        if img_ext is None:
            report.skip("no image member (orphan .txt/.json)", example)
            continue
        if check_images and _load_image(io.BytesIO(parts[img_ext])) is None:
            report.skip("image unreadable", f"{example}.{img_ext}")
            continue
        if extract_to:
            for ext in (img_ext, "txt", "json"):
                if ext in parts:
                    _extract_file(extract_to, os.path.join(shard, f"{key}.{ext}"), parts[ext])
        records.append({"image": _join(image_prefix, shard, f"{key}.{img_ext}"), "captions": [caption]})
    broken = state["broken"]
    if broken:
        report.skip(f"corrupt .tar shard, read stopped early ({broken})", f"{shard}.tar")
    stats = _img2dataset_failed(report, folder, shard, keys, ".tar shard", count_gaps=not broken)
    if stats is not None and extract_to:  # the files layout keeps it: converting the extraction counts the same
        with open(os.path.join(folder, f"{shard}_stats.json"), "rb") as f:
            _extract_file(extract_to, f"{shard}_stats.json", f.read())
    if broken and stats is not None and isinstance(stats.get("successes"), int):
        lost = stats["successes"] - len(keys)  # img2dataset puts only successes in the tar
        if lost > 0:
            report.skip("sample lost in a corrupt .tar shard (a success in _stats.json, not readable)", n=lost)
        failed = stats.get("count", 0) - stats["successes"]
        if failed > 0:
            report.skip("failed sample: no files in the .tar shard (failed_to_download/resize)", n=failed)
    return records


def _vg_folder(image_id, image_root, url):
    """VG images are split over VG_100K/ and VG_100K_2/ (image 1 is in VG_100K_2): the folder the image is
    found in under image_root, else the one image_data.json's URL names, else None (unknown)."""
    if image_root:
        for sub in ("VG_100K", "VG_100K_2"):
            if os.path.exists(os.path.join(image_root, sub, f"{image_id}.jpg")):
                return sub
    if url:
        return "VG_100K_2" if "/VG_100K_2/" in url else "VG_100K"
    return None


def convert_vg(regions_path, image_root=None, image_data_path=None, max_regions_per_image=0, min_words=0,
               report=None):
    """Visual Genome region_descriptions.json -> pairs: each image with its region phrases as captions.

    The file is a list aligned index-for-index with image_data.json; its per-image key is `id` (the other
    VG files say `image_id`).  Phrases are stripped ("shade is along the street ").  The image folder is
    whichever of VG_100K / VG_100K_2 holds <id>.jpg under `image_root`, else the folder in image_data.json's
    url, else VG_100K with a warning.  `max_regions_per_image` keeps the first N phrases (0 = all); `min_words` drops
    shorter phrases.  Neither reproduces BLIP's vg_caption.json (821k texts, salesforce/BLIP
    issue #27): that is ALBEF's filtered set, made by several filters (images of the COCO /
    RefCOCO+ evaluation sets, repeated sentences, small regions, ...: salesforce/ALBEF issue #2),
    with no code released.
    """
    if max_regions_per_image < 0 or min_words < 0:  # phrases[:-1] would drop each last phrase
        raise ValueError(f"max_regions_per_image and min_words must be >= 0, got "
                         f"{max_regions_per_image}, {min_words}")
    report = report if report is not None else Report()
    regions_path = str(regions_path)
    data = _load_json(regions_path, list)
    image_data = None
    if image_data_path:
        image_data_path = str(image_data_path)
        image_data = _load_json(image_data_path, list)
        if len(image_data) != len(data):
            raise ConversionError(f"{image_data_path}: top level: {len(image_data)} images but {regions_path} has "
                                  f"{len(data)} (the files must be aligned index-for-index)")
    records = []
    for i, entry in enumerate(data):
        image_id = _get(entry, "id", int, regions_path, f"[{i}]")
        where = f"[{i}] (id {image_id})"
        regions = _get(entry, "regions", list, regions_path, where)
        url = None
        if image_data is not None:
            other = _get(image_data[i], "image_id", int, image_data_path, f"[{i}]")
            if other != image_id:
                raise ConversionError(f"{image_data_path}: [{i}]: field 'image_id' is {other} but {regions_path} "
                                      f"[{i}] has id {image_id} (the files must be aligned index-for-index)")
            if "url" in image_data[i]:
                url = _check_type(image_data[i]["url"], str, image_data_path, f"[{i}] (image_id {other})", "url")
        phrases = []
        for r, region in enumerate(regions):
            rwhere = f"{where} regions[{r}]"
            if isinstance(region, dict) and "region_id" in region:
                rwhere += f" (region_id {region['region_id']})"
            phrase = _clean(_get(region, "phrase", str, regions_path, rwhere), report, region.get("region_id"))
            if not phrase:
                report.skip("empty phrase", region.get("region_id"))
            elif min_words and len(phrase.split()) < min_words:
                report.skip(f"phrase under {min_words} words", region.get("region_id"))
            else:
                phrases.append(phrase)
        if max_regions_per_image and len(phrases) > max_regions_per_image:
            report.skip(f"phrase beyond --max_regions_per_image {max_regions_per_image}",
                        n=len(phrases) - max_regions_per_image)
            phrases = phrases[:max_regions_per_image]
        if not phrases:
            report.skip("image without phrases", image_id)
            continue
        folder = _vg_folder(image_id, image_root, url)
        if folder is None:
            report.warn("image folder unknown, VG_100K/ assumed (not under --image_root, no --image_data URL): "
                        "an image of VG_100K_2/ gets a wrong path", image_id)
        records.append({"image": f"{folder or 'VG_100K'}/{image_id}.jpg", "captions": phrases})
    return records


# ---------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------

def _coco_vqa_image(subtype, image_id):
    # test-dev is a subset of the test2015 images, which are stored (and named) test2015/COCO_test2015_<id>.jpg;
    # a test-dev questions file whose data_subtype reads 'test-dev2015' must still point there.
    folder = "test2015" if subtype == "test-dev2015" else subtype
    return f"{folder}/COCO_{folder}_{image_id:012d}.jpg"


def _convert_vqa_json(questions_path, annotations_path, allow_unanswered, report):
    """Shared by VQAv2 and OK-VQA: the same question/annotation layout, joined on question_id."""
    report = report if report is not None else Report()
    questions_path = str(questions_path)
    qdata = _load_json(questions_path, dict)
    subtype = _get(qdata, "data_subtype", str, questions_path, "top level")
    questions = _get(qdata, "questions", list, questions_path, "top level")
    if annotations_path is None and not allow_unanswered:
        raise ConversionError(f"{questions_path}: no annotations file given (pass the annotations, or "
                              f"--allow_unanswered for test questions)")
    answers_of = {}  # question_id -> (image_id, [answer str x 10])
    if annotations_path is not None:
        annotations_path = str(annotations_path)
        adata = _load_json(annotations_path, dict)
        anns = _get(adata, "annotations", list, annotations_path, "top level")
        if "data_subtype" in adata and adata["data_subtype"] != subtype:
            raise ConversionError(f"{annotations_path}: top level: field 'data_subtype' is "
                                  f"{adata['data_subtype']!r} but the questions file has {subtype!r}")
        for j, ann in enumerate(anns):
            qid = _get(ann, "question_id", int, annotations_path, f"annotations[{j}]")
            where = f"annotations[{j}] (question_id {qid})"
            image_id = _get(ann, "image_id", int, annotations_path, where)
            answers = _get(ann, "answers", list, annotations_path, where)
            # `answer` is the normalised string the official evaluation compares against; OK-VQA's
            # `raw_answer` is the annotator's text before normalisation, so it is not used.
            strs = [_valid_text(_get(a, "answer", str, annotations_path, f"{where} answers[{k}]"), report, qid)
                    for k, a in enumerate(answers)]
            answers_of[qid] = (image_id, strs)
    records, used = [], set()
    for i, q in enumerate(questions):
        qid = _get(q, "question_id", int, questions_path, f"questions[{i}]")
        where = f"questions[{i}] (question_id {qid})"
        image_id = _get(q, "image_id", int, questions_path, where)
        question = _clean(_get(q, "question", str, questions_path, where), report, qid)
        if qid in answers_of:
            ann_image, answers = answers_of[qid]
            used.add(qid)
            if ann_image != image_id:
                raise ConversionError(f"{annotations_path}: question_id {qid}: field 'image_id' is {ann_image} but "
                                      f"{questions_path} {where} has image_id {image_id}")
            if len(answers) != VQA_NUM_ANSWERS:
                report.warn(f"answers not {VQA_NUM_ANSWERS} (kept as given)", qid)
        elif allow_unanswered:
            answers = []
        else:
            report.skip("question without annotation", qid)
            continue
        records.append({"image": _coco_vqa_image(subtype, image_id), "question": question,
                        "answers": answers, "question_id": qid})
    if len(used) < len(answers_of):
        report.warn("annotation without a question in the questions file", n=len(answers_of) - len(used))
    return records


def convert_vqav2(questions_path, annotations_path=None, allow_unanswered=False, report=None):
    """VQAv2 v2_OpenEnded_mscoco_<subtype>_questions.json + v2_mscoco_<subtype>_annotations.json -> vqa.

    image = <subtype>/COCO_<subtype>_<image_id:012d>.jpg; answers = the 10 annotators' `answer` strings.
    Questions without an annotation are skipped (counted) unless `allow_unanswered` (then answers = []).
    """
    return _convert_vqa_json(questions_path, annotations_path, allow_unanswered, report)


def convert_okvqa(questions_path, annotations_path=None, allow_unanswered=False, report=None):
    """OK-VQA OpenEnded_mscoco_<subtype>_questions.json + mscoco_<subtype>_annotations.json -> vqa.

    Same layout as VQAv2 minus `multiple_choice_answer`; each answer has `raw_answer` and the normalised
    `answer`, and `answer` is the one used.  Images are COCO 2014.  Records carry "dataset": "okvqa", so
    an evaluation can apply OK-VQA's answer lemmatisation (blip2_pformer.py --vqa_lemmatize).
    """
    recs = _convert_vqa_json(questions_path, annotations_path, allow_unanswered, report)
    return [{**r, "dataset": "okvqa"} for r in recs]


def convert_gqa(questions_path, image_dir="images", allow_unanswered=False, report=None):
    """GQA *_balanced_questions.json -> vqa.

    The file is one object keyed by question id; ids are kept as the original strings ("07333408": an int
    would lose the leading zero and no longer match the official evaluation).  GQA scores exact match
    against one answer, so answers = [answer] * 10, which makes the 10-answer VQA accuracy equal exact match.
    image = images/<imageId>.jpg (imageId is a string; testdev ids look like 'n250821').
    """
    report = report if report is not None else Report()
    questions_path = str(questions_path)
    data = _load_json(questions_path, dict)
    records = []
    for qid, q in data.items():
        where = f"question {qid!r}"
        image_id = _get(q, "imageId", str, questions_path, where)
        question = _clean(_get(q, "question", str, questions_path, where), report, qid)
        if "answer" in q or not allow_unanswered:
            if "answer" not in q:
                raise ConversionError(f"{questions_path}: {where}: missing field 'answer' "
                                      f"(pass --allow_unanswered for the unanswered submission files)")
            answers = [_clean(_get(q, "answer", str, questions_path, where), report, qid)] * VQA_NUM_ANSWERS
        else:
            answers = []
        records.append({"image": _join(image_dir, f"{image_id}.jpg"), "question": question,
                        "answers": answers, "question_id": qid})
    return records


# ---------------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------------

FFMPEG_INSTALL = ("install the ffmpeg command-line tool (Debian/Ubuntu: apt-get install ffmpeg; macOS: brew "
                  "install ffmpeg; conda: conda install -c conda-forge ffmpeg) or pass --ffmpeg /path/to/ffmpeg")
_FRAME_NAME = re.compile(r"\d{5}\.jpg")


def find_ffmpeg(ffmpeg="ffmpeg"):
    """The ffmpeg executable's path; a one-line ConversionError that says how to install it when missing."""
    path = shutil.which(str(ffmpeg))
    if path is None:
        raise ConversionError(f"{ffmpeg}: command not found; the video converters extract frames with it: "
                              f"{FFMPEG_INSTALL}")
    return path


def extract_frames(video, out_dir, fps, max_frames, ffmpeg="ffmpeg"):
    """Frames of `video` at `fps` as out_dir/00000.jpg, 00001.jpg, ... by the ffmpeg command-line tool.

    A clip longer than max_frames / fps keeps max_frames of them at the centres of equal segments, so the
    frames span the whole clip (a sign-language sentence ends where its meaning often lands).  Written in a
    fresh temporary folder renamed into place: a crash leaves no half folder.  A folder already there is
    replaced when it holds only frames.  Returns the frame names, or raises RuntimeError with ffmpeg's last
    message when it decodes nothing."""
    from common.image import sample_frames  # imported on first use: it brings torch
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(out_dir) + ".", suffix=".tmp")
    try:
        raw = os.path.join(tmp, "raw")
        os.mkdir(raw)
        cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", str(video), "-vf", f"fps={fps}", "-q:v", "2",
               os.path.join(raw, "%05d.jpg")]
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        names = sorted(os.listdir(raw))
        if r.returncode != 0 or not names:
            lines = r.stderr.strip().splitlines() or [f"exit status {r.returncode}, no frames"]
            raise RuntimeError(lines[-1])
        names = [names[j] for j in sample_frames(len(names), max_frames)]  # as perceiver_caption.py reads
        kept = [f"{j:05d}.jpg" for j in range(len(names))]
        for name, new in zip(names, kept):
            os.replace(os.path.join(raw, name), os.path.join(tmp, new))
        shutil.rmtree(raw)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; frame folders are data like the images they sit with
        if os.path.islink(out_dir):
            os.remove(out_dir)
        elif os.path.isdir(out_dir):
            if not all(_FRAME_NAME.fullmatch(n) for n in os.listdir(out_dir)):
                raise ConversionError(f"{out_dir}: exists and holds other files than frames; move it away")
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        return kept
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def convert_mlslt(root, split, frames_dir, lang="en", sign_langs=("en",), fps=5.0, max_frames=32,
                  image_prefix="", ffmpeg="ffmpeg", jobs=1, report=None):
    """MLSLT sign-language videos -> video records {"frames": [...], "captions": [the `lang` text]}.

    Layout of SP-10, the data of MLSLT (Yin et al., CVPR 2022; github.com/MLSLT/SP-10): <root>/<split>.json,
    a list of {"id", "sign_list": [{"lang", "text", "video_url"}, ...]}, and <root>/<split>/<id>/<lang>.mp4
    as its video_downloader.py writes them.  One record per (id, signing language in `sign_langs`) with a
    video, captioned with the `lang` text whatever the signing language (sign-to-text translation).  Frames
    are extracted by ffmpeg (`extract_frames`) into <frames_dir>/<split>/<id>/<sign lang>/; frame paths are
    <image_prefix>/<split>/<id>/<sign lang>/NNNNN.jpg, relative to frames_dir as the image root.  Entries
    without a `lang` text, languages without a video and videos ffmpeg cannot decode are skipped
    and counted; so is a repeated (id, signing language) (ids 7 and "7" too): it names the same
    video and frame folder, which two extraction jobs would replace under each other.
    """
    report = report if report is not None else Report()
    root, frames_dir = str(root), str(frames_dir)
    ffmpeg = find_ffmpeg(ffmpeg)
    json_path = os.path.join(root, f"{split}.json")
    data = _load_json(json_path, list)
    tasks, taken = [], set()  # (video, frame folder, frame path prefix, caption); the folders
    for i, entry in enumerate(data):
        vid = str(_get(entry, "id", (str, int), json_path, f"[{i}]"))
        where = f"[{i}] (id {vid})"
        if vid in ("", ".", "..") or "/" in vid or "\\" in vid:
            raise ConversionError(f"{json_path}: {where}: field 'id' cannot name a folder")
        texts, urls = {}, {}
        for k, sign in enumerate(_get(entry, "sign_list", list, json_path, where)):
            sign_lang = _get(sign, "lang", str, json_path, f"{where} sign_list[{k}]")
            texts.setdefault(sign_lang, _get(sign, "text", str, json_path, f"{where} sign_list[{k}]"))
            urls.setdefault(sign_lang, sign.get("video_url", ""))
        caption = _clean(texts.get(lang, ""), report, vid)
        if not caption:
            report.skip(f"no {lang!r} text in sign_list", vid)
            continue
        for sign_lang in sign_langs:
            if sign_lang not in urls:  # the test split lists 7-10 of the 10 signing languages per sentence
                report.skip("signing language not in sign_list", f"{vid}/{sign_lang}")
                continue
            if urls[sign_lang] is None:  # SP-10's video_downloader.py skips these: no video was released
                report.skip("no video (video_url null)", f"{vid}/{sign_lang}")
                continue
            video = os.path.join(root, split, vid, f"{sign_lang}.mp4")
            if not os.path.isfile(video):
                report.skip("video file missing", os.path.join(split, vid, f"{sign_lang}.mp4"))
                continue
            folder = os.path.join(frames_dir, split, vid, sign_lang)
            if folder in taken:
                report.skip("repeated id and signing language", f"{vid}/{sign_lang}")
                continue
            taken.add(folder)
            tasks.append((video, folder, _join(image_prefix, split, vid, sign_lang), caption))

    def run(task):
        try:
            return extract_frames(task[0], task[1], fps, max_frames, ffmpeg)
        except RuntimeError as e:
            return e

    with ThreadPoolExecutor(max(1, jobs)) as pool:  # ffmpeg runs as a process: threads overlap them
        results = list(pool.map(run, tasks))
    records = []
    for (video, _, prefix, caption), frames in zip(tasks, results):
        if isinstance(frames, RuntimeError):
            report.skip("video ffmpeg cannot decode", os.path.relpath(video, root))
            if not any(n.startswith("ffmpeg:") for n in report.notes):
                report.note(f"ffmpeg: {video}: {frames}")
            continue
        records.append({"frames": [_join(prefix, n) for n in frames], "captions": [caption]})
    return records


# ---------------------------------------------------------------------------------------------------
# Images and output
# ---------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------
# CIFAR: python batches (pickled dicts) -> ImageFolder
# ---------------------------------------------------------------------------------------------------
def _load_cifar_batch(path):
    """One pickled CIFAR batch -> dict with str keys.  A pickle can run code when it is loaded, so only what the
    batches hold is unpickled (dicts, lists, bytes, numpy arrays); any other global (os.system, ...) is refused."""
    import codecs
    import pickle

    import numpy as np
    rebuild = np.ndarray((0,)).__reduce__()[0]  # numpy's own array rebuilder, whatever module holds it
    allowed = {("numpy.core.multiarray", "_reconstruct"): rebuild, ("numpy._core.multiarray", "_reconstruct"): rebuild,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode}  # how Python 3's protocol-2 pickles store bytes

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise ConversionError(f"{path}: refuses to unpickle {module}.{name} (not in a CIFAR batch)")
            return allowed[(module, name)]
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: file not found")
    with open(path, "rb") as f:
        try:
            d = Unpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise ConversionError(f"{path}: not a CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: not a CIFAR batch (a {type(d).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


CIFAR_LAYOUTS = {  # the folders the published tarballs unpack to: (train batches, test batch, meta)
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta"),
    "cifar100": (["train"], "test", "meta"),
}


def convert_cifar(src, out, label="fine", report=None):
    """cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or cifar-100-python/ (train, test, meta;
    label fine (100 classes) or coarse (20)) -> <out>/{train,test}/<label name>/<n:05d>.png, n the image's index in
    its split.  Each batch row holds 3072 bytes: the red, green and blue 32x32 planes, row-major.  The folder is
    written aside and renamed into place.  -> {split: images written}."""
    import numpy as np
    from PIL import Image
    report = report if report is not None else Report()
    kind = "cifar10" if os.path.isfile(os.path.join(src, "batches.meta")) else "cifar100"
    train_files, test_file, meta_file = CIFAR_LAYOUTS[kind]
    if not os.path.isfile(os.path.join(src, meta_file)):
        raise ConversionError(f"{src}: neither batches.meta (CIFAR-10) nor meta (CIFAR-100): not a CIFAR folder")
    field = "label" if kind == "cifar10" else f"{label}_label"  # CIFAR-100: fine_labels or coarse_labels
    meta = _load_cifar_batch(os.path.join(src, meta_file))
    names = meta.get(f"{field}_names")
    if not isinstance(names, list) or not names:
        raise ConversionError(f"{os.path.join(src, meta_file)}: missing list field '{field}_names'")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    bad = [n for n in names if not n.strip() or n in (".", "..") or "/" in n or "\\" in n]
    if bad or len(set(names)) != len(names):  # each name becomes a folder: never a path out of --out
        raise ConversionError(f"{os.path.join(src, meta_file)}: '{field}_names' holds unusable or repeated folder "
                              f"names, e.g. {(bad or names)[:1]}")
    if os.path.exists(out):
        raise ConversionError(f"{out}: already exists; remove it or choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp, counts = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(out) + ".", suffix=".tmp"), {}
    try:
        for split, files in (("train", train_files), ("test", [test_file])):
            for name in names:  # every class in both splits, with or without images
                os.makedirs(os.path.join(tmp, split, name))
            n = written = 0  # n: the row's index in its split (its file name); written: saved
            for fn in files:
                path = os.path.join(src, fn)
                d = _load_cifar_batch(path)
                labels = d.get(f"{field}s")
                data = d.get("data")
                if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
                    raise ConversionError(f"{path}: field 'data' is not an (N, 3072) uint8 array")
                if not isinstance(labels, list) or len(labels) != len(data):
                    raise ConversionError(f"{path}: field '{field}s' is not a list of {len(data)} labels")
                pixels = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, RGB)
                for x, y in zip(pixels, labels):
                    if not isinstance(y, (int, np.integer)) or not 0 <= y < len(names):
                        report.skip(f"label outside 0..{len(names) - 1}", f"{fn}[{n}]")
                    else:
                        Image.fromarray(x).save(os.path.join(tmp, split, names[y], f"{n:05d}.png"))
                        written += 1
                    n += 1
            counts[split] = written  # a row with a bad label is counted as skipped, not as written
        for dirpath, dirnames, filenames in os.walk(tmp):  # mkdtemp makes the folder private; this is data
            os.chmod(dirpath, 0o755)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o644)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.note(f"{kind}: {len(names)} classes, labels from '{field}s'")
    return counts


def check_images(records, image_root, report=None):
    """Keep the records whose image opens (common.image.load_image); count the rest by reason."""
    from common.image import load_image

    report = report if report is not None else Report()
    kept = []
    for rec in records:
        path = os.path.join(str(image_root), rec["image"])
        if not os.path.isfile(path):
            report.skip("image file missing", rec["image"])
        elif load_image(path) is None:
            report.skip("image unreadable", rec["image"])
        else:
            kept.append(rec)
    return kept


def _write_bytes(path, data):
    """`data` to `path` through an exclusively created temp file renamed into place, as `write_jsonl` does."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; extracted samples are data others read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _extract_file(extract_to, name, data, check_only=False):
    """`data` to <extract_to>/<name> (`_write_bytes`), unless the file there already holds these bytes (the same
    set extracted again).  Other bytes there are a ConversionError: img2dataset numbers every set's keys from
    000000000, so a second set extracted into the same folder would put its images under the first set's pairs."""
    path = os.path.join(extract_to, name)
    if os.path.lexists(path):
        if os.path.isfile(path) and os.path.getsize(path) == len(data):
            with open(path, "rb") as f:
                if f.read() == data:
                    return
        raise ConversionError(f"{extract_to}: already holds another extraction ({name} differs from the one "
                              f"extracted now): use another --extract_to")
    if not check_only:
        _write_bytes(path, data)


def write_jsonl(records, path):
    """One JSON object per line, UTF-8; written to a temp file then renamed, so a crash leaves no half file.
    The temp file is created exclusively (a fresh random name next to the output, O_EXCL: a file or symlink
    planted under a predictable name is never followed or overwritten), and the rename replaces the output
    name itself, never what a link there points to."""
    path = str(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, rec in enumerate(records):
                line = json.dumps(rec, ensure_ascii=False) + "\n"
                try:
                    f.write(line)
                except UnicodeEncodeError:  # a lone surrogate: the converters replace them in texts, not in paths
                    raise ConversionError(f"{path}: record {i}: a lone UTF-16 surrogate escape cannot be written "
                                          f"as UTF-8: {line.strip()[:200]!r}") from None
        os.chmod(tmp, 0o644)  # mkstemp makes it private (0600); a converted file is data others read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return len(records)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a published dataset layout to the canonical pairs/vqa/video JSON Lines format.")
    sub = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    def add(name, help_text, out_required=True):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--out", required=out_required,
                        help="output .jsonl file" + ("" if out_required else " (omit to count and check only)"))
        sp.add_argument("--check_images", action="store_true",
                        help="drop (and count) records whose image is missing or unreadable under --image_root "
                             "(img2dataset: in its folder or shards)")
        sp.add_argument("--image_root", default=None,
                        help="folder the image paths are relative to (for --check_images; vg also picks "
                             "VG_100K or VG_100K_2 by looking here)")
        return sp

    sp = add("coco", "official COCO caption annotations (captions_*.json) -> pairs")
    sp.add_argument("annotations", help="captions_{train,val}{2014,2017}.json")
    sp.add_argument("--images_subdir", default=None,
                    help="folder prefixed to file_name, e.g. val2017 (default: inferred from the file)")

    sp = add("nocaps", "NoCaps captions (nocaps_val_4500_captions.json) -> pairs with the image's domain")
    sp.add_argument("json", help="nocaps_val_4500_captions.json")
    sp.add_argument("--image_prefix", default="", help="folder of the images under --image_root, e.g. val")

    sp = add("karpathy", "Karpathy split JSON (dataset_coco/flickr8k/flickr30k.json) -> pairs of one split")
    sp.add_argument("json", help="dataset_*.json")
    sp.add_argument("--split", required=True, choices=KARPATHY_SPLITS)
    sp.add_argument("--merge_restval", action="store_true", help="with --split train: add the restval images")
    sp.add_argument("--image_prefix", default="", help="prefix for image paths, e.g. flickr30k-images")

    sp = add("blip", "BLIP/LAVIS annotation JSON (coco_karpathy_*.json, flickr30k_*.json) -> pairs")
    sp.add_argument("json")
    sp.add_argument("--image_prefix", default="", help="prefix for the file's image paths")

    sp = add("flickr30k_csv", "the Kaggle Flickr30K copy's results.csv ('image_name| comment_number| comment') "
                              "-> pairs, all images or one Karpathy split")
    sp.add_argument("csv", help="flickr30k_images/results.csv")
    sp.add_argument("--karpathy", default=None, help="dataset_flickr30k.json: keep only the images of --split")
    sp.add_argument("--split", default=None, choices=KARPATHY_SPLITS, help="with --karpathy")
    sp.add_argument("--image_prefix", default="flickr30k_images",
                    help="prefix for image names (default flickr30k_images: paths relative to the csv's folder)")

    sp = add("img2dataset", "img2dataset output folder, --output_format files (<shard>/ folders) or webdataset "
                            "(<shard>.tar) -> pairs (one caption each); images are checked in place",
             out_required=False)
    sp.add_argument("folder")
    sp.add_argument("--image_prefix", default="", help="prefix for image paths (e.g. the folder's name)")
    sp.add_argument("--encode_format", default="jpg", help="image extension img2dataset wrote (default jpg)")
    sp.add_argument("--layout", default="auto", choices=("auto", "files", "webdataset"),
                    help="auto: whichever the folder holds")
    sp.add_argument("--extract_to", default=None,
                    help="webdataset: write the kept samples here in the files layout; the pairs' image paths "
                         "are relative to it (needed for --out). A folder holding another set's files is refused; "
                         "the same set may be extracted again")
    sp.add_argument("--jobs", type=int, default=1, help="webdataset: .tar shards read at once (processes)")

    sp = add("vg", "Visual Genome region_descriptions.json -> pairs (region phrases per image)")
    sp.add_argument("regions", help="region_descriptions.json")
    sp.add_argument("--image_data", default=None, help="image_data.json (aligned list; its url gives the folder)")
    sp.add_argument("--max_regions_per_image", type=int, default=0, help="keep the first N phrases (0 = all)")
    sp.add_argument("--min_words", type=int, default=0, help="drop phrases with fewer words")

    for name, text in (("vqav2", "VQAv2 questions + annotations JSON -> vqa"),
                       ("okvqa", "OK-VQA questions + annotations JSON -> vqa")):
        sp = add(name, text)
        sp.add_argument("--questions", required=True)
        sp.add_argument("--annotations", default=None, help="omit only with --allow_unanswered (test questions)")
        sp.add_argument("--allow_unanswered", action="store_true",
                        help="write questions without annotation with answers [] instead of skipping them")

    sp = add("gqa", "GQA *_balanced_questions.json -> vqa (answers = [answer] * 10)")
    sp.add_argument("questions")
    sp.add_argument("--image_dir", default="images", help="folder of the GQA images (default images)")
    sp.add_argument("--allow_unanswered", action="store_true", help="questions without 'answer' get answers []")

    sp = add("mlslt", "MLSLT sign-language videos (<split>.json + <split>/<id>/<lang>.mp4) -> video records, "
                      "frames extracted by the ffmpeg command-line tool")
    sp.add_argument("root", help="folder holding <split>.json and <split>/")
    sp.add_argument("--split", required=True, help="train, dev or test")
    sp.add_argument("--frames_dir", required=True, help="frame folders go to <frames_dir>/<split>/<id>/<sign lang>/")
    sp.add_argument("--lang", default="en", help="language of the caption text (default en)")
    sp.add_argument("--sign_langs", default="en", help="comma-separated signing languages whose videos are read")
    sp.add_argument("--fps", type=float, default=5.0, help="frames per second extracted (default 5)")
    sp.add_argument("--max_frames", type=int, default=32,
                    help="cap per video; longer clips keep evenly spaced frames (default 32)")
    sp.add_argument("--image_prefix", default="", help="prefix for frame paths (relative to --frames_dir)")
    sp.add_argument("--ffmpeg", default="ffmpeg", help="the ffmpeg executable (default: found on PATH)")
    sp.add_argument("--jobs", type=int, default=1, help="ffmpeg processes at once")

    sp = sub.add_parser("cifar", help="CIFAR-10/100 python batches -> ImageFolder of PNGs (classification)",
                        description="CIFAR-10/100 python batches -> <out>/{train,test}/<class>/<n:05d>.png")
    sp.add_argument("src", help="cifar-10-batches-py/ or cifar-100-python/ (the published tarballs' folders)")
    sp.add_argument("--out", required=True, help="output folder (must not exist)")
    sp.add_argument("--label", default="fine", choices=("fine", "coarse"), help="CIFAR-100: 100 or 20 classes")
    return p


def _convert(args, report):
    """Dispatch on the subcommand; returns (records, the input that was read)."""
    if args.kind == "coco":
        return convert_coco(args.annotations, args.images_subdir, report), args.annotations
    if args.kind == "nocaps":
        return convert_nocaps(args.json, args.image_prefix, report), args.json
    if args.kind == "karpathy":
        return convert_karpathy(args.json, args.split, args.image_prefix, args.merge_restval, report), args.json
    if args.kind == "blip":
        return convert_blip(args.json, args.image_prefix, report), args.json
    if args.kind == "flickr30k_csv":
        return convert_flickr30k_csv(args.csv, args.karpathy, args.split, args.image_prefix, report), args.csv
    if args.kind == "img2dataset":
        layout, _ = _img2dataset_layout(args.folder, args.layout)
        if layout == "webdataset" and args.out and not args.extract_to:
            raise ConversionError(f"{args.folder}: .tar shards: pass --extract_to DIR to write the images the "
                                  f"pairs point to, or leave out --out to count and check only")
        if layout == "files" and args.extract_to:
            raise ConversionError(f"{args.folder}: --extract_to applies to .tar shards; this is a files folder")
        return convert_img2dataset(args.folder, args.image_prefix, args.encode_format, report, layout,
                                   args.check_images, args.extract_to, args.jobs), args.folder
    if args.kind == "vg":
        return convert_vg(args.regions, args.image_root, args.image_data, args.max_regions_per_image,
                          args.min_words, report), args.regions
    if args.kind == "vqav2":
        return convert_vqav2(args.questions, args.annotations, args.allow_unanswered, report), args.questions
    if args.kind == "okvqa":
        return convert_okvqa(args.questions, args.annotations, args.allow_unanswered, report), args.questions
    if args.kind == "gqa":
        return convert_gqa(args.questions, args.image_dir, args.allow_unanswered, report), args.questions
    if args.kind == "mlslt":
        langs = tuple(s.strip() for s in args.sign_langs.split(",") if s.strip())
        return convert_mlslt(args.root, args.split, args.frames_dir, args.lang, langs, args.fps, args.max_frames,
                             args.image_prefix, args.ffmpeg, args.jobs, report), args.root
    raise AssertionError(args.kind)  # argparse restricts the choices


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kind == "cifar":  # a folder of images, not records
        report = Report()
        try:
            counts = convert_cifar(args.src, args.out, args.label, report)
        except ConversionError as e:
            print("error: " + str(e).replace("\n", " "), file=sys.stderr)
            return 1
        print(*report.lines(), f"wrote {counts['train']} train and {counts['test']} test images to {args.out}",
              sep="\n")
        return 0
    if args.kind == "karpathy" and args.merge_restval and args.split != "train":
        parser.error("--merge_restval only applies to --split train")
    if args.kind == "flickr30k_csv" and (args.karpathy is None) != (args.split is None):
        parser.error("--karpathy and --split go together")
    if args.kind == "vg" and (args.max_regions_per_image < 0 or args.min_words < 0):
        parser.error("vg needs --max_regions_per_image >= 0 (0 = all) and --min_words >= 0")
    if args.kind == "mlslt" and (args.check_images or args.fps <= 0 or args.max_frames < 1):
        parser.error("mlslt needs --fps > 0 and --max_frames >= 1, and takes no --check_images")
    # img2dataset checks its images in place (files) or in the shards (webdataset): no image root needed
    if args.check_images and not args.image_root and args.kind != "img2dataset":
        parser.error("--check_images needs --image_root")
    report = Report()
    try:
        records, source = _convert(args, report)
        n_converted = len(records)
        if args.check_images and args.kind != "img2dataset":
            records = check_images(records, args.image_root, report)
        if args.out is None:
            for line in report.lines():
                print(line)
            print(f"checked {len(records)} usable records in {source} ({report.total_skipped} skipped); "
                  f"no --out, nothing written")
            return 0
        if not records:
            raise ConversionError(f"{source}: no records to write ({n_converted} converted, "
                                  f"{report.total_skipped} skipped)")
        write_jsonl(records, args.out)
    except ConversionError as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)  # one line, no traceback
        return 1
    for line in report.lines():
        print(line)
    n_captions = sum(len(r["captions"]) for r in records if "captions" in r)
    extra = f" ({n_captions} captions)" if n_captions else ""
    print(f"wrote {len(records)} records{extra} to {args.out}")
    return 0


if __name__ == "__main__":
    # Run as `python data/convert.py`: put the repository root on the path for `common.image`.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
