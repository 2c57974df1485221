"""perceiver_caption.py: gate identity against transformers' GPT-2, parameter counts at paper sizes, masking of
padded frames, loss masking, decoding, and train/test/caption/params through main() on the tiny toy world
(losses fall, CIDEr above the blank-image baseline, resume equality, 2-process gloo DDP = 1 process), the
bad-image rule, checkpoint identity and resume-config checks, the seed's HF metrics beside the COCO ones,
--compile, the report.html of train and test runs (per-layer gate curves, captioned images, video strips), and
ClipCap's mappers (CLIP's projected embedding in, K tokens a frame, ClipCap's layer and counts, train + test) and
their flags --clip_len (K' clip tokens) and --normalize_prefix (the embedding / its L2 norm) with their errors."""
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import types

import pytest
import torch

import perceiver_caption as pc
from common.metrics import hf_caption_metrics
from common.report import read_report

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ tiny random backbones (no toy world needed)
def _tiny_backbones(path):
    """A random tiny CLIP (vision width 32) and GPT-2 (width 32, 3 layers) + word-level tokenizer, in HF format."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    torch.manual_seed(0)
    words = ["<pad>", "<unk>", "<bos>", "<eos>"] + "a red blue green circle square moves left right of the".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=64, n_embd=32, n_layer=3, n_head=2,
                                     bos_token_id=2, eos_token_id=3, pad_token_id=0))
    clip = CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(words)), projection_dim=16))
    gpt.save_pretrained(path / "gpt2")
    tok.save_pretrained(path / "gpt2")
    clip.save_pretrained(path / "clip")
    return path / "clip", path / "gpt2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import CLIPVisionModel, GPT2LMHeadModel, AutoTokenizer
    clip_dir, gpt_dir = _tiny_backbones(tmp_path_factory.mktemp("pc_backbones"))
    clip = CLIPVisionModel.from_pretrained(clip_dir).eval().requires_grad_(False)
    lm = GPT2LMHeadModel.from_pretrained(gpt_dir).eval().requires_grad_(False)
    return {"clip": clip, "lm": lm, "tok": AutoTokenizer.from_pretrained(gpt_dir), "gpt_dir": gpt_dir}


def _cfg(**kw):
    base = dict(pc.PRESETS["toy"])
    base.update(resampler_depth=1, resampler_heads=2, resampler_dim_head=8, num_latents=4, mapper_hidden=16,
                xattn_heads=2, xattn_dim_head=8)
    base.update(kw)
    return pc.Config(**base)


def _feats(b, t, s=5, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, s, d, generator=g)


# ------------------------------------------------------------------ model
def test_gate_identity_equals_transformers_gpt2(tiny):
    """Gates at 0 and no prefix: logits are exactly those of transformers' own GPT-2 loaded from the same folder."""
    from transformers import GPT2LMHeadModel
    ref = GPT2LMHeadModel.from_pretrained(tiny["gpt_dir"]).eval()
    bridge = pc.Bridge(_cfg(bridge="xattn", xattn_prefix="none"), 32, 32, 3).eval()
    tokens = torch.tensor([[2, 4, 5, 8, 3, 0], [2, 6, 7, 3, 0, 0]])
    mask = tokens != 0
    mask[:, 0] = True
    fm = torch.ones(2, 1, dtype=torch.bool)
    out = bridge(tiny["lm"], _feats(2, 1), fm, tokens, mask)
    want = ref(input_ids=tokens, attention_mask=mask.long()).logits
    assert out.shape == want.shape == (2, 6, 15)
    assert torch.allclose(out[mask], want[mask], atol=1e-5, rtol=0)
    # the hooks are gone afterwards: plain GPT-2 calls are untouched and the side channel is cleared
    assert bridge._z is None and all(not b._forward_pre_hooks for b in tiny["lm"].transformer.h)
    # with nonzero gates the visual tokens do change the logits (the xattn path is live)
    with torch.no_grad():
        for x in bridge.xattn:
            x.attn_gate.fill_(0.5)
    assert not torch.allclose(bridge(tiny["lm"], _feats(2, 1), fm, tokens, mask)[mask], want[mask], atol=1e-3)


def test_xattn_every_places_blocks_before_every_kth_gpt2_block(tiny):
    """--xattn_every 2 on a 3-block GPT-2: xattn blocks before blocks 0 and 2 only (the larger Flamingo models,
    arXiv 2204.14198, insert one every few LM blocks). Its live blocks give the logits of --xattn_every 1
    whose block 1 is gated off and whose others carry the same weights."""
    every1 = pc.Bridge(_cfg(bridge="xattn", xattn_every=1), 32, 32, 3).eval()
    every2 = pc.Bridge(_cfg(bridge="xattn", xattn_every=2), 32, 32, 3).eval()
    assert every1.layer_ids == [0, 1, 2] and every2.layer_ids == [0, 2] and len(every2.xattn) == 2
    with torch.no_grad():
        for x in every2.xattn:
            x.attn_gate.fill_(0.5)
            x.ff_gate.fill_(-0.3)
    state = {k.replace("xattn.1.", "xattn.2."): v for k, v in every2.state_dict().items()}
    missing = every1.load_state_dict(state, strict=False).missing_keys
    assert missing and all(k.startswith("xattn.1.") for k in missing)  # block 1 keeps its zero gates
    tokens = torch.tensor([[2, 4, 5, 8, 3], [2, 6, 7, 3, 0]])
    mask, fm = tokens != 0, torch.ones(2, 1, dtype=torch.bool)
    feats = _feats(2, 1)
    out2, out1 = every2(tiny["lm"], feats, fm, tokens, mask), every1(tiny["lm"], feats, fm, tokens, mask)
    torch.testing.assert_close(out2, out1, atol=1e-5, rtol=0)
    ref = pc.Bridge(_cfg(bridge="xattn"), 32, 32, 3).eval()(tiny["lm"], feats, fm, tokens, mask)
    assert not torch.allclose(out2, ref, atol=1e-3)  # the gated blocks do change the logits
    for k in (0, -1):  # a clear error, not range()'s, nor a bridge with no xattn block
        with pytest.raises(ValueError, match=f"--xattn_every must be >= 1, got {k}"):
            pc.Bridge(_cfg(bridge="xattn", xattn_every=k), 32, 32, 3)


def test_one_step_changes_only_trainable_and_gates_get_grad_first(tiny):
    bridge = pc.Bridge(_cfg(bridge="both"), 32, 32, 3)
    frozen = {k: v.clone() for k, v in tiny["lm"].state_dict().items()}
    tokens = torch.tensor([[2, 4, 5, 3], [2, 6, 3, 0]])
    mask = tokens != 0
    logits = bridge(tiny["lm"], _feats(2, 1), torch.ones(2, 1, dtype=torch.bool), tokens, mask)
    labels = pc.caption_labels(tokens, mask, 1)
    pc.caption_loss(logits, labels, float((labels[:, 1:] != -100).sum())).backward()
    x0 = bridge.xattn[0]
    assert x0.attn_gate.grad.abs().item() > 0 and x0.ff_gate.grad.abs().item() > 0
    assert x0.to_q.weight.grad.abs().max().item() == 0  # multiplied by tanh(0) = 0 at initialisation
    assert all(p.grad is None for p in tiny["lm"].parameters())
    before = {k: v.clone() for k, v in bridge.state_dict().items()}
    torch.optim.AdamW(bridge.parameters(), lr=1e-2).step()
    assert not torch.equal(before["xattn.0.attn_gate"], bridge.xattn[0].attn_gate)
    assert all(torch.equal(v, tiny["lm"].state_dict()[k]) for k, v in frozen.items())


def test_paper_param_counts_match_seed():
    """Trainable counts per ablation at ViT-B/32 + GPT-2 small sizes equal the seed's model summary."""
    from transformers import CLIPVisionConfig, GPT2Config
    cfg = pc.Config(**pc.PRESETS["paper"])
    rows = pc.param_counts(cfg, CLIPVisionConfig(), GPT2Config())  # transformers' defaults = these two checkpoints
    assert rows["mapper"]["trainable"] == 787_712
    assert rows["xattn"]["trainable"] == 38_238_744
    assert rows["both"]["trainable"] == 39_026_456
    assert rows["both"]["resampler"] == 9_890_304 and rows["both"]["xattn"] == 28_348_440
    assert rows["frozen_clip"] == 87_456_000 and rows["frozen_lm"] == 124_439_808
    # FLOPs per sample (issue 19.3): the ViT-B/32 forward alone is 8.8 GFLOP (4.4 GMACs, open_clip's profile);
    # cross-attention adds its blocks to GPT-2's forward and backward
    assert 8.8 < rows["mapper"]["gflops_per_sample"] < rows["xattn"]["gflops_per_sample"] <= \
        rows["both"]["gflops_per_sample"]
    assert pc.main(["--mode", "params", "--preset", "paper"])["both"]["trainable"] == 39_026_456  # offline
    # --mapper transformer: the seed's nn.TransformerEncoder (8 layers, 8 heads, FFN 2048) at width 768, per layer
    # qkv 3*768*769 + out 768*769 + FFN 768*2049 + 2048*769 + two LayerNorms 4*768 = 5,513,984
    tf = pc.main(["--mode", "params", "--preset", "paper", "--mapper", "transformer"])
    assert tf["mapper"]["mapper"] == tf["both"]["mapper"] == 8 * 5_513_984 == tf["mapper"]["trainable"]
    assert tf["both"]["trainable"] == 39_026_456 - 787_712 + 8 * 5_513_984 and tf["xattn"]["mapper"] == 0


def test_transformer_mapper_shapes_and_padding_mask(tiny):
    """--mapper transformer: one prefix token per frame for an image and a clip; a 2-frame clip alone and padded
    to 4 frames (padding filled with noise) gives the same prefix and text logits: padded frames are masked as
    keys (seed: src_key_padding_mask=~mask), with and without autograd (PyTorch's two encoder paths)."""
    torch.manual_seed(3)
    bridge = pc.Bridge(_cfg(bridge="mapper", mapper="transformer", mapper_depth=2, mapper_heads=4, mapper_ff=48),
                       32, 32, 3).eval()
    assert isinstance(bridge.mapper, torch.nn.TransformerEncoder) and len(bridge.mapper.layers) == 2
    assert bridge.mapper.layers[0].self_attn.num_heads == 4 and bridge.mapper.layers[0].linear1.out_features == 48
    for t in (1, 3):  # image, clip
        prefix, pmask, z = bridge.visual(_feats(2, t), torch.ones(2, t, dtype=torch.bool))
        assert prefix.shape == (2, t, 32) and pmask.shape == (2, t) and z is None
    short = _feats(1, 2, seed=4)
    batch = torch.cat([_feats(1, 4, seed=5), torch.cat([short, 3 * _feats(1, 2, seed=6)], 1)])
    fm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    tokens = torch.tensor([[2, 4, 5, 3]] * 2)
    tm = torch.ones_like(tokens, dtype=torch.bool)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            alone, batched = bridge.visual(short, fm[1:, :2])[0], bridge.visual(batch, fm)[0][1:]
            assert torch.allclose(alone, batched[:, :2], atol=1e-5) and not batched[:, 2:].any()
            logits = bridge(tiny["lm"], short, fm[1:, :2], tokens[:1], tm[:1])[:, 2:]
            assert torch.allclose(logits, bridge(tiny["lm"], batch, fm, tokens, tm)[1:, 4:], atol=1e-4)
    with torch.no_grad():  # without the key mask the padded frames do reach the real ones
        assert not torch.allclose(bridge.mapper(short.mean(2)), bridge.mapper(batch.mean(2))[1:, :2], atol=1e-3)
    with pytest.raises(ValueError, match="--mapper transformer keep the CLIP width"):
        pc.Bridge(_cfg(bridge="both", mapper="transformer"), 32, 48, 3)
    pc.Bridge(_cfg(bridge="xattn", mapper="transformer", xattn_prefix="none"), 32, 48, 3)  # no mapper: no check


