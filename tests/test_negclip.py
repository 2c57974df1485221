"""Tests for negclip.py: the loss and batch layout, LoRA, equivalence with transformers, and every mode through main()
on the tiny toy world (mining, training, resume, DDP, eval, export, bad inputs).  The tagger, negatives and mining
helpers are tested in test_negatives.py, the benchmark readers and scoring rules in test_benchmarks.py."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import data.benchmarks as B
import data.negatives as NG
import negclip as N
from common.checkpoint import CheckpointMismatch, save_checkpoint
from common.data import DataError, read_pairs
from common.image import load_image

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they oversubscribe."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def test_negclip_loss_layout_and_terms():
    torch.manual_seed(0)
    B, Dm = 3, 8
    img, txt = _unit(torch.randn(2 * B, Dm)), _unit(torch.randn(4 * B, Dm))
    loss, terms = N.negclip_loss(img, txt, torch.tensor(10.0))
    logits = 10.0 * img @ txt.t()
    assert logits.shape == (6, 12)
    lab = torch.arange(6)
    i2t = torch.nn.functional.cross_entropy(logits, lab)
    t2i = torch.nn.functional.cross_entropy(logits[:, :6].t(), lab)  # rows 0..2B-1 of S^T only
    assert torch.allclose(terms["i2t"], i2t) and torch.allclose(terms["t2i"], t2i)
    assert torch.allclose(loss, (i2t + t2i) / 2)
    # hard-negative columns change L_i2t only
    txt2 = txt.clone()
    txt2[6:] = _unit(torch.randn(6, Dm))
    _, terms2 = N.negclip_loss(img, txt2, torch.tensor(10.0))
    assert torch.allclose(terms2["t2i"], terms["t2i"]) and not torch.allclose(terms2["i2t"], terms["i2t"])


def test_paper_preset_fits_the_micro_batch_to_the_world_size_before_mining(tmp_path, monkeypatch, capsys):
    """README's `torchrun --nproc_per_node=8 negclip.py --preset paper --mode train`: 256 = 8 ranks x micro 256 x
    accumulation 0 stopped in StepSampler after the mining.  main() now fits the micro batch before any data,
    mining or model (8 x 32, exact: gradient caching); eval, mine and export keep theirs (no training)."""
    from common.dist import Dist
    seen, Stop = [], type("Stop", (Exception,), {})

    def stop(cfg, is_main=True):  # resolve_paths: the first step that reads data or builds the toy world
        seen.append(cfg.micro_batch)
        raise Stop

    monkeypatch.setattr(N.D, "setup_distributed", lambda device: Dist(world_size=8))
    monkeypatch.setattr(N, "resolve_paths", stop)
    for mode in ("train", "eval"):
        with pytest.raises(Stop):
            N.main(["--preset", "paper", "--mode", mode, "--out_dir", str(tmp_path)])
    assert seen == [32, 256] and "--micro_batch 32, not 256: 8 processes x 32" in capsys.readouterr().out


def test_negclip_loss_perfect_alignment_goes_to_zero():
    e = torch.eye(12)[:6]  # 6 orthonormal image embeddings
    txt = torch.cat([e, torch.eye(12)[6:]])  # captions = images; hard captions orthogonal
    losses = [float(N.negclip_loss(e, txt, torch.tensor(s))[0]) for s in (1.0, 10.0, 100.0)]
    assert losses[0] > losses[1] > losses[2] and losses[2] < 1e-6


def test_duplicate_mask():
    img_ids = torch.tensor([0, 1, 0, 2])            # image 0 appears as anchor and as a neighbour
    txt_ids = torch.tensor([0, 1, 0, 2, -1, -1, -1, -1])
    m = N.duplicate_mask(img_ids, txt_ids)
    assert m.shape == (4, 8)
    assert m[0, 2] and m[2, 0] and m.sum() == 2      # off-diagonal same-image only; hard captions never masked
    torch.manual_seed(0)
    img, txt = _unit(torch.randn(4, 5)), _unit(torch.randn(8, 5))
    loss, terms = N.negclip_loss(img, txt, torch.tensor(5.0), m)
    # the masked logits leave both softmaxes: the loss of the other logits, and not the unmasked loss
    logits = (5.0 * img @ txt.t()).masked_fill(m, float("-inf"))
    i2t = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    t2i = torch.nn.functional.cross_entropy(logits[:, :4].t(), torch.arange(4))
    assert torch.isfinite(loss) and torch.allclose(terms["i2t"], i2t) and torch.allclose(terms["t2i"], t2i)
    assert torch.allclose(loss, (i2t + t2i) / 2)
    assert (loss - N.negclip_loss(img, txt, torch.tensor(5.0))[0]).abs() > 1e-3


def test_lora_counts_and_merge_equals_unmerged():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("q_proj", nn.Linear(6, 8))
    net.add_module("act", nn.GELU())
    net.add_module("fc1", nn.Linear(8, 5))
    net.add_module("other", nn.Linear(5, 4))
    n = N.add_lora(net, ["q_proj", "fc1"], r=2, alpha=4, dropout=0.0)
    assert n == 2
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == 2 * (6 + 8) + 2 * (8 + 5)
    x = torch.randn(3, 6)
    y0 = net(x)
    assert torch.allclose(y0, nn.Sequential(*[m.base if isinstance(m, N.LoRALinear) else m for m in net])(x))
    with torch.no_grad():  # train-like perturbation of B so the adapter matters
        for m in net.modules():
            if isinstance(m, N.LoRALinear):
                m.lora_B.normal_()
    y1 = net(x)
    assert not torch.allclose(y0, y1)
    q = net.q_proj  # W x + (alpha / r) B A x, alpha / r = 2 (Hu et al.; PEFT's scaling)
    assert torch.allclose(q(x), q.base(x) + 2 * x @ q.lora_A.t() @ q.lora_B.t(), atol=1e-5)
    N.merge_lora(net)
    assert not any(isinstance(m, N.LoRALinear) for m in net.modules())
    assert torch.allclose(net(x), y1, atol=1e-5)
    with pytest.raises(ValueError, match="no Linear"):
        N.add_lora(nn.Sequential(nn.Linear(2, 2)), ["q_proj"], 2, 4, 0.0)


WORDS = "a an the red blue green circle square left right of to is on small large".split()


def _save_tokenizer(path, eos_id=3):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(path)


def _tiny_clip(path):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(WORDS) + 4, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24,
                                      eos_token_id=3, bos_token_id=2, pad_token_id=0),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(path)
    _save_tokenizer(path)
    return str(path)


def test_clip_folder_gives_transformers_embeddings(tmp_path):
    from transformers import AutoTokenizer, CLIPModel
    path = _tiny_clip(tmp_path / "clip")
    model, tok = N.build_model(N.Config(init="clip", clip=path))
    model.eval()
    ref = CLIPModel.from_pretrained(path).eval()
    assert model.image_size == 32 and model.image_mean == N.CLIP_MEAN
    pixels = torch.randn(3, 3, 32, 32)
    t = AutoTokenizer.from_pretrained(path)(["a red circle", "the small blue square left of a circle", "a"],
                                             padding=True, return_tensors="pt")
    with torch.no_grad():
        ours_i = model.encode_image(pixels, normalize=False)
        ours_t = model.encode_text(t["input_ids"], t["attention_mask"], normalize=False)
        ref_i = ref.get_image_features(pixel_values=pixels).pooler_output
        ref_t = ref.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output
        ref_logits = ref(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pixels)
        img, txt, scale = model(pixels, t["input_ids"], t["attention_mask"])
    assert torch.allclose(ours_i, ref_i, atol=1e-5) and torch.allclose(ours_t, ref_t, atol=1e-5)
    assert torch.allclose(scale * img @ txt.t(), ref_logits.logits_per_image, atol=1e-4)


def test_unimodal_towers_load_with_fresh_heads(tmp_path):
    from transformers import BertConfig, BertModel, CLIPVisionModel, ViTConfig, ViTModel
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS) + 4, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=24)).save_pretrained(tmp_path / "bert")
    _save_tokenizer(tmp_path / "bert")
    ViTModel(ViTConfig(hidden_size=20, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=16, patch_size=8)).save_pretrained(tmp_path / "vit")
    path = _tiny_clip(tmp_path / "clip")
    for vision, dv, pooled_ref in (("vit", 20, None), ("clip", 32, "clip")):
        cfg = N.Config(init="unimodal", vision=str(tmp_path / vision), text=str(tmp_path / "bert"), embed_dim=12)
        model, tok = N.build_model(cfg)
        mean, size = model.image_mean, model.image_size
        model.eval()
        assert model.visual_projection.weight.shape == (12, dv) and model.text_projection.weight.shape == (12, 24)
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
        assert mean == (N.IMAGENET_MEAN if vision == "vit" else N.CLIP_MEAN)
        assert all(p.requires_grad for p in model.parameters())  # no unused (pooler) weights for DDP
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            if pooled_ref == "clip":  # CLIP vision tower: the post-LN CLS, as CLIPVisionModel's pooler
                ref = CLIPVisionModel.from_pretrained(path).eval()(pixel_values=x).pooler_output
            else:  # ViT: raw CLS of the final layer norm (its tanh pooler is not pretrained)
                ref = ViTModel.from_pretrained(str(tmp_path / "vit"), add_pooling_layer=False).eval()(
                    pixel_values=x).last_hidden_state[:, 0]
            assert torch.allclose(model.pool_image(x), ref, atol=1e-5)
            t = tok(["a red circle", "the square"], padding=True, return_tensors="pt")
            h = BertModel.from_pretrained(str(tmp_path / "bert")).eval()(**t).last_hidden_state
            m = t["attention_mask"][..., None].float()
            assert torch.allclose(model.pool_text(t["input_ids"], t["attention_mask"]), (h * m).sum(1) / m.sum(1),
                                  atol=1e-5)
    cfg = N.Config(init="unimodal", vision=str(tmp_path / "clip"), text=str(tmp_path / "bert"), lock_vision=True,
                   lora_r=2, lora_targets=["all-linear"])
    model = N.build_model(cfg)[0]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(n.startswith("vision.") for n in names)
    assert all("lora_" in n for n in names if n.startswith("text."))
    assert "logit_scale" in names and "visual_projection.weight" in names


def test_dinov2_tower_takes_its_processors_crop_and_default_lora_targets(toy_root, tmp_path):
    """--init unimodal with a DINOv2 tower: facebook/dinov2-* configs say image_size 518, their processors crop
    224; the tower trains and evaluates at the processor's crop (here config 56, crop 28), not the config's size.
    --lora_r with the default --lora_targets (auto) adapts every Linear of DINOv2 and BERT (CLIP's module names
    matched none of them: a ValueError); --lr 0 resolves to the uni-modal recipe's 1e-5."""
    from PIL import Image
    from transformers import BertConfig, BertModel, Dinov2Config, Dinov2Model
    BertModel(BertConfig(vocab_size=len(WORDS) + 4, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=24)).save_pretrained(tmp_path / "bert")
    _save_tokenizer(tmp_path / "bert")
    dino = tmp_path / "dino"
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             image_size=56, patch_size=7)).save_pretrained(dino)
    (dino / "preprocessor_config.json").write_text(json.dumps({  # facebook/dinov2-base's, scaled by 1/8
        "crop_size": {"height": 28, "width": 28}, "do_center_crop": True, "size": {"shortest_edge": 32},
        "image_mean": list(N.IMAGENET_MEAN), "image_std": list(N.IMAGENET_STD)}))
    cfg = N.Config(init="unimodal", vision=str(dino), text=str(tmp_path / "bert"), embed_dim=8, lora_r=2)
    model, tok = N.build_model(cfg)
    assert model.image_size == 28 and model.image_mean == tuple(N.IMAGENET_MEAN)
    seen = []
    model.vision.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["pixel_values"].shape), with_kwargs=True)
    sc = N.scorer(model.eval(), tok, cfg, N.D.Dist(), torch.float32)
    assert sc.embed_images([Image.new("RGB", (50, 40))]).shape == (1, 8) and seen == [(1, 3, 28, 28)]
    rows = N.NegCLIPRows([{"image": "x.png", "caption": "a", "negs": ["b"], "nbrs": [0], "image_id": "0"}],
                         str(tmp_path), model, cfg, hn_start=0)
    assert rows.tf.size == 28  # training crops too
    for tower, n in ((model.vision, 6), (model.text, 6)):  # q, k, v, attention out, two MLP Linears per layer
        assert sum(isinstance(m, N.LoRALinear) for m in tower.modules()) == n
        assert all(".lora_" in k for k, p in tower.named_parameters() if p.requires_grad)
    assert N.resolve_paths(N.Config(init="unimodal", toy_root=toy_root, out_dir=str(tmp_path))).lr == 1e-5
    assert N.resolve_paths(N.Config(init="clip", toy_root=toy_root, out_dir=str(tmp_path))).lr == 1e-6
    paper = N.PRESETS["paper"]  # mined from BLIP's JSON (val2014/...): rows under the released TSV's root
    assert os.path.join(paper["image_root"], paper["mine_prefix"]) == paper["retrieval_image_root"] == "data/coco"


