"""NegCLIP: contrastive fine-tuning of a dual encoder with hard negative captions and images.

Yuksekgonul et al., "When and why vision-language models behave like bags-of-words, and what to
do about it?" (ICLR 2023, arXiv 2210.01936).  CLIP scores "the horse is eating the grass" and "the
grass is eating the horse" alike: its contrastive objective over COCO-sized batches can be solved
without word order.  NegCLIP keeps the CLIP loss but adds, for every sampled image, (1) a hard
negative caption made by swapping two words or phrases of its caption and (2) a nearest-neighbour
image with its own caption and hard negative (Sec. 4).  A batch of B rows is 2B images x 4B texts;
the image->text softmax runs over all 4B texts, the text->image one over the 2B real captions.
The dual encoder comes from a CLIP checkpoint (`--init clip`) or from two uni-modal towers with
fresh projections (`--init unimodal`, as LiT); towers can be locked (LiT) or adapted with LoRA;
gradient accumulation is exact (gradient caching: every loss sees the whole global batch).
Preparation (negatives, neighbours, toy paths) is in data/negatives.py, the benchmarks (ARO,
SugarCREPE, CREPE, SVO, Winoground, VL-CheckList, retrieval, classification) in data/benchmarks.py.
Modes: mine (NegCLIP TSV) | train (mines first when needed; or from webdataset shards:
--train_shards 'cc3m/{00000..00331}.tar') | eval | export | params (parameters, FLOPs).

    python negclip.py --mode eval --out_dir runs/negclip_toy/before          # toy world, CPU
    python negclip.py --mode train --out_dir runs/negclip_toy
    python negclip.py --mode eval --ckpt runs/negclip_toy/best.pt --out_dir runs/negclip_toy/after
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HOST:29500 \\
        negclip.py --preset paper --mode train --micro_batch 16 --out_dir runs/negclip_b32_ddp

`--preset paper` is the paper's recipe (ViT-B/32, COCO with the released TSV, 5 epochs, batch 256,
lr 1e-6; ARO VG-R 0.59 -> 0.81, VG-A 0.62 -> 0.71 in the paper). Toy figures: docs/RESULTS.md.
The released NegCLIP (open_clip weights) reads as --clip after data/openclip_to_hf.py converts it.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import data.benchmarks as B
import data.negatives as NG
from common import amp
from common import dist as D
from common.checkpoint import (RESUME_FREE, check_resume_config, expect_checkpoint,
                               load_checkpoint, restore, rng_state, save_checkpoint, set_rng_state)
from common.config import check_choices, format_config, given_flags, parse_config, save_config
from common.data import (DataError, ImageFolderLoader, StepSampler, StreamTracker, draw,
                         fit_micro, make_loader, shard_sample_count)
from common.image import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageTransform, normalize
from common.hf import counts_table, hf_model, published_config
from common.log import Logger
from common.train import (StepTimer, count_flops, count_params, cosine_lr, mfu, optimizer_update,
                          param_groups, run_bench, set_lr)


# ================================================================================================ Config

@dataclass
class ModelConfig:
    """What rebuilds the model of a checkpoint (saved in it as "model_config")."""
    init: str = "clip"            # clip: one CLIPModel folder | unimodal: --vision + --text towers
    clip: str = ""                # CLIPModel folder or hub name ("" = toy preset's models/clip)
    vision: str = ""              # unimodal vision tower: CLIP(Vision)Model, ViTModel, Dinov2Model
    text: str = ""                # unimodal text tower: BertModel, RobertaModel, CLIPTextModel
    embed_dim: int = 512          # joint space of the fresh projections (unimodal init)
    vision_pool: str = "cls"      # unimodal: cls (CLIP/DINOv2 post-LN CLS, ViT raw CLS) | mean
    text_pool: str = "mean"       # unimodal: mean (masked) | cls (a CLIP text tower: its EOS state)
    lock_vision: bool = False     # LiT: freeze the image tower (its projection still trains)
    lock_text: bool = False
    lora_r: int = 0               # >0: LoRA adapters on the unlocked towers, towers frozen
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: ["auto"])  # auto: NG.lora_targets


@dataclass
class Config(ModelConfig):
    preset: str = "toy"
    mode: str = "train"           # mine | train | eval | export | params
    out_dir: str = "runs/negclip"
    toy_root: str = "data/toy"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"       # auto = bf16 autocast on a capable GPU, fp32 on CPU
    bench: int = 0                # >0: time this many training steps after warm-up and stop
    compile: bool = False         # torch.compile the trained model (a GPU's speed-up)
    resume: str = ""              # checkpoint to continue training from (exactly)
    resume_changes: bool = False  # continue a resume whose config differs
    ckpt: str = ""                # eval/export: trained checkpoint (else the init model)
    max_text_len: int = 77
    # --- data
    train_file: str = ""          # to mine from: pairs .jsonl | BLIP/Karpathy .json ("" = toy)
    image_root: str = ""          # root of the image paths in train_file / TSV ("" = toy_root)
    mine_prefix: str = ""         # mined rows' paths: <mine_prefix>/<train_file's> (paper: coco)
    train_tsv: str = ""           # mined or released TSV ("" = <out_dir>/train_neg_clip.tsv)
    train_shards: str = ""        # or webdataset shards, e.g. 'cc3m/{00000..00331}.tar' (no mining)
    val_file: str = ""            # retrieval set for model selection ("" = toy val; "none" = off)
    all_captions: bool = False    # keep every caption of an image (paper: the first only)
    exclude_images: str = ""      # list files / SugarCREPE folders: images kept out of training
    tagger: str = "auto"          # auto (nltk if its data is installed, else rule) | nltk | rule
    mine_k: int = 3               # neighbour images per row (released TSV: 3)
    mine_chunk: int = 4096        # similarity rows per chunk when mining
    max_bad_frac: float = 0.05    # stop when more of the distinct images are unreadable
    # --- train
    hard_negatives: bool = True   # false = CLIP-FT baseline (B images x B captions)
    hn_start_step: int = -1       # plain CLIP loss before this step; -1 = 0 (clip) / 10% (unimodal)
    mask_duplicates: bool = False  # mask same-image off-diagonal logits (off in the paper)
    global_batch: int = 256       # rows per optimizer step (paper 256 -> 512 x 1024 logits)
    micro_batch: int = 256        # rows per GPU per forward; accumulation = global/(micro*world)
    epochs: int = 5
    max_steps: int = 0            # >0 overrides epochs
    stop_after: int = 0           # >0: stop (checkpointed) after this step, same schedule
    lr: float = 0.0               # towers; 0 = NG.init_lr: 1e-6 (clip, paper), 1e-5 (unimodal)
    head_lr: float = 0.0          # projections + logit scale (0 = lr)
    warmup: int = 50
    weight_decay: float = 0.2
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 0.0
    crop_scale_min: float = 0.9   # open_clip RandomResizedCrop(scale=(0.9, 1.0))
    workers: int = 0
    log_every: int = 10
    ckpt_every: int = 0           # 0 = only at the end (and at each val improvement as best.pt)
    val_every: int = 0            # 0 = once per epoch
    # --- eval
    benchmarks: list[str] = field(default_factory=lambda: list(B.BENCHMARKS))
    bench_root: str = ""          # aro/ sugarcrepe/ crepe/ ... vl_checklist/ classification/
    retrieval_file: str = ""      # pairs .jsonl | BLIP test .json | NegCLIP .tsv (a comma list: each)
    retrieval_image_root: str = ""  # one root, or a comma list: one per file ("" = toy)
    order_file: str = ""          # BLIP coco_karpathy_test.json, flickr30k_test.json (one or both)
    order_image_root: str = ""    # one root, or one per file
    order_seeds: int = 5          # *-Order: P@1 mean +- std over this many perturbation draws
    aro_min_pair_count: int = 25  # VG-Attribution macro: attribute pairs with >= this many cases
    vlc_max_num: int = 0          # VL-CheckList: first n // 2 cases a file (0: all; authors': 2000)
    eval_batch: int = 256
    eval_after_train: bool = True
    export_dir: str = ""
    report: bool = True           # <out_dir>/report.html: curves, captions vs negatives, benchmarks
    report_before: str = ""       # a results.json (e.g. the init's eval): the report's "before"


PRESETS = {
    # Toy world: the toy CLIP, briefly pretrained on toy scenes; paths from data/toy (see docs/)
    "toy": dict(global_batch=32, micro_batch=32, epochs=20, max_steps=1000, lr=5e-4, warmup=10,
                weight_decay=0.1, max_text_len=32, crop_scale_min=0.9, log_every=20, order_seeds=2,
                aro_min_pair_count=5, eval_batch=128, val_every=250),
    # Paper (Sec. 4; vinid/neg_clip): the Config defaults are its recipe (batch 256, 5 epochs, lr
    # 1e-6, warm-up 50, cosine, AdamW (0.9, 0.98), eps 1e-6, wd 0.2, validated each epoch; best.pt is ours);
    # here ViT-B/32 OpenAI, COCO Karpathy train+restval, the released TSV (109,468 rows, 1 caption each).
    "paper": dict(clip="openai/clip-vit-base-patch32", train_tsv="data/negclip/train_neg_clip.tsv",
                  image_root="data", train_file="data/coco/coco_karpathy_train.json",
                  val_file="data/negclip/valid_neg_clip.tsv", workers=8, mine_prefix="coco",
                  bench_root="data/benchmarks", retrieval_image_root="data/coco",
                  retrieval_file="data/benchmarks/blip/coco_karpathy_test.json",
                  order_file="data/benchmarks/blip/coco_karpathy_test.json",
                  order_image_root="data/coco"),
}

# what a resumed run may change without changing the training it continues (init: the architecture;
# max_steps, epochs: the cosine's length, hn_start; stop_after stops early on the same schedule)
RESUME_FREE_NEGCLIP = RESUME_FREE - {"init", "max_steps", "epochs"} | {
    "stop_after", "ckpt_every", "val_every", "eval_after_train", "ckpt", "export_dir", "benchmarks",
    "bench_root", "retrieval_file", "retrieval_image_root", "order_file", "order_image_root",
    "order_seeds", "aro_min_pair_count", "vlc_max_num", "report_before"}
resolve_paths = NG.resolve_paths  # empty paths: the toy world's (built on first use)


def model_config(cfg):
    return ModelConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)})


# ================================================================================================ Model
# the dual encoder (CLIP, or two uni-modal towers with fresh heads) and LoRA, written out

LOGIT_SCALE_MAX = math.log(100.0)  # open_clip clamps the learnable log-temperature to [0, ln 100]


class LoRALinear(nn.Module):
    """W x + (alpha / r) B A dropout(x), the base Linear W frozen: A (r, d_in) random, B (d_out, r)
    zero, so training starts exactly at the pretrained model (Hu et al. 2021, arXiv 2106.09685)."""

    def __init__(self, base: nn.Linear, r, alpha, dropout):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / PEFT
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + lora * self.scale

    def merged(self):  # the base Linear, now holding W + (alpha / r) B A
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        return self.base


def add_lora(tower, targets, r, alpha, dropout):
    """Freeze `tower` and wrap its Linear layers named in `targets` ("all-linear" = every Linear)
    with LoRA.  Returns the number of wrapped layers."""
    tower.requires_grad_(False)
    wanted = [(name, mod) for name, mod in tower.named_modules() if isinstance(mod, nn.Linear)
              and ("all-linear" in targets or name.rsplit(".", 1)[-1] in targets)]
    for name, mod in wanted:
        tower.set_submodule(name, LoRALinear(mod, r, alpha, dropout))
    if not wanted:
        raise ValueError(f"no Linear of {type(tower).__name__} matches lora_targets={targets}")
    return len(wanted)


def merge_lora(module):
    """Replace every LoRALinear by a plain Linear holding W + (alpha/r) B A (for eval/export)."""
    for name, mod in list(module.named_modules()):
        if isinstance(mod, LoRALinear):
            module.set_submodule(name, mod.merged())
    return module


class DualEncoder(nn.Module):
    """Image tower + text tower + linear projections into one space + learnable log-temperature.
    pool = "clip": HF CLIP's pooling (vision: post-LN CLS; text: final-LN state at the EOS token):
    embeddings equal CLIPModel.get_image_features / get_text_features.  Else vision_pool / text_pool
    (a CLIP text tower: its EOS state always); image = (size, mean, std) for the vision tower."""

    def __init__(self, vision, text, visual_projection, text_projection, logit_scale, pool="clip",
                 vision_pool="cls", text_pool="mean", image=(224, CLIP_MEAN, CLIP_STD)):
        super().__init__()
        self.vision, self.text = vision, text
        self.visual_projection, self.text_projection = visual_projection, text_projection
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale), device=visual_projection.weight.device))
        self.pool, self.vision_pool, self.text_pool = pool, vision_pool, text_pool
        self.image_size, self.image_mean, self.image_std = image

    def pool_image(self, pixels):  # (B, 3, S, S) -> (B, d_vision)
        out = self.vision(pixel_values=pixels)
        if self.pool == "clip":
            return out.pooler_output
        if self.vision_pool == "mean":
            return out.last_hidden_state[:, 1:].mean(1)  # patch tokens (drop CLS)
        # CLIPVision / DINOv2 pooler = layer-normed CLS; ViT: that CLS too (see load_tower)
        ln_cls = self.vision.config.model_type in ("clip_vision_model", "dinov2")
        return out.pooler_output if ln_cls else out.last_hidden_state[:, 0]

    def pool_text(self, ids, mask):  # (B, L) -> (B, d_text)
        out = self.text(input_ids=ids, attention_mask=mask)
        if self.pool == "clip" or self.text.config.model_type == "clip_text_model":
            return out.pooler_output
        h = out.last_hidden_state  # (B, L, d)
        if self.text_pool == "cls":
            return h[:, 0]  # else mean (RoBERTa's pooler is random)
        m = (torch.ones_like(ids) if mask is None else mask).unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    def encode_image(self, pixels=None, pooled=None, normalize=True):
        p = self.pool_image(pixels) if pooled is None else pooled
        x = self.visual_projection(p.to(self.visual_projection.weight.dtype))
        return F.normalize(x.float(), dim=-1) if normalize else x

    def encode_text(self, ids=None, mask=None, pooled=None, normalize=True):
        p = self.pool_text(ids, mask) if pooled is None else pooled
        x = self.text_projection(p.to(self.text_projection.weight.dtype))
        return F.normalize(x.float(), dim=-1) if normalize else x

    def forward(self, pixels=None, ids=None, mask=None, pooled_image=None, pooled_text=None):
        """-> (normalised image embeddings (Ni, D), text embeddings (Nt, D), exp(logit_scale))."""
        return (self.encode_image(pixels, pooled_image), self.encode_text(ids, mask, pooled_text),
                self.logit_scale.exp())


def load_tower(path, side, meta=False):
    """A uni-modal tower from a folder (or hub name): from_pretrained, never trust_remote_code."""
    from transformers import AutoConfig, AutoModel, CLIPTextModel, CLIPVisionModel
    mtype = (published_config(path) if meta else AutoConfig.from_pretrained(path)).model_type
    if mtype == "clip":  # one side of a full CLIP checkpoint
        return hf_model(CLIPVisionModel if side == "vision" else CLIPTextModel, path, meta, side + "_config")
    no_pooler = mtype in ("bert", "roberta", "xlm-roberta", "vit")  # NSP/random, ViT in21k pre-logits: unused
    return hf_model(AutoModel, path, meta, **({"add_pooling_layer": False} if no_pooler else {}))


def build_model(mc, meta=False):
    """ModelConfig -> (DualEncoder, tokenizer).  Freezing / LoRA are applied here, once.  meta: the
    architecture alone on the meta device, no tokenizer (--mode params)."""
    from transformers import AutoTokenizer, CLIPModel
    tokenizer = (lambda path: None) if meta else AutoTokenizer.from_pretrained
    if mc.init == "clip":
        hf = hf_model(CLIPModel, mc.clip, meta)  # config has quick_gelu for OpenAI weights
        image = (hf.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)
        model = DualEncoder(hf.vision_model, hf.text_model, hf.visual_projection, hf.text_projection,
                            hf.config.logit_scale_init_value if meta else hf.logit_scale.item(), "clip", image=image)
        tok = tokenizer(mc.clip)
    elif mc.init == "unimodal":
        vision, text = load_tower(mc.vision, "vision", meta), load_tower(mc.text, "text", meta)
        dv, dt = vision.config.hidden_size, text.config.hidden_size
        vp, tp = (nn.Linear(d, mc.embed_dim, bias=False, device=vision.device) for d in (dv, dt))
        for lin in (vp, tp):  # fresh heads; their temperature 0.07 as in CLIP's own initialisation
            nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
        image = NG.vision_preprocessing(mc.vision, vision.config, meta)  # (size, mean, std)
        for n, p in vision.named_parameters():  # no loss reaches these: DDP would stop at step 2
            if n.endswith("mask_token") or (mc.vision_pool == "mean" and "post_layernorm" in n):
                p.requires_grad_(False)  # DINOv2's mask token; a mean-pooled CLIP tower's pooled LN
        model = DualEncoder(vision, text, vp, tp, math.log(1 / 0.07), "towers", mc.vision_pool, mc.text_pool, image)
        tok = tokenizer(mc.text)
    else:
        raise ValueError(f"init must be clip|unimodal, got {mc.init!r}")
    for name, tower in (("vision", model.vision), ("text", model.text)):
        if getattr(mc, f"lock_{name}"):
            tower.requires_grad_(False).eval()
        elif mc.lora_r > 0:  # adapters on unlocked towers; heads + temperature train fully
            add_lora(tower, NG.lora_targets(mc.lora_targets, tower.config.model_type), mc.lora_r,
                     mc.lora_alpha, mc.lora_dropout)
    return model, tok


def trainable_state(model):
    """Only what trains (towers, LoRA A/B, heads, temperature); locked towers: from the init."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}


