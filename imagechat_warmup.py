"""Image-Chat dialogue with vision-language warm-up tasks (VLAW-MDM).

Lee, Park, Park, Kim, Kim, "A Framework for Vision-Language Warm-up Tasks in Multimodal Dialogue Models"
(EMNLP 2023; release github.com/BeneciaLee/VLAW-MDM) on Image-Chat (Shuster et al., ACL 2020, arXiv 1811.00945).
A text encoder-decoder (BlenderBot-400M-distill in the paper, the toy world's T5 here) reads an *image block*
`<img> V_1..V_9 </img>` - nine CLIP ViT-B/32 embeddings of a 3x3 grid of crops, each projected to d_model with
Linear+LayerNorm - followed by the text `caption </s> style <sty> utterance </s> ...`; a learned segment
embedding tells image slots (0) from text (1). Before fine-tuning on next-utterance generation the model is
"warmed up" on Image-Chat itself with four tasks that all run on every batch (paper section 3.4):
masked dialogue modelling (MLM), image swap prediction (ISP), masked region modelling (MRM, KL to the masked
patch's CLIP feature) and caption generation from a masked caption (GCD). Generation losses are
MLE + unlikelihood (Welleck et al. 2020), summed over tokens. The caption is the top beam of a BLIP-2 captioner.

Stages (`--mode`), run in this order, all reading the Image-Chat JSON files as published:
    features   CLIP features of every image (3x3 crops), cached by image hash; resumable
    captions   BLIP-2 captions of every image, cached by image hash (JSONL + release-style JSON); resumable
    warmup     the four warm-up tasks (`--tasks mlm,isp,mrm,gcd`, any subset = the paper's ablation)
    finetune   next-utterance generation (`--init` a warm-up checkpoint, or none = "w/o warm-up"), then eval
    eval       beam search on each turn; F1 / BLEU-4 / ROUGE-L per turn and their mean "IC", PPL, R@1/100

Toy world (CPU, minutes; the captioner is a BLIP-2-format folder, e.g. blip2_pformer.py's export):
    python imagechat_warmup.py --mode features
    python imagechat_warmup.py --mode captions --captioner runs/blip2_pformer/export
    python imagechat_warmup.py --mode warmup --out_dir runs/icw_toy/warmup
    python imagechat_warmup.py --mode finetune --init runs/icw_toy/warmup/last.pt --out_dir runs/icw_toy/ft
    python imagechat_warmup.py --mode eval --init runs/icw_toy/ft/last.pt --out_dir runs/icw_toy/eval
One GPU, paper recipe (local copies of the hub folders named in PRESETS["paper"], Image-Chat in data/image_chat):
    python imagechat_warmup.py --preset paper --mode features
    python imagechat_warmup.py --preset paper --mode captions
    python imagechat_warmup.py --preset paper --mode warmup --out_dir runs/icw/warmup
    python imagechat_warmup.py --preset paper --mode finetune --init runs/icw/warmup/best.pt --out_dir runs/icw/ft
BART-base variant (paper App. B): --backbone facebook/bart-base --warmup_epochs 10 --warmup_batch 64
    --warmup_micro 32 --ft_epochs 7 --ft_batch 256 --ft_micro 64.  Caption-free variant (paper Table 4):
    --use_caption false --tasks mlm,isp,mrm.
Multi-node (same code path; global batch fixed, accumulation = global / (micro * world)):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HOST:29500 \
        imagechat_warmup.py --preset paper --mode warmup --out_dir runs/icw/warmup

Reproduces the paper's Table 3 ablation (none / MLM / +ISP / +MRM / +GCD warm-up, F1/BLEU-4/ROUGE-L per turn).
Where the release code differs from the paper the default follows the paper and a flag gives the release
behaviour (printed at start-up): --legacy_lr, --untied_head, --share_pos, --ul_per_sequence (default = release),
--select_on test. Image-Chat images that no longer exist are skipped and counted, never replaced by zeros.
"""
import json
import math
import os
import re
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common.amp import autocast, frozen_dtype, make_scaler, pick_dtype, seed_everything
from common.checkpoint import load_checkpoint, restore, rng_state, save_checkpoint, set_rng_state
from common.config import asdict_config, format_config, parse_config, save_config
from common.data import DataError
from common.dist import (all_gather_object, all_reduce_mean, barrier, cleanup_distributed, setup_distributed,
                         shard_indices, unwrap, wrap_ddp)
from common.image import CLIP_MEAN, CLIP_STD, load_image
from common.log import Logger, progress
from common.train import StepTimer, check_finite, clip_grad, mfu, param_groups, run_bench, set_lr


# ============================================================================ Config
@dataclass
class Config:
    preset: str = "toy"
    mode: str = "finetune"          # features | captions | warmup | finetune | eval
    out_dir: str = "runs/icw_toy/run"
    toy_root: str = "data/toy"
    seed: int = 428                 # paper App. B
    device: str = "auto"
    precision: str = "auto"         # bf16 on GPU (the paper used fp16 AMP), fp32 on CPU
    bench: int = 0
    resume: str = ""
    init: str = ""                  # model weights to start from (warm-up result for finetune, model for eval)
    # ---- data and local model folders ("" = inside toy_root for the toy preset)
    data_dir: str = ""              # train.json / valid.json / test.json as published
    image_root: str = ""            # <image_hash>.jpg
    cache_dir: str = "runs/icw_toy/cache"   # features/ and captions.jsonl, keyed by image hash
    clip: str = ""
    captioner: str = ""             # BLIP-2 (Blip2ForConditionalGeneration) folder
    backbone: str = ""              # encoder-decoder (BlenderBot / BART / T5) folder
    blank_images: bool = False      # all-zero CLIP features (the blank-image baseline / diagnostic)
    max_missing_frac: float = 0.05  # more episodes without image/feature/caption than this -> error
    stop_after: int = 0             # stop after N training steps / N new images (checkpointed; rerun continues)
    # ---- features / captions (paper section 3.2, release clip_feature_extraction.py / captioning_blip2-*.py)
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
    max_positions: int = 256        # learned position tables are extended to this (BlenderBot ships 128)
    share_pos: bool = False         # release: the decoder reuses the encoder's extended table
    untied_head: bool = False       # release: a fresh random LM head instead of the tied embedding
    seg_tokens: int = 40            # truncation of caption / history utterances (release truncation_max_length)
    max_src_len: int = 256
    max_tgt_len: int = 254          # target incl. its final </s>
    # ---- warm-up tasks (paper section 3.4)
    tasks: str = "mlm,isp,mrm,gcd"
    mlm_frac: float = 0.2           # floor(0.2 * len) tokens of every utterance masked
    mrm_frac: float = 0.15          # floor(9 * 0.15) = 1 patch zeroed
    task_weight: float = 1.0        # lambda_1..4 (release: 0.25 = 1/|tasks|)
    ul_alpha: float = 1.0
    ul_per_sequence: bool = False   # False = release: unlikelihood candidates over the flattened batch
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
    legacy_lr: bool = False         # release: scheduler stepped per epoch -> constant lr / 25
    grad_clip: float = 0.0
    all_turns: bool = False         # release: one example per dialogue per epoch, turn drawn at random
    log_every: int = 20
    save_every: int = 500
    # ---- evaluation and decoding (paper section 4; -1 = take it from the backbone's generation config)
    select_on: str = "valid"        # valid | test (release) | none: split for choosing the fine-tune checkpoint
    eval_every: int = 0             # steps between model-selection evaluations (0 = keep the last weights)
    eval_split: str = "test"
    final_eval: bool = True
    eval_batch: int = 32            # also the unit of the paper's batch-averaged metrics
    eval_max: int = 0               # at most N examples per turn (0 = all)
    num_candidates: int = 100       # R@1/100 over the published candidate lists (0 = skip)
    num_beams: int = 10
    min_length: int = 20
    max_length: int = -1
    length_penalty: float = -1.0
    no_repeat_ngram_size: int = -1
    encoder_no_repeat_ngram_size: int = -1


