"""BLIP-2 with a P-Former: bootstrapping vision-language learning with decoupled language pre-training.

BLIP-2 (Li et al., ICML 2023, arXiv 2301.12597) bridges a frozen image encoder and a frozen LLM with a small
Querying Transformer (Q-Former): 32 learned queries cross-attend to the image and become 32 soft prompts for the
LLM.  Stage 1 trains the Q-Former on image-text contrastive (ITC), matching (ITM) and image-grounded generation
(ITG) losses; stage 2 trains it to prompt the frozen LLM.  Jian, Gao & Vosoughi (NeurIPS 2023, arXiv 2307.07063)
add a "stage 0": a P-Former (a BERT encoder plus a [CLS] -> prompt head) is trained on text alone so that its
prompt P*(T) makes the frozen LLM reproduce the sentence T.  In stages 1 and 2 the Q-Former's projected queries are
additionally regressed onto P*(caption) (the alignment loss), which gives the LLM-ready target that plain BLIP-2 has
to discover from images.  The P-Former is used only in training, never at inference.

Everything of the method is in this file: the Q-Former (BERT layers, cross-attention every other layer, split
query/text FFNs, shared self-attention with the ITC/ITM/ITG masks), the P-Former, the losses of each stage, beam
search captioning (BLEU-4/CIDEr), zero-shot VQA, import/export of transformers' Blip2ForConditionalGeneration.

Commands
  toy world on a CPU (default preset; builds data/toy on first use):
    python blip2_pformer.py --stage 0 --out_dir runs/bp/s0                      # P-Former on text, frozen LLM
    python blip2_pformer.py --stage 1 --pformer_ckpt runs/bp/s0/checkpoint.pt --out_dir runs/bp/s1
    python blip2_pformer.py --stage 2 --init runs/bp/s1/checkpoint.pt --pformer_ckpt runs/bp/s0/checkpoint.pt \
        --out_dir runs/bp/s2                                                    # -> caption CIDEr, VQA accuracy
    python blip2_pformer.py --stage caption --init runs/bp/s2/checkpoint.pt --out_dir runs/bp/cap
    python blip2_pformer.py --stage eval --init runs/bp/s2/checkpoint.pt --eval_tasks caption,vqa
    add --blank_images true to any command for the no-image baseline.  The toy LLM is the (Flan-)T5-style
    encoder-decoder; --llm_path data/toy/models/opt runs the OPT (decoder-only) variant (see TOY_FILES).
  one GPU, paper recipe (hub names in PRESETS["paper"]; data in the canonical pairs/vqa formats):
    python blip2_pformer.py --preset paper --stage 0 --text_file sentences.txt --out_dir runs/s0
    python blip2_pformer.py --preset paper --stage 1 --train_file pairs.jsonl --image_root IMG \
        --pformer_ckpt runs/s0/checkpoint.pt --out_dir runs/s1
  multi-GPU / multi-node (same code path; global batch fixed, accumulation = global / (micro * world)):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        blip2_pformer.py --preset paper --stage 1 ...
  released weights: --hf_import FOLDER (a Blip2ForConditionalGeneration folder, e.g. Salesforce/blip2-opt-2.7b
  downloaded); --hf_export DIR writes the trained model back in that format.

Reproduces: the four-stage recipe of the paper (stage 0 P-Former; stage 1 ITC+ITM+ITG+10*align; stage 2
LM+100*align; COCO caption fine-tuning) and its zero-shot VQA evaluation (paper: VQAv2 val 52.6 with OPT-2.7B from
4M pairs); the Q-Former and parameter counts of the released logs exactly (186,705,470 / 107,133,696).  On the toy
world: Q-Former retrieval and captions above the same pipeline given blank images (README has the figures).
"""
import contextlib
import dataclasses
import json
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist as D
from common.amp import autocast, frozen_dtype, make_scaler, pick_dtype, seed_everything
from common.attention import attention
from common.checkpoint import load_checkpoint, restore, rng_state, save_checkpoint, set_rng_state
from common.config import format_config, parse_config, save_config
from common.data import read_pairs, read_vqa
from common.image import CLIP_MEAN, CLIP_STD, ImageTransform, load_image
from common.log import Logger, progress
from common.train import StepTimer, check_finite, clip_grad, count_flops, param_groups, run_bench, set_lr

# ====================================================================================================
# Config
# ====================================================================================================


@dataclass
class Config:
    preset: str = "toy"
    stage: str = "1"             # 0 | 1 | 2 | caption | eval
    out_dir: str = "runs/blip2_pformer"
    toy_root: str = "data/toy"
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"      # bf16 autocast on GPU; frozen backbones stored in bf16 there
    bench: int = 0
    resume: str = ""
    # --- models ("" = the toy world's backbone) ---
    vision_path: str = ""        # CLIPModel / CLIPVisionModel folder, or a BLIP-2 folder (its EVA ViT-g tower)
    bert_path: str = ""          # BERT (with MLM head) that initialises the Q-Former and the P-Former
    llm_path: str = ""           # OPT (decoder-only) or (Flan-)T5 (encoder-decoder): the kind is read from its config
    t5_dense_act_fn: str = ""    # LAVIS overrides Flan-T5's FFN activation with "gelu"; "" keeps the checkpoint's
    hf_import: str = ""          # Blip2ForConditionalGeneration folder: ViT + Q-Former + projection + LLM
    hf_export: str = ""          # write the trained model as a Blip2ForConditionalGeneration folder here
    init: str = ""               # checkpoint of the previous stage (stage 1 for stage 2, stage 2 for caption/eval)
    pformer_ckpt: str = ""       # stage-0 checkpoint; given -> alignment loss in stages 1/2/caption
    pformer_train_mode: bool = False  # original runs produced P* with dropout on (LAVIS calls .train())
    num_query: int = 32
    embed_dim: int = 256         # ITC feature size
    max_txt_len: int = 32
    cross_attention_freq: int = 2
    qformer_dropout: float = 0.1
    reset_ln_vision: bool = True  # stage 1 from scratch: ln_vision starts as identity (spec 1.1)
    train_vision: Optional[bool] = None  # caption fine-tuning unfreezes the ViT in the paper
    image_size: Optional[int] = None
    # --- data ("" = the toy world's files) ---
    train_file: str = ""         # canonical pairs JSONL
    val_file: str = ""
    vqa_file: str = ""           # canonical vqa JSONL (zero-shot evaluation)
    text_file: str = ""          # stage 0: one sentence per line
    image_root: str = ""
    blank_images: bool = False   # baseline: every image replaced by a constant one
    num_workers: int = 2
    max_bad_frac: float = 0.05
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
    caption_prompt: Optional[str] = None
    num_beams: Optional[int] = None
    max_new_tokens: Optional[int] = None
    min_new_tokens: Optional[int] = None
    vqa_prompt: str = "Question: {} Short answer:"  # logged by BLIText/LAVIS; the BLIP-2 paper text says "Answer:"
    vqa_num_beams: int = 5
    vqa_max_new_tokens: int = 10
    vqa_length_penalty: float = -1.0


PRESETS = {
    # Tiny backbones learn in a few hundred steps only without dropout in the (2-layer) Q-Former.
    "toy": {"qformer_dropout": 0.0, "num_query": 8},
    "paper": {
        # EVA ViT-g/14 (39 blocks = penultimate layer) is distributed inside the BLIP-2 checkpoints.
        "vision_path": "Salesforce/blip2-opt-2.7b",
        "bert_path": "bert-base-uncased",
        "llm_path": "facebook/opt-2.7b",       # Flan-T5 runs: --llm_path google/flan-t5-xl --t5_dense_act_fn gelu
        "num_workers": 8, "log_every": 50, "save_every": 2000, "eval_batch": 64,
    },
}

