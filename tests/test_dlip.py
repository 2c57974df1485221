"""dlip.py: transformers equivalence, losses, momentum/queues, every mode on the tiny toy world, resume, 2-process DDP."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dlip

SPECIAL = dict(enc_id=99, dec_id=98, sep_id=2, pad_id=0, cls_id=1, vocab_size=100)


# ------------------------------------------------------------------ transformers BLIP folders (random, tiny)
def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _hf_config(text_width=48):
    from transformers import BlipConfig
    return BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, layer_norm_eps=1e-5),
        text_config=dict(vocab_size=100, hidden_size=text_width, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, bos_token_id=98, sep_token_id=2, pad_token_id=0, eos_token_id=2),
        image_text_hidden_size=16)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval
    root = tmp_path_factory.mktemp("hf_blip")
    ret, cap = BlipForImageTextRetrieval(_hf_config()), BlipForConditionalGeneration(_hf_config())
    _randomize(ret, 0)
    _randomize(cap, 1)
    cap.text_decoder.cls.predictions.decoder.weight = cap.text_decoder.bert.embeddings.word_embeddings.weight
    ret.save_pretrained(root / "ret")
    cap.save_pretrained(root / "cap")
    return str(root / "ret"), str(root / "cap")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(3, 97, (3, 7), generator=g)
    ids[:, 0] = SPECIAL["cls_id"]
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding in one row
    ids[1, 5:] = 0
    return image, ids, mask


def test_hf_retrieval_teacher_equivalence(hf_folders):
    """ITM scores and ITC similarities of a transformers BlipForImageTextRetrieval loaded into dlip.BLIP (fp32)."""
    from transformers import BlipForImageTextRetrieval
    hf = BlipForImageTextRetrieval.from_pretrained(hf_folders[0]).eval()
    ours = dlip.load_hf_blip(hf_folders[0], SPECIAL).eval()
    image, ids, mask = _inputs()
    with torch.no_grad():
        enc_ids = dlip.with_first(ids, SPECIAL["enc_id"])  # BLIP's ITM input ([ENC] first) fed to both
        itm_hf = hf(input_ids=enc_ids, pixel_values=image, attention_mask=mask, use_itm_head=True).itm_score
        itm_ours = ours.itm_logits(ids, mask, ours.visual_encoder(image))
        itc_hf = hf(input_ids=ids, pixel_values=image, attention_mask=mask, use_itm_head=False).itm_score
        itc_ours = ours.image_features(image)[1] @ ours.text_features(ids, mask)[1].T
    assert itm_hf.abs().max() > 0.1 and itc_hf.std() > 0.05  # not a degenerate comparison
    torch.testing.assert_close(itm_ours, itm_hf, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(itc_ours, itc_hf, atol=1e-4, rtol=1e-4)


def test_hf_caption_teacher_equivalence(hf_folders):
    """Decoder logits (with padding) and greedy / beam-3 decoding of a transformers BlipForConditionalGeneration."""
    from transformers import BlipForConditionalGeneration
    hf = BlipForConditionalGeneration.from_pretrained(hf_folders[1]).eval()
    ours = dlip.load_hf_blip(hf_folders[1], SPECIAL).eval()
    image, ids, mask = _inputs(1)
    with torch.no_grad():
        dec_ids = dlip.with_first(ids, SPECIAL["dec_id"])
        z_hf = hf(pixel_values=image, input_ids=dec_ids, attention_mask=mask).logits
        z_ours = ours.decode(ids, mask, ours.visual_encoder(image))[0]
        keep = mask.bool()
        torch.testing.assert_close(z_ours[keep], z_hf[keep], atol=1e-4, rtol=1e-4)
        prompt, emb = ids[:, :3], ours.visual_encoder(image)
        for eos_bias in (0.0, 1.2):  # 1.2 makes EOS likely mid-sequence: exercises the finished-beam pool
            hf_bias, our_bias = hf.text_decoder.cls.predictions, ours.text_decoder.cls.predictions
            for b in {id(hf_bias.bias): hf_bias.bias, id(hf_bias.decoder.bias): hf_bias.decoder.bias}.values():
                b[2] += eos_bias
            our_bias.bias[2] += eos_bias
            for beams in (1, 3):
                ref = hf.generate(pixel_values=image, input_ids=torch.cat([prompt, prompt[:, :1]], 1),
                                  num_beams=beams, max_length=12, min_length=5, do_sample=False)
                got = dlip.greedy_decode(ours, emb, prompt, 12, 5, 2) if beams == 1 else \
                    dlip.beam_search(ours, emb, prompt, 3, 12, 5, 2)
                assert _until_eos(got[:, 1:]) == _until_eos(ref[:, 1:]), (eos_bias, beams, got, ref)


def _until_eos(seqs, eos=2):
    out = []
    for row in seqs.tolist():
        out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def test_teacher_load_is_strict(hf_folders, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(hf_folders[0], bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd.pop("text_encoder.encoder.layer.1.output.dense.weight")
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        dlip.load_hf_blip(str(bad), SPECIAL)


def test_student_image_encoder_init_from_hf_vit_and_clip(tmp_path):
    """--init_vit: an HF ViT (DeiT, the paper's student init) and a CLIP vision tower (the toy world's) give the
    same image features in dlip's ViT as in transformers."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel
    x = torch.randn(2, 3, 32, 32)
    for name, hf in (("vit", ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, image_size=32, patch_size=8),
                                       add_pooling_layer=False)),
                     ("clip", CLIPVisionModel(CLIPVisionConfig(hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=4, intermediate_size=64,
                                                               image_size=32, patch_size=8)))):
        _randomize(hf, 3)
        hf.eval().save_pretrained(tmp_path / name)
        shape = _shape(width=32, momentum=False)
        shape.update(dlip.vit_init_shape(str(tmp_path / name)))
        ours = dlip.BLIP(shape).eval()
        dlip.init_from_hf_vit(ours, str(tmp_path / name))
        with torch.no_grad():
            got, out = ours.visual_encoder(x), hf(pixel_values=x)
        ref = out.last_hidden_state if name == "vit" else out.pooler_output[:, None]
        torch.testing.assert_close(got[:, :ref.shape[1]], ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ losses, momentum and queues (no toy world)
def _shape(width=32, layers=2, heads=4, queue=16, **kw):
    s = dict(image_size=32, patch_size=8, vit_width=width, vit_layers=layers, vit_heads=heads, vit_mlp=2 * width,
             vit_eps=1e-6, text_width=width, text_layers=layers, text_heads=heads, text_ffn=2 * width,
             text_eps=1e-12, vocab_size=100, max_pos=64, embed_dim=16, dropout=0.0, has_encoder=True,
             has_decoder=True, tie_decoder=True, momentum=True, queue_size=queue, ema=0.9, grad_ckpt=False,
             **{k: v for k, v in SPECIAL.items() if k != "vocab_size"})
    s.update(kw)
    return s


def test_distillation_losses_zero_for_identical_models_and_ignore_padding():
    torch.manual_seed(0)
    a = torch.randn(4, 16)
    assert dlip.rep_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)  # cosine: scale-free
    assert dlip.rep_loss(a, -a).item() == pytest.approx(2.0, abs=1e-5)
    z = torch.randn(2, 6, 100)
    labels = torch.randint(0, 100, (2, 6))
    labels[1, 4:] = -100
    assert dlip.lm_kd_loss(z, z, labels).item() == pytest.approx(0.0, abs=1e-6)
    z2 = z.clone()
    z2[1, 3:] = torch.randn(3, 100)  # positions 3.. of row 1 predict labels 4.. = -100: ignored
    assert dlip.lm_kd_loss(z2, z, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert dlip.lm_kd_loss(torch.randn(2, 6, 100), z, labels).item() > 0.1
    A = torch.randn(2, 4, 6, 6).softmax(-1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    assert dlip.attn_kd_loss(A, A, mask).item() == pytest.approx(0.0, abs=1e-6)
    B = A.clone()
    B[0, :, 4:] = torch.randn(4, 2, 6).softmax(-1)  # padded query rows differ: not counted
    assert dlip.attn_kd_loss(A, B, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert dlip.attn_kd_loss(A, torch.randn(2, 2, 6, 6).softmax(-1), mask).item() > 0  # head counts differ


def test_hard_negatives_vectorised_never_positive_and_nan_safe():
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 0, 1, 2, 3, 3])
    same = idx[:, None] == idx[None, :]
    sim = torch.randn(6, 6, generator=g)
    sim[0, 1] = 100.0  # the most similar column is a positive (same image): must never be drawn
    draws = torch.stack([dlip.sample_hard_negatives(sim, same, g) for _ in range(200)])  # (200, 6)
    assert not same[torch.arange(6)[None].expand(200, -1), draws].any()
    assert len(set(draws[:, 2].tolist())) > 2  # it samples, not argmax
    sim[2, 3], sim[3, 2], sim[4, 0] = float("nan"), float("inf"), -float("inf")  # AMP overflow must not crash
    assert dlip.sample_hard_negatives(sim, same, g).shape == (6,)
    t = dlip.itc_targets(same, sim.nan_to_num(0, 50, -50), 0.4)
    torch.testing.assert_close(t.sum(1), torch.ones(6))


def test_itc_shortlist_itm_rerank_by_hand():
    """Top-k by ITC, re-scored by ITM logit + ITC sim (BLIP's evaluation); hand-computed."""
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    out = dlip.rerank_scores(sim, lambda r, cols: cols.float() * 10 + r, k=2, rows=[0, 1])
    assert out[0][0].tolist() == [0, 2] and torch.allclose(out[0][1], torch.tensor([0.9, 20.5]))
    assert out[1][0].tolist() == [1, 2] and torch.allclose(out[1][1], torch.tensor([11.8, 21.3]))


def test_momentum_update_and_queue():
    torch.manual_seed(0)
    m = dlip.BLIP(_shape(queue=8))
    with torch.no_grad():
        for p in m.visual_encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.momentum_update()
    after = m.state_dict()
    for k in after:
        if "_m." in k:
            online = before[k.replace("_m.", ".", 1)]
            torch.testing.assert_close(after[k], 0.9 * before[k] + 0.1 * online)
        else:
            assert torch.equal(after[k], before[k]), k  # only the momentum copies change
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("visual_encoder_m."))
    f1, f2 = F.normalize(torch.randn(4, 16), dim=1), F.normalize(torch.randn(4, 16), dim=1)
    m.enqueue(f1, f2, torch.arange(4))
    assert int(m.queue_ptr) == 4 and torch.equal(m.image_queue[:, :4], f1.T) and torch.equal(m.idx_queue[:4],
                                                                                             torch.arange(4))
    m.enqueue(f2, f1, torch.arange(4, 8))
    m.enqueue(f1, f1, torch.arange(8, 12))  # wraps around
    assert int(m.queue_ptr) == 4 and torch.equal(m.text_queue[:, :4], f1.T) and torch.equal(m.text_queue[:, 4:],
                                                                                            f1.T)
    with pytest.raises(AssertionError, match="divisible"):
        m.enqueue(f1[:3], f1[:3], torch.arange(3))


