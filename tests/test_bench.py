"""bench/gpu.sh, the GPU bench script, in its CPU dry run (DEVICE=cpu TINY=1): the same commands at
toy size on the tiny toy world, each row printing its bench line; and bench/random_models.py's
tokenizers at the released vocabulary sizes, with the special ids the models read."""
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