MARGIN_FIXED_LOSS = 0.03


def _args(toy_root, out, *extra):
    return ["--toy_root", toy_root, "--out_dir", str(out), "--device", "cpu", "--tagger", "rule",
            "--eval_batch", "64", "--log_every", "1", *map(str, extra)]


def _losses(out):
    return [json.loads(s)["loss"] for s in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in s]


@pytest.fixture(scope="module")
def mined(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("mine")
    res = N.main(["--mode", "mine", *_args(toy_root, out)])
    return str(out / "train_neg_clip.tsv"), res


def test_mine_writes_negclip_tsv(mined, toy_root):
    tsv, res = mined
    rows = NG.read_negclip_tsv(tsv)
    assert res["rows"] == len(rows) > 100
    assert res["neg_noun_chunk"] > 0 and res["neg_ADJ"] > 0 and res["neg_NN"] > 0
    for i, r in enumerate(rows):
        assert len(r["nbrs"]) == 3 and i not in r["nbrs"] and r["negs"]
        assert all(NG.norm_caption(n) != NG.norm_caption(r["caption"]) for n in r["negs"])
    summary = json.load(open(tsv + ".summary.json"))
    assert summary["tagger"] == "rule" and summary["rows"] == len(rows)
    key = json.load(open(tsv + ".key.json"))  # what the TSV was mined from
    assert key["train_file"] == os.path.abspath(os.path.join(toy_root, "pairs_train.jsonl"))
    assert (key["k"], key["tagger"], key["seed"]) == (3, "rule", 0) and len(key["sha256"]) == 64


def _fixed_set_loss(tsv, toy_root, ckpt=None):
    """Mean NegCLIP loss (batches of 16 rows) over every training row, each drawn as in epoch 0 (same negatives,
    neighbours and crops for any model), in eval mode: the init model's or a checkpoint's.  Unlike the training
    losses, which come from different batches step by step, this compares two models on identical inputs."""
    cfg = N.parse_config(N.Config, N.PRESETS, ["--toy_root", toy_root, "--mode", "eval", "--ckpt", str(ckpt or "")])
    N.resolve_paths(cfg)
    model, tok = N.load_for_eval(cfg, N.Logger(None, False))
    rows, _ = NG.filter_rows(NG.read_negclip_tsv(tsv), toy_root, N.ImageFolderLoader(toy_root, None))
    data = N.NegCLIPRows(rows, toy_root, model, cfg, hn_start=0)
    losses = []
    with torch.no_grad():
        for s in range(0, len(rows) - 15, 16):
            batch = N.collate([data[(0, 0, i)] for i in range(s, s + 16)], tok, cfg.max_text_len)
            losses.append(float(N.forward_loss(model.eval(), model, batch, cfg, torch.device("cpu"),
                                               torch.float32)[0]))
    return float(np.mean(losses))


def test_train_eval_export_pipeline(mined, toy_root, tmp_path):
    tsv, _ = mined
    out = tmp_path / "train"
    res = N.main(["--mode", "train", *_args(toy_root, out, "--train_tsv", tsv, "--max_steps", 48, "--global_batch",
                                             16, "--micro_batch", 8, "--lr", 2e-4, "--warmup", 1, "--val_every", 24,
                                             "--benchmarks", "retrieval")])
    assert len(res["train/losses"]) == 48
    # learning: the trained model fits the training rows better than the init model, on the same inputs
    # (it drops by 0.091 / 0.119 / 0.114 on the tiny worlds of seeds 0 / 1 / 2, docs/negclip.md; the margin is
    # a third of the smallest drop)
    before, after = _fixed_set_loss(tsv, toy_root), _fixed_set_loss(tsv, toy_root, out / "last.pt")
    print(f"fixed-set loss: before {before:.4f}, after {after:.4f}")  # per-seed figures: pytest -s
    assert after < before - MARGIN_FIXED_LOSS, (before, after)
    for name in ("last.pt", "best.pt", "config.json", "metrics.jsonl", "results.json"):
        assert (out / name).is_file(), name
    assert json.load(open(out / "config.json"))["max_steps"] == 48
    ck = N.load_checkpoint(str(out / "last.pt"))
    assert ck["step"] == 48 and ck["config"]["lr"] == 2e-4 and "optimizer" in ck and "rng" in ck
    assert (ck["script"], ck["kind"], ck["model_config"]["init"]) == ("negclip", "negclip", "clip")
    assert res["retrieval/r_mean"] > 0
    # eval from the checkpoint training evaluated (best.pt: its best validation step, issue 17.8; which step
    # that is depends on the toy world): every benchmark, one table
    ev = N.main(["--mode", "eval", *_args(toy_root, tmp_path / "eval", "--ckpt", out / "best.pt", "--order_seeds", 1,
                                          "--aro_min_pair_count", 1, "--report_before", out / "results.json")])
    for key in ("retrieval/txt_r1", "retrieval/img_r1", "aro/vg_relation_macro", "aro/vg_attribution_macro",
                "order/coco_order_p1", "sugarcrepe/REPLACE_micro", "sugarcrepe/swap_att", "crepe/atom_R@1",
                "svo/pairwise", "svo/coverage", "winoground/group"):
        assert key in ev and np.isfinite(ev[key]), key
    assert ev["retrieval/r_mean"] == pytest.approx(res["retrieval/r_mean"], abs=1e-6)
    # export of the checkpoint (both towers trained, no LoRA): a CLIPModel folder with the checkpoint's features
    from transformers import AutoTokenizer, CLIPModel
    exp = N.main(["--mode", "export", *_args(toy_root, tmp_path / "x", "--ckpt", out / "best.pt",
                                             "--export_dir", tmp_path / "exported")])
    cfg = N.parse_config(N.Config, N.PRESETS, ["--toy_root", toy_root, "--mode", "export", "--ckpt",
                                               str(out / "best.pt")])
    ours = N.load_for_eval(N.resolve_paths(cfg), N.Logger(None, False))[0].eval()
    ref, x = CLIPModel.from_pretrained(exp["export_dir"]).eval(), torch.randn(2, 3, 64, 64)
    t = AutoTokenizer.from_pretrained(exp["export_dir"])(["a red circle left of a square", "a"], padding=True,
                                                         return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(x, normalize=False),
                              ref.get_image_features(pixel_values=x).pooler_output, atol=1e-5)
        assert torch.allclose(ours.encode_text(t["input_ids"], t["attention_mask"], normalize=False),
                              ref.get_text_features(**t).pooler_output, atol=1e-5)
    saved = json.load(open(tmp_path / "eval" / "results.json"))
    assert saved["winoground/text"] == ev["winoground/text"]
    # ARO's accuracy per relation and per attribute pair (its evaluate_scores records) are in results.json
    for name in ("vg_relation", "vg_attribution"):
        per = [k for k in saved if k.startswith(f"aro/{name}/")]
        assert per and all(0 <= saved[k] <= 1 for k in per), name
    # the toy CLIP reads the images: image retrieval far above chance (chance R@1 = 100 / N_images)
    n_img = len(B.read_retrieval(os.path.join(toy_root, "pairs_test.jsonl"))[0])
    assert ev["retrieval/img_r1"] > 3 * 100 / n_img
    # ... and names colours: zero-shot and linear-probe colour classification (7 classes) far above chance (the
    # init CLIP scores 0.96-1.0 on the tiny worlds of seeds 0, 1, 2, 14; chance 0.14)
    assert ev["classification/toy_colours_zeroshot_top1"] > 0.5 and ev["classification/toy_colours_probe_top1"] > 0.5
    # the picture reports (issue 21): every image decodes, every SVG parses (read_report raises if not)
    from common.report import read_report
    cards = "Captions against their hard negatives (cosine similarity)"
    train_rep, eval_rep = read_report(out / "report.html"), read_report(tmp_path / "eval" / "report.html")
    assert {"Training", cards, "Benchmark: retrieval"} <= set(train_rep["sections"])
    assert {cards, *(f"Benchmark: {b}" for b in B.BENCHMARKS)} <= set(eval_rep["sections"])
    assert train_rep["images"] == eval_rep["images"] == 6 and eval_rep["svgs"] == len(B.BENCHMARKS)
    # the training run scores its rows with the initial and the final weights; an eval of a checkpoint, with it
    html, ev_html = open(out / "report.html").read(), open(tmp_path / "eval" / "report.html").read()
    assert "<th>before</th><th>after</th>" in html and "<th></th><th>after</th></tr>" in ev_html
    assert html.count("negative: ") >= 6 and ev_html.count("negative: ") >= 6
    # --report_before: the train run's figures drawn as "before" bars next to the checkpoint's (retrieval only)
    assert ev_html.count(">before</text>") == 1 and ev_html.count(">after</text>") == 1
    assert "vg_relation/" not in ev_html  # per-relation rows: results.json only, not bars


def test_lora_lock_vision_train_and_export_equals_transformers(mined, toy_root, tmp_path):
    from transformers import AutoTokenizer, CLIPModel
    tsv, _ = mined
    out = tmp_path / "lora"
    N.main(["--mode", "train", *_args(toy_root, out, "--train_tsv", tsv, "--max_steps", 2, "--global_batch", 8,
                                      "--micro_batch", 8, "--lr", 1e-2, "--lora_r", 4, "--lora_alpha", 8,
                                      "--lock_vision", "true", "--val_file", "none", "--eval_after_train", "false")])
    ck = N.load_checkpoint(str(out / "last.pt"))
    assert all("lora_" in k for k in ck["model"] if k.startswith("text.")) and "logit_scale" in ck["model"]
    assert not any(k.startswith("vision.") for k in ck["model"])  # locked tower: not in the checkpoint
    exp = N.main(["--mode", "export", *_args(toy_root, tmp_path / "x", "--ckpt", out / "last.pt",
                                             "--export_dir", tmp_path / "exported")])
    cfg = N.parse_config(N.Config, N.PRESETS, ["--toy_root", toy_root, "--mode", "export",
                                               "--ckpt", str(out / "last.pt")])
    N.resolve_paths(cfg)
    ours = N.merge_lora(N.load_for_eval(cfg, N.Logger(None, False))[0]).eval()
    ref = CLIPModel.from_pretrained(exp["export_dir"]).eval()
    tok = AutoTokenizer.from_pretrained(exp["export_dir"])
    t = tok(["a red circle above a blue square", "a small green star"], padding=True, return_tensors="pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours.encode_text(t["input_ids"], t["attention_mask"], normalize=False),
                              ref.get_text_features(**t).pooler_output, atol=1e-5)
        assert torch.allclose(ours.encode_image(x, normalize=False),
                              ref.get_image_features(pixel_values=x).pooler_output, atol=1e-5)
        base = CLIPModel.from_pretrained(os.path.join(toy_root, "models", "clip")).eval()
        assert not torch.allclose(base.get_text_features(**t).pooler_output, ref.get_text_features(**t).pooler_output)


def test_unimodal_export_writes_towers_and_heads_that_give_the_embeddings(toy_root, tmp_path, monkeypatch):
    """--init unimodal --mode export: vision/ and text/ (transformers folders) and heads.safetensors (the two
    projections and the log-temperature) rebuild the exported model's embeddings with transformers alone."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer
    seen, export = [], N.export_model
    monkeypatch.setattr(N, "export_model", lambda model, *a: seen.append(model) or export(model, *a))
    exp = N.main(["--mode", "export", *_args(toy_root, tmp_path / "x", "--init", "unimodal", "--embed_dim", 16,
                                             "--export_dir", tmp_path / "exported")])
    ours, out = seen[0].eval(), exp["export_dir"]
    vision, text = (AutoModel.from_pretrained(os.path.join(out, side)).eval() for side in ("vision", "text"))
    heads = load_file(os.path.join(out, "heads.safetensors"))
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "text"))
    assert heads["logit_scale"].item() == pytest.approx(ours.logit_scale.item())
    t = tok(["a red circle above a blue square", "a small green star"], padding=True, return_tensors="pt")
    x = torch.randn(2, 3, ours.image_size, ours.image_size)
    with torch.no_grad():
        m = t["attention_mask"][..., None].float()
        want_t = ((text(**t).last_hidden_state * m).sum(1) / m.sum(1)) @ heads["text_projection"].t()
        want_i = vision(pixel_values=x).pooler_output @ heads["visual_projection"].t()
        assert torch.allclose(ours.encode_text(t["input_ids"], t["attention_mask"]), _unit(want_t), atol=1e-5)
        assert torch.allclose(ours.encode_image(x), _unit(want_i), atol=1e-5)


def test_resume_equals_unbroken_run(mined, toy_root, tmp_path):
    tsv, _ = mined
    common = ["--train_tsv", tsv, "--max_steps", 4, "--global_batch", 8, "--micro_batch", 4, "--lr", 1e-4,
              "--warmup", 1, "--val_file", "none", "--eval_after_train", "false"]
    N.main(["--mode", "train", *_args(toy_root, tmp_path / "a", *common)])
    N.main(["--mode", "train", *_args(toy_root, tmp_path / "b", *common, "--stop_after", 2, "--report", "false")])
    N.main(["--mode", "train", *_args(toy_root, tmp_path / "c", *common, "--resume", tmp_path / "b" / "last.pt")])
    a, b, c = _losses(tmp_path / "a"), _losses(tmp_path / "b"), _losses(tmp_path / "c")
    assert len(a) == 4 and len(b) == 2 and len(c) == 2
    assert (tmp_path / "c" / "report.html").is_file() and not (tmp_path / "b" / "report.html").exists()
    assert b == a[:2] and np.allclose(c, a[2:], rtol=0, atol=1e-6)
    # resuming into a run directory that logged past the checkpoint: each step is logged once
    N.main(["--mode", "train", *_args(toy_root, tmp_path / "a", *common, "--resume", tmp_path / "b" / "last.pt")])
    recs = [json.loads(s) for s in open(tmp_path / "a" / "metrics.jsonl")]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == [1, 2, 3, 4] and [r["step"] for r in recs if r.get("event") == "resume"] == [2]
    assert np.allclose([r["loss"] for r in recs if "loss" in r], a, rtol=0, atol=1e-6)


def test_resume_checks_checkpoint_and_config(mined, toy_root, tmp_path, capsys):
    tsv, _ = mined
    common = ["--train_tsv", tsv, "--max_steps", 3, "--global_batch", 8, "--micro_batch", 8, "--warmup", 1,
              "--val_file", "none", "--eval_after_train", "false"]
    N.main(["--mode", "train", *_args(toy_root, tmp_path / "a", *common, "--lr", 1e-4, "--stop_after", 1)])
    resume = ["--resume", tmp_path / "a" / "last.pt"]
    with pytest.raises(CheckpointMismatch, match=r"^resume changes the config: lr 0.0001 -> 0.0002 \(an exact"):
        N.main(["--mode", "train", *_args(toy_root, tmp_path / "b", *common, "--lr", 2e-4, *resume)])
    # --max_steps (--epochs) sets the cosine schedule's length: a changed one is no exact resume (--stop_after is)
    with pytest.raises(CheckpointMismatch, match=r"^resume changes the config: max_steps 3 -> 4 \(an exact"):
        N.main(["--mode", "train", *_args(toy_root, tmp_path / "b", *common, "--lr", 1e-4, "--max_steps", 4, *resume)])
    capsys.readouterr()
    res = N.main(["--mode", "train", *_args(toy_root, tmp_path / "c", *common, "--lr", 2e-4, "--max_steps", 4,
                                            *resume, "--resume_changes", "true")])
    assert res["train/steps"] == 4
    assert ("resume changes the config: max_steps 3 -> 4, lr 0.0001 -> 0.0002 (allowed by --resume_changes)"
            in capsys.readouterr().out)
    # a checkpoint of another script, stamped or not, is named in one line (before any key is read)
    other = tmp_path / "dlip.pt"
    save_checkpoint(str(other), {"script": "dlip", "kind": "pretrain", "model": {}, "step": 5})
    with pytest.raises(CheckpointMismatch, match="^--resume .*dlip.pt: this is a dlip pretrain checkpoint; negclip"):
        N.main(["--mode", "train", *_args(toy_root, tmp_path / "d", *common, "--resume", other)])
    save_checkpoint(str(other), {"model": {}, "config": {"stage": 1}})
    with pytest.raises(CheckpointMismatch, match=r"^--ckpt .*: this is a blip2_pformer \(unstamped\) checkpoint"):
        N.main(["--mode", "eval", *_args(toy_root, tmp_path / "e", "--ckpt", other, "--benchmarks", "retrieval")])


def test_cached_tsv_is_keyed_by_train_file(toy_root, tmp_path):
    """A TSV mined into out_dir is reused only for the train file (and settings) it was mined from."""
    out = tmp_path / "run"
    common = ["--max_steps", 1, "--global_batch", 8, "--micro_batch", 8, "--val_file", "none",
              "--eval_after_train", "false"]
    N.main(["--mode", "train", *_args(toy_root, out, *common)])
    full = json.load(open(out / "train_neg_clip.tsv.summary.json"))["rows"]
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(open(os.path.join(toy_root, "pairs_train.jsonl")).readlines()[:40]))
    N.main(["--mode", "train", *_args(toy_root, out, *common, "--train_file", subset)])
    assert json.load(open(out / "train_neg_clip.tsv.summary.json"))["rows"] <= 40 < full
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"^\S*empty.jsonl: no records \(empty dataset\)$"):
        N.main(["--mode", "train", *_args(toy_root, out, *common, "--train_file", empty)])


def _image_copy(toy_root, tmp_path, rows, every):
    """An image root holding the toy images of `rows`, every `every`-th one corrupt; a released-style TSV (no key
    sidecar: used as is) pointing into it."""
    root = tmp_path / "images"
    for k, name in enumerate(sorted({r["image"] for r in rows})):
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        if k % every == 0:
            (root / name).write_bytes(b"corrupt")
        else:
            shutil.copy(os.path.join(toy_root, name), root / name)
    tsv = tmp_path / "released.tsv"
    NG.write_negclip_tsv(str(tsv), rows)
    return root, tsv


def test_unreadable_training_images_are_counted_reported_and_enforced(mined, toy_root, tmp_path, capsys):
    tsv, _ = mined
    rows = NG.read_negclip_tsv(tsv)
    n = len({r["image"] for r in rows})
    root, released = _image_copy(toy_root, tmp_path, rows, 5)  # 20% of the images corrupt
    common = ["--train_tsv", released, "--image_root", root, "--max_steps", 3, "--global_batch", 16,
              "--micro_batch", 16, "--val_file", "none", "--eval_after_train", "false"]
    with pytest.raises(DataError, match=r"^too many unreadable images under .*images: \d+ of \d+ images unreadable"):
        N.main(["--mode", "train", *_args(toy_root, tmp_path / "a", *common)])
    # allowed: a corrupt image is never trained on (its row is replaced by the next readable one), and each is
    # counted once however often drawn, in the log lines and the result
    res = N.main(["--mode", "train", *_args(toy_root, tmp_path / "b", *common, "--max_bad_frac", 0.5)])
    bad = res["train/unreadable_images"]
    assert 0 < bad <= -(-n // 5) and f"train: {bad} of " in capsys.readouterr().out
    assert [json.loads(s)["bad_images"] for s in open(tmp_path / "b" / "metrics.jsonl")][-1] <= bad
    # none readable: one line, not an IndexError
    root, released = _image_copy(toy_root, tmp_path / "none", rows, 1)
    with pytest.raises(DataError, match="unreadable"):
        N.main(["--mode", "train", *_args(toy_root, tmp_path / "c", *common[4:], "--train_tsv", released,
                                          "--image_root", root, "--max_bad_frac", 1.0)])
    with pytest.raises(DataError, match="no readable image"):  # mining from that image root
        N.main(["--mode", "mine", *_args(toy_root, tmp_path / "d", "--image_root", root, "--max_bad_frac", 1.0)])


def test_two_process_gloo_matches_one_process(mined, toy_root, tmp_path):
    tsv, _ = mined
    common = ["--mode", "train", "--train_tsv", tsv, "--max_steps", 2, "--global_batch", 8, "--lr", 1e-4,
              "--warmup", 1, "--val_file", "none", "--eval_after_train", "false", "--mask_duplicates", "true"]
    N.main([*map(str, common), *_args(toy_root, tmp_path / "one", "--micro_batch", 8)])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), os.path.join(os.path.dirname(HERE), "negclip.py"),
           *map(str, common), *_args(toy_root, tmp_path / "two", "--micro_batch", 4)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 2 and np.allclose(one, two, rtol=0, atol=1e-5)
    # gradient accumulation (issue 17.2): 4 micro batches of 2 in one process, 2 of 2 on each of 2 processes,
    # train on the loss of the whole global batch (before: the mean of the micro batches' own losses)
    N.main([*map(str, common), *_args(toy_root, tmp_path / "acc", "--micro_batch", 2)])
    cmd[-len(_args(toy_root, tmp_path / "two", "--micro_batch", 4)):] = _args(toy_root, tmp_path / "acc2",
                                                                               "--micro_batch", 2)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for run in ("acc", "acc2"):
        assert np.allclose(_losses(tmp_path / run), one, rtol=0, atol=1e-5), (run, _losses(tmp_path / run), one)
    # uni-modal towers whose mean-pooled CLIP tower leaves its post-LayerNorm unused: frozen before DDP, or
    # DDP's unused-parameter check stops the second step
    cmd[-len(_args(toy_root, tmp_path / "two", "--micro_batch", 4)):] = _args(
        toy_root, tmp_path / "uni", "--micro_batch", 4, "--init", "unimodal", "--vision_pool", "mean")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_losses(tmp_path / "uni")) == 2


# ---------------------------------------------------------------- exact gradient accumulation (issue 17.2)
def _grad_rows(tsv, toy_root, init="clip", n=16, **extra):
    """A model of the toy world in training mode and n rows of the mined TSV drawn as in epoch 0, with hard
    negatives and neighbour images (the released layout)."""
    towers = (dict(init="unimodal", vision=os.path.join(toy_root, "models", "clip"),
                   text=os.path.join(toy_root, "models", "bert")) if init == "unimodal" else
              dict(clip=os.path.join(toy_root, "models", "clip")))
    cfg = N.Config(max_text_len=32, mask_duplicates=True, **towers, **extra)
    torch.manual_seed(0)  # fresh heads of the unimodal init
    model, tok = N.build_model(cfg)
    rows, _ = NG.filter_rows(NG.read_negclip_tsv(tsv), toy_root, N.ImageFolderLoader(toy_root, None))
    data = N.NegCLIPRows(rows, toy_root, model, cfg, hn_start=0)
    return cfg, model.train(), tok, [data[(0, 0, i)] for i in range(n)]


def _grads(model, fn):
    """loss, {name: gradient} of fn() (which back-propagates)."""
    model.zero_grad(set_to_none=True)
    loss = fn()
    return float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol=1e-5):
    assert a[0] == pytest.approx(b[0], rel=tol, abs=tol), (a[0], b[0])
    assert a[1].keys() == b[1].keys() and len(a[1]) > 5
    bad = [k for k in a[1] if not torch.allclose(a[1][k], b[1][k], rtol=tol, atol=tol)]
    assert not bad, [(k, float((a[1][k] - b[1][k]).abs().max())) for k in bad[:5]]


def _full_batch(cfg, model, tok, items):
    """Loss and gradients of the global batch as one micro batch (no accumulation)."""
    batch = N.collate(items, tok, cfg.max_text_len)
    cpu, scaler = torch.device("cpu"), N.amp.make_scaler(torch.float32)
    return _grads(model, lambda: N.accumulate(model, model, [batch], cfg, cpu, torch.float32, scaler, 1)[0])


@pytest.mark.parametrize("extra", [{}, dict(lock_vision=True, lora_r=2, lora_dropout=0.0)], ids=["full", "lit_lora"])
def test_gradient_caching_equals_one_full_batch(mined, toy_root, extra):
    """Global batch 16 in 4 micro batches of 4 (hard negatives, neighbour images, duplicate masking): the loss
    and every gradient equal those of the 16 rows in one batch; also with a locked image tower (its features
    from the first pass, reused) and LoRA on the text tower.  Each micro batch's own loss (what the step
    computed before gradient caching) is another loss."""
    cfg, model, tok, items = _grad_rows(mined[0], toy_root, **extra)
    micro = [N.collate(items[k:k + 4], tok, cfg.max_text_len) for k in range(0, 16, 4)]
    assert micro[0]["blocks"] == (2, 4) and micro[0]["pixels"].shape[0] == 8
    cpu, scaler = torch.device("cpu"), N.amp.make_scaler(torch.float32)
    acc = _grads(model, lambda: N.accumulate(model, model, micro, cfg, cpu, torch.float32, scaler, 1)[0])
    full = _full_batch(cfg, model, tok, items)
    _assert_same(acc, full)
    with torch.no_grad():
        own = np.mean([float(N.forward_loss(model, model, b, cfg, cpu, torch.float32)[0]) for b in micro])
    assert abs(own - full[0]) > 0.1, (own, full[0])


def test_gradient_caching_replays_the_dropout_masks(mined, toy_root):
    """BERT's dropout on (unimodal init, training mode): the re-run of each micro batch draws the masks of its
    first pass, so the gradients equal those of embedding the micro batches with gradient in one graph."""
    cfg, model, tok, items = _grad_rows(mined[0], toy_root, "unimodal", n=8)
    micro = [N.collate(items[k:k + 4], tok, cfg.max_text_len) for k in range(0, 8, 4)]
    cpu, f32 = torch.device("cpu"), torch.float32

    def one_graph():
        embs = [N.embed(model, model, b, cfg, cpu, f32) for b in micro]
        loss = N.global_loss([e[0] for e in embs], [e[1] for e in embs], embs[0][2], micro, cfg, cpu)[0]
        loss.backward()
        return loss.detach()

    def cached():
        return N.accumulate(model, model, micro, cfg, cpu, f32, N.amp.make_scaler(f32), 1)[0]
    runs = []
    for seed, fn in ((0, one_graph), (0, cached), (1, cached)):
        torch.manual_seed(seed)
        runs.append(_grads(model, fn))
    _assert_same(runs[1], runs[0])
    assert not torch.allclose(runs[2][1]["text.embeddings.word_embeddings.weight"],
                              runs[0][1]["text.embeddings.word_embeddings.weight"])  # the masks matter


def _rank_accumulate(rank, world, port, tsv, toy_root, out_dir):
    """One rank of a gloo DDP step with gradient caching: 16 rows, 2 ranks, 2 micro batches of 4 per rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist = N.D.setup_distributed("cpu")
    try:
        cfg, model, tok, items = _grad_rows(tsv, toy_root)
        net = N.D.wrap_ddp(model, dist)
        micro = [N.collate(items[(2 * a + rank) * 4:(2 * a + rank + 1) * 4], tok, cfg.max_text_len) for a in (0, 1)]
        out = _grads(model, lambda: N.accumulate(net, model, micro, cfg, dist.device, torch.float32,
                                                 N.amp.make_scaler(torch.float32), world)[0])
        torch.save(out, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        N.D.cleanup_distributed()


def test_gradient_caching_on_two_gloo_processes_equals_one_full_batch(mined, toy_root, tmp_path, spawn):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_rank_accumulate, args=(2, port, mined[0], toy_root, str(tmp_path)))
    cfg, model, tok, items = _grad_rows(mined[0], toy_root)
    full = _full_batch(cfg, model, tok, items)
    for r in range(2):  # DDP: every rank holds the global batch's gradients
        _assert_same(torch.load(tmp_path / f"grads{r}.pt"), full)


