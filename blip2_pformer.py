"""BLIP-2 with a P-Former: vision-language learning bootstrapped by decoupled language pre-training.

BLIP-2 (Li et al., ICML 2023, arXiv 2301.12597) bridges a frozen image encoder and a frozen LLM
with a small Querying Transformer (Q-Former): Nq learned queries cross-attend to the image and
become Nq soft prompts for the LLM.  Stage 1 trains the Q-Former with image-text contrastive (ITC),
matching (ITM) and image-grounded generation (ITG) losses; stage 2 trains it to prompt the frozen
LLM.  The P-Former (Jian, Gao & Vosoughi, NeurIPS 2023, arXiv 2307.07063) adds a stage 0 on text
alone: a BERT encoder whose prompt P*(T) makes the frozen LLM reproduce the sentence T.  Stages 1
and 2 then also regress the Q-Former's prompts onto P*(caption) (`align_loss`): an LLM-ready target
that plain BLIP-2 has to discover from images.  The P-Former serves training only.  Reading order:
QFormer, PFormer, the Losses (align_loss first), train(); transformers import/export has its own
section after Train.

Toy world on a CPU (default preset; builds the backbones a stage reads under data/toy on first use):
    python blip2_pformer.py --stage 0 --out_dir runs/bp/s0           # P-Former on text, frozen LLM
    python blip2_pformer.py --stage 1 --pformer_ckpt runs/bp/s0/checkpoint.pt --out_dir runs/bp/s1
    python blip2_pformer.py --stage 2 --init runs/bp/s1/checkpoint.pt \
        --pformer_ckpt runs/bp/s0/checkpoint.pt --out_dir runs/bp/s2  # then --stage caption | eval
Paper recipe (PRESETS["paper"]), multi-GPU / multi-node, same code path:
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        blip2_pformer.py --preset paper --stage 1 --train_file pairs.jsonl --image_root IMG \
        --val_file coco_val.jsonl --pformer_ckpt runs/s0/checkpoint.pt
Reproduces the paper's stages (0; 1: ITC+ITM+ITG+10*align; 2: LM+100*align; caption fine-tuning),
its zero-shot VQA and the released Q-Former's parameter counts; toy figures: docs/blip2_pformer.md.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist as D
from common.amp import autocast, fp32, frozen_dtype, make_scaler, pick_dtype, seed_everything
from common.attention import attention, merge_heads, split_heads
from common.checkpoint import (RESUME_FREE, CheckpointMismatch, check_loaded, check_resume_config,
                               describe, expect_checkpoint, load_checkpoint, rng_state,
                               save_checkpoint, set_rng_state)
from common.config import format_config, parse_config, save_config
from common.data import (DataError, ImageFolderLoader, ShardStream, StepSampler, StreamTracker,
                         fit_micro, make_loader, pre_caption, read_lines, read_pairs, read_vqa,
                         shard_sample_count, stream_loader)
from common.hf import read_hf_weights, resolve_local
from common.image import CLIP_MEAN, CLIP_STD, ImageTransform, normalize
from common.log import Logger, progress
from common.train import StepTimer, count_flops, optimizer_update, param_groups, run_bench, set_lr

SCRIPT = "blip2_pformer"


# ================================================================================================ Config
@dataclass
class Config:
    preset: str = "toy"
    stage: str = "1"             # 0 | 1 | 2 | caption | eval
    mode: str = "run"            # run the stage | params: its paper-size parameter counts and FLOPs, offline
    out_dir: str = "runs/blip2_pformer"
    toy_root: str = "data/toy"
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"      # bf16 autocast on GPU; frozen backbones stored in bf16 there
    bench: int = 0
    compile: bool = False        # torch.compile the trained module (a GPU's speed-up; tests keep it off)
    resume: str = ""
    resume_changes: bool = False  # continue a --resume whose config differs from the checkpoint's
    # --- models ("" = the toy world's backbone) ---
    vision_path: str = ""        # CLIP / CLIPVision / Blip2Vision folder, or a BLIP-2 folder's ViT
    bert_path: str = ""          # BERT that initialises the Q-Former and the P-Former
    llm_path: str = ""           # OPT (decoder-only) or (Flan-)T5 (encoder-decoder), per its config
    t5_dense_act_fn: str = ""    # LAVIS sets Flan-T5's FFN activation to "gelu"; "" keeps it
    hf_import: str = ""          # Blip2ForConditionalGeneration folder (ViT, Q-Former, LLM ...)
    hf_export: str = ""          # write the trained model as a Blip2ForConditionalGeneration folder
    init: str = ""               # a stage-1, stage-2 or caption checkpoint (load_own), any stage
    pformer_ckpt: str = ""       # stage-0 checkpoint; given -> alignment loss in stages 1/2/caption
    pformer_train_mode: bool = False  # BLIText made P* with dropout on (it calls .train())
    llm_train_mode: bool = False  # frozen LLM's dropout on in training (LAVIS runner_base.py)
    num_query: int = 32
    embed_dim: int = 256         # ITC feature size
    max_txt_len: int = 32
    cross_attention_freq: int = 2
    qformer_dropout: float = 0.1
    reset_ln_vision: bool = True  # stage 1 from scratch: fresh ln_vision, weight 1 bias 0 (LAVIS)
    train_vision: Optional[bool] = None  # caption fine-tuning unfreezes the ViT in the paper
    image_size: Optional[int] = None
    hflip: Optional[bool] = None   # training flips (LAVIS blip2_image_train, blip_image_train)
    randaug: Optional[bool] = None  # BLIP's RandomAugment(2, 5) (LAVIS blip_image_train)
    grad_checkpoint: Optional[bool] = None  # a trained ViT recomputes its blocks in backward
    # --- data ("" = the toy world's files) ---
    train_file: str = ""         # canonical pairs JSONL
    train_shards: str = ""       # or img2dataset webdataset shards, e.g. 'cc3m/{00000..00331}.tar'
    val_file: str = ""
    test_file: str = ""          # caption: also scored, from the selected epoch's weights (LAVIS test_splits)
    vqa_file: str = ""           # canonical vqa JSONL (zero-shot evaluation)
    text_file: str = ""          # stage 0: one sentence per line
    image_root: str = ""
    blank_images: bool = False   # baseline: every image replaced by a constant one
    num_workers: int = 2
    max_bad_frac: float = 0.05   # stop when more of the distinct images tried are unreadable
    # --- optimisation (None = the stage's value in STAGE_RECIPES[preset]) ---
    epochs: Optional[int] = None
    max_steps: int = 0           # > 0: stop after this many optimizer steps (tests, quick runs)
    global_batch: Optional[int] = None
    micro_batch: Optional[int] = None
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    warmup_lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.05
    grad_clip: float = 0.0       # LAVIS does not clip; > 0 clips
    align_weight: Optional[float] = None  # w1 = 10 (stage 1), w2 = 100 (stage 2), 1 (caption)
    mask_prob: float = 0.25      # stage 0 (OPT): BERT tokens replaced by [MASK]
    log_every: int = 10
    save_every: int = 500
    # --- evaluation ---
    eval_tasks: Optional[str] = None  # comma list of retrieval, caption, vqa ("" = none)
    eval_max: int = 0            # > 0: evaluate on the first N images / questions only
    eval_batch: int = 32
    k_test: int = 0              # > 0: ITM re-ranks each image's / text's ITC top-k; 0: ITC only
    report: bool = True          # <out_dir>/report.html: curves, captions, answers, retrievals, attention
    caption_prompt: Optional[str] = None
    num_beams: Optional[int] = None
    max_new_tokens: Optional[int] = None
    min_new_tokens: Optional[int] = None
    min_length: Optional[int] = None  # BLIText's (8): counts OPT's prompt or T5's start token
    vqa_prompt: str = "Question: {} Short answer:"  # LAVIS configs; the BLIP-2 paper: "Answer:"
    vqa_num_beams: int = 5
    vqa_max_new_tokens: int = 10
    vqa_length_penalty: float = -1.0
    vqa_rule: str = "lavis2017"  # VQA accuracy rule (common.metrics.vqa_accuracy): lavis2017 | official
    vqa_lemmatize: Optional[bool] = None  # OK-VQA's answer lemmatisation; None: on for "okvqa" records


PRESETS = {
    "toy": {"qformer_dropout": 0.0, "num_query": 8},
    "paper": {
        # EVA ViT-g/14 (39 blocks = penultimate layer) is distributed inside the BLIP-2 checkpoints.
        "vision_path": "Salesforce/blip2-opt-2.7b",
        "bert_path": "bert-base-uncased",
        "llm_path": "facebook/opt-2.7b",  # or google/flan-t5-xl with --t5_dense_act_fn gelu
        "num_workers": 8, "log_every": 50, "save_every": 2000, "eval_batch": 64,
        "k_test": 128,  # LAVIS projects/blip2/eval/ret_coco_eval.yaml
        "llm_train_mode": True,  # LAVIS blip2_opt.py, blip2_t5.py: LLM frozen by requires_grad only
        "pformer_train_mode": True,  # BLIText: its runner's model.train() reaches the P-Former too
        "vqa_length_penalty": 0.0,  # LAVIS blip2_opt.py predict_answers; Flan-T5: -1 (blip2_t5.py)
    },
}

# Per-stage recipes (BLIText / LAVIS configs).  Stage 1/2 "epochs" are over COCO+VG+CC3M+SBU (4.6M
# pairs), stage 0 over ~12M sentences.  Linear warm-up from warmup_lr inside epoch 0, then a
# per-epoch cosine to min_lr.  Caption: BLIText's and LAVIS's caption_coco_ft.yaml (blip2_image_train,
# no RandAugment; LAVIS's before 3ac397a: --randaug true), ViT gradient checkpointing on.
_PAPER_GEN = dict(num_beams=5, max_new_tokens=30, min_length=8, caption_prompt="a photo of",
                  eval_tasks="caption,vqa")
_TOY_GEN = dict(image_size=64, train_vision=False, num_beams=3, max_new_tokens=20, min_new_tokens=1)
STAGE_RECIPES = {
    "paper": {
        "0": dict(epochs=5, global_batch=384, micro_batch=128, lr=1e-4, min_lr=1e-5, warmup_lr=1e-6,
                  warmup_steps=2000, eval_tasks=""),
        "1": dict(epochs=10, global_batch=1024, micro_batch=128, lr=1e-4, min_lr=1e-5,
                  warmup_lr=1e-6, warmup_steps=5000, align_weight=10.0, image_size=224,
                  train_vision=False, eval_tasks="retrieval", hflip=True),
        "2": dict(epochs=10, global_batch=1024, micro_batch=128, lr=1e-4, min_lr=1e-5,
                  warmup_lr=1e-6, warmup_steps=2000, align_weight=100.0, image_size=224,
                  train_vision=False, hflip=True, **_PAPER_GEN),
        "caption": dict(epochs=5, global_batch=128, micro_batch=16, lr=1e-5, min_lr=0.0, warmup_lr=1e-8,
                        warmup_steps=1000, align_weight=1.0, image_size=364, train_vision=True,
                        grad_checkpoint=True, hflip=True, **dict(_PAPER_GEN, eval_tasks="caption")),
        "eval": dict(image_size=224, train_vision=False, **_PAPER_GEN),
    },
    # toy: no flips (its captions say left / right; LAVIS flips without touching the caption)
    "toy": {  # an epoch: the full toy world (10k pairs, 20k sentences)
        "0": dict(epochs=1, global_batch=64, micro_batch=64, lr=1e-3, min_lr=1e-4, warmup_lr=1e-5,
                  warmup_steps=20, eval_tasks=""),
        "1": dict(epochs=1, global_batch=32, micro_batch=32, lr=2e-3, min_lr=1e-4, warmup_lr=1e-5,
                  warmup_steps=20, align_weight=10.0, image_size=64, train_vision=False,
                  eval_tasks="retrieval"),
        "2": dict(epochs=1, global_batch=32, micro_batch=32, lr=1e-3, min_lr=1e-4, warmup_lr=1e-5,
                  warmup_steps=20, align_weight=100.0, caption_prompt="", eval_tasks="caption,vqa",
                  **_TOY_GEN),
        "caption": dict(epochs=1, global_batch=32, micro_batch=32, lr=3e-4, min_lr=0.0, warmup_lr=1e-6,
                        warmup_steps=10, align_weight=1.0, caption_prompt="a photo of",
                        eval_tasks="caption", **_TOY_GEN),
        "eval": dict(caption_prompt="", eval_tasks="caption,vqa", **_TOY_GEN),
    },
}
KINDS = {"0": "stage 0", "1": "stage 1", "2": "stage 2", "caption": "caption"}  # checkpoint kinds


def resolve_config(cfg):
    """Fill the stage recipe's values for the fields left at None."""
    if cfg.stage not in ("0", "1", "2", "caption", "eval"):
        raise SystemExit(f"--stage must be 0, 1, 2, caption or eval, got {cfg.stage!r}")
    if cfg.stage == "1" and cfg.hf_export and not (cfg.pformer_ckpt or cfg.hf_import):
        raise SystemExit("--hf_export writes the LLM projection, which a plain --stage 1 lacks: "
                         "pass --pformer_ckpt or --hf_import too, or export after --stage 2")
    if cfg.stage == "0" and cfg.hf_export:
        raise SystemExit("--hf_export: --stage 0 trains the P-Former alone, no BLIP-2 model; "
                         "export after --stage 2 (or --stage eval --init <its checkpoint>)")
    if cfg.min_new_tokens is not None:  # on the command line (no preset sets it): it replaces the
        if cfg.min_length is not None:  # recipe's min_length (min_new() reads it only at 0)
            raise SystemExit("--min_new_tokens counts new tokens, --min_length LAVIS's way: pass one")
        cfg.min_length = 0
    recipe = STAGE_RECIPES.get(cfg.preset, STAGE_RECIPES["toy"])[cfg.stage]
    fallback = {"train_vision": False, "hflip": False, "randaug": False, "caption_prompt": "",
                "align_weight": 1.0, "eval_tasks": "", "grad_checkpoint": False,
                "image_size": 224, "num_beams": 3, "max_new_tokens": 20, "min_new_tokens": 1}
    for f in dataclasses.fields(cfg):  # still None: harmless values for stages that do not use it
        if f.name == "image_size" and cfg.stage == "eval" and (cfg.init or cfg.hf_import) or \
                f.name == "vqa_lemmatize":  # eval_image_size() reads it from the checkpoint or folder,
            continue  # lemmatize_vqa() from the records
        if getattr(cfg, f.name) is None:
            setattr(cfg, f.name, recipe.get(f.name, fallback.get(f.name, 0)))
    return cfg