# Per-stage recipes (spec 5.4).  Stage 1/2 "epochs" are over COCO+VG+CC3M+SBU (4.6M pairs); stage 0 over ~12M
# sentences.  Warm-up is linear from warmup_lr inside epoch 0, then a cosine per epoch down to min_lr.
_PAPER_GEN = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8, caption_prompt="a photo of", eval_tasks="caption,vqa")
STAGE_RECIPES = {
    "paper": {
        "0": dict(epochs=5, global_batch=384, micro_batch=128, lr=1e-4, min_lr=1e-5, warmup_lr=1e-6,
                  warmup_steps=2000, eval_tasks=""),
        "1": dict(epochs=10, global_batch=1024, micro_batch=128, lr=1e-4, min_lr=1e-5, warmup_lr=1e-6,
                  warmup_steps=5000, align_weight=10.0, image_size=224, train_vision=False, eval_tasks="retrieval"),
        "2": dict(epochs=10, global_batch=1024, micro_batch=128, lr=1e-4, min_lr=1e-5, warmup_lr=1e-6,
                  warmup_steps=2000, align_weight=100.0, image_size=224, train_vision=False, **_PAPER_GEN),
        "caption": dict(epochs=5, global_batch=128, micro_batch=16, lr=1e-5, min_lr=0.0, warmup_lr=1e-8,
                        warmup_steps=1000, align_weight=1.0, image_size=364, train_vision=True,
                        **{**_PAPER_GEN, "eval_tasks": "caption"}),
        "eval": dict(image_size=224, train_vision=False, **_PAPER_GEN),
    },
    "toy": {  # minutes on a laptop CPU for the full toy world (10k pairs, 20k sentences)
        "0": dict(epochs=1, global_batch=64, micro_batch=64, lr=1e-3, min_lr=1e-4, warmup_lr=1e-5,
                  warmup_steps=20, eval_tasks=""),
        "1": dict(epochs=1, global_batch=32, micro_batch=32, lr=2e-3, min_lr=1e-4, warmup_lr=1e-5,
                  warmup_steps=20, align_weight=10.0, image_size=64, train_vision=False, eval_tasks="retrieval"),
        "2": dict(epochs=1, global_batch=32, micro_batch=32, lr=1e-3, min_lr=1e-4, warmup_lr=1e-5,
                  warmup_steps=20, align_weight=100.0, image_size=64, train_vision=False,
                  num_beams=3, max_new_tokens=20, min_new_tokens=1, caption_prompt="", eval_tasks="caption,vqa"),
        "caption": dict(epochs=1, global_batch=32, micro_batch=32, lr=3e-4, min_lr=0.0, warmup_lr=1e-6,
                        warmup_steps=10, align_weight=1.0, image_size=64, train_vision=False,
                        num_beams=3, max_new_tokens=20, min_new_tokens=1, caption_prompt="a photo of",
                        eval_tasks="caption"),
        "eval": dict(image_size=64, train_vision=False, num_beams=3, max_new_tokens=20, min_new_tokens=1,
                     caption_prompt="", eval_tasks="caption,vqa"),
    },
}
# The toy world mirrors the paper preset: a BLIP-2-format vision tower (Blip2VisionModel, so --hf_export works;
# --vision_path data/toy/models/clip runs the CLIP-tower path) and the T5 as LLM, pretrained like a tiny Flan-T5
# (it answers questions about a caption and paraphrases).  The toy OPT, pretrained on single captions, cannot be
# steered by a soft prefix at all (even a prompt optimised for one caption leaves its loss at the unconditional
# level), so --llm_path data/toy/models/opt runs every OPT code path but learns nothing from images through the LLM.
TOY_FILES = dict(vision_path="models/blip2_vision", bert_path="models/bert", llm_path="models/t5",
                 train_file="pairs_train.jsonl", val_file="pairs_val.jsonl", vqa_file="vqa_val.jsonl",
                 text_file="corpus.txt", image_root=".")


def resolve_config(cfg):
    """Fill the stage recipe's values for fields left at None and the toy world's paths for empty ones."""
    if cfg.stage not in ("0", "1", "2", "caption", "eval"):
        raise SystemExit(f"--stage must be 0, 1, 2, caption or eval, got {cfg.stage!r}")
    recipe = STAGE_RECIPES.get(cfg.preset, STAGE_RECIPES["toy"])[cfg.stage]
    for k, v in recipe.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    for f in dataclasses.fields(cfg):  # anything still None: harmless fallbacks for stages that do not use it
        if getattr(cfg, f.name) is None:
            setattr(cfg, f.name, {"train_vision": False, "caption_prompt": "", "align_weight": 1.0, "eval_tasks": "",
                                  "image_size": 224, "num_beams": 3, "max_new_tokens": 20,
                                  "min_new_tokens": 1}.get(f.name, 0))
    if cfg.preset == "toy":
        for k, rel in TOY_FILES.items():
            if not getattr(cfg, k):
                setattr(cfg, k, os.path.join(cfg.toy_root, rel))
    return cfg


# ====================================================================================================
# Model
# ====================================================================================================


class Attention(nn.Module):
    """BERT attention block: multi-head attention over `kv`, then dense + dropout + residual + LayerNorm."""

    def __init__(self, dim, heads, kv_dim, dropout, eps):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.dense, self.norm, self.drop = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps), nn.Dropout(dropout)

    def forward(self, x, kv, mask=None):
        B, Lq, C = x.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)  # (B, H, L, D)
        q, k, v = split(self.query(x)), split(self.key(kv)), split(self.value(kv))
        o = attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)  # (B, H, Lq, D)
        o = o.transpose(1, 2).reshape(B, Lq, C)
        return self.norm(x + self.drop(self.dense(o)))


class FFN(nn.Module):
    def __init__(self, dim, hidden, dropout, eps):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm, self.drop = nn.LayerNorm(dim, eps=eps), nn.Dropout(dropout)

    def forward(self, x):
        return self.norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))  # BERT's exact (erf) GELU


class QFormerLayer(nn.Module):
    """Shared self-attention over [queries; text]; cross-attention (queries only) on every `freq`-th layer;
    queries and text tokens go through separate FFNs (spec 1.2)."""

    def __init__(self, dim, heads, ffn, vision_width, dropout, eps, cross, text):
        super().__init__()
        self.self_attn = Attention(dim, heads, dim, dropout, eps)
        self.cross_attn = Attention(dim, heads, vision_width, dropout, eps) if cross else None
        self.ffn_query = FFN(dim, ffn, dropout, eps)
        self.ffn_text = FFN(dim, ffn, dropout, eps) if text else None

    def forward(self, x, mask, n_query, image):
        x = self.self_attn(x, x, mask)
        q, t = x[:, :n_query], x[:, n_query:]
        if n_query and self.cross_attn is not None:
            q = self.cross_attn(q, image)  # only the queries see the image
        parts = [self.ffn_query(q)] if n_query else []
        if t.shape[1]:
            parts.append(self.ffn_text(t))
        return torch.cat(parts, 1)


def qformer_mask(n_query, text_mask, causal):
    """Bool mask (B, 1, Nq+L, Nq+L), True = may attend (spec 1.3).

    ITM (causal=False): every row sees all queries and all non-pad text.  ITG (causal=True): query rows see only
    queries; text row i sees all queries and text tokens <= i (multimodal causal mask)."""
    B, L = text_mask.shape
    keys = torch.cat([text_mask.new_ones(B, n_query), text_mask], 1).bool()  # (B, Nq+L)
    mask = keys[:, None, None, :].expand(B, 1, n_query + L, n_query + L)
    if causal:
        block = torch.ones(n_query + L, n_query + L, dtype=torch.bool, device=text_mask.device)
        block[:n_query, n_query:] = False
        block[n_query:, n_query:] = torch.ones(L, L, dtype=torch.bool, device=text_mask.device).tril()
        mask = mask & block
    return mask