def test_training_images_ship_as_uint8_and_give_the_loss_of_float_images(mined, toy_root):
    """Issue 18.7: the training rows hold uint8 images, normalised in the step on the device; the loss equals that
    of the same crops normalised in the loader (what the step did before)."""
    cfg, model, tok, _ = _grad_rows(mined[0], toy_root, n=0)
    rows, _ = NG.filter_rows(NG.read_negclip_tsv(mined[0]), toy_root, N.ImageFolderLoader(toy_root, None))
    data = N.NegCLIPRows(rows, toy_root, model, cfg, hn_start=0)
    batches = []
    for uint8 in (True, False):
        data.tf.uint8 = uint8
        batches.append(N.collate([data[(0, 0, i)] for i in range(8)], tok, cfg.max_text_len))
    assert batches[0]["pixels"].dtype == torch.uint8 and batches[1]["pixels"].dtype == torch.float32
    with torch.no_grad():
        u8, f32 = (float(N.forward_loss(model, model, b, cfg, torch.device("cpu"), torch.float32)[0]) for b in batches)
    assert u8 == pytest.approx(f32, abs=1e-6)


# ---------------------------------------------------------------- model selection, mining space (issue 17.8)
def test_eval_after_training_uses_the_best_validation_checkpoint(mined, toy_root, tmp_path, monkeypatch, capsys):
    """Validation at steps 2 and 4, the first scoring higher: the evaluation after training (and the report) gets
    best.pt's weights (step 2), not the last; without validation, the last weights."""
    tsv, _ = mined
    scores, evaluated = iter([50.0, 40.0]), []
    monkeypatch.setattr(N.B, "eval_retrieval", lambda *a: dict(r_mean=next(scores), txt_r1=0.0, img_r1=0.0))
    monkeypatch.setattr(N, "evaluate", lambda model, *a: evaluated.append(N.trainable_state(model)) or {})
    common = ["--train_tsv", tsv, "--max_steps", 4, "--global_batch", 8, "--micro_batch", 8, "--lr", 1e-3,
              "--warmup", 1, "--report", "false"]
    res = N.main(["--mode", "train", *_args(toy_root, tmp_path / "a", *common, "--val_every", 2)])
    assert res["train/selected_step"] == 2 and res["train/best_val_r_mean"] == 50.0
    assert f"selected weights: {tmp_path / 'a' / 'best.pt'} (step 2, val r_mean 50.00)" in capsys.readouterr().out
    best, last = (N.load_checkpoint(str(tmp_path / "a" / f)) for f in ("best.pt", "last.pt"))
    assert (best["step"], last["step"]) == (2, 4)
    k = "text_projection.weight"
    assert torch.equal(evaluated[0][k], best["model"][k]) and not torch.equal(evaluated[0][k], last["model"][k])
    assert all(torch.equal(v, best["model"][n]) for n, v in evaluated[0].items())
    res = N.main(["--mode", "train", *_args(toy_root, tmp_path / "b", *common, "--val_file", "none")])
    assert res["train/selected_step"] == 4 and not (tmp_path / "b" / "best.pt").exists()
    assert "selected weights: the last (step 4; no validation checkpoint)" in capsys.readouterr().out
    last = N.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert all(torch.equal(v, last["model"][n]) for n, v in evaluated[1].items())


