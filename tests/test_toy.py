"""The toy world: determinism, every file in its native layout, real compositional negatives, backbones that
load with transformers and carry signal (CLIP retrieval far above chance, LM perplexity far below uniform)."""
import ast
import csv
import hashlib
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data.benchmarks as B
from common.data import read_pairs, read_video, read_vqa
from common.image import ImageTransform, load_image
from data import toy

MODEL_FILES = ("models", "manifest.json", "models_vocab.txt")


def _hashes(root):
    """sha256 of every data file (backbones and the timing-bearing manifest excluded)."""
    out = {}
    for d, _, files in os.walk(root):
        rel_d = os.path.relpath(d, root)
        if rel_d.split(os.sep)[0] in MODEL_FILES:
            continue
        for f in files:
            rel = os.path.normpath(os.path.join(rel_d, f))
            if rel in MODEL_FILES:
                continue
            with open(os.path.join(d, f), "rb") as fh:
                out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _bag(text):
    """Bag of words, with 'an' read as 'a' (the article follows the next word, not the meaning)."""
    return sorted("a" if w == "an" else w for w in text.split())


def _scenes(root):
    with open(os.path.join(root, "scenes.jsonl")) as f:
        return {s["image_id"]: s for s in map(json.loads, f)}


# ---------------------------------------------------------------------------------------------------------------
# A tiny truth evaluator for the caption forms the benchmarks use, so negatives are checked against the scene.
# ---------------------------------------------------------------------------------------------------------------
_REL = sorted(toy.REL_PHRASE.items(), key=lambda kv: -len(kv[1]))


def _np(text):
    words = text.split()
    assert words[0] in ("a", "an", "the"), text
    attrs = {"shape": words[-1], "colour": None, "size": None}
    for w in words[1:-1]:
        attrs["size" if w in toy.SIZES else "colour"] = w
    return attrs


def _match(m, objs):
    hits = [o for o in objs if o["shape"] == m["shape"] and m["colour"] in (None, o["colour"])
            and m["size"] in (None, o["size"])]
    return hits[0] if hits else None


def holds(caption, objs):
    for rel, phrase in _REL:
        if f" {phrase} " in f" {caption} ":
            left, right = caption.split(f" {phrase} ")
            left = left[:-3] if left.endswith(" is") else left  # "the circle is to the left of the square"
            a, b = _match(_np(left), objs), _match(_np(right), objs)
            return a is not None and b is not None and a is not b and toy.relation(a, b) == rel
    nps = re.split(r", | and ", caption)
    found = [_match(_np(t), objs) for t in nps]
    return all(f is not None for f in found) and len({id(f) for f in found}) == len(found)


# ---------------------------------------------------------------------------------------------------------------
def test_cli_help():
    with pytest.raises(SystemExit) as e:
        toy.main(["--help"])
    assert e.value.code == 0


def test_deterministic_data(toy_root, tmp_path):
    """Same seed -> identical bytes for every data file; another seed -> different files."""
    with open(os.path.join(toy_root, "manifest.json")) as f:
        man = json.load(f)
    if man["seed"] == 0 and man["tiny"]:
        ref = _hashes(toy_root)
    else:  # a reused world built differently: compare two fresh builds instead
        toy.build_toy_world(str(tmp_path / "ref"), tiny=True, seed=0, models=False, log=lambda *a: None)
        ref = _hashes(str(tmp_path / "ref"))
    toy.build_toy_world(str(tmp_path / "a"), tiny=True, seed=0, models=False, log=lambda *a: None)
    again = _hashes(str(tmp_path / "a"))
    assert len(ref) > 500 and again == ref
    assert not [p for p in os.listdir(tmp_path) if ".building-" in p]  # temp folder renamed away
    pairs_ref = (tmp_path / "a" / "pairs_train.jsonl").read_text()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "scenes.jsonl").write_text("")  # a stale world folder without manifest is replaced
    (tmp_path / "b" / "half_built.txt").write_text("x")
    toy.build_toy_world(str(tmp_path / "b"), tiny=True, seed=1, models=False, log=lambda *a: None)
    assert (tmp_path / "b" / "pairs_train.jsonl").read_text() != pairs_ref
    assert not (tmp_path / "b" / "half_built.txt").exists()
    # replace=False (what ensure_toy_world uses) keeps a world that is already complete
    man = toy.build_toy_world(str(tmp_path / "b"), tiny=True, seed=0, models=False, log=lambda *a: None,
                              replace=False)
    assert man["seed"] == 1 and (tmp_path / "b" / "pairs_train.jsonl").read_text() != pairs_ref
    # no temp or trash folders left behind ("ref" exists when the session's world was built from another seed)
    assert sorted(p for p in os.listdir(tmp_path) if p != "ref") == ["a", "b"]


