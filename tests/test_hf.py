"""common/hf.py: HF folders as state dicts (safetensors or .bin, single or sharded, prefixes), hub names from the
cache or a download; the published architectures (--mode params) and their parameter counts."""
import json

import pytest
import torch
import transformers

from common.hf import PUBLISHED, meta_model, published_config, read_hf_weights, resolve_local

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
    with pytest.raises(Exception) as e:  # the text keys' shard is opened: its bytes fail (not "no weights")
        read_hf_weights(str(tmp_path), "text_model.")
    assert not isinstance(e.value, FileNotFoundError), e.value


def test_unnamed_safetensors_files_without_an_index_are_all_read(tmp_path):
    _save(tmp_path, {"a": torch.ones(1)}, "part1.safetensors")
    _save(tmp_path, {"b": torch.zeros(1)}, "part2.safetensors")
    assert set(read_hf_weights(str(tmp_path))) == {"a", "b"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        read_hf_weights(str(tmp_path / "empty"))


def test_hub_names_that_cannot_be_had_fail_in_one_line(tmp_path):
    assert resolve_local(str(tmp_path)) == str(tmp_path) and resolve_local("") == ""
    with pytest.raises(FileNotFoundError,
                       match="not a local path, and not in the Hugging Face cache nor downloadable") as e:
        resolve_local("someone/not-downloaded-model")
    assert "\n" not in str(e.value)


# ---- published_config: the released architectures, offline, checked against published parameter counts
def _count(name, model_class):
    return sum(p.numel() for p in meta_model(getattr(transformers, model_class), published_config(name)).parameters())

EXACT = [  # the released checkpoints' own counts (issue 19 quotes them; each is the hub model's tensor total)
    ("gpt2", "GPT2Model", 124_439_808),  # GPT-2 small, "124M" in openai/gpt-2's download script
    ("openai/clip-vit-base-patch32", "CLIPModel", 151_277_313),  # open_clip docs/model_profile.csv: 151.28M
    ("bert-base-uncased", "BertModel", 109_482_240),  # BERT-base, "110M" (arXiv 1810.04805 Sec. 3)
    ("facebook/opt-2.7b", "OPTForCausalLM", 2_651_596_800),  # "2.7B" (arXiv 2205.01068 Table 1)
    ("google/flan-t5-xl", "T5ForConditionalGeneration", 2_849_757_184),  # "3B" (arXiv 2210.11416); own LM head
]


@pytest.mark.parametrize("name,model_class,n", EXACT, ids=[e[0] for e in EXACT])
def test_published_configs_give_the_released_parameter_counts(name, model_class, n):
    assert _count(name, model_class) == n


def test_published_counts_of_the_vision_language_models():
    # DeiT-S: 22M (arXiv 2012.12877 Table 1); timm results/results-imagenet.csv, deit_small_patch16_224: 22.05M
    assert round(_count("facebook/deit-small-patch16-224", "ViTForImageClassification") / 1e4) == 2205
    # BLIP ViT-B: no exact published count was found (DLIP's abstract, arXiv 2308.12956, rounds BLIP to 213M by
    # another count); this anchors transformers' models of the released configs (checked against dlip.py's own)
    assert _count("Salesforce/blip-itm-base-coco", "BlipForImageTextRetrieval") == 223_744_258
    assert _count("Salesforce/blip-image-captioning-base", "BlipForConditionalGeneration") == 223_971_644
    # BlenderBot 400M-distill: the hub's fp16 pytorch_model.bin (commit 3800f67) is 730 MB = 2 bytes/param
    assert round(2 * _count("facebook/blenderbot-400M-distill", "BlenderbotForConditionalGeneration") / 1e6) == 730
    # BLIP-2 ViT-g + OPT-2.7B: 107M trainable (Q-Former, queries, LLM projection) and "3.8B" in all
    # (arXiv 2301.12597 Table 2), the sum of nominal sizes: ViT-g without its last layer ~1.0B + OPT 2.7B
    m = meta_model(transformers.Blip2ForConditionalGeneration, published_config("Salesforce/blip2-opt-2.7b"))
    trainable = sum(p.numel() for p in [*m.qformer.parameters(), m.query_tokens, *m.language_projection.parameters()])
    vision = sum(p.numel() for p in m.vision_model.parameters())
    assert round(trainable / 1e6) == 107 and round(vision / 1e8) == 10
    assert sum(p.numel() for p in m.parameters()) == vision + trainable + 2_651_596_800 + (50304 - 50272) * 2560
    assert m.config.image_token_index == 50265 and m.config.vision_config.hidden_size == 1408
    # the COCO fine-tune reads 364 px: 26x26 + 1 positions instead of 16x16 + 1, nothing else differs
    coco = _count("Salesforce/blip2-opt-2.7b-coco", "Blip2ForConditionalGeneration")
    assert coco - sum(p.numel() for p in m.parameters()) == (26 * 26 - 16 * 16) * 1408


def test_flan_t5_keeps_its_own_lm_head_and_t5_ties_it():
    flan = meta_model(transformers.T5ForConditionalGeneration, published_config("google/flan-t5-xl"))
    assert flan.lm_head.weight is not flan.shared.weight and flan.config.d_ff == 5120
    t5 = meta_model(transformers.T5ForConditionalGeneration, transformers.T5Config())  # t5-small: tied
    assert t5.lm_head.weight is t5.shared.weight


def test_a_local_folder_wins_over_the_table(tmp_path):
    transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2).save_pretrained(tmp_path)
    assert published_config(str(tmp_path)).n_layer == 2
    assert published_config("gpt2").n_layer == 12 and set(PUBLISHED) >= {"gpt2", "bert-base-uncased"}