def test_decoder_shares_parameters_with_encoder():
    m = dlip.BLIP(_shape())
    enc, dec = m.text_encoder, m.text_decoder.bert
    assert dec.embeddings is enc.embeddings
    for le, ld in zip(enc.encoder.layer, dec.encoder.layer):
        assert ld.crossattention.self.query.weight is le.crossattention.self.query.weight
        assert ld.output.dense.weight is le.output.dense.weight and ld.intermediate is le.intermediate
        assert ld.attention.self.query.weight is not le.attention.self.query.weight  # own causal self-attention
    assert m.text_decoder.bert.embeddings.word_embeddings.weight is m.text_encoder.embeddings.word_embeddings.weight


def _batch(B=4, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.randint(5, 97, (B, L), generator=g)
    ids[:, 0] = SPECIAL["cls_id"]
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    ids[0, 5:] = 0
    ids[0, 4] = ids[1, 4] = SPECIAL["sep_id"]
    return image, ids, mask, torch.tensor([0, 1, 2, 2])[:B]


def _kd_w():
    return {"itc_kd": 1, "rep_img": 1, "rep_txt": 1, "rep_fus": 1, "rep_dec": 1, "lm_kd": 1, "attn_sa": 1,
            "attn_ca": 1, "attn_dec": 1, "itm_kd": 1, "itc_kd_kind": "v2"}


def test_pretrain_step_teacher_frozen_and_self_distillation_zero():
    torch.manual_seed(0)
    teacher = dlip.BLIP(_shape(width=48, heads=4, momentum=False)).requires_grad_(False).eval()
    student = dlip.BLIP(_shape(width=32, heads=2))
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    image, ids, mask, idx = _batch()
    t = dlip.teacher_outputs(teacher, teacher, image, ids, mask, _kd_w())
    terms = student(image, ids, mask, idx, alpha=0.4, sample_seed=1, teacher=t, w=_kd_w())
    assert set(terms) == {"itc", "itm", "lm", *[k for k in _kd_w() if k != "itc_kd_kind"]}
    assert all(torch.isfinite(v) for v in terms.values())
    # spec 9: initial ITM ~ 0.64 (label prior 1/3 : 2/3), LM ~ ln(V) with random heads
    assert abs(terms["lm"].item() - torch.log(torch.tensor(100.0)).item()) < 1.0
    assert 0.4 < terms["itm"].item() < 0.9
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing  # no unused parameters (DDP without find_unused_parameters)
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())

    # the teacher distilled into an exact copy of itself: every representation/logit/attention term is 0
    twin = dlip.BLIP(dict(teacher.s, momentum=True, queue_size=16))
    twin.load_state_dict(teacher.state_dict(), strict=False)
    twin.eval()
    terms = twin(image, ids, mask, idx, sample_seed=1, teacher=t, w=_kd_w())
    for k in ("rep_img", "rep_txt", "rep_fus", "rep_dec", "lm_kd", "attn_sa", "attn_ca", "attn_dec", "itm_kd"):
        assert terms[k].item() == pytest.approx(0.0, abs=1e-5), k


