"""Tests for imagechat_warmup.py (CPU, tiny random transformers models + the tiny toy world).

Model-level checks use tiny random BlenderBot / T5 / CLIP / BLIP-2 folders written with save_pretrained; the
stages run through main([...]) on the toy world's Image-Chat dialogues and backbones.
"""
import io
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import imagechat_warmup as icw
from common.checkpoint import CheckpointMismatch
from common.data import DataError
from data import imagechat as ic

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "image_chat")
WORDS = ("a the red blue green circle square triangle i love this it is so nice hate boring what happy sad curious "
         "why there are two one").split()


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- tiny assets
def make_tokenizer(out, bos):
    """A word-level fast tokenizer (BlenderBot-like ids when bos: pad 0, <s> 1, </s> 2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>"] if bos else ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    kw = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>", **({"bos_token": "<s>"} if bos else {}))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, **kw)
    tok.save_pretrained(out)
    return tok


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import (BartConfig, BartForConditionalGeneration, BlenderbotConfig, BlenderbotForConditionalGeneration, Blip2Config,
                              Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, CLIPConfig,
                              CLIPModel, OPTConfig, T5Config, T5ForConditionalGeneration)
    root = tmp_path_factory.mktemp("icw_assets")
    torch.manual_seed(0)
    tok = make_tokenizer(root / "bb", bos=True)
    BlenderbotForConditionalGeneration(BlenderbotConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=16, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, init_std=0.5)).save_pretrained(root / "bb")
    make_tokenizer(root / "bart", bos=True)
    BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, init_std=0.5)).save_pretrained(root / "bart")
    tok5 = make_tokenizer(root / "t5", bos=False)
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok5), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).save_pretrained(root / "t5")
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=12)).save_pretrained(root / "clip")
    # BLIP-2 captioner: random weights, real transformers classes and processor
    tok_b = make_tokenizer(root / "blip2", bos=True)
    tok_b.add_special_tokens({"additional_special_tokens": ["<image>"]})
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 16, "width": 16}), tokenizer=tok_b,
                          num_query_tokens=4)
    text = OPTConfig(vocab_size=len(tok_b), hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                     word_embed_proj_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    Blip2ForConditionalGeneration(Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        qformer_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, encoder_hidden_size=16),
        text_config=text.to_dict(), num_query_tokens=4,
        image_token_index=tok_b.convert_tokens_to_ids("<image>"))).save_pretrained(root / "blip2")
    proc.save_pretrained(root / "blip2")
    return root


def toy_subset(toy_root, out, n_train=48, n_eval=8):
    """The first episodes of the tiny toy world's Image-Chat files (published layout), images left in place."""
    os.makedirs(out, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        with open(os.path.join(toy_root, "image_chat", f"{split}.json")) as f:
            eps = json.load(f)[:n]
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(eps, f)
    return out


def run(args, tmp, **paths):
    argv = [a for kv in ({**paths}).items() for a in (f"--{kv[0]}", str(kv[1]))]
    return icw.main([*args, *argv, "--out_dir", str(tmp)])


# ---------------------------------------------------------------------------- data
def test_reader_on_published_fixture(tmp_path):
    train = ic.read_image_chat(f"{FIXTURES}/train.json", keep_candidates=False)
    assert train[0]["hash"] == "5eaa7034d31688ef1f9bed67f1f04f49" and len(train[0]["dialog"]) == 3
    assert train[0]["dialog"][0] == ("Appreciative (Grateful)", "home sweet home") and train[0]["candidates"] is None
    test = ic.read_image_chat(f"{FIXTURES}/test.json")
    for ep in test:
        for (style, utt), cands in zip(ep["dialog"], ep["candidates"]):
            assert len(cands["100"]) == 100 and len(cands["1000"]) == 1000 and utt in cands["100"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_hash": "ab", "dialog": [["s", "u"]]}, {"image_hash": "cd"}]))
    with pytest.raises(DataError, match=r"bad.json: episode 1: missing field 'dialog'"):
        ic.read_image_chat(str(bad))
    bad.write_text(json.dumps([{"image_hash": "ab", "dialog": [["only style"]]}]))
    with pytest.raises(DataError, match=r"episode 0: field 'dialog' turn 0"):
        ic.read_image_chat(str(bad))
    bad.write_bytes(b'[{"image_hash": "ab", "dialog": [["s", "caf\xe9"]]}]')  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"bad.json: not UTF-8 \(byte offset 43\)"):
        ic.read_image_chat(str(bad))


def test_a_null_or_empty_image_hash_is_refused_not_read_as_an_image_name(tmp_path):
    """A record whose image_hash is null or empty names no image: the reader refuses it (naming the
    episode) instead of reading it as the image "None.jpg", later counted as merely unreadable."""
    bad = tmp_path / "train.json"
    for h in (None, "", 7):
        bad.write_text(json.dumps([{"image_hash": "ab", "dialog": [["s", "u"]]},
                                   {"image_hash": h, "dialog": [["s", "u"]]}]))
        with pytest.raises(DataError, match=r"train.json: episode 1: field 'image_hash' should be "
                                            r"a non-empty string"):
            ic.read_image_chat(str(bad))


def test_an_episode_with_an_empty_dialog_is_skipped_and_counted_not_fatal(tmp_path):
    """The release's readers skip `len(dialog) < 1` (VLAW-MDM training_ablation.py): such an
    episode leaves the split readable; it is no image to prepare, and the tokenised split leaves it
    out and says so."""
    data = tmp_path / "ic"
    os.makedirs(data)
    (data / "train.json").write_text(json.dumps([
        {"image_hash": "aa", "dialog": [["Happy", "so nice"]]},
        {"image_hash": "bb", "dialog": []}]))
    assert [len(ep["dialog"]) for ep in ic.read_image_chat(str(data / "train.json"))] == [1, 0]
    assert ic.all_image_hashes(str(data)) == ["aa"]

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [len(w) for w in text.split()]

    class Log(list):
        info = list.append
    log = Log()
    enc = ic.Encoded(ic.read_image_chat(str(data / "train.json")), Tok(), {"aa": 0},
                     {"aa": ["a cap"]}, icw.Config(), log, "train")
    assert [ep["hash"] for ep in enc.episodes] == ["aa"] and enc.episodes[0]["utts"] == [[2, 4]]
    assert log == ["train: 1 episodes, 0 skipped for a missing feature/caption ({}), "
                   "1 without turns skipped"]
    (data / "train.json").write_text(json.dumps([{"image_hash": "bb", "dialog": []}]))
    with pytest.raises(DataError, match=r"no episode with a turn in its split files"):
        ic.all_image_hashes(str(data))


def test_unpaired_surrogates_and_candidate_lists_of_another_shape_are_named(tmp_path):
    """A JSON escape of half a UTF-16 pair decodes to a str no tokenizer reads, and a turn's
    candidates given as a plain list cannot be read as ParlAI reads candidates[turn]["100"]: the
    reader names the episode and the field."""
    bad = tmp_path / "test.json"
    bad.write_text('[{"image_hash": "ab", "dialog": [["Happy", "ok \\ud83d\\ude00"], '
                   '["Sad", "no \\ud83d"]]}]')
    with pytest.raises(DataError, match=r"episode 0: field 'dialog' turn 1 utterance: unpaired "
                                        r"surrogate '\\ud83d' at character 3"):
        ic.read_image_chat(str(bad))
    bad.write_text(json.dumps([{"image_hash": "ab", "dialog": [["Happy", "ok"]],
                                "candidates": [["ok", "no"]]}]))
    with pytest.raises(DataError, match=r"episode 0: field 'candidates' turn 0 should be "
                                        r"\{\"100\""):
        ic.read_image_chat(str(bad))
    assert ic.read_image_chat(str(bad), keep_candidates=False)[0]["candidates"] is None


def _tiny_split(tmp_path, n):
    """<tmp_path>/ic/train.json of n one-turn episodes and their 8x8 images under ic/img."""
    data, hashes = tmp_path / "ic", [f"{i:032x}" for i in range(n)]
    os.makedirs(data / "img")
    for h in hashes:
        Image.new("RGB", (8, 8), (9, 9, 9)).save(data / "img" / f"{h}.jpg")
    (data / "train.json").write_text(json.dumps([{"image_hash": h, "dialog": [["s", "u"]]}
                                                 for h in hashes]))
    return icw.Config(data_dir=str(data), image_root=str(data / "img"),
                      cache_dir=str(tmp_path / "cache")), hashes


def test_a_caption_resume_after_a_cut_off_line_keeps_its_first_caption(tmp_path, monkeypatch):
    """A killed --mode captions leaves its JSONL's last line cut off; the resume appends after it,
    and its first record must not join that line (load_captions skips a line it cannot parse, and
    with it that record).  A rerun with other settings is refused before the captioner loads."""
    from common.dist import Dist
    from common.log import Logger
    cfg, hashes = _tiny_split(tmp_path, 3)
    os.makedirs(tmp_path / "cache")
    (tmp_path / "cache" / "captions.r0.jsonl").write_text(
        json.dumps({"image": hashes[0] + ".jpg", "captions": ["c"] * 3}) + "\n"
        + '{"image": "' + hashes[1])
    monkeypatch.setattr(ic, "blip2_captioner",
                        lambda cfg, dev, dtype: lambda imgs: [["new"] * 3 for _ in imgs])
    stats = ic.prepare_captions(cfg, Dist(), Logger("", True), torch.float32)
    assert stats["cached_before"] == 1 and stats["computed"] == 2
    caps = ic.load_captions(str(tmp_path / "cache"))
    assert sorted(caps) == hashes and caps[hashes[1]] == ["new"] * 3
    with open(tmp_path / "cache" / "captions.json") as f:
        assert sorted(json.load(f)) == [h + ".jpg" for h in hashes]
    # a rerun with other settings is refused before the captioner (BLIP-2: 2.7B weights) is loaded

    def no_load(cfg, dev, dtype):
        raise AssertionError("captioner loaded")
    monkeypatch.setattr(ic, "blip2_captioner", no_load)
    cfg.caption_beams = 3
    with pytest.raises(DataError, match=r"the cached captions were made with caption_beams 5 "
                                        r"\(now 3\)"):
        ic.prepare_captions(cfg, Dist(), Logger("", True), torch.float32)


def test_a_feature_rerun_removes_the_temp_part_a_killed_run_left(tmp_path, monkeypatch):
    """A features run killed while saving leaves <part>.pt.tmp.<pid>; the rerun writes parts of
    other names, so save_checkpoint's own cleaning never reaches it: the rerun removes it (its
    writer is gone) and reads no temp."""
    from common.dist import Dist
    from common.log import Logger
    cfg, hashes = _tiny_split(tmp_path, 3)
    cfg.feat_batch, cfg.stop_after = 1, 1
    folder = tmp_path / "cache" / "features"
    monkeypatch.setattr(ic, "clip_featurizer",
                        lambda cfg, dev: lambda imgs: torch.ones(len(imgs), 9, 4))
    assert ic.prepare_features(cfg, Dist(), Logger("", True), torch.float32)["computed"] == 1
    stale = folder / "part_00000_r0_00001.pt.tmp.999999999"  # its 2nd part; no such pid: killed
    stale.write_bytes(b"cut off")
    cfg.stop_after = 0
    assert ic.prepare_features(cfg, Dist(), Logger("", True), torch.float32)["computed"] == 2
    assert not stale.exists() and not [n for n in os.listdir(folder) if ".tmp." in n]
    index, feats = ic.load_features(str(tmp_path / "cache"))
    assert sorted(index) == hashes and feats.shape == (3, 9, 4)


def test_chat_warns_when_its_clip_is_not_the_one_that_made_the_cached_features(tmp_path,
                                                                            monkeypatch):
    """--mode chat computes the image's features with --clip; the model read the features cached
    in --cache_dir, so another CLIP there (features.meta.json) gets a warning naming both."""
    from common.log import Logger
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "x.jpg")
    os.makedirs(tmp_path / "cache")
    os.makedirs(tmp_path / "clip")
    monkeypatch.setattr(ic, "clip_featurizer", lambda cfg, dev: lambda imgs: torch.ones(1, 9, 4))
    cfg = icw.Config(cache_dir=str(tmp_path / "cache"), clip=str(tmp_path / "clip"),
                     use_caption=False)
    for made, warned in ((str(tmp_path / "other_clip"), True), (str(tmp_path / "clip"), False)):
        (tmp_path / "cache" / "features.meta.json").write_text(json.dumps({"clip": made}))
        log = Logger("", True)
        said = []
        monkeypatch.setattr(log, "info", said.append)
        feats, cap = ic.chat_image(cfg, str(tmp_path / "x.jpg"), torch.device("cpu"),
                                   torch.float32, log)
        assert feats.shape == (1, 9, 4) and cap is None
        assert any("is not the CLIP that made the cached features" in m and made in m
                   for m in said) == warned


def test_chat_knows_the_styles_parlai_names_beside_personalities_json():
    """ParlAI's get_category_map (parlai/tasks/image_chat/agents.py) adds "Crude" and "Earnest":
    styles of the dialogues that personalities.json lacks, so a model trained on them is asked for
    them by name."""
    assert ic.chat_styles(FIXTURES, "crude", "Earnest") == ("Crude", "Earnest")
    assert len(ic.known_styles(FIXTURES)) == 217
    with pytest.raises(ValueError, match=r"--style 'Grumpy Pirate' is not one of the model's 217 "):
        ic.chat_styles(FIXTURES, "Grumpy Pirate")


def test_paper_preset_fits_the_micro_batch_to_the_world_size_before_any_data(tmp_path, monkeypatch):
    """README's `torchrun --nproc_per_node=8 imagechat_warmup.py --preset paper --mode warmup`: 2016 = 8 ranks x
    micro 16 stopped in StepSampler (252 per rank is no multiple of 16).  main() now fits the mode's micro batch
    before any data or model: 8 x 14 x accumulation 18; fine-tuning's 256 runs 8 x 32 as asked."""
    from common.dist import Dist
    seen, Stop = [], type("Stop", (Exception,), {})

    def stop(cfg, is_main=True):  # resolve_paths: the first step that reads data or builds the toy world
        seen.append((cfg.warmup_micro, cfg.ft_micro))
        raise Stop

    monkeypatch.setattr(icw, "setup_distributed", lambda device: Dist(world_size=8))
    monkeypatch.setattr(icw, "resolve_paths", stop)
    for mode in ("warmup", "finetune", "eval"):
        with pytest.raises(Stop):
            icw.main(["--preset", "paper", "--mode", mode, "--out_dir", str(tmp_path)])
    assert seen == [(14, 32), (16, 32), (16, 32)]