def test_benchmarks_score_in_fp32_where_the_run_autocasts_to_bf16(toy_root, tmp_path, monkeypatch):
    """The benchmarks' released scripts score at open_clip's default fp32; a GPU run's dtype is bf16
    (pick_dtype). --mode eval under that dtype embeds as the fp32 model does, to the last bit."""
    from PIL import Image
    monkeypatch.setattr(N.amp, "pick_dtype", lambda device, precision="auto": torch.bfloat16)
    seen = []
    monkeypatch.setattr(N.B, "run_benchmarks", lambda sc, *a, **k: seen.append(sc) or {"n": 0})
    N.main(["--mode", "eval", *_args(toy_root, tmp_path, "--benchmarks", "retrieval", "--report", "false")])
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    caps = ["a large red circle to the left of a small blue square", "a green triangle"]
    cfg = N.parse_config(N.Config, N.PRESETS, ["--toy_root", toy_root, "--mode", "eval"])
    N.resolve_paths(cfg)
    model, tok = N.load_for_eval(cfg, N.Logger(None, False))
    ref = N.scorer(model.eval(), tok, cfg, N.D.Dist(), torch.float32)  # no autocast at all
    for got, want in ((seen[0].embed_images(ims), ref.embed_images(ims)),
                      (seen[0].embed_texts(caps), ref.embed_texts(caps))):
        assert torch.equal(got, want), (got - want).abs().max()
    bf16 = N.scorer(model, tok, cfg, N.D.Dist(), torch.bfloat16).embed_images(ims)  # mining's bracket: the test can
    assert (bf16 - ref.embed_images(ims)).abs().max() > 1e-4                          # tell the two apart


