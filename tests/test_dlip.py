"""dlip.py: transformers equivalence, losses, momentum/queues, every mode on the tiny toy world, resume,
2-process DDP."""
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import dlip
from common.checkpoint import CheckpointMismatch

# Learning assertions: the mean of a term over the last third of the logged steps must fall below these bounds x
# the same term's last-third mean in a control run of the same batches with lr 0 (CTRL: batch-to-batch noise
# cancels, and an untrained term scores 1.0); "mse" compares the last third with the run's own first third.
# Values on the tiny worlds of seeds 0 / 1 / 2 (TOY_SEED / TOY_TINY_ROOT) in the comments, ft_distill_ret's as the
# worst of seeds 0-5: each ~17% or more under its bound.
MARGINS = {
    "pretrain": dict(loss=0.85,  # 0.650 / 0.657 / 0.646
                     lm=0.97,  # 0.778 / 0.779 / 0.774 (0.84 without its own gradient: lm_kd trains the decoder)
                     lm_kd=0.55,  # 0.420 / 0.365 / 0.399
                     attn_sa=0.85, attn_dec=0.75,  # 0.657 / 0.387 / 0.450; 0.554 / 0.345 / 0.408
                     rep_img=0.4,  # 0.098 / 0.213 / 0.189
                     rep_txt=0.3,  # 0.121 / 0.094 / 0.105
                     rep_fus=0.2, rep_dec=0.2),  # 0.034 / 0.041 / 0.033; 0.052 / 0.047 / 0.045
    "mse": dict(rep_img=0.6,  # 0.142 / 0.375 / 0.309 (48 steps: at 24 it was still on its plateau, 0.83 on seed 1)
                rep_txt=0.5, rep_fus=0.55, rep_dec=0.55),  # 0.31-0.32; 0.34-0.38; 0.35-0.39
    "ft_distill": dict(lm=0.97,  # 0.772 / 0.757 / 0.777 (60 steps; 0.85-0.87 at 30)
                       lm_kd=0.93,  # 0.605 / 0.742 / 0.621
                       attn_dec=0.6),  # 0.188 / 0.255 / 0.194
    "ft_distill_ret": dict(rep_img=0.9,  # worst 0.748 (seed 5; a detached term: test_every_distillation_term_)
                           rep_txt=0.5, rep_fus=0.45,  # worst 0.352 (seed 5; 0.513 at lr 2e-3); 0.158 (seed 2)
                           attn_sa=0.5),  # worst 0.224 (seed 1) (attn_ca: 1e-4, ratios 0.59-0.76)
}
CTRL = ["--lr", "0", "--min_lr", "0", "--warmup_lr", "0", "--report", "false"]  # the same batches, no update
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
                got = dlip.beam_search(ours, emb, prompt, beams, 12, 5, 2)  # 1 beam: greedy decoding
                assert _until_eos(got[:, 1:]) == _until_eos(ref[:, 1:]), (eos_bias, beams, got, ref)


def _until_eos(seqs, eos=2):
    out = []
    for row in seqs.tolist():
        out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def _bias(hf, ours, bias, token=2):  # makes a token ([SEP]: 2) likelier in both copies of the same decoder
    hf_bias = hf.text_decoder.cls.predictions
    for b in {id(hf_bias.bias): hf_bias.bias, id(hf_bias.decoder.bias): hf_bias.decoder.bias}.values():
        b[token] += bias
    ours.text_decoder.cls.predictions.bias[token] += bias


def test_nucleus_sampling_matches_transformers_generate_and_its_processors(hf_folders):
    """BLIP's sampling (models/blip.py sample=True) is transformers' generate(do_sample=True): dlip's
    nucleus_sample (KV cache) draws the same tokens from the same torch generator stream as (a) the
    transformers model's generate and (b) a loop without a cache applying transformers' own processors
    (repetition penalty on every id so far, [DEC] and prompt included; min length; top-k; top-p)."""
    from transformers import (BlipForConditionalGeneration, LogitsProcessorList, MinLengthLogitsProcessor,
                              RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper)
    hf = BlipForConditionalGeneration.from_pretrained(hf_folders[1]).eval()
    ours = dlip.load_hf_blip(hf_folders[1], SPECIAL).eval()
    image, ids, _ = _inputs(1)
    prompt, ended = ids[:, :3], 0
    with torch.no_grad():
        emb = ours.visual_encoder(image)
        _bias(hf, ours, 2.0, SPECIAL["dec_id"])  # a likely [DEC]: its penalty (it leads the ids) matters
        for eos_bias in (0.0, 2.5):  # 2.5: rows end mid-sequence, after min_len only
            _bias(hf, ours, eos_bias)
            for top_p, top_k, pen, seed in ((0.9, 50, 1.1, 0), (0.9, 50, 1.1, 1), (0.5, 0, 1.3, 2), (0.95, 10, 1.0, 3)):
                procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(pen), MinLengthLogitsProcessor(5, 2),
                                             *([TopKLogitsWarper(top_k)] if top_k else []), TopPLogitsWarper(top_p)])
                torch.manual_seed(seed)  # transformers draws from torch's global generator
                ref = hf.generate(pixel_values=image, input_ids=torch.cat([prompt, prompt[:, :1]], 1), do_sample=True,
                                  top_p=top_p, top_k=top_k, repetition_penalty=pen, max_length=12, min_length=5)
                got = dlip.nucleus_sample(ours, emb, prompt, 12, 5, 2, top_p, top_k, pen,
                                          torch.Generator().manual_seed(seed))
                seq, g = dlip.with_first(prompt, SPECIAL["dec_id"]), torch.Generator().manual_seed(seed)
                done = torch.zeros(len(seq), dtype=torch.bool)
                while seq.shape[1] < 12 and not done.all():  # transformers' _sample, pad 0 after [SEP]
                    z = ours.decode(seq, torch.ones_like(seq), emb)[0][:, -1]  # the whole sequence again
                    nxt = torch.multinomial(procs(seq, z).softmax(-1), 1, generator=g).masked_fill(done[:, None], 0)
                    seq, done = torch.cat([seq, nxt], 1), done | (nxt[:, 0] == 2)
                case = (eos_bias, top_p, top_k, pen, seed, got)
                assert torch.equal(got, F.pad(ref, (0, 12 - ref.shape[1]))), (*case, ref)
                assert torch.equal(got, F.pad(seq, (0, 12 - seq.shape[1]))), (*case, seq)
                assert not (got[:, :5] == 2).any()  # [SEP] blocked before min_len
                ended += sum(2 in row for row in got.tolist())
    assert ended >= 3, ended  # the finished-row path (pads after [SEP]) was exercised


def test_nucleus_sampling_with_a_tiny_top_p_is_greedy(hf_folders):
    """top_p -> 0 keeps the most likely token alone: any seed gives transformers' greedy decoding with the same
    repetition penalty; without one (1.0) that is dlip's beam_search with one beam."""
    from transformers import BlipForConditionalGeneration
    hf = BlipForConditionalGeneration.from_pretrained(hf_folders[1]).eval()
    ours = dlip.load_hf_blip(hf_folders[1], SPECIAL).eval()
    image, ids, _ = _inputs(2)
    prompt = ids[:, :3]
    with torch.no_grad():
        emb, greedy = ours.visual_encoder(image), {}
        for pen in (1.0, 1.5):
            ref = hf.generate(pixel_values=image, input_ids=torch.cat([prompt, prompt[:, :1]], 1), do_sample=False,
                              repetition_penalty=pen, max_length=12, min_length=5)
            greedy[pen] = F.pad(ref, (0, 12 - ref.shape[1]))
            for seed in range(3):
                gen = torch.Generator().manual_seed(seed)
                got = dlip.nucleus_sample(ours, emb, prompt, 12, 5, 2, 1e-6, 50, pen, gen)
                assert torch.equal(got, greedy[pen]), (pen, seed, got, greedy[pen])
        beam = dlip.beam_search(ours, emb, prompt, 1, 12, 5, 2)
    assert torch.equal(beam[:, 1:], greedy[1.0][:, 1:])  # beam_search's column 0 stays [CLS]
    assert not torch.equal(greedy[1.0], greedy[1.5])  # the penalty changes what greedy picks here


def test_nucleus_sampling_is_reproducible_per_seed_and_keeps_min_length(hf_folders):
    """The same generator seed gives the same captions, other seeds others (a random decoder: ~50 likely
    tokens a step); a decoder that all but always says [SEP] says it exactly at min_len, then pads."""
    ours = dlip.load_hf_blip(hf_folders[1], SPECIAL).eval()
    prompt = torch.tensor([[SPECIAL["cls_id"], 14, 67]]).expand(8, -1)
    with torch.no_grad():
        emb = ours.visual_encoder(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        draw = lambda seed, min_len=5: dlip.nucleus_sample(  # noqa: E731
            ours, emb, prompt, 12, min_len, 2, 0.9, 50, 1.1, torch.Generator().manual_seed(seed))
        a, b, c = draw(0), draw(0), draw(1)
        assert torch.equal(a, b) and (a != c).any(dim=1).all()  # every one of the 8 captions differs
        ours.text_decoder.cls.predictions.bias[2] += 30.0
        for min_len in (4, 7):
            got = draw(0, min_len)
            assert not (got[:, :min_len] == 2).any() and (got[:, min_len] == 2).all(), got
            assert (got[:, min_len + 1:] == SPECIAL["pad_id"]).all(), got


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


def test_teacher_loads_from_a_sharded_bin_folder(hf_folders, tmp_path):
    """Released checkpoints come as .bin or safetensors, single or sharded (common.hf.read_hf_weights)."""
    import json
    from safetensors.torch import load_file
    sd, out = load_file(os.path.join(hf_folders[0], "model.safetensors")), tmp_path / "bin"
    shutil.copytree(hf_folders[0], out, ignore=shutil.ignore_patterns("*.safetensors"))
    names = [f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)]
    shards = {k: names[i % 2] for i, k in enumerate(sorted(sd))}
    for name in names:
        torch.save({k: v for k, v in sd.items() if shards[k] == name}, out / name)
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": shards}))
    ref, got = dlip.load_hf_blip(hf_folders[0], SPECIAL), dlip.load_hf_blip(str(tmp_path / "bin"), SPECIAL)
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in ref.state_dict().items())


def _blip_pth(model, path, **edit):
    """A salesforce/BLIP .pth from a model here (whose names are BLIP's): {"model": state_dict} with BERT's
    position_ids and the LM head's tied decoder projection added; edit: {name: new name or None (dropped)}."""
    sd = model.state_dict()
    for p in ("text_encoder", "text_decoder.bert"):
        sd[f"{p}.embeddings.position_ids"] = torch.arange(model.c.max_pos)[None]
    sd["text_decoder.cls.predictions.decoder.weight"] = sd["text_decoder.bert.embeddings.word_embeddings.weight"]
    sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"]
    for k, new in edit.items():
        v = sd.pop(k)
        if new:
            sd[new] = v
    torch.save({"model": sd, "config": {"vit": "base", "image_size": 224}}, path)
    return str(path)


def test_original_blip_checkpoint_loads_with_its_outputs_and_names_a_missing_tensor(tmp_path):
    """Issue 17.9: salesforce/BLIP's own .pth layout (a pretrain model: tied decoder, momentum copies and queues)
    loads as a frozen teacher with the original's ITC, ITM and LM outputs; its shapes (64-wide heads) come from the
    tensors; a missing or renamed tensor is a one-line error naming it."""
    c = dlip.ModelConfig(image_size=32, patch_size=8, vit_width=64, vit_layers=2, vit_heads=1, vit_mlp=96,
                         text_width=128, text_layers=2, text_heads=2, text_ffn=160, embed_dim=16, queue_size=8,
                         max_pos=40, **SPECIAL)
    torch.manual_seed(0)
    orig = dlip.BLIP(c).eval()
    _randomize(orig, 3)
    m = dlip.load_dlip(_blip_pth(orig, tmp_path / "model_base.pth"), dict(momentum=False), special=SPECIAL).eval()
    assert (m.c.vit_heads, m.c.text_heads, m.c.image_size, m.c.vocab_size) == (1, 2, 32, 100)
    assert m.c.has_encoder and m.c.has_decoder and not m.c.tie_decoder and not m.c.momentum
    image, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 90, (2, 7))
    ids[:, 0], mask = SPECIAL["cls_id"], torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        a, b = orig(image, ids, mask), m(image, ids, mask)
        itm = [x.itm_head(f.fused[:, 0]) for x, f in ((orig, a), (m, b))]
    for x, y in ((a.image_feat, b.image_feat), (a.text_feat, b.text_feat), (a.logits, b.logits), tuple(itm)):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    assert float(b.temp.detach()) == pytest.approx(float(a.temp.detach()))
    key = "text_encoder.encoder.layer.1.crossattention.self.key.weight"
    for edit, names in (({"itm_head.bias": None}, ["itm_head.bias"]), ({key: key.replace("key", "kee")},
                                                                       [key, key.replace("key", "kee")])):
        path = _blip_pth(orig, tmp_path / "bad.pth", **edit)
        with pytest.raises(ValueError) as e:
            dlip.load_dlip(path, dict(momentum=False), special=SPECIAL)
        assert all(n in str(e.value) for n in names) and "\n" not in str(e.value), str(e.value)


