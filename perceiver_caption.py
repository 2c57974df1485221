"""Captioning with a frozen CLIP vision tower and a frozen GPT-2, bridged by three small trainable parts.

The method (the seed project `shan18/Perceiver-Resampler-XAttn-Captioning`, built on Flamingo and ClipCap):
- a **Perceiver Resampler** (Alayrac et al. 2022, Flamingo, Sec. 2.1 / App. A.1.1): 64 learned latents attend to
  the CLIP tokens of every frame (plus a learned per-frame time embedding) concatenated with the latents
  themselves, and compress an image or a whole video clip into 64 visual tokens Z;
- **gated cross-attention dense blocks** (Flamingo Sec. 2.2) inserted *before* the frozen GPT-2 blocks: text
  queries attend to Z, and the result is added through tanh(alpha) gates initialised at 0, so at step 0 the model
  is exactly the frozen GPT-2;
- a **mapper** (Mokady et al. 2021, ClipCap): an MLP that turns the mean CLIP token of each frame into one GPT-2
  input embedding, i.e. a visual *prefix* of one token per frame.
`--bridge mapper|xattn|both` switches between the seed's three ablations (mapper only; resampler + xattn with the
raw mean CLIP vector as prefix; both). Only these parts train; CLIP and GPT-2 stay frozen (eval mode, bf16 on
GPU, outside DDP). CLIP runs under no_grad; GPT-2 cannot, since the loss gradient must flow *through* its frozen
blocks back to the xattn blocks and the prefix. Images are one-frame videos; videos are sampled to `num_frames` frames, shorter clips are masked.
The loss is next-token cross-entropy on caption tokens only; decoding is greedy or beam search through
`transformers`' own `generate`; BLEU-1..4, CIDEr-D and ROUGE-L come from `common.metrics`.

Commands
    # toy CPU run (builds data/toy on first use): train, then caption the test split
    python perceiver_caption.py --bridge both
    python perceiver_caption.py --mode test --ckpt runs/perceiver_caption/best.pt
    python perceiver_caption.py --task video --out_dir runs/pc_video           # video captions
    python perceiver_caption.py --blank true --out_dir runs/pc_blank           # no-image baseline
    python perceiver_caption.py --mode caption --ckpt runs/perceiver_caption/best.pt --inputs a.png,frames_dir/
    HF_HUB_OFFLINE=1 python perceiver_caption.py --mode params --preset paper  # trainable counts per ablation
    # 1 GPU, the seed's COCO 2017 recipe (val2017 is both validation and test set, as in the seed);
    # --clip_model / --lm_model may be local folders holding the same checkpoints
    python data/convert.py coco annotations/captions_train2017.json --out coco_train2017.jsonl
    python data/convert.py coco annotations/captions_val2017.json --out coco_val2017.jsonl
    python perceiver_caption.py --preset paper --train_file coco_train2017.jsonl --val_file coco_val2017.jsonl \
        --test_file coco_val2017.jsonl --image_root /data/coco --out_dir runs/pc_coco_both
    # multi-node: same code path and the same recipe, the global batch of 32 split over 2 x 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank $R --master_addr $ADDR --master_port 29500 \
        perceiver_caption.py --preset paper --global_batch 32 --micro_batch 2 ...
    python perceiver_caption.py --bench 20                                    # samples/s (MFU on GPU)

Reproduces: the seed's COCO results table (BLEU-4 / ROUGE-L for the three ablation rows, sec. 3.3 of the spec)
with `--preset paper`. On the toy world (README) every row scores above the same recipe trained on blank images
(test CIDEr mapper 67 / xattn 87 / both 98 / video 161 vs 40 / 71 / 48 / 32), in the seed's order. The mapper row
needs a GPT-2 that reads its context, as real GPT-2 does; the toy GPT-2 learns that from two-caption documents.
Trainable parameters at paper sizes: mapper 787,712; xattn 38,238,744; both 39,026,456 (`--mode params`).

Deviations from the seed, each a flag whose seed value is available: `--frame_key_mask` (padded frames get no
keys in the resampler), `--position_fix` (text positions do not depend on the batch's longest clip),
`--frozen_eval` (GPT-2 dropout off while training), labels -100 on padding instead of the seed's token id 0,
dynamic padding (`--max_len` caps), `--cache_feats` (CLIP is frozen and there is no augmentation).
Beam search uses `transformers`' scoring (log-prob / length); the seed's temperature 0.9 is not applied to beams.
"""
import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import amp, checkpoint, dist as cdist
from common.attention import attention
from common.config import format_config, parse_config, save_config
from common.data import DataError, ImageFolderLoader, read_pairs, read_video
from common.image import ImageTransform, load_image
from common.log import Logger, progress
from common.train import (StepTimer, check_finite, clip_grad, cosine_lr, count_flops, mfu, param_groups, run_bench,
                          set_lr)