def test_a_torch_too_old_for_transformers_is_named_at_import():
    """transformers 5.25 switches its models off on torch < 2.6 with a log line, and pip installs the pair: each
    script must stop at import with one line that names both versions, not later inside a model class."""
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script in ("blip2_pformer", "dlip", "negclip", "perceiver_caption", "imagechat_warmup"):
        code = ("import transformers.utils as u; u.is_torch_available = lambda: False; "
                f"import {script}")
        proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and last.startswith("ImportError: transformers ") and \
            f"torch {torch.__version__}" in last and "pip install 'torch>=" in last, (script, proc.stderr[-800:])
    from common.hf import torch_too_old_for_transformers
    assert torch_too_old_for_transformers() is None  # this environment's pair works


def test_model_loads_and_saves_draw_no_progress_bars(tmp_path, toy_root):
    """transformers 5 draws a bar per model load and save: the toy world's first build printed a dozen. Importing
    a script, or building a toy backbone, turns them off and keeps huggingface_hub's download bars (a paper run's
    gigabytes)."""
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    toy_build = f"import data.toy as t; t.build_model({str(toy_root)!r}, 'bert', True, 0)"  # built: bars off only
    # the first head imports no script: transformers alone draws both bars (else their absence below proves nothing)
    for head in ["import transformers", "import blip2_pformer", "import dlip", "import negclip",
                 "import perceiver_caption", "import imagechat_warmup", toy_build]:
        code = (f"{head}; from transformers import BertConfig, BertModel; "
                "from huggingface_hub.utils import are_progress_bars_disabled; "
                "c = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, "
                "intermediate_size=8); "
                f"BertModel(c).save_pretrained({str(tmp_path)!r}); BertModel.from_pretrained({str(tmp_path)!r}); "
                "print('downloads', 'off' if are_progress_bars_disabled() else 'on')")
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
        proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120,
                              env=env)
        assert proc.returncode == 0, (head, proc.stderr[-800:])
        bars = ("Loading weights" in proc.stderr, "Writing model shards" in proc.stderr)
        assert bars == ((True, True) if head == "import transformers" else (False, False)), (head, proc.stderr[-800:])
        assert proc.stdout.split()[-1] == "on", head


def test_hf_model_builds_the_meta_architecture_of_a_sub_config_or_loads_the_weights(tmp_path):
    """hf_model (--mode params of negclip / imagechat_warmup): meta=True builds the folder's architecture (or a
    sub-config's) on the meta device in eval mode, dropping the loading-only keywords; meta=False loads the
    weights; counts_table aligns the printed counts."""
    from common.hf import counts_table, hf_model
    clip, bert = tmp_path / "clip", tmp_path / "bert"
    cc = transformers.CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, vocab_size=50),
                                 vision_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=32, patch_size=8),
                                 projection_dim=8)
    transformers.CLIPModel(cc).save_pretrained(clip)
    transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(bert)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    vis = hf_model(transformers.CLIPVisionModel, str(clip), meta=True, sub="vision_config")
    assert isinstance(vis, transformers.CLIPVisionModel) and not vis.training
    assert {p.device.type for p in vis.parameters()} == {"meta"}
    assert count(vis) == count(transformers.CLIPVisionModel(cc.vision_config)) and vis.config.hidden_size == 24
    enc = hf_model(transformers.AutoModel, str(bert), meta=True, add_pooling_layer=False, local_files_only=True,
                   dtype=torch.float16)  # the loading-only keywords go, the model's own stays
    assert isinstance(enc, transformers.BertModel) and enc.pooler is None and not enc.training
    assert {p.device.type for p in enc.parameters()} == {"meta"}
    loaded = hf_model(transformers.CLIPVisionModel, str(clip))
    saved = transformers.CLIPModel.from_pretrained(clip).vision_model.state_dict()
    got = {k.removeprefix("vision_model."): v for k, v in loaded.state_dict().items()}  # (transformers < 5 nests)
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    assert counts_table({"trainable": 1234567, "gflops": 1.5}) == "trainable  1,234,567\ngflops     1.50"