def test_salesforce_blip_released_checkpoint_layouts_load_every_weight_at_base_size(monkeypatch):
    """The tensor names and shapes of salesforce/BLIP's released pretrain, caption and retrieval checkpoints at
    ViT-B / BERT-base (tests/fixtures/blip/released_state_dicts.json, from the released model classes) load into
    dlip's BLIP on the meta device: every weight of the model found with its shape, the architecture read off the
    shapes, and only position ids, the tied LM projection, momentum copies and queues left over; a momentum model
    finds its momentum copies and feature queues there too."""
    import json
    here = os.path.join(os.path.dirname(__file__), "fixtures", "blip", "released_state_dicts.json")
    special = dict(enc_id=30523, dec_id=30522, sep_id=102, pad_id=0, cls_id=101)
    want = {"model_base.pth": (224, True, True), "model_base_caption_capfilt_large.pth": (384, False, True),
            "model_base_retrieval_coco.pth": (384, True, False)}  # image size, text encoder + heads, decoder
    for name, layout in json.load(open(here)).items():
        with torch.device("meta"):
            sd = {k.replace("*", str(i)): torch.empty(s) for k, s in layout["tensors"].items()
                  for i in range(layout["layers"][k.split("*")[0]] if "*" in k else 1)}
            monkeypatch.setattr(dlip, "load_checkpoint", lambda path: {"model": sd, "config": {}})
            m = dlip.load_dlip(name, dict(momentum=False), special=special)
        c, own = m.c, m.state_dict()
        assert (c.image_size, c.has_encoder, c.has_decoder) == want[name], name
        assert (c.patch_size, c.vit_width, c.vit_layers, c.vit_heads, c.vit_mlp) == (16, 768, 12, 12, 3072)
        assert (c.text_width, c.text_layers, c.text_heads, c.text_ffn, c.vocab_size) == (768, 12, 12, 3072, 30524)
        assert [k for k in own if k not in sd] == [] and len(own) > 300, name
        assert [k for k in own if own[k].shape != sd[k].shape] == [], name
        left = {k for k in sd if k not in own}
        assert left and all(dlip.BLIP_EXTRA.match(k) for k in left), sorted(left)[:5]
        if "visual_encoder_m.cls_token" in sd:  # pretrain / retrieval: momentum copies and 57,600-long queues
            with torch.device("meta"):
                own = dlip.load_dlip(name, dict(momentum=True), None, 57600, special=special).state_dict()
            bookkeeping = {"idx_queue", "queue_ptr"}  # start fresh: they index BLIP's own pretraining records
            assert sum("_m." in k for k in own) > 300 and "image_queue" in own, name
            assert [k for k in own if k not in bookkeeping and (k not in sd or own[k].shape != sd[k].shape)] == []