def test_a_num_candidates_the_split_file_lacks_is_refused():
    """The published files hold candidate lists of 100 and 1000 per turn (ParlAI's --num-cands choices): another
    --num_candidates would rank nothing and drop the R@k columns without a word."""
    with pytest.raises(DataError, match=r"test.json: no candidate list of --num_candidates 10; the file has "
                                        r"\['100', '1000'\]"):
        ic.load_split(icw.Config(data_dir=FIXTURES, num_candidates=10), "test", None, None, None, None, True)


def test_load_captions_reads_the_release_json_layout_and_the_jsonl_cache(tmp_path):
    """captions.json {"<hash>.jpg": [c1, c2, c3]} (the release's yfcc_images_added_captions.json layout, and what
    --mode captions leaves) is read as well as the resumable captions.r<rank>.jsonl lines."""
    with open(tmp_path / "captions.json", "w") as f:
        json.dump({"aa.jpg": ["a red circle", "a circle", "red"], "bb.jpg": ["two squares", "squares", "two"]}, f)
    with open(tmp_path / "captions.r0.jsonl", "w") as f:
        f.write(json.dumps({"image": "cc.jpg", "captions": ["a blue triangle", "blue", "a triangle"]}) + "\n")
    caps = ic.load_captions(str(tmp_path))
    assert caps == {"aa": ["a red circle", "a circle", "red"], "bb": ["two squares", "squares", "two"],
                    "cc": ["a blue triangle", "blue", "a triangle"]}
    (tmp_path / "captions.json").write_text(json.dumps({"aa.jpg": "a red circle"}))
    with pytest.raises(DataError, match=r"captions.json: field 'aa.jpg' should be a non-empty list"):
        ic.load_captions(str(tmp_path))