@pytest.mark.parametrize("bridge", ["mapper", "both"])
def test_a_short_clip_predicts_its_bos_from_its_own_last_frame(tiny, bridge):
    """--position_fix: padded prefix slots go first, so a 2-frame clip batched with a 4-frame one predicts BOS from
    its last real slot, as alone: its caption loss, BOS's term included, is its loss alone.  The seed's layout
    (false) predicts that BOS from a padding slot."""
    torch.manual_seed(0)
    short = _feats(1, 2, seed=4)
    batch = torch.cat([_feats(1, 4, seed=5), torch.cat([short, 3 * _feats(1, 2, seed=6)], 1)])
    fm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    tokens, tm = torch.tensor([[2, 4, 5, 3]] * 2), torch.ones(2, 4, dtype=torch.bool)
    for fix in (True, False):
        b = pc.Bridge(_cfg(bridge=bridge, position_fix=fix), 32, 32, 3).eval()
        for x in b.xattn or []:  # open gates: the text also reads the frames through cross-attention
            torch.nn.init.constant_(x.attn_gate, 0.5), torch.nn.init.constant_(x.ff_gate, 0.5)
        with torch.no_grad():  # (B, P+L, V)
            alone = b(tiny["lm"], short, fm[1:, :2], tokens[:1], tm[:1])
            batched = b(tiny["lm"], batch, fm, tokens, tm)[1:]
        # the last prefix slot (P - 1) gives BOS's logits, the slots after it the text's
        assert torch.allclose(alone[:, 1], batched[:, 3], atol=1e-4) == fix
        loss = [pc.caption_loss(lg, pc.caption_labels(tokens[:1], tm[:1], p), 1)
                for lg, p in ((alone, 2), (batched, 4))]
        assert torch.allclose(*loss, atol=1e-4) == fix and loss[0] > 0


def _clipcap(tiny, mapper, k=3, bridge="mapper", **kw):
    """A Bridge with ClipCap's `mapper` (K = k) on the tiny CLIP (width 32, projection 16) and GPT-2 (width 32)."""
    from transformers import AutoConfig, CLIPVisionModelWithProjection
    from common.hf import clip_vision_config
    path = str(tiny["gpt_dir"].parent / "clip")
    conf = clip_vision_config(AutoConfig.from_pretrained(path))  # the projection at the model's width
    clip = CLIPVisionModelWithProjection.from_pretrained(path, config=conf).eval()
    return pc.Bridge(_cfg(bridge=bridge, mapper=mapper, prefix_len=k, **kw), 32, 32, 3, clip).eval()


@pytest.mark.parametrize("mapper", ["clipcap_mlp", "clipcap_tf"])
def test_clipcap_prefix_is_k_tokens_a_frame_and_padded_frames_are_masked(tiny, mapper):
    """ClipCap's mappers, K = 3: an image gives K prefix tokens, a clip of T frames T*K. A 2-frame clip padded to 3
    frames in a batch (the padding filled with noise) gives the same prefix, text logits and decoded tokens as
    alone: its padded frame's K tokens are masked (and 0), positions and labels count P = T*K."""
    torch.manual_seed(0)
    bridge = _clipcap(tiny, mapper)
    assert bridge.per_frame == 3 and not any(p.requires_grad for p in bridge.clip_head.parameters())
    prefix, pmask, z = bridge.visual(_feats(2, 1), torch.ones(2, 1, dtype=torch.bool))
    assert prefix.shape == (2, 3, 32) and pmask.shape == (2, 3) and pmask.all() and z is None
    short = _feats(1, 2, seed=4)
    batch = torch.cat([_feats(1, 3, seed=5), torch.cat([short, 3 * _feats(1, 1, seed=6)], 1)])
    fm = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    prefix, pmask, _ = bridge.visual(batch, fm)
    assert prefix.shape == (2, 9, 32) and pmask.tolist() == [[True] * 9, [True] * 6 + [False] * 3]
    assert not prefix[1, 6:].any() and torch.allclose(prefix[1:, :6], bridge.visual(short, fm[1:, :2])[0], atol=1e-5)
    tokens = torch.tensor([[2, 4, 5, 3]] * 2)
    tm = torch.ones_like(tokens, dtype=torch.bool)
    logits = bridge(tiny["lm"], batch, fm, tokens, tm)
    labels = pc.caption_labels(tokens, tm, bridge.per_frame * fm.shape[1])  # as train_step
    assert logits.shape == (2, 9 + 4, 15) and labels.shape == (2, 13) and (labels[:, :9] == -100).all()
    alone = bridge(tiny["lm"], short, fm[1:, :2], tokens[:1], tm[:1])
    assert alone.shape == (1, 6 + 4, 15) and torch.allclose(alone[:, 6:], logits[1:, 9:], atol=1e-4)
    for beams in (1, 2):  # generate() from inputs_embeds: the prefix of 9 (6 real) tokens, z repeated per beam
        both = bridge.generate(tiny["lm"], batch, fm, 2, 3, 0, num_beams=beams, max_new_tokens=5)
        one = bridge.generate(tiny["lm"], short, fm[1:, :2], 2, 3, 0, num_beams=beams, max_new_tokens=5)
        assert torch.equal(both[1, :one.shape[1]], one[0]) and (both[1, one.shape[1]:] == 0).all()
    # --bridge both: ClipCap's prefix beside the xattn blocks
    both = _clipcap(tiny, mapper, bridge="both")
    assert both(tiny["lm"], batch, fm, tokens, tm).shape == (2, 13, 15) and both.per_frame == 3
    xattn = pc.Bridge(_cfg(bridge="xattn", mapper=mapper), 32, 32, 3)  # no mapper: --mapper unused
    assert xattn.mapper is None and xattn.clip_head is None and xattn.per_frame == 1
    with pytest.raises(ValueError, match=r"--mapper must be mlp\|transformer\|clipcap_mlp\|clipcap_tf, got 'clip'"):
        pc.Bridge(_cfg(mapper="clip"), 32, 32, 3)


def test_clipcap_transformer_is_clipcaps_transformer_mapper(tiny):
    """clipcap_tf is ClipCap's TransformerMapper (CLIP_prefix_caption train.py), written out here with the module's
    own weights: [Linear(emb) as K' tokens ; K constants] through 8 pre-LN layers x += Wo attn(LN1 x) (8 heads, q, k,
    v without biases), x += W2 relu(W1 LN2 x) (MLP ratio 2), no final norm; the prefix is the K constants' places.
    Trainable count: 8 D^2 + 8 D a layer, as ClipCap's layer."""
    torch.manual_seed(0)
    m = _clipcap(tiny, "clipcap_tf").mapper
    assert len(m.layers) == 8 and all(x.self_attn.num_heads == 8 and x.linear1.out_features == 64 for x in m.layers)
    emb = torch.randn(2, 16)
    with torch.no_grad():
        x = torch.cat([m.linear(emb).view(2, 3, 32), m.const.expand(2, -1, -1)], 1)  # (N, K'+K, D)
        for layer in m.layers:
            q, k, v = (layer.norm1(x) @ layer.self_attn.in_proj_weight.T).chunk(3, -1)  # no bias
            q, k, v = (t.view(2, 6, 8, 4).transpose(1, 2) for t in (q, k, v))       # (N, H, 6, 4)
            att = ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1) @ v                    # scale 1 / sqrt(4)
            x = x + layer.self_attn.out_proj(att.transpose(1, 2).reshape(2, 6, 32))
            x = x + layer.linear2(torch.relu(layer.linear1(layer.norm2(x))))
        out = m(emb)
    assert out.shape == (2, 3, 32) and torch.allclose(out, x[:, 3:], atol=1e-5)
    assert not torch.allclose(out, x[:, :3], atol=1e-2)  # not the K' clip tokens' places
    m.train()  # with autograd and in training mode (PyTorch's other path): the same, no dropout
    assert torch.allclose(m(emb), out, atol=1e-5)
    with torch.no_grad():
        m.const.add_(0.5)
    assert not torch.allclose(m(emb), out, atol=1e-3)  # the learned constants are inputs
    assert pc.count_params(m) == 8 * (8 * 32 ** 2 + 8 * 32) + (16 * 96 + 96) + 96


def test_clipcap_tf_clip_len_sets_the_k_prime_clip_tokens(tiny):
    """--clip_len K' (ClipCap train.py --prefix_length_clip): clipcap_tf's Linear makes K' tokens (K'*D outputs),
    which go with the K constants through the layers; the output is the K constants' places, so (N, K, D) whatever
    K', and it depends on every K' token. 0 (the default) is K' = K. At paper sizes (--mode params) K = 10, K' = 40:
    8 layers, Linear(512, 40 D) and 10 D constants."""
    torch.manual_seed(0)
    m = _clipcap(tiny, "clipcap_tf", clip_len=5).mapper
    assert m.linear.out_features == 5 * 32 and m.const.shape == (3, 32)
    assert _clipcap(tiny, "clipcap_tf").mapper.linear.out_features == 3 * 32  # clip_len 0: K' = K
    emb = torch.randn(2, 16)
    with torch.no_grad():
        x = torch.cat([m.linear(emb).view(2, 5, 32), m.const.expand(2, -1, -1)], 1)  # (N, K'+K, D)
        want = torch.nn.TransformerEncoder.forward(m, x)[:, 5:]
        out = m(emb)
        assert out.shape == (2, 3, 32) and torch.allclose(out, want, atol=1e-5)
        m.linear.bias[4 * 32:] += torch.randn(32)  # only the last of the K' = 5 tokens
        assert not torch.allclose(m(emb), out, atol=1e-3)
    bridge = _clipcap(tiny, "clipcap_tf", clip_len=5)
    prefix, pmask, _ = bridge.visual(_feats(2, 2), torch.ones(2, 2, dtype=torch.bool))
    assert bridge.per_frame == 3 and prefix.shape == (2, 6, 32) and pmask.shape == (2, 6)
    tf = pc.main(["--mode", "params", "--preset", "paper", "--mapper", "clipcap_tf", "--clip_len", "40"])
    assert tf["mapper"]["mapper"] == 8 * (8 * 768 ** 2 + 8 * 768) + 512 * 40 * 768 + 40 * 768 + 10 * 768