def test_paper_preset_distils_blips_pretrained_checkpoint_at_224(capsys):
    from common.config import parse_config
    cfg = parse_config(dlip.Config, dlip.PRESETS, ["--preset", "paper"])
    # DLIP V2 distils BLIP ViT-B pretrained on 129M images with CapFilt-L (not model_base.pth, without it)
    assert (cfg.teacher, cfg.teacher_caption, cfg.image_size) == ("model_base_capfilt_large.pth", "", 224)
    with pytest.raises(SystemExit):
        dlip.main(["--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse may wrap the URL
    assert dlip.BLIP_URL in help_text and dlip.BLIP_URL.endswith("/BLIP/models/model_base_capfilt_large.pth")
    for mode in ("retrieval", "caption"):  # BLIP's retrieval_coco.yaml / caption_coco.yaml: cosine to min_lr 0
        assert dlip.FINETUNE["paper"][mode]["min_lr"] == 0.0


def test_pretrain_distils_a_blip_pth_teacher_and_inits_the_student_from_it(world, tmp_path, capsys):
    """A BLIP .pth as --teacher and as --init of a student of its shape: the student starts as the teacher, so at
    the first step every representation, logit and attention term is 0 (only ITC-KD's soft targets are not)."""
    d, base, root = world
    _, special = dlip.load_tokenizer(os.path.join(root, "models", "bert"))
    c = dlip.ModelConfig(image_size=32, patch_size=8, vit_width=64, vit_layers=1, vit_heads=1, vit_mlp=128,
                         text_width=64, text_layers=1, text_heads=1, text_ffn=128, queue_size=8, **special)
    pth = _blip_pth(dlip.BLIP(c), tmp_path / "model_base.pth")
    m = dlip.main(["--mode", "pretrain", *base, *TINY, *_width(64), "--vit_heads", "1", "--text_heads", "1",
                   "--teacher", pth, "--init", pth, "--w_itm_kd", "1", "--max_steps", "1", "--report", "false",
                   "--out_dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert f"distilling {pth}" in out and m["final_itc_kd"] > 0 and "final_lm_kd" in m
    n_fit, n_all = map(int, re.search(r"(\d+) of (\d+) tensors fit the student", out).groups())
    assert 0.5 * n_all < n_fit < n_all  # everything but the queues and what the pth lacks (its momentum copies)
    zero = ("rep_img", "rep_txt", "rep_fus", "rep_dec", "lm_kd", "attn_sa", "attn_ca", "attn_dec", "itm_kd")
    assert all(abs(m["first_" + k]) < 1e-5 for k in zero) and m["first_lm"] > 0, m


def test_blip_caption_pth_evaluates_and_distils_with_the_prompt_a_pretrain_pth_without(world, tmp_path,
                                                                                       monkeypatch):
    """A salesforce/BLIP caption checkpoint (BLIP_Decoder: image encoder + decoder, no text encoder) was fine-tuned
    and is decoded with 'a picture of ' (BLIP configs/caption_coco.yaml): --mode eval decodes it after [DEC] +
    those 3 words (before: after [DEC] alone); a BLIP pretrain .pth (both text stacks) keeps no prompt. As the
    --ft_distill teacher the caption .pth also gets the tokenizer's ids (before: [DEC] was token 0)."""
    import types
    d, base, root = world
    tok, special = dlip.load_tokenizer(os.path.join(root, "models", "bert"))
    c = dlip.ModelConfig(image_size=32, patch_size=8, vit_width=64, vit_layers=1, vit_heads=1, vit_mlp=128,
                         text_width=64, text_layers=1, text_heads=1, text_ffn=128, momentum=False, **special)
    torch.save({"model": dlip.BLIP(replace(c, has_encoder=False, tie_decoder=False)).state_dict()},
               tmp_path / "model_base_caption_capfilt_large.pth")
    pretrain = _blip_pth(dlip.BLIP(c), tmp_path / "model_base.pth")
    prompts, real = [], dlip.beam_search
    monkeypatch.setattr(dlip, "beam_search", lambda m, e, p, *a: prompts.append(p[0].tolist()) or real(m, e, p, *a))
    for name in ("model_base_caption_capfilt_large.pth", "model_base.pth"):
        dlip.main(["--mode", "eval", "--task", "caption", *base, *TINY, "--ckpt", str(tmp_path / name),
                   "--teacher", "", "--report", "false", "--test_file", os.path.join(root, "pairs_val.jsonl"),
                   "--out_dir", str(tmp_path / ("eval_" + name))])
    assert tok.convert_ids_to_tokens(prompts[0]) == ["[CLS]", "a", "picture", "of"]  # [CLS] becomes [DEC]
    assert prompts[-1] == [special["cls_id"]]
    log = types.SimpleNamespace(info=lambda *a: None)
    for path, prompt in ((str(tmp_path / "model_base_caption_capfilt_large.pth"), "a picture of "), (pretrain, "")):
        cfg = dlip.Config(mode="caption", ft_distill=True, teacher=path, teacher_caption="", image_size=32)
        (ret, cap), _ = dlip.load_teacher(cfg, None, special, torch.device("cpu"), torch.float32, log)
        assert ret is None and cap.c.prompt == prompt and cap.c.dec_id == special["dec_id"] != 0


def test_retrieval_ft_distill_teacher_is_its_encoders_and_heads(hf_folders, tmp_path):
    """--ft_distill in retrieval fine-tuning loads no teacher decoder, from a transformers BlipForImageTextRetrieval
    folder or from a BLIP .pth that has one, and weighs the encoders' terms only; a caption folder is refused."""
    import types
    log = types.SimpleNamespace(info=lambda *a: None)
    c = dlip.ModelConfig(image_size=32, patch_size=8, vit_width=32, vit_layers=1, vit_heads=2, vit_mlp=64,
                         text_width=32, text_layers=1, text_heads=2, text_ffn=64, embed_dim=16, queue_size=8,
                         **SPECIAL)
    student, pth = dlip.BLIP(c), _blip_pth(dlip.BLIP(c), tmp_path / "model_base.pth")
    ret_pth = str(tmp_path / "model_base_retrieval_coco.pth")  # BLIP_Retrieval: no decoder, momentum copies
    torch.save({"model": dlip.BLIP(replace(c, has_decoder=False)).state_dict()}, ret_pth)
    for path in (hf_folders[0], pth, ret_pth):
        cfg = dlip.Config(mode="retrieval", ft_distill=True, teacher=path, image_size=32)
        (ret, cap), w = dlip.load_teacher(cfg, student, SPECIAL, torch.device("cpu"), torch.float32, log)
        assert cap is None and ret.c.has_encoder and not hasattr(ret, "text_decoder"), path
        assert set(w) == {"itc_kd", "rep_img", "rep_txt", "rep_fus", "attn_sa", "attn_ca", "itm_kd", "itc_kd_kind"}
    with pytest.raises(ValueError, match="needs a text encoder"):
        cfg = dlip.Config(mode="retrieval", ft_distill=True, teacher=hf_folders[1], image_size=32)
        dlip.load_teacher(cfg, student, SPECIAL, torch.device("cpu"), torch.float32, log)


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
        shape = replace(_shape(width=32, momentum=False), **dlip.vit_init_config(str(tmp_path / name)))
        ours = dlip.BLIP(shape).eval()
        dlip.init_from_hf_vit(ours, str(tmp_path / name))
        with torch.no_grad():
            got, out = ours.visual_encoder(x), hf(pixel_values=x)
        ref = out.last_hidden_state if name == "vit" else out.pooler_output[:, None]
        torch.testing.assert_close(got[:, :ref.shape[1]], ref, atol=1e-4, rtol=1e-4)
    for layers, picked in ((1, [1]), (3, [0, 0, 1]), (4, [0, 0, 1, 1])):  # 2-layer source: evenly spaced, repeated
        ours = dlip.BLIP(replace(_shape(width=32, layers=layers, momentum=False),
                                 **dlip.vit_init_config(str(tmp_path / "clip"))))
        dlip.init_from_hf_vit(ours, str(tmp_path / "clip"))
        src = {k.split("vision_model.")[-1]: v for k, v in hf.state_dict().items()}
        for block, j in zip(ours.visual_encoder.blocks, picked):
            assert torch.equal(block.mlp.fc1.weight, src[f"encoder.layers.{j}.mlp.fc1.weight"])


# ------------------------------------------------------------------ losses, momentum and queues (no toy world)
def _shape(width=32, layers=2, heads=4, queue=16, **kw):
    s = dict(image_size=32, patch_size=8, vit_width=width, vit_layers=layers, vit_heads=heads, vit_mlp=2 * width,
             vit_eps=1e-6, text_width=width, text_layers=layers, text_heads=heads, text_ffn=2 * width,
             text_eps=1e-12, vocab_size=100, max_pos=64, embed_dim=16, dropout=0.0, has_encoder=True,
             has_decoder=True, tie_decoder=True, momentum=True, queue_size=queue, ema=0.9, grad_ckpt=False,
             **{k: v for k, v in SPECIAL.items() if k != "vocab_size"})
    s.update(kw)
    return dlip.ModelConfig(**s)


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
    # the direction, by hand: KL(teacher || student) over the target positions / the non-padding query rows
    zs, keep = torch.randn(2, 6, 100), labels[:, 1:] != -100
    t, s = z[:, :-1][keep].log_softmax(-1), zs[:, :-1][keep].log_softmax(-1)
    assert dlip.lm_kd_loss(zs, z, labels).item() == pytest.approx((t.exp() * (t - s)).sum(-1).mean().item(), rel=1e-5)
    S = torch.randn(2, 4, 6, 6).softmax(-1)
    kl = (A * (A.log() - S.log())).sum(-1)  # (B, H, Lq)
    by_hand = kl[mask[:, None, :].expand_as(kl) > 0].mean()  # 4 heads x (4 + 6) rows
    assert dlip.attn_kd_loss(A, S, mask).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_hard_negatives_vectorised_never_positive_and_nan_safe():
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 0, 1, 2, 3, 3])
    same = idx[:, None] == idx[None, :]
    sim = torch.randn(6, 6, generator=g)
    sim[0, 1] = 100.0  # the most similar column is a positive (same image): must never be drawn
    draws = torch.stack([dlip.multinomial_negatives(sim, same, g) for _ in range(200)])  # (200, 6)
    assert not same[torch.arange(6)[None].expand(200, -1), draws].any()
    assert len(set(draws[:, 2].tolist())) > 2  # it samples, not argmax
    sim[2, 3], sim[3, 2], sim[4, 0] = float("nan"), float("inf"), -float("inf")  # AMP overflow must not crash
    assert dlip.multinomial_negatives(sim, same, g).shape == (6,)
    draws = torch.stack([dlip.multinomial_negatives(sim, same, g) for _ in range(100)])  # row 3's softmax: all NaN
    assert not same[torch.arange(6)[None].expand(100, -1), draws].any() and len(set(draws[:, 3].tolist())) > 2
    t = dlip.itc_targets(same, sim.nan_to_num(0, 50, -50), 0.4)
    torch.testing.assert_close(t.sum(1), torch.ones(6))


def test_itc_shortlist_itm_rerank_by_hand():
    """Top-k by ITC, re-scored by ITM logit + ITC sim (BLIP's evaluation); hand-computed."""
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    from common.metrics import rerank_scores  # shared with blip2_pformer.py's retrieval
    out = rerank_scores(sim, lambda r, cols: cols.float() * 10 + r, k=2, rows=[0, 1])
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


def _enqueue_by_host_pointer(m, img, txt, idx):  # BLIP.enqueue before issue 18.9, for comparison
    g, p = img.shape[0], int(m.queue_ptr)
    m.image_queue[:, p:p + g], m.text_queue[:, p:p + g], m.idx_queue[p:p + g] = img.T, txt.T, idx
    m.queue_ptr.fill_((p + g) % m.image_queue.shape[1])


def test_enqueue_indexes_on_the_device_and_fills_the_queues_as_before():
    """Issue 18.9: the queue pointer is never read on the host (a sync per step on a GPU). On the meta device,
    which holds no values, reading it raises; the queues after enqueues that wrap around twice are the old
    implementation's."""
    import copy
    torch.manual_seed(0)
    new = dlip.BLIP(_shape(queue=12))
    old = copy.deepcopy(new)
    for _ in range(7):
        img, txt = F.normalize(torch.randn(4, 16), dim=1), F.normalize(torch.randn(4, 16), dim=1)
        idx = torch.randint(0, 2 ** 56, (4,))  # the shard path's 7-byte image ids
        new.enqueue(img, txt, idx)
        _enqueue_by_host_pointer(old, img, txt, idx)
        for k in dlip.QUEUES:
            assert torch.equal(getattr(new, k), getattr(old, k)), k
    with torch.device("meta"):
        m = dlip.BLIP(_shape(queue=8))
        m.enqueue(torch.randn(4, 16), torch.randn(4, 16), torch.arange(4))
    assert m.queue_ptr.is_meta


def test_enqueue_wraps_inside_one_write_after_a_resume_on_more_ranks():
    """A run saved at a global micro batch of 3 (pointer 3) and resumed on twice the ranks (6 a step): the pointer
    is a multiple of 3, not of 6, so a write runs past the queue's end (before: index_copy_'s IndexError at the
    second write). The queues and the pointer follow a Python FIFO over the 12 columns."""
    torch.manual_seed(0)
    m, q = dlip.BLIP(_shape(queue=12)), 12
    ref = {k: getattr(m, k).clone() for k in ("image_queue", "text_queue", "idx_queue")}
    ptr = 0
    for g in (3, 6, 6, 6):
        img, txt, idx = torch.randn(g, 16), torch.randn(g, 16), torch.randint(0, 1000, (g,))
        m.enqueue(img, txt, idx)
        for i in range(g):  # one column at a time, oldest overwritten first
            ref["image_queue"][:, ptr], ref["text_queue"][:, ptr], ref["idx_queue"][ptr] = img[i], txt[i], idx[i]
            ptr = (ptr + 1) % q
        assert int(m.queue_ptr) == ptr
        for k, v in ref.items():
            assert torch.equal(getattr(m, k), v), (g, k)


def test_itc_logits_and_their_distillation_stay_fp32_under_bf16_autocast(monkeypatch):
    """Issue 18.6: under bf16 autocast (bf16's spacing at logits of 8-16 is 0.0625) the normalised features come
    out fp32, and the ITC logits (targets and loss), the hard negatives' sampling similarities and both ITC
    distillation kinds are computed in fp32: the same values as without autocast, from the same features."""
    import copy
    torch.manual_seed(0)
    student, teacher = dlip.BLIP(_shape()), dlip.BLIP(_shape(width=48, momentum=False)).eval()
    image, ids, mask, idx = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = copy.deepcopy(student)(image, ids, mask)
        naive = (f.image_feat @ f.text_feat.T).dtype  # what autocast does to a plain matmul
    assert naive == torch.bfloat16
    assert f.image_feat.dtype == f.text_feat.dtype == f.image_m.dtype == f.text_m.dtype == torch.float32
    sims, draw = [], dlip.multinomial_negatives
    monkeypatch.setattr(dlip, "multinomial_negatives", lambda sim, *a: sims.append(sim) or draw(sim, *a))
    terms = []
    for bf16 in (False, True):
        m = copy.deepcopy(student)
        s, t = m(image, ids, mask), teacher(image, ids, mask)  # fp32 forwards: the same features twice
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = dlip.blip_losses(m, s, ids, mask, idx, 0.4, torch.Generator().manual_seed(1), 0)
            for kind in ("v2", "kl"):
                out[kind] = dlip.distill_losses(s, t, {"itc_kd": 1, "itc_kd_kind": kind})["itc_kd"]
        terms.append(out)
    for k in ("itc", "v2", "kl"):
        assert terms[1][k].dtype == torch.float32 and torch.equal(terms[1][k], terms[0][k]), k
    assert len(sims) == 4 and all(x.dtype == torch.float32 for x in sims)
    assert torch.equal(sims[2], sims[0]) and torch.equal(sims[3], sims[1])


def test_itm_scores_and_caption_logits_are_fp32_under_bf16_autocast(monkeypatch):
    """The eval's ITM re-ranking score and the LM head's logits in beam search are computed in fp32 from the
    (bf16) fused / decoder states under bf16 autocast, as BLIP evaluates in fp32: bf16 logits of 7-8 are 1/32
    apart, so near-equal pairs tie or swap in the re-ranking."""
    torch.manual_seed(0)
    m = dlip.BLIP(_shape(momentum=False)).eval()
    image, ids, mask, _ = _batch()
    heads, real = [], m.text_decoder.head
    monkeypatch.setattr(m.text_decoder, "head", lambda h: heads.append(real(h)) or heads[-1])
    with torch.no_grad():
        emb = m.visual_encoder(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, h = m.itm_logits(ids, mask, emb), m.fuse(ids, mask, emb)[0][:, 0]
            naive = m.itm_head(h).dtype  # what autocast does to the head
            dlip.beam_search(m, emb, ids[:, :2], 2, 6, 3, SPECIAL["sep_id"])
        ref = m.itm_head(h.float())
    assert naive == torch.bfloat16 and got.dtype == torch.float32 and torch.equal(got, ref)
    assert heads and all(z.dtype == torch.float32 for z in heads)


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


def _terms(student, teacher, batch, w, alpha=0.4, seed=1):
    """One training step's loss terms, as dlip.train computes them: the student's features, BLIP's losses,
    the frozen teacher's features on the same batch, every distillation term."""
    image, ids, mask, idx = batch
    need = dict(need_attn=True, need_layers=w.get("rep_kind") == "mse")
    s = student(image, ids, mask, **need)
    terms = dlip.blip_losses(student, s, ids, mask, idx, alpha, torch.Generator().manual_seed(seed), 0)
    t = dlip.teacher_features(teacher, teacher, image, ids, mask, s, w.get("itm_kd", 0) > 0, **need)
    maps = getattr(student, "rep_maps", None) if w.get("rep_kind") == "mse" else None
    return {**terms, **dlip.distill_losses(s, t, w, alpha, maps, "uniform")}


def test_forward_returns_features_and_runs_no_collective(monkeypatch):
    """BLIP.forward only computes features (and the momentum step); the ranks exchange features in the loss
    functions, never inside a module's forward."""
    def collective(*a, **k):
        raise AssertionError("a collective inside BLIP.forward")
    for name in ("all_gather_no_grad", "all_gather_with_grad", "all_reduce_mean", "all_gather_object"):
        monkeypatch.setattr(dlip.cdist, name, collective)
    torch.manual_seed(0)
    f = dlip.BLIP(_shape())(*_batch()[:3], need_attn=True, need_layers=True)
    assert isinstance(f, dlip.Features) and f.logits.shape == (4, 8, 100) and f.image_m.shape == (4, 16)
    assert set(f.proj) == {"img", "txt", "fus", "dec"} and set(f.attn) == {"sa", "ca", "dsa"}
    assert len(f.layers["img"]) == 2 and f.layers["img"][0].shape == (4, 32) and f.layers["dec"][0].shape == (4, 8, 32)


def test_image_keys_values_projected_once_and_reused_by_decoder_and_itm():
    """Issue 19.2: the tied decoder and the ITM pass (student and teacher) read the image keys/values the
    positive fusion pass projected, instead of projecting the same images again; the logits equal those of passes
    that recompute them."""
    torch.manual_seed(0)
    student, teacher = dlip.BLIP(_shape()), dlip.BLIP(_shape(width=48, momentum=False)).eval()
    image, ids, mask, idx = _batch()
    rows = []
    for m in (student, teacher):
        m.text_encoder.encoder.layer[0].crossattention.self.key.register_forward_hook(
            lambda mod, inp, out: rows.append(inp[0].shape[0]))
    s = student(image, ids, mask)
    dlip.blip_losses(student, s, ids, mask, idx, 0.4, torch.Generator().manual_seed(1), 0)
    t = dlip.teacher_features(teacher, teacher, image, ids, mask, s, itm=True)
    assert rows == [4, 4]  # one projection of the 4 images each (recomputing: 4 + 4 decoder + 8 ITM)
    ids_n, mask_n, neg_img = s.neg
    with torch.no_grad():
        for m, f in ((student, s), (teacher, t)):
            e = f.image_embeds
            ref = torch.cat([m.itm_logits(ids, mask, e), m.itm_logits(ids_n, mask_n, torch.cat([e[neg_img], e]))])
            torch.testing.assert_close(f.itm, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(f.logits, m.decode(ids, mask, e)[0], atol=1e-5, rtol=1e-5)
    assert len(set(neg_img.tolist())) > 1  # the negatives are indexed, not all one image


def _kd_w():
    return {"itc_kd": 1, "rep_img": 1, "rep_txt": 1, "rep_fus": 1, "rep_dec": 1, "lm_kd": 1, "attn_sa": 1,
            "attn_ca": 1, "attn_dec": 1, "itm_kd": 1, "itc_kd_kind": "v2"}


def test_pretrain_step_teacher_frozen_and_self_distillation_zero():
    torch.manual_seed(0)
    teacher = dlip.BLIP(_shape(width=48, heads=4, momentum=False)).requires_grad_(False).eval()
    student = dlip.BLIP(_shape(width=32, heads=2))
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    image, ids, mask, idx = _batch()
    terms = _terms(student, teacher, (image, ids, mask, idx), _kd_w())
    assert set(terms) == {"itc", "itm", "lm", *[k for k in _kd_w() if k != "itc_kd_kind"]}
    assert all(torch.isfinite(v) for v in terms.values())
    # initial ITM ~ 0.64 (label prior 1/3 : 2/3), LM ~ ln(V) with random heads
    assert abs(terms["lm"].item() - torch.log(torch.tensor(100.0)).item()) < 1.0
    assert 0.4 < terms["itm"].item() < 0.9
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing  # no unused parameters (DDP without find_unused_parameters)
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())

    # the teacher distilled into an exact copy of itself: every representation/logit/attention term is 0
    twin = dlip.BLIP(replace(teacher.c, momentum=True, queue_size=16))
    twin.load_state_dict(teacher.state_dict(), strict=False)
    twin.eval()
    terms = _terms(twin, teacher, (image, ids, mask, idx), _kd_w())
    for k in ("rep_img", "rep_txt", "rep_fus", "rep_dec", "lm_kd", "attn_sa", "attn_ca", "attn_dec", "itm_kd"):
        assert terms[k].item() == pytest.approx(0.0, abs=1e-5), k


def test_every_distillation_term_trains_the_part_it_distills():
    """Each term alone sends a gradient into the student's part whose outputs it compares with the teacher's: a
    term cut from the graph (a stray .detach(), a teacher tensor in the student's place) fails here on any machine,
    where the learning tests below can only see it as a ratio that falls a little less (ft_distill_ret's rep_img:
    0.914 detached against 0.765 on seed 1, bound 0.9; the encoders are trained by the other terms too)."""
    torch.manual_seed(0)
    teacher = dlip.BLIP(_shape(width=48, heads=4, momentum=False)).requires_grad_(False).eval()
    student = dlip.BLIP(_shape(width=32, heads=2))
    terms = _terms(student, teacher, _batch(), _kd_w())
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    parts = {"itc_kd": {"vision_proj", "text_proj"}, "rep_img": {"visual_encoder"}, "rep_txt": {"text_encoder"},
             "rep_fus": {"text_encoder"}, "rep_dec": {"text_decoder"}, "lm_kd": {"text_decoder"},
             "attn_sa": {"text_encoder"}, "attn_ca": {"text_encoder"}, "attn_dec": {"text_decoder"},
             "itm_kd": {"itm_head"}}
    assert set(parts) == set(_kd_w()) - {"itc_kd_kind"}
    for k, want in parts.items():
        assert terms[k].requires_grad, k  # cut from the student's graph altogether
        grads = torch.autograd.grad(terms[k], [p for _, p in named], allow_unused=True, retain_graph=True)
        reached = {n.split(".")[0] for (n, _), g in zip(named, grads) if g is not None and g.abs().sum() > 0}
        assert want <= reached, (k, sorted(reached))


def test_without_momentum_itc_is_the_in_batch_contrastive_loss_and_the_temperature_is_clamped():
    """--no_momentum: no EMA copies or queues; ITC (dropped before) is the in-batch contrastive loss over the global
    batch with hard targets (same image id = positive), the V2 ITC distillation takes the teacher's in-batch
    features as its only candidates (it read the student's queue), and the temperature is clamped to [0.001, 0.5]
    as with momentum (before: only inside the momentum branch). Hand-computed on a batch of 4 with a repeated id."""
    torch.manual_seed(0)
    student = dlip.BLIP(_shape(momentum=False))
    teacher = dlip.BLIP(_shape(width=48, momentum=False)).requires_grad_(False).eval()
    assert not any("_m." in k or "queue" in k for k in student.state_dict())
    with torch.no_grad():
        student.temp.fill_(2.0)
    image, ids, mask, idx = batch = _batch()
    terms = _terms(student, teacher, batch, _kd_w(), alpha=0.4)
    assert student.temp.item() == pytest.approx(0.5)
    terms["itc"].backward(retain_graph=True)
    assert student.temp.grad is not None and student.temp.grad.abs() > 0  # ITC trains the temperature
    with torch.no_grad():
        s, t = student(image, ids, mask), teacher(image, ids, mask)
        si, st, ti, tt = s.image_feat, s.text_feat, t.image_feat, t.text_feat
    pos = (idx[:, None] == idx[None, :]).float()
    hard = pos / pos.sum(1, keepdim=True)  # row 2: 1/2 on columns 2 and 3 (the same image)

    def ce(logits, tgt):
        return -(logits.log_softmax(1) * tgt).sum(1).mean()
    itc = (ce(si @ st.T / 0.5, hard) + ce(st @ si.T / 0.5, hard)) / 2
    kd = (ce(si @ tt.T / 0.5, 0.4 * (ti @ tt.T / 0.5).softmax(1) + 0.6 * hard)
          + ce(st @ ti.T / 0.5, 0.4 * (tt @ ti.T / 0.5).softmax(1) + 0.6 * hard)) / 2
    assert terms["itc"].item() == pytest.approx(itc.item(), rel=1e-5)
    assert terms["itc_kd"].item() == pytest.approx(kd.item(), rel=1e-5)


def test_without_momentum_a_short_training_run_lowers_itc():
    """The in-batch ITC of a model without momentum copies falls when trained (AdamW on one batch of 4, ITC only:
    on the tiny toy world ITC sits at ln(batch) for the first ~50 steps with or without momentum)."""
    torch.manual_seed(0)
    m = dlip.BLIP(_shape(momentum=False, layers=1, heads=2))
    opt, (image, ids, mask, idx), itc = torch.optim.AdamW(m.parameters(), lr=2e-3), _batch(), []
    for step in range(36):
        s = m(image, ids, mask)
        loss = dlip.blip_losses(m, s, ids, mask, idx, 0.4, torch.Generator().manual_seed(step), 0)["itc"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        itc.append(loss.item())
    first, last = sum(itc[:12]) / 12, sum(itc[-12:]) / 12
    print(f"[learning] itc without momentum: first third {first:.4f}, last third {last:.4f}")
    assert last < 0.8 * first, itc


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
    twin = dlip.BLIP(replace(teacher.c, momentum=True, queue_size=16))
    twin.load_state_dict(teacher.state_dict(), strict=False)
    twin.eval()
    w = dict(_kd_w(), rep_kind="mse")
    twin.rep_maps = dlip.rep_maps(teacher.c, teacher.c, teacher.c, "uniform", w)
    assert set(twin.rep_maps) == {"img", "txt", "fus", "dec"} and len(twin.rep_maps["txt"]) == 2
    with torch.no_grad():
        for m in twin.rep_maps.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.eye(32))
                m.bias.zero_()
    image, ids, mask, idx = _batch()
    t = dlip.teacher_features(teacher, teacher, image, ids, mask, need_layers=True)
    assert len(t.layers["img"]) == 2 and t.layers["img"][0].shape == (4, 32) and t.layers["txt"][0].shape == (4, 8, 32)
    terms = _terms(twin, teacher, (image, ids, mask, idx), w)
    for k in ("rep_img", "rep_txt", "rep_fus", "rep_dec"):
        assert terms[k].item() == pytest.approx(0.0, abs=1e-8), k
    student = dlip.BLIP(_shape(width=16, layers=1, heads=2))
    student.rep_maps = dlip.rep_maps(student.c, teacher.c, teacher.c, "uniform", w)  # 1 layer -> layer 2
    terms = _terms(student, teacher, (image, ids, mask, idx), w)
    assert all(terms[k].item() > 0 for k in ("rep_img", "rep_txt", "rep_fus", "rep_dec"))
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.rep_maps.parameters())


def _gather_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from common import dist as cdist
    d = cdist.setup_distributed("cpu")
    x_all = torch.arange(7 * 2 * 3, dtype=torch.bfloat16).view(7, 2, 3)  # 7 rows: rank 0 has 4, rank 1 has 3
    mine = x_all[cdist.shard_indices(7, d)]
    out = {"device": dlip.gather_rows(mine.float(), 7, d), "host": dlip.gather_rows(mine, 7, d, via="cpu", chunk=3)}
    torch.save(out, os.path.join(out_dir, f"g{rank}.pt"))
    cdist.cleanup_distributed()


def test_eval_gathers_the_image_tokens_on_the_host_in_chunks(tmp_path, spawn):
    """retrieval_eval keeps the re-ranking's image tokens (N_img, Nv, Dv) on the host, in the compute dtype,
    gathered `chunk` rows per rank at a time (a 5k-image split of ViT-B tokens is 9 GB in fp32): the same rows in
    the same order as gathering the whole tensor at once. Chunks of 3 over shards of 4 and 3 rows: a short last
    chunk and a padded rank."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn(_gather_worker, args=(2, port, str(tmp_path)))
    x_all = torch.arange(7 * 2 * 3, dtype=torch.bfloat16).view(7, 2, 3)
    for r in range(2):
        out = torch.load(tmp_path / f"g{r}.pt")
        assert out["host"].dtype == torch.bfloat16 and torch.equal(out["host"], x_all)
        assert torch.equal(out["device"], x_all.float())


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
    """The tiny world plus a training file of its first 8 images (40 pairs: 5 global batches of 8 an epoch)."""
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
    m = dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--max_steps", "24",
                   "--lr", "2e-3", "--w_itm_kd", "1", "--out_dir", out])
    return out, m


@pytest.fixture(scope="module")
def student_ctrl(world, teacher_ckpt):
    """student_run's control: the same 24 batches (and teacher) with lr 0."""
    d, base, _ = world
    out = str(d / "student_ctrl")
    dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--max_steps", "24",
               "--w_itm_kd", "1", *CTRL, "--out_dir", out])
    return _rows(os.path.join(out, "metrics.jsonl"))


