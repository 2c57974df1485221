"""data/convert.py on the real-layout fixtures in tests/fixtures (see its README for each quirk).

Each converter is checked for exact counts and contents on the fixture; error messages are checked on
broken copies written to tmp_path; the CLI is run once through a subprocess.
"""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from common.data import read_pairs, read_video, read_vqa
from data.convert import (ConversionError, Report, build_parser, check_images, convert_blip, convert_coco,
                          convert_flickr30k_csv, convert_gqa, convert_img2dataset, convert_karpathy, convert_mlslt,
                          convert_nocaps, convert_okvqa, convert_vg, convert_vqav2, main, write_jsonl)
from data.convert import LONE_SURROGATE

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures"  # copies of the project's shared dataset-layout fixtures (README there)

COCO = FIX / "coco" / "captions_val2017.json"
VQA_Q = FIX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
VQA_A = FIX / "vqav2" / "v2_mscoco_val2014_annotations.json"
OK_Q = FIX / "okvqa" / "OpenEnded_mscoco_train2014_questions.json"
OK_A = FIX / "okvqa" / "mscoco_train2014_annotations.json"
GQA = FIX / "gqa" / "questions_sample.json"
VG = FIX / "visual_genome" / "region_descriptions.json"
NOCAPS = FIX / "nocaps" / "nocaps_val_4500_captions.json"


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _dump(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return path


# ---------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------

def test_coco_groups_interleaved_captions_and_strips():
    report = Report()
    recs = convert_coco(COCO, "val2017", report)
    raw = _load(COCO)
    # one record per image, in the order of the 'images' list (7 images, 37 captions in the excerpt)
    assert [r["image"] for r in recs] == [f"val2017/{im['file_name']}" for im in raw["images"]]
    assert len(recs) == 7 and sum(len(r["captions"]) for r in recs) == 37
    by_image = {r["image"]: r["captions"] for r in recs}
    assert len(by_image["val2017/000000431896.jpg"]) == 7  # 6-7 caption images keep all
    assert all(len(c) == 5 for im, c in by_image.items() if im != "val2017/000000431896.jpg")
    # captions of an image, in annotation order, stripped (ann 2970 ends in a space in the file)
    expected = [a["caption"].strip() for a in raw["annotations"] if a["image_id"] == 331352]
    assert by_image["val2017/000000331352.jpg"] == expected
    assert "Off white toilet with a faucet and controls." in expected
    assert all(c == c.strip() and c for caps in by_image.values() for c in caps)
    assert report.total_skipped == 0
    # the image folder is inferred from coco_url when not given
    assert convert_coco(COCO) == recs


def test_coco_orphan_annotation_and_errors(tmp_path):
    data = _load(COCO)
    data["annotations"].append({"image_id": 999, "id": 1, "caption": "no such image"})
    report = Report()
    recs = convert_coco(_dump(data, tmp_path / "orphan.json"), "val2017", report)
    assert len(recs) == 7 and report.skipped["annotation of an image not listed in 'images'"] == 1

    data = _load(COCO)
    del data["annotations"][3]["caption"]
    bad = _dump(data, tmp_path / "captions_bad.json")
    ann_id = data["annotations"][3]["id"]
    with pytest.raises(ConversionError) as e:
        convert_coco(bad, "val2017")
    msg = str(e.value)
    assert msg == f"{bad}: annotations[3] (id {ann_id}): missing field 'caption'"

    data = _load(COCO)
    data["images"][2]["id"] = str(data["images"][2]["id"])
    bad = _dump(data, tmp_path / "captions_badtype.json")
    with pytest.raises(ConversionError) as e2:
        convert_coco(bad, "val2017")
    assert str(e2.value) == f"{bad}: images[2]: field 'id' should be an integer, got str"  # one line, exact


def test_coco_image_folder_from_2014_names_or_the_file_name_and_no_type_key(tmp_path):
    """The image folder comes from a 2014 file name (COCO_train2014_...), else coco_url, else the annotation
    file's own name; none of them: a one-line error.  The top-level "type" key (unverified for 2017) is not read."""
    want = convert_coco(COCO)
    data = _load(COCO)
    del data["type"]
    for im in data["images"]:
        del im["coco_url"]
    # no coco_url: the folder from the file's name
    assert convert_coco(_dump(data, tmp_path / "captions_val2017.json")) == want
    with pytest.raises(ConversionError, match=r"other.json: cannot tell the image folder .* pass --images_subdir"):
        convert_coco(_dump(data, tmp_path / "other.json"))
    assert convert_coco(tmp_path / "other.json", "val2017") == want
    # a 2014 file name carries its folder, whatever the annotation file is called
    for im in data["images"]:
        im["file_name"] = f"COCO_train2014_{im['file_name']}"
    recs = convert_coco(_dump(data, tmp_path / "captions_val2017_copy.json"))
    assert [r["image"] for r in recs] == [f"train2014/COCO_train2014_{r['image'].split('/')[1]}" for r in want]
    assert [r["captions"] for r in recs] == [r["captions"] for r in want]


def test_coco_repeated_annotation_id_keeps_each_images_own_captions(tmp_path):
    """Captions are taken from each image's own annotations, not looked up again by annotation id:
    an id that two annotations share (a merged or hand-edited file) must not give one image the
    other's caption."""
    data = _load(COCO)
    anns = data["annotations"]
    first = anns[0]
    other = next(a for a in anns if a["image_id"] != first["image_id"])
    first["id"] = other["id"]
    recs = convert_coco(_dump(data, tmp_path / "repeated_id.json"), "val2017")
    by_image = {r["image"]: r["captions"] for r in recs}
    for ann in (first, other):
        image = next(f"val2017/{im['file_name']}" for im in data["images"]
                     if im["id"] == ann["image_id"])
        want = [a["caption"].strip() for a in anns if a["image_id"] == ann["image_id"]]
        assert by_image[image] == want and ann["caption"].strip() in by_image[image]
    assert sum(len(c) for c in by_image.values()) == 37


# ---------------------------------------------------------------------------------------------------
# NoCaps
# ---------------------------------------------------------------------------------------------------

def test_nocaps_keeps_each_images_domain_and_reports_what_it_drops(tmp_path, capsys):
    report = Report()
    recs = convert_nocaps(NOCAPS, image_prefix="val", report=report)
    raw = _load(NOCAPS)
    assert [r["image"] for r in recs] == [f"val/{im['file_name']}" for im in raw["images"]]
    assert [r["domain"] for r in recs] == ["in-domain", "near-domain", "near-domain", "out-domain"]
    assert [r["image_id"] for r in recs] == [0, 1, 2, 3]
    assert recs[0]["captions"] == ["A man riding a bike down a street.", "a person on a bicycle in the city"]
    assert recs[2]["captions"][1] == "Some food sitting on a table"  # ends in a newline in the file: stripped
    assert report.total_skipped == 0 and "domains: in-domain 1, near-domain 2, out-domain 1" in report.lines()
    # an orphan annotation, an empty caption and an image left without captions are counted, not written
    data = _load(NOCAPS)
    data["annotations"] += [{"image_id": 99, "id": 90, "caption": "no such image"}]
    data["annotations"] = [a if a["image_id"] != 3 else dict(a, caption=" ") for a in data["annotations"]]
    report = Report()
    recs = convert_nocaps(_dump(data, tmp_path / "dropped.json"), report=report)
    assert [r["image_id"] for r in recs] == [0, 1, 2]
    assert dict(report.skipped) == {"annotation of an image not listed in 'images'": 1, "empty caption": 2,
                                    "image without captions": 1}
    # the CLI writes canonical pairs that read back with their extra fields
    out = tmp_path / "nocaps_val.jsonl"
    assert main(["nocaps", str(NOCAPS), "--image_prefix", "val", "--out", str(out)]) == 0
    assert "wrote 4 records (8 captions)" in capsys.readouterr().out
    back = read_pairs(str(out))
    assert [back[i]["domain"] for i in range(len(back))] == [r["domain"] for r in convert_nocaps(NOCAPS)]
    # bad input: one line naming the record and the field
    for change, want in ((lambda im: im.pop("domain"), r"images\[1\] \(id 1\): missing field 'domain'"),
                         (lambda im: im.update(domain="in"), r"images\[1\] \(id 1\): field 'domain' is 'in'"),
                         (lambda im: im.update(id=0), r"images\[1\] \(id 0\): field 'id' repeats")):
        data = _load(NOCAPS)
        change(data["images"][1])
        with pytest.raises(ConversionError, match=want):
            convert_nocaps(_dump(data, tmp_path / "bad.json"))


# ---------------------------------------------------------------------------------------------------
# Karpathy
# ---------------------------------------------------------------------------------------------------

def test_karpathy_coco_and_flickr(tmp_path):
    kp = FIX / "karpathy"
    test = convert_karpathy(kp / "dataset_coco.json", "test")
    assert len(test) == 1
    assert test[0]["image"] == "val2014/COCO_val2014_000000391895.jpg"  # filepath + filename
    assert len(test[0]["captions"]) == 5
    assert test[0]["captions"][0] == "A man with a red helmet on a small moped on a dirt road."  # raw ends in ' '
    train = convert_karpathy(kp / "dataset_coco.json", "train")
    assert [r["image"] for r in train] == ["train2014/COCO_train2014_000000537772.jpg"]
    assert convert_karpathy(kp / "dataset_coco.json", "val") == []

    f30k = convert_karpathy(kp / "dataset_flickr30k.json", "train", image_prefix="flickr30k-images")
    assert f30k == [{"image": "flickr30k-images/1000092795.jpg", "captions": [
        "Two young guys with shaggy hair look at their hands while hanging out in the yard.",
        "Two young, White males are outside near many bushes.",
        "Two men in green shirts are standing in a yard.",
        "A man in a blue shirt standing in a garden.",
        "Two friends enjoy time spent together."]}]
    f8k = convert_karpathy(kp / "dataset_flickr8k.json", "train", image_prefix="Flicker8k_Dataset")
    assert [r["image"] for r in f8k] == ["Flicker8k_Dataset/2513260012_03d33305cf.jpg",
                                         "Flicker8k_Dataset/2903617548_d3e38d7f88.jpg",
                                         "Flicker8k_Dataset/3338291921_fe7ae0c8f8.jpg"]
    assert f8k[1]["captions"][0] == "A little baby plays croquet ."  # raw keeps the tokenised " ."

    # restval merges into train only when asked
    data = _load(kp / "dataset_coco.json")
    data["images"][0]["split"] = "restval"
    path = _dump(data, tmp_path / "dataset_coco.json")
    assert len(convert_karpathy(path, "train")) == 1
    merged = convert_karpathy(path, "train", merge_restval=True)
    assert [r["image"] for r in merged] == ["val2014/COCO_val2014_000000391895.jpg",
                                            "train2014/COCO_train2014_000000537772.jpg"]
    assert [r["image"] for r in convert_karpathy(path, "restval")] == ["val2014/COCO_val2014_000000391895.jpg"]


def test_karpathy_counts_an_empty_caption(tmp_path):
    data = _load(FIX / "karpathy" / "dataset_coco.json")
    data["images"][0]["sentences"][1]["raw"] = "  "
    report = Report()
    recs = convert_karpathy(_dump(data, tmp_path / "dataset_coco.json"), "test", report=report)
    assert len(recs) == 1 and len(recs[0]["captions"]) == 4  # as coco / nocaps / blip count it
    assert dict(report.skipped) == {"empty caption": 1}
    assert report.examples["empty caption"] == ["COCO_val2014_000000391895.jpg"]


def test_karpathy_image_without_sentences_is_counted_not_written(tmp_path):
    """Some public copies of dataset_flickr8k.json have empty `sentences` on their test images (fixtures README):
    such an image is skipped and counted, not a record with no captions; a split name outside the four is warned."""
    data = _load(FIX / "karpathy" / "dataset_flickr8k.json")
    data["images"][1]["split"] = "test"
    data["images"][1]["sentences"] = []
    data["images"][2]["split"] = "dev"
    path = _dump(data, tmp_path / "dataset_flickr8k.json")
    report = Report()
    assert convert_karpathy(path, "test", report=report) == []
    assert dict(report.skipped) == {"image without sentences": 1}
    assert report.examples["image without sentences"] == ["2903617548_d3e38d7f88.jpg"]
    assert dict(report.warnings) == {"unknown split 'dev' (ignored)": 1}
    assert [r["image"] for r in convert_karpathy(path, "train")] == ["2513260012_03d33305cf.jpg"]


def test_karpathy_errors(tmp_path):
    data = _load(FIX / "karpathy" / "dataset_coco.json")
    del data["images"][1]["sentences"][2]["raw"]
    bad = _dump(data, tmp_path / "dataset_coco.json")
    with pytest.raises(ConversionError) as e:
        convert_karpathy(bad, "train")
    assert str(e.value) == f"{bad}: images[1] (imgid 116634) sentences[2]: missing field 'raw'"
    data = _load(FIX / "karpathy" / "dataset_flickr8k.json")
    data["images"][0]["filename"] = 12
    bad = _dump(data, tmp_path / "dataset_flickr8k.json")
    with pytest.raises(ConversionError, match=r"images\[0\] \(imgid 0\): field 'filename' should be a string"):
        convert_karpathy(bad, "train")


# ---------------------------------------------------------------------------------------------------
# BLIP / LAVIS
# ---------------------------------------------------------------------------------------------------

def test_blip_train_and_test_layouts(tmp_path):
    train = convert_blip(FIX / "blip" / "coco_karpathy_train.json")
    assert train == [
        {"image": "val2014/COCO_val2014_000000522418.jpg",
         "captions": ["A woman wearing a net on her head cutting a cake."]},
        {"image": "val2014/COCO_val2014_000000328757.jpg",
         "captions": ["A woman eating fresh vegetables from a bowl."]}]
    # one entry per caption: a second caption of coco_522418 later in the file joins the first record
    data = _load(FIX / "blip" / "coco_karpathy_train.json")
    data.append(dict(data[0], caption="A second caption of the cake image "))
    grouped = convert_blip(_dump(data, tmp_path / "train.json"))
    assert len(grouped) == 2
    assert grouped[0]["captions"] == ["A woman wearing a net on her head cutting a cake.",
                                      "A second caption of the cake image"]

    test = convert_blip(FIX / "blip" / "coco_karpathy_test.json")
    assert len(test) == 6 and all(len(r["captions"]) == 5 for r in test)
    assert test[0]["image"] == "val2014/COCO_val2014_000000391895.jpg"
    assert test[0]["captions"][0] == "A man with a red helmet on a small moped on a dirt road."
    f30k = convert_blip(FIX / "blip" / "flickr30k_test.json", image_prefix="f30k")
    assert [r["image"] for r in f30k] == ["f30k/flickr30k-images/1007129816.jpg",
                                          "f30k/flickr30k-images/1009434119.jpg"]


def test_blip_errors(tmp_path):
    data = _load(FIX / "blip" / "coco_karpathy_train.json")
    data.append(dict(data[0], image="val2014/COCO_val2014_000000000001.jpg"))
    bad = _dump(data, tmp_path / "train.json")
    with pytest.raises(ConversionError, match=r"\[2\] \(image_id coco_522418\): field 'image' is .*earlier entry"):
        convert_blip(bad)
    data = _load(FIX / "blip" / "coco_karpathy_test.json")
    del data[4]["image"]
    bad = _dump(data, tmp_path / "test.json")
    with pytest.raises(ConversionError) as e:
        convert_blip(bad)
    assert str(e.value) == f"{bad}: [4]: missing field 'image'"


def test_a_lone_surrogate_escape_in_a_caption_is_replaced_and_counted(tmp_path, capsys):
    """json.load accepts a lone UTF-16 surrogate escape ("\\ud83d": half an emoji, in web-scraped captions), which
    cannot be written as UTF-8: it becomes U+FFFD, counted, instead of a traceback with nothing written."""
    src = tmp_path / "blip.json"
    src.write_text('[{"image": "a.jpg", "caption": "smile \\ud83d"},'
                   ' {"image": "b.jpg", "caption": ["a pair \\ud83d\\ude00 is one emoji", "x\\udc00y\\ud800"]}]')
    out = tmp_path / "blip.jsonl"
    assert main(["blip", str(src), "--out", str(out)]) == 0
    assert list(read_pairs(str(out))) == [{"image": "a.jpg", "captions": ["smile \ufffd"]},
                                          {"image": "b.jpg", "captions": ["a pair \U0001f600 is one emoji",
                                                                          "x\ufffdy\ufffd"]}]
    assert f"warning 2: {LONE_SURROGATE} (e.g. a.jpg, b.jpg)" in capsys.readouterr().out.splitlines()
    # one left in a path, which no converter rewrites, is a one-line error and no file
    with pytest.raises(ConversionError, match=r"bad.jsonl: record 1: a lone UTF-16 surrogate escape"):
        write_jsonl([{"image": "a.jpg", "captions": ["x"]}, {"image": "\ud83d.jpg", "captions": ["x"]}],
                    tmp_path / "bad.jsonl")
    assert sorted(os.listdir(tmp_path)) == ["blip.json", "blip.jsonl"]


# ---------------------------------------------------------------------------------------------------
# img2dataset
# ---------------------------------------------------------------------------------------------------

def test_img2dataset_files_folder():
    report = Report()
    recs = convert_img2dataset(FIX / "img2dataset", image_prefix="cc3m", report=report)
    assert recs == [
        {"image": "cc3m/00000/000000000.jpg",
         "captions": ["a river has burst it 's banks and has spread out onto arable farmland alongside"]},
        {"image": "cc3m/00000/000000002.jpg", "captions": ["placeholder caption for a second sample"]}]
    # key 000000001 failed to download (404 in 00000_stats.json): no files, skipped and named
    reason = "failed sample: no files in the shard folder (failed_to_download/resize)"
    assert report.total_skipped == 1 and report.skipped[reason] == 1
    assert report.examples[reason] == ["000000001"]
    assert any("HTTP Error 404" in n for n in report.notes)


def test_img2dataset_files_cut_short_json_sidecar_is_a_counted_bad_sample(tmp_path):
    """A sidecar .json cut short (img2dataset writes it in place, so a crashed run leaves one) or not
    UTF-8 is one bad sample, skipped and counted as in a .tar shard, not the end of the conversion."""
    root = tmp_path / "i2d"
    shutil.copytree(FIX / "img2dataset", root)
    (root / "00000" / "000000000.json").write_bytes(b'{\n    "caption": "a river has bu')
    (root / "00000" / "000000002.json").write_bytes(b'{"status": "success", "caption": "\xff"}')
    report = Report()
    assert convert_img2dataset(root, report=report) == []
    assert report.skipped["unreadable .json sidecar (JSONDecodeError)"] == 1
    assert report.skipped["unreadable .json sidecar (UnicodeDecodeError)"] == 1
    assert report.examples["unreadable .json sidecar (JSONDecodeError)"] == [
        os.path.join("00000", "000000000.json")]


def test_img2dataset_caption_fallback_status_and_errors(tmp_path):
    root = tmp_path / "i2d"
    shutil.copytree(FIX / "img2dataset", root)
    shard = root / "00000"
    os.remove(shard / "000000002.txt")  # caption falls back to the .json field
    Image.new("RGB", (4, 4)).save(shard / "000000002.webp")  # an existing image fixes the extension
    meta = _load(shard / "000000000.json")
    meta["status"] = "failed_to_resize"
    _dump(meta, shard / "000000000.json")
    report = Report()
    recs = convert_img2dataset(root, report=report)
    assert recs == [{"image": "00000/000000002.webp", "captions": ["placeholder caption for a second sample"]}]
    assert report.skipped["status 'failed_to_resize'"] == 1 and report.total_skipped == 2

    del meta["status"]
    _dump(meta, shard / "000000000.json")
    with pytest.raises(ConversionError) as e:
        convert_img2dataset(root)
    assert str(e.value) == f"{shard / '000000000.json'}: key 000000000: missing field 'status'"
    with pytest.raises(ConversionError, match="no shard subfolders"):
        convert_img2dataset(tmp_path / "i2d" / "00000")


# ---------------------------------------------------------------------------------------------------
# Visual Genome
# ---------------------------------------------------------------------------------------------------

def test_vg_regions(tmp_path):
    guess = Report()
    recs = convert_vg(VG, report=guess)
    assert sum(guess.warnings.values()) == 1 and "VG_100K/ assumed" in next(iter(guess.warnings))
    assert recs == [{"image": "VG_100K/1.jpg", "captions": [
        "the clock is green in colour", "shade is along the street", "man is wearing sneakers",
        "cars headlights are off", "bicycles are seen in the bckground"]}]
    # image 1 really is in VG_100K_2: found under --image_root
    (tmp_path / "VG_100K_2").mkdir()
    (tmp_path / "VG_100K_2" / "1.jpg").write_bytes(b"")
    assert convert_vg(VG, image_root=tmp_path)[0]["image"] == "VG_100K_2/1.jpg"
    # or from image_data.json's url (aligned list keyed by image_id)
    idata = _dump([{"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg",
                    "width": 800, "height": 600, "coco_id": None, "flickr_id": None}], tmp_path / "image_data.json")
    found = Report()
    assert convert_vg(VG, image_data_path=idata, report=found)[0]["image"] == "VG_100K_2/1.jpg"
    assert not found.warnings
    report = Report()
    short = convert_vg(VG, max_regions_per_image=2, report=report)
    assert short[0]["captions"] == ["the clock is green in colour", "shade is along the street"]
    assert report.total_skipped == 3
    assert convert_vg(VG, min_words=5)[0]["captions"] == [
        "the clock is green in colour", "shade is along the street", "bicycles are seen in the bckground"]


def test_vg_negative_counts_are_refused_not_a_dropped_last_phrase(tmp_path):
    """--max_regions_per_image keeps the first N phrases (0 = all): a negative N would slice
    phrases[:-1] and silently drop each image's last phrase; the CLI stops in one line instead."""
    with pytest.raises(ValueError, match="max_regions_per_image and min_words must be >= 0"):
        convert_vg(VG, max_regions_per_image=-1)
    for flag in ("--max_regions_per_image", "--min_words"):
        with pytest.raises(SystemExit) as e:
            main(["vg", str(VG), flag, "-1", "--out", str(tmp_path / "vg.jsonl")])
        assert e.value.code == 2 and not (tmp_path / "vg.jsonl").exists()


def test_vg_errors(tmp_path):
    data = _load(VG)
    del data[0]["regions"][1]["phrase"]
    bad = _dump(data, tmp_path / "region_descriptions.json")
    with pytest.raises(ConversionError) as e:
        convert_vg(bad)
    assert str(e.value) == f"{bad}: [0] (id 1) regions[1] (region_id 1383): missing field 'phrase'"
    data = _load(VG)
    data[0]["image_id"] = data[0].pop("id")
    bad = _dump(data, tmp_path / "region_descriptions2.json")
    with pytest.raises(ConversionError, match=r"\[0\]: missing field 'id'"):
        convert_vg(bad)
    idata = _dump([{"image_id": 2, "url": "x"}], tmp_path / "image_data.json")
    with pytest.raises(ConversionError, match="aligned index-for-index"):
        convert_vg(VG, image_data_path=idata)


# ---------------------------------------------------------------------------------------------------
# VQAv2 / OK-VQA / GQA
# ---------------------------------------------------------------------------------------------------

def test_vqav2_join():
    report = Report()
    recs = convert_vqav2(VQA_Q, VQA_A, report=report)
    assert recs == [{"image": "val2014/COCO_val2014_000000262148.jpg", "question": "Where is he looking?",
                     "answers": ["down", "down", "at table", "skateboard", "down", "table", "down", "down",
                                 "down", "down"],
                     "question_id": 262148000}]
    assert report.skipped["question without annotation"] == 17
    everything = convert_vqav2(VQA_Q, VQA_A, allow_unanswered=True)
    assert len(everything) == 18 and sum(1 for r in everything if r["answers"] == []) == 17
    assert everything[-1]["image"] == "val2014/COCO_val2014_000000131089.jpg"
    # test questions come without annotations at all
    assert len(convert_vqav2(VQA_Q, None, allow_unanswered=True)) == 18
    with pytest.raises(ConversionError, match="no annotations file"):
        convert_vqav2(VQA_Q, None)


def test_vqav2_test_dev_images_live_in_test2015(tmp_path):
    data = _load(VQA_Q)
    data["data_subtype"] = "test-dev2015"
    recs = convert_vqav2(_dump(data, tmp_path / "q.json"), None, allow_unanswered=True)
    assert recs[0]["image"] == "test2015/COCO_test2015_000000262148.jpg" and recs[0]["answers"] == []


def test_okvqa_join_uses_answer_not_raw_answer(tmp_path):
    report = Report()
    recs = convert_okvqa(OK_Q, OK_A, report=report)
    assert recs == [{"image": "train2014/COCO_train2014_000000051606.jpg",
                     "question": "What is the hairstyle of the blond called?",
                     "answers": ["pony tail"] * 6 + ["ponytail"] * 4, "question_id": 516065,
                     "dataset": "okvqa"}]  # marks OK-VQA's lemmatised scoring (blip2_pformer.lemmatize_vqa)
    assert report.skipped["question without annotation"] == 2
    data = _load(OK_A)
    data["annotations"][0]["answers"][0]["raw_answer"] = "Pony Tail!"
    assert convert_okvqa(OK_Q, _dump(data, tmp_path / "a.json"))[0]["answers"][0] == "pony tail"


def test_vqa_errors(tmp_path):
    data = _load(VQA_A)
    del data["annotations"][0]["answers"][4]["answer"]
    bad = _dump(data, tmp_path / "ann.json")
    with pytest.raises(ConversionError) as e:
        convert_vqav2(VQA_Q, bad)
    assert str(e.value) == f"{bad}: annotations[0] (question_id 262148000) answers[4]: missing field 'answer'"
    data = _load(VQA_A)
    data["annotations"][0]["image_id"] = 5
    bad = _dump(data, tmp_path / "ann2.json")
    with pytest.raises(ConversionError, match="question_id 262148000: field 'image_id' is 5"):
        convert_vqav2(VQA_Q, bad)
    data = _load(VQA_Q)
    data["questions"][7]["question"] = None
    bad = _dump(data, tmp_path / "q.json")
    with pytest.raises(ConversionError) as e:
        convert_vqav2(bad, VQA_A)
    assert str(e.value) == (f"{bad}: questions[7] (question_id 393226000): field 'question' should be a string, "
                            f"got null")
    with pytest.raises(ConversionError) as e:
        convert_okvqa(tmp_path / "missing.json", OK_A)
    assert str(e.value) == f"{tmp_path / 'missing.json'}: file not found"


def test_gqa(tmp_path):
    recs = convert_gqa(GQA)
    assert recs == [
        {"image": "images/2375429.jpg", "question": "What is on the white wall?", "answers": ["pipe"] * 10,
         "question_id": "07333408"},  # string id keeps its leading zero
        {"image": "images/n250821.jpg", "question": "Which room is it?", "answers": ["bedroom"] * 10,
         "question_id": "20644644"}]
    data = _load(GQA)
    del data["20644644"]["answer"]
    bad = _dump(data, tmp_path / "q.json")
    with pytest.raises(ConversionError) as e:
        convert_gqa(bad)
    assert str(e.value).startswith(f"{bad}: question '20644644': missing field 'answer'")
    assert convert_gqa(bad, allow_unanswered=True)[1]["answers"] == []
    data["07333408"]["imageId"] = 2375429
    bad = _dump(data, tmp_path / "q2.json")
    with pytest.raises(ConversionError, match="question '07333408': field 'imageId' should be a string, got int"):
        convert_gqa(bad, allow_unanswered=True)


# ---------------------------------------------------------------------------------------------------
# Output, images, CLI
# ---------------------------------------------------------------------------------------------------

def test_outputs_read_back_with_canonical_readers(tmp_path):
    n = write_jsonl(convert_coco(COCO), tmp_path / "sub" / "coco.jsonl")
    pairs = read_pairs(str(tmp_path / "sub" / "coco.jsonl"))
    assert n == len(pairs) == 7 and pairs[6]["image"] == "val2017/000000431896.jpg"
    write_jsonl(convert_gqa(GQA), tmp_path / "gqa.jsonl")
    vqa = read_vqa(str(tmp_path / "gqa.jsonl"))
    assert vqa[0]["question_id"] == "07333408"
    assert not list(tmp_path.glob("**/*.tmp"))


def test_check_images_drops_missing_and_unreadable(tmp_path):
    recs = convert_coco(COCO, "val2017")
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(tmp_path / "val2017" / "000000397133.jpg")
    (tmp_path / "val2017" / "000000037777.jpg").write_bytes(b"not a jpeg")
    report = Report()
    kept = check_images(recs, tmp_path, report)
    assert [r["image"] for r in kept] == ["val2017/000000397133.jpg"]
    assert report.skipped == {"image unreadable": 1, "image file missing": 5}


def test_cli_help_for_every_kind(capsys):
    kinds = list(build_parser()._subparsers._group_actions[0].choices)  # every kind the parser has, cifar included
    assert set(kinds) >= {"coco", "nocaps", "karpathy", "blip", "flickr30k_csv", "img2dataset", "vg", "vqav2",
                          "okvqa", "gqa", "mlslt", "cifar"}
    for kind in kinds:
        with pytest.raises(SystemExit) as e:
            main([kind, "--help"])
        assert e.value.code == 0
        assert "--out" in capsys.readouterr().out


def test_cli_subprocess(tmp_path):
    script = str(REPO / "data" / "convert.py")
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "img2dataset" in r.stdout and "vqav2" in r.stdout
    out = tmp_path / "vqa.jsonl"
    r = subprocess.run([sys.executable, script, "vqav2", "--questions", str(VQA_Q), "--annotations", str(VQA_A),
                        "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped 17: question without annotation" in r.stdout and "wrote 1 records" in r.stdout
    assert [json.loads(l)["question_id"] for l in out.read_text().splitlines()] == [262148000]
    # bad input: one line on stderr, exit status 1, no traceback
    r = subprocess.run([sys.executable, script, "coco", str(tmp_path / "nope.json"), "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {tmp_path / 'nope.json'}: file not found"


def test_cli_in_process_errors_and_check_images(tmp_path, capsys):
    out = tmp_path / "kp.jsonl"
    # an empty split is an error, not an empty file
    assert main(["karpathy", str(FIX / "karpathy" / "dataset_coco.json"), "--split", "val", "--out", str(out)]) == 1
    assert "no records to write" in capsys.readouterr().err and not out.exists()
    (tmp_path / "val2014").mkdir()
    Image.new("RGB", (5, 5)).save(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")
    assert main(["blip", str(FIX / "blip" / "coco_karpathy_test.json"), "--out", str(out),
                 "--check_images", "--image_root", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "skipped 5: image file missing" in printed and "wrote 1 records (5 captions)" in printed
    assert len(read_pairs(str(out))) == 1
    with pytest.raises(SystemExit):
        main(["karpathy", str(FIX / "karpathy" / "dataset_coco.json"), "--split", "val", "--merge_restval",
              "--out", str(out)])


# ---------------------------------------------------------------------------------------------------
# Reliability: odd paths, bad bytes, safe output files
# ---------------------------------------------------------------------------------------------------

def test_parent_and_absolute_image_paths_are_counted(tmp_path):
    data = _load(FIX / "blip" / "coco_karpathy_test.json")
    data[0]["image"] = "../secret/x.jpg"
    data[1]["image"] = "/abs/y.jpg"
    report = Report()
    recs = convert_blip(_dump(data, tmp_path / "test.json"), image_prefix="coco", report=report)
    assert recs[0]["image"] == "coco/../secret/x.jpg" and recs[1]["image"] == "/abs/y.jpg"
    assert report.warnings["image path contains '..' (reaches outside the image root)"] == 1
    assert report.warnings["absolute image path (--image_prefix and --image_root not applied)"] == 1
    assert report.examples["absolute image path (--image_prefix and --image_root not applied)"] == ["/abs/y.jpg"]
    clean = Report()
    convert_blip(FIX / "blip" / "coco_karpathy_test.json", image_prefix="coco", report=clean)
    assert not clean.warnings
    kp = _load(FIX / "karpathy" / "dataset_flickr30k.json")
    kp["images"][0]["filename"] = "/data/f30k/1000092795.jpg"
    report = Report()
    recs = convert_karpathy(_dump(kp, tmp_path / "f30k.json"), "train", image_prefix="flickr30k-images",
                            report=report)
    assert recs[0]["image"] == "/data/f30k/1000092795.jpg" and sum(report.warnings.values()) == 1


def test_img2dataset_non_utf8_caption_is_a_counted_bad_sample(tmp_path):
    root = tmp_path / "i2d"
    shutil.copytree(FIX / "img2dataset", root)
    (root / "00000" / "000000002.txt").write_bytes(b"caf\xe9 au lait")
    report = Report()
    recs = convert_img2dataset(root, report=report)
    assert [r["image"] for r in recs] == ["00000/000000000.jpg"]
    reason = "caption .txt not UTF-8 (byte 3)"
    assert report.skipped[reason] == 1 and report.examples[reason] == [os.path.join("00000", "000000002.txt")]


def test_written_files_are_readable_by_others(tmp_path):
    """mkstemp creates its file 0600 and the rename keeps the mode: a converted file shared on a cluster was
    private to its writer."""
    write_jsonl([{"image": "a.jpg", "captions": ["x"]}], tmp_path / "pairs.jsonl")
    assert os.stat(tmp_path / "pairs.jsonl").st_mode & 0o777 == 0o644


def test_write_jsonl_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out" / "pairs.jsonl"
    out.parent.mkdir()
    os.symlink(victim, str(out) + ".tmp")  # the old fixed temp name, planted as a link
    write_jsonl([{"image": "a.jpg", "captions": ["x"]}], out)
    assert victim.read_text() == "precious"
    assert read_pairs(str(out))[0]["image"] == "a.jpg"
    assert sorted(os.listdir(out.parent)) == ["pairs.jsonl", "pairs.jsonl.tmp"]  # only the planted link is left
    os.remove(str(out) + ".tmp")
    os.remove(out)
    os.symlink(victim, out)  # a link at the output name is replaced, not written through
    write_jsonl([{"image": "b.jpg", "captions": ["y"]}], out)
    assert victim.read_text() == "precious" and not os.path.islink(out)


def test_readme_lists_exactly_the_converter_kinds(capsys):
    kinds = set(build_parser()._subparsers._group_actions[0].choices)
    readme = (REPO / "data" / "README.md").read_text() + (REPO / "README.md").read_text()
    import re
    listed = set()
    for m in re.finditer(r"data/convert\.py \{([a-z0-9_,]+)\}", readme):
        listed |= set(m.group(1).split(","))
    assert listed == kinds, (listed, kinds)


# ---------------------------------------------------------------------------------------------------
# Kaggle Flickr30K results.csv
# ---------------------------------------------------------------------------------------------------

F30K_CSV = FIX / "flickr30k_kaggle" / "flickr30k_images" / "results.csv"
F30K_SPLIT = FIX / "flickr30k_kaggle" / "dataset_flickr30k.json"
NO_PIPE = "row without its second '|' (number and comment split at the first space)"


def test_flickr30k_csv_rows_and_quirks(tmp_path):
    report = Report()
    recs = convert_flickr30k_csv(F30K_CSV, report=report)
    assert [r["image"] for r in recs] == ["flickr30k_images/1000092795.jpg", "flickr30k_images/10002456.jpg",
                                          "flickr30k_images/1007129816.jpg", "flickr30k_images/2199200615.jpg"]
    assert recs[0]["captions"] == [
        "Two young guys with shaggy hair look at their hands while hanging out in the yard .",
        "Two young , White males are outside near many bushes .", "Two men in green shirts are standing in a yard .",
        "A man in a blue shirt standing in a garden .", "Two friends enjoy time spent together ."]
    assert recs[3]["captions"] == [
        '" Max " is written on the collar of the brown dog .',  # quotes are text, not CSV quoting
        'A dog wearing a shirt that says " I love NY " runs outside .',
        "A dog runs on the lawn .",  # stray spaces around the fields and inside the caption
        "A dog is running .",
        "A dog runs across the grass ."]  # the real row without its second '|'
    assert report.total_skipped == 0 and dict(report.warnings) == {NO_PIPE: 1}
    assert report.examples[NO_PIPE] == ["line 21 (2199200615.jpg)"]
    # the fixture carries the quote quirk: a csv reader set up as loaders often are loses those quotes
    with open(F30K_CSV, encoding="utf-8", newline="") as f:
        assert list(csv.reader(f, delimiter="|", skipinitialspace=True))[16][2] != recs[3]["captions"][0]
    # a Windows-edited copy (BOM, CRLF) reads the same; output reads back with the canonical reader
    crlf = tmp_path / "results.csv"
    crlf.write_bytes(b"\xef\xbb\xbf" + F30K_CSV.read_bytes().replace(b"\n", b"\r\n"))
    assert convert_flickr30k_csv(crlf, image_prefix="") == [dict(r, image=r["image"].split("/")[1]) for r in recs]
    write_jsonl(recs, tmp_path / "f30k.jsonl")
    assert read_pairs(str(tmp_path / "f30k.jsonl"))[3]["captions"][4] == "A dog runs across the grass ."


def test_flickr30k_csv_karpathy_split():
    report = Report()
    test = convert_flickr30k_csv(F30K_CSV, F30K_SPLIT, "test", report=report)
    assert [r["image"] for r in test] == ["flickr30k_images/1007129816.jpg"] and len(test[0]["captions"]) == 5
    # 10002456.jpg is not in the split file: its 5 rows are counted, the image named once
    assert report.skipped == {"row of an image not in the split file": 5}
    assert report.examples["row of an image not in the split file"] == ["10002456.jpg"]
    assert report.examples["image of split 'test' without rows in the csv"] == ["1009434119.jpg"]
    assert [r["image"] for r in convert_flickr30k_csv(F30K_CSV, F30K_SPLIT, "train")] == [
        "flickr30k_images/1000092795.jpg"]
    val = convert_flickr30k_csv(F30K_CSV, F30K_SPLIT, "val")
    assert val[0]["image"] == "flickr30k_images/2199200615.jpg" and len(val[0]["captions"]) == 5
    with pytest.raises(ValueError, match="go together"):
        convert_flickr30k_csv(F30K_CSV, split="test")


def test_flickr30k_csv_bad_rows_and_errors(tmp_path, capsys):
    lines = F30K_CSV.read_bytes().split(b"\n")
    lines[3] = b"1000092795.jpg| 2"  # no comment at all
    lines[4] = b"1000092795.jpg| 3| Two men in gr\xe9en shirts ."  # Latin-1 byte
    lines[5] = b"1000092795.jpg| x| Two friends enjoy time spent together ."
    bad = tmp_path / "results.csv"
    bad.write_bytes(b"\n".join(lines))
    report = Report()
    recs = convert_flickr30k_csv(bad, report=report)
    assert len(recs[0]["captions"]) == 3
    assert report.skipped == {"row without a comment": 1, "line not UTF-8 (byte 32)": 1}
    assert report.examples["row without a comment"] == ["line 4 (1000092795.jpg)"]
    assert report.warnings["comment_number not a number (row kept)"] == 1
    # without its header the first line is a row (warned); any other first line is an error naming the line
    headless = tmp_path / "headless.csv"
    headless.write_bytes(F30K_CSV.read_bytes().split(b"\n", 1)[1])
    report = Report()
    assert len(convert_flickr30k_csv(headless, report=report)) == 4
    assert report.warnings["no header line (the first line is read as a row)"] == 1
    other = tmp_path / "captions.txt"
    other.write_text("image,caption\n1000092795.jpg,Two young guys .\n")
    with pytest.raises(ConversionError) as e:
        convert_flickr30k_csv(other)
    assert str(e.value) == (f"{other}: line 1: expected the header 'image_name| comment_number| comment', "
                            f"got 'image,caption'")
    split = _load(F30K_SPLIT)
    del split["images"][2]["split"]
    bad_split = _dump(split, tmp_path / "dataset_flickr30k.json")
    with pytest.raises(ConversionError) as e:
        convert_flickr30k_csv(F30K_CSV, bad_split, "test")
    assert str(e.value) == f"{bad_split}: images[2] (1009434119.jpg): missing field 'split'"
    # CLI: a split needs the split file
    out = tmp_path / "f30k_test.jsonl"
    assert main(["flickr30k_csv", str(F30K_CSV), "--karpathy", str(F30K_SPLIT), "--split", "test",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped 5: row of an image not in the split file" in printed and "wrote 1 records (5 captions)" in printed
    assert read_pairs(str(out))[0]["image"] == "flickr30k_images/1007129816.jpg"
    with pytest.raises(SystemExit):
        main(["flickr30k_csv", str(F30K_CSV), "--split", "test", "--out", str(out)])


# ---------------------------------------------------------------------------------------------------
# img2dataset webdataset shards
# ---------------------------------------------------------------------------------------------------

WDS = FIX / "img2dataset_wds"
FAILED_TAR = "failed sample: no files in the .tar shard (failed_to_download/resize)"


def _jpeg(rgb=(10, 20, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, "JPEG")
    return buf.getvalue()


def _write_tar(path, members):
    """members: [(name, bytes) or (name, None) for a folder], written as webdataset's TarWriter does."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o444
                tar.addfile(ti, io.BytesIO(data))


def _meta(key, caption="a caption", status="success"):
    return json.dumps({"caption": caption, "url": "https://example.com/x.jpg", "key": key, "status": status,
                       "error_message": None, "width": 8, "height": 8}, indent=4).encode()


def test_img2dataset_webdataset_shards_match_the_files_layout(tmp_path):
    report = Report()
    recs = convert_img2dataset(WDS, image_prefix="cc3m", report=report, check_images=True)
    files = convert_img2dataset(FIX / "img2dataset", image_prefix="cc3m")
    assert recs == files and len(recs) == 2  # the same samples, read from the tar
    assert dict(report.skipped) == {FAILED_TAR: 1} and report.examples[FAILED_TAR] == ["000000001"]
    assert any("HTTP Error 404" in n for n in report.notes)
    # extraction writes the files layout: converting it again gives the same pairs and the same failure count
    out = tmp_path / "cc3m_files"
    assert convert_img2dataset(WDS, image_prefix="cc3m", extract_to=out) == recs
    assert sorted(os.listdir(out)) == ["00000", "00000_stats.json"]
    assert sorted(os.listdir(out / "00000")) == [f"00000000{k}.{e}" for k in (0, 2) for e in ("jpg", "json", "txt")]
    again = Report()
    assert convert_img2dataset(out, image_prefix="cc3m", report=again, check_images=True) == recs
    assert again.skipped == {"failed sample: no files in the shard folder (failed_to_download/resize)": 1}
    with tarfile.open(WDS / "00000.tar") as tar:
        assert (out / "00000" / "000000000.jpg").read_bytes() == tar.extractfile("000000000.jpg").read()
    assert not list(out.glob("**/*.tmp"))


def test_img2dataset_webdataset_counts_bad_members(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    _write_tar(root / "00000.tar", [
        ("000000000.jpg", _jpeg()), ("000000000.json", _meta("000000000")), ("000000000.txt", b"a good sample"),
        ("000000001.jpg", _jpeg()), ("000000001.json", _meta("000000001")), ("000000001.txt", b"caf\xe9"),
        ("000000002.jpg", _jpeg()), ("000000002.json", b'{"status": "succ'), ("000000002.txt", b"cut json"),
        ("000000003.json", _meta("000000003")), ("000000003.txt", b"orphan: no image"),
        ("000000004.jpg", _jpeg()), ("000000004.txt", b"no json member"),
        ("000000005.jpg", b"\xff\xd8 not a jpeg"), ("000000005.json", _meta("000000005")),
        ("000000005.txt", b"broken pixels"),
        ("000000006.jpg", _jpeg()), ("000000006.json", _meta("000000006", "caption from the json")),
        ("000000006.npy", b"\x93NUMPY"),
        ("extras", None), ("../escape.jpg", _jpeg()),
        ("000000000.txt", b"the key again, apart from its first members")])
    _dump({"count": 10, "successes": 7, "status_dict": {"success": 7, "HTTP Error 404: Not Found": 3}},
          root / "00000_stats.json")
    report = Report()
    recs = convert_img2dataset(root, report=report, check_images=True)
    assert recs == [{"image": "00000/000000000.jpg", "captions": ["a good sample"]},
                    {"image": "00000/000000006.jpg", "captions": ["caption from the json"]}]
    assert dict(report.skipped) == {
        "caption .txt not UTF-8 (byte 3)": 1, "unreadable .json member (JSONDecodeError)": 1,
        "no image member (orphan .txt/.json)": 1, "no .json member (status unknown)": 1, "image unreadable": 1,
        "key repeated apart from its first members (ignored)": 1, FAILED_TAR: 3}
    assert report.examples["no image member (orphan .txt/.json)"] == ["00000.tar:000000003"]
    assert report.examples[FAILED_TAR] == ["000000007", "000000008", "000000009"]
    assert dict(report.warnings) == {"tar member of another kind (ignored)": 1,
                                     "tar member that is not a regular file (ignored)": 1,
                                     "tar member named otherwise than <key>.<ext> (ignored)": 1}
    # without check_images the broken jpeg is kept (decoding every image is opt-in)
    assert len(convert_img2dataset(root)) == 3
    # a .json member without 'status' is a layout error, named like a files-layout sidecar's
    _write_tar(root / "00000.tar", [("000000000.jpg", _jpeg()), ("000000000.json", b'{"caption": "x"}')])
    with pytest.raises(ConversionError) as e:
        convert_img2dataset(root)
    assert str(e.value) == f"{root / '00000.tar'}: member 000000000.json: missing field 'status'"


def test_img2dataset_webdataset_corrupt_and_truncated_shards(tmp_path):
    good = (WDS / "00000.tar").read_bytes()
    with tarfile.open(WDS / "00000.tar") as tar:
        second = tar.getmember("000000002.jpg").offset  # header of the second sample
    root = tmp_path / "wds"
    root.mkdir()
    shutil.copy(WDS / "00000_stats.json", root)
    lost = "sample lost in a corrupt .tar shard (a success in _stats.json, not readable)"
    for name, data in (("truncated", good[:second + 700]),  # inside the second sample's jpg
                       ("bad header", good[:second] + b"\x17" * 512 + good[second + 512:])):  # tarfile stops silently
        (root / "00000.tar").write_bytes(data)
        report = Report()
        recs = convert_img2dataset(root, report=report)
        assert [r["image"] for r in recs] == ["00000/000000000.jpg"], name
        corrupt = [k for k in report.skipped if k.startswith("corrupt .tar shard")]
        assert len(corrupt) == 1 and report.examples[corrupt[0]] == ["00000.tar"], name
        assert report.skipped[lost] == 1 and report.skipped[FAILED_TAR] == 1, name  # 2 successes, 1 failure
    (root / "00000.tar").write_bytes(b"not a tar at all" * 100)
    report = Report()
    assert convert_img2dataset(root, report=report) == []
    assert report.skipped[lost] == 2 and report.skipped[FAILED_TAR] == 1


def test_img2dataset_extract_to_refuses_another_sets_files(tmp_path, capsys):
    """img2dataset numbers every set's keys from 000000000: a second set extracted into the folder of a first
    must not put its images under the first set's pairs.  The same set extracted again is allowed."""
    out = tmp_path / "files"
    recs = convert_img2dataset(WDS, image_prefix="files", extract_to=out)

    def files():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    before = files()
    assert len(before) == 7 and convert_img2dataset(WDS, image_prefix="files", extract_to=out) == recs
    assert files() == before
    # another set (sbu): the same keys and _stats.json, other image bytes and captions
    sbu = tmp_path / "sbu"
    sbu.mkdir()
    with tarfile.open(WDS / "00000.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    _write_tar(sbu / "00000.tar", [(name, data + b"SBU" if name.endswith(".jpg") else
                                    b"an sbu caption" if name.endswith(".txt") else data) for name, data in members])
    shutil.copy(WDS / "00000_stats.json", sbu)
    assert main(["img2dataset", str(sbu), "--extract_to", str(out), "--jobs", "2",
                 "--out", str(tmp_path / "s.jsonl")]) == 1
    assert capsys.readouterr().err == (f"error: {out}: already holds another extraction (00000/000000000.jpg differs "
                                       f"from the one extracted now): use another --extract_to\n")
    assert files() == before and not (tmp_path / "s.jsonl").exists()
    # its own _stats.json (img2dataset's timings differ each run) stops it before anything is written, even a
    # sample whose key the first set lacks
    stats = _load(WDS / "00000_stats.json")
    _dump(dict(stats, start_time=stats["start_time"] + 1), sbu / "00000_stats.json")
    _write_tar(sbu / "00000.tar", [("000000001.jpg", _jpeg()), ("000000001.json", _meta("000000001")),
                                   ("000000001.txt", b"a key the first set lacks")])
    with pytest.raises(ConversionError, match=r"already holds another extraction \(00000_stats.json differs"):
        convert_img2dataset(sbu, extract_to=out)
    assert files() == before


def test_img2dataset_webdataset_cli(tmp_path, capsys):
    out = tmp_path / "cc3m.jsonl"
    # shards + --out need somewhere to put the images
    assert main(["img2dataset", str(WDS), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {WDS}: .tar shards: pass --extract_to DIR to write the images the pairs point to, "
                   f"or leave out --out to count and check only") and not out.exists()
    # no --out: count and check only
    assert main(["img2dataset", str(WDS), "--check_images"]) == 0
    printed = capsys.readouterr().out
    assert f"skipped 1: {FAILED_TAR}" in printed and "checked 2 usable records" in printed
    assert os.listdir(tmp_path) == []
    assert main(["img2dataset", str(WDS), "--extract_to", str(tmp_path / "files"), "--image_prefix", "files",
                 "--out", str(out)]) == 0
    assert "wrote 2 records" in capsys.readouterr().out
    pairs = list(read_pairs(str(out)))
    assert [p["image"] for p in pairs] == ["files/00000/000000000.jpg", "files/00000/000000002.jpg"]
    assert check_images(pairs, tmp_path) == pairs
    # a folder holding both layouts must be told which one
    both = tmp_path / "both"
    shutil.copytree(FIX / "img2dataset", both)
    shutil.copy(WDS / "00000.tar", both)
    with pytest.raises(ConversionError, match="both shard subfolders and .tar shards"):
        convert_img2dataset(both)
    assert len(convert_img2dataset(both, layout="webdataset")) == len(convert_img2dataset(both, layout="files")) == 2


def test_img2dataset_webdataset_shards_in_worker_processes(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    for shard in (0, 1, 2):  # 3 samples each; index 1 failed, and shard 2's sample 2 has a non-UTF-8 caption
        keys = [f"{shard:05d}{i:04d}" for i in (0, 2)]
        _write_tar(root / f"{shard:05d}.tar", [m for k in keys for m in (
            (f"{k}.jpg", _jpeg((shard * 50, 0, 0))), (f"{k}.json", _meta(k)),
            (f"{k}.txt", b"caf\xe9" if k == "000020002" else f"shard {shard} key {k}".encode()))])
        _dump({"count": 3, "successes": 2}, root / f"{shard:05d}_stats.json")
    one, two = Report(), Report()
    recs = convert_img2dataset(root, report=one, check_images=True)
    assert len(recs) == 5 and recs[-1]["image"] == "00002/000020000.jpg"
    assert convert_img2dataset(root, report=two, check_images=True, jobs=2) == recs
    assert one.skipped == two.skipped == {FAILED_TAR: 3, "caption .txt not UTF-8 (byte 3)": 1}
    assert one.examples == two.examples and one.examples[FAILED_TAR] == ["000000001", "000010001", "000020001"]


# ---------------------------------------------------------------------------------------------------
# MLSLT videos (ffmpeg)
# ---------------------------------------------------------------------------------------------------

MLSLT = FIX / "mlslt"
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None,
                                  reason="ffmpeg not installed (apt-get install ffmpeg; .ci/run installs it)")


def _tiny_mp4(path, seconds=2):
    """A 32x32 25-fps clip whose every frame differs (ffmpeg's testsrc draws a moving pattern and a counter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                    f"testsrc=duration={seconds}:size=32x32:rate=25", "-c:v", "mpeg4", "-y", str(path)], check=True)


def test_mlslt_without_ffmpeg_says_how_to_install(tmp_path, capsys):
    missing = str(tmp_path / "no-ffmpeg-here")
    with pytest.raises(ConversionError) as e:
        convert_mlslt(MLSLT, "dev", tmp_path / "frames", ffmpeg=missing)
    assert str(e.value).startswith(f"{missing}: command not found;") and "apt-get install ffmpeg" in str(e.value)
    assert main(["mlslt", str(MLSLT), "--split", "dev", "--frames_dir", str(tmp_path / "frames"),
                 "--out", str(tmp_path / "dev.jsonl"), "--ffmpeg", missing]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "brew install ffmpeg" in err
    assert not (tmp_path / "dev.jsonl").exists()


@needs_ffmpeg
def test_mlslt_frames_captions_and_skips(tmp_path):
    root = tmp_path / "SP-10"
    shutil.copy(MLSLT / "dev.json", root.mkdir() or root / "dev.json")
    _tiny_mp4(root / "dev" / "635" / "en.mp4")  # 50 frames; at 5 fps: 10
    shutil.copy(root / "dev" / "635" / "en.mp4", root / "dev" / "635" / "de.mp4")
    (root / "dev" / "1746").mkdir()
    (root / "dev" / "1746" / "en.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but no video")
    frames = tmp_path / "frames"
    report = Report()
    recs = convert_mlslt(root, "dev", frames, sign_langs=("en", "de"), fps=5, max_frames=4, report=report)
    paths = [f"dev/635/{lang}/0000{i}.jpg" for lang in ("en", "de") for i in range(4)]
    assert recs == [{"frames": paths[:4], "captions": ["Where to?"]},  # English text for every signing language
                    {"frames": paths[4:], "captions": ["Where to?"]}]
    assert dict(report.skipped) == {"video ffmpeg cannot decode": 1, "video file missing": 1}
    assert report.examples["video file missing"] == [os.path.join("dev", "1746", "de.mp4")]
    assert sorted(os.listdir(frames / "dev" / "635" / "en")) == [f"0000{i}.jpg" for i in range(4)]
    # the 4 kept frames are the centres of 4 equal segments of the 10 frames at 5 fps: 1, 3, 6, 8
    every = convert_mlslt(root, "dev", tmp_path / "all", fps=5, max_frames=100)[0]["frames"]
    assert len(every) == 10
    kept = [(frames / p).read_bytes() for p in paths[:4]]
    assert kept == [(tmp_path / "all" / every[i]).read_bytes() for i in (1, 3, 6, 8)]
    assert len(set(kept)) == 4
    # written through the CLI, read back as canonical video records; a rerun replaces the frame folders
    out = tmp_path / "dev.jsonl"
    for _ in range(2):
        assert main(["mlslt", str(root), "--split", "dev", "--frames_dir", str(frames), "--max_frames", "3",
                     "--image_prefix", "frames", "--out", str(out)]) == 0
    videos = list(read_video(str(out)))
    assert videos == [{"frames": [f"frames/dev/635/en/0000{i}.jpg" for i in range(3)], "captions": ["Where to?"]}]
    assert sorted(os.listdir(frames / "dev" / "635" / "en")) == [f"0000{i}.jpg" for i in range(3)]
    assert not [n for n in os.listdir(frames / "dev" / "635") if n.endswith(".tmp")]
    # a frame folder holding anything else is not deleted
    (frames / "dev" / "635" / "en" / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="holds other files than frames"):
        convert_mlslt(root, "dev", frames)


@needs_ffmpeg
def test_mlslt_repeated_id_is_one_record_and_one_extraction(tmp_path):
    """Two entries with one id (635 and "635") name one video and one frame folder: the repeat is
    skipped and counted, not a second record of the same frames, nor a second ffmpeg job replacing
    that folder while the first writes it (os.replace onto a full folder, rmtree of a gone one)."""
    root = tmp_path / "SP-10"
    data = _load(MLSLT / "dev.json")[:1]
    root.mkdir()
    _dump(data + [dict(data[0], id=str(data[0]["id"]))], root / "dev.json")
    _tiny_mp4(root / "dev" / "635" / "en.mp4", seconds=1)
    for jobs in (1, 2, 2):
        report = Report()
        recs = convert_mlslt(root, "dev", tmp_path / "frames", fps=5, max_frames=3, jobs=jobs,
                             report=report)
        frames = [f"dev/635/en/0000{i}.jpg" for i in range(3)]
        assert recs == [{"frames": frames, "captions": ["Where to?"]}]
        assert dict(report.skipped) == {"repeated id and signing language": 1}
        assert report.examples["repeated id and signing language"] == ["635/en"]

@needs_ffmpeg
def test_mlslt_test_split_languages_and_errors(tmp_path):
    root = tmp_path / "SP-10"
    shutil.copy(MLSLT / "test.json", root.mkdir() or root / "test.json")
    for vid in ("3108", "21742"):
        (root / "test" / vid).mkdir(parents=True)
    _tiny_mp4(root / "test" / "3108" / "en.mp4", seconds=1)
    report = Report()
    recs = convert_mlslt(root, "test", tmp_path / "frames", lang="de", sign_langs=("en", "bg", "zh"), fps=2,
                         report=report)
    assert recs == [{"frames": ["test/3108/en/00000.jpg", "test/3108/en/00001.jpg"],
                     "captions": ["Ich habe ihn lange Zeit nicht gesehen"]}]  # the --lang text, the en video
    assert dict(report.skipped) == {"signing language not in sign_list": 1, "no video (video_url null)": 1,
                                    "video file missing": 3}
    assert report.examples["signing language not in sign_list"] == ["3108/bg"]
    assert report.examples["no video (video_url null)"] == ["21742/zh"]
    data = _load(MLSLT / "test.json")
    del data[1]["sign_list"][4]["text"]
    _dump(data, root / "test.json")
    with pytest.raises(ConversionError) as e:
        convert_mlslt(root, "test", tmp_path / "frames")
    assert str(e.value) == f"{root / 'test.json'}: [1] (id 21742) sign_list[4]: missing field 'text'"
    data[1]["id"] = "../21742"
    _dump(data, root / "test.json")
    with pytest.raises(ConversionError, match=r"\[1\] \(id ../21742\): field 'id' cannot name a folder"):
        convert_mlslt(root, "test", tmp_path / "frames")


# --------------------------------------------------------------------------------------------------
# data/openclip_to_hf.py (the full conversion is tested in tests/test_negclip.py)
# --------------------------------------------------------------------------------------------------

def test_openclip_state_dict_drops_the_clip_packages_size_tensors(tmp_path):
    """The `clip` package's TorchScript models hold input_resolution, context_length and vocab_size
    as 0-dim tensors (openai/CLIP clip/clip.py calls model.input_resolution.item()), so their state
    dicts carry them: they are sizes, not weights, and must not stop the renaming as unknown."""
    import torch

    import data.openclip_to_hf as C
    sd = torch.load(FIX / "openclip" / "epoch_1.pt", weights_only=True)["state_dict"]
    sizes = {"input_resolution": torch.tensor(16), "context_length": torch.tensor(8),
             "vocab_size": torch.tensor(64)}
    plain = {k[len("module."):]: v for k, v in sd.items()}
    torch.save({**plain, **sizes}, tmp_path / "jit_state_dict.pt")
    got = C.read_state_dict(str(tmp_path / "jit_state_dict.pt"))
    assert not set(sizes) & set(got) and len(got) == len(sd)
    assert len(C.hf_state_dict(got)) > len(got)  # renamed, every fused q/k/v split in three


def test_cifar_counts_the_images_it_writes_not_the_rows_it_skips(tmp_path, capsys):
    """A row whose label is outside the class list is skipped (counted); the counts returned and
    printed are the images written, so they match the ImageFolder on disk."""
    import pickle

    import numpy as np

    from data.convert import convert_cifar
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"bird"]}, f, protocol=2)
    batches = [(f"data_batch_{i}", [0, 1]) for i in range(1, 5)]
    batches += [("data_batch_5", [1, 7]), ("test_batch", [0, -1, 1])]
    for name, labels in batches:
        pixels = np.zeros((len(labels), 3072), np.uint8)
        with open(src / name, "wb") as f:
            pickle.dump({b"labels": labels, b"data": pixels}, f, protocol=2)
    report = Report()
    counts = convert_cifar(str(src), str(tmp_path / "out"), report=report)
    on_disk = {s: sum(len(os.listdir(tmp_path / "out" / s / c)) for c in ("airplane", "bird"))
               for s in ("train", "test")}
    assert counts == on_disk == {"train": 9, "test": 2}
    assert report.skipped["label outside 0..1"] == 2
    assert os.listdir(tmp_path / "out" / "test" / "bird") == ["00002.png"]  # the row's index
    assert main(["cifar", str(src), "--out", str(tmp_path / "cli")]) == 0
    assert "wrote 9 train and 2 test images" in capsys.readouterr().out


def test_openclip_vision_head_width_sets_the_vision_towers_heads_apart():
    """The head count cannot be read off the shapes, and open_clip's ViT-H-14 / g-14 / bigG-14 vision
    towers have 80 / 88 / 104-wide heads where their text towers have 64: --vision_head_width sets the
    vision tower's alone (a wrong count converts without error into another model)."""
    import data.openclip_to_hf as C
    sd = C.read_state_dict(str(FIX / "openclip" / "epoch_1.pt"))
    vw, tw = sd["visual.conv1.weight"].shape[0], sd["positional_embedding"].shape[1]
    both = C.clip_config(sd, head_width=4)
    apart = C.clip_config(sd, head_width=4, vision_head_width=2)
    assert both.vision_config.num_attention_heads == vw // 4
    assert apart.vision_config.num_attention_heads == vw // 2 != vw // 4
    assert apart.text_config.num_attention_heads == both.text_config.num_attention_heads == tw // 4
