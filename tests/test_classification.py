"""Classification as NegCLIP's Table 6 checks it (zero-shot and linear probe): the CIFAR converter on batches written
in the published layout, the ImageFolder reader and the scoring rules (the toy world's sets: test_toy.py)."""
import json
import math
import os
import pickle
import stat

import numpy as np
import pytest
import torch
from PIL import Image

import data.benchmarks as B
from data import convert as C


# ------------------------------------------------------------------------------------------- CIFAR batches -> folders
def _batch(path, rows, labels, key="labels", extra=None):
    """A batch as the published python version holds it: a dict with bytes keys, 'data' an (N, 3072) uint8 array of
    the red, green and blue 32x32 planes, pickled with protocol 2 (reconstructed here: the files are 160 MB)."""
    d = {b"batch_label": b"toy batch", key.encode(): labels, b"data": np.asarray(rows, dtype=np.uint8),
         b"filenames": [f"img_{i}.png".encode() for i in range(len(rows))], **(extra or {})}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def _row(r, g, b):  # one image: constant planes, except a bright pixel at (row 1, col 2) in the red plane
    red = np.full((32, 32), r, np.uint8)
    red[1, 2] = 255
    return np.concatenate([red.ravel(), np.full(1024, g, np.uint8), np.full(1024, b, np.uint8)])


def _cifar10(src):
    os.makedirs(src)
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird"], b"num_vis": 3072}, f, protocol=2)
    for i in range(1, 6):
        _batch(src / f"data_batch_{i}", [_row(10 * i, 1, 2), _row(10 * i, 3, 4)], [i % 3, (i + 1) % 3])
    _batch(src / "test_batch", [_row(7, 8, 9), _row(5, 6, 7), _row(1, 1, 1)], [2, 0, 1])