def _thirds(rows, k):
    """Mean of term k over the first and over the last third of the logged steps (not a two-step comparison:
    the tiny world differs in its last bits between machines; the margins below hold on worlds of seeds 0-2)."""
    n = len(rows) // 3
    first, last = sum(r[k] for r in rows[:n]) / n, sum(r[k] for r in rows[-n:]) / n
    print(f"[learning] {k}: first third {first:.4f}, last third {last:.4f}, ratio {last / first:.3f}")
    return first, last


def _assert_below_ctrl(rows, ctrl, margins):
    """Each term's last-third mean < bound x the control's (the same batches at lr 0, CTRL) over the same steps."""
    assert len(rows) == len(ctrl)
    n = len(rows) // 3
    for k, bound in margins.items():
        last, base = (sum(r[k] for r in run[-n:]) / n for run in (rows, ctrl))
        print(f"[learning] {k}: last third {last:.4f}, control {base:.4f}, ratio {last / base:.3f} (< {bound})")
        assert last < bound * base, (k, last, base)


def _rows(path):
    import json
    return [r for r in map(json.loads, open(path)) if "event" not in r]


def test_pretrain_distillation_every_term_logged_and_falls(student_run, student_ctrl):
    """Every loss term is logged; those that leave their start within 24 steps fall below the lr-0 control of the
    same batches (MARGINS["pretrain"]). Not asserted: ITC, ITM and ITC-KD (ratios 0.88-0.99: ITC's plateau lasts
    ~50 steps), attn_ca (~1e-4) and ITM-KD (from ~0.03, ratios 0.01-0.47, and it falls as far without its own
    gradient)."""
    out, m = student_run
    rows = _rows(os.path.join(out, "metrics.jsonl"))
    terms = ["itc", "itm", "lm", "itc_kd", "rep_img", "rep_txt", "rep_fus", "rep_dec", "lm_kd", "attn_sa", "attn_ca",
             "attn_dec", "itm_kd"]
    for k in terms + ["lr", "grad_norm", "ms_step", "samples_s"]:
        assert k in rows[0], k
    assert len(rows) == 24
    _assert_below_ctrl(rows, student_ctrl, MARGINS["pretrain"])
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ck["step"] == 24 and ck["config"]["teacher"].endswith("last.pt") and "optimizer" in ck
    assert (ck["script"], ck["kind"]) == ("dlip", "pretrain")  # stamped (common.checkpoint.describe)
    assert os.path.isfile(os.path.join(out, "config.json"))


def test_pretrain_with_paper_style_rep_loss(world, teacher_ckpt):
    d, base, _ = world
    out = str(d / "student_mse")  # 48 steps: rep_img leaves its plateau after ~24 (seed-dependent)
    dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--max_steps", "48",
               "--lr", "2e-3", "--rep_loss", "mse", "--rep_layers", "uniform", "--out_dir", out])
    rows = _rows(os.path.join(out, "metrics.jsonl"))
    for k, bound in MARGINS["mse"].items():
        first, last = _thirds(rows, k)
        assert last < bound * first, (k, first, last)
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert any(k.startswith("rep_maps.img.0.") for k in ck["model"])  # saved for --resume
    ret = dlip.main(["--mode", "retrieval", *base, *TINY, "--init", os.path.join(out, "last.pt"), "--max_steps", "1",
                     "--out_dir", str(d / "mse_ret")])
    assert ret["final_itc"] > 0
    ft = torch.load(os.path.join(d, "mse_ret", "last.pt"), weights_only=True)
    assert not any(k.startswith("rep_maps.") for k in ft["model"])  # fine-tuning leaves the maps behind


def test_finetune_modes_and_eval(world, student_run, teacher_ckpt):
    """Retrieval and caption fine-tuning from the pretrain student, then eval mode.  Each fine-tune's saved last.pt,
    evaluated on its own (--mode eval), gives the run's test figures exactly (and the same captions: eval mode
    decodes with the prompt the checkpoint keeps); the caption fine-tune starts from the student's LM, not from
    an untrained decoder's uniform ln(vocab)."""
    import json
    import math
    d, base, root = world
    ckpt = os.path.join(student_run[0], "last.pt")
    test = ["--test_file", os.path.join(root, "pairs_test.jsonl")]
    alone = ["--teacher", "", "--report", "false", *test]  # --mode eval of a fine-tune's checkpoint, no teacher
    tests = lambda m: {k: v for k, v in m.items() if k.startswith("test_")}  # noqa: E731
    r = dlip.main(["--mode", "retrieval", *base, *TINY, "--init", ckpt, "--max_steps", "2", *test,
                   "--out_dir", str(d / "ret")])
    assert set(tests(r)) == {f"test_{k}" for k in ("itc_txt_r1", "itc_txt_r5", "itc_txt_r10", "itc_img_r1",
                                                   "itc_img_r5", "itc_img_r10", "itc_r_mean", "txt_r1", "txt_r5",
                                                   "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")}
    re_r = dlip.main(["--mode", "eval", "--task", "retrieval", *base, *TINY, "--ckpt", str(d / "ret" / "last.pt"),
                      *alone, "--out_dir", str(d / "ret_eval")])
    assert tests(re_r) == tests(r)  # ITC and ITM-re-ranked recalls of the same weights, to the last bit
    c = dlip.main(["--mode", "caption", *base, *TINY, "--init", ckpt, "--max_steps", "2", *test,
                   "--out_dir", str(d / "cap")])
    with open(os.path.join(root, "models", "bert", "config.json")) as f:
        uniform = math.log(json.load(f)["vocab_size"])  # the LM loss of an untrained (near-uniform) decoder
    print(f"[learning] caption first_lm {c['first_lm']:.4f}, ln(vocab) {uniform:.4f}")
    assert c["first_lm"] < uniform - 0.7  # seeds 0-2: 4.03, 3.99, 4.04 against 5.36
    assert {"test_BLEU-4", "test_CIDEr"} <= set(c)
    res = json.load(open(d / "cap" / "captions_test.json"))
    assert len(res) == 8 and {"image_id", "caption"} <= set(res[0])
    # the caption model keeps its prompt and eval mode decodes with it
    assert torch.load(d / "cap" / "last.pt", weights_only=True)["model_config"]["prompt"] == "a picture of "
    re_c = dlip.main(["--mode", "eval", "--task", "caption", *base, *TINY, "--ckpt", str(d / "cap" / "last.pt"),
                      *alone, "--out_dir", str(d / "cap_eval")])
    assert json.load(open(d / "cap_eval" / "captions_test.json")) == res and tests(re_c) == tests(c)
    e = dlip.main(["--mode", "eval", "--task", "all", *base, *TINY, "--ckpt", ckpt, "--teacher", teacher_ckpt,
                   *test, "--out_dir", str(d / "eval")])
    assert 0 < e["student_param_ratio_retrieval"] < 1 and e["student_gflops_retrieval"] < e["teacher_gflops_retrieval"]
    assert e["teacher_images_s"] > 0 and "test_txt_r1" in e and "test_CIDEr" in e
    # end-to-end timings (retrieval with ITM re-ranking, beam-search captioning) for both models: present only
    timed = [f"{m}_{k}_{t}" for m in ("student", "teacher") for k in ("images_s", "ms_image")
             for t in ("retrieval", "caption")]
    assert all(e[k] > 0 for k in timed + ["student_ms_ratio_retrieval", "student_ms_ratio_caption"]), timed
    _check_reports(d, student_run[0])


