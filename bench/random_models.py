"""Hugging Face model folders with random weights at the published architectures, for bench/gpu.sh:
the `--preset paper` backbones of the five scripts without a download (a throughput bench needs the
shapes, not the weights).

    python bench/random_models.py --out runs/bench/models --words data/toy/models_vocab.txt
    python bench/random_models.py --out /tmp/m --words data/toy/models_vocab.txt --tiny  # for CPU

Each folder is what `from_pretrained(folder)` reads: config.json (common.hf.published_config: the
released config values), random weights initialised as transformers initialises a fresh model, and
a tokenizer: the toy world's word-level one (data/toy.py make_tokenizer over the toy words), padded
with unused entries to the released vocabulary size, so that every embedding table and LM head has
its published shape (only the token ids of a batch differ from real text).  `--tiny` shrinks every
architecture (2 layers, width 64, 64 px images, 256-entry vocabularies) for a CPU dry run.

The large frozen-only backbones (EVA ViT-g, OPT-2.7B, the BLIP teachers) are saved in bf16: the
scripts store frozen towers in bf16 on a GPU anyway (common.amp.frozen_dtype) and in fp32 on CPU;
a model that a script trains from its folder is saved in fp32, as released.

`--imagechat_cache DIR --data_dir D --pairs P` writes captions for the images of D's dialogues
(captions.jsonl, as `imagechat_warmup.py --mode captions` writes it): three toy captions of P per
image, standing in for BLIP-2's, whose cost is a preparation step, not a training step.
"""
import argparse
import json
import os
import random
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# folder: (released model's hub name, transformers class, toy tokenizer kind or None, bf16 or not).
# Blip2VisionModel: BLIP-2's EVA ViT-g, all that blip2_pformer.py reads of a BLIP-2 folder given as
# --vision_path (load_blip2_vision takes its "vision_model." tensors; load_vision reads this too).
# BlenderBot gets the toy T5 tokenizer's conventions (pad 0, </s>, no bos): those imagechat_warmup.py
# runs with on the toy world.
MODELS = {
    "bert-base-uncased": ("bert-base-uncased", "BertForPreTraining", "bert", False),
    "blip2-vision": ("Salesforce/blip2-opt-2.7b", "Blip2VisionModel", None, True),
    "opt-2.7b": ("facebook/opt-2.7b", "OPTForCausalLM", "opt", True),
    "clip-vit-base-patch32": ("openai/clip-vit-base-patch32", "CLIPModel", "clip", False),
    "gpt2": ("gpt2", "GPT2LMHeadModel", "gpt2", False),
    "deit-small-patch16-224": ("facebook/deit-small-patch16-224", "ViTForImageClassification",
                               None, False),
    "blip-itm-base-coco": ("Salesforce/blip-itm-base-coco", "BlipForImageTextRetrieval", None,
                           True),
    "blip-image-captioning-base": ("Salesforce/blip-image-captioning-base",
                                   "BlipForConditionalGeneration", None, True),
    "blenderbot-400M-distill": ("facebook/blenderbot-400M-distill",
                                "BlenderbotForConditionalGeneration", "t5", False),
}
# The released OPT tokenizer holds 50265 tokens for the model's 50272 embedding rows (spare rows, as
# data/toy.py's _with_spare_rows mirrors); every other tokenizer fills its model's vocabulary.
TOKENIZER_SIZE = {"opt-2.7b": 50265}
TOKENIZER_MAX_LEN = {"bert": 512, "clip": 77, "gpt2": 1024, "opt": 2048, "t5": 128}
STAMP = "random_models.json"  # how a folder was written: a rerun reuses a folder of the same stamp
TINY_VOCAB = 256  # > the toy world's ~210 words + specials
# --tiny: each attribute named here (of a config and of its vision/text/qformer sub-configs) takes
# this value
TINY = {**dict.fromkeys(("num_hidden_layers", "n_layer", "encoder_layers", "decoder_layers",
                         "num_layers", "num_decoder_layers"), 2),
        **dict.fromkeys(("hidden_size", "n_embd", "d_model", "word_embed_proj_dim",
                         "encoder_hidden_size"), 64),
        **dict.fromkeys(("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim",
                         "d_ff"), 128),
        **dict.fromkeys(("num_attention_heads", "n_head", "encoder_attention_heads",
                         "decoder_attention_heads", "num_heads"), 4),
        "image_size": 64, "patch_size": 16, "d_kv": 16}


def shrink(conf):
    """--tiny: the same architecture at toy size, sub-configs included (in place)."""
    for sub in ("vision_config", "text_config", "qformer_config"):
        if getattr(conf, sub, None) is not None:
            shrink(getattr(conf, sub))
    for key, value in TINY.items():
        if key in conf.to_dict():
            setattr(conf, key, value)
    return conf


def model_config(folder, tiny):
    """The released config of MODELS[folder] (shrunk for --tiny); BLIP-2: its vision tower's."""
    from common.hf import published_config
    hub, cls, kind, _ = MODELS[folder]
    conf = published_config(hub)
    if cls == "Blip2VisionModel":
        conf = conf.vision_config
    if tiny:
        conf = shrink(conf)
        text = getattr(conf, "text_config", None)
        if folder.startswith("blip-"):  # BLIP's vocabulary: BERT's + [DEC] + [ENC] (30522 + 2)
            text.vocab_size = TINY_VOCAB + 2
        elif kind == "clip":  # released ids (eos 2): CLIP pools at the argmax id, end-of-text
            text.vocab_size = TINY_VOCAB
        elif kind is not None:
            conf.vocab_size = TINY_VOCAB
            if kind == "gpt2":
                conf.bos_token_id = conf.eos_token_id = TINY_VOCAB - 1
    return conf