# ================================================================================================ Config
@dataclass
class Config:
    preset: str = "toy"
    mode: str = "train"            # train | test | caption | params
    out_dir: str = "runs/perceiver_caption"
    toy_root: str = "data/toy"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"        # auto = bf16 on GPU, fp32 on CPU
    bench: int = 0                 # >0: time this many training steps and exit
    resume: str = ""               # checkpoint to continue training from
    stop_at: int = 0               # end this run after this step (a planned interruption; schedule unchanged)
    ckpt: str = ""                 # weights for --mode test|caption ('' = <out_dir>/best.pt)
    # frozen backbones (HF hub names or local folders; '' = the toy world's models)
    clip_model: str = ""
    lm_model: str = ""
    # bridge (seed defaults)
    bridge: str = "both"           # mapper | xattn | both
    xattn_prefix: str = "raw"      # with --bridge xattn: raw (mean CLIP vector as prefix, seed) | none (text only)
    mapper_hidden: int = 512
    resampler_depth: int = 4
    resampler_heads: int = 6
    resampler_dim_head: int = 64
    num_latents: int = 64
    max_time_emb: int = 500        # size of the per-frame time-embedding table
    resampler_ff_mult: int = 1
    xattn_heads: int = 6
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 1
    xattn_every: int = 1           # xattn before GPT-2 block i when i % xattn_every == 0 (seed: every block)
    frame_key_mask: bool = True    # [dev] padded frames give no resampler keys (seed: false)
    position_fix: bool = True      # [dev] GPT-2 positions from the cumulative mask (seed: false, 0..T+L-1)
    frozen_eval: bool = True       # [dev] frozen GPT-2 in eval mode while training (seed: false, dropout on)
    # data
    task: str = "image"            # image | video (toy defaults for the files below)
    train_file: str = ""           # canonical pairs or video JSONL; '' = toy world's file for --task
    val_file: str = ""
    test_file: str = ""
    image_root: str = ""           # '' = toy_root
    num_frames: int = 8            # frames sampled per video (segment centres); shorter clips are masked
    max_len: int = 64              # caption tokens incl. BOS/EOS (dynamic padding below this)
    bos_target: bool = True        # seed: the last prefix position predicts BOS
    blank: bool = False            # replace every image by a blank one (the no-image baseline), train and test
    cache_feats: bool = False      # [dev] encode every image once with the frozen CLIP and keep the features
    workers: int = 0
    max_bad_frac: float = 0.05
    # optimisation (seed: AdamW 1e-4, betas (0.9, 0.98), wd 1e-3 on everything, 10 % warm-up then constant)
    global_batch: int = 32
    micro_batch: int = 32
    steps: int = 0                 # 0 = epochs * len(train) // global_batch
    epochs: float = 30.0
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 1e-3
    decay_all: bool = True         # seed: weight decay also on gates, norms, latents
    schedule: str = "constant"     # constant (warm-up then flat, seed) | cosine | linear_decay
    warmup_frac: float = 0.1
    clip_grad: float = 0.0         # 0 = no clipping (seed); the norm is logged either way
    log_every: int = 50
    eval_every: int = 0            # validation loss every N steps (0 = once per epoch)
    save_every: int = 1000
    test_after_train: bool = True
    # decoding / evaluation
    decode: str = "beam"           # beam | greedy
    beams: int = 5
    max_new_tokens: int = 100
    num_return: int = 1            # captions per input (n-best beams)
    eval_batch: int = 32
    max_eval: int = 0              # caption at most this many test items (0 = all)
    inputs: list[str] = field(default_factory=list)  # --mode caption: image files or frame folders


PRESETS = {
    # Toy world (data/toy): tiny CLIP/GPT-2, small bridge, CLIP features cached, a few minutes on 2 CPU cores.
    "toy": dict(resampler_depth=2, resampler_heads=4, resampler_dim_head=32, num_latents=16, mapper_hidden=256,
                xattn_heads=4, xattn_dim_head=32, num_frames=8, max_len=32, cache_feats=True,
                global_batch=32, micro_batch=32, steps=600, lr=3e-3, schedule="cosine", warmup_frac=0.05,
                weight_decay=1e-3, clip_grad=1.0, log_every=50, eval_every=200, save_every=200,
                beams=3, max_new_tokens=20, eval_batch=64),
    # The seed's recipe: ViT-B/32 CLIP + GPT-2 small, bridge sizes of its config.yaml, batch 32, 30 epochs.
    "paper": dict(clip_model="openai/clip-vit-base-patch32", lm_model="gpt2", bridge="both",
                  mapper_hidden=512, resampler_depth=4, resampler_heads=6, resampler_dim_head=64, num_latents=64,
                  xattn_heads=6, xattn_dim_head=64, xattn_every=1, num_frames=8, max_len=64,
                  global_batch=32, micro_batch=32, epochs=30.0, lr=1e-4, beta1=0.9, beta2=0.98,
                  weight_decay=1e-3, decay_all=True, schedule="constant", warmup_frac=0.1, clip_grad=0.0,
                  cache_feats=False, workers=8, log_every=100, decode="beam", beams=5, max_new_tokens=100),
}


# ================================================================================================ Model
class FeedForward(nn.Sequential):
    """Pre-norm FFW of the resampler and of the xattn block: LN -> Linear -> GELU -> Linear, bias-free."""

    def __init__(self, dim, mult):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


def _heads(x, h):
    b, n, _ = x.shape
    return x.view(b, n, h, -1).transpose(1, 2)  # (B, N, H*Dh) -> (B, H, N, Dh)


def _merge(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, H, N, Dh) -> (B, N, H*Dh)


class PerceiverAttention(nn.Module):
    """Latents attend to [media ; latents] (Flamingo App. A.1.1: keys/values include the latents themselves)."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media, latents, media_mask=None):
        """media (B, N, D), latents (B, n, D), media_mask (B, N) bool or None -> (B, n, D)."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = _heads(self.to_q(latents), self.heads)                         # (B, H, n, Dh)
        k, v = self.to_kv(torch.cat([media, latents], 1)).chunk(2, -1)     # (B, N+n, inner) each
        k, v = _heads(k, self.heads), _heads(v, self.heads)                # (B, H, N+n, Dh)
        mask = None
        if media_mask is not None:  # latent keys are always valid
            keep = torch.ones(latents.shape[:2], dtype=torch.bool, device=latents.device)
            mask = torch.cat([media_mask, keep], 1)[:, None, None, :]     # (B, 1, 1, N+n)
        return self.to_out(_merge(attention(q, k, v, mask)))


class PerceiverResampler(nn.Module):
    """(B, T, S, D) CLIP tokens of T frames -> (B, num_latents, D) visual tokens Z."""

    def __init__(self, dim, depth, heads, dim_head, num_latents, max_time, ff_mult, key_mask=True):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.time_emb = nn.Parameter(torch.randn(max_time, 1, dim))  # one vector per frame index, shared over S
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, heads, dim_head), FeedForward(dim, ff_mult)])
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.key_mask = key_mask

    def forward(self, feats, frame_mask):
        """feats (B, T, S, D), frame_mask (B, T) bool -> Z (B, n, D)."""
        b, t, s, d = feats.shape
        if t > self.time_emb.shape[0]:
            raise ValueError(f"{t} frames but the time-embedding table has {self.time_emb.shape[0]}")
        x = feats + self.time_emb[:t] * frame_mask[:, :, None, None].to(feats.dtype)  # padded frames: no time emb
        x = x.reshape(b, t * s, d)                                              # (B, T*S, D): frames flattened
        mask = frame_mask.repeat_interleave(s, 1) if self.key_mask else None    # (B, T*S)
        lat = self.latents.expand(b, -1, -1)
        for attn, ff in self.layers:
            lat = lat + attn(x, lat, mask)
            lat = lat + ff(lat)
        return self.norm(lat)