class QFormer(nn.Module):
    """Learned queries + BERT layers.  `text=False` builds only the query path (stage 2 and later, and the
    released generation checkpoints), without word embeddings, text FFNs and the ITC/ITM/ITG heads."""

    def __init__(self, dim, layers, heads, ffn, vision_width, num_query, vocab, max_pos, embed_dim=256,
                 cross_freq=2, dropout=0.1, eps=1e-12, text=True):
        super().__init__()
        self.num_query, self.text, self.cross_freq = num_query, text, cross_freq
        self.query_tokens = nn.Parameter(torch.randn(1, num_query, dim) * 0.02)
        self.embed_norm, self.embed_drop = nn.LayerNorm(dim, eps=eps), nn.Dropout(dropout)
        self.layers = nn.ModuleList(QFormerLayer(dim, heads, ffn, vision_width, dropout, eps,
                                                 cross=i % cross_freq == 0, text=text) for i in range(layers))
        if text:
            self.word_embeddings = nn.Embedding(vocab, dim)
            self.position_embeddings = nn.Embedding(max_pos, dim)
            self.vision_proj, self.text_proj = nn.Linear(dim, embed_dim), nn.Linear(dim, embed_dim)
            self.itm_head = nn.Linear(dim, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
            # ITG head = BERT's MLM head: transform (dense, GELU, LayerNorm) + decoder tied to the word embeddings
            self.lm_dense, self.lm_norm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)
            self.lm_bias = nn.Parameter(torch.zeros(vocab))

    def _run(self, x, mask, n_query, image):
        x = self.embed_drop(self.embed_norm(x))
        for layer in self.layers:
            x = layer(x, mask, n_query, image)
        return x

    def _text_embed(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.word_embeddings(ids) + self.position_embeddings(pos)[None]  # (B, L, C)

    def query(self, image):
        """Query-only pass (ITC image side, stage 2): (B, N, W) image tokens -> (B, Nq, C)."""
        return self._run(self.query_tokens.expand(image.shape[0], -1, -1), None, self.num_query, image)

    def encode_text(self, ids, mask):
        """Text-only pass (ITC text side): (B, L) -> (B, L, C); no cross-attention, text FFNs."""
        return self._run(self._text_embed(ids), mask[:, None, None, :].bool(), 0, None)

    def joint(self, image, ids, mask, causal=False):
        """[queries; text] with the ITM (bi-directional) or ITG (multimodal causal) mask -> (B, Nq+L, C)."""
        x = torch.cat([self.query_tokens.expand(ids.shape[0], -1, -1), self._text_embed(ids)], 1)
        return self._run(x, qformer_mask(self.num_query, mask, causal), self.num_query, image)

    def lm_logits(self, h):
        h = self.lm_norm(F.gelu(self.lm_dense(h)))
        return h @ self.word_embeddings.weight.t() + self.lm_bias  # (B, L, V)


# (ours, BERT) name pairs inside one layer; the HF BLIP-2 names follow from the BERT ones (see hf_qformer_names).
_LAYER_NAMES = [("self_attn.query", "attention.self.query"), ("self_attn.key", "attention.self.key"),
                ("self_attn.value", "attention.self.value"), ("self_attn.dense", "attention.output.dense"),
                ("self_attn.norm", "attention.output.LayerNorm"),
                ("cross_attn.query", "crossattention.self.query"), ("cross_attn.key", "crossattention.self.key"),
                ("cross_attn.value", "crossattention.self.value"),
                ("cross_attn.dense", "crossattention.output.dense"),
                ("cross_attn.norm", "crossattention.output.LayerNorm"),
                ("ffn_query.fc1", "intermediate_query.dense"), ("ffn_query.fc2", "output_query.dense"),
                ("ffn_query.norm", "output_query.LayerNorm"),
                ("ffn_text.fc1", "intermediate.dense"), ("ffn_text.fc2", "output.dense"),
                ("ffn_text.norm", "output.LayerNorm")]


def qformer_from_bert(bert_path, vision_width, cfg, vocab_size, text=True):
    """Q-Former initialised from a BERT checkpoint (spec 1.2): embeddings, self-attention, both FFNs (the query
    FFN is a copy of BERT's), MLM head; cross-attention and queries random."""
    from transformers import BertForMaskedLM
    bert = BertForMaskedLM.from_pretrained(bert_path)
    bc = bert.config
    qf = QFormer(bc.hidden_size, bc.num_hidden_layers, bc.num_attention_heads, bc.intermediate_size, vision_width,
                 cfg.num_query, vocab_size, bc.max_position_embeddings, cfg.embed_dim, cfg.cross_attention_freq,
                 cfg.qformer_dropout, bc.layer_norm_eps, text)
    sd = bert.state_dict()
    new = {"embed_norm.weight": sd["bert.embeddings.LayerNorm.weight"],
           "embed_norm.bias": sd["bert.embeddings.LayerNorm.bias"]}
    for i in range(bc.num_hidden_layers):
        for ours, theirs in _LAYER_NAMES:
            if ours.startswith("cross_attn"):
                continue
            src = theirs.replace("_query", "")  # the query FFN starts as a copy of BERT's FFN
            if ours.startswith("ffn_text") and not text:
                continue
            for p in ("weight", "bias"):
                new[f"layers.{i}.{ours}.{p}"] = sd[f"bert.encoder.layer.{i}.{src}.{p}"]
    if text:
        V = sd["bert.embeddings.word_embeddings.weight"].shape[0]
        words = qf.word_embeddings.weight.detach().clone()
        words[:V] = sd["bert.embeddings.word_embeddings.weight"]  # extra rows ([DEC]) keep their N(0, 0.02) init
        bias = torch.zeros(vocab_size)
        bias[:V] = sd["cls.predictions.bias"]
        new.update({"word_embeddings.weight": words, "lm_bias": bias,
                    "position_embeddings.weight": sd["bert.embeddings.position_embeddings.weight"],
                    "lm_dense.weight": sd["cls.predictions.transform.dense.weight"],
                    "lm_dense.bias": sd["cls.predictions.transform.dense.bias"],
                    "lm_norm.weight": sd["cls.predictions.transform.LayerNorm.weight"],
                    "lm_norm.bias": sd["cls.predictions.transform.LayerNorm.bias"]})
    missing, unexpected = qf.load_state_dict(new, strict=False)
    assert not unexpected, unexpected
    return qf


def qformer_like_hf(qc, bert_path, cfg, vocab_size, text):
    """A Q-Former shaped like an imported BLIP-2's (its weights are loaded next).  Generation checkpoints carry no
    text parts: when those are needed (stage 1, retrieval) they come from BERT if the shapes agree."""
    from transformers import BertConfig
    bc = BertConfig.from_pretrained(bert_path)
    same = (bc.hidden_size, bc.num_hidden_layers, bc.intermediate_size) == (qc.hidden_size, qc.num_hidden_layers,
                                                                             qc.intermediate_size)
    cfg.cross_attention_freq = qc.cross_attention_frequency
    if text and same:
        return qformer_from_bert(bert_path, qc.encoder_hidden_size, cfg, vocab_size, text)
    return QFormer(qc.hidden_size, qc.num_hidden_layers, qc.num_attention_heads, qc.intermediate_size,
                   qc.encoder_hidden_size, cfg.num_query, vocab_size, qc.max_position_embeddings, cfg.embed_dim,
                   qc.cross_attention_frequency, cfg.qformer_dropout, qc.layer_norm_eps, text)


class PFormer(nn.Module):
    """Prompt-Transformer (spec 1.5): BERT [CLS] -> Linear(C, Nq*C) -> (Nq, C) -> Linear+tanh -> Linear(C, d_llm)
    gives the reference prompt P*(T) (B, Nq, d_llm), the same shape as the Q-Former's soft prompts."""

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
        """-> P* (B, Nq, d_llm), normalised contrastive feature z (B, E), temperature (returned, not read from
        the module, so that DDP sees every parameter of the loss go through forward)."""
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]  # (B, C) [CLS]
        p = self.cls_proj(h).view(h.shape[0], self.num_query, -1)  # (B, Nq, C); num_query, not the text length
        return self.llm_proj(torch.tanh(self.pooler(p))), F.normalize(self.text_proj(h), dim=-1), self.temp


def build_pformer(bert_path, num_query, d_llm, embed_dim, from_config=False):
    from transformers import BertConfig, BertForMaskedLM, BertModel
    if from_config:  # weights come from a stage-0 checkpoint next
        bert = BertModel(BertConfig.from_pretrained(bert_path), add_pooling_layer=False)
    else:  # the encoder of the MLM checkpoint (a fresh copy, not the Q-Former's); no pooler
        bert = BertForMaskedLM.from_pretrained(bert_path).bert
    return PFormer(bert, num_query, d_llm, embed_dim)


class VisionTower(nn.Module):
    """Frozen image encoder -> (B, N, W) penultimate-layer tokens, without a final norm (ln_vision is ours).

    A CLIP tower drops its last block; a BLIP-2 tower (EVA ViT-g) already has 39 of EVA's 40 blocks, and its
    `post_layernorm` is BLIP-2's trainable `ln_vision`, which lives in the trainable module."""

    def __init__(self, hf_vision, kind):
        super().__init__()
        self.model, self.kind = hf_vision, kind
        self.image_size = hf_vision.config.image_size
        if kind == "clip":
            self.model.encoder.layers = self.model.encoder.layers[:-1]
        self.model.post_layernorm = nn.Identity()  # unused (CLIP) / moved to ln_vision (BLIP-2)
        self.width = hf_vision.config.hidden_size

    def forward(self, pixels):
        interp = pixels.shape[-1] != self.image_size  # e.g. 364 px caption fine-tuning of a 224 px tower
        x = self.model.embeddings(pixels.to(self.model.embeddings.patch_embedding.weight.dtype),
                                  interpolate_pos_encoding=interp)
        if self.kind == "clip":
            x = self.model.pre_layrnorm(x)
        return self.model.encoder(inputs_embeds=x).last_hidden_state


def local_folder(name):
    """A local folder as is; a hub id is fetched into the HF cache (paper preset)."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download
    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])


def read_hf_weights(folder, prefix):
    """{key without prefix: tensor} for the keys of an HF folder that start with `prefix`; safetensors or .bin,
    single file or sharded (only the shards that hold such keys are opened)."""
    from safetensors import safe_open
    files = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(folder, index)):
            wm = json.load(open(os.path.join(folder, index)))["weight_map"]
            files = sorted({f for k, f in wm.items() if k.startswith(prefix)})
            break
    else:
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(folder, f))][:1]
    out = {}
    for f in files:
        path = os.path.join(folder, f)
        if f.endswith(".safetensors"):
            with safe_open(path, "pt") as sf:
                for k in sf.keys():
                    if k.startswith(prefix):
                        out[k[len(prefix):]] = sf.get_tensor(k)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            out.update({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    if not out:
        raise FileNotFoundError(f"{folder}: no weights with prefix {prefix!r}")
    return out


def load_vision(path):
    """CLIP vision tower, or a BLIP-2 vision tower (+ its post_layernorm, i.e. ln_vision), from a BLIP-2 folder or
    a Blip2VisionModel folder."""
    from transformers import AutoConfig, Blip2VisionModel, CLIPModel, CLIPVisionModel
    path = local_folder(path)
    conf = AutoConfig.from_pretrained(path)
    if conf.model_type == "clip":
        return VisionTower(CLIPModel.from_pretrained(path).vision_model, "clip"), None
    if conf.model_type == "clip_vision_model":
        return VisionTower(CLIPVisionModel.from_pretrained(path), "clip"), None
    if conf.model_type == "blip_2_vision_model":  # a BLIP-2 vision tower saved on its own (the toy world's)
        vm = Blip2VisionModel.from_pretrained(path)
        ln = {k: v.detach().clone() for k, v in vm.post_layernorm.state_dict().items()}
        return VisionTower(vm, "blip2"), ln
    if conf.model_type == "blip-2":
        with torch.device("meta"):  # 1B params: build empty, then take the stored tensors
            vm = Blip2VisionModel(conf.vision_config)
        sd = read_hf_weights(path, "vision_model.")
        for k in [k for k in sd if k.endswith("self_attn.q_bias")]:  # older files: separate q/v biases
            q, v = sd.pop(k), sd.pop(k.replace("q_bias", "v_bias"))
            sd[k.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.zeros_like(q), v])
        vm.load_state_dict(sd, assign=True)
        ln = {"weight": sd["post_layernorm.weight"], "bias": sd["post_layernorm.bias"]}
        return VisionTower(vm, "blip2"), ln
    raise ValueError(f"{path}: vision tower must be CLIP or BLIP-2, got model_type {conf.model_type!r}")


def llm_embed_dim(conf):
    """Width of the LLM's input embeddings (OPT-350m projects words to 512 < hidden 1024)."""
    return getattr(conf, "word_embed_proj_dim", None) or getattr(conf, "d_model", None) or conf.hidden_size