# ================================================================================================ Losses

def negclip_loss(img, txt, scale, dup_mask=None):
    """CLIP / NegCLIP contrastive loss (NegCLIP Sec. 4; vinid/neg_clip src/open_clip/loss.py).

    img (N, D) and txt (M, D) are L2-normalised; image k's caption is text k (k < N); texts
    N..M-1 are hard negative captions.  NegCLIP: N = 2B images [anchors; neighbours], M = 4B
    texts [t; t'; n; n'].  Plain CLIP-FT: N = M = B.  dup_mask (N, M) bool: logits to drop
    (same image, not the label; a missing hard caption)."""
    n = img.shape[0]
    logits = scale * img @ txt.t()  # (N, M)
    if dup_mask is not None:
        logits = logits.masked_fill(dup_mask, float("-inf"))
    labels = torch.arange(n, device=img.device)
    i2t = F.cross_entropy(logits, labels)  # each image over all M texts (hard captions: columns)
    t2i = F.cross_entropy(logits[:, :n].t(), labels)  # (N, N): only real captions are queries
    return (i2t + t2i) / 2, {"i2t": i2t.detach(), "t2i": t2i.detach()}


def duplicate_mask(img_ids, txt_ids):
    """(N,), (M,) image ids (-1 a hard caption, -2 a missing one) -> (N, M) True where text j
    describes image i's picture but j != i (the same COCO image as anchor and as a neighbour)."""
    same = img_ids[:, None] == txt_ids[None, :]  # (N, M)
    eye = torch.eye(*same.shape, dtype=torch.bool, device=same.device)  # (N, M): label j = i
    return same & ~eye & (txt_ids[None, :] >= 0)