class GatedXAttnDense(nn.Module):
    """Flamingo's GATED XATTN-DENSE (Sec. 2.2): y += tanh(a_attn) * XAttn(y, Z); y += tanh(a_ff) * FFW(y).

    Gates start at 0, so the frozen LM is untouched at initialisation (OpenFlamingo #286: without gates the
    initial loss is twice as high)."""

    def __init__(self, dim, media_dim, heads, dim_head, ff_mult):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.ff = FeedForward(dim, ff_mult)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, y, z):
        """y (B, L, D) LM hidden states, z (B, n, Dm) visual tokens -> (B, L, D). Every position sees all of z."""
        q = _heads(self.to_q(self.norm(y)), self.heads)            # (B, H, L, Dh)
        k, v = self.to_kv(z).chunk(2, -1)
        k, v = _heads(k, self.heads), _heads(v, self.heads)        # (B, H, n, Dh)
        y = y + self.attn_gate.tanh() * self.to_out(_merge(attention(q, k, v)))
        return y + self.ff_gate.tanh() * self.ff(y)


def lm_blocks(lm):
    """The list of decoder blocks of a HF GPT-2 (GPT2LMHeadModel.transformer.h)."""
    return lm.transformer.h


def lm_dims(lm_config):
    return lm_config.n_embd, lm_config.n_layer


class Bridge(nn.Module):
    """Everything trainable: mapper (prefix), resampler and xattn blocks, per `--bridge`.

    The xattn blocks live here, not inside GPT-2: while `conditioned(lm, z)` is active, a forward pre-hook on
    GPT-2 block i runs xattn block i on the hidden states before the block. GPT-2's module tree and state-dict
    keys stay untouched, only this module is trained, checkpointed and wrapped in DDP, and the hooks work with
    both calling conventions of GPT2Block (keywords in transformers 4.x, positional in 5.x).
    """

    def __init__(self, cfg, vis_dim, lm_dim, lm_layers):
        super().__init__()
        if cfg.bridge not in ("mapper", "xattn", "both"):
            raise ValueError(f"--bridge must be mapper|xattn|both, got {cfg.bridge!r}")
        if cfg.xattn_prefix not in ("raw", "none"):
            raise ValueError(f"--xattn_prefix must be raw|none, got {cfg.xattn_prefix!r}")
        self.use_mapper = cfg.bridge in ("mapper", "both")
        self.use_xattn = cfg.bridge in ("xattn", "both")
        self.prefix = "mapper" if self.use_mapper else cfg.xattn_prefix
        if self.prefix == "raw" and vis_dim != lm_dim:
            raise ValueError(f"--bridge xattn --xattn_prefix raw feeds the raw CLIP vector to GPT-2, which needs "
                             f"equal widths (CLIP {vis_dim} vs LM {lm_dim}); use --xattn_prefix none")
        self.position_fix = cfg.position_fix
        self.mapper = (nn.Sequential(nn.Linear(vis_dim, cfg.mapper_hidden), nn.Tanh(),
                                     nn.Linear(cfg.mapper_hidden, lm_dim)) if self.use_mapper else None)
        self.resampler, self.xattn, self.layer_ids = None, None, []
        if self.use_xattn:
            self.resampler = PerceiverResampler(vis_dim, cfg.resampler_depth, cfg.resampler_heads,
                                                cfg.resampler_dim_head, cfg.num_latents, cfg.max_time_emb,
                                                cfg.resampler_ff_mult, cfg.frame_key_mask)
            self.layer_ids = [i for i in range(lm_layers) if i % cfg.xattn_every == 0]
            self.xattn = nn.ModuleList(GatedXAttnDense(lm_dim, vis_dim, cfg.xattn_heads, cfg.xattn_dim_head,
                                                       cfg.xattn_ff_mult) for _ in self.layer_ids)
        self._z = None

    # ---- visual inputs -> GPT-2 prefix and xattn media
    def visual(self, feats, frame_mask):
        """feats (B, T, S, Dv), frame_mask (B, T) -> prefix (B, P, D) with mask (B, P), and Z (B, n, Dv) or None."""
        m = frame_mask.to(feats.dtype)[..., None]
        if self.prefix == "none":
            prefix, pmask = feats.new_zeros(feats.shape[0], 0, 1), frame_mask[:, :0]
        else:
            pooled = feats.mean(2)                                   # (B, T, Dv): mean of the S CLIP tokens
            prefix = (self.mapper(pooled) if self.use_mapper else pooled) * m  # (B, T, D): one token per frame
            pmask = frame_mask
        z = self.resampler(feats, frame_mask) if self.use_xattn else None
        return prefix, pmask, z

    # ---- side channel into GPT-2
    @contextlib.contextmanager
    def conditioned(self, lm, z):
        """Within this block, GPT-2 runs with xattn on visual tokens z (B, n, Dv); hooks and z are removed after."""
        if not self.use_xattn:
            yield
            return
        if z is None:
            raise RuntimeError("xattn bridge called without visual tokens")
        blocks = lm_blocks(lm)
        handles = [blocks[i].register_forward_pre_hook(self._make_hook(layer), with_kwargs=True)
                   for i, layer in zip(self.layer_ids, self.xattn)]
        self._z = z
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._z = None

    def _make_hook(self, layer):
        def hook(block, args, kwargs):
            if self._z is None:
                raise RuntimeError("an xattn layer ran without visual conditioning")
            h = args[0] if args else kwargs["hidden_states"]
            z = self._z
            if z.shape[0] != h.shape[0]:  # generate() repeats each input num_beams times (repeat_interleave)
                z = z.repeat_interleave(h.shape[0] // z.shape[0], 0)
            out = layer(h, z.to(h.dtype)).to(h.dtype)
            if args:
                return (out,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": out}
        return hook

    def lm_inputs(self, lm, prefix, pmask, tokens, tok_mask):
        """[prefix ; wte(tokens)] with mask and positions: (B, P+L, D), (B, P+L), (B, P+L)."""
        tok = lm.get_input_embeddings()(tokens)
        embeds = torch.cat([prefix.to(tok.dtype), tok], 1) if prefix.shape[1] else tok
        mask = torch.cat([pmask.long(), tok_mask.long()], 1)
        return embeds, mask, position_ids(mask, self.position_fix)

    def forward(self, lm, feats, frame_mask, tokens, tok_mask):
        """Teacher-forced logits (B, P+L, V) of the frozen GPT-2 given visual features; P = prefix length."""
        prefix, pmask, z = self.visual(feats, frame_mask)
        embeds, mask, pos = self.lm_inputs(lm, prefix, pmask, tokens, tok_mask)
        with self.conditioned(lm, z):
            return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).logits

    @torch.no_grad()
    def generate(self, lm, feats, frame_mask, bos_id, eos_id, pad_id, num_beams=1, max_new_tokens=20,
                 num_return=1):
        """Decode captions with HF generate from [prefix ; BOS]; returns token ids (B*num_return, <=max_new)."""
        prefix, pmask, z = self.visual(feats, frame_mask)
        bos = torch.full((feats.shape[0], 1), bos_id, dtype=torch.long, device=feats.device)
        embeds, mask, pos = self.lm_inputs(lm, prefix, pmask, bos, torch.ones_like(bos))
        with self.conditioned(lm, z):
            return lm.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, do_sample=False,
                               num_beams=num_beams, num_return_sequences=num_return, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=bos_id, use_cache=True)


