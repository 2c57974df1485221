"""DLIP: distilling a BLIP teacher into a small BLIP-shaped student, then fine-tuning it for retrieval and captioning.

Method (Kuang et al., "DLIP: Distilling Language-Image Pre-training", arXiv 2308.12956; BLIP: Li et al., ICML 2022).
The student has BLIP's whole architecture at a smaller size: a ViT image encoder, a BERT text encoder, an
image-grounded text encoder (the same BERT plus a cross-attention block per layer, for image-text matching) and an
image-grounded text decoder that shares everything with the encoder except its causal self-attention. It trains
BLIP's three losses -- ITC with a momentum encoder and feature queues, ITM with hard negatives, LM -- and, on the same
batch, distillation losses from a frozen BLIP teacher: ITC logit distillation, representation losses on the image,
text, fused and decoder features (through the projection heads, which absorb the width difference), decoder logit KL
and KL between the teacher's and the student's last-layer attention maps (text self-attention, cross-attention,
decoder self-attention). Each term has its own weight flag. Padding is masked out of every distillation loss.
`--rep_loss mse --rep_layers last|uniform` switches the representation terms to the paper's form: MSE between
fresh linear maps of the student's hidden states and the teacher's, layer by layer (image CLS, text tokens).

Modes:
    --mode pretrain   student + frozen teacher (teacher "" = plain BLIP pretraining, used for the toy teacher)
    --mode retrieval  fine-tune ITC+ITM from --init; eval = ITC top-k shortlist, ITM re-rank; TR/IR R@1/5/10
    --mode caption    fine-tune image encoder + decoder with the prompt; beam search; BLEU-4, CIDEr
    --mode eval       --task retrieval|caption|efficiency|all on --ckpt (and on --teacher for the efficiency
                      report: parameters, FLOPs by torch's FlopCounterMode, images/s)

Toy world (CPU, minutes each; builds data/toy on first use):
    python dlip.py --preset toy_teacher                                # BLIP teacher (no distillation) -> runs/dlip_toy_teacher
    python dlip.py                                                     # distilled student -> runs/dlip_toy
    python dlip.py --teacher "" --out_dir runs/dlip_toy_nokd           # the same student without a teacher
    python dlip.py --mode retrieval --init runs/dlip_toy/last.pt --out_dir runs/dlip_toy_ret
    python dlip.py --mode caption --init runs/dlip_toy/last.pt --out_dir runs/dlip_toy_cap
    python dlip.py --mode caption --init runs/dlip_toy/last.pt --ft_distill true \
        --teacher runs/dlip_toy_teacher_cap/last.pt --out_dir runs/dlip_toy_cap_kd  # + the teacher decoder's KL
    python dlip.py --rep_loss mse --rep_layers uniform --out_dir runs/dlip_toy_mse  # paper-style feature loss
    python dlip.py --mode eval --ckpt runs/dlip_toy/last.pt --teacher runs/dlip_toy_teacher/last.pt --out_dir runs/eval
    python dlip.py --bench 20                                          # samples/s (and MFU on GPU)

Paper recipe, one GPU (data converted to canonical pairs with data/convert.py: coco/karpathy, vg, img2dataset for
CC3M and SBU; the teacher folders downloaded beforehand, e.g. `huggingface-cli download Salesforce/blip-itm-base-coco`):
    python dlip.py --preset paper --mode pretrain --image_root /data --train_files coco.jsonl,vg.jsonl,cc3m.jsonl,sbu.jsonl
    python dlip.py --preset paper --mode retrieval --init runs/dlip/last.pt --train_files f30k_train.jsonl \
        --val_file f30k_val.jsonl --test_file f30k_test.jsonl --k_test 128
    python dlip.py --preset paper --mode caption --init runs/dlip/last.pt --train_files coco_kp_train.jsonl ...
Multi-node (same code path; global batch fixed, gradient accumulation = global / (micro * world)):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 dlip.py --preset paper ...

What it reproduces: the DLIP recipe (V2 replication's loss set and schedule, its defects fixed, see the spec): on the
toy world the distilled student, a third of the teacher's parameters pretrained on a quarter of its images, comes
within 0.9 points of the teacher's fine-tuned retrieval R-mean and 2.8 of its fine-tuned caption CIDEr, and beats
the same student trained without distillation for the same steps by 8.0 and 26.1 (README table, 3 seeds). With 5x
longer fine-tuning (--epochs 1) the retrieval gap stays and the captions tie: the toy captions saturate, as no
model here tells the toy shapes apart, with or without the teacher decoder distilled then (--ft_distill).
Teachers in transformers' format (BlipForImageTextRetrieval / BlipForConditionalGeneration folders) load into the
in-file model with every weight accounted for; tests check ITM scores, ITC similarities and decoder logits against
transformers to 1e-4.
"""
import contextlib
import copy
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import amp as camp
from common import dist as cdist
from common.attention import attention
from common.checkpoint import load_checkpoint, restore, rng_state, save_checkpoint, set_rng_state
from common.config import format_config, parse_config, save_config
from common.data import ImageFolderLoader, read_pairs
from common.image import CLIP_MEAN, CLIP_STD, ImageTransform
from common.log import Logger, progress
from common.train import (StepTimer, check_finite, clip_grad, cosine_lr, count_flops, mfu, param_groups,
                          run_bench, set_lr)


# ============================================================================================ Config
@dataclass
class Config:
    mode: str = "pretrain"             # pretrain | retrieval | caption | eval
    task: str = "all"                  # eval mode: retrieval | caption | efficiency | all
    preset: str = "toy"
    out_dir: str = "runs/dlip"
    toy_root: str = "data/toy"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    bench: int = 0                     # time N training steps after warm-up, print samples/s (and MFU), exit
    resume: str = ""                   # checkpoint of this run to continue exactly
    # ---- data (canonical pairs JSONL; image paths relative to image_root). Empty = the toy world's files.
    train_files: list[str] = field(default_factory=list)
    val_file: str = ""
    test_file: str = ""
    image_root: str = ""
    tokenizer: str = ""                # BERT tokenizer folder / hub name; [DEC] and [ENC] are added if missing
    max_words: int = 30                # pre_caption keeps the first 30 words (BLIP)
    max_len: int = 30                  # token length: 30 pretrain, 35 retrieval, 40 caption in BLIP
    num_workers: int = 0
    max_bad_frac: float = 0.05         # stop when more unreadable images than this
    max_eval_images: int = 0           # 0 = all (tests use a few)
    train_limit: int = 0               # train on the first N pairs only (0 = all)
    # ---- student shape (the teacher's shape comes from its own checkpoint / config.json)
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
    embed_dim: int = 256               # ITC projection width (BLIP 256; teacher and student must agree)
    dropout: float = 0.0               # BERT dropout (BLIP 0.1)
    grad_ckpt: bool = False            # activation checkpointing of the ViT blocks
    init_vit: str = ""                 # HF ViT folder (DeiT) to initialise the student image encoder
    init_text: str = ""                # HF BERT folder to initialise the student text stack (finding 3: matters little)
    queue_size: int = 256              # 57600 in BLIP; must be divisible by the global micro batch
    momentum: float = 0.995
    alpha: float = 0.4                 # momentum-distillation weight of the soft ITC targets
    alpha_ramp_epochs: float = 2.0     # alpha ramps linearly from 0 over this many epochs (BLIP: 2 pretrain, 1 FT)
    # ---- teacher and distillation
    teacher: str = "runs/dlip_toy_teacher/last.pt"  # dlip checkpoint (.pt) or HF BlipForImageTextRetrieval folder
    teacher_caption: str = ""          # HF BlipForConditionalGeneration folder when the teacher comes split in two
    teacher_temp: float = 0.07         # ITC temperature for an HF teacher (its folder does not store one)
    itc_kd: str = "v2"                 # v2: teacher feats vs student queue/temp; kl: in-batch KL of similarity rows
    rep_loss: str = "cos"              # cos: 1 - cos of the 256-d heads (V2); mse: W_s-mapped hidden states (paper)
    rep_layers: str = "last"           # rep_loss mse: last (last layers) | uniform (student k -> teacher kN_T/N_S)
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
    w_itm_kd: float = 0.0              # not in V2; needs one more teacher fusion pass on the 2B negatives
    ft_distill: bool = False           # caption mode: also distil a teacher decoder (w_lm_kd, w_attn_dec) [ours]
    # ---- fine-tuning / evaluation inputs
    init: str = ""                     # checkpoint to start fine-tuning from (a pretrain run's last.pt)
    ckpt: str = ""                     # eval mode: model to evaluate (dlip checkpoint or HF folder)
    # ---- optimisation
    global_batch: int = 32
    micro_batch: int = 32              # per GPU; accumulation = global / (micro * world)
    epochs: float = 10.0
    max_steps: int = 0                 # > 0 overrides epochs
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 20
    lr_schedule: str = "step"          # step: lr * lr_decay^epoch (BLIP pretrain); cosine (fine-tuning)
    lr_decay: float = 0.9
    weight_decay: float = 0.05
    grad_clip: float = 0.0             # 0 = measure the norm only
    label_smoothing: float = 0.1       # LM loss (BLIP's med.py uses 0.1)
    # ---- evaluation
    k_test: int = 16                   # ITM re-ranks the ITC top-k (128 Flickr30K, 256 COCO)
    prompt: str = "a picture of "      # caption mode: used at training and at decoding
    num_beams: int = 3
    gen_max_len: int = 20              # counted including the prompt tokens (BLIP)
    gen_min_len: int = 5
    eval_batch: int = 64
    eval_every: int = 0                # steps; 0 = only at the end
    log_every: int = 10
    save_every: int = 0                # steps; the last checkpoint is always written


# Toy recipe: 64 px scenes, patch 8 (65 image tokens), 24 text tokens. The toy world's CLIP vision tower and BERT
# stand in for DeiT / bert-base (BLIP inits its ViT from DeiT and its text stack from BERT; V2's student takes its
# ViT from DeiT-S and a random text stack). The toy schedule is short, so the momentum coefficient is lower (0.99).
# The toy queue holds one batch: with 8 (queue 256) the fast-moving toy encoders let ITC be lowered by telling
# stale queue entries from fresh ones, and retrieval suffered (no-teacher student, test ITC R@1 text/image:
# queue 256 16.8/4.2, queue 32 20.6/9.4).
# "toy:<path>" values are resolved inside --toy_root.
TOY = dict(image_size=64, patch_size=8, max_len=24, global_batch=32, micro_batch=32, queue_size=32, epochs=10,
           lr=1e-3, warmup_steps=20, lr_decay=0.95, momentum=0.99, k_test=16, tokenizer="toy:models/bert",
           init_vit="toy:models/clip")