def load_llm(path, dtype, t5_act=""):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    path = local_folder(path)
    conf = AutoConfig.from_pretrained(path)
    if conf.is_encoder_decoder and t5_act:
        conf.dense_act_fn = t5_act
    cls = AutoModelForSeq2SeqLM if conf.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(path, config=conf, dtype=dtype), AutoTokenizer.from_pretrained(path)


class Blip2Trainable(nn.Module):
    """What DDP wraps in stages 1, 2 and caption: ln_vision + Q-Former + llm_proj (+ the ViT when fine-tuned).

    Every loss is computed inside `forward` (dispatching on `stage`) so DDP sees one forward per backward; frozen
    parts (ViT, LLM, P-Former) are passed in through `frozen` and never become DDP parameters."""

    def __init__(self, qformer, vision_width, d_llm=0, vision=None):
        super().__init__()
        self.ln_vision = nn.LayerNorm(vision_width, eps=1e-6)  # starts as identity (spec 1.1)
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
            return stage1_losses(self, batch, frozen) if stage == "1" else stage2_losses(self, batch, frozen)


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


# ---- transformers' Blip2ForConditionalGeneration: import released weights, export ours ----


def hf_qformer_names(n_layers, text):
    """(our Blip2Trainable key, HF Blip2 key) pairs for ln_vision, queries, the Q-Former and the projections."""
    pairs = [("ln_vision.weight", "vision_model.post_layernorm.weight"),
             ("ln_vision.bias", "vision_model.post_layernorm.bias"),
             ("qformer.query_tokens", "query_tokens"),
             ("qformer.embed_norm.weight", "qformer.layernorm.weight"),
             ("qformer.embed_norm.bias", "qformer.layernorm.bias"),
             ("llm_proj.weight", "language_projection.weight"), ("llm_proj.bias", "language_projection.bias")]
    for i in range(n_layers):
        for ours, bert in _LAYER_NAMES:
            if ours.startswith("ffn_text") and not text:
                continue
            hf = bert.replace(".self.", ".attention.")  # BERT attention.self.query -> HF attention.attention.query
            for p in ("weight", "bias"):
                pairs.append((f"qformer.layers.{i}.{ours}.{p}", f"qformer.encoder.layer.{i}.{hf}.{p}"))
    if text:  # present only in ITM / retrieval checkpoints (Blip2ForImageTextRetrieval)
        pairs += [("qformer.word_embeddings.weight", "embeddings.word_embeddings.weight"),
                  ("qformer.position_embeddings.weight", "embeddings.position_embeddings.weight")]
        pairs += [(f"qformer.{a}.{p}", f"{b}.{p}") for a, b in [("vision_proj", "vision_projection"),
                  ("text_proj", "text_projection"), ("itm_head", "itm_head")] for p in ("weight", "bias")]
    return pairs


def import_hf(folder, model):
    """Load a released BLIP-2 (transformers format) into our modules: Q-Former + queries + ln_vision +
    language_projection; the vision tower and LLM are built by `load_vision` / `load_hf_llm` from the same folder.
    Keys the file lacks (cross-attention layers that do not exist, text parts of generation checkpoints) keep
    their current (BERT) init; returns the list of our keys that were loaded."""
    sd = read_hf_weights(folder, "")
    ours = model.state_dict()
    new, loaded = {}, []
    for a, b in hf_qformer_names(len(model.qformer.layers), model.qformer.text):
        if a in ours and b in sd:
            if ours[a].shape != sd[b].shape:
                if a == "qformer.word_embeddings.weight":  # ITM checkpoints: 30523 rows incl. [DEC]
                    t = ours[a].clone()
                    n = min(t.shape[0], sd[b].shape[0])
                    t[:n] = sd[b][:n]
                    new[a] = t
                    loaded.append(a)
                    continue
                raise ValueError(f"{folder}: {b} has shape {tuple(sd[b].shape)}, ours {a} {tuple(ours[a].shape)}")
            new[a] = sd[b]
            loaded.append(a)
    model.load_state_dict(new, strict=False)
    return loaded


def load_hf_llm(folder, dtype):
    """The language model stored under `language_model.` in a BLIP-2 folder (+ its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, Blip2Config
    conf = Blip2Config.from_pretrained(folder)
    tc = conf.text_config
    cls = AutoModelForSeq2SeqLM if tc.is_encoder_decoder else AutoModelForCausalLM
    llm = cls.from_config(tc)
    sd = read_hf_weights(folder, "language_model.")
    missing, unexpected = llm.load_state_dict(sd, strict=False)
    llm.tie_weights()
    tied = {"lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: LLM weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return llm.to(dtype), AutoTokenizer.from_pretrained(folder), conf


def export_hf(out, model, vision, llm, llm_tok, num_query, image_size, image_token_index=None):
    """Write a Blip2ForConditionalGeneration folder + its Blip2Processor, which transformers loads with
    from_pretrained and captions with generate().  Needs a BLIP-2 (EVA-style) vision tower: CLIP's pre-LayerNorm
    has no place in Blip2VisionModel (the toy world has one: data/toy/models/blip2_vision)."""
    import copy
    from transformers import (AddedToken, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              Blip2QFormerConfig, BlipImageProcessor)
    if vision.kind != "blip2":
        raise ValueError("--hf_export needs a BLIP-2 vision tower (Blip2VisionModel); this model uses CLIP "
                         "(toy world: --vision_path data/toy/models/blip2_vision)")
    qf = model.qformer
    C = qf.query_tokens.shape[-1]
    l0 = qf.layers[0]
    tok = copy.deepcopy(llm_tok)  # transformers' processor expands an "<image>" token into the query slots
    if "<image>" not in tok.get_vocab():
        tok.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    if image_token_index is None:  # the first spare embedding row (OPT-2.7B: 50265, as on the hub)
        image_token_index = tok.convert_tokens_to_ids("<image>")
    if image_token_index >= llm.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"no spare LLM embedding row for the image token (vocab {len(llm_tok)}); "
                         "pass an image_token_index")
    qconf = Blip2QFormerConfig(hidden_size=C, num_hidden_layers=len(qf.layers), num_attention_heads=l0.self_attn.heads,
                               intermediate_size=l0.ffn_query.fc1.out_features,
                               layer_norm_eps=qf.embed_norm.eps, cross_attention_frequency=qf.cross_freq,
                               encoder_hidden_size=vision.width)
    text_conf = llm.config.to_dict()
    if llm.config.is_encoder_decoder and getattr(llm.config, "bos_token_id", None) is None:
        # transformers' Blip2 generate() without text starts the LLM input with bos_token_id, which T5 configs
        # lack; T5 never reads it otherwise.  "</s>" makes that input [P; </s>], what "" tokenises to here.
        text_conf["bos_token_id"] = llm.config.eos_token_id
    conf = Blip2Config(vision_config=vision.model.config.to_dict(), qformer_config=qconf.to_dict(),
                       text_config=text_conf, num_query_tokens=num_query, image_token_index=image_token_index)
    hf = Blip2ForConditionalGeneration(conf)
    sd = {}
    ours = model.state_dict()
    for a, b in hf_qformer_names(len(qf.layers), False):
        if a in ours:
            sd[b] = ours[a]
    sd.update({f"vision_model.{k}": v for k, v in vision.model.state_dict().items()})
    sd.update({f"language_model.{k}": v for k, v in llm.state_dict().items()})
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k and "embed_tokens" not in k]:
        raise ValueError(f"export mismatch: missing {missing[:5]} unexpected {unexpected[:5]}")
    hf.save_pretrained(out)
    # The image transform every stage here uses: bicubic resize to the square size, CLIP's mean/std (as BLIP-2's).
    ip = BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN),
                            image_std=list(CLIP_STD), resample=3)
    Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=num_query).save_pretrained(out)
    return out


# ====================================================================================================
# Losses
# ====================================================================================================


def itc_loss(img_feat, txt_feat, temp, rank):
    """ITC with max over queries (spec 3).  img_feat (B, Nq, E), txt_feat (B, E), both L2-normalised, local.
    Features are gathered WITH gradient, so N processes compute exactly what one process with the global batch
    would.  Returns the loss and the (B, G) similarity logits i2t, t2i of the local rows against the global batch."""
    img_all = D.all_gather_with_grad(img_feat)  # (G, Nq, E)
    txt_all = D.all_gather_with_grad(txt_feat)  # (G, E)
    sim_i2t = torch.einsum("bqe,ge->bqg", img_feat, txt_all).amax(1) / temp  # (B, G)
    sim_t2i = torch.einsum("be,gqe->bgq", txt_feat, img_all).amax(-1) / temp  # (B, G)
    target = rank * img_feat.shape[0] + torch.arange(img_feat.shape[0], device=img_feat.device)
    loss = (F.cross_entropy(sim_i2t, target, label_smoothing=0.1) +
            F.cross_entropy(sim_t2i, target, label_smoothing=0.1)) / 2
    return loss, sim_i2t, sim_t2i


def positive_mask(img_ids, txt_ids, img_ids_all, txt_ids_all):
    """(B, G) True where pair (local i, global j) must not serve as a negative: same image, or identical
    caption tokens (duplicate captions in a batch describe both images)."""
    same_img = img_ids[:, None] == img_ids_all[None, :]
    same_txt = (txt_ids[:, None, :] == txt_ids_all[None, :, :]).all(-1)
    return same_img | same_txt


def sample_hard_negatives(sim, positive, gumbel):
    """One negative column per row, drawn from softmax(sim) restricted to non-positives (BLIP-2's ITM sampling).

    Vectorised with the Gumbel-max trick: argmax(sim + Gumbel noise) ~ Categorical(softmax(sim)).  Positives get
    -inf, so they are never drawn, and there is no multinomial to crash on inf/NaN weights (LAVIS #107).  A row
    with no non-positive column at all (a batch of one image) falls back to the next index."""
    logits = sim.float().masked_fill(positive, float("-inf")) + gumbel  # (B, G)
    idx = logits.argmax(1)
    none_valid = positive.all(1)
    fallback = (torch.arange(sim.shape[0], device=sim.device) + 1) % sim.shape[1]
    return torch.where(none_valid, fallback, idx)


def gumbel_noise(seed, rows, cols, rank, device):
    """Gumbel noise for the global (G, G) matrix from a step-seeded generator, sliced to this rank's rows, so the
    sampled negatives do not depend on how the batch is split over processes."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows * (rank + 1), cols, generator=g)[rows * rank:].clamp_(1e-9, 1 - 1e-9)
    return (-torch.log(-torch.log(u))).to(device)


def token_ce(logits, labels, label_smoothing=0.0):
    """Cross-entropy averaged over the non-ignored tokens of the GLOBAL batch.  Each rank divides its token sum by
    the mean token count per rank, so DDP's average over ranks equals one process's mean over all tokens (a plain
    per-rank mean would weight ranks with short captions more).  logits (..., V), labels (...) with -100 = ignore."""
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=-100,
                            label_smoothing=label_smoothing, reduction="sum")
    count = D.all_reduce_mean((labels != -100).sum().float())
    return total / count.clamp(min=1)


def itm_loss(qf, image, image_neg, ids, mask, ids_neg, mask_neg):
    """3B pairs (T_i, I_i)=1, (T_i, I_neg)=0, (T_neg, I_i)=0; bi-directional [Q;T] pass; logits = itm_head
    averaged over the Nq query outputs."""
    B, Nq = ids.shape[0], qf.num_query
    images = torch.cat([image, image_neg, image], 0)  # (3B, N, W)
    h = qf.joint(images, torch.cat([ids, ids, ids_neg]), torch.cat([mask, mask, mask_neg]))  # (3B, Nq+L, C)
    logits = qf.itm_head(h[:, :Nq]).mean(1)  # (3B, 2)
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)
    return F.cross_entropy(logits, labels)


