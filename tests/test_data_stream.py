"""common.data at scale: the indexed JSONL readers (Records) and the webdataset shard stream (ShardStream)."""
import io
import json
import os
import pickle
import socket
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from common import data
from common import dist as cdist
from common.image import ImageTransform
from data.toy import write_shards


def _old_reader(path):
    """What the list-of-dicts reader returned: every non-blank line parsed."""
    with open(path, "rb") as f:
        return [json.loads(raw.decode("utf-8")) for raw in f if raw.decode("utf-8").strip()]


def _write(path, lines, end="\n"):
    path.write_bytes((end.join(lines) + end).encode("utf-8"))
    return str(path)


# ---------------------------------------------------------------- Records: the index
def test_index_parity_with_the_list_reader(toy_root, tmp_path):
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    files = [os.path.join(d, n) for d, _, ns in os.walk(fixtures) for n in ns if n.endswith(".jsonl")]
    assert files
    for f in files:
        assert list(data.read_jsonl(f)) == _old_reader(f), f
    for reader, name in ((data.read_pairs, "pairs_train"), (data.read_vqa, "vqa_val"), (data.read_video, "video_val")):
        path = os.path.join(toy_root, f"{name}.jsonl")
        recs, old = reader(path), _old_reader(path)
        assert len(recs) == len(old) and list(recs) == old and recs[-1] == old[-1] and recs[3] == old[3]
    # blank lines, CRLF endings, no final newline, non-ASCII text
    lines = [json.dumps({"image": "a.png", "captions": ["un café", "x"]}, ensure_ascii=False), "", "  ",
             json.dumps({"image": "b.png", "captions": ["y"]})]
    p = _write(tmp_path / "crlf.jsonl", lines, end="\r\n")
    (tmp_path / "noend.jsonl").write_bytes((tmp_path / "crlf.jsonl").read_bytes().rstrip())
    for f in (p, str(tmp_path / "noend.jsonl")):
        recs = data.read_pairs(f)
        assert list(recs) == _old_reader(f) and recs.line(1) == 4 and recs[0]["captions"][0] == "un café"


def test_slices_concat_and_pairs(toy_root, tmp_path):
    path = os.path.join(toy_root, "pairs_train.jsonl")
    recs, old = data.read_pairs(path), _old_reader(path)
    view = recs[:10]
    assert isinstance(view, data.Records) and len(view) == 10 and list(view) == old[:10]
    assert np.shares_memory(view.offsets, recs.offsets)  # a view, not a copy
    assert list(recs[5:20:3]) == old[5:20:3] and recs[-1] == old[-1] and recs[-len(old)] == old[0]
    assert list(recs[[4, 2, 4]]) == [old[4], old[2], old[4]] and recs[np.int64(7)] == old[7]
    with pytest.raises(IndexError):
        recs[len(old)]
    assert recs.n_captions.dtype == np.int32 and recs.n_captions.tolist() == [len(r["captions"]) for r in old]
    assert recs.nbytes / len(recs) == 16  # int64 offset + int32 length + int32 caption count
    # pairs(): the (record, caption) tuples a dataset used to build, as two arrays
    rec_i, cap_j = recs.pairs()
    assert list(zip(rec_i.tolist(), cap_j.tolist())) == [(i, j) for i, r in enumerate(old)
                                                         for j in range(len(r["captions"]))]
    assert rec_i.dtype == np.int32 == cap_j.dtype
    # concat: several files (and views) in order, records read from the right file
    other = _write(tmp_path / "o.jsonl", [json.dumps({"image": f"o{k}.png", "captions": ["c"] * (k + 1)})
                                          for k in range(3)])
    both = data.Records.concat([recs[:4], data.read_pairs(other), recs[-2:]])
    expect = old[:4] + _old_reader(other) + old[-2:]
    assert list(both) == expect and both[5]["image"] == "o1.png" and both.path(5) == other
    assert both[2:7].path(0) == path and list(both[2:7]) == expect[2:7]
    assert both.pairs()[1].tolist() == [j for r in expect for j in range(len(r["captions"]))]
    assert list(data.Records.concat([both, recs[:1]])) == expect + old[:1]
    with pytest.raises(ValueError, match="different readers"):
        data.Records.concat([recs, data.read_video(os.path.join(toy_root, "video_val.jsonl"))])
    with pytest.raises(TypeError, match="caption counts"):
        data.read_vqa(os.path.join(toy_root, "vqa_val.jsonl")).pairs()


