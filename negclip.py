"""NegCLIP: contrastive fine-tuning of a dual encoder with hard negative captions and images.

Yuksekgonul, Bianchi, Kalluri, Jurafsky, Zou, "When and why vision-language models behave like
bags-of-words, and what to do about it?" (ICLR 2023, arXiv 2210.01936).  CLIP scores "the horse is eating
the grass" and "the grass is eating the horse" alike, because its contrastive objective over COCO-sized
batches can be solved without word order.  NegCLIP keeps the CLIP loss but adds, for every sampled image,
(1) hard negative captions made by swapping two words or phrases of its caption (Sec. 4) and (2) a nearest
neighbour image with its own caption and hard negative.  A batch of B rows is 2B images x 4B texts; the
image->text softmax runs over all 4B texts, the text->image one only for the 2B real captions.

The dual encoder comes either from a CLIP checkpoint (`--init clip`, transformers CLIPModel) or from two
uni-modal checkpoints with fresh projections and temperature (`--init unimodal --vision ... --text ...`,
as HF VisionTextDualEncoder / LiT).  Towers can be locked (LiT) or adapted with LoRA (written below).
Evaluation reads local copies of the compositional benchmarks in their published formats: COCO/Flickr
retrieval, ARO (VG-Relation, VG-Attribution, COCO/Flickr-Order), SugarCREPE, CREPE, SVO-Probes, Winoground.

Modes (one file, one code path for `python` and `torchrun`):
    --mode mine    hard negative captions (Sec. 3) + nearest-neighbour images -> NegCLIP TSV
    --mode train   NegCLIP (or plain CLIP-FT with --hard_negatives false); mines first if no TSV is given
    --mode eval    the benchmark table (results.json); --ckpt PATH evaluates a trained checkpoint
    --mode export  merge LoRA and write a transformers folder (CLIPModel or towers + heads)

Commands
    # toy world, CPU, a few minutes (builds data/toy on first use):
    python negclip.py --mode eval --out_dir runs/negclip_toy/before
    python negclip.py --mode train --out_dir runs/negclip_toy
    python negclip.py --mode eval --ckpt runs/negclip_toy/last.pt --out_dir runs/negclip_toy/after
    # paper recipe, 1 GPU (COCO + released TSV + benchmark copies under data/, see README):
    python negclip.py --preset paper --mode train --out_dir runs/negclip_b32
    # several nodes: same flags under torchrun (global batch stays 256; micro batch per GPU is explicit)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HOST:29500 \
        negclip.py --preset paper --mode train --micro_batch 16 --out_dir runs/negclip_b32_ddp

Reproduces: the paper's Table 6 / SugarCREPE setting (ViT-B/32, COCO, 5 epochs, batch 256, lr 1e-6) with
the spec's reference numbers (VG-R 0.59 -> 0.81, VG-A 0.62 -> 0.71); on the toy world, swap-attribute and
relation accuracy of the toy CLIP before and after NegCLIP with retrieval R@1 alongside (README).
"""
import ast
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import amp
from common import dist as D
from common.checkpoint import load_checkpoint, restore, rng_state, save_checkpoint, set_rng_state
from common.config import format_config, parse_config, save_config
from common.data import DataError, read_pairs
from common.image import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageTransform, load_image
from common.log import Logger, progress
from common.train import (StepTimer, check_finite, clip_grad, cosine_lr, count_flops, mfu, param_groups, run_bench,
                          set_lr)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Config:
    preset: str = "toy"
    mode: str = "train"                 # mine | train | eval | export
    out_dir: str = "runs/negclip"
    toy_root: str = "data/toy"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"             # auto = bf16 autocast on a capable GPU, fp32 on CPU
    bench: int = 0                      # >0: time this many training steps after warm-up and stop
    resume: str = ""                    # checkpoint to continue training from (exactly)
    # --- model
    init: str = "clip"                  # clip: one CLIPModel folder | unimodal: --vision + --text towers
    clip: str = ""                      # CLIPModel folder or hub name ("" = <toy_root>/models/clip)
    vision: str = ""                    # unimodal vision tower: CLIP(Vision)Model, ViTModel, Dinov2Model
    text: str = ""                      # unimodal text tower: BertModel, RobertaModel, CLIPTextModel
    embed_dim: int = 512                # joint space of the fresh projections (unimodal init)
    vision_pool: str = "cls"            # unimodal: cls (CLIP/DINOv2 post-LN CLS, ViT raw CLS) | mean
    text_pool: str = "mean"             # unimodal: mean (masked) | cls
    max_text_len: int = 77
    lock_vision: bool = False           # LiT: freeze the image tower (its projection still trains)
    lock_text: bool = False
    lora_r: int = 0                     # >0: LoRA adapters on the towers, towers frozen
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    ckpt: str = ""                      # eval/export: trained checkpoint (else the init model is evaluated)
    # --- data
    train_file: str = ""                # pairs .jsonl | BLIP/Karpathy .json | NegCLIP .tsv ("" = toy train pairs)
    image_root: str = ""                # root of the image paths in train_file / TSV ("" = toy_root)
    train_tsv: str = ""                 # mined or released NegCLIP TSV ("" = <out_dir>/train_neg_clip.tsv)
    val_file: str = ""                  # retrieval set for model selection ("" = toy val pairs; "none" = off)
    all_captions: bool = False          # keep every caption of an image (paper: the first only)
    tagger: str = "auto"                # auto (nltk if its tagger data is installed, else rule) | nltk | rule
    mine_k: int = 3                     # neighbour images per row (released TSV: 3)
    mine_chunk: int = 4096              # similarity rows per chunk when mining
    # --- train
    hard_negatives: bool = True         # false = CLIP-FT baseline (B images x B captions)
    hn_start_step: int = -1             # plain CLIP loss before this step; -1 = 0 (clip) / 10% (unimodal)
    mask_duplicates: bool = False       # mask same-image off-diagonal logits (off in the paper)
    global_batch: int = 256             # rows per optimizer step (paper 256 -> 512 x 1024 logits)
    micro_batch: int = 256              # rows per GPU per forward; accumulation = global / (micro * world)
    epochs: int = 5
    max_steps: int = 0                  # >0 overrides epochs
    stop_after: int = 0                 # >0: stop (checkpointed) after this step, keeping the full schedule
    lr: float = 1e-6                    # towers (paper grid {1e-5, 5e-6, 1e-6}; released command 1e-6)
    head_lr: float = 0.0                # projections + logit scale (0 = lr; spec: 1e-4 for unimodal heads)
    warmup: int = 50
    weight_decay: float = 0.2
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 0.0
    crop_scale_min: float = 0.9         # open_clip RandomResizedCrop(scale=(0.9, 1.0))
    workers: int = 0
    log_every: int = 10
    ckpt_every: int = 0                 # 0 = only at the end (and at each val improvement as best.pt)
    val_every: int = 0                  # 0 = once per epoch
    # --- eval
    benchmarks: list[str] = field(default_factory=lambda: ["retrieval", "aro", "order", "sugarcrepe", "crepe", "svo",
                                                      "winoground"])
    bench_root: str = ""                # folder with aro/ sugarcrepe/ crepe/ svo_probes/ winoground/ ("" = toy)
    retrieval_file: str = ""            # pairs .jsonl | BLIP test .json | NegCLIP .tsv ("" = toy test pairs)
    retrieval_image_root: str = ""
    order_file: str = ""                # BLIP coco_karpathy_test.json / flickr30k_test.json for *-Order
    order_image_root: str = ""
    order_seeds: int = 5                # ARO authors: report mean +- std over 5 random perturbation draws
    aro_min_pair_count: int = 25        # VG-Attribution macro: attribute pairs with >= this many cases
    eval_batch: int = 256
    eval_after_train: bool = True
    export_dir: str = ""


PRESETS = {
    # Toy world: the toy CLIP briefly pretrained on toy scenes; all paths default to data/toy.
    # 1000 steps at lr 5e-4 (~10 min on 2 cores): the 120 steps at 2e-5 of a first recipe left every toy
    # benchmark where it started (swap-att 0.46 -> 0.47), too little training to test the paper's claim.
    "toy": dict(global_batch=32, micro_batch=32, epochs=20, max_steps=1000, lr=5e-4, warmup=10, weight_decay=0.1,
                max_text_len=32, crop_scale_min=0.9, log_every=20, order_seeds=2, aro_min_pair_count=5,
                eval_batch=128, val_every=250),
    # Paper (Sec. 4 / vinid/neg_clip): ViT-B/32 OpenAI, COCO Karpathy train+restval with the released TSV
    # (one caption per image, 109,468 rows), batch 256, 5 epochs, lr 1e-6, warm-up 50, cosine, AdamW
    # (0.9, 0.98), eps 1e-6, wd 0.2, best epoch by COCO-val retrieval.
    "paper": dict(init="clip", clip="openai/clip-vit-base-patch32", max_text_len=77,
                  train_tsv="data/negclip/train_neg_clip.tsv", image_root="data",
                  train_file="data/coco/coco_karpathy_train.json",
                  val_file="data/negclip/valid_neg_clip.tsv", global_batch=256, micro_batch=256, epochs=5, lr=1e-6,
                  warmup=50, weight_decay=0.2, crop_scale_min=0.9, workers=8, log_every=10, val_every=0,
                  bench_root="data/benchmarks", retrieval_file="data/benchmarks/blip/coco_karpathy_test.json",
                  retrieval_image_root="data/coco", order_file="data/benchmarks/blip/coco_karpathy_test.json",
                  order_image_root="data/coco", order_seeds=5, aro_min_pair_count=25, eval_batch=256),
}


def resolve_paths(cfg):
    """Fill empty data/model paths from the toy world (building it on first use)."""
    root = cfg.toy_root
    toy = dict(clip=os.path.join(root, "models", "clip"), train_file=os.path.join(root, "pairs_train.jsonl"),
               image_root=root, val_file=os.path.join(root, "pairs_val.jsonl"), bench_root=root,
               retrieval_file=os.path.join(root, "pairs_test.jsonl"), retrieval_image_root=root,
               order_file=os.path.join(root, "blip", "coco_karpathy_test.json"), order_image_root=root)
    if cfg.init == "unimodal":
        toy.pop("clip")
        toy.update(vision=os.path.join(root, "models", "clip"), text=os.path.join(root, "models", "bert"))
    used_toy = False
    for k, v in toy.items():
        if getattr(cfg, k) == "":
            setattr(cfg, k, v)
            used_toy = True
    if not cfg.train_tsv:
        cfg.train_tsv = os.path.join(cfg.out_dir, "train_neg_clip.tsv")
    if used_toy and not os.path.isfile(os.path.join(root, "manifest.json")):
        from data.toy import ensure_toy_world
        ensure_toy_world(root)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Model: dual encoder (CLIP or two uni-modal towers) + LoRA written out
# ----------------------------------------------------------------------------------------------------------

LOGIT_SCALE_MAX = math.log(100.0)  # open_clip clamps the learnable log-temperature to [0, ln 100]