def test_retrieval_fine_tuning_starts_from_the_pretraining_feature_queues(student_run):
    """BLIP's train_retrieval.py loads every tensor of the pretraining checkpoint whose shape fits (models/blip.py
    load_checkpoint), the feature queues too; the image-id queue and the pointer start fresh (-100, 0)."""
    ck = torch.load(os.path.join(student_run[0], "last.pt"), weights_only=True)["model"]
    ret = dlip.load_dlip(os.path.join(student_run[0], "last.pt"), dict(has_encoder=True, has_decoder=False,
                                                                       tie_decoder=False, momentum=True))
    assert torch.equal(ret.image_queue, ck["image_queue"]) and torch.equal(ret.text_queue, ck["text_queue"])
    assert (ck["idx_queue"] != -100).any() and (ret.idx_queue == -100).all() and int(ret.queue_ptr) == 0
    small = dlip.load_dlip(os.path.join(student_run[0], "last.pt"), dict(momentum=True), queue_size=8)
    assert small.image_queue.shape[1] == 8 and not torch.equal(small.image_queue, ck["image_queue"][:, :8])


def _check_reports(d, student_dir):
    """Every run above wrote report.html (issue 21): pictures decode, svgs parse, the promised sections are there."""
    from common.report import read_report
    info = read_report(d / "eval" / "report.html")  # eval with a teacher: 8 test images, 4 text queries
    assert {"Training and eval", "Captions (test)", "Text -> image, ITC top-5 (test)"} <= set(info["sections"])
    assert info["images"] == 2 * 8 + 4 * 2 * 5  # captions and top-5, each for the teacher and the student
    page = (d / "eval" / "report.html").read_text()
    assert page.count("<h3>teacher</h3>") == page.count("<h3>student</h3>") == 1 + 4 and "No teacher" not in page
    own = read_report(d / "teacher" / "report.html")  # plain BLIP, no teacher: the model alone, and said so
    assert {"Training and eval", "Teacher", "Captions (val)", "Text -> image, ITC top-5 (val)"} <= set(own["sections"])
    assert own["images"] == 8 + 4 * 5 and own["svgs"] >= 2
    assert "No teacher in this run" in (d / "teacher" / "report.html").read_text()
    ret, cap = read_report(d / "ret" / "report.html"), read_report(d / "cap" / "report.html")
    assert "Text -> image, ITC top-5 (test)" in ret["sections"] and "Captions (test)" not in ret["sections"]
    assert "Captions (test)" in cap["sections"] and "Text -> image, ITC top-5 (test)" not in cap["sections"]
    assert read_report(os.path.join(student_dir, "report.html"))["svgs"] >= 2  # no eval split: the curves


def test_eval_streams_its_images_and_gets_the_figures_of_one_tensor_of_them_all(world, student_run, monkeypatch):
    """Issue 17.10: the eval decodes its images one batch at a time (COCO's test split as one tensor: ~9 GB of
    RAM) and gets the same figures and captions as from one (N, 3, S, S) tensor of every image."""
    import json
    d, base, root = world
    args = ["--mode", "eval", "--task", "all", *base, *TINY, "--ckpt", os.path.join(student_run[0], "last.pt"),
            "--teacher", "", "--report", "false", "--eval_batch", "3", "--test_file",
            os.path.join(root, "pairs_test.jsonl")]
    get, held = dlip.EvalImages.__getitem__, []

    def batch(self, key):
        x = get(self, key)
        held.append(len(x) if x.dim() == 4 else 1)
        return x
    monkeypatch.setattr(dlip.EvalImages, "__getitem__", batch)
    streamed = dlip.main([*args, "--out_dir", str(d / "streamed")])
    assert held and max(held) == 3  # of the 8 images, at most one eval batch at a time

    class InRam:  # the eval before streaming: every image decoded up front into one tensor
        def __init__(self, images):
            self.loader, self.all = images.loader, images[:]

        def __len__(self):
            return len(self.all)

        def __getitem__(self, key):
            return self.all[key]
    real = dlip.eval_set
    monkeypatch.setattr(dlip, "eval_set", lambda *a: (lambda r: (r[0], InRam(r[1]), *r[2:]))(real(*a)))
    in_ram = dlip.main([*args, "--out_dir", str(d / "in_ram")])
    figures = lambda m: {k: v for k, v in m.items() if k.startswith("test_")}  # noqa: E731
    assert figures(streamed) == figures(in_ram) and {"test_txt_r1", "test_CIDEr"} <= set(figures(in_ram))
    caps = [json.load(open(d / r / "captions_test.json")) for r in ("streamed", "in_ram")]
    assert caps[0] == caps[1] and len(caps[0]) == 8


def _drop(args, *flags):
    out = list(args)
    for f in flags:
        del out[out.index(f):out.index(f) + 2]
    return out


def test_eval_mode_evaluates_at_the_checkpoints_image_size_and_text_length(world, tmp_path, monkeypatch, capsys):
    """--mode eval takes image_size and max_len from the checkpoint unless the command line gives them (before,
    the preset's values resized a fine-tuned model's position embeddings: the paper preset's 384 px to 224)."""
    d, base, root = world
    tiny = _drop(TINY, "--image_size", "--max_len")  # the toy preset's: 64 px, 24 tokens
    dlip.main(["--mode", "pretrain", *base, *tiny, *_width(32), "--image_size", "48", "--max_len", "12",
               "--teacher", "", "--max_steps", "1", "--report", "false", "--out_dir", str(tmp_path / "p48")])
    seen, real, lens, tokenize = [], dlip.eval_set, [], dlip.tokenize
    monkeypatch.setattr(dlip, "eval_set", lambda path, cfg, size: seen.append((size, cfg.max_len)) or
                        real(path, cfg, size))
    monkeypatch.setattr(dlip, "tokenize", lambda tok, caps, n, dev: lens.append(n) or tokenize(tok, caps, n, dev))
    args = ["--mode", "eval", "--task", "retrieval", *base, *tiny, "--ckpt", str(tmp_path / "p48" / "last.pt"),
            "--teacher", "", "--report", "false", "--test_file", os.path.join(root, "pairs_val.jsonl")]
    dlip.main([*args, "--out_dir", str(tmp_path / "e48")])
    assert seen == [(48, 12)]
    assert "eval at image_size 48, max_len 12 (the checkpoint's: image_size, max_len; given: -)" in \
        capsys.readouterr().out
    assert lens == [35]  # the retrieval texts: BLIP's evaluation() tokenises at 35 whatever the training length
    dlip.main([*args, "--image_size", "32", "--out_dir", str(tmp_path / "e32")])
    assert seen == [(48, 12), (32, 12)]


def test_momentum_encoders_take_one_ema_step_per_optimizer_step(world, tmp_path):
    """With gradient accumulation the momentum copies move once per optimizer step, as BLIP's do at one micro batch
    a step (before: once per micro batch, an EMA of 0.5^2 here). Accumulation 2, momentum 0.5: the momentum copies
    after step 2 are 0.5 * (step 1's momentum copies) + 0.5 * (step 1's online weights)."""
    d, base, _ = world
    args = ["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", "", "--micro_batch", "4", "--momentum",
            "0.5", "--lr", "1e-3", "--report", "false"]
    ck = []
    for n in (1, 2):
        dlip.main([*args, "--max_steps", str(n), "--out_dir", str(tmp_path / f"s{n}")])
        ck.append(torch.load(tmp_path / f"s{n}" / "last.pt", weights_only=True)["model"])
    moved = 0
    for k in (k for k in ck[0] if "_m." in k):
        online = ck[0][k.replace("_m.", ".", 1)]
        torch.testing.assert_close(ck[1][k], 0.5 * ck[0][k] + 0.5 * online)
        moved += not torch.equal(ck[0][k], online)
    assert moved > 20  # the online weights had moved away from their copies


def test_pretrain_without_momentum_trains_in_batch_itc_and_fine_tunes_with_momentum(world, teacher_ckpt):
    """--no_momentum true: a student without EMA copies or queues trains ITC (in-batch, against the global batch),
    distils with every term (the V2 ITC distillation in-batch), saves no momentum copies, and a retrieval
    fine-tuning with momentum starts its copies from the online weights (before: ITC was dropped, ITC-KD crashed
    and --init named the missing copies)."""
    d, base, _ = world
    out = str(d / "no_momentum")
    dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--max_steps", "6",
               "--lr", "2e-3", "--no_momentum", "true", "--report", "false", "--out_dir", out])
    rows = _rows(os.path.join(out, "metrics.jsonl"))  # (ITC's fall: the short run on one batch above)
    assert len(rows) == 6 and all(k in rows[0] and rows[0][k] > 0 for k in ("itc", "itc_kd", "itm", "lm"))
    assert not any("_m." in k or "queue" in k for k in torch.load(os.path.join(out, "last.pt"), weights_only=True)[
        "model"])
    ret = dlip.main(["--mode", "retrieval", *base, *TINY, "--init", os.path.join(out, "last.pt"), "--max_steps", "1",
                     "--report", "false", "--out_dir", str(d / "no_momentum_ret")])
    w = torch.load(d / "no_momentum_ret" / "last.pt", weights_only=True)["model"]
    assert ret["final_itc"] > 0 and any("_m." in k for k in w)


def test_fine_tuning_tests_the_best_val_epoch(world, student_run, monkeypatch):
    """BLIP's train_retrieval.py / train_caption.py: val every epoch, the best val r_mean (CIDEr + BLEU-4) kept as
    best.pt, the test split evaluated with its weights. Retrieval: val scores forced to fall, so epoch 1 of 2 wins."""
    d, base, root = world
    ckpt, real, vals, tested = os.path.join(student_run[0], "last.pt"), dlip.evaluate, iter([60.0, 40.0]), []

    def evaluate(cfg, model, tok, dist, device, dtype, path, split, log, shown=None):
        out = real(cfg, model, tok, dist, device, dtype, path, split, log, shown)
        if split == "test":
            tested.append({k: v.clone() for k, v in model.state_dict().items()})
        return dict(out, val_r_mean=next(vals)) if split == "val" else out
    monkeypatch.setattr(dlip, "evaluate", evaluate)
    splits = ["--val_file", os.path.join(root, "pairs_val.jsonl"),
              "--test_file", os.path.join(root, "pairs_test.jsonl")]
    r = dlip.main(["--mode", "retrieval", *base, *TINY, "--init", ckpt, "--epochs", "2", "--lr", "1e-3", *splits,
                   "--report", "false", "--out_dir", str(d / "ret_best")])
    assert (r["best_epoch"], r["best_step"], r["val_r_mean"]) == (1.0, 5, 60.0) and "test_r_mean" in r
    best, last = (torch.load(d / "ret_best" / f, weights_only=True) for f in ("best.pt", "last.pt"))
    assert (best["step"], last["step"], best["kind"]) == (5, 10, "retrieval") and len(tested) == 1
    assert all(torch.equal(tested[0][k], v) for k, v in best["model"].items())  # the test ran on best.pt
    assert any(not torch.equal(last["model"][k], v) for k, v in best["model"].items())
    monkeypatch.setattr(dlip, "evaluate", real)
    c = dlip.main(["--mode", "caption", *base, *TINY, "--init", ckpt, "--epochs", "2", *splits, "--report", "false",
                   "--out_dir", str(d / "cap_best")])
    assert c["best_epoch"] in (1.0, 2.0) and {"val_CIDEr", "test_CIDEr"} <= set(c)
    assert torch.load(d / "cap_best" / "best.pt", weights_only=True)["step"] == 5 * c["best_epoch"]