def eval_image_size(cfg, init):
    """--stage eval without --image_size: the size the --init checkpoint trained at (LAVIS evaluates
    a COCO fine-tuned BLIP-2 at its 364 px, caption_coco_opt2.7b_eval.yaml) or the --hf_import
    folder's ViT has (blip2-opt-2.7b-coco: 364), else the recipe's."""
    recipe = STAGE_RECIPES.get(cfg.preset, STAGE_RECIPES["toy"])["eval"]["image_size"]
    trained = ((init or {}).get("config") or {}).get("image_size")
    if not (cfg.image_size or trained) and cfg.hf_import:
        from transformers import Blip2Config
        trained = Blip2Config.from_pretrained(resolve_local(cfg.hf_import)).vision_config.image_size
    return cfg.image_size or trained or recipe


def tasks_of(cfg):
    return [t for t in cfg.eval_tasks.split(",") if t]


def check_eval_files(cfg):
    """Before any training: the files that the evaluations after it read exist."""
    tasks = tasks_of(cfg) if cfg.stage != "0" and not cfg.bench else []  # (--bench: no evaluation)
    files = [("retrieval", "val_file"), ("caption", "val_file"), ("vqa", "vqa_file")]
    for task, flag in files + [("caption", "test_file")] * bool(cfg.test_file):
        if task in tasks and not os.path.isfile(path := getattr(cfg, flag)):
            raise SystemExit(f"--eval_tasks {task} reads --{flag} ({path or 'not given'}: no such "
                             f"file); pass it, or leave {task} out of --eval_tasks ('' for none)")


def needs_llm(cfg):
    generates = {"caption", "vqa"} & set(tasks_of(cfg))
    return cfg.stage in ("0", "2", "caption") or bool(generates) or bool(cfg.hf_export)


def toy_files(cfg):
    """{field: path under toy_root} of what this run reads, and the toy backbones among them: a
    first run builds only those (stage 1: BERT and the vision tower; stage 0: BERT and the LLM). The
    toy world mirrors the paper preset: a BLIP-2-format vision tower (so --hf_export works;
    --vision_path data/toy/models/clip runs the CLIP-tower path) and a T5 pretrained like a tiny
    Flan-T5 as the LLM (--llm_path data/toy/models/opt runs the OPT code paths)."""
    stage, evals = cfg.stage, set(tasks_of(cfg)) if cfg.stage != "0" else set()
    need = {"bert_path": "models/bert"}
    if not cfg.hf_import and stage != "0":
        need["vision_path"] = "models/blip2_vision"
    if not cfg.hf_import and needs_llm(cfg):
        need["llm_path"] = "models/t5"
    if stage == "0":
        need["text_file"] = "corpus.txt"
    if stage not in ("0", "eval"):
        need.update(train_file="pairs_train.jsonl", image_root=".")
    if evals & {"retrieval", "caption"}:
        need.update(val_file="pairs_val.jsonl", image_root=".")
    if "vqa" in evals:
        need.update(vqa_file="vqa_val.jsonl", image_root=".")
    paths = [os.path.normpath(getattr(cfg, f) or os.path.join(cfg.toy_root, need[f]))
             for f in ("vision_path", "bert_path", "llm_path") if f in need]
    models = os.path.normpath(os.path.join(cfg.toy_root, "models"))
    return need, [os.path.basename(p) for p in paths if os.path.dirname(p) == models]


# ================================================================================================ Model
class Attention(nn.Module):
    """BERT attention block: attention over `kv`, then dense, dropout, residual, LayerNorm."""

    def __init__(self, dim, heads, kv_dim, dropout, eps):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query, self.key = nn.Linear(dim, dim), nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)
        self.dense, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def keys_values(self, kv):  # (B, L, W) -> (B, H, L, C/H) twice; B may be 0 (itm_cross_kv)
        return split_heads(self.key(kv), self.heads), split_heads(self.value(kv), self.heads)

    def forward(self, x, kv, mask=None, past=None):
        """`kv`: the (B, L, W) sequence attended to, or its (keys, values) made earlier; `past`:
        keys and values prepended to them (the query rows' of the query pass, read by ITG's text
        rows). Returns the output and this call's (keys, values), so that later passes can reuse
        them."""
        k, v = kv if isinstance(kv, tuple) else self.keys_values(kv)
        ka, va = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        o = attention(split_heads(self.query(x), self.heads), ka, va, mask,
                      dropout_p=self.dropout if self.training else 0.0)  # (B, H, Lq, C/H)
        return self.norm(x + self.drop(self.dense(merge_heads(o)))), (k, v)  # (B, Lq, C)


class FFN(nn.Module):
    def __init__(self, dim, hidden, dropout, eps):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm, self.drop = nn.LayerNorm(dim, eps=eps), nn.Dropout(dropout)

    def forward(self, x):
        return self.norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))  # BERT's exact (erf) GELU


# Q-Former parameters only stage 1's ITC/ITM/ITG and retrieval use (text side, ITC/ITM heads)
TEXT_ONLY = {"word_embeddings", "position_embeddings", "vision_proj", "text_proj", "itm_head", "temp",
             "lm_dense", "lm_norm", "lm_bias"}


class QFormerLayer(nn.Module):
    """Self-attention shared by [queries; text]; cross-attention to the image (queries only) on
    every `freq`-th layer; separate query and text FFNs (BLIP-2 Sec. 3.1, LAVIS Qformer.py)."""

    def __init__(self, dim, heads, ffn, vision_width, dropout, eps, cross, text):
        super().__init__()
        self.self_attn = Attention(dim, heads, dim, dropout, eps)
        self.cross_attn = Attention(dim, heads, vision_width, dropout, eps) if cross else None
        self.ffn_query = FFN(dim, ffn, dropout, eps)
        self.ffn_text = FFN(dim, ffn, dropout, eps) if text else None

    def forward(self, x, mask, n_query, image, past=None):
        """-> x, the self-attention (keys, values) of x, the cross-attention (keys, values) of the
        image (`image` may be those already, `past` the query rows' self-attention ones:
        Attention.forward)."""
        x, self_kv = self.self_attn(x, x, mask, past)
        q, t = x[:, :n_query], x[:, n_query:]
        cross_kv = None
        if n_query and self.cross_attn is not None:
            q, cross_kv = self.cross_attn(q, image)  # only the queries see the image
        parts = [self.ffn_query(q)] if n_query else []
        if t.shape[1]:
            parts.append(self.ffn_text(t))
        return torch.cat(parts, 1), self_kv, cross_kv


def qformer_mask(n_query, text_mask, causal):
    """Bool mask (B, 1, Nq+L, Nq+L), True = may attend (BLIP-2 Sec. 3.2, Figure 2).

    ITM (causal=False): every row sees all queries and all non-pad text.  ITG (causal=True):
    query rows see only queries; text row i sees all queries and text tokens <= i."""
    B, L = text_mask.shape
    keys = torch.cat([text_mask.new_ones(B, n_query), text_mask], 1).bool()  # (B, Nq+L)
    mask = keys[:, None, None, :].expand(B, 1, n_query + L, n_query + L)
    if causal:
        block = torch.ones(n_query + L, n_query + L, dtype=torch.bool, device=text_mask.device)
        block[:n_query, n_query:] = False
        block[n_query:, n_query:] = block[n_query:, n_query:].tril()
        mask = mask & block
    return mask


class QFormer(nn.Module):
    """Learned queries + BERT layers.  `text=False` builds only the query path (stage 2 on, and
    the released generation checkpoints): no word embeddings, text FFNs, ITC/ITM/ITG heads."""

    def __init__(self, dim, layers, heads, ffn, vision_width, num_query, vocab, max_pos,
                 embed_dim=256, cross_freq=2, dropout=0.1, eps=1e-12, text=True):
        super().__init__()
        self.num_query, self.text, self.cross_freq = num_query, text, cross_freq
        self.query_tokens = nn.Parameter(torch.randn(1, num_query, dim) * 0.02)
        self.embed_norm, self.embed_drop = nn.LayerNorm(dim, eps=eps), nn.Dropout(dropout)
        self.layers = nn.ModuleList(QFormerLayer(dim, heads, ffn, vision_width, dropout, eps,
                                                 cross=i % cross_freq == 0, text=text)
                                    for i in range(layers))
        if text:
            self.word_embeddings = nn.Embedding(vocab, dim)
            self.position_embeddings = nn.Embedding(max_pos, dim)
            self.vision_proj, self.text_proj = nn.Linear(dim, embed_dim), nn.Linear(dim, embed_dim)
            self.itm_head = nn.Linear(dim, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
            # ITG head = BERT's MLM head: dense, GELU, LayerNorm, decoder tied to the words
            self.lm_dense, self.lm_norm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)
            self.lm_bias = nn.Parameter(torch.zeros(vocab))

    def _run(self, x, mask, n_query, image, past=None):
        """Every layer (`image`, `past`: per layer when lists) -> output, per-layer caches."""
        x, cache = self.embed_drop(self.embed_norm(x)), []
        for i, layer in enumerate(self.layers):
            x, self_kv, cross_kv = layer(x, mask, n_query, image[i] if isinstance(image, list) else image,
                                         past[i] if past else None)
            cache.append((self_kv, cross_kv))
        return x, cache

    def _text_embed(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.word_embeddings(ids) + self.position_embeddings(pos)[None]  # (B, L, C)

    def query(self, image, with_cache=False):
        """Query-only pass (ITC image side, stage 2): (B, N, W) image tokens -> (B, Nq, C);
        with_cache also returns each layer's (self-attention, cross-attention) keys/values, which
        ITG and ITM reuse."""
        queries = self.query_tokens.expand(image.shape[0], -1, -1)  # (B, Nq, C)
        out, cache = self._run(queries, None, self.num_query, image)
        return (out, cache) if with_cache else out

    def encode_text(self, ids, mask):
        """Text-only pass (ITC text side): (B, L) -> (B, L, C); no cross-attention, text FFNs."""
        return self._run(self._text_embed(ids), mask[:, None, None, :].bool(), 0, None)[0]

    def joint(self, image, ids, mask, causal=False):
        """[queries; text] under the ITM (bi-directional) or ITG (causal) mask -> (B, Nq+L, C).
        `image`: (B, N, W) features, or per layer the cross-attention (keys, values) (itm_loss)."""
        x = torch.cat([self.query_tokens.expand(ids.shape[0], -1, -1), self._text_embed(ids)], 1)
        return self._run(x, qformer_mask(self.num_query, mask, causal), self.num_query, image)[0]

    def decode(self, ids, mask, cache):
        """The text rows of the ITG pass -> (B, L, C). Under the causal mask the query rows see only
        queries, so they equal the query pass: its per-layer query keys/values (`cache`) are read
        instead of recomputed, and the text rows never cross-attend (LAVIS blip2_qformer.py:
        past_key_values)."""
        rows = qformer_mask(self.num_query, mask, causal=True)[:, :, self.num_query:]  # (B,1,L,Nq+L)
        return self._run(self._text_embed(ids), rows, 0, None, [c[0] for c in cache])[0]

    def lm_logits(self, h):
        h = self.lm_norm(F.gelu(self.lm_dense(h)))
        return h @ self.word_embeddings.weight.t() + self.lm_bias  # (B, L, V)


# (ours, BERT) names in one layer; transformers' BLIP-2 names follow from BERT's (hf_qformer_names)
_LAYER_NAMES = [("self_attn.query", "attention.self.query"), ("self_attn.key", "attention.self.key"),
                ("self_attn.value", "attention.self.value"),
                ("self_attn.dense", "attention.output.dense"),
                ("self_attn.norm", "attention.output.LayerNorm"),
                ("cross_attn.query", "crossattention.self.query"),
                ("cross_attn.key", "crossattention.self.key"),
                ("cross_attn.value", "crossattention.self.value"),
                ("cross_attn.dense", "crossattention.output.dense"),
                ("cross_attn.norm", "crossattention.output.LayerNorm"),
                ("ffn_query.fc1", "intermediate_query.dense"), ("ffn_query.fc2", "output_query.dense"),
                ("ffn_query.norm", "output_query.LayerNorm"),
                ("ffn_text.fc1", "intermediate.dense"), ("ffn_text.fc2", "output.dense"),
                ("ffn_text.norm", "output.LayerNorm")]


def load_bert(path):
    """BERT with its MLM head, loaded as the class its config.json names (bert-base-uncased:
    BertForMaskedLM; the toy BERT: BertForPreTraining, whose pooler and NSP head go unused)."""
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining
    pretraining = "BertForPreTraining" in (BertConfig.from_pretrained(path).architectures or [])
    return (BertForPreTraining if pretraining else BertForMaskedLM).from_pretrained(path)


def qformer_from_bert(bert_path, vision_width, cfg, vocab_size, text=True):
    """Q-Former initialised from BERT (BLIP-2 Sec. 3.1): embeddings, self-attention, both FFNs (the
    query FFN is a copy of BERT's), MLM head; cross-attention and queries random, N(0, 0.02) with
    zero biases (BERT's init, which transformers' from_pretrained gives LAVIS's missing keys)."""
    bert = load_bert(bert_path)
    bc, sd = bert.config, bert.state_dict()
    qf = QFormer(bc.hidden_size, bc.num_hidden_layers, bc.num_attention_heads, bc.intermediate_size,
                 vision_width, cfg.num_query, vocab_size, bc.max_position_embeddings, cfg.embed_dim,
                 cfg.cross_attention_freq, cfg.qformer_dropout, bc.layer_norm_eps, text)
    new = {"embed_norm.weight": sd["bert.embeddings.LayerNorm.weight"],
           "embed_norm.bias": sd["bert.embeddings.LayerNorm.bias"]}
    for i in range(bc.num_hidden_layers):
        for ours, theirs in _LAYER_NAMES:
            if ours.startswith("cross_attn") or (ours.startswith("ffn_text") and not text):
                continue
            src = theirs.replace("_query", "")  # the query FFN starts as a copy of BERT's FFN
            for p in ("weight", "bias"):
                new[f"layers.{i}.{ours}.{p}"] = sd[f"bert.encoder.layer.{i}.{src}.{p}"]
    if text:
        V = sd["bert.embeddings.word_embeddings.weight"].shape[0]
        words = qf.word_embeddings.weight.detach().clone() * 0.02  # new rows ([DEC]): N(0, 0.02),
        words[:V] = sd["bert.embeddings.word_embeddings.weight"]  # as resize_token_embeddings (LAVIS)
        bias = torch.zeros(vocab_size)
        bias[:V] = sd["cls.predictions.bias"]
        head = {f"lm_{a}.{p}": sd[f"cls.predictions.transform.{b}.{p}"]
                for a, b in (("dense", "dense"), ("norm", "LayerNorm")) for p in ("weight", "bias")}
        new.update({"word_embeddings.weight": words, "lm_bias": bias, **head,
                    "position_embeddings.weight": sd["bert.embeddings.position_embeddings.weight"]})
    for layer in qf.layers:
        for m in layer.cross_attn.modules() if layer.cross_attn is not None else []:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=bc.initializer_range)
                nn.init.zeros_(m.bias)
    missing, unexpected = qf.load_state_dict(new, strict=False)
    assert not unexpected, unexpected
    return qf