class LoRALinear(nn.Module):
    """W x + (alpha / r) * B A dropout(x): A (r, d_in) random, B (d_out, r) zero, so training starts exactly
    at the pretrained model (Hu et al. 2021).  The frozen base Linear is kept as is."""

    def __init__(self, base: nn.Linear, r, alpha, dropout):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / PEFT
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged(self):
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.scale * (self.lora_B @ self.lora_A).to(lin.weight.dtype))
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


def add_lora(tower, targets, r, alpha, dropout):
    """Freeze `tower` and wrap its Linear layers named in `targets` ("all-linear" = every Linear) with LoRA.
    Returns the number of wrapped layers."""
    tower.requires_grad_(False)
    wanted = [(name, mod) for name, mod in tower.named_modules() if isinstance(mod, nn.Linear)
              and ("all-linear" in targets or name.rsplit(".", 1)[-1] in targets)]
    for name, mod in wanted:
        parent = tower.get_submodule(name.rsplit(".", 1)[0]) if "." in name else tower
        setattr(parent, name.rsplit(".", 1)[-1], LoRALinear(mod, r, alpha, dropout))
    if not wanted:
        raise ValueError(f"no Linear layer of {type(tower).__name__} matches lora_targets={targets}")
    return len(wanted)


def merge_lora(module):
    """Replace every LoRALinear by a plain Linear holding W + (alpha/r) B A (for eval/export)."""
    for name, mod in list(module.named_modules()):
        if isinstance(mod, LoRALinear):
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(parent, name.rsplit(".", 1)[-1], mod.merged())
    return module


class DualEncoder(nn.Module):
    """Image tower + text tower + linear projections into one space + learnable log-temperature.

    pool = "clip": HF CLIP's own pooling (vision: post-LN CLS; text: final-LN state at the EOS token), so
    embeddings equal CLIPModel.get_image_features / get_text_features.  Otherwise vision_pool / text_pool.
    """

    def __init__(self, vision, text, visual_projection, text_projection, logit_scale, pool="clip",
                 vision_pool="cls", text_pool="mean"):
        super().__init__()
        self.vision, self.text = vision, text
        self.visual_projection, self.text_projection = visual_projection, text_projection
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.pool, self.vision_pool, self.text_pool = pool, vision_pool, text_pool

    def pool_image(self, pixels):  # (B, 3, S, S) -> (B, d_vision)
        out = self.vision(pixel_values=pixels)
        if self.pool == "clip":
            return out.pooler_output
        if self.vision_pool == "mean":
            return out.last_hidden_state[:, 1:].mean(1)  # patch tokens (drop CLS)
        # CLIPVision / DINOv2 pooler = layer-normed CLS; ViT's tanh pooler is not pretrained -> raw CLS
        mt = self.vision.config.model_type
        return out.pooler_output if mt in ("clip_vision_model", "dinov2") else out.last_hidden_state[:, 0]

    def pool_text(self, ids, mask):  # (B, L) -> (B, d_text)
        out = self.text(input_ids=ids, attention_mask=mask)
        if self.pool == "clip" or self.text.config.model_type == "clip_text_model":
            return out.pooler_output
        h = out.last_hidden_state  # (B, L, d)
        if self.text_pool == "cls":
            return h[:, 0]
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1); RoBERTa's pooler is random, so mean is the default
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    def encode_image(self, pixels=None, pooled=None, normalize=True):
        x = self.visual_projection(self.pool_image(pixels) if pooled is None else pooled.to(
            self.visual_projection.weight.dtype))
        return F.normalize(x.float(), dim=-1) if normalize else x

    def encode_text(self, ids=None, mask=None, pooled=None, normalize=True):
        x = self.text_projection(self.pool_text(ids, mask) if pooled is None else pooled.to(
            self.text_projection.weight.dtype))
        return F.normalize(x.float(), dim=-1) if normalize else x

    def forward(self, pixels=None, ids=None, mask=None, pooled_image=None, pooled_text=None):
        """-> (normalised image embeddings (Ni, D), normalised text embeddings (Nt, D), exp(logit_scale))."""
        return (self.encode_image(pixels, pooled_image), self.encode_text(ids, mask, pooled_text),
                self.logit_scale.exp())


_POOLER_TYPES = ("bert", "roberta", "xlm-roberta", "vit")  # their random/NSP poolers would be unused weights


def load_tower(path, side):
    """A uni-modal tower from a local folder (or hub name): from_pretrained, never trust_remote_code."""
    from transformers import AutoConfig, AutoModel, CLIPTextModel, CLIPVisionModel
    mtype = AutoConfig.from_pretrained(path).model_type
    if mtype == "clip":  # one side of a full CLIP checkpoint
        return (CLIPVisionModel if side == "vision" else CLIPTextModel).from_pretrained(path)
    kw = {"add_pooling_layer": False} if mtype in _POOLER_TYPES else {}
    return AutoModel.from_pretrained(path, **kw)


def build_model(cfg):
    """-> (DualEncoder, tokenizer, image mean, image std, image size).  Freezing / LoRA are applied here once."""
    from transformers import AutoTokenizer, CLIPModel
    if cfg.init == "clip":
        hf = CLIPModel.from_pretrained(cfg.clip)  # config carries quick_gelu for OpenAI weights: never rebuild
        model = DualEncoder(hf.vision_model, hf.text_model, hf.visual_projection, hf.text_projection,
                            hf.logit_scale.item(), pool="clip")
        tok, mean, std = AutoTokenizer.from_pretrained(cfg.clip), CLIP_MEAN, CLIP_STD
        size = hf.config.vision_config.image_size
    elif cfg.init == "unimodal":
        vision, text = load_tower(cfg.vision, "vision"), load_tower(cfg.text, "text")
        dv = vision.config.hidden_size
        dt = text.config.hidden_size
        vp, tp = nn.Linear(dv, cfg.embed_dim, bias=False), nn.Linear(dt, cfg.embed_dim, bias=False)
        nn.init.normal_(vp.weight, std=dv ** -0.5)
        nn.init.normal_(tp.weight, std=dt ** -0.5)
        # fresh heads: temperature 0.07 as in CLIP's own initialisation
        model = DualEncoder(vision, text, vp, tp, math.log(1 / 0.07), pool="towers",
                            vision_pool=cfg.vision_pool, text_pool=cfg.text_pool)
        tok = AutoTokenizer.from_pretrained(cfg.text)
        mean, std = _image_stats(cfg.vision, vision.config.model_type)
        size = vision.config.image_size
        if isinstance(size, (list, tuple)):
            size = size[0]
    else:
        raise ValueError(f"init must be clip|unimodal, got {cfg.init!r}")
    if cfg.lock_vision:
        model.vision.requires_grad_(False).eval()
    if cfg.lock_text:
        model.text.requires_grad_(False).eval()
    if cfg.lora_r > 0:  # adapters on the unlocked towers only; projections + temperature stay fully trainable
        for name in ("vision", "text"):
            if not getattr(cfg, f"lock_{name}"):
                add_lora(getattr(model, name), cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    return model, tok, mean, std, size


def _image_stats(path, model_type):
    """Mean/std from the vision checkpoint's preprocessor_config.json, else by model family."""
    pp = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pp):
        with open(pp) as f:
            d = json.load(f)
        if "image_mean" in d and "image_std" in d:
            return tuple(d["image_mean"]), tuple(d["image_std"])
    return (CLIP_MEAN, CLIP_STD) if model_type.startswith("clip") else (IMAGENET_MEAN, IMAGENET_STD)