@pytest.mark.parametrize("mapper", ["clipcap_mlp", "clipcap_tf"])
def test_normalize_prefix_divides_the_clip_embedding_by_its_norm(tiny, mapper):
    """--normalize_prefix (ClipCap train.py ClipCocoDataset: the CLIP embedding / its L2 norm) in Bridge.visual, the
    one path of training, validation and decoding: the prefix is the mapper of emb / |emb|, so the prefix, the
    teacher-forced logits and the decoded tokens do not change when the embedding is scaled (they do without the
    flag). A padded frame of zeros (collate's padding, whose tiny-CLIP embedding is 0) stays finite: no 0 / 0."""
    torch.manual_seed(0)
    feats, fm = _feats(2, 2), torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    feats[1, 1] = 0
    tokens = torch.tensor([[2, 4, 5, 3]] * 2)
    tm = torch.ones_like(tokens, dtype=torch.bool)
    for norm in (True, False):
        bridge = _clipcap(tiny, mapper, normalize_prefix=norm)
        seen = []
        bridge.mapper.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        runs = []
        for scale in (1.0, 7.0):
            hook = bridge.clip_head.register_forward_hook(lambda module, args, out, s=scale: out * s)
            with torch.no_grad():
                prefix = bridge.visual(feats, fm)[0]
                logits = bridge(tiny["lm"], feats, fm, tokens, tm)
                ids = bridge.generate(tiny["lm"], feats, fm, 2, 3, 0, num_beams=2, max_new_tokens=5)
            hook.remove()
            runs.append((prefix, logits, ids))
            assert torch.isfinite(prefix).all() and torch.isfinite(logits).all()
        (p1, l1, i1), (p7, l7, i7) = runs
        if norm:  # what the mapper saw first: ClipCap's emb / |emb| of the 3 real frames, the padded one's 0
            raw = bridge.clip_head(feats[:, :, 0]).flatten(0, 1)[:3].detach()
            assert torch.allclose(seen[0][:3], raw / raw.norm(dim=-1, keepdim=True), atol=1e-6)
            assert not seen[0][3].any()
            assert torch.allclose(p1, p7, atol=1e-5) and torch.allclose(l1, l7, atol=1e-4) and torch.equal(i1, i7)
        else:
            assert not torch.allclose(p1, p7, atol=1e-2) and not torch.allclose(l1, l7, atol=1e-2)


def test_clipcap_flags_need_clipcap_mappers(tiny):
    """--clip_len > 0 needs --mapper clipcap_tf and --normalize_prefix a clipcap_* mapper: a one-line error naming the
    flag (they would do nothing with the other mappers)."""
    for mapper in ("mlp", "transformer", "clipcap_mlp"):
        with pytest.raises(ValueError, match=rf"^--clip_len needs --mapper clipcap_tf, got '{mapper}'$"):
            pc.Bridge(_cfg(mapper=mapper, clip_len=4), 32, 32, 3)
    for mapper in ("mlp", "transformer"):
        with pytest.raises(ValueError, match=rf"^--normalize_prefix needs --mapper clipcap_mlp\|clipcap_tf, got "
                                             rf"'{mapper}'$"):
            pc.Bridge(_cfg(mapper=mapper, normalize_prefix=True), 32, 32, 3)
    assert _clipcap(tiny, "clipcap_mlp", normalize_prefix=True).normalize_prefix


def test_clipcap_mappers_read_clips_projected_image_embedding(world):
    """--mapper clipcap_*: what the mapper receives, through the script's own path (load_frozen, the cached
    last_hidden_state, the bridge's frozen copy of post_layernorm + visual_projection), is transformers'
    CLIPModel.get_image_features of the same pixels (the toy CLIP projects to 64, not its vision_config's 512).
    Only the mapper is trainable and counted; the other mappers keep the plain CLIPVisionModel."""
    from transformers import CLIPModel
    from common.image import normalize
    models = os.path.join(world, "models")
    cfg = _cfg(bridge="mapper", mapper="clipcap_mlp", prefix_len=2, clip_model=os.path.join(models, "clip"),
               lm_model=os.path.join(models, "gpt2"))
    clip, lm, ctok = pc.load_frozen(cfg, torch.device("cpu"), torch.float32)
    bridge = pc.Bridge(cfg, clip.config.hidden_size, lm.config.n_embd, lm.config.n_layer, clip).eval()
    ds = pc.CaptionSet(pc.read_records(os.path.join(world, "pairs_val.jsonl"), "image")[:3], world,
                       clip.config.image_size, 1, ctok)
    pixels = torch.cat([ds[(i, 0)]["pixels"] for i in range(3)])  # (3, 3, H, W) uint8
    pc.cache_features(ds, clip, torch.float32, 2, pc.cdist.setup_distributed("cpu"))
    seen = []
    bridge.mapper.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        bridge.visual(torch.stack(ds.cache), torch.ones(3, 1, dtype=torch.bool))
        want = CLIPModel.from_pretrained(cfg.clip_model).eval().get_image_features(pixel_values=normalize(pixels))
    want = getattr(want, "pooler_output", want)
    assert seen[0].shape == want.shape == (3, 64) and torch.allclose(seen[0], want, atol=1e-5, rtol=0)
    trained = sum(p.numel() for p in bridge.parameters() if p.requires_grad)
    assert pc.bridge_param_table(bridge)["trainable"] == pc.count_params(bridge.mapper) == trained
    assert trained == 64 * 64 + 64 + 64 * 128 + 128  # Linear(E, D*K/2) + Linear(D*K/2, D*K), D = 64, K = 2
    plain = pc.load_frozen(dataclasses.replace(cfg, mapper="mlp"), torch.device("cpu"), torch.float32)[0]
    assert type(plain).__name__ == "CLIPVisionModel"


def test_clipcap_param_counts_at_paper_sizes():
    """--mode params, offline, at ViT-B/32 (E = 512) + GPT-2 small (D = 768): ClipCap's MLP at K = 10 is
    512*3840+3840 + 3840*7680+7680 = 31,468,800 trained; its TransformerMapper at K = K' = 40 (its README) is
    8 layers of 8 D^2 + 8 D, Linear(512, 40 D) and 40 D constants = 53,587,968. CLIP's projection is frozen."""
    mlp = pc.main(["--mode", "params", "--preset", "paper", "--mapper", "clipcap_mlp"])
    assert 512 * 3840 + 3840 + 3840 * 7680 + 7680 == 31_468_800
    assert mlp["mapper"]["mapper"] == mlp["mapper"]["trainable"] == 31_468_800
    assert mlp["both"]["trainable"] == 38_238_744 + 31_468_800 and mlp["xattn"]["trainable"] == 38_238_744
    assert mlp["frozen_clip"] == 87_456_000 + 768 * 512  # + visual_projection (no bias)
    tf = pc.main(["--mode", "params", "--preset", "paper", "--mapper", "clipcap_tf", "--prefix_len", "40"])
    assert 8 * (8 * 768 ** 2 + 8 * 768) + 512 * 40 * 768 + 40 * 768 + 40 * 768 == 53_587_968
    assert tf["mapper"]["mapper"] == tf["mapper"]["trainable"] == 53_587_968 == tf["both"]["mapper"]
    assert tf["both"]["trainable"] == 38_238_744 + 53_587_968 == 91_826_712 and tf["frozen_clip"] == 87_849_216


def test_padded_frames_change_nothing(tiny):
    """A 2-frame clip alone and padded to 4 frames in a batch: same Z and same text logits (key mask + positions)."""
    torch.manual_seed(1)
    bridge = pc.Bridge(_cfg(bridge="both"), 32, 32, 3).eval()
    with torch.no_grad():
        for x in bridge.xattn:
            x.attn_gate.fill_(0.7)
            x.ff_gate.fill_(0.7)
    long, short = _feats(1, 4, seed=1), _feats(1, 2, seed=2)
    batch = torch.cat([long, torch.cat([short, torch.zeros_like(short)], 1)])
    fm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    tokens = torch.tensor([[2, 4, 5, 3]] * 2)
    tm = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        z_alone = bridge.resampler(short, fm[1:, :2])
        z_batch = bridge.resampler(batch, fm)[1:]
        alone = bridge(tiny["lm"], short, fm[1:, :2], tokens[:1], tm[:1])[:, 2:]
        batched = bridge(tiny["lm"], batch, fm, tokens, tm)[1:, 4:]
    assert torch.allclose(z_alone, z_batch, atol=1e-5)
    assert torch.allclose(alone, batched, atol=1e-4)
    # seed behaviour (no key mask): padded frames leak into Z
    seedish = pc.Bridge(_cfg(bridge="both", frame_key_mask=False), 32, 32, 3).eval()
    seedish.load_state_dict(bridge.state_dict())
    with torch.no_grad():
        assert not torch.allclose(seedish.resampler(short, fm[1:, :2]), seedish.resampler(batch, fm)[1:], atol=1e-3)


def test_labels_ignore_prefix_and_padding_not_token_zero():
    tokens = torch.tensor([[2, 0, 5, 3], [2, 6, 3, 0]])   # a real token with id 0 in row 0
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    lab = pc.caption_labels(tokens, mask, prefix_len=2)
    assert lab.tolist() == [[-100, -100, 2, 0, 5, 3], [-100, -100, 2, 6, 3, -100]]
    assert pc.caption_labels(tokens, mask, 0, bos_target=False)[:, 0].tolist() == [-100, -100]
    logits = torch.randn(2, 6, 10)
    want = torch.nn.functional.cross_entropy(logits[0, 1:5], torch.tensor([2, 0, 5, 3]), reduction="sum")
    want = want + torch.nn.functional.cross_entropy(logits[1, 1:4], torch.tensor([2, 6, 3]), reduction="sum")
    assert torch.allclose(pc.caption_loss(logits, lab, 7.0), want / 7)


def test_decoding_batched_equals_unbatched_and_stops_at_eos(tiny):
    torch.manual_seed(3)
    bridge = pc.Bridge(_cfg(bridge="both"), 32, 32, 3).eval()
    with torch.no_grad():
        for x in bridge.xattn:
            x.attn_gate.fill_(0.5)
    feats = torch.cat([_feats(1, 3, seed=4), torch.cat([_feats(1, 1, seed=5), torch.zeros(1, 2, 5, 32)], 1)])
    fm = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    for beams in (1, 3):
        both = bridge.generate(tiny["lm"], feats, fm, 2, 3, 0, num_beams=beams, max_new_tokens=6)
        one = bridge.generate(tiny["lm"], feats[1:, :1], fm[1:, :1], 2, 3, 0, num_beams=beams, max_new_tokens=6)
        n = one.shape[1]
        assert torch.equal(both[1, :n], one[0]) and (both[1, n:] == 0).all()
    # greedy picks the argmax of the teacher-forced logits at every step
    g = bridge.generate(tiny["lm"], feats[:1], fm[:1], 2, 3, 0, num_beams=1, max_new_tokens=4)[0]
    seq = torch.tensor([[2] + g.tolist()])
    logits = bridge(tiny["lm"], feats[:1], fm[:1], seq, torch.ones_like(seq, dtype=torch.bool))
    assert torch.equal(logits[0, 3:3 + len(g)].argmax(-1), g)
    # EOS stops generation: add a large bias to the EOS logit of the LM head for the duration of one call
    lm = tiny["lm"]
    head = lm.lm_head
    bias = torch.zeros(15)
    bias[3] = 100.0
    lm.lm_head = torch.nn.Sequential(head, _AddBias(bias))
    try:
        out = bridge.generate(lm, feats, fm, 2, 3, 0, num_beams=1, max_new_tokens=6)
    finally:
        lm.lm_head = head
    assert out.tolist() == [[3], [3]]