def test_a_folder_that_is_not_a_toy_world_is_never_replaced(tmp_path):
    """A mistyped --out or toy_root naming someone's folder stops before any build; it was replaced (deleted)."""
    quiet = lambda *a: None  # noqa: E731
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (tmp_path / "a_file").write_text("keep")
    for out, call in ((mine, toy.build_toy_world), (mine, toy.ensure_toy_world), (tmp_path / "a_file",
                                                                                  toy.build_toy_world)):
        with pytest.raises(FileExistsError, match="not a toy world"):
            call(str(out), tiny=True, models=[], log=quiet)
    assert (mine / "notes.txt").read_text() == "keep" and (tmp_path / "a_file").read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "mine"] and os.listdir(mine) == ["notes.txt"]


def test_bad_arguments_are_refused_before_anything_is_built(tmp_path, capsys):
    """An unknown backbone or a shard count below 1 stops at once: the CLI with a usage error, the functions
    with a ValueError; no folder is left behind (an unknown backbone left <out>.building-<pid>, and
    --shards -1 went on to write no shard, 0 divided by zero)."""
    with pytest.raises(SystemExit) as e:
        toy.main(["--out", str(tmp_path / "w"), "--models", "clip,vicuna", "--tiny"])
    assert e.value.code == 2 and "vicuna" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown toy backbone"):
        toy.build_toy_world(str(tmp_path / "w"), tiny=True, models=["vicuna"], log=lambda *a: None)
    assert os.listdir(tmp_path) == []
    world = tmp_path / "built"  # a world's marker files only: nothing below may read or build anything
    for d in ("vl_checklist", "classification"):
        (world / d).mkdir(parents=True)
    (world / "manifest.json").write_text(json.dumps({"seed": 0, "tiny": True}))
    for n in ("-1", "-3"):
        with pytest.raises(SystemExit) as e:
            toy.main(["--out", str(world), "--data_only", "--shards", n])
        assert e.value.code == 2 and "--shards" in capsys.readouterr().err
    for n in (0, -2):
        with pytest.raises(ValueError, match="n_shards"):
            toy.write_shards(str(world), n_shards=n)
    with pytest.raises(ValueError, match="fmt"):  # PNG bytes were written as <key>.webp
        toy.write_shards(str(world), fmt="webp")
    assert sorted(os.listdir(world)) == ["classification", "manifest.json", "vl_checklist"]


def test_a_killed_builds_folder_is_removed_by_the_next_build(tmp_path, monkeypatch):
    """A build killed half-way left <out>.building-<pid> (and, killed between its renames, <out>.old-<pid>) for
    ever.  The next build of <out> removes those whose process no longer runs (os.kill(pid, 0):
    ProcessLookupError), and nothing else: not a live builder's folder, not another world's, not a name without a
    pid."""
    import subprocess
    import sys
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # reaped: its pid names no process now
    out = tmp_path / "w"
    dead = [tmp_path / f"w.building-{done.pid}", tmp_path / f"w.old-{done.pid}"]
    keep = [tmp_path / f"w.building-{os.getppid()}", tmp_path / f"w.old-{os.getppid()}", tmp_path / "w.building-x1",
            tmp_path / f"v.building-{done.pid}", tmp_path / f"w.older-{done.pid}"]
    for d in [*dead, *keep]:
        (d / "images").mkdir(parents=True)
        (d / "images" / "0.png").write_bytes(b"half")

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop
    monkeypatch.setattr(toy, "build_data", stop)  # only the clean-up before the build is under test
    lines = []
    with pytest.raises(Stop):
        toy.build_toy_world(str(out), tiny=True, models=False, log=lines.append)
    assert not any(d.exists() for d in dead) and all((d / "images" / "0.png").read_bytes() == b"half" for d in keep)
    assert sorted(os.listdir(tmp_path)) == sorted(d.name for d in keep)  # (its own temp folder: gone too)
    assert all(any(str(d) in line for line in lines) for d in dead)
    # a killed _join_world (a part added to an older world) left <root>/.<part>-<pid>: the next join removes it
    root = tmp_path / "old_world"
    (root / f".vl_checklist-{done.pid}").mkdir(parents=True)
    (root / f".vl_checklist-{os.getppid()}").mkdir()
    (root / "manifest.json").write_text("{}")
    toy._join_world(str(root), "vl_checklist", lambda tmp, man: os.makedirs(os.path.join(tmp, "vl_checklist")),
                    lines.append)
    assert sorted(os.listdir(root)) == [f".vl_checklist-{os.getppid()}", "manifest.json", "vl_checklist"]