def test_blip2_minimum_caption_length_counts_new_tokens(assets, tmp_path):
    """BLIP-2's generate feeds the query-token placeholders and <s> as input_ids, so min_length=5 counted them and
    allowed empty captions; --caption_min_length is a minimum of new tokens.  The captioner here prefers </s> at
    every step (constant final hidden state, </s> row largest): every caption has exactly the minimum of 5 words."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration
    m = Blip2ForConditionalGeneration.from_pretrained(assets / "blip2")
    lm, tok = m.language_model, AutoTokenizer.from_pretrained(assets / "blip2")
    with torch.no_grad():
        lm.model.decoder.final_layer_norm.weight.zero_()
        lm.model.decoder.final_layer_norm.bias.copy_(torch.eye(16)[0])  # every position's hidden state = e_0
        w = lm.get_output_embeddings().weight  # logits = w[:, 0]
        w[:, 0] = torch.tensor([1.0 + 0.01 * i if t.isalpha() else -10.0 for i, t in
                                enumerate(tok.convert_ids_to_tokens(list(range(len(w)))))])
        w[tok.eos_token_id, 0] = 10.0
    shutil.copytree(assets / "blip2", tmp_path / "eos_blip2")
    m.save_pretrained(tmp_path / "eos_blip2")
    data = tmp_path / "image_chat"
    shutil.copytree(FIXTURES, data)
    os.makedirs(data / "images")
    for h in ic.all_image_hashes(str(data)):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(
            data / "images" / f"{h}.jpg")
    icw.main(["--mode", "captions", "--captioner", str(tmp_path / "eos_blip2"), "--data_dir", str(data),
              "--cache_dir", str(tmp_path / "cache"), "--out_dir", str(tmp_path / "c")])
    caps = ic.load_captions(str(tmp_path / "cache"))
    assert len(caps) == 3 and all(len(c) == 3 for c in caps.values())
    assert sorted({len(c.split()) for cs in caps.values() for c in cs}) == [5]


def test_clip_features_run_in_fp32_as_released(assets, tmp_path, monkeypatch):
    """The release runs CLIP in fp32 (clip_feature_extraction.py): the cached fp16 features are fp32 CLIP's
    projected embeddings of each image's 3x3 grid of crops (bilinear resize to 3*crop, row-major crops, CLIP
    normalisation), computed here by hand, rounded once to fp16; and they do not take the bf16 that frozen
    models get on a GPU (--precision bf16, common.amp.frozen_dtype made to answer bf16 here on the CPU)."""
    from transformers import CLIPModel
    data = tmp_path / "image_chat"
    shutil.copytree(FIXTURES, data)
    os.makedirs(data / "images")
    hashes = ic.all_image_hashes(str(data))
    for i, h in enumerate(hashes):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            data / "images" / f"{h}.jpg")
    args = ["--mode", "features", "--clip", str(assets / "clip"), "--data_dir", str(data)]
    icw.main([*args, "--cache_dir", str(tmp_path / "fp32"), "--out_dir", str(tmp_path / "a")])
    index, feats = ic.load_features(str(tmp_path / "fp32"))
    assert sorted(index) == sorted(hashes) and feats.shape == (3, 9, 12)
    assert torch.equal(feats.half().float(), feats)  # cached as fp16 (load_features returns them as float32)
    # by hand: fp32 CLIP on the 9 crops of the 48x48 bilinear resize, OpenAI CLIP mean/std (no preprocessor file);
    # the resize is torchvision's Resize on a uint8 tensor under torch 1.13 (the release): interpolate, no
    # antialiasing, rounded
    clip = CLIPModel.from_pretrained(assets / "clip").float().eval()
    mean, std = np.float32([0.48145466, 0.4578275, 0.40821073]), np.float32([0.26862954, 0.26130258, 0.27577711])
    for h in hashes:
        x = torch.from_numpy(np.asarray(Image.open(data / "images" / f"{h}.jpg").convert("RGB")).copy())
        x = torch.nn.functional.interpolate(x.permute(2, 0, 1)[None].float(), (48, 48), mode="bilinear",
                                            align_corners=False, antialias=False)
        img = Image.fromarray(x[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
        crops = [(np.asarray(img.crop((16 * gx, 16 * gy, 16 * gx + 16, 16 * gy + 16)), np.float32) / 255.0 - mean)
                 / std for gy in range(3) for gx in range(3)]
        with torch.no_grad():
            out = clip.get_image_features(pixel_values=torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).copy()))
        want = getattr(out, "pooler_output", out)
        assert want.dtype == torch.float32
        # fp16 rounding of fp32 (relative error <= 2^-11; fp16 subnormals are 6e-8 apart) and nothing more: bf16
        # CLIP is off by ~1e-2
        torch.testing.assert_close(feats[index[h]].float(), want, rtol=2 ** -11 + 1e-5, atol=1e-7)
    # --precision bf16 with frozen models in bf16 (as on a GPU), fp32 matmuls allowed TF32 (what pick_dtype does on
    # CUDA, done here on the CPU too) and the stage run under a bf16 autocast: the CLIP forward sees neither (it
    # runs under common.amp.fp32, true fp32 as under the release's torch 1.13), and the very same features
    state, pick, prepare, forward = [], icw.pick_dtype, icw.prepare_features, CLIPModel.get_image_features

    def pick_tf32(device, precision):
        torch.backends.cuda.matmul.allow_tf32 = True
        return pick(device, precision)

    def prepare_in_autocast(*a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return prepare(*a)
    monkeypatch.setattr(ic, "frozen_dtype", lambda device, dtype: torch.bfloat16)
    monkeypatch.setattr(icw, "pick_dtype", pick_tf32)
    monkeypatch.setattr(icw, "prepare_features", prepare_in_autocast)
    monkeypatch.setattr(CLIPModel, "get_image_features", lambda self, *a, **k: state.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu"))) or forward(self, *a, **k))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        icw.main([*args, "--precision", "bf16", "--cache_dir", str(tmp_path / "gpu"), "--out_dir", str(tmp_path / "b")])
        assert torch.backends.cuda.matmul.allow_tf32  # restored after the CLIP forward
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert state and set(state) == {(False, False)}
    i16, f16 = ic.load_features(str(tmp_path / "gpu"))
    assert i16 == index and torch.equal(f16, feats)


def test_paper_preset_averages_the_metrics_over_the_release_eval_batches():
    """The paper's batch-averaged F1 / BLEU-4 / ROUGE-L / PPL are means over the release's val/test loader batches,
    64 examples (training_ablation.py --batch_size; model_blender_bot.py averages per batch): the paper preset
    evaluates in batches of 64; the toy preset keeps 32."""
    import types
    paper = icw.parse_config(icw.Config, icw.PRESETS, ["--preset", "paper"])
    assert paper.eval_batch == 64 and icw.parse_config(icw.Config, icw.PRESETS, []).eval_batch == 32
    # turn_scores means each batch of cfg.eval_batch, then the batches: replies right, wrong, right give F1 and
    # ROUGE-L (100 + 0) / 2 and 100 -> 75 in batches of 2, 200 / 3 in one; PPL exp(15 / 10), exp(5 / 5) -> their mean
    vocab, ref = {}, "i love this red circle"
    tok = types.SimpleNamespace(  # whitespace words: the reference's round trip leaves it as written
        encode=lambda text, **kw: [vocab.setdefault(w, len(vocab)) for w in text.split()],
        decode=lambda ids, **kw: " ".join({i: w for w, i in vocab.items()}[i] for i in ids))
    rows = [{"prediction": p, "reference": ref, "nll": nll, "n_tok": 5} for p, nll in
            ((ref, 5.0), ("so boring", 10.0), (ref, 5.0))]
    two = icw.turn_scores(rows, tok, types.SimpleNamespace(eval_batch=2, num_candidates=100))
    one = icw.turn_scores(rows, tok, paper)
    assert two["F1"] == two["ROUGE-L"] == pytest.approx(75.0) and two["corpus_F1"] == pytest.approx(200 / 3)
    assert one["F1"] == one["ROUGE-L"] == pytest.approx(200 / 3)
    assert two["PPL"] == pytest.approx((math.exp(1.5) + math.e) / 2) and one["PPL"] == pytest.approx(math.exp(20 / 15))


def test_toy_paths_build_only_the_backbones_a_mode_reads(monkeypatch):
    calls = []
    monkeypatch.setattr(icw, "toy_paths", lambda cfg, reads, models, *a: calls.append((sorted(reads), models)))
    for mode in ("features", "captions", "warmup", "finetune", "eval", "chat"):
        icw.resolve_paths(icw.Config(mode=mode))
    assert calls == [(["clip", "data_dir"], ["clip"]), (["data_dir"], []), (["backbone", "data_dir"], ["t5"]),
                     (["backbone", "data_dir"], ["t5"]), (["backbone", "data_dir"], ["t5"]),
                     (["backbone", "clip", "data_dir"], ["clip", "t5"])]  # chat: features on the fly


def test_fixture_with_missing_images_features_and_captions_resume(assets, tmp_path, capsys):
    """Published-layout fixture files + images for only some hashes: features/captions skip and count the missing
    ones, and an interrupted run resumes without recomputing finished images."""
    data = tmp_path / "image_chat"
    shutil.copytree(FIXTURES, data)
    hashes = ic.all_image_hashes(str(data))
    assert len(hashes) == 3
    os.makedirs(data / "images")
    for h in hashes[:2]:  # the third image is gone, as ~55 YFCC images are (ParlAI #4571)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(
            data / "images" / f"{h}.jpg")
    common = ["--data_dir", str(data), "--cache_dir", str(tmp_path / "cache"), "--max_bad_frac", "0.5"]
    first = icw.main(["--mode", "features", "--clip", str(assets / "clip"), "--stop_after", "1", *common,
                      "--out_dir", str(tmp_path / "f1")])
    assert first["computed"] == 1
    capsys.readouterr()
    second = icw.main(["--mode", "features", "--clip", str(assets / "clip"), *common, "--out_dir", str(tmp_path / "f2")])
    assert second == {"images": 3, "cached_before": 1, "computed": 1, "unreadable": 1}
    want = f"features: computed 1, 1 of 3 images unreadable (1 of them cached before) (e.g. ['{hashes[2]}.jpg'])"
    assert want in capsys.readouterr().out
    index, feats = ic.load_features(str(tmp_path / "cache"))
    assert sorted(index) == sorted(hashes[:2]) and feats.shape == (2, 9, 12)
    # the resumed cache equals a one-shot run
    one = icw.main(["--mode", "features", "--clip", str(assets / "clip"), *common[:2], "--cache_dir",
                    str(tmp_path / "c1"), "--max_bad_frac", "0.5", "--out_dir", str(tmp_path / "f3")])
    assert one["computed"] == 2
    index1, feats1 = ic.load_features(str(tmp_path / "c1"))
    for h in index:
        torch.testing.assert_close(feats[index[h]], feats1[index1[h]])
    # too many unreadable images is an error, not a silent zero feature (ParlAI #2394): the one bad-image rule
    with pytest.raises(DataError, match=r"1 of 3 images unreadable .*\(max_bad_frac 0.05\)"):
        icw.main(["--mode", "features", "--clip", str(assets / "clip"), "--data_dir", str(data), "--cache_dir",
                  str(tmp_path / "c2"), "--out_dir", str(tmp_path / "f4")])
    # captions: resumable JSONL + the release layout {"<hash>.jpg": [c1, c2, c3]}
    cap = ["--mode", "captions", "--captioner", str(assets / "blip2"), *common]
    assert icw.main([*cap, "--stop_after", "1", "--out_dir", str(tmp_path / "c_a")])["computed"] == 1
    again = icw.main([*cap, "--out_dir", str(tmp_path / "c_b")])
    assert again["cached_before"] == 1 and again["computed"] == 1 and again["unreadable"] == 1
    with open(tmp_path / "cache" / "captions.json") as f:
        caps = json.load(f)
    assert sorted(caps) == sorted(h + ".jpg" for h in hashes[:2]) and all(len(c) == 3 for c in caps.values())


def test_reruns_and_resumes_count_the_cached_images_under_the_bad_image_rule(assets, tmp_path):
    """An unreadable image is never cached, so every rerun tries it again: the bad-image rule counts the images
    cached before as read.  60 images, 2 of them gone (3%, under the default 5%): a resume with 10 readable ones
    and the 2 gone left passes (2 of the 12 tried would be 17%), a rerun with nothing left computes nothing, and
    a share too high over all the images still stops the run."""
    data, hashes = tmp_path / "ic", [f"{i:032x}" for i in range(60)]
    os.makedirs(data / "img")
    for h in hashes[:-2]:
        Image.new("RGB", (24, 24), (9, 9, 9)).save(data / "img" / f"{h}.jpg")
    (data / "train.json").write_text(json.dumps([{"image_hash": h, "dialog": [["s", "u"]]} for h in hashes]))
    args = ["--mode", "features", "--clip", str(assets / "clip"), "--data_dir", str(data), "--image_root",
            str(data / "img"), "--cache_dir", str(tmp_path / "cache"), "--feat_batch", "16"]
    assert icw.main([*args, "--stop_after", "48", "--out_dir", str(tmp_path / "a")])["computed"] == 48
    resumed = icw.main([*args, "--out_dir", str(tmp_path / "b")])
    assert resumed == {"images": 60, "cached_before": 48, "computed": 10, "unreadable": 2}
    again = icw.main([*args, "--out_dir", str(tmp_path / "c")])
    assert again == {"images": 60, "cached_before": 58, "computed": 0, "unreadable": 2}
    with pytest.raises(DataError, match=r"2 of 60 images unreadable \(58 of them cached before\)"):
        icw.main([*args, "--max_bad_frac", "0.02", "--out_dir", str(tmp_path / "d")])


def test_a_model_is_one_name_given_by_hub_name_or_by_its_hub_cache_folder(tmp_path, monkeypatch):
    """The caches record the model that made them (model_id): the hub name from_pretrained reads offline from the hub
    cache and that cache's snapshot folder are one model, "<org>/<name>@<commit>", also against a record an older run
    wrote (a folder's real path, a hub name); another folder, or another commit, is another model."""
    import huggingface_hub.constants
    from common.log import Logger
    hub = tmp_path / "hub"
    for commit in ("abc123", "def456"):
        os.makedirs(hub / "models--openai--clip-vit-base-patch32" / "snapshots" / commit)
        (hub / "models--openai--clip-vit-base-patch32" / "snapshots" / commit / "config.json").write_text("{}")
    os.makedirs(hub / "models--openai--clip-vit-base-patch32" / "refs")
    (hub / "models--openai--clip-vit-base-patch32" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    name, snap = "openai/clip-vit-base-patch32", hub / "models--openai--clip-vit-base-patch32" / "snapshots"
    os.symlink(snap / "abc123", tmp_path / "my_clip")  # a link to the snapshot: still the hub's model
    assert ic.model_id(name) == ic.model_id(str(snap / "abc123")) == ic.model_id(str(tmp_path / "my_clip")) \
        == f"{name}@abc123" != ic.model_id(str(snap / "def456"))
    assert ic.model_id("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"  # not cached: as given
    assert ic.model_id("") == "" and ic.model_id(str(tmp_path)) == os.path.realpath(tmp_path)
    assert ic.model_id("no such/model/x") == "no such/model/x"  # not a hub name
    cache = tmp_path / "cache"
    os.makedirs(cache)
    for old in (str(snap / "abc123"), name):  # what the run that made the cache recorded
        (cache / "features.meta.json").write_text(json.dumps({"clip": old, "grid": 3}))
        ic.check_cache_settings(str(cache), "features", {"clip": ic.model_id(name), "grid": 3}, True, True,
                                Logger("", False))
        with pytest.raises(DataError, match=r"made with clip .* \(now '" + name + "@def456'\)"):
            ic.check_cache_settings(str(cache), "features", {"clip": ic.model_id(str(snap / "def456")), "grid": 3},
                                    True, True, Logger("", False))


def test_caches_refuse_other_settings_and_reuse_the_same(assets, tmp_path, capsys):
    """The feature and caption caches are keyed by image hash: a rerun into the same --cache_dir with another --grid
    (or --clip) would count every image as cached (or mix two models, or grids load_features cannot stack), so it
    is refused in one line naming the setting; the same settings reuse the cache; a cache from before the settings
    file is taken as made with the run's settings (logged); captions likewise for the captioner's settings."""
    data = tmp_path / "image_chat"
    shutil.copytree(FIXTURES, data)
    os.makedirs(data / "images")
    for i, h in enumerate(ic.all_image_hashes(str(data))):
        Image.new("RGB", (20, 20), (9 * i, 9, 9)).save(data / "images" / f"{h}.jpg")
    feats = ["--mode", "features", "--clip", str(assets / "clip"), "--data_dir", str(data), "--cache_dir",
             str(tmp_path / "cache")]
    assert icw.main([*feats, "--out_dir", str(tmp_path / "a")])["computed"] == 3
    with pytest.raises(DataError, match=r"cache: the cached features were made with grid 3 \(now 2\); use another "
                                        r"--cache_dir"):
        icw.main([*feats, "--grid", "2", "--out_dir", str(tmp_path / "b")])
    assert icw.main([*feats, "--out_dir", str(tmp_path / "c")])["cached_before"] == 3
    os.remove(tmp_path / "cache" / "features.meta.json")  # a cache written before the settings file
    capsys.readouterr()
    assert icw.main([*feats, "--out_dir", str(tmp_path / "d")])["cached_before"] == 3
    assert "features.meta.json missing: the cached features are taken as made with" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"made with grid 3 \(now 2\)"):
        icw.main([*feats, "--grid", "2", "--out_dir", str(tmp_path / "e")])
    assert ic.load_features(str(tmp_path / "cache"))[1].shape == (3, 9, 12)
    caps = ["--mode", "captions", "--captioner", str(assets / "blip2"), "--data_dir", str(data), "--cache_dir",
            str(tmp_path / "cache")]
    assert icw.main([*caps, "--out_dir", str(tmp_path / "f")])["computed"] == 3
    with pytest.raises(DataError, match=r"the cached captions were made with caption_beams 5 \(now 3\)"):
        icw.main([*caps, "--caption_beams", "3", "--out_dir", str(tmp_path / "g")])


def _caption_worker(rank, cfg, port, cache_dir):
    """One of 2 gloo ranks of prepare_captions with a stub captioner.  Rank 1 lists the cache late: only once
    rank 0 has appended captions or waits at a barrier (the one before any rank writes, when there is one)."""
    import time
    import torch.distributed as tdist
    from common.dist import Dist, cleanup_distributed
    from common.log import Logger
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ic.blip2_captioner = lambda cfg, dev, dtype: lambda imgs: [[f"caption {rank}"] * 3 for _ in imgs]
    waiting, written = os.path.join(cache_dir, "rank0_at_barrier"), os.path.join(cache_dir, "captions.r0.jsonl")
    if rank == 0:
        barrier = ic.barrier
        ic.barrier = lambda: open(waiting, "w").close() or barrier()
    else:
        listing = ic.load_captions

        def late(folder):
            for _ in range(6000):  # at most 60 s
                if os.path.exists(waiting) or os.path.isfile(written) and os.path.getsize(written):
                    break
                time.sleep(0.01)
            return listing(folder)
        ic.load_captions = late
    try:
        ic.prepare_captions(cfg, Dist(rank, rank, 2), Logger("", rank == 0), torch.float32)
    finally:
        cleanup_distributed()


def test_two_rank_captions_cover_every_image_when_a_rank_lists_late(tmp_path, spawn):
    """prepare_captions on 2 gloo ranks: every rank lists the cache before any rank appends to it (else a late
    rank shards a shorter list, the shards stop tiling and images are never captioned)."""
    import socket
    data, hashes = tmp_path / "ic", [f"{i:032x}" for i in range(12)]
    os.makedirs(data / "img")
    os.makedirs(tmp_path / "cache")
    for h in hashes:
        Image.new("RGB", (8, 8), (9, 9, 9)).save(data / "img" / f"{h}.jpg")
    (data / "train.json").write_text(json.dumps([{"image_hash": h, "dialog": [["s", "u"]]} for h in hashes]))
    cfg = icw.Config(data_dir=str(data), image_root=str(data / "img"), cache_dir=str(tmp_path / "cache"),
                     caption_batch=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn(_caption_worker, args=(cfg, port, str(tmp_path / "cache")))
    caps = ic.load_captions(str(tmp_path / "cache"))
    assert sorted(caps) == hashes and {c[0] for c in caps.values()} == {"caption 0", "caption 1"}


def test_dialogue_cards_escape_text_and_keep_dialogues_without_an_image(tmp_path):
    """The report's dialogue card: turns in order, each reply under its reference, text from data escaped, the
    rank only where the turn has candidates; an unreadable image leaves the card without a picture."""
    eps = [{"hash": "h0", "dialog": [("Happy", "<b>hi</b>"), ("Sad", "so red")], "caption_text": "a red circle"},
           {"hash": "gone", "dialog": [("Bland", "ok")], "caption_text": None}]
    shown = {(0, 1): {"prediction": "p one", "rank": 3}, (0, 2): {"prediction": "p two"},
             (1, 1): {"prediction": "x", "rank": None}}  # None: the reference is not among the candidates
    Image.new("RGB", (8, 8), "red").save(tmp_path / "h0.jpg")
    page = ic.dialogue_cards(eps, shown, str(tmp_path), n_candidates=100)
    first, second = page.split("</figure>")[:2]
    assert first.count("<img") == 1 and "<img" not in second and "caption" not in second and "rank" not in second
    want = ["<b>caption:</b> a red circle", "<b>1. Happy:</b> &lt;b&gt;hi&lt;/b&gt;", "<b>generated:</b> p one",
            "<b>rank of the reference:</b> 3 of 100", "<b>2. Sad:</b> so red", "<b>generated:</b> p two"]
    assert [first.index(w) for w in want] == sorted(first.index(w) for w in want) and first.count("rank") == 1
    assert ic.dialogue_cards(eps, shown, str(tmp_path), n=1).count("<figure") == 1


def test_results_rows_name_the_configured_candidate_count():
    """The logged table and the report keep the R@1 column for any --num_candidates (1000 here), and R@5, R@10
    (ParlAI's hits@5/10) after it in rank order."""
    res = {"turn1/F1": 10.0, "IC/F1": 10.0, "turn1/R@1/1000": 5.0, "IC/R@1/1000": 5.0, "turn1/word_F1": 3.0,
           "IC/word_F1": 3.0}
    head, rows = ic.results_rows(res)
    assert head == ["turn", "F1", "R@1/1000", "word_F1"]
    assert rows == [["turn1", 10.0, 5.0, 3.0], ["IC", 10.0, 5.0, 3.0]]
    res.update({"turn1/R@10/1000": 9.0, "IC/R@10/1000": 9.0, "turn1/R@5/1000": 7.0, "IC/R@5/1000": 7.0})
    head, rows = ic.results_rows(res)
    assert head == ["turn", "F1", "R@1/1000", "R@5/1000", "R@10/1000", "word_F1"]
    assert rows[1] == ["IC", 10.0, 5.0, 7.0, 9.0, 3.0]


def test_turn_scores_normalise_as_the_release_and_word_f1_as_parlai():
    """The release scores contractions.fix(text.strip().lower()) of both sides (slang and apostrophe-less forms
    expanded too); ParlAI's word F1 reads the raw prediction and reference."""
    import types
    vocab = {}
    tok = types.SimpleNamespace(  # whitespace words: the reference's round trip leaves it as written
        encode=lambda text, add_special_tokens=False: [vocab.setdefault(w, len(vocab)) for w in text.split()],
        decode=lambda ids, skip_special_tokens=True: " ".join({i: w for w, i in vocab.items()}[i] for i in ids))
    rows = [{"prediction": "u look great, im so happy", "reference": "You look great, I am so happy"},
            {"prediction": "I don't know, it's great", "reference": "I do not know, it is great"}]
    rows = [dict(r, nll=1.0, n_tok=2) for r in rows]
    m = icw.turn_scores(rows, tok, types.SimpleNamespace(eval_batch=32, num_candidates=100))
    assert m["F1"] == m["BLEU-4"] == m["ROUGE-L"] == 100.0  # equal once normalised as the release does
    # ParlAI normalize_answer: [u look great im so happy] vs [you look great i am so happy]: 4 of 6, 4 of 7;
    # [i don t know it s great] vs [i do not know it is great]: 4 of 7, 4 of 7
    assert m["word_F1"] == pytest.approx(100 * (16 / 26 + 4 / 7) / 2) and m["n"] == 2


def test_grid_crops_row_major():
    cols = np.arange(6, dtype=np.uint8) * 40  # brightness grows left to right, constant down the columns
    img = Image.fromarray(np.broadcast_to(cols[None, :, None], (6, 6, 3)).copy())
    crops = ic.grid_crops(img, crop=2, grid=3)  # (9, 3, 2, 2), uint8: normalised on the device (issue 18.7)
    assert crops.shape == (9, 3, 2, 2) and crops.dtype == torch.uint8
    # columns carry increasing brightness: crop r1, r2, r3 of a row go left to right; rows repeat
    col_means = crops.float().mean(dim=(1, 2, 3)).reshape(3, 3)
    assert torch.all(col_means[:, 0] < col_means[:, 1]) and torch.all(col_means[:, 1] < col_means[:, 2])
    torch.testing.assert_close(col_means[0], col_means[2])


def test_grid_crops_shrink_without_antialiasing_as_the_release():
    # release clip_feature_extraction.py resizes a uint8 tensor with torchvision's Resize under torch 1.13: bilinear,
    # align_corners False, no antialiasing. A 3x shrink then reads source coordinate 3j + 1 exactly: the centre
    # pixel of each 3x3 block, untouched by its neighbours (PIL's BILINEAR averages the block instead)
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)
    crops = ic.grid_crops(Image.fromarray(src), crop=2, grid=3)  # 18 px -> 6 px -> 9 crops of 2x2
    whole = crops.reshape(3, 3, 3, 2, 2).permute(2, 0, 3, 1, 4).reshape(3, 6, 6)  # (gy, gx, 3, c, c) -> (3, 6, 6)
    assert torch.equal(whole, torch.from_numpy(src[1::3, 1::3].copy()).permute(2, 0, 1))


# ---------------------------------------------------------------------------- model
def tiny_model(assets, kind, **kw):
    cfg = icw.Config(backbone=str(assets / kind), max_positions=32, **kw)
    torch.manual_seed(0)
    model, tok, vocab = icw.build_model(cfg, feat_dim=12, n_patches=9)
    return model.eval(), tok, vocab


@pytest.mark.parametrize("kind", ["bb", "bart", "t5"])
def test_encoder_layout_and_text_equivalence(assets, kind):
    """Encoder output = 11 + L; with the image slots masked and segments zeroed, the text part equals the
    transformers encoder run on the text alone (positions restart at 0 for the text, embeddings scaled)."""
    from transformers import AutoModelForSeq2SeqLM
    model, tok, vocab = tiny_model(assets, kind)
    src = torch.tensor([tok.encode("i love this red circle", add_special_tokens=False) + [vocab.eos],
                        tok.encode("so boring", add_special_tokens=False) + [vocab.eos] + [vocab.pad] * 3])
    mask = (src != vocab.pad).long()
    feats = torch.randn(2, 9, 12)
    with torch.no_grad():
        enc, m = model.encode(src, mask, feats)
        assert enc.last_hidden_state.shape == (2, 11 + src.shape[1], 32) and m[:, :11].all()
        model.segment.weight.zero_()
        x, m = model.embed(src, mask, feats)
        m[:, :11] = 0
        ours = model.lm.get_encoder()(inputs_embeds=x, attention_mask=m).last_hidden_state[:, 11:]
        ref = AutoModelForSeq2SeqLM.from_pretrained(assets / kind).eval()
        ref.resize_token_embeddings(len(tok))
        ref.get_input_embeddings().weight.copy_(model.lm.get_input_embeddings().weight)
        want = ref.get_encoder()(input_ids=src, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


def test_position_table_extension(assets):
    from transformers import AutoModelForSeq2SeqLM
    model, _, _ = tiny_model(assets, "bb")
    ref = AutoModelForSeq2SeqLM.from_pretrained(assets / "bb")
    for part in ("get_encoder", "get_decoder"):
        table, orig = getattr(model.lm, part)().embed_positions.weight, getattr(ref, part)().embed_positions.weight
        assert table.shape == (32, 32)
        torch.testing.assert_close(table[:16], orig)
        torch.testing.assert_close(table[16:], (orig[15] + orig[0]).expand(16, -1))  # release rule
    assert model.lm.get_encoder().embed_positions.weight is not model.lm.get_decoder().embed_positions.weight
    shared, _, _ = tiny_model(assets, "bb", share_pos=True)
    assert shared.lm.get_encoder().embed_positions.weight is shared.lm.get_decoder().embed_positions.weight
    with pytest.raises(ValueError, match="exceeds the position table"):
        model.encode(torch.ones(1, 40, dtype=torch.long), torch.ones(1, 40, dtype=torch.long), torch.zeros(1, 9, 12))


@pytest.mark.parametrize("kind", ["bb", "bart", "t5"])
def test_generate_from_encoder_states_matches_inputs_embeds(assets, kind):
    """Beams from precomputed encoder states (the script's design) = transformers running the encoder itself."""
    model, tok, vocab = tiny_model(assets, kind)
    src = torch.tensor([tok.encode("happy i love this red circle", add_special_tokens=False) + [vocab.eos],
                        tok.encode("sad so boring", add_special_tokens=False) + [vocab.eos] + [vocab.pad] * 3])
    mask, feats = (src != vocab.pad).long(), torch.randn(2, 9, 12)
    kw = dict(num_beams=3, min_length=3, max_length=8, early_stopping=True, do_sample=False, length_penalty=0.65,
              no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0)
    ours = icw.generate(model, src, mask, feats, kw)
    x, m = model.embed(src, mask, feats)
    with torch.no_grad():
        ref = model.lm.generate(inputs_embeds=x, attention_mask=m, **kw)
    assert ours.tolist() == ref.tolist() and ours.shape[1] > 3
    # encoder n-gram blocking sees the text ids: no encoder bigram reappears in the output
    blocked = icw.generate(model, src, mask, feats, dict(kw, encoder_no_repeat_ngram_size=2))
    for row, s in zip(blocked.tolist(), src.tolist()):
        src_bigrams = {tuple(s[i:i + 2]) for i in range(len(s) - 1)}
        assert not {tuple(row[i:i + 2]) for i in range(1, len(row) - 1)} & src_bigrams - {(vocab.eos, vocab.pad)}


def test_bart_decoding_does_not_force_a_bos_that_training_never_saw(assets):
    """A BART config may force <s> as the first generated token (facebook/bart-large's does); fine-tuning targets
    start with the reply itself (finetune_batch), so decoding must not force it: its first token is the
    teacher-forced argmax."""
    model, tok, vocab = tiny_model(assets, "bart")
    model.lm.generation_config.forced_bos_token_id = vocab.bos  # as facebook/bart-large's config sets it
    cfg = icw.Config(backbone=str(assets / "bart"), num_beams=1, min_length=0, max_length=4, length_penalty=1.0,
                     no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0)
    src = torch.tensor([tok.encode("happy i love this red circle", add_special_tokens=False) + [vocab.eos],
                        tok.encode("sad so boring", add_special_tokens=False) + [vocab.eos] + [vocab.pad] * 3])
    mask, feats = (src != vocab.pad).long(), torch.randn(2, 9, 12)
    out = icw.generate(model, src, mask, feats, icw.generation_kwargs(cfg, model.lm))
    with torch.no_grad():
        enc, m = model.encode(src, mask, feats)
        first = model.lm(encoder_outputs=enc, attention_mask=m,
                         decoder_input_ids=torch.full((2, 1), vocab.start)).logits[:, 0].argmax(-1)  # (B,)
    assert vocab.bos not in first.tolist()  # else forcing would go unseen
    assert out[:, 0].tolist() == [vocab.start] * 2 and out[:, 1].tolist() == first.tolist()


def test_untied_head_option(assets):
    tied, _, _ = tiny_model(assets, "bb")
    assert tied.lm.lm_head.weight.data_ptr() == tied.lm.get_input_embeddings().weight.data_ptr()
    untied, _, _ = tiny_model(assets, "bb", untied_head=True)
    assert untied.lm.lm_head.weight.data_ptr() != untied.lm.get_input_embeddings().weight.data_ptr()


def test_startup_line_names_the_checkpoint_choice_that_runs():
    """"model selection" says what happens: "last" unless a selection evaluation runs (--eval_every != 0); the
    paper preset selects on valid IC F1 each epoch; --select_on test scores turn-1 F1 as the release does."""
    def shown(*argv):
        cfg = icw.check_choices(icw.parse_config(icw.Config, icw.PRESETS, list(argv)))
        return icw.deviations(cfg)["model selection"]
    assert shown("--mode", "finetune") == "last"  # the default --eval_every 0: the last checkpoint is kept
    assert icw.parse_config(icw.Config, icw.PRESETS, ["--preset", "paper"]).eval_every == -1
    assert shown("--mode", "finetune", "--preset", "paper") == "valid IC/F1 each epoch"
    assert shown("--mode", "finetune", "--select_on", "test", "--eval_every", "-1") == "test turn1/F1 each epoch (release)"
    assert shown("--mode", "finetune", "--eval_every", "50") == "valid IC/F1 every 50 steps"
    assert shown("--mode", "finetune", "--select_on", "none", "--eval_every", "-1") == "last"
    assert shown("--mode", "warmup", "--preset", "paper") == "lowest epoch-mean MLM loss"  # release: last batch's
    assert shown("--mode", "warmup", "--tasks", "isp,mrm") == "lowest epoch-mean summed loss"  # no MLM to read


def test_beam_search_takes_early_stopping_from_the_generation_config(assets):
    """The release decodes with BlenderBot's generation config, which sets no early_stopping (transformers'
    default False); it is not forced to True."""
    model, _, _ = tiny_model(assets, "bb")
    cfg = icw.Config(max_length=8)
    assert icw.generation_kwargs(cfg, model.lm)["early_stopping"] is False
    model.lm.generation_config.early_stopping = True
    assert icw.generation_kwargs(cfg, model.lm)["early_stopping"] is True


def test_turns_whose_reference_is_not_among_the_candidates_are_counted(assets):
    """A turn whose reference is missing from its candidate list is not ranked: it is counted in "no_gold" (logged
    with the eval), and R@k / MRR cover the ranked turns; R@k only for k <= the number of candidates."""
    model, tok, V = tiny_model(assets, "bb")
    cfg = icw.Config(num_candidates=3, max_length=8, num_beams=2, min_length=1)
    base = dict(episode(V), dialog=[("happy", "i love this"), ("sad", "so boring"), ("curious", "why")])
    eps = [dict(base, candidates=[{"3": ["red", "i love this", "so boring"]}, None, None]),
           dict(base, candidates=[{"3": ["red", "blue", "so boring"]}, None, None])]
    rows = icw.eval_rows(model, eps, 1, torch.randn(1, 9, 12), tok, V, cfg, torch.device("cpu"), torch.float32,
                         icw.generation_kwargs(cfg, model.lm))
    assert rows[0]["rank"] in (1, 2, 3) and rows[1]["rank"] is None
    m = icw.turn_scores(rows, tok, cfg)
    assert m["no_gold"] == 1 and m["R@1/3"] == 100.0 * (rows[0]["rank"] == 1) and "R@5/3" not in m
    assert m["MRR"] == pytest.approx(100 / rows[0]["rank"])



def test_a_repeated_or_re_punctuated_reference_ranks_as_parlai_hits_at_k(assets, monkeypatch):
    """ParlAI's hits@k: a hit when any of the top k candidates equals the reference after its normalize_answer, so
    a second copy of the reference, or "I love this!", scored best ranks the reference 1 (the first copy: 4)."""
    model, tok, V = tiny_model(assets, "bb")
    cfg = icw.Config(num_candidates=4, max_length=8, num_beams=2, min_length=1)
    base = dict(episode(V), dialog=[("happy", "i love this"), ("sad", "so boring"), ("curious", "why")])
    eps = [dict(base, candidates=[{"4": ["i love this", "red", "so boring", last]}, None, None])
           for last in ("i love this", "I love this!")]
    monkeypatch.setattr(icw, "candidate_scores", lambda *a: torch.tensor([0.1, 0.5, 0.3, 0.9]))
    rows = icw.eval_rows(model, eps, 1, torch.randn(1, 9, 12), tok, V, cfg, torch.device("cpu"), torch.float32,
                         icw.generation_kwargs(cfg, model.lm))
    assert [r["rank"] for r in rows] == [1, 1] and icw.turn_scores(rows, tok, cfg)["R@1/4"] == 100.0


# ---------------------------------------------------------------------------- losses
def test_unlikelihood_hand_computed():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[5, 6, 5], [6, 0, 0]])  # pad = 0
    p = logits.softmax(-1)
    ul = lambda t, c: -math.log(max(1 - float(p.reshape(6, 7)[t, c]), 1e-5))  # noqa: E731
    mle_want = -sum(math.log(float(p[b, t, labels[b, t]])) for b, t in [(0, 0), (0, 1), (0, 2), (1, 0)])
    # release (candidate_penalty_ce_loss.py on the flattened batch 5 6 5 6 0 0): earlier tokens minus y_t,
    # C_1={5}, C_2={6}, C_3={5}, C_4={5,6}, C_5={5,6}, and pad 0 in every C_t, C_0 and the pad targets' own included
    ul_flat = ul(1, 5) + ul(2, 6) + ul(3, 5) + ul(4, 5) + ul(4, 6) + ul(5, 5) + ul(5, 6) + sum(ul(t, 0) for t in range(6))
    mle, ul_got = icw.mle_ul_loss(logits, labels, pad=0)
    assert mle.item() == pytest.approx(mle_want, rel=1e-5) and ul_got.item() == pytest.approx(ul_flat, rel=1e-5)
    # per sequence: row 0 C_1={5}, C_2={6}; row 1 has only pad after its first token
    _, ul_seq = icw.mle_ul_loss(logits, labels, pad=0, per_sequence=True)
    assert ul_seq.item() == pytest.approx(ul(1, 5) + ul(2, 6), rel=1e-5)


def test_mrm_kl_and_isp_ce():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 12), torch.randn(4, 12)
    P, Q = target.softmax(-1), pred.softmax(-1)
    assert icw.mrm_kl_loss(pred, target).item() == pytest.approx(float((P * (P / Q).log()).sum(-1).mean()), rel=1e-5)
    assert icw.mrm_kl_loss(target, target).item() == pytest.approx(0.0, abs=1e-7)
    logits, labels = torch.randn(2, 3, 5), torch.tensor([[1, 2, 0], [3, 0, 0]])
    want = -(logits.log_softmax(-1)[0, 0, 1] + logits.log_softmax(-1)[0, 1, 2] + logits.log_softmax(-1)[1, 0, 3]) / 3
    assert icw.token_ce(logits, labels, 0).item() == pytest.approx(want.item(), rel=1e-5)


