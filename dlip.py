"""DLIP: distil a BLIP teacher into a small BLIP-shaped student, then fine-tune the student.

DLIP (Kuang et al., arXiv 2308.12956) compresses BLIP (Li et al., arXiv 2201.12086). The student has
BLIP's whole architecture at a smaller size: ViT image encoder, BERT text encoder, image-grounded
text encoder (BERT + cross-attention, for image-text matching) and image-grounded decoder (sharing
all but its causal self-attention with the encoder). It trains BLIP's losses (`blip_losses`: ITC
with momentum encoder and queues, ITM with hard negatives, LM) and, on the same batch, every
distillation term from a frozen teacher (`distill_losses`: ITC logits, representations, decoder
logits, attention maps). Read ModelConfig, BLIP.forward, blip_losses, distill_losses, train.

Modes: pretrain (student + frozen teacher; --teacher "" = plain BLIP) | retrieval (ITC+ITM
fine-tuning; eval: ITC top-k + ITM re-rank) | caption (decoder fine-tuning; beam|nucleus); with
--ft_distill either also distils a fine-tuned teacher | eval (--task retrieval|caption|efficiency
|all) | params (the preset's student and teacher at their published sizes, offline, meta device).
    python dlip.py --preset toy_teacher && python dlip.py    # toy teacher, then the student
    python dlip.py --mode retrieval --init runs/dlip_toy/last.pt --out_dir runs/dlip_toy_ret
    torchrun --nproc_per_node 4 dlip.py --preset paper --image_root /data --train_files coco.jsonl
    torchrun --nproc_per_node 4 dlip.py --preset paper --train_shards 'cc3m/{00000..00331}.tar'
(img2dataset webdataset shards, docs/data.md). Each run writes <out_dir>/report.html (--report false: none).
Toy figures and how the toy recipe was chosen: docs/dlip.md. Teachers (salesforce/BLIP's .pth, the
paper preset's, or transformers' BlipForImageTextRetrieval / BlipForConditionalGeneration) load with
every weight accounted for; tests check ITM, ITC and decoder logits against transformers to 1e-4.
"""
import contextlib
import copy
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import amp as camp
from common import dist as cdist
from common.attention import attention, merge_heads, split_heads
from common.checkpoint import (RESUME_FREE, check_resume_config, expect_checkpoint, load_checkpoint,
                               rng_state, save_checkpoint, set_rng_state)
from common.config import check_choices, format_config, given_flags, parse_config, save_config
from common.data import (DataError, ImageFolderLoader, Records, ShardStream, StepSampler,
                         StreamTracker, fit_micro, make_loader, pre_caption, read_pairs,
                         shard_sample_count, stream_loader)
from common.hf import counts_table, published_config, read_hf_weights, resolve_local
from common.image import CLIP_MEAN, CLIP_STD, ImageTransform
from common.log import Logger, progress
from common.train import (StepTimer, cosine_lr, count_flops, count_params, mfu, optimizer_update,
                          param_groups, run_bench, samples_per_second, set_lr, size_table)


# ================================================================================================ Config
@dataclass
class Size:
    """The size fields the run Config sets for the student and every ModelConfig records."""
    image_size: int = 64
    patch_size: int = 8
    vit_width: int = 64
    vit_layers: int = 2
    vit_heads: int = 4
    vit_mlp: int = 256
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 256
    embed_dim: int = 256               # ITC projection width (teacher and student must agree)
    dropout: float = 0.0               # BERT dropout (BLIP 0.1)
    grad_ckpt: bool = False            # activation checkpointing of the ViT blocks
    queue_size: int = 256              # 57600 in BLIP; a multiple of the global micro batch


@dataclass
class ModelConfig(Size):
    """The architecture of a BLIP model, teacher or student: saved in each checkpoint, read back to
    rebuild the model."""
    vit_eps: float = 1e-6
    vit_act: str = "gelu"              # quick_gelu: a CLIP tower initialised the ViT
    vit_pre_norm: bool = False         # CLIP towers: a LayerNorm before the blocks
    text_eps: float = 1e-12
    vocab_size: int = 30524
    max_pos: int = 512
    has_encoder: bool = True           # text encoder, vision_proj, text_proj, itm_head, temp
    has_decoder: bool = True
    tie_decoder: bool = True           # decoder shares all but its self-attention with the encoder
    momentum: bool = True              # EMA copies of the encoders and the ITC feature queues
    ema: float = 0.995                 # momentum coefficient
    enc_id: int = 0                    # token ids of [ENC], [DEC], [SEP], [PAD], [CLS]
    dec_id: int = 0
    sep_id: int = 0
    pad_id: int = 0
    cls_id: int = 0
    prompt: str = ""                   # what the decoder was fine-tuned with (caption mode)


@dataclass
class Config(Size):
    """The run: the student's Size fields plus everything below."""
    mode: str = "pretrain"             # pretrain | retrieval | caption | eval | params
    task: str = "all"                  # eval mode: retrieval | caption | efficiency | all
    preset: str = "toy"
    out_dir: str = "runs/dlip"
    toy_root: str = "data/toy"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    bench: int = 0                     # time N training steps after warm-up, print samples/s, exit
    compile: bool = False              # torch.compile the trained model (a GPU's speed-up)
    resume: str = ""                   # checkpoint of this run to continue exactly
    resume_changes: bool = False       # continue a resume whose config differs
    # ---- data: canonical pairs JSONL, paths relative to image_root; "toy:<path>" = in toy_root
    train_files: list[str] = field(default_factory=list)
    train_shards: str = ""             # or img2dataset webdataset shards: 'cc3m/{00000..00331}.tar'
    val_file: str = ""
    test_file: str = ""
    image_root: str = ""
    tokenizer: str = ""                # BERT tokenizer; [DEC] and [ENC] are added if missing
    max_words: int = 30                # pre_caption keeps the first 30 words (BLIP)
    max_len: int = 30                  # tokens: 30 pretrain, 35 retrieval, 40 caption in BLIP
    num_workers: int = 0
    max_bad_frac: float = 0.05         # stop when more distinct images than this are unreadable
    hflip: bool = False                # training: random horizontal flip (BLIP's transform_train)
    randaug: bool = False              # training: BLIP's RandomAugment(2, 5) after crop and flip
    max_eval_images: int = 0           # 0 = all
    train_limit: int = 0               # train on the first N images only, all their captions (0 = all)
    init_vit: str = ""                 # HF ViT (DeiT) or CLIP folder for the student image encoder
    init_text: str = ""                # HF BERT folder for the text stack (DLIP: matters little)
    momentum: float = 0.995
    no_momentum: bool = False          # no EMA encoders/queues: in-batch ITC over the global batch
    alpha: float = 0.4                 # weight of the momentum model's soft ITC targets
    alpha_ramp_epochs: float = 2.0     # alpha ramps up from 0 (BLIP: 2 epochs pretrain, 1 finetune)
    # ---- teacher and distillation: one weight per loss term (a KD term at 0 is not computed)
    teacher: str = "runs/dlip_toy_teacher/last.pt"  # dlip or BLIP .pth or BlipForImageTextRetrieval
    teacher_caption: str = ""          # its BlipForConditionalGeneration folder (or .pt)
    teacher_temp: float = 0.07         # ITC temperature of an HF teacher (its folder has none)
    itc_kd: str = "v2"                 # v2: teacher feats vs student queue; kl: in-batch row KL
    rep_loss: str = "cos"              # cos: 1 - cos of the heads (V2); mse: mapped hidden states
    rep_layers: str = "last"           # mse: last | uniform (student k -> teacher k N_T / N_S)
    w_itc: float = 1.0
    w_itm: float = 1.0
    w_lm: float = 1.0
    w_itc_kd: float = 1.0
    w_rep_img: float = 1.0
    w_rep_txt: float = 1.0
    w_rep_fus: float = 1.0
    w_rep_dec: float = 1.0
    w_lm_kd: float = 1.0
    w_attn_sa: float = 1.0
    w_attn_ca: float = 1.0
    w_attn_dec: float = 1.0
    w_itm_kd: float = 0.0              # not in V2: one more teacher fusion pass on the negatives
    ft_distill: bool = False           # fine-tuning: also distil the teacher's decoder (caption)
    #                                    or its encoders' terms, w_* as in pretraining (retrieval)
    # ---- fine-tuning / evaluation inputs
    init: str = ""                     # to fine-tune (pretrain's last.pt); pretrain: copied in part
    ckpt: str = ""                     # eval mode: dlip checkpoint, BLIP .pth or HF folder
    # ---- optimisation
    global_batch: int = 32
    micro_batch: int = 32              # per GPU; accumulation = global / (micro * world)
    epochs: float = 10.0
    max_steps: int = 0                 # > 0 overrides epochs
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 20
    lr_schedule: str = "step"          # step: lr * lr_decay^epoch (BLIP pretrain) | cosine
    lr_decay: float = 0.9
    weight_decay: float = 0.05
    grad_clip: float = 0.0             # 0 = measure the norm only
    label_smoothing: float = 0.1       # LM loss (BLIP's med.py)
    # ---- evaluation
    k_test: int = 16                   # ITM re-ranks the ITC top-k (128 Flickr30K, 256 COCO)
    prompt: str = "a picture of "      # caption mode: used at training and at decoding
    num_beams: int = 3
    decode: str = "beam"               # beam | nucleus (BLIP's sample=True, CapFilt's captioner)
    top_p: float = 0.9                 # nucleus: BLIP models/blip.py generate(top_p=0.9)
    top_k: int = 50                    # nucleus: transformers' default, BLIP's sampling ran with it
    repetition_penalty: float = 1.1    # nucleus: BLIP models/blip.py hard-codes 1.1 when sampling
    gen_max_len: int = 20              # counted including the prompt tokens (BLIP)
    gen_min_len: int = 5
    eval_batch: int = 64
    eval_every: int = 0                # steps; fine-tuning also evaluates val every epoch (best.pt)
    log_every: int = 10
    save_every: int = 0                # steps; the last checkpoint is always written
    report: bool = True                # <out_dir>/report.html: curves, teacher vs student pictures


# Toy recipe: 64 px scenes, patch 8, 24 text tokens; the toy CLIP vision tower and BERT stand in for
# DeiT and bert-base. An epoch is every (scene, caption) pair: 5 per scene. No flip and no
# RandAugment (hflip, randaug false): the toy captions say left/right and name colours, and BLIP
# flips and recolours without touching the caption. How each toy value was chosen: docs/dlip.md.
TOY = dict(image_size=64, patch_size=8, max_len=24, global_batch=32, micro_batch=32, queue_size=32,
           epochs=2, lr=1e-3, warmup_steps=20, lr_decay=0.774, momentum=0.99, k_test=16,
           tokenizer="toy:models/bert", init_vit="toy:models/clip")
PRESETS = {
    # student: the CLIP tower's width with 2 of its 4 layers, a random 2 x 64 text stack, 500 scenes
    "toy": dict(TOY, vit_width=128, vit_layers=2, vit_heads=4, vit_mlp=512, text_width=64,
                text_layers=2, text_heads=4, text_ffn=256, train_limit=500, epochs=8,
                lr_decay=0.937, alpha_ramp_epochs=1.6, teacher="runs/dlip_toy_teacher/last.pt",
                out_dir="runs/dlip_toy"),
    # teacher: plain BLIP from the full CLIP tower and a 4 x 128 BERT, all 2000 scenes, 3x longer
    "toy_teacher": dict(TOY, epochs=6, alpha_ramp_epochs=0.4, vit_width=128, vit_layers=4,
                        vit_heads=4, vit_mlp=512, text_width=128, text_layers=4, text_heads=4,
                        text_ffn=512,
                        init_text="toy:models/bert", teacher="", out_dir="runs/dlip_toy_teacher"),
    # the DLIP V2 replication's recipe (github.com/jfan1256/dlip-v2): DeiT-S, a 6 x 384 text stack
    "paper": dict(image_size=224, patch_size=16, vit_width=384, vit_layers=12, vit_heads=6,
                  vit_mlp=1536, text_width=384, text_layers=6, text_heads=12, text_ffn=3072,
                  embed_dim=256, dropout=0.1, init_vit="facebook/deit-small-patch16-224",
                  tokenizer="bert-base-uncased", max_len=30, queue_size=57600,
                  teacher="model_base_capfilt_large.pth", teacher_caption="", global_batch=1152,
                  micro_batch=288, epochs=20, lr=5e-4, warmup_steps=3000,
                  weight_decay=0.02, k_test=256, eval_batch=128, num_workers=8, log_every=50,
                  hflip=True, randaug=True, save_every=2000, out_dir="runs/dlip"),
}
# Fine-tuning recipes (BLIP's retrieval/caption configs, V2's student lr) that --mode retrieval|caption
# applies over the preset, except keys given on the command line (the toy's: docs/dlip.md).
FT = dict(lr_schedule="cosine", warmup_steps=0)
FINETUNE = {
    "toy": {"retrieval": dict(FT, epochs=0.2, lr=1e-4, alpha_ramp_epochs=1.0, train_limit=0),
            "caption": dict(FT, epochs=0.2, lr=1e-4, train_limit=0)},
    "paper": {"retrieval": dict(FT, image_size=384, max_len=35, global_batch=256, micro_batch=32,
                                lr=5e-5, min_lr=0.0, weight_decay=0.05, epochs=6,
                                alpha_ramp_epochs=1.0, k_test=256,
                                grad_ckpt=True),  # BLIP configs/retrieval_coco.yaml
              "caption": dict(FT, image_size=384, max_len=40, global_batch=256, micro_batch=32,
                              lr=5e-5, min_lr=0.0, weight_decay=0.05, epochs=5)},  # caption_coco.yaml
}
# ================================================================================================ Model
# Parameter names follow salesforce/BLIP (timm ViT + BERT names), the layout of BLIP's checkpoints;
# `hf_to_dlip` (Interop section) maps transformers' BLIP names onto it.

