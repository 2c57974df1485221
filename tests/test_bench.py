"""bench/gpu.sh, the GPU bench script, in its CPU dry run (DEVICE=cpu TINY=1): the same commands at
toy size on the tiny toy world, each row printing its bench line, and its table when a row fails or
the CUDA-path checks hang; bench/random_models.py's tokenizers at the released vocabulary sizes,
with the special ids the models read; bench/cuda_paths.py's checks where a CPU can run them; and
the CPU path of every old-vs-new comparison in bench/."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ["blip2_stage1", "blip2_stage2_opt", "dlip_pretrain", "negclip_train", "perceiver_both",
        "imagechat_warmup"]
SCRIPT = {"blip2": "blip2_pformer.py", "dlip": "dlip.py", "negclip": "negclip.py",
          "perceiver": "perceiver_caption.py", "imagechat": "imagechat_warmup.py"}


@pytest.fixture(scope="module")
def dry_run(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, DEVICE="cpu", TINY="1", STEPS="2", TOY=toy_root, OUT=str(out),
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_gpu_sh_dry_run_prints_a_bench_line_per_row(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for line in (out / "results.tsv").read_text().splitlines():
        name, comp, status, wall, bench = line.split("\t")
        rows[name, comp] = (status, bench)
    for name in ROWS:
        status, bench = rows[name, "false"]
        assert status == "ok", (name, status)
        assert float(re.search(r"\| samples_s ([0-9.e+-]+)", bench).group(1)) > 0, (name, bench)
        # issue 18: every script's --bench times its real loader apart from the step
        assert float(re.search(r"\| ms_data ([0-9.e+-]+)", bench).group(1)) >= 0, (name, bench)
        assert float(re.search(r"\| samples_s_step ([0-9.e+-]+)", bench).group(1)) > 0, (name, bench)
        # compile rows are not run on CPU; a script without the flag is named as such
        with open(os.path.join(REPO, SCRIPT[name.split("_")[0]])) as f:
            has_flag = re.search(r"^ +compile: bool", f.read(), re.M) is not None
        want = "skipped: COMPILE=0" if has_flag else "has no --compile flag"
        assert want in rows[name, "true"][0], (name, rows[name, "true"])
    table = (out / "table.md").read_text()
    assert all(f"| {name} | false | " in table for name in ROWS)
    commands = (out / "commands.txt").read_text().splitlines()
    assert len(commands) == len(ROWS)
    assert all("--preset paper" in c and "--bench 2" in c for c in commands)


def test_dry_run_cuda_paths_report(dry_run):
    """On CPU the process group opens (gloo; nccl on a GPU) and the precision check sees fp32; the
    CUDA-only checks say skipped rather than pass."""
    _, out = dry_run
    log = (out / "logs" / "cuda_paths.log").read_text().splitlines()
    lines = dict(line.split(" | ")[1:3] for line in log if line.startswith("cuda_path | "))
    assert lines == {"process_group": "ok", "fused_sdpa": "skipped", "pinned_memory": "skipped",
                     "bf16_frozen_tower": "ok"}


def test_tokenizers_fill_the_published_vocabularies(tmp_path):
    """Paper size: the padded toy tokenizers have the released vocabulary sizes and the special ids
    the models read (CLIP pools at its end-of-text id; BLIP's vocabulary is BERT's + [DEC] + [ENC])."""
    sys.path.insert(0, REPO)
    from transformers import AutoTokenizer

    from bench import random_models as R
    words = ["a", "red", "circle", "left", "of", "blue", "square"]
    sizes = {}
    for folder, kind in (("bert-base-uncased", "bert"), ("clip-vit-base-patch32", "clip"),
                         ("gpt2", "gpt2")):
        conf = R.model_config(folder, tiny=False)
        R.write_tokenizer(kind, words, R.vocab_size(conf), tmp_path / folder)
        tok = AutoTokenizer.from_pretrained(tmp_path / folder)
        sizes[folder] = len(tok)
        if kind == "clip":  # the released ids (eos 2) pool at the argmax id: end-of-text, the last
            ids = tok("a red circle").input_ids
            assert conf.text_config.eos_token_id == 2 and ids[-1] == 49407 == max(ids)
        if kind == "gpt2":
            assert tok.eos_token_id == conf.eos_token_id == 50256
    assert sizes == {"bert-base-uncased": 30522, "clip-vit-base-patch32": 49408, "gpt2": 50257}
    blip = R.model_config("blip-itm-base-coco", tiny=False)
    # dlip.py requires the teacher's vocabulary to be the student tokenizer's (+ [DEC], [ENC])
    assert blip.text_config.vocab_size == sizes["bert-base-uncased"] + 2
    tiny = R.model_config("blip-itm-base-coco", tiny=True)
    assert tiny.text_config.vocab_size == R.TINY_VOCAB + 2
    assert tiny.vision_config.num_hidden_layers == 2


def test_random_model_folder_is_reused_only_when_its_stamp_matches(tmp_path):
    sys.path.insert(0, REPO)
    from bench import random_models as R
    words = ["a", "red", "circle"]
    gb, _ = R.write_model("gpt2", str(tmp_path), words, tiny=True, device="cpu")
    assert gb > 0
    with open(tmp_path / "gpt2" / R.STAMP) as f:
        assert json.load(f) == {"hub": "gpt2", "tiny": True, "bf16": False}
    assert R.write_model("gpt2", str(tmp_path), words, tiny=True, device="cpu")[0] == 0.0  # reused
    (tmp_path / "gpt2" / R.STAMP).write_text(json.dumps({"hub": "gpt2", "tiny": False, "bf16": False}))
    assert R.write_model("gpt2", str(tmp_path), words, tiny=True, device="cpu")[0] > 0  # rewritten


def test_image_pipeline_bench_runs_old_and_new():
    """bench/image_pipeline.py (issue 18.7) at a tiny size: both pipelines of both transforms, and the uint8
    batch is a quarter of the float32 one."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "image_pipeline.py"), "--images", "8",
                           "--micro", "4", "--workers", "2", "--reps", "1", "--size", "32"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| eval") or
            line.startswith("| train")]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [("eval", "old"), ("eval", "new"),
                                                         ("train (crop 0.5-1, flip)", "old"),
                                                         ("train (crop 0.5-1, flip)", "new")]
    mb = [float(r[5].strip(" |")) for r in rows]
    assert all(float(r[2]) > 0 for r in rows) and mb[1] > 0 and mb[0] == pytest.approx(4 * mb[1], rel=0.01)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_group_check_runs_its_collectives(monkeypatch):
    """bench/cuda_paths.py runs in a group of one process, where common.dist's wrappers skip the
    collective: the check must still call all_reduce and all_gather (NCCL's code path on a GPU)."""
    sys.path.insert(0, REPO)
    import torch
    import torch.distributed as tdist

    from bench import cuda_paths
    calls = []
    for name in ("all_reduce", "all_gather"):
        real = getattr(tdist, name)
        monkeypatch.setattr(tdist, name,
                            lambda *a, _f=real, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())),
                       ("RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    try:
        ok, detail = cuda_paths.check_process_group(torch.device("cpu"))
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    assert ok, detail
    assert "all_reduce" in calls and "all_gather" in calls, calls


def test_sdpa_check_compares_outputs_and_gradients():
    """cuda_paths' SDPA comparison (on the GPU: the fused kernels only) with the CPU's math kernel:
    bf16 within the tolerance the check applies, fp32 exact to rounding, gradients compared too."""
    sys.path.insert(0, REPO)
    import torch
    from torch.nn.attention import SDPBackend

    from bench import cuda_paths
    cpu = torch.device("cpu")
    out_err, grad_err = cuda_paths.sdpa_errors(cpu, [SDPBackend.MATH])
    assert 0 < out_err < 5e-2 and 0 < grad_err < 5e-2
    out_err, grad_err = cuda_paths.sdpa_errors(cpu, [SDPBackend.MATH], torch.float32)
    assert out_err < 1e-5 and grad_err < 1e-5


def test_gpu_sh_writes_the_table_when_a_row_fails_or_the_cuda_paths_hang(toy_root, tmp_path):
    """A row whose log ends in a tab and a bar (results.tsv's and the table's separators) and a hung
    cuda_paths.py (here: a PYTHON whose torchrun sleeps), cut at PATHS_S: the table is still
    written, naming both."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\n"
                    "case \" $* \" in *\" torch.distributed.run \"*) exec sleep 300 ;;\n"
                    "  *perceiver_caption.py*) printf 'Error: a\\tb | c\\n'; exit 3 ;; esac\n"
                    f"exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE="cpu", TINY="1", TOY=toy_root, OUT=str(out), PYTHON=str(fake),
               ROWS="perceiver_both", MODELS="clip-vit-base-patch32", PATHS_S="2",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0  # a row failed, the CUDA paths did not pass
    table = (out / "table.md").read_text()
    assert "| perceiver_both | false | - | - | - | - | - | - | " in table, table
    assert " | failed (rc 3): Error: a b   c |" in table, table
    assert "| bench/cuda_paths.py | FAIL | timeout after 2 s |" in table, table


def _has_commit(rev):
    return subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{rev}^{{commit}}"],
                          capture_output=True).returncode == 0


def _bench(args, tmp_path, toy_root=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **({"TOY_TINY_ROOT": toy_root} if toy_root else {}))
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("script,rev,args", [
    ("blip2_stage1.py", "12c4d55", ["--size", "tiny", "--reps", "1"]),
    ("dlip_step.py", "021eb53", ["--tiny", "--batch", "4", "--reps", "1"]),
])
def test_old_vs_new_benches_run_at_tiny_size(script, rev, args, tmp_path):
    """The old-vs-new comparisons' CPU path: both sides' losses agree (dropout off)."""
    if not _has_commit(rev):
        pytest.skip(f"the old side, {rev}, is not in this clone's history")
    out = _bench([os.path.join(REPO, "bench", script), "--old", rev, *args], tmp_path)
    diff = re.search(r"max \|loss (?:term old - new\| =|diff\|) ([0-9.e+-]+)", out)
    assert diff and float(diff.group(1)) < 1e-4, out


def test_negclip_padding_bench_runs(toy_root, tmp_path):
    """bench/negclip_padding.py: the old collate pads to 77 tokens, the new one to the longest
    caption; the same loss."""
    if not _has_commit("fa7c09f"):
        pytest.skip("the old side, fa7c09f, is not in this clone's history")
    out = _bench([os.path.join(REPO, "bench", "negclip_padding.py"), "--old", "fa7c09f",
                  "--rows", "1", "--reps", "1", "--toy_root", toy_root], tmp_path)
    rows = {r[1].strip(): r for r in (line.split("|") for line in out.splitlines())
            if len(r) > 3 and r[1].strip() in ("old", "new")}
    assert int(rows["old"][2]) == 77 and int(rows["new"][2]) < 77, out
    assert float(rows["old"][3]) == pytest.approx(float(rows["new"][3]), abs=1e-4), out


def test_rss_index_bench_runs(tmp_path):
    """bench/rss_index.py at a small size: both readers iterate every pair."""
    out = _bench([os.path.join(REPO, "bench", "rss_index.py"), "--images", "200", "--captions",
                  "2", "--workers", "2", "--batch", "50", "--file", str(tmp_path / "pairs.jsonl")],
                 tmp_path)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sorted(r["phase"] for r in results) == ["after", "before"]
    assert all(r["pairs"] == r["iterated"] == 400 for r in results), results