PRESETS = {
    # Toy student: the CLIP tower's width with half its layers (1 and 3 of 4) and a random 2 x 64 text stack. It
    # pretrains on 500 of the 2000 training scenes (DLIP's student saw 4M images, its teacher 129M) for 600 steps
    # (40 x 15), about the 620 of 10 epochs over all 2000; lr decay and alpha ramp rescaled to match. Measured
    # (test, seed 0, pretrain CIDEr teacher / KD / no KD): on all 2000 scenes 165.3 / 168.1 / 168.5, every model
    # saturates the toy captions; on 500, 165.3 / 161.4 / 140.5, the teacher's decoder has something to teach.
    "toy": dict(TOY, vit_width=128, vit_layers=2, vit_heads=4, vit_mlp=512, text_width=64, text_layers=2,
                text_heads=4, text_ffn=256, train_limit=500, epochs=40, lr_decay=0.987, alpha_ramp_epochs=8.0,
                teacher="runs/dlip_toy_teacher/last.pt", out_dir="runs/dlip_toy"),
    # Toy teacher: plain BLIP pretraining (no teacher) from the full 4-layer CLIP tower and 4 x 128 BERT, trained
    # 3x longer than the student, as DLIP's teacher saw far more than its student (129M vs 4M images). Measured
    # (test, after 312 steps of retrieval fine-tuning, ITM R@1 text/image, students on all 2000 scenes): a 10-epoch
    # teacher 26.0/24.7 and its KD student 24.6/23.9; the 30-epoch teacher 35.0/30.4 and its KD student 29.4/27.7
    # (3 seeds).
    "toy_teacher": dict(TOY, epochs=30, vit_width=128, vit_layers=4, vit_heads=4, vit_mlp=512, text_width=128,
                        text_layers=4, text_heads=4, text_ffn=512, init_text="toy:models/bert", teacher="",
                        out_dir="runs/dlip_toy_teacher"),
    # DLIP V2 recipe (spec 4.3/4.6): ViT-S/16 from DeiT-S + 6x384 text stack with 12 heads, 224 px, 20 epochs,
    # global batch 1152 (288 x 4 GPUs), AdamW wd 0.02, lr 5e-4, 3000 warm-up steps from 1e-6, x0.9 per epoch.
    # Teacher: transformers-format BLIP folders (COCO-fine-tuned on the hub: the spec's fallback teacher).
    "paper": dict(image_size=224, patch_size=16, vit_width=384, vit_layers=12, vit_heads=6, vit_mlp=1536,
                  text_width=384, text_layers=6, text_heads=12, text_ffn=3072, embed_dim=256, dropout=0.1,
                  init_vit="facebook/deit-small-patch16-224", tokenizer="bert-base-uncased", max_len=30,
                  queue_size=57600, teacher="Salesforce/blip-itm-base-coco",
                  teacher_caption="Salesforce/blip-image-captioning-base", global_batch=1152, micro_batch=288,
                  epochs=20, lr=5e-4, warmup_steps=3000, lr_schedule="step", weight_decay=0.02, k_test=128,
                  eval_batch=128, num_workers=8, log_every=50, save_every=2000, out_dir="runs/dlip"),
}
# Fine-tuning recipes (spec 5.1/5.2: BLIP configs, V2's student lr), applied by main() for --mode retrieval|caption
# on top of the preset, except for keys given on the command line.
FINETUNE = {
    # toy: every model fine-tunes on all 2000 training scenes (as teacher and student both fine-tune on COCO) for 62
    # steps: 0.2 epoch of the 10,000 (image, caption) items, each image seen about once; 2,000 samples, 10% of the
    # student's 19,200 pretraining samples (DLIP's COCO fine-tuning is ~3% of its pretraining). With a full epoch
    # (312 steps) the toy captions saturate and the undistilled student catches up (README).
    "toy": {"retrieval": dict(epochs=0.2, lr=1e-4, lr_schedule="cosine", warmup_steps=0, alpha_ramp_epochs=1.0,
                              train_limit=0),
            "caption": dict(epochs=0.2, lr=1e-4, lr_schedule="cosine", warmup_steps=0, train_limit=0)},
    "paper": {"retrieval": dict(image_size=384, max_len=35, global_batch=256, micro_batch=32, lr=5e-5,
                                weight_decay=0.05, epochs=6, lr_schedule="cosine", warmup_steps=0,
                                alpha_ramp_epochs=1.0, k_test=128, grad_ckpt=True),
              "caption": dict(image_size=384, max_len=40, global_batch=256, micro_batch=32, lr=5e-5,
                              weight_decay=0.05, epochs=6, lr_schedule="cosine", warmup_steps=0)},
}


# ============================================================================================ Model
# Parameter names follow salesforce/BLIP (timm ViT + BERT names), so the layout is the one BLIP checkpoints use;
# `hf_to_dlip` maps transformers' BLIP names onto it.

def token_ids(special):
    return {k: special[k] for k in ("enc_id", "dec_id", "sep_id", "pad_id", "cls_id")}


def model_shape(cfg, vocab_size, special, has_encoder=True, has_decoder=True, tie_decoder=True, momentum=True):
    """The plain dict that fixes a BLIP model's size and parts (saved in every checkpoint)."""
    return dict(image_size=cfg.image_size, patch_size=cfg.patch_size, vit_width=cfg.vit_width,
                vit_layers=cfg.vit_layers, vit_heads=cfg.vit_heads, vit_mlp=cfg.vit_mlp, vit_eps=1e-6,
                text_width=cfg.text_width, text_layers=cfg.text_layers, text_heads=cfg.text_heads,
                text_ffn=cfg.text_ffn, text_eps=1e-12, vocab_size=vocab_size, max_pos=512, embed_dim=cfg.embed_dim,
                dropout=cfg.dropout, has_encoder=has_encoder, has_decoder=has_decoder, tie_decoder=tie_decoder,
                momentum=momentum, queue_size=cfg.queue_size, ema=cfg.momentum, grad_ckpt=cfg.grad_ckpt, **token_ids(special))


class ViTBlock(nn.Module):
    """Pre-LN transformer block (timm names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, d, heads, mlp, eps, act="gelu"):
        super().__init__()
        self.heads, self.act = heads, (lambda x: x * torch.sigmoid(1.702 * x)) if act == "quick_gelu" else F.gelu
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        h = attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, Dh)
        x = x + self.attn.proj(h.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.norm2(x))))


def resize_pos_embed(pos, grid):
    """(1, 1+g*g, D) -> (1, 1+grid*grid, D): bicubic resize of the patch grid (BLIP's 224 -> 384 px fine-tuning)."""
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if old == grid:
        return pos
    cls, patches = pos[:, :1], pos[:, 1:]
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], 1)


class ViT(nn.Module):
    """ViT with a final LayerNorm; output all tokens (B, 1 + (S/P)^2, D)."""

    def __init__(self, s):
        super().__init__()
        d, self.grad_ckpt = s["vit_width"], s.get("grad_ckpt", False)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, s["patch_size"], s["patch_size"])
        n = (s["image_size"] // s["patch_size"]) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([ViTBlock(d, s["vit_heads"], s["vit_mlp"], s["vit_eps"], s.get("vit_act", "gelu"))
                                     for _ in range(s["vit_layers"])])
        self.norm = nn.LayerNorm(d, eps=s["vit_eps"])
        # CLIP-style towers (used to initialise the toy models) have a LayerNorm before the blocks; BLIP's ViT not
        self.norm_pre = nn.LayerNorm(d, eps=s["vit_eps"]) if s.get("vit_pre_norm") else nn.Identity()

    def forward(self, image, hidden=None):  # (B, 3, S, S) -> (B, 1+N, D)
        """hidden: a list that receives every block's output (B, 1+N, D) (--rep_loss mse)."""
        x = self.patch_embed.proj(image).flatten(2).transpose(1, 2)  # (B, N, D)
        x = self.norm_pre(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed)
        for blk in self.blocks:
            if self.grad_ckpt and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if hidden is not None:
                hidden.append(x)
        return self.norm(x)