def test_vlc_max_num_reaches_the_vl_checklist_cut(toy_root, tmp_path):
    """--vlc_max_num n scores the first n // 2 cases of each VL-CheckList file (the authors' MAX_NUM)."""
    files = N.B.read_vlc(os.path.join(toy_root, "vl_checklist"))
    res = N.main(["--mode", "eval", *_args(toy_root, tmp_path, "--benchmarks", "vlc", "--vlc_max_num", 6,
                                           "--report", "false")])
    assert len(files) > 1 and res["vlc/n"] == 3 * len(files) and min(map(len, files.values())) > 3


def test_a_bad_val_file_stops_training_before_any_step(mined, toy_root, tmp_path, monkeypatch):
    """--val_file is first read after an epoch: a missing file, a bad layout or no readable image stops --mode train
    before its first step, with the flag named; --val_file none trains."""
    tsv, _ = mined
    steps, accumulate = [], N.accumulate
    monkeypatch.setattr(N, "accumulate", lambda *a: steps.append(1) or accumulate(*a))
    (tmp_path / "layout.json").write_text(json.dumps([{"file": "a.png", "text": "a dog"}]))
    (tmp_path / "noimage.jsonl").write_text(json.dumps({"image": "nope.png", "captions": ["a dog"]}) + "\n")
    common = ["--train_tsv", tsv, "--max_steps", 2, "--global_batch", 8, "--micro_batch", 8,
              "--eval_after_train", "false", "--report", "false"]
    for name, error in (("missing.jsonl", "file not found"),
                        ("layout.json", "record 0: missing field 'image' or 'caption'"),
                        ("noimage.jsonl", "none of its 1 images is readable under --image_root")):
        with pytest.raises(DataError, match=rf"^--val_file: \S*{name}: {error}.*--val_file none"):
            N.main(["--mode", "train", *_args(toy_root, tmp_path / "run", *common, "--val_file", tmp_path / name)])
        assert steps == []
    N.main(["--mode", "train", *_args(toy_root, tmp_path / "run", *common, "--val_file", "none")])
    assert len(steps) == 2