def test_two_builders_at_once_build_each_part_once(tmp_path, monkeypatch):
    """Two processes that find the same world incomplete (two runs started together) build each part once: the
    second waits for the first's lock and finds it done.  Unlocked, both built the data and both trained the same
    backbone into models/<name>, one deleting or overwriting the files the other was writing or reading."""
    import threading
    import time
    calls, root = [], str(tmp_path / "w")

    def fake_world(out, tiny, seed, models, log, replace):  # stands for the data build (seconds)
        calls.append("data")
        time.sleep(0.5)
        for d in ("vl_checklist", "classification"):
            os.makedirs(os.path.join(out, d), exist_ok=True)
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump({"seed": seed, "tiny": tiny}, f)

    def fake_train(name, root_, tiny, seed, log):  # stands for training one backbone
        calls.append(name)
        time.sleep(0.5)
        os.makedirs(os.path.join(root_, "models", name), exist_ok=True)
        return {}

    monkeypatch.setattr(toy, "build_toy_world", fake_world)
    monkeypatch.setattr(toy, "_train_one", fake_train)
    errors = []

    def run():  # a second open file description of the folder: flock treats it as another process's
        try:
            toy.ensure_toy_world(root, tiny=True, models=["bert"], log=lambda *a: None)
        except Exception as e:  # noqa: BLE001  -- reported below
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and calls == ["data", "bert"], (errors, calls)
    assert toy.model_ready(root, "bert")


def test_ensure_reuses_complete_world(toy_root):
    mtime = os.path.getmtime(os.path.join(toy_root, "manifest.json"))
    assert toy.ensure_toy_world(toy_root, tiny=True) == toy_root
    assert os.path.getmtime(os.path.join(toy_root, "manifest.json")) == mtime


def test_canonical_files(toy_root):
    man = json.load(open(os.path.join(toy_root, "manifest.json")))
    scenes = _scenes(toy_root)
    qids = set()
    for split in ("train", "val", "test"):
        pairs = read_pairs(os.path.join(toy_root, f"pairs_{split}.jsonl"))
        assert len(pairs) == man["counts"][f"pairs_{split}"] > 0
        for r in pairs[:40]:
            assert len(r["captions"]) == 5 == len(set(r["captions"]))
            im = load_image(os.path.join(toy_root, r["image"]))
            assert im is not None and im.size == (64, 64)
            sc = scenes[r["image_id"]]
            assert 1 <= len(sc["objects"]) <= 3
            for o in sc["objects"]:  # every caption that names an object names it correctly
                assert o["shape"] in toy.SHAPES and o["colour"] in toy.COLOURS and o["size"] in toy.SIZES
        vqa = read_vqa(os.path.join(toy_root, f"vqa_{split}.jsonl"))
        for q in vqa:
            assert len(q["answers"]) == 10 and isinstance(q["question_id"], int) and q["question_id"] not in qids
            qids.add(q["question_id"])
        assert {q["question_type"] for q in vqa} >= {"colour", "shape", "count", "exist", "relation"}
        vids = read_video(os.path.join(toy_root, f"video_{split}.jsonl"))
        for v in vids:
            assert 4 <= len(v["frames"]) <= 8 and len(v["captions"]) == 5
            assert all(os.path.isfile(os.path.join(toy_root, p)) for p in v["frames"])
    # noisy annotators: some questions' answers disagree, most agree with the majority
    vqa = read_vqa(os.path.join(toy_root, "vqa_train.jsonl"))
    disagree = sum(len(set(q["answers"])) > 1 for q in vqa) / len(vqa)
    assert 0.2 < disagree < 0.8
    assert len({len(v["frames"]) for v in read_video(os.path.join(toy_root, "video_train.jsonl"))}) > 2
    lines = open(os.path.join(toy_root, "corpus.txt")).read().splitlines()
    assert len(lines) == man["counts"]["corpus"] >= 2000 and all(lines)


def test_sugarcrepe_native_and_negatives_false(toy_root):
    scenes = _scenes(toy_root)
    for t in ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"):
        raw = open(os.path.join(toy_root, "sugarcrepe", f"{t}.json")).read()
        assert raw.startswith('{\n    "0": {\n        "filename": ') and raw.endswith("\n") == (t == "swap_obj")
        d = json.loads(raw)
        assert len(d) >= 30 and all(k.isdigit() for k in d)
        for rec in d.values():
            assert set(rec) == {"filename", "caption", "negative_caption"}
            assert os.path.isfile(os.path.join(toy_root, "sugarcrepe", "val2017", rec["filename"]))
            objs = scenes[f"{int(rec['filename'][:-4]):06d}"]["objects"]
            assert holds(rec["caption"], objs), (t, rec)
            assert not holds(rec["negative_caption"], objs), (t, rec)
            if t.startswith("swap"):  # a bag-of-words model cannot tell these apart
                assert _bag(rec["caption"]) == _bag(rec["negative_caption"])