PRESETS = {
    "toy": dict(warmup_epochs=6, warmup_batch=32, warmup_micro=16, ft_epochs=6, ft_batch=32, ft_micro=16,
                lr=1e-3, num_beams=4, min_length=1, max_length=24, length_penalty=1.0, no_repeat_ngram_size=3,
                encoder_no_repeat_ngram_size=0, eval_batch=32, log_every=10, save_every=200, num_candidates=100),
    "paper": dict(out_dir="runs/icw/run", cache_dir="runs/icw/cache", data_dir="data/image_chat",
                  image_root="data/image_chat/images", clip="openai/clip-vit-base-patch32",
                  captioner="Salesforce/blip2-opt-2.7b-coco", backbone="facebook/blenderbot-400M-distill",
                  num_beams=10, min_length=20),
}
TASKS = ("mlm", "isp", "mrm", "gcd")


def resolve_paths(cfg):
    """Fill empty data/model paths from the toy world (toy preset) and check the choices."""
    if cfg.mode == "evaluate":
        cfg.mode = "eval"
    if cfg.mode not in ("features", "captions", "warmup", "finetune", "eval"):
        raise ValueError(f"--mode must be features|captions|warmup|finetune|eval, got {cfg.mode!r}")
    root = cfg.toy_root
    cfg.data_dir = cfg.data_dir or os.path.join(root, "image_chat")
    cfg.image_root = cfg.image_root or os.path.join(cfg.data_dir, "images")
    cfg.clip = cfg.clip or os.path.join(root, "models", "clip")
    cfg.backbone = cfg.backbone or os.path.join(root, "models", "t5")
    bad = set(task_list(cfg)) - set(TASKS)
    if bad:
        raise ValueError(f"unknown warm-up tasks {sorted(bad)}; choose from {TASKS}")
    if "gcd" in task_list(cfg) and cfg.mode == "warmup" and not cfg.use_caption:
        raise ValueError("task gcd needs captions (--use_caption true)")
    if ("isp" in task_list(cfg) or "mrm" in task_list(cfg)) and cfg.mode == "warmup" and not cfg.use_image:
        raise ValueError("tasks isp and mrm need the image (--use_image true)")
    return cfg


def needs_toy_world(cfg):
    """True when a path this mode reads lies inside the toy world (which is then built on first use)."""
    paths = {"features": [cfg.data_dir, cfg.clip], "captions": [cfg.data_dir]}.get(cfg.mode,
                                                                                   [cfg.data_dir, cfg.backbone])
    root = os.path.abspath(cfg.toy_root)
    return cfg.preset == "toy" and any(os.path.abspath(p).startswith(root + os.sep) for p in paths)


def task_list(cfg):
    return [t for t in cfg.tasks.split(",") if t]


def deviations(cfg):
    """The release-vs-paper choices in force (section 9 of the spec), printed at start-up."""
    return {"lr schedule": "constant lr/25 (release)" if cfg.legacy_lr else "OneCycle over optimizer steps (paper)",
            "lm head": "fresh untied Linear (release)" if cfg.untied_head else "tied to token embedding",
            "decoder positions": "shared with encoder (release)" if cfg.share_pos else "own extended table",
            "unlikelihood candidates": "per sequence" if cfg.ul_per_sequence else "flattened batch (release)",
            "ISP target": "<cid> positive|negative </s> (paper; release leaks the answer)",
            "model selection": {"test": "test split (release)", "valid": "valid split"}.get(cfg.select_on, "last"),
            "turn-2 style": "s_2 (release trains with s_1)", "features/captions": "keyed by image hash"}


