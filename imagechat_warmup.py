"""Image-Chat dialogue with vision-language warm-up tasks (VLAW-MDM).

Lee, Park, Park, Kim, Kim, "A Framework for Vision-Language Warm-up Tasks in Multimodal Dialogue
Models" (EMNLP 2023, ACL Anthology 2023.emnlp-main.167; code github.com/BeneciaLee/VLAW-MDM), on
Image-Chat (Shuster et al., arXiv 1811.00945). A text encoder-decoder (BlenderBot-400M-distill in
the paper, the toy world's T5 here) reads an image block `<img> V_1..V_9 </img>` (CLIP embeddings of
a 3x3 grid of crops, each Linear+LayerNorm'd to d_model), then `caption </s> style <sty> utterance
</s> ...`; a segment embedding tells image slots from text. Before fine-tuning on next-utterance
generation the model is warmed up on Image-Chat itself with four tasks on every batch (paper section
3.4): masked dialogue modelling (MLM), image swap prediction (ISP), masked region modelling (MRM, KL
to the masked crop's CLIP feature) and caption generation from a masked caption (GCD). Generation
losses are MLE + unlikelihood (Welleck et al., arXiv 1908.04319), summed over tokens.

--mode features | captions (data/imagechat.py, cached by image hash), warmup (--tasks: a subset of
mlm,isp,mrm,gcd = the paper's Table 3 ablation), finetune (--init a warm-up checkpoint, or none),
eval (beam search per turn: F1 / BLEU-4 / ROUGE-L, mean "IC", PPL, R@1/5/10), chat (stdin turns about
--image), params; warmup, finetune and eval leave <out_dir>/report.html. Toy world (CPU):
    python imagechat_warmup.py --mode features
    python imagechat_warmup.py --mode captions --captioner runs/bp/export  # blip2_pformer export
    python imagechat_warmup.py --mode warmup --out_dir runs/icw_toy/warmup
    python imagechat_warmup.py --mode finetune --init runs/icw_toy/warmup/last.pt --out_dir runs/ft
Paper recipe on 8 GPUs (global batch fixed, = micro x world x accumulation: 2016 = 18 x 8 x 14):
    torchrun --nproc_per_node 8 imagechat_warmup.py --preset paper --mode warmup --warmup_micro 18 \
        --out_dir runs/icw/warmup
Release-vs-paper choices are printed at start-up: --legacy_lr, --untied_head, --share_pos and
--select_on test take the release's (its unlikelihood is the default). More: docs/imagechat_warmup.md.
"""
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.amp import autocast, make_scaler, pick_dtype, seed_everything
from common.checkpoint import (RESUME_FREE, check_resume_config, expect_checkpoint, load_checkpoint,
                               rng_state, save_checkpoint, set_rng_state)
from common import config
from common.config import asdict_config, format_config, given_flags, parse_config, save_config
from common.data import StepSampler, fit_micro
from common.dist import (all_gather_object, all_reduce_mean, barrier, cleanup_distributed,
                         setup_distributed, shard_indices, unwrap, wrap_ddp)
from common.log import Logger, progress
from common.metrics import gold_rank, label_matches
from common.hf import counts_table, hf_model
from common.train import StepTimer, count_flops, count_params, mfu, optimizer_update, run_bench
from data.imagechat import (as_trained, chat_image, chat_styles, feature_parts, load_split, mix,
                            peek_checkpoint, prepare_captions, prepare_features, results_table,
                            run_captions, run_features, selected_weights, turn_scores,
                            write_predictions, write_report)
from data.toy import toy_paths

SCRIPT = "imagechat_warmup"


# ================================================================================================ Config
@dataclass
class Config:
    preset: str = "toy"
    mode: str = "finetune"          # features | captions | warmup | finetune | eval | chat | params
    out_dir: str = "runs/icw_toy/run"
    toy_root: str = "data/toy"
    seed: int = 428                 # paper App. B
    device: str = "auto"
    precision: str = "auto"         # bf16 on GPU (the paper used fp16 AMP), fp32 on CPU
    bench: int = 0
    compile: bool = False           # torch.compile the trained model (a GPU's speed-up)
    resume: str = ""
    resume_changes: bool = False    # continue a resume whose config differs from the checkpoint's
    init: str = ""                  # weights to start from (warm-up result / model to evaluate)
    image: str = ""                 # chat: the image talked about
    style: str = ""                 # chat: the model's personality (user_style: the user's, or none)
    user_style: str = ""
    caption: str = ""               # chat: the caption when no --captioner is given
    # ---- data and local model folders ("" = inside toy_root for the toy preset)
    data_dir: str = ""              # train.json / valid.json / test.json as published
    image_root: str = ""            # <image_hash>.jpg
    cache_dir: str = "runs/icw_toy/cache"   # features/, captions(.r<rank>.jsonl|.json), *.meta.json
    clip: str = ""
    captioner: str = ""             # BLIP-2 (Blip2ForConditionalGeneration) folder
    backbone: str = ""              # encoder-decoder (BlenderBot / BART / T5) folder
    blank_images: bool = False      # all-zero CLIP features (the blank-image baseline / diagnostic)
    max_missing_frac: float = 0.05  # more episodes without feature/caption than this -> error
    max_bad_frac: float = 0.05      # features/captions: more unreadable images than this -> error
    stop_after: int = 0             # stop after N steps / N new images (rerun continues)
    # ---- features / captions (paper sections 3.1-3.2; data/imagechat.py)
    grid: int = 3                   # 3x3 crops of a (3*crop)^2 resized image
    feat_batch: int = 64
    caption_batch: int = 20
    caption_beams: int = 5
    caption_return: int = 3
    caption_min_length: int = 5
    caption_max_new_tokens: int = 16
    # ---- model
    use_image: bool = True          # False = no image block at all (the "w/o image" ablation)
    use_caption: bool = True
    max_positions: int = 256        # learned position tables extended to this (BlenderBot: 128)
    share_pos: bool = False         # release: the decoder reuses the encoder's extended table
    untied_head: bool = False       # release: a fresh random LM head instead of the tied embedding
    seg_tokens: int = 40            # caption, style, utterance cut to this + </s> (release: 40 incl. </s>; styles whole)
    max_src_len: int = 256
    max_tgt_len: int = 254          # target incl. its final </s>
    # ---- warm-up tasks (paper section 3.4)
    tasks: str = "mlm,isp,mrm,gcd"
    mlm_frac: float = 0.2           # floor(0.2 * n) of the n tokens of each "utterance </s>" masked
    mrm_frac: float = 0.15          # floor(9 * 0.15) = 1 patch zeroed
    task_weight: float = 1.0        # lambda_1..4 (release: 0.25 = 1/|tasks|)
    ul_alpha: float = 1.0
    ul_per_sequence: bool = False   # False = release: unlikelihood candidates over the whole batch
    # ---- optimisation (paper App. B: AdamW 6.25e-5, OneCycle, seed 428, no clipping)
    warmup_epochs: float = 20
    warmup_batch: int = 2016        # 126 accumulation x 16
    warmup_micro: int = 16
    ft_epochs: float = 10
    ft_batch: int = 256
    ft_micro: int = 32
    max_steps: int = 0              # > 0 overrides the epochs
    lr: float = 6.25e-5
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    pct_start: float = 0.3
    legacy_lr: bool = False         # release: scheduler stepped per epoch -> lr stays ~ lr / 25
    cycle_momentum: bool = True     # release (torch's OneCycleLR default): AdamW beta1 .95-.85-.95
    grad_clip: float = 0.0
    all_turns: bool = False         # release: one example per dialogue per epoch, turn drawn
    log_every: int = 20
    save_every: int = 500
    # ---- evaluation and decoding (paper section 4; -1 = the backbone's generation config)
    select_on: str = "valid"        # valid | test (release) | none: split choosing the checkpoint
    eval_every: int = 0             # steps per selection eval (-1 = each epoch, 0 = keep the last)
    eval_split: str = "test"
    final_eval: bool = True
    eval_batch: int = 32            # the batches the paper's metrics average over (release: 64)
    eval_max: int = 0               # at most N examples per turn (0 = all)
    num_candidates: int = 100       # R@1/5/10 of 100 over the published candidate lists (0 = skip)
    num_beams: int = 10
    min_length: int = 20
    max_length: int = -1
    length_penalty: float = -1.0
    no_repeat_ngram_size: int = -1
    encoder_no_repeat_ngram_size: int = -1
    report: bool = True             # warmup|finetune|eval: <out_dir>/report.html (curves, dialogues)