def gather_blocks(xs, n_blocks, grad=True):
    """Micro batches' local rows [(n_blocks * b, ...)] in blocks [t; t'; n; n'] -> each block
    gathered over ranks, joined over micro batches: one process's layout of the global batch."""
    x = torch.stack([x.reshape(n_blocks, -1, *x.shape[1:]) for x in xs], 1)  # (n_blocks, k, b, ...)
    x = (D.all_gather_with_grad if grad else D.all_gather_no_grad)(x.movedim(2, 0).contiguous())
    return x.movedim(0, 2).flatten(0, 2)  # (world*b, n_blocks, k, ...) -> (n_blocks*k*world*b, ...)


# ================================================================================================ Data
# NegCLIP's sample (vinid/neg_clip src/training/data.py CsvDataset): a TSV row has image x, caption
# t and its hard captions; each load draws uniformly one hard caption n of t, one neighbour row
# (image x', caption t') and one hard caption n' of t'.  A micro batch: [x; x'] and [t; t'; n; n'].

class NegCLIPRows(torch.utils.data.Dataset):
    """Item (step, epoch, i) -> row i's sample for that epoch.  Every draw (negatives, neighbour,
    crop) is seeded by (seed, epoch, i): any world size and any resume see the same sample.  A row
    whose image or neighbour image is unreadable is replaced by the next row that loads; the item
    returns the paths it tried and found unreadable, counted once each by the main process."""

    def __init__(self, rows, image_root, model, cfg, hn_start):
        self.rows, self.cfg, self.hn_start = rows, cfg, hn_start
        self.tf = ImageTransform(model.image_size, True, model.image_mean, model.image_std,
                                 (cfg.crop_scale_min, 1.0), uint8=True)  # normalised in embed
        self.images = ImageFolderLoader(image_root, self.tf, cfg.max_bad_frac)
        ids = {}
        self.image_ids = [ids.setdefault(r["image_id"], len(ids)) for r in rows]

    def _pick(self, what, epoch, i, n):  # three independent draws per (epoch, row)
        return draw(self.cfg.seed * 3 + what, epoch, i, n)

    def _pixels(self, i, epoch, slot, tried, bad):
        path = self.rows[i]["image"]
        self.tf.rng = random.Random(f"{self.cfg.seed}|{epoch}|{i}|{slot}")  # same crop on any world
        x = self.images(path)
        tried.add(path)
        bad.update([path] if x is None else [])
        return x

    def __getitem__(self, key):
        step, epoch, i = key
        hard = self.cfg.hard_negatives and step >= self.hn_start
        tried, bad = set(), set()
        for c in (i + k for k in range(len(self.rows))):  # the row, else the next one that loads
            c %= len(self.rows)
            r = self.rows[c]
            j = r["nbrs"][self._pick(1, epoch, c, len(r["nbrs"]))]
            x = self._pixels(c, epoch, "a", tried, bad)
            x2 = self._pixels(j, epoch, "n", tried, bad) if hard and x is not None else None
            if x is not None and (x2 is not None or not hard):
                break
            self.images.check()  # many unreadable images: stop here with the count
        else:
            raise DataError(f"no readable training image under {self.images.root} "
                            f"({self.images.report()})")
        out = {"x": x, "t": r["caption"], "img_id": self.image_ids[c], "hard": hard,
               "step": step, "tried": tried, "bad": bad}
        if hard:
            negs, negs2 = r["negs"], self.rows[j]["negs"]
            out.update(x2=x2, t2=self.rows[j]["caption"], img_id2=self.image_ids[j],
                       n=negs[self._pick(0, epoch, c, len(negs))], n2=negs2[self._pick(2, epoch, c, len(negs2))])
        return out