class _AddBias(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.bias = bias

    def forward(self, x):
        return x + self.bias


def test_caption_draws_follow_common_sampler_and_are_reproducible():
    """Training keys: common StepSampler's (epoch, index) with one caption drawn per image and epoch; one process
    with two micro batches sees what two ranks see, and the draw does not depend on where it is made."""
    from common.data import StepSampler
    recs = [{"captions": [f"c{j}" for j in range(5)]} for _ in range(10)]
    one = list(pc.caption_draws(StepSampler(10, 4, 2, 1, 0, seed=3, start_step=0, total_steps=5), recs, 3))
    two = [list(pc.caption_draws(StepSampler(10, 4, 2, 2, r, seed=3, start_step=0, total_steps=5), recs, 3))
           for r in range(2)]
    assert one == [mb for pair in zip(*two) for mb in pair]
    assert len({i for mb in one[:4] for i, _ in mb}) == 8  # the 2 steps of an epoch: 8 distinct images
    assert len({c for mb in one for _, c in mb}) > 1 and all(0 <= c < 5 for mb in one for _, c in mb)
    epoch = [{i: c for mb in one[k:k + 4] for i, c in mb} for k in (0, 4)]  # 2 steps of 2 micro batches each
    assert any(epoch[0][i] != epoch[1][i] for i in epoch[0].keys() & epoch[1].keys())  # drawn again per epoch
    late = list(pc.caption_draws(StepSampler(10, 4, 2, 1, 0, seed=3, start_step=3, total_steps=5), recs, 3))
    assert late == one[6:]  # a resumed sampler continues the same stream
    assert pc.sample_frames(10, 4) == [1, 3, 6, 8] and pc.sample_frames(3, 4) == [0, 1, 2]


# ------------------------------------------------------------------ main() on the tiny toy world
@pytest.fixture(scope="module")
def world(toy_root):
    return toy_root


def test_gated_xattn_output_survives_bf16_autocast(world, monkeypatch):
    """Issue 18.6: a GPU stores the frozen backbones in the autocast dtype, but not GPT-2: in a bf16 residual
    stream tanh(gate) ~ 1e-3 times an xattn block's output (the first steps after the zero init) rounds away.
    The hidden states GPT-2's first block receives carry the gated contribution as fp32 computes it."""
    import math
    from transformers import GPT2LMHeadModel
    monkeypatch.setattr(pc.amp, "frozen_dtype", lambda device, dtype: dtype)  # what load_frozen sees on a GPU
    cfg = _cfg(bridge="xattn", xattn_prefix="none", clip_model=os.path.join(world, "models", "clip"),
               lm_model=os.path.join(world, "models", "gpt2"))
    clip, lm, _ = pc.load_frozen(cfg, torch.device("cpu"), torch.bfloat16)
    ref = GPT2LMHeadModel.from_pretrained(cfg.lm_model).eval()  # fp32, no autocast
    torch.manual_seed(0)
    bridge = pc.Bridge(cfg, clip.config.hidden_size, lm.config.n_embd, lm.config.n_layer)
    feats, fm = torch.randn(2, 1, 10, clip.config.hidden_size), torch.ones(2, 1, dtype=torch.bool)
    tokens = torch.randint(0, lm.config.vocab_size - 1, (2, 12))

    def block0_input(model, gate, dtype):
        seen = []
        hook = model.transformer.h[0].ln_1.register_forward_pre_hook(lambda m, a: seen.append(a[0].float()))
        with torch.no_grad():
            for x in bridge.xattn:
                x.attn_gate.fill_(math.atanh(gate))
                x.ff_gate.fill_(math.atanh(gate))
            with pc.amp.autocast("cpu", dtype):
                bridge(model, feats, fm, tokens, torch.ones_like(tokens, dtype=torch.bool))
        hook.remove()
        return seen[0]                                                   # (B, L, D) after the gated block

    want = block0_input(ref, 1e-3, torch.float32) - block0_input(ref, 0.0, torch.float32)
    got = block0_input(lm, 1e-3, torch.bfloat16) - block0_input(lm, 0.0, torch.bfloat16)
    assert want.abs().max() > 1e-5                                       # the contribution is there to lose
    assert float((got - want).norm() / want.norm()) < 0.05               # a bf16 stream: ~0.7


def test_gpt2_logits_stay_fp32_under_bf16_autocast(world):
    """The seed's GPT-2 is fp32 throughout; under bf16 autocast (a GPU run) its output layer still computes in fp32:
    the logits (loss, beam scores) are the fp32 product of GPT-2's final hidden states with its output matrix,
    not bf16 values 0.25 apart at |logit| 32-64."""
    cfg = _cfg(bridge="mapper", clip_model=os.path.join(world, "models", "clip"),
               lm_model=os.path.join(world, "models", "gpt2"))
    clip, lm, _ = pc.load_frozen(cfg, torch.device("cpu"), torch.bfloat16)
    torch.manual_seed(0)
    bridge = pc.Bridge(cfg, clip.config.hidden_size, lm.config.n_embd, lm.config.n_layer)
    feats, fm = torch.randn(2, 1, 10, clip.config.hidden_size), torch.ones(2, 1, dtype=torch.bool)
    tokens = torch.randint(0, lm.config.vocab_size - 1, (2, 12))
    seen = []
    hook = lm.transformer.ln_f.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad(), pc.amp.autocast("cpu", torch.bfloat16):
        logits = bridge(lm, feats, fm, tokens, torch.ones_like(tokens, dtype=torch.bool))  # (B, P+L, V)
    hook.remove()
    assert logits.dtype == torch.float32
    want = seen[0].float() @ lm.lm_head.weight.float().t()
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


SMALL = ["--resampler_depth", "1", "--num_latents", "8", "--resampler_heads", "2", "--resampler_dim_head", "16",
         "--xattn_heads", "2", "--xattn_dim_head", "16", "--mapper_hidden", "64"]


def _run(world, out, *extra):
    argv = ["--toy_root", str(world), "--out_dir", str(out), "--log_every", "1", *SMALL, *extra]
    return pc.main([str(a) for a in argv])


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _report(out):
    """report.html of a run, parsed and checked by common.report.read_report (every image decodes, every SVG
    parses), plus {plot title: [series names]} and the (width, height) shown of each image."""
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    plots = {re.search(r'font-weight="bold">([^<]*)<', g).group(1): re.findall(r'<polyline data-series="([^"]+)"', g)
             for g in svgs}
    sizes = [tuple(map(int, m)) for m in re.findall(r'<img[^>]* width="(\d+)" height="(\d+)"', page)]
    return read_report(os.path.join(out, "report.html")), plots, sizes


def _shuffled_cider(rows):
    """Mean CIDEr of the run's own captions given to the wrong images (every rotation of the test split): the
    score of captions that ignore the image, with the run's caption distribution."""
    from common.metrics import caption_metrics
    gts = {i: r["target"] for i, r in enumerate(rows)}
    scores = [caption_metrics(gts, {i: [rows[(i + k) % len(rows)]["prediction"]] for i in gts})["CIDEr"]
              for k in range(1, len(rows))]
    return 100 * sum(scores) / len(scores)


def test_caption_beats_blank_baseline_and_test_mode(world, tmp_path):
    """Same recipe twice: real images vs blank images (the no-image baseline); then --mode test reloads best.pt.
    Margins checked on the tiny worlds of seeds 0-2, 5-9 and 11 (docs/perceiver_caption.md): after 800 steps the
    image lowers the val loss by 0.054-0.117 nats, and the captions score 26-52 CIDEr higher on their own images
    than on other images (at 400 steps seed 8's world gave 0.030 and 7.2: its model had barely begun to read
    the image). CIDEr against the blank model is no test at this size: its one caption scores about where the
    image model lands."""
    recipe = ["--bridge", "both", "--steps", "800", "--global_batch", "16", "--micro_batch", "16", "--lr", "3e-3",
              "--eval_every", "100", "--log_every", "20", "--decode", "greedy", "--max_new_tokens", "24"]
    m = _run(world, tmp_path / "img", *recipe)
    blank = _run(world, tmp_path / "blank", *recipe, "--blank", "true", "--test_after_train", "false",
                 "--report", "false")
    assert not os.path.exists(tmp_path / "blank" / "report.html")  # --report false writes none
    info, plots, sizes = _report(tmp_path / "img")
    assert info["sections"] == ["Training", "Results", "Captions (test)"] and info["images"] == 16
    assert {"loss terms", "learning rate", "val_loss"} <= set(plots) and sizes == [(128, 128)] * 16
    assert "CIDEr" in open(tmp_path / "img" / "report.html").read()  # the results table
    assert m["val_loss"] < blank["val_loss"] - 0.015, (m["val_loss"], blank["val_loss"])  # the image helps ...
    assert {"CIDEr", "BLEU-4", "ROUGE-L", "hf_BLEU-1", "hf_BLEU-4", "hf_ROUGE-L", "val_loss"} <= set(m)
    assert m["n"] == 50
    rows = json.load(open(tmp_path / "img" / "predictions_test.json"))
    # the seed's Hugging Face `evaluate` scores of the same captions, under their own names beside the COCO ones
    hf = hf_caption_metrics(dict(enumerate(r["target"] for r in rows)), dict(enumerate(r["prediction"] for r in rows)))
    assert all(m[k] == pytest.approx(100 * v) for k, v in hf.items()) and m["hf_ROUGE-L"] != m["ROUGE-L"]
    control = _shuffled_cider(rows)
    assert m["CIDEr"] > control + 10, (m["CIDEr"], control)  # ... and the captions name what is in it
    assert json.load(open(tmp_path / "img" / "config.json"))["bridge"] == "both"
    ck = torch.load(tmp_path / "img" / "best.pt", weights_only=True)
    assert ck["config"]["steps"] == 800 and all(not k.startswith("transformer") for k in ck["bridge"])
    assert ck["script"] == "perceiver_caption" and ck["kind"] == "train"
    assert ck["model_config"] == dataclasses.asdict(pc.model_config(pc.Config(**ck["config"])))
    assert ck["model_config"]["bridge"] == "both" and "lr" not in ck["model_config"]
    t = pc.main(["--mode", "test", "--ckpt", str(tmp_path / "img" / "best.pt"), "--out_dir", str(tmp_path / "t"),
                 "--toy_root", str(world), "--decode", "greedy", "--max_new_tokens", "24",
                 "--bridge", "mapper", "--num_latents", "3"])  # the model comes from the checkpoint
    assert t["CIDEr"] == pytest.approx(m["CIDEr"])  # same weights, same decoding
    assert "Captions (test)" in _report(tmp_path / "t")[0]["sections"]  # a test run reports too
    assert t["hf_BLEU-4"] == pytest.approx(m["hf_BLEU-4"]) and t["hf_ROUGE-L"] == pytest.approx(m["hf_ROUGE-L"])
    rows = json.load(open(tmp_path / "t" / "predictions_test.json"))
    assert len(rows) == 50 and {"sample_path", "prediction", "target"} <= set(rows[0])
    # a checkpoint written before checkpoints were stamped (no script, kind, model_config) still tests the same
    old = {k: v for k, v in ck.items() if k not in ("script", "kind", "model_config")}
    torch.save(old, tmp_path / "old.pt")
    t2 = pc.main(["--mode", "test", "--ckpt", str(tmp_path / "old.pt"), "--out_dir", str(tmp_path / "t2"),
                  "--toy_root", str(world), "--decode", "greedy", "--max_new_tokens", "24", "--max_eval", "8"])
    assert t2["n"] == 8


@pytest.mark.parametrize("extra", [[], ["--frozen_eval", "false"]])
def test_resume_equals_unbroken_run(world, tmp_path, extra):
    """Also with GPT-2 dropout on (--frozen_eval false), where any draw from the global RNG between the
    checkpoint and the next step (a DataLoader without its own generator) changes the resumed losses."""
    common = ["--steps", "6", "--global_batch", "8", "--micro_batch", "4", "--eval_every", "100",
              "--test_after_train", "false", "--save_every", "3", *extra]
    full = _run(world, tmp_path / "full", *common)
    _run(world, tmp_path / "half", *common, "--stop_at", "3")
    # the killed run had logged a step past its last checkpoint: the resumed run must log each step once
    with open(tmp_path / "half" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n")
    part = _run(world, tmp_path / "half", *common, "--resume", tmp_path / "half" / "last.pt")
    assert part["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6, abs=1e-7)
    assert _losses(tmp_path / "half") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6, abs=1e-7)
    rows = [json.loads(line) for line in open(tmp_path / "half" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r.get("event") == "resume"] == [3]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["bridge"]
    b = torch.load(tmp_path / "half" / "last.pt", weights_only=True)["bridge"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_a_changed_config_unless_asked(world, tmp_path, capsys):
    common = ["--steps", "4", "--global_batch", "8", "--micro_batch", "8", "--eval_every", "2",
              "--test_after_train", "false", "--save_every", "2"]
    _run(world, tmp_path / "a", *common, "--stop_at", "2")
    ck = tmp_path / "a" / "last.pt"
    with pytest.raises(ValueError, match=r"resume changes the config: lr 0\.003 -> 0\.001.*--resume_changes"):
        _run(world, tmp_path / "b", *common, "--resume", ck, "--lr", "1e-3")
    # --epochs is the schedule's length with --steps 0 (--preset paper): a resume may not change it silently
    with pytest.raises(ValueError, match=r"resume changes the config: epochs 30\.0 -> 1\.0.*--resume_changes"):
        _run(world, tmp_path / "b", *common, "--resume", ck, "--epochs", "1")
    m = _run(world, tmp_path / "c", *common, "--resume", ck, "--lr", "1e-3", "--epochs", "1", "--resume_changes",
             "true")
    out = capsys.readouterr().out
    assert m["steps"] == 4 and "epochs 30.0 -> 1.0, lr 0.003 -> 0.001 (allowed by --resume_changes)" in out
    # best.pt keeps weights only: resuming from it is refused in one line, not with a KeyError
    with pytest.raises(ValueError, match=r"best\.pt has no optimizer state"):
        _run(world, tmp_path / "d", *common, "--resume", tmp_path / "a" / "best.pt")


def test_micro_batch_is_fitted_before_loading_and_a_resume_may_change_it(tmp_path, monkeypatch):
    """train() clamped the micro batch to min(micro, global / world): 40 on 2 ranks with --micro_batch 16 ran
    16 x 2 x accumulation 1 = 32 and stopped in StepSampler after CLIP and GPT-2 had loaded.  main() now runs
    common.data.fit_micro before any data or model: 2 ranks x 10 x 2 = 40.  A resume on another world size (so
    another fitted micro batch) continues: the loss divides by the global batch's target tokens on any layout."""
    from common.checkpoint import resume_config_diff
    from common.dist import Dist
    seen, Stop = {}, type("Stop", (Exception,), {})

    def stop(cfg, d):  # resolve_paths: the first step that reads data or builds the toy world
        seen["micro"] = cfg.micro_batch
        raise Stop

    monkeypatch.setattr(pc.cdist, "setup_distributed", lambda device: Dist(world_size=2))
    monkeypatch.setattr(pc, "resolve_paths", stop)
    with pytest.raises(Stop):
        pc.main(["--global_batch", "40", "--micro_batch", "16", "--out_dir", str(tmp_path)])
    assert seen["micro"] == 10
    assert resume_config_diff({"micro_batch": 32, "lr": 1e-3}, {"micro_batch": 16, "lr": 1e-3}, pc.RESUME_FREE) == []


def test_resume_into_another_out_dir_tests_the_best_weights(world, tmp_path, monkeypatch):
    """The final test captions with the weights of the run's best validation loss: after a resume into another
    --out_dir that never beats the restored best, the best.pt beside --resume, not a stale best.pt left in the
    new folder by an earlier run; where no best.pt holds the best val loss, the last weights, and it says so."""
    vals, tested = iter([1.0, 2.0, 2.0]), []  # val loss at step 2 (first run), at step 4 (each resumed run)
    monkeypatch.setattr(pc, "validation_loss", lambda *a: next(vals))
    monkeypatch.setattr(pc, "evaluate_captions", lambda bridge, *a: tested.append(
        {k: v.clone() for k, v in bridge.state_dict().items()}) or {})
    common = ["--steps", "4", "--global_batch", "8", "--micro_batch", "8", "--eval_every", "2", "--save_every",
              "2", "--report", "false"]
    _run(world, tmp_path / "a", *common, "--stop_at", "2")
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    (tmp_path / "b").mkdir()  # an earlier run's best.pt (another val loss, other weights) in the reused out_dir
    torch.save({**best, "best_val": 0.5, "bridge": {k: v + 1 for k, v in best["bridge"].items()}},
               tmp_path / "b" / "best.pt")
    m = _run(world, tmp_path / "b", *common, "--resume", tmp_path / "a" / "last.pt")
    assert m["best_val_loss"] == 1.0 and m["tested"] == f"{tmp_path / 'a' / 'best.pt'}, step 2"
    assert all(torch.equal(tested[-1][k], v) for k, v in best["bridge"].items())
    os.remove(tmp_path / "a" / "best.pt")  # no best.pt of val loss 1.0 left: the last weights, named
    m = _run(world, tmp_path / "c", *common, "--resume", tmp_path / "a" / "last.pt")
    last = torch.load(tmp_path / "c" / "last.pt", weights_only=True)["bridge"]
    assert m["tested"] == "the last, step 4" and all(torch.equal(tested[-1][k], v) for k, v in last.items())


def test_flop_count_leaves_the_rng_as_it_was(world, tmp_path, monkeypatch):
    """Where MFU is known (a GPU) the first step of every run, so of every resume, is counted by an extra forward
    + backward: its dropout draws are undone, so the next steps' losses are those of a run without the count
    (GPT-2 dropout on). The count is made to run on the CPU here."""
    common = ["--steps", "2", "--global_batch", "8", "--micro_batch", "8", "--eval_every", "100",
              "--test_after_train", "false", "--report", "false", "--frozen_eval", "false"]
    _run(world, tmp_path / "plain", *common)
    counted, count_flops = [], pc.count_flops
    monkeypatch.setattr(pc, "peak_flops", lambda *a, **k: 1e12)
    monkeypatch.setattr(pc, "count_flops", lambda fn: counted.append(1) or count_flops(fn))
    _run(world, tmp_path / "counted", *common)
    assert counted == [1]
    assert _losses(tmp_path / "counted") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-6, abs=1e-7)


def test_checkpoints_of_other_scripts_are_named(world, tmp_path):
    """A checkpoint of another script fails in one line naming what it is and what was expected (it used to
    fail with KeyError or blame --task, a flag the user never set)."""
    torch.save({"script": "dlip", "kind": "pretrain", "config": {"teacher": "x"}, "model": {}},
               tmp_path / "dlip.pt")
    torch.save({"config": {"stage": 1, "task": "caption"}, "qformer": {}}, tmp_path / "bp.pt")
    with pytest.raises(ValueError, match=r"--ckpt .*dlip\.pt: this is a dlip pretrain checkpoint; "
                                         r"perceiver_caption expects a perceiver_caption checkpoint"):
        pc.main(["--mode", "test", "--ckpt", str(tmp_path / "dlip.pt"), "--toy_root", str(world)])
    with pytest.raises(ValueError, match=r"--ckpt .*: this is a blip2_pformer \(unstamped\) checkpoint"):
        pc.main(["--mode", "caption", "--ckpt", str(tmp_path / "bp.pt"), "--toy_root", str(world)])
    with pytest.raises(ValueError, match=r"--resume .*: this is a dlip pretrain checkpoint; .*perceiver_caption "
                                         r"train checkpoint"):
        _run(world, tmp_path / "r", "--steps", "2", "--resume", tmp_path / "dlip.pt")


def _train_file(world, path, n, bad_every=0):
    """The first n toy training pairs; every bad_every-th one points at an image that does not exist."""
    rows = [json.loads(line) for line in open(os.path.join(world, "pairs_train.jsonl"))][:n]
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            if bad_every and i % bad_every == 0:
                r = {**r, "image": f"missing/{i}.png"}
            f.write(json.dumps(r) + "\n")
    return path


def test_bad_image_rule(world, tmp_path, capsys):
    """Each unreadable image counted once and reported; under max_bad_frac the run trains on the rest, above it
    (also when counted in DataLoader workers) or with no readable image it stops with a one-line DataError."""
    from common.data import DataError
    short = ["--steps", "3", "--global_batch", "8", "--micro_batch", "8", "--eval_every", "100",
             "--test_after_train", "false"]
    few = _train_file(world, tmp_path / "few.jsonl", 300, bad_every=50)  # 6 of 300: 2 %
    m = _run(world, tmp_path / "few", *short, "--train_file", few)
    assert m["unreadable_images"] == 6 and m["steps"] == 3
    assert "train: 6 of 300 images unreadable" in capsys.readouterr().out
    many = _train_file(world, tmp_path / "many.jsonl", 300, bad_every=10)  # 30 of 300: 10 %
    with pytest.raises(DataError, match=r"too many unreadable images .*30 of 300"):
        _run(world, tmp_path / "many", *short, "--train_file", many)
    workers = _train_file(world, tmp_path / "w.jsonl", 40, bad_every=3)  # 14 of 40, drawn in a worker
    with pytest.raises(DataError, match=r"too many unreadable images"):
        _run(world, tmp_path / "w", *short, "--train_file", workers, "--cache_feats", "false", "--workers", "1")
    with pytest.raises(DataError) as e:
        _run(world, tmp_path / "none", *short, "--image_root", tmp_path / "empty")
    assert "unreadable" in str(e.value) and "\n" not in str(e.value)


def test_first_toy_run_builds_only_clip_and_gpt2(tmp_path, monkeypatch):
    import data.toy
    asked = []

    def fake(root, models=(), **kw):
        asked.append((root, list(models)))
        raise RuntimeError("stop here")
    monkeypatch.setattr(data.toy, "ensure_toy_world", fake)
    with pytest.raises(RuntimeError, match="stop here"):
        pc.main(["--toy_root", str(tmp_path / "toy"), "--out_dir", str(tmp_path / "run")])
    assert asked == [(str(tmp_path / "toy"), ["clip", "gpt2"])]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one(world, tmp_path):
    """torchrun with 2 CPU processes (gloo), micro batch 4 each = 1 process with 2 micro batches of 4."""
    common = ["--toy_root", world, "--steps", "3", "--global_batch", "8", "--micro_batch", "4", "--eval_every",
              "100", "--test_after_train", "false", "--log_every", "1", "--device", "cpu", *SMALL]
    pc.main([str(a) for a in common + ["--out_dir", tmp_path / "one"]])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), os.path.join(ROOT, "perceiver_caption.py")] + [str(a) for a in common] + \
          ["--out_dir", str(tmp_path / "two")]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-5)
    rngs = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["rng"]  # per rank (issue 18.5)
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