class BertSelfAttention(nn.Module):
    """BERT attention core (query/key/value). Cross-attention reads keys/values from the image tokens.

    `need_probs` computes softmax(QK^T/sqrt(d)) explicitly and returns it (for attention distillation);
    otherwise the fused SDPA kernel runs. `cache` (a dict) keeps keys/values across decoding steps."""

    def __init__(self, d, heads, kv_dim, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(kv_dim, d), nn.Linear(kv_dim, d)

    def _split(self, x):  # (B, L, D) -> (B, H, L, Dh)
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

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
        return out.transpose(1, 2).flatten(2), probs  # (B, L, D), (B, H, Lq, Lk) or None


class BertAttention(nn.Module):
    def __init__(self, d, heads, kv_dim, dropout, eps):
        super().__init__()
        self.self = BertSelfAttention(d, heads, kv_dim, dropout)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(d, d), nn.LayerNorm(d, eps=eps)
        self.p = dropout

    def forward(self, x, mask, kv=None, cache=None, need_probs=False):
        h, probs = self.self(x, mask, kv, cache, need_probs)
        return self.output.LayerNorm(F.dropout(self.output.dense(h), self.p, self.training) + x), probs


class BertLayer(nn.Module):
    """Self-attention, cross-attention to the image (skipped in text-only mode), feed-forward; post-LN (BERT)."""

    def __init__(self, s):
        super().__init__()
        d, eps, p = s["text_width"], s["text_eps"], s["dropout"]
        self.attention = BertAttention(d, s["text_heads"], d, p, eps)
        self.crossattention = BertAttention(d, s["text_heads"], s["vit_width"], p, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, s["text_ffn"])
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(s["text_ffn"], d), nn.LayerNorm(d, eps=eps)
        self.p = p

    def forward(self, x, mask, image=None, cache=None, need_probs=False):
        x, sa = self.attention(x, mask, None, cache and cache["self"], need_probs)
        ca = None
        if image is not None:
            x, ca = self.crossattention(x, None, image, cache and cache["cross"], need_probs)
        h = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(F.dropout(h, self.p, self.training) + x), sa, ca


class BertEmbeddings(nn.Module):
    def __init__(self, s):
        super().__init__()
        d = s["text_width"]
        self.word_embeddings = nn.Embedding(s["vocab_size"], d, padding_idx=s["pad_id"])
        self.position_embeddings = nn.Embedding(s["max_pos"], d)
        self.LayerNorm = nn.LayerNorm(d, eps=s["text_eps"])
        self.p = s["dropout"]

    def forward(self, ids, past=0):  # (B, L) -> (B, L, D)
        pos = torch.arange(past, past + ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None]
        return F.dropout(self.LayerNorm(x), self.p, self.training)


class TextModel(nn.Module):
    """BERT with a cross-attention block per layer (BLIP's MED). Three uses (BLIP Sec. 3.1):
    text encoder (bidirectional, no image), image-grounded encoder (image given), decoder (causal=True)."""

    def __init__(self, s):
        super().__init__()
        self.embeddings = BertEmbeddings(s)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([BertLayer(s) for _ in range(s["text_layers"])])

    def forward(self, ids, mask, image=None, causal=False, need_attn=False, cache=None, hidden=None):
        """ids, mask (B, L) [mask covers cached + new tokens]; image (B, Nv, Dv) or None.
        Returns hidden (B, L, D) and the last layer's attention maps {"sa": (B,H,L,L+past), "ca": (B,H,L,Nv)}.
        hidden: a list that receives every layer's output (B, L, D) (--rep_loss mse)."""
        past = cache[0]["self"]["k"].shape[2] if cache and "k" in cache[0]["self"] else 0
        x = self.embeddings(ids, past)
        m = mask[:, None, None, :].bool()  # (B, 1, 1, Lk): True = may attend
        if causal:
            lq, lk = ids.shape[1], mask.shape[1]
            m = m & torch.ones(lq, lk, dtype=torch.bool, device=ids.device).tril(lk - lq)  # (B, 1, Lq, Lk)
        layers = self.encoder.layer
        attn = {}
        for i, layer in enumerate(layers):
            last = need_attn and i == len(layers) - 1
            x, sa, ca = layer(x, m, image, cache[i] if cache else None, last)
            if hidden is not None:
                hidden.append(x)
            if last:
                attn = {"sa": sa, "ca": ca}
        return x, attn


class TextDecoder(nn.Module):
    """BertLMHeadModel: `bert` (causal MED) + `cls.predictions` (dense, GELU, LN, tied vocab projection + bias)."""

    def __init__(self, s):
        super().__init__()
        d = s["text_width"]
        self.bert = TextModel(s)
        self.cls = nn.Module()
        self.cls.predictions = nn.Module()
        self.cls.predictions.transform = nn.Module()
        self.cls.predictions.transform.dense = nn.Linear(d, d)
        self.cls.predictions.transform.LayerNorm = nn.LayerNorm(d, eps=s["text_eps"])
        self.cls.predictions.bias = nn.Parameter(torch.zeros(s["vocab_size"]))

    def forward(self, ids, mask, image, need_attn=False, cache=None, hidden=None):
        h, attn = self.bert(ids, mask, image, causal=True, need_attn=need_attn, cache=cache, hidden=hidden)
        t = self.cls.predictions.transform
        z = t.LayerNorm(F.gelu(t.dense(h)))
        logits = F.linear(z, self.bert.embeddings.word_embeddings.weight, self.cls.predictions.bias)  # (B, L, V)
        return logits, h, attn


def with_first(ids, token):
    """Replace the first token ([CLS]) by [ENC] (image-grounded encoder) or [DEC] (decoder), as BLIP does."""
    ids = ids.clone()
    ids[:, 0] = token
    return ids


class BLIP(nn.Module):
    """BLIP's model; the same class is teacher and student (size and parts from the shape dict `s`).

    Parts: image encoder (always); text encoder + vision_proj/text_proj/itm_head/temp (has_encoder); decoder
    (has_decoder). tie_decoder=True shares the decoder's embeddings, cross-attention and feed-forward blocks with
    the encoder -- the same Parameter objects for the whole run (BLIP Sec. 3.1; issue #93) -- so only the causal
    self-attention and the LM head are the decoder's own. momentum=True adds EMA copies and the feature queues."""

    def __init__(self, s):
        super().__init__()
        self.s = dict(s)
        self.visual_encoder = ViT(s)
        if s["has_encoder"]:
            self.text_encoder = TextModel(s)
            self.vision_proj = nn.Linear(s["vit_width"], s["embed_dim"])
            self.text_proj = nn.Linear(s["text_width"], s["embed_dim"])
            self.itm_head = nn.Linear(s["text_width"], 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
        if s["has_decoder"]:
            self.text_decoder = TextDecoder(s)
            if s["tie_decoder"]:
                enc, dec = self.text_encoder, self.text_decoder.bert
                dec.embeddings = enc.embeddings
                for le, ld in zip(enc.encoder.layer, dec.encoder.layer):
                    ld.crossattention, ld.intermediate, ld.output = le.crossattention, le.intermediate, le.output
        self.apply(self._init)
        if s["momentum"]:
            self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
            self.vision_proj_m = copy.deepcopy(self.vision_proj)
            self.text_encoder_m = copy.deepcopy(self.text_encoder)
            self.text_proj_m = copy.deepcopy(self.text_proj)
            for m in self.momentum_modules():
                m.requires_grad_(False)
            q = s["queue_size"]
            self.register_buffer("image_queue", F.normalize(torch.randn(s["embed_dim"], q), dim=0))
            self.register_buffer("text_queue", F.normalize(torch.randn(s["embed_dim"], q), dim=0))
            self.register_buffer("idx_queue", torch.full((q,), -100, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _init(m):  # BERT init (the ViT's own tokens are set in ViT.__init__)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ---- momentum encoder and queues (BLIP Sec. 3.2 / ALBEF momentum distillation)
    def momentum_modules(self):
        return [self.visual_encoder_m, self.vision_proj_m, self.text_encoder_m, self.text_proj_m]

    def online_modules(self):
        return [self.visual_encoder, self.vision_proj, self.text_encoder, self.text_proj]

    @torch.no_grad()
    def momentum_update(self):
        m = self.s["ema"]
        for on, mo in zip(self.online_modules(), self.momentum_modules()):
            for p, pm in zip(on.parameters(), mo.parameters()):
                pm.mul_(m).add_(p.detach(), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, img_feat, txt_feat, idx):
        """Write all-gathered momentum features (G, E) and their image ids at the pointer; advance it."""
        g, q = img_feat.shape[0], self.image_queue.shape[1]
        assert q % g == 0, f"queue_size {q} must be divisible by the global micro batch {g}"
        p = int(self.queue_ptr)
        self.image_queue[:, p:p + g] = img_feat.T
        self.text_queue[:, p:p + g] = txt_feat.T
        self.idx_queue[p:p + g] = idx
        self.queue_ptr.fill_((p + g) % q)

    def add_rep_maps(self, t_shape, t_dec_shape, layers, w):
        """--rep_loss mse (DLIP Sec. 3: L_rep = sum over layers of d(H_S W_s, H_T W_t)): one fresh linear map
        W_s (student width -> teacher width; W_t = identity) per distilled layer of each part whose weight is > 0.
        Training-only parameters, saved with the run (resume) and ignored by fine-tuning and evaluation."""
        maps = nn.ModuleDict()
        for part, n_s, n_t, d_s, d_t in (("img", self.s["vit_layers"], t_shape["vit_layers"], self.s["vit_width"],
                                          t_shape["vit_width"]),
                                         *[(p, self.s["text_layers"], t["text_layers"], self.s["text_width"],
                                            t["text_width"]) for p, t in (("txt", t_shape), ("fus", t_shape),
                                                                          ("dec", t_dec_shape))]):
            if w.get("rep_" + part, 0) > 0:
                maps[part] = nn.ModuleList([nn.Linear(d_s, d_t) for _ in rep_pairs(n_s, n_t, layers)])
        self.rep_maps = maps.to(next(self.parameters()).device)
        self.rep_layers = layers

    # ---- the three uses of the text stack
    def image_features(self, image):
        emb = self.visual_encoder(image)  # (B, Nv, Dv)
        return emb, F.normalize(self.vision_proj(emb[:, 0]), dim=-1)

    def text_features(self, ids, mask, hidden=None):
        h, _ = self.text_encoder(ids, mask, hidden=hidden)  # (B, L, Dt)
        return h, F.normalize(self.text_proj(h[:, 0]), dim=-1)

    def fuse(self, ids, mask, image_embeds, need_attn=False, hidden=None):
        """Image-grounded encoder on [ENC]-led ids: hidden (B, L, Dt) and last-layer attention maps."""
        return self.text_encoder(with_first(ids, self.s["enc_id"]), mask, image_embeds, need_attn=need_attn,
                                 hidden=hidden)

    def itm_logits(self, ids, mask, image_embeds):  # -> (B, 2)
        return self.itm_head(self.fuse(ids, mask, image_embeds)[0][:, 0])

    def decode(self, ids, mask, image_embeds, need_attn=False, cache=None, hidden=None):
        """Decoder on [DEC]-led ids -> logits (B, L, V), hidden (B, L, Dt), attention maps. With a filled `cache`
        (decoding), `ids` are only the new tokens and position 0 is already in the cache."""
        if not (cache and "k" in cache[0]["self"]):
            ids = with_first(ids, self.s["dec_id"])
        return self.text_decoder(ids, mask, image_embeds, need_attn, cache, hidden)

    # ---- training forward: everything DDP must see happens here
    def forward(self, image, ids, mask, idx, alpha=0.4, sample_seed=0, rank=0, task="pretrain", teacher=None,
                w=None, label_smoothing=0.1, prompt_len=1):
        """Loss terms (unweighted, scalars) for one micro batch. ids/mask (B, L) start with [CLS]; idx (B,) image ids.

        task: pretrain (ITC + ITM + LM, plus distillation when `teacher` outputs are given), retrieval (ITC + ITM),
        caption (LM). `w` holds the distillation weights: a term whose weight is 0 is not computed."""
        w = w or {}
        mse = teacher is not None and w.get("rep_kind") == "mse"
        hid = {k: [] if mse else None for k in ("img", "txt", "fus", "dec")}  # per-layer states for --rep_loss mse
        image_embeds = self.visual_encoder(image, hidden=hid["img"])  # (B, Nv, Dv)
        out = {}
        if task == "caption":
            need_dec_attn = teacher is not None and w.get("attn_dec", 0) > 0
            logits, _, dec_attn = self.decode(ids, mask, image_embeds, need_attn=need_dec_attn)
            labels = lm_labels(ids, mask, prompt_len)
            out["lm"] = lm_loss(logits, labels, label_smoothing)
            if teacher is not None:  # --ft_distill: the teacher decoder reads the same prompted caption
                if w.get("lm_kd", 0) > 0:
                    out["lm_kd"] = lm_kd_loss(logits, teacher["logits"], labels)
                if w.get("attn_dec", 0) > 0:
                    out["attn_dec"] = attn_kd_loss(teacher["dsa"], dec_attn["sa"], mask)
            return out
        need_attn = teacher is not None and (w.get("attn_sa", 0) > 0 or w.get("attn_ca", 0) > 0)
        B = image.shape[0]
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)  # (B, E)
        text_h, text_feat = self.text_features(ids, mask, hidden=hid["txt"])

        # ITC (Sec. 3.2): online features against [momentum features of the global batch ; queue]
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
            self.momentum_update()
            img_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(image)[:, 0]), dim=-1)
            txt_m = F.normalize(self.text_proj_m(self.text_encoder_m(ids, mask)[0][:, 0]), dim=-1)
            img_m_g, txt_m_g = cdist.all_gather_no_grad(img_m), cdist.all_gather_no_grad(txt_m)  # (G, E)
            idx_g = cdist.all_gather_no_grad(idx)  # (G,)
            img_cand = torch.cat([img_m_g, self.image_queue.T.to(img_m_g.dtype)])  # (G+Q, E)
            txt_cand = torch.cat([txt_m_g, self.text_queue.T.to(txt_m_g.dtype)])
            pos = idx[:, None] == torch.cat([idx_g, self.idx_queue])[None, :]  # (B, G+Q) same image = positive
            tgt_i2t = itc_targets(pos, img_m @ txt_cand.T / self.temp, alpha)
            tgt_t2i = itc_targets(pos, txt_m @ img_cand.T / self.temp, alpha)
        out["itc"] = (soft_ce(image_feat @ txt_cand.T / self.temp, tgt_i2t)
                      + soft_ce(text_feat @ img_cand.T / self.temp, tgt_t2i)) / 2

        # ITM (Sec. 3.2): positives + one hard negative image per text and one hard negative text per image,
        # sampled over the global batch with a generator every rank seeds alike (so N ranks = 1 process)
        pos_h, pos_attn = self.fuse(ids, mask, image_embeds, need_attn=need_attn, hidden=hid["fus"])
        with torch.no_grad():
            img_feat_g, txt_feat_g = cdist.all_gather_no_grad(image_feat), cdist.all_gather_no_grad(text_feat)
            sim_t2i = txt_feat_g @ img_feat_g.T / self.temp  # (G, G)
            same = idx_g[:, None] == idx_g[None, :]
            gen = torch.Generator(device=sim_t2i.device).manual_seed(sample_seed)
            neg_img = sample_hard_negatives(sim_t2i, same, gen)[rank * B:(rank + 1) * B]  # (B,) for my texts
            neg_txt = sample_hard_negatives(sim_t2i.T, same, gen)[rank * B:(rank + 1) * B]  # (B,) for my images
            ids_g, mask_g = cdist.all_gather_no_grad(ids), cdist.all_gather_no_grad(mask)
        image_embeds_g = cdist.all_gather_with_grad(image_embeds)  # (G, Nv, Dv), gradient back to the owner rank
        ids_neg = torch.cat([ids, ids_g[neg_txt]])  # (2B, L)
        mask_neg = torch.cat([mask, mask_g[neg_txt]])
        img_neg = torch.cat([image_embeds_g[neg_img], image_embeds])  # (2B, Nv, Dv)
        neg_h, _ = self.fuse(ids_neg, mask_neg, img_neg)
        itm_logits = self.itm_head(torch.cat([pos_h[:, 0], neg_h[:, 0]]))  # (3B, 2)
        itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(image.device)
        out["itm"] = F.cross_entropy(itm_logits, itm_labels)

        if task == "pretrain":  # LM (Sec. 3.2): the decoder generates the caption given the image
            labels = lm_labels(ids, mask, 1)
            need_dec_attn = teacher is not None and w.get("attn_dec", 0) > 0
            logits, dec_h, dec_attn = self.decode(ids, mask, image_embeds, need_attn=need_dec_attn, hidden=hid["dec"])
            out["lm"] = lm_loss(logits, labels, label_smoothing)

        if teacher is not None:  # DLIP distillation terms (spec 4.4), on the same batch
            t = teacher
            if w.get("itc_kd", 0) > 0:
                out["itc_kd"] = itc_kd_loss(image_feat, text_feat, t, self, pos, alpha, w.get("itc_kd_kind", "v2"))
            if mse:  # paper-style: mapped hidden states of the paired layers (CLS only for the image)
                for part in ("img", "txt", "fus", "dec"):
                    if w.get("rep_" + part, 0) > 0:
                        s_h, t_h = hid[part], t[part + "_layers"]
                        if part == "img":
                            s_h = [h[:, 0] for h in s_h]  # (B, D): the CLS state (spec 4.4.2)
                        pairs = rep_pairs(len(s_h), len(t_h), self.rep_layers)
                        out["rep_" + part] = rep_mse_loss(self.rep_maps[part], [s_h[i] for i, _ in pairs],
                                                          [t_h[j] for _, j in pairs], None if part == "img" else mask)
            else:
                if w.get("rep_img", 0) > 0:
                    out["rep_img"] = rep_loss(self.vision_proj(image_embeds[:, 0]), t["img_proj"])
                if w.get("rep_txt", 0) > 0:
                    out["rep_txt"] = rep_loss(self.text_proj(text_h[:, 0]), t["txt_proj"])
                if w.get("rep_fus", 0) > 0:
                    out["rep_fus"] = rep_loss(self.text_proj(pos_h[:, 0]), t["fus_proj"])
                if w.get("rep_dec", 0) > 0:
                    out["rep_dec"] = rep_loss(self.text_proj(dec_h[:, 0]), t["dec_proj"])
            if w.get("lm_kd", 0) > 0:
                out["lm_kd"] = lm_kd_loss(logits, t["logits"], labels)
            if w.get("attn_sa", 0) > 0:
                out["attn_sa"] = attn_kd_loss(t["sa"], pos_attn["sa"], mask)
            if w.get("attn_ca", 0) > 0:
                out["attn_ca"] = attn_kd_loss(t["ca"], pos_attn["ca"], mask)
            if w.get("attn_dec", 0) > 0:
                out["attn_dec"] = attn_kd_loss(t["dsa"], dec_attn["sa"], mask)
            if w.get("itm_kd", 0) > 0:  # teacher ITM on the same 3B pairs (its image tokens, same negatives)
                with torch.no_grad():
                    t_emb_g = cdist.all_gather_no_grad(t["image_embeds"])
                    t_neg = t["model"].itm_logits(ids_neg, mask_neg, torch.cat([t_emb_g[neg_img], t["image_embeds"]]))
                    t_itm = torch.cat([t["itm_pos"], t_neg]).float()
                out["itm_kd"] = F.kl_div(F.log_softmax(itm_logits.float(), -1), F.log_softmax(t_itm, -1),
                                         log_target=True, reduction="batchmean")

        self.enqueue(img_m_g, txt_m_g, idx_g)
        return out


@torch.no_grad()
def teacher_outputs(ret, cap, image, ids, mask, w):
    """Frozen teacher on the student's batch: everything the distillation losses read (spec 4.4). `ret` has the
    text encoder and heads, `cap` the decoder (the same model for a dlip checkpoint; two for split HF folders).
    ret=None (caption fine-tuning with --ft_distill): the decoder's outputs only."""
    t = {"model": ret}
    mse = w.get("rep_kind") == "mse"
    hid = {k: [] if mse else None for k in ("img", "txt", "fus", "dec")}
    if ret is not None:
        emb = ret.visual_encoder(image, hidden=hid["img"])  # (B, Nv, Dv_T)
        t["image_embeds"] = emb
        t["img_proj"] = ret.vision_proj(emb[:, 0])  # (B, E)
        txt_h, _ = ret.text_encoder(ids, mask, hidden=hid["txt"])
        t["txt_proj"] = ret.text_proj(txt_h[:, 0])
        t["img_feat"], t["txt_feat"] = F.normalize(t["img_proj"], dim=-1), F.normalize(t["txt_proj"], dim=-1)
        t["temp"] = ret.temp
        fus, attn = ret.fuse(ids, mask, emb, need_attn=True, hidden=hid["fus"])
        t["fus_proj"], t["sa"], t["ca"] = ret.text_proj(fus[:, 0]), attn["sa"], attn["ca"]
        if w.get("itm_kd", 0) > 0:
            t["itm_pos"] = ret.itm_head(fus[:, 0])
    if any(w.get(k, 0) > 0 for k in ("lm_kd", "rep_dec", "attn_dec")):
        emb_c = emb if cap is ret else cap.visual_encoder(image)
        logits, dec_h, dattn = cap.decode(ids, mask, emb_c, need_attn=True, hidden=hid["dec"])
        t["logits"], t["dsa"] = logits, dattn["sa"]
        if ret is not None:
            t["dec_proj"] = ret.text_proj(dec_h[:, 0])
    if mse:
        t.update({k + "_layers": [h[:, 0] if k == "img" else h for h in v] for k, v in hid.items() if v})
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in t.items()}