# ---------------------------------------------------------------------------- batches
def episode(vocab):
    return {"caption": [10, 11], "styles": [[20], [21], [22]], "utts": [[4, 5, 6, 7, 8], [12, 13], [14]],
            "dialog": [("s1", "u1"), ("s2", "u2"), ("s3", "u3")], "row": 0, "hash": "h", "candidates": None}


def test_finetune_contexts_match_spec(assets):
    _, _, V = tiny_model(assets, "bb")
    cfg, ep = icw.Config(), episode(V)
    assert icw.dialogue_context(ep, 1, V, cfg) == [10, 11, V.eos, 20, V.sty, V.eos]
    assert icw.dialogue_context(ep, 2, V, cfg) == [10, 11, V.eos, 20, V.sty, 4, 5, 6, 7, 8, V.eos, 21, V.sty, V.eos]
    assert icw.dialogue_context(ep, 3, V, cfg) == [10, 11, V.eos, 20, V.sty, 4, 5, 6, 7, 8, V.eos,
                                                   21, V.sty, 12, 13, V.eos, 22, V.sty, V.eos]
    assert icw.dialogue_context(ep, 2, V, icw.Config(use_caption=False))[:2] == [20, V.sty]
    b = icw.finetune_batch([ep, ep], [1, 2], torch.zeros(2, 9, 12), V, cfg)
    assert b["labels"][0].tolist() == [4, 5, 6, 7, 8, V.eos] and b["labels"][1].tolist()[:3] == [12, 13, V.eos]
    assert b["dec_in"][0].tolist() == [V.start, 4, 5, 6, 7, 8]  # single </s>, shifted behind the start id
    g = torch.Generator().manual_seed(0)
    turns = icw.draw_turns([ep, {**ep, "utts": ep["utts"][:2]}] * 20, g)
    assert set(turns[0::2]) == {1, 2, 3} and set(turns[1::2]) == {1}  # 2-turn dialogues always give turn 1