def test_caption_fine_tuning_distils_a_teacher_decoder(world, student_run, teacher_ckpt):
    """--ft_distill: caption fine-tuning also matches a frozen teacher decoder (logit KL and last-layer decoder
    attention KL on the prompted caption). Against itself both terms are 0; against the teacher they fall."""
    d, base, _ = world
    dlip.main(["--mode", "caption", *base, *TINY, "--init", teacher_ckpt, "--max_steps", "2",
               "--out_dir", str(d / "t_cap")])
    t_cap = str(d / "t_cap" / "last.pt")
    same = dlip.main(["--mode", "caption", *base, *TINY, "--init", t_cap, "--ft_distill", "true", "--teacher", t_cap,
                      "--max_steps", "1", "--out_dir", str(d / "self_kd")])
    assert abs(same["first_lm_kd"]) < 1e-6 and abs(same["first_attn_dec"]) < 1e-6, same
    ft_kd = ["--mode", "caption", *base, *TINY, "--init", os.path.join(student_run[0], "last.pt"),
             "--ft_distill", "true", "--teacher", t_cap, "--max_steps", "60", "--lr", "2e-3"]
    dlip.main(ft_kd + ["--out_dir", str(d / "ft_kd")])
    dlip.main(ft_kd + [*CTRL, "--out_dir", str(d / "ft_kd_ctrl")])  # the same batches, no update
    rows, ctrl = _rows(d / "ft_kd" / "metrics.jsonl"), _rows(d / "ft_kd_ctrl" / "metrics.jsonl")
    _assert_below_ctrl(rows, ctrl, MARGINS["ft_distill"])
    with pytest.raises(ValueError, match="ft_distill"):
        dlip.main(["--mode", "pretrain", *base, *TINY, "--ft_distill", "true", "--max_steps", "1",
                   "--out_dir", str(d / "pre_kd")])


def test_retrieval_fine_tuning_distils_a_teacher(world, student_run, teacher_ckpt, capsys):
    """--ft_distill in retrieval fine-tuning: the encoders' terms of pretraining (ITC-KD, the representation and
    attention terms, ITM-KD when weighted) against a frozen fine-tuned teacher, whose decoder is not loaded.
    Against itself every term but the soft-target ITC-KD is 0; against the teacher they fall. A student whose heads
    no teacher aligned is warned about: this distillation swamps its fine-tuning (docs/dlip.md)."""
    d, base, _ = world
    dlip.main(["--mode", "retrieval", *base, *TINY, "--init", teacher_ckpt, "--max_steps", "2",
               "--out_dir", str(d / "t_ret")])
    t_ret = str(d / "t_ret" / "last.pt")
    same = dlip.main(["--mode", "retrieval", *base, *TINY, "--init", t_ret, "--ft_distill", "true", "--teacher",
                      t_ret, "--w_itm_kd", "1", "--max_steps", "1", "--out_dir", str(d / "self_ret_kd")])
    zero = ("rep_img", "rep_txt", "rep_fus", "attn_sa", "attn_ca", "itm_kd")
    assert all(abs(same["first_" + k]) < 1e-5 for k in zero), same
    assert "first_itc_kd" in same and not {"first_lm_kd", "first_rep_dec", "first_attn_dec"} & set(same)
    ret_kd = ["--mode", "retrieval", *base, *TINY, "--init", os.path.join(student_run[0], "last.pt"),
              "--ft_distill", "true", "--teacher", t_ret, "--max_steps", "30", "--lr", "1e-3"]
    dlip.main(ret_kd + ["--out_dir", str(d / "ret_kd")])
    dlip.main(ret_kd + [*CTRL, "--out_dir", str(d / "ret_kd_ctrl")])  # the same batches, no update
    rows, ctrl = _rows(d / "ret_kd" / "metrics.jsonl"), _rows(d / "ret_kd_ctrl" / "metrics.jsonl")
    with capsys.disabled():  # the [learning] ratios stay visible (-s)
        _assert_below_ctrl(rows, ctrl, MARGINS["ft_distill_ret"])
    assert "starts far from" not in capsys.readouterr().out  # a student distilled from the teacher: aligned
    dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", "", "--max_steps", "1",
               "--report", "false", "--out_dir", str(d / "no_kd")])  # a student no teacher aligned
    dlip.main(["--mode", "retrieval", *base, *TINY, "--init", str(d / "no_kd" / "last.pt"), "--ft_distill", "true",
               "--teacher", t_ret, "--max_steps", "1", "--report", "false", "--out_dir", str(d / "no_kd_ret")])
    assert "text head starts far from the teacher's" in capsys.readouterr().out