def trainable_state(model):
    """Only what trains (full towers, LoRA A/B, heads, temperature): locked towers come from the init folder."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}


def export_model(model, cfg, out):
    """Merge LoRA and write a transformers folder: CLIPModel for --init clip, else vision/ text/ + heads."""
    from transformers import AutoTokenizer, CLIPModel
    merge_lora(model)
    os.makedirs(out, exist_ok=True)
    if cfg.init == "clip":
        hf = CLIPModel.from_pretrained(cfg.clip)
        sd = {}
        for k, v in model.state_dict().items():
            head, rest = k.split(".", 1) if "." in k else (k, "")
            prefix = {"vision": "vision_model.", "text": "text_model."}.get(head)
            sd[prefix + rest if prefix else k] = v
        hf.load_state_dict(sd, strict=True)
        hf.save_pretrained(out)
        AutoTokenizer.from_pretrained(cfg.clip).save_pretrained(out)
    else:
        model.vision.save_pretrained(os.path.join(out, "vision"))
        model.text.save_pretrained(os.path.join(out, "text"))
        AutoTokenizer.from_pretrained(cfg.text).save_pretrained(os.path.join(out, "text"))
        from safetensors.torch import save_file
        save_file({"visual_projection": model.visual_projection.weight.detach().contiguous(),
                   "text_projection": model.text_projection.weight.detach().contiguous(),
                   "logit_scale": model.logit_scale.detach().reshape(1)}, os.path.join(out, "heads.safetensors"))
    return out


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------

def negclip_loss(img, txt, scale, dup_mask=None):
    """CLIP / NegCLIP contrastive loss (paper Sec. 4; spec Sec. 5).

    img (N, D) and txt (M, D) are L2-normalised; image k's caption is text k (k < N); texts N..M-1 are hard
    negative captions.  NegCLIP: N = 2B images [anchors; neighbours], M = 4B texts [t; t'; n; n'].
    Plain CLIP-FT: N = M = B.  dup_mask (N, M) bool: logits to drop (same image, not the label).
    """
    n = img.shape[0]
    logits = scale * img @ txt.t()  # (N, M)
    if dup_mask is not None:
        logits = logits.masked_fill(dup_mask, float("-inf"))
    labels = torch.arange(n, device=img.device)
    i2t = F.cross_entropy(logits, labels)           # each image over all M texts (hard captions = extra columns)
    t2i = F.cross_entropy(logits[:, :n].t(), labels)  # (N, N): only the N real captions are queries
    return (i2t + t2i) / 2, {"i2t": i2t.detach(), "t2i": t2i.detach()}


def duplicate_mask(img_ids, txt_ids):
    """(N,), (M,) image ids (-1 for hard captions) -> (N, M) True where text j describes image i's picture but
    j != i (the same COCO image as anchor and as someone's neighbour)."""
    same = img_ids[:, None] == txt_ids[None, :]  # (N, M)
    eye = torch.zeros_like(same)
    eye[:, :img_ids.shape[0]] = torch.eye(img_ids.shape[0], dtype=torch.bool, device=same.device)
    return same & ~eye & (txt_ids[None, :] >= 0)


def gather_blocks(x, n_blocks, grad=True):
    """(n_blocks * b, ...) local rows in blocks [t; t'; n; n'] -> (n_blocks * world * b, ...) with every
    block gathered over ranks, so the global layout equals one process holding the global batch."""
    b = x.shape[0] // n_blocks
    x = x.reshape(n_blocks, b, *x.shape[1:]).transpose(0, 1)  # (b, n_blocks, ...)
    x = (D.all_gather_with_grad if grad else D.all_gather_no_grad)(x.contiguous())  # (world * b, n_blocks, ...)
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


# ----------------------------------------------------------------------------------------------------------
# Data: tagger, hard negative captions (Sec. 3 / spec 3.3), ARO order perturbations, NegCLIP TSV, batches
# ----------------------------------------------------------------------------------------------------------

# Tokeniser: words (internal hyphens, o'clock), numbers, Penn-style clitics ('s, n't), each punctuation mark.
_TOKEN_RE = re.compile(r"(?i)[a-z]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|m|d)\b|\d+(?:[.,:]\d+)*|"
                       r"[a-z0-9]+(?:-[a-z0-9]+)*(?:'(?!(?:s|re|ve|ll|m|d)\b)[a-z]+)*|[^\sa-z0-9]")


def tokenize(text):
    return _TOKEN_RE.findall(text)


# Closed classes win over everything (Penn tags).
_CLOSED = {}
for _tag, _words in {
    "DT": "a an the this that these those some any each every no another all both either neither",
    "PRP$": "his her its their my your our",
    "PRP": "he she it they them him we you i me us himself herself itself themselves someone something "
           "somebody everyone everything nothing anyone",
    "CD": "one two three four five six seven eight nine ten eleven twelve twenty dozen hundred",
    "IN": "in on at of with by near under over above below behind beside besides between among across along "
          "around through into onto from for about against inside outside off down out past toward towards "
          "upon within without underneath beneath atop like during after before while than as via up",
    "TO": "to", "CC": "and or but nor", "MD": "can could will would shall should may might must",
    "WDT": "what which whose", "WP": "who whom", "WRB": "where when why how", "EX": "there", "RB": "not n't",
    "POS": "'s", "VBZ": "is has does", "VBP": "are am have do 're 'm 've", "VBD": "was were had did",
    "VB": "be", "VBN": "been", "VBG": "being",
}.items():
    for _w in _words.split():
        _CLOSED[_w] = _tag
_AUX = set("is are am was were be been being has have had do does did 're 'm 've 's".split())

# Multiword prepositions are tagged IN as a whole, so "left"/"front"/"top" are never swapped as nouns
# (spaCy would tag them NN; ours is the cleaner negative).  Longest first.
_MULTI_PREP = sorted([p.split() for p in (
    "next to|in front of|on top of|to the left of|to the right of|on the left of|on the right of|left of|"
    "right of|on the side of|in the middle of|on the other side of|close to|out of|in between").split("|")],
    key=len, reverse=True)

_ADJ = set("""red blue green yellow white black brown orange purple pink gray grey silver golden gold dark bright
tan beige large small big little tiny huge tall short long giant medium old young new elderly wooden metal metallic
plastic round square rectangular triangular circular oval empty full open closed clean dirty wet dry hot cold warm
happy busy cloudy sunny snowy grassy sandy rocky striped colorful shiny fresh ripe pretty beautiful cute nice
other same different single double first second third various modern fancy plain assorted blurry wild lush leafy
crowded adult female male professional fluffy furry middle cramped homeless advanced close ready off wide narrow
thick thin heavy light soft hard high low deep shallow fat skinny smiling asian lone huge clear calm rainy foggy
stainless glazed fried baked grilled""".split())
_NOUN = """person man woman boy girl child kid baby guy lady player skier surfer skateboarder people bicycle bike car
motorcycle motorbike moped airplane plane jet bus train truck boat ship traffic light fire hydrant stop sign
parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag bag tie
suitcase frisbee ski snowboard ball kite bat glove skateboard surfboard racket racquet bottle glass cup mug fork knife
spoon bowl banana apple sandwich orange broccoli carrot hot dog pizza donut doughnut cake pie chair couch sofa plant
bed table toilet tv television laptop computer mouse remote keyboard phone microwave oven toaster sink refrigerator
fridge book clock vase scissors teddy hair drier dryer toothbrush tree sky grass building window wall street road
field water snow sand beach ocean sea wave hill mountain cloud sun shirt pants hat cap jacket coat shoe helmet head
hand arm leg face eye ear nose mouth tail wheel door floor ground plate food room kitchen bathroom counter shelf
picture photo image fence pole track sidewalk walk area top side front back background city park air wood tile
mirror lamp pillow blanket box court net game shower towel curtain rock leaf flower bush vehicle desk screen
monitor camera house home restaurant store market vegetable fruit meat cheese bread dish pan pot stove station
passenger headlight railroad fountain faucet control panel space combination cart cash apron pizza pizzas baker
dough wall fixture post appliance trick air athlete commuter view circle square triangle star cross diamond heart
hexagon ring rectangle shape object thing scene canvas umbrella yak hydrant street corner crowd group team family
pair couple bunch lot number variety side middle edge bottom row line piece slice shopping stand display
left right corner""".split()
_VERB = """sit stand hold ride eat walk run play look lay lie sleep drink fly carry wear watch wait park cross cut
throw catch hit swing talk smile pose prepare cook use take make read fill cover surround rest hang lean grow graze
drive travel pull push kick jump skate ski surf swim float line display show place put stack pile top stuff slice
serve feed pet hug kiss open close climb move go come leave enter perch reach point face work try get give set stop
land fix paint decorate dress tie brush pour bite chew lick sniff fall check build attach mount block load pass
pack pick buy sell wash clean wave celebrate share enjoy blow beg roll chain lock perform board head see stare
glance gather hover fly follow lead approach dive dig splash sail paddle steer""".split()
_IRREGULAR_VERB = {"sat": "sit", "stood": "stand", "held": "hold", "rode": "ride", "ridden": "ride", "ate": "eat",
                   "eaten": "eat", "ran": "run", "lay": "lie", "lain": "lie", "laid": "lay", "slept": "sleep",
                   "drank": "drink", "drunk": "drink", "flew": "fly", "flown": "fly", "wore": "wear", "worn": "wear",
                   "caught": "catch", "swung": "swing", "took": "take", "taken": "take", "made": "make",
                   "hung": "hang", "grew": "grow", "grown": "grow", "drove": "drive", "driven": "drive",
                   "threw": "throw", "thrown": "throw", "went": "go", "gone": "go", "came": "come", "left": "leave",
                   "got": "get", "gave": "give", "given": "give", "fed": "feed", "built": "build", "bought": "buy",
                   "sold": "sell", "fell": "fall", "fallen": "fall", "bit": "bite", "bitten": "bite",
                   "blew": "blow", "blown": "blow", "lit": "light", "swam": "swim", "shown": "show", "seen": "see",
                   "saw": "see", "led": "lead", "dug": "dig"}
_IRREGULAR_PLURAL = {"man": "men", "woman": "women", "person": "people", "child": "children", "foot": "feet",
                     "tooth": "teeth", "mouse": "mice", "sheep": "sheep", "knife": "knives", "leaf": "leaves",
                     "shelf": "shelves", "scissors": "scissors", "pants": "pants", "people": "people",
                     "fish": "fish", "deer": "deer"}
_DOUBLE = set("sit run cut put get set swim hit stop pet hug skip drop step plan jog wrap dip chop grab drag nap tap "
              "pat rub spin begin sip trim knit dig".split())


def _plural(w):
    if w in _IRREGULAR_PLURAL:
        return _IRREGULAR_PLURAL[w]
    if re.search(r"(s|x|z|ch|sh)$", w):
        return w + "es"
    if re.search(r"[^aeiou]y$", w):
        return w[:-1] + "ies"
    return w + "s"


def _verb_forms(v):
    """base -> {form: Penn tag} with regular inflection rules (+ the doubling list)."""
    s = _plural(v) if v not in ("go", "do") else v + "es"
    if v.endswith("ie"):
        ing = v[:-2] + "ying"
    elif v.endswith("e") and not v.endswith(("ee", "ye", "oe")):
        ing = v[:-1] + "ing"
    elif v in _DOUBLE:
        ing = v + v[-1] + "ing"
    else:
        ing = v + "ing"
    if v.endswith("e"):
        ed = v + "d"
    elif re.search(r"[^aeiou]y$", v):
        ed = v[:-1] + "ied"
    elif v in _DOUBLE:
        ed = v + v[-1] + "ed"
    else:
        ed = v + "ed"
    return {v: "VB", s: "VBZ", ing: "VBG", ed: "VBN"}


def _build_lexicon():
    """form -> set of Penn tags (open classes).  Ambiguous words get several readings."""
    lex = {}

    def add(w, t):
        lex.setdefault(w, set()).add(t)
    for w in _ADJ:
        add(w, "JJ")
    for w in _NOUN:
        add(w, "NN")
        if w not in ("scissors", "pants", "people"):
            add(_plural(w), "NNS")
        else:
            add(w, "NNS")
    lex.get("people", set()).discard("NN")
    for v in _VERB:
        for form, tag in _verb_forms(v).items():
            add(form, tag)
    for form, base in _IRREGULAR_VERB.items():
        add(form, "VBD")
        add(form, "VBN")
    return lex


_LEXICON = _build_lexicon()
_COARSE = {"NN": "NOUN", "NNS": "NOUN", "NNP": "NOUN", "NNPS": "NOUN", "JJ": "ADJ", "JJR": "ADJ", "JJS": "ADJ",
           "RB": "ADV", "RBR": "ADV", "RBS": "ADV", "DT": "DET", "PDT": "DET", "PRP$": "PRON", "WDT": "DET",
           "CD": "NUM", "IN": "ADP", "TO": "PART", "CC": "CCONJ", "MD": "AUX", "PRP": "PRON", "WP": "PRON",
           "WRB": "ADV", "EX": "PRON", "POS": "PART", "RP": "ADP"}


def coarse(token, tag):
    """Penn tag -> universal-style coarse tag; forms of be/have/do are AUX (the verb-phrase pattern needs it)."""
    if tag.startswith("VB"):
        return "AUX" if token.lower() in _AUX else "VERB"
    return _COARSE.get(tag, "PUNCT" if not any(c.isalnum() for c in token) else "X")


def _suffix_tags(w):
    """Unknown words: suffix rules (spec 3.3 step 3), default NN."""
    if w.isdigit() or re.fullmatch(r"\d+(?:[.,:]\d+)*", w):
        return {"CD"}
    if w.endswith("ly") and len(w) > 4:
        return {"RB"}
    if w.endswith("ing") and len(w) > 5:
        return {"VBG", "NN"}
    if w.endswith("ed") and len(w) > 4:
        return {"VBN", "JJ"}
    if w.endswith(("ous", "ful", "ive", "al", "ic", "less", "ish", "able", "y")) and len(w) > 4:
        return {"JJ"}
    if w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        return {"NNS"}
    return {"NN"}


def _mark_multiword_preps(low, tags):
    """Tag every token of a multiword preposition ("in front of") IN, longest match first, left to right."""
    i = 0
    while i < len(low):
        mw = next((m for m in _MULTI_PREP if low[i:i + len(m)] == m), None)
        if mw:
            tags[i:i + len(mw)] = ["IN"] * len(mw)
        i += len(mw) if mw else 1
    return tags


class RuleTagger:
    """Deterministic Penn tagger for caption English (spec 3.3): closed classes, lexicon, suffix rules, then
    left-to-right disambiguation of ambiguous words by their neighbours.  Used when nltk's tagger data
    (averaged_perceptron_tagger_eng) is not installed -- the usual case offline."""

    name = "rule"

    def tag(self, tokens):
        low = [t.lower() for t in tokens]
        tags = _mark_multiword_preps(low, [None] * len(tokens))
        cands = [None if tags[i] else self._candidates(w) for i, w in enumerate(low)]
        for i, w in enumerate(low):
            if tags[i] is None:
                tags[i] = self._choose(cands[i], tags[i - 1] if i else None, low[i - 1] if i else None,
                                       cands[i + 1] if i + 1 < len(low) else None, w)
        for i in range(len(low) - 1):  # "to" before a noun phrase is a preposition, before a verb TO
            if tags[i] == "TO" and tags[i + 1] in ("DT", "PRP$", "CD", "NN", "NNS", "JJ", "PRP"):
                tags[i] = "IN"
        return tags

    @staticmethod
    def _candidates(w):
        if w in _CLOSED:
            return {_CLOSED[w]}
        if not any(c.isalnum() for c in w):
            return {"."}
        return set(_LEXICON.get(w) or _suffix_tags(w))

    @staticmethod
    def _choose(c, prev, prev_word, nxt, w):
        if len(c) == 1:
            return next(iter(c))
        nouns = sorted(t for t in c if t.startswith("NN"))
        verbs = sorted((t for t in c if t.startswith("VB")), key=lambda t: ["VBG", "VBZ", "VBN", "VBD", "VB"].index(t))
        adj = "JJ" in c
        next_nounish = bool(nxt) and any(t.startswith("NN") or t == "JJ" for t in nxt) and not (
            nxt and any(t in ("IN", "DT", "TO", "CC", ".") for t in nxt))
        next_det = bool(nxt) and any(t in ("DT", "PRP$", "CD") for t in nxt)
        if prev_word in _AUX and prev != "POS" and adj and not w.endswith(("ing", "ed")):
            return "JJ"  # "the kitchen is clean"
        if prev in ("MD", "TO") or (prev_word in _AUX and prev != "POS"):
            if verbs:  # "is sitting", "to eat", "are parked"
                return verbs[0] if prev != "MD" and prev != "TO" else ("VB" if "VB" in c else verbs[0])
        if prev in ("NNS", "PRP") and "VB" in c and not next_nounish:
            return "VBP"  # plural subject + base form: "dwellers walk by"
        if prev in ("DT", "CD", "PRP$", "JJ", "POS", "IN", "NN") and next_nounish:
            if adj:
                return "JJ"  # "a square table", "the white shirt"
            if nouns:
                return nouns[0]  # compound modifier: "a fire hydrant" (spaCy tags it NN too)
        if prev in ("DT", "CD", "PRP$", "JJ", "POS", "IN", None, "CC") and nouns and not (
                prev in (None, "CC") and verbs and next_det):
            return nouns[0]
        if prev in ("NN", "NNS", "PRP", "EX", "RB") and verbs and (
                w.endswith(("s", "ing", "ed")) or next_det or not nouns):
            return verbs[0]  # "a dog runs", "man riding a", "cat sits"
        if verbs and next_det:
            return verbs[0]
        if nouns:
            return nouns[0]
        if adj:
            return "JJ"
        return verbs[0] if verbs else sorted(c)[0]


class NltkTagger:
    """nltk's averaged perceptron (Penn tags) when its data is installed; multiword prepositions as above."""

    name = "nltk"

    def tag(self, tokens):
        import nltk
        return _mark_multiword_preps([t.lower() for t in tokens], [t for _, t in nltk.pos_tag(tokens)])


def make_tagger(kind="auto"):
    if kind in ("auto", "nltk"):
        try:
            import nltk
            nltk.data.find("taggers/averaged_perceptron_tagger_eng")
            return NltkTagger()
        except (ImportError, LookupError):
            if kind == "nltk":
                raise RuntimeError("--tagger nltk: nltk tagger data 'averaged_perceptron_tagger_eng' is not "
                                   "installed (python -m nltk.downloader averaged_perceptron_tagger_eng)")
    return RuleTagger()


def _norm_caption(s):
    """The authors' equality filter: drop '.' and ',', collapse spaces (and case, ours)."""
    return re.sub(r"\s+", " ", s.replace(".", "").replace(",", "")).strip().lower()


def noun_chunks(coarse_tags):
    """Maximal spans DET? NUM? (ADJ|NOUN)* NOUN -> list of (start, end)."""
    spans, i, n = [], 0, len(coarse_tags)
    while i < n:
        j = i + (coarse_tags[i] == "DET")
        j += j < n and coarse_tags[j] == "NUM"
        k = j
        while k < n and coarse_tags[k] in ("ADJ", "NOUN"):
            k += 1
        last = max((m for m in range(j, k) if coarse_tags[m] == "NOUN"), default=None)
        if last is not None:
            spans.append((i, last + 1))
            i = last + 1
        else:
            i += 1
    return spans


def verb_phrases(coarse_tags):
    """Non-overlapping matches of VERB? ADV* AUX* VERB+ (the authors' spaCy Matcher pattern)."""
    spans, i, n = [], 0, len(coarse_tags)
    while i < n:
        j = i + (coarse_tags[i] == "VERB")
        while j < n and coarse_tags[j] == "ADV":
            j += 1
        while j < n and coarse_tags[j] == "AUX":
            j += 1
        k = j
        while k < n and coarse_tags[k] == "VERB":
            k += 1
        if k > j:
            spans.append((i, k))
            i = k
        elif i < n and coarse_tags[i] == "VERB" and j == i + 1:  # a single VERB matched by "VERB+"
            spans.append((i, i + 1))
            i += 1
        else:
            i += 1
    return spans


SWAP_TYPES = ("noun_chunk", "verb_phrase", "NN", "NNS", "ADV", "ADJ")


def hard_negatives(caption, tagger, seed=0):
    """Up to six hard negative captions (the authors' script, spec 3.1): swap two noun chunks of > 2 words,
    two verb phrases, two NN, two NNS, two adverbs, two adjectives.  -> list of (type, negative).
    Deterministic given (caption, seed).  Swaps equal to the caption after the filter are dropped."""
    rng = random.Random(f"{seed}|{caption}")  # str seeds hash with sha512: stable across runs
    tokens = tokenize(caption)
    if len(tokens) < 2:
        return []
    tags = tagger.tag(tokens)
    ctags = [coarse(t, g) for t, g in zip(tokens, tags)]
    out, seen = [], {_norm_caption(caption)}

    def keep(kind, new_tokens, lower):
        s = " ".join(new_tokens)
        s = s.lower() if lower else s
        if _norm_caption(s) not in seen:
            seen.add(_norm_caption(s))
            out.append((kind, s))

    def swap_spans(spans, kind):
        if len(spans) < 2:
            return
        (a0, a1), (b0, b1) = sorted(rng.sample(spans, 2))
        if [t.lower() for t in tokens[a0:a1]] == [t.lower() for t in tokens[b0:b1]]:
            return  # ours: swapping "a man" with "a man" is no negative
        keep(kind, tokens[:a0] + tokens[b0:b1] + tokens[a1:b0] + tokens[a0:a1] + tokens[b1:], lower=True)

    chunk_tags = ["DET" if g == "PRP$" else c for g, c in zip(tags, ctags)]  # "his skateboard" is a chunk
    swap_spans([s for s in noun_chunks(chunk_tags) if s[1] - s[0] > 2], "noun_chunk")
    swap_spans(verb_phrases(ctags), "verb_phrase")
    for kind in ("NN", "NNS", "ADV", "ADJ"):
        if kind == "ADV":
            idx = [i for i, c in enumerate(ctags) if c == "ADV"]
        elif kind == "ADJ":
            idx = [i for i, c in enumerate(ctags) if c == "ADJ"]
        else:
            idx = [i for i, g in enumerate(tags) if g == kind]
        if len(idx) < 2:
            continue
        a, b = rng.sample(idx, 2)
        if tokens[a].lower() == tokens[b].lower():
            continue
        new = list(tokens)
        new[a], new[b] = new[b], new[a]
        keep(kind, new, lower=False)
    return out


# --- ARO order perturbations (evaluation only; ARO perturbations.py re-done with our tokeniser/tagger)

def pre_caption(caption, max_words=30):
    """BLIP/ARO caption normalisation: lowercase, punctuation . ! " ( ) * # : ; ~ -> space, first 30 words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def _trigrams(tokens):
    return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


def shuffle_nouns_and_adj(caption, tagger, rng):
    tokens = tokenize(caption)
    tags = tagger.tag(tokens)
    for group in (("NN", "NNS", "NNP", "NNPS"), ("JJ", "JJR", "JJS")):
        idx = [i for i, t in enumerate(tags) if t in group]
        vals = [tokens[i] for i in idx]
        rng.shuffle(vals)
        for i, v in zip(idx, vals):
            tokens[i] = v
    return " ".join(tokens)


def shuffle_allbut_nouns_and_adj(caption, tagger, rng):
    tokens = tokenize(caption)
    tags = tagger.tag(tokens)
    idx = [i for i, t in enumerate(tags) if not t.startswith(("NN", "JJ"))]
    vals = [tokens[i] for i in idx]
    rng.shuffle(vals)
    for i, v in zip(idx, vals):
        tokens[i] = v
    return " ".join(tokens)


def shuffle_within_trigrams(caption, tagger, rng):
    tris = _trigrams(tokenize(caption))
    for t in tris:
        rng.shuffle(t)
    return " ".join(w for t in tris for w in t)


def shuffle_trigrams(caption, tagger, rng):
    tris = _trigrams(tokenize(caption))
    rng.shuffle(tris)
    return " ".join(w for t in tris for w in t)


ORDER_PERTURBATIONS = (shuffle_nouns_and_adj, shuffle_allbut_nouns_and_adj, shuffle_within_trigrams,
                       shuffle_trigrams)


# --- training records and the NegCLIP TSV (columns: <index>, title, filepath, neg_caption, neg_image)

def read_training_records(path, all_captions=False):
    """-> list of {"image", "caption", "image_id"}: one caption per image (the first) unless all_captions.
    Accepts canonical pairs (.jsonl), a BLIP/Karpathy per-caption list ({"image", "caption", "image_id"}),
    or a Karpathy dataset_*.json (train + restval splits)."""
    if path.endswith(".jsonl"):
        recs = [{"image": r["image"], "captions": r["captions"], "image_id": r.get("image_id", r["image"])}
                for r in read_pairs(path)]
    else:
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and "images" in data:  # Karpathy dataset_coco.json
            recs = [{"image": os.path.join(im.get("filepath", ""), im["filename"]),
                     "captions": [s["raw"].strip() for s in im["sentences"]],
                     "image_id": im.get("cocoid", im["imgid"])}
                    for im in data["images"] if im["split"] in ("train", "restval")]
        elif isinstance(data, list):
            by_id = {}
            for i, r in enumerate(data):
                for k in ("image", "caption"):
                    if k not in r:
                        raise DataError(f"{path}: record {i}: missing field '{k}'")
                caps = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
                e = by_id.setdefault(r.get("image_id", r["image"]), {"image": r["image"], "captions": []})
                e["captions"] += [c.strip() for c in caps]
            recs = [{"image": e["image"], "captions": e["captions"], "image_id": k} for k, e in by_id.items()]
        else:
            raise DataError(f"{path}: expected a JSON list or a Karpathy dataset file")
    out = []
    for r in recs:
        for c in (r["captions"] if all_captions else r["captions"][:1]):
            out.append({"image": r["image"], "caption": c, "image_id": str(r["image_id"])})
    if not out:
        raise DataError(f"{path}: no training records")
    return out


def write_negclip_tsv(path, rows):
    """Tab-separated like the released train_neg_clip.tsv (pandas to_csv: index column, list literals);
    an extra image_id column (readers pick columns by name)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["", "title", "filepath", "neg_caption", "neg_image", "image_id"])
        for i, r in enumerate(rows):
            w.writerow([i, r["caption"], r["image"], repr(list(r["negs"])), repr([int(j) for j in r["nbrs"]]),
                        r["image_id"]])
    os.replace(tmp, path)