def test_warmup_batches_alignment(assets):
    _, _, V = tiny_model(assets, "bb")
    cfg = icw.Config()
    eps = [episode(V) for _ in range(4)]
    feats = torch.randn(4, 9, 12)
    out = icw.warmup_batch(eps, feats, V, cfg, torch.Generator().manual_seed(0))
    dialogue = [20, V.sty, 4, 5, 6, 7, 8, V.eos, 21, V.sty, 12, 13, V.eos, 22, V.sty, 14, V.eos]
    # MLM: floor(0.2 * 6) = 1 token of "utterance 1 </s>" masked, none of the shorter ones; target = clean dialogue
    src = out["mlm"]["src"][0].tolist()
    assert src[:4] == [V.bos, 10, 11, V.eos] and src.count(V.mask) == 1 and src.index(V.mask) in range(6, 12)
    assert out["mlm"]["labels"][0].tolist() == [V.task["mlm"]] + dialogue
    assert out["mlm"]["dec_in"][0].tolist() == [V.start, V.task["mlm"]] + dialogue[:-1]
    # ISP: floor(B/2) swapped, each labelled negative; the answer is predicted from <start> <cid> (not leaked)
    lab, dec = out["isp"]["labels"], out["isp"]["dec_in"]
    neg = [r.tolist() == [V.task["isp"], *V.negative, V.eos] for r in lab]
    assert sum(neg) == 2 and all(r.tolist() == [V.task["isp"], *V.positive, V.eos] for r, n in zip(lab, neg) if not n)
    assert dec[:, :2].tolist() == [[V.start, V.task["isp"]]] * 4 and lab[:, 0].tolist() == [V.task["isp"]] * 4
    for i, n in enumerate(neg):
        same = any(torch.equal(out["isp"]["feats"][i], feats[j]) for j in range(4) if j != i)
        assert same if n else torch.equal(out["isp"]["feats"][i], feats[i])
    # MRM: one patch zeroed for the whole batch; markers say which; target = that patch's original feature
    f = out["mrm"]["feats"]
    zeroed = (f.abs().sum(-1) == 0)
    assert zeroed.sum(1).tolist() == [1] * 4 and (zeroed == zeroed[0]).all()
    p = int(zeroed[0].nonzero())
    markers = out["mrm"]["labels"][0].tolist()
    assert markers == [V.task["mrm"]] + [V.zero if i == p else V.feat for i in range(9)] + [V.eos]
    torch.testing.assert_close(out["mrm"]["mrm_target"], feats[:, p])
    # GCD: caption tokens masked (length kept, its </s> kept), target = caption </s>
    assert out["gcd"]["src"][0].tolist()[:4] == [V.bos, V.mask, V.mask, V.eos]
    assert out["gcd"]["labels"][0].tolist() == [V.task["gcd"], 10, 11, V.eos]


def test_mlm_masks_a_fifth_of_each_utterance_with_its_eos(assets):
    """Release dataset.py masked_language_modeling: floor(0.2 * n) of the n tokens of "utterance </s>", the </s>
    among the positions drawn; a 4-token utterance (n = 5) gets exactly one mask."""
    _, _, V = tiny_model(assets, "bb")
    ep = {"caption": [10, 11], "styles": [[20]], "utts": [[4, 5, 6, 7]]}
    where = set()
    for seed in range(40):
        src = icw.warmup_batch([ep], torch.zeros(1, 9, 12), V, icw.Config(tasks="mlm"),
                               torch.Generator().manual_seed(seed))["mlm"]["src"][0].tolist()
        assert src.count(V.mask) == 1 and src[:6] == [V.bos, 10, 11, V.eos, 20, V.sty]
        where.add(src.index(V.mask) - 6)
    assert where == set(range(5))  # any of the 4 tokens or the </s>


def test_isp_donors_are_distinct_unswapped_rows():
    """Release dataset.py image_swapping: the floor(B/2) swapped rows take the images of as many other, unswapped
    rows, one each (no donor twice)."""
    V = icw.Vocab(pad=0, eos=1, bos=None, start=0, mask=3, img=4, img_end=5, task={"isp": 6}, sty=7, feat=8,
                  zero=9, positive=[10], negative=[11])
    eps = [{"caption": [12], "styles": [[13]], "utts": [[14]]}] * 16
    feats = torch.arange(16.0)[:, None, None].expand(16, 9, 4)  # row i's image is all i
    for seed in range(5):
        b = icw.warmup_batch(eps, feats, V, icw.Config(tasks="isp"), torch.Generator().manual_seed(seed))["isp"]
        got = b["feats"][:, 0, 0].long()
        swapped = (b["labels"][:, 1] == 11).nonzero().flatten()
        kept = sorted(set(range(16)) - set(swapped.tolist()))
        assert len(swapped) == 8 and (got[kept] == torch.tensor(kept)).all()
        donors = got[swapped].tolist()
        assert len(set(donors)) == 8 and set(donors) <= set(kept)


@pytest.mark.parametrize("kind", ["bb", "t5"])
def test_decoder_masks_pad_inputs_as_the_release(assets, kind):
    """Release dataset.py (~692-694) / model_blender_bot.py: decoder_attention_mask = the labels' padding mask
    shifted right with column 0 set to 1; pad queries then see no pad keys. The release's UL keeps its term at
    pad positions (--ul_per_sequence false), so the loss equals a transcription of that masked forward."""
    model, _, V = tiny_model(assets, kind)
    ep = {"caption": [10, 11], "styles": [[20], [21]], "utts": [[4, 5, 6, 7, 8, 9, 12], [13]]}
    b = icw.finetune_batch([ep, ep], [1, 2], torch.randn(2, 9, 12), V, icw.Config())  # labels of 8 and 2 tokens
    release_mask = torch.cat([torch.ones(2, 1, dtype=torch.long), (b["labels"] != V.pad).long()[:, :-1]], 1)
    with torch.no_grad():
        out = model({"ft": b})
        enc, mask = model.encode(b["src"], b["src_mask"], b["feats"])

        def forward(dec_mask):
            return model.lm(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=b["dec_in"],
                            decoder_attention_mask=dec_mask).logits
        mle, ul = icw.mle_ul_loss(forward(release_mask), b["labels"], V.pad)
        _, ul_unmasked = icw.mle_ul_loss(forward(None), b["labels"], V.pad)
    assert abs(ul_unmasked.item() - ul.item()) > 1e-4  # the mask matters at the pad positions here
    assert out["ft_ul"].item() == pytest.approx(ul.item(), rel=1e-6, abs=1e-6)
    assert out["ft_mle"].item() == pytest.approx(mle.item(), rel=1e-6)


# ---------------------------------------------------------------------------- stages via main()
@pytest.fixture(scope="module")
def cached(assets, toy_root, tmp_path_factory):
    """A slice of the toy world's dialogues with features (toy CLIP) and captions (random tiny BLIP-2) cached
    through main(); training then uses the toy world's pretrained T5."""
    root = tmp_path_factory.mktemp("icw_toy")
    paths = dict(toy_root=toy_root, data_dir=toy_subset(toy_root, root / "image_chat"),
                 image_root=os.path.join(toy_root, "image_chat", "images"), cache_dir=root / "cache")
    feats = run(["--mode", "features"], root / "runs_f", **paths)
    assert feats == {"images": 64, "cached_before": 0, "computed": 64, "unreadable": 0}
    run(["--mode", "captions"], root / "runs_c", captioner=assets / "blip2", **paths)
    return root, paths


def train_args(assets, mode, steps, **extra):
    args = ["--mode", mode, "--max_steps", str(steps), "--log_every", "1",
            "--warmup_batch", "8", "--warmup_micro", "4", "--ft_batch", "8", "--ft_micro", "4", "--eval_max", "4",
            "--eval_batch", "4", "--num_beams", "2", "--max_length", "8", "--min_length", "1"]
    return args + [a for k, v in extra.items() for a in (f"--{k}", str(v))]


def read_log(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_warmup_finetune_eval_pipeline(assets, cached, tmp_path, capsys):
    root, paths = cached
    run(train_args(assets, "warmup", 9), tmp_path / "wu", **paths)
    logs = [r for r in read_log(tmp_path / "wu") if "mlm" in r]
    assert {"mlm", "isp", "mrm", "gcd", "lr", "grad_norm", "samples_s"} <= set(logs[0])
    # learning, against a control that sees the same 9 batches with lr 0 (batch-to-batch noise cancels): the
    # last three steps average at most 87% of the control's (tiny worlds of seeds 0/1/2 give 0.675/0.693/0.690;
    # against the run's own first three steps, 0.735/0.731/0.728, a control run's own ratio is 0.99-1.04)
    run(train_args(assets, "warmup", 9, lr=0, report="false"), tmp_path / "wu_ctrl", **paths)
    loss = [r["loss"] for r in logs]
    ctrl = [r["loss"] for r in read_log(tmp_path / "wu_ctrl") if "mlm" in r]
    print(f"[learning] warm-up loss, last 3 steps: {np.mean(loss[-3:]):.1f}, control {np.mean(ctrl[-3:]):.1f}")
    assert len(loss) == len(ctrl) == 9 and np.mean(loss[-3:]) < 0.87 * np.mean(ctrl[-3:]), (loss, ctrl)
    # best.pt is written at an epoch's end (step 6 of 9) after the epoch's MLM mean is reset: a resume from it
    # starts the next epoch's mean afresh instead of folding the finished epoch in
    pos = torch.load(tmp_path / "wu" / "best.pt", weights_only=True)["data_position"]
    assert (pos["epoch_n"], pos["epoch_sum"]) == (0, 0.0)
    wu = torch.load(tmp_path / "wu" / "last.pt", weights_only=True)
    assert (wu["script"], wu["kind"]) == ("imagechat_warmup", "warmup")
    ft = run(train_args(assets, "finetune", 4, init=tmp_path / "wu" / "last.pt"), tmp_path / "ft", **paths)
    for key in ("IC/F1", "IC/BLEU-4", "IC/ROUGE-L", "turn3/F1", "turn1/R@1/100", "IC/R@10/100", "IC/PPL"):
        assert key in ft and math.isfinite(ft[key])
    assert ft["turn1/n"] == 4 and ft["turn1/no_gold"] == 0 and ft["IC/R@1/100"] <= ft["IC/R@5/100"]
    with open(tmp_path / "ft" / "predictions_test_turn2.jsonl") as f:
        assert {"hash", "context", "reference", "prediction"} == set(json.loads(f.readline()))
    ev = run(train_args(assets, "eval", 0, init=tmp_path / "ft" / "last.pt"), tmp_path / "ev", **paths)
    assert ev["IC/F1"] == pytest.approx(ft["IC/F1"])
    ck = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    assert ck["config"]["mode"] == "finetune" and ck["step"] == 4
    assert (ck["script"], ck["kind"]) == ("imagechat_warmup", "finetune")
    # the release's AdamW(self.parameters()) decays every parameter, LayerNorms and biases too: one group
    assert [g["weight_decay"] for g in ck["optimizer"]["param_groups"]] == [ck["config"]["weight_decay"]]
    # the no-image, no-caption model has no image block; its selection evaluations (each step) are logged
    noimg = run(train_args(assets, "finetune", 2, use_image="false", use_caption="false", eval_every=1, eval_max=2),
                tmp_path / "ni", **paths)
    assert math.isfinite(noimg["final_loss"])
    assert [r["step"] for r in read_log(tmp_path / "ni") if "valid/IC_F1" in r] == [1, 2]
    check_reports(tmp_path, paths["data_dir"], capsys.readouterr().out)


def check_reports(tmp_path, data_dir, out):
    """Issue 21: each run's report.html parses, its images decode, its SVGs parse (read_report raises if not),
    and it shows what it promises: curves, the --init run's curves, per-turn figures, dialogues."""
    from html import escape
    from common.report import read_report
    page = {run: (tmp_path / run / "report.html").read_text(encoding="utf-8") for run in ("wu", "ft", "ev", "ni")}
    info = {run: read_report(tmp_path / run / "report.html") for run in page}
    evald = ["Figures on test", "Dialogues from test"]
    assert info["wu"]["sections"] == ["Training"] and info["wu"]["images"] == 0 and info["wu"]["svgs"] >= 3
    assert all(f'<polyline data-series="{t}"' in page["wu"] for t in ("mlm", "isp", "mrm", "gcd", "lr"))
    assert info["ft"]["sections"] == ["Training", "Training of the --init run", *evald]
    assert all(f'<polyline data-series="{t}"' in page["ft"] for t in ("ft", "gcd"))  # warm-up's curves too
    assert info["ev"]["sections"] == ["Training of the --init run", *evald]  # --init ft: its curves
    assert info["ni"]["sections"] == ["Training", *evald] and 'data-series="valid/IC_F1"' in page["ni"]
    with open(os.path.join(data_dir, "test.json")) as f:
        first = json.load(f)[0]
    for run in ("ft", "ev", "ni"):
        assert info[run]["images"] == (2 if run == "ni" else 4)  # a card per dialogue (--eval_max), its image
        with open(tmp_path / run / "predictions_test_turn2.jsonl") as f:
            turn2 = json.loads(f.readline())
        (s1, u1), (s2, u2) = first["dialog"][:2]  # turn 1 is the history of turn 2's generated reply
        card = (f"<b>1. {escape(s1)}:</b> {escape(u1)}</p>", f"<b>2. {escape(s2)}:</b> {escape(u2)}</p>",
                f"<b>generated:</b> {escape(turn2['prediction'])}</p>", "<b>rank of the reference:</b> ")
        assert all(part in page[run] for part in card) and page[run].index(card[0]) < page[run].index(card[2])
        assert ("<b>caption:</b>" in page[run]) == (run != "ni")
    # the build time is logged next to the eval's
    assert len(re.findall(r"report: \S+report.html \(\d+\.\d\d s; eval \d+\.\d s\)", out)) == 3


def test_selection_runs_each_epoch_and_test_scores_turn1_f1(assets, cached, tmp_path, monkeypatch, capsys):
    """--eval_every -1 evaluates the selection split at each epoch's end (6 steps here), as the release validates
    each epoch; --select_on test keeps the epoch of best turn-1 F1 (its ModelCheckpoint on t1_f1), valid the best
    IC F1.  The two epochs' scores disagree on purpose."""
    _, paths = cached
    scores, splits = [], []
    monkeypatch.setattr(icw, "evaluate", lambda *a, **k: splits.append(a[8]) or scores.pop(0))
    for split, key, best_step in (("test", "test/turn1_F1", 6), ("valid", "valid/IC_F1", 12)):
        scores[:] = [{"IC/F1": 10.0, "turn1/F1": 50.0}, {"IC/F1": 20.0, "turn1/F1": 5.0}]
        run(train_args(assets, "finetune", 12, eval_every=-1, select_on=split, final_eval="false", report="false"),
            tmp_path / split, **paths)
        assert scores == [] and splits[-2:] == [split, split]
        assert [r["step"] for r in read_log(tmp_path / split) if key in r] == [6, 12]
        assert torch.load(tmp_path / split / "best.pt", weights_only=True)["step"] == best_step
        assert f"model selection: {split} " in capsys.readouterr().out


def test_resume_equals_unbroken_run(assets, cached, tmp_path, capsys):
    _, paths = cached
    a = run(train_args(assets, "warmup", 4), tmp_path / "a", **paths)
    run(train_args(assets, "warmup", 4, stop_after=2), tmp_path / "b", **paths)
    ck = tmp_path / "b" / "last.pt"
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a step the killed run logged after its checkpoint
        f.write(json.dumps({"step": 3, "loss": 1e9}) + "\n")
    # a changed config is named in one line and refused, unless --resume_changes true
    with pytest.raises(CheckpointMismatch, match=r"resume changes the config: lr 0.001 -> 0.002 \(an exact"):
        run(train_args(assets, "warmup", 4, resume=ck, lr=0.002), tmp_path / "b", **paths)
    with pytest.raises(CheckpointMismatch, match=r"this is a imagechat_warmup warmup checkpoint; .* finetune"):
        run(train_args(assets, "finetune", 4, resume=ck), tmp_path / "b", **paths)
    capsys.readouterr()
    run(train_args(assets, "warmup", 4, resume=ck, lr=0.002, resume_changes="true", stop_after=1), tmp_path / "c",
        **paths)
    assert "resume changes the config: lr 0.001 -> 0.002 (allowed by --resume_changes)" in capsys.readouterr().out
    b = run(train_args(assets, "warmup", 4, resume=ck), tmp_path / "b", **paths)
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-6)
    # metrics.jsonl holds each step once: the stale step 3 is gone, the resume is marked
    log = read_log(tmp_path / "b")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4] and max(r["loss"] for r in log if "loss" in r) < 1e9
    assert [r["step"] for r in log if r.get("event") == "resume"] == [2]