def test_aro_crepe_svo_winoground_blip(toy_root):
    scenes = _scenes(toy_root)
    rel = json.load(open(os.path.join(toy_root, "aro", "visual_genome_relation.json")))
    att = json.load(open(os.path.join(toy_root, "aro", "visual_genome_attribution.json")))
    for r in rel:
        assert isinstance(r["image_id"], str) and isinstance(r["relation_info"]["object"], str)
        assert _bag(r["true_caption"]) == _bag(r["false_caption"])
        objs = scenes[f"{int(r['image_id']) - 2400000:06d}"]["objects"]
        assert holds(r["true_caption"], objs) and not holds(r["false_caption"], objs)
        assert os.path.isfile(os.path.join(toy_root, "aro", "images", r["image_path"]))
    for r in att:
        assert len(r["attributes"]) == 2 and {"bbox_x", "bbox_y", "bbox_w", "bbox_h"} <= set(r)
        objs = scenes[f"{int(r['image_id']) - 2400000:06d}"]["objects"]
        assert holds(r["true_caption"], objs) and not holds(r["false_caption"], objs)
    # CREPE: exact header, hard_negs as a Python list (or set) string of 5, float boxes
    header = "image_id,caption,n,n_objects,n_relations,n_attributes,n_connected_components,hard_negs,x,y,width,height"
    files = json.load(open(os.path.join(toy_root, "manifest.json")))["crepe_files"]
    assert {f.split("/")[2] for f in files} == {"atom", "swap", "negate"}
    for rel_path in files:
        with open(os.path.join(toy_root, rel_path)) as f:
            assert f.readline().strip() == header
        for row in csv.DictReader(open(os.path.join(toy_root, rel_path))):
            negs = ast.literal_eval(row["hard_negs"])
            assert isinstance(negs, (list, set)) and len(negs) == 5 and row["caption"] not in negs
            assert int(row["n"]) == int(row["n_objects"]) + int(row["n_relations"]) + int(row["n_attributes"])
            assert float(row["width"]) == 64.0 and "." in row["x"]
            assert os.path.isfile(os.path.join(toy_root, "crepe", "VG_100K", f"{row['image_id']}.jpg"))
    # SVO-Probes: exactly one negated slot; the negative image does not show the sentence
    rows = list(csv.DictReader(open(os.path.join(toy_root, "svo_probes", "svo_probes.csv"))))
    assert list(rows[0]) == ["sentence", "pos_triplet", "neg_triplet", "pos_url", "neg_url", "pos_image_id",
                             "neg_image_id", "subj_neg", "verb_neg", "obj_neg"]
    assert any(r["neg_triplet"].startswith("[") for r in rows)
    for r in rows:
        assert [r[k] for k in ("subj_neg", "verb_neg", "obj_neg")].count("True") == 1
        neg = r["neg_triplet"]
        neg = ast.literal_eval(neg)[0] if neg.startswith("[") else neg
        s, v, o = r["pos_triplet"].split(",")
        pos_objs = scenes[f"{int(r['pos_image_id']):06d}"]["objects"]
        neg_objs = scenes[f"{int(r['neg_image_id']):06d}"]["objects"]
        cap = f"{toy._article(s)} {toy.REL_PHRASE[v]} {toy._article(o)}"
        assert holds(cap, pos_objs) and not holds(cap, neg_objs)
        ns, nv, no = neg.split(",")
        assert holds(f"{toy._article(ns)} {toy.REL_PHRASE[nv]} {toy._article(no)}", neg_objs)
        for k in ("pos_image_id", "neg_image_id"):
            assert os.path.isfile(os.path.join(toy_root, "svo_probes", "images", f"{r[k]}.jpg"))
    # Winoground: two PNGs per example, captions with the same words
    wg = [json.loads(line) for line in open(os.path.join(toy_root, "winoground", "examples.jsonl"))]
    assert len(wg) >= 20 and {w["collapsed_tag"] for w in wg} == {"Object", "Relation"}
    for w in wg:
        assert _bag(w["caption_0"]) == _bag(w["caption_1"]) and w["caption_0"] != w["caption_1"]
        for k in (0, 1):
            assert w[f"image_{k}"] == f"ex_{w['id']}_img_{k}"
            assert load_image(os.path.join(toy_root, "winoground", "images", w[f"image_{k}"] + ".png")) is not None
    blip = json.load(open(os.path.join(toy_root, "blip", "coco_karpathy_test.json")))
    assert all(isinstance(b["caption"], list) and len(b["caption"]) == 5 for b in blip)
    assert os.path.isfile(os.path.join(toy_root, blip[0]["image"]))