class ViTBlock(nn.Module):
    """Pre-LN transformer block (timm names norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, d, heads, mlp, eps, act="gelu"):
        super().__init__()
        self.heads = heads
        self.act = (lambda x: x * torch.sigmoid(1.702 * x)) if act == "quick_gelu" else F.gelu
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        h = attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, Dh)
        x = x + self.attn.proj(h.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.norm2(x))))


def resize_pos_embed(pos, grid):
    """(1, 1+g*g, D) -> (1, 1+grid*grid, D): bicubic resize of the patch grid (224 -> 384 px)."""
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if old == grid:
        return pos
    patches = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)  # (1, grid*grid, D)
    return torch.cat([pos[:, :1], patches.to(pos.dtype)], 1)


class ViT(nn.Module):
    """ViT with a final LayerNorm; outputs all tokens (B, 1 + (S/P)^2, D)."""

    def __init__(self, c):
        super().__init__()
        d, self.grad_ckpt = c.vit_width, c.grad_ckpt
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, c.patch_size, c.patch_size)
        n = (c.image_size // c.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([ViTBlock(d, c.vit_heads, c.vit_mlp, c.vit_eps, c.vit_act)
                                     for _ in range(c.vit_layers)])
        self.norm = nn.LayerNorm(d, eps=c.vit_eps)
        self.norm_pre = nn.LayerNorm(d, eps=c.vit_eps) if c.vit_pre_norm else nn.Identity()

    def forward(self, image, hidden=None):  # (B, 3, S, S) -> (B, 1+N, D)
        """hidden: a list that receives every block's output (B, 1+N, D) (--rep_loss mse)."""
        x = self.patch_embed.proj(image).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = self.norm_pre(x + self.pos_embed)
        for blk in self.blocks:
            if self.grad_ckpt and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if hidden is not None:
                hidden.append(x)
        return self.norm(x)


class BertSelfAttention(nn.Module):
    """BERT attention core; cross-attention reads keys/values from the image tokens. `need_probs`
    computes softmax(QK^T/sqrt(d)) explicitly and returns it (attention distillation); otherwise the
    fused SDPA kernel runs. `cache` (a dict) keeps keys/values across decoding steps, and the image
    keys/values across the training passes that read the same images (BLIP.forward, itm_cache)."""

    def __init__(self, d, heads, kv_dim, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(d, d)
        self.key, self.value = nn.Linear(kv_dim, d), nn.Linear(kv_dim, d)

    def _split(self, x):  # (B, L, D) -> (B, H, L, Dh)
        return split_heads(x, self.heads)

    def forward(self, x, mask, kv=None, cache=None, need_probs=False):
        q = self._split(self.query(x))
        if kv is None:  # self-attention; append to the cache when decoding
            k, v = self._split(self.key(x)), self._split(self.value(x))
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                cache["k"], cache["v"] = k, v
        elif cache is not None and "k" in cache:  # cross-attention: image keys/values computed once
            k, v = cache["k"], cache["v"]
        else:
            k, v = self._split(self.key(kv)), self._split(self.value(kv))
            if cache is not None:
                cache["k"], cache["v"] = k, v
        p = self.dropout if self.training else 0.0
        if not need_probs:
            out, probs = attention(q, k, v, mask=mask, dropout_p=p), None
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(-1)
            out = F.dropout(probs, p) @ v
        return merge_heads(out), probs  # (B, L, D), (B, H, Lq, Lk) or None


class BertAttention(nn.Module):
    def __init__(self, d, heads, kv_dim, dropout, eps):
        super().__init__()
        self.self = BertSelfAttention(d, heads, kv_dim, dropout)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(d, d), nn.LayerNorm(d, eps=eps)
        self.p = dropout

    def forward(self, x, mask, kv=None, cache=None, need_probs=False):
        h, probs = self.self(x, mask, kv, cache, need_probs)
        h = F.dropout(self.output.dense(h), self.p, self.training)
        return self.output.LayerNorm(h + x), probs


class BertLayer(nn.Module):
    """Self-attention, cross-attention to the image (skipped without one), feed-forward; post-LN."""

    def __init__(self, c):
        super().__init__()
        d, eps, p = c.text_width, c.text_eps, c.dropout
        self.attention = BertAttention(d, c.text_heads, d, p, eps)
        self.crossattention = BertAttention(d, c.text_heads, c.vit_width, p, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, c.text_ffn)
        self.output = nn.Module()
        self.output.dense = nn.Linear(c.text_ffn, d)
        self.output.LayerNorm = nn.LayerNorm(d, eps=eps)
        self.p = p

    def forward(self, x, mask, image=None, cache=None, need_probs=False):
        x, sa = self.attention(x, mask, None, cache and cache["self"], need_probs)
        ca = None
        if image is not None:
            x, ca = self.crossattention(x, None, image, cache and cache["cross"], need_probs)
        h = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(F.dropout(h, self.p, self.training) + x), sa, ca


class BertEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.text_width, padding_idx=c.pad_id)
        self.position_embeddings = nn.Embedding(c.max_pos, c.text_width)
        self.LayerNorm = nn.LayerNorm(c.text_width, eps=c.text_eps)
        self.p = c.dropout

    def forward(self, ids, past=0):  # (B, L) -> (B, L, D)
        pos = torch.arange(past, past + ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None]
        return F.dropout(self.LayerNorm(x), self.p, self.training)


class TextModel(nn.Module):
    """BERT with a cross-attention block per layer (BLIP's MED, arXiv 2201.12086 Sec. 3.1), used as
    text encoder (no image), image-grounded encoder (image given) and decoder (causal=True)."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = BertEmbeddings(c)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([BertLayer(c) for _ in range(c.text_layers)])

    def forward(self, ids, mask, image=None, causal=False, need_attn=False, cache=None,
                hidden=None):
        """ids, mask (B, L) [mask covers cached + new tokens]; image (B, Nv, Dv) or None -> hidden
        (B, L, D), last-layer attention maps {"sa": (B, H, L, L+past), "ca": (B, H, L, Nv)}.
        hidden: a list that receives every layer's output (B, L, D) (--rep_loss mse)."""
        past = cache[0]["self"]["k"].shape[2] if cache and "k" in (cache[0]["self"] or {}) else 0
        x = self.embeddings(ids, past)
        m = mask[:, None, None, :].bool()  # (B, 1, 1, Lk): True = may attend
        if causal:
            lq, lk = ids.shape[1], mask.shape[1]
            causal = torch.ones(lq, lk, dtype=torch.bool, device=ids.device).tril(lk - lq)
            m = m & causal  # (B, 1, Lq, Lk)
        layers, attn = self.encoder.layer, {}
        for i, layer in enumerate(layers):
            last = need_attn and i == len(layers) - 1
            x, sa, ca = layer(x, m, image, cache[i] if cache else None, last)
            if hidden is not None:
                hidden.append(x)
            if last:
                attn = {"sa": sa, "ca": ca}
        return x, attn


class TextDecoder(nn.Module):
    """BertLMHeadModel: `bert` (causal MED), `cls.predictions` (dense, GELU, LN, tied output)."""

    def __init__(self, c):
        super().__init__()
        d = c.text_width
        self.bert = TextModel(c)
        self.cls = nn.Module()
        self.cls.predictions = nn.Module()
        t = self.cls.predictions.transform = nn.Module()
        t.dense, t.LayerNorm = nn.Linear(d, d), nn.LayerNorm(d, eps=c.text_eps)
        self.cls.predictions.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, ids, mask, image, need_attn=False, cache=None, hidden=None, head=True):
        h, attn = self.bert(ids, mask, image, True, need_attn, cache, hidden)
        return self.head(h) if head else None, h, attn  # (B, L, V), (B, L, D), maps

    def head(self, h):
        t = self.cls.predictions.transform
        z = t.LayerNorm(F.gelu(t.dense(h)))
        return F.linear(z, self.bert.embeddings.word_embeddings.weight, self.cls.predictions.bias)


def with_first(ids, token):
    """Replace the first token ([CLS]) by [ENC] (image-grounded encoder) or [DEC] (decoder)."""
    ids = ids.clone()
    ids[:, 0] = token
    return ids


@dataclass
class Features:
    """What BLIP.forward returns, for the student and the teacher alike; every loss reads from it.
    proj: the 256-d heads on the image CLS ("img"), text CLS ("txt"), fused [ENC] ("fus") and
    decoder [DEC] ("dec") states; attn: last-layer maps "sa", "ca" (image-grounded encoder) and
    "dsa" (decoder);
    layers: every layer's states for --rep_loss mse (image: CLS only). blip_losses adds what the
    distillation reuses: pos, queues, neg, itm, labels."""
    mask: torch.Tensor                 # (B, L) 1 = real token
    image_embeds: torch.Tensor         # (B, Nv, Dv)
    proj: dict = field(default_factory=dict)
    attn: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)
    kv: list = None                    # per layer, the image-grounded encoder's image keys/values
    image_feat: torch.Tensor = None    # (B, E) normalised proj["img"]
    text_feat: torch.Tensor = None     # (B, E) normalised proj["txt"]
    temp: torch.Tensor = None          # ITC temperature
    image_m: torch.Tensor = None       # (B, E) momentum image and text features
    text_m: torch.Tensor = None
    fused: torch.Tensor = None         # (B, L, Dt) image-grounded encoder, positive pairs
    logits: torch.Tensor = None        # (B, L, V) decoder
    dec_h: torch.Tensor = None         # (B, L, Dt) decoder hidden states
    pos: torch.Tensor = None           # (B, G+Q) positives among ITC candidates; (B, G) no momentum
    queues: tuple = None               # (Q, E) x 2, before this step's enqueue
    neg: tuple = None                  # ITM negatives: ids (2B, L), mask (2B, L), images (B,)
    itm: torch.Tensor = None           # (3B, 2) ITM logits
    labels: torch.Tensor = None        # (B, L) LM targets