def _spawned(rank, runs):
    torch.set_num_threads(1)
    for port, argv in runs:  # one process group per run, each on its own port
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        pc.main(argv)


def test_two_rank_resume_equals_unbroken_run_with_dropout(world, tmp_path, spawn):
    """Issue 18.5: with GPT-2 dropout on, each rank draws its own masks (seeded seed + rank after the
    weights) and a resume restores each rank its own generators: 2 processes stopped at step 2 and
    resumed log the losses of an unbroken 2-process run."""
    common = ["--toy_root", world, "--log_every", "1", *SMALL, "--steps", "4", "--global_batch", "8",
              "--micro_batch", "4", "--eval_every", "100", "--test_after_train", "false",
              "--save_every", "2", "--frozen_eval", "false", "--report", "false", "--device", "cpu"]
    argv = lambda out, *a: [str(x) for x in common + ["--out_dir", tmp_path / out, *a]]  # noqa: E731
    runs = [(_free_port(), argv("full")), (_free_port(), argv("half", "--stop_at", "2")),
            (_free_port(), argv("half", "--resume", tmp_path / "half" / "last.pt"))]
    spawn(_spawned, args=(runs,))
    full = _losses(tmp_path / "full")
    assert sorted(full) == [1, 2, 3, 4]
    assert _losses(tmp_path / "half") == pytest.approx(full, rel=1e-6, abs=1e-7)