class PFormer(nn.Module):
    """Prompt-Transformer (arXiv 2307.07063; BLIText pformer_opt.py): BERT [CLS] -> Linear(C, Nq*C)
    -> (Nq, C) -> Linear + tanh -> Linear(C, d_llm) gives the reference prompt P*(T), (B, Nq, d_llm):
    the shape of the Q-Former's soft prompts."""

    def __init__(self, bert, num_query, d_llm, embed_dim=256):
        super().__init__()
        C = bert.config.hidden_size
        self.bert, self.num_query = bert, num_query
        self.cls_proj = nn.Linear(C, num_query * C)
        self.pooler = nn.Linear(C, C)
        self.llm_proj = nn.Linear(C, d_llm)
        self.text_proj = nn.Linear(C, embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))

    def forward(self, ids, mask):
        """-> P* (B, Nq, d_llm), normalised contrastive feature z (B, E), temperature (returned, not
        read from the module, so that DDP sees every parameter of the loss go through forward)."""
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]  # (B, C) [CLS]
        p = self.cls_proj(h).view(h.shape[0], self.num_query, -1)  # (B, Nq, C), Nq = num_query
        prompt = self.llm_proj(torch.tanh(self.pooler(p)))  # (B, Nq, d_llm)
        return prompt, F.normalize(self.text_proj(h), dim=-1), self.temp


def build_pformer(bert_path, num_query, d_llm, embed_dim, from_config=False):
    from transformers import BertConfig, BertModel
    if from_config:  # weights come from a stage-0 checkpoint next
        bert = BertModel(BertConfig.from_pretrained(bert_path), add_pooling_layer=False)
    else:  # the pretrained BERT encoder (a fresh copy, not the Q-Former's), without its pooler
        bert = load_bert(bert_path).bert
        bert.pooler = None
    return PFormer(bert, num_query, d_llm, embed_dim).float()  # fp32 master weights whatever the file's dtype


class VisionTower(nn.Module):
    """Frozen image encoder -> (B, N, W) penultimate-layer tokens, without a final norm.  A CLIP
    tower drops its last block; a BLIP-2 tower (EVA ViT-g) already has 39 of EVA's 40 blocks, and
    its `post_layernorm` is BLIP-2's trainable `ln_vision`, kept in the trainable module."""

    def __init__(self, hf_vision, kind):
        super().__init__()
        self.model, self.kind = hf_vision, kind
        self.image_size, self.width = hf_vision.config.image_size, hf_vision.config.hidden_size
        if kind == "clip":
            self.model.encoder.layers = self.model.encoder.layers[:-1]
        self.model.post_layernorm = nn.Identity()  # unused (CLIP) / moved to ln_vision (BLIP-2)

    def resize(self, size):
        """Interpolate the position table to `size` once, as LAVIS does when it loads the ViT
        (eva_vit.py interpolate_pos_embed): a fine-tuned ViT then trains the new table freely."""
        emb = self.model.embeddings
        if not size or size == self.image_size:
            return self
        n = (size // emb.patch_size) ** 2 + 1
        zeros = emb.patch_embedding.weight.new_zeros(1, n, self.width)  # only its shape is read
        with torch.no_grad():  # (1, 1 + (S/P)^2, W): the class position + the bicubic patch grid
            table = emb.interpolate_pos_encoding(zeros, size, size)
        if isinstance(emb.position_embedding, nn.Embedding):  # CLIP: a lookup over position_ids
            emb.position_embedding = nn.Embedding.from_pretrained(table[0], freeze=False)
            emb.register_buffer("position_ids", torch.arange(n, device=table.device)[None], persistent=False)
        else:  # BLIP-2: one (1, N, W) parameter
            emb.position_embedding = nn.Parameter(table)
        emb.image_size, emb.num_patches, emb.num_positions = size, n - 1, n
        self.image_size = self.model.config.image_size = size
        return self

    def forward(self, pixels):
        interp = pixels.shape[-1] != self.image_size  # evaluated at another size than the table's
        x = self.model.embeddings(pixels.to(self.model.embeddings.patch_embedding.weight.dtype),
                                  interpolate_pos_encoding=interp)
        if self.kind == "clip":
            x = self.model.pre_layrnorm(x)
        return self.model.encoder(inputs_embeds=x).last_hidden_state

    def checkpoint_blocks(self):
        """Each block (a transformers GradientCheckpointingLayer) recomputed in backward."""
        from torch.utils.checkpoint import checkpoint
        for block in self.model.encoder.layers:
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)


def load_vision(path):
    """(VisionTower, ln_vision state or None) from a CLIP, CLIPVision or Blip2Vision folder, or the
    ViT of a BLIP-2 folder (load_blip2_vision, in the transformers section)."""
    from transformers import AutoConfig, Blip2VisionModel, CLIPModel, CLIPVisionModel
    path = resolve_local(path)
    kind = AutoConfig.from_pretrained(path).model_type
    if kind == "clip":
        return VisionTower(CLIPModel.from_pretrained(path).vision_model, "clip"), None
    if kind == "clip_vision_model":
        return VisionTower(CLIPVisionModel.from_pretrained(path), "clip"), None
    if kind == "blip_2_vision_model":  # a BLIP-2 vision tower saved on its own (the toy world's)
        vm = Blip2VisionModel.from_pretrained(path)
        ln = {k: v.detach().clone() for k, v in vm.post_layernorm.state_dict().items()}
        return VisionTower(vm, "blip2"), ln
    if kind == "blip-2":
        return load_blip2_vision(path)
    raise ValueError(f"{path}: vision tower must be CLIP or BLIP-2, got model_type {kind!r}")


def llm_embed_dim(conf):
    """Width of the LLM's input embeddings (OPT-350m projects words to 512 < hidden 1024)."""
    return (getattr(conf, "word_embed_proj_dim", None) or getattr(conf, "d_model", None)
            or conf.hidden_size)


def load_llm(path, dtype, t5_act=""):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    path = resolve_local(path)
    conf = AutoConfig.from_pretrained(path)
    if conf.is_encoder_decoder and t5_act:
        conf.dense_act_fn = t5_act
    cls = AutoModelForSeq2SeqLM if conf.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(path, config=conf, dtype=dtype), AutoTokenizer.from_pretrained(path)


class Blip2Trainable(nn.Module):
    """What DDP wraps in stages 1, 2 and caption: ln_vision + Q-Former + llm_proj (+ the ViT when
    fine-tuned).  Every loss is computed in `forward` (by `stage`), so DDP sees one forward per
    backward; frozen parts (ViT, LLM, P-Former) come in through `frozen`, outside DDP."""

    def __init__(self, qformer, vision_width, d_llm=0, vision=None):
        super().__init__()
        self.ln_vision = nn.LayerNorm(vision_width, eps=1e-6)  # weight 1, bias 0 (LAVIS blip2.py)
        self.qformer = qformer
        self.llm_proj = nn.Linear(qformer.query_tokens.shape[-1], d_llm) if d_llm else None
        self.vision = vision  # only when the image encoder is fine-tuned

    def encode_image(self, pixels, frozen):
        if self.vision is not None:
            with autocast(pixels.device, frozen.dtype):
                feats = self.vision(pixels)
        else:
            with torch.no_grad(), autocast(pixels.device, frozen.dtype):
                feats = frozen.vision(pixels)
        return self.ln_vision(feats.float())  # (B, N, W); Q-Former math stays fp32 master weights

    def prompts(self, pixels, frozen):
        image = self.encode_image(pixels, frozen)
        q = self.qformer.query(image)  # (B, Nq, C)
        return q, self.llm_proj(q)  # (B, Nq, d_llm)

    def forward(self, stage, batch, frozen):
        with autocast(batch["pixels"].device, frozen.dtype):
            losses = stage1_losses if stage == "1" else stage2_losses
            return losses(self, batch, frozen)


@dataclass
class Frozen:
    """Frozen parts and settings handed to the loss functions (kept outside DDP)."""
    dtype: torch.dtype
    vision: Optional[nn.Module] = None
    llm: Optional[nn.Module] = None
    llm_tok: object = None
    pformer: Optional[nn.Module] = None
    align_weight: float = 0.0
    rank: int = 0
    vision_tower: Optional[nn.Module] = None  # the ViT whether frozen or trained (for export)


# ================================================================================================ Losses
def align_loss(prompts, target):
    """The P-Former idea (arXiv 2307.07063; BLIText blip2_qformer_pformer.py, blip2_pformer_opt.py):
    the Q-Former's soft prompts llm_proj(Z) (B, Nq, d_llm) regress onto the frozen P-Former's prompt
    P*(caption), MSE(llm_proj(Z), stopgrad(P*)) averaged over B*Nq*d_llm.  Weighted by w1 = 10 in
    stage 1, w2 = 100 in stage 2, 1 in caption fine-tuning."""
    return F.mse_loss(prompts.float(), target.detach().float())


def itc_loss(img_feat, txt_feat, temp, rank):
    """ITC, max over queries (BLIP-2 Sec. 3.2; LAVIS blip2_qformer.py).  img_feat (B, Nq, E),
    txt_feat (B, E), both L2-normalised, local.  Features are gathered WITH gradient, so N processes
    compute exactly what one process with the global batch would.  Returns the loss and the (B, G)
    similarity logits i2t, t2i of the local rows against the global batch."""
    img_feat, txt_feat = img_feat.float(), txt_feat.float()
    img_all = D.all_gather_with_grad(img_feat)  # (G, Nq, E)
    txt_all = D.all_gather_with_grad(txt_feat)  # (G, E)
    with fp32(img_feat.device):  # logits in fp32 under bf16 autocast too
        sim_i2t = torch.einsum("bqe,ge->bqg", img_feat, txt_all).amax(1) / temp  # (B, G)
        sim_t2i = torch.einsum("be,gqe->bgq", txt_feat, img_all).amax(-1) / temp  # (B, G)
    target = rank * img_feat.shape[0] + torch.arange(img_feat.shape[0], device=img_feat.device)
    loss = (F.cross_entropy(sim_i2t, target, label_smoothing=0.1) +
            F.cross_entropy(sim_t2i, target, label_smoothing=0.1)) / 2
    return loss, sim_i2t, sim_t2i


def positive_mask(img_ids, txt_ids, img_ids_all, txt_ids_all):
    """(B, G) True where pair (local i, global j) must not serve as a negative: same image, or
    identical caption tokens (duplicate captions in a batch describe both images)."""
    same_img = img_ids[:, None] == img_ids_all[None, :]
    same_txt = (txt_ids[:, None, :] == txt_ids_all[None, :, :]).all(-1)
    return same_img | same_txt


def sample_hard_negatives(sim, positive, gumbel):
    """One negative column per row, drawn from softmax(sim) restricted to non-positives (BLIP-2's
    ITM sampling).

    Vectorised with the Gumbel-max trick: argmax(sim + Gumbel noise) ~ Categorical(softmax(sim)).
    Positives get -inf, so they are never drawn, and there is no multinomial to crash on inf/NaN
    weights (LAVIS #107).  A row with no non-positive column at all (a batch of one image) falls
    back to the next index."""
    logits = sim.float().masked_fill(positive, float("-inf")) + gumbel  # (B, G)
    idx = logits.argmax(1)
    none_valid = positive.all(1)
    fallback = (torch.arange(sim.shape[0], device=sim.device) + 1) % sim.shape[1]
    return torch.where(none_valid, fallback, idx)


def gumbel_noise(seed, rows, cols, rank, device):
    """Gumbel noise for the global (G, G) matrix from a step-seeded generator on the device, sliced
    to this rank's rows, so the sampled negatives do not depend on how the batch is split over
    processes."""
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.rand(rows * (rank + 1), cols, generator=g, device=device)[rows * rank:]
    return -torch.log(-torch.log(u.clamp_(1e-9, 1 - 1e-9)))