@pytest.mark.parametrize("per_epoch", [None, 10])
def test_schedule_is_torchs_onecyclelr_with_its_momentum_cycle(per_epoch):
    """The release (src/model/model_blender_bot.py) builds OneCycleLR(AdamW, max_lr, anneal_strategy='linear')
    with torch's default cycle_momentum: beta1 goes 0.95 -> 0.85 (lr peak) -> 0.95.  onecycle gives its
    (lr, beta1) per optimizer step, and with --legacy_lr (per_epoch: the release's Lightning steps it once per
    epoch) what that stepping gives: beta1 stays near 0.95, the lr near lr / 25."""
    cfg = icw.parse_config(icw.Config, icw.PRESETS, ["--preset", "paper", "--legacy_lr", str(bool(per_epoch))])
    total, p = 100, torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr, eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=cfg.pct_start,
                                                anneal_strategy="linear")
    ours, ref = [], []
    for step in range(total):
        ours.append(icw.onecycle(step, total, cfg, per_epoch or 1))
        ref.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        if per_epoch is None or (step + 1) % per_epoch == 0:
            sched.step()
    assert [b for _, b in ours] == [b for _, b in ref] and [lr for lr, _ in ours] == pytest.approx(
        [lr for lr, _ in ref], rel=1e-12)
    betas = [b for _, b in ours]
    if per_epoch:
        assert min(betas) > 0.91 and max(lr for lr, _ in ours) < 9 * cfg.lr / 25
    else:
        assert betas[0] == betas[-1] == 0.95 and min(betas) == pytest.approx(0.85)
    assert cfg.cycle_momentum and not icw.parse_config(icw.Config, icw.PRESETS, []).cycle_momentum


@pytest.mark.parametrize("mode,steps,release_batch", [("warmup", 9, 16), ("finetune", 8, 64)])
def test_legacy_lr_is_the_release_cycle_stepped_once_an_epoch(assets, cached, tmp_path, monkeypatch, capsys, mode,
                                                              steps, release_batch):
    """--legacy_lr: the release sizes OneCycleLR in loader batches, steps_per_epoch = N // batch + 1 for
    max_epochs, batch its DataLoader's --batch_size (16: pretrain_preprocessing.py, the warm-up script its README
    runs; 64: training_ablation.py), and Lightning steps it once an epoch (the default interval).  The cycle is
    the release's whatever this run's micro batch (4 here) or world size; it was sized with the micro batch, and
    before that in optimizer steps (the lr rose ~1.8x over the paper's warm-up instead of ~1.0065x)."""
    _, paths = cached
    seen, update = [], icw.optimizer_update
    monkeypatch.setattr(icw, "optimizer_update", lambda opt, *a: seen.append(
        opt.param_groups[0]["lr"]) or update(opt, *a))
    capsys.readouterr()
    run(train_args(assets, mode, steps, legacy_lr="true", final_eval="false", report="false"), tmp_path, **paths)
    n, per_epoch = map(int, re.search(rf"{mode}: (\d+) examples, .*, (\d+) steps/epoch", capsys.readouterr().out)
                       .groups())
    cfg = icw.parse_config(icw.Config, icw.PRESETS, [])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, steps_per_epoch=n // release_batch + 1,
                                                epochs=cfg.warmup_epochs if mode == "warmup" else cfg.ft_epochs,
                                                anneal_strategy="linear")
    ref = []
    for step in range(len(seen)):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        if (step + 1) % per_epoch == 0:
            sched.step()
    assert len(seen) == steps > per_epoch and seen == pytest.approx(ref, rel=1e-12)
    assert seen[0] == pytest.approx(cfg.lr / 25) and seen[per_epoch] > seen[per_epoch - 1] == seen[0]


def test_cycle_momentum_moves_adamw_beta1_per_step_and_resumes_exactly(assets, cached, tmp_path, monkeypatch):
    """--cycle_momentum true: the optimizer steps with the beta1 of the release's scheduler, which changes
    between steps (the toy preset keeps beta1 0.9); a run stopped after step 1 and resumed (the betas in the
    optimizer state are set again from the step) ends as the unbroken one."""
    _, paths = cached
    seen, update = [], icw.optimizer_update
    monkeypatch.setattr(icw, "optimizer_update", lambda opt, *a: seen.append(
        opt.param_groups[0]["betas"]) or update(opt, *a))
    a = run(train_args(assets, "warmup", 2, cycle_momentum="true"), tmp_path / "a", **paths)
    cfg = icw.parse_config(icw.Config, icw.PRESETS, [])
    assert seen == [(icw.onecycle(s, 2, cfg, 1)[1], 0.999) for s in (0, 1)] and seen[0][0] < seen[1][0] == 0.95
    run(train_args(assets, "warmup", 2, cycle_momentum="true", stop_after=1), tmp_path / "b", **paths)
    b = run(train_args(assets, "warmup", 2, cycle_momentum="true", resume=tmp_path / "b" / "last.pt"),
            tmp_path / "b", **paths)
    assert seen[2:] == seen[:2] and b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-6)
    run(train_args(assets, "warmup", 1), tmp_path / "c", **paths)
    assert seen[-1] == (0.9, 0.999)


def test_training_mfu_counts_the_tokens_bench_counts(assets, cached, tmp_path, monkeypatch):
    """A training step's MFU counts the FLOPs of the same tokens as --bench: text, decoder input and the 11 image
    slots per example (the encoder's image block)."""
    _, paths = cached
    seen = {"train": []}
    monkeypatch.setattr(icw, "run_bench", lambda *a, flops_per_step=None, **k: seen.update(bench=flops_per_step))
    monkeypatch.setattr(icw, "mfu", lambda flops, *a: seen["train"].append(flops))
    for steps, extra in ((1, {"bench": 1}), (1, {})):
        run(train_args(assets, "warmup", steps, warmup_micro=8, **extra), tmp_path / str(len(extra)), **paths)
    assert seen["train"] and seen["train"][0] == seen["bench"]


@pytest.mark.parametrize("use_image", [True, False])
def test_training_flops_count_the_image_slots_the_model_has(assets, cached, tmp_path, monkeypatch, use_image):
    """MFU's FLOPs, 6 x trained parameters x tokens, each token over the parameters it passes (arXiv 2001.08361,
    Sec. 2.1): a source token (the text and the model's image slots: 11, <img>, the 9 crops, </img>; none with
    --use_image false) the encoder, the image projection and the decoder's cross-attention keys and values; a
    decoder input token every other trained parameter (the shared embedding as the output layer)."""
    _, paths = cached
    seen, make, update, wrap = {"flops": [], "batches": []}, icw.finetune_batch, icw.optimizer_update, icw.wrap_ddp
    monkeypatch.setattr(icw, "finetune_batch", lambda *a: seen["batches"].append(make(*a)) or seen["batches"][-1])
    monkeypatch.setattr(icw, "optimizer_update", lambda opt, scaler, params, *a: seen.update(
        params=params) or update(opt, scaler, params, *a))
    monkeypatch.setattr(icw, "wrap_ddp", lambda model, dist: seen.update(model=model) or wrap(model, dist))
    monkeypatch.setattr(icw, "mfu", lambda flops, *a: seen["flops"].append(flops))
    run(train_args(assets, "finetune", 1, use_image=str(use_image).lower(), final_eval="false", report="false"),
        tmp_path, **paths)
    model = seen["model"]
    lm = model.lm  # the toy's T5: its encoder, and each decoder block's cross-attention (layer 1) k and v
    src_side = [*lm.get_encoder().parameters(), *model.img_proj.parameters(), *model.img_norm.parameters(),
                *(p for blk in lm.get_decoder().block for m in (blk.layer[1].EncDecAttention.k,
                                                                blk.layer[1].EncDecAttention.v)
                  for p in m.parameters())]
    src_ids = {id(p) for p in src_side} - {id(lm.shared.weight)}  # the embedding: a lookup there
    n_src = sum(p.numel() for p in seen["params"] if id(p) in src_ids)
    n_tgt = sum(p.numel() for p in seen["params"]) - n_src
    assert 0 < n_src < n_tgt
    want = 6 * sum(n_src * (b["src"].numel() + 11 * use_image * len(b["src"])) + n_tgt * b["dec_in"].numel()
                   for b in seen["batches"])
    assert len(seen["batches"]) == 2 and seen["flops"] == [want]


def test_training_step_reads_nothing_back_per_micro_batch(assets, cached, tmp_path, monkeypatch):
    """Issue 18.9: the step returns its loss terms as detached tensors (read at logging time), and the tensors that
    this repository's code turns into Python values during a step (host syncs on a GPU: the optimizer update's
    grad norm and finiteness check) are as many with 4 micro-batches as with 1.  (transformers' own mask code
    reads one value per forward; it is left out of the count.)  --bench draws the data apart from the step."""
    _, paths = cached
    seen, counts = {}, {}
    monkeypatch.setattr(icw, "run_bench", lambda step_fn, *a, data_fn=None, **k: seen.update(step=step_fn,
                                                                                              data=data_fn))
    for micro in (8, 2):
        args = train_args(assets, "warmup", 2, bench=1)
        args[args.index("--warmup_micro") + 1] = str(micro)
        run(args, tmp_path / str(micro), **paths)
        batches, calls = seen["data"](), []
        assert len(batches) == 8 // micro

        def counted(f, name):
            def wrapper(self, *a, **k):
                where = sys._getframe(1).f_code.co_filename
                if f"{os.sep}transformers{os.sep}" not in where:
                    calls.append((name, os.path.basename(where)))
                return f(self, *a, **k)
            return wrapper
        with monkeypatch.context() as m:
            for name in ("__float__", "__int__", "__bool__", "__index__", "item", "tolist", "numpy"):
                m.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), name))
            terms, lr, gnorm, _ = seen["step"](batches)
        counts[micro] = sorted(calls)
        assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in terms.values())
        assert set(terms) >= {"loss", "mlm", "isp", "mrm", "gcd"} and isinstance(gnorm, float)
    assert counts[2] == counts[8] and ("__float__", "train.py") in counts[8]