def test_vl_checklist_layout_and_negatives_false(toy_root):
    """VL-CheckList files in the published layout parse with data/benchmarks.py's reader; every positive holds for
    its scene and no negative does; the captions only use words the toy backbones know."""
    from data.benchmarks import read_vlc
    scenes = _scenes(toy_root)
    man = json.load(open(os.path.join(toy_root, "manifest.json")))
    root = os.path.join(toy_root, "vl_checklist")
    d = read_vlc(root)
    assert {s for s, _ in d} == {"Object/Location/center", "Object/Location/mid", "Object/Location/margin",
                                 "Object/Size/small", "Object/Size/large", "Attribute/color", "Attribute/size",
                                 "Relation/spatial"}
    assert {n for _, n in d} == {"vg", "vg_obj", "vg_subj"}
    vocab = set(open(os.path.join(toy_root, "models_vocab.txt")).read().split())
    cap = (toy.SIZES_TINY if man["tiny"] else toy.SIZES_FULL)["bench"]
    for (sub, name), items in d.items():
        assert 0 < len(items) <= cap
        for path, pos, neg in items:
            m = re.fullmatch(r".*/vl_checklist/vg/VG_100K(_2)?/(\d+)\.jpg", path)
            assert m and os.path.isfile(path) and len(pos) == len(neg) == 1
            objs = scenes[f"{int(m.group(2)) - 2500000:06d}"]["objects"]
            assert holds(pos[0], objs) and not holds(neg[0], objs), (sub, name, pos, neg)
            assert set(pos[0].split()) | set(neg[0].split()) <= vocab
    with open(os.path.join(root, "corpus", "v1", "Relation", "spatial", "vg.yaml")) as f:
        assert f.read() == 'ANNO_PATH: "data/Relation/vg/spatial.json"\nIMG_ROOT: "vg/"\nTYPE: "TUPLE_JSON"'


@pytest.mark.parametrize("writer, folder, least", [("write_vlc", "vl_checklist", 30),
                                                   ("write_classification", "classification", 300)])
def test_a_later_part_draws_its_own_stream_and_joins_older_worlds(tmp_path, monkeypatch, writer, folder, least):
    """Without the part's writer every other file (and the vocabulary the backbones are built from) is
    byte-identical; a world built without it gets the same bytes from ensure_toy_world, manifest untouched."""
    quiet = lambda *a: None  # noqa: E731
    toy.build_toy_world(str(tmp_path / "a"), tiny=True, seed=0, models=False, log=quiet)
    with monkeypatch.context() as m:
        m.setattr(toy, writer, lambda *a, **k: {})
        toy.build_toy_world(str(tmp_path / "b"), tiny=True, seed=0, models=False, log=quiet)
    full, without = _hashes(str(tmp_path / "a")), _hashes(str(tmp_path / "b"))
    part = {k for k in full if k.startswith(folder + os.sep)}
    assert len(part) > least and {k: v for k, v in full.items() if k not in part} == without
    assert (tmp_path / "a" / "models_vocab.txt").read_bytes() == (tmp_path / "b" / "models_vocab.txt").read_bytes()
    mtime = os.path.getmtime(tmp_path / "b" / "manifest.json")
    toy.ensure_toy_world(str(tmp_path / "b"), tiny=True, models=[], log=quiet)
    assert _hashes(str(tmp_path / "b")) == full and os.path.getmtime(tmp_path / "b" / "manifest.json") == mtime
    assert not [p for p in os.listdir(tmp_path / "b") if p.startswith(f".{folder}-")]


def test_toy_classification_sets(toy_root):
    tiny = json.load(open(os.path.join(toy_root, "manifest.json")))["tiny"]
    per_train, per_test = (toy.SIZES_TINY if tiny else toy.SIZES_FULL)["classify"]
    vocab = set(open(os.path.join(toy_root, "models_vocab.txt")).read().split())
    for name, (attr, classes, _) in toy.CLASSIFY.items():
        d = B.read_image_folder(os.path.join(toy_root, "classification", name))
        assert d["classes"] == sorted(classes) and len(d["train"]) == per_train * len(classes)
        assert len(d["test"]) == per_test * len(classes)
        assert all(set(t.format(c).rstrip(".").split()) <= vocab for t in d["templates"] for c in d["names"])
    # a colour set's image is mostly its class's colour: count the pixels nearest each palette colour
    d = B.read_image_folder(os.path.join(toy_root, "classification", "toy_colours"))
    palette = np.array([toy.COLOURS[c] for c in d["classes"]] + [toy.BACKGROUND], dtype=float)
    for path, k in d["test"][::7]:
        px = np.asarray(Image.open(path), dtype=float).reshape(-1, 3)
        near = np.abs(px[:, None] - palette[None]).sum(-1).argmin(1)
        assert np.bincount(near[near < len(d["classes"])], minlength=len(d["classes"])).argmax() == k, path