def test_paper_preset_takes_no_toy_model(toy_root):
    """Outside --preset toy an empty model path is an error naming its flag, not the toy world's model (the paper
    preset's unimodal run would train against the toy BERT); the paper preset's CLIP is its hub name."""
    parse = lambda *a: N.parse_config(N.Config, N.PRESETS, ["--preset", "paper", "--toy_root", toy_root, *a])  # noqa
    assert N.resolve_paths(parse()).clip == "openai/clip-vit-base-patch32"
    with pytest.raises(ValueError, match="^--preset paper --init unimodal: pass --text "):
        N.resolve_paths(parse("--init", "unimodal", "--vision", "facebook/dinov2-large"))
    with pytest.raises(ValueError, match="^--preset paper --init clip: pass --clip "):
        N.resolve_paths(parse("--clip", ""))
    # --ckpt exempts only the modes that read it (eval, export: the checkpoint names its models)
    with pytest.raises(ValueError, match="^--preset paper --init unimodal: pass --vision "):
        N.resolve_paths(parse("--init", "unimodal", "--mode", "train", "--ckpt", "x.pt"))
    assert N.resolve_paths(parse("--init", "unimodal", "--mode", "eval", "--ckpt", "x.pt")).ckpt == "x.pt"
    cfg = N.resolve_paths(N.parse_config(N.Config, N.PRESETS, ["--toy_root", toy_root, "--init", "unimodal"]))
    assert cfg.text == os.path.join(toy_root, "models/bert")  # the toy preset: the toy world's


def test_ckpt_is_refused_where_no_mode_reads_it(toy_root):
    """Only --mode eval and export load --ckpt; train, mine and params build the --init model, so a --ckpt there
    (e.g. meant as the weights to fine-tune) is an error pointing at --resume / the model flags, not ignored."""
    for mode in ("train", "mine", "params"):
        cfg = N.parse_config(N.Config, N.PRESETS, ["--toy_root", toy_root, "--mode", mode, "--ckpt", "x.pt"])
        with pytest.raises(ValueError, match=rf"^--mode {mode} does not read --ckpt \(only eval and export do\): "
                                             + ("to continue a run, pass its checkpoint as --resume; " if
                                                mode == "train" else "") + r"the model is --init's \(--clip"):
            N.resolve_paths(cfg)


def test_choice_flags_are_checked_at_start_up(monkeypatch):
    """A flag with a fixed set of values stops main() with one line naming it and its choices, before any setup:
    --tagger spacy used to tag with the rules, --vision_pool / --text_pool typos pooled CLS / mean unasked."""
    monkeypatch.setattr(N.D, "setup_distributed", lambda *a: pytest.fail("ran past the start-up check"))
    for flag, bad, ok in (("tagger", "spacy", "auto|nltk|rule"), ("vision_pool", "avg", "cls|mean"),
                          ("text_pool", "eos", "mean|cls"), ("init", "lit", "clip|unimodal"),
                          ("precision", "bf32", "auto|fp32|bf16|fp16")):
        with pytest.raises(ValueError, match=rf"^--{flag} must be {re.escape(ok)}, got '{bad}'$"):
            N.main(["--mode", "eval", "--toy_root", "unused", f"--{flag}", bad])


def test_eval_checkpoint_reads_the_given_model_folder(toy_root, tmp_path, capsys):
    """--ckpt rebuilds the checkpoint's model from its model config, but a model folder given on the command line
    wins (a moved or copied folder); a given architecture field is the checkpoint's, named in a warning."""
    trained_from, moved = tmp_path / "clip", tmp_path / "moved" / "clip"
    shutil.copytree(os.path.join(toy_root, "models", "clip"), trained_from)
    ck = tmp_path / "x.pt"
    mc = N.dataclasses.asdict(N.ModelConfig(clip=str(trained_from)))
    save_checkpoint(str(ck), {"script": "negclip", "kind": "negclip", "step": 7, "model_config": mc,
                              "model": {"logit_scale": torch.tensor(2.5)}})
    shutil.move(trained_from, moved)  # the recorded folder is gone
    argv = ["--mode", "eval", *_args(toy_root, tmp_path / "ev", "--ckpt", ck, "--clip", moved, "--lora_r", 4,
                                     "--benchmarks", "retrieval", "--report", "false")]
    res = N.main(argv)
    out = capsys.readouterr().out
    assert "warning: the checkpoint's model fields override --lora_r\n" in out and np.isfinite(res["retrieval/r_mean"])
    assert f"checkpoint's model read from --clip {moved} (trained from {trained_from})" in out
    cfg = N.resolve_paths(N.parse_config(N.Config, N.PRESETS, argv))
    model, _ = N.load_for_eval(cfg, N.Logger(None, False), argv)
    assert (cfg.clip, cfg.lora_r, model.logit_scale.item()) == (str(moved), 0, 2.5)
    assert not any(isinstance(m, N.LoRALinear) for m in model.modules())


def test_unimodal_mining_uses_the_pooled_vision_feature(toy_root, monkeypatch):
    """--init unimodal mines neighbour images on the vision tower's pooled feature: re-drawing the random
    projection head changes no embedding (the projected one would change); --init clip: CLIP's embedding."""
    paths = [os.path.join(toy_root, r["image"]) for r in read_pairs(os.path.join(toy_root, "pairs_train.jsonl"))[:6]]
    monkeypatch.setattr(NG, "ensure_mined", lambda cfg, embed, *a: embed(paths))
    dist, log = N.D.Dist(), N.Logger(None, False)
    for init in ("unimodal", "clip"):
        cfg = N.resolve_paths(N.Config(init=init, toy_root=toy_root, eval_batch=4, tagger="rule"))
        torch.manual_seed(0)
        model, tok = N.build_model(N.model_config(cfg))
        emb = N.mine(cfg, model, tok, dist, torch.float32, log)
        x = torch.stack([N.ImageTransform(model.image_size, mean=model.image_mean, std=model.image_std)(
            load_image(p)) for p in paths])
        with torch.no_grad():
            ref = model.encode_image(x) if init == "clip" else _unit(model.pool_image(x))
            assert torch.allclose(emb, ref, atol=1e-5), init
            torch.nn.init.normal_(model.visual_projection.weight)  # a new random head
            assert torch.allclose(N.mine(cfg, model, tok, dist, torch.float32, log), emb, atol=1e-6) == (
                init == "unimodal")


def test_unimodal_mined_tsv_is_mined_again_for_another_vision_pool(toy_root, tmp_path, capsys):
    """--init unimodal mines neighbours on pool_image(), which --vision_pool changes (the tower's CLS or the mean
    of its patch tokens): a TSV mined with one pooling is reused with the same one only."""
    dist, log, mined = N.D.Dist(), N.Logger(None, True), []
    for pool in ("cls", "cls", "mean"):
        cfg = N.resolve_paths(N.Config(init="unimodal", vision_pool=pool, toy_root=toy_root, out_dir=str(tmp_path),
                                       eval_batch=64, tagger="rule"))
        torch.manual_seed(0)
        model, tok = N.build_model(N.model_config(cfg))
        mined.append(N.mine(cfg, model, tok, dist, torch.float32, log))
    assert mined[0]["rows"] > 100 and mined[1] is None  # same pooling: the cached TSV
    assert mined[2] is not None and mined[2]["rows"] == mined[0]["rows"]
    assert "vision_pool differ" in capsys.readouterr().out