def vocab_size(conf):
    return getattr(conf, "text_config", conf).vocab_size


def write_tokenizer(kind, words, size, out):
    """The toy word-level tokenizer of `kind`, padded with unused words to `size` entries; specials
    keep their toy positions (CLIP's and GPT-2's end-of-text stays the last id, as released)."""
    from data.toy import _tok_spec, make_tokenizer
    lead, trail = _tok_spec(kind)[:2]
    n_pad = size - len(lead) - len(words) - len(trail)
    if n_pad < 0:
        raise ValueError(f"{out}: {len(words)} toy words do not fit a vocabulary of {size}")
    words = list(words) + [f"unused{i}" for i in range(n_pad)]
    tok, _ = make_tokenizer(kind, words, TOKENIZER_MAX_LEN[kind])
    assert len(tok) == size, (len(tok), size)
    tok.save_pretrained(out)


def write_image_processor(conf, out):
    """preprocessor_config.json with CLIP's statistics (BLIP and BLIP-2's EVA ViT use them too)."""
    from transformers import CLIPImageProcessor

    from common.image import CLIP_MEAN, CLIP_STD
    size = getattr(conf, "vision_config", conf).image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(out)


def write_model(folder, out_root, words, tiny, device):
    """One folder: random weights from the released config, built on `device` (the GPU where there
    is one: OPT-2.7B's initialisation is slow on a CPU), saved as safetensors, with its tokenizer and
    image preprocessor.
    Returns (GB written, seconds); (0, s) when an earlier run wrote the same folder."""
    import transformers
    t0 = time.time()
    hub, cls, kind, half = MODELS[folder]
    out = os.path.join(out_root, folder)
    stamp = {"hub": hub, "tiny": tiny, "bf16": half}
    if os.path.isfile(os.path.join(out, STAMP)):
        with open(os.path.join(out, STAMP)) as f:
            if json.load(f) == stamp:
                return 0.0, time.time() - t0
    conf = model_config(folder, tiny)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if half else torch.float32)  # OPT-2.7B never in fp32
    try:
        with torch.device(device):
            model = getattr(transformers, cls)(conf)
    finally:
        torch.set_default_dtype(prev)
    model.to("cpu").save_pretrained(out)
    if kind is not None:
        size = TINY_VOCAB if tiny else TOKENIZER_SIZE.get(folder, vocab_size(conf))
        write_tokenizer(kind, words, size, out)
    if hasattr(conf, "vision_config") or hasattr(conf, "image_size"):
        write_image_processor(conf, out)
    gb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 1e9
    with open(os.path.join(out, STAMP), "w") as f:  # last: marks the folder complete
        json.dump(stamp, f)
    return gb, time.time() - t0


def write_imagechat_captions(cache_dir, data_dir, pairs_file, per_image=3, seed=0):
    """captions.jsonl: `per_image` toy captions for each image of data_dir's dialogues."""
    hashes = []
    for split in ("train", "valid", "test"):
        path = os.path.join(data_dir, f"{split}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                hashes += [ep["image_hash"] for ep in json.load(f)]
    with open(pairs_file, encoding="utf-8") as f:
        pool = [c for line in f if line.strip() for c in json.loads(line)["captions"]]
    rng = random.Random(seed)
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, "captions.jsonl"), "w", encoding="utf-8") as f:
        for h in dict.fromkeys(hashes):
            f.write(json.dumps({"image": f"{h}.jpg", "captions": rng.sample(pool, per_image)}) + "\n")
    return len(set(hashes))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/models")
    p.add_argument("--words", default="data/toy/models_vocab.txt", help="toy world word list")
    p.add_argument("--tiny", action="store_true", help="toy-size architectures (CPU dry run)")
    p.add_argument("--only", default="", help="comma-separated folders of MODELS (default: all)")
    p.add_argument("--device", default="auto", help="where weights are initialised (auto: cuda)")
    p.add_argument("--imagechat_cache", default="", help="write Image-Chat captions there")
    p.add_argument("--data_dir", default="", help="Image-Chat folder (train.json ...)")
    p.add_argument("--pairs", default="", help="pairs JSONL whose captions --imagechat_cache draws")
    a = p.parse_args(argv)
    if a.imagechat_cache:
        n = write_imagechat_captions(a.imagechat_cache, a.data_dir, a.pairs)
        print(f"captions for {n} images -> {a.imagechat_cache}/captions.jsonl")
        return {"images": n}
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    with open(a.words, encoding="utf-8") as f:
        words = [w for w in f.read().split("\n") if w]
    names = [n for n in a.only.split(",") if n] or list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown --only {unknown}; choose from {sorted(MODELS)}")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    done = {}
    for name in names:
        done[name] = gb, sec = write_model(name, a.out, words, a.tiny, device)
        size = "tiny" if a.tiny else "published"
        print(f"{name}: {gb:.2f} GB in {sec:.1f} s ({size} size, {device})", flush=True)
    gb, sec = sum(g for g, _ in done.values()), sum(s for _, s in done.values())
    print(f"random models: {gb:.2f} GB in {sec:.1f} s -> {a.out}")
    return done


if __name__ == "__main__":
    main()
