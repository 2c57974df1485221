"""Captioning with a frozen CLIP vision tower and a frozen GPT-2 joined by a small trainable bridge.

The seed project (shan18/Perceiver-Resampler-XAttn-Captioning) joins Flamingo (arXiv 2204.14198)
and ClipCap (arXiv 2111.09734):
- a Perceiver Resampler (Flamingo Sec. 2.1, App. A.1.1): learned latents attend to the CLIP tokens
  of every frame (plus a per-frame time embedding) and to themselves: image or clip -> n tokens Z;
- gated cross-attention dense blocks (Flamingo Sec. 2.2) before the frozen GPT-2 blocks: text
  attends to Z through tanh(alpha) gates that start at 0: at step 0 the model is the frozen GPT-2;
- a mapper (ClipCap): an MLP (or `--mapper transformer`: a transformer encoder over the frames)
  from each frame's mean CLIP token to one GPT-2 input embedding ([dev] `--mapper clipcap_mlp|
  clipcap_tf`: ClipCap's own mappers, K tokens a frame from CLIP's projected image embedding).
`--bridge mapper|xattn|both` gives the seed's three ablations. Only the bridge trains: CLIP runs
under no_grad; GPT-2 is frozen, but the loss gradient flows through its blocks to the xattn blocks
and the prefix. An image is a one-frame video. Loss: next-token cross-entropy on caption tokens;
decoding with transformers' `generate`; COCO-toolkit BLEU, CIDEr-D, ROUGE-L and the seed's
Hugging Face `evaluate` BLEU / ROUGE-L (hf_*) from common.metrics.

    python perceiver_caption.py --bridge both      # toy world (built on first use), train + test
    python perceiver_caption.py --mode caption --ckpt runs/perceiver_caption/best.pt --inputs a.png
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank $R --master_addr $IP perceiver_caption.py \\
        --preset paper --train_file coco_train2017.jsonl --val_file coco_val2017.jsonl \\
        --test_file coco_val2017.jsonl --image_root /data/coco    # batch 32: 16 ranks x 2

--preset paper is the seed's COCO recipe (its table of the three ablations: hf_BLEU-4 / hf_ROUGE-L).
docs/perceiver_caption.md has the toy results, the video, blank-image and --mode test|params
commands, and the deviations from the seed (those with a flag can take the seed's value)."""
import contextlib
import copy
import dataclasses
import functools
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from common import amp, checkpoint, dist as cdist
from common.attention import attention, merge_heads, split_heads
from common.config import check_choices, format_config, given_flags, parse_config, save_config
from common.data import (DataError, ImageFolderLoader, StepSampler, draw, frame_paths, make_loader,
                         fit_micro, read_pairs, read_video)
from common.hf import clip_vision_config, published_config
from common.image import ImageTransform, encode_frames, load_image, sample_frames
from common.log import Logger, progress
from common.train import (StepTimer, count_flops, count_params, mfu, optimizer_update, param_groups,
                          peak_flops, run_bench, set_lr, warmup_lr)
from data.toy import toy_paths

SCRIPT = "perceiver_caption"


# ================================================================================================ Config
@dataclasses.dataclass
class ModelConfig:
    """What a trained bridge is: architecture, frozen backbones, inputs. Saved in every checkpoint;
    --mode test|caption rebuild the model from it (nanoVLM's VLMConfig beside its TrainConfig)."""
    clip_model: str = ""           # frozen: HF hub names or local folders ('' = the toy world's)
    lm_model: str = ""
    bridge: str = "both"           # mapper | xattn | both (it and the bridge fields below: seed's)
    xattn_prefix: str = "raw"      # --bridge xattn: raw (mean CLIP vector as prefix, seed) | none
    mapper: str = "mlp"            # mlp | transformer (seed's mapper_type) | [dev] clipcap_mlp|_tf
    prefix_len: int = 10           # clipcap_*: K GPT-2 tokens per frame (ClipCap README: 10 | 40)
    clip_len: int = 0              # [dev] clipcap_tf: K' (ClipCap's --prefix_length_clip); 0 = K
    normalize_prefix: bool = False  # [dev] clipcap_*: the CLIP embedding / its L2 norm (ClipCap)
    mapper_hidden: int = 512       # mlp: Linear -> Tanh -> Linear
    mapper_depth: int = 8          # transformer: nn.TransformerEncoder layers, heads, FFN width
    mapper_heads: int = 8
    mapper_ff: int = 2048
    resampler_depth: int = 4
    resampler_heads: int = 6
    resampler_dim_head: int = 64
    num_latents: int = 64
    max_time_emb: int = 500        # size of the per-frame time-embedding table
    resampler_ff_mult: int = 1
    xattn_heads: int = 6
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 1
    xattn_every: int = 1           # xattn before GPT-2 block i if i % xattn_every == 0 (seed: 1)
    frame_key_mask: bool = True    # [dev] padded frames give no resampler keys (seed: false)
    position_fix: bool = True      # [dev] positions skip padding, which goes first (seed: false)
    task: str = "image"            # image | video (toy defaults for the data files)
    num_frames: int = 8            # frames sampled per video (segment centres); shorter: masked
    max_len: int = 64              # caption tokens incl. BOS/EOS (dynamic padding below this)
    bos_target: bool = True        # seed: the last prefix position predicts BOS
    blank: bool = False            # every image replaced by a blank one (the no-image baseline)


@dataclasses.dataclass
class Config(ModelConfig):
    """The run: the model fields above (also flags) plus mode, data, optimisation and decoding."""
    preset: str = "toy"
    mode: str = "train"            # train | test | caption | params
    out_dir: str = "runs/perceiver_caption"
    toy_root: str = "data/toy"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"        # auto = bf16 on a GPU with native bf16, else fp32
    bench: int = 0                 # >0: time this many training steps and exit
    compile: bool = False          # torch.compile the trained bridge (train, --bench: see train())
    resume: str = ""               # checkpoint to continue training from
    resume_changes: bool = False   # continue a resume whose config differs from the checkpoint's
    stop_at: int = 0               # end this run after this step (schedule unchanged)
    ckpt: str = ""                 # weights for --mode test|caption ('' = <out_dir>/best.pt)
    frozen_eval: bool = True       # [dev] frozen GPT-2 in eval mode (seed: false, dropout on)
    train_file: str = ""           # data: canonical pairs or video JSONL ('' = the toy world's)
    val_file: str = ""
    test_file: str = ""
    image_root: str = ""           # '' = toy_root when a data file is the toy world's
    cache_feats: bool = False      # [dev] encode every image once with the frozen CLIP
    workers: int = 0
    max_bad_frac: float = 0.05     # stop when more of the distinct images tried are unreadable
    # optimisation (seed: AdamW 1e-4, betas (0.9, 0.98), wd 1e-3 on all, 10 % warm-up, constant)
    global_batch: int = 32
    micro_batch: int = 32          # per GPU: fitted to the world size (common.data.fit_micro)
    steps: int = 0                 # 0 = epochs * (len(train) // global_batch)
    epochs: float = 30.0
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 1e-3
    decay_all: bool = True         # seed: weight decay also on gates, norms, biases
    schedule: str = "constant"     # constant (warm-up then flat, seed) | cosine | linear_decay
    warmup_frac: float = 0.1
    clip_grad: float = 0.0         # 0 = no clipping (seed); the norm is logged either way
    log_every: int = 50
    eval_every: int = 0            # validation loss every N steps (0 = once per epoch)
    save_every: int = 1000
    test_after_train: bool = True
    decode: str = "beam"           # decoding: beam | greedy | nucleus (sampling, seeded by --seed)
    beams: int = 5
    top_p: float = 0.8             # --decode nucleus: the seed's utils/decoding.py nucleus_sampling
    top_k: int = 0                 # 0 = no top-k cut (seed: None)
    temperature: float = 0.9       # seed's config.yaml trainer.test; applied by nucleus only
    max_new_tokens: int = 100
    num_return: int = 1            # captions per input (n-best beams, or samples)
    eval_batch: int = 32
    max_eval: int = 0              # caption at most this many test items (0 = all)
    inputs: list[str] = dataclasses.field(default_factory=list)  # --mode caption: files, folders
    report: bool = True            # train|test: <out_dir>/report.html (curves, gates, captions)