def test_concat_keeps_lines(tmp_path):
    """Records.concat builds the parts' own class: Lines concatenated stay plain-text lines (a
    Records would parse each as JSON: "12" -> 12, "hello" -> a DataError), and a Lines part beside
    a JSONL one is refused."""
    a = data.read_lines(_write(tmp_path / "a.txt", ["hello", "12"]))
    b = data.read_lines(_write(tmp_path / "b.txt", ["x y"]))
    both = data.Records.concat([a, b])
    assert isinstance(both, data.Lines) and list(both) == ["hello", "12", "x y"]
    lines = [json.dumps({"image": f"{k}.png", "captions": ["c"]}) for k in range(4)]
    pairs = data.read_pairs(_write(tmp_path / "p.jsonl", lines))
    with pytest.raises(ValueError, match="different readers"):
        data.Records.concat([a, pairs])


def test_boolean_mask_selects_records(tmp_path):
    """A boolean mask selects its True records, as numpy reads it (not records 0 and 1)."""
    lines = [json.dumps({"image": f"{k}.png", "captions": ["c"]}) for k in range(4)]
    pairs = data.read_pairs(_write(tmp_path / "p.jsonl", lines))
    mask = np.array([False, False, True, True])
    assert [r["image"] for r in pairs[mask]] == ["2.png", "3.png"]
    assert [r["image"] for r in pairs[[True, False, False, True]]] == ["0.png", "3.png"]
    assert pairs[np.array(1)]["image"] == "1.png"  # a 0-d array is one index
    with pytest.raises(IndexError, match="boolean index"):
        pairs[np.array([True, False])]


def test_step_sampler_resumed_past_its_total_has_no_steps():
    """A resume whose checkpoint step is past total_steps runs no steps: len 0 (DataLoader and
    list() call len(), which refuses a negative one), not a ValueError."""
    sampler = data.StepSampler(50, 8, 4, seed=3, start_step=10, total_steps=5)
    assert len(sampler) == 0 and list(sampler) == []
    assert list(data.make_loader(list(range(50)), sampler)) == []


class _Reads(torch.utils.data.Dataset):
    def __init__(self, recs):
        self.recs = recs

    def __len__(self):
        return len(self.recs)

    def __getitem__(self, i):
        rec = self.recs[i]
        return rec["image"], self.recs._pid == os.getpid()  # read with a descriptor this process opened


def test_records_pickle_cheaply_and_reopen_per_process(toy_root, tmp_path):
    path = os.path.join(toy_root, "pairs_train.jsonl")
    recs = data.read_pairs(path)
    first = recs[0]  # the main process opens its descriptor before the workers fork
    blob = pickle.dumps(recs)
    assert len(blob) < 1000 + recs.nbytes and b"_fds" not in blob
    back = pickle.loads(blob)
    assert back._fds == {} and back[0] == first and list(back) == list(recs)
    loader = torch.utils.data.DataLoader(_Reads(recs), batch_size=50, num_workers=2)
    seen = [(img, own) for imgs, owns in loader for img, own in zip(imgs, owns.tolist())]
    assert [s[0] for s in seen] == [r["image"] for r in _old_reader(path)] and all(s[1] for s in seen)
    # a file changed after indexing is refused, not misread
    p = tmp_path / "p.jsonl"
    _write(p, [json.dumps({"image": "a.png", "captions": ["x"]})])
    recs = data.read_pairs(str(p))
    _write(p, [json.dumps({"image": "abc.png", "captions": ["xyz"]})])
    with pytest.raises(data.DataError, match=r"p\.jsonl: changed since it was indexed"):
        recs[0]


def test_video_folders_are_listed_when_read(tmp_path):
    (tmp_path / "clip").mkdir()
    for k in (1, 0):
        Image.new("RGB", (4, 4)).save(tmp_path / "clip" / f"{k}.png")
    v = data.read_video(_write(tmp_path / "v.jsonl", [json.dumps({"folder": "clip", "captions": ["a", "b"]})]))
    assert v[0]["frames"] == [os.path.join("clip", "0.png"), os.path.join("clip", "1.png")]
    assert v.n_captions.tolist() == [2] and v.pairs()[1].tolist() == [0, 1]
    assert pickle.loads(pickle.dumps(v))[0]["frames"] == v[0]["frames"]