def itg_loss(qf, image, ids, mask, dec_id, pad_id):
    """Image-grounded generation: [DEC] replaces [CLS]; causal text rows see all queries; next-token CE with
    label smoothing 0.1 (spec 3)."""
    dec = ids.clone()
    dec[:, 0] = dec_id
    h = qf.joint(image, dec, mask, causal=True)[:, qf.num_query:]  # (B, L, C)
    logits = qf.lm_logits(h)[:, :-1]  # (B, L-1, V): position t predicts token t+1
    labels = dec[:, 1:].masked_fill(dec[:, 1:] == pad_id, -100)
    return token_ce(logits, labels, label_smoothing=0.1)


def align_loss(prompts, target):
    """P-Former alignment: MSE(llm_proj(Z), stopgrad(P*)), mean over B*Nq*d_llm (spec 3, 4)."""
    return F.mse_loss(prompts.float(), target.detach().float())


def llm_embed(llm, ids):
    return llm.get_input_embeddings()(ids)


def llm_lm_loss(llm, prompts, t):
    """Frozen LLM conditioned on soft prompts (B, Nq, D) (spec 1.4).  Decoder-only: inputs [P; E(text)], labels
    -100 on P, pads and text-prompt tokens.  Encoder-decoder: encoder [P; E(prefix)], decoder predicts the suffix.
    CE in fp32 over the LLM's logits; gradients flow through the frozen LLM into the prompts."""
    prompts = prompts.to(llm.get_input_embeddings().weight.dtype)
    ones = t["enc_mask"].new_ones(prompts.shape[:2])
    x = torch.cat([prompts, llm_embed(llm, t["enc_ids"])], 1)  # (B, Nq+L, D)
    att = torch.cat([ones, t["enc_mask"]], 1)
    if llm.config.is_encoder_decoder:
        logits = llm(inputs_embeds=x, attention_mask=att, labels=t["labels"],
                     decoder_attention_mask=t["dec_mask"]).logits  # (B, Ld, V)
        labels = t["labels"]
    else:
        logits = llm(inputs_embeds=x, attention_mask=att).logits[:, prompts.shape[1] - 1:-1]  # (B, L, V)
        labels = t["labels"]  # token j of the text is predicted at position Nq-1+j
    return token_ce(logits, labels)


def mask_tokens(ids, mask_id, keep, p, generator=None):
    """Stage-0 noising: each token -> [MASK] with prob p, never [PAD] or [CLS] ([SEP] may be masked)."""
    hit = torch.rand(ids.shape, generator=generator, device=ids.device) < p
    for k in keep:
        hit &= ids != k
    return ids.masked_fill(hit, mask_id)


def instance_contrastive_loss(z, temp, rank):
    """Stage-0 L_c as released: z (B, E) normalised against the detached, all-gathered (no grad) batch of itself,
    target = own global index, label smoothing 0.1 -- an instance-discrimination / uniformity regulariser."""
    keys = D.all_gather_no_grad(z.detach())  # (G, E)
    logits = z @ keys.t() / temp  # (B, G)
    target = rank * z.shape[0] + torch.arange(z.shape[0], device=z.device)
    return F.cross_entropy(logits, target, label_smoothing=0.1)


def vq_loss(prompts, embeddings, chunk=4096):
    """Stage-0 L_vq: MSE between each prompt vector and its nearest LLM input embedding (stop-grad), pulling
    prompts towards the word-embedding manifold.  Nearest by ||e||^2 - 2 p.e in chunks (V can be 50k)."""
    p = prompts.reshape(-1, prompts.shape[-1]).float()  # (B*Nq, D)
    e = embeddings.float()  # (V, D)
    with torch.no_grad():
        e2 = (e * e).sum(1)
        idx = torch.cat([(e2[None] - 2 * p[i:i + chunk] @ e.t()).argmin(1) for i in range(0, len(p), chunk)])
    return F.mse_loss(p, e[idx])


def stage0_losses(pformer, t, llm, rank, mask_prob, mask_id, keep_ids):
    """L = L_lm + L_c (+ L_vq for decoder-only LLMs) (spec 2)."""
    ids = t["bert_ids"]
    if not llm.config.is_encoder_decoder:  # T5 variant: no masking, prefix/suffix split instead
        ids = mask_tokens(ids, mask_id, keep_ids, mask_prob)
    prompts, z, temp = pformer(ids, t["bert_mask"])
    losses = {"lm": llm_lm_loss(llm, prompts, t), "contrast": instance_contrastive_loss(z, temp, rank)}
    if not llm.config.is_encoder_decoder:
        losses["vq"] = vq_loss(prompts, llm.get_input_embeddings().weight)
    return losses


def stage1_losses(m, b, frozen):
    """ITC + ITM + ITG (+ w1 * alignment with the frozen P-Former) (spec 3)."""
    qf = m.qformer
    image = m.encode_image(b["pixels"], frozen)  # (B, N, W)
    q = qf.query(image)  # (B, Nq, C)
    img_feat = F.normalize(qf.vision_proj(q), dim=-1)  # (B, Nq, E)
    txt_feat = F.normalize(qf.text_proj(qf.encode_text(b["ids"], b["mask"])[:, 0]), dim=-1)  # (B, E) [CLS]
    losses = {}
    losses["itc"], sim_i2t, sim_t2i = itc_loss(img_feat, txt_feat, qf.temp, frozen.rank)
    # ITM hard negatives from the all-gathered batch: images with gradient, token ids without
    image_all = D.all_gather_with_grad(image)
    ids_all, mask_all = D.all_gather_no_grad(b["ids"]), D.all_gather_no_grad(b["mask"])
    pos = positive_mask(b["image_ids"], b["ids"], D.all_gather_no_grad(b["image_ids"]), ids_all)
    B, G = sim_t2i.shape
    with torch.no_grad():
        neg_img = sample_hard_negatives(sim_t2i.detach(), pos, gumbel_noise(b["noise_seed"], B, G, frozen.rank,
                                                                            image.device))
        neg_txt = sample_hard_negatives(sim_i2t.detach(), pos, gumbel_noise(b["noise_seed"] + 1, B, G, frozen.rank,
                                                                            image.device))
    losses["itm"] = itm_loss(qf, image, image_all[neg_img], b["ids"], b["mask"], ids_all[neg_txt],
                             mask_all[neg_txt])
    losses["itg"] = itg_loss(qf, image, b["ids"], b["mask"], b["dec_id"], b["pad_id"])
    if frozen.pformer is not None:
        losses["align"] = frozen.align_weight * align_loss(m.llm_proj(q), b["pstar"])
    return losses


def stage2_losses(m, b, frozen):
    """Generative stage: LM loss of the frozen LLM prompted by llm_proj(Z) (+ w2 * alignment) (spec 4, 5.2)."""
    q, prompts = m.prompts(b["pixels"], frozen)
    losses = {"lm": llm_lm_loss(frozen.llm, prompts, b["llm"])}
    if frozen.pformer is not None:
        losses["align"] = frozen.align_weight * align_loss(prompts, b["pstar"])
    return losses