# ============================================================================ Model
NEW_TOKENS = ["<img>", "</img>", "<mlm>", "<cid>", "<mrm>", "<gcd>", "<sty>", "<feat>", "<zero>"]


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
    """Backbone tokenizer + the 9 new tokens (+ <mask> when missing, + ISP answer words when unknown)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.mask_token is None:
        tok.add_special_tokens({"mask_token": "<mask>"})
    tok.add_tokens(NEW_TOKENS)
    for word in ("positive", "negative"):
        if tok.unk_token_id is not None and tok.unk_token_id in tok.encode(word, add_special_tokens=False):
            tok.add_tokens([word])
    return tok


def make_vocab(tok, lm_config):
    ids = dict(zip(NEW_TOKENS, tok.convert_tokens_to_ids(NEW_TOKENS)))
    start = lm_config.decoder_start_token_id
    return Vocab(pad=tok.pad_token_id, eos=tok.eos_token_id, bos=tok.bos_token_id,
                 start=tok.pad_token_id if start is None else start, mask=tok.mask_token_id,
                 img=ids["<img>"], img_end=ids["</img>"], sty=ids["<sty>"], feat=ids["<feat>"], zero=ids["<zero>"],
                 task={"mlm": ids["<mlm>"], "isp": ids["<cid>"], "mrm": ids["<mrm>"], "gcd": ids["<gcd>"]},
                 positive=tok.encode("positive", add_special_tokens=False),
                 negative=tok.encode("negative", add_special_tokens=False))


class Positions(nn.Module):
    """Learned position table for BlenderBot/BART-style models, called like their own position module.

    Encoder (`n_prefix` = 11): the image block gets no position; text positions restart at 0 (spec section 5).
    Decoder (`n_prefix` = 0): plain positions (+ the generation cache offset).  Returns (1, L, d).
    """

    def __init__(self, weight, n_prefix=0):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.n_prefix = n_prefix

    def forward(self, shape_or_ids, past_key_values_length=0, position_ids=None):
        length = shape_or_ids.shape[1] if torch.is_tensor(shape_or_ids) else shape_or_ids[1]
        if position_ids is not None:  # (L,) or (B, L) given by the caller
            out = self.weight[position_ids]
            return out if out.dim() == 3 else out.unsqueeze(0)
        n_text = length - self.n_prefix
        if past_key_values_length + n_text > self.weight.shape[0]:  # transformers #18433: fail clearly
            raise ValueError(f"sequence of {past_key_values_length + n_text} tokens exceeds the position table "
                             f"({self.weight.shape[0]}); lower --max_src_len/--max_tgt_len or raise --max_positions")
        text = self.weight[past_key_values_length:past_key_values_length + n_text]  # (L_text, d)
        prefix = text.new_zeros(self.n_prefix, text.shape[1])
        return torch.cat([prefix, text], 0).unsqueeze(0)  # (1, L, d)


def extended_table(module, n):
    """Rows of a learned position table (BART's 2-row offset dropped), extended to n rows.

    The release fills every new row with P[last] + P[0] (its index arithmetic collapses to the last row).
    """
    old = module.weight.data[getattr(module, "offset", 0):]  # (n_old, d)
    if n <= old.shape[0]:
        return old.clone()
    extra = (old[-1] + old[0]).expand(n - old.shape[0], -1)
    return torch.cat([old, extra], 0)


class ImageChatModel(nn.Module):
    """transformers encoder-decoder + image projection, segment embedding and MRM head.

    forward(tasks) runs every task's batch and returns its loss terms, so DDP sees one forward per step.
    """

    def __init__(self, lm, vocab, feat_dim, n_patches=9, use_image=True, max_positions=256, share_pos=False,
                 untied_head=False, ul_alpha=1.0, ul_per_sequence=False):
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
        if hasattr(enc, "embed_positions"):       # BlenderBot / BART: learned absolute positions (T5: relative)
            enc_table = nn.Parameter(extended_table(enc.embed_positions, max_positions))
            dec_table = enc_table if share_pos else nn.Parameter(extended_table(dec.embed_positions, max_positions))
            enc.embed_positions = Positions(enc_table, self.n_img if use_image else 0)
            dec.embed_positions = Positions(dec_table, 0)
        if untied_head:
            lm.config.tie_word_embeddings = False
            lm.lm_head = nn.Linear(d, lm.config.vocab_size, bias=False)

    def embed(self, src, src_mask, feats):
        """Encoder input embeddings [image block ; text] + segments.  src (B, L), feats (B, 9, D) -> (B, 11+L, d)."""
        emb = self.lm.get_input_embeddings()
        x = emb(src)  # (B, L, d), x sqrt(d) for BlenderBot (scale_embedding)
        if not self.use_image:
            return x + self.segment.weight[1], src_mask
        B = src.shape[0]
        v = self.img_norm(self.img_proj(feats.to(x.dtype)))  # (B, 9, d)
        w = emb.weight  # <img>, </img> rows unscaled, as the release (spec section 5)
        img = torch.cat([w[self.vocab.img].expand(B, 1, -1), v, w[self.vocab.img_end].expand(B, 1, -1)], 1)
        x = torch.cat([img + self.segment.weight[0], x + self.segment.weight[1]], 1)  # (B, 11+L, d)
        mask = torch.cat([src_mask.new_ones(B, self.n_img), src_mask], 1)  # image slots always visible
        return x, mask

    def encode(self, src, src_mask, feats):
        x, mask = self.embed(src, src_mask, feats)
        return self.lm.get_encoder()(inputs_embeds=x, attention_mask=mask), mask

    def forward(self, tasks):
        """tasks: {name: batch dict} -> {loss term: scalar}.  name in mlm|isp|mrm|gcd|ft."""
        out = {}
        for name, b in tasks.items():
            enc, mask = self.encode(b["src"], b["src_mask"], b["feats"])
            res = self.lm(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=b["dec_in"],
                          output_hidden_states=name == "mrm")
            if name in ("mlm", "gcd", "ft"):
                mle, ul = mle_ul_loss(res.logits, b["labels"], self.vocab.pad, self.ul_per_sequence)
                out[name] = mle + self.ul_alpha * ul
                out[name + "_mle"], out[name + "_ul"] = mle.detach(), ul.detach()
            elif name == "isp":
                out["isp"] = token_ce(res.logits, b["labels"], self.vocab.pad)
            else:  # mrm: decoder states at the positions whose input marker is <zero>
                h = res.decoder_hidden_states[-1][b["dec_in"] == self.vocab.zero]  # (M, d), row-major = patch order
                out["mrm"] = mrm_kl_loss(self.mrm_head(h), b["mrm_target"])
        return out


def build_model(cfg, feat_dim, n_patches):
    """Backbone from its local folder, tokenizer with the new tokens, image modules freshly initialised."""
    from transformers import AutoModelForSeq2SeqLM
    tok = load_tokenizer(cfg.backbone)
    lm = AutoModelForSeq2SeqLM.from_pretrained(cfg.backbone, local_files_only=True)
    lm.resize_token_embeddings(len(tok))
    vocab = make_vocab(tok, lm.config)
    model = ImageChatModel(lm, vocab, feat_dim, n_patches, cfg.use_image, cfg.max_positions, cfg.share_pos,
                           cfg.untied_head, cfg.ul_alpha, cfg.ul_per_sequence)
    return model, tok, vocab


# ============================================================================ Losses
def mle_ul_loss(logits, labels, pad, per_sequence=False):
    """Token-summed MLE and unlikelihood (Welleck et al. 2020) terms; paper eq. for MLM/GCD and fine-tuning.

    logits (B, T, V), labels (B, T) with `pad` after each target.  Returns (mle, ul), both sums.
    UL at step t penalises -log(1 - p(c)) for every candidate c in C_t = tokens at earlier target positions, minus
    y_t.  Release behaviour (per_sequence=False): the batch is flattened first, so C_t also holds earlier examples'
    tokens and pads, and pad positions get the UL term.  per_sequence=True: C_t from the own sequence, no pads.
    """
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
    # first[b, v] = first position where token v occurs in sequence b (L if never): C_t = {v : first[v] < t}
    first = torch.full((n, V), L, dtype=torch.long, device=seq.device)
    first = first.scatter_reduce(1, seq, pos.expand(n, L), reduce="amin")
    cand = first.unsqueeze(1) < pos.view(1, L, 1)                            # (n, L, V)
    cand = cand.scatter(2, seq.unsqueeze(-1), False)                         # minus y_t itself
    if per_sequence:
        cand[..., pad] = False
    ul = -(lp.log() * cand * pos_ok.unsqueeze(-1)).sum()
    return mle, ul


def token_ce(logits, labels, pad):
    """Mean token cross-entropy over non-pad positions (ISP).  logits (B, T, V), labels (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=pad)


def mrm_kl_loss(pred, target):
    """(1/|M|) sum_r KL(softmax(v_r) || softmax(h_r)); pred, target (M, D).  Float64 as the release."""
    p_log = target.double().log_softmax(-1)
    q_log = pred.double().log_softmax(-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().float()


# ============================================================================ Data
def read_image_chat(path, keep_candidates=True):
    """An Image-Chat split file as published: a JSON list of {image_hash, dialog: [[style, utterance], ...],
    candidates?: [{"100": [...], "1000": [...]} per turn]}.  Errors name the file, the episode and the field."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of episodes, got {type(data).__name__}")
    episodes = []
    for i, ep in enumerate(data):
        where = f"{path}: episode {i}"
        for key in ("image_hash", "dialog"):
            if key not in ep:
                raise DataError(f"{where}: missing field '{key}'")
        dialog = ep["dialog"]
        if not isinstance(dialog, list) or not dialog:
            raise DataError(f"{where}: field 'dialog' should be a non-empty list")
        for t, turn in enumerate(dialog):
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(s, str) for s in turn)):
                raise DataError(f"{where}: field 'dialog' turn {t} should be [style, utterance]")
        rec = {"hash": str(ep["image_hash"]), "dialog": [tuple(t) for t in dialog], "candidates": None}
        if keep_candidates and ep.get("candidates") is not None:
            cands = ep["candidates"]
            if not isinstance(cands, list) or len(cands) != len(dialog):
                raise DataError(f"{where}: field 'candidates' should hold one entry per turn")
            rec["candidates"] = cands
        episodes.append(rec)
    if not episodes:
        raise DataError(f"{path}: no episodes")
    return episodes


def split_path(cfg, split):
    return os.path.join(cfg.data_dir, f"{split}.json")


def all_image_hashes(cfg):
    hashes = []
    for split in ("train", "valid", "test"):
        if os.path.isfile(split_path(cfg, split)):
            hashes += [ep["hash"] for ep in read_image_chat(split_path(cfg, split), keep_candidates=False)]
    if not hashes:
        raise DataError(f"{cfg.data_dir}: no Image-Chat split files (train/valid/test.json)")
    return sorted(set(hashes))


def grid_crops(img, crop, grid, mean, std):
    """PIL image -> (grid*grid, 3, crop, crop): non-aspect-preserving bilinear resize to grid*crop, row-major crops."""
    size = grid * crop
    x = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # (S, S, 3)
    x = torch.from_numpy(x).permute(2, 0, 1)  # (3, S, S)
    x = x.reshape(3, grid, crop, grid, crop).permute(1, 3, 0, 2, 4)  # (gy, gx, 3, crop, crop)
    return x.reshape(grid * grid, 3, crop, crop)


def load_features(cache_dir):
    """All feature parts -> ({hash: row}, (N, 9, D) float32).  Missing cache is an error, never zeros."""
    folder = os.path.join(cache_dir, "features")
    parts = sorted(n for n in os.listdir(folder) if n.endswith(".pt")) if os.path.isdir(folder) else []
    if not parts:
        raise DataError(f"no CLIP features in {folder}: run --mode features first")
    index, rows = {}, []
    for name in parts:
        part = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
        for h, f in zip(part["hashes"], part["feats"]):
            if h not in index:  # a hash computed twice (e.g. by an interrupted run) keeps its first copy
                index[h] = len(rows)
                rows.append(f)
    feats = torch.stack(rows).float()  # (N, 9, D)
    return index, feats


def load_captions(cache_dir):
    """{hash: [captions]} from the caption cache (JSON lines; a cut-off last line is ignored)."""
    caps = {}
    if os.path.isdir(cache_dir):
        for name in sorted(os.listdir(cache_dir)):
            if name.startswith("captions") and name.endswith(".jsonl"):
                with open(os.path.join(cache_dir, name), encoding="utf-8") as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # interrupted write
                        caps[rec["image"][:-len(".jpg")]] = rec["captions"]
    return caps


class Encoded:
    """Image-Chat episodes tokenised once: caption, per-turn style and utterance ids, feature row."""

    def __init__(self, episodes, tok, feat_index, captions, cfg, log, name):
        self.episodes, kept, missing = [], [], Counter()
        for ep in episodes:
            if ep["hash"] not in feat_index:
                missing["feature"] += 1
                continue
            if cfg.use_caption and ep["hash"] not in captions:
                missing["caption"] += 1
                continue
            kept.append(ep)
        n_missing = sum(missing.values())
        log.info(f"{name}: {len(kept)} episodes, {n_missing} skipped for a missing image/feature/caption "
                 f"({dict(missing)})")
        if not kept or n_missing > cfg.max_missing_frac * len(episodes):
            raise DataError(f"{name}: {n_missing} of {len(episodes)} episodes lack features/captions "
                            f"(> max_missing_frac {cfg.max_missing_frac}); check --cache_dir / --image_root")

        def enc(s, n):
            return tok.encode(s, add_special_tokens=False)[:n]
        for ep in kept:
            cap = captions[ep["hash"]][0].strip() if cfg.use_caption else None
            self.episodes.append({
                "hash": ep["hash"], "row": feat_index[ep["hash"]], "candidates": ep["candidates"],
                "caption": enc(cap, cfg.seg_tokens) if cap is not None else None,
                "styles": [enc(s, cfg.seg_tokens) for s, _ in ep["dialog"]],
                "utts": [enc(u, cfg.max_tgt_len - 1) for _, u in ep["dialog"]],
                "texts": [u for _, u in ep["dialog"]]})

    def __len__(self):
        return len(self.episodes)


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
    """Encoder text ids (B, L) and mask; over-long texts keep their end (the current speaker's style)."""
    ids = pad_to([s[-max_len:] for s in seqs], vocab.pad)
    return ids, (ids != vocab.pad).long()


def warmup_batch(eps, feats, vocab, cfg, g):
    """The four warm-up tasks' batches for one micro-batch (paper section 3.4, spec section 6).

    Shared encoder text: [<s>] c </s> s_1 <sty> u_1 </s> s_2 <sty> u_2 </s> ...   feats (B, 9, D).
    Decoder input <start> <T> y_1..y_{n-1}, labels <T> y_1..y_n with y ending in </s>.
    """
    V, B = vocab, len(eps)
    head = [V.bos] if V.bos is not None else []
    tasks = task_list(cfg)

    def source(ep, mask_utts=False, mask_caption=False):
        ids = list(head)
        if cfg.use_caption:
            ids += ([V.mask] * len(ep["caption"]) if mask_caption else ep["caption"]) + [V.eos]
        for s, u in zip(ep["styles"], ep["utts"]):
            u = u[:cfg.seg_tokens]
            if mask_utts and len(u):
                k = int(cfg.mlm_frac * len(u))
                picked = torch.randperm(len(u), generator=g)[:k].tolist()
                u = [V.mask if i in picked else t for i, t in enumerate(u)]
            ids += s + [V.sty] + u + [V.eos]
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
    if "isp" in tasks:  # image swap: floor(B/2) items get another (unswapped) item's image
        perm = torch.randperm(B, generator=g)
        swapped, kept = perm[:B // 2], perm[B // 2:]
        src_rows = kept[torch.randint(len(kept), (len(swapped),), generator=g)]
        f = feats.clone()
        f[swapped] = feats[src_rows]
        is_swapped = torch.zeros(B, dtype=torch.bool)
        is_swapped[swapped] = True
        labels = [[V.task["isp"]] + (V.negative if s else V.positive) + [V.eos] for s in is_swapped.tolist()]
        out["isp"] = pack([source(ep) for ep in eps], labels, f)
    if "mrm" in tasks:  # masked region modelling: zero floor(9 * 0.15) patches (same for the whole batch)
        n_patch = feats.shape[1]
        idx = torch.randperm(n_patch, generator=g)[:max(1, int(n_patch * cfg.mrm_frac))]
        masked = torch.zeros(n_patch, dtype=torch.bool)
        masked[idx] = True
        f = feats.clone()
        f[:, masked] = 0
        markers = [V.zero if m else V.feat for m in masked.tolist()]
        out["mrm"] = pack([source(ep) for ep in eps], [[V.task["mrm"]] + markers + [V.eos]] * B, f)
        out["mrm"]["mrm_target"] = feats[:, masked].reshape(-1, feats.shape[-1])  # (B * n_masked, D) row-major
    if "gcd" in tasks:  # caption generation from the fully masked caption
        out["gcd"] = pack([source(ep, mask_caption=True) for ep in eps],
                          [[V.task["gcd"]] + ep["caption"] + [V.eos] for ep in eps], feats)
    return out


def dialogue_context(ep, k, vocab, cfg):
    """Fine-tune encoder text for target turn k (1-based): c </s> s_1 <sty> u_1 </s> ... s_k <sty> </s>."""
    V = vocab
    ids = ep["caption"] + [V.eos] if cfg.use_caption else []
    for j in range(k - 1):
        ids += ep["styles"][j] + [V.sty] + ep["utts"][j][:cfg.seg_tokens] + [V.eos]
    return ids + ep["styles"][k - 1] + [V.sty] + [V.eos]


def finetune_batch(eps, turns, feats, vocab, cfg):
    """Next-utterance batch (spec section 7): turns (B,) 1-based target turn of each episode."""
    srcs = [dialogue_context(ep, k, vocab, cfg) for ep, k in zip(eps, turns)]
    labels = [ep["utts"][k - 1] + [vocab.eos] for ep, k in zip(eps, turns)]
    src, src_mask = src_batch(srcs, vocab, cfg.max_src_len)
    dec_in, lab = target_batch(labels, vocab)
    return {"src": src, "src_mask": src_mask, "feats": feats, "dec_in": dec_in, "labels": lab}


def draw_turns(eps, g):
    """Release sampling: a 3-turn dialogue gives a uniformly drawn turn, shorter dialogues give turn 1."""
    k = torch.randint(1, 4, (len(eps),), generator=g)
    n = torch.tensor([len(ep["utts"]) for ep in eps])
    return torch.where(n >= 3, k, torch.ones_like(k)).tolist()


def preprocessor_stats(folder, default_mean=CLIP_MEAN, default_std=CLIP_STD):
    """Normalisation of the CLIP image processor saved in the model folder (CLIP's own when absent)."""
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            pc = json.load(f)
        return pc.get("image_mean", default_mean), pc.get("image_std", default_std)
    return default_mean, default_std


def pending_images(cfg, dist, done, log, what):
    """Hashes still to do (sorted, capped by --stop_after), and this rank's contiguous share."""
    hashes = all_image_hashes(cfg)
    todo = [h for h in hashes if h not in done]
    log.info(f"{what}: {len(hashes)} images, {len(hashes) - len(todo)} already cached, {len(todo)} to do")
    if cfg.stop_after > 0:
        todo = todo[:cfg.stop_after]
    return hashes, [todo[i] for i in shard_indices(len(todo), dist)]


def open_images(cfg, hashes):
    ok, imgs, bad = [], [], []
    for h in hashes:
        img = load_image(os.path.join(cfg.image_root, h + ".jpg"))
        (bad.append(h) if img is None else (ok.append(h), imgs.append(img)))
    return ok, imgs, bad


def finish_stage(cfg, dist, log, what, n_all, n_done, computed, bad):
    """Merge the ranks' counts, record unreadable images, fail when too many are unreadable."""
    computed, bad = sum(all_gather_object(computed)), [h for b in all_gather_object(bad) for h in b]
    if dist.is_main and bad:
        with open(os.path.join(cfg.cache_dir, f"unreadable_{what}.json"), "w") as f:
            json.dump(sorted(bad), f)
    log.info(f"{what}: computed {computed}, unreadable {len(bad)}" + (f" (e.g. {bad[:3]})" if bad else ""))
    tried = computed + len(bad)
    if tried and len(bad) > cfg.max_missing_frac * tried:
        raise DataError(f"{what}: {len(bad)} of {tried} images under {cfg.image_root} unreadable")
    return {"images": n_all, "cached_before": n_done, "computed": computed, "unreadable": len(bad)}


@torch.no_grad()
def run_features(cfg, dist, log, dtype):
    """CLIP features of a 3x3 grid of crops per image (spec section 3), written in parts keyed by hash.

    Each part file holds {"hashes", "feats" (n, 9, D) fp16} and is written atomically, so an interrupted run
    loses at most one batch and a rerun skips every image already in a part.
    """
    from transformers import CLIPModel
    folder = os.path.join(cfg.cache_dir, "features")
    os.makedirs(folder, exist_ok=True)
    parts = sorted(n for n in os.listdir(folder) if n.endswith(".pt"))
    done = {h for n in parts for h in torch.load(os.path.join(folder, n), weights_only=True)["hashes"]}
    hashes, mine = pending_images(cfg, dist, done, log, "features")
    barrier()  # every rank has listed the parts before any writes new ones
    dev, fdtype = dist.device, frozen_dtype(dist.device, dtype)
    clip = CLIPModel.from_pretrained(cfg.clip, local_files_only=True).to(dev, fdtype).eval().requires_grad_(False)
    crop, (mean, std) = clip.config.vision_config.image_size, preprocessor_stats(cfg.clip)
    computed, bad = 0, []
    for i, s in enumerate(progress(range(0, len(mine), cfg.feat_batch), dist.is_main, desc="features")):
        ok, imgs, nope = open_images(cfg, mine[s:s + cfg.feat_batch])
        bad += nope
        if not ok:
            continue
        x = torch.cat([grid_crops(im, crop, cfg.grid, mean, std) for im in imgs]).to(dev, fdtype)  # (n*9, 3, c, c)
        out = clip.get_image_features(pixel_values=x)
        f = getattr(out, "pooler_output", out).float().reshape(len(ok), cfg.grid ** 2, -1)  # (n, 9, D) projected
        save_checkpoint(os.path.join(folder, f"part_{len(parts):05d}_r{dist.rank}_{i:05d}.pt"),
                        {"hashes": ok, "feats": f.half().cpu()})
        computed += len(ok)
    return finish_stage(cfg, dist, log, "features", len(hashes), len(done), computed, bad)


@torch.no_grad()
def run_captions(cfg, dist, log, dtype):
    """BLIP-2 captions (spec section 4): beam 5, 3 returned, min length 5, 16 new tokens, no 3-gram repeats.

    Appended per batch to captions.r<rank>.jsonl ({"image": "<hash>.jpg", "captions": [c1, c2, c3]}), so a
    rerun skips captioned images; at the end rank 0 writes the release layout captions.json {"<hash>.jpg": [...]}.
    """
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    if not cfg.captioner:
        raise ValueError("--captioner: give a local BLIP-2 folder (transformers Blip2ForConditionalGeneration, "
                         "e.g. Salesforce/blip2-opt-2.7b-coco or blip2_pformer.py's export)")
    os.makedirs(cfg.cache_dir, exist_ok=True)
    done = load_captions(cfg.cache_dir)
    hashes, mine = pending_images(cfg, dist, done, log, "captions")
    dev, fdtype = dist.device, frozen_dtype(dist.device, dtype)
    proc = Blip2Processor.from_pretrained(cfg.captioner, local_files_only=True)
    model = Blip2ForConditionalGeneration.from_pretrained(cfg.captioner, local_files_only=True)
    model = model.to(dev, fdtype).eval().requires_grad_(False)
    R, computed, bad = cfg.caption_return, 0, []
    with open(os.path.join(cfg.cache_dir, f"captions.r{dist.rank}.jsonl"), "a", encoding="utf-8") as f:
        for s in progress(range(0, len(mine), cfg.caption_batch), dist.is_main, desc="captions"):
            ok, imgs, nope = open_images(cfg, mine[s:s + cfg.caption_batch])
            bad += nope
            if not ok:
                continue
            inputs = proc(images=imgs, return_tensors="pt").to(dev)
            inputs["pixel_values"] = inputs["pixel_values"].to(fdtype)
            out = model.generate(**inputs, num_beams=cfg.caption_beams, num_return_sequences=R,
                                 min_length=cfg.caption_min_length, max_new_tokens=cfg.caption_max_new_tokens,
                                 no_repeat_ngram_size=3, do_sample=False)
            texts = [t.strip() for t in proc.batch_decode(out, skip_special_tokens=True)]
            for j, h in enumerate(ok):  # one line per image, flushed: a crash loses at most a batch
                f.write(json.dumps({"image": h + ".jpg", "captions": texts[j * R:(j + 1) * R]}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            computed += len(ok)
    stats = finish_stage(cfg, dist, log, "captions", len(hashes), len(done), computed, bad)
    barrier()
    if dist.is_main:
        caps = load_captions(cfg.cache_dir)
        with open(os.path.join(cfg.cache_dir, "captions.json.tmp"), "w", encoding="utf-8") as f:
            json.dump({h + ".jpg": c for h, c in sorted(caps.items())}, f)
        os.replace(os.path.join(cfg.cache_dir, "captions.json.tmp"), os.path.join(cfg.cache_dir, "captions.json"))
    return stats


# ============================================================================ Eval
_CONTRACTIONS = [(r"\bwon't\b", "will not"), (r"\bcan't\b", "cannot"), (r"\bshan't\b", "shall not"),
                 (r"\blet's\b", "let us"), (r"\bain't\b", "are not"), (r"n't\b", " not"), (r"'re\b", " are"),
                 (r"'ve\b", " have"), (r"'ll\b", " will"), (r"'d\b", " would"), (r"\bi'm\b", "i am"),
                 (r"\b(it|that|what|there|here|he|she|who|where|how)'s\b", r"\1 is")]


def normalize(text):
    """Strip, lower-case, expand contractions (the release uses the `contractions` package; this is its core)."""
    text = text.strip().lower().replace("\u2019", "'")
    for pat, rep in _CONTRACTIONS:
        text = re.sub(pat, rep, text)
    return re.sub(r"\s+", " ", text).strip()


def f1_counts(pred, ref):
    """Unigram multiset F1 of two token lists; 1 if both empty, 0 without overlap."""
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def bleu4(preds, refs):
    """torchmetrics-style corpus BLEU-4 (whitespace tokens, uniform weights, no smoothing, closest-ref BP)."""
    num, den, p_len, r_len = [0] * 4, [0] * 4, 0, 0
    for pred, ref in zip(preds, refs):
        p, r = pred.split(), ref.split()
        p_len, r_len = p_len + len(p), r_len + len(r)
        for n in range(1, 5):
            pc = Counter(tuple(p[i:i + n]) for i in range(len(p) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            num[n - 1] += sum((pc & rc).values())
            den[n - 1] += max(0, len(p) - n + 1)
    if min(num) == 0 or p_len == 0:
        return 0.0
    log_prec = sum(math.log(a / b) for a, b in zip(num, den)) / 4
    bp = 1.0 if p_len > r_len else math.exp(1 - r_len / p_len)
    return bp * math.exp(log_prec)


def rouge_l(pred, ref):
    """ROUGE-L F-measure as rouge-score/torchmetrics: lower-case, non-alphanumerics -> space, no stemming."""
    p = re.sub(r"[^a-z0-9]+", " ", pred.lower()).split()
    r = re.sub(r"[^a-z0-9]+", " ", ref.lower()).split()
    if not p or not r:
        return 0.0
    dp = [0] * (len(r) + 1)
    for a in p:  # longest common subsequence, one row at a time
        prev = 0
        for j, b in enumerate(r, 1):
            cur = dp[j]
            dp[j] = prev + 1 if a == b else max(dp[j], dp[j - 1])
            prev = cur
    lcs = dp[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def word_f1(pred, ref):
    """ParlAI's F1: lower-case, strip punctuation and articles, whitespace tokens."""
    def norm(s):
        s = re.sub(r"\b(a|an|the)\b", " ", re.sub(r"[^\w\s]", " ", s.lower()))
        return s.split()
    return f1_counts(norm(pred), norm(ref))


def turn_metrics(preds, refs, tok, chunk):
    """Paper mode (batch means over chunks of `chunk` examples, x100) + corpus-level versions."""
    pred_ids = [tok.encode(p, add_special_tokens=False) for p in preds]
    ref_ids = [tok.encode(r, add_special_tokens=False) for r in refs]
    f1 = [f1_counts(a, b) for a, b in zip(pred_ids, ref_ids)]
    rl = [rouge_l(p, r) for p, r in zip(preds, refs)]
    batches = [slice(i, i + chunk) for i in range(0, len(preds), chunk)]
    out = {"F1": 100 * np.mean([np.mean(f1[s]) for s in batches]),
           "BLEU-4": 100 * np.mean([bleu4(preds[s], refs[s]) for s in batches]),
           "ROUGE-L": 100 * np.mean([np.mean(rl[s]) for s in batches]),
           "corpus_F1": 100 * float(np.mean(f1)), "corpus_BLEU-4": 100 * bleu4(preds, refs),
           "corpus_ROUGE-L": 100 * float(np.mean(rl)),
           "word_F1": 100 * float(np.mean([word_f1(p, r) for p, r in zip(preds, refs)]))}
    return {k: float(v) for k, v in out.items()}


def generation_kwargs(cfg, lm):
    """Decoding recipe: --flags, falling back (-1) to the backbone's own generation config (BlenderBot's)."""
    gc = lm.generation_config

    def pick(value, name, default):
        return value if value >= 0 else (getattr(gc, name, None) if getattr(gc, name, None) is not None else default)
    return dict(num_beams=cfg.num_beams, min_length=cfg.min_length, max_length=pick(cfg.max_length, "max_length", 60),
                length_penalty=pick(cfg.length_penalty, "length_penalty", 1.0),
                no_repeat_ngram_size=pick(cfg.no_repeat_ngram_size, "no_repeat_ngram_size", 0),
                encoder_no_repeat_ngram_size=pick(cfg.encoder_no_repeat_ngram_size, "encoder_no_repeat_ngram_size", 0),
                early_stopping=True, do_sample=False)


@torch.no_grad()
def generate(model, src, src_mask, feats, gen_kw):
    """Beam search from precomputed encoder states; the text ids go along so encoder n-gram blocking works."""
    enc, mask = model.encode(src, src_mask, feats)
    return model.lm.generate(input_ids=src, attention_mask=mask, encoder_outputs=enc, **gen_kw)


@torch.no_grad()
def candidate_scores(model, enc, mask, cands, tok, vocab, cfg):
    """Summed log-likelihood of each candidate response (ParlAI's generator ranking).  enc: one example."""
    labels = [tok.encode(c, add_special_tokens=False)[:cfg.max_tgt_len - 1] + [vocab.eos] for c in cands]
    dec_in, lab = target_batch(labels, vocab)
    n = len(cands)
    hidden = enc.last_hidden_state.expand(n, -1, -1)  # (C, S, d)
    from transformers.modeling_outputs import BaseModelOutput
    logits = model.lm(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask.expand(n, -1),
                      decoder_input_ids=dec_in.to(hidden.device)).logits.float()
    lp = logits.log_softmax(-1).gather(-1, lab.to(hidden.device).unsqueeze(-1)).squeeze(-1)  # (C, T)
    return (lp * (lab.to(hidden.device) != vocab.pad)).sum(1)


@torch.no_grad()
def evaluate(model, data, feats, tok, vocab, cfg, dist, dtype, split, run_dir=None):
    """Generate every turn k (gold history), score F1/BLEU-4/ROUGE-L per turn and their mean IC, PPL and R@1."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    gen_kw = generation_kwargs(cfg, model.lm)
    dev, results = dist.device, {}
    for k in (1, 2, 3):
        items = [i for i, ep in enumerate(data.episodes) if len(ep["utts"]) >= k]
        items = items[:cfg.eval_max] if cfg.eval_max > 0 else items
        if not items:
            continue
        mine = [items[i] for i in shard_indices(len(items), dist)]
        rows = []
        for s in progress(range(0, len(mine), cfg.eval_batch), dist.is_main, desc=f"{split} turn {k}"):
            eps = [data.episodes[i] for i in mine[s:s + cfg.eval_batch]]
            b = finetune_batch(eps, [k] * len(eps), feats[[ep["row"] for ep in eps]], vocab, cfg)
            b = {n: t.to(dev) for n, t in b.items()}
            with autocast(dev, dtype):
                out = generate(model, b["src"], b["src_mask"], b["feats"], gen_kw)
                enc, mask = model.encode(b["src"], b["src_mask"], b["feats"])
                logits = model.lm(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=b["dec_in"]).logits
            nll = F.cross_entropy(logits.float().transpose(1, 2), b["labels"], ignore_index=vocab.pad, reduction="none")
            n_tok = (b["labels"] != vocab.pad).sum(1)
            preds = tok.batch_decode(out, skip_special_tokens=True)
            for j, ep in enumerate(eps):
                row = {"hash": ep["hash"], "turn": k, "context": tok.decode(b["src"][j], skip_special_tokens=True),
                       "reference": ep["texts"][k - 1], "prediction": preds[j],
                       "nll": float(nll[j].sum()), "n_tok": int(n_tok[j])}
                cands = (ep["candidates"] or [None] * 3)[k - 1]
                if cfg.num_candidates and cands and str(cfg.num_candidates) in cands:
                    cl = cands[str(cfg.num_candidates)]
                    if ep["texts"][k - 1] in cl:
                        with autocast(dev, dtype):
                            sc = candidate_scores(model, type(enc)(last_hidden_state=enc.last_hidden_state[j:j + 1]),
                                                  mask[j:j + 1], cl, tok, vocab, cfg)
                        gold = cl.index(ep["texts"][k - 1])
                        row["rank"] = int((sc > sc[gold]).sum()) + 1
                rows.append(row)
        rows = [r for part in all_gather_object(rows) for r in part]  # shards are contiguous, in rank order
        preds = [normalize(r["prediction"]) for r in rows]
        refs = [normalize(tok.decode(tok.encode(r["reference"], add_special_tokens=False), skip_special_tokens=True))
                for r in rows]
        m = turn_metrics(preds, refs, tok, cfg.eval_batch)
        chunks = [rows[i:i + cfg.eval_batch] for i in range(0, len(rows), cfg.eval_batch)]
        m["PPL"] = float(np.mean([math.exp(sum(r["nll"] for r in c) / max(1, sum(r["n_tok"] for r in c)))
                                  for c in chunks]))
        ranks = [r["rank"] for r in rows if "rank" in r]
        if ranks:
            m[f"R@1/{cfg.num_candidates}"] = 100 * float(np.mean([r == 1 for r in ranks]))
            m["MRR"] = 100 * float(np.mean([1 / r for r in ranks]))
        m["n"] = len(rows)
        results.update({f"turn{k}/{name}": v for name, v in m.items()})
        if run_dir and dist.is_main:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, f"predictions_{split}_turn{k}.jsonl"), "w") as f:
                for r in rows:
                    f.write(json.dumps({n: r[n] for n in ("hash", "context", "reference", "prediction")}) + "\n")
    for name in ("F1", "BLEU-4", "ROUGE-L", "PPL", f"R@1/{cfg.num_candidates}", "word_F1"):
        vals = [results[f"turn{k}/{name}"] for k in (1, 2, 3) if f"turn{k}/{name}" in results]
        if vals:
            results[f"IC/{name}"] = float(np.mean(vals))
    model.train(was_training)
    return results


def results_table(res):
    """Per-turn table of the paper's metrics (x100), as in its Table 3."""
    names = [n for n in ("F1", "BLEU-4", "ROUGE-L", "PPL", "R@1/100", "word_F1") if f"IC/{n}" in res]
    lines = ["| turn | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in ("turn1", "turn2", "turn3", "IC"):
        if f"{k}/F1" in res:
            lines.append(f"| {k} | " + " | ".join(f"{res.get(f'{k}/{n}', float('nan')):.2f}" for n in names) + " |")
    return "\n".join(lines)


# ============================================================================ Train
def onecycle_lr(step, total, cfg):
    """torch's OneCycleLR (linear annealing, div 25, final div 1e4) per optimizer step; --legacy_lr: lr/25."""
    init = cfg.lr / 25
    if cfg.legacy_lr:  # the release steps the scheduler once per epoch: the lr never leaves its start value
        return init
    final, up = init / 1e4, cfg.pct_start * total - 1
    if step <= up:
        return init + (cfg.lr - init) * step / up
    return cfg.lr + (final - cfg.lr) * (step - up) / max(total - 1 - up, 1e-8)


def mix(*xs):
    """A deterministic seed from integers (step, micro-batch, ...): resume and world size do not change the draws."""
    h = 0
    for x in xs:
        h = (h * 1_000_003 + int(x)) % (2 ** 61 - 1)
    return h


def load_split(cfg, split, tok, index, caps, log, keep_candidates):
    return Encoded(read_image_chat(split_path(cfg, split), keep_candidates), tok, index, caps, cfg, log, split)


def load_cached(cfg):
    index, feats = load_features(cfg.cache_dir)
    if cfg.blank_images:
        feats.zero_()
    caps = load_captions(cfg.cache_dir) if cfg.use_caption else {}
    if cfg.use_caption and not caps:
        raise DataError(f"no captions in {cfg.cache_dir}: run --mode captions first (or --use_caption false)")
    return index, feats, caps


def load_weights(model, path, log):
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    log.info(f"loaded model weights from {path} (step {state.get('step')})")


def run_training(cfg, dist, log, dtype):
    """--mode warmup | finetune: AdamW + OneCycle, gradient accumulation, DDP, exact resume."""
    warm = cfg.mode == "warmup"
    dev, world = dist.device, dist.world_size
    index, feats, caps = load_cached(cfg)
    seed_everything(cfg.seed)  # identical fresh initialisation on every rank
    model, tok, vocab = build_model(cfg, feats.shape[-1], feats.shape[1])
    train = load_split(cfg, "train", tok, index, caps, log, keep_candidates=False)
    if cfg.init:
        load_weights(model, cfg.init, log)
    active = task_list(cfg) if warm else ["ft"]
    model.mrm_head.requires_grad_("mrm" in active)          # unused parameters stay out of DDP and AdamW
    model.img_proj.requires_grad_(cfg.use_image)
    model.img_norm.requires_grad_(cfg.use_image)
    model.to(dev).train()
    ddp = wrap_ddp(model, dist)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.adam_eps)
    scaler = make_scaler(dtype)

    # items: (episode, turn); turn 0 = drawn at collate time (release), --all_turns expands every turn
    if warm or not cfg.all_turns:
        items = [(i, 0) for i in range(len(train))]
    else:
        items = [(i, k) for i, ep in enumerate(train.episodes) for k in range(1, len(ep["utts"]) + 1)]
    G, m = (cfg.warmup_batch, cfg.warmup_micro) if warm else (cfg.ft_batch, cfg.ft_micro)
    if G % (m * world):
        raise ValueError(f"global batch {G} must be a multiple of micro batch {m} x world size {world}")
    accum, per_epoch = G // (m * world), len(items) // G
    if per_epoch == 0:
        raise DataError(f"{len(items)} training examples < global batch {G}")
    total = cfg.max_steps or math.ceil((cfg.warmup_epochs if warm else cfg.ft_epochs) * per_epoch)
    log.info(f"{cfg.mode}: {len(items)} examples, global batch {G} = micro {m} x accumulation {accum} x world "
             f"{world}, {per_epoch} steps/epoch, {total} steps, tasks {active}")

    orders = {}

    def micro_batch(step, j):
        """Micro-batch j (0..G/m-1) of global step `step`: fixed by (seed, step, j) whatever the world size."""
        epoch, within = divmod(step, per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = torch.randperm(len(items), generator=torch.Generator().manual_seed(mix(cfg.seed, epoch)))
        idx = orders[epoch][within * G + j * m: within * G + (j + 1) * m].tolist()
        g = torch.Generator().manual_seed(mix(cfg.seed, step, j, 1))
        eps = [train.episodes[items[i][0]] for i in idx]
        f = feats[[ep["row"] for ep in eps]]
        if warm:
            tasks = warmup_batch(eps, f, vocab, cfg, g)
        else:
            drawn = draw_turns(eps, g)
            tasks = {"ft": finetune_batch(eps, [items[i][1] or k for i, k in zip(idx, drawn)], f, vocab, cfg)}
        return {t: {n: x.to(dev) for n, x in b.items()} for t, b in tasks.items()}

    params = [p for p in model.parameters() if p.requires_grad]

    def train_step(step):
        lr = onecycle_lr(step, total, cfg)
        set_lr(opt, lr)
        sums, n_tok = Counter(), 0
        for a in range(accum):
            j = a * world + dist.rank
            tasks = micro_batch(step, j)
            torch.manual_seed(mix(cfg.seed, step, j, 2))  # dropout masks also fixed by (step, micro-batch)
            sync = ddp.no_sync() if world > 1 and a < accum - 1 else nullcontext()
            with sync:
                with autocast(dev, dtype):
                    terms = ddp(tasks)
                loss = sum((cfg.task_weight if warm else 1.0) * terms[t] for t in active)
                values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
                check_finite(step, values)  # raises before backward: nothing new is saved
                scaler.scale(loss / accum).backward()
            sums.update({k: v / accum for k, v in values.items()})
            n_tok += sum(b["src"].numel() + b["dec_in"].numel() for b in tasks.values())
        scaler.unscale_(opt)
        gnorm = clip_grad(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        logged = {k: float(all_reduce_mean(torch.tensor(v, device=dev))) for k, v in sums.items()}
        return logged, lr, gnorm, n_tok * world

    n_params = sum(p.numel() for p in params)
    if cfg.bench:
        return run_bench(lambda: train_step(0), cfg.bench, G, dev,
                         flops_per_step=6 * n_params * micro_tokens(micro_batch(0, 0)) * accum * world)

    start, best, epoch_sum, epoch_n = 0, None, 0.0, 0
    if cfg.resume:
        ck = restore(cfg.resume, model, opt, scaler)
        set_rng_state(ck["rng"])
        start, best = ck["step"], ck.get("best")
        epoch_sum, epoch_n = ck["data_position"]["epoch_sum"], ck["data_position"]["epoch_n"]
        log.info(f"resumed from {cfg.resume} at step {start}")

    def save(name, step):
        if dist.is_main:
            save_checkpoint(os.path.join(cfg.out_dir, name), {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "rng": rng_state(), "config": asdict_config(cfg), "best": best,
                "data_position": {"step": step, "epoch": step // per_epoch, "epoch_sum": epoch_sum,
                                  "epoch_n": epoch_n}})
        barrier()

    select = None
    if not warm and cfg.eval_every > 0 and cfg.select_on in ("valid", "test"):
        select = load_split(cfg, cfg.select_on, tok, index, caps, log, keep_candidates=False)
    timer, logged, end = StepTimer(dev), {}, min(total, start + cfg.stop_after) if cfg.stop_after else total
    for step in range(start, end):
        timer.start()
        logged, lr, gnorm, toks = train_step(step)
        speed = timer.stop(G)
        # warm-up model choice (release): the epoch with the lowest MLM training loss
        epoch_sum, epoch_n = epoch_sum + logged.get("mlm", logged["loss"]), epoch_n + 1
        if warm and ((step + 1) % per_epoch == 0 or step + 1 == total):
            mean = epoch_sum / epoch_n
            if best is None or mean < best:
                best = mean
                save("best.pt", step + 1)
            epoch_sum, epoch_n = 0.0, 0
        if select is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == total):
            score = evaluate(model, select, feats, tok, vocab, cfg, dist, dtype, cfg.select_on)["IC/F1"]
            log.info(f"step {step + 1}: {cfg.select_on} IC F1 {score:.2f}")
            if best is None or score > best:
                best = score
                save("best.pt", step + 1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            log.log(step + 1, **logged, lr=lr, grad_norm=gnorm, **speed,
                    **({"mfu": mfu(6 * n_params * toks, speed["ms_step"] / 1000, dev)} if dev.type == "cuda" else {}))
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            save("last.pt", step + 1)
    metrics = {"final_loss": logged.get("loss", float("nan")), "steps": end,
               **{f"train/{k}": v for k, v in logged.items()}}
    if end < total:
        log.info(f"stopped after step {end} of {total} (--stop_after); continue with --resume {cfg.out_dir}/last.pt")
        return metrics
    if not warm and cfg.final_eval:
        if select is not None and os.path.isfile(os.path.join(cfg.out_dir, "best.pt")):
            load_weights(model, os.path.join(cfg.out_dir, "best.pt"), log)
        data = load_split(cfg, cfg.eval_split, tok, index, caps, log, keep_candidates=True)
        res = evaluate(model, data, feats, tok, vocab, cfg, dist, dtype, cfg.eval_split, cfg.out_dir)
        metrics.update(res)
        log.log(end, **{k: v for k, v in res.items() if k.startswith("IC/")})
        log.info(results_table(res))
    return metrics


def micro_tokens(tasks):
    return sum(b["src"].numel() + b["feats"].shape[0] * 11 + b["dec_in"].numel() for b in tasks.values())


def run_eval(cfg, dist, log, dtype):
    index, feats, caps = load_cached(cfg)
    model, tok, vocab = build_model(cfg, feats.shape[-1], feats.shape[1])
    if cfg.init:
        load_weights(model, cfg.init, log)
    else:
        log.info("no --init: evaluating the untrained multimodal model")
    model.to(dist.device)
    data = load_split(cfg, cfg.eval_split, tok, index, caps, log, keep_candidates=True)
    res = evaluate(model, data, feats, tok, vocab, cfg, dist, dtype, cfg.eval_split, cfg.out_dir)
    log.log(0, **{k: v for k, v in res.items() if k.startswith("IC/")})
    log.info(results_table(res))
    return res


# ============================================================================ main
def main(argv=None):
    cfg = resolve_paths(parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[0]))
    dist = setup_distributed(cfg.device)
    try:
        dtype = pick_dtype(dist.device, cfg.precision)
        log = Logger(cfg.out_dir, dist.is_main)
        if dist.is_main:
            save_config(cfg, cfg.out_dir)
        log.info(f"imagechat_warmup --mode {cfg.mode} | world {dist.world_size} | {dist.device} | {dtype}\n"
                 + format_config(cfg))
        log.info("choices: " + "; ".join(f"{k}: {v}" for k, v in deviations(cfg).items()))
        if needs_toy_world(cfg) and not os.path.isfile(os.path.join(cfg.toy_root, "manifest.json")):
            if dist.is_main:
                from data.toy import ensure_toy_world
                ensure_toy_world(cfg.toy_root)
            barrier()
        seed_everything(cfg.seed)
        run = {"features": run_features, "captions": run_captions, "warmup": run_training,
               "finetune": run_training, "eval": run_eval}[cfg.mode]
        metrics = run(cfg, dist, log, dtype)
        if dist.is_main:
            with open(os.path.join(cfg.out_dir, "final_metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
        return metrics
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