_P = json.dumps({"image": "a.png", "captions": ["x"]})


@pytest.mark.parametrize("reader,lines,msg", [
    ("pairs", [json.dumps({"image": "a.png"})], r"p.jsonl:1: missing field 'captions'"),
    ("pairs", [_P, "{oops"], r"p.jsonl:2: invalid JSON \(Expecting property name enclosed in double quotes\)"),
    ("pairs", [_P, "[1, 2]"], r"p.jsonl:2: expected a JSON object, got list"),
    ("pairs", [json.dumps({"image": 3, "captions": ["x"]})], r"p.jsonl:1: field 'image' should be str, got int"),
    ("pairs", [json.dumps({"image": "a", "captions": "x"})], r"p.jsonl:1: field 'captions' should be list, got str"),
    ("pairs", [_P, "", json.dumps({"image": "a", "captions": []})], r"p.jsonl:3: field 'captions' is empty"),
    ("pairs", [json.dumps({"image": "a", "captions": ["ok", 3]})],
     r"p.jsonl:1: field 'captions'\[1\] should be str, got int"),
    ("pairs", ["", " "], r"p.jsonl: no records \(empty dataset\)"),
    ("vqa", [json.dumps({"image": "a", "question": "q", "answers": ["a"]})], r"p.jsonl:1: missing field 'question_id'"),
    ("vqa", [json.dumps({"image": "a", "question": "q", "answers": [1], "question_id": 1})],
     r"p.jsonl:1: field 'answers'\[0\] should be str, got int"),
    # the id names the prediction in vqa.json (a list crashed the run's report after the whole eval)
    *[("vqa", [json.dumps({"image": "a", "question": "q", "answers": [], "question_id": "7"}),
               json.dumps({"image": "a", "question": "q", "answers": [], "question_id": qid})],
       rf"p.jsonl:2: field 'question_id' should be int or str, got {name}")
      for qid, name in [(None, "NoneType"), (1.5, "float"), (True, "bool"), ([1], "list")]],
    ("video", [json.dumps({"captions": ["x"]})], r"p.jsonl:1: missing field 'frames' \(or 'folder'\)"),
    ("video", [json.dumps({"frames": [], "captions": ["x"]})], r"p.jsonl:1: field 'frames' is empty"),
    ("video", [json.dumps({"frames": ["f.png"], "captions": [None]})],
     r"p.jsonl:1: field 'captions'\[0\] should be str, got NoneType"),
    # no caption to draw (a crash at a random training step, a division by zero in evaluation) and a string
    # whose characters would become frame paths: refused at read time
    ("video", [json.dumps({"frames": ["f.png"], "captions": ["x"]}),
               json.dumps({"frames": ["f.png"], "captions": []})], r"p.jsonl:2: field 'captions' is empty"),
    ("video", [json.dumps({"frames": "f.png", "captions": ["x"]})],
     r"p.jsonl:1: field 'frames' should be a list of str \(frame paths\), got str 'f.png'"),
    ("video", [json.dumps({"frames": ["f.png", 3], "captions": ["x"]})],
     r"p.jsonl:1: field 'frames' should be a list of str \(frame paths\), got list \"\['f.png', 3\]\""),
])
def test_every_reader_error_is_raised_at_read_time(tmp_path, reader, lines, msg):
    """Validation is one streaming pass at start-up: each of the list reader's one-line errors, unchanged."""
    p = _write(tmp_path / "p.jsonl", lines)
    with pytest.raises(data.DataError, match=f"^{tmp_path}/{msg}$"):
        getattr(data, f"read_{reader}")(p)