class BLIP(nn.Module):
    """BLIP's model; the same class is teacher and student (size and parts from a ModelConfig).

    Parts: image encoder; text encoder + vision_proj/text_proj/itm_head/temp (has_encoder);
    decoder (has_decoder). tie_decoder shares the decoder's embeddings, cross-attention and
    feed-forward with the encoder -- the same Parameter objects (BLIP Sec. 3.1; salesforce/BLIP
    issue #93) -- so only the causal self-attention and the LM head are the decoder's own.
    momentum adds EMA copies of the encoders and the feature queues (BLIP Sec. 3.2, from ALBEF)."""

    def __init__(self, c):
        super().__init__()
        self.c = c = replace(c)
        self.visual_encoder = ViT(c)
        if c.has_encoder:
            self.text_encoder = TextModel(c)
            self.vision_proj = nn.Linear(c.vit_width, c.embed_dim)
            self.text_proj = nn.Linear(c.text_width, c.embed_dim)
            self.itm_head = nn.Linear(c.text_width, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
        if c.has_decoder:
            self.text_decoder = TextDecoder(c)
            if c.tie_decoder:
                enc, dec = self.text_encoder, self.text_decoder.bert
                dec.embeddings = enc.embeddings
                for e, d in zip(enc.encoder.layer, dec.encoder.layer):
                    d.crossattention, d.intermediate = e.crossattention, e.intermediate
                    d.output = e.output
        self.apply(self._init)
        if c.momentum:
            for name in ("visual_encoder", "vision_proj", "text_encoder", "text_proj"):
                setattr(self, name + "_m", copy.deepcopy(getattr(self, name)).requires_grad_(False))
            for name in ("image_queue", "text_queue"):
                queue = F.normalize(torch.randn(c.embed_dim, c.queue_size), dim=0)  # (E, Q)
                self.register_buffer(name, queue)
            self.register_buffer("idx_queue", torch.full((c.queue_size,), -100, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _init(m):  # BERT init (the ViT's own tokens are set in ViT.__init__)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ---- momentum encoders and queues (BLIP Sec. 3.2; ALBEF's momentum distillation)
    def momentum_pairs(self):
        names = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")[:4 * self.c.momentum]
        return [(getattr(self, n), getattr(self, n + "_m")) for n in names]

    @torch.no_grad()
    def momentum_update(self):
        for on, mo in self.momentum_pairs():
            for p, pm in zip(on.parameters(), mo.parameters()):
                pm.mul_(self.c.ema).add_(p.detach(), alpha=1 - self.c.ema)

    @torch.no_grad()
    def enqueue(self, img_feat, txt_feat, idx):
        """Write the all-gathered momentum features (G, E) and image ids at the pointer; advance."""
        g, q = img_feat.shape[0], self.image_queue.shape[1]
        assert q % g == 0, f"queue_size {q} must be divisible by the global micro batch {g}"
        # (G,) on the device, no host sync; wrapped: a resume on more ranks leaves the pointer mid-way
        cols = (self.queue_ptr + torch.arange(g, device=self.queue_ptr.device)).remainder_(q)
        self.image_queue.index_copy_(1, cols, img_feat.T.to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, cols, txt_feat.T.to(self.text_queue.dtype))
        self.idx_queue.index_copy_(0, cols, idx.to(self.idx_queue.dtype))
        self.queue_ptr.add_(g).remainder_(q)

    # ---- the three uses of the text stack
    def image_features(self, image):
        emb = self.visual_encoder(image)  # (B, Nv, Dv)
        return emb, F.normalize(self.vision_proj(emb[:, 0]).float(), dim=-1)

    def text_features(self, ids, mask, hidden=None):
        h, _ = self.text_encoder(ids, mask, hidden=hidden)  # (B, L, Dt)
        return h, F.normalize(self.text_proj(h[:, 0]).float(), dim=-1)

    def fuse(self, ids, mask, image_embeds, need_attn=False, hidden=None, cache=None):
        """Image-grounded encoder on [ENC]-led ids: hidden (B, L, Dt), last-layer attention maps."""
        ids = with_first(ids, self.c.enc_id)
        return self.text_encoder(ids, mask, image_embeds, need_attn=need_attn, cache=cache,
                                 hidden=hidden)

    def itm_cache(self, kv, neg_img, neg_embeds=None):
        """Image keys/values for the ITM pass over [negative images; positives] from those the
        positive pass projected (`kv`; they depend on the image only): the positives' reused, the
        negatives' indexed by `neg_img` (B,), or, when they are other ranks' images, projected from
        `neg_embeds` (B, Nv, Dv). salesforce/BLIP's models/blip_pretrain.py projects them per pass."""
        out = []
        for layer, c in zip(self.text_encoder.encoder.layer, kv):
            att, (k, v) = layer.crossattention.self, (c["cross"]["k"], c["cross"]["v"])  # (B, H, Nv, Dh)
            kn, vn = (k[neg_img], v[neg_img]) if neg_embeds is None else \
                (att._split(att.key(neg_embeds)), att._split(att.value(neg_embeds)))
            out.append({"self": None, "cross": {"k": torch.cat([kn, k]), "v": torch.cat([vn, v])}})
        return out

    def itm_logits(self, ids, mask, image_embeds):  # -> (B, 2) fp32: the eval's re-ranking scores
        h = self.fuse(ids, mask, image_embeds)[0][:, 0]
        with camp.fp32(h.device):  # BLIP evaluates in fp32; bf16 logits tie near-equal pairs
            return self.itm_head(h.float())

    def decode(self, ids, mask, image_embeds, need_attn=False, cache=None, hidden=None, head=True):
        """Decoder on [DEC]-led ids -> logits (B, L, V; None without `head`), hidden (B, L, Dt),
        attention maps. With a filled `cache` (decoding), `ids` are the new tokens only; position 0
        is in the cache."""
        if not (cache and "k" in (cache[0]["self"] or {})):
            ids = with_first(ids, self.c.dec_id)
        return self.text_decoder(ids, mask, image_embeds, need_attn, cache, hidden, head)

    # ---- the training pass: every part the model has, on one batch
    def forward(self, image, ids, mask, need_attn=False, need_layers=False, ema=True):
        """image (B, 3, S, S); ids/mask (B, L) start with [CLS] -> Features. The losses are computed
        from the features outside, where the ranks exchange what they need (blip_losses,
        distill_losses); a momentum model also takes its EMA step here when `ema` (the first micro
        batch of an optimizer step: one EMA step per step, as BLIP's). need_attn: last-layer
        attention maps (explicit softmax); need_layers: every layer's states."""
        hid = {k: [] for k in ("img", "txt", "fus", "dec")} if need_layers else {}
        f = Features(mask=mask, image_embeds=self.visual_encoder(image, hid.get("img")))
        if self.c.has_encoder:
            text_h, _ = self.text_encoder(ids, mask, hidden=hid.get("txt"))  # (B, L, Dt)
            f.proj = dict(img=self.vision_proj(f.image_embeds[:, 0]),
                          txt=self.text_proj(text_h[:, 0]))
            f.image_feat = F.normalize(f.proj["img"].float(), dim=-1)  # (B, E) fp32, for ITC
            f.text_feat, f.temp = F.normalize(f.proj["txt"].float(), dim=-1), self.temp
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)  # with or without momentum (BLIP's blip_pretrain.py)
                if self.c.momentum and ema:
                    self.momentum_update()
                if self.c.momentum:
                    image_m = self.visual_encoder_m(image)[:, 0]
                    f.image_m = F.normalize(self.vision_proj_m(image_m).float(), dim=-1)
                    text_m = self.text_encoder_m(ids, mask)[0][:, 0]
                    f.text_m = F.normalize(self.text_proj_m(text_m).float(), dim=-1)
            f.kv = [{"self": None, "cross": {}} for _ in self.text_encoder.encoder.layer]
            f.fused, f.attn = self.fuse(ids, mask, f.image_embeds, need_attn, hid.get("fus"), f.kv)
            f.proj["fus"] = self.text_proj(f.fused[:, 0])
        if self.c.has_decoder:  # a tied decoder reads the fusion pass's image keys/values
            f.logits, f.dec_h, dec_attn = self.decode(ids, mask, f.image_embeds, need_attn,
                                                      f.kv if self.c.tie_decoder else None,
                                                      hid.get("dec"))
            f.attn = dict(f.attn, dsa=dec_attn.get("sa"))
            if self.c.has_encoder:
                f.proj["dec"] = self.text_proj(f.dec_h[:, 0])
        f.layers = {k: [h[:, 0] for h in v] if k == "img" else v for k, v in hid.items()}
        return f


# ================================================================================================ Losses
def soft_ce(logits, targets):
    """Cross-entropy with soft targets: logits, targets (B, C) whose rows sum to 1 -> scalar."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(1).mean()


def itc_targets(pos, sim_m, alpha):
    """BLIP/ALBEF momentum-distilled ITC targets: alpha * softmax(momentum sims) + (1 - alpha) *
    positives. pos (B, C) bool (same image id), sim_m (B, C) momentum logits -> (B, C)."""
    hard = pos.float() / pos.float().sum(1, keepdim=True)
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * hard


def multinomial_negatives(sim, same, generator):
    """One negative column per row, drawn with probability softmax(sim row) (BLIP Sec. 3.2), never
    a positive. sim (G, G) logits, same (G, G) bool = same image -> (G,) columns. fp32 + nan_to_num:
    AMP overflow cannot crash it (salesforce/BLIP #76, salesforce/LAVIS #107); a row of positives
    only (G = 1) draws uniformly, so the shapes stay fixed."""
    w = F.softmax(sim.float(), dim=1) + 1e-4
    w = torch.nan_to_num(w, nan=1e-4, posinf=1.0, neginf=0.0).masked_fill(same, 0.0)
    w = torch.where(w.sum(1, keepdim=True) <= 0, torch.ones_like(w), w)
    return torch.multinomial(w, 1, generator=generator).squeeze(1)


def token_mean(total, count):
    """Sum over this rank's tokens / the mean token count per rank: with N ranks DDP's gradient
    average equals the gradient of the mean over the global batch's tokens, whatever the padding."""
    return total / cdist.all_reduce_mean(count.detach().float()).clamp_min(1.0)


def lm_loss(logits, labels, smoothing=0.1):
    """Next-token CE with label smoothing: logits (B, L, V) predict labels shifted by one."""
    tgt = labels[:, 1:].flatten()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tgt, ignore_index=-100,
                         label_smoothing=smoothing, reduction="sum")
    return token_mean(ce, (tgt != -100).sum())


def blip_losses(model, s, ids, mask, idx, alpha, gen, rank, smoothing=0.1, prompt_len=1):
    """BLIP's losses (arXiv 2201.12086 Sec. 3.2) from the Features `s` of `model` (unwrapped) on
    this rank's micro batch; idx (B,) image ids. ITC: online features against [momentum features
    of the global batch ; queue], then the queue advances; no momentum model: against the online
    features of the global batch, gathered with gradient. ITM: the positives plus one hard negative
    image per text and text per image, drawn over the global batch by `gen` (seeded alike on every
    rank: N ranks = 1 process), through one more fusion pass. LM: the decoder writes the caption."""
    out, B, gather, dev = {}, ids.shape[0], cdist.all_gather_no_grad, ids.device
    if s.fused is not None:
        idx_g = gather(idx)  # (G,)
    if s.image_m is not None:  # logits in fp32 from fp32 features: bf16's spacing at 8-16 is 0.0625
        with torch.no_grad(), camp.fp32(dev):
            img_m_g, txt_m_g = gather(s.image_m), gather(s.text_m)  # (G, E)
            s.queues = model.image_queue.T.clone(), model.text_queue.T.clone()  # (Q, E)
            img_cand = torch.cat([img_m_g, s.queues[0]])  # (G+Q, E)
            txt_cand = torch.cat([txt_m_g, s.queues[1]])
            s.pos = idx[:, None] == torch.cat([idx_g, model.idx_queue])[None, :]  # (B, G+Q)
            tgt_i2t = itc_targets(s.pos, s.image_m @ txt_cand.T / s.temp, alpha)
            tgt_t2i = itc_targets(s.pos, s.text_m @ img_cand.T / s.temp, alpha)
        with camp.fp32(dev):
            out["itc"] = (soft_ce(s.image_feat @ txt_cand.T / s.temp, tgt_i2t)
                          + soft_ce(s.text_feat @ img_cand.T / s.temp, tgt_t2i)) / 2
        model.enqueue(img_m_g, txt_m_g, idx_g)
    elif s.fused is not None:  # --no_momentum: in-batch ITC over the global batch, alpha unused
        img_g, txt_g = (cdist.all_gather_with_grad(f) for f in (s.image_feat, s.text_feat))
        s.pos = idx[:, None] == idx_g[None, :]  # (B, G); the targets: positives / their count
        with camp.fp32(dev):
            hard = itc_targets(s.pos, s.pos, 0.0)
            out["itc"] = (soft_ce(s.image_feat @ txt_g.T / s.temp, hard)
                          + soft_ce(s.text_feat @ img_g.T / s.temp, hard)) / 2
    if s.fused is not None:
        with torch.no_grad(), camp.fp32(dev):
            img_g, txt_g = gather(s.image_feat), gather(s.text_feat)
            sim = txt_g @ img_g.T / s.temp  # (G, G)
            same = idx_g[:, None] == idx_g[None, :]
            mine = slice(rank * B, (rank + 1) * B)
            neg_img = multinomial_negatives(sim, same, gen)[mine]  # (B,) for my texts
            neg_txt = multinomial_negatives(sim.T, same, gen)[mine]  # (B,) for my images
            ids_g, mask_g = gather(ids), gather(mask)
        emb_g = cdist.all_gather_with_grad(s.image_embeds)  # (G, Nv, Dv), gradient to its rank
        s.neg = torch.cat([ids, ids_g[neg_txt]]), torch.cat([mask, mask_g[neg_txt]]), neg_img
        kv = model.itm_cache(s.kv, neg_img, None if len(emb_g) == B else emb_g[neg_img])
        neg_h, _ = model.fuse(s.neg[0], s.neg[1], s.image_embeds, cache=kv)  # (2B, L, Dt)
        s.itm = model.itm_head(torch.cat([s.fused[:, 0], neg_h[:, 0]]))  # (3B, 2)
        itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)
        out["itm"] = F.cross_entropy(s.itm, itm_labels)
    if s.logits is not None:
        s.labels = ids.masked_fill(mask == 0, -100)  # (B, L): no target on pads, [DEC] + prompt
        s.labels[:, :prompt_len] = -100
        out["lm"] = lm_loss(s.logits, s.labels, smoothing)
    return out


# ---- distillation (DLIP, arXiv 2308.12956 Sec. 3, with the loss set of the DLIP V2 replication)
def rep_loss(a, b):
    """1 - cos(a, b), mean over the batch (V2's CosineEmbeddingLoss, target +1); a, b (B, E)."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def rep_pairs(n_s, n_t, layers):
    """(student layer, teacher layer) pairs, 0-based. last: the last layers; uniform: student layer
    k (1..n_s) -> teacher layer round(k * n_t / n_s), so the last layers always pair."""
    if layers == "last":
        return [(n_s - 1, n_t - 1)]
    if layers == "uniform":
        return [(k - 1, max(1, round(k * n_t / n_s)) - 1) for k in range(1, n_s + 1)]
    raise ValueError(f"--rep_layers {layers!r}: expected last or uniform")


def rep_maps(s_cfg, t_cfg, t_dec_cfg, layers, w):
    """DLIP's L_rep = sum over layers of d(H_S W_s, H_T W_t): a fresh linear map W_s (student width
    -> teacher width; W_t = identity) per distilled layer of each part whose weight is > 0. Trained
    and saved with the student (resume); fine-tuning leaves them behind."""
    maps, s, t, td = nn.ModuleDict(), s_cfg, t_cfg, t_dec_cfg
    for part, (n_s, n_t, d_s, d_t) in {
            "img": (s.vit_layers, t.vit_layers, s.vit_width, t.vit_width),
            "txt": (s.text_layers, t.text_layers, s.text_width, t.text_width),
            "fus": (s.text_layers, t.text_layers, s.text_width, t.text_width),
            "dec": (s.text_layers, td.text_layers, s.text_width, td.text_width)}.items():
        if w.get("rep_" + part, 0) > 0:
            maps[part] = nn.ModuleList([nn.Linear(d_s, d_t) for _ in rep_pairs(n_s, n_t, layers)])
    return maps


def rep_mse_loss(maps, s_layers, t_layers, mask=None):
    """Sum over paired layers of MSE(W_s h_S, h_T) per feature, averaged over the batch (image CLS
    states (B, D), mask None) or over non-padding tokens (text states (B, L, D), mask (B, L))."""
    total = 0.0
    for W, hs, ht in zip(maps, s_layers, t_layers):
        d = (W(hs.float()) - ht.float()).pow(2).mean(-1)  # (B,) or (B, L)
        total = total + (d.mean() if mask is None else token_mean((d * mask).sum(), mask.sum()))
    return total


def lm_kd_loss(s_logits, t_logits, labels, T=1.0):
    """KL(softmax(z_T / T) || softmax(z_S / T)) per predicted position, averaged over the target
    positions only (V2 also counted padding). logits (B, L, V); labels (B, L) unshifted."""
    keep = labels[:, 1:] != -100  # (B, L-1): position p predicts token p+1
    s = F.log_softmax(s_logits[:, :-1][keep].float() / T, -1)  # (N, V)
    t = F.log_softmax(t_logits[:, :-1][keep].float() / T, -1)
    return token_mean(F.kl_div(s, t, log_target=True, reduction="sum"), keep.sum()) * T * T


def attn_kd_loss(a_t, a_s, mask):
    """KL(A_T || A_S) of last-layer attention maps, averaged over heads and non-padding query rows.
    a_t (B, Ht, Lq, Lk), a_s (B, Hs, Lq, Lk) probabilities; mask (B, Lq). Different head counts:
    both maps are averaged over heads first."""
    if a_t.shape[1] != a_s.shape[1]:
        a_t, a_s = a_t.mean(1, keepdim=True), a_s.mean(1, keepdim=True)
    a_t, a_s = a_t.float().clamp_min(1e-8), a_s.float().clamp_min(1e-8)
    kl = (a_t * (a_t.log() - a_s.log())).sum(-1)  # (B, H, Lq)
    rows = mask[:, None, :].float().expand_as(kl)
    return token_mean((kl * rows).sum(), rows.sum())


def distill_losses(s, t, w, alpha=0.4, maps=None, rep_layers="last"):
    """Every distillation term: the student's Features `s` (after blip_losses) against the frozen
    teacher's `t` on the same batch. w: {term: weight}; a term of weight 0 is not computed. maps:
    the W_s maps of --rep_loss mse (None: V2's cosine on the projection heads). Padding never
    counts."""
    on = {k for k, v in w.items() if isinstance(v, (int, float)) and v > 0}
    out = {}
    if "itc_kd" in on:  # ITC logits: the teacher's similarities become the student's ITC targets
        ti, tt, si, st = (f.float() for f in (t.image_feat, t.text_feat, s.image_feat, s.text_feat))
        ti_g, tt_g = cdist.all_gather_no_grad(ti), cdist.all_gather_no_grad(tt)  # (G, E)
        if w.get("itc_kd_kind", "v2") == "v2":  # V2: against the student's queue, with its temp
            temp, (qi, qt) = s.temp.detach(), s.queues or (ti[:0], tt[:0])  # --no_momentum: none
            txt_c, img_c = torch.cat([tt_g, qt.float()]), torch.cat([ti_g, qi.float()])  # (G+Q, E)
            with torch.no_grad(), camp.fp32(ti.device):  # fp32 logits, as in blip_losses
                tgt_i2t = itc_targets(s.pos, ti @ txt_c.T / temp, alpha)  # (B, G+Q)
                tgt_t2i = itc_targets(s.pos, tt @ img_c.T / temp, alpha)
            with camp.fp32(ti.device):
                out["itc_kd"] = (soft_ce(si @ txt_c.T / temp, tgt_i2t)
                                 + soft_ce(st @ img_c.T / temp, tgt_t2i)) / 2
        else:  # kl: the teacher's in-batch similarity rows (CE = KL + the teacher's entropy)
            si_g, st_g = cdist.all_gather_with_grad(si), cdist.all_gather_with_grad(st)  # (G, E)
            with camp.fp32(ti.device):
                p_i2t = F.softmax(ti @ tt_g.T / t.temp.float(), 1)  # (B, G)
                p_t2i = F.softmax(tt @ ti_g.T / t.temp.float(), 1)
                out["itc_kd"] = (soft_ce(si @ st_g.T / s.temp, p_i2t)
                                 + soft_ce(st @ si_g.T / s.temp, p_t2i)) / 2
    for part in ("img", "txt", "fus", "dec"):  # representations: image, text, fused, decoder
        if "rep_" + part not in on:
            continue
        if maps is None:  # V2: the 256-d heads absorb the width difference
            out["rep_" + part] = rep_loss(s.proj[part], t.proj[part])
        else:  # DLIP: mapped hidden states of paired layers
            pairs = rep_pairs(len(s.layers[part]), len(t.layers[part]), rep_layers)
            hs, ht = [s.layers[part][i] for i, _ in pairs], [t.layers[part][j] for _, j in pairs]
            out["rep_" + part] = rep_mse_loss(maps[part], hs, ht, None if part == "img" else s.mask)
    if "lm_kd" in on:  # decoder logits
        out["lm_kd"] = lm_kd_loss(s.logits, t.logits, s.labels)
    for k, a in (("attn_sa", "sa"), ("attn_ca", "ca"), ("attn_dec", "dsa")):  # last-layer maps
        if k in on:
            out[k] = attn_kd_loss(t.attn[a], s.attn[a], s.mask)
    if "itm_kd" in on:  # ITM logits on the same 3B pairs
        out["itm_kd"] = F.kl_div(F.log_softmax(s.itm.float(), -1), F.log_softmax(t.itm.float(), -1),
                                 log_target=True, reduction="batchmean")
    return out


@torch.no_grad()
def teacher_features(ret, cap, image, ids, mask, s=None, itm=False, **need):
    """The frozen teacher on the student's batch -> Features. `ret` has the text encoder and heads,
    `cap` the decoder: one model for a dlip checkpoint, two for split transformers folders, one of
    them None for --ft_distill. itm: also its ITM logits on the student's 3B pairs (its image)."""
    t = (ret or cap)(image, ids, mask, **need)
    if ret is not None and cap is not None and cap is not ret:
        d = cap(image, ids, mask, **need)
        t.logits, t.dec_h, t.attn["dsa"] = d.logits, d.dec_h, d.attn.get("dsa")
        t.layers["dec"], t.proj["dec"] = d.layers.get("dec"), ret.text_proj(d.dec_h[:, 0])
    if itm:
        emb_g = cdist.all_gather_no_grad(t.image_embeds)
        kv = ret.itm_cache(t.kv, s.neg[2], None if len(emb_g) == len(t.image_embeds) else emb_g[s.neg[2]])
        neg = ret.itm_head(ret.fuse(s.neg[0], s.neg[1], t.image_embeds, cache=kv)[0][:, 0])
        t.itm = torch.cat([ret.itm_head(t.fused[:, 0]), neg])  # (3B, 2)
    return t


# ================================================================================================ Data
def load_tokenizer(path):
    """BERT tokenizer + BLIP's special tokens: bos [DEC] (decoder), [ENC] (grounded encoder)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_local(path))
    if tok.convert_tokens_to_ids("[DEC]") in (None, tok.unk_token_id):
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if tok.convert_tokens_to_ids("[ENC]") in (None, tok.unk_token_id):
        tok.add_tokens(["[ENC]"], special_tokens=True)
    ids = dict(enc_id=tok.convert_tokens_to_ids("[ENC]"), dec_id=tok.convert_tokens_to_ids("[DEC]"),
               sep_id=tok.sep_token_id, pad_id=tok.pad_token_id, cls_id=tok.cls_token_id)
    return tok, dict(ids, vocab_size=len(tok))


class PairsDataset(torch.utils.data.Dataset):
    """Canonical pairs as training samples keyed (epoch, item): one item per (image, caption) pair,
    in pretraining as in fine-tuning (salesforce/BLIP data/pretrain_dataset.py and
    coco_karpathy_dataset.py list one caption per entry), so an epoch covers every caption once.
    Augmentation is seeded by (seed, epoch, item): the same stream for any number of ranks and after
    a resume. An unreadable image is replaced by the next record's first pair (equal batch shapes on
    all ranks) and named in the sample's `bad` list: the main process counts it once."""

    def __init__(self, records, image_root, transform, seed, max_words, max_bad_frac):
        self.records, self.transform, self.seed = records, transform, seed
        self.max_words = max_words
        # (record, caption) as numpy arrays, not Python tuples: forked workers share them (docs/data.md)
        self.rec, self.cap = records.pairs()
        self.loader = ImageFolderLoader(image_root, transform, max_bad_frac)

    def __len__(self):
        return len(self.rec)

    def __getitem__(self, key):
        epoch, k = key
        rng, tried, bad, n = random.Random(f"{self.seed}-{epoch}-{k}"), [], [], k % len(self.rec)
        for _ in range(20):
            i, j, r = int(self.rec[n]), int(self.cap[n]), self.records[int(self.rec[n])]
            path, caps = r["image"], r["captions"]
            self.transform.rng = rng
            image = self.loader(path)
            tried.append(path)
            if image is not None:
                return image, pre_caption(caps[j], self.max_words), i, tried, bad
            bad.append(path)
            n = (n + len(caps) - j) % len(self.rec)  # the next record: its captions share the image
        self.loader.check(final=True)
        raise DataError(f"20 unreadable images in a row from item {k}: {self.loader.report()}")