def collate(items, tok, max_len):
    """Row samples -> the NegCLIP micro batch: pixels [x; x'] (2b, 3, S, S), texts [t; t'; n; n']
    (4b, L); stream rows (no neighbour): [x] and [t; n]; plain CLIP: [x] and [t].  A missing hard
    caption (None) is an empty text with id -2, its column masked in global_loss."""
    hard, imgs = items[0]["hard"], ("x", "x2") if "x2" in items[0] else ("x",)
    tks = ("t", "t2")[:len(imgs)] + (("n", "n2")[:len(imgs)] if hard else ())
    img_ids = [it[k.replace("x", "img_id")] for k in imgs for it in items]
    texts = [it[k] for k in tks for it in items]
    txt_ids = torch.tensor(img_ids + [-1 if t is not None else -2 for t in texts[len(img_ids):]])
    t = tok([t or "" for t in texts], padding="longest", truncation=True, max_length=max_len,
            return_tensors="pt")  # not to 77: pads follow EOS under the causal mask, and cost FLOPs
    return {"pixels": torch.stack([it[k] for k in imgs for it in items]), "ids": t["input_ids"],
            "mask": t["attention_mask"], "img_ids": torch.tensor(img_ids), "txt_ids": txt_ids,
            "hard": hard, "blocks": (len(imgs), len(tks)), "step": items[0]["step"],
            **{k: set().union(*(it[k] for it in items)) for k in ("tried", "bad")}}