# ====================================================================================================
# Data
# ====================================================================================================

_CAPTION_PUNCT = re.compile(r"([.!\"()*#:;~])")


def clean_caption(s, max_words=50):
    """LAVIS `blip_caption`: lowercase, punctuation -> space, collapse whitespace, first 50 words."""
    s = re.sub(r"\s{2,}", " ", _CAPTION_PUNCT.sub(" ", s.lower())).strip()
    return " ".join(s.split(" ")[:max_words])


def clean_question(s, max_words=50):
    """LAVIS `blip_question`: lowercase, delete punctuation, right-strip, first 50 words."""
    return " ".join(_CAPTION_PUNCT.sub("", s.lower()).rstrip().split(" ")[:max_words])


class PairDataset(torch.utils.data.Dataset):
    """One item per (image, caption).  Indexed by (item, epoch): the augmentation RNG is seeded from both, so a
    sample looks the same whatever the worker, rank or resume point.  Unreadable images are counted and
    replaced by the next item, keeping every rank's batch the same size (all-gathers need equal shapes)."""

    def __init__(self, records, image_root, size, train, seed, blank=False):
        self.items = [(i, c) for i, r in enumerate(records) for c in r["captions"]]
        self.records, self.root, self.size, self.train, self.seed, self.blank = records, image_root, size, train, seed, blank

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        k, epoch = key
        for bad in range(10):
            img_idx, caption = self.items[(k + bad) % len(self.items)]
            pixels = load_pixels(self.root, self.records[img_idx]["image"], self.size, self.blank,
                                 random.Random(f"{self.seed}-{epoch}-{k}") if self.train else None)
            if pixels is not None:
                return {"pixels": pixels, "caption": caption, "image_id": img_idx, "bad": bad}
        raise RuntimeError(f"10 unreadable images in a row under {self.root}")


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, sentences):
        self.sentences = sentences

    def __len__(self):
        return len(self.sentences)

    def __getitem__(self, key):
        return {"caption": self.sentences[key[0]], "bad": 0}


def load_pixels(root, rel, size, blank=False, rng=None):
    """(3, S, S) tensor; `blank` gives the all-zero (= mean colour) image of the no-image baseline."""
    if blank:
        return torch.zeros(3, size, size)
    img = load_image(os.path.join(root, rel))
    if img is None:
        return None
    return ImageTransform(size, train=rng is not None, rng=rng)(img)


def collate(samples):
    out = {"caption": [s["caption"] for s in samples], "bad": sum(s["bad"] for s in samples)}
    if "pixels" in samples[0]:
        out["pixels"] = torch.stack([s["pixels"] for s in samples])
        out["image_id"] = torch.tensor([s["image_id"] for s in samples])
    return out


