"""OpenAI-layout CLIP weights (open_clip training checkpoints, the `clip` package's state dicts) -> a
transformers CLIPModel folder, which every script here reads (negclip.py --clip, perceiver_caption.py --clip,
imagechat_warmup.py --clip).

The released NegCLIP (`negclip.pth`, which the ARO repository's model zoo downloads:
mertyg/vision-language-models-are-bows model_zoo/__init__.py) and SugarCrepe's re-trained NegCLIP
variants fine-tuned from OpenAI's ViT-B/32 (RAIVNLab/sugar-crepe, README "Re-evaluating NegCLIP";
its from-scratch ones are RN50, sugar-crepe issue #3, and stop below) are open_clip training
checkpoints of ViT-B/32 in OpenAI's tensor names; NegCLIP's fork saves {"epoch", "name",
"state_dict": the DDP model's, every name prefixed "module."} (vinid/neg_clip src/training/main.py).
This reads the architecture off the tensor shapes, renames every tensor (splitting each fused q/k/v
projection in three), checks that every CLIPModel weight was filled, and writes config + weights +
the tokenizer of --tokenizer + the image processor open_clip uses for these models (shortest side
resized bicubic to the input size, centre crop, OpenAI's mean and std: open_clip's default
preprocessing):

    python data/openclip_to_hf.py negclip.pth --out runs/negclip_released
    python negclip.py --mode eval --clip runs/negclip_released --out_dir runs/negclip_released_eval

--act: models fine-tuned from OpenAI's weights trained with QuickGELU (`quick_gelu`, the default: NegCLIP and its
SugarCrepe variants; open_clip builds OpenAI's model with it); open_clip models trained from scratch under a name
without "-quickgelu" use GELU. open_clip takes the activation from the model name, not the file: ARO's model zoo
reads negclip.pth as "ViT-B-32", i.e. with GELU (`--act gelu` reproduces that reading); a mismatch raises no
error and moves every score (sugar-crepe issue #7).
ResNet (ModifiedResNet) CLIPs have no transformers class and stop with an error.
"""
import argparse
import os
import re
import sys

import torch

if __package__ in (None, ""):  # `python data/openclip_to_hf.py`: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# OpenAI names inside a residual block -> transformers' CLIPEncoderLayer names (fused q/k/v: split below)
BLOCK = [("attn.out_proj.", "self_attn.out_proj."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
         ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]
TOP = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
       "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
       "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
       "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
       "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
       "visual.ln_post.weight": "vision_model.post_layernorm.weight",
       "visual.ln_post.bias": "vision_model.post_layernorm.bias",
       "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
       "positional_embedding": "text_model.embeddings.position_embedding.weight",
       "ln_final.weight": "text_model.final_layer_norm.weight",
       "ln_final.bias": "text_model.final_layer_norm.bias",
       "logit_scale": "logit_scale"}
CLIP_SIZE_ENTRIES = ("input_resolution", "context_length", "vocab_size")
TOWERS = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
          ("transformer.resblocks.", "text_model.encoder.layers."))