def test_paper_style_rep_loss_pairs_layers_masks_padding_and_is_zero_for_a_twin():
    assert dlip.rep_pairs(2, 4, "uniform") == [(0, 1), (1, 3)] and dlip.rep_pairs(2, 4, "last") == [(1, 3)]
    assert dlip.rep_pairs(4, 2, "uniform") == [(0, 0), (1, 0), (2, 1), (3, 1)]
    with pytest.raises(ValueError, match="rep_layers"):
        dlip.rep_pairs(2, 4, "every")
    torch.manual_seed(0)
    maps = torch.nn.ModuleList([torch.nn.Linear(8, 12)])
    hs, ht = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    ref = dlip.rep_mse_loss(maps, [hs], [ht], mask)
    hs2 = hs.clone()
    hs2[1, 3:] = 100.0  # padded positions differ: not counted
    assert dlip.rep_mse_loss(maps, [hs2], [ht], mask).item() == pytest.approx(ref.item(), rel=1e-6)
    by_hand = ((maps[0](hs) - ht).pow(2).mean(-1) * mask).sum() / mask.sum()
    assert ref.item() == pytest.approx(by_hand.item(), rel=1e-6)

    # a student that is the teacher's exact copy, with identity maps, has every mse term at 0; its maps get gradients
    teacher = dlip.BLIP(_shape(width=32, layers=2, momentum=False)).requires_grad_(False).eval()
    twin = dlip.BLIP(dict(teacher.s, momentum=True, queue_size=16))
    twin.load_state_dict(teacher.state_dict(), strict=False)
    twin.eval()
    w = dict(_kd_w(), rep_kind="mse")
    twin.add_rep_maps(teacher.s, teacher.s, "uniform", w)
    assert set(twin.rep_maps) == {"img", "txt", "fus", "dec"} and len(twin.rep_maps["txt"]) == 2
    with torch.no_grad():
        for m in twin.rep_maps.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.eye(32))
                m.bias.zero_()
    image, ids, mask, idx = _batch()
    t = dlip.teacher_outputs(teacher, teacher, image, ids, mask, w)
    assert len(t["img_layers"]) == 2 and t["img_layers"][0].shape == (4, 32) and t["txt_layers"][0].shape == (4, 8, 32)
    terms = twin(image, ids, mask, idx, sample_seed=1, teacher=t, w=w)
    for k in ("rep_img", "rep_txt", "rep_fus", "rep_dec"):
        assert terms[k].item() == pytest.approx(0.0, abs=1e-8), k
    student = dlip.BLIP(_shape(width=16, layers=1, heads=2))
    student.add_rep_maps(teacher.s, teacher.s, "uniform", w)  # 1 student layer -> teacher layer 2
    terms = student(image, ids, mask, idx, sample_seed=1, teacher=t, w=w)
    assert all(terms[k].item() > 0 for k in ("rep_img", "rep_txt", "rep_fus", "rep_dec"))
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.rep_maps.parameters())