def epoch_micro_batches(n, epoch, start_step, steps_per_epoch, cfg, dist):
    """This rank's micro-batches of (index, epoch) keys for steps start_step.. of `epoch`: a seeded permutation,
    cut into global batches, each split evenly over ranks and then into micro-batches (drop_last)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
    per_rank = cfg.global_batch // dist.world_size
    out = []
    for s in range(start_step, steps_per_epoch):
        chunk = perm[s * cfg.global_batch:(s + 1) * cfg.global_batch][dist.rank * per_rank:(dist.rank + 1) * per_rank]
        out += [[(k, epoch) for k in chunk[i:i + cfg.micro_batch]] for i in range(0, per_rank, cfg.micro_batch)]
    return out


class Tokenizers:
    """Text -> tensors for the Q-Former/P-Former (BERT tokenizer + [DEC]) and the LLM (spec 1.4)."""

    def __init__(self, bert_tok, llm_tok, max_len, device, is_encdec=False):
        self.bert, self.llm, self.max_len, self.device, self.is_encdec = bert_tok, llm_tok, max_len, device, is_encdec
        if bert_tok is not None and "[DEC]" not in bert_tok.get_vocab():
            bert_tok.add_special_tokens({"bos_token": "[DEC]"})  # ITG start token (id 30522 for bert-base)
        if llm_tok is not None:
            if llm_tok.pad_token is None:
                llm_tok.pad_token = llm_tok.eos_token
            # OPT: LAVIS ends each caption with "\n" (id 50118) and stops generation there.  A word-level tokenizer
            # has no newline token, so the EOS token plays that role.
            nl = llm_tok("\n", add_special_tokens=False).input_ids
            self.newline = len(nl) == 1 and nl[0] != llm_tok.unk_token_id
            self.suffix = "\n" if self.newline else (llm_tok.eos_token or "")
            self.eos_id = nl[0] if self.newline else llm_tok.eos_token_id

    def bert_batch(self, texts):
        t = self.bert(texts, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt")
        return t.input_ids.to(self.device), t.attention_mask.to(self.device)

    def llm_batch(self, texts, prompt="", rng=None):
        """Decoder-only: prompt + text + suffix, prompt tokens masked from the loss.  Encoder-decoder: `rng` given
        -> random prefix/suffix split of each text (pre-training); else prompt -> encoder, text -> decoder."""
        tok = self.llm
        if tok is None:
            return None
        tok.padding_side = "right"
        if self.is_encdec:
            if rng is not None:
                enc, dec = zip(*(split_prefix(t, rng) for t in texts))
            else:
                enc, dec = [prompt] * len(texts), list(texts)
            e = tok(list(enc), padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
            d = tok(list(dec), padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
            labels = d.input_ids.masked_fill(d.attention_mask == 0, -100)
            return {k: v.to(self.device) for k, v in dict(enc_ids=e.input_ids, enc_mask=e.attention_mask,
                                                          dec_mask=d.attention_mask, labels=labels).items()}
        full = [(prompt + " " + t if prompt else t) + self.suffix for t in texts]
        e = tok(full, padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
        labels = e.input_ids.masked_fill(e.attention_mask == 0, -100)
        if prompt:  # LAVIS: prompt length incl. BOS counted once, masked in every row
            labels[:, :len(tok(prompt).input_ids)] = -100
        return {"enc_ids": e.input_ids.to(self.device), "enc_mask": e.attention_mask.to(self.device),
                "labels": labels.to(self.device)}


def split_prefix(text, rng):
    """T5 prefix-LM split at a random word m ~ U{1..max(1, n//2)}; a one-word text gets an empty prefix."""
    words = text.split()
    if len(words) < 2:
        return "", text
    m = rng.randint(1, max(1, len(words) // 2))
    return " ".join(words[:m]), " ".join(words[m:])


# ====================================================================================================
# Eval
# ====================================================================================================


def image_batches(paths, cfg, root, dist, desc):
    """Yield (indices, pixels) over this rank's shard of `paths`, loaded by DataLoader workers."""
    idx = D.shard_indices(len(paths), dist)
    ds = [(i, paths[i]) for i in idx]
    load = lambda item: (item[0], load_pixels(root, item[1], cfg.image_size, cfg.blank_images))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.eval_batch, num_workers=cfg.num_workers,
                                         collate_fn=lambda b: [load(x) for x in b])
    bad = 0
    for batch in progress(loader, dist.is_main, desc=desc):
        good = [(i, p) for i, p in batch if p is not None]
        bad += len(batch) - len(good)
        if good:
            yield [i for i, _ in good], torch.stack([p for _, p in good]).to(dist.device)
    if bad:
        print(f"[rank {dist.rank}] {desc}: skipped {bad} unreadable images")
        if bad > cfg.max_bad_frac * max(1, len(idx)):
            raise RuntimeError(f"{desc}: too many unreadable images under {root} ({bad} of {len(idx)})")


def gather_dict(d):
    out = {}
    for part in D.all_gather_object(d):
        out.update(part)
    return out


@torch.no_grad()
def evaluate_retrieval(model, frozen, toks, records, cfg, dist):
    """Image<->text retrieval by the Q-Former's ITC score (max over queries), R@1/5/10."""
    from common.metrics import retrieval_recall
    qf = model.qformer
    img_feats = {}
    for idx, px in image_batches([r["image"] for r in records], cfg, cfg.image_root, dist, "retrieval images"):
        with autocast(px.device, frozen.dtype):
            f = F.normalize(qf.vision_proj(qf.query(model.encode_image(px, frozen))), dim=-1).float()
        img_feats.update({i: f[k].cpu() for k, i in enumerate(idx)})
    texts, txt2img, img2txts = [], [], []
    for i, r in enumerate(records):
        img2txts.append(list(range(len(texts), len(texts) + len(r["captions"]))))
        texts += [clean_caption(c) for c in r["captions"]]
        txt2img += [i] * len(r["captions"])
    txt_feats = {}
    for s in D.shard_indices((len(texts) + cfg.eval_batch - 1) // cfg.eval_batch, dist):
        chunk = list(range(s * cfg.eval_batch, min(len(texts), (s + 1) * cfg.eval_batch)))
        ids, mask = toks.bert_batch([texts[i] for i in chunk])
        with autocast(ids.device, frozen.dtype):
            f = F.normalize(qf.text_proj(qf.encode_text(ids, mask)[:, 0]), dim=-1).float()
        txt_feats.update({i: f[k].cpu() for k, i in enumerate(chunk)})
    img_feats, txt_feats = gather_dict(img_feats), gather_dict(txt_feats)
    keep = sorted(img_feats)
    I = torch.stack([img_feats[i] for i in keep])  # (N_img, Nq, E)
    T = torch.stack([txt_feats[i] for i in range(len(texts))])  # (N_txt, E)
    sim = torch.einsum("iqe,te->iqt", I, T).amax(1)  # (N_img, N_txt)
    pos = {i: k for k, i in enumerate(keep)}
    return retrieval_recall(sim, [pos.get(i, -1) for i in txt2img], [img2txts[i] for i in keep])


@torch.no_grad()
def generate(model, frozen, toks, pixels, prompts, num_beams, max_new, min_new, length_penalty=1.0):
    """Beam search in the frozen LLM from [P; E(prompt)] via transformers' generate(inputs_embeds=...)."""
    llm, tok = frozen.llm, toks.llm
    _, soft = model.prompts(pixels, frozen)
    soft = soft.to(llm.get_input_embeddings().weight.dtype)
    tok.padding_side = "right" if llm.config.is_encoder_decoder else "left"  # decoder-only needs left padding
    t = tok(prompts, padding="longest", return_tensors="pt").to(pixels.device)
    x = torch.cat([soft, llm_embed(llm, t.input_ids)], 1)  # (B, Nq+L, D)
    att = torch.cat([t.attention_mask.new_ones(soft.shape[:2]), t.attention_mask], 1)
    with autocast(pixels.device, frozen.dtype):
        out = llm.generate(inputs_embeds=x, attention_mask=att, num_beams=num_beams, max_new_tokens=max_new,
                           min_new_tokens=min_new, length_penalty=length_penalty, eos_token_id=toks.eos_id,
                           pad_token_id=tok.pad_token_id, do_sample=False)
    return [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]


def evaluate_caption(model, frozen, toks, records, cfg, dist, out_path):
    """Beam-search captions -> BLEU/CIDEr-D/ROUGE-L against all references; predictions written as JSON."""
    from common.metrics import caption_metrics
    preds = {}
    for idx, px in image_batches([r["image"] for r in records], cfg, cfg.image_root, dist, "captioning"):
        caps = generate(model, frozen, toks, px, [cfg.caption_prompt] * len(idx), cfg.num_beams, cfg.max_new_tokens,
                        cfg.min_new_tokens)
        preds.update(dict(zip(idx, caps)))
    preds = gather_dict(preds)
    gts = {i: records[i]["captions"] for i in preds}
    res = {i: [c] for i, c in preds.items()}
    metrics = caption_metrics(gts, res) if preds else {}
    if dist.is_main:
        with open(out_path, "w") as f:
            json.dump([{"image": records[i]["image"], "caption": preds[i]} for i in sorted(preds)], f, indent=1)
    return metrics


def evaluate_vqa(model, frozen, toks, records, cfg, dist, out_path):
    """Zero-shot VQA: prompt.format(question) after the soft prompts, beam 5, max 10 new tokens, length penalty
    -1 (spec 5.3); VQA accuracy with the official normalisation."""
    from common.metrics import vqa_accuracy
    preds = {}
    for idx, px in image_batches([r["image"] for r in records], cfg, cfg.image_root, dist, "vqa"):
        prompts = [cfg.vqa_prompt.format(clean_question(records[i]["question"])) for i in idx]
        ans = generate(model, frozen, toks, px, prompts, cfg.vqa_num_beams, cfg.vqa_max_new_tokens, 1,
                       cfg.vqa_length_penalty)
        preds.update(dict(zip(idx, ans)))
    preds = gather_dict(preds)
    acc = [vqa_accuracy(preds[i], records[i]["answers"]) for i in sorted(preds)]
    if dist.is_main:
        with open(out_path, "w") as f:
            json.dump([{"question_id": records[i]["question_id"], "answer": preds[i]} for i in sorted(preds)], f,
                      indent=1)
    return {"vqa_acc": 100.0 * sum(acc) / max(1, len(acc))}


def run_evals(model, frozen, toks, cfg, dist, logger):
    tasks = [t for t in cfg.eval_tasks.split(",") if t]
    metrics = {}
    model.eval()
    if "retrieval" in tasks or "caption" in tasks:
        records = read_pairs(cfg.val_file)[:cfg.eval_max or None]
    if "retrieval" in tasks:
        metrics.update(evaluate_retrieval(model, frozen, toks, records, cfg, dist))
    if "caption" in tasks:
        metrics.update(evaluate_caption(model, frozen, toks, records, cfg, dist,
                                        os.path.join(cfg.out_dir, "captions.json")))
    if "vqa" in tasks:
        records = read_vqa(cfg.vqa_file)[:cfg.eval_max or None]
        metrics.update(evaluate_vqa(model, frozen, toks, records, cfg, dist, os.path.join(cfg.out_dir, "vqa.json")))
    if metrics:
        logger.info("eval | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


# ====================================================================================================
# Train
# ====================================================================================================


def lavis_lr(step, steps_per_epoch, cfg):
    """Linear warm-up from warmup_lr inside epoch 0, then a per-epoch cosine to min_lr (LAVIS, spec 5.4)."""
    epoch = step // steps_per_epoch
    if epoch == 0 and step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(1, cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / max(1, cfg.epochs)))


def build(cfg, dist):
    """Construct the trainable module and the frozen parts for cfg.stage; load --init / --hf_import weights."""
    from transformers import AutoConfig, AutoTokenizer
    dtype = pick_dtype(dist.device, cfg.precision)
    fdtype = frozen_dtype(dist.device, dtype)
    stage, meta = cfg.stage, {}
    tasks = [t for t in cfg.eval_tasks.split(",") if t]
    need_llm = stage in ("0", "2", "caption") or "caption" in tasks or "vqa" in tasks or bool(cfg.hf_export)
    bert_tok = AutoTokenizer.from_pretrained(local_folder(cfg.bert_path))
    llm = llm_tok = None
    if need_llm and cfg.hf_import:
        llm, llm_tok, hconf = load_hf_llm(local_folder(cfg.hf_import), fdtype)
        meta["image_token_index"] = hconf.image_token_index
    elif need_llm:
        llm, llm_tok = load_llm(cfg.llm_path, fdtype, cfg.t5_dense_act_fn)
    if llm is not None:
        llm.requires_grad_(False).eval().to(dist.device)
        d_llm = llm_embed_dim(llm.config)
    elif cfg.hf_import:
        from transformers import Blip2Config
        d_llm = llm_embed_dim(Blip2Config.from_pretrained(local_folder(cfg.hf_import)).text_config)
    else:
        d_llm = llm_embed_dim(AutoConfig.from_pretrained(local_folder(cfg.llm_path)))
    toks = Tokenizers(bert_tok, llm_tok, cfg.max_txt_len, dist.device, llm is not None and llm.config.is_encoder_decoder)
    frozen = Frozen(dtype=dtype, llm=llm, llm_tok=llm_tok, rank=dist.rank, align_weight=cfg.align_weight)

    pformer = None
    if stage == "0" or cfg.pformer_ckpt:
        pformer = build_pformer(local_folder(cfg.bert_path), cfg.num_query, d_llm, cfg.embed_dim,
                                from_config=stage != "0")
        if stage != "0":
            pformer.load_state_dict(load_checkpoint(cfg.pformer_ckpt)["model"])
            pformer.requires_grad_(False).train(cfg.pformer_train_mode).to(dist.device, fdtype)
            frozen.pformer = pformer
    if stage == "0":
        return pformer.to(dist.device), frozen, toks, meta

    vision, ln = load_vision(cfg.hf_import or cfg.vision_path)
    vision = vision.to(dist.device)
    text = stage == "1" or "retrieval" in tasks
    if cfg.hf_import:
        from transformers import Blip2Config
        hconf = Blip2Config.from_pretrained(local_folder(cfg.hf_import))
        cfg.num_query, cfg.embed_dim = hconf.num_query_tokens, hconf.image_text_hidden_size
        qf = qformer_like_hf(hconf.qformer_config, local_folder(cfg.bert_path), cfg, len(bert_tok), text)
    else:
        qf = qformer_from_bert(local_folder(cfg.bert_path), vision.width, cfg, len(bert_tok), text)
    use_proj = stage != "1" or pformer is not None or bool(cfg.hf_import)
    model = Blip2Trainable(qf, vision.width, d_llm if use_proj else 0, vision if cfg.train_vision else None)
    if stage == "1" and pformer is None and model.llm_proj is not None:
        model.llm_proj.requires_grad_(False)  # imported but unused by plain stage 1: keep it out of DDP/AdamW
    if ln is not None and not (stage == "1" and cfg.reset_ln_vision and not cfg.hf_import):
        model.ln_vision.load_state_dict(ln)
    if cfg.hf_import:
        loaded = import_hf(local_folder(cfg.hf_import), model)
        meta["hf_loaded"] = len(loaded)
    if cfg.init:
        ck = load_checkpoint(cfg.init)
        sd = ck["model"]
        vis = {k[len("vision."):]: v for k, v in sd.items() if k.startswith("vision.")}
        if vis and model.vision is None:  # a fine-tuned ViT from the caption stage, now frozen
            vision.load_state_dict(vis)
        missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("vision.") or
                                                     model.vision is not None}, strict=False)
        meta["init_missing"] = missing
        meta.update(ck.get("meta", {}))
    if model.vision is None:
        vision.requires_grad_(False).eval().to(fdtype)
        frozen.vision = vision
    else:
        frozen.vision = None
    frozen.vision_tower = vision
    return model.to(dist.device), frozen, toks, meta


def make_batch(raw, stage, cfg, toks, frozen, step, micro, device):
    """Tokenise a collated micro-batch for the stage's loss; adds P* targets from the frozen P-Former."""
    caps = [clean_caption(c) for c in raw["caption"]]
    b = {"pixels": raw["pixels"].to(device, non_blocking=True)} if "pixels" in raw else {}
    rng = random.Random(f"{cfg.seed}-{step}-{micro}")  # T5 prefix split: fixed by the step, not by the process
    if stage == "0":
        ids, mask = toks.bert_batch(caps)
        b.update(bert_ids=ids, bert_mask=mask, **toks.llm_batch(caps, rng=rng if toks.is_encdec else None))
        return b
    b["image_ids"] = raw["image_id"].to(device)
    prompt = cfg.caption_prompt if stage == "caption" else ""
    if stage == "1":
        b["ids"], b["mask"] = toks.bert_batch(caps)
        b.update(dec_id=toks.bert.bos_token_id, pad_id=toks.bert.pad_token_id,
                 noise_seed=cfg.seed * 1_000_003 + step * 101 + micro)
    else:
        b["llm"] = toks.llm_batch(caps, prompt=prompt, rng=rng if toks.is_encdec and stage == "2" else None)
    if frozen.pformer is not None:
        ptext = [(prompt + " " + c) if prompt else c for c in caps]  # caption FT: P-Former sees "a photo of ..."
        with torch.no_grad(), autocast(device, frozen.dtype):
            b["pstar"] = frozen.pformer(*toks.bert_batch(ptext))[0].float()
    return b


def train(cfg, dist, model, frozen, toks, meta, logger):
    stage = cfg.stage
    if stage == "0":
        sentences = [s.strip() for s in open(cfg.text_file, encoding="utf-8") if s.strip()]
        dataset = TextDataset(sentences)
    else:
        dataset = PairDataset(read_pairs(cfg.train_file), cfg.image_root, cfg.image_size, True, cfg.seed,
                              cfg.blank_images)
    if cfg.global_batch % (cfg.micro_batch * dist.world_size):
        raise SystemExit(f"global_batch {cfg.global_batch} must be a multiple of micro_batch*world "
                         f"({cfg.micro_batch}*{dist.world_size})")
    accum = cfg.global_batch // (cfg.micro_batch * dist.world_size)
    steps_per_epoch = len(dataset) // cfg.global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"dataset of {len(dataset)} items is smaller than global_batch {cfg.global_batch}")
    total = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    ddp = D.wrap_ddp(model, dist)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    scaler = make_scaler(frozen.dtype)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"stage {stage}: {len(dataset)} items, {steps_per_epoch} steps/epoch, {total} steps, "
                f"accumulation {accum}, trainable params {n_train:,}")
    start = 0
    if cfg.resume:
        ck = restore(cfg.resume, model, opt, scaler)
        start = ck["step"]
        set_rng_state(ck["rng"])
        logger.info(f"resumed from {cfg.resume} at step {start}")
    mask_id = toks.bert.mask_token_id
    keep = [toks.bert.pad_token_id, toks.bert.cls_token_id]

    def micro_step(raw, step, micro):
        b = make_batch(raw, stage, cfg, toks, frozen, step, micro, dist.device)
        if stage == "0":
            with autocast(dist.device, frozen.dtype):
                return stage0_losses(ddp, b, frozen.llm, dist.rank, cfg.mask_prob, mask_id, keep)
        return ddp(stage, b, frozen)

    def optimizer_step(micros, step):
        set_lr(opt, lavis_lr(step, steps_per_epoch, cfg))
        terms = {}
        for j, raw in enumerate(micros):
            sync = j == len(micros) - 1 or not hasattr(ddp, "no_sync")
            with (ddp.no_sync() if not sync else contextlib.nullcontext()):
                losses = micro_step(raw, step, j)
                loss = sum(losses.values())
                scaler.scale(loss / len(micros)).backward()
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + v.detach() / len(micros)
        terms = {k: D.all_reduce_mean(v) for k, v in terms.items()}
        terms["loss"] = sum(terms.values())
        scaler.unscale_(opt)
        gnorm = clip_grad(model.parameters(), cfg.grad_clip)
        # Stop before the update on a non-finite loss or gradient (an fp16 scaler skips inf-gradient steps itself),
        # so the last checkpoint stays the last good one.  Steps count from 1, as in the log.
        check_finite(step + 1, {**terms, **({} if scaler.is_enabled() else {"grad_norm": torch.tensor(gnorm)})})
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return terms, gnorm

    if cfg.bench:
        loader = iter(_loader(dataset, epoch_micro_batches(len(dataset), 0, 0, steps_per_epoch, cfg, dist), cfg))
        micros = [next(loader) for _ in range(accum)]
        model.train()
        flops = None
        if dist.device.type == "cuda":
            flops = count_flops(lambda: optimizer_step(micros, 0)) * dist.world_size
        res = run_bench(lambda: optimizer_step(micros, 0), cfg.bench, cfg.global_batch, dist.device,
                        flops_per_step=flops)
        return {f"bench_{k}": v for k, v in res.items()}

    model.train()
    if stage != "0" and model.vision is None:
        frozen.vision.eval()
    timer, last, bad, tried = StepTimer(dist.device), {}, 0, 0
    step = start
    while step < total:
        epoch = step // steps_per_epoch
        batches = epoch_micro_batches(len(dataset), epoch, step % steps_per_epoch, steps_per_epoch, cfg, dist)
        it = iter(_loader(dataset, batches, cfg))
        while step < total and step // steps_per_epoch == epoch:
            timer.start()
            micros = [next(it) for _ in range(accum)]
            bad += sum(m["bad"] for m in micros)
            tried += sum(len(m["caption"]) for m in micros)
            terms, gnorm = optimizer_step(micros, step)
            step += 1
            t = timer.stop(cfg.global_batch)
            last = {k: float(v) for k, v in terms.items()}
            if step % cfg.log_every == 0 or step == total:
                logger.log(step, **last, lr=opt.param_groups[0]["lr"], grad_norm=gnorm, **t)
            if bad > cfg.max_bad_frac * tried and tried >= 100:
                raise RuntimeError(f"too many unreadable images under {cfg.image_root}: {bad} of {tried}")
            if step % cfg.save_every == 0 or step == total:
                save(cfg, dist, model, opt, scaler, step, meta)
    if bad:
        logger.info(f"skipped {bad} unreadable images of {tried}")
    return {f"final_{k}": v for k, v in last.items()}


def _loader(dataset, batches, cfg):
    # own generator: creating the iterator must not consume the global torch RNG (exact resume)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                       collate_fn=collate, generator=torch.Generator(),
                                       persistent_workers=False)


