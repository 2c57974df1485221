"""Reading Hugging Face model folders without transformers' model classes: a folder or a hub name (from the
local cache, or downloaded into it) -> {key: tensor}, from safetensors or .bin, single file or sharded."""
import json
import os

import torch

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE = ("model.safetensors", "pytorch_model.bin")


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
        with open(index) as f:
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