# ---- loading: dlip checkpoints, transformers BLIP folders, HF ViT (DeiT) / BERT initialisation

def resolve_local(name):
    """A local folder/file as given, else the local Hugging Face cache (never a download at run time)."""
    if not name or os.path.exists(name):
        return name
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id=name, local_files_only=True)
    except Exception:
        raise FileNotFoundError(f"{name}: not a local path and not in the Hugging Face cache; download it first "
                                f"(huggingface-cli download {name}) or pass a local folder") from None


def read_safetensors_folder(path):
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        sd = {}
        for f in files:
            sd.update(load_file(os.path.join(path, f)))
        return sd
    return torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)


def _hf_vision_key(k):
    """transformers BlipVisionModel names -> timm/BLIP ViT names (None = not a vision key)."""
    rules = [(r"embeddings\.class_embedding$", "cls_token"), (r"embeddings\.position_embedding$", "pos_embed"),
             (r"embeddings\.patch_embedding\.", "patch_embed.proj."), (r"post_layernorm\.", "norm."),
             (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
             (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
             (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
             (r"encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
             (r"encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp.")]
    for pat, rep in rules:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    return None


def hf_to_dlip(sd):
    """transformers BlipForImageTextRetrieval / BlipForConditionalGeneration state dict -> BLIP names here."""
    out, unused = {}, []
    for k, v in sd.items():
        if k.endswith("position_ids") or k.startswith("text_decoder.cls.predictions.decoder."):
            continue  # buffers; the LM projection is tied to the word embeddings and its bias to .bias
        if k.startswith("vision_model."):
            nk = _hf_vision_key(k[len("vision_model."):])
            (out.__setitem__("visual_encoder." + nk, v) if nk else unused.append(k))
        elif k.split(".")[0] in ("text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head"):
            out[k] = v
        else:
            unused.append(k)
    if unused:
        raise ValueError(f"unexpected keys in the transformers checkpoint: {unused[:5]}")
    return out


def shape_from_hf(config, special, has_encoder, has_decoder):
    v, t = config["vision_config"], config["text_config"]
    act = (v.get("hidden_act", "gelu"), t.get("hidden_act", "gelu"))
    assert act == ("gelu", "gelu"), f"only exact GELU BLIP models are supported, got {act}"
    return dict(image_size=v.get("image_size", 384), patch_size=v.get("patch_size", 16), vit_width=v["hidden_size"],
                vit_layers=v["num_hidden_layers"], vit_heads=v["num_attention_heads"],
                vit_mlp=v["intermediate_size"], vit_eps=v.get("layer_norm_eps", 1e-5), text_width=t["hidden_size"],
                text_layers=t["num_hidden_layers"], text_heads=t["num_attention_heads"],
                text_ffn=t["intermediate_size"], text_eps=t.get("layer_norm_eps", 1e-12),
                vocab_size=t["vocab_size"], max_pos=t.get("max_position_embeddings", 512),
                embed_dim=config.get("image_text_hidden_size", 256), dropout=0.0, has_encoder=has_encoder,
                has_decoder=has_decoder, tie_decoder=False, momentum=False, queue_size=0, ema=0.995, **token_ids(special))


def load_hf_blip(path, special, image_size=None, temp=0.07):
    """A transformers BLIP folder -> BLIP here, strictly: every weight of ours filled, every weight of theirs used."""
    path = resolve_local(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    arch = (config.get("architectures") or [""])[0]
    if arch not in ("BlipForImageTextRetrieval", "BlipForConditionalGeneration"):
        raise ValueError(f"{path}: architectures {arch!r}; expected BlipForImageTextRetrieval or "
                         f"BlipForConditionalGeneration")
    is_ret = arch == "BlipForImageTextRetrieval"
    s = shape_from_hf(config, special, has_encoder=is_ret, has_decoder=not is_ret)
    model = BLIP(s)
    sd = hf_to_dlip(read_safetensors_folder(path))
    if is_ret:
        sd["temp"] = torch.tensor(temp)  # HF keeps no ITC temperature
    load_strict(model, sd, path)
    if image_size and image_size != s["image_size"]:
        set_image_size(model, image_size)
    return model


def load_strict(model, sd, name):
    """Every parameter/buffer of `model` must come from `sd` and every key of `sd` must be used (spec 4.7.1)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith(("_queue", "queue_ptr"))]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{name}: does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                         f"shape mismatch {bad[:4]}")
    model.load_state_dict(sd, strict=False)


def set_image_size(model, size):
    """Resize the position embeddings of every ViT in `model` to a new input size (bicubic, once)."""
    grid = size // model.s["patch_size"]
    for vit in [m for m in model.modules() if isinstance(m, ViT)]:
        vit.pos_embed = nn.Parameter(resize_pos_embed(vit.pos_embed.data, grid),
                                     requires_grad=vit.pos_embed.requires_grad)
    model.s["image_size"] = size


QUEUES = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


def load_dlip(path, parts=None, image_size=None, queue_size=None):
    """A dlip checkpoint -> BLIP. `parts` overrides the shape (has_encoder/has_decoder/tie_decoder/momentum/...):
    fine-tuning builds the retrieval or the caption model from a pretrain checkpoint. Every weight of the new model
    must be in the checkpoint (tied tensors are stored under the decoder's names too, so an untied decoder loads
    completely); with `parts` the feature queues start fresh (new data, new image ids)."""
    ck = load_checkpoint(path)
    s = dict(ck["shape"], **(parts or {}))
    if queue_size:
        s["queue_size"] = queue_size
    model, sd = BLIP(s), ck["model"]
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k not in QUEUES]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:4]}")
    fresh = parts is not None or any(k in own and k in sd and own[k].shape != sd[k].shape for k in QUEUES)
    model.load_state_dict({k: sd[k] for k in own if k in sd and not (fresh and k in QUEUES)}, strict=False)
    if image_size and image_size != s["image_size"]:
        set_image_size(model, image_size)
    return model


def load_teacher(cfg, special, device, dtype, decoder_only=False):
    """(ret, cap): the frozen teacher's retrieval part and decoder part, in eval mode, without gradients.
    decoder_only (caption fine-tuning with --ft_distill): (None, the decoder of --teacher_caption or --teacher)."""
    path = (cfg.teacher_caption or cfg.teacher) if decoder_only else cfg.teacher
    if path.endswith((".pt", ".pth")) and not os.path.isfile(path):
        how = "--mode caption --init runs/dlip_toy_teacher/last.pt" if decoder_only else "--preset toy_teacher"
        raise FileNotFoundError(f"teacher checkpoint {path} not found; train one first: "
                                f"python dlip.py {how} --out_dir {os.path.dirname(path)}")
    if decoder_only:
        if path.endswith((".pt", ".pth")):  # a pretrain or a caption checkpoint: the untied decoder loads from both
            cap = load_dlip(path, parts=dict(has_encoder=False, has_decoder=True, tie_decoder=False, momentum=False,
                                             dropout=0.0), image_size=cfg.image_size)
        else:
            cap = load_hf_blip(path, special, cfg.image_size)
        ret = None
    elif path.endswith((".pt", ".pth")):
        ret = load_dlip(path, parts=dict(momentum=False, dropout=0.0), image_size=cfg.image_size)
        cap = ret
    else:
        ret = load_hf_blip(path, special, cfg.image_size, cfg.teacher_temp)
        cap = load_hf_blip(cfg.teacher_caption, special, cfg.image_size) if cfg.teacher_caption else None
    if ret is not None and not ret.s["has_encoder"]:
        raise ValueError(f"{cfg.teacher}: the teacher must have the text encoder and heads (a retrieval model)")
    if cap is not None and not cap.s["has_decoder"]:
        raise ValueError(f"{cfg.teacher_caption or cfg.teacher}: has no decoder")
    for m in {id(ret): ret, id(cap): cap}.values():
        if m is None:
            continue
        if m.s["vocab_size"] != special["vocab_size"]:
            raise ValueError(f"teacher vocabulary {m.s['vocab_size']} != student's {special['vocab_size']}: "
                             f"teacher and student must share the tokenizer")
        m.requires_grad_(False).eval().to(device=device, dtype=camp.frozen_dtype(device, dtype))
    return ret, cap


def vit_init_shape(path):
    """Shape keys an HF vision tower imposes on the image encoder it initialises (eps, activation, pre-norm)."""
    with open(os.path.join(resolve_local(path), "config.json")) as f:
        c = json.load(f)
    v = c.get("vision_config", c)
    clip = c.get("model_type", "").startswith("clip")
    return dict(vit_eps=v.get("layer_norm_eps", 1e-12), vit_act=v.get("hidden_act", "gelu"), vit_pre_norm=clip)


def init_from_hf_vit(model, path):
    """Image encoder from an HF ViT folder (DeiT, as V2's student; spec 4.3) or a CLIP vision tower (the toy
    world's). A shallower model takes evenly spaced layers of the source (4 -> 2: layers 1 and 3); widths must match.
    Loads the online and (when present) the momentum image encoder."""
    path = resolve_local(path)
    raw = read_safetensors_folder(path)
    vit, new = model.visual_encoder, {}
    sd = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in raw.items()}
    if "embeddings.class_embedding" in sd:  # CLIP(Vision)Model: pre-LN, separate q/k/v, no patch bias
        n_src = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
        new["cls_token"] = sd["embeddings.class_embedding"].view(1, 1, -1)
        new["patch_embed.proj.weight"] = sd["embeddings.patch_embedding.weight"]
        new["patch_embed.proj.bias"] = torch.zeros(vit.patch_embed.proj.out_channels)
        pos = sd["embeddings.position_embedding.weight"][None]
        new["norm_pre.weight"], new["norm_pre.bias"] = sd["pre_layrnorm.weight"], sd["pre_layrnorm.bias"]
        new["norm.weight"], new["norm.bias"] = sd["post_layernorm.weight"], sd["post_layernorm.bias"]
        names = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", proj="self_attn.out_proj",
                     norm1="layer_norm1", norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2", layer="encoder.layers")
    else:  # HF ViT / DeiT
        sd = {k[4:] if k.startswith("vit.") else k: v for k, v in raw.items()}
        n_src = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
        new["cls_token"] = sd["embeddings.cls_token"]
        new["patch_embed.proj.weight"] = sd["embeddings.patch_embeddings.projection.weight"]
        new["patch_embed.proj.bias"] = sd["embeddings.patch_embeddings.projection.bias"]
        pos = sd["embeddings.position_embeddings"]
        new["norm.weight"], new["norm.bias"] = sd["layernorm.weight"], sd["layernorm.bias"]
        names = dict(q="attention.attention.query", k="attention.attention.key", v="attention.attention.value",
                     proj="attention.output.dense", norm1="layernorm_before", norm2="layernorm_after",
                     fc1="intermediate.dense", fc2="output.dense", layer="encoder.layer")
    new["pos_embed"] = resize_pos_embed(pos, model.s["image_size"] // model.s["patch_size"])
    n_dst = len(vit.blocks)
    src = [round((i + 1) * n_src / n_dst) - 1 for i in range(n_dst)]
    for i, j in enumerate(src):
        p = f"{names['layer']}.{j}."
        for part in ("weight", "bias"):
            new[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([sd[p + f"{names[n]}.{part}"] for n in "qkv"])
            for ours, theirs in (("attn.proj", "proj"), ("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "fc1"),
                                 ("mlp.fc2", "fc2")):
                new[f"blocks.{i}.{ours}.{part}"] = sd[p + f"{names[theirs]}.{part}"]
    vit.load_state_dict(new, strict=True)
    if model.s["momentum"]:
        model.visual_encoder_m.load_state_dict(vit.state_dict())


def init_from_hf_bert(model, path):
    """Student text stack from an HF BERT folder: encoder, decoder self-attention (BLIP inits both from BERT) and
    the MLM head; the new [DEC]/[ENC] rows and the cross-attention stay random. token_type_embeddings[0] is folded
    into the position embeddings (BLIP drops token types; every BERT input here is type 0)."""
    path = resolve_local(path)
    sd = {k[5:] if k.startswith("bert.") else k: v for k, v in read_safetensors_folder(path).items()}
    with torch.no_grad():
        for stack in [model.text_encoder] + ([model.text_decoder.bert] if model.s["has_decoder"] else []):
            we = stack.embeddings.word_embeddings.weight
            n = min(we.shape[0], sd["embeddings.word_embeddings.weight"].shape[0])
            we[:n] = sd["embeddings.word_embeddings.weight"][:n]
            pe = sd["embeddings.position_embeddings.weight"]
            if "embeddings.token_type_embeddings.weight" in sd:
                pe = pe + sd["embeddings.token_type_embeddings.weight"][0]
            stack.embeddings.position_embeddings.weight[:pe.shape[0]] = pe
            stack.embeddings.LayerNorm.load_state_dict({"weight": sd["embeddings.LayerNorm.weight"],
                                                        "bias": sd["embeddings.LayerNorm.bias"]})
            for i, layer in enumerate(stack.encoder.layer):
                p = f"encoder.layer.{i}."
                sub = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
                layer.load_state_dict(sub, strict=False)
        if model.s["has_decoder"] and "cls.predictions.bias" in sd:
            pred = model.text_decoder.cls.predictions
            n = min(pred.bias.shape[0], sd["cls.predictions.bias"].shape[0])
            pred.bias[:n] = sd["cls.predictions.bias"][:n]
            pred.transform.load_state_dict({k[len("cls.predictions.transform."):]: v for k, v in sd.items()
                                            if k.startswith("cls.predictions.transform.")})
    if model.s["momentum"]:
        for on, mo in zip(model.online_modules(), model.momentum_modules()):
            mo.load_state_dict(on.state_dict())


# ============================================================================================ Losses
def soft_ce(logits, targets):
    """Cross-entropy with soft targets: logits, targets (B, C), target rows sum to 1 -> scalar."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(1).mean()


def itc_targets(pos, sim_m, alpha):
    """BLIP/ALBEF momentum-distilled ITC targets: alpha * softmax(momentum sims) + (1 - alpha) * positives.
    pos (B, C) bool (same image id), sim_m (B, C) momentum logits -> (B, C) rows summing to 1."""
    hard = pos.float() / pos.float().sum(1, keepdim=True)
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * hard


def sample_hard_negatives(sim, same, generator):
    """One negative column per row, drawn with probability softmax(sim row) (BLIP Sec. 3.2), never a positive.
    sim (G, G) logits in fp32; same (G, G) bool = same image. Vectorised (one multinomial call); fp32 + nan_to_num
    so AMP overflow cannot crash it (salesforce/BLIP #76, ALBEF #107). A row whose columns are all positives
    (e.g. G = 1) draws uniformly, so the shapes stay fixed."""
    w = F.softmax(sim.float(), dim=1) + 1e-4
    w = torch.nan_to_num(w, nan=1e-4, posinf=1.0, neginf=0.0).masked_fill(same, 0.0)
    empty = w.sum(1, keepdim=True) <= 0
    w = torch.where(empty, torch.ones_like(w), w)  # degenerate rows (all positives): uniform, keeps shapes
    return torch.multinomial(w, 1, generator=generator).squeeze(1)  # (G,)


def lm_labels(ids, mask, prompt_len):
    """Decoder targets: pads and the first `prompt_len` tokens ([DEC] + prompt) ignored (-100). (B, L)"""
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt_len] = -100
    return labels


def token_mean(total, count):
    """Sum over this rank's tokens / the mean token count per rank. One process: a plain mean. N ranks: DDP's
    gradient average then equals the gradient of the mean over the global batch's tokens, whatever the padding."""
    return total / cdist.all_reduce_mean(count.detach().float()).clamp_min(1.0)


def lm_loss(logits, labels, smoothing=0.1):
    """Next-token CE: logits (B, L, V) predict labels shifted by one; -100 ignored; label smoothing as BLIP."""
    tgt = labels[:, 1:].flatten()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tgt, ignore_index=-100, label_smoothing=smoothing,
                         reduction="sum")
    return token_mean(ce, (tgt != -100).sum())


def rep_loss(a, b):
    """Representation distillation (V2: CosineEmbeddingLoss, target +1): mean over batch of 1 - cos(a, b).
    a (B, E) student projection, b (B, E) teacher projection (the 256-d heads absorb the width difference)."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def rep_pairs(n_s, n_t, layers):
    """(student layer, teacher layer) index pairs, 0-based. last: the last layers; uniform: student layer k
    (1..n_s) -> teacher layer round(k * n_t / n_s) (spec 4.4.2), so the last layers always pair."""
    if layers == "last":
        return [(n_s - 1, n_t - 1)]
    if layers == "uniform":
        return [(k - 1, max(1, round(k * n_t / n_s)) - 1) for k in range(1, n_s + 1)]
    raise ValueError(f"--rep_layers {layers!r}: expected last or uniform")


def rep_mse_loss(maps, s_layers, t_layers, mask=None):
    """Paper-style representation distillation: sum over paired layers of MSE(W_s h_S, h_T), per feature, averaged
    over the batch (image CLS states (B, D), mask None) or over non-padding tokens (text states (B, L, D), mask
    (B, L))."""
    total = 0.0
    for W, hs, ht in zip(maps, s_layers, t_layers):
        d = (W(hs.float()) - ht.float()).pow(2).mean(-1)  # (B,) or (B, L)
        total = total + (d.mean() if mask is None else token_mean((d * mask).sum(), mask.sum()))
    return total


def lm_kd_loss(s_logits, t_logits, labels, T=1.0):
    """KL(softmax(z_T / T) || softmax(z_S / T)) per predicted position, averaged over target positions only
    (labels != -100; V2 also counted padding). s_logits, t_logits (B, L, V); labels (B, L) unshifted."""
    keep = labels[:, 1:] != -100  # (B, L-1): positions p predict token p+1
    s = F.log_softmax(s_logits[:, :-1][keep].float() / T, -1)  # (N, V)
    t = F.log_softmax(t_logits[:, :-1][keep].float() / T, -1)
    return token_mean(F.kl_div(s, t, log_target=True, reduction="sum"), keep.sum()) * T * T


def attn_kd_loss(a_t, a_s, mask):
    """KL(A_T || A_S) of last-layer attention maps over non-padding query rows, averaged over heads and rows.
    a_t (B, Ht, Lq, Lk), a_s (B, Hs, Lq, Lk) probabilities; mask (B, Lq) 1 = real token. If the head counts differ,
    both are averaged over heads first (spec 4.4.4)."""
    if a_t.shape[1] != a_s.shape[1]:
        a_t, a_s = a_t.mean(1, keepdim=True), a_s.mean(1, keepdim=True)
    a_t, a_s = a_t.float().clamp_min(1e-8), a_s.float().clamp_min(1e-8)
    kl = (a_t * (a_t.log() - a_s.log())).sum(-1)  # (B, H, Lq)
    rows = mask[:, None, :].float().expand_as(kl)
    return token_mean((kl * rows).sum(), rows.sum())


def itc_kd_loss(image_feat, text_feat, t, model, pos, alpha, kind="v2"):
    """ITC logit distillation. v2 (the tested recipe): the teacher's features ranked against the student's queue
    with the student's temperature give soft targets for the student's logits against the same candidates.
    kl: KL between teacher and student in-batch similarity rows (global batch), each with its own temperature.
    image_feat, text_feat (B, E) student; t: teacher outputs; pos (B, G+Q) positives of the candidate set."""
    temp = model.temp.detach()
    t_img_g, t_txt_g = cdist.all_gather_no_grad(t["img_feat"]), cdist.all_gather_no_grad(t["txt_feat"])  # (G, E)
    if kind == "v2":
        t_txt_c = torch.cat([t_txt_g, model.text_queue.T.float()])  # (G+Q, E)
        t_img_c = torch.cat([t_img_g, model.image_queue.T.float()])
        with torch.no_grad():
            tgt_i2t = itc_targets(pos, t["img_feat"] @ t_txt_c.T / temp, alpha)
            tgt_t2i = itc_targets(pos, t["txt_feat"] @ t_img_c.T / temp, alpha)
        return (soft_ce(image_feat @ t_txt_c.T / temp, tgt_i2t) + soft_ce(text_feat @ t_img_c.T / temp, tgt_t2i)) / 2
    # kl: CE against the teacher's rows (= KL + the teacher's entropy, a constant), global batch as candidates
    s_img_g, s_txt_g = cdist.all_gather_with_grad(image_feat), cdist.all_gather_with_grad(text_feat)  # (G, E)
    t_temp = t["temp"].detach()
    with torch.no_grad():
        p_i2t = F.softmax(t["img_feat"] @ t_txt_g.T / t_temp, 1)  # (B, G)
        p_t2i = F.softmax(t["txt_feat"] @ t_img_g.T / t_temp, 1)
    return (soft_ce(image_feat @ s_txt_g.T / model.temp, p_i2t) + soft_ce(text_feat @ s_img_g.T / model.temp, p_t2i)) / 2


# ============================================================================================ Data
def pre_caption(caption, max_words=30):
    """BLIP's caption cleaning: lowercase, punctuation .!"()*#:;~ to spaces, collapse spaces, first max_words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def load_tokenizer(path):
    """BERT tokenizer + BLIP's special tokens: bos [DEC] for the decoder, [ENC] for the image-grounded encoder."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_local(path))
    if tok.convert_tokens_to_ids("[DEC]") in (None, tok.unk_token_id):
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if tok.convert_tokens_to_ids("[ENC]") in (None, tok.unk_token_id):
        tok.add_tokens(["[ENC]"], special_tokens=True)
    special = dict(enc_id=tok.convert_tokens_to_ids("[ENC]"), dec_id=tok.convert_tokens_to_ids("[DEC]"),
                   sep_id=tok.sep_token_id, pad_id=tok.pad_token_id, cls_id=tok.cls_token_id, vocab_size=len(tok))
    return tok, special


class PairsDataset(torch.utils.data.Dataset):
    """Canonical pairs as training samples. Keys are (epoch, item): the caption choice (one random caption per image
    per epoch when per_caption=False, as in web pretraining) and the augmentation are seeded by (seed, epoch, item),
    so the stream is the same for any number of ranks and after a resume. Unreadable images are counted and the
    next readable record is used (equal batch shapes on every rank); too many stop the run."""

    def __init__(self, records, image_root, transform, per_caption, seed, max_words, max_bad_frac):
        self.records, self.transform, self.seed, self.max_words = records, transform, seed, max_words
        self.items = [(i, j) for i, r in enumerate(records) for j in range(len(r["captions"]))] if per_caption \
            else [(i, -1) for i in range(len(records))]
        self.loader = ImageFolderLoader(image_root, transform, max_bad_frac)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        epoch, k = key
        rng = random.Random(f"{self.seed}-{epoch}-{k}")
        for attempt in range(20):
            i, j = self.items[(k + attempt) % len(self.items)]
            self.transform.rng = rng
            image = self.loader(self.records[i]["image"])
            if self.loader.tried >= 100:
                self.loader.check()
            if image is not None:
                caps = self.records[i]["captions"]
                cap = caps[j] if j >= 0 else caps[rng.randrange(len(caps))]
                return image, pre_caption(cap, self.max_words), i
        raise RuntimeError(f"20 unreadable images in a row near record {k}: {self.loader.report()}")


class StepSampler:
    """Yields this rank's micro batches of dataset keys from `start_step` on. Step s of the run takes the s-th
    global batch of a seeded per-epoch permutation (drop_last); rank r takes its slice of each micro step, so a
    one-process run and an N-process run with the same global batch see the same samples."""

    def __init__(self, n, cfg, world, rank, start_step, total_steps):
        self.n, self.G, self.micro, self.world, self.rank = n, cfg.global_batch, cfg.micro_batch, world, rank
        self.seed, self.start, self.total = cfg.seed, start_step, total_steps
        self.accum = self.G // (self.micro * world)
        if self.accum < 1 or self.G != self.accum * self.micro * world:
            raise ValueError(f"global_batch {self.G} must be a multiple of micro_batch {self.micro} x world {world}")
        self.steps_per_epoch = n // self.G
        if self.steps_per_epoch < 1:
            raise ValueError(f"{n} training samples: fewer than one global batch ({self.G})")

    def __iter__(self):
        perm, perm_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, pos = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
                perm_epoch = epoch
            g = perm[pos * self.G:(pos + 1) * self.G]
            for a in range(self.accum):
                chunk = g[a * self.micro * self.world:(a + 1) * self.micro * self.world]
                yield [(epoch, int(x)) for x in chunk[self.rank * self.micro:(self.rank + 1) * self.micro]]

    def __len__(self):
        return (self.total - self.start) * self.accum


def collate(batch):
    images, caps, idx = zip(*batch)
    return torch.stack(images), list(caps), torch.tensor(idx)


def tokenize(tok, caps, max_len, device, pad_to_max=True):
    t = tok(caps, padding="max_length" if pad_to_max else "longest", truncation=True, max_length=max_len,
            return_tensors="pt")
    return t.input_ids.to(device), t.attention_mask.to(device)


def eval_set(path, max_words, limit=0):
    """Eval pairs -> image paths, flat caption list, txt2img (caption -> image), img2txts (image -> captions)."""
    recs = read_pairs(path)
    if limit:
        recs = recs[:limit]
    texts, txt2img, img2txts = [], [], []
    for i, r in enumerate(recs):
        img2txts.append([])
        for c in r["captions"]:
            img2txts[-1].append(len(texts))
            texts.append(pre_caption(c, max_words))
            txt2img.append(i)
    return [r["image"] for r in recs], texts, txt2img, img2txts, recs


def load_eval_images(paths, image_root, size, max_bad_frac):
    loader = ImageFolderLoader(image_root, ImageTransform(size, mean=CLIP_MEAN, std=CLIP_STD), max_bad_frac)
    images = [loader(p) for p in paths]
    loader.check()
    blank = torch.zeros(3, size, size)  # an unreadable eval image stays in (counts as a miss), reported above
    return torch.stack([im if im is not None else blank for im in images]), loader.report()


# ============================================================================================ Eval
@torch.no_grad()
def rerank_scores(sim, itm_fn, k, rows):
    """ITC shortlist + ITM re-rank (BLIP/ALBEF `evaluation`): for each row r in `rows` of sim (R, C), the top-k
    columns get itm_fn(r, cols) (raw ITM logit of 'match') + their ITC sim; all other entries -100."""
    out = {}
    for r in rows:
        top_sim, top = sim[r].topk(min(k, sim.shape[1]))
        out[r] = (top, itm_fn(r, top) + top_sim)
    return out


@torch.no_grad()
def retrieval_eval(model, images, texts, txt2img, img2txts, tok, cfg, dist, device, dtype):
    """TR/IR R@1/5/10 with ITC only and with ITC top-k + ITM re-ranking (k = cfg.k_test)."""
    from common.metrics import retrieval_recall
    model.eval()
    emb, img_feat, txt_ids, txt_mask, txt_feat = [], [], [], [], []
    with camp.autocast(device, dtype):
        for i in progress(range(0, len(images), cfg.eval_batch), dist.is_main, desc="images"):
            e, f = model.image_features(images[i:i + cfg.eval_batch].to(device))
            emb.append(e.float()), img_feat.append(f.float())
        for i in range(0, len(texts), cfg.eval_batch):
            ids, mask = tokenize(tok, texts[i:i + cfg.eval_batch], cfg.max_len, device)
            _, f = model.text_features(ids, mask)
            txt_ids.append(ids), txt_mask.append(mask), txt_feat.append(f.float())
    emb, img_feat, txt_feat = torch.cat(emb), torch.cat(img_feat), torch.cat(txt_feat)
    txt_ids, txt_mask = torch.cat(txt_ids), torch.cat(txt_mask)
    sim_i2t = img_feat @ txt_feat.T  # (N_img, N_txt)
    metrics = {f"itc_{k}": v for k, v in retrieval_recall(sim_i2t.cpu(), txt2img, img2txts).items()}
    if cfg.k_test > 0:
        def i2t(r, cols):
            with camp.autocast(device, dtype):
                return model.itm_logits(txt_ids[cols], txt_mask[cols], emb[r:r + 1].expand(len(cols), -1, -1))[:, 1]

        def t2i(r, cols):
            with camp.autocast(device, dtype):
                return model.itm_logits(txt_ids[r:r + 1].expand(len(cols), -1), txt_mask[r:r + 1].expand(len(cols), -1),
                                        emb[cols])[:, 1]
        parts_i = rerank_scores(sim_i2t, i2t, cfg.k_test, cdist.shard_indices(sim_i2t.shape[0], dist))
        parts_t = rerank_scores(sim_i2t.T, t2i, cfg.k_test, cdist.shard_indices(sim_i2t.shape[1], dist))
        score_i2t = torch.full_like(sim_i2t, -100.0)
        score_t2i = torch.full_like(sim_i2t.T, -100.0)
        for part in cdist.all_gather_object({r: (c.cpu(), s.float().cpu()) for r, (c, s) in parts_i.items()}):
            for r, (c, s) in part.items():
                score_i2t[r, c.to(device)] = s.to(device)
        for part in cdist.all_gather_object({r: (c.cpu(), s.float().cpu()) for r, (c, s) in parts_t.items()}):
            for r, (c, s) in part.items():
                score_t2i[r, c.to(device)] = s.to(device)
        r_i = retrieval_recall(score_i2t.cpu(), txt2img, img2txts)
        r_t = retrieval_recall(score_t2i.T.cpu(), txt2img, img2txts)
        metrics.update({k: v for k, v in r_i.items() if k.startswith("txt")})  # TR from the i2t re-rank
        metrics.update({k: v for k, v in r_t.items() if k.startswith("img")})  # IR from the t2i re-rank
        metrics["r_mean"] = sum(metrics[f"{a}_r{k}"] for a in ("txt", "img") for k in (1, 5, 10)) / 6
    return metrics


def new_cache(model):
    return [{"self": {}, "cross": {}} for _ in model.text_decoder.bert.encoder.layer]


@torch.no_grad()
def greedy_decode(model, image_embeds, prompt_ids, max_len, min_len, eos):
    """Greedy decoding with a KV cache. prompt_ids (B, P) start with [CLS] (becomes [DEC]) -> (B, <= max_len);
    after EOS a row is padded (as transformers' greedy search)."""
    B = prompt_ids.shape[0]
    kv, seq, inp = new_cache(model), prompt_ids, prompt_ids
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    while seq.shape[1] < max_len:
        logits, _, _ = model.decode(inp, torch.ones_like(seq), image_embeds, cache=kv)
        lp = logits[:, -1].float()
        if seq.shape[1] < min_len:
            lp[:, eos] = -float("inf")
        nxt = lp.argmax(-1).masked_fill(done, model.s["pad_id"])  # (B,)
        seq, inp = torch.cat([seq, nxt[:, None]], 1), nxt[:, None]
        done |= nxt == eos
        if done.all():
            break
    return seq


@torch.no_grad()
def beam_search(model, image_embeds, prompt_ids, num_beams, max_len, min_len, eos, length_penalty=1.0):
    """Beam search with a KV cache, following transformers' `_beam_search` (early_stopping=False): keep the 2K best
    continuations, finished ones (EOS among the top K, or max_len) enter a K-best pool scored by
    sum logprob / generated_length^length_penalty; stop when no running beam can beat the pool. -> (B, L) best."""
    B, P = prompt_ids.shape
    K, dev = num_beams, prompt_ids.device
    img = image_embeds.repeat_interleave(K, 0)  # (B*K, Nv, D)
    kv = new_cache(model)
    running = prompt_ids.repeat_interleave(K, 0).view(B, K, P)
    run_scores = torch.zeros(B, K, device=dev)
    run_scores[:, 1:] = -1e9  # the first step expands the first beam only
    fin_seqs = torch.full((B, K, max_len), model.s["pad_id"], dtype=torch.long, device=dev)
    fin_scores = torch.full((B, K), -1e9, device=dev)
    fin_any = torch.zeros(B, K, dtype=torch.bool, device=dev)
    open_ = torch.ones(B, 1, dtype=torch.bool, device=dev)  # early-stop heuristic not yet satisfied
    inp, cur = running.view(B * K, P), P
    while True:
        logits, _, _ = model.decode(inp, torch.ones(B * K, cur, dtype=torch.long, device=dev), img, cache=kv)
        lp = F.log_softmax(logits[:, -1].float(), -1)  # (B*K, V)
        if cur < min_len:
            lp[:, eos] = -float("inf")
        V = lp.shape[-1]
        acc = (lp.view(B, K, V) + run_scores[..., None]).view(B, K * V)
        top_scores, top_idx = acc.topk(2 * K, dim=1)  # (B, 2K)
        beam, token = top_idx // V, top_idx % V
        cand = torch.cat([running.gather(1, beam[..., None].expand(-1, -1, cur)), token[..., None]], 2)  # (B,2K,cur+1)
        finished = (token == eos) | (cur + 1 >= max_len)
        # running beams for the next step: the K best unfinished candidates
        keep = (top_scores - finished.float() * 1e9).topk(K, dim=1).indices  # (B, K)
        running = cand.gather(1, keep[..., None].expand(-1, -1, cur + 1))
        new_run_scores = (top_scores - finished.float() * 1e9).gather(1, keep)
        beam_src = beam.gather(1, keep)  # (B, K) which old beam each new beam extends
        # finished pool: candidates that finished among the top K, length-normalised, merged with the old pool
        norm = top_scores / ((cur + 1 - P) ** length_penalty)
        top_k_mask = torch.arange(2 * K, device=dev)[None] < K
        just = finished & top_k_mask
        norm = norm - (~just).float() * 1e9 - (~open_).float() * 1e9
        pad = torch.full((B, 2 * K, max_len - cur - 1), model.s["pad_id"], dtype=torch.long, device=dev)
        merged_seqs = torch.cat([fin_seqs, torch.cat([cand, pad], 2)], 1)
        merged_scores = torch.cat([fin_scores, norm], 1)
        merged_any = torch.cat([fin_any, just], 1)
        best = merged_scores.topk(K, dim=1).indices
        fin_seqs = merged_seqs.gather(1, best[..., None].expand(-1, -1, max_len))
        fin_scores, fin_any = merged_scores.gather(1, best), merged_any.gather(1, best)
        run_scores = new_run_scores
        cur += 1
        # early-stop heuristic (transformers, early_stopping=False): best running score at the current length
        worst = torch.where(fin_any, fin_scores, torch.full_like(fin_scores, 1e9)).min(1, keepdim=True).values
        worst = torch.where(fin_any.all(1, keepdim=True), worst, torch.full_like(worst, -1e9))
        open_ = open_ & (run_scores[:, :1] / ((cur - P) ** length_penalty) > worst)
        if not open_.any() or finished.all() or cur >= max_len:
            break
        order = (beam_src + torch.arange(B, device=dev)[:, None] * K).view(-1)  # reorder the cache rows
        for layer in kv:
            layer["self"]["k"], layer["self"]["v"] = layer["self"]["k"][order], layer["self"]["v"][order]
        inp = running[:, :, -1].reshape(B * K, 1)
    return fin_seqs[:, 0]  # (B, max_len) padded


@torch.no_grad()
def generate(model, images, tok, cfg, device, dtype, prompt):
    """Captions for a batch of images: [DEC] + prompt, beam search (or greedy when num_beams=1), prompt stripped."""
    model.eval()
    with camp.autocast(device, dtype):
        emb = model.visual_encoder(images.to(device))
    p = tok([prompt] * len(images), return_tensors="pt").input_ids[:, :-1].to(device)  # drop the trailing [SEP]
    with camp.autocast(device, dtype):
        if cfg.num_beams > 1:
            seqs = beam_search(model, emb, p, cfg.num_beams, cfg.gen_max_len, cfg.gen_min_len, model.s["sep_id"])
        else:
            seqs = greedy_decode(model, emb, p, cfg.gen_max_len, cfg.gen_min_len, model.s["sep_id"])
    return [tok.decode(s[p.shape[1]:], skip_special_tokens=True).strip() for s in seqs]


@torch.no_grad()
def caption_eval(model, images, recs, tok, cfg, dist, device, dtype, prompt, out_path=None):
    """BLEU-1..4, CIDEr(-D), ROUGE-L against all reference captions; writes the COCO-format result file."""
    from common.metrics import caption_metrics
    rows = cdist.shard_indices(len(images), dist)
    res = {}
    for i in progress(range(0, len(rows), cfg.eval_batch), dist.is_main, desc="captions"):
        sl = rows[i:i + cfg.eval_batch]
        for r, c in zip(sl, generate(model, images[sl], tok, cfg, device, dtype, prompt)):
            res[r] = c
    merged = {}
    for part in cdist.all_gather_object(res):
        merged.update(part)
    gts = {i: [pre_caption(c) for c in recs[i]["captions"]] for i in merged}
    metrics = caption_metrics(gts, {i: [c] for i, c in merged.items()})
    if out_path and dist.is_main:
        with open(out_path, "w") as f:
            json.dump([{"image_id": i, "image": recs[i]["image"], "caption": merged[i]} for i in sorted(merged)], f)
    return metrics


def count_params(model, parts):
    """Parameters of the modules named in `parts` (shared tensors counted once)."""
    seen, n = set(), 0
    for name in parts:
        if hasattr(model, name):
            for p in getattr(model, name).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
    return n


@torch.no_grad()
def efficiency(model, cfg, device, dtype, tag):
    """Params, FLOPs (torch FlopCounterMode) and images/s. FLOPs protocol [ours, spec 1]: one image + one text of
    max_len tokens through image encoder, text encoder and one fused (ITM) pass; captioning: image encoder +
    gen_max_len greedy steps (no beam)."""
    model.eval()
    s = model.s
    image = torch.randn(1, 3, s["image_size"], s["image_size"], device=device)
    ids = torch.full((1, cfg.max_len), 1000 % s["vocab_size"], dtype=torch.long, device=device)
    ids[:, 0] = s["cls_id"]
    mask = torch.ones_like(ids)
    out = {f"{tag}_params_vision": count_params(model, ["visual_encoder"])}
    if s["has_encoder"]:
        out[f"{tag}_params_retrieval"] = count_params(model, ["visual_encoder", "text_encoder", "vision_proj",
                                                              "text_proj", "itm_head"])

        def retr():
            with camp.autocast(device, dtype):
                emb, _ = model.image_features(image)
                model.text_features(ids, mask)
                model.itm_logits(ids, mask, emb)
        out[f"{tag}_gflops_retrieval"] = count_flops(retr) / 1e9
    if s["has_decoder"]:
        out[f"{tag}_params_caption"] = count_params(model, ["visual_encoder", "text_decoder"])

        def capt():
            with camp.autocast(device, dtype):
                emb = model.visual_encoder(image)
                greedy_decode(model, emb, ids[:, :1], cfg.gen_max_len, cfg.gen_max_len, s["sep_id"])
        out[f"{tag}_gflops_caption"] = count_flops(capt) / 1e9
    batch = torch.randn(cfg.eval_batch, 3, s["image_size"], s["image_size"], device=device)

    def enc():
        with camp.autocast(device, dtype):
            model.visual_encoder(batch)
    enc()
    t0 = time.perf_counter()
    for _ in range(3):
        enc()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out[f"{tag}_images_s"] = 3 * cfg.eval_batch / (time.perf_counter() - t0)
    return out


# ============================================================================================ Train
def lr_at(cfg, step, total, steps_per_epoch):
    if cfg.lr_schedule == "cosine":
        return cosine_lr(step, total, cfg.warmup_steps, cfg.lr, cfg.min_lr)
    if step < cfg.warmup_steps:  # BLIP pretrain: linear warm-up from warmup_lr, then x lr_decay per epoch
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    return max(cfg.min_lr, cfg.lr * cfg.lr_decay ** (step // steps_per_epoch))


def kd_weights(cfg):
    return {"itc_kd": cfg.w_itc_kd, "rep_img": cfg.w_rep_img, "rep_txt": cfg.w_rep_txt, "rep_fus": cfg.w_rep_fus,
            "rep_dec": cfg.w_rep_dec, "lm_kd": cfg.w_lm_kd, "attn_sa": cfg.w_attn_sa, "attn_ca": cfg.w_attn_ca,
            "attn_dec": cfg.w_attn_dec, "itm_kd": cfg.w_itm_kd, "itc_kd_kind": cfg.itc_kd, "rep_kind": cfg.rep_loss}


def build_model(cfg, special):
    """The trainable model of this mode: the pretrain student (all parts, tied decoder, momentum + queues), or the
    fine-tuning model built from --init: retrieval = image + text encoder + heads + momentum; caption = image
    encoder + decoder (BLIP's BLIP_Retrieval / BLIP_Decoder)."""
    if cfg.mode == "pretrain":
        shape = model_shape(cfg, special["vocab_size"], special)
        if cfg.init_vit:
            shape.update(vit_init_shape(cfg.init_vit))
        model = BLIP(shape)
        if cfg.init_vit:
            init_from_hf_vit(model, cfg.init_vit)
        if cfg.init_text:
            init_from_hf_bert(model, cfg.init_text)
        for on, mo in zip(model.online_modules(), model.momentum_modules()):
            mo.load_state_dict(on.state_dict())  # the momentum model starts as a copy
        model.s["prompt"] = ""  # BLIP pretrains the decoder without a prompt
        return model
    if not cfg.init:
        raise ValueError(f"--mode {cfg.mode} needs --init CHECKPOINT (a pretrain run's last.pt)")
    if cfg.mode == "retrieval":
        parts = dict(has_encoder=True, has_decoder=False, tie_decoder=False, momentum=True)
    else:
        parts = dict(has_encoder=False, has_decoder=True, tie_decoder=False, momentum=False)
    parts.update(grad_ckpt=cfg.grad_ckpt, dropout=cfg.dropout, ema=cfg.momentum)
    model = load_dlip(cfg.init, parts=parts, image_size=cfg.image_size, queue_size=cfg.queue_size)
    model.s["prompt"] = cfg.prompt if cfg.mode == "caption" else ""
    return model


def train(cfg, dist, device, dtype, log):
    if cfg.ft_distill and cfg.mode != "caption":
        raise ValueError("--ft_distill is for --mode caption (retrieval fine-tuning trains ITC + ITM only)")
    tok, special = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg, special).to(device)
    if model.s["vocab_size"] != special["vocab_size"]:
        raise ValueError(f"model vocabulary {model.s['vocab_size']} != tokenizer's {special['vocab_size']}")
    teacher, w = None, {}
    if cfg.mode == "pretrain" and cfg.teacher:
        t_ret, t_cap = load_teacher(cfg, special, device, dtype)
        w = kd_weights(cfg)
        if t_cap is None:
            for k in ("lm_kd", "rep_dec", "attn_dec"):
                if w[k] > 0:
                    raise ValueError(f"w_{k} > 0 needs a teacher decoder: pass --teacher_caption or set --w_{k} 0")
        if t_ret.s["embed_dim"] != model.s["embed_dim"]:
            raise ValueError(f"teacher projection width {t_ret.s['embed_dim']} != student embed_dim")
        teacher = (t_ret, t_cap)
        if cfg.rep_loss == "mse":
            model.add_rep_maps(t_ret.s, (t_cap or t_ret).s, cfg.rep_layers, w)
        elif cfg.rep_loss != "cos":
            raise ValueError(f"--rep_loss {cfg.rep_loss!r}: expected cos or mse")
        n_t = count_params(t_ret, ["visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"])
        n_s = count_params(model, ["visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"])
        log.info(f"teacher retrieval model {n_t / 1e6:.2f}M params, student {n_s / 1e6:.2f}M ({100 * n_s / n_t:.1f}%)")
    elif cfg.mode == "pretrain":
        log.info("no teacher: plain BLIP pretraining (ITC + ITM + LM)")
    if cfg.ft_distill:  # DLIP finding 2: the decoder needs its own distillation
        teacher = load_teacher(cfg, special, device, dtype, decoder_only=True)
        w = {"lm_kd": cfg.w_lm_kd, "attn_dec": cfg.w_attn_dec}
        log.info(f"caption fine-tuning distils the decoder of {cfg.teacher_caption or cfg.teacher} "
                 f"(w_lm_kd {cfg.w_lm_kd}, w_attn_dec {cfg.w_attn_dec})")

    # data
    records = [r for f in cfg.train_files for r in read_pairs(f)]
    records = records[:cfg.train_limit] if cfg.train_limit > 0 else records
    size = model.s["image_size"]
    scale = (0.2, 1.0) if cfg.mode == "pretrain" else (0.5, 1.0)
    data = PairsDataset(records, cfg.image_root, ImageTransform(size, train=True, scale=scale), cfg.mode != "pretrain",
                        cfg.seed, cfg.max_words, cfg.max_bad_frac)
    spe = len(data) // cfg.global_batch
    total = cfg.max_steps or max(1, int(round(cfg.epochs * spe)))
    ddp = cdist.wrap_ddp(model, dist)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per rank
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scaler = camp.make_scaler(dtype)
    step = 0
    if cfg.resume:
        ck = restore(cfg.resume, model, opt, scaler)
        step = ck["step"]
        set_rng_state(ck["rng"])
        log.info(f"resumed {cfg.resume} at step {step}")
    if cfg.bench:
        total = max(total, step + cfg.bench + 3)
    sampler = StepSampler(len(data), cfg, dist.world_size, dist.rank, step, total)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                                         generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG
    prompt_len = 1
    if cfg.mode == "caption":  # [DEC] + prompt tokens are not predicted (BLIP's prompt_length)
        prompt_len = len(tok(cfg.prompt).input_ids) - 1
    accum, task = sampler.accum, cfg.mode
    log.info(f"{len(data)} samples, {spe} steps/epoch, {total} steps, accumulation {accum}, "
             f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable params")

    def micro_step(batch, step, a):
        images, caps, idx = batch
        images, idx = images.to(device, non_blocking=True), idx.to(device)
        if task == "caption":
            caps = [cfg.prompt + c for c in caps]
        ids, mask = tokenize(tok, caps, cfg.max_len, device, pad_to_max=task != "caption")
        alpha = cfg.alpha * min(1.0, step / max(1.0, cfg.alpha_ramp_epochs * spe)) if cfg.alpha_ramp_epochs else \
            cfg.alpha
        t_out = None
        if teacher is not None:
            with camp.autocast(device, dtype):
                t_out = teacher_outputs(teacher[0], teacher[1], images, ids, mask, w)
        with camp.autocast(device, dtype):
            terms = ddp(images, ids, mask, idx, alpha=alpha, sample_seed=cfg.seed * 1_000_003 + step * 97 + a,
                        rank=dist.rank, task=task, teacher=t_out, w=w, label_smoothing=cfg.label_smoothing,
                        prompt_len=prompt_len)
        weights = {"itc": cfg.w_itc, "itm": cfg.w_itm, "lm": cfg.w_lm, **w}
        loss = sum(weights[k] * v for k, v in terms.items())
        return loss, terms, images.shape[0]

    def optimizer_step(step, batches):
        lr = lr_at(cfg, step, total, spe)
        set_lr(opt, lr)
        sums = {}
        for a, batch in enumerate(batches):
            ctx = ddp.no_sync() if (a < accum - 1 and ddp is not model) else contextlib.nullcontext()
            with ctx:
                loss, terms, _ = micro_step(batch, step, a)
                scaler.scale(loss / accum).backward()
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
        # one host sync per step: the rank-averaged terms, checked before the update (nothing is saved on NaN)
        keys = sorted(sums)
        sums = dict(zip(keys, cdist.all_reduce_mean(torch.stack([sums[k] for k in keys])).tolist()))
        check_finite(step, sums)
        scaler.unscale_(opt)
        gnorm = clip_grad(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return sums, lr, gnorm

    it = iter(loader)

    def next_batches():
        return [next(it) for _ in range(accum)]

    if cfg.bench:
        model.train()
        state = {"step": step}

        def one():
            optimizer_step(state["step"], next_batches())
            state["step"] += 1
        flops = None
        if device.type == "cuda":
            flops = count_flops(one)
        return run_bench(one, cfg.bench, cfg.global_batch, device, warmup=2, flops_per_step=flops), []

    timer, history, metrics, flops_step = StepTimer(device), [], {}, None
    model.train()
    while step < total:
        timer.start()
        if flops_step is None and device.type == "cuda":  # count the first step's FLOPs once, for MFU
            from torch.utils.flop_counter import FlopCounterMode
            counter = FlopCounterMode(display=False)
            with counter:
                sums, lr, gnorm = optimizer_step(step, next_batches())
            flops_step = counter.get_total_flops() * dist.world_size
        else:
            sums, lr, gnorm = optimizer_step(step, next_batches())
        tm = timer.stop(cfg.global_batch)
        step += 1
        history.append(sums)
        if step % cfg.log_every == 0 or step == total:
            m = mfu(flops_step, tm["ms_step"] / 1000, device)
            log.log(step, **sums, lr=lr, grad_norm=gnorm, **tm, **({"mfu": m} if m is not None else {}))
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save(cfg, model, opt, scaler, step, metrics, "last.pt", dist)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            metrics = evaluate(cfg, model, tok, dist, device, dtype, cfg.val_file, "val", log)
            model.train()
    metrics = {"final_" + k: v for k, v in history[-1].items()} if history else {}
    metrics.update({"first_" + k: v for k, v in history[0].items()} if history else {})
    save(cfg, model, opt, scaler, step, metrics, "last.pt", dist)
    for split, path in (("val", cfg.val_file), ("test", cfg.test_file)):
        if path:
            metrics.update(evaluate(cfg, model, tok, dist, device, dtype, path, split, log))
    return metrics, history


def save(cfg, model, opt, scaler, step, metrics, name, dist):
    if dist.is_main:
        save_checkpoint(os.path.join(cfg.out_dir, name), {
            "config": vars(cfg).copy(), "shape": model.s, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "rng": rng_state(), "metrics": metrics})
    cdist.barrier()


def evaluate(cfg, model, tok, dist, device, dtype, path, split, log):
    """The mode's metrics on one split: retrieval (ITC and ITC+ITM recalls) and/or captioning."""
    paths, texts, txt2img, img2txts, recs = eval_set(path, cfg.max_words, cfg.max_eval_images)
    images, report = load_eval_images(paths, cfg.image_root, model.s["image_size"], cfg.max_bad_frac)
    out = {}
    if model.s["has_encoder"] and cfg.mode in ("pretrain", "retrieval", "eval") and cfg.task in ("all", "retrieval"):
        out.update(retrieval_eval(model, images, texts, txt2img, img2txts, tok, cfg, dist, device, dtype))
    if model.s["has_decoder"] and cfg.mode in ("pretrain", "caption", "eval") and cfg.task in ("all", "caption"):
        prompt = model.s.get("prompt", cfg.prompt)  # what the decoder was trained with (HF folders: --prompt)
        os.makedirs(cfg.out_dir, exist_ok=True)
        out.update(caption_eval(model, images, recs, tok, cfg, dist, device, dtype, prompt,
                                os.path.join(cfg.out_dir, f"captions_{split}.json")))
    out = {f"{split}_{k}": v for k, v in out.items()}
    log.info(f"{split} ({report}): " + " ".join(f"{k} {v:.4g}" for k, v in out.items()))
    model.train()
    return out


# ============================================================================================ main
def resolve(cfg, argv):
    """Fine-tuning recipe of the preset (keys not given on the command line) and, for the toy presets, the toy
    world's files (built on first use)."""
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    base = "paper" if cfg.preset == "paper" else "toy"
    for k, v in FINETUNE[base].get(cfg.mode, {}).items():
        if k not in given:
            setattr(cfg, k, v)
    toy_paths = [f for f, v in vars(cfg).items() if isinstance(v, str) and v.startswith("toy:")]
    if toy_paths or (cfg.preset.startswith("toy") and not (cfg.train_files and cfg.image_root)):
        from data.toy import ensure_toy_world
        root = ensure_toy_world(cfg.toy_root)
        for f in toy_paths:
            setattr(cfg, f, os.path.join(root, getattr(cfg, f)[len("toy:"):]))
        cfg.image_root = cfg.image_root or root
        if not cfg.train_files:
            cfg.train_files = [os.path.join(root, "pairs_train.jsonl")]
            cfg.val_file = cfg.val_file or os.path.join(root, "pairs_val.jsonl")
            cfg.test_file = cfg.test_file or os.path.join(root, "pairs_test.jsonl")
    return cfg


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve(parse_config(Config, PRESETS, argv), argv)
    dist = cdist.setup_distributed(cfg.device)
    device = dist.device
    dtype = camp.pick_dtype(device, cfg.precision)
    camp.seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    log = Logger(cfg.out_dir, dist.is_main)
    log.info(f"dlip.py --mode {cfg.mode} (preset {cfg.preset}, world {dist.world_size}, {device}, {dtype})\n"
             + format_config(cfg))
    if dist.is_main:
        save_config(cfg, cfg.out_dir)
    try:
        if cfg.mode in ("pretrain", "retrieval", "caption"):
            metrics, _ = train(cfg, dist, device, dtype, log)
        elif cfg.mode == "eval":
            metrics = run_eval(cfg, dist, device, dtype, log)
        else:
            raise ValueError(f"--mode must be pretrain|retrieval|caption|eval, got {cfg.mode!r}")
    finally:
        cdist.cleanup_distributed()
    if dist.is_main:
        with open(os.path.join(cfg.out_dir, f"metrics_{cfg.mode}.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


def load_any(path, special, image_size):
    if path.endswith((".pt", ".pth")):
        return load_dlip(path, parts=dict(momentum=False), image_size=image_size)
    return load_hf_blip(path, special, image_size)


def run_eval(cfg, dist, device, dtype, log):
    if not cfg.ckpt:
        raise ValueError("--mode eval needs --ckpt")
    tok, special = load_tokenizer(cfg.tokenizer)
    out = {}
    models = {"student": load_any(cfg.ckpt, special, cfg.image_size)}
    if cfg.teacher and cfg.task in ("efficiency", "all"):
        models["teacher"] = load_any(cfg.teacher, special, cfg.image_size)
    for tag, m in models.items():
        m.to(device).eval().requires_grad_(False)
        if cfg.task in ("efficiency", "all"):
            out.update(efficiency(m, cfg, device, dtype, tag))
    if "teacher" in models:
        for k in list(out):
            if k.startswith("student_params") and k.replace("student", "teacher") in out:
                out[k.replace("params", "param_ratio")] = out[k] / out[k.replace("student", "teacher")]
    if cfg.task in ("retrieval", "caption", "all") and cfg.test_file:
        out.update(evaluate(cfg, models["student"], tok, dist, device, dtype, cfg.test_file, "test", log))
    log.info(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