def read_negclip_tsv(path):
    """-> list of {"caption", "image", "negs": [str], "nbrs": [row index], "image_id"}."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for line, r in enumerate(reader, 2):
            try:
                negs, nbrs = ast.literal_eval(r["neg_caption"]), ast.literal_eval(r["neg_image"])
                title, fp = r["title"], r["filepath"]
            except KeyError as e:
                raise DataError(f"{path}:{line}: missing field {e}") from None
            except (ValueError, SyntaxError):
                raise DataError(f"{path}:{line}: field 'neg_caption'/'neg_image' is not a list literal") from None
            rows.append({"caption": title, "image": fp, "negs": list(negs), "nbrs": [int(j) for j in nbrs],
                         "image_id": r.get("image_id") or fp})
    if not rows:
        raise DataError(f"{path}: no rows (empty dataset)")
    return rows


def filter_rows(rows, image_root, max_bad_frac=0.05):
    """Drop rows whose image file is missing or that have no negative caption; remap neighbour indices
    (a neighbour that was dropped is removed; a row left without neighbours is dropped)."""
    exists = [os.path.isfile(os.path.join(image_root, r["image"])) for r in rows]
    missing = [r["image"] for r, e in zip(rows, exists) if not e]
    if len(missing) > max_bad_frac * len(rows):
        raise DataError(f"{len(missing)} of {len(rows)} training images missing under {image_root} "
                        f"(e.g. {missing[0]})")
    ok = [bool(r["negs"]) and e for r, e in zip(rows, exists)]
    changed = True
    while changed:  # dropping rows can empty others' neighbour lists
        changed = False
        for i, r in enumerate(rows):
            if ok[i] and not any(ok[j] for j in r["nbrs"] if 0 <= j < len(rows)):
                ok[i], changed = False, True
    new_index = np.cumsum(ok) - 1
    out = []
    for i, r in enumerate(rows):
        if ok[i]:
            out.append(dict(r, nbrs=[int(new_index[j]) for j in r["nbrs"] if 0 <= j < len(rows) and ok[j]]))
    if not out:
        raise DataError(f"no usable training rows under {image_root}")
    return out, len(rows) - len(out)


class Batches(torch.utils.data.Dataset):
    """Item k = micro batch (step, a) of this rank: the NegCLIP layout of spec Sec. 5, built deterministically
    from (seed, step), so resume and any world size see the same global batch.

    Step s of epoch e takes rows perm_e[j*G:(j+1)*G] (G = global batch); the accumulation slice a and rank r
    take their contiguous b rows.  Per row, vectorised: one hard caption of t, one neighbour image x' (its
    caption t') and one hard caption of t', each drawn uniformly (fresh every time a row is loaded).
    """

    def __init__(self, rows, image_root, tokenizer, size, mean, std, cfg, world, rank, steps_per_epoch,
                 hn_start):
        self.rows, self.root, self.tok, self.cfg = rows, image_root, tokenizer, cfg
        self.size, self.mean, self.std = size, mean, std
        self.world, self.rank, self.spe, self.hn_start = world, rank, steps_per_epoch, hn_start
        self.accum = cfg.global_batch // (cfg.micro_batch * world)
        # CSR layout of the ragged negative / neighbour lists (vectorised choice below)
        self.neg_flat = [n for r in rows for n in r["negs"]]
        self.neg_off = np.cumsum([0] + [len(r["negs"]) for r in rows])
        self.nbr_flat = np.array([j for r in rows for j in r["nbrs"]], dtype=np.int64)
        self.nbr_off = np.cumsum([0] + [len(r["nbrs"]) for r in rows])
        ids = {}
        self.image_ids = np.array([ids.setdefault(r["image_id"], len(ids)) for r in rows], dtype=np.int64)

    def __len__(self):
        return 10 ** 12  # indexed by global (step, micro) position; the sampler bounds it

    def _pick(self, off, rows, u):
        counts = off[rows + 1] - off[rows]
        return off[rows] + np.minimum((u * counts).astype(np.int64), counts - 1)

    def step_rows(self, step):
        """Global rows of a step and the per-row draws, identical on every rank."""
        epoch, j = divmod(step, self.spe)
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.rows))
        rows = perm[j * self.cfg.global_batch:(j + 1) * self.cfg.global_batch]
        u = np.random.default_rng([self.cfg.seed, epoch, step, 1]).random((3, len(rows)))
        nbr = self.nbr_flat[self._pick(self.nbr_off, rows, u[1])]
        neg = self._pick(self.neg_off, rows, u[0])
        nbr_neg = self._pick(self.neg_off, nbr, u[2])
        return rows, nbr, neg, nbr_neg

    def _image(self, i, step, slot):
        path = os.path.join(self.root, self.rows[i]["image"])
        img = load_image(path)
        if img is None:
            raise DataError(f"{path}: unreadable image (row {i})")
        rng = random.Random(f"{self.cfg.seed}|{step}|{slot}")  # augmentation independent of world size
        return ImageTransform(self.size, train=True, mean=self.mean, std=self.std,
                              scale=(self.cfg.crop_scale_min, 1.0), rng=rng)(img)

    def __getitem__(self, k):
        step, a = divmod(k, self.accum)
        rows, nbr, neg, nbr_neg = self.step_rows(step)
        b = self.cfg.micro_batch
        lo = (a * self.world + self.rank) * b
        sl = slice(lo, lo + b)
        hard = self.cfg.hard_negatives and step >= self.hn_start
        img_rows = list(rows[sl]) + (list(nbr[sl]) if hard else [])
        slots = list(range(lo, lo + b)) + ([f"n{j}" for j in range(lo, lo + b)] if hard else [])
        texts = [self.rows[i]["caption"] for i in img_rows]
        if hard:
            texts += [self.neg_flat[j] for j in neg[sl]] + [self.neg_flat[j] for j in nbr_neg[sl]]
        tok = self.tok(texts, padding="max_length", truncation=True, max_length=self.cfg.max_text_len,
                       return_tensors="pt")
        img_ids = torch.from_numpy(self.image_ids[img_rows])
        txt_ids = torch.cat([img_ids, torch.full((len(texts) - len(img_rows),), -1, dtype=torch.long)])
        return {"pixels": torch.stack([self._image(i, step, s) for i, s in zip(img_rows, slots)]),
                "ids": tok["input_ids"], "mask": tok["attention_mask"], "img_ids": img_ids, "txt_ids": txt_ids,
                "hard": hard, "step": step}


# ----------------------------------------------------------------------------------------------------------
# Eval: one scoring engine (cosine of cached embeddings), one reader + one scorer per benchmark
# ----------------------------------------------------------------------------------------------------------

class Scorer:
    """Embeds every unique image (path, crop box) and caption once, sharded over ranks, and scores pairs."""

    def __init__(self, model, tok, size, mean, std, cfg, dist, dtype):
        self.model, self.tok, self.cfg, self.dist, self.dtype = model, tok, cfg, dist, dtype
        self.transform = ImageTransform(size, mean=mean, std=std)
        self.img_cache, self.txt_cache, self.unreadable = {}, {}, 0

    def _sharded(self, items, fn, desc):
        idx = D.shard_indices(len(items), self.dist)
        out = []
        bs = self.cfg.eval_batch
        for s in progress(range(0, len(idx), bs), self.dist.is_main, desc=desc):
            out.append(fn([items[i] for i in idx[s:s + bs]]))
        local = torch.cat(out) if out else torch.zeros(0)
        parts = D.all_gather_object(local)
        return torch.cat([p for p in parts if p.numel()]) if any(p.numel() for p in parts) else local

    @torch.no_grad()
    def _embed_images(self, refs):
        xs, ok = [], []
        for path, box in refs:
            img = load_image(path)
            if img is not None and box is not None:  # ARO / CREPE: crop to the region first
                x, y, w, h = box
                img = img.crop((int(x), int(y), int(x + w), int(y + h)))
            ok.append(img is not None)
            xs.append(self.transform(img) if img is not None else torch.zeros(3, self.transform.size,
                                                                                 self.transform.size))
        with amp.autocast(self.dist.device, self.dtype):
            e = self.model.encode_image(torch.stack(xs).to(self.dist.device)).float().cpu()
        e[~torch.tensor(ok)] = float("nan")  # unreadable images score NaN; benchmarks skip those cases
        return e

    @torch.no_grad()
    def _embed_texts(self, texts):
        t = self.tok(texts, padding=True, truncation=True, max_length=self.cfg.max_text_len, return_tensors="pt")
        with amp.autocast(self.dist.device, self.dtype):
            return self.model.encode_text(t["input_ids"].to(self.dist.device),
                                          t["attention_mask"].to(self.dist.device)).float().cpu()

    def images(self, refs):
        new = sorted({r for r in refs if r not in self.img_cache}, key=str)
        if new:
            for r, e in zip(new, self._sharded(new, self._embed_images, "images")):
                self.img_cache[r] = e
            self.unreadable += sum(bool(torch.isnan(self.img_cache[r]).any()) for r in new)
        return torch.stack([self.img_cache[r] for r in refs])

    def texts(self, texts):
        new = sorted({t for t in texts if t not in self.txt_cache})
        if new:
            for t, e in zip(new, self._sharded(new, self._embed_texts, "texts")):
                self.txt_cache[t] = e
        return torch.stack([self.txt_cache[t] for t in texts])

    def pair_scores(self, refs, texts):
        """s(image_k, text_k) for aligned lists -> (K,) numpy (NaN where the image is unreadable)."""
        return (self.images(refs) * self.texts(texts)).sum(-1).numpy()


# --- scoring rules (pure functions on score arrays; strict ">" everywhere, ties count as wrong)

VG_R_EXCLUDED = set("""adjusting;attached to;between;bigger than;biting;boarding;brushing;chewing;cleaning;climbing;
close to;coming from;coming out of;contain;crossing;dragging;draped over;drinking;drinking from;driving;driving down;
driving on;eating from;eating in;enclosing;exiting;facing;filled with;floating in;floating on;flying;flying above;
flying in;flying over;flying through;full of;going down;going into;going through;grazing in;growing in;growing on;
guiding;hanging from;hanging in;hanging off;hanging over;higher than;holding onto;hugging;in between;jumping off;
jumping on;jumping over;kept in;larger than;leading;leaning over;leaving;licking;longer than;looking in;looking into;
looking out;looking over;looking through;lying next to;lying on top of;making;mixed with;mounted on;moving;
on the back of;on the edge of;on the front of;on the other side of;opening;painted on;parked at;parked beside;
parked by;parked in;parked in front of;parked near;parked next to;perched on;petting;piled on;playing;playing in;
playing on;playing with;pouring;reaching for;reading;reflected on;riding on;running in;running on;running through;
seen through;sitting behind;sitting beside;sitting by;sitting in front of;sitting near;sitting next to;sitting under;
skiing down;skiing on;sleeping in;sleeping on;smiling at;sniffing;splashing;sprinkled on;stacked on;standing against;
standing around;standing behind;standing beside;standing in front of;standing near;standing next to;staring at;
stuck in;surrounding;swimming in;swinging;talking to;topped with;touching;traveling down;traveling on;tying;typing on;
underneath;wading in;waiting for;walking across;walking by;walking down;walking next to;walking through;working in;
working on;worn on;wrapped around;wrapped in;by;of;near;next to;with;beside;on the side of;around""".replace(
    "\n", " ").split(";"))
VG_R_EXCLUDED = {s.strip() for s in VG_R_EXCLUDED}


def macro_accuracy(correct, groups, min_count=1, exclude=()):
    """Mean over groups (with >= min_count cases, not excluded) of the group's accuracy."""
    acc = {}
    for c, g in zip(correct, groups):
        acc.setdefault(g, []).append(c)
    kept = [np.mean(v) for g, v in acc.items() if g not in exclude and len(v) >= min_count]
    return float(np.mean(kept)) if kept else float("nan"), len(kept)


