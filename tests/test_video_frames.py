"""Video frame folders (common/data.py): frames in frame order whatever the zero padding, and {"folder": dir}
records resolved under the image root the frames are loaded from, wherever the JSONL file is."""
import json
import os
import pickle
import shutil

import pytest
from PIL import Image

from common import data


def _frames(folder, n):
    """n distinct frames named as ffmpeg's `%d.png` names them (no zero padding), written out of order."""
    os.makedirs(folder, exist_ok=True)
    for k in reversed(range(n)):
        Image.new("RGB", (4, 4), (k, 0, 0)).save(os.path.join(folder, f"{k}.png"))


def _jsonl(path, recs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return str(path)


def test_frame_folders_are_read_in_frame_order(tmp_path):
    """12 unpadded frames: string order would feed 0, 1, 10, 11, 2, ..., 9 (silently, a scrambled clip)."""
    _frames(tmp_path / "clip", 12)
    (tmp_path / "clip" / "notes.txt").write_text("not a frame")
    v = data.read_video(_jsonl(tmp_path / "v.jsonl", [{"folder": "clip", "captions": ["a"]}]))
    assert v[0]["frames"] == [os.path.join("clip", f"{k}.png") for k in range(12)]


def test_hidden_files_are_no_frames(tmp_path):
    """A folder copied from a Mac can hold an AppleDouble `._<name>` beside each frame: listed as
    frames they doubled the clip (every other one unreadable) and came first, so the sampled frames
    were the wrong ones."""
    _frames(tmp_path / "clip", 3)
    for k in range(3):
        (tmp_path / "clip" / f"._{k}.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    v = data.read_video(_jsonl(tmp_path / "v.jsonl", [{"folder": "clip", "captions": ["a"]}]))
    assert v[0]["frames"] == [os.path.join("clip", f"{k}.png") for k in range(3)]


def test_natural_key_compares_digit_runs_as_numbers():
    names = ["f10_2.png", "f2_10.png", "f2_9.png", "f1.png", "01.png", "1.png", "b.png", "a10.jpg", "a9.jpg"]
    assert sorted(names, key=data.natural_key) == ["01.png", "1.png", "a9.jpg", "a10.jpg", "b.png", "f1.png",
                                                   "f2_9.png", "f2_10.png", "f10_2.png"]


def test_video_folder_is_resolved_under_the_image_root(tmp_path):
    """The annotation file lives apart from the images (as with --train_file elsewhere --image_root root): the
    folder and the returned frame paths are relative to the image root, so the loader finds every frame."""
    root = tmp_path / "root"
    _frames(root / "videos" / "c0", 3)
    ann = _jsonl(tmp_path / "ann" / "video_train.jsonl", [{"folder": "videos/c0", "captions": ["a", "b"]}])
    v = data.read_video(ann, str(root))
    want = [os.path.join("videos/c0", f"{k}.png") for k in range(3)]
    assert v[0]["frames"] == want and all(os.path.isfile(root / p) for p in want)
    assert pickle.loads(pickle.dumps(v))[0]["frames"] == want  # DataLoader workers keep the root
    both = data.Records.concat([v, data.read_video(ann, str(root))])  # one root: one reader
    assert [r["frames"] for r in both] == [want, want]
    shutil.copytree(root, tmp_path / "copy")
    with pytest.raises(ValueError, match="different readers"):  # which root would the frames be under?
        data.Records.concat([v, data.read_video(ann, str(tmp_path / "copy"))])
    # an absolute folder stays as it is
    absolute = _jsonl(tmp_path / "ann" / "abs.jsonl", [{"folder": str(root / "videos" / "c0"), "captions": ["a"]}])
    assert data.read_video(absolute, str(tmp_path / "elsewhere"))[0]["frames"] == [str(root / p) for p in want]


def test_missing_video_folder_is_a_one_line_data_error(tmp_path):
    root = tmp_path / "root"
    _frames(root / "videos" / "c0", 2)
    _frames(tmp_path / "ann" / "videos" / "c1", 2)  # next to the JSONL, not under the root: not looked at
    ann = _jsonl(tmp_path / "ann" / "v.jsonl", [{"folder": "videos/c0", "captions": ["a"]},
                                                {"folder": "videos/c1", "captions": ["a"]}])
    with pytest.raises(data.DataError, match=r"v\.jsonl:2: frame folder 'videos/c1' not found \(looked for .*root"):
        data.read_video(ann, str(root))
    bad = _jsonl(tmp_path / "ann" / "b.jsonl", [{"folder": 3, "captions": ["a"]}])
    with pytest.raises(data.DataError, match=r"b\.jsonl:1: field 'folder' should be str, got int"):
        data.read_video(bad, str(root))
    v = data.read_video(_jsonl(tmp_path / "ann" / "w.jsonl", [{"folder": "videos/c1", "captions": ["a"]}]),
                        str(tmp_path / "ann"))
    shutil.rmtree(tmp_path / "ann" / "videos" / "c1")  # gone after indexing: the same error when read
    with pytest.raises(data.DataError, match=r"w\.jsonl: frame folder 'videos/c1' not found"):
        v[0]


def test_video_folder_emptied_after_indexing_is_a_data_error(tmp_path):
    """A folder listed non-empty by read_video and emptied before a record is read gives a DataError
    naming it, not a record of zero frames (which the frame sampler turns into an empty clip)."""
    _frames(tmp_path / "clip", 2)
    v = data.read_video(_jsonl(tmp_path / "v.jsonl", [{"folder": "clip", "captions": ["a"]}]))
    assert len(v[0]["frames"]) == 2
    for name in os.listdir(tmp_path / "clip"):
        os.remove(tmp_path / "clip" / name)
    with pytest.raises(data.DataError, match=r"v\.jsonl: frame folder 'clip' holds no frames"):
        v[0]


def test_toy_world_video_as_folder_records(toy_root, tmp_path):
    """The toy world's own layout (videos/<id>/<k>.png under the toy root) read as folder records from a JSONL
    file outside the world gives exactly the toy files' frame lists."""
    recs = list(data.read_video(os.path.join(toy_root, "video_val.jsonl")))
    folders = [{"folder": os.path.dirname(r["frames"][0]), "captions": r["captions"]} for r in recs]
    v = data.read_video(_jsonl(tmp_path / "ann" / "video_val.jsonl", folders), toy_root)
    assert [r["frames"] for r in v] == [r["frames"] for r in recs]