# ------------------------------------------------------------------ every mode through main() on the tiny toy world
TINY = ["--image_size", "32", "--patch_size", "8", "--vit_layers", "1", "--text_layers", "1", "--vit_heads", "2",
        "--text_heads", "2", "--global_batch", "8", "--micro_batch", "8", "--queue_size", "16", "--max_len", "16",
        "--log_every", "1", "--eval_batch", "16", "--max_eval_images", "8", "--k_test", "4", "--num_beams", "2",
        "--gen_max_len", "8", "--gen_min_len", "3", "--warmup_steps", "0", "--lr_decay", "1", "--device", "cpu",
        "--init_vit", "", "--init_text", ""]


def _width(w):
    return ["--vit_width", str(w), "--vit_mlp", str(2 * w), "--text_width", str(w), "--text_ffn", str(2 * w)]


@pytest.fixture(scope="module")
def world(toy_root, tmp_path_factory):
    """The tiny world plus a training file of its first 8 images (one global batch: the losses must fall)."""
    import json
    d = tmp_path_factory.mktemp("dlip")
    with open(os.path.join(toy_root, "pairs_train.jsonl")) as f:
        recs = [json.loads(line) for line in f][:8]
    small = d / "pairs8.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = ["--toy_root", toy_root, "--image_root", toy_root, "--tokenizer", os.path.join(toy_root, "models", "bert"),
            "--train_files", str(small)]
    return d, base, toy_root