def score_vg(pos, neg, groups, min_count=1, exclude=()):
    """ARO VG-Relation / VG-Attribution: correct iff s(true) > s(false); macro as the paper, micro too."""
    correct = np.asarray(pos) > np.asarray(neg)
    macro, n_groups = macro_accuracy(correct, groups, min_count, exclude)
    return {"macro": macro, "micro": float(correct.mean()), "n": int(len(correct)), "groups": n_groups}


def score_order(scores):
    """(N, 5) scores, column 0 = the original caption -> Precision@1 (argmax takes the first index on ties,
    so as in the ARO code a tie counts as right here)."""
    return float((np.argmax(np.asarray(scores), axis=1) == 0).mean())


def score_sugarcrepe(per_file):
    """{category: (pos, neg)} -> per-category accuracy, micro REPLACE/SWAP/ADD (maintainers, issue #3), macro."""
    out, pooled = {}, {}
    for cat, (pos, neg) in per_file.items():
        c = np.asarray(pos) > np.asarray(neg)
        out[cat] = float(c.mean())
        pooled.setdefault(cat.split("_")[0], []).append(c)
    for group, cs in pooled.items():
        out[f"{group.upper()}_micro"] = float(np.concatenate(cs).mean())
    out["macro"] = float(np.mean([out[c] for c in per_file]))
    return out