def _cache_rank(rank, world, root, out, port):
    """Cache the CLIP features of a video split (clips of 1-3 frames) and of a pairs split with unreadable images,
    batches of 3 (rounds of uneven shards); save the caches, the bad counts and the frames this rank encoded."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from transformers import AutoTokenizer, CLIPVisionModel
    d = pc.cdist.setup_distributed("cpu")
    clip = CLIPVisionModel.from_pretrained(os.path.join(root, "models", "clip")).eval()
    encoded = []
    clip.register_forward_pre_hook(lambda m, a, k: encoded.append(len(k["pixel_values"])), with_kwargs=True)
    ctok = pc.CaptionTokenizer(AutoTokenizer.from_pretrained(os.path.join(root, "models", "gpt2")), 32)
    res = {}
    for name, task, num_frames in (("video", "video", 3), ("pairs", "image", 8)):
        ds = pc.CaptionSet(pc.read_records(os.path.join(out, f"{name}.jsonl"), task), root,
                           clip.config.image_size, num_frames, ctok, max_bad_frac=0.5)
        pc.cache_features(ds, clip, torch.float32, 3, d)
        res[name] = {"cache": ds.cache, "records": ds.records, "bad": ds.loader.bad_paths}
    res["encoded"] = sum(encoded)
    torch.save(res, os.path.join(out, f"cache_{world}_{rank}.pt"))
    pc.cdist.cleanup_distributed()


def test_cache_feats_shards_over_ranks_and_gathers(world, tmp_path, spawn):
    """Issue 18.10: each of 2 gloo ranks encodes only its shard of the images (half of the frames), and after the
    all-gather both hold the whole cache, in record order, with every rank's unreadable images counted: the
    cache one process makes."""
    with open(os.path.join(world, "video_val.jsonl")) as f, open(tmp_path / "video.jsonl", "w") as g:
        for i, line in enumerate(f):  # clips of 1, 2 and 3 frames: padding to the longest differs per batch
            r = json.loads(line)
            g.write(json.dumps({**r, "frames": r["frames"][:1 + i % 3]}) + "\n")
    _train_file(world, tmp_path / "pairs.jsonl", 13, bad_every=6)  # records 0, 6 and 12 unreadable
    _cache_rank(0, 1, world, str(tmp_path), _free_port())
    spawn(_cache_rank, args=(2, world, str(tmp_path), _free_port()))
    one, two = (torch.load(tmp_path / f"cache_{w}_{r}.pt", weights_only=False) for w, r in ((1, 0), (2, 0)))
    other = torch.load(tmp_path / "cache_2_1.pt", weights_only=False)
    # frames encoded: 19 of the clips + 10 readable images; rank 0 clips 0-4 (9) + images 1-5 (5), rank 1 the rest
    assert (one["encoded"], two["encoded"], other["encoded"]) == (29, 14, 15)
    for name in ("video", "pairs"):
        assert len(one[name]["cache"]) == 10
        assert one[name]["bad"] == (["missing/0.png", "missing/12.png", "missing/6.png"] if name == "pairs" else [])
        for part in (two, other):
            assert part[name]["records"] == one[name]["records"] and part[name]["bad"] == one[name]["bad"]
            assert [x.shape for x in part[name]["cache"]] == [x.shape for x in one[name]["cache"]]
            for a, b in zip(part[name]["cache"], one[name]["cache"]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [len(x) for x in one["video"]["cache"]] == [1 + i % 3 for i in range(10)]


def _gloo_rank(rank, port):
    """Join a 2-process gloo group (a collective that waits for a missing peer fails after 60 s, not never)."""
    import datetime
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    return pc.cdist.setup_distributed("cpu")


def _skip_rank(rank, port, out):
    """Two train_steps of a mapper bridge under DDP: in the first, rank 1 has no micro batch (all its images were
    unreadable); save what each step returned, the optimizer's state after it and the weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    d = _gloo_rank(rank, port)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=32))
    lm.eval().requires_grad_(False)
    cfg = _cfg(bridge="mapper", mapper_hidden=8, schedule="constant", warmup_frac=0.0)
    bridge = pc.Bridge(cfg, 16, 16, 1)
    model, opt = pc.cdist.wrap_ddp(bridge, d), torch.optim.AdamW(bridge.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(rank)
    micro = {"feats": torch.randn(2, 1, 3, 16, generator=g), "frame_mask": torch.ones(2, 1, dtype=torch.bool),
             "tokens": torch.randint(1, 20, (2, 5), generator=g), "tok_mask": torch.ones(2, 5, dtype=torch.bool)}
    weights, res = [[p.detach().clone() for p in bridge.parameters()]], []
    for step, micros in enumerate([[micro] if rank == 0 else [], [micro]]):
        res.append(pc.train_step(cfg, model, bridge, lm, None, opt, pc.amp.make_scaler(torch.float32),
                                 torch.float32, d, micros, step, 10))
        res[-1]["adam_states"] = len(opt.state)
        weights.append([p.detach().clone() for p in bridge.parameters()])
    torch.save({"res": res, "weights": weights}, os.path.join(out, f"skip_{rank}.pt"))
    pc.cdist.cleanup_distributed()


def test_a_rank_without_readable_images_skips_the_step_on_every_rank(tmp_path, spawn):
    """A rank whose micro batches all lost their images (batches() drops them) runs no forward/backward, so DDP's
    gradient all-reduce never happens there: every rank learns it from the token-count all-reduce and skips the
    step (no optimizer step, replicas unchanged and equal); the next step trains as usual."""
    spawn(_skip_rank, args=(_free_port(), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"skip_{r}.pt", weights_only=False) for r in (0, 1))
    for r in (r0, r1):
        assert r["res"][0]["skipped_step"] == 1 and "loss" not in r["res"][0] and r["res"][0]["adam_states"] == 0
        assert "loss" in r["res"][1] and r["res"][1]["adam_states"] > 0
        assert all(torch.equal(a, b) for a, b in zip(r["weights"][0], r["weights"][1]))  # skipped: unchanged
        assert not all(torch.equal(a, b) for a, b in zip(r["weights"][1], r["weights"][2]))  # then trained
    assert r0["res"][1]["loss"] == pytest.approx(r1["res"][1]["loss"])
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"][2], r1["weights"][2]))  # replicas alike


def _test_rank(rank, port, world, out):
    """--mode test's test() on 2 ranks, uncached, for max_bad_frac 0.5 and 0.25: save each rank's outcome (the
    unreadable count or the DataError) and the log lines."""
    from common.data import DataError
    d = _gloo_rank(rank, port)
    cfg = _cfg(clip_model=os.path.join(world, "models", "clip"), lm_model=os.path.join(world, "models", "gpt2"),
               test_file=os.path.join(out, "test.jsonl"), image_root=world, cache_feats=False, decode="greedy",
               max_new_tokens=2, out_dir=os.path.join(out, f"run_{rank}"), eval_batch=2)
    clip, lm, ctok = pc.load_frozen(cfg, d.device, torch.float32)
    torch.manual_seed(0)
    bridge = pc.Bridge(cfg, clip.config.hidden_size, lm.config.n_embd, lm.config.n_layer).eval()
    lines, res = [], {}
    logger = types.SimpleNamespace(info=lines.append)
    for frac in (0.5, 0.25):
        try:
            res[frac] = pc.test(dataclasses.replace(cfg, max_bad_frac=frac), d, torch.float32, clip, lm, ctok,
                                bridge, logger)["unreadable_images"]
        except DataError as e:
            res[frac] = str(e)
    torch.save({"res": res, "lines": lines}, os.path.join(out, f"test_{rank}.pt"))
    pc.cdist.cleanup_distributed()


def test_unreadable_images_at_test_time_are_counted_over_ranks(world, tmp_path, spawn):
    """Uncached --mode test on 2 ranks: each rank reads only its block of the test split, and the 3 missing
    images of 8 all fall in rank 1's (records 4-7). The report and the max_bad_frac check use every rank's counts:
    rank 0 reports all 3, and both ranks decide alike (3/8 passes 0.5, where rank 1's own 3/4 would stop it,
    and fails 0.25, where rank 0's own 0/4 would pass)."""
    with open(os.path.join(world, "pairs_test.jsonl")) as f, open(tmp_path / "test.jsonl", "w") as g:
        for i, line in enumerate(list(f)[:8]):
            g.write(json.dumps({**json.loads(line), **({"image": f"missing/{i}.png"} if i >= 5 else {})}) + "\n")
    spawn(_test_rank, args=(_free_port(), world, str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"test_{r}.pt", weights_only=False)["res"] for r in (0, 1))
    assert r0[0.5] == r1[0.5] == 3
    assert re.match(r"too many unreadable images .*3 of 8 images unreadable", r0[0.25]) and r1[0.25] == r0[0.25]
    lines = torch.load(tmp_path / "test_0.pt", weights_only=False)["lines"]
    assert "unreadable images | test: 3 of 8 images unreadable" in "\n".join(lines)


def test_frames_travel_as_uint8_and_bench_times_the_loader_apart(world, tmp_path, slowed):
    """Issue 18.7: the loader ships uint8 frames (a quarter of float32's bytes, pinned on a GPU) and encode_frames
    normalises them on the device: the CLIP features of the float path, 0 on padded frames.  --bench draws the
    real training loader's batches (here decoding frames, no cache) and reports their time apart from the step's."""
    from transformers import AutoTokenizer, CLIPVisionModel
    from common.image import ImageTransform, load_image
    clip = CLIPVisionModel.from_pretrained(os.path.join(world, "models", "clip")).eval()
    ctok = pc.CaptionTokenizer(AutoTokenizer.from_pretrained(os.path.join(world, "models", "gpt2")), 32)
    recs = pc.read_records(os.path.join(world, "video_val.jsonl"), "video")[:3]
    recs = [{**r, "frames": r["frames"][:n]} for r, n in zip(recs, (3, 1, 2))]
    ds = pc.CaptionSet(recs, world, clip.config.image_size, 3, ctok)
    b = pc.collate([ds[(i, 0)] for i in range(3)])
    assert b["pixels"].dtype == torch.uint8 and b["pixels"].shape[:2] == (3, 3)
    got = pc.encode_frames(clip, b["pixels"], b["frame_mask"], torch.float32)        # (B, T, S, D)
    tf = ImageTransform(clip.config.image_size)                                      # normalised on the CPU
    for i, r in enumerate(recs):
        x = torch.stack([tf(load_image(os.path.join(world, f))) for f in r["frames"]])
        with torch.no_grad():
            want = clip(pixel_values=x).last_hidden_state
        torch.testing.assert_close(got[i, :len(x)], want, rtol=1e-5, atol=1e-5)
        assert not got[i, len(x):].any()
    delay = 0.02
    calls = slowed(pc, delay)  # the training loader's collate, made slow by a known amount
    m = _run(world, tmp_path, "--bench", "2", "--cache_feats", "false", "--global_batch", "8", "--micro_batch", "4")
    assert m["bench_steps"] == 2 and {"ms_data", "ms_step", "samples_s", "samples_s_step"} <= set(m)
    # each step's 2 micro batches come from the loader: (3 warm-up + 2 timed [+ 1 FLOP count on a GPU]) x 2
    assert calls == [4] * 2 * (3 + 2 + ("max_mem_gib" in m))
    assert m["ms_data"] >= 2 * 1000 * delay and m["ms_step"] > 0  # each timed step waited for 2 slow collates


@pytest.mark.parametrize("extra", [["--bridge", "mapper"], ["--bridge", "xattn", "--xattn_prefix", "none"],
                                   ["--task", "video", "--cache_feats", "false", "--num_frames", "3"],
                                   ["--bridge", "mapper", "--mapper", "transformer"]])
def test_ablations_and_video_train(world, tmp_path, monkeypatch, extra):
    short = ["--steps", "8", "--global_batch", "8", "--micro_batch", "8", "--eval_every", "100", "--max_eval", "4",
             "--decode", "greedy", "--max_new_tokens", "6", *extra]
    for name in ("validation_loss", "caption_records"):  # without dropout (--mapper transformer has some)
        def eval_only(bridge, *a, _f=getattr(pc, name), **k):
            assert not bridge.training
            return _f(bridge, *a, **k)
        monkeypatch.setattr(pc, name, eval_only)
    m = _run(world, tmp_path, *short, "--lr", "3e-3")
    losses = _losses(tmp_path)
    assert m["n"] == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    info, plots, sizes = _report(tmp_path)
    gates = {k: v for k, v in plots.items() if "gate" in k}
    if "mapper" in extra:
        assert not gates and info["sections"] == ["Training", "Results", "Captions (test)"]
        assert m["xattn"] == 0 and m["resampler"] == 0 and m["trainable"] == m["mapper"]
    else:  # the tiny GPT-2 has 2 blocks, each with an xattn block before it: one curve per block and gate
        assert gates == {"tanh(attn gate) per xattn block": ["gate_attn_0", "gate_attn_1"],
                         "tanh(FFW gate) per xattn block": ["gate_ff_0", "gate_ff_1"],
                         "mean |tanh(gate)|": ["gate_attn", "gate_ff"]}, plots
        with open(tmp_path / "metrics.jsonl") as f:  # opened from exactly 0, moved by every step, still open
            gates = [r["gate_attn"] for r in map(json.loads, f) if "gate_attn" in r]
        assert gates[0] > 0 and min(gates) > 0 and all(a != b for a, b in zip(gates, gates[1:])), gates
    if "video" in extra:  # one strip of the 3 frames the model saw per test clip
        assert info["sections"][-1] == "Video captions (test)" and info["images"] == 4
        assert all(w > 2.5 * h for w, h in sizes), sizes
    if "xattn" not in extra:  # a prefix learns: below a control run (lr 0) on the same batches
        _run(world, tmp_path / "control", *short, "--lr", "0")
        control = _losses(tmp_path / "control")
        assert control[1] == losses[1], (control, losses)  # the same first batch and start
        # Paired step by step, so the batches' own spread cancels; a step's difference varies by ~0.05 around
        # its world's mean, the mean of steps 4-8 by ~0.02.  That mean on the tiny worlds of seeds 0-2, 5-9, 11:
        # mapper -0.11 (seed 7, whose random prefix already costs little) to -0.75, video -0.40 to -1.51.
        # (8 steps of gates alone, the xattn row, move the loss by < 0.001: no learning test there.)
        assert sum(losses[s] - control[s] for s in range(4, 9)) / 5 < -0.03, (losses, control)


def test_compile_flag_hands_the_bridge_to_torch_compile(world, tmp_path, monkeypatch):
    """--compile true: the trained Bridge goes through torch.compile before training (a spy stands in for it here:
    compiling is a GPU speed-up, too slow for CPU tests); off by default."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.append(type(module).__name__) or module)
    assert pc.Config().compile is False
    m = _run(world, tmp_path, "--steps", "2", "--global_batch", "4", "--micro_batch", "4", "--compile", "true",
             "--test_after_train", "false")
    assert seen == ["Bridge"] and m["steps"] == 2 and torch.isfinite(torch.tensor(m["train_loss"]))


def test_non_finite_loss_stops_without_saving(world, tmp_path):
    with pytest.raises(Exception, match=r"non-finite loss at step \d+: loss="):
        _run(world, tmp_path, "--steps", "4", "--global_batch", "8", "--micro_batch", "8", "--lr", "1e30",
             "--clip_grad", "0", "--schedule", "constant", "--warmup_frac", "0", "--save_every", "1",
             "--eval_every", "100")
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["bridge"].values())


def test_bad_input_and_caption_mode(world, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "images/x.png", "captions": ["a"]}\n{"image": "images/y.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'captions'"):
        _run(world, tmp_path / "r", "--train_file", bad, "--steps", "1")
    _run(world, tmp_path / "r", "--steps", "1", "--global_batch", "4", "--micro_batch", "4",
         "--test_after_train", "false")
    first = json.loads(open(os.path.join(world, "pairs_test.jsonl")).readline())["image"]
    out = pc.main(["--mode", "caption", "--ckpt", str(tmp_path / "r" / "best.pt"), "--toy_root", str(world),
                   "--inputs", os.path.join(world, first), "--decode", "beam", "--beams", "3", "--num_return", "2",
                   "--max_new_tokens", "5"])
    caps = out[os.path.join(world, first)]
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    # a blank-baseline checkpoint (--blank true) is fed blank images in --mode caption too, as it was trained
    ck = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    ck["model_config"]["blank"] = ck["config"]["blank"] = True
    torch.save(ck, tmp_path / "blank.pt")
    items, getitem = [], pc.CaptionSet.__getitem__
    monkeypatch.setattr(pc.CaptionSet, "__getitem__", lambda ds, key: items.append(getitem(ds, key)) or items[-1])
    with open(os.path.join(world, "pairs_test.jsonl")) as f:
        imgs = [os.path.join(world, json.loads(line)["image"]) for line in f][:2]
    out = pc.main(["--mode", "caption", "--ckpt", str(tmp_path / "blank.pt"), "--toy_root", str(world),
                   "--inputs", ",".join(imgs), "--decode", "greedy", "--max_new_tokens", "5"])
    assert len(items) == 2 and all(not x["tried"] and not x["pixels"].any() for x in items)
    assert out[imgs[0]] == out[imgs[1]]


def test_video_folder_records_apart_from_the_image_root_in_frame_order(world, tmp_path, monkeypatch):
    """--task video from {"folder": dir} records in JSONL files kept apart from the images: each folder is found
    under --image_root (like every other path; not next to the JSONL file), and clips of 12 frames named as
    ffmpeg's %d names them (0.png ... 11.png) are fed in frame order, not 0, 1, 10, 11, 2, ..., in training
    and in --mode caption."""
    import shutil
    root, ann, clips = tmp_path / "root", tmp_path / "ann", []
    with open(os.path.join(world, "video_train.jsonl")) as f:
        toy = [json.loads(line) for line in f][:6]
    for i, r in enumerate(toy):  # the toy clip's frames, cycled to 12
        (root / "videos" / f"c{i}").mkdir(parents=True)
        for k in range(12):
            frame = os.path.join(world, r["frames"][k % len(r["frames"])])
            shutil.copy(frame, root / "videos" / f"c{i}" / f"{k}.png")
        clips.append(json.dumps({"folder": f"videos/c{i}", "captions": r["captions"]}) + "\n")
    ann.mkdir()
    (ann / "video_train.jsonl").write_text("".join(clips[:4]))
    (ann / "video_val.jsonl").write_text("".join(clips[4:]))
    items, getitem = [], pc.CaptionSet.__getitem__  # every item the loaders draw (--workers 0)
    monkeypatch.setattr(pc.CaptionSet, "__getitem__", lambda ds, key: items.append(getitem(ds, key)) or items[-1])
    m = _run(world, tmp_path / "r", "--task", "video", "--train_file", ann / "video_train.jsonl", "--val_file",
             ann / "video_val.jsonl", "--image_root", root, "--num_frames", "12", "--cache_feats", "false",
             "--steps", "1", "--global_batch", "4", "--micro_batch", "4", "--test_after_train", "false")
    assert m["steps"] == 1 and items and not [x["bad"] for x in items if x["bad"]]
    order = [f"{k}.png" for k in range(12)]
    assert all([os.path.basename(p) for p in x["tried"]] == order for x in items), items[0]["tried"]
    items.clear()
    folder = str(root / "videos" / "c0")
    out = pc.main(["--mode", "caption", "--ckpt", str(tmp_path / "r" / "best.pt"), "--toy_root", str(world),
                   "--inputs", folder, "--decode", "greedy", "--max_new_tokens", "3"])
    assert len(out[folder]) == 1 and [x["tried"] for x in items] == [[os.path.join(folder, n) for n in order]]


def test_caption_mode_gives_an_image_model_one_frame_of_a_folder(world, tmp_path, monkeypatch):
    """An image model (one time row trained) captions a frame folder in --inputs from one frame, the one
    sample_frames picks for 1 (the middle), as it took one image a record in training; beside an image file,
    as the docs' `--inputs a.png,frames_dir/` example."""
    import shutil
    _run(world, tmp_path / "r", "--steps", "1", "--global_batch", "4", "--micro_batch", "4",
         "--test_after_train", "false", "--report", "false")
    with open(os.path.join(world, "pairs_test.jsonl")) as f:
        imgs = [os.path.join(world, json.loads(line)["image"]) for line in f][:5]
    (folder := tmp_path / "frames").mkdir()
    for k, img in enumerate(imgs):
        shutil.copy(img, folder / f"{k}.png")
    items, getitem = [], pc.CaptionSet.__getitem__
    monkeypatch.setattr(pc.CaptionSet, "__getitem__", lambda ds, key: items.append(getitem(ds, key)) or items[-1])
    out = pc.main(["--mode", "caption", "--ckpt", str(tmp_path / "r" / "best.pt"), "--toy_root", str(world),
                   "--inputs", f"{imgs[0]},{folder}", "--decode", "greedy", "--max_new_tokens", "3"])
    assert sorted(out) == sorted([imgs[0], str(folder)]) and pc.sample_frames(5, 1) == [2]
    assert sorted(x["tried"] for x in items) == sorted([[imgs[0]], [str(folder / "2.png")]])
    assert all(len(x["pixels"]) == 1 for x in items)


def test_train_run_of_zero_steps_tests_in_eval_mode(world, tmp_path, monkeypatch):
    """A resume with no step left (here --stop_at at the resumed step) goes straight to the final test: the
    bridge decodes in eval mode (no dropout), as after any training step, not in nn.Module's default train mode."""
    modes, generate = [], pc.Bridge.generate  # each decoding batch: the bridge's modules' modes
    monkeypatch.setattr(pc.Bridge, "generate", lambda self, *a, **kw: modes.append(
        [m.training for m in self.modules()]) or generate(self, *a, **kw))
    common = ["--steps", "4", "--global_batch", "4", "--micro_batch", "4", "--eval_every", "2", "--save_every",
              "2", "--report", "false", "--stop_at", "2", "--max_eval", "2", "--decode", "greedy",
              "--max_new_tokens", "2"]
    _run(world, tmp_path / "a", *common)
    assert len(modes) == 1 and not any(modes[0])  # after a training step
    m = _run(world, tmp_path / "b", *common, "--resume", tmp_path / "a" / "last.pt")
    assert m["steps"] == 2 and m["train_loss"] is None and m["n"] == 2  # no step ran, then the test
    assert len(modes) == 2 and not any(modes[1])


def test_nucleus_sampling_returns_seeded_samples(world, tmp_path):
    """--decode nucleus, the seed's third decoding (utils/decoding.py nucleus_sampling; config.yaml: top_p 0.8,
    temperature 0.9, no top-k): --num_return samples per input, the same again for the same --seed, others for
    another --seed, not all the greedy caption."""
    _run(world, tmp_path / "r", "--steps", "1", "--global_batch", "4", "--micro_batch", "4",
         "--test_after_train", "false")
    with open(os.path.join(world, "pairs_test.jsonl")) as f:
        imgs = [os.path.join(world, json.loads(line)["image"]) for line in f][:4]

    def caption(*extra):
        return pc.main(["--mode", "caption", "--ckpt", str(tmp_path / "r" / "best.pt"), "--toy_root", str(world),
                        "--inputs", ",".join(imgs), "--max_new_tokens", "8", *extra])
    a = caption("--decode", "nucleus", "--num_return", "3")
    b = caption("--decode", "nucleus", "--num_return", "3")
    greedy = caption("--decode", "greedy")
    assert a == b and all(len(c) == 3 and all(isinstance(x, str) for x in c) for c in a.values())
    assert any(set(a[p]) != set(greedy[p]) for p in imgs), (a, greedy)
    assert caption("--decode", "nucleus", "--num_return", "3", "--seed", "1") != a  # --seed draws them
    assert sum(map(len, (x for c in a.values() for x in c))) > 0  # some text, not 12 empty samples
    with pytest.raises(ValueError, match="needs --decode nucleus or as many beams"):
        caption("--decode", "greedy", "--num_return", "2")


def test_cache_feats_keep_the_encoder_dtype(world, tiny):
    """--cache_feats keeps the features in the frozen CLIP's dtype (bf16 on a GPU: half the memory of fp32), the
    values encode_frames gives; a bf16 CLIP on the CPU stands in for the GPU's."""
    import copy
    recs = pc.read_records(os.path.join(world, "pairs_val.jsonl"), "image")[:3]
    ctok, d = pc.CaptionTokenizer(tiny["tok"], 16), pc.cdist.setup_distributed("cpu")
    for dt in (torch.float32, torch.bfloat16):
        clip = copy.deepcopy(tiny["clip"]).to(dt)
        ds = pc.CaptionSet(recs, world, clip.config.image_size, 1, ctok)
        pc.cache_features(ds, clip, torch.float32, 2, d)
        assert [x.dtype for x in ds.cache] == [dt] * 3
        px = pc.CaptionSet(recs, world, clip.config.image_size, 1, ctok)[(2, 0)]["pixels"][None]
        want = pc.encode_frames(clip, px, torch.ones(1, 1, dtype=torch.bool), torch.float32)[0]
        assert torch.equal(ds.cache[2], want.to(dt))


def test_test_mode_takes_num_frames_given_and_warns_of_model_flags(world, tmp_path, monkeypatch, capsys):
    """Flamingo (arXiv 2204.14198) trains on 8 frames and runs on more: --mode test|caption take --num_frames
    (and --task) from the command line; beyond the frames the checkpoint trained on, its time rows are stretched;
    a model field given there (--num_latents) is the checkpoint's, with one warning line."""
    _run(world, tmp_path / "v", "--task", "video", "--num_frames", "4", "--steps", "1", "--global_batch", "4",
         "--micro_batch", "4", "--test_after_train", "false")
    items, getitem = [], pc.CaptionSet.__getitem__
    monkeypatch.setattr(pc.CaptionSet, "__getitem__", lambda ds, key: items.append(getitem(ds, key)) or items[-1])
    ck = ["--mode", "test", "--ckpt", str(tmp_path / "v" / "best.pt"), "--toy_root", str(world), "--out_dir",
          str(tmp_path / "t"), "--decode", "greedy", "--max_new_tokens", "3", "--report", "false"]
    capsys.readouterr()
    m = pc.main(ck + ["--task", "video", "--num_frames", "2", "--num_latents", "3", "--max_time_emb", "500"])
    assert m["n"] == 10 and max(len(x["tried"]) for x in items) == 2  # the checkpoint's 4 frames before
    out = capsys.readouterr().out
    assert "warning: the checkpoint's model fields override --num_latents\n" in out  # not the equal max_time_emb
    items.clear()
    pc.main(ck)  # nothing given: the checkpoint's 4 frames
    assert max(len(x["tried"]) for x in items) == 4 and "warning" not in capsys.readouterr().out
    items.clear()  # more frames than trained: Flamingo's interpolated time rows (test_time_rows_stretch_...)
    seen, real = [], pc.PerceiverResampler.time_rows
    monkeypatch.setattr(pc.PerceiverResampler, "time_rows", lambda r, m, tr=None: seen.append((m.shape[1], tr))
                        or real(r, m, tr))
    pc.main(ck + ["--num_frames", "6"])
    assert max(len(x["tried"]) for x in items) == 6 and (6, 4) in seen
    assert "--num_frames 6: the 4 trained time rows are interpolated" in capsys.readouterr().out


def test_time_rows_stretch_linearly_over_more_frames():
    """PerceiverResampler.time_rows (Flamingo, arXiv 2204.14198: trained on 8 frames, run on 30): a clip of more
    real frames than the T trained ones reads the trained rows linearly interpolated over its frames, the first and
    last kept; a clip of n <= T frames reads rows 0..n-1 as in training, whatever the batch's padded length (it had
    read squeezed rows: the table was stretched once over --num_frames); an image model's one row is every frame's.
    Beyond the table: refused only where rows would be read."""
    torch.manual_seed(0)
    r = pc.PerceiverResampler(8, 1, 2, 4, 3, 10, 1)
    table = r.time_emb.detach().clone()  # (10, 1, 8)
    mask = lambda *n: torch.arange(7)[None] < torch.tensor(n)[:, None]  # noqa: E731  (B, 7) real frames first
    assert torch.equal(r.time_rows(mask(4, 2)[:, :4]), table[None, :4])  # training: rows 0..T-1, no `trained`
    assert torch.equal(r.time_rows(mask(4, 2)[:, :4], 4), table[None, :4])
    rows = r.time_rows(mask(7, 3, 5), 4)  # (3, 7, 1, 8)
    for b, n in enumerate((7, 3, 5)):
        pos = torch.arange(n) * min(1.0, 3 / (n - 1))  # 7 frames: 0, 0.5, ..., 3; 3 frames: 0, 1, 2
        lo = pos.floor().long().clamp(max=2)
        w = (pos - lo)[:, None, None]
        torch.testing.assert_close(rows[b, :n], table[lo] * (1 - w) + table[lo + 1] * w)
    assert torch.equal(rows[1, :3], table[:3]) and torch.equal(rows[0, [0, 6]], table[[0, 3]])
    rows.sum().backward()
    assert r.time_emb.grad[4:].abs().sum() == 0  # nothing read beyond the trained rows
    assert torch.equal(r.time_rows(mask(7, 1), 1), table[None, :1].expand(2, 7, 1, 8))
    assert r.time_rows(torch.ones(1, 12, dtype=torch.bool), 4).shape == (1, 12, 1, 8)  # 12 frames, 10 rows
    with pytest.raises(ValueError, match="12 frames but the time-embedding table has 10"):
        r.time_rows(torch.ones(1, 12, dtype=torch.bool))


def test_test_mode_decodes_as_the_checkpoints_run_unless_given():
    """--mode test|caption without --preset paper on a --preset paper checkpoint: the decoding fields (beams 5,
    max_new_tokens 100) are the checkpoint's run's, not the toy preset's (3, 20), with one warning line; a
    decoding flag given on the command line wins."""
    from common.config import parse_config
    ran = dataclasses.asdict(parse_config(pc.Config, pc.PRESETS, ["--preset", "paper"]))
    assert (ran["beams"], ran["max_new_tokens"]) == (5, 100)
    saved, lines = pc.model_config(ran), []
    logger = types.SimpleNamespace(info=lines.append)
    for extra, beams in (([], 5), (["--beams", "2"], 2)):
        argv = ["--mode", "test", "--ckpt", "runs/x/best.pt", *extra]
        cfg = parse_config(pc.Config, pc.PRESETS, argv)
        assert (cfg.preset, cfg.beams, cfg.max_new_tokens) == ("toy", 3 if not extra else 2, 20)
        run = pc.checkpoint_run(cfg, saved, ran, argv, logger)
        assert (run.beams, run.max_new_tokens, run.decode, run.clip_model) == (beams, 100, "beam", ran["clip_model"])
    assert lines == ["warning: decoding as the checkpoint's run: {'beams': 5, 'max_new_tokens': 100}",
                     "warning: decoding as the checkpoint's run: {'max_new_tokens': 100}"]


@pytest.mark.parametrize("mapper,extra", [("clipcap_mlp", []),
                                          ("clipcap_tf", ["--task", "video", "--cache_feats", "false",
                                                          "--num_frames", "3"]),
                                          ("clipcap_tf", ["--clip_len", "3", "--normalize_prefix", "true"])])
def test_clipcap_train_then_test_mode_rebuilds_the_mapper(world, tmp_path, mapper, extra):
    """A short --bridge mapper run with ClipCap's mapper (K = 2; images with cached features, or 3-frame videos: 6
    prefix tokens): only the mapper trains (the checkpoint's CLIP head is the CLIP's own, AdamW holds state for the
    mapper's tensors alone), and --mode test rebuilds the same mapper from the checkpoint and decodes the same;
    --clip_len and --normalize_prefix are model fields: the checkpoint keeps them for --mode test|caption."""
    from transformers import CLIPModel
    m = _run(world, tmp_path, "--bridge", "mapper", "--mapper", mapper, "--prefix_len", "2", "--steps", "6",
             "--global_batch", "8", "--micro_batch", "8", "--eval_every", "3", "--max_eval", "4", "--decode",
             "greedy", "--max_new_tokens", "6", "--lr", "3e-3", "--report", "false", *extra)
    assert m["n"] == 4 and m["trainable"] == m["mapper"] > 0 and m["xattn"] == 0 and m["train_loss"] > 0
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (ck["model_config"]["mapper"], ck["model_config"]["prefix_len"]) == (mapper, 2)
    flags = (ck["model_config"]["clip_len"], ck["model_config"]["normalize_prefix"])
    assert flags == ((3, True) if "--clip_len" in extra else (0, False))
    ref = CLIPModel.from_pretrained(os.path.join(world, "models", "clip"))
    assert torch.equal(ck["bridge"]["clip_head.0.weight"], ref.vision_model.post_layernorm.weight)
    assert torch.equal(ck["bridge"]["clip_head.1.weight"], ref.visual_projection.weight)
    mapper_keys = [k for k in ck["bridge"] if k.startswith("mapper.")]
    assert len(ck["optimizer"]["state"]) == len(ck["optimizer"]["param_groups"][0]["params"]) == len(mapper_keys)
    t = pc.main(["--mode", "test", "--ckpt", str(tmp_path / "best.pt"), "--out_dir", str(tmp_path / "t"),
                 "--toy_root", str(world), "--decode", "greedy", "--max_new_tokens", "6", "--max_eval", "4",
                 "--report", "false"])  # the mapper, --task and --num_frames come from the checkpoint
    assert t["n"] == 4
    rows = [json.load(open(p / "predictions_test.json")) for p in (tmp_path, tmp_path / "t")]
    assert [r["prediction"] for r in rows[0]] == [r["prediction"] for r in rows[1]]