# ================================================================================================ Eval

def scorer(model, tok, cfg, dist, dtype=None, pooled=False):
    """A data/benchmarks.py Scorer of the model's embeddings (pooled: the vision tower's feature).
    dtype None (evaluation): true fp32, as the benchmarks' scripts run open_clip (its default
    precision); a bf16 bracket would flip near-ties such as VG-Relation's reordered captions. A
    tower kept in a GPU run's dtype (locked) keeps it. Mining passes the run's autocast dtype."""
    tf = ImageTransform(model.image_size, mean=model.image_mean, std=model.image_std)
    dev, vdt = dist.device, next(model.vision.parameters()).dtype
    ctx = (lambda: amp.autocast(dev, dtype)) if dtype else (lambda: amp.fp32(dev))

    @torch.no_grad()
    def images(pils):
        x = torch.stack([tf(im) for im in pils]).to(dev, vdt)  # (n, 3, S, S)
        with ctx():
            return F.normalize(model.pool_image(x).float(), dim=1) if pooled else model.encode_image(x)

    @torch.no_grad()
    def texts(strs):
        t = tok(strs, padding=True, truncation=True, max_length=cfg.max_text_len, return_tensors="pt")
        with ctx():
            return model.encode_text(t["input_ids"].to(dev), t["attention_mask"].to(dev))

    return B.Scorer(images, texts, cfg.eval_batch, dist, cfg.max_bad_frac)


def evaluate(model, tok, cfg, dist, log):
    """Every benchmark of cfg.benchmarks -> flat {"bench/metric": value}."""
    return B.run_benchmarks(
        scorer(model.eval(), tok, cfg, dist), cfg.benchmarks, cfg.bench_root,
        cfg.retrieval_file, cfg.retrieval_image_root, cfg.order_file, cfg.order_image_root,
        cfg.order_seeds, cfg.aro_min_pair_count, NG.make_tagger(cfg.tagger), log.info, cfg.vlc_max_num)


# ================================================================================================ Train

def mine(cfg, model, tok, dist, dtype, log, force=False):
    """NegCLIP rows for cfg.train_file in cfg.train_tsv (data/negatives.py ensure_mined). Neighbours:
    cosine in the init model's image space (CLIP: its embedding; towers: the pooled feature)."""
    embed = lambda paths: scorer(model.to(dist.device).eval(), tok, cfg, dist, dtype,  # noqa: E731
                                 pooled=cfg.init != "clip").images([(p, None) for p in paths])
    return NG.ensure_mined(cfg, embed, model, dtype, dist, force, log.info)


def embed(net, model, batch, cfg, dev, dtype, pi=None, pt=None):
    """A micro batch's local (img, txt, scale, pooled features of locked towers).  net: the trained
    model (DDP or not); model: unwrapped (locked towers: outside DDP, no_grad, unless given)."""
    pixels, ids, mask = (batch[k].to(dev, non_blocking=True) for k in ("pixels", "ids", "mask"))
    if pixels.dtype == torch.uint8:  # the loader ships bytes: normalised here, on the device
        pixels = normalize(pixels, model.image_mean, model.image_std)
    with torch.no_grad(), amp.autocast(dev, dtype):
        if cfg.lock_vision and pi is None:
            pi = model.pool_image(pixels.to(amp.frozen_dtype(dev, dtype)))
        if cfg.lock_text and pt is None:
            pt = model.pool_text(ids, mask)
    with amp.autocast(dev, dtype):
        return *net(pixels, ids, mask, pi, pt), (pi, pt)


def global_loss(imgs, txts, scale, batches, cfg, dev):
    """NegCLIP loss of micro batches' embeddings (lists), gathered from every rank."""
    n_img, n_txt = batches[0]["blocks"]  # [x; x'], [t; t'; n; n'] (stream: [x], [t; n]; CLIP: 1, 1)
    img, txt = gather_blocks(imgs, n_img), gather_blocks(txts, n_txt)  # (2G, D), (4G, D)
    img_ids, txt_ids = (gather_blocks([b[k].to(dev) for b in batches], n, grad=False) for k, n in
                        (("img_ids", n_img), ("txt_ids", n_txt)))
    dup = (txt_ids == -2).expand(len(img), -1)  # (N, M): a missing hard caption takes no part
    dup = dup | duplicate_mask(img_ids, txt_ids) if cfg.mask_duplicates else dup
    return negclip_loss(img.float(), txt.float(), scale.float(), dup)


def forward_loss(net, model, batch, cfg, dev, dtype):
    img, txt, scale, _ = embed(net, model, batch, cfg, dev, dtype)
    return global_loss([img], [txt], scale, [batch], cfg, dev)