def test_reader_non_utf8_and_missing_file(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(_P.encode() + b"\n" + b'{"image": "b.png", "captions": ["caf\xe9"]}\n')
    with pytest.raises(data.DataError, match=r"p\.jsonl:2: not UTF-8 \(byte 36: b'\\xe9'\)$"):
        data.read_pairs(str(p))
    with pytest.raises(data.DataError, match=r"nope\.jsonl: file not found$"):
        data.read_pairs(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------- webdataset shards
def test_expand_shards(tmp_path):
    assert data.expand_shards("cc/{00000..00002}.tar") == ["cc/00000.tar", "cc/00001.tar", "cc/00002.tar"]
    assert data.expand_shards("a/{8..10}.tar,b.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b.tar"]
    assert data.expand_shards("{x,y}/{0..1}.tar") == ["x/0.tar", "x/1.tar", "y/0.tar", "y/1.tar"]
    assert data.expand_shards(["a.tar", "c/{1..2}.tar"]) == ["a.tar", "c/1.tar", "c/2.tar"]
    for k in (2, 0, 1):
        (tmp_path / f"{k:05d}.tar").write_bytes(b"")
    assert data.expand_shards(f"{tmp_path}/*.tar") == [f"{tmp_path}/{k:05d}.tar" for k in range(3)]
    with pytest.raises(data.DataError, match="no shard matches"):
        data.expand_shards(f"{tmp_path}/*.tgz")
    with pytest.raises(data.DataError, match=r"00003.tar: shard not found \(1 of 4 missing\)"):
        data.ShardStream(f"{tmp_path}/{{00000..00003}}.tar")


def test_expand_shards_nests_and_counts_down():
    """Nested groups expand as bash and braceexpand (webdataset's) expand them: the innermost group
    first listed a twice and never b's second shard; a descending range gave no shards at all."""
    assert data.expand_shards("{a,b{1..2}}.tar") == ["a.tar", "b1.tar", "b2.tar"]
    assert data.expand_shards("s/{x/{0..1},y}.tar,z.tar") == ["s/x/0.tar", "s/x/1.tar", "s/y.tar",
                                                              "z.tar"]
    assert data.expand_shards("c/{00002..00000}.tar") == ["c/00002.tar", "c/00001.tar",
                                                          "c/00000.tar"]
    assert data.expand_shards("a{b/{1..2}.tar") == ["a{b/1.tar", "a{b/2.tar"]  # a lone "{" stays


@pytest.fixture(scope="module")
def shards(toy_root, tmp_path_factory):
    """The tiny world's 300 x 5 train pairs as 8 img2dataset-style shards."""
    out = tmp_path_factory.mktemp("shards")
    return write_shards(toy_root, n_shards=8, out_dir=str(out)), str(out)


def _keys(stream, workers=0, batch=16):
    return [k for b in data.stream_loader(stream, batch, workers) for k in b["key"]]


def test_toy_shards_hold_the_pairs(toy_root, shards, tmp_path):
    spec, out = shards
    names = sorted(os.listdir(out))
    assert names[:3] == ["00000.tar", "00000_stats.json", "00001.tar"] and names[-1] == "written.json"
    assert len(names) == 17 and json.load(open(os.path.join(out, "00007_stats.json")))["successes"] == 184
    with tarfile.open(os.path.join(out, "00000.tar")) as tf:
        assert tf.getnames()[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    stamp = os.stat(os.path.join(out, "00003.tar")).st_mtime_ns
    assert write_shards(toy_root, n_shards=8, out_dir=out) == spec  # kept, not rewritten
    assert os.stat(os.path.join(out, "00003.tar")).st_mtime_ns == stamp
    pairs = [(r["image"], c) for r in data.read_pairs(os.path.join(toy_root, "pairs_train.jsonl"))
             for c in r["captions"]]
    got = list(data.ShardStream(spec, shuffle_buffer=0, epochs=1))
    assert [s["caption"] for s in got] == [c for _, c in pairs] and data.shard_sample_count(spec) == len(pairs)
    assert got[0]["image"].size == (64, 64) and got[0]["bad"] == [] and got[-1]["pos"] == len(pairs)
    assert [s["meta"]["image"] for s in got[:6]] == [pairs[0][0]] * 5 + [pairs[5][0]]  # the image id, for ITC
    ids = next(iter(data.stream_loader(data.ShardStream(spec, shuffle_buffer=0, epochs=1), 6)))["image_id"]
    assert ids[:5].tolist() == [ids[0].item()] * 5 and ids[5] != ids[0]  # one id per image: its captions are ITC
    # positives of each other; without key.json's "image" each sample (web data: one caption each) is its own image
    web = next(iter(data.stream_loader(data.ShardStream(_bad_shards(str(tmp_path)), shuffle_buffer=0), 10)))
    assert len(set(web["image_id"].tolist())) == 10


def test_ranks_and_workers_see_disjoint_samples(shards):
    spec, _ = shards
    seen = [_keys(data.ShardStream(spec, rank=r, world=2, seed=3, epochs=1), workers=2) for r in (0, 1)]
    every = [s for per in seen for s in per]
    assert len(every) == len(set(every)) == 1500 and not set(seen[0]) & set(seen[1])
    with pytest.raises(data.DataError, match="8 shards for 9 ranks x 1 workers"):
        _keys(data.ShardStream(spec, rank=0, world=9, epochs=1))


def test_shuffle_is_seeded(shards):
    spec = shards[1] + "/{00000..00001}.tar"  # 376 samples
    a, b = (_keys(data.ShardStream(spec, seed=1, epochs=1)) for _ in range(2))
    c = _keys(data.ShardStream(spec, seed=2, epochs=1))
    two = _keys(data.ShardStream(spec, seed=1, epochs=2))
    plain = _keys(data.ShardStream(spec, shuffle_buffer=0, epochs=1))
    assert a == b and a != c and sorted(a) == sorted(c) == plain == sorted(plain)
    assert len(a) == 376 and two[:376] == a and two[376:] != a and sorted(two[376:]) == plain


def _bad_shards(folder, n_shards=4, per=10, bad=()):
    """Small shards whose samples k in `bad` are broken in the way named: image bytes, caption bytes, missing."""
    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    bad = dict(bad)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tf:
            for i in range(per):
                k = s * per + i
                members = {"png": buf.getvalue(), "txt": f"caption {k}".encode(), "json": b"{not json"}
                if bad.get(k) == "image":
                    members["png"] = b"not an image"
                elif bad.get(k) == "text":
                    members["txt"] = b"caf\xe9"
                elif bad.get(k) == "missing":
                    del members["txt"]
                for ext, payload in members.items():
                    ti = tarfile.TarInfo(f"{k:09d}.{ext}")
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
    return f"{folder}/{{00000..{n_shards - 1:05d}}}.tar"


def test_image_ids_tell_shard_folders_apart(tmp_path):
    """img2dataset numbers every set's keys from 000000000: cc3m/00000.tar and sbu/00000.tar hold different
    images under the same keys, which must not share an image id (an ITC positive, never an ITM negative)."""
    spec = _bad_shards(str(tmp_path / "cc3m"), n_shards=2, per=5) + "," + _bad_shards(str(tmp_path / "sbu"), 2, 5)

    def ids(**kw):
        out = {}
        for b in data.stream_loader(data.ShardStream(spec, shuffle_buffer=0, epochs=1, **kw), 4):
            for shard, key, i in zip(b["shard"].tolist(), b["key"], b["image_id"].tolist()):
                out[(os.path.basename(os.path.dirname(data.expand_shards(spec)[shard])), key)] = i
        return out
    one = ids()
    assert len(one) == 20 and len(set(one.values())) == 20  # 10 keys, each in both folders
    assert one[("cc3m", "000000000")] != one[("sbu", "000000000")]
    two = {**ids(rank=0, world=2, seed=5), **ids(rank=1, world=2, seed=5)}  # other ranks, order: same ids
    assert two == one


class _DrawOne:
    """A transform that returns the first number its per-sample rng draws (what a random crop would read)."""
    rng = None

    def __call__(self, img):
        return torch.tensor([self.rng.random()])


def test_augmentation_seeds_tell_shard_folders_apart(tmp_path):
    """cc3m/00000.tar and sbu/00000.tar hold different images under the same keys: their random crops and flips
    must not be drawn from one seed."""
    spec = _bad_shards(str(tmp_path / "cc3m"), n_shards=1, per=4) + "," + _bad_shards(str(tmp_path / "sbu"), 1, 4)
    draws = {}
    for b in data.stream_loader(data.ShardStream(spec, transform=_DrawOne(), shuffle_buffer=0, epochs=1), 4):
        for shard, key, x in zip(b["shard"].tolist(), b["key"], b["image"][:, 0].tolist()):
            draws[(shard, key)] = x
    assert len(draws) == 8 and len(set(draws.values())) == 8  # the same key in both folders: other draws


def test_bad_members_are_counted_and_skipped(tmp_path):
    spec = _bad_shards(str(tmp_path / "a"), bad={3: "image", 17: "text", 25: "missing"})
    batches = list(data.stream_loader(data.ShardStream(spec, seed=0, max_bad_frac=0.5, epochs=1), 4, workers=2))
    tracker, strict = data.StreamTracker(spec, max_bad_frac=0.1), data.StreamTracker(spec, max_bad_frac=0.05)
    for b in batches:
        tracker.update(b)
        strict.update(b)
    assert sorted(k for b in batches for k in b["key"]) == [f"{k:09d}" for k in range(40) if k not in (3, 17, 25)]
    assert all(m == {} for b in batches for m in b["meta"])  # a broken key.json does not make a sample bad
    assert tracker.tried == 40 and tracker.bad == 3 and "3 of 40 samples unreadable" in tracker.report()
    assert sorted(tracker.examples) == ["00000.tar:000000003 (unreadable .png)",
                                        "00001.tar:000000017 (caption not UTF-8)",
                                        "00002.tar:000000025 (no .txt caption member)"]
    assert data.shard_sample_count(spec) == 39  # no _stats.json: counted from the headers (25 has no caption)
    tracker.check(final=True)  # 7.5% bad: within max_bad_frac 0.1 ...
    with pytest.raises(data.DataError, match=r"too many unreadable samples in .*3 of 40 samples unreadable"):
        strict.check(final=True)  # ... over 0.05


def test_an_empty_caption_is_a_bad_sample(tmp_path):
    """img2dataset/writer.py writes "" as the .txt of a null caption: a bad sample, counted under max_bad_frac
    (data/convert.py skips it too), not an (image, "") pair to train on."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    shard = str(tmp_path / "00000.tar")
    with tarfile.open(shard, "w") as tf:
        for key, caption in (("000000000", b""), ("000000001", b"a dog")):
            for ext, payload in (("jpg", buf.getvalue()), ("json", b'{"caption": null}'), ("txt", caption)):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    got = list(data.ShardStream(shard, shuffle_buffer=0, epochs=1, max_bad_frac=0.5))
    assert [(s["key"], s["caption"], s["tried"], s["bad"]) for s in got] == [
        ("000000001", "a dog", 2, ["00000.tar:000000000 (empty caption)"])]
    with pytest.raises(data.DataError, match=r"1 of 2 samples unreadable .*\(max_bad_frac 0.4\)"):
        list(data.ShardStream(shard, shuffle_buffer=0, epochs=1, max_bad_frac=0.4))


def test_too_many_bad_members_stop_the_stream(tmp_path):
    spec = _bad_shards(str(tmp_path / "b"), n_shards=2, per=20, bad={k: "image" for k in range(0, 40, 3)})
    with pytest.raises(data.DataError, match=r"too many unreadable samples in .*: \d+ of \d+ samples unreadable in "
                                             r"one stream .*\(max_bad_frac 0.05\)"):
        _keys(data.ShardStream(spec, seed=0, epochs=1), batch=4)
    broken = tmp_path / "c"
    _bad_shards(str(broken), n_shards=2, per=20)
    (broken / "00000.tar").write_bytes((broken / "00000.tar").read_bytes()[:3000])  # truncated in sample 0's json
    got = list(data.ShardStream(f"{broken}/{{00000..00001}}.tar", shuffle_buffer=0, epochs=1, max_bad_frac=0.5))
    assert [s["key"] for s in got] == [f"{k:09d}" for k in range(20, 40)]
    assert got[0]["tried"] == 2 and got[0]["bad"] == ["00000.tar:000000000 (unreadable tar (unexpected end of data))"]
    for k in range(2):  # valid tars without a sample: an endless stream must stop, not spin
        tarfile.open(tmp_path / f"e{k}.tar", "w").close()
    with pytest.raises(data.DataError, match=r"the shards of stream 0 hold no samples"):
        next(iter(data.ShardStream(f"{tmp_path}/e{{0,1}}.tar")))
    with pytest.raises(data.DataError, match=r"the shards of stream 1 hold no samples"):  # one empty, in order
        list(data.stream_loader(data.ShardStream(f"{broken}/00001.tar,{tmp_path}/e0.tar", shuffle_buffer=0), 4, 2))


def test_unreadable_shards_stop_an_endless_stream_after_one_pass(tmp_path, monkeypatch):
    """Shards that are all broken tars or hold no complete sample yield nothing, pass after pass:
    an endless stream stops once one pass yielded no sample (with max_bad_frac 1 the bad-sample
    rule never would), while a broken shard beside good ones is only counted."""
    passes = []
    draws = data.ShardStream._draws

    def counted(self, slot, n_slots, epoch, skip):
        passes.append(epoch)
        assert len(passes) <= 3, "still drawing after 3 passes that yielded nothing"
        return draws(self, slot, n_slots, epoch, skip)
    monkeypatch.setattr(data.ShardStream, "_draws", counted)
    (tmp_path / "0.tar").write_bytes(b"not a tar" * 100)
    _bad_shards(str(tmp_path / "t"), n_shards=1, per=3, bad={k: "missing" for k in range(3)})
    names = f"{tmp_path}/0.tar,{tmp_path}/t/00000.tar"
    for buffer in (0, 1000):
        passes.clear()
        msg = r"stream 0 hold no samples that can be read \(4 of 4 draws bad"
        with pytest.raises(data.DataError, match=msg):
            next(iter(data.ShardStream(names, shuffle_buffer=buffer, max_bad_frac=1.0)))
        assert len(passes) == 1
    good = _bad_shards(str(tmp_path / "g"), n_shards=1, per=4)
    passes.clear()
    stream = iter(data.ShardStream(f"{tmp_path}/0.tar,{good}", world=2, seed=3, shuffle_buffer=4,
                                   max_bad_frac=1.0))  # seed 3: stream 0 gets the broken tar
    assert [next(stream)["epoch"] for _ in range(4)] == [2] * 4 and passes == [0, 1, 2]


def test_resume_is_exact(tmp_path):
    """Stop after 5 batches, resume from the tracker's state: the next batches are the unbroken run's, keys and
    augmented pixels alike, across epoch boundaries and bad samples (4 shards of 10 -> 2 slots of 20 per epoch)."""
    spec = _bad_shards(str(tmp_path / "r"), bad={6: "image", 21: "text"})
    aug = ImageTransform(8, train=True, scale=(0.3, 1.0))
    make = (lambda resume=None: data.ShardStream(spec, aug, seed=5, shuffle_buffer=6, max_bad_frac=0.5,  # noqa: E731
                                                 resume=resume))
    unbroken, tracker = [], data.StreamTracker(spec)
    for b in data.stream_loader(make(), 3, workers=2):
        unbroken.append(b)
        if len(unbroken) <= 5:
            tracker.update(b)
        if len(unbroken) == 17:  # 51 samples: every slot is into its second epoch
            break
    state = tracker.state_dict()
    rng = torch.get_rng_state()
    next(iter(data.stream_loader(make(), 3, workers=2)))
    assert torch.equal(torch.get_rng_state(), rng)  # starting a loader leaves the global torch RNG alone
    assert state["batches"] == 5 and state["n_slots"] == 2 and set(state["slots"]) == {0, 1}
    state = json.loads(json.dumps(state))  # as a checkpoint would keep it (slot keys become strings)
    resumed = []
    for b in data.stream_loader(make(state), 3, workers=2):
        resumed.append(b)
        if len(resumed) == 12:
            break
    assert max(b["epoch"].max().item() for b in resumed) == 1
    for a, b in zip(unbroken[5:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["pos"], b["pos"])
    # with DDP every rank saves its own state; ranks own disjoint slots, so the states merge into one
    ranks = [{"batches": 5, "n_slots": 4, "slots": {0: [0, 7], 1: [0, 8]}},
             {"batches": 5, "n_slots": 4, "slots": {2: [1, 2], 3: [0, 9]}}]
    assert data.StreamTracker.merge_states(ranks)["slots"] == {0: [0, 7], 1: [0, 8], 2: [1, 2], 3: [0, 9]}
    with pytest.raises(ValueError, match="different numbers of batches"):
        data.StreamTracker.merge_states([ranks[0], dict(ranks[1], batches=4)])
    with pytest.raises(data.DataError, match="resume state is for 2 streams"):
        next(iter(data.stream_loader(make(state), 3, workers=1)))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 slots
def test_resume_is_exact_after_a_finite_stream_ends(tmp_path):
    """With `epochs` set, a worker whose streams ended is passed over: batches no longer come from
    worker b % workers. A resume must go on with the slot after the one whose batch came last, not
    slot b % workers (3 slots of 14, 4 and 10 samples a pass: after 14 or 20 batches the unbroken
    run goes on 0, 2, 0, ...; (w + b) % workers would start with slot 2)."""
    names = ",".join(_bad_shards(str(tmp_path / str(i)), n_shards=1, per=n)
                     for i, n in enumerate([8, 2, 5, 6, 2, 5]))  # shard k goes to slot k % 3

    def make(resume=None):
        return data.stream_loader(data.ShardStream(names, seed=1, shuffle_buffer=0, epochs=2,
                                                   resume=resume), 2, workers=3)
    unbroken, states, tracker = [], [], data.StreamTracker(names)
    for b in make():
        unbroken.append((b["slot"].tolist(), b["shard"].tolist(), b["key"]))
        tracker.update(b)
        states.append(json.loads(json.dumps(tracker.state_dict())))
    assert len(unbroken) == 28 and [s[0] for s, _, _ in unbroken[12:16]] == [0, 2, 0, 2]
    for stop in (14, 20):
        resumed = [(b["slot"].tolist(), b["shard"].tolist(), b["key"])
                   for b in make(states[stop - 1])]
        assert resumed == unbroken[stop:]


def test_resume_from_a_state_saved_before_any_batch(tmp_path):
    """A checkpoint saved before any batch was consumed (a run of zero steps) holds StreamTracker's
    fresh state, n_slots None: resuming it starts the streams afresh instead of a DataError."""
    spec = _bad_shards(str(tmp_path / "z"))
    state = json.loads(json.dumps(data.StreamTracker(spec).state_dict()))
    assert state == {"batches": 0, "n_slots": None, "slots": {}, "turns": {}}

    def make(resume=None):
        return data.ShardStream(spec, seed=5, shuffle_buffer=6, resume=resume)

    for workers in (0, 2):
        fresh = [b["key"] for _, b in zip(range(4), data.stream_loader(make(), 3, workers))]
        resumed = [b["key"] for _, b in zip(range(4), data.stream_loader(make(state), 3, workers))]
        assert resumed == fresh


def test_merge_after_a_resume_keeps_each_ranks_own_progress():
    """Resumed from a merged state, each rank's tracker holds every slot, the other ranks' ones
    stale; merging the next states keeps every slot's furthest position (taking the last rank's
    stale copy would send rank 0's streams back to the previous resume point: samples seen
    twice)."""
    merged = {"batches": 2, "n_slots": 2, "slots": {"0": [0, 5], "1": [0, 5]}}
    ranks = [data.StreamTracker("x", state=merged) for _ in range(2)]
    for slot, tracker in enumerate(ranks):  # rank r owns slot r (one worker each)
        tracker.update({"tried": 2, "bad": [], "n_slots": 2, "slot": torch.tensor([slot, slot]),
                        "epoch": torch.tensor([0, 0]), "pos": torch.tensor([6, 9 - slot])})
    state = data.StreamTracker.merge_states([json.loads(json.dumps(t.state_dict())) for t in ranks])
    assert state == {"batches": 3, "n_slots": 2, "slots": {"0": [0, 9], "1": [0, 8]},
                     "turns": {"0": 3, "1": 3}}


def _rank_keys(rank, world, port, spec, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    d = cdist.setup_distributed("cpu")
    stream = data.ShardStream(spec, rank=d.rank, world=d.world_size, seed=7, epochs=1)
    keys = cdist.all_gather_object(_keys(stream))  # (workers here would be spawned: seconds each to start)
    if d.is_main:
        with open(os.path.join(out_dir, "keys.json"), "w") as f:
            json.dump(keys, f)
    cdist.cleanup_distributed()


def test_two_process_gloo_ranks_see_disjoint_samples(shards, tmp_path, spawn):
    spec, _ = shards
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_rank_keys, args=(2, port, spec, str(tmp_path)))
    keys = json.load(open(tmp_path / "keys.json"))
    assert len(keys) == 2 and not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == _keys(data.ShardStream(spec, shuffle_buffer=0, epochs=1))


def test_rss_bench_runs_small(tmp_path):
    """bench/rss_index.py (the measurement in docs/data.md) at toy size: both readers, one table."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(repo, "bench", "rss_index.py"), "--images", "300",
                           "--workers", "2", "--batch", "100", "--file", str(tmp_path / "p.jsonl")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["phase"] for r in rows] == ["after", "before"] and all(r["iterated"] == 1500 for r in rows)
    assert rows[0]["index_bytes_per_record"] == 16.0 and len(rows[0]["worker_private_mib"]) == 2
    assert "| before | 1,500 |" in proc.stdout and "index: 16.0 bytes per record" in proc.stdout
