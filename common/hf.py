"""Reading Hugging Face model folders without transformers' model classes: a folder or a hub name (from the
local cache, or downloaded into it) -> {key: tensor}, from safetensors or .bin, single file or sharded.  And the
released architectures of the hub models the paper presets name (`published_config`), so that every script's
`--mode params` builds its paper-size models on the meta device with no weights and no network."""
import copy
import json
import os

import torch

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE = ("model.safetensors", "pytorch_model.bin")


def torch_too_old_for_transformers():
    """transformers turns its PyTorch models off when torch is older than it needs (5.18 needs 2.5, 5.25 needs
    2.6: it logs one warning and no install step refuses the pair), and every model class then fails far from
    the cause.  The one-line reason, or None when transformers runs on this torch."""
    import transformers
    from transformers.utils import is_torch_available
    if is_torch_available():
        return None
    return (f"transformers {transformers.__version__} cannot use torch {torch.__version__} (transformers 5.25 needs "
            f"torch 2.6 or newer): pip install 'torch>=2.6,<2.16' (requirements.txt)")


def quiet_model_bars():
    """transformers 5 draws a progress bar for every model it loads or saves ("Loading weights", "Writing model
    shards"): a dozen bars for the toy world's sub-second loads.  Its switch also turns off huggingface_hub's
    download bars, which a paper run fetching gigabytes keeps (unless HF_HUB_DISABLE_PROGRESS_BARS says no)."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging
    downloads_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if not downloads_off:
        enable_progress_bars()


if torch_too_old_for_transformers():  # every script imports this module: stop before the first model class
    raise ImportError(torch_too_old_for_transformers())
quiet_model_bars()


def resolve_local(name):
    """A local folder/file as given, else the hub name's snapshot folder: from the local Hugging Face cache, or
    downloaded into it as transformers' from_pretrained would (config, tokenizer and weight files only;
    HF_HUB_OFFLINE=1 keeps it to the cache).  One-line error when neither works."""
    if not name or os.path.exists(name):
        return name
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id=name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model",
                                                               "*.txt"])
    except Exception as e:
        raise FileNotFoundError(f"{name}: not a local path, and not in the Hugging Face cache nor downloadable "
                                f"({type(e).__name__}); pass a local folder or run huggingface-cli download "
                                f"{name}") from None


def _strip(key, prefixes):
    """key without the first prefix it starts with, or None when it starts with none."""
    return next((key[len(p):] for p in prefixes if key.startswith(p)), None)


def read_hf_weights(path, prefixes=("",)):
    """{key: tensor} of the HF folder or hub name `path`, for the keys that start with one of `prefixes`
    (a string or a tuple, tried in order), each without the first prefix it starts with ("" keeps every key:
    ("vision_model.", "") strips the prefix where there is one). Sharded folders: only the shards holding
    such keys are opened."""
    folder = resolve_local(path)
    prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
    index = next((os.path.join(folder, f) for f in INDEXES if os.path.isfile(os.path.join(folder, f))), None)
    if index:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({v for k, v in weight_map.items() if _strip(k, prefixes) is not None})
    else:
        files = [f for f in SINGLE if os.path.isfile(os.path.join(folder, f))][:1] or \
            sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no model.safetensors, pytorch_model.bin or index of shards")
    out = {}
    for name in files:
        file = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(file, "pt") as sf:
                out.update({_strip(k, prefixes): sf.get_tensor(k) for k in sf.keys()
                            if _strip(k, prefixes) is not None})
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True)
            out.update({_strip(k, prefixes): v for k, v in sd.items() if _strip(k, prefixes) is not None})
    if not out:
        raise FileNotFoundError(f"{folder}: no weights whose names start with {' or '.join(map(repr, prefixes))}")
    return out


# ---- Published architectures: --mode params builds the paper-size models without network or weights.
# {hub name: (transformers config class, the released config.json's values that differ from the class's
# defaults)}; sub-configs (text/vision/qformer) the same way. Each row from the hub repo's config.json.
PUBLISHED = {
    "bert-base-uncased": ("BertConfig", {}),  # BertConfig() is bert-base-uncased
    "gpt2": ("GPT2Config", {}),  # GPT2Config() is gpt2 (124M)
    # CLIPConfig() is ViT-B/32; the released text config keeps the original bos/eos ids 0/2 (whose argmax
    # pooling transformers keeps for it)
    "openai/clip-vit-base-patch32": ("CLIPConfig", dict(text_config=dict(bos_token_id=0, eos_token_id=2))),
    "facebook/opt-2.7b": ("OPTConfig", dict(  # OPTConfig() is opt-125m
        hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
        word_embed_proj_dim=2560, prefix="</s>")),
    "google/flan-t5-xl": ("T5Config", dict(
        d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)),
    # BLIP base (ViT-B/16 at 384 px, BERT-base MED): BlipConfig's defaults except the text heads
    # (the converter, transformers' convert_blip_original_pytorch_to_hf.py, built them from BlipConfig())
    "Salesforce/blip-itm-base-coco": ("BlipConfig", dict(text_config=dict(num_attention_heads=12))),
    "Salesforce/blip-image-captioning-base": ("BlipConfig", dict(text_config=dict(num_attention_heads=12))),
    "facebook/deit-small-patch16-224": ("ViTConfig", dict(  # DeiT-S converted to ViT names, ImageNet head
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_labels=1000)),
    "facebook/blenderbot-400M-distill": ("BlenderbotConfig", dict(  # BlenderbotConfig() is the 3B model
        d_model=1280, encoder_layers=2, decoder_layers=12, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
        scale_embedding=True)),
    # Blip2VisionConfig() is EVA ViT-g/14 and Blip2QFormerConfig() the Q-Former; the LM is OPT-2.7b with
    # its vocabulary padded to 50304 for the <image> token (id 50265), "\n" (50118) ending generation
    "Salesforce/blip2-opt-2.7b": ("Blip2Config", dict(
        image_token_index=50265, num_query_tokens=32,
        text_config=dict(model_type="opt", hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                         num_attention_heads=32, word_embed_proj_dim=2560, prefix="</s>",
                         vocab_size=50304, eos_token_id=50118))),
}
# The COCO-captioning fine-tune differs only in its 364 px input (LAVIS caption_coco_opt2.7b.yaml): 26x26
# patch positions instead of 16x16.
PUBLISHED["Salesforce/blip2-opt-2.7b-coco"] = ("Blip2Config", dict(
    PUBLISHED["Salesforce/blip2-opt-2.7b"][1], vision_config=dict(image_size=364)))


def published_config(name):
    """The transformers config of `name`: a local folder's or the local Hugging Face cache's config.json when
    there is one, else (offline) the released architecture from PUBLISHED, else from_pretrained (download)."""
    import transformers
    try:
        return transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        if name not in PUBLISHED:
            return transformers.AutoConfig.from_pretrained(name)
    cls, values = PUBLISHED[name]
    return getattr(transformers, cls)(**copy.deepcopy(values))  # configs may pop from the sub-config dicts


def clip_vision_config(conf):
    """A CLIPConfig's vision part at the model's projection width (the vision part holds transformers'
    default, 512, as its own)."""
    vision = getattr(conf, "vision_config", conf)
    vision.projection_dim = conf.projection_dim
    return vision


def meta_model(model_class, config):
    """model_class(config) on the meta device (shapes, no memory, no weights), in eval mode as from_pretrained
    returns it, with the LM head untied where the released checkpoint stores its own: T5 v1.1 / Flan-T5
    (config.json tie_word_embeddings=false), which transformers ties when it builds from a config and unties only
    when from_pretrained finds both tensors."""
    import torch
    with torch.device("meta"):
        auto = model_class.__name__.startswith("Auto")  # AutoModelFor... picks the class from the config
        model = model_class.from_config(config) if auto else model_class(config)
        for m in model.modules():
            if getattr(getattr(m, "config", None), "scale_decoder_outputs", True) is False and \
                    hasattr(m, "lm_head") and m.lm_head.weight is m.get_input_embeddings().weight:
                m.lm_head.weight = torch.nn.Parameter(torch.empty_like(m.lm_head.weight))
    return model.eval()  # in train mode, OPT draws its LayerDrop with a meta tensor (transformers < 5.23)


def hf_model(model_class, path, meta=False, sub="", **kw):
    """model_class.from_pretrained(path, **kw), or with meta the same architecture alone on the meta device from
    published_config(path) (sub: a sub-config, e.g. CLIPConfig's "vision_config"): what --mode params builds."""
    if not meta:
        return model_class.from_pretrained(path, **kw)
    config = getattr(published_config(path), sub) if sub else published_config(path)
    kw = {k: v for k, v in kw.items() if k not in ("local_files_only", "dtype", "torch_dtype")}  # loading only
    build = getattr(model_class, "from_config", None) or model_class  # Auto classes build through from_config
    return meta_model(lambda c: build(c, **kw), config)


def counts_table(counts):
    """{name: count or GFLOPs} -> the aligned lines --mode params prints."""
    width = max(map(len, counts)) + 2
    return "\n".join(f"{k:{width}s}{v:,.2f}" if isinstance(v, float) else f"{k:{width}s}{v:,}"
                     for k, v in counts.items())