def token_ce(logits, labels, label_smoothing=0.0):
    """Cross-entropy averaged over the non-ignored tokens of the GLOBAL batch.  Each rank divides
    its token sum by the mean token count per rank, so DDP's average over ranks equals one process's
    mean over all tokens (a plain per-rank mean would weight ranks with short captions more).
    logits (..., V), labels (...) with -100 = ignore."""
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=-100,
                            label_smoothing=label_smoothing, reduction="sum")
    count = D.all_reduce_mean((labels != -100).sum().float())
    return total / count.clamp(min=1)


def itm_cross_kv(qf, cache, remote_img, neg_img, rank):
    """Per layer, the cross-attention (keys, values) of the 3B ITM rows [positive; negative;
    positive] images: the positives' and a negative drawn from this rank's own images come from
    the ITC query pass (`cache`); the other ranks' images this rank drew (`remote_img` (R, N, W),
    a row per draw, repeats included; None in one process) are projected again here, as their
    owners did (LAVIS blip2_qformer.py projects all 3B rows, the positive image twice)."""
    B = neg_img.shape[0]
    local = neg_img - rank * B
    remote = None if remote_img is None else ((local < 0) | (local >= B)).nonzero()[:, 0]  # (R,)
    out = []
    for (_, kv), layer in zip(cache, qf.layers):
        if kv is None:
            out.append(None)
            continue
        neg = [t[local.clamp(0, B - 1)] for t in kv]  # (B, H, N, C/H) each
        if remote is not None:  # R = 0 too: fetch_rows's backward needs every rank's output used
            made = layer.cross_attn.keys_values(remote_img)
            neg = [n.index_put((remote,), m.to(n.dtype)) for n, m in zip(neg, made)]
        out.append(tuple(torch.cat([t, n, t]) for t, n in zip(kv, neg)))  # (3B, H, N, C/H)
    return out


def itm_loss(qf, cross_kv, ids, mask, ids_neg, mask_neg):
    """3B pairs (T_i, I_i)=1, (T_i, I_neg)=0, (T_neg, I_i)=0; bi-directional [Q;T] pass over the
    rows' image keys/values (itm_cross_kv); logits = itm_head averaged over the Nq query outputs."""
    B, Nq = ids.shape[0], qf.num_query
    texts, masks = torch.cat([ids, ids, ids_neg]), torch.cat([mask, mask, mask_neg])  # (3B, L)
    h = qf.joint(cross_kv, texts, masks)  # (3B, Nq+L, C)
    logits = qf.itm_head(h[:, :Nq]).mean(1)  # (3B, 2)
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)
    return F.cross_entropy(logits, labels)


def itg_loss(qf, cache, ids, mask, dec_id, pad_id):
    """Image-grounded generation: [DEC] replaces [CLS]; causal text rows see all queries (their keys
    and values from the query pass, `cache`); next-token CE with label smoothing 0.1 (BLIP-2 Sec.
    3.2)."""
    dec = ids.clone()
    dec[:, 0] = dec_id
    h = qf.decode(dec, mask, cache)  # (B, L, C)
    logits = qf.lm_logits(h)[:, :-1]  # (B, L-1, V): position t predicts token t+1
    labels = dec[:, 1:].masked_fill(dec[:, 1:] == pad_id, -100)
    return token_ce(logits, labels, label_smoothing=0.1)


def llm_embed(llm, ids):
    return llm.get_input_embeddings()(ids)


def llm_lm_loss(llm, prompts, t):
    """Frozen LLM prompted by soft prompts (B, Nq, D) (BLIP-2 Sec. 3.3).  Decoder-only: inputs [P;
    E(text)], labels -100 on P, pads and text-prompt tokens.  Encoder-decoder: encoder [P;
    E(prefix)], decoder predicts the suffix.  CE in fp32 over the LLM's logits; gradients flow
    through the frozen LLM into the prompts."""
    prompts = prompts.to(llm.get_input_embeddings().weight.dtype)
    x = torch.cat([prompts, llm_embed(llm, t["enc_ids"])], 1)  # (B, Nq+L, D)
    m = t["enc_mask"]  # None = every token (--mode params: masks on the meta device have no values)
    att = None if m is None else torch.cat([m.new_ones(prompts.shape[:2]), m], 1)
    if llm.config.is_encoder_decoder:
        logits = llm(inputs_embeds=x, attention_mask=att, labels=t["labels"],
                     decoder_attention_mask=t["dec_mask"]).logits  # (B, Ld, V)
    else:  # token j of the text is predicted at position Nq-1+j
        logits = llm(inputs_embeds=x, attention_mask=att).logits[:, prompts.shape[1] - 1:-1]  # (B,L,V)
    return token_ce(logits, t["labels"])


def mask_tokens(ids, mask_id, keep, p, generator=None):
    """Stage-0 noising: each token -> [MASK] with prob p, never [PAD] or [CLS] ([SEP] may be)."""
    hit = torch.rand(ids.shape, generator=generator, device=ids.device) < p
    for k in keep:
        hit &= ids != k
    return ids.masked_fill(hit, mask_id)


def instance_contrastive_loss(z, temp, rank):
    """Stage-0 L_c as released: z (B, E) normalised against the detached, all-gathered (no grad)
    batch of itself, target = own global index, label smoothing 0.1 -- an instance-discrimination /
    uniformity regulariser."""
    z = z.float()
    keys = D.all_gather_no_grad(z.detach())  # (G, E)
    with fp32(z.device):
        logits = z @ keys.t() / temp  # (B, G)
    target = rank * z.shape[0] + torch.arange(z.shape[0], device=z.device)
    return F.cross_entropy(logits, target, label_smoothing=0.1)


def vq_loss(prompts, embeddings, chunk=4096):
    """Stage-0 L_vq: MSE between each prompt vector and its nearest LLM input embedding
    (stop-grad), pulling prompts towards the word-embedding manifold; nearest by ||e||^2 - 2 p.e."""
    p = prompts.reshape(-1, prompts.shape[-1]).float()  # (B*Nq, D)
    e = embeddings.float()  # (V, D)
    with torch.no_grad(), fp32(p.device):  # the nearest row in fp32, also under bf16 autocast
        e2 = (e * e).sum(1)
        idx = torch.cat([(e2[None] - 2 * p[i:i + chunk] @ e.t()).argmin(1)
                         for i in range(0, len(p), chunk)])  # (B*Nq,)
    return F.mse_loss(p, e[idx])


def stage0_losses(pformer, t, llm, rank, mask_prob, mask_id, keep_ids):
    """Stage 0 (BLIText pformer_opt.py, pformer_t5.py): L = L_lm + L_c (+ L_vq for OPT)."""
    ids = t["bert_ids"]
    if not llm.config.is_encoder_decoder:  # T5 variant: no masking, prefix/suffix split instead
        ids = mask_tokens(ids, mask_id, keep_ids, mask_prob)
    prompts, z, temp = pformer(ids, t["bert_mask"])
    losses = {"lm": llm_lm_loss(llm, prompts, t),
              "contrast": instance_contrastive_loss(z, temp, rank)}
    if not llm.config.is_encoder_decoder:
        losses["vq"] = vq_loss(prompts, llm.get_input_embeddings().weight)
    return losses


def stage1_losses(m, b, frozen):
    """ITC + ITM + ITG (BLIP-2 Sec. 3.2) + w1 * alignment with the frozen P-Former."""
    qf = m.qformer
    image = m.encode_image(b["pixels"], frozen)  # (B, N, W)
    q, cache = qf.query(image, with_cache=True)  # (B, Nq, C), per-layer keys/values for ITM/ITG
    img_feat = F.normalize(qf.vision_proj(q), dim=-1)  # (B, Nq, E)
    cls = qf.encode_text(b["ids"], b["mask"])[:, 0]  # (B, C) [CLS]
    txt_feat = F.normalize(qf.text_proj(cls), dim=-1)  # (B, E)
    losses = {}
    losses["itc"], sim_i2t, sim_t2i = itc_loss(img_feat, txt_feat, qf.temp, frozen.rank)
    # ITM hard negatives from the global batch: token ids all-gathered; of the images only the
    # rows drawn as negatives, fetched from their ranks in the compute dtype (below)
    ids_all, mask_all = D.all_gather_no_grad(b["ids"]), D.all_gather_no_grad(b["mask"])
    pos = positive_mask(b["image_ids"], b["ids"], D.all_gather_no_grad(b["image_ids"]), ids_all)
    with torch.no_grad():  # b["noise"]: Gumbel noise drawn outside the model (make_batch)
        neg_img = sample_hard_negatives(sim_t2i.detach(), pos, b["noise"][0])  # (B,) image per text
        neg_txt = sample_hard_negatives(sim_i2t.detach(), pos, b["noise"][1])  # (B,) text per image
    remote_img = None
    if D.world_size() > 1:  # (R, N, W): the other ranks' images this rank's texts drew
        dev = image.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else image.dtype
        remote_img = D.fetch_rows(image.to(dtype), D.all_gather_no_grad(neg_img))
    cross_kv = itm_cross_kv(qf, cache, remote_img, neg_img, frozen.rank)
    losses["itm"] = itm_loss(qf, cross_kv, b["ids"], b["mask"], ids_all[neg_txt], mask_all[neg_txt])
    losses["itg"] = itg_loss(qf, cache, b["ids"], b["mask"], b["dec_id"], b["pad_id"])
    if frozen.pformer is not None:
        losses["align"] = frozen.align_weight * align_loss(m.llm_proj(q), b["pstar"])
    return losses


def stage2_losses(m, b, frozen):
    """Generative stage (BLIP-2 Sec. 3.3): LM loss of the frozen LLM prompted by llm_proj(Z)
    (+ w2 * alignment); caption fine-tuning uses it too."""
    q, prompts = m.prompts(b["pixels"], frozen)
    losses = {"lm": llm_lm_loss(frozen.llm, prompts, b["llm"])}
    if frozen.pformer is not None:
        losses["align"] = frozen.align_weight * align_loss(prompts, b["pstar"])
    return losses


# ================================================================================================ Data
def clean_question(s, max_words=50):
    """LAVIS `blip_question`: lowercase, delete punctuation, right-strip, first 50 words."""
    return " ".join(re.sub(r"([.!\"()*#:;~])", "", s.lower()).rstrip().split(" ")[:max_words])


def image_transform(cfg, train=False, uint8=True):
    """LAVIS's blip_image_eval (bicubic resize to a square) or, train=True, the crop (+ flip, +
    RandomAugment) of blip2_image_train / blip_image_train; uint8 for the loader (on_device)."""
    return ImageTransform(cfg.image_size, train, resize="square", hflip=cfg.hflip,
                          randaug=cfg.randaug, uint8=uint8, rng=random.Random(0))


def open_images(cfg, train=False, uint8=True):
    """The bad-image rule of common.data: each distinct image counted once, max_bad_frac kept."""
    return ImageFolderLoader(cfg.image_root, image_transform(cfg, train, uint8), cfg.max_bad_frac)


def load_pixels(images, rel, blank=False, rng=None):
    """uint8 (3, S, S), or None for an unreadable image; `blank`: the no-image baseline (made the
    mean colour by on_device); `rng`: the sample's augmentation draws."""
    if blank:
        return torch.zeros(3, images.transform.size, images.transform.size, dtype=torch.uint8)
    if rng is not None:
        images.transform.rng = rng
    return images(rel)


def on_device(pixels, cfg, device):
    """uint8 images from the loader -> normalised floats on the device (a quarter of the bytes
    cross the workers' shared memory and the host-device copy); blank: zeros, the mean colour."""
    x = normalize(pixels.to(device, non_blocking=True), CLIP_MEAN, CLIP_STD)
    return torch.zeros_like(x) if cfg.blank_images else x


class PairDataset(torch.utils.data.Dataset):
    """One item per (image, caption), indexed by (epoch, item): the augmentation RNG is seeded from
    both, so a sample is the same whatever the worker, rank or resume point.  An unreadable image is
    replaced by the next image (all-gathers need equal batches on all ranks); the paths tried and
    the bad ones travel with the sample, so the main process counts each image once."""

    def __init__(self, records, cfg):
        self.rec, self.cap = records.pairs()  # (pairs,) record and caption index: numpy, not tuples
        self.records, self.cfg, self.images = records, cfg, open_images(cfg, train=True)

    def __len__(self):
        return len(self.rec)

    def __getitem__(self, key):
        (epoch, k), cfg = key, self.cfg
        i, j = int(self.rec[k]), int(self.cap[k])
        tried, bad = [], []
        for n in range(min(10, len(self.records))):
            rec = self.records[(i + n) % len(self.records)]
            rng = random.Random(f"{cfg.seed}-{epoch}-{k}")
            pixels = load_pixels(self.images, rec["image"], cfg.blank_images, rng)
            tried.append(rec["image"])
            if pixels is not None:
                return {"pixels": pixels, "caption": rec["captions"][j % len(rec["captions"])],
                        "image_id": (i + n) % len(self.records), "tried": tried, "bad": bad,
                        "key": f"{epoch}-{k}"}  # (make_batch's T5 split)
            bad.append(rec["image"])
        raise DataError(f"no readable image under {cfg.image_root}: {len(bad)} tried in a row, "
                        f"e.g. {bad[:3]}")


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, sentences):
        self.sentences = sentences

    def __len__(self):
        return len(self.sentences)

    def __getitem__(self, key):
        return {"caption": self.sentences[key[1]], "key": "%d-%d" % key}  # (epoch, index)


def collate(samples):
    out = {"caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples],
           "tried": [p for s in samples for p in s.get("tried", ())],
           "bad": [p for s in samples for p in s.get("bad", ())]}
    if "pixels" in samples[0]:
        out["pixels"] = torch.stack([s["pixels"] for s in samples])
        out["image_id"] = torch.tensor([s["image_id"] for s in samples])
    return out


def count_images(counts, tried, bad):
    """Merge this step's image paths of every rank into `counts` (so all ranks decide alike)."""
    for t, b in D.all_gather_object((tried, bad)):
        counts.merge(t, b)