def position_ids(mask, fix):
    """GPT-2 positions: cumulative over the mask (padded frames take no slot) or plain 0..N-1 (seed)."""
    if fix:
        return ((mask.cumsum(1) - 1).clamp(min=0) * mask).long()
    return torch.arange(mask.shape[1], device=mask.device).expand_as(mask)


def count_parameters(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def bridge_param_table(bridge):
    parts = {"mapper": bridge.mapper, "resampler": bridge.resampler, "xattn": bridge.xattn}
    out = {k: (count_parameters(m) if m is not None else 0) for k, m in parts.items()}
    out["trainable"] = count_parameters(bridge)
    return out


# ================================================================================================ Losses
def caption_labels(tokens, tok_mask, prefix_len, bos_target=True):
    """Targets aligned with [prefix ; tokens]: (B, L) -> (B, P+L); -100 on prefix, padding (and BOS if asked).

    Padding is marked by the mask, not by a token id (the seed used id 0, which is also GPT-2's '!')."""
    labels = tokens.masked_fill(~tok_mask.bool(), -100)
    if not bos_target:
        labels[:, 0] = -100
    pad = labels.new_full((labels.shape[0], prefix_len), -100)
    return torch.cat([pad, labels], 1)


def caption_loss(logits, labels, denom):
    """Next-token CE summed over target tokens / denom. logits (B, N, V), labels (B, N); position i predicts i+1.

    denom = number of target tokens in the whole global batch (all micro batches, all ranks), so the sum of the
    per-micro-batch losses (times world size, which DDP's gradient average divides out) is the global mean."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum") / denom


# ================================================================================================ Data
def sample_frames(n, k):
    """Indices of k frames out of n at the centres of k equal segments (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return [int((i + 0.5) * n / k) for i in range(k)]


def toy_files(cfg):
    """Default data files of the toy world for --task."""
    if cfg.task not in ("image", "video"):
        raise ValueError(f"--task must be image|video, got {cfg.task!r}")
    stem = "pairs" if cfg.task == "image" else "video"
    return {s: os.path.join(cfg.toy_root, f"{stem}_{s}.jsonl") for s in ("train", "val", "test")}


def read_records(path, task):
    """Canonical pairs or video JSONL -> [{"frames": [paths], "captions": [...]}] (an image is one frame)."""
    if task == "image":
        return [{"frames": [r["image"]], "captions": r["captions"]} for r in read_pairs(path)]
    return read_video(path)


class CaptionTokenizer:
    """GPT-2 style caption encoding: [BOS] + tokens(' ' + caption) + [EOS], truncated to max_len."""

    def __init__(self, tok, max_len):
        self.tok, self.max_len = tok, max_len
        self.eos = tok.eos_token_id
        self.bos = tok.bos_token_id if tok.bos_token_id is not None else self.eos
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos
        if self.eos is None:
            raise ValueError("the LM tokenizer has no EOS token")

    def encode(self, caption):
        ids = self.tok(" " + caption.strip(), add_special_tokens=False)["input_ids"]
        return [self.bos] + ids[:self.max_len - 2] + [self.eos]

    def decode(self, ids):
        ids = list(ids)
        if self.eos in ids:  # stop at the first EOS (beams are padded after it)
            ids = ids[:ids.index(self.eos)]
        return self.tok.decode(ids, skip_special_tokens=True).strip()


class CaptionSet(torch.utils.data.Dataset):
    """Items keyed by (record index, caption index) -> frames (or cached CLIP features) + caption token ids."""

    def __init__(self, records, image_root, image_size, num_frames, ctok, blank=False, max_bad_frac=0.05):
        self.records, self.ctok, self.num_frames, self.blank = records, ctok, num_frames, blank
        self.size = image_size
        self.loader = ImageFolderLoader(image_root, ImageTransform(image_size), max_bad_frac)
        self.cache = None  # (feats list of (T, S, D)) once filled by `cache_features`

    def __len__(self):
        return len(self.records)

    def frames(self, i):
        """(T, 3, S, S) pixels of record i's sampled frames; unreadable frames are dropped and counted."""
        paths = self.records[i]["frames"]
        paths = [paths[j] for j in sample_frames(len(paths), self.num_frames)]
        if self.blank:  # the no-image baseline: a constant (dataset-mean) image, same shape as a real one
            return torch.zeros(len(paths), 3, self.size, self.size)
        imgs = [x for x in (self.loader(p) for p in paths) if x is not None]
        return torch.stack(imgs) if imgs else None

    def __getitem__(self, key):
        i, c = key
        caps = self.records[i]["captions"]
        item = {"index": i, "tokens": torch.tensor(self.ctok.encode(caps[c % len(caps)]))}
        if self.cache is not None:
            item["feats"] = self.cache[i]
        else:
            item["pixels"] = self.frames(i)
            if item["pixels"] is None:
                return None
        return item


def collate(items):
    """Pad frames (or features) to the longest clip and tokens to the longest caption; masks mark real entries."""
    items = [x for x in items if x is not None]
    if not items:
        return None
    key = "feats" if "feats" in items[0] else "pixels"
    t_max = max(x[key].shape[0] for x in items)
    l_max = max(len(x["tokens"]) for x in items)
    vis = items[0][key].new_zeros((len(items), t_max) + tuple(items[0][key].shape[1:]))
    frame_mask = torch.zeros(len(items), t_max, dtype=torch.bool)
    tokens = torch.zeros(len(items), l_max, dtype=torch.long)
    tok_mask = torch.zeros(len(items), l_max, dtype=torch.bool)
    for b, x in enumerate(items):
        t, n = x[key].shape[0], len(x["tokens"])
        vis[b, :t], frame_mask[b, :t] = x[key], True
        tokens[b, :n], tok_mask[b, :n] = x["tokens"], True
    return {key: vis, "frame_mask": frame_mask, "tokens": tokens, "tok_mask": tok_mask,
            "index": torch.tensor([x["index"] for x in items])}


class StepSampler(torch.utils.data.Sampler):
    """Deterministic stream of global batches: step s holds positions s*G .. s*G+G-1 of a sequence of epochs,
    each a seeded permutation with one seeded caption draw per image (the seed draws one of the 5 captions per
    image per step). This rank takes its contiguous 1/world slice, so 1 process and N processes see the same
    global batch, and resuming needs only the step number."""

    def __init__(self, n_records, global_batch, rank, world, seed, start, total):
        if global_batch % world:
            raise ValueError(f"global_batch {global_batch} not divisible by world size {world}")
        self.n, self.g, self.rank, self.per = n_records, global_batch, rank, global_batch // world
        self.seed, self.start, self.total = seed, start, total
        self._epoch, self._perm, self._caps = None, None, None

    def _epoch_draws(self, epoch):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm, self._caps = torch.randperm(self.n, generator=g), torch.randint(0, 1 << 30, (self.n,), generator=g)
            self._epoch = epoch
        return self._perm, self._caps

    def keys(self, step):
        out = []
        for p in range(step * self.g + self.rank * self.per, step * self.g + (self.rank + 1) * self.per):
            perm, caps = self._epoch_draws(p // self.n)
            i = int(perm[p % self.n])
            out.append((i, int(caps[i])))
        return out

    def __iter__(self):
        for s in range(self.start, self.total):
            yield self.keys(s)

    def __len__(self):
        return self.total - self.start


def make_loader(ds, batch_sampler, workers):
    return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                                       persistent_workers=False)


def chunks(keys, n):
    return [keys[i:i + n] for i in range(0, len(keys), n)]


# ================================================================================================ Eval
@torch.no_grad()
def encode_frames(clip, pixels, frame_mask, dtype):
    """Frozen CLIP on the real frames only: pixels (B, T, 3, H, W) -> last_hidden_state (B, T, S, D), zero on pads.

    The seed uses last_hidden_state (before post_layernorm) with all tokens including CLS."""
    dev = next(clip.parameters()).device
    pixels, frame_mask = pixels.to(dev), frame_mask.to(dev)
    with amp.autocast(dev, dtype):
        h = clip(pixel_values=pixels[frame_mask].to(next(clip.parameters()).dtype)).last_hidden_state  # (N, S, D)
    out = h.new_zeros(frame_mask.shape + h.shape[1:])
    out[frame_mask] = h
    return out.float()


def batch_feats(clip, batch, dtype, device):
    """A collated batch -> CLIP features (B, T, S, D) on device (cached or computed now)."""
    if "feats" in batch:
        return batch["feats"].to(device, torch.float32)
    return encode_frames(clip, batch["pixels"], batch["frame_mask"], dtype)


@torch.no_grad()
def cache_features(ds, clip, dtype, device, batch_size, is_main, workers=0):
    """Encode every record once with the frozen CLIP (no augmentation anywhere, so features never change)."""
    ds.cache = None
    feats = [None] * len(ds)
    loader = make_loader(ds, chunks([(i, 0) for i in range(len(ds))], batch_size), workers)
    for batch in progress(loader, is_main, desc="clip features"):
        if batch is None:
            continue
        f = encode_frames(clip, batch["pixels"], batch["frame_mask"], dtype).cpu()
        for b, i in enumerate(batch["index"].tolist()):
            feats[i] = f[b, :int(batch["frame_mask"][b].sum())]
    ds.loader.check()
    missing = [i for i, f in enumerate(feats) if f is None]
    if missing:
        raise DataError(f"{len(missing)} records have no readable frame (e.g. {ds.records[missing[0]]['frames'][:1]})")
    ds.cache = feats


@torch.no_grad()
def validation_loss(bridge, lm, clip, ds, cfg, dtype, device, d):
    """Mean caption CE on the validation split (caption i % 5 for record i), sharded over ranks."""
    keys = [(i, i) for i in cdist.shard_indices(len(ds), d)]
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in make_loader(ds, chunks(keys, cfg.eval_batch), 0):
        if batch is None:
            continue
        feats = batch_feats(clip, batch, dtype, device)
        tokens, tok_mask = batch["tokens"].to(device), batch["tok_mask"].to(device)
        with amp.autocast(device, dtype):
            logits = bridge(lm, feats, batch["frame_mask"].to(device), tokens, tok_mask)
        labels = caption_labels(tokens, tok_mask, logits.shape[1] - tokens.shape[1], cfg.bos_target)
        tot[0] += caption_loss(logits, labels, 1.0).double()
        tot[1] += (labels[:, 1:] != -100).sum()
    tot = cdist.all_reduce_mean(tot) * d.world_size
    return float(tot[0] / tot[1].clamp(min=1))


@torch.no_grad()
def caption_records(bridge, lm, clip, ds, indices, cfg, ctok, dtype, device, is_main):
    """Decode captions for ds records `indices` -> {index: [caption, ...]} (num_return per record)."""
    beams = cfg.beams if cfg.decode == "beam" else 1
    if cfg.decode not in ("beam", "greedy"):
        raise ValueError(f"--decode must be beam|greedy, got {cfg.decode!r}")
    if cfg.num_return > beams:
        raise ValueError(f"--num_return {cfg.num_return} needs at least as many beams")
    out = {}
    loader = make_loader(ds, chunks([(i, 0) for i in indices], cfg.eval_batch), 0)
    for batch in progress(loader, is_main, desc="captioning"):
        if batch is None:
            continue
        feats = batch_feats(clip, batch, dtype, device)
        with amp.autocast(device, dtype):
            ids = bridge.generate(lm, feats, batch["frame_mask"].to(device), ctok.bos, ctok.eos, ctok.pad,
                                  beams, cfg.max_new_tokens, cfg.num_return)
        ids = ids.view(feats.shape[0], cfg.num_return, -1).tolist()
        for b, i in enumerate(batch["index"].tolist()):
            out[i] = [ctok.decode(x) for x in ids[b]]
    return out


def evaluate_captions(bridge, lm, clip, ds, cfg, ctok, dtype, device, d, run_dir, name="test"):
    """Caption the split (sharded over ranks), score against all references, write <run_dir>/predictions_<name>.json."""
    from common.metrics import caption_metrics
    n = len(ds) if cfg.max_eval <= 0 else min(cfg.max_eval, len(ds))
    mine = [i for i in cdist.shard_indices(n, d)]
    preds = {}
    for part in cdist.all_gather_object(caption_records(bridge, lm, clip, ds, mine, cfg, ctok, dtype, device,
                                                        d.is_main)):
        preds.update(part)
    metrics = None
    if d.is_main:
        gts = {i: ds.records[i]["captions"] for i in preds}
        res = {i: preds[i][:1] for i in preds}
        metrics = {k: 100.0 * v for k, v in caption_metrics(gts, res).items()}  # reported x100 like the seed
        metrics["n"] = len(preds)
        rows = [{"sample_path": ds.records[i]["frames"] if cfg.task == "video" else ds.records[i]["frames"][0],
                 "prediction": preds[i][0] if cfg.num_return == 1 else preds[i], "target": ds.records[i]["captions"]}
                for i in sorted(preds)]
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, f"predictions_{name}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return cdist.broadcast_object(metrics)


# ================================================================================================ Train
def resolve_paths(cfg):
    """Fill in the toy world's models and files for whatever the mode needs and the config leaves empty."""
    needed = {"train": ["train_file", "val_file"] + (["test_file"] if cfg.test_after_train else []),
              "test": ["test_file"], "caption": []}[cfg.mode] + ["clip_model", "lm_model"]
    if any(not getattr(cfg, f) for f in needed) and not os.path.isfile(os.path.join(cfg.toy_root, "manifest.json")):
        from data.toy import ensure_toy_world
        ensure_toy_world(cfg.toy_root)
    files = toy_files(cfg)
    return dataclasses.replace(
        cfg, clip_model=cfg.clip_model or os.path.join(cfg.toy_root, "models", "clip"),
        lm_model=cfg.lm_model or os.path.join(cfg.toy_root, "models", "gpt2"),
        train_file=cfg.train_file or files["train"], val_file=cfg.val_file or files["val"],
        test_file=cfg.test_file or files["test"], image_root=cfg.image_root or cfg.toy_root)


def load_frozen(cfg, device, dtype):
    """Frozen CLIP vision tower + GPT-2 + tokenizer from local folders or hub names; no remote code."""
    from transformers import AutoTokenizer, CLIPVisionModel, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # loading the vision tower from a full CLIPModel folder lists the text keys
    hf_logging.disable_progress_bar()
    fdt = amp.frozen_dtype(device, dtype)
    clip = CLIPVisionModel.from_pretrained(cfg.clip_model, dtype=fdt)
    lm = GPT2LMHeadModel.from_pretrained(cfg.lm_model, dtype=fdt)
    tok = AutoTokenizer.from_pretrained(cfg.lm_model)
    for m in (clip, lm):
        m.requires_grad_(False)
        m.eval()  # no dropout (seed: GPT-2 dropout stayed on; --frozen_eval false restores that in training)
        m.to(device)
    return clip, lm, tok


def build_bridge(cfg, clip_config, lm_config):
    vis_dim = clip_config.hidden_size
    lm_dim, lm_layers = lm_dims(lm_config)
    return Bridge(cfg, vis_dim, lm_dim, lm_layers)


def make_optimizer(cfg, bridge):
    groups = ([{"params": [p for p in bridge.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
              if cfg.decay_all else param_groups(bridge, cfg.weight_decay))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(cfg, step, total):
    warm = int(cfg.warmup_frac * total)
    if cfg.schedule == "cosine":
        return cosine_lr(step, total, warm, cfg.lr)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear_decay":
        return cfg.lr * max(0.0, (total - step) / max(1, total - warm))
    raise ValueError(f"--schedule must be constant|cosine|linear_decay, got {cfg.schedule!r}")


def train_step(cfg, model, bridge, lm, clip, batch, opt, scaler, dtype, device, d, step, total, update=True):
    """One optimizer step over this rank's share of the global batch, in micro batches (gradient accumulation).
    update=False: forward + backward only, gradients dropped (to count a step's FLOPs for MFU)."""
    lr = lr_at(cfg, step, total)
    set_lr(opt, lr)
    feats_all = batch_feats(clip, batch, dtype, device)
    tokens_all, tok_mask_all = batch["tokens"].to(device), batch["tok_mask"].to(device)
    frame_mask_all = batch["frame_mask"].to(device)
    prefix_len = 0 if bridge.prefix == "none" else frame_mask_all.shape[1]
    labels_all = caption_labels(tokens_all, tok_mask_all, prefix_len, cfg.bos_target)  # (B, P+L)
    # Target tokens in the global batch: the normaliser that makes N ranks x K micro batches equal one big batch.
    n_local = (labels_all[:, 1:] != -100).sum().float()
    denom = cdist.all_reduce_mean(n_local) * d.world_size
    micros = list(range(0, tokens_all.shape[0], cfg.micro_batch))
    loss_sum = torch.zeros((), device=device)
    if not cfg.frozen_eval:
        lm.train()
    for j, s in enumerate(micros):
        sl = slice(s, s + cfg.micro_batch)
        sync = contextlib.nullcontext() if (j == len(micros) - 1 or d.world_size == 1) else model.no_sync()
        with sync:
            with amp.autocast(device, dtype):
                logits = model(lm, feats_all[sl], frame_mask_all[sl], tokens_all[sl], tok_mask_all[sl])
            loss = caption_loss(logits, labels_all[sl], denom)
            scaler.scale(loss * d.world_size).backward()  # DDP averages gradients over ranks; undo that
        loss_sum += loss.detach()
    lm.eval()
    if not update:
        opt.zero_grad(set_to_none=True)
        return {}
    loss_global = cdist.all_reduce_mean(loss_sum) * d.world_size
    check_finite(step, {"loss": loss_global})
    scaler.unscale_(opt)
    gnorm = clip_grad([p for p in bridge.parameters() if p.requires_grad], cfg.clip_grad)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return {"loss": float(loss_global), "lr": lr, "grad_norm": gnorm}


def gate_values(bridge):
    if bridge.xattn is None:
        return {}
    a = torch.stack([x.attn_gate.detach().tanh() for x in bridge.xattn]).flatten()
    f = torch.stack([x.ff_gate.detach().tanh() for x in bridge.xattn]).flatten()
    return {"gate_attn": float(a.abs().mean()), "gate_ff": float(f.abs().mean())}


def save_state(path, cfg, bridge, opt, scaler, step, best_val, extra=None):
    state = {"bridge": {k: v for k, v in bridge.state_dict().items()}, "optimizer": opt.state_dict() if opt else {},
             "scaler": scaler.state_dict() if scaler else {}, "step": step, "rng": checkpoint.rng_state(),
             "config": dataclasses.asdict(cfg), "best_val": best_val, **(extra or {})}
    checkpoint.save_checkpoint(path, state)


def train(cfg, d, dtype, clip, lm, tok, bridge, logger):
    device = d.device
    ctok = CaptionTokenizer(tok, cfg.max_len)
    image_size = clip.config.image_size
    sets = {s: CaptionSet(read_records(getattr(cfg, f"{s}_file"), cfg.task), cfg.image_root, image_size,
                          cfg.num_frames, ctok, cfg.blank, cfg.max_bad_frac) for s in ("train", "val", "test")}
    if cfg.cache_feats:
        for s, ds in sets.items():
            cache_features(ds, clip, dtype, device, cfg.eval_batch, d.is_main, cfg.workers)
    n_train = len(sets["train"])
    world = d.world_size
    if cfg.global_batch % (cfg.micro_batch * world) and cfg.global_batch // world > cfg.micro_batch:
        raise ValueError(f"global_batch {cfg.global_batch} must be a multiple of micro_batch*world "
                         f"({cfg.micro_batch}*{world})")
    steps_per_epoch = max(1, n_train // cfg.global_batch)
    total = cfg.steps if cfg.steps > 0 else int(cfg.epochs * steps_per_epoch)
    eval_every = cfg.eval_every if cfg.eval_every > 0 else steps_per_epoch
    logger.info(f"train {n_train} | val {len(sets['val'])} | test {len(sets['test'])} records ({cfg.task}); "
                f"{total} steps of {cfg.global_batch} (micro {cfg.micro_batch} x {world} ranks, "
                f"accumulation {max(1, cfg.global_batch // (cfg.micro_batch * world))})")

    model = cdist.wrap_ddp(bridge, d)
    opt = make_optimizer(cfg, bridge)
    scaler = amp.make_scaler(dtype)
    start, best_val = 0, float("inf")
    if cfg.resume:
        st = checkpoint.load_checkpoint(cfg.resume)
        bridge.load_state_dict(st["bridge"])
        opt.load_state_dict(st["optimizer"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        checkpoint.set_rng_state(st["rng"])
        start, best_val = int(st["step"]), float(st["best_val"])
        logger.info(f"resumed from {cfg.resume} at step {start}")

    end = min(total, cfg.stop_at) if cfg.stop_at > 0 else total
    sampler = StepSampler(n_train, cfg.global_batch, d.rank, world, cfg.seed, start, end)
    loader = make_loader(sets["train"], sampler, cfg.workers if not cfg.cache_feats else 0)
    if cfg.bench > 0:
        it = iter(make_loader(sets["train"], StepSampler(n_train, cfg.global_batch, d.rank, world, cfg.seed, 0,
                                                         10 ** 9), cfg.workers if not cfg.cache_feats else 0))
        step_fn = lambda: train_step(cfg, model, bridge, lm, clip, next(it), opt, scaler, dtype, device, d, 0, 1)
        flops = count_flops(lambda: train_step(cfg, model, bridge, lm, clip, next(it), opt, scaler, dtype, device,
                                               d, 0, 1, update=False)) if device.type == "cuda" else None
        return run_bench(step_fn, cfg.bench, cfg.global_batch // world, device, flops_per_step=flops)

    run_dir, timer = cfg.out_dir, StepTimer(device)
    last, flops = {}, None
    step = start
    for batch in loader:
        if flops is None and device.type == "cuda":  # FLOPs of one step (this rank), for the MFU column
            flops = count_flops(lambda: train_step(cfg, model, bridge, lm, clip, batch, opt, scaler, dtype, device,
                                                   d, step, total, update=False))
        timer.start()
        last = train_step(cfg, model, bridge, lm, clip, batch, opt, scaler, dtype, device, d, step, total)
        step += 1
        if step % cfg.log_every == 0 or step == end or step == start + 1:
            t = timer.stop(batch["tokens"].shape[0] * world)
            m = mfu(flops, t["ms_step"] / 1000, device)
            logger.log(step, **last, **gate_values(bridge), **t, **({"mfu": m} if m is not None else {}))
        if step % eval_every == 0 or step == total:
            last["val_loss"] = validation_loss(bridge, lm, clip, sets["val"], cfg, dtype, device, d)
            logger.log(step, val_loss=last["val_loss"])
            if last["val_loss"] < best_val and d.is_main:  # keep the single best-val checkpoint (seed)
                best_val = last["val_loss"]
                save_state(os.path.join(run_dir, "best.pt"), cfg, bridge, None, None, step, best_val)
            best_val = cdist.broadcast_object(min(best_val, last["val_loss"]))
        if (step % cfg.save_every == 0 or step == end) and d.is_main:
            save_state(os.path.join(run_dir, "last.pt"), cfg, bridge, opt, scaler, step, best_val)
    cdist.barrier()
    sets["train"].loader.check()
    metrics = {"train_loss": last.get("loss"), "val_loss": last.get("val_loss"), "best_val_loss": best_val,
               "steps": step, **bridge_param_table(bridge)}
    if cfg.test_after_train:
        best = os.path.join(run_dir, "best.pt")
        if os.path.isfile(best):  # caption with the best-val weights, as the seed's test mode does
            bridge.load_state_dict(checkpoint.load_checkpoint(best)["bridge"])
        m = evaluate_captions(bridge, lm, clip, sets["test"], cfg, ctok, dtype, device, d, run_dir)
        logger.info("test | " + " | ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "n"))
        metrics.update(m)
    return metrics


def test(cfg, d, dtype, clip, lm, tok, bridge, logger):
    ctok = CaptionTokenizer(tok, cfg.max_len)
    ds = CaptionSet(read_records(cfg.test_file, cfg.task), cfg.image_root, clip.config.image_size, cfg.num_frames,
                    ctok, cfg.blank, cfg.max_bad_frac)
    if cfg.cache_feats:
        cache_features(ds, clip, dtype, d.device, cfg.eval_batch, d.is_main)
    m = evaluate_captions(bridge, lm, clip, ds, cfg, ctok, dtype, d.device, d, cfg.out_dir)
    ds.loader.check()
    logger.info("test | " + " | ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "n"))
    return m


def caption_inputs(cfg, d, dtype, clip, lm, tok, bridge, logger):
    """--mode caption: caption image files or frame folders given by --inputs."""
    ctok = CaptionTokenizer(tok, cfg.max_len)
    recs = []
    for p in cfg.inputs:
        frames = ([os.path.join(p, n) for n in sorted(os.listdir(p)) if n.lower().endswith((".png", ".jpg", ".jpeg"))]
                  if os.path.isdir(p) else [p])
        if not frames or load_image(frames[0]) is None:
            raise DataError(f"{p}: no readable image")
        recs.append({"frames": frames, "captions": [""]})
    ds = CaptionSet(recs, "", clip.config.image_size, cfg.num_frames, ctok)
    out = caption_records(bridge, lm, clip, ds, list(range(len(recs))), cfg, ctok, dtype, d.device, d.is_main)
    for i, p in enumerate(cfg.inputs):
        logger.info(f"{p}: " + " | ".join(out[i]))
    return {p: out[i] for i, p in enumerate(cfg.inputs)}


# Default configs of transformers equal these checkpoints' architectures (their docs say so); used by
# --mode params only when the hub cannot be reached, and the output says it.
_KNOWN_ARCH = {"openai/clip-vit-base-patch32": "CLIPVisionConfig", "gpt2": "GPT2Config"}


def param_counts(cfg, clip_config, lm_config):
    """Trainable parameters per --bridge, and the frozen backbones, built on the meta device (no memory)."""
    from transformers import CLIPVisionModel, GPT2LMHeadModel
    rows = {}
    with torch.device("meta"):
        for b in ("mapper", "xattn", "both"):
            rows[b] = bridge_param_table(build_bridge(dataclasses.replace(cfg, bridge=b, xattn_prefix="none"),
                                                      clip_config, lm_config))
        rows["frozen_clip"] = count_parameters(CLIPVisionModel(clip_config))
        rows["frozen_lm"] = count_parameters(GPT2LMHeadModel(lm_config))
    return rows


def params_mode(cfg, logger):
    import transformers
    from transformers import AutoConfig
    confs = []
    for name in (cfg.clip_model, cfg.lm_model):
        try:
            c = AutoConfig.from_pretrained(name)
        except OSError:
            if name not in _KNOWN_ARCH:
                raise
            logger.info(f"{name}: not reachable offline; using transformers.{_KNOWN_ARCH[name]}() (same architecture)")
            c = getattr(transformers, _KNOWN_ARCH[name])()
        confs.append(getattr(c, "vision_config", c))
    rows = param_counts(cfg, *confs)
    for b in ("mapper", "xattn", "both"):
        r = rows[b]
        logger.info(f"--bridge {b:6s}: trainable {r['trainable']:>12,} (mapper {r['mapper']:,}, resampler "
                    f"{r['resampler']:,}, xattn {r['xattn']:,})")
    logger.info(f"frozen: CLIP vision {rows['frozen_clip']:,} + LM {rows['frozen_lm']:,}")
    return rows


# ================================================================================================ main
def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[0])
    if cfg.mode not in ("train", "test", "caption", "params"):
        raise SystemExit(f"--mode must be train|test|caption|params, got {cfg.mode!r}")
    d = cdist.setup_distributed(cfg.device)
    logger = Logger(cfg.out_dir if cfg.mode in ("train", "test") and cfg.bench == 0 else "", d.is_main)
    try:
        if cfg.mode == "params":
            return params_mode(dataclasses.replace(cfg, clip_model=cfg.clip_model or
                                                   os.path.join(cfg.toy_root, "models", "clip"),
                                                   lm_model=cfg.lm_model or os.path.join(cfg.toy_root, "models", "gpt2")),
                               logger)
        if cfg.mode in ("test", "caption"):  # the architecture comes from the checkpoint's config
            ckpt = checkpoint.load_checkpoint(cfg.ckpt or os.path.join(cfg.out_dir, "best.pt"))
            arch = {k: v for k, v in ckpt["config"].items() if k in _ARCH_FIELDS}
            cfg = dataclasses.replace(cfg, **arch)
        cfg = resolve_paths(cfg)
        amp.seed_everything(cfg.seed)
        dtype = amp.pick_dtype(d.device, cfg.precision)
        logger.info("config:\n" + format_config(cfg))
        if d.is_main and cfg.mode == "train" and cfg.bench == 0:
            save_config(cfg, cfg.out_dir)
        clip, lm, tok = load_frozen(cfg, d.device, dtype)
        bridge = build_bridge(cfg, clip.config, lm.config).to(d.device)
        counts = bridge_param_table(bridge)
        logger.info(f"--bridge {cfg.bridge}: trainable {counts['trainable']:,} (mapper {counts['mapper']:,}, "
                    f"resampler {counts['resampler']:,}, xattn {counts['xattn']:,}); frozen CLIP "
                    f"{count_parameters(clip):,} + GPT-2 {count_parameters(lm):,}")
        if cfg.mode == "train":
            return train(cfg, d, dtype, clip, lm, tok, bridge, logger)
        bridge.load_state_dict(ckpt["bridge"])
        bridge.eval()
        if cfg.mode == "test":
            return test(cfg, d, dtype, clip, lm, tok, bridge, logger)
        return caption_inputs(cfg, d, dtype, clip, lm, tok, bridge, logger)
    finally:
        cdist.cleanup_distributed()


# Fields that define the trained bridge's shape: test/caption take them from the checkpoint.
_ARCH_FIELDS = ("clip_model", "lm_model", "bridge", "xattn_prefix", "mapper_hidden", "resampler_depth",
                "resampler_heads", "resampler_dim_head", "num_latents", "max_time_emb", "resampler_ff_mult",
                "xattn_heads", "xattn_dim_head", "xattn_ff_mult", "xattn_every", "frame_key_mask", "position_fix",
                "max_len", "bos_target", "blank", "task", "num_frames")


if __name__ == "__main__":
    main()