@pytest.fixture(scope="module")
def teacher_ckpt(world):
    d, base, root = world
    out = str(d / "teacher")
    # widths of the tiny world's CLIP and BERT, which initialise it (--init_vit/--init_text of the preset)
    m = dlip.main(["--preset", "toy_teacher", *base, *TINY, *_width(64), "--vit_mlp", "256", "--text_ffn", "256",
                   "--init_vit", "toy:models/clip", "--init_text", "toy:models/bert", "--teacher", "",
                   "--max_steps", "4", "--lr", "1e-3", "--out_dir", out,
                   "--val_file", os.path.join(root, "pairs_val.jsonl")])
    for k in ("final_itc", "final_itm", "final_lm", "val_itc_txt_r1", "val_txt_r1", "val_CIDEr"):
        assert k in m, k
    return os.path.join(out, "last.pt")


@pytest.fixture(scope="module")
def student_run(world, teacher_ckpt):
    d, base, _ = world
    out = str(d / "student")
    m = dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--max_steps", "12",
                   "--lr", "2e-3", "--w_itm_kd", "1", "--out_dir", out])
    return out, m


def test_pretrain_distillation_every_term_logged_and_falls(student_run):
    import json
    out, m = student_run
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    terms = ["itc", "itm", "lm", "itc_kd", "rep_img", "rep_txt", "rep_fus", "rep_dec", "lm_kd", "attn_sa", "attn_ca",
             "attn_dec", "itm_kd"]
    for k in terms + ["lr", "grad_norm", "ms_step", "samples_s"]:
        assert k in rows[0], k
    first = {k: sum(r[k] for r in rows[:3]) / 3 for k in terms + ["loss"]}
    last = {k: sum(r[k] for r in rows[-3:]) / 3 for k in terms + ["loss"]}
    assert last["loss"] < 0.9 * first["loss"], (first, last)  # (ITC needs ~50 steps to leave its plateau)
    for k in ("lm", "rep_img", "rep_txt", "rep_fus", "rep_dec"):
        assert last[k] < first[k], (k, first[k], last[k])
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ck["step"] == 12 and ck["config"]["teacher"].endswith("last.pt") and "optimizer" in ck
    assert os.path.isfile(os.path.join(out, "config.json"))