def test_cifar10_batches_become_an_image_folder(tmp_path):
    _cifar10(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "out" / "cifar10"
    assert C.main(["cifar", str(tmp_path / "cifar-10-batches-py"), "--out", str(out)]) == 0
    assert sorted(os.listdir(out / "test")) == ["airplane", "automobile", "bird"]
    assert sum(len(os.listdir(out / "train" / c)) for c in os.listdir(out / "train")) == 10
    img = np.asarray(Image.open(out / "test" / "bird" / "00000.png"))  # test row 0: label 2, planes 7, 8, 9
    assert img.shape == (32, 32, 3) and tuple(img[0, 0]) == (7, 8, 9) and tuple(img[1, 2]) == (255, 8, 9)
    assert tuple(np.asarray(Image.open(out / "train" / "automobile" / "00000.png"))[5, 5]) == (10, 1, 2)
    assert stat.S_IMODE(os.stat(out / "test" / "bird" / "00000.png").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(out / "test").st_mode) == 0o755
    d = B.read_image_folder(str(out))
    assert d["names"] == ["airplane", "automobile", "bird"] and len(d["train"]) == 10 and len(d["test"]) == 3
    assert C.main(["cifar", str(tmp_path / "cifar-10-batches-py"), "--out", str(out)]) == 1  # never overwrites
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_cifar100_fine_and_coarse_labels(tmp_path):
    src = tmp_path / "cifar-100-python"
    os.makedirs(src)
    with open(src / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"apple", b"aquarium_fish", b"maple_tree"],
                     b"coarse_label_names": [b"fruit_and_vegetables", b"fish"]}, f, protocol=2)
    for name, n in (("train", 4), ("test", 2)):
        _batch(src / name, [_row(k, k, k) for k in range(n)], [k % 3 for k in range(n)], key="fine_labels",
               extra={b"coarse_labels": [k % 2 for k in range(n)]})
    fine = C.convert_cifar(str(src), str(tmp_path / "fine"))
    coarse = C.convert_cifar(str(src), str(tmp_path / "coarse"), label="coarse")
    assert fine == coarse == {"train": 4, "test": 2}
    assert sorted(os.listdir(tmp_path / "fine" / "train")) == ["apple", "aquarium_fish", "maple_tree"]
    assert sorted(os.listdir(tmp_path / "coarse" / "train")) == ["fish", "fruit_and_vegetables"]
    assert sorted(os.listdir(tmp_path / "fine" / "train" / "apple")) == ["00000.png", "00003.png"]
    # zero-shot prompts read "_" as a space
    assert B.read_image_folder(str(tmp_path / "fine"))["names"] == ["apple", "aquarium fish", "maple tree"]


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar_reader_refuses_a_pickle_that_runs_code(tmp_path, monkeypatch):
    _cifar10(tmp_path / "c")
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Boom()}, f, protocol=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(C.ConversionError, match=r"test_batch: refuses to unpickle (posix|nt)\.system"):
        C.convert_cifar(str(tmp_path / "c"), str(tmp_path / "out"))
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()
    (tmp_path / "c" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(C.ConversionError, match="test_batch: not a CIFAR batch"):
        C.convert_cifar(str(tmp_path / "c"), str(tmp_path / "out"))
    with open(tmp_path / "c" / "batches.meta", "wb") as f:  # a label name that climbs out of --out
        pickle.dump({b"label_names": [b"airplane", b"../escape", b"bird"]}, f, protocol=2)
    with pytest.raises(C.ConversionError, match=r"batches.meta: 'label_names' holds unusable"):
        C.convert_cifar(str(tmp_path / "c"), str(tmp_path / "out"))
    os.remove(tmp_path / "c" / "batches.meta")
    with pytest.raises(C.ConversionError, match="not a CIFAR folder"):
        C.convert_cifar(str(tmp_path / "c"), str(tmp_path / "out"))


# ------------------------------------------------------------------------------------------------ ImageFolder reader
def _folder(root, classes, per, split="val", colour=None):
    for k, c in enumerate(classes):
        os.makedirs(root / split / c, exist_ok=True)
        for i in range(per):
            Image.new("RGB", (8, 8), colour(k, i) if colour else (k, k, k)).save(root / split / c / f"{i}.png")


def test_image_folder_reader_names_templates_and_errors(tmp_path):
    root = tmp_path / "imagenet"
    _folder(root, ["n01440764", "n01443537"], 2)
    (root / "val" / "n01440764" / "notes.txt").write_text("not an image")
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius\n")
    d = B.read_image_folder(str(root))
    assert d["names"] == ["tench", "goldfish"] and d["templates"] == ["a photo of a {}."] and d["train"] == []
    assert [k for _, k in d["test"]] == [0, 0, 1, 1] and all(p.endswith(".png") for p, _ in d["test"])
    (root / "templates.txt").write_text("a photo of a {}.\nignored line\na drawing of a {}.\n")
    assert B.read_image_folder(str(root))["templates"] == ["a photo of a {}.", "a drawing of a {}."]
    _folder(root, ["n01440764", "n09999999"], 1, split="train")  # a class without test images: one label space
    d = B.read_image_folder(str(root))
    assert d["classes"] == ["n01440764", "n01443537", "n09999999"] and d["names"][2] == "n09999999"
    assert [k for _, k in d["train"]] == [0, 2] and [k for _, k in d["test"]] == [0, 0, 1, 1]
    with pytest.raises(B.DataError, match="no test/ or val/ folder"):
        B.read_image_folder(str(tmp_path))


# ----------------------------------------------------------------------------------------------------- scoring rules
def test_top_k_accuracy_counts_ties_as_wrong():
    logits = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    assert B.classification_accuracy(logits, labels) == pytest.approx(1 / 3)  # row 1: a tie with class 0
    assert B.classification_accuracy(logits, labels, 2) == 1  # a tie of two fits in the top 2
    assert B.classification_accuracy(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), 2) == 0  # a tie of three does not