def read_state_dict(path):
    """{name: tensor} of an open_clip checkpoint ({"state_dict": ...}, DDP's "module." prefix) or a
    plain state dict; loaded with weights_only=True. The `clip` package's size entries
    (input_resolution, context_length, vocab_size) are dropped: its TorchScript models hold them as
    0-dim tensors (openai/CLIP clip/clip.py reads model.input_resolution.item(); clip/model.py
    build_model deletes the three keys), and the sizes are read off the weights' shapes."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a TorchScript archive (OpenAI's own ViT-B-32.pt), a pickle of other objects ...
        raise ValueError(f"{path}: not a state dict torch.load(weights_only=True) reads ({type(e).__name__}); "
                         "OpenAI's TorchScript files: use the hub's openai/clip-vit-* folders instead") from None
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{path}: not a CLIP state dict (expected a dict of tensors, or one under 'state_dict')")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if "visual.layer1.0.conv1.weight" in sd:
        raise ValueError(f"{path}: a ResNet CLIP (ModifiedResNet); transformers' CLIPModel holds ViT CLIPs only")
    if "visual.conv1.weight" not in sd or "token_embedding.weight" not in sd:
        raise ValueError(f"{path}: no tensor visual.conv1.weight / token_embedding.weight: not an OpenAI-layout "
                         f"ViT CLIP (first names: {sorted(sd)[:3]})")
    return {k: v for k, v in sd.items() if torch.is_tensor(v) and k not in CLIP_SIZE_ENTRIES}


def clip_config(sd, act="quick_gelu", head_width=64, tokenizer=None, vision_head_width=None):
    """transformers CLIPConfig from the tensor shapes. Heads are width // head_width;
    vision_head_width (None: head_width) sets the vision tower's apart. The shapes cannot tell the
    head count, and a wrong one converts without error into another model. 64 holds for OpenAI's
    ViT CLIPs (openai/CLIP clip/model.py: heads = width // 64) and open_clip's ViT-B/L configs, not
    for the vision towers of open_clip's ViT-H-14 / g-14 / bigG-14 (head_width 80 / 88 / 104 in
    src/open_clip/model_configs; their text heads are 64 wide)."""
    from transformers import CLIPConfig
    depth = lambda p: 1 + max(int(k[len(p):].split(".")[0]) for k in sd if k.startswith(p))  # noqa: E731
    vw, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)  # class token + grid x grid patches
    (ctx, tw), vocab = sd["positional_embedding"].shape, sd["token_embedding.weight"].shape[0]
    ids = {} if tokenizer is None else {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id",
                                                                           "pad_token_id")}
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"--act {act!r}: expected quick_gelu (OpenAI-initialised) or gelu")
    text = dict(vocab_size=vocab, hidden_size=tw, num_hidden_layers=depth("transformer.resblocks."),
                intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_attention_heads=tw // head_width, max_position_embeddings=ctx, hidden_act=act,
                layer_norm_eps=1e-5, **ids)
    vision = dict(hidden_size=vw, num_hidden_layers=depth("visual.transformer.resblocks."), patch_size=patch,
                  intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_attention_heads=vw // (vision_head_width or head_width),
                  image_size=patch * grid, hidden_act=act,
                  layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["visual.proj"].shape[1],
                      logit_scale_init_value=float(sd["logit_scale"]))


def hf_state_dict(sd):
    """OpenAI names -> CLIPModel names. The projections are stored (width, embed) and applied as x @ proj, where
    nn.Linear stores (embed, width): transposed. Every name must be known: an unknown one is an error."""
    out, unknown = {}, []
    for k, v in sd.items():
        tower = next(((o, n) for o, n in TOWERS if k.startswith(o)), None)
        if k in TOP:
            out[TOP[k]] = v
        elif k in ("visual.proj", "text_projection"):
            out["visual_projection.weight" if k == "visual.proj" else "text_projection.weight"] = v.t()
        elif tower and (m := re.match(r"(\d+)\.attn\.in_proj_(weight|bias)$", k[len(tower[0]):])):
            for part, chunk in zip("qkv", v.chunk(3)):  # fused (3C, ...) rows: q, then k, then v
                out[f"{tower[1]}{m.group(1)}.self_attn.{part}_proj.{m.group(2)}"] = chunk
        elif tower and (new := next((tower[1] + k[len(tower[0]):].replace(o, n, 1) for o, n in BLOCK
                                     if o in k), None)):
            out[new] = v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"{len(unknown)} tensors of no OpenAI-layout ViT CLIP: {unknown[:4]}")
    return out


def convert(path, out, tokenizer="openai/clip-vit-base-patch32", act="quick_gelu", head_width=64,
            vision_head_width=None):
    """Write a CLIPModel folder for the checkpoint at `path`; returns the model (eval mode)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, logging as hf_logging
    from common.hf import resolve_local
    sd, tok = read_state_dict(path), AutoTokenizer.from_pretrained(resolve_local(tokenizer))
    model = CLIPModel(clip_config(sd, act, head_width, tok, vision_head_width)).eval()
    own, new = model.state_dict(), hf_state_dict(sd)
    missing = [k for k in own if k not in new and not k.endswith("position_ids")]
    bad = [k for k in new if k in own and own[k].shape != new[k].shape]
    if missing or bad or set(new) - set(own):
        raise ValueError(f"{path}: does not fill CLIPModel: missing {missing[:3]}, shapes differ {bad[:3]}, "
                         f"unplaced {sorted(set(new) - set(own))[:3]}")
    if len(tok) > model.config.text_config.vocab_size:
        raise ValueError(f"--tokenizer {tokenizer}: {len(tok)} tokens, the model embeds "
                         f"{model.config.text_config.vocab_size}: not this model's tokenizer")
    model.load_state_dict({k: v.float() for k, v in new.items()}, strict=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    side, level = model.config.vision_config.image_size, hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # not its note that torchvision is missing: only the config is written
    try:  # CLIPImageProcessor's defaults: bicubic, OpenAI's mean and std
        CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(out)
    finally:
        hf_logging.set_verbosity(level)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="open_clip checkpoint (.pt/.pth) or OpenAI-layout state dict")
    p.add_argument("--out", required=True, help="folder to write (config, weights, tokenizer, image processor)")
    p.add_argument("--tokenizer", default="openai/clip-vit-base-patch32", help="folder or hub name")
    p.add_argument("--act", default="quick_gelu", help="quick_gelu (OpenAI-initialised) | gelu")
    p.add_argument("--head_width", type=int, default=64,
                   help="attention head width (64: OpenAI's ViT CLIPs, open_clip's ViT-B/L, their "
                        "text towers)")
    p.add_argument("--vision_head_width", type=int, default=None,
                   help="the vision tower's, where it differs (open_clip ViT-H-14: 80, g-14: 88, "
                        "bigG-14: 104)")
    a = p.parse_args(argv)
    m = convert(a.checkpoint, a.out, a.tokenizer, a.act, a.head_width, a.vision_head_width)
    v, t = m.config.vision_config, m.config.text_config
    print(f"wrote {a.out}: ViT {v.num_hidden_layers} x {v.hidden_size} (patch {v.patch_size}, {v.image_size} px), "
          f"text {t.num_hidden_layers} x {t.hidden_size}, embed {m.config.projection_dim}, {t.hidden_act}")
    return a.out


if __name__ == "__main__":
    main()