def test_resume_continues_exactly(world, teacher_ckpt):
    d, base, _ = world
    args = ["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--lr", "1e-3",
            "--dropout", "0.1"]
    full = dlip.main([*args, "--max_steps", "4", "--out_dir", str(d / "full")])
    dlip.main([*args, "--max_steps", "2", "--out_dir", str(d / "half")])
    shutil.copy(d / "half" / "last.pt", d / "step2.pt")
    resumed = dlip.main([*args, "--max_steps", "4", "--resume", str(d / "half" / "last.pt"),
                         "--out_dir", str(d / "half")])
    for k in ("final_loss", "final_itc", "final_itm", "final_lm_kd", "final_attn_ca"):
        assert resumed[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k
    # resuming from step 2 again into the same run directory: metrics.jsonl keeps every step once
    again = dlip.main([*args, "--max_steps", "4", "--resume", str(d / "step2.pt"), "--out_dir", str(d / "half")])
    assert again["final_loss"] == pytest.approx(full["final_loss"], rel=1e-5, abs=1e-6)
    assert [r["step"] for r in _rows(d / "half" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_names_a_changed_config_and_refuses_it_unless_asked(world, teacher_ckpt, capsys):
    d, base, _ = world
    args = ["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", "", "--lr", "1e-3", "--max_steps", "2"]
    dlip.main([*args, "--out_dir", str(d / "r1")])
    resume = ["--max_steps", "3", "--resume", str(d / "r1" / "last.pt"), "--out_dir", str(d / "r2")]
    with pytest.raises(CheckpointMismatch, match=r"global_batch 8 -> 4, micro_batch 8 -> 4, lr 0.001 -> 0.002"):
        dlip.main([*args, *resume, "--lr", "2e-3", "--global_batch", "4", "--micro_batch", "4"])
    out = dlip.main([*args, *resume, "--lr", "2e-3", "--resume_changes", "true"])
    assert "resume changes the config: lr 0.001 -> 0.002" in capsys.readouterr().out and out["final_loss"] > 0
    with pytest.raises(CheckpointMismatch, match="dlip teacher checkpoint; dlip expects a dlip retrieval"):
        dlip.main([*args, *resume, "--mode", "retrieval", "--init", str(d / "r1" / "last.pt")])


def test_fine_tuning_resume_refuses_a_changed_schedule_length(world, student_run, tmp_path, capsys):
    """Fine-tuning's cosine schedule runs over max_steps (or epochs): a resume that changes them would reshape the
    lr of every later step (before: accepted silently, both are in RESUME_FREE). Pretraining's step decay reads
    neither (test_resume_names_a_changed_config_and_refuses_it_unless_asked resumes with a longer --max_steps)."""
    d, base, _ = world
    args = ["--mode", "retrieval", *base, *TINY, "--init", os.path.join(student_run[0], "last.pt"), "--report",
            "false", "--out_dir", str(tmp_path / "ft")]
    dlip.main([*args, "--max_steps", "1"])
    resume = [*args, "--max_steps", "2", "--resume", str(tmp_path / "ft" / "last.pt")]
    with pytest.raises(CheckpointMismatch, match=r"resume changes the config: max_steps 1 -> 2"):
        dlip.main(resume)
    assert dlip.main([*resume, "--resume_changes", "true"])["final_itc"] > 0
    assert "max_steps 1 -> 2 (allowed by --resume_changes)" in capsys.readouterr().out


def test_fine_tuning_validates_an_epoch_before_its_save_and_a_resume_keeps_the_best(world, student_run, monkeypatch):
    """At an epoch end that is also a --save_every step, val (and best.pt) come before last.pt, which records the
    best val so far: a run killed right after that save and resumed validates each epoch once and tests the same
    best epoch as an unbroken run (before: last.pt came first, so the resumed run never validated epoch 1 and
    took epoch 2). A resume into a directory without the run's best.pt is refused (before: any best.pt there
    was trusted). Val scores forced to fall (60, 40): epoch 1 of 2 wins."""
    d, base, root = world
    real_eval, real_save, kill, seen = dlip.evaluate, dlip.save, [], []

    class Killed(Exception):
        pass

    def evaluate(cfg, model, tok, dist, device, dtype, path, split, log, shown=None):
        out = real_eval(cfg, model, tok, dist, device, dtype, path, split, log, shown)
        step = _rows(os.path.join(cfg.out_dir, "metrics.jsonl"))[-1]["step"]
        seen.append((os.path.basename(cfg.out_dir), step))
        return dict(out, val_r_mean={5: 60.0, 10: 40.0}[step]) if split == "val" else out

    def save(cfg, model, opt, scaler, step, *a, **kw):
        real_save(cfg, model, opt, scaler, step, *a, **kw)
        if kill and step == 5 and (a[3:] or [kw.get("name", "last.pt")])[0] == "last.pt":
            shutil.copy(os.path.join(cfg.out_dir, "last.pt"), d / "ep1_last.pt")
            raise Killed
    monkeypatch.setattr(dlip, "evaluate", evaluate)
    monkeypatch.setattr(dlip, "save", save)
    args = ["--mode", "retrieval", *base, *TINY, "--init", os.path.join(student_run[0], "last.pt"), "--epochs", "2",
            "--lr", "1e-3", "--save_every", "5", "--val_file", os.path.join(root, "pairs_val.jsonl"), "--report",
            "false"]
    full = dlip.main([*args, "--out_dir", str(d / "ep_full")])
    kill.append(True)
    with pytest.raises(Killed):
        dlip.main([*args, "--out_dir", str(d / "ep_killed")])
    kill.clear()
    resumed = dlip.main([*args, "--resume", str(d / "ep1_last.pt"), "--out_dir", str(d / "ep_killed")])
    assert seen == [("ep_full", 5), ("ep_full", 10), ("ep_killed", 5), ("ep_killed", 10)]
    for m in (full, resumed):
        assert (m["best_epoch"], m["best_step"], m["val_r_mean"]) == (1.0, 5, 60.0)
    best = [torch.load(d / r / "best.pt", weights_only=True)["model"] for r in ("ep_full", "ep_killed")]
    assert all(torch.equal(v, best[1][k]) for k, v in best[0].items())
    with pytest.raises(ValueError, match="is not the best val epoch \\(step 5\\) that last.pt records"):
        dlip.main([*args, "--resume", str(d / "ep1_last.pt"), "--out_dir", str(d / "ep_elsewhere")])


def test_eval_mode_refuses_a_missing_test_file_and_a_task_the_checkpoint_cannot_run(world, tmp_path):
    """--mode eval --task retrieval|caption|all reads --test_file: without one it wrote metrics_eval.json as {} (the
    paper preset has none); a caption task on a checkpoint without a decoder (retrieval without a text encoder) was
    skipped. Both refused before any evaluation; --task efficiency needs no file."""
    d, base, root = world
    _, special = dlip.load_tokenizer(os.path.join(root, "models", "bert"))
    c = dlip.ModelConfig(image_size=32, patch_size=8, vit_width=64, vit_layers=1, vit_heads=1, vit_mlp=128,
                         text_width=64, text_layers=1, text_heads=1, text_ffn=128, momentum=False, **special)
    for name, kw in (("ret.pth", dict(has_decoder=False)), ("cap.pth", dict(has_encoder=False, tie_decoder=False))):
        torch.save({"model": dlip.BLIP(replace(c, **kw)).state_dict()}, tmp_path / name)
    args = ["--mode", "eval", *base, *TINY, "--teacher", "", "--report", "false", "--out_dir", str(tmp_path / "e")]
    for task in ("retrieval", "caption", "all"):  # a --ckpt that does not exist: refused before it is read
        with pytest.raises(ValueError, match=f"--task {task} reads --test_file \\(not given: no such file\\)"):
            dlip.main([*args, "--task", task, "--ckpt", str(tmp_path / "none.pth")])
    test = ["--test_file", os.path.join(root, "pairs_val.jsonl")]
    for task, name, part in (("caption", "ret.pth", "decoder"), ("retrieval", "cap.pth", "encoder")):
        with pytest.raises(ValueError, match=f"--task {task}: --ckpt .*{name} has no text {part}"):
            dlip.main([*args, *test, "--task", task, "--ckpt", str(tmp_path / name)])
    assert not (tmp_path / "e" / "metrics_eval.json").exists()
    with pytest.raises(ValueError, match="--task must be"):
        dlip.main([*args, *test, "--task", "retreival", "--ckpt", str(tmp_path / "ret.pth")])
    out = dlip.main([*args, "--task", "efficiency", "--ckpt", str(tmp_path / "ret.pth")])
    assert out["student_images_s"] > 0 and not any(k.startswith("test_") for k in out)


def test_eval_every_without_a_val_file_and_a_mistyped_choice_flag_stop_before_training(world, tmp_path,
                                                                                        monkeypatch):
    """--eval_every N without --val_file read "" after N training steps; --itc_kd / --lr_schedule values other
    than v2 / cosine quietly ran kl / the step decay (--rep_loss / --rep_layers: only once a teacher loaded).
    All are refused by main() with a one-line error naming the flag, before train() starts."""
    _, base, _ = world

    def train(*a, **k):
        raise AssertionError("train() started")
    monkeypatch.setattr(dlip, "train", train)
    args = ["--mode", "pretrain", *base, *TINY, "--teacher", "", "--max_steps", "4", "--out_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"^--eval_every 2 needs --val_file \(none given\)$"):
        dlip.main([*args, "--eval_every", "2"])
    for flag, bad, ok in (("itc_kd", "V2", "v2|kl"), ("lr_schedule", "cos", "step|cosine"),
                          ("rep_loss", "cosine", "cos|mse"), ("rep_layers", "all", "last|uniform")):
        with pytest.raises(ValueError, match=re.escape(f"--{flag} must be {ok}, got '{bad}'")):
            dlip.main([*args, f"--{flag}", bad])


def test_eval_all_goes_without_an_absent_default_teacher_and_efficiency_asks_for_it(world, tmp_path, monkeypatch):
    """--mode eval (--task all, the default) loaded --teacher even when that path did not exist: with the default
    runs/dlip_toy_teacher/last.pt absent, `--mode eval --ckpt X --test_file Y` stopped. Now --task all (and the
    report) use the teacher when its path exists; --task efficiency, a student / teacher comparison, still loads it."""
    _, base, root = world
    _, special = dlip.load_tokenizer(os.path.join(root, "models", "bert"))
    c = dlip.ModelConfig(image_size=32, patch_size=8, vit_width=64, vit_layers=1, vit_heads=1, vit_mlp=128,
                         text_width=64, text_layers=1, text_heads=1, text_ffn=128, momentum=False, **special)
    torch.save({"model": dlip.BLIP(replace(c, has_decoder=False)).state_dict()}, tmp_path / "ret.pth")
    monkeypatch.chdir(tmp_path)  # no runs/dlip_toy_teacher/last.pt here: the default --teacher is absent
    args = ["--mode", "eval", *base, *TINY, "--ckpt", str(tmp_path / "ret.pth"), "--out_dir", str(tmp_path / "e")]
    out = dlip.main([*args, "--test_file", os.path.join(root, "pairs_val.jsonl")])
    assert "test_itc_txt_r1" in out and out["student_images_s"] > 0 and not any("teacher" in k for k in out)
    assert "No teacher in this run: the student is shown alone." in (tmp_path / "e" / "report.html").read_text()
    with pytest.raises(FileNotFoundError, match="runs/dlip_toy_teacher/last.pt"):
        dlip.main([*args, "--task", "efficiency", "--report", "false"])


def test_checkpoints_of_other_scripts_are_named_not_keyerrors(world, tmp_path):
    """--init/--teacher/--resume/--ckpt with another script's checkpoint (stamped, or an old unstamped one)."""
    d, base, _ = world
    other, old = tmp_path / "bp.pt", tmp_path / "old.pt"
    torch.save({"script": "blip2_pformer", "kind": "stage 1", "config": {"stage": "1"}, "model": {}}, other)
    torch.save({"config": {"bridge": "xattn"}, "model": {"proj.weight": torch.zeros(1)}}, old)
    for flag, mode in (("--init", "retrieval"), ("--teacher", "pretrain"), ("--resume", "pretrain"),
                       ("--ckpt", "eval")):
        for path, what in ((other, "blip2_pformer stage 1"), (old, r"perceiver_caption \(unstamped\)")):
            extra = {"--resume": ["--teacher", ""], "--ckpt": ["--task", "efficiency"]}.get(flag, [])
            with pytest.raises(CheckpointMismatch, match=f"{flag} .*: this is a {what} checkpoint; dlip expects"):
                dlip.main(["--mode", mode, *base, *TINY, *_width(32), *extra, flag, str(path), "--max_steps", "1",
                           "--out_dir", str(tmp_path / "run")])


def _image_world(root, tmp_path, n, n_bad):
    """n toy images with one caption each (an epoch = n pairs), the first n_bad corrupt, in a folder of their own."""
    import json
    recs = [json.loads(line) for line in open(os.path.join(root, "pairs_train.jsonl"))][:n]
    recs = [dict(r, captions=r["captions"][:1]) for r in recs]
    img = tmp_path / f"img_{n}_{n_bad}"
    img.mkdir()
    for i, r in enumerate(recs):
        name = os.path.basename(r["image"])
        if i < n_bad:
            (img / name).write_bytes(b"\x89PNG not really")
        else:
            shutil.copy(os.path.join(root, r["image"]), img / name)
        r["image"] = name
    (img / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return ["--image_root", str(img), "--train_files", str(img / "pairs.jsonl")]


def test_unreadable_images_counted_once_reported_and_limited(world, tmp_path, capsys):
    """The one bad-image rule: a corrupt image drawn in every epoch (and read in a DataLoader worker) counts once
    and is reported; more than max_bad_frac of the distinct images tried stops the run; none readable is a
    one-line DataError."""
    from common.data import DataError
    d, base, root = world
    args = ["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", "", "--out_dir", str(tmp_path / "run")]
    dlip.main([*args, *_image_world(root, tmp_path, 40, 1), "--max_steps", "12", "--num_workers", "1"])
    assert "training images: 1 of 40 images unreadable" in capsys.readouterr().out  # 2.5% < 5%: trains
    with pytest.raises(DataError, match=r"too many unreadable images .* 8 of \d+ images unreadable"):
        dlip.main([*args, *_image_world(root, tmp_path, 40, 8), "--max_steps", "12"])
    with pytest.raises(DataError) as e:
        dlip.main([*args, *_image_world(root, tmp_path, 8, 8), "--max_steps", "1"])
    assert "8 of 8 images unreadable" in str(e.value) and "\n" not in str(e.value)


def test_an_unreadable_image_with_many_captions_is_skipped_whole_and_reported_once(tmp_path):
    """An unreadable image's pair is replaced by the next record's first pair, not by the same record's next
    caption (the same image): before, an image with 20+ captions (Visual Genome regions, ~50 per image) raised
    "20 unreadable images in a row" although 1 of 4 images was bad."""
    import json
    from PIL import Image
    from common.data import read_pairs
    for n in range(3):
        Image.new("RGB", (40, 40), (60 * n, 0, 0)).save(tmp_path / f"{n}.png")
    recs = [{"image": "missing.png", "captions": [f"region {j}" for j in range(25)]}]
    recs += [{"image": f"{n}.png", "captions": [f"square {n}", f"red {n}"]} for n in range(3)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    aug = dlip.ImageTransform(32, train=True, uint8=True)
    ds = dlip.PairsDataset(read_pairs(str(tmp_path / "pairs.jsonl")), str(tmp_path), aug, 0, 30, 0.3)
    for k in (0, 12, 24):
        image, cap, i, tried, bad = ds[(0, k)]
        assert (cap, i, tried, bad) == ("square 0", 1, ["missing.png", "0.png"], ["missing.png"]), k
        assert image.shape == (3, 32, 32)
    assert ds[(0, 30)][1:4] == ("red 2", 3, ["2.png"])
    assert ds.loader.report() == "1 of 3 images unreadable (e.g. ['missing.png'])"


def _one_process_and_two_ranks(args, out_one, out_two):
    """dlip.main(args) in this process, and the same args on 2 gloo ranks at micro batch 4 (torchrun) ->
    (the one run's metrics, the two ranks' metrics_pretrain.json, the torchrun process)."""
    import json
    one = dlip.main([*args, "--out_dir", str(out_one)])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "dlip.py", *args,
           "--micro_batch", "4", "--out_dir", str(out_two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, json.load(open(out_two / "metrics_pretrain.json")), proc


def test_two_process_gloo_matches_one_process(world, teacher_ckpt):
    """Global batch 8 as 1 x 8 and as 2 ranks x 4: ITC candidates are the gathered global batch, hard negatives are
    drawn from the global batch with a step-seeded generator, token-averaged losses divide by the global token
    count -- so the losses and the updated weights must agree. The test split (7 images, 35 texts) is encoded 4 + 3
    and 18 + 17 rows by the two ranks and gathered (issue 18.10): the same retrieval and caption scores."""
    d, base, root = world
    args = ["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--max_steps", "2",
            "--lr", "1e-3", "--w_itm_kd", "1", "--test_file", os.path.join(root, "pairs_val.jsonl"),
            "--max_eval_images", "7"]
    one, two, proc = _one_process_and_two_ranks(args, d / "one", d / "two")
    assert "test (0 of 4 images unreadable)" in proc.stdout, proc.stdout[-2000:]  # rank 0 decoded its shard only
    tests = [k for k in one if k.startswith("test_")]
    assert len(tests) > 10 and {k: two[k] for k in tests} == pytest.approx({k: one[k] for k in tests}, abs=1e-6)
    for k in ("first_itc", "first_itm", "first_lm", "first_lm_kd", "first_attn_dec", "final_loss", "final_itm_kd"):
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-5), (k, one[k], two[k])
    w1 = torch.load(d / "one" / "last.pt", weights_only=True)["model"]
    two_ck = torch.load(d / "two" / "last.pt", weights_only=True)
    w2 = two_ck["model"]
    assert len(two_ck["rng"]) == 2 and not torch.equal(two_ck["rng"][0]["torch"], two_ck["rng"][1]["torch"])
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-3)


def test_two_process_gloo_matches_one_process_without_momentum(world, teacher_ckpt):
    """--no_momentum: ITC contrasts each rank's features with the global batch's, gathered with gradient, and the V2
    ITC distillation with the gathered teacher features; 1 x 8 and 2 ranks x 4 give the same losses and weights."""
    d, base, _ = world
    args = ["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--max_steps", "2",
            "--lr", "1e-3", "--no_momentum", "true", "--report", "false"]
    one, two, _ = _one_process_and_two_ranks(args, d / "one_nm", d / "two_nm")
    for k in ("first_itc", "first_itc_kd", "first_itm", "final_itc", "final_itc_kd", "final_loss"):
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-5), (k, one[k], two[k])
    w1 = torch.load(d / "one_nm" / "last.pt", weights_only=True)["model"]
    w2 = torch.load(d / "two_nm" / "last.pt", weights_only=True)["model"]
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


def test_pretrain_epoch_is_every_image_caption_pair_once_and_schedules_per_pair_epoch(world, tmp_path, monkeypatch,
                                                                                        capsys):
    """Issue 17.1: a pretraining epoch iterates every (image, caption) pair once (salesforce/BLIP
    data/pretrain_dataset.py), not one caption per image, and the per-epoch lr decay counts those epochs.
    Issue 17.2: the start-up log names the ITC negatives each sample really has (accumulation 2 halves the batch)."""
    import json
    from collections import Counter
    from common.data import pre_caption
    d, base, _ = world
    seen, tokenize = [], dlip.tokenize
    monkeypatch.setattr(dlip, "tokenize", lambda tok, caps, *a, **k: seen.extend(caps) or tokenize(tok, caps, *a, **k))
    out = tmp_path / "pairs"
    dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", "", "--max_steps", "6", "--lr", "1e-3",
               "--lr_decay", "0.5", "--micro_batch", "4", "--report", "false", "--out_dir", str(out)])
    assert "ITC negatives per sample: 19 = 4 x 1 ranks - 1 + queue 16 (global batch 8 in one pass: 23)" in \
        capsys.readouterr().out
    recs = [json.loads(line) for line in open(base[base.index("--train_files") + 1])]
    pairs = Counter(pre_caption(c, 30) for r in recs for c in r["captions"])  # 8 images x 5 captions
    assert len(seen) == 48 and Counter(seen[:40]) == pairs  # epoch 0 = steps 0-4 of 8 pairs
    lrs = [r["lr"] for r in _rows(out / "metrics.jsonl")]
    assert lrs[:5] == [pytest.approx(1e-3)] * 5 and lrs[5] == pytest.approx(5e-4)


def test_paper_preset_reranks_the_itc_top_256_as_blip_on_coco(monkeypatch):
    """Issue 17.10: k_test 256 (salesforce/BLIP configs/retrieval_coco.yaml) in the paper preset's COCO evals."""
    from common.config import parse_config
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for mode in ("pretrain", "retrieval", "eval"):
        argv = ["--preset", "paper", "--mode", mode]
        assert dlip.resolve(parse_config(dlip.Config, dlip.PRESETS, argv), argv).k_test == 256, mode


def test_pretraining_warms_up_in_epoch_0_only_and_captions_fine_tune_5_epochs(monkeypatch):
    """salesforce/BLIP pretrain.py warms up only while epoch == 0, then sets init_lr * lr_decay ** epoch: with
    COCO + VG (~1159 steps an epoch at batch 1152) the warm-up of 3000 steps is cut at the epoch's end.  Caption
    fine-tuning runs configs/caption_coco.yaml's max_epoch: 5."""
    from common.config import parse_config
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = dlip.resolve(parse_config(dlip.Config, dlip.PRESETS, a := ["--preset", "paper", "--mode", "pretrain"]), a)
    assert (cfg.warmup_steps, cfg.lr_schedule) == (3000, "step")
    blip = lambda step: (min(cfg.lr, cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / 3000) if step < 1159  # noqa
                         else cfg.lr * cfg.lr_decay ** (step // 1159))
    for step in (0, 500, 1158, 1159, 2000, 2999, 3000, 5000):
        assert dlip.lr_at(cfg, step, 20 * 1159, 1159) == pytest.approx(blip(step)), step
    cap = dlip.resolve(parse_config(dlip.Config, dlip.PRESETS, a := ["--preset", "paper", "--mode", "caption"]), a)
    assert cap.epochs == 5


def test_paper_presets_fit_the_micro_batch_to_the_world_size_before_any_model(capsys):
    """README's `torchrun --nproc_per_node=8 dlip.py --preset paper`: 1152 = 8 ranks x micro 288 x accumulation 0
    stopped in StepSampler once the models had loaded.  resolve() (main: before any model or data) now runs the
    largest micro batch that divides a rank's share, the global batch unchanged: 8 x 144; the retrieval recipe's
    256 on 16 ranks: 16 x 16; a fitting one stays; eval trains nothing and keeps its flags."""
    from common.config import parse_config
    from common.dist import Dist
    run = lambda world, *a: dlip.resolve(parse_config(dlip.Config, dlip.PRESETS, list(a)), list(a),  # noqa: E731
                                         Dist(world_size=world))
    cfg = run(8, "--preset", "paper", "--mode", "pretrain")
    assert (cfg.global_batch, cfg.micro_batch) == (1152, 144)
    out = capsys.readouterr().out
    assert "--micro_batch 144, not 288: 8 processes x 144 x accumulation 1 = --global_batch 1152" in out
    assert run(4, "--preset", "paper", "--mode", "pretrain").micro_batch == 288 and not capsys.readouterr().out
    assert run(16, "--preset", "paper", "--mode", "retrieval").micro_batch == 16
    assert run(3, "--preset", "paper", "--mode", "eval").micro_batch == 288  # (1152 / 3 would be fitted: 96)
    with pytest.raises(ValueError, match="global_batch 1152 must be a multiple of the world size 5"):
        run(5, "--preset", "paper", "--mode", "pretrain")


class _Images(torch.nn.Module):
    c = type("C", (), {"sep_id": 3})

    def visual_encoder(self, x):
        return x


def test_captions_are_decoded_with_blips_clean_up(tmp_path, monkeypatch):
    """BLIP decoded with transformers 4.15's clean_up_tokenization_spaces=True ("man ' s" -> "man's"); without
    it an apostrophe stays split and COCO's tokenizer scores "man s" against the references' "man 's"."""
    from transformers import BertTokenizer
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture",
                                                   "of", "man", "'", "s", "hat", "."]))
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    ids = tok("a picture of a man ' s hat .").input_ids[:-1]  # [CLS] prompt caption, no [SEP]
    monkeypatch.setattr(dlip, "beam_search", lambda *a: torch.tensor([ids]))
    out = dlip.generate(_Images(), torch.zeros(1, 3, 4, 4), tok, dlip.Config(), torch.device("cpu"), torch.float32,
                        "a picture of ")
    assert out == ["a man's hat."]


def test_caption_mode_decodes_with_nucleus_sampling_end_to_end(world, teacher_ckpt, tmp_path, monkeypatch):
    """--decode nucleus: a caption run samples its test captions (beam search unused) with BLIP's top_p 0.9 and
    repetition penalty 1.1 and writes them; eval mode of its checkpoint draws the same captions (the draws are
    seeded by --seed); --decode of another name is refused before any work."""
    import json
    d, base, root = world
    seen = []
    monkeypatch.setattr(dlip, "beam_search", lambda *a: pytest.fail("beam search under --decode nucleus"))
    real = dlip.nucleus_sample
    monkeypatch.setattr(dlip, "nucleus_sample", lambda *a: seen.append(a[6:9]) or real(*a))
    args = [*base, *TINY, "--teacher", "", "--report", "false", "--decode", "nucleus",
            "--test_file", os.path.join(root, "pairs_test.jsonl")]
    m = dlip.main(["--mode", "caption", *args, "--init", teacher_ckpt, "--max_steps", "1",
                   "--out_dir", str(tmp_path / "cap")])
    res = json.load(open(tmp_path / "cap" / "captions_test.json"))
    assert len(res) == 8 and all(r["caption"] for r in res) and "test_CIDEr" in m
    assert seen and set(seen) == {(0.9, 50, 1.1)}
    e = dlip.main(["--mode", "eval", "--task", "caption", *args, "--ckpt", str(tmp_path / "cap" / "last.pt"),
                   "--out_dir", str(tmp_path / "eval")])
    assert json.load(open(tmp_path / "eval" / "captions_test.json")) == res and e["test_CIDEr"] == m["test_CIDEr"]
    with pytest.raises(ValueError, match=r"--decode must be beam\|nucleus"):
        dlip.main(["--mode", "caption", *args, "--decode", "topk", "--out_dir", str(tmp_path / "bad")])


def test_train_limit_trains_on_the_first_pairs(world, tmp_path, capsys):
    d, base, root = world
    full = os.path.join(root, "pairs_train.jsonl")  # 300 pairs in the tiny world
    dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--train_files", full, "--train_limit", "16",
               "--teacher", "", "--max_steps", "1", "--report", "false", "--out_dir", str(tmp_path / "limited")])
    assert "80 samples, 10 steps/epoch" in capsys.readouterr().out  # 16 images x 5 captions
    assert not os.path.exists(tmp_path / "limited" / "report.html")  # --report false
    assert os.path.isfile(tmp_path / "limited" / "last.pt")