def test_image_chat_layout(toy_root):
    d = os.path.join(toy_root, "image_chat")
    pers = json.load(open(os.path.join(d, "personalities.json")))
    assert set(pers) == {"positive", "neutral", "negative"}
    styles = {s for v in pers.values() for s in v}
    for split in ("train", "valid", "test"):
        eps = json.load(open(os.path.join(d, f"{split}.json")))
        assert isinstance(eps, list) and eps
        for e in eps:
            assert re.fullmatch(r"[0-9a-f]{32}", e["image_hash"])
            assert os.path.isfile(os.path.join(d, "images", e["image_hash"] + ".jpg"))
            assert len(e["dialog"]) == 3 and all(len(t) == 2 and t[0] in styles for t in e["dialog"])
            if split != "train":
                for t, c in zip(e["dialog"], e["candidates"]):
                    assert set(c) == {"100", "1000"} and len(c["100"]) == 100 and t[1] in c["100"]
                    assert t[1] in c["1000"]
    # utterances name the image's content: turn 2 names an object's colour and shape
    scenes = [s for s in _scenes(toy_root).values() if s["split"] == "val"]
    eps = json.load(open(os.path.join(d, "valid.json")))
    for s, e in zip(scenes, eps):
        names = {f"{o['colour']} {o['shape']}" for o in s["objects"]}
        assert any(n in e["dialog"][1][1] for n in names)


# ---------------------------------------------------------------------------------------------------------------
def _tok(root, name):
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(os.path.join(root, "models", name))
    assert t.is_fast
    text = ["a red circle to the left of a blue square", "there is a green star"]
    enc = t(text, padding=True)
    assert len(set(map(len, enc["input_ids"]))) == 1 and enc["attention_mask"][1][-1] == 0
    assert t.batch_decode(enc["input_ids"], skip_special_tokens=True) == text  # lossless round trip
    return t, t(text[0])["input_ids"]


def test_tokenizer_conventions(toy_root):
    t, ids = _tok(toy_root, "bert")
    assert t.convert_ids_to_tokens([ids[0], ids[-1]]) == ["[CLS]", "[SEP]"] and t.pad_token_id == 0
    t, ids = _tok(toy_root, "clip")
    assert t.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<|startoftext|>", "<|endoftext|>"]
    assert ids[-1] == max(t.get_vocab().values())  # eot is the top id, as in CLIP
    t, ids = _tok(toy_root, "opt")
    assert t.convert_ids_to_tokens(ids[:1]) == ["</s>"] and t("x\n")["input_ids"][-1] == t.convert_tokens_to_ids("\n")
    t, ids = _tok(toy_root, "gpt2")
    assert t.eos_token == t.pad_token == "<|endoftext|>" and t.eos_token_id not in ids
    t, ids = _tok(toy_root, "t5")
    assert t.convert_ids_to_tokens(ids[-1:]) == ["</s>"] and t.pad_token_id == 0
    assert t("a <extra_id_0> circle")["input_ids"][1] == t.convert_tokens_to_ids("<extra_id_0>") != t.unk_token_id


def test_clip_retrieval_far_above_chance(toy_root):
    from transformers import AutoTokenizer, CLIPModel
    path = os.path.join(toy_root, "models", "clip")
    model, tok = CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    pairs = read_pairs(os.path.join(toy_root, "pairs_val.jsonl"))
    tf = ImageTransform(64)
    with torch.no_grad():
        px = torch.stack([tf(load_image(os.path.join(toy_root, r["image"]))) for r in pairs])
        im = toy._features(model.get_image_features(pixel_values=px))
        enc = tok([r["captions"][0] for r in pairs], padding=True, return_tensors="pt")
        tx = toy._features(model.get_text_features(**enc))
        sim = torch.nn.functional.normalize(im, dim=-1) @ torch.nn.functional.normalize(tx, dim=-1).T  # (N, N)
    r1 = float((sim.argmax(1) == torch.arange(len(pairs))).float().mean())
    assert r1 > 10 / len(pairs), r1  # chance is 1/N