def shard_batches(cfg, dist, tracker, state):
    """Micro-batches from webdataset shards (common.data.ShardStream: split over ranks and workers,
    exact resume from `state`) in collate()'s format; `tracker` counts their unreadable samples."""
    stream = ShardStream(cfg.train_shards, image_transform(cfg, train=True), dist.rank,
                         dist.world_size, cfg.seed, max_bad_frac=cfg.max_bad_frac, resume=state)
    for b in stream_loader(stream, cfg.micro_batch, cfg.num_workers):
        tracker.update(b)
        tracker.check()
        yield {"pixels": b["image"], "caption": b["caption"], "image_id": b["image_id"], "tried": [],
               "bad": [], "key": [f"{e}-{s}:{k}" for e, s, k in zip(b["epoch"].tolist(),
                                                                    b["shard"].tolist(), b["key"])]}


class Tokenizers:
    """Text -> tensors for the Q-Former/P-Former (BERT tokenizer + [DEC]) and the LLM (LAVIS
    blip2_opt.py, blip2_t5.py)."""

    def __init__(self, bert_tok, llm_tok, max_len, device, is_encdec=False):
        self.bert, self.llm, self.max_len, self.device = bert_tok, llm_tok, max_len, device
        self.is_encdec = is_encdec
        if bert_tok is not None and "[DEC]" not in bert_tok.get_vocab():
            bert_tok.add_special_tokens({"bos_token": "[DEC]"})  # ITG start (30522 for bert-base)
        if llm_tok is not None:
            if llm_tok.pad_token is None:
                llm_tok.pad_token = llm_tok.eos_token
            # OPT: LAVIS ends each caption with "\n" (id 50118) and stops generation there (blip2_opt.py;
            # blip2_t5.py keeps T5's EOS).  A word-level tokenizer has no newline token: EOS then.
            nl = llm_tok("\n", add_special_tokens=False).input_ids
            self.newline = not is_encdec and len(nl) == 1 and nl[0] != llm_tok.unk_token_id
            self.suffix = "\n" if self.newline else (llm_tok.eos_token or "")
            self.eos_id = nl[0] if self.newline else llm_tok.eos_token_id

    def bert_batch(self, texts, max_len=0):
        """(B, L) ids and mask, L = the longest text's tokens (LAVIS pads to max_txt_len: the pads
        are masked out of every loss, so only the compute differs); max_len: another limit."""
        t = self.bert(texts, padding="longest", truncation=True, max_length=max_len or self.max_len,
                      return_tensors="pt")
        return t.input_ids.to(self.device), t.attention_mask.to(self.device)

    def llm_batch(self, texts, prompt="", rng=None, stage0=False):
        """Decoder-only: prompt + text + suffix, prompt tokens masked from the loss.
        Encoder-decoder: `rng` (a random.Random per text) given -> random prefix/suffix split of
        each text (pre-training, split_prefix); else prompt -> encoder, text -> decoder."""
        tok = self.llm
        if tok is None:
            return None
        tok.padding_side = "right"
        pad = dict(padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
        if self.is_encdec:
            if rng is not None:
                enc, dec = zip(*(split_prefix(t, r, stage0) for t, r in zip(texts, rng)))
            else:
                enc, dec = [prompt] * len(texts), list(texts)
            e, d = tok(list(enc), **pad), tok(list(dec), **pad)
            labels = d.input_ids.masked_fill(d.attention_mask == 0, -100)
            out = dict(enc_ids=e.input_ids, enc_mask=e.attention_mask, dec_mask=d.attention_mask,
                       labels=labels)
            return {k: v.to(self.device) for k, v in out.items()}
        e = tok([(prompt + " " + t if prompt else t) + self.suffix for t in texts], **pad)
        labels = e.input_ids.masked_fill(e.attention_mask == 0, -100)
        if prompt:  # LAVIS: prompt length incl. BOS counted once, masked in every row
            labels[:, :len(tok(prompt).input_ids)] = -100
        out = dict(enc_ids=e.input_ids, enc_mask=e.attention_mask, labels=labels)
        return {k: v.to(self.device) for k, v in out.items()}


def split_prefix(text, rng, stage0=False):
    """T5 prefix-LM split after a random word m: m ~ U{1..n//2} in stage 2 (BLIText
    blip2_pformer_t5.py; one word: an empty prefix), m ~ U{1..1+n//2} in stage 0 (pformer_t5.py: the
    prefix may be the whole sentence and the target only the end of sequence)."""
    words = text.split()
    top = len(words) // 2 + stage0
    if top < 1:
        return "", text
    m = rng.randint(1, top)
    return " ".join(words[:m]), " ".join(words[m:])


# ================================================================================================ Eval
def image_batches(paths, cfg, dist, desc):
    """Yield (indices, pixels) over this rank's shard of `paths`; unreadable images are skipped,
    counted once each over all ranks, and stop the evaluation beyond max_bad_frac."""
    images, counts = open_images(cfg), open_images(cfg)
    load = lambda idx: [(i, paths[i], load_pixels(images, paths[i], cfg.blank_images))
                        for i in idx]  # noqa: E731
    loader = torch.utils.data.DataLoader(D.shard_indices(len(paths), dist), cfg.eval_batch,
                                         num_workers=cfg.num_workers, collate_fn=load,
                                         pin_memory=dist.device.type == "cuda",
                                         generator=torch.Generator())  # not the global RNG
    for batch in progress(loader, dist.is_main, desc=desc):
        counts.merge([p for _, p, _ in batch], [p for _, p, x in batch if x is None])
        good = [(i, x) for i, _, x in batch if x is not None]
        if good:
            pixels = torch.stack([x for _, x in good])  # (b, 3, S, S) uint8
            yield [i for i, _ in good], on_device(pixels, cfg, dist.device)
    total = open_images(cfg)
    count_images(total, sorted(counts.tried_set), counts.bad_paths)
    if total.bad:
        print(f"[rank {dist.rank}] {desc}: {total.report()}")
        total.check(final=True)


def gather_dict(d):
    out = {}
    for part in D.all_gather_object(d):
        out.update(part)
    return out


@torch.no_grad()
def evaluate_retrieval(model, frozen, toks, records, cfg, dist, shown):
    """Image<->text retrieval R@1/5/10 by the Q-Former's ITC score (max over queries); k_test > 0:
    then ITM re-ranks each ITC top-k (BLIP-2 Sec. 4.4; LAVIS blip2.py compute_sim_matrix), the
    ITC-only recalls are kept as itc_*."""
    from common.metrics import reranked_recall, retrieval_recall
    qf = model.qformer
    img_feats, img_embeds = {}, {}
    for idx, px in image_batches([r["image"] for r in records], cfg, dist, "retrieval images"):
        with autocast(px.device, frozen.dtype):
            image = model.encode_image(px, frozen)  # (B, N, W)
            f = F.normalize(qf.vision_proj(qf.query(image)), dim=-1).float()  # (B, Nq, E)
        img_feats.update({i: f[k].cpu() for k, i in enumerate(idx)})
        if cfg.k_test > 0:  # the re-ranking's cross-attention input, held in the compute dtype
            img_embeds.update({i: image[k].to(frozen.dtype).cpu() for k, i in enumerate(idx)})
    texts, txt2img, img2txts = [], [], []
    for i, r in enumerate(records):
        img2txts.append(list(range(len(texts), len(texts) + len(r["captions"]))))
        texts += [pre_caption(c, 50) for c in r["captions"]]
        txt2img += [i] * len(r["captions"])
    txt_feats, eval_len = {}, max(35, toks.max_len)  # LAVIS compute_sim_matrix: max_length=35
    for s in D.shard_indices((len(texts) + cfg.eval_batch - 1) // cfg.eval_batch, dist):
        chunk = list(range(s * cfg.eval_batch, min(len(texts), (s + 1) * cfg.eval_batch)))
        ids, mask = toks.bert_batch([texts[i] for i in chunk], eval_len)
        with autocast(ids.device, frozen.dtype):
            f = F.normalize(qf.text_proj(qf.encode_text(ids, mask)[:, 0]), dim=-1).float()
        txt_feats.update({i: f[k].cpu() for k, i in enumerate(chunk)})
    img_feats, txt_feats = gather_dict(img_feats), gather_dict(txt_feats)
    keep = sorted(img_feats)
    I = torch.stack([img_feats[i] for i in keep]).to(dist.device)  # (N_img, Nq, E)
    T = torch.stack([txt_feats[i] for i in range(len(texts))]).to(dist.device)  # (N_txt, E)
    sim = torch.cat([torch.einsum("iqe,te->iqt", I[c:c + 64], T).amax(1)  # 64 images at a time: never
                     for c in range(0, len(I), 64)]).cpu()  # (N_img, Nq, N_txt) at once; (N_img, N_txt)
    pos = {i: k for k, i in enumerate(keep)}
    shown["retrieval"] = [(texts[t], [keep[k] for k in sim[:, t].topk(min(5, len(keep))).indices.tolist()])
                          for t in range(0, len(texts), max(1, len(texts) // 4))][:4]  # for the report
    txt2img, img2txts = [pos.get(i, -1) for i in txt2img], [img2txts[i] for i in keep]
    metrics = retrieval_recall(sim, txt2img, img2txts)
    if cfg.k_test <= 0:
        return metrics
    img_embeds, (ids, mask) = gather_dict(img_embeds), toks.bert_batch(texts, eval_len)
    image = torch.stack([img_embeds[i] for i in keep])  # (N_img, N, W) on the host

    def itm(img, txt_rows):  # LAVIS compute_itm: the 'match' logit averaged over the queries
        with autocast(ids.device, frozen.dtype):
            h = qf.joint(img.float(), ids[txt_rows], mask[txt_rows])
            return qf.itm_head(h[:, :qf.num_query])[..., 1].mean(1).float().cpu()  # (k,)
    dev = ids.device  # one image crosses to the device once per row, not k times
    i2t = lambda r, c: itm(image[[r]].to(dev).expand(len(c), -1, -1), c)  # noqa: E731  image r, texts c
    t2i = lambda r, c: itm(image[c].to(dev), c.new_full(c.shape, r))  # noqa: E731  text r, images c
    return {**{f"itc_{k}": v for k, v in metrics.items()},
            **reranked_recall(sim, i2t, t2i, cfg.k_test, txt2img, img2txts, dist)}


@torch.no_grad()
def generate(model, frozen, toks, pixels, prompts, num_beams, max_new, min_new, length_penalty=1.0):
    """Beam search in the frozen LLM from [P; E(prompt)] via transformers'
    generate(inputs_embeds=...)."""
    was, llm, tok = frozen.llm.training, frozen.llm.eval(), toks.llm  # no dropout (llm_train_mode)
    _, soft = model.prompts(pixels, frozen)
    soft = soft.to(llm.get_input_embeddings().weight.dtype)
    tok.padding_side = "right" if llm.config.is_encoder_decoder else "left"  # decoder-only: left pad
    t = tok(prompts, padding="longest", return_tensors="pt").to(pixels.device)
    x = torch.cat([soft, llm.get_input_embeddings()(t.input_ids)], 1)  # (B, Nq+L, D)
    att = torch.cat([t.attention_mask.new_ones(soft.shape[:2]), t.attention_mask], 1)
    with autocast(pixels.device, frozen.dtype):
        out = llm.generate(inputs_embeds=x, attention_mask=att, num_beams=num_beams,
                           max_new_tokens=max_new, min_new_tokens=min_new, length_penalty=length_penalty,
                           eos_token_id=toks.eos_id, pad_token_id=tok.pad_token_id, do_sample=False)
    llm.train(was)
    return [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]


def min_new(cfg, tok, is_encdec, prompt):
    """New tokens at least: BLIText (transformers 4.26, blip2_opt.py) hands min_length to generate()
    with the OPT prompt as input_ids, or with T5's decoder start token, and both count (LAVIS since
    4.27 passes inputs_embeds: prompt left out); only new tokens are generated here: subtracted."""
    if not cfg.min_length:
        return cfg.min_new_tokens
    return max(0, cfg.min_length - (1 if is_encdec else len(tok(prompt).input_ids)))


def evaluate_caption(model, frozen, toks, records, cfg, dist, out_path):
    """Beam-search captions -> BLEU/CIDEr-D/ROUGE-L against all references; predictions -> JSON."""
    from common.metrics import caption_metrics_by_group
    preds, least = {}, min_new(cfg, toks.llm, toks.is_encdec, cfg.caption_prompt)
    for idx, px in image_batches([r["image"] for r in records], cfg, dist, "captioning"):
        caps = generate(model, frozen, toks, px, [cfg.caption_prompt] * len(idx), cfg.num_beams,
                        cfg.max_new_tokens, least)
        preds.update(dict(zip(idx, caps)))
    preds = gather_dict(preds)
    recs = {i: records[i] for i in preds}  # NoCaps records (data/convert.py nocaps) carry "domain"
    metrics = caption_metrics_by_group({i: r["captions"] for i, r in recs.items()},
                                       {i: [c] for i, c in preds.items()},
                                       {i: r.get("domain") for i, r in recs.items()}) if preds else {}
    if dist.is_main:
        with open(out_path, "w") as f:
            json.dump([{"image": recs[i]["image"], "caption": preds[i]} for i in sorted(preds)], f,
                      indent=1)
    return metrics


def lemmatize_vqa(cfg, records):
    """--vqa_lemmatize, or by default for OK-VQA (data/convert.py okvqa marks its records), as the
    published OK-VQA numbers were scored (LAVIS blip2_opt.py _lemmatize)."""
    auto = any(r.get("dataset") == "okvqa" for r in records[:1])
    return cfg.vqa_lemmatize if cfg.vqa_lemmatize is not None else auto


def evaluate_vqa(model, frozen, toks, records, cfg, dist, out_path):
    """Zero-shot VQA (LAVIS blip2_opt.py predict_answers): prompt.format(question) after the soft
    prompts, --vqa_num_beams, --vqa_max_new_tokens, --vqa_length_penalty; accuracy by --vqa_rule"""
    from common.metrics import okvqa_lemmatize, vqa_accuracy
    preds = {}
    if lemmatize_vqa(cfg, records):
        okvqa_lemmatize([])  # no WordNet / tagger data: one line saying how to get it, before decoding
    for idx, px in image_batches([r["image"] for r in records], cfg, dist, "vqa"):
        prompts = [cfg.vqa_prompt.format(clean_question(records[i]["question"])) for i in idx]
        preds.update(zip(idx, generate(model, frozen, toks, px, prompts, cfg.vqa_num_beams,
                                       cfg.vqa_max_new_tokens, 1, cfg.vqa_length_penalty)))
    preds = gather_dict(preds)
    if lemmatize_vqa(cfg, records):  # LAVIS/BLIText OK-VQA: nouns and verbs of the answer -> lemmas
        preds = dict(zip(sorted(preds), okvqa_lemmatize([preds[i] for i in sorted(preds)])))
    if dist.is_main:  # a test split's questions have no answers (convert.py --allow_unanswered):
        with open(out_path, "w") as f:  # its predictions are the result, to submit
            json.dump([{"question_id": records[i]["question_id"], "answer": preds[i]}
                       for i in sorted(preds)], f, indent=1)
    acc = [vqa_accuracy(preds[i], records[i]["answers"], cfg.vqa_rule) for i in sorted(preds)
           if records[i]["answers"]]
    return {"vqa_acc": 100.0 * sum(acc) / len(acc)} if acc else {}


def run_evals(model, frozen, toks, cfg, dist, logger, shown):
    tasks, metrics, out = tasks_of(cfg), {}, lambda name: os.path.join(cfg.out_dir, name)
    model.eval()
    if "retrieval" in tasks or "caption" in tasks:
        records = read_pairs(cfg.val_file)[:cfg.eval_max or None]
    if "retrieval" in tasks:
        metrics.update(evaluate_retrieval(model, frozen, toks, records, cfg, dist, shown))
    if "retrieval" in tasks or "caption" in tasks:
        shown["pairs"] = records
    if "caption" in tasks:
        metrics.update(evaluate_caption(model, frozen, toks, records, cfg, dist,
                                        out("captions.json")))
    if "caption" in tasks and cfg.test_file:  # LAVIS: the Karpathy test split, from checkpoint_best
        test = read_pairs(cfg.test_file)[:cfg.eval_max or None]
        m = evaluate_caption(model, frozen, toks, test, cfg, dist, out("captions_test.json"))
        metrics.update({f"test_{k}": v for k, v in m.items()})
    if "vqa" in tasks:
        shown["vqa"] = records = read_vqa(cfg.vqa_file)[:cfg.eval_max or None]
        metrics.update(evaluate_vqa(model, frozen, toks, records, cfg, dist, out("vqa.json")))
    if metrics:
        logger.info("eval | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


@torch.no_grad()
def query_attention(qf, image):
    """(B, Nq, N): each query's cross-attention over the image tokens in the last cross-attention
    layer, averaged over heads (the report's heat maps)."""
    x, probs = qf.embed_norm(qf.query_tokens.expand(image.shape[0], -1, -1)), None
    for layer in qf.layers:
        if layer.cross_attn is not None:
            a, h = layer.cross_attn, layer.self_attn(x, x)[0]
            q, k = split_heads(a.query(h), a.heads), a.keys_values(image)[0]
            scores = q @ k.transpose(-1, -2)  # (B, H, Nq, N)
            probs = (scores / math.sqrt(h.shape[-1] // a.heads)).softmax(-1).mean(1)
        x = layer(x, None, qf.num_query, image)[0]
    return probs


def write_report(model, frozen, cfg, shown, metrics):
    """<out_dir>/report.html (common/report.py): curves; val captions with their references; VQA
    answers with the ten human ones; text -> top-5 images; four queries' cross-attention over each
    image."""
    from common.report import Report, card, grid, heatmap, table, thumb, training_plots
    rep, images = Report(f"blip2_pformer.py --stage {cfg.stage}"), open_images(cfg, uint8=False)
    pic = lambda rel: load_pixels(images, rel)  # noqa: E731  (floats; None when unreadable)
    show = lambda x, size=128: thumb(x, size, CLIP_MEAN, CLIP_STD) if x is not None else None  # noqa
    out = lambda name: os.path.join(cfg.out_dir, name)  # noqa: E731
    with rep.timed():
        rep.section("Training", training_plots(out("metrics.jsonl")), table(metrics))
        pairs = shown.get("pairs", [])
        if os.path.isfile(out("captions.json")):
            caps = json.load(open(out("captions.json")))[:12]
            refs = {r["image"]: r["captions"] for r in pairs}
            rep.section("Captions (val)", grid(card(show(pic(c["image"])), ("generated", c["caption"]),
                                                    ("references", refs.get(c["image"], []))) for c in caps))
        if os.path.isfile(out("vqa.json")):
            qs = {r["question_id"]: r for r in shown.get("vqa", [])}
            rep.section("Zero-shot VQA", grid(card(show(pic(qs[a["question_id"]]["image"])),
                                                   ("question", qs[a["question_id"]]["question"]),
                                                   ("answer", a["answer"]),
                                                   ("ten answers", qs[a["question_id"]]["answers"]))
                                              for a in json.load(open(out("vqa.json")))[:8]))
        for query, top in shown.get("retrieval", []):
            rep.section(f"Text -> image: {query}", grid(card(show(pic(pairs[i]["image"]), 96), f"#{n + 1}")
                                                        for n, i in enumerate(top)))
        px = [x for x in (pic(r["image"]) for r in pairs[:4]) if x is not None]
        if px and cfg.stage != "0":
            feats = torch.stack(px).to(next(model.parameters()).device)
            with autocast(feats.device, frozen.dtype):
                att = query_attention(model.qformer, model.encode_image(feats, frozen)).float().cpu()
            g = math.isqrt(att.shape[-1] - 1)  # [CLS] + g x g patches
            rows = [[thumb(heatmap(x, a[q, -g * g:], mean=CLIP_MEAN, std=CLIP_STD), 96) for q in range(4)]
                    for x, a in zip(px, att)]
            rep.section("Q-Former cross-attention: queries 0-3 over the image patches", table(rows))
        rep.write(cfg.out_dir)
    return rep.seconds


# ================================================================================================ Train
def lavis_lr(step, steps_per_epoch, cfg):
    """Linear warm-up from warmup_lr inside epoch 0, then a per-epoch cosine to min_lr (LAVIS
    lavis/common/optims.py LinearWarmupCosineLRScheduler)."""
    epoch = step // steps_per_epoch
    if epoch == 0 and step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(1, cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * epoch / max(1, cfg.epochs)))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * cosine


def load_own(path, flag, kinds):
    """A checkpoint of this script of one of `kinds` ("stage 0" ...); anything else stops with one
    line that names what the checkpoint is (common.checkpoint.describe) and what was expected."""
    ck = load_checkpoint(path)
    expect_checkpoint(ck, path, SCRIPT, kinds, flag)
    kind = ck.get("kind") or KINDS.get(str((ck.get("config") or {}).get("stage")))  # or its config's
    if kind not in kinds:
        raise CheckpointMismatch(f"{flag} {path}: this is a {SCRIPT} {kind} checkpoint; {SCRIPT} "
                                 f"expects a {' or '.join(kinds)} checkpoint here")
    return ck


def load_init(model, vision, ck, path):
    """Weights of the previous stage (--init) by name; refuses a shape mismatch and a checkpoint
    that fills less than half of the model (check_loaded).  Returns the names left unfilled."""
    sd = ck["model"]
    vis = {k[len("vision."):]: v for k, v in sd.items() if k.startswith("vision.")}
    if vis and model.vision is None:  # a ViT fine-tuned by the caption stage, now frozen
        vision.load_state_dict(vis)
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("vision.") or vis}
    for k in ours.keys() & sd.keys():
        if ours[k].shape != sd[k].shape:
            raise CheckpointMismatch(f"--init {path}: {k} has shape {tuple(sd[k].shape)}, this "
                                     f"run's {tuple(ours[k].shape)} (another --num_query/backbone?)")
    model.load_state_dict({k: v for k, v in sd.items() if k in ours}, strict=False)
    check_loaded(len(ours.keys() & sd.keys()), len(ours), path, describe(ck), SCRIPT)
    return sorted(ours.keys() - sd.keys())


def build(cfg, dist):
    """The trainable module and the frozen parts of cfg.stage, with --init / --hf_import weights."""
    from transformers import AutoTokenizer
    dtype = pick_dtype(dist.device, cfg.precision)
    fdtype = frozen_dtype(dist.device, dtype)
    stage, meta = cfg.stage, {}
    init = None
    if cfg.init and stage != "0":
        init = load_own(cfg.init, "--init", ["stage 1", "stage 2", "caption"])
    cfg.image_size = eval_image_size(cfg, init) if stage == "eval" else cfg.image_size
    bert_tok = AutoTokenizer.from_pretrained(resolve_local(cfg.bert_path))
    llm = llm_tok = None
    if needs_llm(cfg) and cfg.hf_import:
        llm, llm_tok, hconf = load_hf_llm(resolve_local(cfg.hf_import), fdtype)
        meta["image_token_index"] = hconf.image_token_index
    elif needs_llm(cfg):
        llm, llm_tok = load_llm(cfg.llm_path, fdtype, cfg.t5_dense_act_fn)
    if llm is not None:
        llm.requires_grad_(False).train(cfg.llm_train_mode).to(dist.device)  # generate() evals it
    encdec = llm is not None and llm.config.is_encoder_decoder
    if encdec and dtype == torch.float16:  # T5's FFN activations overflow fp16 (LAVIS: bf16)
        raise SystemExit("--precision fp16 with a T5 LLM: Flan-T5 overflows in fp16; use bf16 or fp32")
    toks = Tokenizers(bert_tok, llm_tok, cfg.max_txt_len, dist.device, encdec)
    frozen = Frozen(dtype, llm=llm, llm_tok=llm_tok, rank=dist.rank, align_weight=cfg.align_weight)
    bert = resolve_local(cfg.bert_path)
    if stage == "0":
        pformer = build_pformer(bert, cfg.num_query, llm_embed_dim(llm.config), cfg.embed_dim)
        return pformer.to(dist.device), frozen, toks, meta

    # Width of the LLM's input embeddings: from the LLM, else from what the prompts must match
    pck = load_own(cfg.pformer_ckpt, "--pformer_ckpt", ["stage 0"]) if cfg.pformer_ckpt else None
    d_llm = (llm_embed_dim(llm.config) if llm is not None else
             pck["model"]["llm_proj.weight"].shape[0] if pck else
             hf_text_width(cfg.hf_import) if cfg.hf_import else
             init["model"]["llm_proj.weight"].shape[0] if init and "llm_proj.weight" in init["model"]
             else 0)
    if pck:  # the frozen P-Former of stage 0: the alignment target P*
        frozen.pformer = build_pformer(bert, cfg.num_query, d_llm, cfg.embed_dim, from_config=True)
        frozen.pformer.load_state_dict(pck["model"])
        # fp32 weights under autocast, as BLIText's frozen BertModel (blip2_qformer_pformer.py)
        frozen.pformer.requires_grad_(False).train(cfg.pformer_train_mode).to(dist.device)
    vision, ln = load_vision(cfg.hf_import or cfg.vision_path)
    tuned = init and any(k.startswith("vision.") for k in init["model"])  # its table has this size:
    vision = vision.resize(init["config"]["image_size"] if tuned else cfg.image_size).to(dist.device)
    text = stage == "1" or "retrieval" in tasks_of(cfg)
    if cfg.hf_import:
        qf = qformer_like_hf(resolve_local(cfg.hf_import), bert, cfg, len(bert_tok), text)
    else:
        qf = qformer_from_bert(bert, vision.width, cfg, len(bert_tok), text)
    use_proj = stage != "1" or pck is not None or bool(cfg.hf_import)
    model = Blip2Trainable(qf, vision.width, d_llm if use_proj else 0,  # trained weights in fp32, even
                           vision.float() if cfg.train_vision else None)  # from an fp16 folder
    if model.vision is not None and cfg.grad_checkpoint:  # LAVIS use_grad_checkpoint
        model.vision.checkpoint_blocks()
    if stage == "1" and pck is None and model.llm_proj is not None:
        model.llm_proj.requires_grad_(False)  # imported, unused by plain stage 1: out of DDP/AdamW
    if stage != "1" and text:  # text parts kept for retrieval eval get no gradient in stage 2: freeze
        for name, p in qf.named_parameters():  # them, or DDP stops at step 2 on unused parameters
            if name.split(".")[0] in TEXT_ONLY or ".ffn_text." in name:
                p.requires_grad_(False)
    if ln is not None and not (stage == "1" and cfg.reset_ln_vision and not cfg.hf_import):
        model.ln_vision.load_state_dict(ln)
    loaded = set()  # what --hf_import and --init filled (check_untrained: what an eval reads)
    if cfg.hf_import:
        loaded.update(import_hf(resolve_local(cfg.hf_import), model))
        meta["hf_loaded"] = len(loaded)
    if init:
        meta["init_missing"] = load_init(model, vision, init, cfg.init)
        loaded.update(model.state_dict().keys() - set(meta["init_missing"]))
        meta.update(init.get("meta", {}))
    meta["loaded"] = loaded
    if model.vision is None:
        vision.requires_grad_(False).eval().to(fdtype)
    frozen.vision, frozen.vision_tower = (vision if model.vision is None else None), vision
    return model.to(dist.device), frozen, toks, meta


def check_untrained(cfg, loaded):
    """Stop before an evaluation or export reads a part that this run neither trains nor loaded, which
    would be scored at its random init: the ITC/ITM heads, which stages 2 and caption freeze and a
    released generation model (Blip2ForConditionalGeneration) lacks; the LLM projection, which a
    plain stage 1 (no --pformer_ckpt) lacks."""
    tasks = set(tasks_of(cfg))
    heads = ["qformer.vision_proj.weight", "qformer.text_proj.weight", "qformer.itm_head.weight"]
    need = [*heads] if cfg.stage not in ("0", "1") and "retrieval" in tasks else []
    if cfg.stage == "eval" and (tasks & {"caption", "vqa"} or cfg.hf_export):
        need.append("llm_proj.weight")
    if missing := [k for k in need if k not in loaded]:
        what = " and ".join(f"{f} {p}" for f, p in (("--hf_import", cfg.hf_import), ("--init", cfg.init))
                            if p) or "a run without --init or --hf_import"
        uses = ("--eval_tasks retrieval" if missing[0] in heads else "--hf_export" if cfg.hf_export
                else "--eval_tasks caption/vqa")
        raise SystemExit(f"{uses}: {what} holds no {', '.join(missing)} and this run trains none (a "
                         "generation model has no ITC/ITM heads, a plain stage 1 no LLM projection); "
                         "pass a checkpoint that has them or leave the task out")


def make_batch(raw, stage, cfg, toks, frozen, step, micro, device):
    """Tokenise a collated micro-batch for the stage's loss; P* targets from the frozen P-Former."""
    caps = [pre_caption(c, 50) for c in raw["caption"]]  # LAVIS blip_caption keeps 50 words
    b = {"pixels": on_device(raw["pixels"], cfg, device)} if "pixels" in raw else {}
    split = toks.is_encdec and stage in ("0", "2")  # T5 prefix split: per sample, from its key
    rng = [random.Random(f"{cfg.seed}-{k}-split") for k in raw["key"]] if split else None
    if stage == "0":
        ids, mask = toks.bert_batch(caps)
        b.update(bert_ids=ids, bert_mask=mask)
        b.update(toks.llm_batch(caps, rng=rng, stage0=True))
        return b
    b["image_ids"] = raw["image_id"].to(device)
    prompt = cfg.caption_prompt if stage == "caption" else ""
    if stage == "1":  # ITM all-gathers the token ids: one length on every rank
        b["ids"], b["mask"] = D.pad_across_ranks(*toks.bert_batch(caps), toks.bert.pad_token_id)
        seed, B = cfg.seed * 1_000_003 + step * 1024 + 2 * micro, len(caps)  # ITM negatives' noise:
        b.update(dec_id=toks.bert.bos_token_id, pad_id=toks.bert.pad_token_id,  # drawn uncompiled
                 noise=[gumbel_noise(seed + k, B, B * D.world_size(), frozen.rank, device) for k in (0, 1)])
    else:
        b["llm"] = toks.llm_batch(caps, prompt=prompt, rng=rng)
    if frozen.pformer is not None:
        ptext = [(prompt + " " + c) if prompt else c for c in caps]  # caption FT: "a photo of ..."
        with torch.no_grad(), autocast(device, frozen.dtype):
            b["pstar"] = frozen.pformer(*toks.bert_batch(ptext))[0].float()
    return b


# Besides common.checkpoint's, fields that only change what is evaluated or exported after training,
# or the memory a step takes (grad_checkpoint); not epochs, which sets lavis_lr's cosine. At --stage
# caption VAL_SET also drives the val scores that pick best.pt (LAVIS runner_base.py): not free there
VAL_SET = {"eval_tasks", "eval_max", "num_beams", "max_new_tokens", "min_new_tokens", "min_length"}
RESUME_FREE_HERE = (RESUME_FREE - {"epochs"}) | VAL_SET | {
    "test_file", "k_test", "hf_export", "vqa_prompt", "vqa_num_beams", "vqa_max_new_tokens",
    "vqa_length_penalty", "grad_checkpoint"}


def train(cfg, dist, model, frozen, toks, meta, logger):
    stage = cfg.stage
    if stage == "0":
        dataset = TextDataset(read_lines(cfg.text_file))  # an index of line offsets, not the lines
    else:  # a stream of shards is not indexed: the sampler only counts its steps
        dataset = None if cfg.train_shards else PairDataset(read_pairs(cfg.train_file), cfg)
    n = shard_sample_count(cfg.train_shards) if dataset is None else len(dataset)
    sampler = StepSampler(n, cfg.global_batch, cfg.micro_batch, dist.world_size, dist.rank, cfg.seed)
    per_epoch = sampler.steps_per_epoch
    total = min(cfg.max_steps or cfg.epochs * per_epoch, cfg.epochs * per_epoch)
    ddp = D.wrap_ddp(torch.compile(model) if cfg.compile else model, dist)  # `model` keeps plain names
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    scaler = make_scaler(frozen.dtype)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"stage {stage}: {n} items, {per_epoch} steps/epoch, {total} steps, "
                f"accumulation {sampler.accum}, trainable params {n_train:,}")
    if stage == "1":  # ITC / ITM contrast one micro batch of every process, not the global batch
        short = f" (the global batch's {cfg.global_batch - 1} need accumulation 1: more processes " \
            "or a larger micro batch)" if sampler.accum > 1 else ""
        logger.info(f"ITC / ITM negatives per sample: {sampler.micro * dist.world_size - 1}{short}")
    start, ck = 0, {}
    if cfg.resume:
        ck = load_own(cfg.resume, "--resume", [KINDS[stage]])
        check_resume_config(ck.get("config"), dataclasses.asdict(cfg), cfg.resume_changes,
                            logger.info, RESUME_FREE_HERE - {"caption": VAL_SET}.get(stage, set()))
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start = ck["step"]
        set_rng_state(ck["rng"], dist.rank)
        logger.resumed(start)
        logger.info(f"resumed from {cfg.resume} at step {start}")
    mask_id, keep = toks.bert.mask_token_id, [toks.bert.pad_token_id, toks.bert.cls_token_id]
    select = stage == "caption" and "caption" in tasks_of(cfg) and not cfg.bench
    select = select and per_epoch < total  # more than one epoch: val captions at each epoch end
    val = read_pairs(cfg.val_file)[:cfg.eval_max or None] if select else None
    best = ck.get("best") or {"score": -math.inf, "epoch": 0, "step": 0}

    def micro_step(raw, step, micro):
        b = make_batch(raw, stage, cfg, toks, frozen, step, micro, dist.device)
        if stage == "0":
            with autocast(dist.device, frozen.dtype):
                return stage0_losses(ddp, b, frozen.llm, dist.rank, cfg.mask_prob, mask_id, keep)
        return ddp(stage, b, frozen)

    def optimizer_step(micros, step):
        set_lr(opt, lavis_lr(step, per_epoch, cfg))
        terms = {}
        for j, raw in enumerate(micros):
            sync = j == len(micros) - 1 or not hasattr(ddp, "no_sync")
            with (ddp.no_sync() if not sync else contextlib.nullcontext()):
                losses = micro_step(raw, step, j)
                scaler.scale(sum(losses.values()) / len(micros)).backward()
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + v.detach() / len(micros)
        terms = {k: D.all_reduce_mean(v) for k, v in terms.items()}
        terms["loss"] = sum(terms.values())
        # stops before the update on a non-finite loss or gradient (step counted from 1, as logged)
        gnorm = optimizer_update(opt, scaler, model.parameters(), cfg.grad_clip, step + 1, terms)
        return terms, gnorm

    model.train()
    if stage != "0" and model.vision is None:
        frozen.vision.eval()
    # --bench: past the schedule's end if need be (the sampler's epochs go on)
    sampler.start, sampler.total = (0, cfg.bench + 5) if cfg.bench else (start, total)
    tracker = StreamTracker(cfg.train_shards, cfg.max_bad_frac, state=ck.get("stream")) if dataset is None \
        else None
    batches = iter(shard_batches(cfg, dist, tracker, ck.get("stream")) if tracker else
                   make_loader(dataset, sampler, collate, cfg.num_workers, cfg.seed, dist.rank,
                               pin_memory=dist.device.type == "cuda"))
    if cfg.bench:  # the real loader's wait (data) timed apart from the step's compute
        data = lambda: [next(batches) for _ in range(sampler.accum)]  # noqa: E731
        run = lambda micros: optimizer_step(micros, 0)  # noqa: E731
        on_gpu = dist.device.type == "cuda"
        flops = count_flops(lambda: run(data())) * dist.world_size if on_gpu else None
        res = run_bench(run, cfg.bench, cfg.global_batch, dist.device, flops_per_step=flops,
                        world_size=dist.world_size, data_fn=data)
        return {f"bench_{k}": v for k, v in res.items()}
    timer, last, images = StepTimer(dist.device), {}, open_images(cfg)  # images: counts only
    for step in range(start + 1, total + 1):  # step = optimizer steps done after this one
        timer.start()
        try:
            micros = [next(batches) for _ in range(sampler.accum)]
        except DataError as e:  # raised in a DataLoader worker: its last line is the message
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        count_images(images, *([p for m in micros for p in m[key]] for key in ("tried", "bad")))
        images.check()
        terms, gnorm = optimizer_step(micros, step - 1)
        t = timer.stop(cfg.global_batch)
        last = {k: float(v) for k, v in terms.items()}
        if step % cfg.log_every == 0 or step == total:
            logger.log(step, **last, lr=opt.param_groups[0]["lr"], grad_norm=gnorm, **t)
        if select and (step % per_epoch == 0 or step == total):  # LAVIS runner_base.py: each epoch
            epoch = -(-step // per_epoch)
            m = evaluate_caption(model.eval(), frozen, toks, val, cfg, dist,
                                 os.path.join(cfg.out_dir, f"captions_epoch{epoch}.json"))
            model.train()
            logger.log(step, epoch=epoch, **{f"val_{k}": v for k, v in m.items()})
            if m["CIDEr"] + m["BLEU-4"] > best["score"]:  # LAVIS tasks/captioning.py agg_metrics
                best = {"score": m["CIDEr"] + m["BLEU-4"], "epoch": epoch, "step": step}
                save(cfg, dist, model, None, None, step, meta, best=best)  # best.pt (LAVIS: _best)
        if step % cfg.save_every == 0 or step == total:
            save(cfg, dist, model, opt, scaler, step, meta, tracker, best)
    if stage != "0":
        logger.info(f"training images: {(tracker or images).report()}")
        (tracker or images).check(final=True)
    D.barrier()  # rank 0 wrote best.pt
    path = os.path.join(cfg.out_dir, "best.pt")
    sel = load_checkpoint(path) if select and os.path.isfile(path) else {}
    chosen = D.same_on_every_rank({"selected_epoch": best["epoch"], "selected_step": best["step"]}
                                  if sel.get("best") == best else {}, "the best.pt a final test reads")
    if chosen:  # the final evaluations read the selected epoch's weights
        model.load_state_dict(sel["model"])
    if select:  # the final evaluations read best.pt, or the last weights where it lacks the epoch
        logger.info(f"selected epoch {best['epoch']} (val CIDEr + BLEU-4 {best['score']:.4g})" +
                    ("" if chosen else ", not in best.pt: the last weights are evaluated"))
    return {**{f"final_{k}": v for k, v in last.items()}, **chosen}


def save(cfg, dist, model, opt, scaler, step, meta, tracker=None, best=None):
    """<out_dir>/checkpoint.pt, what a resume continues; opt None: best.pt, the weights alone."""
    rngs = D.all_gather_object(rng_state())  # every rank's generators: a resume restores each its own
    stream = StreamTracker.merge_states(D.all_gather_object(tracker.state_dict())) if tracker else None
    if not dist.is_main:
        return
    meta = {k: v for k, v in meta.items() if k == "image_token_index" and v is not None}
    state = {"script": SCRIPT, "kind": KINDS[cfg.stage], "model": model.state_dict(), "step": step,
             "config": dataclasses.asdict(cfg), "stage": cfg.stage, "meta": meta, "best": best}
    if opt is not None:
        state.update(optimizer=opt.state_dict(), scaler=scaler.state_dict(), rng=rngs,
                     stream=stream)
    save_checkpoint(os.path.join(cfg.out_dir, "checkpoint.pt" if opt else "best.pt"), state)


# ================================================================================================ transformers
# Import released Blip2ForConditionalGeneration weights (e.g. Salesforce/blip2-opt-2.7b) into the
# modules above, export ours in that format.  The name map shows how the readable Q-Former maps onto
# transformers' BLIP-2 (modeling_blip_2.py, convert_blip_2_original_to_pytorch.py).
def hf_qformer_names(n_layers, text):
    """(our Blip2Trainable key, transformers' Blip2 key) pairs: ln_vision, Q-Former, projections."""
    pairs = [("ln_vision.weight", "vision_model.post_layernorm.weight"),
             ("ln_vision.bias", "vision_model.post_layernorm.bias"),
             ("qformer.query_tokens", "query_tokens"),
             ("qformer.embed_norm.weight", "qformer.layernorm.weight"),
             ("qformer.embed_norm.bias", "qformer.layernorm.bias"),
             ("llm_proj.weight", "language_projection.weight"),
             ("llm_proj.bias", "language_projection.bias")]
    for i in range(n_layers):
        for ours, bert in _LAYER_NAMES:
            if ours.startswith("ffn_text") and not text:
                continue
            hf = bert.replace(".self.", ".attention.")  # attention.self.q -> attention.attention.q
            for p in ("weight", "bias"):
                pairs.append((f"qformer.layers.{i}.{ours}.{p}", f"qformer.encoder.layer.{i}.{hf}.{p}"))
    if text:  # present only in ITM / retrieval checkpoints (Blip2ForImageTextRetrieval)
        pairs += [("qformer.word_embeddings.weight", "embeddings.word_embeddings.weight"),
                  ("qformer.position_embeddings.weight", "embeddings.position_embeddings.weight")]
        heads = [("vision_proj", "vision_projection"), ("text_proj", "text_projection"),
                 ("itm_head", "itm_head")]
        pairs += [(f"qformer.{a}.{p}", f"{b}.{p}") for a, b in heads for p in ("weight", "bias")]
    return pairs


def load_blip2_vision(path):
    """The EVA ViT of a BLIP-2 folder (1B parameters: built empty, then given the stored tensors)
    and its post_layernorm, which is BLIP-2's ln_vision."""
    from transformers import AutoConfig, Blip2VisionModel
    with torch.device("meta"):
        vm = Blip2VisionModel(AutoConfig.from_pretrained(path).vision_config)
    sd = read_hf_weights(path, "vision_model.")
    for k in [k for k in sd if k.endswith("self_attn.q_bias")]:  # older files: separate q/v biases
        q, v = sd.pop(k), sd.pop(k.replace("q_bias", "v_bias"))
        sd[k.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.zeros_like(q), v])
    vm.load_state_dict(sd, assign=True)
    ln = {"weight": sd["post_layernorm.weight"], "bias": sd["post_layernorm.bias"]}
    return VisionTower(vm, "blip2"), ln


def hf_text_width(folder):
    from transformers import Blip2Config
    return llm_embed_dim(Blip2Config.from_pretrained(resolve_local(folder)).text_config)


def qformer_like_hf(folder, bert_path, cfg, vocab_size, text):
    """A Q-Former shaped like an imported BLIP-2's (its weights are loaded next; cfg takes its
    num_query etc.).  Generation checkpoints carry no text parts: when those are needed (stage 1,
    retrieval) they come from BERT if the shapes agree."""
    from transformers import BertConfig, Blip2Config
    hconf = Blip2Config.from_pretrained(folder)
    qc, bc = hconf.qformer_config, BertConfig.from_pretrained(bert_path)
    cfg.num_query, cfg.embed_dim = hconf.num_query_tokens, hconf.image_text_hidden_size
    cfg.cross_attention_freq = qc.cross_attention_frequency
    shape = lambda c: (c.hidden_size, c.num_hidden_layers, c.intermediate_size)  # noqa: E731
    if text and shape(bc) == shape(qc):
        return qformer_from_bert(bert_path, qc.encoder_hidden_size, cfg, vocab_size, text)
    return QFormer(qc.hidden_size, qc.num_hidden_layers, qc.num_attention_heads,
                   qc.intermediate_size, qc.encoder_hidden_size, cfg.num_query, vocab_size,
                   qc.max_position_embeddings, cfg.embed_dim, qc.cross_attention_frequency,
                   cfg.qformer_dropout, qc.layer_norm_eps, text)


def import_hf(folder, model):
    """Load a released BLIP-2 into ln_vision, Q-Former and llm_proj (ViT and LLM: `load_vision`,
    `load_hf_llm`).  Keys the file lacks (text parts of generation checkpoints) keep their init
    (BERT's where the shapes agree, qformer_like_hf); returns our keys that were loaded."""
    sd, ours, new = read_hf_weights(folder, ""), model.state_dict(), {}
    for a, b in hf_qformer_names(len(model.qformer.layers), model.qformer.text):
        if a not in ours or b not in sd:
            continue
        if ours[a].shape == sd[b].shape:
            new[a] = sd[b]
        elif a == "qformer.word_embeddings.weight":  # ITM checkpoints: 30523 rows incl. [DEC]
            n = min(ours[a].shape[0], sd[b].shape[0])
            new[a] = torch.cat([sd[b][:n], ours[a][n:]])
        else:
            raise ValueError(f"{folder}: {b} has shape {tuple(sd[b].shape)}, "
                             f"ours {a} {tuple(ours[a].shape)}")
    model.load_state_dict(new, strict=False)
    return list(new)


def load_hf_llm(folder, dtype):
    """The language model stored under `language_model.` in a BLIP-2 folder (+ its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, Blip2Config
    conf = Blip2Config.from_pretrained(folder)
    tc = conf.text_config
    llm = (AutoModelForSeq2SeqLM if tc.is_encoder_decoder else AutoModelForCausalLM).from_config(tc)
    sd = read_hf_weights(folder, "language_model.")
    missing, unexpected = llm.load_state_dict(sd, strict=False)
    llm.tie_weights()
    tied = {"lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: LLM weights do not match: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return llm.to(dtype), AutoTokenizer.from_pretrained(folder), conf


def export_hf(out, model, vision, llm, llm_tok, num_query, image_size, image_token_index=None):
    """Write a Blip2ForConditionalGeneration folder + its Blip2Processor, which transformers loads
    with from_pretrained and captions with generate().  Needs a BLIP-2 (EVA-style) vision tower:
    CLIP's pre-LayerNorm has no place in Blip2VisionModel (the toy world has one:
    data/toy/models/blip2_vision)."""
    import copy
    from transformers import (AddedToken, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              Blip2QFormerConfig)
    try:  # the pillow image processor: the default one wants torchvision (not a dependency here)
        from transformers import BlipImageProcessorPil as BlipImageProcessor
    except ImportError:  # transformers < 5
        from transformers import BlipImageProcessor
    if vision.kind != "blip2":
        raise ValueError("--hf_export needs a BLIP-2 vision tower (Blip2VisionModel); this model "
                         "uses CLIP (toy world: --vision_path data/toy/models/blip2_vision)")
    qf = model.qformer
    l0 = qf.layers[0]
    tok = copy.deepcopy(llm_tok)  # the processor expands an "<image>" token into the query slots
    if "<image>" not in tok.get_vocab():
        tok.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    if image_token_index is None:  # the first spare embedding row (OPT-2.7B: 50265, as on the hub)
        image_token_index = tok.convert_tokens_to_ids("<image>")
    if image_token_index >= llm.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"no spare LLM embedding row for the image token (vocab {len(llm_tok)}); "
                         "pass an image_token_index")
    qconf = Blip2QFormerConfig(hidden_size=qf.query_tokens.shape[-1], num_hidden_layers=len(qf.layers),
                               num_attention_heads=l0.self_attn.heads,
                               intermediate_size=l0.ffn_query.fc1.out_features,
                               layer_norm_eps=qf.embed_norm.eps,
                               cross_attention_frequency=qf.cross_freq, encoder_hidden_size=vision.width)
    text_conf = llm.config.to_dict()
    if llm.config.is_encoder_decoder and getattr(llm.config, "bos_token_id", None) is None:
        # transformers' Blip2 generate() without text starts the LLM input with bos_token_id, which
        # T5 configs lack; T5 never reads it otherwise.  "</s>" makes that input [P; </s>], what ""
        # tokenises to here.
        text_conf["bos_token_id"] = llm.config.eos_token_id
    vision.resize(image_size)  # transformers reads the table as stored: at the size the run used
    conf = Blip2Config(vision_config=vision.model.config.to_dict(), qformer_config=qconf.to_dict(),
                       text_config=text_conf, num_query_tokens=num_query,
                       image_token_index=image_token_index)
    hf = Blip2ForConditionalGeneration(conf)
    ours = model.state_dict()
    sd = {b: ours[a] for a, b in hf_qformer_names(len(qf.layers), False) if a in ours}
    sd.update({f"vision_model.{k}": v for k, v in vision.model.state_dict().items()})
    sd.update({f"language_model.{k}": v for k, v in llm.state_dict().items()})
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k and "embed_tokens" not in k]:
        raise ValueError(f"export mismatch: missing {missing[:5]} unexpected {unexpected[:5]}")
    hf.save_pretrained(out)
    # The image transform of every stage here: bicubic resize to a square, CLIP's mean/std
    ip = BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN),
                            image_std=list(CLIP_STD), resample=3)
    Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=num_query).save_pretrained(out)
    return out


# ---- --mode params: what a stage trains and runs at the sizes of its model names, without weights
def param_counts(cfg, batch=2, text_len=32):
    """Trainable and frozen parameters of cfg.stage and its FLOPs per sample (forward + backward of
    the stage's losses, plus the frozen ViT's forward), on the meta device:
    common.hf.published_config gives the released architectures offline, so nothing is read or
    downloaded."""
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, BertModel, Blip2VisionModel,
                              CLIPVisionModel)
    from common.hf import meta_model, published_config
    from common.train import count_flops, count_params
    vc, bc, lc = (published_config(p) for p in (cfg.vision_path, cfg.bert_path, cfg.llm_path))
    kind = "clip" if vc.model_type.startswith("clip") else "blip2"
    vc = getattr(vc, "vision_config", vc)  # (BLIP-2 / CLIP folders hold the vision tower's config)
    stage, d_llm, B, L, Nq = cfg.stage, llm_embed_dim(lc), batch, text_len, cfg.num_query
    text, pstar = stage == "1" or "retrieval" in tasks_of(cfg), bool(cfg.pformer_ckpt)
    with torch.device("meta"):
        vision = VisionTower((CLIPVisionModel if kind == "clip" else Blip2VisionModel)(vc), kind)
        vision.resize(cfg.image_size)
        qf = QFormer(bc.hidden_size, bc.num_hidden_layers, bc.num_attention_heads, bc.intermediate_size,
                     vc.hidden_size, Nq, bc.vocab_size + 1, bc.max_position_embeddings, cfg.embed_dim,
                     cfg.cross_attention_freq, 0.0, bc.layer_norm_eps, text)  # + [DEC]
        model = Blip2Trainable(qf, vc.hidden_size, d_llm if stage != "1" or pstar else 0,
                               vision if cfg.train_vision else None)  # as build()
        pformer = PFormer(BertModel(bc, add_pooling_layer=False), Nq, d_llm, cfg.embed_dim)
        llm = meta_model(AutoModelForSeq2SeqLM if lc.is_encoder_decoder else AutoModelForCausalLM, lc)
        for name, p in qf.named_parameters():  # as build(): text parts kept for eval only, frozen
            p.requires_grad_(stage == "1" or not (name.split(".")[0] in TEXT_ONLY or ".ffn_text." in name))
        ids, ones = torch.zeros(B, L, dtype=torch.long), torch.ones(B, L, dtype=torch.long)
        t = dict(enc_ids=ids, enc_mask=None, labels=ids, dec_mask=None)  # (masks: no values on meta)
        b = dict(pixels=torch.zeros(B, 3, vision.image_size, vision.image_size), ids=ids, mask=ones,
                 image_ids=torch.arange(B), dec_id=1, pad_id=0, noise=[torch.zeros(B, B)] * 2, llm=t,
                 pstar=torch.zeros(B, Nq, d_llm), bert_ids=ids, bert_mask=None)
        frozen = Frozen(torch.float32, vision=vision, llm=llm, pformer=pformer if pstar else None)
        losses = (lambda: stage0_losses(pformer, {**b, **t}, llm, 0, 0.0, 103, [0])) if stage == "0" else \
            (lambda: model("1" if stage == "1" else "2", b, frozen))
        flops = count_flops(lambda: sum(losses().values()).backward()) / B if stage != "eval" else 0.0
        vit = count_flops(lambda: vision(b["pixels"])) / B
    trained = [pformer] if stage == "0" else [model]
    frozen_parts = ([llm] if stage == "0" else [vision] * (model.vision is None) + [llm] * needs_llm(cfg) +
                    [pformer] * pstar)
    out = {"trainable": count_params(trained, trainable=True),
           "frozen": count_params(trained, trainable=False) + count_params(frozen_parts),
           "vision": count_params(vision),
           "qformer": count_params(model) - count_params(model.vision or []),
           "pformer": count_params(pformer), "llm": count_params(llm), "gflops_per_sample": flops / 1e9,
           "gflops_vit_forward": vit / 1e9}
    print(f"stage {stage} ({cfg.vision_path} | {cfg.bert_path} | {cfg.llm_path}): " +
          ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in out.items()))
    return out


# ================================================================================================ main
def main(argv=None):
    cfg = resolve_config(parse_config(Config, PRESETS, argv))
    if cfg.mode == "params":
        return param_counts(cfg)
    dist = D.setup_distributed(cfg.device)
    try:
        seed_everything(cfg.seed + dist.rank)
        logger = Logger(cfg.out_dir, dist.is_main)
        if cfg.stage != "eval":  # before any model or data: the micro batch this world size runs
            fit_micro(cfg, dist.world_size, logger.info)
        if cfg.preset == "toy":  # the toy world's paths; a first run builds only what it reads
            from data.toy import toy_paths
            toy_paths(cfg, *toy_files(cfg), is_main=dist.is_main, barrier=D.barrier)
        check_eval_files(cfg)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        model, frozen, toks, meta = build(cfg, dist)  # (--hf_import sets num_query etc.)
        if dist.is_main:
            save_config(cfg, cfg.out_dir)
        logger.info("config:\n" + format_config(cfg))
        check_untrained(cfg, meta.get("loaded", ()))  # (stage 0: no BLIP-2 model)
        if meta.get("init_missing"):
            missing = meta["init_missing"]
            logger.info(f"note: --init {cfg.init} lacks {len(missing)} of the model's tensors, e.g. "
                        f"{missing[:3]} (they keep their fresh initialisation)")
        seed_everything(cfg.seed + dist.rank)
        metrics = {}
        if cfg.stage != "eval":
            metrics.update(train(cfg, dist, model, frozen, toks, meta, logger))
        if cfg.bench:
            return metrics
        shown, start = {}, time.time()
        if cfg.stage != "0":
            metrics.update(run_evals(model, frozen, toks, cfg, dist, logger, shown))
        took_eval = time.time() - start
        if cfg.hf_export and dist.is_main and cfg.stage != "0":
            export_hf(cfg.hf_export, model, frozen.vision_tower, frozen.llm, frozen.llm_tok,
                      cfg.num_query, cfg.image_size, meta.get("image_token_index"))
            logger.info(f"exported Blip2ForConditionalGeneration to {cfg.hf_export}")
        if dist.is_main:
            with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
        if cfg.report and dist.is_main:
            took = write_report(model, frozen, cfg, shown, metrics)
            logger.info(f"report: {os.path.join(cfg.out_dir, 'report.html')} ({took:.2f} s; "
                        f"eval {took_eval:.1f} s)")
        return metrics
    finally:
        D.cleanup_distributed()


if __name__ == "__main__":
    main()