def save(cfg, dist, model, opt, scaler, step, meta):
    if not dist.is_main:
        return
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
             "step": step, "rng": rng_state(), "config": dataclasses.asdict(cfg), "stage": cfg.stage,
             "meta": {k: v for k, v in meta.items() if k == "image_token_index" and v is not None}}
    save_checkpoint(os.path.join(cfg.out_dir, "checkpoint.pt"), state)


# ====================================================================================================
# main
# ====================================================================================================


def uses_toy_world(cfg):
    """True when a path this run reads lies in the toy world (which is then built on first use)."""
    used = [cfg.bert_path] + ([] if cfg.hf_import else [cfg.vision_path, cfg.llm_path])
    used += [cfg.text_file] if cfg.stage == "0" else [] if cfg.stage == "eval" else [cfg.train_file]
    used += [cfg.val_file, cfg.vqa_file] if cfg.eval_tasks else []
    root = os.path.normpath(cfg.toy_root)
    return cfg.preset == "toy" and any(os.path.normpath(p).startswith(root) for p in used if p)


def main(argv=None):
    cfg = resolve_config(parse_config(Config, PRESETS, argv))
    dist = D.setup_distributed(cfg.device)
    try:
        seed_everything(cfg.seed + dist.rank)
        logger = Logger(cfg.out_dir, dist.is_main)
        if uses_toy_world(cfg) and not os.path.isfile(os.path.join(cfg.toy_root, "manifest.json")):
            if dist.is_main:
                from data.toy import ensure_toy_world
                ensure_toy_world(cfg.toy_root)
            D.barrier()
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        model, frozen, toks, meta = build(cfg, dist)  # (an --hf_import sets num_query etc. from its config)
        if dist.is_main:
            save_config(cfg, cfg.out_dir)
        logger.info("config:\n" + format_config(cfg))
        if meta.get("init_missing"):
            logger.info(f"warning: --init {cfg.init} lacks {len(meta['init_missing'])} tensors, e.g. "
                        f"{meta['init_missing'][:3]} (they keep their fresh initialisation)")
        seed_everything(cfg.seed + dist.rank)
        metrics = {}
        if cfg.stage != "eval":
            metrics.update(train(cfg, dist, model, frozen, toks, meta, logger))
        if cfg.bench or cfg.stage == "0":
            return metrics
        metrics.update(run_evals(model, frozen, toks, cfg, dist, logger))
        if cfg.hf_export and dist.is_main:
            export_hf(cfg.hf_export, model, frozen.vision_tower, frozen.llm, frozen.llm_tok, cfg.num_query,
                      cfg.image_size, meta.get("image_token_index"))
            logger.info(f"exported Blip2ForConditionalGeneration to {cfg.hf_export}")
        if dist.is_main:
            with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
        return metrics
    finally:
        D.cleanup_distributed()


if __name__ == "__main__":
    main()