PRESETS = {
    # Toy world (data/toy): tiny CLIP/GPT-2, small bridge, CLIP features cached; 2 CPU cores.
    "toy": dict(resampler_depth=2, resampler_heads=4, resampler_dim_head=32, num_latents=16,
                mapper_hidden=256, xattn_heads=4, xattn_dim_head=32, num_frames=8, max_len=32,
                cache_feats=True, global_batch=32, micro_batch=32, steps=600, lr=3e-3,
                schedule="cosine", warmup_frac=0.05, weight_decay=1e-3, clip_grad=1.0, log_every=50,
                eval_every=200, save_every=200, beams=3, max_new_tokens=20, eval_batch=64),
    # The seed's recipe (the defaults above: its config.yaml, batch 32, 30 epochs) on its backbones.
    "paper": dict(clip_model="openai/clip-vit-base-patch32", lm_model="gpt2", workers=8, log_every=100),
}
DECODING = ("decode", "beams", "top_p", "top_k", "temperature", "max_new_tokens")  # a run's recipe


def model_config(src):
    """The ModelConfig of a run config or of a dict of fields (a checkpoint's "model_config")."""
    src = src if isinstance(src, dict) else dataclasses.asdict(src)
    return ModelConfig(**{k: src[k] for k in ModelConfig.__dataclass_fields__ if k in src})


def checkpoint_run(cfg, saved, ran, argv, logger):
    """--mode test|caption: this run's config with the checkpoint's model fields `saved` and its
    run's (`ran`) DECODING fields, but those given: of the model fields only --task, --num_frames."""
    given, model = given_flags(argv), dataclasses.asdict(saved)
    keep = {k: getattr(cfg, k) for k in ("task", "num_frames") if k in given}
    dec = {k: ran[k] for k in DECODING if k in ran and k not in given and ran[k] != getattr(cfg, k)}
    run = dataclasses.replace(cfg, **{**model, **dec, **keep})
    frames, trained = (c.num_frames if c.task == "video" else 1 for c in (run, saved))
    if frames > trained and run.bridge != "mapper":  # PerceiverResampler.time_rows
        logger.info(f"--num_frames {frames}: the {trained} trained time rows are interpolated")
    if lost := sorted(k for k in given - keep.keys() if k in model and model[k] != getattr(cfg, k)):
        logger.info(f"warning: the checkpoint's model fields override --{', --'.join(lost)}")
    if dec:  # the checkpoint's recipe (--preset paper: 5 beams), not this run's preset
        logger.info(f"warning: decoding as the checkpoint's run: {dec}")
    return dataclasses.replace(run, num_frames=frames)  # image: 1 frame, a folder's middle one


# ================================================================================================ Model
def feed_forward(dim, mult):  # the pre-norm FFW of the resampler and xattn blocks, no biases
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to [media ; latents] (Flamingo App. A.1.1: the keys include the latents)."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner, self.heads = heads * dim_head, heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q, self.to_kv = (nn.Linear(dim, n, bias=False) for n in (inner, 2 * inner))
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media, latents, media_mask=None):
        """media (B, N, D), latents (B, n, D), media_mask (B, N) bool or None -> (B, n, D)."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = split_heads(self.to_q(latents), self.heads)                    # (B, H, n, Dh)
        kv = self.to_kv(torch.cat([media, latents], 1)).chunk(2, -1)       # (B, N+n, inner) each
        k, v = (split_heads(t, self.heads) for t in kv)                    # (B, H, N+n, Dh)
        if media_mask is not None:  # latent keys are always valid: (B, N) -> (B, 1, 1, N+n)
            media_mask = F.pad(media_mask, (0, latents.shape[1]), value=True)[:, None, None, :]
        return self.to_out(merge_heads(attention(q, k, v, media_mask)))


class PerceiverResampler(nn.Module):
    """(B, T, S, D) CLIP tokens of T frames -> (B, num_latents, D) visual tokens Z."""

    def __init__(self, dim, depth, heads, dim_head, num_latents, max_time, ff_mult, key_mask=True):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.time_emb = nn.Parameter(torch.randn(max_time, 1, dim))  # per frame, shared over S
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, heads, dim_head),
                                                   feed_forward(dim, ff_mult)]) for _ in range(depth))
        self.norm, self.key_mask = nn.LayerNorm(dim), key_mask

    def forward(self, feats, frame_mask, trained=None):
        """feats (B, T, S, D), frame_mask (B, T) bool -> Z (B, n, D); trained: see time_rows."""
        b, t, s, d = feats.shape
        x = feats + self.time_rows(frame_mask, trained) * frame_mask[..., None, None]  # pads: none
        x = x.reshape(b, t * s, d)                                         # (B, T*S, D)
        mask = frame_mask.repeat_interleave(s, 1) if self.key_mask else None    # (B, T*S)
        lat = self.latents.expand(b, -1, -1)
        for attn, ff in self.layers:
            lat = lat + attn(x, lat, mask)
            lat = lat + ff(lat)
        return self.norm(lat)

    def time_rows(self, frame_mask, trained=None):
        """(B, T) -> time embeddings (B or 1, T, 1, D). A clip of n > `trained` real frames (--mode
        test|caption) spans the trained rows linearly: Flamingo trains on 8 frames, runs on 30
        (arXiv 2204.14198, App. B.1.2). A clip of n <= trained reads rows 0..n-1, as in training."""
        t, last = frame_mask.shape[1], (trained or frame_mask.shape[1]) - 1
        if last >= len(self.time_emb):  # (a test run's extra frames need no rows)
            raise ValueError(f"{t} frames but the time-embedding table has {len(self.time_emb)}")
        if t <= last + 1:
            return self.time_emb[:t][None]                                  # (1, T, 1, D)
        step = (last / (frame_mask.sum(1, keepdim=True) - 1).clamp(min=1)).clamp(max=1)  # (B, 1)
        pos = (torch.arange(t, device=step.device) * step).clamp(max=last)  # (B, T)
        lo, w = pos.floor().long(), (pos - pos.floor())[..., None, None]
        return self.time_emb[lo] * (1 - w) + self.time_emb[(lo + 1).clamp(max=last)] * w


class GatedXAttnDense(nn.Module):
    """Flamingo's GATED XATTN-DENSE (Sec. 2.2): y += tanh(a_attn) * XAttn(y, Z); y += tanh(a_ff) * FFW(y).
    Gates start at 0: the LM starts as it was (OpenFlamingo #286: ungated xattn starts worse)."""

    def __init__(self, dim, media_dim, heads, dim_head, ff_mult):
        super().__init__()
        inner, self.heads, self.norm = heads * dim_head, heads, nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out, self.ff = nn.Linear(inner, dim, bias=False), feed_forward(dim, ff_mult)
        self.attn_gate, self.ff_gate = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))

    def forward(self, y, z):
        """y (B, L, D) LM hidden states, z (B, n, Dm) visual tokens -> (B, L, D); no mask."""
        q = split_heads(self.to_q(self.norm(y)), self.heads)                  # (B, H, L, Dh)
        k, v = (split_heads(t, self.heads) for t in self.to_kv(z).chunk(2, -1))  # (B, H, n, Dh)
        y = y + self.attn_gate.tanh() * self.to_out(merge_heads(attention(q, k, v)))
        return y + self.ff_gate.tanh() * self.ff(y)