def test_checkpoints_of_other_scripts_are_named(assets, cached, tmp_path):
    """--init / --resume with another script's checkpoint: one line naming what it is, before any key is read."""
    _, paths = cached
    stamped, old = tmp_path / "bp.pt", tmp_path / "old.pt"
    torch.save({"script": "blip2_pformer", "kind": "stage 1", "model": {}}, stamped)
    torch.save({"model": {}, "config": {"bridge": "xattn"}}, old)  # unstamped, from perceiver_caption
    want = r"--init .*bp.pt: this is a blip2_pformer stage 1 checkpoint; imagechat_warmup expects"
    with pytest.raises(CheckpointMismatch, match=want):
        run(train_args(assets, "finetune", 1, init=stamped), tmp_path / "x", **paths)
    with pytest.raises(CheckpointMismatch, match=r"--init .*old.pt: this is a perceiver_caption \(unstamped\)"):
        run(train_args(assets, "eval", 0, init=old), tmp_path / "y", **paths)
    with pytest.raises(CheckpointMismatch, match=r"--resume .*bp.pt: this is a blip2_pformer stage 1"):
        run(train_args(assets, "warmup", 2, resume=stamped), tmp_path / "z", **paths)


def test_eval_and_chat_build_the_model_as_init_trained_it_unless_a_flag_says_otherwise(assets, cached, tmp_path,
                                                                                         capsys):
    """--mode eval --init: the model-shaping fields (use_caption, use_image, seg_tokens, ...) come from the
    checkpoint's config, as --mode chat takes them; a caption-free model evaluated without repeating
    --use_caption false is not fed captions (its contexts hold none).  A flag given wins, with a warning."""
    _, paths = cached
    run(train_args(assets, "finetune", 1, use_caption="false", seg_tokens=12, final_eval="false", report="false"),
        tmp_path / "ft", **paths)
    ev = train_args(assets, "eval", 0, init=tmp_path / "ft" / "last.pt", eval_max=1, num_candidates=0,
                    report="false")
    run(ev, tmp_path / "ev", **paths)
    with open(tmp_path / "ev" / "config.json") as f:
        used = json.load(f)
    assert (used["use_caption"], used["use_image"], used["seg_tokens"]) == (False, True, 12)
    capsys.readouterr()
    run([*ev, "--use_caption", "true"], tmp_path / "ev2", **paths)
    assert "warning: the model is not evaluated as --init was trained: --use_caption True (trained: False)" in \
        capsys.readouterr().out
    with open(tmp_path / "ev2" / "config.json") as f:
        assert json.load(f)["use_caption"] is True
    contexts = []  # turn 1's encoder text: "style <sty>", behind "caption </s>" where captions are read
    for run_dir in ("ev", "ev2"):
        with open(tmp_path / run_dir / "predictions_test_turn1.jsonl") as f:
            contexts.append(json.loads(f.readline())["context"].strip())
    assert len(contexts[1]) > len(contexts[0]) and contexts[1].endswith(contexts[0])


def test_final_test_reads_the_best_weights_after_a_resume_into_another_out_dir(assets, cached, tmp_path,
                                                                              monkeypatch, capsys):
    """A fine-tuning resumed into another --out_dir tests the weights of its best selection score: best.pt of the
    resumed run's folder, not a stale best.pt of an earlier run in the new out_dir (another score); without a
    best.pt of that score it tests the last weights, and says so."""
    _, paths = cached
    scores, tested = [], []

    def evaluate(model, data, feats, tok, vocab, cfg, dist, dtype, split, run_dir=None, shown=None):
        if run_dir is None:  # a selection evaluation
            return {"IC/F1": scores.pop(0)}
        tested.append({k: v.clone() for k, v in icw.unwrap(model).state_dict().items()})
        return {"IC/F1": 0.0}
    monkeypatch.setattr(icw, "evaluate", evaluate)
    args = lambda **kw: train_args(assets, "finetune", 4, eval_every=1, report="false", **kw)  # noqa: E731
    scores[:] = [10.0, 20.0]
    run(args(stop_after=2), tmp_path / "a", **paths)  # best.pt: step 2, score 20
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    stale = {**best, "best": 30.0, "model": {k: v + 1 if v.is_floating_point() else v for k, v in best["model"].items()}}
    os.makedirs(tmp_path / "b")
    torch.save(stale, tmp_path / "b" / "best.pt")  # an earlier run's, in the reused out_dir
    scores[:] = [5.0, 6.0]
    capsys.readouterr()
    run(args(resume=tmp_path / "a" / "last.pt"), tmp_path / "b", **paths)
    assert scores == [] and len(tested) == 1
    for k, v in best["model"].items():
        torch.testing.assert_close(tested[0][k], v, rtol=0, atol=0)
    assert f"final test on the selected weights: {tmp_path / 'a' / 'best.pt'} (step 2, score 20)" in \
        capsys.readouterr().out
    os.remove(tmp_path / "a" / "best.pt")
    scores[:] = [5.0, 6.0]
    run(args(resume=tmp_path / "a" / "last.pt"), tmp_path / "c", **paths)
    assert "final test on the last weights: no best.pt with the best score 20.0 in" in capsys.readouterr().out
    last = torch.load(tmp_path / "c" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(tested[1][k], v) for k, v in last.items())


def test_wrong_image_root_stops_early(assets, cached, tmp_path):
    """No readable image: the bad-image rule stops the stage after min_tried images with one line."""
    _, paths = cached
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match=r"too many unreadable images under .*empty: 24 of 24 images unreadable"):
        run(["--mode", "features", "--feat_batch", "8"], tmp_path / "f", **{**paths, "image_root": tmp_path / "empty",
                                                                           "cache_dir": tmp_path / "cache"})
    assert not os.path.isdir(tmp_path / "cache" / "features") or not os.listdir(tmp_path / "cache" / "features")


def test_training_without_the_features_stops_instead_of_reading_zeros(assets, cached, tmp_path, capsys):
    """Absent features are an error, never silent zero features (ParlAI #2394: an evaluation near chance, traced
    to the image features it was given): an empty cache names the stage to run, and a cache that covers too few of the
    episodes stops with the count; a few missing ones (under --max_missing_frac) are skipped and counted."""
    _, paths = cached
    os.makedirs(tmp_path / "empty")
    args = train_args(assets, "finetune", 1, final_eval="false", report="false")
    with pytest.raises(DataError, match=r"no CLIP features in .*empty.features: run --mode features first"):
        run(args, tmp_path / "a", **{**paths, "cache_dir": tmp_path / "empty"})
    index, feats = ic.load_features(str(paths["cache_dir"]))
    with open(os.path.join(paths["data_dir"], "train.json")) as f:
        train = [ep["image_hash"] for ep in json.load(f)]  # 48 episodes, one image each
    for gone, error in ((train[:24], True), (train[:1], False)):
        cache = tmp_path / f"cache_{len(gone)}"
        shutil.copytree(paths["cache_dir"], cache, ignore=shutil.ignore_patterns("features"))
        os.makedirs(cache / "features")
        kept = [h for h in sorted(index) if h not in gone]
        torch.save({"hashes": kept, "feats": feats[[index[h] for h in kept]]}, cache / "features" / "part.pt")
        if error:
            with pytest.raises(DataError, match=r"train: 24 of 48 episodes lack features or captions "
                                                r"\(> max_missing_frac 0.05\)"):
                run(args, tmp_path / "b", **{**paths, "cache_dir": cache})
        else:  # 1 of 48 (2%): skipped and counted, under the 5% a run accepts
            capsys.readouterr()
            run(args, tmp_path / "c", **{**paths, "cache_dir": cache})
            want = "train: 47 episodes, 1 skipped for a missing feature/caption ({'feature': 1})"
            assert want in capsys.readouterr().out


def _split_hashes(data_dir, split):
    with open(os.path.join(data_dir, f"{split}.json")) as f:
        return [ep["image_hash"] for ep in json.load(f) if ep["dialog"]]


def _record_splits(monkeypatch):
    """[(split, episode hashes)] of every split a run tokenises (load_split), in order."""
    seen, load = [], icw.load_split

    def record(cfg, split, *a, **kw):
        data = load(cfg, split, *a, **kw)
        seen.append((split, [ep["hash"] for ep in data.episodes]))
        return data
    monkeypatch.setattr(icw, "load_split", record)
    return seen


NO_FEATURES = "--use_image false and no CLIP features in "


def test_a_text_only_run_needs_no_features_cache(assets, cached, tmp_path, monkeypatch, capsys):
    """--use_image false (no image block) reads no feature: without a features cache, fine-tuning and eval run
    on every episode of each split and say so in one line, instead of asking for --mode features (~200k images
    through CLIP on Image-Chat).  The model is the one a run with the cache builds (its unused img_proj and
    mrm_head sized by CLIP's projection_dim, read from the config; their initialisation comes before the segment
    embedding's): on this slice, whose 64 images all have features, the two train on the same episodes to the
    same weights, and an eval without the cache loads the cached run's checkpoint, taking --use_image false
    from it.  --use_image true without features still stops; captions are still required."""
    _, paths = cached
    nocache = tmp_path / "nocache"
    shutil.copytree(paths["cache_dir"], nocache, ignore=shutil.ignore_patterns("features", "features.meta.json"))
    seen = _record_splits(monkeypatch)
    args = train_args(assets, "finetune", 2, use_image="false", final_eval="false", report="false")
    capsys.readouterr()
    run(args, tmp_path / "with", **paths)
    assert NO_FEATURES not in capsys.readouterr().out
    run(args, tmp_path / "without", **{**paths, "cache_dir": nocache})
    out = capsys.readouterr().out
    assert out.count(NO_FEATURES) == 1 and "every episode of each split is kept" in out
    assert "keeps only the episodes whose image was readable" in out
    train = _split_hashes(paths["data_dir"], "train")
    assert seen == [("train", train), ("train", train)] and len(train) == 48
    with_ck, without_ck = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"]
                           for d in ("with", "without"))
    width = ic.load_features(str(paths["cache_dir"]))[1].shape[-1]  # the toy CLIP's projection_dim
    assert with_ck.keys() == without_ck.keys() and without_ck["img_proj.weight"].shape[1] == width
    for k, v in with_ck.items():
        assert v.shape == without_ck[k].shape and torch.allclose(v, without_ck[k], rtol=1e-5, atol=1e-7), k
    seen.clear()
    res = run(train_args(assets, "eval", 0, init=tmp_path / "with" / "last.pt", eval_max=2, report="false"),
              tmp_path / "ev", **{**paths, "cache_dir": nocache})
    assert math.isfinite(res["IC/F1"]) and capsys.readouterr().out.count(NO_FEATURES) == 1
    assert seen == [("test", _split_hashes(paths["data_dir"], "test"))] and len(seen[0][1]) == 8
    with pytest.raises(DataError, match=r"no CLIP features in .*nocache.features: run --mode features first"):
        run(train_args(assets, "finetune", 1, final_eval="false", report="false"), tmp_path / "img",
            **{**paths, "cache_dir": nocache})
    for name in os.listdir(nocache):  # captions.json, captions.r0.jsonl, captions.meta.json
        if name.startswith("captions"):
            os.remove(nocache / name)
    with pytest.raises(DataError, match=r"no captions in .*nocache: run --mode captions first"):
        run(args, tmp_path / "nocap", **{**paths, "cache_dir": nocache})


def test_a_text_only_run_with_features_keeps_the_image_runs_episodes(assets, cached, tmp_path, monkeypatch, capsys):
    """With a features cache present, --use_image false keeps exactly the image run's episodes (those whose image
    has a feature), so the two stay comparable; without the cache it keeps the whole split."""
    _, paths = cached
    index, feats = ic.load_features(str(paths["cache_dir"]))
    train = _split_hashes(paths["data_dir"], "train")
    partial, nocache = tmp_path / "partial", tmp_path / "nocache"
    for cache in (partial, nocache):
        shutil.copytree(paths["cache_dir"], cache, ignore=shutil.ignore_patterns("features", "features.meta.json"))
    os.makedirs(partial / "features")
    kept = [h for h in sorted(index) if h != train[0]]  # one train image without a feature (an unreadable one)
    torch.save({"hashes": kept, "feats": feats[[index[h] for h in kept]]}, partial / "features" / "part.pt")
    seen = _record_splits(monkeypatch)
    for name, use_image, cache in (("img", "true", partial), ("txt", "false", partial), ("all", "false", nocache)):
        run(train_args(assets, "finetune", 1, use_image=use_image, final_eval="false", report="false"),
            tmp_path / name, **{**paths, "cache_dir": cache})
    assert [s for s, _ in seen] == ["train"] * 3
    assert seen[0][1] == seen[1][1] == train[1:] and seen[2][1] == train
    assert capsys.readouterr().out.count(NO_FEATURES) == 1


def test_a_split_without_any_feature_says_so_whatever_max_missing_frac():
    """--max_missing_frac 1 accepts any share of missing features, but not none kept: the error says all are missing
    (it named the fraction, as if it had been exceeded)."""
    from types import SimpleNamespace
    eps = [{"hash": h, "dialog": [("Happy", "hi")]} for h in ("a", "b")]
    cfg, log = SimpleNamespace(use_caption=False, max_missing_frac=1.0), SimpleNamespace(info=lambda *a: None)
    with pytest.raises(DataError, match=r"^valid: 2 of 2 episodes lack features or captions \(all of them\)"):
        ic.Encoded(eps, None, {}, {}, cfg, log, "valid")


def test_non_finite_loss_stops_without_saving(assets, cached, tmp_path):
    _, paths = cached
    run(train_args(assets, "finetune", 1, final_eval="false", report="false"), tmp_path / "ok", **paths)
    assert not os.path.exists(tmp_path / "ok" / "report.html")  # --report false writes none
    ck = torch.load(tmp_path / "ok" / "last.pt", weights_only=True)
    ck["model"]["img_proj.weight"].fill_(float("nan"))
    torch.save(ck, tmp_path / "nan.pt")
    from common.train import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match="step 0.*ft"):
        run(train_args(assets, "finetune", 2, init=tmp_path / "nan.pt"), tmp_path / "bad", **paths)
    assert not os.path.exists(tmp_path / "bad" / "last.pt")