def test_linear_probe_separates_blobs_and_stays_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 2
    y = torch.arange(400) % 4
    x = centres[y] + torch.randn(400, 16, generator=g)
    acc, lam = B.linear_probe(x[:300], y[:300], x[300:], y[300:], 4)
    assert acc > 0.9 and lam in B.PROBE_LAMBDAS
    shuffled = y[torch.randperm(400, generator=g)]  # labels that carry nothing: held-out accuracy near 1/4
    acc, _ = B.linear_probe(x[:300], shuffled[:300], x[300:], shuffled[300:], 4)
    assert acc < 0.45
    w, b = B.fit_linear_probe(x, y, 4, 1e-3)  # converged: the gradient of the regularised loss vanishes
    w.requires_grad_(True), b.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5e-3 * (w * w).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-3 and b.grad.abs().max() < 1e-3
    # lambda: chosen on a held-out fifth, the largest among the best (a tie goes to the simpler model); on classes
    # that every lambda of the grid separates on the held-out fifth that is the largest of the grid
    x = torch.nn.functional.one_hot(y, 16).float() * 10 + 0.1 * torch.randn(400, 16, generator=g)
    assert B.linear_probe(x[:300], y[:300], x[300:], y[300:], 4, lambdas=(1e-4, 1e-2, 1.0)) == (1.0, 1.0)


def test_linear_probe_leaves_the_bias_unpenalised():
    """Only W is penalised (lam/2 |W|^2, as scikit-learn's intercept): with features that carry nothing (all 0) the
    fit is the bias alone, and the maximum-likelihood bias puts softmax(b) at the class frequencies 6/10, 3/10, 1/10
    whatever lam is (a penalised bias would be pulled toward uniform: softmax(b) - freq + lam * b = 0)."""
    y = torch.tensor([0] * 6 + [1] * 3 + [2])
    w, b = B.fit_linear_probe(torch.zeros(10, 4), y, 3, 1.0)
    assert torch.equal(w, torch.zeros(4, 3))
    torch.testing.assert_close(b.softmax(0), torch.tensor([0.6, 0.3, 0.1]), atol=1e-4, rtol=0)


def _colour_scorer():
    """Images embed as their mean colour's one-hot (red, green, blue); texts as the one-hot of the colour word."""
    words = ["red", "green", "blue"]

    def images(ims):
        return torch.nn.functional.one_hot(torch.tensor([int(np.asarray(im).reshape(-1, 3).mean(0).argmax())
                                                         for im in ims]), 3).float()

    def texts(ts):
        return torch.stack([torch.eye(3)[[k for k, w in enumerate(words) if w in t.strip(".").split()]].sum(0)
                            for t in ts])
    return B.Scorer(images, texts)


def test_eval_classification_zero_shot_and_probe_end_to_end(tmp_path):
    root = tmp_path / "classification" / "colours"
    rgb = lambda k, i: tuple(200 if j == k else 10 * i for j in range(3))  # noqa: E731
    for split, per in (("train", 6), ("test", 3)):
        _folder(root, ["blue_ish", "green_ish", "red_ish"], per, split=split,
                colour=lambda k, i: rgb([2, 1, 0][k], i))  # folder order blue, green, red
    (root / "classnames.txt").write_text("blue_ish blue\ngreen_ish green\nred_ish red\n")
    r = B.run_benchmarks(_colour_scorer(), ["classification"], str(tmp_path), log=lambda *a: None)
    assert r["classification/colours_zeroshot_top1"] == 1 and r["classification/colours_probe_top1"] == 1
    assert r["classification/colours_n"] == 9 and "classification/colours_zeroshot_top5" not in r
    (root / "test" / "red_ish" / "0.png").write_bytes(b"not a png")  # unreadable: leaves the set, counted once
    sc, lines = _colour_scorer(), []
    r = B.run_benchmarks(sc, ["classification"], str(tmp_path), log=lines.append)
    assert r["classification/colours_n"] == 8 and r["unreadable_images"] == 1 and "1 of 27" in lines[-1]
    (root / "classnames.txt").write_text("blue_ish green\ngreen_ish red\nred_ish blue\n")  # names shifted: all wrong
    assert B.eval_classification(_colour_scorer(), str(tmp_path))["colours_zeroshot_top1"] == 0
    os.makedirs(tmp_path / "empty" / "classification")
    with pytest.raises(B.DataError, match="no dataset folders"):
        B.eval_classification(_colour_scorer(), str(tmp_path / "empty"))
    # no classification/ at all: the other benchmarks of a bench_root made before it existed still run
    lines = []
    assert B.run_benchmarks(_colour_scorer(), ["classification"], str(tmp_path / "colours"), log=lines.append) == {}
    assert lines[0].startswith("classification: no ") and lines[0].endswith("skipped")