def test_hub_tower_is_normalised_as_the_same_local_folder(tmp_path, monkeypatch):
    """The mean/std of a vision tower come from its preprocessor_config.json whether it is named as a local folder
    or as a hub name (google/vit-base-patch16-224-in21k's says 0.5 / 0.5, not ViT's ImageNet default); the family
    default only when the checkpoint has none.  No network: the "hub" here is the local folder."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel
    BertModel(BertConfig(vocab_size=len(WORDS) + 4, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=24)).save_pretrained(tmp_path / "bert")
    _save_tokenizer(tmp_path / "bert")
    folder, hub = tmp_path / "vit", "google/vit-base-patch16-224-in21k"
    ViTModel(ViTConfig(hidden_size=20, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=16, patch_size=8)).save_pretrained(folder)

    def download(repo_id, filename, **kw):  # the hub holds `folder`'s files
        assert repo_id == hub
        if not (folder / filename).is_file():
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(folder / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    load = N.load_tower
    monkeypatch.setattr(N, "load_tower", lambda path, *a: load(str(folder) if path == hub else path, *a))

    def stats(name):
        model, _ = N.build_model(N.Config(init="unimodal", vision=name, text=str(tmp_path / "bert"), embed_dim=8))
        return tuple(model.image_mean), tuple(model.image_std)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    assert stats(hub) == stats(str(folder)) == ((0.5,) * 3, (0.5,) * 3)
    os.remove(folder / "preprocessor_config.json")  # no processor config: the ViT family's default either way
    assert stats(hub) == stats(str(folder)) == (tuple(N.IMAGENET_MEAN), tuple(N.IMAGENET_STD))

    def offline(repo_id, filename, **kw):
        raise LocalEntryNotFoundError("not in the cache and outgoing traffic has been disabled")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)  # unknown: an error, not a guessed default
    with pytest.raises(FileNotFoundError, match=f"^{hub}: cannot read its preprocessor_config.json"):
        stats(hub)
    assert NG.processor_config(hub, meta=True) == {}  # --mode params: no network, the family default


def test_unimodal_init_clip_ft_bench_and_nonfinite(mined, toy_root, tmp_path, slowed, monkeypatch):
    tsv, _ = mined
    # CLIP-FT (--hard_negatives false), the paper's baseline: each step's batch is B images x B captions (no
    # neighbour image, no hard caption), and the checkpoint says it is one
    blocks, global_loss = [], N.global_loss
    monkeypatch.setattr(N, "global_loss", lambda i, t, s, batches, *a: blocks.extend(
        (b["blocks"], len(b["pixels"]), len(b["ids"])) for b in batches) or global_loss(i, t, s, batches, *a))
    res = N.main(["--mode", "train", *_args(toy_root, tmp_path / "ft", "--train_tsv", tsv, "--max_steps", 2,
                                            "--hard_negatives", "false", "--global_batch", 8, "--micro_batch", 8,
                                            "--val_file", "none", "--eval_after_train", "false", "--report", "false")])
    hard = [json.loads(s)["hard"] for s in open(tmp_path / "ft" / "metrics.jsonl") if '"hard"' in s]
    assert blocks == [((1, 1), 8, 8)] * 2 and hard == [0, 0] and all(np.isfinite(res["train/losses"]))
    assert N.load_checkpoint(str(tmp_path / "ft" / "last.pt"))["kind"] == "clip-ft"
    monkeypatch.setattr(N, "global_loss", global_loss)
    # uni-modal towers (toy CLIP vision + toy BERT) with fresh heads; plain CLIP loss first (--hn_start_step -1:
    # the first 10% of the schedule, here steps 0-1 of 20; the first 3 run)
    res = N.main(["--mode", "train", *_args(toy_root, tmp_path / "uni", "--init", "unimodal", "--train_tsv", tsv,
                                            "--max_steps", 20, "--stop_after", 3, "--global_batch", 8,
                                            "--micro_batch", 8, "--lr", 1e-4, "--head_lr", 1e-3,
                                            "--val_file", "none", "--eval_after_train", "false")])
    hard = [json.loads(s)["hard"] for s in open(tmp_path / "uni" / "metrics.jsonl") if '"hard"' in s]
    assert hard == [0, 0, 1] and all(np.isfinite(res["train/losses"]))
    # --bench N: timed steps, samples/s; the loader's time apart (issue 18.7): its collate, made slow by a known
    # amount, runs once per warm-up and timed micro batch, and the timed steps' data time holds its delay
    delay = 0.02
    calls = slowed(N, delay)
    b = N.main(["--mode", "train", *_args(toy_root, tmp_path / "bench", "--train_tsv", tsv, "--bench", 2,
                                          "--global_batch", 8, "--micro_batch", 8, "--max_steps", 2)])
    assert b["samples_s"] > 0 and b["bench_steps"] == 2
    assert calls == [8] * (3 + 2)  # (3 warm-up + 2 timed) x accumulation 1 (on the CPU: no FLOP count)
    assert b["ms_data"] >= 1000 * delay and b["samples_s_step"] > b["samples_s"]
    # a diverging run stops with the step and the loss terms, keeping no new checkpoint
    from common.train import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+: loss=.*i2t=.*t2i="):
        N.main(["--mode", "train", *_args(toy_root, tmp_path / "nan", "--train_tsv", tsv, "--max_steps", 6,
                                          "--global_batch", 8, "--micro_batch", 8, "--lr", 1e30, "--warmup", 0,
                                          "--val_file", "none", "--ckpt_every", 1)])
    last = N.load_checkpoint(str(tmp_path / "nan" / "last.pt"))  # the last good step's checkpoint is kept
    assert 1 <= last["step"] < 6 and all(torch.isfinite(v).all() for v in last["model"].values())


def test_bench_counts_the_images_its_timed_steps_load(mined, toy_root, tmp_path, monkeypatch):
    """--bench's samples/s counts the images the timed steps load: a row's neighbour image x' only from hn_start
    (--init unimodal: 10% in; here --hn_start_step 4, the second timed step), not 2 images a row on every step."""
    tsv, _ = mined
    seen, real = [], N.run_bench

    def spy(step_fn, n, samples, *args, data_fn, **kwargs):
        imgs = []

        def data():  # the step's micro batches, their images counted
            batches = data_fn()
            imgs.append(sum(len(b["pixels"]) for b in batches))
            return batches
        out = real(step_fn, n, samples, *args, data_fn=data, **kwargs)
        seen.append((samples, imgs))
        return out
    monkeypatch.setattr(N, "run_bench", spy)
    N.main(["--mode", "train", *_args(toy_root, tmp_path, "--train_tsv", tsv, "--bench", 2, "--global_batch", 8,
                                      "--micro_batch", 8, "--max_steps", 2, "--hn_start_step", 4)])
    [(samples, imgs)] = seen
    assert imgs == [8, 8, 8, 8, 16]  # steps 0-2 warm-up, 3-4 timed (on the CPU: no FLOP-count step); x' at 4
    assert samples == sum(imgs[3:]) / 2 == 12  # images per timed step (before: 2 x 8 on every step)


def test_teaching_edition_layout():
    """Line budget, line lengths, banners in reading order, no references to documents readers do not have;
    data/ holds the preparation and the benchmarks and imports no method script."""
    import re
    root = os.path.dirname(HERE)
    text = open(os.path.join(root, "negclip.py")).read()
    lines = text.splitlines()
    assert len(lines) <= 800 and sum(len(x) > 100 for x in lines) < 0.05 * len(lines)
    assert not re.search(r"\bspec\b", text, re.IGNORECASE)
    banners = [x[99:] for x in lines if x.startswith("# " + "=" * 96 + " ")]
    assert banners == ["Config", "Model", "Losses", "Data", "Eval", "Train", "transformers export", "main"]
    for name in ("negatives.py", "benchmarks.py"):
        code = re.sub(r'""".*?"""', "", open(os.path.join(root, "data", name)).read(), flags=re.S)
        assert not re.search(r"^\s*(from|import) (negclip|blip2_pformer|dlip|perceiver_caption|imagechat_warmup)\b",
                             code, re.M), name
        assert not re.search(r"\bspec\b", code, re.IGNORECASE), name


def test_params_mode_counts_the_paper_model_and_its_lora_and_unimodal_variants():
    paper = ["--mode", "params", "--preset", "paper"]  # meta device from common.hf's table: offline, no weights
    full = N.main(paper)
    # NegCLIP fine-tunes all of CLIP ViT-B/32: 151,277,313 parameters (open_clip docs/model_profile.csv: 151.28M)
    assert full["trainable"] == 151_277_313 and full["frozen"] == full["lora"] == 0
    lora = N.main(paper + ["--lora_r", "4"])
    # LoRA r on q/k/v/out (d x d) and fc1/fc2 (d x 4d) of the 12 blocks of each tower: r (d_in + d_out) each
    per_block = {d: 4 * 4 * (d + d) + 2 * 4 * (d + 4 * d) for d in (768, 512)}  # vision 768, text 512 wide
    assert lora["lora"] == 12 * (per_block[768] + per_block[512])
    heads = full["visual_projection_trainable"] + full["text_projection_trainable"] + 1  # + logit scale
    assert lora["trainable"] == lora["lora"] + heads
    assert lora["vision_frozen"] + lora["text_frozen"] == full["vision_trainable"] + full["text_trainable"]
    assert 0 < lora["gflops_row"] < full["gflops_row"]  # frozen towers: no weight gradients
    plain = N.main(paper + ["--hard_negatives", "false"])  # 1 image + 1 caption per row instead of 2 + 4
    assert 0 < plain["gflops_row"] < full["gflops_row"] / 2
    # towers: CLIP's vision side (87,456,000) and BERT-base without its pooler (109,482,240 - 768 x 768 - 768)
    uni = N.main(paper + ["--init", "unimodal", "--vision", "openai/clip-vit-base-patch32",
                          "--text", "bert-base-uncased", "--lock_vision", "true"])
    assert uni["vision_frozen"] == 87_456_000 and uni["text_trainable"] == 109_482_240 - 590_592
    assert uni["visual_projection_trainable"] == 768 * 512 and uni["text_projection_trainable"] == 768 * 512


def test_compile_flag_compiles_the_trained_model_once(mined, toy_root, tmp_path, monkeypatch):
    tsv, _ = mined
    seen = []  # torch.compile stays eager here: the test checks what is compiled, a GPU run the speed-up
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.append(module) or module)
    b = N.main(["--mode", "train", *_args(toy_root, tmp_path / "c", "--train_tsv", tsv, "--bench", 2, "--compile",
                                          "true", "--global_batch", 8, "--micro_batch", 8, "--max_steps", 2)])
    assert b["bench_steps"] == 2 and len(seen) == 1 and isinstance(seen[0], N.DualEncoder)


# ---------------------------------------------------------------- training from webdataset shards (issue 20.2)
@pytest.fixture(scope="module")
def shards(toy_root, tmp_path_factory):
    from data.toy import write_shards
    return write_shards(toy_root, out_dir=str(tmp_path_factory.mktemp("shards")))


def test_a_missing_hard_caption_takes_no_part_in_the_loss(toy_root):
    """A streamed caption without a swap (n = None): an empty text whose column is masked, so the loss equals
    NegCLIP's over the other columns.  At the toy CLIP's trained scale (~15) the empty text's logits can sit
    12 below the rest, so its column would change the loss by only 4e-6 (seed 5's world): the test sets the
    scale to 1, where every column moves the loss by more than 0.01 and a missing mask cannot go unseen."""
    cfg = N.Config(clip=os.path.join(toy_root, "models", "clip"), max_text_len=32)
    model, tok = N.build_model(cfg)
    model.logit_scale.data.zero_()  # scale exp(0) = 1: logits in [-1, 1]
    torch.manual_seed(0)
    items = [{"x": torch.randn(3, 64, 64), "t": t, "n": n, "img_id": k, "hard": True, "step": 0, "tried": (),
              "bad": ()} for k, (t, n) in enumerate([("a red circle", "a circle red"), ("a blue square", None)])]
    batch = N.collate(items, tok, 32)
    assert batch["blocks"] == (1, 2) and batch["txt_ids"].tolist() == [0, 1, -1, -2]
    with torch.no_grad():
        loss = N.forward_loss(model.eval(), model, batch, cfg, torch.device("cpu"), torch.float32)[0]
        img, txt, scale = model(batch["pixels"], batch["ids"], batch["mask"])
        keep = N.negclip_loss(img, txt[:3], scale)[0]  # without the empty text's column
        assert (N.negclip_loss(img, txt, scale)[0] - keep).abs() > 0.01  # the column would count
    assert torch.allclose(loss, keep, atol=1e-6)


def test_captions_padded_to_the_longest_give_the_loss_of_padding_to_77(toy_root):
    """Issue 19.2: collate pads to the batch's longest caption; under the toy CLIP's causal mask and EOS pooling
    the loss and gradients equal those of padding every caption to max_text_len (what the step did before)."""
    cfg = N.Config(clip=os.path.join(toy_root, "models", "clip"), max_text_len=40)  # toy CLIP: 48 positions
    model, tok = N.build_model(cfg)
    torch.manual_seed(0)
    items = [{"x": torch.randn(3, 64, 64), "t": t, "n": n, "img_id": k, "hard": True, "step": 0, "tried": (),
              "bad": ()} for k, (t, n) in enumerate([("a red circle", "a circle red"),
                                                     ("a small blue square left of a big circle", "a blue")])]
    short = N.collate(items, tok, cfg.max_text_len)
    full = tok([it[k] for k in ("t", "n") for it in items], padding="max_length", max_length=cfg.max_text_len,
               truncation=True, return_tensors="pt")
    longest = dict(short, ids=full["input_ids"], mask=full["attention_mask"])
    assert short["ids"].shape[1] < longest["ids"].shape[1] == cfg.max_text_len
    out = []
    for batch in (short, longest):
        model.zero_grad(set_to_none=True)
        loss = N.forward_loss(model.eval(), model, batch, cfg, torch.device("cpu"), torch.float32)[0]
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)  # the same sums, another order (1.2e-6 on seed 2)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out[0][1], out[1][1]))


def test_train_from_shards_and_resume_exactly(shards, toy_root, tmp_path, capsys):
    """--train_shards: hard captions drawn per sample in the loader workers, no neighbour images; a resume
    continues the stream exactly (the same losses as an unbroken run)."""
    common = ["--train_shards", shards, "--max_steps", 4, "--global_batch", 8, "--micro_batch", 4, "--lr", 1e-4,
              "--warmup", 1, "--workers", 2, "--val_file", "none", "--eval_after_train", "false"]
    res = N.main(["--mode", "train", *_args(toy_root, tmp_path / "a", *common)])
    out = capsys.readouterr().out
    n = sum(len(r["captions"]) for r in read_pairs(os.path.join(toy_root, "pairs_train.jsonl")))  # one per caption
    assert f"train: {n} samples in {shards}: hard captions drawn per sample" in out and "[x] x [t; n]" in out
    assert not (tmp_path / "a" / "train_neg_clip.tsv").exists()  # nothing mined
    hard = [json.loads(s)["hard"] for s in open(tmp_path / "a" / "metrics.jsonl") if '"hard"' in s]
    assert hard == [1, 1, 1, 1] and all(np.isfinite(res["train/losses"])) and res["train/unreadable_images"] == 0
    N.main(["--mode", "train", *_args(toy_root, tmp_path / "b", *common, "--stop_after", 2)])
    ck = N.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert ck["stream"]["batches"] == 4 and ck["stream"]["n_slots"] == 2
    N.main(["--mode", "train", *_args(toy_root, tmp_path / "c", *common, "--resume", tmp_path / "b" / "last.pt")])
    a, b, c = _losses(tmp_path / "a"), _losses(tmp_path / "b"), _losses(tmp_path / "c")
    assert len(a) == 4 and b == a[:2] and np.allclose(c, a[2:], rtol=0, atol=1e-6), (a, b, c)


def _rank_shard_run(rank, world, port, argv, out_dir):
    """One rank of a gloo run of negclip.main; records the keys of the samples each of its micro batches held."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    keys, global_loss = [], N.global_loss  # the loss of each step sees all its micro batches
    N.global_loss = lambda i, t, s, batches, *a: keys.extend(list(b["keys"]) for b in batches) or global_loss(
        i, t, s, batches, *a)
    N.main(argv)
    with open(os.path.join(out_dir, f"keys{rank}.json"), "w") as f:
        json.dump(keys, f)


def test_two_process_gloo_from_shards_ranks_see_disjoint_samples(shards, toy_root, tmp_path, spawn):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--mode", "train", *_args(toy_root, tmp_path / "two", "--train_shards", shards, "--max_steps", 2,
                                      "--global_batch", 8, "--micro_batch", 2, "--lr", 1e-4, "--val_file", "none",
                                      "--eval_after_train", "false", "--report", "false")]
    spawn(_rank_shard_run, args=(2, port, argv, str(tmp_path)))
    keys = [json.load(open(tmp_path / f"keys{r}.json")) for r in range(2)]
    assert [len(k) for k in keys] == [4, 4] and all(len(b) == 2 for k in keys for b in k)  # 2 steps x accum 2
    seen = [{x for b in k for x in b} for k in keys]
    assert len(seen[0]) == len(seen[1]) == 8 and not seen[0] & seen[1]
    assert len(_losses(tmp_path / "two")) == 2
    assert N.load_checkpoint(str(tmp_path / "two" / "last.pt"))["stream"]["n_slots"] == 2  # both ranks' states