def test_gpt2_reads_context(toy_root):
    """An earlier caption of the same scene lowers GPT-2's loss on the next one (it was trained on such documents,
    as real GPT-2 on web text), which is what lets a visual prefix steer it (perceiver_caption --bridge mapper)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel
    path = os.path.join(toy_root, "models", "gpt2")
    model, tok = GPT2LMHeadModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    eot = tok.eos_token_id

    def loss(context, target):  # mean next-token loss on `target` only
        ids = torch.tensor([context + target])
        with torch.no_grad():
            return float(model(input_ids=ids, labels=torch.tensor([[-100] * len(context) + target])).loss)

    alone, after = [], []
    for r in read_pairs(os.path.join(toy_root, "pairs_val.jsonl"))[:100]:
        a, b = (tok(c)["input_ids"] for c in r["captions"][:2])
        alone.append(loss([eot], b + [eot]))
        after.append(loss([eot] + a + [eot], b + [eot]))
    alone, after = sum(alone) / len(alone), sum(after) / len(after)
    assert after < alone - 0.03, (after, alone)  # a captions-only GPT-2 gave 2.48 vs 1.20: context hurt it


def test_language_models_perplexity(toy_root):
    from transformers import (AutoTokenizer, BertForMaskedLM, BertModel, GPT2LMHeadModel, OPTForCausalLM,
                              T5ForConditionalGeneration)
    caps = [r["captions"][1] for r in read_pairs(os.path.join(toy_root, "pairs_val.jsonl"))]
    for name, cls in (("gpt2", GPT2LMHeadModel), ("opt", OPTForCausalLM)):
        path = os.path.join(toy_root, "models", name)
        model, tok = cls.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
        enc = tok([c + "\n" if name == "opt" else tok.eos_token + c + tok.eos_token for c in caps],
                  padding=True, return_tensors="pt")
        with torch.no_grad():
            loss = model(**enc, labels=enc.input_ids.masked_fill(enc.attention_mask == 0, -100)).loss
        assert math.exp(float(loss)) < len(tok) / 10, (name, math.exp(float(loss)), len(tok))
    path = os.path.join(toy_root, "models", "t5")
    model, tok = T5ForConditionalGeneration.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    src = tok([" ".join(c.split()[:3]) for c in caps], padding=True, return_tensors="pt")
    tgt = tok([" ".join(c.split()[3:]) for c in caps], padding=True, return_tensors="pt")
    with torch.no_grad():
        loss = model(**src, labels=tgt.input_ids.masked_fill(tgt.attention_mask == 0, -100)).loss
    assert math.exp(float(loss)) < len(tok) / 5
    path = os.path.join(toy_root, "models", "bert")
    mlm, tok = BertForMaskedLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    enc = tok(caps, padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    sel = (torch.rand(enc.input_ids.shape, generator=g) < 0.15) & (enc.input_ids > 4)  # 15% of real words
    with torch.no_grad():
        logits = mlm(input_ids=enc.input_ids.masked_fill(sel, tok.mask_token_id), attention_mask=enc.attention_mask).logits
    loss = torch.nn.functional.cross_entropy(logits[sel], enc.input_ids[sel])
    assert math.exp(float(loss)) < len(tok) / 5
    assert BertModel.from_pretrained(path).pooler is not None


def test_blip2_vision_tower_reproduces_clip_penultimate_tokens(toy_root):
    """The BLIP-2-format tower (Blip2VisionModel, one block fewer than CLIP) gives CLIP's penultimate tokens."""
    from transformers import Blip2VisionModel, CLIPVisionModel
    clip = CLIPVisionModel.from_pretrained(os.path.join(toy_root, "models", "clip")).eval()
    ours = Blip2VisionModel.from_pretrained(os.path.join(toy_root, "models", "blip2_vision")).eval()
    assert ours.config.num_hidden_layers == clip.config.num_hidden_layers - 1
    tf = ImageTransform(64)
    pairs = read_pairs(os.path.join(toy_root, "pairs_test.jsonl"))[:32]
    px = torch.stack([tf(load_image(os.path.join(toy_root, r["image"]))) for r in pairs])
    with torch.no_grad():
        target = clip(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        got = ours.encoder(inputs_embeds=ours.embeddings(px)).last_hidden_state
    rel = float(((got - target) ** 2).mean() / target.var())
    assert rel < 0.05, rel  # copied weights alone (no pre-LayerNorm) are far off: ~0.15


def test_t5_answers_questions_from_a_caption_and_llms_have_spare_rows(toy_root):
    """The toy Flan-T5 reads its input: questions are answered better with the right caption than with another
    scene's; OPT and T5 embeddings keep spare rows for BLIP-2's <image> token, as the real checkpoints do."""
    from transformers import AutoTokenizer, OPTForCausalLM, T5ForConditionalGeneration
    path = os.path.join(toy_root, "models", "t5")
    model, tok = T5ForConditionalGeneration.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    pairs = {r["image"]: r["captions"] for r in read_pairs(os.path.join(toy_root, "pairs_val.jsonl"))}
    qs = [json.loads(line) for line in open(os.path.join(toy_root, "vqa_val.jsonl"))][:150]
    images = list(pairs)

    def accuracy(shift):
        src = [toy.QA_PROMPT.format(pairs[images[(images.index(q["image"]) + shift) % len(images)]][0],
                                    q["question"]) for q in qs]
        enc = tok(src, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = tok.batch_decode(model.generate(**enc, max_new_tokens=4, do_sample=False), skip_special_tokens=True)
        return sum(a == max(set(q["answers"]), key=q["answers"].count) for a, q in zip(out, qs)) / len(qs)

    right, wrong = accuracy(0), accuracy(7)
    assert right > wrong + 0.08, (right, wrong)
    assert model.get_input_embeddings().weight.shape[0] > len(tok)
    opt = OPTForCausalLM.from_pretrained(os.path.join(toy_root, "models", "opt"))
    assert opt.get_input_embeddings().weight.shape[0] > len(AutoTokenizer.from_pretrained(
        os.path.join(toy_root, "models", "opt")))


def test_backbones_build_on_demand(toy_root, tmp_path):
    """A script's first run builds only the backbones it reads (and what they are built from); each backbone is
    the same bytes whether built alone or with all the others (same seed, same machine)."""
    assert toy.with_deps(["bert"]) == ["bert"] and toy.with_deps(["opt", "blip2_vision"]) == [
        "clip", "blip2_vision", "opt"]
    with pytest.raises(ValueError, match="unknown toy backbone"):
        toy.with_deps(["vicuna"])
    man = json.load(open(os.path.join(toy_root, "manifest.json")))
    root = str(tmp_path / "w")
    toy.build_toy_world(root, tiny=True, seed=man["seed"], models=False, log=lambda *a: None)
    assert not os.path.exists(os.path.join(root, "models")) and os.path.isfile(os.path.join(root, "models_vocab.txt"))
    half = os.path.join(root, "models", "bert")
    os.makedirs(half)
    open(os.path.join(half, "config.json"), "w").write("{}")  # a build killed half-way (no toy_model.json)
    assert toy.ensure_toy_world(root, tiny=True, models=["bert"], log=lambda *a: None) == root
    assert sorted(os.listdir(os.path.join(root, "models"))) == ["bert"]
    assert toy.model_ready(root, "bert") and set(toy.model_stats(root)) == {"bert"}
    with open(os.path.join(root, "models", "bert", "model.safetensors"), "rb") as a, \
            open(os.path.join(toy_root, "models", "bert", "model.safetensors"), "rb") as b:
        assert a.read() == b.read()
    mtime = os.path.getmtime(os.path.join(root, "models", "bert", "model.safetensors"))
    toy.ensure_toy_world(root, tiny=True, models=["bert"], log=lambda *a: None)  # already there: nothing rebuilt
    assert os.path.getmtime(os.path.join(root, "models", "bert", "model.safetensors")) == mtime


def test_backbones_load_without_warnings(toy_root):
    """The classes the scripts load match what the toy world saved: no transformers load report, no torchvision
    fallback warning, no over-long token sequences, no unrecognised loss type while training GPT-2."""
    import io
    import logging

    import transformers.utils.logging as hf_logging
    from transformers import (AutoImageProcessor, AutoTokenizer, BertForPreTraining, CLIPModel, GPT2LMHeadModel,
                              OPTForCausalLM, T5ForConditionalGeneration)
    said = io.StringIO()  # transformers' own handler keeps the stderr of its import time: listen directly
    handler = logging.StreamHandler(said)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # a script run earlier in this process may have lowered it
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        m = os.path.join(toy_root, "models")
        for cls, name in ((CLIPModel, "clip"), (BertForPreTraining, "bert"), (GPT2LMHeadModel, "gpt2"),
                          (OPTForCausalLM, "opt"), (T5ForConditionalGeneration, "t5")):
            cls.from_pretrained(os.path.join(m, name))
        AutoImageProcessor.from_pretrained(os.path.join(m, "clip"))
        tok = AutoTokenizer.from_pretrained(os.path.join(m, "gpt2"))
        tr = read_pairs(os.path.join(toy_root, "pairs_train.jsonl"))
        docs = toy._scene_documents([r["captions"] for r in tr], 0)
        assert max(len(x) for x in tok(docs)["input_ids"]) + 2 <= tok.model_max_length
        for bad in ("LOAD REPORT", "requires torchvision", "Token indices sequence length"):
            assert bad not in said.getvalue(), said.getvalue()[-2000:]
        # GPT-2's loss is computed by the toy code, not through `labels=` (whose class-name lookup warns
        # "loss_type=None"): the same perplexity as transformers' own labels loss, and no such warning
        hf_logging.warning_once.cache_clear()  # a warning given earlier in this process would hide a new one
        gpt2 = GPT2LMHeadModel.from_pretrained(os.path.join(m, "gpt2")).eval()
        eot = tok.convert_tokens_to_ids("<|endoftext|>")
        seqs = [[eot] + s + [eot] for s in tok([c for r in tr[:20] for c in r["captions"]])["input_ids"]]
        ppl = toy._causal_eval(gpt2, seqs, eot)
        assert "loss_type" not in said.getvalue()
        ids, mask = toy._pad(seqs, eot)
        with torch.no_grad():
            ref = gpt2(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        assert ppl == pytest.approx(math.exp(float(ref)), rel=1e-4)
        assert "loss_type" in said.getvalue()  # the check above can fail: labels= does warn
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