def test_params_mode_builds_the_paper_models_offline_at_their_published_sizes():
    import transformers
    from common.hf import meta_model, published_config
    out = dlip.main(["--mode", "params", "--preset", "paper"])  # no weights, no network: meta device
    hf = {n: sum(p.numel() for p in meta_model(getattr(transformers, c), published_config(n)).parameters())
          for n, c in [("Salesforce/blip-itm-base-coco", "BlipForImageTextRetrieval"),
                       ("Salesforce/blip-image-captioning-base", "BlipForConditionalGeneration")]}
    # the teacher is BLIP ViT-B: exactly transformers' models of the released configs (+ the ITC temperature,
    # which transformers does not keep); no exact published BLIP count was found to compare with
    assert out["teacher_itm_frozen"] == hf["Salesforce/blip-itm-base-coco"] + 1
    assert out["teacher_cap_frozen"] == hf["Salesforce/blip-image-captioning-base"]
    assert out["teacher_itm_trainable"] == out["teacher_cap_trainable"] == 0
    # the student's ViT is DeiT-S (22,050,664 with its head; 22.05M in timm results/results-imagenet.csv, 22M in
    # arXiv 2012.12877 Table 1; test_hf.py) without its ImageNet head (384 x 1000 + 1000)
    assert out["student_params_visual_encoder"] == 22_050_664 - 385_000
    # trainable: everything but the momentum copies, which are frozen (EMA)
    momentum = sum(out[f"student_params_{k}_m"] for k in ("visual_encoder", "vision_proj", "text_encoder", "text_proj"))
    assert out["student_frozen"] == momentum and out["student_trainable"] > 0
    assert 0 < out["student_gflops_retrieval"] < out["teacher_itm_gflops_retrieval"]
    assert 0 < out["student_gflops_caption"] < out["teacher_cap_gflops_caption"]


def test_compile_flag_compiles_the_trained_model_once(world, tmp_path, monkeypatch):
    d, base, _ = world
    seen = []  # torch.compile stays eager here: the test checks what is compiled, a GPU run the speed-up
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.append(module) or module)
    b = dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", "", "--bench", "1",
                   "--compile", "true", "--out_dir", str(tmp_path / "c")])
    assert b["bench_steps"] == 1 and len(seen) == 1 and isinstance(seen[0], dlip.BLIP)


def test_paper_preset_augments_as_blip_and_evaluates_on_a_square_resize(toy_root, tmp_path):
    """Issue 17.7: salesforce/BLIP data/__init__.py -- training: random resized crop (0.2-1 pretraining, 0.5-1
    fine-tuning), horizontal flip, RandomAugment(2, 5); eval: bicubic resize of the whole image to a square (not a
    centre crop). The toy presets keep flip and RandAugment off (their captions say left/right)."""
    from PIL import Image
    from common.config import parse_config
    from common.image import to_tensor
    cfg = lambda *a: dlip.resolve(parse_config(dlip.Config, dlip.PRESETS, list(a)), list(a))  # noqa: E731
    for mode, scale in (("pretrain", (0.2, 1.0)), ("retrieval", (0.5, 1.0)), ("caption", (0.5, 1.0))):
        train, ev = dlip.image_transforms(cfg("--preset", "paper", "--mode", mode), 224)
        assert (train.train, train.hflip, train.randaug, train.scale, train.uint8) == (True, True, True, scale, True)
        assert not ev.train and ev.resize == "square"
    for preset in ("toy", "toy_teacher"):
        train, _ = dlip.image_transforms(cfg("--preset", preset, "--toy_root", str(toy_root)), 64)
        assert not train.hflip and not train.randaug
    img = Image.fromarray((torch.rand(20, 40, 3) * 255).byte().numpy())  # 40 x 20: a crop would drop half
    img.save(tmp_path / "wide.png")
    c = replace(cfg("--preset", "paper"), image_root=str(tmp_path))
    got = dlip.EvalImages([{"image": "wide.png"}], c, 16)[0]
    torch.testing.assert_close(got, to_tensor(img.resize((16, 16), Image.BICUBIC)))


def test_bench_times_the_real_loader_apart_and_images_reach_the_step_as_uint8(world, tmp_path, monkeypatch):
    """Issue 18.7: the loader ships uint8 images (normalised on the device); --bench takes each step's micro batches
    from the training loader and reports data time and step time apart."""
    d, base, _ = world
    dtypes, collate = [], dlip.collate
    monkeypatch.setattr(dlip, "collate", lambda b: dtypes.append(b[0][0].dtype) or collate(b))
    b = dlip.main(["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", "", "--bench", "2",
                   "--micro_batch", "4", "--out_dir", str(tmp_path / "b")])
    assert b["bench_steps"] == 2 and b["ms_data"] > 0 and b["ms_step"] > 0 and b["samples_s_step"] > b["samples_s"]
    assert dtypes and set(dtypes) == {torch.uint8} and len(dtypes) == 2 * (2 + 2)  # (warm-up + timed) x accum 2


@pytest.fixture(scope="module")
def shards(toy_root, tmp_path_factory):
    from data.toy import write_shards
    return write_shards(toy_root, n_shards=4, out_dir=str(tmp_path_factory.mktemp("shards")))


def test_pretrain_from_shards_resumes_exactly_and_splits_ranks(world, teacher_ckpt, shards):
    """--train_shards (issue 20.2): pretraining with a teacher from webdataset shards; a resume continues the stream
    exactly (the losses of an unbroken run); two gloo processes read disjoint samples (one stream per rank)."""
    import json
    from common.data import ShardStream
    d, base, _ = world
    args = ["--mode", "pretrain", *base, *TINY, *_width(32), "--teacher", teacher_ckpt, "--lr", "1e-3",
            "--train_shards", shards, "--report", "false"]
    full = dlip.main([*args, "--max_steps", "4", "--out_dir", str(d / "sh_full")])
    assert len(_rows(d / "sh_full" / "metrics.jsonl")) == 4 and full["final_lm"] > 0
    dlip.main([*args, "--max_steps", "2", "--out_dir", str(d / "sh_half")])
    resumed = dlip.main([*args, "--max_steps", "4", "--resume", str(d / "sh_half" / "last.pt"),
                         "--out_dir", str(d / "sh_half")])
    for k in ("final_loss", "final_itc", "final_itm", "final_lm", "final_lm_kd"):
        assert resumed[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "dlip.py", *args,
           "--max_steps", "2", "--micro_batch", "4", "--out_dir", str(d / "sh_two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(d / "sh_two" / "metrics_pretrain.json"))["final_loss"] > 0
    stream = torch.load(d / "sh_two" / "last.pt", weights_only=True)["stream"]
    assert stream["n_slots"] == 2 and sorted(stream["slots"]) == [0, 1]  # one stream per rank
    seen = []
    for rank, (_, pos) in sorted(stream["slots"].items()):  # replay what each rank drew: 2 steps x 4 samples
        assert pos == 2 * 4
        it = iter(ShardStream(shards, None, rank, 2, seed=0))
        seen.append({next(it)["key"] for _ in range(pos)})
    assert len(seen[0]) == len(seen[1]) == 8 and not seen[0] & seen[1]