def crepe_ranks(true_scores, neg_scores):
    """0-based rank of the true caption among [true] + negatives; ties count against it (strict ">")."""
    return np.array([int((np.asarray(n) >= t).sum()) for t, n in zip(true_scores, neg_scores)])


def score_crepe(ranks, ks=(1, 3, 5, 10)):
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float((ranks < k).mean()) for k in ks}
    out.update({f"R@{k}_std": float((ranks < k).std()) for k in ks})
    out.update({"mean_rank": float((ranks + 1).mean()), "median_rank": float(np.median(ranks + 1)),
                "n": int(len(ranks))})
    return out


def score_svo(pos, neg, kinds):
    """Pairwise accuracy s(sentence, pos image) > s(sentence, neg image), overall and per negative type."""
    c = np.asarray(pos) > np.asarray(neg)
    kinds = np.asarray(kinds)
    out = {"pairwise": float(c.mean()) if len(c) else float("nan"), "n": int(len(c))}
    for k in ("subj", "verb", "obj"):
        if (kinds == k).any():
            out[k] = float(c[kinds == k].mean())
    return out


def score_winoground(s):
    """s (N, 2, 2) with s[n, c, i] = score(caption_c, image_i) -> text / image / group scores (Thrush et al.)."""
    s = np.asarray(s)
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {"text": float(text.mean()), "image": float(image.mean()), "group": float((text & image).mean()),
            "n": int(len(s))}


# --- benchmark readers in their published layouts

def _load_json(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path) as f:
        return json.load(f)


def read_aro_vg(path):
    """visual_genome_{relation,attribution}.json: list of records; the true/false captions are found by field
    name (some re-formatted copies reorder them), boxes (bbox_x, bbox_y, bbox_w, bbox_h) crop the image."""
    recs = _load_json(path)
    for i, r in enumerate(recs):
        for k in ("image_path", "true_caption", "false_caption", "bbox_x", "bbox_y", "bbox_w", "bbox_h"):
            if k not in r:
                raise DataError(f"{path}: record {i}: missing field '{k}'")
    return recs


def read_caption_sets(path):
    """-> list of (image path, [raw captions]) from pairs .jsonl | BLIP test .json (list of {"image",
    "caption": [..]}, one entry per image) | NegCLIP .tsv (title, filepath; grouped by image)."""
    if path.endswith(".tsv"):
        recs = {}
        for r in read_negclip_tsv(path):
            recs.setdefault(r["image"], []).append(r["caption"])
        return list(recs.items())
    if path.endswith(".jsonl"):
        return [(r["image"], r["captions"]) for r in read_pairs(path)]
    out = []
    for i, r in enumerate(_load_json(path)):
        if "image" not in r or "caption" not in r:
            raise DataError(f"{path}: record {i}: missing field 'image' or 'caption'")
        out.append((r["image"], r["caption"] if isinstance(r["caption"], list) else [r["caption"]]))
    return out


def read_retrieval(path):
    """-> (image paths, captions, txt2img, img2txts); captions normalised as in ARO's retrieval code."""
    images, texts, txt2img, img2txts = [], [], [], []
    for i, (image, caps) in enumerate(read_caption_sets(path)):
        images.append(image)
        img2txts.append([])
        for c in caps:
            img2txts[-1].append(len(texts))
            texts.append(pre_caption(c))
            txt2img.append(i)
    return images, texts, txt2img, img2txts


def read_sugarcrepe(folder):
    """{category: list of (filename, caption, negative_caption)}; keys are string indices with gaps."""
    out = {}
    for cat in ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att"):
        d = _load_json(os.path.join(folder, f"{cat}.json"))
        out[cat] = [(r["filename"], r["caption"], r["negative_caption"]) for r in d.values()]
    return out


def read_crepe(folder):
    """prod_hard_negatives/<type>/prod_vg_hard_negs_<type>_complexity_<n>.csv -> {(type, n): rows};
    hard_negs is a Python list *or set* literal (sets have no order, so they are sorted)."""
    out = {}
    base = os.path.join(folder, "prod_hard_negatives")
    if not os.path.isdir(base):
        raise DataError(f"{base}: folder not found")
    for typ in sorted(os.listdir(base)):
        for name in sorted(os.listdir(os.path.join(base, typ))):
            m = re.fullmatch(rf"prod_vg_hard_negs_{re.escape(typ)}_complexity_(\d+)\.csv", name)
            if not m:
                continue
            path = os.path.join(base, typ, name)
            rows = []
            with open(path, newline="", encoding="utf-8") as f:
                for line, r in enumerate(csv.DictReader(f), 2):
                    try:
                        negs = ast.literal_eval(r["hard_negs"])
                        box = tuple(float(r[k]) for k in ("x", "y", "width", "height"))
                        rows.append({"image_id": r["image_id"], "caption": r["caption"], "box": box,
                                     "negs": sorted(negs) if isinstance(negs, set) else list(negs)})
                    except KeyError as e:
                        raise DataError(f"{path}:{line}: missing field {e}") from None
            out[(typ, int(m.group(1)))] = rows
    if not out:
        raise DataError(f"{base}: no prod_vg_hard_negs_*_complexity_*.csv files")
    return out


def _crepe_image(folder, image_id):
    for sub in ("VG_100K", "VG_100K_2"):
        p = os.path.join(folder, sub, f"{image_id}.jpg")
        if os.path.isfile(p):
            return p
    return os.path.join(folder, "VG_100K", f"{image_id}.jpg")


