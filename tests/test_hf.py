"""common/hf.py: HF folders as state dicts (safetensors or .bin, single or sharded, prefixes), hub names from the cache or a download."""
import json

import pytest
import torch

from common.hf import read_hf_weights, resolve_local

SD = {"vision_model.embeddings.w": torch.arange(4.0), "vision_model.post_layernorm.bias": torch.ones(2),
      "text_model.embeddings.w": torch.zeros(3), "logit_scale": torch.tensor(2.0)}


def _save(folder, sd, name):
    folder.mkdir(exist_ok=True)
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, str(folder / name))
    else:
        torch.save(sd, folder / name)


def _sharded(folder, ext):
    """Two shards: the vision keys in one, the rest in the other; an index maps keys to shards."""
    shards = {f"model-0000{i}-of-00002.{ext}": {k: v for k, v in SD.items() if k.startswith("vision") == (i == 1)}
              for i in (1, 2)}
    for name, sd in shards.items():
        _save(folder, sd, name)
    index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"weight_map": {k: n for n, sd in shards.items() for k in sd}}))
    return list(shards)


@pytest.mark.parametrize("layout", ["model.safetensors", "pytorch_model.bin", "safetensors", "bin"])
def test_every_layout_reads_the_same_state_dict(tmp_path, layout):
    if "." in layout:
        _save(tmp_path, SD, layout)
    else:
        _sharded(tmp_path, layout)
    got = read_hf_weights(str(tmp_path))
    assert set(got) == set(SD) and all(torch.equal(got[k], SD[k]) for k in SD)
    vision = read_hf_weights(str(tmp_path), "vision_model.")
    assert set(vision) == {"embeddings.w", "post_layernorm.bias"}
    both = read_hf_weights(str(tmp_path), ("vision_model.", ""))  # strip where present, keep the rest
    assert set(both) == {"embeddings.w", "post_layernorm.bias", "text_model.embeddings.w", "logit_scale"}
    with pytest.raises(FileNotFoundError, match="no weights whose names start with 'qformer.'"):
        read_hf_weights(str(tmp_path), "qformer.")


def test_sharded_reads_open_only_the_shards_holding_the_prefix(tmp_path):
    first, second = _sharded(tmp_path, "safetensors")
    (tmp_path / second).write_bytes(b"not a safetensors file")  # opening it would fail
    assert set(read_hf_weights(str(tmp_path), "vision_model.")) == {"embeddings.w", "post_layernorm.bias"}
    with pytest.raises(Exception):
        read_hf_weights(str(tmp_path), "text_model.")


def test_unnamed_safetensors_files_without_an_index_are_all_read(tmp_path):
    _save(tmp_path, {"a": torch.ones(1)}, "part1.safetensors")
    _save(tmp_path, {"b": torch.zeros(1)}, "part2.safetensors")
    assert set(read_hf_weights(str(tmp_path))) == {"a", "b"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        read_hf_weights(str(tmp_path / "empty"))


def test_hub_names_that_cannot_be_had_fail_in_one_line(tmp_path):
    assert resolve_local(str(tmp_path)) == str(tmp_path) and resolve_local("") == ""
    with pytest.raises(FileNotFoundError, match="not a local path, and not in the Hugging Face cache nor downloadable") as e:
        resolve_local("someone/not-downloaded-model")
    assert "\n" not in str(e.value)