PRESETS = {
    "toy": dict(warmup_epochs=6, warmup_batch=32, warmup_micro=16, ft_epochs=6, ft_batch=32,
                ft_micro=16, lr=1e-3, cycle_momentum=False, num_beams=4, min_length=1, max_length=24,
                length_penalty=1.0, no_repeat_ngram_size=3, encoder_no_repeat_ngram_size=0,
                eval_batch=32, log_every=10, save_every=200, num_candidates=100),
    "paper": dict(out_dir="runs/icw/run", cache_dir="runs/icw/cache", data_dir="data/image_chat",
                  image_root="data/image_chat/images", clip="openai/clip-vit-base-patch32",
                  captioner="Salesforce/blip2-opt-2.7b-coco", backbone="facebook/blenderbot-400M-distill",
                  num_beams=10, min_length=20, eval_every=-1, cycle_momentum=True, eval_batch=64),
}
TASKS = ("mlm", "isp", "mrm", "gcd")
# Fields a resume may change (eval, decoding, preparation); not max_steps: it is OneCycle's length.
RESUME_FREE_ICW = (RESUME_FREE - {"max_steps"}) | set(
    "stop_after final_eval eval_split eval_max num_candidates num_beams min_length max_length clip "
    "captioner length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size".split())


def check_choices(cfg):
    cfg.mode = {"evaluate": "eval"}.get(cfg.mode, cfg.mode)
    config.check_choices(cfg, mode="features|captions|warmup|finetune|eval|chat|params")
    tasks = task_list(cfg)
    if set(tasks) - set(TASKS):
        raise ValueError(f"unknown warm-up tasks {sorted(set(tasks) - set(TASKS))}; use {TASKS}")
    if "gcd" in tasks and cfg.mode == "warmup" and not cfg.use_caption:
        raise ValueError("task gcd needs captions (--use_caption true)")
    if ("isp" in tasks or "mrm" in tasks) and cfg.mode == "warmup" and not cfg.use_image:
        raise ValueError("tasks isp and mrm need the image (--use_image true)")
    return cfg


def resolve_paths(cfg, is_main=True):
    """Fill the empty paths this mode reads from the toy world, building it with only the backbones
    read (features: CLIP; warmup/finetune/eval: T5, and CLIP's config for a --use_image false run
    without features, data/imagechat.py run_features; params/chat: both)."""
    both, cb = {"clip": "models/clip", "backbone": "models/t5"}, ["clip", "t5"]
    no_feats = not (cfg.use_image or feature_parts(cfg.cache_dir))
    reads = {"features": {"clip": "models/clip"}, "captions": {}, "params": both, "chat": both}.get(
        cfg.mode, both if no_feats else {"backbone": "models/t5"})
    models = {"features": ["clip"], "captions": [], "params": cb, "chat": cb}.get(
        cfg.mode, cb if no_feats else ["t5"])
    toy_paths(cfg, {"data_dir": "image_chat", **reads}, models, is_main, barrier)
    cfg.image_root = cfg.image_root or os.path.join(cfg.data_dir, "images")


def task_list(cfg):
    return [t for t in cfg.tasks.split(",") if t]


def selection(cfg):
    """Fine-tune checkpoint choice: (metric, when); None = keep the last.  --select_on test: turn-1
    F1, the release's monitor (training_ablation.py: ModelCheckpoint on "t1_f1", each epoch)."""
    metric = {"valid": "IC/F1", "test": "turn1/F1"}.get(cfg.select_on)
    if cfg.mode == "finetune" and cfg.eval_every and metric:
        return metric, "each epoch" if cfg.eval_every < 0 else f"every {cfg.eval_every} steps"


def deviations(cfg):
    """The release-vs-paper choices in force, printed at start-up."""
    rel, c, crit = " (release)", cfg, "MLM" if "mlm" in task_list(cfg) else "summed"
    return {"lr schedule": "OneCycle per " + ("epoch" + rel if c.legacy_lr else "optimizer step"),
            "AdamW beta1": "OneCycle's 0.95-0.85-0.95" + rel if c.cycle_momentum else "0.9",
            "lm head": "fresh untied Linear" + rel if c.untied_head else "tied to token embedding",
            "decoder positions": "shared with encoder" + rel if c.share_pos else "own table",
            "UL candidates": "per sequence" if c.ul_per_sequence else "whole batch" + rel,
            "ISP target": "<cid> positive|negative </s> (paper; release leaks the answer)",
            "model selection": (f"{c.select_on} {' '.join(s)}" + rel * (c.select_on == "test")
                                if (s := selection(c)) else f"lowest epoch-mean {crit} loss"
                                if c.mode == "warmup" else "last"),
            "turn-2 style": "s_2 (release trains with s_1)", "features/captions": "keyed by hash"}


# ================================================================================================ Model
NEW_TOKENS = ["<img>", "</img>", "<mlm>", "<cid>", "<mrm>", "<gcd>", "<sty>", "<feat>", "<zero>"]
TASK_TOKENS = {"mlm": "<mlm>", "isp": "<cid>", "mrm": "<mrm>", "gcd": "<gcd>"}  # first target token