def read_svo(path):
    """svo_probes.csv read by column name; neg_triplet may be a list literal; keeps rows with exactly one
    *_neg flag true.  -> list of {"sentence", "pos_image_id", "neg_image_id", "kind"}."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for line, r in enumerate(csv.DictReader(f), 2):
            try:
                flags = [str(r[f"{k}_neg"]).strip().lower() == "true" for k in ("subj", "verb", "obj")]
                if sum(flags) != 1:
                    continue
                rows.append({"sentence": r["sentence"], "pos_image_id": r["pos_image_id"],
                             "neg_image_id": r["neg_image_id"], "kind": ("subj", "verb", "obj")[flags.index(True)]})
            except KeyError as e:
                raise DataError(f"{path}:{line}: missing field {e}") from None
    return rows


def read_winoground(path):
    recs = []
    with open(path) as f:
        for line, s in enumerate(f, 1):
            if s.strip():
                r = json.loads(s)
                for k in ("id", "caption_0", "caption_1", "image_0", "image_1"):
                    if k not in r:
                        raise DataError(f"{path}:{line}: missing field '{k}'")
                recs.append(r)
    return recs


# --- benchmark runners (readers + scorer + scoring rule)

def _finite(*arrays):
    keep = np.all([np.isfinite(a) for a in arrays], axis=0)
    return keep


def eval_retrieval(sc, path, image_root):
    from common.metrics import retrieval_recall
    images, texts, txt2img, img2txts = read_retrieval(path)
    img = sc.images([(os.path.join(image_root, p), None) for p in images])  # (N_img, D)
    ok = ~torch.isnan(img).any(1)  # unreadable images leave the set together with their captions
    keep_txt = [j for j, i in enumerate(txt2img) if ok[i]]
    new_id = (torch.cumsum(ok.long(), 0) - 1).tolist()
    sim = img[ok] @ sc.texts([texts[j] for j in keep_txt]).t()  # (N_img, N_txt)
    pos = {j: n for n, j in enumerate(keep_txt)}
    return retrieval_recall(sim.numpy(), [new_id[txt2img[j]] for j in keep_txt],
                            [[pos[j] for j in ts] for i, ts in enumerate(img2txts) if ok[i]])


def eval_aro(sc, root, cfg):
    out = {}
    for name, group_of, kw in (
            ("vg_relation", lambda r: r["relation_name"], {"exclude": VG_R_EXCLUDED}),
            ("vg_attribution", lambda r: "_".join(r["attributes"]), {"min_count": cfg.aro_min_pair_count})):
        recs = read_aro_vg(os.path.join(root, "aro", f"visual_genome_{name.split('_')[1]}.json"))
        refs = [(os.path.join(root, "aro", "images", r["image_path"]),
                 (r["bbox_x"], r["bbox_y"], r["bbox_w"], r["bbox_h"])) for r in recs]
        pos = sc.pair_scores(refs, [r["true_caption"] for r in recs])
        neg = sc.pair_scores(refs, [r["false_caption"] for r in recs])
        keep = _finite(pos, neg)
        res = score_vg(pos[keep], neg[keep], [group_of(r) for r, k in zip(recs, keep) if k], **kw)
        out.update({f"{name}_{k}": v for k, v in res.items()})
    return out


def eval_order(sc, path, image_root, cfg, tagger):
    """COCO-/Flickr30k-Order: 5 options per (image, caption); P@1 mean +- std over cfg.order_seeds draws."""
    refs, caps = [], []
    for img, cs in read_caption_sets(path):
        for c in cs:
            refs.append((os.path.join(image_root, img), None))
            caps.append(c)
    img_emb = sc.images(refs)  # (K, D)
    p1 = []
    for seed in range(cfg.order_seeds):
        rng = random.Random(seed)
        options = [[pre_caption(c)] + [pre_caption(f(c, tagger, rng)) for f in ORDER_PERTURBATIONS] for c in caps]
        txt = sc.texts([o for opts in options for o in opts]).reshape(len(caps), 5, -1)  # (K, 5, D)
        s = torch.einsum("kd,kod->ko", img_emb, txt).numpy()
        keep = np.isfinite(s).all(1)
        p1.append(score_order(s[keep]))
    name = "flickr30k_order" if "flickr" in os.path.basename(path) else "coco_order"
    return {f"{name}_p1": float(np.mean(p1)), f"{name}_p1_std": float(np.std(p1)), f"{name}_n": len(caps)}


def eval_sugarcrepe(sc, root):
    data = read_sugarcrepe(os.path.join(root, "sugarcrepe"))
    per = {}
    for cat, rows in data.items():
        refs = [(os.path.join(root, "sugarcrepe", "val2017", fn), None) for fn, _, _ in rows]
        pos = sc.pair_scores(refs, [c for _, c, _ in rows])
        neg = sc.pair_scores(refs, [n for _, _, n in rows])
        keep = _finite(pos, neg)
        per[cat] = (pos[keep], neg[keep])
    return score_sugarcrepe(per)


def eval_crepe(sc, root):
    out, ranks_by_type = {}, {}
    data = read_crepe(os.path.join(root, "crepe"))
    sc.images([(_crepe_image(os.path.join(root, "crepe"), r["image_id"]), r["box"]) for rows in data.values()
               for r in rows])  # embed everything in a few large batches first (cached)
    sc.texts([t for rows in data.values() for r in rows for t in [r["caption"], *r["negs"]]])
    for (typ, n), rows in data.items():
        img = sc.images([(_crepe_image(os.path.join(root, "crepe"), r["image_id"]), r["box"]) for r in rows])
        true = (img * sc.texts([r["caption"] for r in rows])).sum(-1).numpy()  # (K,)
        negs = [(img[k:k + 1] * sc.texts(r["negs"])).sum(-1).numpy() for k, r in enumerate(rows)]
        keep = np.isfinite(true)
        ranks = crepe_ranks(true[keep], [x for x, k in zip(negs, keep) if k])
        res = score_crepe(ranks)
        out.update({f"{typ}_c{n}_{k}": v for k, v in res.items() if not k.endswith("_std")})
        ranks_by_type.setdefault(typ, []).extend(ranks.tolist())
    out.update({f"{typ}_R@1": float(np.mean(np.asarray(v) < 1)) for typ, v in ranks_by_type.items()})
    return out


def eval_svo(sc, root):
    folder = os.path.join(root, "svo_probes")
    rows = read_svo(os.path.join(folder, "svo_probes.csv"))
    img = lambda i: os.path.join(folder, "images", f"{i}.jpg")
    have = [r for r in rows if os.path.isfile(img(r["pos_image_id"])) and os.path.isfile(img(r["neg_image_id"]))]
    if not have:
        raise DataError(f"{folder}/images: none of the {len(rows)} SVO image pairs is present")
    pos = sc.pair_scores([(img(r["pos_image_id"]), None) for r in have], [r["sentence"] for r in have])
    neg = sc.pair_scores([(img(r["neg_image_id"]), None) for r in have], [r["sentence"] for r in have])
    keep = _finite(pos, neg)
    out = score_svo(pos[keep], neg[keep], [r["kind"] for r, k in zip(have, keep) if k])
    out["coverage"] = len(have) / len(rows)  # many SVO URLs are dead (svo_probes issue #1)
    return out


def eval_winoground(sc, root):
    folder = os.path.join(root, "winoground")
    recs = read_winoground(os.path.join(folder, "examples.jsonl"))
    refs = [(os.path.join(folder, "images", f"{r[f'image_{i}']}.png"), None) for r in recs for i in (0, 1)]
    img = sc.images(refs).reshape(len(recs), 2, -1)  # (N, 2, D)
    txt = sc.texts([r[f"caption_{c}"] for r in recs for c in (0, 1)]).reshape(len(recs), 2, -1)  # (N, 2, D)
    s = torch.einsum("ncd,nid->nci", txt, img).numpy()  # (N, caption, image)
    keep = np.isfinite(s).all((1, 2))
    out = score_winoground(s[keep])
    for tag in sorted({r.get("collapsed_tag", "") for r in recs} - {""}):
        m = np.array([r.get("collapsed_tag") == tag for r in recs]) & keep
        out.update({f"{tag}_{k}": v for k, v in score_winoground(s[m]).items() if k != "n"})
    return out


def evaluate(model, tok, size, mean, std, cfg, dist, dtype, benchmarks=None, tagger=None):
    """Run the listed benchmarks -> flat {"bench/metric": value}."""
    model.eval()
    sc = Scorer(model, tok, size, mean, std, cfg, dist, dtype)
    runners = {"retrieval": lambda: eval_retrieval(sc, cfg.retrieval_file, cfg.retrieval_image_root),
               "aro": lambda: eval_aro(sc, cfg.bench_root, cfg),
               "order": lambda: eval_order(sc, cfg.order_file, cfg.order_image_root, cfg,
                                           tagger or make_tagger(cfg.tagger)),
               "sugarcrepe": lambda: eval_sugarcrepe(sc, cfg.bench_root),
               "crepe": lambda: eval_crepe(sc, cfg.bench_root), "svo": lambda: eval_svo(sc, cfg.bench_root),
               "winoground": lambda: eval_winoground(sc, cfg.bench_root)}
    res = {}
    for b in benchmarks or cfg.benchmarks:
        if b not in runners:
            raise ValueError(f"unknown benchmark {b!r}; choose from {sorted(runners)}")
        res.update({f"{b}/{k}": v for k, v in runners[b]().items()})
    if sc.unreadable:
        res["unreadable_images"] = sc.unreadable
    return res


def format_table(res):
    lines = [f"{'benchmark':<12} {'metric':<28} {'value':>9}", "-" * 51]
    for k, v in res.items():
        b, _, m = k.partition("/")
        lines.append(f"{b:<12} {m:<28} {v:>9.4f}" if isinstance(v, float) else f"{b:<12} {m:<28} {v:>9}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Train (and mine)
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def mine(cfg, model, tok, size, mean, std, dist, dtype, log):
    """Hard negative captions for every record + top-k nearest images in the frozen init model's image
    space (cosine; self and same-image rows masked by *global* index) -> NegCLIP TSV."""
    tagger = make_tagger(cfg.tagger)
    recs = read_training_records(cfg.train_file, cfg.all_captions)
    n_records = len(recs)
    counts = {t: 0 for t in SWAP_TYPES}
    for r in progress(recs, dist.is_main, desc="negatives"):
        negs = hard_negatives(r["caption"], tagger, cfg.seed)
        r["negs"] = [n for _, n in negs]
        for t, _ in negs:
            counts[t] += 1
    # embed each unique image once (sharded over ranks)
    sc = Scorer(model.eval(), tok, size, mean, std, cfg, dist, dtype)
    uniq = sorted({r["image"] for r in recs})
    emb = sc.images([(os.path.join(cfg.image_root, p), None) for p in uniq])
    bad = {p for p, e in zip(uniq, emb) if torch.isnan(e).any()}
    recs = [r for r in recs if r["image"] not in bad and r["negs"]]  # rows without any negative are dropped
    pos = {p: i for i, p in enumerate(uniq)}
    x = emb[torch.tensor([pos[r["image"]] for r in recs])].to(dist.device)  # (N, D) normalised
    x = x.half() if dist.device.type == "cuda" else x
    ids = {}
    img_id = torch.tensor([ids.setdefault(r["image_id"], len(ids)) for r in recs], device=dist.device)
    k = min(cfg.mine_k, len(recs) - 1)
    nbrs = nearest_neighbours(x, img_id, k, cfg.mine_chunk)
    for r, nb in zip(recs, nbrs.tolist()):
        r["nbrs"] = nb
    rows = [r for r in recs]
    if dist.is_main:
        write_negclip_tsv(cfg.train_tsv, rows)
        with open(cfg.train_tsv + ".summary.json", "w") as f:
            json.dump({"rows": len(rows), "dropped_no_negative_or_unreadable": n_records - len(rows),
                       "negatives_per_type": counts, "k": k,
                "tagger": tagger.name, "mine_model": cfg.clip if cfg.init == "clip" else cfg.vision}, f, indent=2)
    D.barrier()
    log.info(f"mine: {len(rows)} rows -> {cfg.train_tsv} (negatives per type {counts}, tagger {tagger.name})")
    return {"rows": len(rows), **{f"neg_{t}": c for t, c in counts.items()}}


def nearest_neighbours(x, img_id, k, chunk):
    """x (N, D) normalised, img_id (N,) -> (N, k) int32 indices of the most similar rows that are not the row
    itself and do not share its image id, computed in chunks of rows against all N (global indices)."""
    n = x.shape[0]
    out = []
    for s in range(0, n, chunk):
        sim = (x[s:s + chunk] @ x.t()).float()  # (c, N)
        rows = torch.arange(s, min(s + chunk, n), device=x.device)
        sim[torch.arange(len(rows), device=x.device), rows] = float("-inf")  # self, by global index
        sim.masked_fill_(img_id[rows][:, None] == img_id[None, :], float("-inf"))  # same image (all captions)
        out.append(sim.topk(k, dim=1).indices.int().cpu())
    return torch.cat(out)


def train(cfg, model, tok, size, mean, std, dist, dtype, log):
    world = dist.world_size
    if cfg.global_batch % (cfg.micro_batch * world):
        raise ValueError(f"global_batch {cfg.global_batch} must be a multiple of micro_batch {cfg.micro_batch} "
                         f"x world {world}")
    accum = cfg.global_batch // (cfg.micro_batch * world)
    model.to(dist.device)
    if not os.path.isfile(cfg.train_tsv):
        log.info(f"no NegCLIP TSV at {cfg.train_tsv}: mining it first")
        mine(cfg, model, tok, size, mean, std, dist, dtype, log)
    rows, dropped = filter_rows(read_negclip_tsv(cfg.train_tsv), cfg.image_root)
    spe = len(rows) // cfg.global_batch
    if spe == 0:
        raise DataError(f"{cfg.train_tsv}: {len(rows)} rows < global batch {cfg.global_batch}")
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * spe
    hn_start = cfg.hn_start_step if cfg.hn_start_step >= 0 else (0 if cfg.init == "clip" else total // 10)
    log.info(f"train: {len(rows)} rows ({dropped} dropped), {spe} steps/epoch, {total} steps, accum {accum}, "
             f"hard negatives from step {hn_start if cfg.hard_negatives else 'never'}")

    for tower, locked in ((model.vision, cfg.lock_vision), (model.text, cfg.lock_text)):
        if locked:  # frozen towers: bf16 on GPU, eval mode, run under no_grad outside DDP
            tower.to(amp.frozen_dtype(dist.device, dtype)).eval()
    # open_clip: weight decay on matrices only (not biases, norms, logit_scale); heads may take a larger lr
    towers = param_groups(nn.ModuleList([model.vision, model.text]), cfg.weight_decay)
    heads = param_groups(nn.ModuleList([model.visual_projection, model.text_projection]), cfg.weight_decay)
    heads[1]["params"].append(model.logit_scale)
    for g in heads:
        g["lr_scale"] = cfg.head_lr / cfg.lr if cfg.head_lr > 0 else 1.0
    opt = torch.optim.AdamW([g for g in towers + heads if g["params"]], lr=cfg.lr, betas=(0.9, cfg.beta2),
                            eps=cfg.eps)
    scaler = amp.make_scaler(dtype)
    ddp = D.wrap_ddp(model, dist)

    step, best = 0, -1.0
    if cfg.resume:
        ck = restore(cfg.resume, model, opt, scaler, strict=False)
        step, best = ck["step"], ck.get("best", -1.0)
        set_rng_state(ck["rng"][dist.rank] if dist.rank < len(ck["rng"]) else ck["rng"][0])
        log.info(f"resumed from {cfg.resume} at step {step}")

    data = Batches(rows, cfg.image_root, tok, size, mean, std, cfg, world, dist.rank, spe, hn_start)
    end = max(total, step + cfg.bench + 3) if cfg.bench else total  # --bench may run past a tiny schedule
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=cfg.workers,
                                         sampler=range(step * accum, end * accum),
                                         pin_memory=dist.device.type == "cuda",
                                         persistent_workers=False)
    it = iter(loader)

    def micro_step(batch, sync):
        """Forward + backward of one micro batch; the loss is computed over the gathered global micro batch."""
        dev = dist.device
        pixels, ids, mask = batch["pixels"].to(dev), batch["ids"].to(dev), batch["mask"].to(dev)
        n_img, n_txt = (2, 4) if batch["hard"] else (1, 1)  # blocks: [x; x'] and [t; t'; n; n']
        pooled_img = pooled_txt = None
        with torch.no_grad(), amp.autocast(dev, dtype):  # locked towers: outside DDP, no graph
            if cfg.lock_vision:
                pooled_img = model.pool_image(pixels.to(amp.frozen_dtype(dev, dtype)))
            if cfg.lock_text:
                pooled_txt = model.pool_text(ids, mask)
        with (ddp.no_sync() if (not sync and world > 1) else contextlib.nullcontext()):
            with amp.autocast(dev, dtype):
                img, txt, scale = ddp(pixels, ids, mask, pooled_img, pooled_txt)
            img_g, txt_g = gather_blocks(img, n_img), gather_blocks(txt, n_txt)  # (2B_glob, D), (4B_glob, D)
            dup = None
            if cfg.mask_duplicates:
                dup = duplicate_mask(gather_blocks(batch["img_ids"].to(dev), n_img, grad=False),
                                     gather_blocks(batch["txt_ids"].to(dev), n_txt, grad=False))
            loss, terms = negclip_loss(img_g.float(), txt_g.float(), scale.float(), dup)
            scaler.scale(loss / accum).backward()
        return loss.detach(), terms

    def opt_step(step):
        lr = cosine_lr(step, total, cfg.warmup, cfg.lr)
        set_lr(opt, lr)
        losses, terms_acc = [], {}
        for a in range(accum):
            batch = next(it)
            assert batch["step"] == step, (batch["step"], step)
            loss, terms = micro_step(batch, sync=a == accum - 1)
            losses.append(loss)
            for k, v in terms.items():
                terms_acc[k] = terms_acc.get(k, 0) + v / accum
        loss = torch.stack(losses).mean()
        check_finite(step, {"loss": loss, **terms_acc})
        scaler.unscale_(opt)
        gnorm = clip_grad([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # open_clip: keep the temperature within [0, ln 100]
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        return loss, terms_acc, lr, gnorm, batch["hard"]

    def checkpoint(path, step):
        rngs = D.all_gather_object(rng_state())  # every rank's generators (dropout), restored per rank
        if dist.is_main:
            save_checkpoint(path, {"model": trainable_state(model), "optimizer": opt.state_dict(),
                                   "scaler": scaler.state_dict(), "step": step, "best": best, "rng": rngs,
                                   "config": dataclasses.asdict(cfg), "data_position": step * accum})
        D.barrier()

    def train_mode():
        ddp.train()
        for tower, locked in ((model.vision, cfg.lock_vision), (model.text, cfg.lock_text)):
            if locked:
                tower.eval()  # locked towers keep dropout off

    train_mode()
    if cfg.bench:
        rows_per_step = cfg.global_batch * (2 if cfg.hard_negatives else 1)
        flops = None
        if dist.device.type == "cuda":
            b0 = next(iter(torch.utils.data.DataLoader(data, batch_size=None, sampler=[step * accum])))
            flops = count_flops(lambda: micro_step(b0, True)) * accum * world
            opt.zero_grad(set_to_none=True)
        state = {"s": step}

        def one():
            opt_step(state["s"])
            state["s"] += 1
        return run_bench(one, cfg.bench, rows_per_step, dist.device, warmup=3, flops_per_step=flops)

    logger = Logger(cfg.out_dir, dist.is_main)
    timer = StepTimer(dist.device)
    val_every = cfg.val_every or spe
    history, flops_step = [], None
    stop = min(total, cfg.stop_after) if cfg.stop_after > 0 else total
    while step < stop:
        timer.start()
        if flops_step is None and dist.device.type == "cuda":  # count the FLOPs of the first step for MFU
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as fc:
                loss, terms, lr, gnorm, hard = opt_step(step)
            flops_step = fc.get_total_flops() * world
        else:
            loss, terms, lr, gnorm, hard = opt_step(step)
        t = timer.stop(cfg.global_batch * (2 if hard else 1))
        step += 1
        history.append(float(loss))
        if step % cfg.log_every == 0 or step == total or step == 1:
            logger.log(step, loss=float(D.all_reduce_mean(loss)),
                       **{k: float(D.all_reduce_mean(v)) for k, v in terms.items()}, lr=lr, grad_norm=gnorm,
                       scale=float(model.logit_scale.detach().exp()), hard=int(hard), **t,
                       **({"mfu": m} if (m := mfu(flops_step, t["ms_step"] / 1000, dist.device)) else {}))
        if cfg.val_file != "none" and (step % val_every == 0 or step == total):
            r = eval_retrieval(Scorer(model.eval(), tok, size, mean, std, cfg, dist, dtype), cfg.val_file,
                               cfg.image_root)
            train_mode()
            logger.log(step, val_r_mean=r["r_mean"], val_txt_r1=r["txt_r1"], val_img_r1=r["img_r1"])
            if r["r_mean"] > best:  # paper: best epoch by COCO-val retrieval
                best = r["r_mean"]
                checkpoint(os.path.join(cfg.out_dir, "best.pt"), step)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < total:
            checkpoint(os.path.join(cfg.out_dir, "last.pt"), step)
    checkpoint(os.path.join(cfg.out_dir, "last.pt"), step)
    return {"train/final_loss": history[-1] if history else float("nan"), "train/steps": step,
            "train/best_val_r_mean": best, "train/losses": history}


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def _load_for_eval(cfg, log):
    """Model to evaluate/export: the init model, or the init model + a checkpoint's trained weights (the
    checkpoint's own model fields -- init, towers, LoRA -- rebuild the same structure)."""
    if cfg.ckpt:
        ck = load_checkpoint(cfg.ckpt)
        model_fields = ("init", "clip", "vision", "text", "embed_dim", "vision_pool", "text_pool", "lock_vision",
                        "lock_text", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")
        for k in model_fields:
            setattr(cfg, k, ck["config"][k])
        model, tok, mean, std, size = build_model(cfg)
        missing = set(ck["model"]) - set(model.state_dict())
        if missing:
            raise ValueError(f"{cfg.ckpt}: weights {sorted(missing)[:3]} do not fit the model")
        model.load_state_dict(ck["model"], strict=False)
        log.info(f"loaded {len(ck['model'])} trained tensors from {cfg.ckpt} (step {ck['step']})")
    else:
        model, tok, mean, std, size = build_model(cfg)
    return model, tok, mean, std, size


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description="NegCLIP: mine | train | eval | export")
    dist = D.setup_distributed(cfg.device)
    resolve_paths(cfg)
    amp.seed_everything(cfg.seed + dist.rank)
    log = Logger(cfg.out_dir, dist.is_main)
    log.info("config:\n" + format_config(cfg))
    if dist.is_main:
        save_config(cfg, cfg.out_dir)
    dtype = amp.pick_dtype(dist.device, cfg.precision)
    try:
        if cfg.mode in ("eval", "export"):
            model, tok, mean, std, size = _load_for_eval(cfg, log)
            merge_lora(model).to(dist.device)
            if cfg.mode == "export":
                out = cfg.export_dir or os.path.join(cfg.out_dir, "export")
                if dist.is_main:
                    export_model(model, cfg, out)
                log.info(f"exported to {out}")
                return {"export_dir": out}
            res = evaluate(model, tok, size, mean, std, cfg, dist, dtype)
        elif cfg.mode == "mine":
            model, tok, mean, std, size = build_model(cfg)
            res = mine(cfg, model.to(dist.device), tok, size, mean, std, dist, dtype, log)
        elif cfg.mode == "train":
            model, tok, mean, std, size = build_model(cfg)
            res = train(cfg, model, tok, size, mean, std, dist, dtype, log)
            if cfg.eval_after_train and not cfg.bench:
                merge_lora(model)
                res.update(evaluate(model, tok, size, mean, std, cfg, dist, dtype))
        else:
            raise ValueError(f"mode must be mine|train|eval|export, got {cfg.mode!r}")
        if dist.is_main and cfg.mode in ("eval", "train") and not cfg.bench:
            scalars = {k: v for k, v in res.items() if not isinstance(v, list)}
            log.info(format_table(scalars))
            with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
                json.dump(scalars, f, indent=2)
        return res
    finally:
        D.cleanup_distributed()


if __name__ == "__main__":
    main()