def test_open_clip_checkpoint_converts_to_a_clip_folder_with_open_clips_own_features(toy_root, tmp_path):
    """data/openclip_to_hf.py: an open_clip training checkpoint (NegCLIP's fork saves {"epoch", "name",
    "state_dict": DDP's "module." names}) of a tiny ViT CLIP (tests/fixtures/openclip, made by open_clip 2.24)
    becomes a CLIPModel folder (with open_clip's image preprocessing) whose image and text features equal
    open_clip's, under QuickGELU and GELU each (the wrong one is off by 1e-2: sugar-crepe #7); negclip.py evaluates
    the folder; other layouts stop in one line."""
    from transformers import CLIPModel
    import data.openclip_to_hf as C
    fix = os.path.join(os.path.dirname(__file__), "fixtures", "openclip")
    want, ckpt = json.load(open(os.path.join(fix, "features.json"))), os.path.join(fix, "epoch_1.pt")
    pixels = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16).mul(0.37).sin()
    ids, tok = torch.tensor(want["ids"]), os.path.join(toy_root, "models", "clip")
    for act, other in (("quick_gelu", "gelu"), ("gelu", "quick_gelu")):
        C.main([ckpt, "--out", str(tmp_path / act), "--tokenizer", tok, "--act", act, "--head_width", "4"])
        m = CLIPModel.from_pretrained(str(tmp_path / act)).eval()
        with torch.no_grad():
            v = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)  # (2, 4)
            t = m.text_projection(m.text_model(input_ids=ids).pooler_output)  # (2, 4)
        for got, key in ((v, "image"), (t, "text")):
            torch.testing.assert_close(got, torch.tensor(want[act][key]), atol=1e-5, rtol=1e-5)
            assert (got - torch.tensor(want[other][key])).abs().max() > 1e-3
    proc = json.load(open(tmp_path / "gelu" / "preprocessor_config.json"))  # open_clip's preprocessing, 16 px
    assert proc["size"] == {"shortest_edge": 16} and proc["crop_size"] == {"height": 16, "width": 16}
    assert proc["resample"] == 3 and (tuple(proc["image_mean"]), tuple(proc["image_std"])) == (N.CLIP_MEAN, N.CLIP_STD)
    cfg = N.parse_config(N.Config, N.PRESETS, ["--clip", str(tmp_path / "quick_gelu")])
    dual, _ = N.build_model(N.model_config(cfg))  # what negclip.py trains and scores: open_clip's embeddings
    assert (dual.image_size, dual.image_mean, dual.image_std) == (16, N.CLIP_MEAN, N.CLIP_STD)
    with torch.no_grad():
        got = (dual.eval().encode_image(pixels), dual.encode_text(ids, (ids > 0).long()))
    for g, key in zip(got, ("image", "text")):
        torch.testing.assert_close(g, torch.nn.functional.normalize(torch.tensor(want["quick_gelu"][key]), dim=-1),
                                   atol=1e-5, rtol=0)
    ev = N.main(["--mode", "eval", *_args(toy_root, tmp_path / "ev", "--clip", tmp_path / "quick_gelu",
                                          "--benchmarks", "retrieval", "--max_text_len", 8, "--report", "false")])
    assert 0 <= ev["retrieval/r_mean"] <= 100
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    for edit, match in (({"module.visual.layer1.0.conv1.weight": torch.zeros(1)}, "a ResNet CLIP"),
                        ({"module.visual.extra.weight": torch.zeros(1)}, r"1 tensors .*'visual.extra.weight'")):
        torch.save({**sd, **edit}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=match):
            C.main([str(tmp_path / "bad.pt"), "--out", str(tmp_path / "bad"), "--tokenizer", tok, "--head_width", "4"])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text.pt: not a state dict torch.load\(weights_only=True\) reads"):
        C.main([str(tmp_path / "text.pt"), "--out", str(tmp_path / "bad"), "--tokenizer", tok])