def test_chat_replies_from_the_history_as_eval_builds_it(assets, cached, tmp_path, monkeypatch):
    """--mode chat (ParlAI's interactive script, ParlAI #4260): piped user turns each get a reply; a turn's encoder
    input is dialogue_context over the history (turn 2's holds turn 1 and its reply) on the image's features as
    --mode features caches them; each reply is what generate gives for that context built by hand.  --captioner
    gives the caption --mode captions cached; unknown personalities and a missing --init are refused."""
    from common.config import parse_config
    from common.log import Logger
    _, paths = cached
    run(train_args(assets, "finetune", 2, final_eval="false", report="false"), tmp_path / "ft", **paths)
    with open(os.path.join(paths["data_dir"], "test.json")) as f:
        h = json.load(f)[0]["image_hash"]
    chat = ["--mode", "chat", "--init", str(tmp_path / "ft" / "last.pt"), "--image",
            os.path.join(paths["image_root"], f"{h}.jpg"), "--num_beams", "2", "--max_length", "8", "--min_length", "4"]
    said = ["i love this red circle", "why is it so nice"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(said) + "\n\nnot read after the empty line\n"))
    out = run([*chat, "--style", "happy", "--caption", "a red circle"], tmp_path / "chat", **paths)
    assert out["style"] == "Happy" and out["caption"] == "a red circle" and [t["user"] for t in out["turns"]] == said
    assert all(t["reply"].strip() for t in out["turns"])
    # the same model, features and generation settings, the context built by hand
    cfg = icw.check_choices(parse_config(icw.Config, icw.PRESETS, [*chat, "--toy_root", str(paths["toy_root"])]))
    icw.resolve_paths(cfg)
    index, cached_feats = ic.load_features(str(paths["cache_dir"]))
    feats, _ = ic.chat_image(cfg, cfg.image, torch.device("cpu"), torch.float32, Logger("", False))
    torch.testing.assert_close(feats, cached_feats[index[h]][None], rtol=0, atol=1e-3)  # fp16 cache rounding
    model, tok, V = icw.build_model(cfg, feats.shape[-1], feats.shape[1])
    model.load_state_dict(torch.load(tmp_path / "ft" / "last.pt", weights_only=True)["model"])
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    r1 = out["turns"][0]["reply"]
    ep = {"caption": enc("a red circle"), "styles": [[], enc("Happy")] * 2, "utts": [enc(said[0]), enc(r1),
                                                                                      enc(said[1]), []]}
    for k, turn in zip((2, 4), out["turns"]):
        ctx = icw.dialogue_context(ep, k, V, cfg)
        assert turn["context"] == ctx
        src = torch.tensor([ctx])
        gen = icw.generate(model.eval(), src, torch.ones_like(src), feats, icw.generation_kwargs(cfg, model.lm))
        assert turn["reply"] == tok.decode(gen[0], skip_special_tokens=True).strip()
    ctx2 = out["turns"][1]["context"]
    assert ctx2[:len(out["turns"][0]["context"]) - 2] == out["turns"][0]["context"][:-2]  # turn 1 as it was
    assert all(any(ctx2[i:i + len(u)] == u for i in range(len(ctx2))) for u in (enc(said[0]), enc(r1)))
    # --captioner: BLIP-2's first caption, as --mode captions cached it; --user_style names the user's turns
    monkeypatch.setattr(sys, "stdin", io.StringIO(said[0] + "\n"))
    cap = run([*chat, "--style", "Happy", "--user_style", "bland", "--captioner", str(assets / "blip2")], tmp_path / "c",
              **paths)
    assert cap["caption"] == ic.load_captions(str(paths["cache_dir"]))[h][0]
    assert cap["turns"][0]["context"] == icw.dialogue_context(
        {"caption": enc(cap["caption"]), "styles": [enc("Bland"), enc("Happy")], "utts": [enc(said[0]), []]}, 2, V, cfg)
    with pytest.raises(ValueError, match=r"--style 'Grumpy Pirate' is not one of the model's \d+ personalities: "):
        run([*chat, "--style", "Grumpy Pirate"], tmp_path / "x", **paths)
    with pytest.raises(ValueError, match=r"--user_style 'nobody' is not one of"):
        run([*chat, "--style", "Happy", "--user_style", "nobody"], tmp_path / "x", **paths)
    with pytest.raises(ValueError, match=r"--mode chat needs --init"):
        run(chat[:2] + chat[4:] + ["--style", "Happy"], tmp_path / "x", **paths)  # no --init


def test_chat_with_a_text_only_model_runs_no_clip(assets, cached, tmp_path, monkeypatch):
    """--mode chat with a --use_image false checkpoint: the model has no image block, so the image's CLIP features
    are not computed (zeros of CLIP's projection width, as run_features gives a text-only run); an image model's
    chat still runs CLIP."""
    from common.config import parse_config
    from common.log import Logger
    _, paths = cached
    run(train_args(assets, "finetune", 1, use_image="false", final_eval="false", report="false"), tmp_path / "ft",
        **paths)
    with open(os.path.join(paths["data_dir"], "test.json")) as f:
        h = json.load(f)[0]["image_hash"]
    chat = ["--mode", "chat", "--init", str(tmp_path / "ft" / "last.pt"), "--image",
            os.path.join(paths["image_root"], f"{h}.jpg"), "--num_beams", "1", "--max_length", "4", "--caption", "x"]
    ran = []
    real = ic.clip_featurizer
    monkeypatch.setattr(ic, "clip_featurizer", lambda *a: ran.append(1) or real(*a))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n"))
    out = run([*chat, "--style", "happy"], tmp_path / "chat", **paths)
    assert ran == [] and len(out["turns"]) == 1 and out["turns"][0]["reply"].strip()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello again\n"))  # nothing read of the image: none needed
    assert len(run([*chat[:4], *chat[6:], "--style", "happy"], tmp_path / "chat2", **paths)["turns"]) == 1
    cfg = icw.check_choices(parse_config(icw.Config, icw.PRESETS, [*chat, "--toy_root", str(paths["toy_root"]),
                                                                    "--use_image", "false"]))
    icw.resolve_paths(cfg)
    feats, _ = ic.chat_image(cfg, cfg.image, torch.device("cpu"), torch.float32, Logger("", False))
    width = ic.load_features(str(paths["cache_dir"]))[1].shape[-1]
    assert feats.shape == (1, 9, width) and not feats.any() and ran == []
    cfg.use_image = True
    with pytest.raises(DataError, match="--image '': missing or unreadable .the model reads its CLIP features"):
        ic.chat_image(cfg, "", torch.device("cpu"), torch.float32, Logger("", False))
    assert ic.chat_image(cfg, cfg.image, torch.device("cpu"), torch.float32, Logger("", False))[0].any()
    assert ran == [1]


def test_a_given_caption_wins_over_the_presets_captioner(assets, tmp_path, monkeypatch):
    """--preset paper --mode chat --caption "...": the preset names a BLIP-2 captioner; the caption given is the
    one read, and no captioner is loaded (a 2.7B model for nothing)."""
    from common.config import parse_config
    from common.log import Logger
    Image.new("RGB", (20, 20), (200, 9, 9)).save(tmp_path / "my.jpg")
    cfg = parse_config(icw.Config, icw.PRESETS, ["--preset", "paper", "--mode", "chat", "--clip", str(assets / "clip"),
                                                 "--caption", " a red circle "])
    assert cfg.captioner
    monkeypatch.setattr(ic, "blip2_captioner", lambda *a: pytest.fail("the captioner was loaded"))
    feats, caption = ic.chat_image(cfg, str(tmp_path / "my.jpg"), torch.device("cpu"), torch.float32, Logger("", False))
    assert caption == "a red circle" and feats.shape == (1, 9, 12)


def _ddp_worker(rank, runs):
    torch.set_num_threads(1)
    icw.mfu = lambda flops, seconds, device, world_size=1, dtype=None: float(world_size)  # logged where CPU has none
    for port, argv, out in runs:  # one process group per run, each on its own port
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        res = icw.main(argv)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(res, f)


def test_two_process_gloo_matches_one_process(assets, cached, tmp_path, spawn):
    """2 gloo processes = 1 process; their checkpoint holds each rank's own RNG states (issue 18.5), and a
    2-process run stopped after step 1 and resumed ends as the unbroken 2-process run."""
    import socket
    _, paths = cached
    one = run(train_args(assets, "warmup", 2), tmp_path / "one", **paths)

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    argv = lambda out, **kw: train_args(assets, "warmup", 2, **kw) + [  # noqa: E731
        a for k, v in {**paths, "out_dir": tmp_path / out}.items() for a in (f"--{k}", str(v))]
    ck = tmp_path / "half" / "last.pt"
    runs = [(port(), argv("two"), str(tmp_path / "two.json")),
            (port(), argv("half", stop_after=1, report="false"), str(tmp_path / "half1.json")),
            (port(), argv("half", resume=ck, report="false"), str(tmp_path / "half.json"))]
    spawn(_ddp_worker, args=(runs,))
    two, half = ((tmp_path / f"{n}.json").read_text() for n in ("two", "half"))
    two, half = json.loads(two), json.loads(half)
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    for k in ("mlm", "isp", "mrm", "gcd"):
        assert two[f"train/{k}"] == pytest.approx(one[f"train/{k}"], rel=1e-4)
    assert half["steps"] == 2 and half["final_loss"] == pytest.approx(two["final_loss"], rel=1e-6)
    rngs = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    # MFU: the step's FLOPs are the global batch's, so divided by the peak of both ranks (the stub returns world_size)
    assert [r["mfu"] for r in read_log(tmp_path / "two") if "loss" in r] == [2.0, 2.0]


def test_candidates_rank_by_mean_token_likelihood_and_ties_do_not_favour_the_gold():
    """ParlAI ranks label candidates by mean per-token loss: under a model that gives every token the same
    probability, a one-word and a four-word candidate score alike (a sum would rank the short one first), and
    a tie ranks the gold behind the candidates it ties with."""
    import types
    from transformers.modeling_outputs import BaseModelOutput
    V = 12
    vocab = icw.Vocab(pad=0, eos=1, bos=None, start=2, mask=3, img=4, img_end=5, task={}, sty=6, feat=7,
                      zero=8, positive=[], negative=[])
    words = {"a": 9, "b": 10, "c": 11}
    tok = types.SimpleNamespace(encode=lambda text, add_special_tokens=False: [words[w] for w in text.split()])
    lm = lambda encoder_outputs, attention_mask, decoder_input_ids: types.SimpleNamespace(  # noqa: E731
        logits=torch.zeros(*decoder_input_ids.shape, V))  # uniform: every token has probability 1/V
    model = types.SimpleNamespace(lm=lm)
    enc = BaseModelOutput(last_hidden_state=torch.zeros(1, 3, 4))
    cfg = types.SimpleNamespace(max_tgt_len=16)
    sc = icw.candidate_scores(model, enc, torch.ones(1, 3, dtype=torch.long), ["a", "a b c a"], tok, vocab, cfg)
    assert torch.allclose(sc, torch.full((2,), -math.log(V)))
    assert icw.gold_rank(sc, 0) == 2 and icw.gold_rank(sc, 1) == 2
    assert icw.gold_rank(torch.tensor([0.5, 0.1, 0.5, 0.9]), 0) == 3
    assert icw.gold_rank(torch.tensor([0.5, 0.1, 0.2]), 0) == 1
    assert icw.gold_rank(torch.zeros(100), 7) == 100


def test_params_mode_builds_the_paper_model_offline_at_its_published_size():
    import transformers
    from common.hf import meta_model, published_config
    paper = ["--mode", "params", "--preset", "paper"]  # meta device from common.hf's table: offline, no weights
    out = icw.main(paper)
    bb = sum(p.numel() for p in meta_model(transformers.BlenderbotForConditionalGeneration,
                                           published_config("facebook/blenderbot-400M-distill")).parameters())
    assert bb == 364_802_560  # BlenderBot 400M-distill: the hub's fp16 pytorch_model.bin is 730 MB
    # + the 9 new tokens and both learned position tables extended from 128 to --max_positions 256 rows
    assert out["params_lm"] == bb + 9 * 1280 + 2 * (256 - 128) * 1280
    # image block Linear 512 -> 1280 + LayerNorm, segment embedding 2 x 1280, MRM head 1280 -> 512
    assert out["params_img_proj"] == 512 * 1280 + 1280 and out["params_img_norm"] == out["params_segment"] == 2560
    assert out["params_mrm_head"] == 1280 * 512 + 512
    assert out["trainable"] == sum(out[f"params_{k}"] for k in ("lm", "img_proj", "img_norm", "segment", "mrm_head"))
    # the frozen CLIP ViT-B/32 image side (get_image_features): vision tower 87,456,000 + projection 768 x 512
    # (open_clip docs/model_profile.csv: ViT-B-32 image tower 87.85M)
    assert out["frozen_clip"] == 87_456_000 + 768 * 512 and round(out["frozen_clip"] / 1e4) == 8785
    shared = icw.main(paper + ["--share_pos", "true"])  # the decoder reuses the encoder's table (release)
    assert out["params_lm"] - shared["params_lm"] == 256 * 1280
    no_image = icw.main(paper + ["--use_image", "false"])  # 11 image slots fewer in the encoder
    assert 0 < no_image["gflops_example"] < out["gflops_example"]


def test_compile_flag_compiles_the_trained_model_once(assets, cached, tmp_path, monkeypatch):
    root, paths = cached
    seen, calls = [], []  # torch.compile stays eager here: the test checks what is compiled, a GPU run the speed-up

    class Compiled(torch.nn.Module):  # what torch.compile returns: the module the steps must call
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *a, **k):
            calls.append(1)
            return self.module(*a, **k)
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.append(module) or Compiled(module))
    res = run(train_args(assets, "warmup", 2, bench=1, compile="true"), tmp_path / "c", **paths)
    assert res["bench_steps"] == 1 and len(seen) == 1 and isinstance(seen[0], icw.ImageChatModel)
    assert len(calls) == 4 * 2  # 3 warm-up + 1 timed steps of 2 micro-batches each ran the compiled module