def test_zero_shot_top5_of_more_than_five_classes_and_the_probes_lambda(tmp_path):
    """More than 5 classes (7): a top-5 figure beside the top-1.  Image k embeds as e_k, class j's prompt as
    e_j / 2 + e_(j+1): every image's own class scores second (behind class k-1), so top-1 0 and top-5 1."""
    root = tmp_path / "classification" / "greys"
    names = [f"c{k}" for k in range(7)]
    for split in ("train", "test"):
        _folder(root, names, 1 if split == "test" else 4, split=split, colour=lambda k, i: (30 * k,) * 3)
    eye = torch.eye(7)

    def images(ims):
        return torch.stack([eye[round(float(np.asarray(im).mean()) / 30)] for im in ims])

    def texts(ts):
        return torch.stack([eye[int(t.split()[-1].strip(".c"))] / 2 + eye[(int(t.split()[-1].strip(".c")) + 1) % 7]
                            for t in ts])
    r = B.eval_classification(B.Scorer(images, texts), str(tmp_path), log=lambda *a: None)
    assert r["greys_zeroshot_top1"] == 0 and r["greys_zeroshot_top5"] == 1 and r["greys_n"] == 7
    # one-hot image features: the probe separates the 7 classes; its lambda is reported as log10 of a grid value
    assert r["greys_probe_top1"] == 1 and r["greys_probe_log10_lambda"] in [round(math.log10(v), 3)
                                                                            for v in B.PROBE_LAMBDAS]


def test_zero_shot_averages_each_class_prompts_and_renormalises(tmp_path):
    """CLIP's prompt ensembling: a class's text embedding is the mean over templates.txt's prompts, re-normalised.
    Here each template alone points every class half-way to a neighbour (either template alone: every image wrong),
    and each class's prompts have a norm of their own (the mean without re-normalising: the widest class wins)."""
    root = tmp_path / "classification" / "prompts"
    _folder(root, ["blue", "green", "red"], 2, split="test", colour=lambda k, i: tuple(200 * (j == 2 - k)
                                                                                       for j in range(3)))
    (root / "templates.txt").write_text("a left {} square.\na right {} square.\n")
    words, eye = ["red", "green", "blue"], torch.eye(3)

    def texts(ts):
        out = []
        for t in ts:
            k = next(k for k, w in enumerate(words) if w in t.split())
            v = eye[k] + 1.2 * eye[(k + (1 if "left" in t.split() else -1)) % 3]
            out.append((1 + 3 * k) * v)
        return torch.stack(out)
    sc = _colour_scorer()
    r = B.eval_classification(B.Scorer(sc.embed_images, texts), str(tmp_path), log=lambda *a: None)
    assert r == {"prompts_zeroshot_top1": 1.0, "prompts_n": 6}
    for line in ("a left {} square.", "a right {} square."):  # either template alone: every image wrong
        (root / "templates.txt").write_text(line + "\n")
        r = B.eval_classification(B.Scorer(sc.embed_images, texts), str(tmp_path), log=lambda *a: None)
        assert r["prompts_zeroshot_top1"] == 0, line


def test_classification_on_two_gloo_processes_equals_one(toy_root, tmp_path):
    """negclip.py --mode eval --benchmarks classification: images and prompts embedded on two ranks, gathered, and
    the probe fitted on each rank, give the single process's scores."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--mode", "eval", "--benchmarks", "classification", "--toy_root", toy_root, "--report", "false",
            "--device", "cpu"]
    runs = {}
    for name, launch in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                               "--master_port", str(29500 + (os.getpid() + 7) % 1000)])):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
        r = subprocess.run([sys.executable, *launch, os.path.join(repo, "negclip.py"), *args, "--out_dir",
                            str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = {k: v for k, v in json.load(open(tmp_path / name / "results.json")).items()
                      if k.startswith("classification/")}
    assert len(runs["one"]) == 10 and runs["one"].keys() == runs["two"].keys()
    # equal on the tiny worlds of seeds 0 and 1; allowed: one test image's verdict (1/60), as embeddings batched
    # differently on two ranks may differ in their last bits
    assert all(abs(runs["one"][k] - runs["two"][k]) <= 1.5 / 60 for k in runs["one"] if not k.endswith("lambda"))