def accumulate(net, model, batches, cfg, dev, dtype, scaler, world):
    """Backward of one step's NegCLIP loss -> (loss, terms).  Several micro batches: gradient
    caching (Gao et al. 2021, arXiv 2101.06983 Sec. 3.2), one loss over the whole global batch:
    each micro batch embedded without gradient; the loss back-propagated to those embeddings and,
    once, the temperature; then each micro batch embedded again with gradient, from its first
    pass's RNG state (the same dropout masks: BERT, LoRA), its embeddings' gradients taken through."""
    last, cuda = len(batches) - 1, [dev] if dev.type == "cuda" else []
    if not last:
        loss, terms = forward_loss(net, model, batches[0], cfg, dev, dtype)
        scaler.scale(loss).backward()
        return loss.detach(), terms
    rngs, embs, pooled = [], [], []
    with torch.no_grad():
        for b in batches:
            rngs.append(rng_state())  # the dropout masks' generators
            *e, p = embed(net, model, b, cfg, dev, dtype)
            embs.append([x.detach().requires_grad_() for x in e])
            pooled.append(p)  # locked towers' features: not computed again
    imgs, txts, scales = zip(*embs)
    loss, terms = global_loss(imgs, txts, scales[0], batches, cfg, dev)
    scaler.scale(loss).backward()  # (gathered with gradient: a rank's rows get every rank's share)
    for a, b in enumerate(batches):
        sync = net.no_sync() if a < last and world > 1 else contextlib.nullcontext()  # DDP: last only
        with torch.random.fork_rng(cuda), sync:
            set_rng_state(rngs[a])
            img, txt, scale, _ = embed(net, model, b, cfg, dev, dtype, *pooled[a])
            dot = (img * imgs[a].grad).sum() + (txt * txts[a].grad).sum()
            (dot + scale * scales[0].grad * (a == last)).backward()  # the temperature's: once
    return loss.detach(), terms