def collate(batch):
    images, caps, idx, tried, bad = zip(*batch)
    return torch.stack(images), list(caps), torch.tensor(idx), sum(tried, []), sum(bad, [])


def shard_batches(cfg, transform, dist, tracker, state, pin=False):
    """Micro-batches from webdataset shards (common.data.ShardStream: split over ranks and workers,
    exact resume from `state`) in collate()'s format; `tracker` counts their unreadable samples."""
    stream = ShardStream(cfg.train_shards, transform, dist.rank, dist.world_size, cfg.seed,
                         max_bad_frac=cfg.max_bad_frac, resume=state)
    for b in stream_loader(stream, cfg.micro_batch, cfg.num_workers, pin):
        tracker.update(b)
        tracker.check()
        yield b["image"], [pre_caption(c, cfg.max_words) for c in b["caption"]], b["image_id"], [], []


def tokenize(tok, caps, max_len, device):
    """(B, L) ids and mask, L = the longest caption's tokens, as BLIP's captioner (models/blip.py);
    blip_pretrain.py / blip_retrieval.py pad to max_len: the pads are masked out of every loss."""
    t = tok(caps, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return t.input_ids.to(device), t.attention_mask.to(device)


class EvalImages:
    """An eval split's images, decoded when indexed: images[i] (3, S, S); images[i:j] or
    images[rows] (n, 3, S, S). Only the batch in use is held (COCO's 5k test images at 384 px are
    ~9 GB as one tensor). An unreadable image is a blank one (a miss), under the bad-image rule."""

    def __init__(self, recs, cfg, size):
        self.paths, self.size = [r["image"] for r in recs], size
        self.loader = ImageFolderLoader(cfg.image_root, image_transforms(cfg, size)[1],
                                        cfg.max_bad_frac)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self[[key]][0]
        rows = range(len(self))[key] if isinstance(key, slice) else key
        ims = [self.loader(self.paths[i]) for i in rows]
        self.loader.check()
        blank = torch.zeros(3, self.size, self.size)
        return torch.stack([blank if im is None else im for im in ims])


def image_transforms(cfg, size):
    """(training, eval) transforms of salesforce/BLIP data/__init__.py: random resized crop (scale
    0.2-1 pretraining, 0.5-1 fine-tuning), --hflip, --randaug; eval: bicubic resize to a square.
    Training images stay uint8 until the device normalises them (micro_step)."""
    scale = (0.2, 1.0) if cfg.mode == "pretrain" else (0.5, 1.0)
    return (ImageTransform(size, train=True, scale=scale, hflip=cfg.hflip, randaug=cfg.randaug,
                           uint8=True), ImageTransform(size, resize="square"))


def eval_set(path, cfg, size):
    """Eval pairs -> records, EvalImages, flat captions, txt2img (caption -> image), img2txts."""
    recs = read_pairs(path)[:cfg.max_eval_images or None]
    texts, txt2img, img2txts = [], [], []
    for i, r in enumerate(recs):
        img2txts.append(list(range(len(texts), len(texts) + len(r["captions"]))))
        texts += [pre_caption(c, cfg.max_words) for c in r["captions"]]
        txt2img += [i] * len(r["captions"])
    return recs, EvalImages(recs, cfg, size), texts, txt2img, img2txts


# ================================================================================================ Eval
def gather_rows(x, n, dist, via=None, chunk=64):
    """This rank's cdist.shard_indices rows of an (n, ...) tensor -> all n rows on every rank: the
    shards are contiguous, so the padded, gathered blocks cut at n are the rows in order.
    via: x and the result live on the host, `chunk` rows per rank crossing device `via` at a time
    (the re-ranking's image tokens: GBs for a 5k-image split; BLIP's train_retrieval.py keeps
    them on the host too)."""
    x = torch.cat([x, x.new_zeros((-(-n // dist.world_size) - len(x), *x.shape[1:]))])
    if via is None:
        return cdist.all_gather_no_grad(x)[:n]
    world = dist.world_size
    parts = [cdist.all_gather_no_grad(x[j:j + chunk].to(via)).cpu().unflatten(0, (world, -1))
             for j in range(0, len(x), chunk)]  # each (world, chunk, ...): rank r's rows j..j+chunk
    return torch.cat(parts, 1).flatten(0, 1)[:n]


@torch.no_grad()
def retrieval_eval(model, images, texts, txt2img, img2txts, tok, cfg, dist, device, dtype, shown=None):
    """TR/IR R@1/5/10 with ITC only and with ITC top-k + ITM re-ranking (k = cfg.k_test). Each rank
    encodes its shard of the images and texts, then all gather them (BLIP's train_retrieval.py has
    every rank encode all); the re-ranking is split over ranks by rows, as BLIP splits it."""
    from common.metrics import reranked_recall, retrieval_recall
    model.eval()
    emb, img_feat, txt_feat, n = [], [], [], cfg.eval_batch
    mine_i, mine_t = cdist.shard_indices(len(images), dist), cdist.shard_indices(len(texts), dist)
    ids, mask = tokenize(tok, texts, max(35, cfg.max_len), device)  # (N_txt, L); BLIP: 35
    with camp.autocast(device, dtype):
        for i in progress(range(0, len(mine_i), n), dist.is_main, desc="images"):
            e, f = model.image_features(images[mine_i[i:i + n]].to(device))
            emb.append(e.to("cpu", dtype)), img_feat.append(f.float())  # ITM K/V Linear: dtype
        for i in range(0, len(mine_t), n):
            rows = mine_t[i:i + n]
            txt_feat.append(model.text_features(ids[rows], mask[rows])[1].float())
    c, nv = model.c, (model.c.image_size // model.c.patch_size) ** 2 + 1
    cat = lambda xs, *shape: torch.cat(xs) if xs else torch.zeros(0, *shape, device=device)  # noqa
    emb = cat(emb, nv, c.vit_width).to("cpu", dtype)
    emb = gather_rows(emb, len(images), dist, via=device)  # (N_img, Nv, Dv) on the host
    img_feat = gather_rows(cat(img_feat, c.embed_dim), len(images), dist)  # (N_img, E)
    txt_feat = gather_rows(cat(txt_feat, c.embed_dim), len(texts), dist)  # (N_txt, E)
    with camp.fp32(device):  # a nearest-neighbour search: no TF32
        sim = img_feat @ txt_feat.T  # (N_img, N_txt)
    if shown is not None:  # the report's: every text's ITC top-5 images (N_txt, 5)
        shown["top5"] = sim.topk(min(5, sim.shape[0]), dim=0).indices.T.cpu()
    metrics = {f"itc_{k}": v for k, v in retrieval_recall(sim.cpu(), txt2img, img2txts).items()}
    if cfg.k_test <= 0:
        return metrics

    def itm(i, m, e):
        with camp.autocast(device, dtype):
            return model.itm_logits(i, m, e)[:, 1]
    i2t = lambda r, c: itm(ids[c], mask[c], emb[[r]].to(device).expand(len(c), -1, -1))  # noqa
    t2i = lambda r, c: itm(ids[[r]].expand(len(c), -1), mask[[r]].expand(len(c), -1),  # noqa
                           emb[c.cpu()].to(device))
    return {**metrics, **reranked_recall(sim, i2t, t2i, cfg.k_test, txt2img, img2txts, dist)}


@torch.no_grad()
def beam_search(model, image_embeds, prompt_ids, num_beams, max_len, min_len, eos,
                length_penalty=1.0):
    """Beam search with a KV cache, as transformers' `_beam_search` (early_stopping=False): keep
    the 2K best continuations; finished ones (EOS among the top K, or max_len) enter a K-best pool
    scored by sum logprob / generated_length^length_penalty; stop when no beam can beat the pool.
    One beam is greedy decoding. prompt_ids (B, P) start with [CLS] (becomes [DEC])."""
    B, P = prompt_ids.shape
    K, dev, pad = num_beams, prompt_ids.device, model.c.pad_id
    img = image_embeds.repeat_interleave(K, 0)  # (B*K, Nv, D)
    kv = [{"self": {}, "cross": {}} for _ in model.text_decoder.bert.encoder.layer]  # KV cache
    running = prompt_ids.repeat_interleave(K, 0).view(B, K, P)
    run_scores = torch.zeros(B, K, device=dev)
    run_scores[:, 1:] = -1e9  # the first step expands the first beam only
    fin_seqs = torch.full((B, K, max_len), pad, dtype=torch.long, device=dev)
    fin_scores = torch.full((B, K), -1e9, device=dev)
    fin_any = torch.zeros(B, K, dtype=torch.bool, device=dev)
    open_ = torch.ones(B, 1, dtype=torch.bool, device=dev)  # early-stop heuristic not yet met
    inp, cur = running.view(B * K, P), P
    while True:
        ones = torch.ones(B * K, cur, dtype=torch.long, device=dev)
        h = model.decode(inp, ones, img, cache=kv, head=False)[1]  # LM head in fp32, as ITM's
        with camp.fp32(dev):
            lp = F.log_softmax(model.text_decoder.head(h[:, -1].float()), -1)  # (B*K, V)
        if cur < min_len:
            lp[:, eos] = -float("inf")
        V = lp.shape[-1]
        top_scores, top_idx = (lp.view(B, K, V) + run_scores[..., None]).view(B, K * V).topk(2 * K)
        beam, token = top_idx // V, top_idx % V  # (B, 2K)
        cand = torch.cat([running.gather(1, beam[..., None].expand(-1, -1, cur)), token[..., None]],
                         2)  # (B, 2K, cur+1)
        finished = (token == eos) | (cur + 1 >= max_len)
        # running beams for the next step: the K best unfinished candidates
        unfinished = top_scores - finished.float() * 1e9
        keep = unfinished.topk(K, dim=1).indices  # (B, K)
        running = cand.gather(1, keep[..., None].expand(-1, -1, cur + 1))
        run_scores, beam_src = unfinished.gather(1, keep), beam.gather(1, keep)
        # the pool: candidates finished among the top K, length-normalised, merged with the pool
        just = finished & (torch.arange(2 * K, device=dev)[None] < K)
        norm = top_scores / ((cur + 1 - P) ** length_penalty)
        norm = norm - (~just).float() * 1e9 - (~open_).float() * 1e9
        tail = torch.full((B, 2 * K, max_len - cur - 1), pad, dtype=torch.long, device=dev)
        scores = torch.cat([fin_scores, norm], 1)
        best = scores.topk(K, dim=1).indices
        fin_seqs = torch.cat([fin_seqs, torch.cat([cand, tail], 2)], 1)
        fin_seqs = fin_seqs.gather(1, best[..., None].expand(-1, -1, max_len))
        fin_scores, fin_any = scores.gather(1, best), torch.cat([fin_any, just], 1).gather(1, best)
        cur += 1
        # early stop (transformers, early_stopping=False): the best running score at this length
        worst = torch.where(fin_any, fin_scores, torch.full_like(fin_scores, 1e9))
        worst = worst.min(1, keepdim=True).values
        worst = torch.where(fin_any.all(1, keepdim=True), worst, torch.full_like(worst, -1e9))
        open_ = open_ & (run_scores[:, :1] / ((cur - P) ** length_penalty) > worst)
        if not open_.any() or finished.all() or cur >= max_len:
            break
        order = (beam_src + torch.arange(B, device=dev)[:, None] * K).view(-1)  # cache rows
        for layer in kv:
            for k in ("k", "v"):
                layer["self"][k] = layer["self"][k][order]
        inp = running[:, :, -1].reshape(B * K, 1)
    return fin_seqs[:, 0]  # (B, max_len) padded


@torch.no_grad()
def nucleus_sample(model, image_embeds, prompt_ids, max_len, min_len, eos, top_p=0.9, top_k=50,
                   penalty=1.1, gen=None):
    """Nucleus sampling (arXiv 1904.09751), BLIP's CapFilt captioner (arXiv 2201.12086 Sec. 3.3):
    BLIP models/blip.py sample=True is transformers' generate, one sequence per image. Its steps,
    in its order, on fp32 logits: repetition penalty (arXiv 1909.05858 Sec. 4.1) on every id so far
    ([DEC], prompt), [SEP] blocked before min_len, top-k (0: off), top-p (drop the unlikeliest while
    their mass <= 1 - top_p), a draw from `gen` (None: torch's global RNG); [PAD] after [SEP]."""
    seq, dev, pad = with_first(prompt_ids, model.c.dec_id), prompt_ids.device, model.c.pad_id
    kv = [{"self": {}, "cross": {}} for _ in model.text_decoder.bert.encoder.layer]  # KV cache
    inp, done, inf = seq, torch.zeros(len(seq), dtype=torch.bool, device=dev), float("inf")
    while seq.shape[1] < max_len and not done.all():
        h = model.decode(inp, torch.ones_like(seq), image_embeds, cache=kv, head=False)[1]
        with camp.fp32(dev):
            s = model.text_decoder.head(h[:, -1].float())  # (B, V)
        g = s.gather(1, seq)
        s = s.scatter(1, seq, torch.where(g < 0, g * penalty, g / penalty))
        s[:, eos] = -inf if seq.shape[1] < min_len else s[:, eos]
        s = s.masked_fill(s < s.topk(min(top_k, s.shape[1]))[0][:, -1:], -inf) if top_k else s
        srt, order = s.sort()  # ascending; the likeliest token (last) always stays
        drop = F.pad(srt.softmax(-1).cumsum(-1)[:, :-1] <= 1 - top_p, (0, 1), value=False)
        s = s.masked_fill(drop.scatter(1, order, drop), -inf)
        inp = torch.multinomial(s.softmax(-1), 1, generator=gen).masked_fill(done[:, None], pad)
        seq, done = torch.cat([seq, inp], 1), done | (inp[:, 0] == eos)
    return F.pad(seq, (0, max_len - seq.shape[1]), value=pad)  # (B, max_len) padded


@torch.no_grad()
def generate(model, images, tok, cfg, device, dtype, prompt, gen=None):
    """Captions: [DEC] + prompt, --decode beam (1 beam: greedy) or nucleus, prompt stripped."""
    model.eval()
    p = tok([prompt] * len(images), return_tensors="pt").input_ids[:, :-1].to(device)  # no [SEP]
    with camp.autocast(device, dtype):
        emb, n = model.visual_encoder(images.to(device)), (cfg.gen_max_len, cfg.gen_min_len)
        seqs = nucleus_sample(model, emb, p, *n, model.c.sep_id, cfg.top_p, cfg.top_k,
                              cfg.repetition_penalty, gen) if cfg.decode == "nucleus" else \
            beam_search(model, emb, p, cfg.num_beams, *n, model.c.sep_id)
    return [tok.decode(s[p.shape[1]:], skip_special_tokens=True,  # BLIP's transformers 4.15 decoded
                       clean_up_tokenization_spaces=True).strip() for s in seqs]  # "man ' s" -> "man's"


@torch.no_grad()
def caption_eval(model, images, recs, tok, cfg, dist, device, dtype, prompt, out_path=None):
    """BLEU-1..4, CIDEr(-D), ROUGE-L against all references; writes the COCO-format result file."""
    from common.metrics import caption_metrics
    rows, res = cdist.shard_indices(len(images), dist), {}
    gen = torch.Generator(device).manual_seed(cfg.seed + dist.rank)  # --decode nucleus: the draws
    for i in progress(range(0, len(rows), cfg.eval_batch), dist.is_main, desc="captions"):
        sl = rows[i:i + cfg.eval_batch]
        res.update(zip(sl, generate(model, images[sl], tok, cfg, device, dtype, prompt, gen)))
    merged = {i: c for part in cdist.all_gather_object(res) for i, c in part.items()}
    gts = {i: [pre_caption(c) for c in recs[i]["captions"]] for i in merged}
    metrics = caption_metrics(gts, {i: [c] for i, c in merged.items()})
    if out_path and dist.is_main:
        with open(out_path, "w") as f:
            json.dump([dict(image_id=i, image=recs[i]["image"], caption=merged[i])
                       for i in sorted(merged)], f)
    return metrics


@torch.no_grad()
def write_report(cfg, teacher, tok, shown, metrics, device, dtype, log, since):
    """<out_dir>/report.html (common/report.py): training curves, the eval figures, and teacher vs
    student side by side on the last eval split: captions of the same images, ITC top-5 images of
    the same caption queries. teacher: (ret, cap), either None; none: the student is shown alone."""
    from common.report import Report, card, columns, grid, table, text, thumb, training_plots
    took_eval, rep, split = time.time() - since, Report(f"dlip.py --mode {cfg.mode}"), shown.get("split")
    ret, cap = teacher or (None, None)
    me, out = "model" if kind(cfg) == "teacher" else "student", lambda n: os.path.join(cfg.out_dir, n)
    with rep.timed():
        curves = training_plots(out("metrics.jsonl")) if os.path.isfile(out("metrics.jsonl")) else []
        rep.section("Training and eval", curves, table(metrics))
        if ret is None and cap is None:
            rep.section("Teacher", text(f"No teacher in this run: the {me} is shown alone."))
        images, texts, n = shown.get("images", []), shown.get("texts"), min(8, len(shown.get("images", [])))
        pic = lambda i, size=96: thumb(images[i], size, CLIP_MEAN, CLIP_STD)  # noqa: E731
        caps = {}
        if cap is not None and n:
            caps["teacher"] = generate(cap, images[:n], tok, cfg, device, dtype, cap.c.prompt)
        if os.path.isfile(out(f"captions_{split}.json")):  # the student's, written by caption_eval
            caps[me] = [r["caption"] for r in json.load(open(out(f"captions_{split}.json")))[:n]]
        if caps:
            refs = [[pre_caption(c) for c in shown["recs"][i]["captions"]] for i in range(n)]
            rep.section(f"Captions ({split})", columns({k: grid(card(pic(i), ("generated", c[i]), (
                "references", refs[i])) for i in range(n)) for k, c in caps.items()}))
        queries, tops = [shown["img2txts"][i][0] for i in range(min(4, n))], {}
        if ret is not None and n:
            with camp.autocast(device, dtype):
                img = torch.cat([ret.image_features(images[i:i + cfg.eval_batch].to(device))[1].float()
                                 for i in range(0, len(images), cfg.eval_batch)])
                ids, mask = tokenize(tok, [texts[q] for q in queries], cfg.max_len, device)
                sim = ret.text_features(ids, mask)[1].float() @ img.T  # (Q, N_img)
                tops["teacher"] = sim.topk(min(5, len(images)), dim=1).indices.tolist()
        if "top5" in shown:
            tops[me] = shown["top5"][queries].tolist()
        if tops:  # a green frame: the query's own image
            rep.section(f"Text -> image, ITC top-5 ({split})", *[[text(f"query: {texts[q]}"), columns({
                k: grid(card(pic(i, 64), f"#{r + 1}", mark=i == shown["txt2img"][q])
                        for r, i in enumerate(top[j])) for k, top in tops.items()})]
                for j, q in enumerate(queries)])
        rep.write(cfg.out_dir)
    log.info(f"report: {out('report.html')} ({rep.seconds:.2f} s; eval {took_eval:.1f} s)")


def retrieval_parts(model):
    return [model.visual_encoder, model.text_encoder, model.vision_proj, model.text_proj,
            model.itm_head]


@torch.no_grad()
def efficiency(model, cfg, device, dtype, tag):
    """Parameters, FLOPs and images/s of the model's parts. FLOPs: one image and one text of
    max_len tokens through image encoder, text encoder and one fused (ITM) pass; captioning: image
    encoder + gen_max_len greedy steps. End to end (images/s, ms/image): retrieval = the work of
    retrieval_eval on k_test random images and texts (encoders, ITC, ITM on the top k_test both
    ways); caption = beam search on eval_batch random images, [DEC] alone as prompt, EOS held off
    until gen_max_len so every model decodes as many steps."""
    model.eval()
    c, n = model.c, cfg.gen_max_len
    image = torch.randn(1, 3, c.image_size, c.image_size, device=device)
    ids = torch.full((1, cfg.max_len), 1000 % c.vocab_size, dtype=torch.long, device=device)
    ids[:, 0] = c.cls_id
    mask = torch.ones_like(ids)
    parts = {"vision": ([model.visual_encoder], None)}
    if c.has_encoder:
        parts["retrieval"] = (retrieval_parts(model), lambda: (
            model.text_features(ids, mask), model.itm_logits(ids, mask, model.image_features(image)[0])))
    if c.has_decoder:
        parts["caption"] = ([model.visual_encoder, model.text_decoder], lambda: beam_search(
            model, model.visual_encoder(image), ids[:, :1], 1, n, n, c.sep_id))
    batch = torch.randn(cfg.eval_batch, 3, c.image_size, c.image_size, device=device)
    with camp.autocast(device, dtype):
        out = size_table(parts)
        out["images_s"] = samples_per_second(lambda: model.visual_encoder(batch), len(batch), device)
        if c.has_encoder:  # k copies of one text: every query's top k_test is the whole set
            k, eb = max(cfg.k_test, 1), cfg.eval_batch
            im = torch.randn(k, *batch.shape[1:], device=device)  # (k, 3, S, S)
            ti, tm, chunks = ids.expand(k, -1), mask.expand(k, -1), range(0, k, eb)

            def retrieval():
                e, fi = map(torch.cat, zip(*[model.image_features(im[i:i + eb]) for i in chunks]))
                ft = torch.cat([model.text_features(ti[i:i + eb], tm[i:i + eb])[1] for i in chunks])
                [(fi @ ft.T).topk(k, d) for d in (1, 0)]  # the ITC shortlists, i2t and t2i
                for r in range(max(cfg.k_test, 0)):  # ITM: image r vs k texts, text r vs k images
                    model.itm_logits(ti, tm, e[[r]].expand(k, -1, -1)), model.itm_logits(ti, tm, e)
            out["images_s_retrieval"] = samples_per_second(retrieval, k, device)
        if c.has_decoder:
            p, steps = ids[:, :1].expand(len(batch), -1), (cfg.num_beams, n, n, c.sep_id)
            out["images_s_caption"] = samples_per_second(lambda: beam_search(
                model, model.visual_encoder(batch), p, *steps), len(batch), device)
    out.update({"ms_image_" + k[9:]: 1e3 / v for k, v in out.items() if k.startswith("images_s_")})
    return {f"{tag}_{k}": v for k, v in out.items()}


# ================================================================================================ Train
def lr_at(cfg, step, total, steps_per_epoch):
    if cfg.lr_schedule == "cosine":
        return cosine_lr(step, total, cfg.warmup_steps, cfg.lr, cfg.min_lr)
    if step < min(cfg.warmup_steps, steps_per_epoch):  # BLIP pretrain.py: warm-up in epoch 0 only
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    return max(cfg.min_lr, cfg.lr * cfg.lr_decay ** (step // steps_per_epoch))


def build_model(cfg, special, log=None):
    """The trainable model: the pretrain student (every part, tied decoder, momentum; --init: the
    tensors of a BLIP .pth or dlip checkpoint that fit its shapes), or the fine-tuning model built
    from --init: retrieval = image + text encoder + heads + momentum; caption = image encoder +
    decoder (BLIP's BLIP_Retrieval / BLIP_Decoder)."""
    if cfg.mode == "pretrain":
        c = ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(Size)}, ema=cfg.momentum,
                        momentum=not cfg.no_momentum, **special)
        model = BLIP(replace(c, **vit_init_config(cfg.init_vit)) if cfg.init_vit else c)
        if cfg.init_vit:
            init_from_hf_vit(model, cfg.init_vit)
        if cfg.init_text:
            init_from_hf_bert(model, cfg.init_text)
        if cfg.init:
            sd, own = load_checkpoint(cfg.init)["model"], model.state_dict()
            fit = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape
                   and k not in QUEUES}
            model.load_state_dict(fit, strict=False)
            if log:
                log.info(f"--init {cfg.init}: {len(fit)} of {len(own)} tensors fit the student")
        for on, mo in model.momentum_pairs():
            mo.load_state_dict(on.state_dict())  # the momentum model starts as a copy
        return model
    if not cfg.init:
        raise ValueError(f"--mode {cfg.mode} needs --init CHECKPOINT (a pretrain run's last.pt)")
    ret = cfg.mode == "retrieval"
    parts = dict(has_encoder=ret, has_decoder=not ret, tie_decoder=False, grad_ckpt=cfg.grad_ckpt,
                 momentum=ret and not cfg.no_momentum, dropout=cfg.dropout, ema=cfg.momentum,
                 prompt="" if ret else cfg.prompt)
    return load_dlip(cfg.init, parts, cfg.image_size, cfg.queue_size, special=special)


def kind(cfg):
    """A run's checkpoint stamp: pretrain (distilled), teacher (plain BLIP), retrieval, caption."""
    return "teacher" if cfg.mode == "pretrain" and not cfg.teacher else cfg.mode


# Fields a resumed run may change: RESUME_FREE plus what only evaluation reads.
RESUME_FREE_DLIP = RESUME_FREE | {"val_file", "test_file", "max_eval_images", "k_test", "num_beams",
                                  "gen_max_len", "gen_min_len", "task", "decode", "top_p", "top_k",
                                  "repetition_penalty"}


def train(cfg, dist, device, dtype, log):
    tok, special = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg, special, log).to(device)
    if model.c.vocab_size != special["vocab_size"]:
        raise ValueError(f"model vocabulary {model.c.vocab_size} != the tokenizer's {len(tok)}")
    teacher, w = load_teacher(cfg, model, special, device, dtype, log)
    aug = image_transforms(cfg, model.c.image_size)[0]
    if cfg.train_shards:  # a stream is not indexed: the sampler below only fixes the accumulation
        data, n_samples = None, shard_sample_count(cfg.train_shards)
    else:
        records = Records.concat([read_pairs(f) for f in cfg.train_files])[:cfg.train_limit or None]
        data = PairsDataset(records, cfg.image_root, aug, cfg.seed, cfg.max_words, cfg.max_bad_frac)
        n_samples = len(data)
    spe = n_samples // cfg.global_batch
    total = cfg.max_steps or max(1, int(round(cfg.epochs * spe)))
    ddp = cdist.wrap_ddp(torch.compile(model) if cfg.compile else model, dist)  # `model`: plain names
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per rank
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scaler, step, stream, best = camp.make_scaler(dtype), 0, None, None
    if cfg.resume:
        ck = load_checkpoint(cfg.resume)
        expect_checkpoint(ck, cfg.resume, "dlip", [kind(cfg)], flag="--resume")
        cosine = cfg.lr_schedule == "cosine"  # max_steps/epochs: its length (step decay: the end)
        free = RESUME_FREE_DLIP - ({"max_steps", "epochs"} if cosine else set())
        check_resume_config(ck["config"], vars(cfg), cfg.resume_changes, log.info, free)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, stream, best = ck["step"], ck.get("stream"), ck.get("best")
        set_rng_state(ck["rng"], dist.rank)
        log.resumed(step)
        log.info(f"resumed {cfg.resume} at step {step}")
    total = max(total, step + cfg.bench + 3) if cfg.bench else total
    sampler = StepSampler(n_samples, cfg.global_batch, cfg.micro_batch, dist.world_size, dist.rank,
                          cfg.seed, step, total)
    tracker = StreamTracker(cfg.train_shards, cfg.max_bad_frac, state=stream) if data is None else None
    pin = device.type == "cuda"  # page-locked batches: the copy to the GPU runs asynchronously
    batches = iter(shard_batches(cfg, aug, dist, tracker, stream, pin) if tracker else
                   make_loader(data, sampler, collate, cfg.num_workers, cfg.seed, dist.rank, pin))
    prompt_len = len(tok(cfg.prompt).input_ids) - 1 if cfg.mode == "caption" else 1  # [DEC]+prompt
    weights = {"itc": cfg.w_itc, "itm": cfg.w_itm, "lm": cfg.w_lm, **w}
    attn = any(w.get(k, 0) > 0 for k in ("attn_sa", "attn_ca", "attn_dec"))
    need = dict(need_attn=attn, need_layers=teacher is not None and cfg.rep_loss == "mse")
    n = count_params(model, trainable=True) / 1e6
    log.info(f"{n_samples} samples, {spe} steps/epoch, {total} steps, accumulation "
             f"{sampler.accum}, {n:.2f}M trainable params")
    if model.c.momentum:  # ITC contrasts each sample with the gathered micro batch and the queue
        g, q = cfg.micro_batch * dist.world_size, model.c.queue_size
        one_pass = f" (global batch {cfg.global_batch} in one pass: {cfg.global_batch - 1 + q})"
        log.info(f"ITC negatives per sample: {g - 1 + q} = {cfg.micro_batch} x {dist.world_size} "
                 f"ranks - 1 + queue {q}" + (one_pass if sampler.accum > 1 else ""))

    def micro_step(batch, step, a):
        images, caps, idx, tried, bad = batch
        if data is not None:  # the one bad-image rule: distinct images, also from workers
            data.loader.merge(tried, bad)
            data.loader.check()
        images, idx = aug.normalize(images.to(device, non_blocking=True)), idx.to(device)  # uint8 in
        caps = [cfg.prompt + c for c in caps] if cfg.mode == "caption" else caps
        ids, mask = tokenize(tok, caps, cfg.max_len, device)
        ids, mask = cdist.pad_across_ranks(ids, mask, tok.pad_token_id)  # ITM gathers ids: one length
        ramp = max(1.0, cfg.alpha_ramp_epochs * spe)
        alpha = cfg.alpha * min(1.0, step / ramp) if cfg.alpha_ramp_epochs else cfg.alpha
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * 97 + a)
        with camp.autocast(device, dtype):
            s = ddp(images, ids, mask, **need, ema=a == 0)
            terms = blip_losses(model, s, ids, mask, idx, alpha, gen, dist.rank,
                                cfg.label_smoothing, prompt_len)
            if teacher is not None:
                t = teacher_features(*teacher, images, ids, mask, s, w.get("itm_kd", 0) > 0, **need)
                maps = getattr(model, "rep_maps", None)
                terms.update(distill_losses(s, t, w, alpha, maps, cfg.rep_layers))
        return sum(weights[k] * v for k, v in terms.items()), terms

    def next_batches():  # this step's micro batches, from the loader
        return [next(batches) for _ in range(sampler.accum)]

    def optimizer_step(step, micro=None):
        lr = lr_at(cfg, step, total, spe)
        set_lr(opt, lr)
        sums = {}
        for a, batch in enumerate(micro or next_batches()):
            sync = a == sampler.accum - 1 or dist.world_size == 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                loss, terms = micro_step(batch, step, a)
                scaler.scale(loss / sampler.accum).backward()
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / sampler.accum
        keys = sorted(sums)  # one host sync per step: rank-averaged terms, checked before the step
        sums = dict(zip(keys, cdist.all_reduce_mean(torch.stack([sums[k] for k in keys])).tolist()))
        gnorm = optimizer_update(opt, scaler, model.parameters(), cfg.grad_clip, step, sums)
        return sums, lr, gnorm

    if cfg.bench:
        model.train()
        state = {"step": step}

        def one(micro):
            optimizer_step(state["step"], micro)
            state["step"] += 1
        flops = count_flops(lambda: one(next_batches())) if device.type == "cuda" else None
        return run_bench(one, cfg.bench, cfg.global_batch, device, warmup=2, flops_per_step=flops,
                         dtype=dtype, data_fn=next_batches)  # data (the real loader) timed apart

    timer, history, metrics, flops_step = StepTimer(device), [], {}, None
    best_pt = os.path.join(cfg.out_dir, "best.pt")  # a resumed fine-tuning keeps its best epoch
    model.train()
    while step < total:
        timer.start()
        if flops_step is None and device.type == "cuda":  # the first step's FLOPs, for MFU
            flops_step = count_flops(lambda: history.append(optimizer_step(step))) * dist.world_size
            sums, lr, gnorm = history.pop()
        else:
            sums, lr, gnorm = optimizer_step(step)
        tm = timer.stop(cfg.global_batch)
        step += 1
        history.append(sums)
        if step % cfg.log_every == 0 or step == total:
            m = mfu(flops_step, tm["ms_step"] / 1000, device, dist.world_size, dtype)
            log.log(step, **sums, lr=lr, grad_norm=gnorm, **tm, **({} if m is None else {"mfu": m}))
        if step == 1 and cfg.ft_distill and sums.get("rep_txt", 0) > 0.5:  # cosine < 0.5: not aligned
            log.info(f"warning: the student's text head starts far from the teacher's (rep_txt "
                     f"{sums['rep_txt']:.2f}); --ft_distill suits a student distilled from it (docs/dlip.md)")
        at_epoch = cfg.mode != "pretrain" and cfg.val_file and (step == total
                                                                or step % max(1, spe) == 0)
        if at_epoch or cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            metrics = evaluate(cfg, model, tok, dist, device, dtype, cfg.val_file, "val", log)
            if at_epoch and (best is None or val_score(metrics) > val_score(best)):
                best = dict(metrics, best_epoch=step / max(1, spe), best_step=step)
                save(cfg, model, opt, scaler, step, best, dist, tracker, "best.pt")
        if cfg.save_every and step % cfg.save_every == 0 and step < total:  # after this step's val
            save(cfg, model, opt, scaler, step, metrics, dist, tracker, best=best)
    log.info(f"training images: {(tracker or data.loader).report()}")
    (tracker or data.loader).check(final=True)
    metrics = {"final_" + k: v for k, v in history[-1].items()} if history else {}
    metrics.update({"first_" + k: v for k, v in history[0].items()} if history else {})
    save(cfg, model, opt, scaler, step, metrics, dist, tracker, best=best)
    shown, took_eval = {}, time.time()
    if best:  # BLIP's train_retrieval.py / train_caption.py: test the best val epoch's weights
        ck = load_checkpoint(best_pt) if os.path.isfile(best_pt) else {}  # from this run?
        if cdist.same_on_every_rank(ck.get("step"), f"the step of {best_pt}") != best["best_step"]:
            raise ValueError(f"{best_pt} is not the best val epoch (step {best['best_step']}) that "
                             "last.pt records: copy the run's best.pt there, --resume last.pt")
        model.load_state_dict(ck["model"])
        metrics.update(best)
        log.info(f"best val epoch {best['best_epoch']:.3g} (step {best['best_step']}, score "
                 f"{val_score(best):.4g}): the test split is evaluated with best.pt")
    for split, path in (("val", "" if best else cfg.val_file), ("test", cfg.test_file)):
        if path:
            metrics.update(evaluate(cfg, model, tok, dist, device, dtype, path, split, log, shown))
    if cfg.report and dist.is_main:
        write_report(cfg, teacher, tok, shown, metrics, device, dtype, log, took_eval)
    return metrics


def val_score(m):
    """Fine-tuning's model selection: val r_mean (BLIP's train_retrieval.py; ITC's without ITM
    re-ranking), val CIDEr + BLEU-4 (train_caption.py)."""
    cap = m.get("val_CIDEr", 0) + m.get("val_BLEU-4", 0)
    return cap if "val_CIDEr" in m else m.get("val_r_mean", m.get("val_itc_r_mean"))


def save(cfg, model, opt, scaler, step, metrics, dist, tracker=None, name="last.pt", best=None):
    rngs = cdist.all_gather_object(rng_state())  # every rank's generators: a resume restores each its own
    stream = tracker and StreamTracker.merge_states(cdist.all_gather_object(tracker.state_dict()))
    if dist.is_main:
        save_checkpoint(os.path.join(cfg.out_dir, name), {
            "script": "dlip", "kind": kind(cfg), "config": vars(cfg).copy(),
            "model_config": asdict(model.c), "model": model.state_dict(), "step": step,
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
            "metrics": metrics, "stream": stream, "best": best})  # best: the best val so far
    cdist.barrier()


def evaluate(cfg, model, tok, dist, device, dtype, path, split, log, shown=None):
    """The mode's metrics on one split: retrieval (ITC and ITC+ITM recalls) and/or captioning.
    shown: a dict that receives the split's images, texts and ITC top-5 images (the report's)."""
    shown = {} if shown is None else shown
    shown.clear()
    recs, images, texts, txt2img, img2txts = eval_set(path, cfg, model.c.image_size)
    out, c, task = {}, model.c, cfg.task
    shown.update(split=split, recs=recs, images=images, texts=texts, txt2img=txt2img, img2txts=img2txts)
    if c.has_encoder and cfg.mode != "caption" and task in ("all", "retrieval"):
        out.update(retrieval_eval(model, images, texts, txt2img, img2txts, tok, cfg, dist, device,
                                  dtype, shown))
    if c.has_decoder and cfg.mode != "retrieval" and task in ("all", "caption"):
        os.makedirs(cfg.out_dir, exist_ok=True)  # decoded with the prompt the decoder learnt
        out.update(caption_eval(model, images, recs, tok, cfg, dist, device, dtype, c.prompt,
                                os.path.join(cfg.out_dir, f"captions_{split}.json")))
    images.loader.check(final=True)  # the bad-image rule over the images this rank decoded
    out, report = {f"{split}_{k}": v for k, v in out.items()}, images.loader.report()
    log.info(f"{split} ({report}): " + " ".join(f"{k} {v:.4g}" for k, v in out.items()))
    model.train()
    return out


# ================================================================================================ main
def resolve(cfg, argv, dist=None):
    """The preset's fine-tuning recipe (keys not on the command line) and, for the toy presets, the
    toy world's files ("toy:<path>" values, empty data fields; built on first use: CLIP, BERT)."""
    given = given_flags(argv)
    for k, v in FINETUNE["paper" if cfg.preset == "paper" else "toy"].get(cfg.mode, {}).items():
        if k not in given:
            setattr(cfg, k, v)
    if cfg.mode != "eval":  # before any model or data: the micro batch this world size runs
        fit_micro(cfg, dist.world_size if dist else 1, Logger("", not dist or dist.is_main).info)
    toy = {f: v[4:] for f, v in vars(cfg).items() if isinstance(v, str) and v.startswith("toy:")}
    for f in toy:
        setattr(cfg, f, "")
    if cfg.preset.startswith("toy") and not (cfg.train_files and cfg.image_root):
        toy["image_root"] = "."
        if not cfg.train_files:
            toy.update(train_files="pairs_train.jsonl", val_file="pairs_val.jsonl",
                       test_file="pairs_test.jsonl")
    from data.toy import toy_paths
    toy_paths(cfg, toy, ["clip", "bert"], dist is None or dist.is_main, dist and cdist.barrier)
    if isinstance(cfg.train_files, str):
        cfg.train_files = [cfg.train_files]
    return cfg


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(Config, PRESETS, argv, f"--preset paper distils BLIP's pretrained ViT-B "
                       f"(CapFilt-L), --teacher model_base_capfilt_large.pth: download it from {BLIP_URL}")
    check_choices(cfg, mode="pretrain|retrieval|caption|eval|params",
                  task="retrieval|caption|efficiency|all", decode="beam|nucleus", itc_kd="v2|kl",
                  lr_schedule="step|cosine", rep_loss="cos|mse", rep_layers="last|uniform")
    if cfg.mode == "params":
        return params_mode(cfg, Logger("", True))
    if cfg.ft_distill and cfg.mode not in ("caption", "retrieval"):
        raise ValueError("--ft_distill is for --mode caption or retrieval (fine-tuning)")
    dist = cdist.setup_distributed(cfg.device)
    try:
        cfg = resolve(cfg, argv, dist)
        if cfg.eval_every and cfg.mode != "eval" and not cfg.val_file:  # before any training step
            raise ValueError(f"--eval_every {cfg.eval_every} needs --val_file (none given)")
        device, dtype = dist.device, camp.pick_dtype(dist.device, cfg.precision)
        camp.seed_everything(cfg.seed)  # the same initial weights on every rank
        log = Logger(cfg.out_dir, dist.is_main)
        if cfg.mode == "eval":
            if cfg.task != "efficiency" and not os.path.isfile(cfg.test_file):  # before any loading
                raise ValueError(f"--mode eval --task {cfg.task} reads --test_file ("
                                 f"{cfg.test_file or 'not given'}: no such file); pass it")
            eval_at_checkpoint_shape(cfg, argv, log)
        log.info(f"dlip.py --mode {cfg.mode} (preset {cfg.preset}, world {dist.world_size}, "
                 f"{device}, {dtype})\n" + format_config(cfg))
        if dist.is_main:
            save_config(cfg, cfg.out_dir)
        metrics = run_eval(cfg, dist, device, dtype, log) if cfg.mode == "eval" else \
            train(cfg, dist, device, dtype, log)
    finally:
        cdist.cleanup_distributed()
    if dist.is_main:
        with open(os.path.join(cfg.out_dir, f"metrics_{cfg.mode}.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


def eval_at_checkpoint_shape(cfg, argv, log):
    """--mode eval: the image size and text length the --ckpt was trained at, unless given on the
    command line (a preset's 224 px would shrink a 384-px fine-tuned model's position embedding)."""
    if not (cfg.ckpt.endswith((".pt", ".pth")) and os.path.isfile(cfg.ckpt)):
        return  # a transformers folder records no text length: the flags stand
    given, ck = given_flags(argv), load_checkpoint(cfg.ckpt)
    saved = {"image_size": blip_pth_config(ck["model"], {}).image_size} if is_blip_pth(ck) else \
        {k: v for k, v in (ck.get("config") or {}).items() if k in ("image_size", "max_len")}
    took = {k: v for k, v in saved.items() if k not in given}
    for k, v in took.items():
        setattr(cfg, k, v)
    log.info(f"eval at image_size {cfg.image_size}, max_len {cfg.max_len} (the checkpoint's: "
             f"{', '.join(took) or 'none'}; given: {', '.join(sorted(given & set(saved))) or '-'})")


def run_eval(cfg, dist, device, dtype, log):
    if not cfg.ckpt:
        raise ValueError("--mode eval needs --ckpt")
    tok, special = load_tokenizer(cfg.tokenizer)
    models, out = {"student": load_any(cfg.ckpt, special, cfg, "--ckpt")}, {}
    part = {"retrieval": "has_encoder", "caption": "has_decoder"}.get(cfg.task)  # all: what it has
    if part and not getattr(models["student"].c, part):
        raise ValueError(f"--task {cfg.task}: --ckpt {cfg.ckpt} has no text {part[4:]}")
    there = os.path.exists(cfg.teacher)  # --task all, the page: the default --teacher may be absent
    if cfg.teacher and (cfg.task == "efficiency" or there and (cfg.task == "all" or cfg.report)):
        models["teacher"] = load_any(cfg.teacher, special, cfg, "--teacher")
    for tag, m in models.items():
        m.to(device).eval().requires_grad_(False)
        if cfg.task in ("efficiency", "all"):
            out.update(efficiency(m, cfg, device, dtype, tag))
    for k in [k for k in out if k.startswith(("student_params", "student_ms_image"))]:
        if k.replace("student", "teacher") in out:  # student / teacher (DLIP: 22.4%, 2.7x faster)
            out[k.replace("params", "param_ratio").replace("ms_image", "ms_ratio")] = \
                out[k] / out[k.replace("student", "teacher")]
    shown, since = {}, time.time()
    if cfg.task in ("retrieval", "caption", "all") and cfg.test_file:
        out.update(evaluate(cfg, models["student"], tok, dist, device, dtype, cfg.test_file, "test",
                            log, shown))
    log.info(json.dumps(out, indent=1))
    t = models.get("teacher")
    if cfg.report and dist.is_main:
        write_report(cfg, t and (t if t.c.has_encoder else None, t if t.c.has_decoder else None),
                     tok, shown, out, device, dtype, log, since)
    return out


def params_mode(cfg, log):
    """The student (trainable; its momentum copies frozen) and the frozen teacher at the preset's sizes, built
    on the meta device (no weights, no network: common.hf.published_config for hub names): parameters per
    part as `efficiency` counts them, and GFLOPs of one sample of its protocol at --image_size, the caption
    part's greedy decoding counted as one pass over gen_max_len tokens (the same matmuls as with a cache)."""
    c = ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(Size)}, ema=cfg.momentum,
                    momentum=not cfg.no_momentum)
    models = {"student": [(c, "")]}
    if cfg.teacher:  # a dlip or BLIP checkpoint, or transformers folders / hub names
        ck = load_checkpoint(cfg.teacher) if cfg.teacher.endswith(".pt") or os.path.isfile(cfg.teacher) \
            else None
        # a BLIP .pth not at hand: the released transformers BLIP ViT-B models, the same shapes
        hub = ("Salesforce/blip-itm-base-coco", "Salesforce/blip-image-captioning-base") \
            if cfg.teacher.endswith(".pth") else (cfg.teacher, cfg.teacher_caption)
        models["teacher"] = [(blip_pth_config(ck["model"], {}) if is_blip_pth(ck) else replace(
            ModelConfig(**(ck.get("model_config") or ck["shape"])), momentum=False), "")] if ck else \
            [(blip_config(published_config(n).to_dict(), r, {}), s)
             for n, r, s in ((hub[0], True, "_itm"), (hub[1], False, "_cap")) if n]
    out = {}
    for tag, confs in models.items():
        for mc, sfx in confs:
            with torch.device("meta"):
                m, p = BLIP(mc).eval(), f"{tag}{sfx}_"
            out[p + "trainable"] = count_params(m, trainable=True) if tag == "student" else 0
            out[p + "frozen"] = count_params(m) - out[p + "trainable"]
            out.update({f"{p}params_{k}": count_params(v) for k, v in m.named_children()})
            m = set_image_size(m, cfg.image_size)
            image = torch.zeros(1, 3, cfg.image_size, cfg.image_size, device="meta")
            t, tc = (torch.ones(1, n, dtype=torch.long, device="meta") for n in (cfg.max_len, cfg.gen_max_len))
            parts = {"vision": ([m.visual_encoder], lambda: m.visual_encoder(image))}  # ids = mask = 1
            if mc.has_encoder:
                parts["retrieval"] = (retrieval_parts(m), lambda: (
                    m.text_features(t, t), m.itm_logits(t, t, m.image_features(image)[0])))
            if mc.has_decoder:
                parts["caption"] = ([m.visual_encoder, m.text_decoder],
                                    lambda: m.decode(tc, tc, m.visual_encoder(image)))
            with torch.no_grad():
                out.update({p + k: v for k, v in size_table(parts).items()})
    log.info(counts_table(out))
    return out


# ================================================================================================ Interop
# What is not trained here: the frozen teacher (a dlip checkpoint or transformers BLIP folders,
# through the name map below), dlip checkpoints as other parts, HF ViT / CLIP / BERT student inits.

DEC_TERMS = ("lm_kd", "rep_dec", "attn_dec")  # the distillation terms that read a teacher decoder


def load_teacher(cfg, model, special, device, dtype, log):
    """((ret, cap), distillation weights) of the run, or (None, {}). `ret` is the frozen teacher's
    retrieval part (text encoder and heads), `cap` its decoder: one model for a dlip checkpoint, two
    for split transformers folders; --ft_distill: (None, the teacher's decoder) for caption,
    (the teacher's encoders and heads, None) for retrieval fine-tuning."""
    if not cfg.ft_distill and (cfg.mode != "pretrain" or not cfg.teacher):
        if cfg.mode == "pretrain":
            log.info("no teacher: plain BLIP pretraining (ITC + ITM + LM)")
        return None, {}
    ft_cap, ft_ret = (cfg.ft_distill and cfg.mode == m for m in ("caption", "retrieval"))
    path = (cfg.teacher_caption or cfg.teacher) if ft_cap else cfg.teacher
    if ft_cap:  # caption fine-tuning: the decoder terms only
        w = {"lm_kd": cfg.w_lm_kd, "attn_dec": cfg.w_attn_dec}
    else:  # {term: weight} of every distillation term (distill_losses) and the ITC-KD variant
        names = ("itc_kd", "rep_img", "rep_txt", "rep_fus", "rep_dec", "lm_kd", "attn_sa", "attn_ca",
                 "attn_dec", "itm_kd")  # retrieval fine-tuning: all but the decoder's
        w = dict({k: getattr(cfg, "w_" + k) for k in names if not (ft_ret and k in DEC_TERMS)},
                 itc_kd_kind=cfg.itc_kd)
    ckpt = path.endswith((".pt", ".pth"))
    if path.endswith(".pth") and not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint {path} not found; BLIP's pretrained ViT-B: {BLIP_URL}")
    if ckpt and not os.path.isfile(path):
        how = f"--mode {cfg.mode} --init runs/dlip_toy_teacher/last.pt" if cfg.ft_distill else \
            "--preset toy_teacher"
        raise FileNotFoundError(f"teacher checkpoint {path} not found; train one first: "
                                f"python dlip.py {how} --out_dir {os.path.dirname(path)}")
    frozen = dict(momentum=False, dropout=0.0)
    if ft_cap:  # a pretrain or a caption checkpoint: the untied decoder loads from both
        dec = dict(frozen, has_encoder=False, has_decoder=True, tie_decoder=False)
        ret, cap = None, load_dlip(path, dec, cfg.image_size, flag="--teacher", special=special,
                                   prompt=cfg.prompt) if ckpt else \
            load_hf_blip(path, special, cfg.image_size)
    elif ft_ret:  # a pretrain or a retrieval checkpoint, or a BlipForImageTextRetrieval folder
        enc = dict(frozen, has_encoder=True, has_decoder=False, tie_decoder=False)
        ret, cap = load_dlip(path, enc, cfg.image_size, flag="--teacher", special=special) if ckpt \
            else load_hf_blip(path, special, cfg.image_size, cfg.teacher_temp), None
    elif ckpt:
        ret = cap = load_dlip(path, frozen, cfg.image_size, flag="--teacher", special=special)
    else:
        ret = load_hf_blip(path, special, cfg.image_size, cfg.teacher_temp)
        cap = load_hf_blip(cfg.teacher_caption, special, cfg.image_size) if cfg.teacher_caption \
            else None
    if ret is not None and not ret.c.has_encoder:
        raise ValueError(f"{path}: the teacher needs a text encoder and heads (a retrieval model)")
    if cap is not None and not cap.c.has_decoder:
        raise ValueError(f"{cfg.teacher_caption or path}: has no decoder")
    for k in DEC_TERMS:
        if cap is None and w.get(k, 0) > 0:
            raise ValueError(f"w_{k} > 0 needs a teacher decoder: --teacher_caption, or --w_{k} 0")
    for m in {id(ret): ret, id(cap): cap}.values():
        if m is not None:
            if m.c.vocab_size != special["vocab_size"]:
                raise ValueError(f"teacher vocabulary {m.c.vocab_size} != student's "
                                 f"{special['vocab_size']}: they must share the tokenizer")
            m.requires_grad_(False).eval().to(device=device, dtype=camp.frozen_dtype(device, dtype))
    if ret is not None:
        if ret.c.embed_dim != model.c.embed_dim:
            raise ValueError(f"teacher projection width {ret.c.embed_dim} != student embed_dim")
        if cfg.rep_loss == "mse":
            model.rep_maps = rep_maps(model.c, ret.c, (cap or ret).c, cfg.rep_layers, w).to(device)
        n_t, n_s = count_params(retrieval_parts(ret)), count_params(retrieval_parts(model))
        log.info(f"teacher retrieval model {n_t / 1e6:.2f}M params, student {n_s / 1e6:.2f}M")
    log.info(f"distilling {path}: " + ", ".join(f"{k} {v}" for k, v in w.items()))
    return (ret, cap), w


# transformers BlipVisionModel names -> timm/BLIP ViT names
HF_VISION = [(r"embeddings\.class_embedding$", "cls_token"),
             (r"embeddings\.position_embedding$", "pos_embed"),
             (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
             (r"post_layernorm\.", "norm."),
             (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
             (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
             (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
             (r"encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
             (r"encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp.")]


def hf_to_dlip(sd):
    """transformers BlipForImageTextRetrieval / BlipForConditionalGeneration state dict -> our
    names (the text stacks and heads already carry BLIP's names)."""
    out, unused = {}, []
    for k, v in sd.items():
        if k.endswith("position_ids") or k.startswith("text_decoder.cls.predictions.decoder."):
            continue  # buffers; the LM projection is tied to the word embeddings, its bias to .bias
        if k.startswith("vision_model."):
            k = k[len("vision_model."):]
            nk = next((re.sub(p, r, k) for p, r in HF_VISION if re.match(p, k)), None)
            (out.__setitem__("visual_encoder." + nk, v) if nk else unused.append(k))
        elif k.split(".")[0] in ("text_encoder", "text_decoder", "vision_proj", "text_proj",
                                 "itm_head"):
            out[k] = v
        else:
            unused.append(k)
    if unused:
        raise ValueError(f"unexpected keys in the transformers checkpoint: {unused[:5]}")
    return out


def load_hf_blip(path, special, image_size=None, temp=0.07):
    """A transformers BLIP folder -> BLIP, strictly: all our weights filled, all of theirs used."""
    path = resolve_local(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    arch = (config.get("architectures") or [""])[0]
    if arch not in ("BlipForImageTextRetrieval", "BlipForConditionalGeneration"):
        raise ValueError(f"{path}: architectures {arch!r}; expected BlipForImageTextRetrieval or "
                         f"BlipForConditionalGeneration")
    ret = arch == "BlipForImageTextRetrieval"
    model = BLIP(blip_config(config, ret, special))
    sd = hf_to_dlip(read_hf_weights(path))
    if ret:
        sd["temp"] = torch.tensor(temp)  # HF keeps no ITC temperature
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{path}: does not match the model: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, shape mismatch {bad[:4]}")
    model.load_state_dict(sd)
    return set_image_size(model, image_size)


def blip_config(config, ret, special):
    """The ModelConfig of a transformers BLIP config.json (dict): retrieval or caption model."""
    v, t = config["vision_config"], config["text_config"]
    act = (v.get("hidden_act", "gelu"), t.get("hidden_act", "gelu"))
    assert act == ("gelu", "gelu"), f"only exact GELU BLIP models are supported, got {act}"
    return ModelConfig(
        image_size=v.get("image_size", 384), patch_size=v.get("patch_size", 16),
        vit_width=v["hidden_size"], vit_layers=v["num_hidden_layers"],
        vit_heads=v["num_attention_heads"], vit_mlp=v["intermediate_size"],
        vit_eps=v.get("layer_norm_eps", 1e-5), text_width=t["hidden_size"],
        text_layers=t["num_hidden_layers"], text_heads=t["num_attention_heads"],
        text_ffn=t["intermediate_size"],
        text_eps=t.get("layer_norm_eps", 1e-12), max_pos=t.get("max_position_embeddings", 512),
        embed_dim=config.get("image_text_hidden_size", 256), has_encoder=ret, has_decoder=not ret,
        tie_decoder=False, momentum=False, queue_size=0, **special)


def set_image_size(model, size):
    """Resize the position embeddings of every ViT in `model` to a new input size (bicubic)."""
    if size and size != model.c.image_size:
        for vit in [m for m in model.modules() if isinstance(m, ViT)]:
            pos = resize_pos_embed(vit.pos_embed.data, size // model.c.patch_size)
            vit.pos_embed = nn.Parameter(pos, requires_grad=vit.pos_embed.requires_grad)
        model.c.image_size = size
    return model


QUEUES = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


# salesforce/BLIP's released checkpoints, e.g. the pretrained ViT-B teacher of the paper preset:
BLIP_URL = ("https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
            "model_base_capfilt_large.pth")  # the teacher of DLIP V2's pretrain_dlip.py
# They hold {"model": state_dict} under the names of this file already (transformers'
# convert_blip_original_pytorch_to_hf.py renames only their timm ViT keys); what a model here does
# not take: momentum copies and queues (of a frozen teacher), position_ids, the LM head's tied
# `decoder` projection.
BLIP_EXTRA = re.compile(r".*(_m\.|_queue$|queue_ptr$|ptr_queue$|position_ids$|predictions\.decoder\.)")


def is_blip_pth(ck):
    return isinstance(ck, dict) and not ck.get("script") and "visual_encoder.cls_token" in \
        (ck.get("model") or {}) and not (ck.get("model_config") or ck.get("shape"))


def blip_pth_config(sd, special, prompt=""):
    """The ModelConfig of a salesforce/BLIP state dict, read off its tensor shapes. Heads are 64
    wide in every released BLIP (ViT-B/L, BERT-base; models/vit.py, configs/med_config.json).
    prompt: a caption model's (BLIP_Decoder: no text encoder), which BLIP fine-tunes and decodes
    with one (models/blip.py, configs/caption_coco.yaml); a pretrain model has none."""
    g = lambda k: sd[k].shape  # noqa: E731
    n = lambda p: 1 + max(int(k[len(p):].split(".")[0]) for k in sd if k.startswith(p))  # noqa
    txt = "text_encoder" if "text_encoder.embeddings.word_embeddings.weight" in sd else "text_decoder.bert"
    vw, patch, (vocab, tw) = g("visual_encoder.cls_token")[-1], \
        g("visual_encoder.patch_embed.proj.weight")[-1], g(f"{txt}.embeddings.word_embeddings.weight")
    return ModelConfig(
        image_size=patch * round((g("visual_encoder.pos_embed")[1] - 1) ** 0.5), patch_size=patch,
        vit_width=vw, vit_layers=n("visual_encoder.blocks."), vit_heads=vw // 64,
        vit_mlp=g("visual_encoder.blocks.0.mlp.fc1.weight")[0], text_width=tw,
        text_layers=n(f"{txt}.encoder.layer."), text_heads=tw // 64,
        text_ffn=g(f"{txt}.encoder.layer.0.intermediate.dense.weight")[0],
        max_pos=g(f"{txt}.embeddings.position_embeddings.weight")[0],
        embed_dim=g("vision_proj.weight")[0] if "vision_proj.weight" in sd else 256,
        has_encoder="itm_head.weight" in sd, has_decoder="text_decoder.cls.predictions.bias" in sd,
        tie_decoder=False, momentum=False, queue_size=0, **dict(special or {}, vocab_size=vocab),
        prompt="" if txt == "text_encoder" else prompt)


def load_dlip(path, parts, image_size=None, queue_size=None, flag="--init", special=None,
              prompt=""):
    """A dlip or salesforce/BLIP checkpoint -> BLIP. `parts` overrides ModelConfig fields
    (has_encoder, momentum, ...): fine-tuning builds the retrieval or the caption model from a
    pretrain checkpoint. Every weight of the new model must be in the checkpoint (tied tensors are
    saved under the decoder's names too, so an untied decoder loads completely); the feature queues
    load where their shapes fit, as BLIP's load_checkpoint loads them (models/blip.py), while the
    image ids and the pointer start fresh (they index the pretraining records). special, prompt: the tokenizer's token ids and a BLIP caption .pth's prompt, which
    a BLIP .pth does not record."""
    ck, blip = load_checkpoint(path), None
    if is_blip_pth(ck):
        try:
            blip = blip_pth_config(ck["model"], special, prompt)
        except KeyError as e:
            raise ValueError(f"{flag} {path}: not a salesforce/BLIP checkpoint: no tensor {e}") from None
    else:
        expect_checkpoint(ck, path, "dlip", flag=flag)
    c = replace(blip or ModelConfig(**(ck.get("model_config") or ck["shape"])), **parts)
    model, sd = BLIP(replace(c, queue_size=queue_size or c.queue_size)), ck["model"]
    own, fresh_m = model.state_dict(), not any("_m." in k for k in sd)  # --no_momentum: no copies
    missing = [k for k in own if k not in sd and k not in QUEUES and not (fresh_m and "_m." in k)]
    if missing:
        odd = [k for k in sd if blip and k not in own and not BLIP_EXTRA.match(k)][:2]
        raise ValueError(f"{flag} {path}: the checkpoint lacks {len(missing)} weights of the model "
                         f"(encoder {c.has_encoder}, decoder {c.has_decoder}): {missing[:4]}"
                         + (f"; unknown tensors {odd}" if odd else ""))
    fits = lambda k: k not in QUEUES or k in QUEUES[:2] and sd[k].shape == own[k].shape  # noqa: E731
    model.load_state_dict({k: sd[k] for k in own if k in sd and fits(k)}, strict=False)
    for on, mo in model.momentum_pairs() if fresh_m else ():
        mo.load_state_dict(on.state_dict())  # the momentum model starts as a copy
    return set_image_size(model, image_size)


def load_any(path, special, cfg, flag):
    if path.endswith((".pt", ".pth")):
        return load_dlip(path, dict(momentum=False), cfg.image_size, flag=flag, special=special,
                         prompt=cfg.prompt)
    model = load_hf_blip(path, special, cfg.image_size)
    model.c.prompt = cfg.prompt
    return model


def vit_init_config(path):
    """ModelConfig fields an HF vision tower imposes on the image encoder it initialises."""
    with open(os.path.join(resolve_local(path), "config.json")) as f:
        c = json.load(f)
    v = c.get("vision_config", c)
    return dict(vit_eps=v.get("layer_norm_eps", 1e-12), vit_act=v.get("hidden_act", "gelu"),
                vit_pre_norm=c.get("model_type", "").startswith("clip"))


def init_from_hf_vit(model, path):
    """Image encoder from an HF ViT folder (DeiT, as V2's student) or a CLIP vision tower (the toy
    world's). A shallower model takes evenly spaced layers of the source (4 -> 2: layers 1 and 3), a
    deeper one repeats them (2 -> 4: 0, 0, 1, 1); widths must match. (build_model then copies the
    online encoders into the momentum ones.)"""
    sd, vit, new = read_hf_weights(path, ("vision_model.", "vit.", "")), model.visual_encoder, {}
    if "embeddings.class_embedding" in sd:  # CLIP(Vision)Model: pre-LN, own q/k/v, no patch bias
        layer, pos = "encoder.layers", sd["embeddings.position_embedding.weight"][None]
        new["cls_token"] = sd["embeddings.class_embedding"].view(1, 1, -1)
        new["patch_embed.proj.weight"] = sd["embeddings.patch_embedding.weight"]
        new["patch_embed.proj.bias"] = torch.zeros(vit.patch_embed.proj.out_channels)
        for ours, theirs in (("norm_pre", "pre_layrnorm"), ("norm", "post_layernorm")):
            for part in ("weight", "bias"):
                new[f"{ours}.{part}"] = sd[f"{theirs}.{part}"]
        names = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                     proj="self_attn.out_proj", norm1="layer_norm1", norm2="layer_norm2",
                     fc1="mlp.fc1", fc2="mlp.fc2")
    else:  # HF ViT / DeiT
        layer, pos = "encoder.layer", sd["embeddings.position_embeddings"]
        new["cls_token"] = sd["embeddings.cls_token"]
        new["patch_embed.proj.weight"] = sd["embeddings.patch_embeddings.projection.weight"]
        new["patch_embed.proj.bias"] = sd["embeddings.patch_embeddings.projection.bias"]
        new["norm.weight"], new["norm.bias"] = sd["layernorm.weight"], sd["layernorm.bias"]
        names = dict(q="attention.attention.query", k="attention.attention.key",
                     v="attention.attention.value", proj="attention.output.dense",
                     norm1="layernorm_before", norm2="layernorm_after", fc1="intermediate.dense",
                     fc2="output.dense")
    new["pos_embed"] = resize_pos_embed(pos, model.c.image_size // model.c.patch_size)
    n_src = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(layer + "."))
    n_dst = len(vit.blocks)
    for i, j in enumerate([max(0, round((i + 1) * n_src / n_dst) - 1) for i in range(n_dst)]):
        p = f"{layer}.{j}."
        for part in ("weight", "bias"):
            qkv = [sd[p + f"{names[n]}.{part}"] for n in "qkv"]
            new[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(qkv)
            for ours, theirs in (("attn.proj", "proj"), ("norm1", "norm1"), ("norm2", "norm2"),
                                 ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
                new[f"blocks.{i}.{ours}.{part}"] = sd[p + f"{names[theirs]}.{part}"]
    vit.load_state_dict(new, strict=True)


def init_from_hf_bert(model, path):
    """Student text stack from an HF BERT folder: encoder, decoder self-attention (BLIP inits both
    from BERT) and the MLM head; the new [DEC]/[ENC] rows and the cross-attention stay random.
    token_type_embeddings[0] is folded into the position embeddings (every input here is type 0)."""
    sd = read_hf_weights(path, ("bert.", ""))
    with torch.no_grad():
        stacks = [model.text_encoder] + ([model.text_decoder.bert] if model.c.has_decoder else [])
        for stack in stacks:
            we, src = stack.embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"]
            we[:len(src)] = src[:len(we)]
            pe = sd["embeddings.position_embeddings.weight"]
            if "embeddings.token_type_embeddings.weight" in sd:
                pe = pe + sd["embeddings.token_type_embeddings.weight"][0]
            stack.embeddings.position_embeddings.weight[:pe.shape[0]] = pe
            stack.embeddings.LayerNorm.load_state_dict({"weight": sd["embeddings.LayerNorm.weight"],
                                                        "bias": sd["embeddings.LayerNorm.bias"]})
            for i, layer in enumerate(stack.encoder.layer):
                p = f"encoder.layer.{i}."
                layer.load_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)},
                                      strict=False)
        if model.c.has_decoder and "cls.predictions.bias" in sd:
            pred, p = model.text_decoder.cls.predictions, "cls.predictions.transform."
            bias = sd["cls.predictions.bias"]
            pred.bias[:len(bias)] = bias[:len(pred.bias)]
            pred.transform.load_state_dict({k[len(p):]: v for k, v in sd.items()
                                            if k.startswith(p)})


if __name__ == "__main__":
    main()
