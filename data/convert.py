"""Converters from published dataset layouts to the project's canonical JSON Lines formats.

The five method scripts read only two record shapes (DESIGN.md, "Canonical formats"):

    pairs  {"image": "<path relative to --image_root>", "captions": [str, ...]}
    vqa    {"image": ..., "question": str, "answers": [10 str], "question_id": int | str}

This file turns the layouts the papers actually train and evaluate on into those records:

    coco         official caption annotations (captions_{train,val}{2014,2017}.json), via pycocotools' COCO
    karpathy     Karpathy split files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json)
    blip         BLIP / LAVIS annotation files (coco_karpathy_*.json, flickr30k_*.json)
    img2dataset  an img2dataset `--output_format files` folder (CC3M, SBU, LAION-style web pairs)
    vg           Visual Genome region_descriptions.json (region phrases paired with the whole image)
    vqav2/okvqa  VQA-style questions JSON + annotations JSON, joined on question_id
    gqa          GQA {train,val,testdev}_balanced_questions.json

Examples (run from the repository root):

    python data/convert.py coco captions_val2017.json --out coco_val2017.jsonl
    python data/convert.py karpathy dataset_coco.json --split train --merge_restval --out coco_kp_train.jsonl
    python data/convert.py karpathy dataset_flickr30k.json --split test --image_prefix flickr30k-images \
        --out f30k_test.jsonl
    python data/convert.py blip coco_karpathy_test.json --out coco_kp_test.jsonl
    python data/convert.py img2dataset cc3m/ --image_prefix cc3m --out cc3m.jsonl --check_images --image_root /data
    python data/convert.py vg region_descriptions.json --image_root /data/vg --max_regions_per_image 10 --out vg.jsonl
    python data/convert.py vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json \
        --annotations v2_mscoco_val2014_annotations.json --out vqav2_val.jsonl
    python data/convert.py gqa testdev_balanced_questions.json --out gqa_testdev.jsonl

Every converter is also a function returning the records (`convert_coco`, `convert_karpathy`, ...);
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
import sys
import tempfile
from collections import Counter

# VQA answers are 10 per question: the official accuracy is min(#humans that said it / 3, 1),
# averaged over the 10 leave-one-out subsets (Antol et al. 2015, Sec. 2; VQAv2, Goyal et al. 2017).
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


def _clean(text):
    """Captions in COCO / Karpathy / BLIP / VG files often end in ' ' or '\\n' (e.g. COCO ann 2970)."""
    return text.strip()


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
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            cap = _clean(ann["caption"])
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
            raw = _get(sent, "raw", str, json_path, f"{where} sentences[{k}]")
            if _clean(raw):
                captions.append(_clean(raw))
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
            _check_type(cap, str, json_path, f"{where} caption[{k}]", "caption")
            if _clean(cap):
                rec["captions"].append(_clean(cap))
            else:
                report.skip("empty caption", image)
    records = []
    for rec in by_image.values():
        if rec["captions"]:
            records.append(rec)
        else:
            report.skip("image without captions", rec["image"])
    return records


_IMG2DATASET_IMAGE_EXTS = ("jpg", "png", "webp", "jpeg")


def convert_img2dataset(folder, image_prefix="", encode_format="jpg", report=None):
    """An img2dataset `--output_format files` folder -> pairs with one caption each.

    Layout: <folder>/<shard>/<key>.{jpg,txt,json} with key = shard_id * 10**ceil(log10(per_shard)) + index.
    Only samples whose sidecar .json says status == "success" are kept.  Failed downloads/resizes get no
    files at all (they live only in the shard's parquet), so they show up as gaps in the keys; they are
    counted against `<shard>_stats.json` "count".  The caption is the .txt (img2dataset writes str(caption)),
    else the .json "caption" field.  The image is <key>.<ext> for whichever ext exists, else
    <key>.<encode_format> (annotation-only copies; use --check_images to drop records without pixels).
    """
    report = report if report is not None else Report()
    folder = str(folder)
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder}: folder not found")
    shards = sorted(d for d in os.listdir(folder) if d.isdigit() and os.path.isdir(os.path.join(folder, d)))
    if not shards:
        raise ConversionError(f"{folder}: no shard subfolders (expected 00000/, 00001/, ... from img2dataset)")
    records = []
    n_missing_images = 0
    for shard in shards:
        shard_dir = os.path.join(folder, shard)
        names = set(os.listdir(shard_dir))
        keys = sorted({os.path.splitext(n)[0] for n in names if os.path.splitext(n)[0].isdigit()})
        found_idx = set()
        for key in keys:
            meta_path = os.path.join(shard_dir, key + ".json")
            where = f"key {key}"
            if len(key) > len(shard):  # index inside the shard, to find the keys of failed samples below
                found_idx.add(int(key) - int(shard) * 10 ** (len(key) - len(shard)))
            if key + ".json" not in names:
                report.skip("no .json sidecar (status unknown)", key)
                continue
            meta = _load_json(meta_path, dict)
            status = _get(meta, "status", str, meta_path, where)
            if status != "success":
                report.skip(f"status {status!r}", key)
                continue
            if key + ".txt" in names:
                try:
                    with open(os.path.join(shard_dir, key + ".txt"), encoding="utf-8") as f:
                        caption = f.read()
                except UnicodeDecodeError as e:  # a bad sample, counted like a failed download
                    report.skip(f"caption .txt not UTF-8 (byte {e.start})", os.path.join(shard, key + ".txt"))
                    continue
            else:
                caption = meta.get("caption")
                if caption is not None:
                    _check_type(caption, str, meta_path, where, "caption")
            caption = _clean(caption or "")
            if not caption:
                report.skip("no caption (.txt absent and no 'caption' in .json)", key)
                continue
            ext = next((e for e in (encode_format,) + _IMG2DATASET_IMAGE_EXTS if f"{key}.{e}" in names), None)
            if ext is None:
                n_missing_images += 1
                ext = encode_format
            records.append({"image": _join(image_prefix, shard, f"{key}.{ext}"), "captions": [caption]})

        # Failed samples: img2dataset writes nothing for them in the shard folder.
        stats_path = os.path.join(folder, f"{shard}_stats.json")
        count = None
        if os.path.isfile(stats_path):
            stats = _load_json(stats_path, dict)
            count = _get(stats, "count", int, stats_path, "top level")
            status_dict = stats.get("status_dict")
            if isinstance(status_dict, dict):
                fails = {k: v for k, v in status_dict.items() if k != "success"}
                if fails:
                    report.note(f"{shard}_stats.json failures: " + ", ".join(f"{k}: {v}" for k, v in fails.items()))
        elif found_idx:
            count = max(found_idx) + 1  # without stats, only gaps before the last key are visible
        if count is not None and keys and len(keys[0]) > len(shard):
            digits = len(keys[0]) - len(shard)
            for idx in range(count):
                if idx not in found_idx:
                    missing_key = f"{int(shard) * 10 ** digits + idx:0{len(keys[0])}d}"
                    report.skip("failed sample: no files in the shard folder (failed_to_download/resize)",
                                missing_key)
        elif count and not keys:
            report.skip("failed sample: no files in the shard folder (failed_to_download/resize)", n=count)
    if n_missing_images:
        report.warn(f"image file not present; path assumes .{encode_format}", n=n_missing_images)
    return records


def _vg_folder(image_id, image_root, url):
    """VG images are split over VG_100K/ and VG_100K_2/ (image 1 is in VG_100K_2)."""
    if image_root:
        for sub in ("VG_100K", "VG_100K_2"):
            if os.path.exists(os.path.join(image_root, sub, f"{image_id}.jpg")):
                return sub
    if url and "/VG_100K_2/" in url:
        return "VG_100K_2"
    return "VG_100K"


def convert_vg(regions_path, image_root=None, image_data_path=None, max_regions_per_image=0, min_words=0,
               report=None):
    """Visual Genome region_descriptions.json -> pairs: each image with its region phrases as captions.

    The file is a list aligned index-for-index with image_data.json; its per-image key is `id` (the other
    VG files say `image_id`).  Phrases are stripped ("shade is along the street ").  The image folder is
    whichever of VG_100K / VG_100K_2 holds <id>.jpg under `image_root`, else the folder in image_data.json's
    url, else VG_100K.  `max_regions_per_image` keeps the first N phrases (0 = all); `min_words` drops
    shorter phrases (BLIP's VG captions keep phrases of more than 4 words, so min_words=5 matches).
    """
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
            phrase = _clean(_get(region, "phrase", str, regions_path, rwhere))
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
        records.append({"image": f"{folder}/{image_id}.jpg", "captions": phrases})
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
            strs = [_get(a, "answer", str, annotations_path, f"{where} answers[{k}]") for k, a in enumerate(answers)]
            answers_of[qid] = (image_id, strs)
    records, used = [], set()
    for i, q in enumerate(questions):
        qid = _get(q, "question_id", int, questions_path, f"questions[{i}]")
        where = f"questions[{i}] (question_id {qid})"
        image_id = _get(q, "image_id", int, questions_path, where)
        question = _clean(_get(q, "question", str, questions_path, where))
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
    `answer`, and `answer` is the one used.  Images are COCO 2014.
    """
    return _convert_vqa_json(questions_path, annotations_path, allow_unanswered, report)


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
        question = _clean(_get(q, "question", str, questions_path, where))
        if "answer" in q or not allow_unanswered:
            if "answer" not in q:
                raise ConversionError(f"{questions_path}: {where}: missing field 'answer' "
                                      f"(pass --allow_unanswered for the unanswered submission files)")
            answers = [_clean(_get(q, "answer", str, questions_path, where))] * VQA_NUM_ANSWERS
        else:
            answers = []
        records.append({"image": _join(image_dir, f"{image_id}.jpg"), "question": question,
                        "answers": answers, "question_id": qid})
    return records


# ---------------------------------------------------------------------------------------------------
# Images and output
# ---------------------------------------------------------------------------------------------------

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
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
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
        description="Convert a published dataset layout to the canonical pairs/vqa JSON Lines format.")
    sub = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    def add(name, help_text):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--out", required=True, help="output .jsonl file")
        sp.add_argument("--check_images", action="store_true",
                        help="drop (and count) records whose image is missing or unreadable under --image_root")
        sp.add_argument("--image_root", default=None,
                        help="folder the image paths are relative to (for --check_images; vg also picks "
                             "VG_100K or VG_100K_2 by looking here)")
        return sp

    sp = add("coco", "official COCO caption annotations (captions_*.json) -> pairs")
    sp.add_argument("annotations", help="captions_{train,val}{2014,2017}.json")
    sp.add_argument("--images_subdir", default=None,
                    help="folder prefixed to file_name, e.g. val2017 (default: inferred from the file)")

    sp = add("karpathy", "Karpathy split JSON (dataset_coco/flickr8k/flickr30k.json) -> pairs of one split")
    sp.add_argument("json", help="dataset_*.json")
    sp.add_argument("--split", required=True, choices=KARPATHY_SPLITS)
    sp.add_argument("--merge_restval", action="store_true", help="with --split train: add the restval images")
    sp.add_argument("--image_prefix", default="", help="prefix for image paths, e.g. flickr30k-images")

    sp = add("blip", "BLIP/LAVIS annotation JSON (coco_karpathy_*.json, flickr30k_*.json) -> pairs")
    sp.add_argument("json")
    sp.add_argument("--image_prefix", default="", help="prefix for the file's image paths")

    sp = add("img2dataset", "img2dataset --output_format files folder -> pairs (one caption each)")
    sp.add_argument("folder")
    sp.add_argument("--image_prefix", default="", help="prefix for image paths (e.g. the folder's name)")
    sp.add_argument("--encode_format", default="jpg", help="image extension img2dataset wrote (default jpg)")

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
    return p


def _convert(args, report):
    """Dispatch on the subcommand; returns (records, the input that was read)."""
    if args.kind == "coco":
        return convert_coco(args.annotations, args.images_subdir, report), args.annotations
    if args.kind == "karpathy":
        return convert_karpathy(args.json, args.split, args.image_prefix, args.merge_restval, report), args.json
    if args.kind == "blip":
        return convert_blip(args.json, args.image_prefix, report), args.json
    if args.kind == "img2dataset":
        return convert_img2dataset(args.folder, args.image_prefix, args.encode_format, report), args.folder
    if args.kind == "vg":
        return convert_vg(args.regions, args.image_root, args.image_data, args.max_regions_per_image,
                          args.min_words, report), args.regions
    if args.kind == "vqav2":
        return convert_vqav2(args.questions, args.annotations, args.allow_unanswered, report), args.questions
    if args.kind == "okvqa":
        return convert_okvqa(args.questions, args.annotations, args.allow_unanswered, report), args.questions
    if args.kind == "gqa":
        return convert_gqa(args.questions, args.image_dir, args.allow_unanswered, report), args.questions
    raise AssertionError(args.kind)  # argparse restricts the choices


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kind == "karpathy" and args.merge_restval and args.split != "train":
        parser.error("--merge_restval only applies to --split train")
    if args.check_images and not args.image_root:
        parser.error("--check_images needs --image_root")
    report = Report()
    try:
        records, source = _convert(args, report)
        n_converted = len(records)
        if args.check_images:
            records = check_images(records, args.image_root, report)
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