def train(cfg, model, tok, dist, dtype, log):
    world, dev, pin = dist.world_size, dist.device, dist.device.type == "cuda"
    model.to(dev)
    seen = ImageFolderLoader(cfg.image_root, None, cfg.max_bad_frac)  # distinct unreadable images
    if cfg.train_shards:  # a stream: no fixed set to mine neighbour images in
        n = shard_sample_count(cfg.train_shards)
        log.info(f"train: {n} samples in {cfg.train_shards}: hard captions drawn per sample (the "
                 "mine step's swaps), no neighbour images: rows [x] x [t; n]")
    else:
        mine(cfg, model, tok, dist, dtype, log)
        rows, dropped = NG.training_rows(cfg, seen, log.info)  # less --exclude_images
        log.info(f"train: {(n := len(rows))} rows ({dropped} dropped)")
    sampler = StepSampler(n, cfg.global_batch, cfg.micro_batch, world, dist.rank, cfg.seed)
    spe, accum = sampler.steps_per_epoch, sampler.accum
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * spe
    hn_start = cfg.hn_start_step if cfg.hn_start_step >= 0 else total // 10 * (cfg.init != "clip")
    log.info(f"train: {spe} steps/epoch, {total} steps, accum {accum}"
             f"{' (gradient caching)' * (accum > 1)}, hard negatives from step "
             f"{hn_start if cfg.hard_negatives else '-'}")
    locked = [t for t, f in ((model.vision, cfg.lock_vision), (model.text, cfg.lock_text)) if f]
    for tower in locked:  # on a GPU the run's dtype, else fp32 (amp.frozen_dtype); no_grad, no DDP
        tower.to(amp.frozen_dtype(dev, dtype)).eval()
    # open_clip: weight decay on matrices only (not biases, norms, logit_scale); heads: own lr
    towers = param_groups(nn.ModuleList([model.vision, model.text]), cfg.weight_decay)
    heads = param_groups(nn.ModuleList([model.visual_projection, model.text_projection]), cfg.weight_decay)
    heads[1]["params"].append(model.logit_scale)
    for g in heads:
        g["lr_scale"] = cfg.head_lr / cfg.lr if cfg.head_lr > 0 else 1.0
    opt = torch.optim.AdamW([g for g in towers + heads if g["params"]], lr=cfg.lr,
                            betas=(0.9, cfg.beta2), eps=cfg.eps)
    params, scaler = [p for g in opt.param_groups for p in g["params"]], amp.make_scaler(dtype)
    net = D.wrap_ddp(torch.compile(model) if cfg.compile else model, dist)  # `model`: plain names
    step, best, ck, best_ck = 0, -1.0, {}, None  # best_ck: the checkpoint of the best validation
    if cfg.resume:
        ck = load_checkpoint(cfg.resume)
        expect_checkpoint(ck, cfg.resume, "negclip", flag="--resume")
        check_resume_config(ck.get("config"), dataclasses.asdict(cfg), cfg.resume_changes,
                            log.info, RESUME_FREE_NEGCLIP)
        restore(cfg.resume, model, opt, scaler, strict=False)
        step, best = ck["step"], ck.get("best", -1.0)
        best_ck = os.path.join(os.path.dirname(cfg.resume), "best.pt")  # if that run validated
        set_rng_state(ck["rng"], dist.rank)
        log.resumed(step)
        log.info(f"resumed from {cfg.resume} at step {step}")
    shards, state = cfg.train_shards, ck.get("stream")  # state: where each shard stream stopped
    tracker = shards and StreamTracker(shards, cfg.max_bad_frac, state=state)
    counts = tracker or seen  # unreadable samples of the stream, or distinct unreadable images
    to_batch = functools.partial(collate, tok=tok, max_len=cfg.max_text_len)
    next_batches = lambda: [next(it) for _ in range(accum)]  # noqa: E731 (a step's micro batches)
    if tracker:  # webdataset shards over ranks and workers, resumed exactly: rows [x] x [t; n]
        tf = ImageTransform(model.image_size, True, model.image_mean, model.image_std,
                            (cfg.crop_scale_min, 1.0), random.Random(0), uint8=True)  # reseeded per sample
        stream = NG.NegativeShardStream(NG.make_tagger(cfg.tagger), shards, tf, dist.rank, world,
                                        cfg.seed, max_bad_frac=cfg.max_bad_frac, resume=state)
        it = NG.shard_batches(stream, tracker, to_batch, cfg.micro_batch, cfg.workers, pin, step,
                              accum, hn_start if cfg.hard_negatives else float("inf"))
    else:
        data = NegCLIPRows(rows, cfg.image_root, model, cfg, hn_start)
        end = max(total, step + cfg.bench + 4) if cfg.bench else total  # --bench: past the schedule
        keyed = ([(s, e, i) for e, i in mb]  # StepSampler's micro batches, each item with its step
                 for s in range(step, end) for mb in sampler.micro_batches(s))
        it = iter(make_loader(data, keyed, to_batch, cfg.workers, cfg.seed, dist.rank, pin))

    def opt_step(step, batches=None):
        lr = cosine_lr(step, total, cfg.warmup, cfg.lr)
        set_lr(opt, lr)
        batches = batches or next_batches()
        for batch in batches:
            assert batch["step"] == step, (batch["step"], step)
            seen.merge(batch["tried"], batch["bad"])
            seen.check()
        loss, terms = accumulate(net, model, batches, cfg, dev, dtype, scaler, world)
        gnorm = optimizer_update(opt, scaler, params, cfg.grad_clip, step, {"loss": loss, **terms})
        with torch.no_grad():  # open_clip: keep the temperature within [0, ln 100]
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        return loss, terms, lr, gnorm, batch["hard"], batch["blocks"][0]  # images per row

    def checkpoint(path, step):
        rngs = D.all_gather_object(rng_state())  # every rank's generators, restored per rank
        stream = tracker and StreamTracker.merge_states(D.all_gather_object(tracker.state_dict()))
        if dist.is_main:
            save_checkpoint(path, {
                "script": "negclip", "kind": "negclip" if cfg.hard_negatives else "clip-ft",
                "model_config": dataclasses.asdict(model_config(cfg)),
                "model": trainable_state(model), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "best": best, "rng": rngs,
                "config": dataclasses.asdict(cfg), "data_position": step * accum, "stream": stream})
        D.barrier()

    def train_mode():
        net.train()
        for tower in locked:
            tower.eval()  # locked towers keep dropout off

    train_mode()
    if cfg.bench:  # on a GPU, a first step's FLOPs give the MFU
        flops = count_flops(lambda: opt_step(step)) * world if dev.type == "cuda" else None
        steps = iter(range(s0 := step + (flops is not None), 1 << 62))  # 3 warm-up, then timed
        pairs = cfg.hard_negatives and not cfg.train_shards  # [x; x'] from hn_start; streams: [x]
        x2 = sum(pairs and s >= hn_start for s in range(s0 + 3, s0 + 3 + cfg.bench)) / cfg.bench
        return run_bench(lambda b: opt_step(next(steps), b), cfg.bench, cfg.global_batch * (1 + x2),
                         dev, 3, flops, world, data_fn=next_batches)  # the loader's time apart

    timer, history, flops_step, val_every = StepTimer(dev), [], None, cfg.val_every or spe
    stop = min(total, cfg.stop_after) if cfg.stop_after > 0 else total
    while step < stop:
        timer.start()
        first = []  # on a GPU, the first step's FLOPs for MFU
        if flops_step is None and dev.type == "cuda":
            flops_step = count_flops(lambda: first.append(opt_step(step))) * world
        loss, terms, lr, gnorm, hard, n_img = first[0] if first else opt_step(step)
        t = timer.stop(cfg.global_batch * n_img)
        step += 1
        history.append(float(loss))
        if step % cfg.log_every == 0 or step == total or step == 1:
            m = mfu(flops_step, t["ms_step"] / 1000, dev, world)
            log.log(step, loss=float(D.all_reduce_mean(loss)),
                    **{k: float(D.all_reduce_mean(v)) for k, v in terms.items()}, lr=lr,
                    grad_norm=gnorm, scale=float(model.logit_scale.detach().exp()), hard=int(hard),
                    bad_images=counts.bad, **t, **({"mfu": m} if m else {}))
        if cfg.val_file != "none" and (step % val_every == 0 or step == total):
            sc = scorer(model.eval(), tok, cfg, dist)
            r = B.eval_retrieval(sc, cfg.val_file, cfg.image_root)
            train_mode()
            log.log(step, val_r_mean=r["r_mean"], val_txt_r1=r["txt_r1"], val_img_r1=r["img_r1"])
            if r["r_mean"] > best:  # best.pt: ours (the release validates and saves each epoch)
                best, best_ck = r["r_mean"], os.path.join(cfg.out_dir, "best.pt")
                checkpoint(best_ck, step)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < total:
            checkpoint(os.path.join(cfg.out_dir, "last.pt"), step)
    checkpoint(os.path.join(cfg.out_dir, "last.pt"), step)
    seen.gather()  # every rank's image counts
    if tracker:  # every rank's stream counts
        counts.tried, counts.bad = map(sum, zip(*D.all_gather_object((counts.tried, counts.bad))))
    log.info(f"train: {counts.report()}")
    counts.check(final=True)
    sel = load_checkpoint(best_ck) if best_ck and os.path.isfile(best_ck) else {}
    sel = sel if sel.get("best") == best else {}  # (a resumed run's: if it holds the best restored)
    D.same_on_every_rank(sel.get("step"), "the step of the best.pt the final test reads")
    if sel:  # the best validation retrieval's weights; without validation, the last weights
        model.load_state_dict(sel["model"], strict=False)
    log.info(f"selected weights: {best_ck} (step {sel['step']}, val r_mean {best:.2f})" if sel else
             f"selected weights: the last (step {step}; no validation checkpoint)")
    return {"train/final_loss": history[-1] if history else float("nan"), "train/steps": step,
            "train/selected_step": sel.get("step", step),
            "train/best_val_r_mean": best, "train/losses": history, "train/unreadable_images": counts.bad}


# ================================================================================================ transformers export