def test_pretrain_with_paper_style_rep_loss(world, teacher_ckpt):
    import json
    d, base, _ = world
    out = str(d / "student_mse")
    dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--max_steps", "12",
               "--lr", "2e-3", "--rep_loss", "mse", "--rep_layers", "uniform", "--out_dir", out])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    for k in ("rep_img", "rep_txt", "rep_fus", "rep_dec"):
        first, last = sum(r[k] for r in rows[:3]) / 3, sum(r[k] for r in rows[-3:]) / 3
        assert last < first, (k, first, last)
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert any(k.startswith("rep_maps.img.0.") for k in ck["model"])  # saved for --resume
    ret = dlip.main(["--mode", "retrieval", *base, *TINY, "--init", os.path.join(out, "last.pt"), "--max_steps", "1",
                     "--out_dir", str(d / "mse_ret")])
    assert ret["final_itc"] > 0
    ft = torch.load(os.path.join(d, "mse_ret", "last.pt"), weights_only=True)
    assert not any(k.startswith("rep_maps.") for k in ft["model"])  # fine-tuning leaves the maps behind


def test_finetune_modes_and_eval(world, student_run, teacher_ckpt):
    import json
    d, base, root = world
    ckpt = os.path.join(student_run[0], "last.pt")
    test = ["--test_file", os.path.join(root, "pairs_test.jsonl")]
    r = dlip.main(["--mode", "retrieval", *base, *TINY, "--init", ckpt, "--max_steps", "2", *test,
                   "--out_dir", str(d / "ret")])
    for k in ("itc_txt_r1", "itc_img_r1", "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
        assert 0 <= r[f"test_{k}"] <= 100, k
    c = dlip.main(["--mode", "caption", *base, *TINY, "--init", ckpt, "--max_steps", "2", *test,
                   "--out_dir", str(d / "cap")])
    assert c["first_lm"] > 0 and {"test_BLEU-4", "test_CIDEr"} <= set(c)
    res = json.load(open(d / "cap" / "captions_test.json"))
    assert len(res) == 8 and {"image_id", "caption"} <= set(res[0])
    # the caption model keeps its prompt and eval mode decodes with it
    assert torch.load(d / "cap" / "last.pt", weights_only=True)["shape"]["prompt"] == "a picture of "
    e = dlip.main(["--mode", "eval", "--task", "all", *base, *TINY, "--ckpt", ckpt, "--teacher", teacher_ckpt,
                   *test, "--out_dir", str(d / "eval")])
    assert 0 < e["student_param_ratio_retrieval"] < 1 and e["student_gflops_retrieval"] < e["teacher_gflops_retrieval"]
    assert e["teacher_images_s"] > 0 and "test_txt_r1" in e and "test_CIDEr" in e


def test_caption_fine_tuning_distils_a_teacher_decoder(world, student_run, teacher_ckpt):
    """--ft_distill: caption fine-tuning also matches a frozen teacher decoder (logit KL and last-layer decoder
    attention KL on the prompted caption). Against itself both terms are 0; against the teacher they fall."""
    import json
    d, base, _ = world
    dlip.main(["--mode", "caption", *base, *TINY, "--init", teacher_ckpt, "--max_steps", "2",
               "--out_dir", str(d / "t_cap")])
    t_cap = str(d / "t_cap" / "last.pt")
    same = dlip.main(["--mode", "caption", *base, *TINY, "--init", t_cap, "--ft_distill", "true", "--teacher", t_cap,
                      "--max_steps", "1", "--out_dir", str(d / "self_kd")])
    assert abs(same["first_lm_kd"]) < 1e-6 and abs(same["first_attn_dec"]) < 1e-6, same
    dlip.main(["--mode", "caption", *base, *TINY, "--init", os.path.join(student_run[0], "last.pt"),
               "--ft_distill", "true", "--teacher", t_cap, "--max_steps", "10", "--lr", "2e-3",
               "--out_dir", str(d / "ft_kd")])
    rows = [json.loads(line) for line in open(d / "ft_kd" / "metrics.jsonl")]
    for k in ("lm", "lm_kd", "attn_dec"):
        first, last = sum(r[k] for r in rows[:3]) / 3, sum(r[k] for r in rows[-3:]) / 3
        assert last < first, (k, first, last)
    with pytest.raises(ValueError, match="ft_distill"):
        dlip.main(["--mode", "retrieval", *base, *TINY, "--init", os.path.join(student_run[0], "last.pt"),
                   "--ft_distill", "true", "--max_steps", "1",
                   "--out_dir", str(d / "ret_kd")])


def test_resume_continues_exactly(world, teacher_ckpt):
    d, base, _ = world
    args = ["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--lr", "1e-3",
            "--dropout", "0.1"]
    full = dlip.main([*args, "--max_steps", "4", "--out_dir", str(d / "full")])
    dlip.main([*args, "--max_steps", "2", "--out_dir", str(d / "half")])
    resumed = dlip.main([*args, "--max_steps", "4", "--resume", str(d / "half" / "last.pt"),
                         "--out_dir", str(d / "half")])
    for k in ("final_loss", "final_itc", "final_itm", "final_lm_kd", "final_attn_ca"):
        assert resumed[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k


def test_two_process_gloo_matches_one_process(world, teacher_ckpt):
    """Global batch 8 as 1 x 8 and as 2 ranks x 4: ITC candidates are the gathered global batch, hard negatives are
    drawn from the global batch with a step-seeded generator, token-averaged losses divide by the global token
    count -- so the losses and the updated weights must agree."""
    import json
    d, base, _ = world
    args = ["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--max_steps", "2",
            "--lr", "1e-3", "--w_itm_kd", "1"]
    one = dlip.main([*args, "--out_dir", str(d / "one")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "dlip.py", *args,
           "--micro_batch", "4", "--out_dir", str(d / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.load(open(d / "two" / "metrics_pretrain.json"))
    for k in ("first_itc", "first_itm", "first_lm", "first_lm_kd", "first_attn_dec", "final_loss", "final_itm_kd"):
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-5), (k, one[k], two[k])
    w1 = torch.load(d / "one" / "last.pt", weights_only=True)["model"]
    w2 = torch.load(d / "two" / "last.pt", weights_only=True)["model"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-3)


def test_toy_student_pretrains_on_a_subset_and_fine_tunes_on_all(toy_root):
    """The toy student sees 500 scenes in pretraining (DLIP's student sees far less data than its teacher); the
    fine-tuning recipes reset that, so teacher and students fine-tune on the same images."""
    from common.config import parse_config
    base = ["--toy_root", str(toy_root)]
    cfg = lambda *a: dlip.resolve(parse_config(dlip.Config, dlip.PRESETS, [*base, *a]), [*base, *a])  # noqa: E731
    assert cfg().train_limit == 500 and cfg("--preset", "toy_teacher").train_limit == 0
    assert cfg("--mode", "retrieval").train_limit == 0 == cfg("--mode", "caption").train_limit
    assert cfg("--mode", "caption", "--train_limit", "7").train_limit == 7  # the command line still wins
    assert cfg("--mode", "retrieval").epochs == 0.2 == cfg("--mode", "caption").epochs  # 62 of the 312 steps/epoch
    assert cfg("--mode", "caption", "--epochs", "1").epochs == 1


def test_train_limit_trains_on_the_first_pairs(world, tmp_path, capsys):
    d, base, root = world
    full = os.path.join(root, "pairs_train.jsonl")  # 300 pairs in the tiny world
    dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--train_files", full, "--train_limit", "16",
               "--teacher", "", "--max_steps", "1", "--out_dir", str(tmp_path / "limited")])
    assert "16 samples, 2 steps/epoch" in capsys.readouterr().out