@dataclass
class Vocab:
    """Token ids the data and the model need (the release's added tokens, paper section 3.3)."""
    pad: int
    eos: int
    bos: int | None               # BlenderBot/BART <s>; None for T5 (no BOS)
    start: int                    # decoder start token
    mask: int
    img: int
    img_end: int
    task: dict                    # {"mlm": id, "isp": id (<cid>), "mrm": id, "gcd": id}
    sty: int
    feat: int
    zero: int
    positive: list
    negative: list


def load_tokenizer(path):
    """Backbone tokenizer + the 9 new tokens (+ <mask> when missing, + ISP answers when unknown)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.mask_token is None:
        tok.add_special_tokens({"mask_token": "<mask>"})
    tok.add_tokens(NEW_TOKENS)
    for word in ("positive", "negative"):
        if tok.unk_token_id in tok.encode(word, add_special_tokens=False):
            tok.add_tokens([word])
    return tok


def make_vocab(tok, lm_config):
    ids = dict(zip(NEW_TOKENS, tok.convert_tokens_to_ids(NEW_TOKENS)))
    start = lm_config.decoder_start_token_id
    return Vocab(pad=tok.pad_token_id, eos=tok.eos_token_id, bos=tok.bos_token_id,
                 start=tok.pad_token_id if start is None else start, mask=tok.mask_token_id,
                 img=ids["<img>"], img_end=ids["</img>"], sty=ids["<sty>"], feat=ids["<feat>"],
                 zero=ids["<zero>"], task={t: ids[m] for t, m in TASK_TOKENS.items()},
                 positive=tok.encode("positive", add_special_tokens=False),
                 negative=tok.encode("negative", add_special_tokens=False))


class Positions(nn.Module):
    """Learned position table for BlenderBot/BART-style models, called like their position module.

    Encoder (`n_prefix` = 11): the image block gets no position; text positions restart at 0
    (release src/model/model_blender_bot.py).  Decoder (`n_prefix` = 0): plain positions (+ the
    generation cache offset).  Returns (1, L, d); given `position_ids`, their rows, unchecked."""

    def __init__(self, weight, n_prefix=0):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.n_prefix = n_prefix

    def forward(self, shape_or_ids, past_key_values_length=0, position_ids=None):
        length = shape_or_ids.shape[1] if torch.is_tensor(shape_or_ids) else shape_or_ids[1]
        if position_ids is not None:  # (L,) or (B, L) ids from the caller -> (1 or B, L, d)
            out = self.weight[position_ids]
            return out if out.dim() == 3 else out.unsqueeze(0)
        n_text = length - self.n_prefix
        n = past_key_values_length + n_text
        if n > self.weight.shape[0]:  # transformers #18433: fail clearly
            raise ValueError(f"sequence of {n} tokens exceeds the position table ({len(self.weight)}); "
                             "lower --max_src_len/--max_tgt_len or raise --max_positions")
        text = self.weight[past_key_values_length:past_key_values_length + n_text]  # (L_text, d)
        prefix = text.new_zeros(self.n_prefix, text.shape[1])
        return torch.cat([prefix, text], 0).unsqueeze(0)  # (1, L, d)


def extended_table(module, n):
    """Rows of a learned position table (BART's 2-row offset dropped), extended to n rows. The
    release fills every new row with P[last] + P[0] (its index arithmetic collapses to one row)."""
    old = module.weight.data[getattr(module, "offset", 0):]  # (n_old, d)
    if n <= old.shape[0]:
        return old.clone()
    extra = (old[-1] + old[0]).expand(n - old.shape[0], -1)
    return torch.cat([old, extra], 0)


class ImageChatModel(nn.Module):
    """transformers encoder-decoder + image projection, segment embedding and MRM head.
    forward(tasks): every task's batch -> its loss terms, in one DDP forward per micro-batch."""

    def __init__(self, lm, vocab, feat_dim, n_patches=9, use_image=True, max_positions=256,
                 share_pos=False, untied_head=False, ul_alpha=1.0, ul_per_sequence=False):
        super().__init__()
        self.lm, self.vocab, self.use_image = lm, vocab, use_image
        self.ul_alpha, self.ul_per_sequence = ul_alpha, ul_per_sequence
        d = lm.config.d_model
        self.n_img = n_patches + 2  # <img> V_1..V_9 </img>
        self.img_proj = nn.Linear(feat_dim, d)      # W r_i + b, then LayerNorm (paper eq. 1)
        self.img_norm = nn.LayerNorm(d)
        self.segment = nn.Embedding(2, d)          # 0 = image slot, 1 = text
        nn.init.normal_(self.segment.weight, std=0.02)
        self.mrm_head = nn.Linear(d, feat_dim)     # decoder state -> CLIP feature space
        enc, dec = lm.get_encoder(), lm.get_decoder()
        if hasattr(enc, "embed_positions"):  # BlenderBot / BART: learned positions (T5: relative)
            enc_table = nn.Parameter(extended_table(enc.embed_positions, max_positions))
            dec_table = enc_table if share_pos else nn.Parameter(
                extended_table(dec.embed_positions, max_positions))
            enc.embed_positions = Positions(enc_table, self.n_img if use_image else 0)
            dec.embed_positions = Positions(dec_table, 0)
        if untied_head:
            lm.config.tie_word_embeddings = False
            lm.lm_head = nn.Linear(d, lm.config.vocab_size, bias=False)

    def embed(self, src, src_mask, feats):
        """Image block + text embeddings and mask: (B, L), (B, 9, D) -> (B, 11+L, d), (B, 11+L)."""
        emb = self.lm.get_input_embeddings()
        x = emb(src)  # (B, L, d), x sqrt(d) for BlenderBot (scale_embedding)
        if not self.use_image:
            return x + self.segment.weight[1], src_mask
        B = src.shape[0]
        v = self.img_norm(self.img_proj(feats.to(x.dtype)))  # (B, 9, d)
        w = emb.weight  # <img>, </img> rows unscaled, as the release
        img = torch.cat([w[self.vocab.img].expand(B, 1, -1), v,
                         w[self.vocab.img_end].expand(B, 1, -1)], 1)  # (B, 11, d)
        x = torch.cat([img + self.segment.weight[0], x + self.segment.weight[1]], 1)  # (B, 11+L, d)
        mask = torch.cat([src_mask.new_ones(B, self.n_img), src_mask], 1)  # image always visible
        return x, mask

    def encode(self, src, src_mask, feats):
        x, mask = self.embed(src, src_mask, feats)
        return self.lm.get_encoder()(inputs_embeds=x, attention_mask=mask), mask

    def forward(self, tasks):
        """tasks: {name: batch dict} -> {loss term: scalar}.  name in mlm|isp|mrm|gcd|ft."""
        out = {}
        for name, b in tasks.items():
            enc, mask = self.encode(b["src"], b["src_mask"], b["feats"])
            d, pad = b["dec_in"], self.vocab.pad  # pads masked, start kept: release dataset.py ~403
            res = self.lm(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=d,
                          decoder_attention_mask=(d != pad).index_fill(1, d.new_zeros(1), 1),
                          output_hidden_states=name == "mrm")
            if name in ("mlm", "gcd", "ft"):
                mle, ul = mle_ul_loss(res.logits, b["labels"], self.vocab.pad, self.ul_per_sequence)
                out[name] = mle + self.ul_alpha * ul
                out[name + "_mle"], out[name + "_ul"] = mle.detach(), ul.detach()
            elif name == "isp":
                out["isp"] = token_ce(res.logits, b["labels"], self.vocab.pad)
            else:  # mrm: decoder states where the input marker is <zero>: (M, d), patch order
                h = res.decoder_hidden_states[-1][b["dec_in"] == self.vocab.zero]
                out["mrm"] = mrm_kl_loss(self.mrm_head(h), b["mrm_target"])
        return out


def build_model(cfg, feat_dim, n_patches, meta=False):
    """Backbone from its local folder, tokenizer with the new tokens, fresh image modules.  meta: the
    architecture alone (--mode params), the vocabulary grown by the new tokens without a tokenizer."""
    from transformers import AutoModelForSeq2SeqLM
    tok = None if meta else load_tokenizer(cfg.backbone)
    lm = hf_model(AutoModelForSeq2SeqLM, cfg.backbone, meta, local_files_only=True)
    lm.resize_token_embeddings(len(tok) if tok else lm.config.vocab_size + len(NEW_TOKENS), mean_resizing=not meta)
    vocab = None if meta else make_vocab(tok, lm.config)
    model = ImageChatModel(lm, vocab, feat_dim, n_patches, cfg.use_image, cfg.max_positions,
                           cfg.share_pos, cfg.untied_head, cfg.ul_alpha, cfg.ul_per_sequence)
    return model, tok, vocab


# ================================================================================================ Losses
def mle_ul_loss(logits, labels, pad, per_sequence=False):
    """Token-summed MLE and unlikelihood (Welleck et al., arXiv 1908.04319, eq. 4) terms, the
    paper's loss for MLM, GCD and fine-tuning (release src/model/candidate_penalty_ce_loss.py).

    logits (B, T, V), labels (B, T) with `pad` after each target.  Returns (mle, ul), both sums.
    UL at step t penalises -log(1 - p(c)) for every candidate c in C_t = tokens at earlier target
    positions, minus y_t.  Release (per_sequence=False): the batch is flattened first, so C_t holds
    earlier examples' tokens too, pad positions get the UL term, and pad is in every C_t, even where
    y_t is pad (its pad*pad fill = pad for pad ids 0 and 1).  per_sequence=True: C_t from the own
    sequence, no pads."""
    B, T, V = logits.shape
    lprobs = logits.float().log_softmax(-1)
    valid = labels != pad
    mle = -(lprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * valid).sum()
    one_minus_p = (1 - lprobs.exp()).clamp(min=1e-5)
    if per_sequence:  # n sequences of length L: (B, T) and (B, T, V)
        seq, lp, pos_ok = labels, one_minus_p, valid
    else:             # one sequence: (1, B*T) and (1, B*T, V); every position, pads included
        seq, lp = labels.reshape(1, B * T), one_minus_p.reshape(1, B * T, V)
        pos_ok = torch.ones_like(seq, dtype=torch.bool)
    n, L = seq.shape
    pos = torch.arange(L, device=seq.device)
    # first[b, v] = first position of token v in sequence b (L if never): C_t = {v : first[v] < t}
    first = torch.full((n, V), L, dtype=torch.long, device=seq.device)
    first = first.scatter_reduce(1, seq, pos.expand(n, L), reduce="amin")
    cand = first.unsqueeze(1) < pos.view(1, L, 1)                            # (n, L, V)
    cand = cand.scatter(2, seq.unsqueeze(-1), False)                         # minus y_t itself
    cand[..., pad] = not per_sequence  # release: pad at every position of the flattened batch
    ul = -(lp.log() * cand * pos_ok.unsqueeze(-1)).sum()
    return mle, ul


def token_ce(logits, labels, pad):
    """Mean token cross-entropy over non-pad positions (ISP).  logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=pad)


def mrm_kl_loss(pred, target):
    """(1/|M|) sum_r KL(softmax(v_r) || softmax(h_r)); pred, target (M, D).  Float64 as released."""
    p_log, q_log = target.double().log_softmax(-1), pred.double().log_softmax(-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().float()


# ================================================================================================ Data
def pad_to(seqs, pad):
    """list of id lists -> (B, L) long tensor, right-padded with `pad`."""
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids


def target_batch(labels, vocab):
    """Teacher forcing: decoder input = labels shifted right behind the start token."""
    lab = pad_to(labels, vocab.pad)
    dec_in = torch.cat([torch.full((lab.shape[0], 1), vocab.start), lab[:, :-1]], 1)
    return dec_in, lab


def src_batch(seqs, vocab, max_len):
    """Encoder text ids (B, L) and mask; over-long texts keep their end (the speaker's style)."""
    ids = pad_to([s[-max_len:] for s in seqs], vocab.pad)
    return ids, (ids != vocab.pad).long()


def warmup_batch(eps, feats, vocab, cfg, g):
    """The four warm-up tasks' batches for one micro-batch (paper section 3.4; release
    src/model/dataset.py).

    Shared encoder text: [<s>] c </s> s_1 <sty> u_1 </s> s_2 <sty> u_2 </s> ...   feats (B, 9, D).
    Decoder input <start> <T> y_1..y_{n-1}, labels <T> y_1..y_n with y ending in </s>."""
    V, B = vocab, len(eps)
    head = [V.bos] if V.bos is not None else []
    tasks = task_list(cfg)

    def source(ep, mask_utts=False, mask_caption=False):
        ids = list(head)
        if cfg.use_caption:
            ids += ([V.mask] * len(ep["caption"]) if mask_caption else ep["caption"]) + [V.eos]
        for s, u in zip(ep["styles"], ep["utts"]):
            u = u[:cfg.seg_tokens] + [V.eos]  # release dataset.py ~154: masks drawn over "u </s>"
            if mask_utts:
                picked = torch.randperm(len(u), generator=g)[:int(cfg.mlm_frac * len(u))].tolist()
                u = [V.mask if i in picked else t for i, t in enumerate(u)]
            ids += s + [V.sty] + u
        return ids

    def dialogue(ep):
        return [t for s, u in zip(ep["styles"], ep["utts"]) for t in s + [V.sty] + u[:cfg.seg_tokens] + [V.eos]]

    def pack(srcs, labels, f):
        src, src_mask = src_batch(srcs, V, cfg.max_src_len)
        dec_in, lab = target_batch([y[:cfg.max_tgt_len] for y in labels], V)
        return {"src": src, "src_mask": src_mask, "feats": f, "dec_in": dec_in, "labels": lab}

    out = {}
    if "mlm" in tasks:  # masked dialogue modelling: reconstruct the whole (unmasked) dialogue
        out["mlm"] = pack([source(ep, mask_utts=True) for ep in eps],
                          [[V.task["mlm"]] + dialogue(ep) for ep in eps], feats)
    if "isp" in tasks:  # image swap: floor(B/2) items get distinct unswapped items' images
        perm = torch.randperm(B, generator=g)  # (release dataset.py image_swapping)
        swapped, kept = perm[:B // 2], perm[B // 2:]
        f = feats.index_copy(0, swapped, feats[kept[:len(swapped)]])  # a copy: feats stays as is
        labels = [[V.task["isp"]] + (V.negative if s else V.positive) + [V.eos]
                  for s in torch.isin(torch.arange(B), swapped).tolist()]
        out["isp"] = pack([source(ep) for ep in eps], labels, f)
    if "mrm" in tasks:  # masked region modelling: zero floor(9 * 0.15) patches (same for the batch)
        n_patch = feats.shape[1]
        idx = torch.randperm(n_patch, generator=g)[:max(1, int(n_patch * cfg.mrm_frac))]
        masked = torch.isin(torch.arange(n_patch), idx)  # (9,) bool
        f = feats.masked_fill(masked[None, :, None], 0)  # (B, 9, D), a copy
        markers = [V.zero if m else V.feat for m in masked.tolist()]
        out["mrm"] = pack([source(ep) for ep in eps], [[V.task["mrm"]] + markers + [V.eos]] * B, f)
        out["mrm"]["mrm_target"] = feats[:, masked].flatten(0, 1)  # (B * n_masked, D), row-major
    if "gcd" in tasks:  # caption generation from the fully masked caption
        out["gcd"] = pack([source(ep, mask_caption=True) for ep in eps],
                          [[V.task["gcd"]] + ep["caption"] + [V.eos] for ep in eps], feats)
    return out


def dialogue_context(ep, k, vocab, cfg):
    """Fine-tune encoder text for target turn k (1-based):
    c </s> s_1 <sty> u_1 </s> ... s_k <sty> </s>."""
    V = vocab
    ids = ep["caption"] + [V.eos] if cfg.use_caption else []
    for j in range(k - 1):
        ids += ep["styles"][j] + [V.sty] + ep["utts"][j][:cfg.seg_tokens] + [V.eos]
    return ids + ep["styles"][k - 1] + [V.sty] + [V.eos]


def finetune_batch(eps, turns, feats, vocab, cfg):
    """Next-utterance batch (paper section 3.3): turns (B,) 1-based target turn of each episode."""
    srcs = [dialogue_context(ep, k, vocab, cfg) for ep, k in zip(eps, turns)]
    labels = [ep["utts"][k - 1] + [vocab.eos] for ep, k in zip(eps, turns)]
    src, src_mask = src_batch(srcs, vocab, cfg.max_src_len)
    dec_in, lab = target_batch(labels, vocab)
    return {"src": src, "src_mask": src_mask, "feats": feats, "dec_in": dec_in, "labels": lab}


def draw_turns(eps, g):
    """Release sampling: a 3-turn dialogue gives a uniformly drawn turn, shorter ones turn 1."""
    k = torch.randint(1, 4, (len(eps),), generator=g)
    n = torch.tensor([len(ep["utts"]) for ep in eps])
    return torch.where(n >= 3, k, torch.ones_like(k)).tolist()


# ================================================================================================ Eval
def generation_kwargs(cfg, lm):
    """Decoding recipe: --flags, or (-1) the backbone's generation config (BlenderBot's own)."""
    gc = lm.generation_config

    def pick(name, default):
        value, saved = getattr(cfg, name), getattr(gc, name, None)
        return value if value >= 0 else (saved if saved is not None else default)
    return dict(num_beams=cfg.num_beams, min_length=cfg.min_length, do_sample=False,
                forced_bos_token_id=None,  # BART may force <s>; our targets begin with the reply
                early_stopping=getattr(gc, "early_stopping", None) or False,  # BlenderBot: unset
                max_length=pick("max_length", 60), length_penalty=pick("length_penalty", 1.0),
                **{k: pick(k, 0) for k in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size")})


@torch.no_grad()
def generate(model, src, src_mask, feats, gen_kw):
    """Beam search from precomputed encoder states (the text ids go along for n-gram blocking)."""
    enc, mask = model.encode(src, src_mask, feats)
    return model.lm.generate(input_ids=src, attention_mask=mask, encoder_outputs=enc, **gen_kw)


@torch.no_grad()
def candidate_scores(model, enc, mask, cands, tok, vocab, cfg):
    """Mean per-token log-likelihood of each candidate (one example), as ParlAI's generator ranks
    (torch_generator_agent.py, rank_eval_label_candidates); a sum would favour short replies."""
    labels = [tok.encode(c, add_special_tokens=False)[:cfg.max_tgt_len - 1] + [vocab.eos] for c in cands]
    dec_in, lab = target_batch(labels, vocab)
    hidden = enc.last_hidden_state.expand(len(cands), -1, -1)  # (C, S, d)
    from transformers.modeling_outputs import BaseModelOutput
    logits = model.lm(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask.expand(
        len(cands), -1), decoder_input_ids=dec_in.to(hidden.device)).logits.float()  # (C, T, V)
    lab = lab.to(hidden.device)
    lp = logits.log_softmax(-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)  # (C, T)
    return (lp * (lab != vocab.pad)).sum(1) / (lab != vocab.pad).sum(1)


@torch.no_grad()
def eval_rows(model, eps, k, feats, tok, vocab, cfg, dev, dtype, gen_kw):
    """Turn k of some episodes: prediction, teacher-forced NLL, the gold's rank among candidates."""
    b = finetune_batch(eps, [k] * len(eps), feats[[ep["row"] for ep in eps]], vocab, cfg)
    b = {n: t.to(dev) for n, t in b.items()}
    with autocast(dev, dtype):
        out = generate(model, b["src"], b["src_mask"], b["feats"], gen_kw)
        enc, mask = model.encode(b["src"], b["src_mask"], b["feats"])
        logits = model.lm(encoder_outputs=enc, attention_mask=mask,
                          decoder_input_ids=b["dec_in"]).logits  # (B, T, V)
    nll = F.cross_entropy(logits.float().transpose(1, 2), b["labels"], ignore_index=vocab.pad,
                          reduction="none").sum(1)  # (B,)
    n_tok = (b["labels"] != vocab.pad).sum(1)
    preds, rows = tok.batch_decode(out, skip_special_tokens=True), []
    for j, ep in enumerate(eps):
        ref = ep["dialog"][k - 1][1]
        row = {"hash": ep["hash"], "turn": k, "reference": ref, "prediction": preds[j], "nll": float(nll[j]),
               "context": tok.decode(b["src"][j], skip_special_tokens=True), "n_tok": int(n_tok[j])}
        cands = ((ep["candidates"] or [None] * 3)[k - 1] or {}).get(str(cfg.num_candidates))
        if cfg.num_candidates and cands:  # rank None: none is the reference for ParlAI (counted)
            row["rank"] = None
        if cfg.num_candidates and cands and any(gold := label_matches(cands, ref)):
            one = type(enc)(last_hidden_state=enc.last_hidden_state[j:j + 1])
            with autocast(dev, dtype):
                sc = candidate_scores(model, one, mask[j:j + 1], cands, tok, vocab, cfg)
            row["rank"] = gold_rank(sc, gold)
        rows.append(row)
    return rows


@torch.no_grad()
def evaluate(model, data, feats, tok, vocab, cfg, dist, dtype, split, run_dir=None, shown=None):
    """Generate every turn k (gold history): F1/BLEU-4/ROUGE-L per turn, their mean IC, PPL, R@k.
    shown: a dict to receive every row as {(episode index, k): row} (the report's dialogues)."""
    model = unwrap(model)
    was_training, gen_kw, results = model.training, generation_kwargs(cfg, model.lm), {}
    model.eval()
    for k in (1, 2, 3):
        items = [i for i, ep in enumerate(data.episodes) if len(ep["utts"]) >= k]
        items = items[:cfg.eval_max] if cfg.eval_max > 0 else items
        if not items:
            continue
        mine, rows = [items[i] for i in shard_indices(len(items), dist)], []
        for s in progress(range(0, len(mine), cfg.eval_batch), dist.is_main, desc=f"turn {k}"):
            eps = [data.episodes[i] for i in mine[s:s + cfg.eval_batch]]
            rows += eval_rows(model, eps, k, feats, tok, vocab, cfg, dist.device, dtype, gen_kw)
        rows = [r for part in all_gather_object(rows) for r in part]  # shards in rank order
        results.update({f"turn{k}/{name}": v for name, v in turn_scores(rows, tok, cfg).items()})
        if shown is not None:
            shown.update(zip([(i, k) for i in items], rows))
        if run_dir and dist.is_main:
            write_predictions(run_dir, split, k, rows)
    for name in ("F1", "BLEU-4", "ROUGE-L", "PPL", "word_F1", "MRR",
                 *(f"R@{n}/{cfg.num_candidates}" for n in (1, 5, 10))):
        vals = [results[f"turn{k}/{name}"] for k in (1, 2, 3) if f"turn{k}/{name}" in results]
        if vals:
            results[f"IC/{name}"] = float(np.mean(vals))
    model.train(was_training)
    return results


# ================================================================================================ Train
def onecycle(step, total, cfg, per_epoch):
    """(lr, AdamW beta1) at optimizer step `step` of the release's OneCycleLR (model_blender_bot.py:
    linear, div 25, final div 1e4, beta1 0.95 at the ends, 0.85 at the peak); --legacy_lr: stepped once
    an epoch (Lightning's default) over `total` = epochs x (N // batch + 1), batch = the release's
    loader batch: 16 warm-up (pretrain_preprocessing.py), 64 fine-tuning (training_ablation.py)."""
    step = step // per_epoch if cfg.legacy_lr else step  # release: stepped once per epoch
    init, up = cfg.lr / 25, cfg.pct_start * total - 1
    if step <= up:
        return init + (cfg.lr - init) * step / up, (0.85 - 0.95) * (step / up) + 0.95
    span = max(total - 1 - up, 1e-8)  # the second phase, down to lr / 25e4
    lr = cfg.lr + (init / 1e4 - cfg.lr) * (step - up) / span
    return lr, (0.95 - 0.85) * ((step - up) / span) + 0.85


def read_checkpoint(path, flag, kinds, peek=False):
    """A checkpoint of this script (of one of `kinds`), or a one-line error naming what it is."""
    ck = peek_checkpoint(path) if peek else load_checkpoint(path)  # peek: memory-mapped
    expect_checkpoint(ck, path, SCRIPT, kinds, flag=flag)
    return ck


def setup(cfg, log):
    """Features and captions a run reads, the model (with --init's weights) and its tokenizer."""
    init = read_checkpoint(cfg.init, "--init", ("warmup", "finetune")) if cfg.init else None
    index, feats = run_features(cfg, log)  # one zero row for --use_image false without a cache
    caps = run_captions(cfg)
    seed_everything(cfg.seed)  # identical fresh initialisation on every rank
    model, tok, vocab = build_model(cfg, feats.shape[-1], feats.shape[1])
    if init is not None:
        model.load_state_dict(init["model"])
        log.info(f"loaded {cfg.init} ({init.get('kind', '?')}, step {init.get('step')})")
    return index, feats, caps, model, tok, vocab


def run_training(cfg, dist, log, dtype):
    """--mode warmup | finetune: AdamW + OneCycle, gradient accumulation, DDP, exact resume."""
    warm, dev, world = cfg.mode == "warmup", dist.device, dist.world_size
    resume = read_checkpoint(cfg.resume, "--resume", (cfg.mode,)) if cfg.resume else None
    if resume is not None:
        check_resume_config(resume.get("config"), asdict_config(cfg), cfg.resume_changes, log.info, RESUME_FREE_ICW)
    index, feats, caps, model, tok, vocab = setup(cfg, log)
    train = load_split(cfg, "train", tok, index, caps, log, keep_candidates=False)
    active = task_list(cfg) if warm else ["ft"]
    model.mrm_head.requires_grad_("mrm" in active)  # unused parameters stay out of DDP and AdamW
    nn.ModuleList([model.img_proj, model.img_norm]).requires_grad_(cfg.use_image)
    model.to(dev).train()
    ddp = wrap_ddp(torch.compile(model) if cfg.compile else model, dist)  # `model`: plain names
    scaler, params = make_scaler(dtype), [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)  # decay on all (release)

    # items: (episode, turn); turn 0 = drawn per batch (release), --all_turns expands every turn
    items = [(i, k + 1) for i, ep in enumerate(train.episodes) for k in range(len(ep["utts"]))] \
        if not warm and cfg.all_turns else [(i, 0) for i in range(len(train))]
    G, m = (cfg.warmup_batch, cfg.warmup_micro) if warm else (cfg.ft_batch, cfg.ft_micro)
    sampler = StepSampler(len(items), G, m, world, dist.rank, cfg.seed)
    accum, per_epoch = sampler.accum, sampler.steps_per_epoch
    epochs = cfg.warmup_epochs if warm else cfg.ft_epochs
    total = cfg.max_steps or math.ceil(epochs * per_epoch)
    cycle = math.ceil(epochs * (len(train) // (16 if warm else 64) + 1)) if cfg.legacy_lr else total  # onecycle(): release batches
    log.info(f"{cfg.mode}: {len(items)} examples, global batch {G} = micro {m} x accumulation "
             f"{accum} x world {world}, {per_epoch} steps/epoch, {total} steps, tasks {active}")

    def micro_batch(step, a, rows):
        """Micro step a of `step` on this rank; its draws are fixed by (seed, step, micro-batch)."""
        g = torch.Generator().manual_seed(mix(cfg.seed, step, a * world + dist.rank, 1))
        eps = [train.episodes[items[i][0]] for _, i in rows]
        f = feats[[ep["row"] for ep in eps]]  # (m, 9, D)
        if warm:
            tasks = warmup_batch(eps, f, vocab, cfg, g)
        else:
            turns = [items[i][1] or k for (_, i), k in zip(rows, draw_turns(eps, g))]
            tasks = {"ft": finetune_batch(eps, turns, f, vocab, cfg)}
        pin = dev.type == "cuda"  # page-locked memory: asynchronous copies, behind the compute
        copy = lambda x: (x.pin_memory() if pin else x).to(dev, non_blocking=pin)  # noqa: E731
        return {t: {n: copy(x) for n, x in b.items()} for t, b in tasks.items()}

    def step_data(step):  # this rank's micro-batches of `step`, on the device
        return [micro_batch(step, a, rows) for a, rows in enumerate(sampler.micro_batches(step))]

    def train_step(step, micro_batches):
        lr, b1 = onecycle(step, cycle, cfg, per_epoch)
        for g in opt.param_groups:  # beta1 as the release's scheduler sets it (--cycle_momentum)
            g["lr"], g["betas"] = lr, (b1 if cfg.cycle_momentum else g["betas"][0], g["betas"][1])
        sums, n_flop = {}, 0
        for a, tasks in enumerate(micro_batches):
            torch.manual_seed(mix(cfg.seed, step, a * world + dist.rank, 2))  # dropout masks too
            with ddp.no_sync() if world > 1 and a < accum - 1 else nullcontext():
                with autocast(dev, dtype):
                    terms = ddp(tasks)
                loss = sum((cfg.task_weight if warm else 1.0) * terms[t] for t in active)
                scaler.scale(loss / accum).backward()
            for k, v in {"loss": loss, **terms}.items():  # tensors: no host sync per micro-batch
                sums[k] = sums.get(k, 0) + v.detach() / accum
            n_flop += flops(tasks.values())
        gnorm = optimizer_update(opt, scaler, params, cfg.grad_clip, step, sums)  # stops on NaN/inf
        return sums, lr, gnorm, n_flop * world  # sums: this rank's terms, read when logged

    # MFU: 6 x params x tokens (arXiv 2001.08361, 2.1); a source token passes encoder + cross-attn K/V, a target the rest
    n_src = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and re.search(
        r"^img_|^lm\.(model\.)?encoder\.|encoder_attn\.[kv]_proj\.|EncDecAttention\.[kv]\.", n))
    n_tgt, n_img = sum(p.numel() for p in params) - n_src, model.n_img * cfg.use_image
    flops = lambda micro_batches: 6 * sum(n_src * (b["src"].numel() + n_img * len(b["src"]))
                                          + n_tgt * b["dec_in"].numel() for b in micro_batches)
    if cfg.bench:  # the data (a step's micro-batches, built and copied) timed apart from the step
        steps, mb = iter(range(10 ** 9)), micro_batch(0, 0, sampler.micro_batches(0)[0])
        return run_bench(lambda mbs: train_step(0, mbs), cfg.bench, G, dev, world_size=world,
                         flops_per_step=flops(mb.values()) * accum * world, data_fn=lambda: step_data(next(steps)))

    start, best, epoch_sum, epoch_n = 0, None, 0.0, 0
    if resume is not None:
        for obj, key in ((model, "model"), (opt, "optimizer"), (scaler, "scaler")):
            obj.load_state_dict(resume[key])
        set_rng_state(resume["rng"], dist.rank)  # this rank's own generators
        start, best, pos = resume["step"], resume.get("best"), resume["data_position"]
        epoch_sum, epoch_n = pos["epoch_sum"], pos["epoch_n"]  # all ranks' mean
        log.info(f"resumed from {cfg.resume} at step {start}")
        log.resumed(start)

    def save(name, step):
        rngs = all_gather_object(rng_state())  # each rank's generators: a resume gives each its own
        pos = {"step": step, "epoch": step // per_epoch, "epoch_n": epoch_n, "epoch_sum": float(
            all_reduce_mean(torch.as_tensor(epoch_sum, dtype=torch.float64, device=dev)))}
        if dist.is_main:
            save_checkpoint(os.path.join(cfg.out_dir, name), {
                "script": SCRIPT, "kind": cfg.mode, "model": model.state_dict(), "step": step,
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                "config": asdict_config(cfg), "best": best, "data_position": pos})
        barrier()

    sel, every = selection(cfg), per_epoch if cfg.eval_every < 0 else cfg.eval_every
    select = load_split(cfg, cfg.select_on, tok, index, caps, log, False) if sel else None
    end = min(total, start + cfg.stop_after) if cfg.stop_after else total
    timer, logged = StepTimer(dev), {}
    for step in range(start, end):
        timer.start()
        terms, lr, gnorm, step_flops = train_step(step, step_data(step))
        speed = timer.stop(G)
        if (u := mfu(step_flops, speed["ms_step"] / 1000, dev, world, dtype)) is not None:
            speed["mfu"] = u  # the global batch's FLOPs, over the peak of all `world` GPUs
        # warm-up choice: lowest epoch-mean MLM loss (summed loss without mlm; release: last batch's)
        epoch_sum, epoch_n = epoch_sum + terms.get("mlm", terms["loss"]).double(), epoch_n + 1
        if warm and ((step + 1) % per_epoch == 0 or step + 1 == total):
            mean, epoch_sum, epoch_n = float(all_reduce_mean(epoch_sum)) / epoch_n, 0.0, 0
            if best is None or mean < best:
                best = mean
                save("best.pt", step + 1)
        if select is not None and ((step + 1) % every == 0 or step + 1 == total):
            score = evaluate(model, select, feats, tok, vocab, cfg, dist, dtype, cfg.select_on)[sel[0]]
            log.log(step + 1, **{f"{cfg.select_on}/{sel[0].replace('/', '_')}": score})  # a curve
            if best is None or score > best:
                best = score
                save("best.pt", step + 1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:  # the mean over ranks
            logged = {k: float(all_reduce_mean(v)) for k, v in terms.items()}
            log.log(step + 1, **logged, lr=lr, grad_norm=gnorm, **speed)
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            save("last.pt", step + 1)
    metrics = {"final_loss": logged.get("loss", float("nan")), "steps": end,
               **{f"train/{k}": v for k, v in logged.items()}}
    if end < total:
        log.info(f"stopped after step {end} of {total} (--stop_after); continue with "
                 f"--resume {cfg.out_dir}/last.pt")
    elif not warm and cfg.final_eval:
        if select and (w := selected_weights(best, cfg.out_dir, cfg.resume, log)) is not None:
            model.load_state_dict(w)  # best.pt of the best score, else the last weights (logged)
        return {**metrics, **run_eval(cfg, dist, log, dtype, (index, feats, caps, model, tok, vocab), end)}
    write_report(cfg, dist.is_main, log)
    return metrics


def run_eval(cfg, dist, log, dtype, trained=None, step=0):
    """--mode eval, or a fine-tuning's final evaluation (trained: its setup() with the trained model), on
    --eval_split; written to the run directory, the log and the report."""
    index, feats, caps, model, tok, vocab = trained or setup(cfg, log)
    if not (trained or cfg.init):
        log.info("no --init: evaluating the untrained multimodal model")
    data = load_split(cfg, cfg.eval_split, tok, index, caps, log, keep_candidates=True)
    shown, start = {}, time.perf_counter()  # shown: the rows the report's dialogues show
    res = evaluate(model.to(dist.device), data, feats, tok, vocab, cfg, dist, dtype, cfg.eval_split,
                   cfg.out_dir, shown)
    log.log(step, **{k: v for k, v in res.items() if k.startswith("IC/") or k.endswith("/no_gold")})
    log.info(results_table(res))
    write_report(cfg, dist.is_main, log, time.perf_counter() - start, res, data.episodes, shown)
    return res


def run_chat(cfg, dist, log, dtype):
    """--mode chat (ParlAI's interactive script; ParlAI issue #4260): talk with the --init model
    about --image.  Each stdin line is a user turn; the reply is generated as eval generates a turn
    (finetune_batch's dialogue_context over the whole history) and printed.  Empty line/EOF ends."""
    if not cfg.init:
        raise ValueError("--mode chat needs --init: a warmup or finetune checkpoint of this script")
    style, user = chat_styles(cfg.data_dir, cfg.style, cfg.user_style)  # known personalities only
    ck, dev = read_checkpoint(cfg.init, "--init", ("warmup", "finetune")), dist.device
    feats, caption = chat_image(cfg, cfg.image, dev, dtype, log)
    model, tok, vocab = build_model(cfg, feats.shape[-1], feats.shape[1])
    model.to(dev).eval().load_state_dict(ck["model"])
    gen_kw, turns = generation_kwargs(cfg, model.lm), []
    enc = lambda s, n: tok.encode(s, add_special_tokens=False)[:n]  # noqa: E731 (as Encoded)
    ep = {"caption": enc(caption or "", cfg.seg_tokens), "styles": [], "utts": []}
    log.info(f"chat as {style!r} about {cfg.image} (caption {caption!r}); an empty line ends")
    for line in map(str.strip, sys.stdin):
        if not line:
            break
        ep["styles"] += [enc(user, cfg.seg_tokens), enc(style, cfg.seg_tokens)]
        ep["utts"] += [enc(line, cfg.max_tgt_len - 1), []]  # the reply's turn: style <sty> </s>
        b = finetune_batch([ep], [len(ep["utts"])], feats, vocab, cfg)
        with autocast(dev, dtype):
            out = generate(model, *(b[n].to(dev) for n in ("src", "src_mask", "feats")), gen_kw)
        reply = tok.decode(out[0], skip_special_tokens=True).strip()
        ep["utts"][-1] = enc(reply, cfg.max_tgt_len - 1)
        print(f"[{style}]: {reply}", flush=True)
        turns.append({"user": line, "reply": reply, "context": b["src"][0].tolist()})
    return {"style": style, "caption": caption, "turns": turns}


def params_mode(cfg, log):
    """Parameters of the trained parts and the frozen CLIP (crop features), built on the meta device from the
    published configs (no weights, no network); FLOPs of one example's forward + backward at the length
    limits (image block + max_src_len, max_tgt_len tokens; a warm-up step: one per task)."""
    from transformers import CLIPModel
    clip = hf_model(CLIPModel, cfg.clip, meta=True)
    with torch.device("meta"):
        model = build_model(cfg, clip.config.projection_dim, cfg.grid ** 2, meta=True)[0]
    out = {f"params_{k}": count_params(getattr(model, k)) for k in "lm img_proj img_norm segment mrm_head".split()}
    out.update(trainable=count_params(model), frozen_clip=count_params([clip.vision_model, clip.visual_projection]))
    model.lm.set_attn_implementation("eager")  # sdpa's mask check reads values, which meta tensors lack
    src = torch.zeros(1, model.n_img * cfg.use_image + cfg.max_src_len, model.lm.config.d_model, device="meta")
    tgt = torch.zeros(1, cfg.max_tgt_len, dtype=torch.long, device="meta")
    out["gflops_example"] = count_flops(lambda: model.lm(inputs_embeds=src, decoder_input_ids=tgt).logits.sum()
                                        .backward()) / 1e9
    log.info(counts_table(out))
    return out


# ================================================================================================ main
def main(argv=None):
    cfg = check_choices(parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[0]))
    if cfg.mode == "params":  # offline: hub names from common.hf's table, the toy's folders
        return params_mode(resolve_paths(cfg) or cfg, Logger("", True))
    dist = setup_distributed(cfg.device)
    try:
        log = Logger(cfg.out_dir, dist.is_main)
        if p := {"warmup": "warmup", "finetune": "ft"}.get(cfg.mode):  # before any data or model,
            fit_micro(cfg, dist.world_size, log.info, f"{p}_batch", f"{p}_micro")  # the micro run
        if cfg.init and cfg.mode in ("eval", "chat"):  # the model --init trained, but flags given
            as_trained(cfg, read_checkpoint(cfg.init, "--init", ("warmup", "finetune"), True),
                       given_flags(argv), log)
        resolve_paths(cfg, dist.is_main)  # after as_trained: --use_image decides what eval reads
        dtype = pick_dtype(dist.device, cfg.precision)
        if dist.is_main:
            save_config(cfg, cfg.out_dir)
        log.info(f"{SCRIPT} --mode {cfg.mode} | world {dist.world_size} | {dist.device} | {dtype}\n"
                 + format_config(cfg))
        log.info("choices: " + "; ".join(f"{k}: {v}" for k, v in deviations(cfg).items()))
        seed_everything(cfg.seed)
        metrics = {"features": prepare_features, "captions": prepare_captions, "eval": run_eval,
                   "chat": run_chat}.get(cfg.mode, run_training)(cfg, dist, log, dtype)
        if dist.is_main:
            with open(os.path.join(cfg.out_dir, "final_metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
        return metrics
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