def export_model(model, cfg, out):
    """Merge LoRA; write CLIPModel (--init clip), else vision/, text/ and heads (transformers)."""
    from transformers import AutoTokenizer, CLIPModel
    merge_lora(model)
    os.makedirs(out, exist_ok=True)
    if cfg.init == "clip":
        hf = CLIPModel.from_pretrained(cfg.clip)
        names = {"vision.": "vision_model.", "text.": "text_model."}  # CLIPModel's names of the towers
        sd = {next((n + k[len(o):] for o, n in names.items() if k.startswith(o)), k): v
              for k, v in model.state_dict().items()}
        hf.load_state_dict(sd, strict=True)
        hf.save_pretrained(out)
        AutoTokenizer.from_pretrained(cfg.clip).save_pretrained(out)
    else:
        from safetensors.torch import save_file
        model.vision.save_pretrained(os.path.join(out, "vision"))
        model.text.save_pretrained(os.path.join(out, "text"))
        AutoTokenizer.from_pretrained(cfg.text).save_pretrained(os.path.join(out, "text"))
        heads = {"visual_projection": model.visual_projection.weight, "logit_scale": model.logit_scale.reshape(1),
                 "text_projection": model.text_projection.weight}
        save_file({k: v.detach().contiguous() for k, v in heads.items()}, os.path.join(out, "heads.safetensors"))
    return out


# ================================================================================================ main

def load_for_eval(cfg, log, argv=()):
    """The model to eval/export: the init model or a checkpoint's (NG.checkpoint_model_fields)."""
    if not cfg.ckpt:
        return build_model(model_config(cfg))
    ck = load_checkpoint(cfg.ckpt)
    expect_checkpoint(ck, cfg.ckpt, "negclip", flag="--ckpt")
    mc = ck.get("model_config") or ck["config"]  # unstamped: the run's config
    mc = {f.name: mc[f.name] for f in dataclasses.fields(ModelConfig)}
    NG.checkpoint_model_fields(cfg, mc, given_flags(argv), log.info)
    model, tok = build_model(model_config(cfg))
    if missing := set(ck["model"]) - set(model.state_dict()):
        raise ValueError(f"{cfg.ckpt}: weights {sorted(missing)[:3]} do not fit the model")
    model.load_state_dict(ck["model"], strict=False)
    log.info(f"loaded {len(ck['model'])} trained tensors from {cfg.ckpt} (step {ck['step']})")
    return model, tok


def params_mode(cfg, log):
    """The configured dual encoder on the meta device: trainable/frozen parameters per part, FLOPs of
    a row's training step (2 images, 4 captions of max_text_len, no mask; 1 + 1 without negatives)."""
    model, _ = build_model(model_config(cfg), meta=True)
    out = {f"{part}_{kind}": count_params(getattr(model, part), kind == "trainable") for kind in
           ("trainable", "frozen") for part in ("vision", "text", "visual_projection", "text_projection")}
    out.update(lora=sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n),
               trainable=count_params(model, True), frozen=count_params(model, False))
    pixels = torch.zeros(1 + cfg.hard_negatives, 3, model.image_size, model.image_size, device="meta")
    ids = torch.ones(1 + 3 * cfg.hard_negatives, cfg.max_text_len, dtype=torch.long, device="meta")
    out["gflops_row"] = count_flops(lambda: negclip_loss(*model(pixels, ids))[0].backward()) / 1e9
    log.info(counts_table(out))
    return out


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description="NegCLIP: mine | train | eval | export")
    check_choices(cfg, mode="mine|train|eval|export|params", init="clip|unimodal",
                  tagger="auto|nltk|rule", precision="auto|fp32|bf16|fp16", vision_pool="cls|mean",
                  text_pool="mean|cls")
    if cfg.mode == "params":  # hub names from common.hf's table; the toy's folders (built if missing)
        return params_mode(resolve_paths(cfg), Logger("", True))
    dist = D.setup_distributed(cfg.device)
    try:
        log = Logger(cfg.out_dir, dist.is_main)
        if cfg.mode == "train":  # before any data, mining or model: the micro batch this world runs
            fit_micro(cfg, dist.world_size, log.info)
        resolve_paths(cfg, dist.is_main)
        NG.check_val_file(cfg)  # train: read after an epoch, so a bad --val_file stops the run now
        amp.seed_everything(cfg.seed + dist.rank)
        log.info("config:\n" + format_config(cfg))
        if dist.is_main:
            save_config(cfg, cfg.out_dir)
        dtype = amp.pick_dtype(dist.device, cfg.precision)
        report = cfg.report and dist.is_main and cfg.mode in ("train", "eval") and not cfg.bench
        rows = NG.negative_rows(cfg) if report else []  # validation images with captions, negatives
        score = lambda m: NG.score_rows(scorer(m.to(dist.device).eval(), tok, cfg, dist), rows)  # noqa
        before, t_eval = None, time.perf_counter()
        if cfg.mode in ("eval", "export"):
            model, tok = load_for_eval(cfg, log, argv)
            merge_lora(model).to(dist.device)
            if cfg.mode == "export":
                out = cfg.export_dir or os.path.join(cfg.out_dir, "export")
                if dist.is_main:  # (log.info prints on the main process only)
                    log.info(f"exported to {export_model(model, cfg, out)}")
                return {"export_dir": out}
            t_eval, res = time.perf_counter(), evaluate(model, tok, cfg, dist, log)
        elif cfg.mode == "mine":
            return mine(cfg, *build_model(model_config(cfg)), dist, dtype, log, force=True)
        else:
            model, tok = build_model(model_config(cfg))
            before = score(model)  # the report's rows with the initial weights
            res, t_eval = train(cfg, model, tok, dist, dtype, log), time.perf_counter()
            if cfg.eval_after_train and not cfg.bench:
                res.update(evaluate(merge_lora(model).float(), tok, cfg, dist, log))
        if dist.is_main and not cfg.bench:
            scalars = {k: v for k, v in res.items() if not isinstance(v, list)}
            log.info(B.format_table(scalars))
            with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
                json.dump(scalars, f, indent=2)
            if cfg.report:  # data/negatives.py write_report: curves, rows scored before/after, bars
                t, path = time.perf_counter(), NG.write_report(cfg, rows, before, score(model), res)
                log.info(f"report: {path} ({time.perf_counter() - t:.2f} s; eval {t - t_eval:.1f} s)")
        return res
    finally:
        D.cleanup_distributed()


if __name__ == "__main__":
    main()