class ClipCapTransformer(nn.TransformerEncoder):
    """ClipCap's TransformerMapper (arXiv 2111.09734 Sec. 3; CLIP_prefix_caption train.py): a Linear
    maps the E-d embedding to K' tokens (its --prefix_length_clip) that join K learned constants in
    `depth` pre-LN layers (h heads, MLP ratio 2, ReLU, no dropout or final norm): out at their K."""

    def __init__(self, e, d, k, k_clip, depth=8, h=8):
        layer = nn.TransformerEncoderLayer(d, h, 2 * d, 0, "relu", batch_first=True, norm_first=True)
        layer.self_attn.in_proj_bias = None  # no bias in ClipCap's q, k, v maps (in its output map)
        super().__init__(layer, depth, enable_nested_tensor=False)
        self.linear, self.const = nn.Linear(e, k_clip * d), nn.Parameter(torch.randn(k, d))

    def forward(self, emb):  # (N, E) -> (N, K, D)
        x = self.linear(emb).unflatten(-1, (-1, self.const.shape[1]))      # (N, K', D)
        x = torch.cat([x, self.const.expand(len(emb), -1, -1)], 1)         # (N, K'+K, D)
        return super().forward(x)[:, -len(self.const):]


class Bridge(nn.Module):
    """Everything trained (mapper, resampler, xattn blocks per `--bridge`; ClipCap's CLIP head frozen).
    The xattn blocks live outside GPT-2: while `conditioned(lm, z)` is active, forward pre-hooks run
    xattn block i before GPT-2 block i; GPT-2's modules and state-dict keys stay untouched."""

    def __init__(self, cfg, vis_dim, lm_dim, lm_layers, clip=None):
        super().__init__()
        check_choices(cfg, bridge="mapper|xattn|both", xattn_prefix="raw|none",
                      mapper="mlp|transformer|clipcap_mlp|clipcap_tf")
        for flag, ok in ("clip_len", "clipcap_tf"), ("normalize_prefix", "clipcap_mlp|clipcap_tf"):
            if getattr(cfg, flag) and cfg.mapper not in ok.split("|"):  # ClipCap's train.py flags
                raise ValueError(f"--{flag} needs --mapper {ok}, got {cfg.mapper!r}")
        self.use_mapper, self.use_xattn = cfg.bridge in ("mapper", "both"), cfg.bridge in ("xattn", "both")
        self.prefix = "mapper" if self.use_mapper else cfg.xattn_prefix
        self.tf_mapper = self.use_mapper and cfg.mapper == "transformer"
        if (self.prefix == "raw" or self.tf_mapper) and vis_dim != lm_dim:
            raise ValueError(f"--xattn_prefix raw and --mapper transformer keep the CLIP width, "
                             f"which GPT-2 must share (CLIP {vis_dim}, LM {lm_dim})")
        k, clipcap = cfg.prefix_len, self.use_mapper and cfg.mapper.startswith("clipcap")
        self.position_fix, self.normalize_prefix = cfg.position_fix, cfg.normalize_prefix
        self.per_frame = 0 if self.prefix == "none" else k if clipcap else 1  # prefix tokens
        self.clip_head = None if not clipcap else copy.deepcopy(nn.Sequential(  # ClipCap's, frozen
            clip.vision_model.post_layernorm, clip.visual_projection)).float().requires_grad_(False)
        self.mapper = None  # seed model/encoder_decoder.py Mapper: MLP or nn.TransformerEncoder,
        if self.tf_mapper:  # PyTorch defaults (post-LN, ReLU, dropout 0.1), padding masked as keys
            layer = nn.TransformerEncoderLayer(vis_dim, cfg.mapper_heads, cfg.mapper_ff, batch_first=True)
            self.mapper = nn.TransformerEncoder(layer, cfg.mapper_depth, enable_nested_tensor=False)
        elif clipcap:  # ClipCap train.py: MLP (hidden D*K/2) or TransformerMapper, K tokens a frame
            e, h, kc = self.clip_head[1].out_features, k * lm_dim // 2, cfg.clip_len or k  # kc: K'
            self.mapper = (ClipCapTransformer(e, lm_dim, k, kc) if cfg.mapper == "clipcap_tf" else
                           nn.Sequential(nn.Linear(e, h), nn.Tanh(), nn.Linear(h, k * lm_dim)))
        elif self.use_mapper:
            self.mapper = nn.Sequential(nn.Linear(vis_dim, cfg.mapper_hidden), nn.Tanh(),
                                        nn.Linear(cfg.mapper_hidden, lm_dim))
        self.resampler, self.xattn, self.layer_ids, self._z, self.trained = None, None, [], None, None
        if self.use_xattn:
            self.resampler = PerceiverResampler(
                vis_dim, cfg.resampler_depth, cfg.resampler_heads, cfg.resampler_dim_head,
                cfg.num_latents, cfg.max_time_emb, cfg.resampler_ff_mult, cfg.frame_key_mask)
            if cfg.xattn_every < 1:  # range() refuses 0; a step below 0 gives no block
                raise ValueError(f"--xattn_every must be >= 1, got {cfg.xattn_every}")
            self.layer_ids = list(range(0, lm_layers, cfg.xattn_every))
            self.xattn = nn.ModuleList(GatedXAttnDense(lm_dim, vis_dim, cfg.xattn_heads, cfg.xattn_dim_head,
                                                       cfg.xattn_ff_mult) for _ in self.layer_ids)

    def visual(self, feats, frame_mask):
        """feats (B, T, S, Dv), frame_mask (B, T) -> prefix (B, P, D) of P = T * per_frame tokens,
        its mask (B, P), and Z (B, n, Dv) or None."""
        pmask = frame_mask.repeat_interleave(self.per_frame, 1)  # (B, P): a padded frame's too
        if self.prefix == "none":
            prefix = feats.new_zeros(*pmask.shape, 1)
        elif self.clip_head is not None:
            emb = self.clip_head(feats[:, :, 0]).flatten(0, 1)   # (B*T, E): CLIP's CLS -> embedding
            emb = F.normalize(emb, dim=-1) if self.normalize_prefix else emb  # ClipCap: emb/|emb|
            prefix = self.mapper(emb).reshape(*pmask.shape, -1)  # (B*T, K*D | K, D) -> (B, T*K, D)
        else:
            pooled = feats.mean(2)                           # (B, T, Dv): mean of the S CLIP tokens
            kw = {"src_key_padding_mask": ~frame_mask.bool()} if self.tf_mapper else {}  # True: pad
            prefix = self.mapper(pooled, **kw) if self.use_mapper else pooled      # (B, T, D)
        z = self.resampler(feats, frame_mask, self.trained) if self.use_xattn else None
        return prefix * pmask.to(feats.dtype)[..., None], pmask, z

    @contextlib.contextmanager
    def conditioned(self, lm, z):
        """Within this block GPT-2 runs with xattn on visual tokens z (B, n, Dv); hooks go after."""
        hooks = [functools.partial(self._hook, layer) for layer in self.xattn or []]
        handles = [lm.transformer.h[i].register_forward_pre_hook(f, with_kwargs=True)
                   for i, f in zip(self.layer_ids, hooks)]  # h: GPT-2's blocks
        self._z = z
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._z = None

    def _hook(self, layer, block, args, kwargs):  # xattn `layer` on the input of GPT-2's `block`
        h = args[0] if args else kwargs["hidden_states"]  # transformers 5's GPT2Model: positional
        z = self._z.repeat_interleave(h.shape[0] // len(self._z), 0)  # generate(): x beams|samples
        out = layer(h, z.to(h.dtype)).to(h.dtype)
        return ((out, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": out})

    def lm_inputs(self, lm, feats, frame_mask, tokens, tok_mask):
        """[prefix ; wte(tokens)], its mask, GPT-2 positions ((B, P+L, D), (B, P+L) twice) and Z;
        positions count over the mask (padded frames take no slot) or run 0..N-1 (seed)."""
        prefix, pmask, z = self.visual(feats, frame_mask)
        if self.position_fix:  # padding first: a clip's last prefix slot, BOS's predictor, is real
            o = pmask.long().argsort(dim=1, stable=True)  # (B, P): padded slots, then real ones
            prefix, pmask = prefix.gather(1, o[..., None].expand_as(prefix)), pmask.gather(1, o)
        tok = lm.get_input_embeddings()(tokens)
        embeds = torch.cat([prefix.to(tok.dtype), tok], 1) if prefix.shape[1] else tok
        mask = torch.cat([pmask.long(), tok_mask.long()], 1)
        pos = ((mask.cumsum(1) - 1).clamp(min=0) * mask if self.position_fix else
               torch.arange(mask.shape[1], device=mask.device).expand_as(mask))
        return embeds, mask, pos, z

    def forward(self, lm, feats, frame_mask, tokens, tok_mask):
        """Teacher-forced logits (B, P+L, V) of the frozen GPT-2; P = prefix length."""
        embeds, mask, pos, z = self.lm_inputs(lm, feats, frame_mask, tokens, tok_mask)
        with self.conditioned(lm, z):
            return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).logits

    @torch.no_grad()
    def generate(self, lm, feats, frame_mask, bos_id, eos_id, pad_id, max_new_tokens=20,
                 num_return=1, **decode):
        """Decode with HF generate from [prefix ; BOS]: ids (B*num_return, <= max_new_tokens);
        decode: num_beams (beam or greedy search), or do_sample=True, top_p, top_k, temperature."""
        bos = torch.full((feats.shape[0], 1), bos_id, dtype=torch.long, device=feats.device)
        embeds, mask, pos, z = self.lm_inputs(lm, feats, frame_mask, bos, torch.ones_like(bos))
        with self.conditioned(lm, z):
            return lm.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                               max_new_tokens=max_new_tokens, num_return_sequences=num_return,
                               eos_token_id=eos_id, use_cache=True, pad_token_id=pad_id,
                               bos_token_id=bos_id, **{"do_sample": False, **decode})


def bridge_param_table(bridge):  # a part this --bridge lacks (None): 0
    return {**{k: count_params(getattr(bridge, k) or []) for k in ("mapper", "resampler", "xattn")},
            "trainable": count_params(bridge, trainable=True)}  # not the frozen clip_head


# ================================================================================================ Losses
def caption_labels(tokens, tok_mask, prefix_len, bos_target=True):
    """Targets aligned with [prefix ; tokens]: (B, L) -> (B, P+L); -100 on the prefix, on padding
    (marked by the mask, not by the seed's token id 0, also GPT-2's '!') and on BOS if asked."""
    labels = tokens.masked_fill(~tok_mask.bool(), -100)
    if not bos_target:
        labels[:, 0] = -100
    return torch.cat([labels.new_full((labels.shape[0], prefix_len), -100), labels], 1)


def caption_loss(logits, labels, denom):
    """Next-token CE summed over targets / denom; logits (B, N, V), labels (B, N). denom = targets
    in the global batch, so the micro-batch losses of all ranks sum to the global mean."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum") / denom


# ================================================================================================ Data
def read_records(path, task, image_root=None):  # pairs or video JSONL -> [{frames, captions}]
    if task == "image":
        return [{"frames": [r["image"]], "captions": r["captions"]} for r in read_pairs(path)]
    return read_video(path, image_root)  # {"folder": dir} records are listed under image_root


class CaptionTokenizer:
    """GPT-2 style caption encoding: [BOS] + tokens(' ' + caption) + [EOS], truncated to max_len."""

    def __init__(self, tok, max_len):
        self.tok, self.max_len, self.eos = tok, max_len, tok.eos_token_id
        self.bos = tok.bos_token_id if tok.bos_token_id is not None else self.eos
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos
        if self.eos is None:
            raise ValueError("the LM tokenizer has no EOS token")

    def encode(self, caption):
        ids = self.tok(" " + caption.strip(), add_special_tokens=False)["input_ids"]
        return [self.bos] + ids[:self.max_len - 2] + [self.eos]

    def decode(self, ids):
        ids = list(ids) + [self.eos]  # stop at the first EOS (beams are padded after it)
        return self.tok.decode(ids[:ids.index(self.eos)], skip_special_tokens=True).strip()


class CaptionSet(torch.utils.data.Dataset):
    """Key (record i, caption c) -> frames (or cached CLIP features) + caption token ids. Unreadable
    frames are dropped and listed in the item: workers' counts reach the loader (`usable`)."""

    def __init__(self, records, image_root, image_size, num_frames, ctok, blank=False, max_bad_frac=0.05):
        self.records, self.ctok, self.num_frames, self.blank = records, ctok, num_frames, blank
        self.size, tf = image_size, ImageTransform(image_size, uint8=True)
        self.loader = ImageFolderLoader(image_root, tf, max_bad_frac)
        self.cache = None  # list of (T, S, D) features once filled by `cache_features`

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        i, c = key
        caps = self.records[i]["captions"]
        item = {"index": i, "tokens": torch.tensor(self.ctok.encode(caps[c % len(caps)])),
                "tried": [], "bad": []}
        if self.cache is not None:
            return {**item, "feats": self.cache[i]}
        paths = self.records[i]["frames"]
        paths = [paths[j] for j in sample_frames(len(paths), self.num_frames)]
        if self.blank:  # the no-image baseline: a constant (dataset-mean) image
            return {**item, "pixels": torch.zeros(len(paths), 3, self.size, self.size)}
        imgs = [self.loader(p) for p in paths]
        item["tried"], item["bad"] = paths, [p for p, x in zip(paths, imgs) if x is None]
        imgs = [x for x in imgs if x is not None]
        item["pixels"] = torch.stack(imgs) if imgs else None  # (T, 3, S, S)
        return item


def collate(items):
    """Pad frames (or features) to the longest clip, tokens to the longest caption; masks mark real
    entries. Items without a readable frame give no row (a batch of none holds only the counts)."""
    seen = {k: [p for x in items for p in x[k]] for k in ("tried", "bad")}
    key = "feats" if "feats" in items[0] else "pixels"
    items = [x for x in items if x[key] is not None]
    if not items:
        return seen
    vis, tokens = [x[key] for x in items], [x["tokens"] for x in items]
    pad = functools.partial(pad_sequence, batch_first=True)  # zeros after each entry
    return {key: pad(vis), "tokens": pad(tokens),                         # (B, T, ...), (B, L)
            "frame_mask": pad([torch.ones(len(v), dtype=torch.bool) for v in vis]),         # (B, T)
            "tok_mask": pad([torch.ones(len(t), dtype=torch.bool) for t in tokens]),        # (B, L)
            "index": torch.tensor([x["index"] for x in items]), **seen}


def usable(ds, batch):  # adds the batch's image counts (DataLoader workers' copies) to ds.loader
    ds.loader.merge(batch["tried"], batch["bad"])
    return "tokens" in batch


def caption_draws(sampler, records, seed):
    """StepSampler's micro batches of (epoch, index) -> (index, caption): the seed trains on one of
    an image's captions per draw; common.data.draw makes it the same on any rank, after any resume."""
    return ([(i, draw(seed, e, i, len(records[i]["captions"]))) for e, i in m] for m in sampler)


# ================================================================================================ Eval
def batch_feats(clip, batch, dtype, device):
    """A collated batch -> CLIP features (B, T, S, D) on device (cached or computed now). As the
    seed: last_hidden_state (before post_layernorm), all tokens including CLS."""
    if "feats" in batch:
        return batch["feats"].to(device, torch.float32, non_blocking=True)
    return encode_frames(clip, batch["pixels"], batch["frame_mask"], dtype)


def batches_of(ds, keys, n):  # the rows of ds under keys, n keys a batch, in order (usable ones)
    keys = [keys[i:i + n] for i in range(0, len(keys), n)]  # pinned on a GPU machine: async copies
    return (b for b in make_loader(ds, keys, collate, pin_memory=torch.cuda.is_available())
            if usable(ds, b))


@torch.no_grad()
def cache_features(ds, clip, dtype, bs, d, workers=0):
    """Encode every record once with the frozen CLIP (no augmentation): each rank its shard, bs
    records a round, all-gathered: every rank holds all, in record order; unreadable ones leave."""
    mine, per, c = cdist.shard_indices(len(ds), d), -(-len(ds) // d.world_size), clip.config
    keys = [[(i, 0) for i in mine[k:k + bs]] for k in range(0, per, bs)]  # same count per rank
    loader = iter(make_loader(ds, [k for k in keys if k], collate, workers,
                              pin_memory=torch.cuda.is_available()))
    shape, feats = (bs, ds.num_frames, (c.image_size // c.patch_size) ** 2 + 1, c.hidden_size), {}
    for k, part in enumerate(progress(keys, d.is_main, desc="clip features")):  # in CLIP's dtype:
        f = torch.zeros(shape, dtype=next(clip.parameters()).dtype, device=d.device)  # bf16 on GPU
        n = torch.zeros(bs, device=d.device).long()
        if part and usable(ds, b := next(loader)):  # row j: record mine[k * bs + j]
            j, fm = (b["index"] - part[0][0]).to(d.device), b["frame_mask"]
            f[j, :fm.shape[1]] = encode_frames(clip, b["pixels"], fm, dtype).to(f.dtype)
            n[j] = fm.sum(1).to(d.device)
        f, n = cdist.all_gather_no_grad(f).cpu(), cdist.all_gather_no_grad(n).tolist()  # rank-major
        for q, m in enumerate(n):  # row q: rank q // bs's record (q // bs) * per + k * bs + q % bs
            if m:
                feats[q // bs * per + k * bs + q % bs] = f[q, :m].clone()  # (T, S, D): real frames
    ds.loader.gather().check(final=True)  # all ranks' counts
    if not (keep := sorted(feats)):
        raise DataError(f"no readable image under {ds.loader.root!r} ({ds.loader.report()})")
    ds.records, ds.cache = [ds.records[i] for i in keep], [feats[i] for i in keep]


@torch.no_grad()
def validation_loss(bridge, lm, clip, ds, cfg, dtype, device, d):
    """Mean caption CE on the validation split (record i: caption i mod its count), over ranks."""
    bridge.eval()  # dropout off: train_step turns it on for its own step only
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches_of(ds, [(i, i) for i in cdist.shard_indices(len(ds), d)], cfg.eval_batch):
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
    """Decode captions for records `indices` of ds -> {index: [caption, ...]} (num_return each).
    Sampling draws from --seed and the batch's first record: a run's captions are reproducible."""
    bridge.eval()  # as validation_loss; a train run of 0 steps (a finished --resume) tests at once
    kw = (dict(do_sample=True, top_p=cfg.top_p, top_k=cfg.top_k, temperature=cfg.temperature)
          if cfg.decode == "nucleus" else dict(num_beams=cfg.beams if cfg.decode == "beam" else 1))
    if cfg.num_return > kw.get("num_beams", cfg.num_return):
        raise ValueError(f"--num_return {cfg.num_return} needs --decode nucleus or as many beams")
    out, loader = {}, batches_of(ds, [(i, 0) for i in indices], cfg.eval_batch)
    for batch in progress(loader, is_main, desc="captioning"):
        feats = batch_feats(clip, batch, dtype, device)
        rng = torch.random.fork_rng([device] if device.type == "cuda" else [])  # restored after
        with amp.autocast(device, dtype), rng:
            torch.manual_seed(cfg.seed * 1_000_003 + int(batch["index"][0]))
            ids = bridge.generate(lm, feats, batch["frame_mask"].to(device), ctok.bos, ctok.eos,
                                  ctok.pad, cfg.max_new_tokens, cfg.num_return, **kw)
        for i, rows in zip(batch["index"].tolist(), ids.view(len(feats), cfg.num_return, -1).tolist()):
            out[i] = [ctok.decode(x) for x in rows]  # rows: (num_return, L)
    return out


def evaluate_captions(bridge, lm, clip, ds, cfg, ctok, dtype, d, logger):
    """Caption the split (sharded over ranks), score, log, write <out_dir>/predictions_test.json."""
    from common.metrics import caption_metrics, hf_caption_metrics
    n, t0 = len(ds) if cfg.max_eval <= 0 else min(cfg.max_eval, len(ds)), time.perf_counter()
    mine = caption_records(bridge, lm, clip, ds, cdist.shard_indices(n, d), cfg, ctok, dtype,
                           d.device, d.is_main)
    preds, metrics = {i: c for part in cdist.all_gather_object(mine) for i, c in part.items()}, None
    if d.is_main:
        gts, res = {i: ds.records[i]["captions"] for i in preds}, {i: preds[i][:1] for i in preds}
        scores = {**caption_metrics(gts, res), **hf_caption_metrics(gts, res)}  # COCO; seed's HF
        metrics = {k: 100.0 * v for k, v in scores.items()}  # x100 like the seed
        metrics["n"], metrics["test_seconds"] = len(preds), time.perf_counter() - t0
        rows = [{"sample_path": r["frames"] if cfg.task == "video" else r["frames"][0],
                 "prediction": preds[i][0] if cfg.num_return == 1 else preds[i],
                 "target": r["captions"]} for i, r in ((i, ds.records[i]) for i in sorted(preds))]
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "predictions_test.json"), "w") as f:
            json.dump(rows, f, indent=1)
        logger.info("test | " + " | ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k != "n"))
    return cdist.broadcast_object(metrics)


def write_report(cfg, metrics, logger):
    """<out_dir>/report.html (common/report.py): curves with each xattn block's tanh gates (Flamingo
    Sec. 2.2), the run's figures, test captions beside their image (a video: its frames' strip)."""
    from common.report import caption_report, read_test_predictions
    gates = {"tanh(attn gate) per xattn block": "gate_attn_", "tanh(FFW gate) per xattn block":
             "gate_ff_", "mean |tanh(gate)|": ["gate_attn", "gate_ff"]}
    video, title = cfg.task == "video", f"{SCRIPT}.py --bridge {cfg.bridge} --task {cfg.task}"
    rows, frames_of = ([], None) if "n" not in metrics else \
        read_test_predictions(cfg.out_dir, cfg.image_root, cfg.num_frames, video)  # fresh: this run
    path, seconds = caption_report(cfg.out_dir, title, metrics, gates, rows, frames_of, video)
    eval_s = f"; test captioning {metrics['test_seconds']:.2f} s" if "n" in metrics else ""
    logger.info(f"report {path}: {seconds:.2f} s{eval_s}")


# ================================================================================================ Train
def resolve_paths(cfg, d):
    """Empty model and data paths the mode reads -> the toy world's (built with these backbones)."""
    stem = "pairs" if cfg.task == "image" else "video"
    splits = {"train": ["train", "val"] + ["test"] * cfg.test_after_train, "test": ["test"]}
    files = {f"{s}_file": f"{stem}_{s}.jsonl" for s in splits.get(cfg.mode, [])}
    if any(not getattr(cfg, k) for k in files):
        files["image_root"] = ""  # the toy files' image paths are relative to the toy root
    toy_paths(cfg, {"clip_model": "models/clip", "lm_model": "models/gpt2", **files},
              ["clip", "gpt2"], d.is_main, cdist.barrier)


def load_frozen(cfg, device, dtype):
    """Frozen CLIP vision tower + GPT-2 + caption tokenizer from local folders or hub names."""
    from transformers import (AutoConfig, AutoTokenizer, CLIPVisionModel, CLIPVisionModelWithProjection,
                              GPT2LMHeadModel, logging as hf_logging)
    hf_logging.set_verbosity_error()  # the vision tower of a full CLIPModel: text keys unused
    tower = CLIPVisionModelWithProjection if cfg.mapper.startswith("clipcap") else CLIPVisionModel
    clip = tower.from_pretrained(cfg.clip_model, config=clip_vision_config(AutoConfig.from_pretrained(
        cfg.clip_model)), dtype=amp.frozen_dtype(device, dtype))  # + projection: ClipCap's input
    # fp32, run under autocast: in a bf16 residual stream the gates' first ~1e-3 x outputs vanish
    lm = GPT2LMHeadModel.from_pretrained(cfg.lm_model, dtype=torch.float32)
    amp.fp32_output(lm.lm_head)  # fp32 logits, as the seed's fp32 model gives (loss, beam scores)
    for m in (clip, lm):  # eval: no dropout (seed: GPT-2 dropout on; --frozen_eval false)
        m.requires_grad_(False).eval().to(device)
    return clip, lm, CaptionTokenizer(AutoTokenizer.from_pretrained(cfg.lm_model), cfg.max_len)


def train_step(cfg, model, bridge, lm, clip, opt, scaler, dtype, d, micros, step, total, update=True):
    """One optimizer step over this rank's micro batches of the global batch (accumulating grads).
    update=False: forward + backward only, gradients dropped (to count a step's FLOPs for MFU)."""
    lr, device = warmup_lr(cfg.schedule, step, total, cfg.lr, cfg.warmup_frac), d.device
    set_lr(opt, lr)
    to = functools.partial(torch.Tensor.to, device=device, non_blocking=True)  # (pinned batches)
    labels = [caption_labels(to(b["tokens"]), to(b["tok_mask"]), bridge.per_frame * b["frame_mask"].shape[1],
                             cfg.bos_target) for b in micros]  # (B, P+L), P prefix tokens
    # Target tokens of the global batch: dividing by them makes N ranks x K micro batches one batch.
    n = sum((lab[:, 1:] != -100).sum() for lab in labels) + torch.zeros((), device=device)
    denom, empty = cdist.all_reduce_mean(torch.stack([n, (n == 0).float()])) * d.world_size
    if empty:  # a rank's micro batches lost all their images: no rank steps (DDP needs them all)
        opt.zero_grad(set_to_none=True)
        return {"lr": lr, "skipped_step": 1}
    loss_sum = torch.zeros((), device=device)
    bridge.train()  # dropout of --mapper transformer; validation and decoding run in eval mode
    lm.train(not cfg.frozen_eval)
    for j, (b, lab) in enumerate(zip(micros, labels)):
        with contextlib.nullcontext() if j == len(micros) - 1 or d.world_size == 1 else model.no_sync():
            feats = batch_feats(clip, b, dtype, device)
            with amp.autocast(device, dtype):
                logits = model(lm, feats, to(b["frame_mask"]), to(b["tokens"]), to(b["tok_mask"]))
            loss = caption_loss(logits, lab, denom)
            scaler.scale(loss * d.world_size).backward()  # DDP averages gradients over ranks: undo
        loss_sum += loss.detach()
    nn.ModuleList([bridge, lm]).eval()
    if not update:
        opt.zero_grad(set_to_none=True)
        return {}
    loss = cdist.all_reduce_mean(loss_sum) * d.world_size
    gnorm = optimizer_update(opt, scaler, [p for p in bridge.parameters() if p.requires_grad],
                             cfg.clip_grad, step, {"loss": loss})
    return {"loss": float(loss), "lr": lr, "grad_norm": gnorm}


def gate_values(bridge):
    """tanh of the xattn blocks' attention and FFW gates (0 at initialisation): their mean |tanh|
    (gate_attn, gate_ff) and each block's, named by the GPT-2 block it runs before (gate_attn_3)."""
    t = {g: [float(getattr(x, g + "_gate").detach().tanh()) for x in bridge.xattn or []] for g in ("attn", "ff")}
    means = {f"gate_{g}": sum(map(abs, v)) / len(v) for g, v in t.items() if v}
    return {**means, **{f"gate_{g}_{i}": x for g, v in t.items() for i, x in zip(bridge.layer_ids, v)}}


def save_state(name, cfg, bridge, opt, scaler, step, best_val, rngs=None):
    checkpoint.save_checkpoint(os.path.join(cfg.out_dir, name), {
        "script": SCRIPT, "kind": "train", "model_config": dataclasses.asdict(model_config(cfg)),
        "config": dataclasses.asdict(cfg), "bridge": bridge.state_dict(), "step": step,
        "best_val": best_val, "optimizer": opt.state_dict() if opt else {},
        "scaler": scaler.state_dict() if scaler else {}, "rng": rngs or checkpoint.rng_state()})


# A resume may also change where it stops, how it tests, micro_batch; not --epochs (the schedule).
RESUME_FREE = checkpoint.RESUME_FREE - {"epochs"} | set(DECODING) | {
    "stop_at", "ckpt", "test_after_train", "max_eval", "inputs", "num_return", "micro_batch"}


def resume(cfg, bridge, opt, scaler, logger):
    """Load --resume, a perceiver_caption training state of this run's config -> step, best val."""
    st = checkpoint.load_checkpoint(cfg.resume)
    checkpoint.expect_checkpoint(st, cfg.resume, SCRIPT, ["train"], flag="--resume")
    if not st.get("optimizer"):
        raise checkpoint.CheckpointMismatch(f"--resume {cfg.resume}: weights only (best.pt has no "
                                            f"optimizer state); resume from last.pt")
    checkpoint.check_resume_config(st["config"], dataclasses.asdict(cfg), cfg.resume_changes,
                                   logger.info, RESUME_FREE)
    bridge.load_state_dict(st["bridge"])
    opt.load_state_dict(st["optimizer"])
    if st.get("scaler"):
        scaler.load_state_dict(st["scaler"])
    checkpoint.set_rng_state(st["rng"], cdist.rank())  # this rank's own generators
    logger.resumed(st["step"])
    logger.info(f"resumed from {cfg.resume} at step {st['step']}")
    return int(st["step"]), float(st["best_val"])


def train(cfg, d, dtype, clip, lm, ctok, bridge, logger):
    device, world, scaler = d.device, d.world_size, amp.make_scaler(dtype)
    groups = (param_groups(bridge, cfg.weight_decay) if not cfg.decay_all else  # seed: decay all
              [{"params": [p for p in bridge.parameters() if p.requires_grad],
                "weight_decay": cfg.weight_decay}])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    # --compile: the trained bridge (train, --bench); `bridge` (plain names) validates and decodes
    model = cdist.wrap_ddp(torch.compile(bridge) if cfg.compile else bridge, d)
    start, best_val = resume(cfg, bridge, opt, scaler, logger) if cfg.resume else (0, float("inf"))
    sets = {s: CaptionSet(read_records(getattr(cfg, f"{s}_file"), cfg.task, cfg.image_root),
                          cfg.image_root, clip.config.image_size, cfg.num_frames, ctok, cfg.blank,
                          cfg.max_bad_frac) for s in ["train", "val"] + ["test"] * cfg.test_after_train}
    for ds in sets.values() if cfg.cache_feats else []:
        cache_features(ds, clip, dtype, cfg.eval_batch, d, cfg.workers)
    train_set, micro = sets["train"], cfg.micro_batch  # (main fitted it to the world size)
    steps_per_epoch = max(1, len(train_set) // cfg.global_batch)
    total = cfg.steps if cfg.steps > 0 else int(cfg.epochs * steps_per_epoch)
    end = min(total, cfg.stop_at) if cfg.stop_at > 0 else total
    eval_every = cfg.eval_every if cfg.eval_every > 0 else steps_per_epoch

    def batches(first, last):  # this rank's micro batches of steps first..last-1, a list per step
        s = StepSampler(len(train_set), cfg.global_batch, micro, world, d.rank, cfg.seed, first, last)
        it = iter(make_loader(train_set, caption_draws(s, train_set.records, cfg.seed), collate,
                              0 if cfg.cache_feats else cfg.workers, cfg.seed, d.rank,
                              pin_memory=device.type == "cuda"))  # page-locked: async copies
        for _ in range(first, last):
            yield [b for b in (next(it) for _ in range(s.accum)) if usable(train_set, b)]

    logger.info(f"train {len(train_set)} | val {len(sets['val'])} records ({cfg.task}); {total} "
                f"steps of {cfg.global_batch} (micro {micro} x {world} ranks)")
    run_step = functools.partial(train_step, cfg, model, bridge, lm, clip, opt, scaler, dtype, d)
    if cfg.bench > 0:  # the loader's time (decoding, collating) apart from the step's
        it = batches(0, 10 ** 9)
        flops = count_flops(lambda: run_step(next(it), 0, 1, update=False)) if device.type == "cuda" else None
        return run_bench(lambda m: run_step(m, 0, 1), cfg.bench, cfg.global_batch // world,
                         device, flops_per_step=flops, data_fn=lambda: next(it))

    timer, last, flops, step = StepTimer(device), {}, None, start
    for micros in batches(start, end):
        if flops is None and peak_flops(device):  # one step's FLOPs for MFU (this rank; 0: skipped)
            with torch.random.fork_rng([device] if device.type == "cuda" else []):  # RNG restored
                flops = count_flops(lambda: run_step(micros, step, total, update=False)) or None
        timer.start()
        last, step = run_step(micros, step, total), step + 1
        if step % cfg.log_every == 0 or step == end or step == start + 1 or "skipped_step" in last:
            train_set.loader.check()
            t = timer.stop(sum(len(b["tokens"]) for b in micros) * world)
            m = mfu(flops, t["ms_step"] / 1000, device)
            logger.log(step, **last, **gate_values(bridge), **t, **({} if m is None else {"mfu": m}))
        if step % eval_every == 0 or step == total:
            last["val_loss"] = validation_loss(bridge, lm, clip, sets["val"], cfg, dtype, device, d)
            logger.log(step, val_loss=last["val_loss"])
            if last["val_loss"] < best_val and d.is_main:  # keep the one best-val checkpoint (seed)
                save_state("best.pt", cfg, bridge, None, None, step, last["val_loss"])
            best_val = cdist.broadcast_object(min(best_val, last["val_loss"]))
        if step % cfg.save_every == 0 or step == end:  # all ranks' RNGs: each resumes its own
            rngs = cdist.all_gather_object(checkpoint.rng_state())
            if d.is_main:
                save_state("last.pt", cfg, bridge, opt, scaler, step, best_val, rngs)
    cdist.barrier()
    metrics = {"train_loss": last.get("loss"), "val_loss": last.get("val_loss"),
               "best_val_loss": best_val, "steps": step, **bridge_param_table(bridge)}
    if cfg.test_after_train:  # seed: best-val weights, from a best.pt beside last.pt or --resume
        found = {p: checkpoint.load_checkpoint(p) for c in (f"{cfg.out_dir}/last.pt", cfg.resume)
                 if c and os.path.isfile(p := os.path.join(os.path.dirname(c), "best.pt"))}
        if sel := next((p for p, c in found.items() if c.get("best_val") == best_val), None):
            bridge.load_state_dict(found[sel]["bridge"])  # that holds this best val loss
        metrics["tested"] = cdist.same_on_every_rank(f"{sel}, step {found[sel]['step']}" if sel else
                                                     f"the last, step {step}", "the weights tested")
        logger.info(f"test weights: {metrics['tested']} (best val loss {best_val:.4g})")
        metrics.update(evaluate_captions(bridge, lm, clip, sets["test"], cfg, ctok, dtype, d, logger))
    return {**metrics, **image_report(sets, logger)}


def image_report(sets, logger):
    """The bad-image rule at the end of a run (all ranks' counts): a log line, then max_bad_frac."""
    loaders = {s: ds.loader.gather() for s, ds in sets.items()}
    logger.info("unreadable images | " + " | ".join(f"{s}: {x.report()}" for s, x in loaders.items()))
    for x in loaders.values():
        x.check(final=True)
    return {"unreadable_images": sum(x.bad for x in loaders.values())}


def test(cfg, d, dtype, clip, lm, ctok, bridge, logger):
    ds = CaptionSet(read_records(cfg.test_file, cfg.task, cfg.image_root), cfg.image_root,
                    clip.config.image_size, cfg.num_frames, ctok, cfg.blank, cfg.max_bad_frac)
    if cfg.cache_feats:
        cache_features(ds, clip, dtype, cfg.eval_batch, d)
    return {**evaluate_captions(bridge, lm, clip, ds, cfg, ctok, dtype, d, logger),
            **image_report({"test": ds}, logger)}


def caption_inputs(cfg, d, dtype, clip, lm, ctok, bridge, logger):
    """--mode caption: caption image files or frame folders given by --inputs."""
    recs = [{"frames": frame_paths(p) if os.path.isdir(p) else [p], "captions": [""]}
            for p in cfg.inputs]  # a folder's frames in frame order (2.png before 10.png)
    for p, r in zip(cfg.inputs, recs):
        if not r["frames"] or load_image(r["frames"][0]) is None:
            raise DataError(f"{p}: no readable image")
    ds = CaptionSet(recs, "", clip.config.image_size, cfg.num_frames, ctok, cfg.blank)  # as trained
    out = caption_records(bridge, lm, clip, ds, list(range(len(recs))), cfg, ctok, dtype, d.device, d.is_main)
    for i, p in enumerate(cfg.inputs):
        logger.info(f"{p}: " + " | ".join(out[i]))
    return {p: out[i] for i, p in enumerate(cfg.inputs)}


# ---- --mode params: trainable parameters per ablation and FLOPs per sample, offline
def param_counts(cfg, clip_config, lm_config, text_len=20):
    """Parameters per --bridge and of the frozen backbones, and GFLOPs per training sample (one
    image: frozen CLIP forward, bridge and GPT-2 forward + backward), all on the meta device."""
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection, GPT2LMHeadModel
    rows, lm_config._attn_implementation = {}, "eager"  # (SDPA's mask code reads values: none on meta)
    tower = CLIPVisionModelWithProjection if cfg.mapper.startswith("clipcap") else CLIPVisionModel
    with torch.device("meta"):
        clip = tower(clip_config).requires_grad_(False)
        lm, tok = GPT2LMHeadModel(lm_config).requires_grad_(False), torch.zeros(1, text_len).long()
        px = torch.zeros(1, 3, clip_config.image_size, clip_config.image_size)  # one image
        feats, vit = clip(pixel_values=px).last_hidden_state[:, None], count_flops(lambda: clip(pixel_values=px))
        for b in ("mapper", "xattn", "both"):
            one = Bridge(dataclasses.replace(cfg, bridge=b, xattn_prefix="none"), clip_config.hidden_size,
                         lm_config.n_embd, lm_config.n_layer, clip)
            run = lambda: one(lm, feats, torch.ones(1, 1).bool(), tok, tok + 1).float().sum().backward()  # noqa
            rows[b] = {**bridge_param_table(one), "gflops_per_sample": (vit + count_flops(run)) / 1e9}
        rows["frozen_clip"], rows["frozen_lm"] = count_params(clip), count_params(lm)
    return rows


def params_mode(cfg, logger):  # the two hub names' released architectures, offline
    clip_config, lm_config = (published_config(n) for n in (cfg.clip_model, cfg.lm_model))
    rows = param_counts(cfg, clip_vision_config(clip_config), lm_config)
    for b in ("mapper", "xattn", "both"):
        logger.info(f"--bridge {b:6s}: " + ", ".join(f"{k} {v:,}" for k, v in rows[b].items()))
    logger.info(f"frozen: CLIP vision {rows['frozen_clip']:,} + LM {rows['frozen_lm']:,}")
    return rows


# ================================================================================================ main
def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[0])
    d = cdist.setup_distributed(cfg.device)
    logger = Logger(cfg.out_dir if cfg.mode in ("train", "test") and not cfg.bench else "", d.is_main)
    try:
        if cfg.mode == "train":  # before any data or model: the micro batch this world size runs
            fit_micro(cfg, d.world_size, logger.info)
        if cfg.mode in ("test", "caption"):  # the model is the checkpoint's ModelConfig
            ckpt = checkpoint.load_checkpoint(path := cfg.ckpt or f"{cfg.out_dir}/best.pt")
            checkpoint.expect_checkpoint(ckpt, path, SCRIPT, flag="--ckpt")
            saved = model_config(ckpt.get("model_config") or ckpt["config"])  # older: run config
            cfg = checkpoint_run(cfg, saved, ckpt.get("config", {}), argv, logger)
        check_choices(cfg, mode="train|test|caption|params", task="image|video", decode="beam|greedy|nucleus")
        resolve_paths(cfg, d)
        if cfg.mode == "params":
            return params_mode(cfg, logger)
        amp.seed_everything(cfg.seed)
        dtype = amp.pick_dtype(d.device, cfg.precision)
        logger.info("config:\n" + format_config(cfg))
        if d.is_main and cfg.mode == "train" and cfg.bench == 0:
            save_config(cfg, cfg.out_dir)
        clip, lm, ctok = load_frozen(cfg, d.device, dtype)
        bridge = Bridge(cfg, clip.config.hidden_size, lm.config.n_embd, lm.config.n_layer, clip).to(d.device)
        amp.seed_everything(cfg.seed + d.rank)  # weights above alike on all ranks; dropout per rank
        n = ", ".join(f"{k} {v:,}" for k, v in bridge_param_table(bridge).items())
        logger.info(f"--bridge {cfg.bridge}: {n}; frozen CLIP {count_params(clip):,} + GPT-2 {count_params(lm):,}")
        if cfg.mode != "train":
            bridge.eval().load_state_dict(ckpt["bridge"])
            bridge.trained = saved.num_frames if saved.task == "video" else 1  # time_rows' trained
        out = {"train": train, "test": test, "caption": caption_inputs}[cfg.mode](
            cfg, d, dtype, clip, lm, ctok, bridge, logger)
        if cfg.report and d.is_main and cfg.mode != "caption" and not cfg.bench:
            write_report(cfg, out, logger)
        return out
    finally:
        cdist.cleanup_distributed()


if __name__ == "__main__":
    main()
