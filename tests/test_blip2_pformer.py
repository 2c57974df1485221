"""blip2_pformer.py: masks, hard negatives, parameter counts, transformers equivalence (import + export), every
stage on the tiny toy world, exact resume, and 2-process gloo DDP == 1 process at the same global batch."""
import itertools
import json
import math
import os
import subprocess
import shutil
import sys

import pytest
import torch

import blip2_pformer as bp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def metrics_log(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def fell(run_dir, key="loss"):
    """Mean of the first third of the logged steps and of the last third (never two single steps)."""
    rows = [r for r in metrics_log(run_dir) if key in r]
    k = max(1, len(rows) // 3)
    first = sum(r[key] for r in rows[:k]) / k
    last = sum(r[key] for r in rows[-k:]) / k
    return first, last


def assert_fell(run_dir, key, ratio):
    """The last third's mean is below `ratio` x the first third's: a margin checked on tiny worlds of seeds 0-4
    (docs/blip2_pformer.md has the values)."""
    first, last = fell(run_dir, key)
    assert last < ratio * first, (key, first, last)


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------

def test_qformer_masks_three_modes():
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    nq = 3
    itm = bp.qformer_mask(nq, text_mask, causal=False)
    itg = bp.qformer_mask(nq, text_mask, causal=True)
    assert itm.shape == itg.shape == (2, 1, 7, 7)
    # ITM: every row sees all queries and the non-pad text, never pads
    assert itm[0, 0, :, :6].all() and not itm[0, 0, :, 6].any() and not itm[1, 0, :, 5:].any()
    # ITG: queries never see text; text row i sees queries and text <= i
    assert itg[:, 0, :nq, :nq].all() and not itg[:, 0, :nq, nq:].any()
    assert itg[0, 0, nq + 1, :nq].all() and itg[0, 0, nq + 1, nq:nq + 2].all() and not itg[0, 0, nq + 1, nq + 2:].any()
    # ITC text side: padding mask only (encode_text); query side: no mask at all


def test_hard_negative_sampler_never_picks_positive():
    g = torch.Generator().manual_seed(0)
    B = 8
    img_ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])  # images 0 and 3 appear twice
    txt = torch.randint(5, 50, (B, 6), generator=g)
    txt[4] = txt[1]  # a duplicate caption on a different image
    pos = bp.positive_mask(img_ids, txt, img_ids, txt)
    assert pos[0, 1] and pos[1, 4] and pos[4, 1] and pos.diagonal().all()
    sim = torch.randn(B, B, generator=g) * 5
    sim[pos] += 100.0  # positives are by far the most similar: a sampler that ignored the mask would pick them
    sim[2, 6] = float("inf")  # an overflowed similarity must not crash it (LAVIS #107)
    for seed in range(50):
        idx = bp.sample_hard_negatives(sim, pos, bp.gumbel_noise(seed, B, B, 0, "cpu"))
        assert not pos[torch.arange(B), idx].any()
    # the draw follows softmax(sim) over the negatives: the most similar negative wins most often
    s = torch.zeros(1, 4)
    s[0, 1] = 3.0
    picks = torch.stack([bp.sample_hard_negatives(s, torch.tensor([[True, False, False, False]]),
                                                  bp.gumbel_noise(k, 1, 4, 0, "cpu")) for k in range(300)])
    assert (picks == 1).float().mean() > 0.7 and (picks == 0).sum() == 0
    # ... at softmax's own frequencies (an argmax that ignores the noise, or noise not Gumbel, passes the line above)
    n, s = 2000, torch.tensor([[0.0, 3.0, 0.0, 1.0]])
    idx = bp.sample_hard_negatives(s.expand(n, 4), torch.tensor([[True, False, False, False]]).expand(n, 4),
                                   bp.gumbel_noise(0, n, 4, 0, "cpu"))
    freq = torch.bincount(idx, minlength=4).float() / n  # softmax over the negatives: 0.844, 0.042, 0.114
    assert freq[0] == 0 and torch.allclose(freq[1:], torch.softmax(s[0, 1:], 0), atol=0.03), freq


def test_gumbel_noise_independent_of_process_split():
    full = bp.gumbel_noise(7, 4, 8, 0, "cpu")  # one process: all 4 rows
    both = torch.cat([bp.gumbel_noise(7, 2, 8, r, "cpu") for r in (0, 1)])
    assert torch.equal(full, both)


@pytest.mark.parametrize("rank,negs", [(0, [1, 4, 0]), (1, [0, 4, 5]), (1, [4, 5, 3])])
def test_stage1_reuse_equals_full_passes(rank, negs):
    """ITM/ITG read the query pass's keys/values (issue 19): losses and gradients equal the full [Q; T] passes
    over every row's image (the previous code) with dropout off.  rank 1 of 2: negatives drawn from the other
    rank's images are projected, this rank's reuse the query pass; [4, 5, 3]: all its own, so fetch_rows brings
    0 rows (R = 0), which Attention.split once could not reshape."""
    torch.manual_seed(0)
    B, L = 3, 6
    qf = bp.QFormer(32, 3, 4, 64, 24, 4, 50, 16, embed_dim=8, cross_freq=2, dropout=0.0)
    image = torch.randn(B, 5, 24, requires_grad=True)
    image_all = torch.cat([torch.randn(B, 5, 24), image] if rank else [image, torch.randn(B, 5, 24)])
    ids = torch.randint(5, 50, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 4:] = 0
    neg_img = torch.tensor(negs)  # global image index per text: this rank's rows and the other's
    ids_neg, mask_neg = ids.flip(0), mask.flip(0)

    def old():  # the full passes: the ITM rows' images projected per row, ITG's query rows recomputed
        images = torch.cat([image, image_all[neg_img], image])
        h = qf.joint(images, torch.cat([ids, ids, ids_neg]), torch.cat([mask, mask, mask_neg]))
        itm = torch.nn.functional.cross_entropy(qf.itm_head(h[:, :4]).mean(1), torch.tensor([1] * B + [0] * 2 * B))
        dec = ids.clone()
        dec[:, 0] = 1
        logits = qf.lm_logits(qf.joint(image, dec, mask, causal=True)[:, 4:])[:, :-1]
        return itm, bp.token_ce(logits, dec[:, 1:].masked_fill(dec[:, 1:] == 0, -100), label_smoothing=0.1)

    def new():
        _, cache = qf.query(image, with_cache=True)
        remote = image_all[neg_img[(neg_img < rank * B) | (neg_img >= (rank + 1) * B)]]  # what fetch_rows brings
        kv = bp.itm_cross_kv(qf, cache, remote, neg_img, rank)
        return bp.itm_loss(qf, kv, ids, mask, ids_neg, mask_neg), bp.itg_loss(qf, cache, ids, mask, 1, 0)

    grads = []
    for fn in (old, new):
        qf.zero_grad()
        image.grad = None
        itm, itg = fn()
        (itm + itg).backward()
        grads.append(([itm.item(), itg.item()], [p.grad.clone() for p in qf.parameters() if p.grad is not None] +
                      [image.grad.clone()]))
    (lo, go), (ln, gn) = grads
    assert ln == pytest.approx(lo, abs=1e-5) and len(go) == len(gn)
    for a, b in zip(go, gn):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def _itm_case():
    """A Q-Former and a global batch of 2 ranks x 2 pairs; negative image per text: rank 0's texts draw one of their
    own and one of rank 1's, rank 1's texts only their own (fetch_rows brings rank 1 0 rows)."""
    torch.manual_seed(0)
    qf = bp.QFormer(32, 2, 4, 64, 24, 4, 50, 16, embed_dim=8, cross_freq=1, dropout=0.0)
    return qf, torch.randn(4, 5, 24), torch.randint(5, 50, (4, 6)), torch.tensor([1, 3, 3, 2])


def _itm_rank(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    bp.D.setup_distributed("cpu")
    qf, image_all, ids, neg_img = _itm_case()
    rows = slice(2 * rank, 2 * rank + 2)
    image = image_all[rows].clone().requires_grad_()
    _, cache = qf.query(image, with_cache=True)
    remote = bp.D.fetch_rows(image, neg_img)  # neg_img: every rank's draws, as stage1_losses all-gathers them
    kv = bp.itm_cross_kv(qf, cache, remote, neg_img[rows], rank)
    t, m = ids[rows], torch.ones(2, 6, dtype=torch.long)
    loss = bp.itm_loss(qf, kv, t, m, t.flip(0), m)
    loss.backward()
    torch.save({"R": len(remote), "loss": loss.detach(), "image": image.grad,
                "params": [torch.zeros_like(p) if p.grad is None else p.grad for p in qf.parameters()]},
               os.path.join(out_dir, f"itm{rank}.pt"))
    bp.D.cleanup_distributed()


def test_itm_with_no_remote_negatives_on_a_rank_matches_one_process(tmp_path, spawn):
    """2 gloo processes, rank 1's ITM negatives all its own images (R = 0, which once crashed Attention.split):
    each rank's ITM loss and, through fetch_rows' backward, the image and parameter gradients equal the full passes
    of one process."""
    import socket
    qf, image_all, ids, neg_img = _itm_case()
    image_all.requires_grad_()
    ref = []
    for r in (0, 1):
        rows = slice(2 * r, 2 * r + 2)
        image, t, m = image_all[rows], ids[rows], torch.ones(2, 6, dtype=torch.long)
        h = qf.joint(torch.cat([image, image_all[neg_img[rows]], image]), torch.cat([t, t, t.flip(0)]),
                     torch.cat([m, m, m]))
        ref.append(torch.nn.functional.cross_entropy(qf.itm_head(h[:, :4]).mean(1), torch.tensor([1, 1, 0, 0, 0, 0])))
    sum(ref).backward()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn(_itm_rank, args=(port, str(tmp_path)))
    got = [torch.load(tmp_path / f"itm{r}.pt", weights_only=True) for r in (0, 1)]
    assert [g["R"] for g in got] == [1, 0]
    assert [g["loss"].item() for g in got] == pytest.approx([x.item() for x in ref], abs=1e-5)
    assert torch.allclose(torch.cat([g["image"] for g in got]), image_all.grad, atol=1e-5)
    for p, a, b in zip(qf.parameters(), *[g["params"] for g in got]):
        assert torch.allclose(a + b, torch.zeros_like(p) if p.grad is None else p.grad, atol=1e-5)


def test_contrastive_logits_and_nearest_search_stay_fp32_under_bf16_autocast():
    """Issue 18.6: ITC / instance-contrastive logits and vq_loss's nearest-embedding search in fp32 under autocast."""
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(16, 4, 32), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    emb = torch.randn(64, 48, generator=torch.Generator().manual_seed(1)) * 4
    emb[1] = emb[0] + 0.05  # two near rows: a bf16 search picks row 0 here (on the machine this was written on)
    p = (emb[1] + 0.01).reshape(1, 1, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bp.itc_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(0.07), 0)
        naive = (txt @ img.flatten(0, 1).t()).dtype  # what autocast does to a plain matmul
        vq = bp.vq_loss(p, emb)
        ic = bp.instance_contrastive_loss(txt, torch.tensor(0.07), 0)
    assert naive == torch.bfloat16 and got[1].dtype == got[2].dtype == torch.float32
    img16, txt16 = img.bfloat16().float(), txt.bfloat16().float()  # the inputs as autocast's caller had them
    assert torch.equal(got[1], bp.itc_loss(img16, txt16, torch.tensor(0.07), 0)[1])
    assert vq.item() == pytest.approx(bp.vq_loss(p, emb).item()) and vq.item() < ((p - emb[0]) ** 2).mean()
    assert ic.item() == pytest.approx(bp.instance_contrastive_loss(txt, torch.tensor(0.07), 0).item(), abs=1e-6)


def test_paper_sizes_match_the_logged_parameter_counts():
    # Stage 1 (BERT-base Q-Former, 32 queries, ViT-g width 1408): 186,705,470 trainable in the BLIP-2 log,
    # + 1,968,640 for the P-Former run's llm_proj to OPT-2.7B (2560); stage 2: 107,133,696.
    with torch.device("meta"):
        s1 = bp.Blip2Trainable(bp.QFormer(768, 12, 12, 3072, 1408, 32, 30523, 512), 1408, 0)
        s1p = bp.Blip2Trainable(bp.QFormer(768, 12, 12, 3072, 1408, 32, 30523, 512), 1408, 2560)
        s2 = bp.Blip2Trainable(bp.QFormer(768, 12, 12, 3072, 1408, 32, 30523, 512, text=False), 1408, 2560)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(s1) == 186_705_470
    assert count(s1p) == 186_705_470 + 1_968_640
    assert count(s2) == 107_133_696


def test_mode_params_counts_the_paper_models_offline(monkeypatch):
    """--mode params (issue 19.3): the paper preset's models from their published configs on the meta device.
    Trainable counts: the BLIP-2 log's (above); OPT-2.7B 2,651,596,800 (its model card's 2.7B, exact from the
    released config); EVA ViT-g/14 as BLIP-2 uses it, 39 of 40 blocks (arXiv 2301.12597 Sec. 3.1) without the
    final LayerNorm that is BLIP-2's trainable ln_vision."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s1 = bp.main(["--preset", "paper", "--mode", "params", "--stage", "1"])
    s2 = bp.main(["--preset", "paper", "--mode", "params", "--stage", "2"])
    assert s1["trainable"] == 186_705_470
    assert s2["trainable"] == 107_133_696 and s2["llm"] == 2_651_596_800
    assert s1["vision"] == s2["vision"] == 985_952_256 - 2 * 1408 and s1["frozen"] == s1["vision"]
    assert s2["frozen"] == s2["vision"] + s2["llm"]  # (no --pformer_ckpt: no frozen P-Former)
    # the stage-1 Q-Former step at 2 samples (bench/blip2_stage1.py counts 176.9 at batch 8): 180.5 GFLOP each
    assert s1["gflops_per_sample"] - s1["gflops_vit_forward"] == pytest.approx(180.5, rel=0.01)
    assert s2["gflops_per_sample"] > s1["gflops_per_sample"]  # + the frozen OPT-2.7B forward and backward
    t5 = bp.main(["--preset", "paper", "--mode", "params", "--stage", "2", "--llm_path", "google/flan-t5-xl"])
    assert t5["llm"] == 2_849_757_184 and t5["trainable"] == 107_133_696 - (768 + 1) * (2560 - 2048)  # llm_proj
    # --train_vision trains the ViT at stage 1 too (build()): counted as trainable there, not as frozen
    s1v = bp.main(["--preset", "paper", "--mode", "params", "--stage", "1", "--train_vision", "true"])
    assert s1v["trainable"] == 186_705_470 + s1["vision"] and s1v["frozen"] == 0


def test_mode_params_counts_stage0_and_caption_offline(monkeypatch):
    """--mode params of the other trained stages. Stage 0 trains the P-Former alone beside the frozen OPT-2.7B:
    BERT-base without its pooler (109,482,240 - 590,592) + cls_proj (768 -> 32 x 768) + pooler + llm_proj (-> 2560)
    + text_proj (-> 256) + temp; no ViT. Caption fine-tuning trains the Q-Former part (107,133,696) and the ViT at
    364 px: 26 x 26 patch positions instead of 16 x 16, 1408 wide."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s0 = bp.main(["--preset", "paper", "--mode", "params", "--stage", "0"])
    pformer = (109_482_240 - 590_592) + (768 * 32 * 768 + 32 * 768) + (768 * 768 + 768) + (768 * 2560 + 2560) + \
        (768 * 256 + 256) + 1
    assert s0["trainable"] == s0["pformer"] == pformer and s0["frozen"] == s0["llm"] == 2_651_596_800
    assert s0["gflops_per_sample"] > 0
    cap = bp.main(["--preset", "paper", "--mode", "params", "--stage", "caption"])
    assert cap["vision"] == 985_952_256 - 2 * 1408 + (26 * 26 - 16 * 16) * 1408
    assert cap["trainable"] == 107_133_696 + cap["vision"] and cap["frozen"] == cap["llm"] == 2_651_596_800


def test_losses_alone():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 3, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    loss, i2t, t2i = bp.itc_loss(img, txt, torch.tensor(0.07), 0)
    assert i2t.shape == t2i.shape == (4, 4) and torch.isfinite(loss)
    # matched features -> lower ITC than random ones
    img_m = txt[:, None, :].expand(4, 3, 8)
    assert bp.itc_loss(img_m, txt, torch.tensor(0.07), 0)[0] < loss
    emb = torch.randn(20, 8)
    p = emb[torch.tensor([[1, 2], [3, 4]])] + 0.01
    assert bp.vq_loss(p, emb) < 1e-3 < bp.vq_loss(torch.randn(2, 2, 8), emb)
    ids = torch.tensor([[2, 7, 8, 9, 3, 0, 0]])
    noisy = bp.mask_tokens(ids, 4, keep=[0, 2], p=1.0)
    assert noisy.tolist() == [[2, 4, 4, 4, 4, 0, 0]]  # [CLS] and [PAD] kept, [SEP] may be masked
    assert bp.split_prefix("a", __import__("random").Random(0)) == ("", "a")
    pre, suf = bp.split_prefix("a red circle on the left", __import__("random").Random(0))
    assert pre and suf and f"{pre} {suf}" == "a red circle on the left" and len(pre.split()) <= 3
    # stage 0 (BLIText pformer_t5.py): m ~ U{1..1+n//2}, so 4 words split after word 1, 2 or 3; stage 2 after 1 or 2
    for stage0, cuts in ((True, {1, 2, 3}), (False, {1, 2})):
        rng = __import__("random").Random(0)
        assert {len(bp.split_prefix("a b c d", rng, stage0)[0].split()) for _ in range(200)} == cuts
    assert bp.split_prefix("a", __import__("random").Random(0), stage0=True) == ("a", "")


# ---------------------------------------------------------------------------------------------------------------
# transformers equivalence: a random Blip2ForConditionalGeneration -> our model -> export -> transformers
# ---------------------------------------------------------------------------------------------------------------

WORDS = "a red green blue circle square left right of the is question short answer photo what".split()


def word_tokenizer(specials, template, **kw):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=kw["unk_token"]))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[
        (t, vocab[t]) for t in specials if t in template])
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    from transformers import (BertConfig, BertForMaskedLM, Blip2Config, Blip2ForConditionalGeneration,
                              Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config)
    root = tmp_path_factory.mktemp("hf")
    bert_tok = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]", unk_token="[UNK]",
                              pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    bert_tok.save_pretrained(root / "bert")
    out = {"bert": str(root / "bert")}
    for kind in ("opt", "t5"):
        torch.manual_seed(0)
        if kind == "opt":
            tok = word_tokenizer(["<pad>", "</s>", "<unk>"], "</s> $A", unk_token="<unk>", pad_token="<pad>",
                                 bos_token="</s>", eos_token="</s>")
            tc = OPTConfig(vocab_size=len(tok) + 1, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                           ffn_dim=96, max_position_embeddings=64, word_embed_proj_dim=48, pad_token_id=0,
                           bos_token_id=1, eos_token_id=1)
        else:
            tok = word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", unk_token="<unk>", pad_token="<pad>",
                                 eos_token="</s>")
            tc = T5Config(vocab_size=len(tok) + 1, d_model=48, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=2,
                          num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False)
        vc = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8)
        qc = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64)
        conf = Blip2Config(vision_config=vc.to_dict(), qformer_config=qc.to_dict(), text_config=tc.to_dict(),
                           num_query_tokens=4, image_token_index=len(tok))
        m = Blip2ForConditionalGeneration(conf)
        with torch.no_grad():  # HF zero-inits queries and biases: make every weight count
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        m.save_pretrained(root / kind)
        tok.save_pretrained(root / kind)
        out[kind] = str(root / kind)
    return out


def test_qformer_from_bert_draws_new_token_rows_as_resize_token_embeddings(hf_folders):
    """[DEC], the row BLIP-2 adds to BERT's vocabulary, starts as transformers' resize_token_embeddings drew it for
    LAVIS (blip2_qformer.py; N(0, initializer_range 0.02)), not at nn.Embedding's N(0, 1) beside BERT's rows."""
    from transformers import BertForMaskedLM
    bert = BertForMaskedLM.from_pretrained(hf_folders["bert"])
    V = bert.config.vocab_size
    torch.manual_seed(0)
    qf = bp.qformer_from_bert(hf_folders["bert"], 24, bp.Config(num_query=4), V + 50)  # 50 new rows: a stable std
    words = qf.word_embeddings.weight.detach()
    assert torch.equal(words[:V], bert.bert.embeddings.word_embeddings.weight)
    assert 0.015 < float(words[V:].std()) < 0.025


def test_qformer_from_bert_draws_cross_attention_as_bert_init(hf_folders):
    """The cross-attention layers BERT lacks start as BertPreTrainedModel._init_weights draws the keys
    from_pretrained is missing (LAVIS blip2.py init_Qformer): N(0, 0.02) weights, zero biases, LayerNorm 1 and 0;
    not nn.Linear's uniform +-1/sqrt(fan_in) (std 0.11 here) with non-zero biases."""
    torch.manual_seed(0)
    qf = bp.qformer_from_bert(hf_folders["bert"], 24, bp.Config(num_query=4), 120)
    cross = [layer.cross_attn for layer in qf.layers if layer.cross_attn is not None]
    linears = [m for c in cross for m in c.modules() if isinstance(m, torch.nn.Linear)]
    assert cross and len(linears) == 4 * len(cross)  # query, key, value, dense
    assert 0.018 < float(torch.cat([m.weight.detach().flatten() for m in linears]).std()) < 0.022
    assert all(not m.bias.any() for m in linears)
    assert all(bool((c.norm.weight == 1).all() and not c.norm.bias.any()) for c in cross)


def hf_inputs(model, kind):
    torch.manual_seed(1)
    px = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
    placeholders = torch.full((2, model.config.num_query_tokens), model.config.image_token_index)
    extra = {} if kind == "opt" else {"decoder_input_ids": torch.tensor([[0, 5, 6], [0, 7, 8]])}
    return px, ids, dict(pixel_values=px, input_ids=torch.cat([placeholders, ids], 1), **extra)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_hf_import_matches_transformers(hf_folders, kind, tmp_path):
    from common.config import parse_config
    from common.dist import Dist
    from transformers import Blip2ForConditionalGeneration
    cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, [
        "--stage", "eval", "--hf_import", hf_folders[kind], "--bert_path", hf_folders["bert"], "--eval_tasks",
        "caption", "--image_size", "32", "--out_dir", str(tmp_path)]))
    model, frozen, toks, meta = bp.build(cfg, Dist())
    model.eval()
    ref = Blip2ForConditionalGeneration.from_pretrained(hf_folders[kind]).eval()
    px, ids, inputs = hf_inputs(ref, kind)
    with torch.no_grad():
        q, prompts = model.prompts(px, frozen)
        r = ref.get_image_features(px, return_dict=True)
        assert torch.allclose(q, r.qformer_outputs.last_hidden_state, atol=1e-4)
        assert torch.allclose(prompts, r.pooler_output, atol=1e-4)
        x = torch.cat([prompts, frozen.llm.get_input_embeddings()(ids)], 1)  # [P; E(text)] as in training
        ours = frozen.llm(inputs_embeds=x, decoder_input_ids=inputs.get("decoder_input_ids")).logits \
            if kind == "t5" else frozen.llm(inputs_embeds=x).logits
        theirs = ref(**inputs).logits
    assert theirs.abs().mean() > 1e-2 and torch.allclose(ours, theirs, atol=1e-4)
    assert meta["hf_loaded"] > 40  # every Q-Former tensor came from the file, none from the BERT init


def test_trained_weights_are_fp32_from_an_fp16_folder(hf_folders, tmp_path):
    """Issue 18.6: caption fine-tuning trains the ViT; loaded from an fp16 BLIP-2 folder it keeps fp32 weights."""
    from common.config import parse_config
    from common.dist import Dist
    from transformers import Blip2ForConditionalGeneration
    half = tmp_path / "fp16"
    Blip2ForConditionalGeneration.from_pretrained(hf_folders["opt"]).half().save_pretrained(half)
    for f in os.listdir(hf_folders["opt"]):
        if "token" in f:
            shutil.copy(os.path.join(hf_folders["opt"], f), half)
    cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, [
        "--stage", "caption", "--hf_import", str(half), "--bert_path", hf_folders["bert"], "--train_vision", "true",
        "--image_size", "32", "--out_dir", str(tmp_path / "run")]))
    model = bp.build(cfg, Dist())[0]
    assert model.vision is not None and {p.dtype for p in model.vision.parameters()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert bp.build_pformer(hf_folders["bert"], 4, 48, 8).bert.embeddings.word_embeddings.weight.dtype == torch.float32


def test_paper_eval_settings_as_lavis(hf_folders):
    """Issue 17.10: the paper's caption min_length 8 counts the prompt (OPT) or the decoder start (T5), as LAVIS
    hands it to generate(); --stage eval of a caption fine-tuned checkpoint evaluates at its 364 px."""
    from transformers import AutoTokenizer
    from common.config import parse_config
    cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, ["--preset", "paper", "--stage", "eval"]))
    assert cfg.min_length == 8 and cfg.caption_prompt == "a photo of" and cfg.image_size == 224
    assert cfg.k_test == 128  # retrieval: ITM re-ranks each ITC top 128 (LAVIS ret_coco_eval.yaml)
    opt = AutoTokenizer.from_pretrained(hf_folders["opt"])  # "</s> $A": "</s> a photo" is 3 tokens
    assert bp.min_new(cfg, opt, False, "a photo") == 5 and bp.min_new(cfg, opt, True, "a photo") == 7
    cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, ["--preset", "paper", "--stage", "eval",
                                                                  "--init", "caption.pt"]))
    assert bp.eval_image_size(cfg, {"config": {"image_size": 364}}) == 364  # the checkpoint's training size
    assert bp.eval_image_size(cfg, {"config": {}}) == 224
    cfg.image_size = 300  # given on the command line: kept
    assert bp.eval_image_size(cfg, {"config": {"image_size": 364}}) == 300
    toy = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, ["--stage", "caption"]))
    assert bp.min_new(toy, opt, False, "a photo") == toy.min_new_tokens == 1  # toy: counts new tokens only
    # issue 17.7: the transforms -- blip2_image_train (crop + flip) in pre-training and in caption fine-tuning
    # (BLIText caption_coco_ft.yaml, P-Former's runs and their BLIP-2 baseline; LAVIS's own caption_coco_ft.yaml
    # has blip_image_train, + RandomAugment: --randaug true), blip_image_eval (bicubic resize to a square) to evaluate
    paper = {st: bp.resolve_config(parse_config(bp.Config, bp.PRESETS, ["--preset", "paper", "--stage", st]))
             for st in ("1", "2", "caption")}
    assert [(c.hflip, c.randaug) for c in paper.values()] == [(True, False), (True, False), (True, False)]
    tf, ev = bp.image_transform(paper["caption"], train=True), bp.image_transform(paper["caption"])
    assert (tf.train, tf.hflip, tf.randaug, tf.uint8, ev.train, ev.resize) == (True, True, False, True, False, "square")
    lavis = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, ["--preset", "paper", "--stage", "caption",
                                                                    "--randaug", "true"]))
    assert bp.image_transform(lavis, train=True).randaug
    assert not (toy.hflip or toy.randaug)  # the toy captions say left / right
    # the trained ViT recomputes its blocks in backward in the paper's caption fine-tuning (use_grad_checkpoint)
    assert [c.grad_checkpoint for c in paper.values()] == [False, False, True] and not toy.grad_checkpoint


def test_paper_preset_llm_train_mode_and_vqa_length_penalty():
    """LAVIS blip2_opt.py / blip2_t5.py freeze the LLM by requires_grad alone and the runner's model.train() turns
    its dropout on (runner_base.py): the paper preset trains with --llm_train_mode true. Its OPT VQA ranks beams
    by the plain sum of log-probs (LAVIS blip2_opt.py predict_answers: length_penalty=0; docs: deviations). The
    toy preset keeps both as they were (its T5 counts answer lengths as transformers 4.26 did)."""
    from common.config import parse_config
    for stage in ("0", "2", "caption", "eval"):
        paper = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, ["--preset", "paper", "--stage", stage]))
        assert paper.llm_train_mode is paper.pformer_train_mode is True and paper.vqa_length_penalty == 0.0
        toy = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, ["--stage", stage]))
        assert toy.llm_train_mode is toy.pformer_train_mode is False and toy.vqa_length_penalty == -1.0


def test_a_missing_eval_file_stops_before_training(tmp_path, monkeypatch):
    """The paper preset evaluates after stage 1 (retrieval: --val_file) and stage 2 (captions, VQA: --vqa_file too);
    without those files a run stopped only after training, in read_pairs(''). One line names the flag and the way
    out before anything is built."""
    class Built(Exception):
        pass

    monkeypatch.setattr(bp, "build", lambda *a: (_ for _ in ()).throw(Built()))
    run = ["--preset", "paper", "--train_file", "pairs.jsonl", "--out_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"^--eval_tasks retrieval reads --val_file \(not given: no such file\); pass "
                                         r"it, or leave retrieval out of --eval_tasks \('' for none\)$"):
        bp.main(run + ["--stage", "1"])
    (tmp_path / "val.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match=r"^--eval_tasks vqa reads --vqa_file \(not given"):
        bp.main(run + ["--stage", "2", "--val_file", str(tmp_path / "val.jsonl")])
    with pytest.raises(SystemExit, match=r"^--eval_tasks caption reads --val_file \(nope.jsonl: no such file"):
        bp.main(run + ["--stage", "caption", "--val_file", "nope.jsonl"])
    with pytest.raises(SystemExit, match=r"^--eval_tasks caption reads --test_file \(test.jsonl: no such file"):
        bp.main(run + ["--stage", "caption", "--val_file", str(tmp_path / "val.jsonl"), "--test_file", "test.jsonl"])
    with pytest.raises(Built):  # what the line says to do
        bp.main(run + ["--stage", "1", "--eval_tasks", ""])
    with pytest.raises(Built):  # --bench times training steps only (docs/bench.md's rows)
        bp.main(run + ["--stage", "1", "--bench", "2"])


@pytest.mark.parametrize("stage, world, micro", [("1", 16, 64), ("0", 8, 48), ("caption", 16, 8)])
def test_paper_preset_fits_the_micro_batch_to_the_world_size_before_building(tmp_path, monkeypatch, capsys, stage,
                                                                            world, micro):
    """The docstring's `torchrun --nnodes 2 --nproc_per_node 8 ... --preset paper --stage 1`: 1024 = 16 ranks x
    micro 128 x accumulation 0 stopped in StepSampler after ViT-g, BERT and OPT-2.7b had loaded (stage 0's 384 ran
    on 1 or 3 GPUs only).  main() now fits the micro batch before build(): the largest divisor of a rank's share,
    the global batch (what a step computes) unchanged, and says so in one line."""
    from common.dist import Dist

    class Built(Exception):
        pass

    def build(cfg, dist):
        raise Built(cfg.micro_batch, cfg.global_batch)

    monkeypatch.setattr(bp.D, "setup_distributed", lambda device: Dist(world_size=world))
    monkeypatch.setattr(bp, "build", build)
    with pytest.raises(Built) as got:
        bp.main(["--preset", "paper", "--stage", stage, "--eval_tasks", "", "--out_dir", str(tmp_path)])
    recipe = bp.STAGE_RECIPES["paper"][stage]
    assert got.value.args == (micro, recipe["global_batch"])
    assert f"--micro_batch {micro}, not {recipe['micro_batch']}: {world} processes x {micro}" in capsys.readouterr().out


def test_t5_prefix_split_is_drawn_per_sample_on_any_layout(toy_root, monkeypatch):
    """BLIText (blip2_pformer_t5.py) cuts each caption on its own; the cut came from random.Random(seed-step-micro),
    so the k-th caption of every rank got the same cut and 2 processes did not compute what 1 process computes at
    the same global batch.  A sample's cut now follows its key (seed, epoch, index): the same on 1 rank, 2 ranks or
    with accumulation (and after a resume, which replays the keys), fresh in each epoch; stages 0 and 2."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from common.data import StepSampler
    load = lambda name: AutoTokenizer.from_pretrained(os.path.join(toy_root, "models", name))  # noqa: E731
    toks = bp.Tokenizers(load("bert"), load("t5"), 32, "cpu", is_encdec=True)
    with open(os.path.join(toy_root, "corpus.txt")) as f:
        data = bp.TextDataset([line.strip() for line in f.readlines()[:16]])
    cfg, frozen, calls, split = SimpleNamespace(seed=0, caption_prompt=""), SimpleNamespace(pformer=None), [], \
        bp.split_prefix
    monkeypatch.setattr(bp, "split_prefix", lambda t, rng, stage0=False: calls.append(split(t, rng, stage0)) or
                        calls[-1])

    def cuts(stage, micro, world):  # {(epoch, index): (prefix, suffix)} over 4 steps (2 epochs) of 8
        out = {}
        for rank in range(world):
            sampler = StepSampler(len(data), 8, micro, world, rank, seed=0)
            for step in range(4):
                for j, keys in enumerate(sampler.micro_batches(step)):
                    raw = {**bp.collate([data[k] for k in keys]), "image_id": torch.arange(len(keys))}
                    calls.clear()
                    bp.make_batch(raw, stage, cfg, toks, frozen, step, j, "cpu")
                    out.update(zip(keys, list(calls)))
        return out

    for stage in ("0", "2"):
        one = cuts(stage, 8, 1)
        assert len(one) == 32 and cuts(stage, 4, 2) == one and cuts(stage, 2, 1) == one, stage
        assert any(one[0, i] != one[1, i] for i in range(16))


def test_itm_negative_noise_is_fresh_in_every_micro_batch(toy_root):
    """Stage 1 seeded micro batch j's two Gumbel draws (image, text negatives) with seed + j + {0, 1}, so under
    accumulation micro j's text noise was micro j+1's image noise; each draw now has a seed of its own."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer
    load = lambda name: AutoTokenizer.from_pretrained(os.path.join(toy_root, "models", name))  # noqa: E731
    toks = bp.Tokenizers(load("bert"), load("opt"), 32, "cpu", is_encdec=False)
    cfg, frozen = SimpleNamespace(seed=0, caption_prompt=""), SimpleNamespace(pformer=None, rank=0)
    raw = {"caption": ["a red circle", "a blue square", "a green star"], "image_id": torch.arange(3)}
    noise = [n for step, micro in ((0, 0), (0, 1), (0, 2), (1, 0))
             for n in bp.make_batch(raw, "1", cfg, toks, frozen, step, micro, "cpu")["noise"]]
    assert len(noise) == 8 and all(not torch.equal(a, b) for a, b in itertools.combinations(noise, 2))


def test_stage1_hf_export_without_a_projection_stops_at_startup(tmp_path, monkeypatch):
    """A plain stage 1 has no LLM projection, so --hf_export failed in export_hf only after training and evaluation,
    before metrics.json: one line at startup names what to pass; with --pformer_ckpt the run goes on to build."""
    class Built(Exception):
        pass

    monkeypatch.setattr(bp, "build", lambda *a: (_ for _ in ()).throw(Built()))
    run = ["--preset", "paper", "--stage", "1", "--train_file", "pairs.jsonl", "--eval_tasks", "",
           "--out_dir", str(tmp_path / "run"), "--hf_export", str(tmp_path / "hf")]
    with pytest.raises(SystemExit, match=r"^--hf_export writes the LLM projection, which a plain --stage 1 lacks: "
                                         r"pass --pformer_ckpt or --hf_import too, or export after --stage 2$"):
        bp.main(run)
    assert not os.listdir(tmp_path)  # nothing built or written
    with pytest.raises(Built):
        bp.main(run + ["--pformer_ckpt", "s0.pt"])
    # --stage 0 trains the P-Former alone: --hf_export exported nothing and the run exited 0
    with pytest.raises(SystemExit, match=r"^--hf_export: --stage 0 trains the P-Former alone, no BLIP-2 model; "
                                         r"export after --stage 2 \(or --stage eval --init <its checkpoint>\)$"):
        bp.main(["--preset", "paper", "--stage", "0", "--text_file", "lines.txt", "--out_dir", str(tmp_path / "s0"),
                 "--hf_export", str(tmp_path / "hf")])
    assert os.listdir(tmp_path) == ["run"]  # (the --pformer_ckpt run's log)


def test_min_new_tokens_on_the_command_line_replaces_the_recipes_min_length():
    """The paper recipe's min_length 8 (stage 2, caption, eval) made min_new() ignore --min_new_tokens; now the
    flag given wins, and the two given together are refused with one line."""
    from common.config import parse_config

    class Tok:  # OPT-like: </s> + one token a word
        def __call__(self, s):
            return type("Ids", (), {"input_ids": [2] + s.split()})()

    def least(*argv):
        cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, list(argv)))
        return cfg.min_length, bp.min_new(cfg, Tok(), False, cfg.caption_prompt)

    for stage in ("2", "caption", "eval"):
        assert least("--preset", "paper", "--stage", stage) == (8, 4)  # LAVIS: 8 - len("</s> a photo of")
        assert least("--preset", "paper", "--stage", stage, "--min_new_tokens", "12") == (0, 12)
        assert least("--preset", "paper", "--stage", stage, "--min_length", "5") == (5, 1)
        assert least("--stage", stage, "--min_new_tokens", "12") == (0, 12)  # toy
        assert least("--stage", stage) == (0, 1)
    assert least("--stage", "caption", "--min_length", "6") == (6, 2)  # toy caption prompt "a photo of"
    for preset in ("paper", "toy"):
        with pytest.raises(SystemExit, match=r"^--min_new_tokens counts new tokens, --min_length LAVIS's way: "
                                             r"pass one$"):
            least("--preset", preset, "--stage", "2", "--min_new_tokens", "3", "--min_length", "8")


def test_vqa_rule_and_okvqa_lemmatisation_settings(hf_folders, tmp_path, monkeypatch):
    """Issue 17.3/17.4: the VQA rule reaches vqa_accuracy; OK-VQA records (data/convert.py okvqa) are lemmatised
    unless --vqa_lemmatize false; without WordNet the evaluation stops with one line before decoding."""
    import nltk
    import common.metrics
    from PIL import Image
    from common.config import parse_config
    cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, ["--stage", "eval"]))
    assert cfg.vqa_rule == "lavis2017" and cfg.vqa_lemmatize is None
    ok, v2 = [{"dataset": "okvqa"}], [{"question_id": 1}]
    assert bp.lemmatize_vqa(cfg, ok) and not bp.lemmatize_vqa(cfg, v2)
    cfg.vqa_lemmatize = False
    assert not bp.lemmatize_vqa(cfg, ok)

    for n in ("a", "b"):
        Image.new("RGB", (32, 32), (40 * len(n), 90, 200)).save(tmp_path / f"{n}.png")

    def vqa_eval(name, *extra, **mark):  # a quick --stage eval of VQA on 2 questions (the hf_folders model)
        qs = [{"image": f"{n}.png", "question": "what colour?", "answers": ["blue", "red"], "question_id": i, **mark}
              for i, n in enumerate("ab")]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
        return bp.main(["--stage", "eval", "--hf_import", hf_folders["opt"], "--bert_path", hf_folders["bert"],
                        "--eval_tasks", "vqa", "--vqa_file", str(tmp_path / f"{name}.jsonl"), "--image_root",
                        str(tmp_path), "--image_size", "32", "--out_dir", str(tmp_path / name), "--num_workers", "0",
                        *extra])

    rules, accuracy = [], common.metrics.vqa_accuracy  # evaluate_vqa imports it from common.metrics when it runs
    monkeypatch.setattr(common.metrics, "vqa_accuracy", lambda p, a, rule: rules.append(rule) or accuracy(p, a, rule))
    for rule in ("lavis2017", "official"):  # the default, and the other rule by flag
        rules.clear()
        m = vqa_eval(rule, *(["--vqa_rule", rule] if rule != cfg.vqa_rule else []))
        assert rules == [rule] * 2 and "vqa_acc" in m

    calls = []  # OK-VQA records without WordNet / tagger data: one line before anything is decoded
    monkeypatch.setattr(bp, "generate", lambda *a, **k: calls.append(1) or [""] * len(a[4]))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])
    with pytest.raises(LookupError, match="python -m nltk.downloader wordnet averaged_perceptron_tagger_eng") as e:
        vqa_eval("okvqa", dataset="okvqa")  # marked by data/convert.py okvqa: lemmatised
    assert "\n" not in str(e.value) and calls == []


def test_hf_export_reloads_in_transformers(hf_folders, tmp_path):
    from transformers import Blip2ForConditionalGeneration
    out = tmp_path / "export"
    bp.main(["--stage", "eval", "--hf_import", hf_folders["opt"], "--bert_path", hf_folders["bert"],
             "--eval_tasks", "", "--image_size", "32", "--out_dir", str(tmp_path / "run"), "--hf_export", str(out)])
    a = Blip2ForConditionalGeneration.from_pretrained(hf_folders["opt"]).eval()
    b = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    _, _, inputs = hf_inputs(a, "opt")
    with torch.no_grad():
        la, lb = a(**inputs).logits, b(**inputs).logits
    assert torch.allclose(la, lb, atol=1e-4)
    with torch.no_grad():
        b.qformer.encoder.layer[0].crossattention.attention.query.weight.add_(0.1)
        assert not torch.allclose(la, b(**inputs).logits, atol=1e-4)  # the comparison can fail


def test_vqa_test_split_without_answers_writes_its_predictions(hf_folders, tmp_path):
    """A test split (data/convert.py --allow_unanswered: "answers": []) crashed in vqa_accuracy after decoding, before
    vqa.json, the file a submission needs, was written."""
    from PIL import Image
    for n in ("a", "b"):
        Image.new("RGB", (32, 32), (40 * len(n), 90, 200)).save(tmp_path / f"{n}.png")
    qs = [{"image": f"{n}.png", "question": "what colour?", "answers": [], "question_id": i}
          for i, n in enumerate("ab")]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    m = bp.main(["--stage", "eval", "--hf_import", hf_folders["opt"], "--bert_path", hf_folders["bert"],
                 "--eval_tasks", "vqa", "--vqa_file", str(tmp_path / "test.jsonl"), "--image_root", str(tmp_path),
                 "--image_size", "32", "--out_dir", str(tmp_path / "run"), "--num_workers", "0"])
    assert "vqa_acc" not in m
    assert [p["question_id"] for p in json.load(open(tmp_path / "run" / "vqa.json"))] == [0, 1]


def test_nocaps_recipe_scores_each_domain_alone(hf_folders, tmp_path):
    """Records with "domain" (data/convert.py nocaps) are scored per domain, each domain as its own set (NoCaps' rule,
    common.metrics.caption_metrics_by_group), and overall, under the NoCaps recipe's generation flags
    (docs/blip2_pformer.md: BLIText nocaps_opt2.7b_eval.yaml)."""
    from PIL import Image
    from common.metrics import caption_metrics
    doms = ["in-domain", "in-domain", "out-domain", "out-domain", "near-domain"]
    for k in range(5):
        Image.new("RGB", (32, 32), (50 * k, 90, 200 - 40 * k)).save(tmp_path / f"{k}.png")
    recs = [{"image": f"{k}.png", "captions": [f"a photo of thing {k}", "a photo"], "domain": d, "image_id": k}
            for k, d in enumerate(doms)]
    (tmp_path / "nocaps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = bp.main(["--stage", "eval", "--hf_import", hf_folders["opt"], "--bert_path", hf_folders["bert"],
                 "--eval_tasks", "caption", "--val_file", str(tmp_path / "nocaps.jsonl"), "--image_root",
                 str(tmp_path), "--image_size", "32", "--out_dir", str(tmp_path / "run"), "--num_workers", "0",
                 "--num_beams", "3", "--max_new_tokens", "20", "--min_length", "5"])
    preds = {p["image"]: p["caption"] for p in json.load(open(tmp_path / "run" / "captions.json"))}
    for d in ("in-domain", "near-domain", "out-domain"):
        sub = [r for r in recs if r["domain"] == d]
        alone = caption_metrics({r["image"]: r["captions"] for r in sub}, {r["image"]: preds[r["image"]] for r in sub})
        assert {k: m[f"{d}/{k}"] for k in alone} == pytest.approx(alone)
    assert m["CIDEr"] == pytest.approx(caption_metrics({r["image"]: r["captions"] for r in recs}, preds)["CIDEr"])


def test_t5_in_fp16_is_refused(hf_folders, tmp_path):
    """Flan-T5 overflows in fp16 (LAVIS runs it in bf16): --precision fp16 with a T5 stops with one line; OPT runs."""
    from common.config import parse_config
    from common.dist import Dist
    args = ["--stage", "eval", "--bert_path", hf_folders["bert"], "--eval_tasks", "caption", "--image_size", "32",
            "--precision", "fp16", "--out_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="T5 LLM: Flan-T5 overflows in fp16"):
        bp.build(bp.resolve_config(parse_config(bp.Config, bp.PRESETS, args + ["--hf_import", hf_folders["t5"]])),
                 Dist())
    bp.build(bp.resolve_config(parse_config(bp.Config, bp.PRESETS, args + ["--hf_import", hf_folders["opt"]])), Dist())


def test_newline_ends_opt_captions_but_not_t5s():
    """LAVIS ends OPT's captions with "\n" and stops generating there (blip2_opt.py); T5 keeps its EOS (blip2_t5.py),
    even where its tokenizer has a token for "\n" (sentencepiece's "\u2581" after normalisation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", "\n"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    opt, t5 = bp.Tokenizers(None, tok, 8, "cpu"), bp.Tokenizers(None, tok, 8, "cpu", is_encdec=True)
    assert (opt.eos_id, opt.suffix) == (vocab["\n"], "\n") and (t5.eos_id, t5.suffix) == (vocab["</s>"], "</s>")


def test_hf_export_at_another_image_size_and_eval_at_the_imported_size(hf_folders, tmp_path):
    """A model run at another size than its ViT's (the paper's 364 px caption fine-tuning of a 224 px tower) exports
    the position table it used, so transformers computes the same prompts; --stage eval of an --hf_import folder
    without --image_size runs at that folder's ViT size (blip2-opt-2.7b-coco: 364), not the recipe's."""
    from transformers import Blip2ForConditionalGeneration
    from common.config import parse_config
    from common.dist import Dist
    out = tmp_path / "export48"
    args = ["--stage", "eval", "--bert_path", hf_folders["bert"], "--eval_tasks", "", "--out_dir", str(tmp_path)]
    bp.main(args + ["--hf_import", hf_folders["opt"], "--image_size", "48", "--hf_export", str(out)])
    cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, args + ["--hf_import", hf_folders["opt"],
                                                                         "--image_size", "48"]))
    model, frozen, _, _ = bp.build(cfg, Dist())
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    px = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ours, theirs = model.eval().prompts(px, frozen)[1], hf.get_image_features(px, return_dict=True).pooler_output
    assert hf.config.vision_config.image_size == 48 and torch.allclose(ours, theirs, atol=1e-4)
    for folder, size in ((hf_folders["opt"], 32), (str(out), 48)):
        cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, args + ["--hf_import", folder]))
        assert bp.eval_image_size(cfg, None) == size


# ---------------------------------------------------------------------------------------------------------------
# Every stage on the tiny toy world
# ---------------------------------------------------------------------------------------------------------------

def common_args(toy_root, out):
    return ["--toy_root", toy_root, "--out_dir", str(out), "--num_workers", "0", "--log_every", "1",
            "--num_query", "8", "--eval_max", "16", "--eval_batch", "16"]


@pytest.fixture(scope="module")
def pipeline(toy_root, tmp_path_factory):
    """Stage 0 -> 1 -> 2 -> caption on the tiny world, few steps each; stage 1's checkpoint also evaluated on
    blank images (the no-image baseline).  Stages 0, 2 and caption fit a small subset (a few hundred steps of the
    full data would be needed before their LM losses move beyond batch-to-batch noise)."""
    root = tmp_path_factory.mktemp("bp")
    with open(os.path.join(toy_root, "corpus.txt")) as f:
        (root / "sentences.txt").write_text("".join(f.readlines()[:64]))
    with open(os.path.join(toy_root, "pairs_train.jsonl")) as f:  # 4 images x 4 captions = one global batch
        recs = [json.loads(line) for line in f.readlines()[:4]]
    (root / "pairs_small.jsonl").write_text("".join(json.dumps({**r, "captions": r["captions"][:4]}) + "\n"
                                                    for r in recs))
    small = ["--train_file", str(root / "pairs_small.jsonl"), "--epochs", "100"]
    run = lambda name, *a: (bp.main(common_args(toy_root, root / name) + list(a)), root / name)
    res = {}
    s0_args = ["--stage", "0", "--max_steps", "48", "--global_batch", "32", "--micro_batch", "32", "--lr", "3e-3",
               "--warmup_steps", "2", "--text_file", str(root / "sentences.txt"), "--epochs", "100"]
    opt = ("--llm_path", os.path.join(toy_root, "models", "opt"))  # OPT: + L_vq, masking
    frozen = ("--lr", "0", "--min_lr", "0", "--warmup_lr", "0")  # control: the same batches, no update
    res["0"], res["0ctrl"] = run("s0", *s0_args, *opt), run("s0ctrl", *s0_args, *opt, *frozen)
    # the toy default LLM (T5): prefix/suffix split; its P-Former serves stages 2 and caption
    res["0t5"], res["0t5ctrl"] = run("s0t5", *s0_args), run("s0t5ctrl", *s0_args, *frozen)
    s0 = str(root / "s0t5" / "checkpoint.pt")
    # plain BLIP-2 stage 1 (no --pformer_ckpt; stage 1 + alignment is exercised by the resume test below)
    # (the toy ITC sits at log(batch) until the features stop collapsing: 44-110 steps, seed-dependent)
    res["1"] = run("s1", "--stage", "1", "--max_steps", "230", "--epochs", "5", "--global_batch", "32",
                   "--micro_batch", "32", "--lr", "1e-3", "--warmup_steps", "3", "--eval_max", "50")
    res["1blank"] = run("s1blank", "--stage", "eval", "--init", str(root / "s1" / "checkpoint.pt"), "--eval_tasks",
                        "retrieval", "--blank_images", "true", "--eval_max", "50", "--report", "false")
    res["2"] = run("s2", "--stage", "2", "--max_steps", "12", "--global_batch", "16", "--micro_batch", "8",
                   "--lr", "1e-3", "--warmup_steps", "2", "--init", str(root / "s1" / "checkpoint.pt"),
                   "--pformer_ckpt", s0, "--eval_max", "6", *small)
    cap = ("--stage", "caption", "--max_steps", "48", "--global_batch", "16", "--micro_batch", "16", "--lr", "1e-3",
           "--warmup_steps", "1", "--init", str(root / "s2" / "checkpoint.pt"), "--pformer_ckpt", s0, "--eval_max",
           "4", *small)
    res["cap"], res["capctrl"] = run("cap", *cap), run("capctrl", *cap, *frozen, "--report", "false")
    return res


def test_every_stage_writes_a_report(pipeline):
    """Issue 21: report.html per run, parsed; its images decode and its SVGs parse (read_report raises if not)."""
    from common.report import read_report
    want = {"0": {"Training"}, "1": {"Training", "Q-Former cross-attention: queries 0-3 over the image patches"},
            "2": {"Captions (val)", "Zero-shot VQA"}, "cap": {"Captions (val)"}}
    for stage, sections in want.items():
        info = read_report(pipeline[stage][1] / "report.html")
        assert sections <= set(info["sections"]), (stage, info["sections"])
        assert stage == "0" or info["images"] >= 4
    assert any(s.startswith("Text -> image: ") for s in read_report(pipeline["1"][1] / "report.html")["sections"])
    assert not (pipeline["1blank"][1] / "report.html").exists()  # --report false


def test_stage0_pformer_learns(pipeline):
    # The LM loss of the frozen LLM prompted by P*: the last third of the 48 steps against a control run that
    # sees the same batches (same masks and prefix splits) without updates; batch-to-batch noise cancels.
    # (Worst of seeds 0-4: 0.83 OPT, 0.86 T5; docs/blip2_pformer.md.)
    for name in ("0", "0t5"):
        trained, control = fell(pipeline[name][1], "lm")[1], fell(pipeline[name + "ctrl"][1], "lm")[1]
        assert trained < 0.95 * control, (name, trained, control)
    metrics, run_dir = pipeline["0"]
    assert {"final_lm", "final_contrast", "final_vq"} <= set(metrics)
    assert "final_vq" not in pipeline["0t5"][0]
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["config"]["stage"] == "0" and "cls_proj.weight" in ck["model"]
    assert json.load(open(run_dir / "config.json"))["stage"] == "0"


def test_stage1_losses_fall_and_retrieval_beats_blank(pipeline):
    metrics, run_dir = pipeline["1"]
    # ITC left chance, log(global batch) = log 32 (uniform similarities): its last third at most 0.93 of it (seeds
    # 0-4: 0.70-0.84).  Not against its own first third: that moves with the step at which the toy features stop
    # collapsing (38-120 steps, seed-dependent), and an early exit lowered the first third to a ratio of 0.89.
    last = fell(run_dir, "itc")[1]
    assert last < 0.93 * math.log(32), ("itc", last)
    assert_fell(run_dir, "itg", 0.85)
    blank = pipeline["1blank"][0]
    # with blank images every image looks the same: retrieval sits at chance (R@1 = 2% of 50); the trained
    # Q-Former is far above it
    assert blank["img_r1"] == pytest.approx(2.0) and blank["txt_r1"] == pytest.approx(2.0)
    # 230 steps (5 epochs of the tiny world) get the toy ITC out of its collapsed start; random
    # features would give r_mean 10 +- ~2 here
    gap = metrics["r_mean"] - blank["r_mean"]
    assert gap > 15 and metrics["txt_r10"] + metrics["img_r10"] > 80, (metrics, blank)


def test_stage2_and_caption_run_and_write_predictions(pipeline):
    metrics, run_dir = pipeline["2"]
    # stage 2's objective LM + 100 * align falls; its T5 LM term alone is noisy here (a fresh random
    # prefix/suffix split every step) -- the caption stage below checks that the LM term itself falls
    for key in ("loss", "align"):
        assert_fell(run_dir, key, 0.5)
    assert {"CIDEr", "BLEU-4", "vqa_acc"} <= set(metrics)
    caps = json.load(open(run_dir / "captions.json"))
    assert len(caps) == 6 and all(isinstance(c["caption"], str) for c in caps)
    assert len(json.load(open(run_dir / "vqa.json"))) == 6
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert "llm_proj.weight" in ck["model"] and not any("word_embeddings" in k for k in ck["model"])
    metrics, run_dir = pipeline["cap"]
    # 48 steps on the same 16 pairs: the LM loss of the last third against a control run of the same batches
    # without updates (seeds 0-4: 0.68/0.70/0.52/0.77/0.66). (A run on blank images fell as far at 24 steps,
    # 0.81/0.86/0.57 on seeds 0-2 against 0.80/0.85/0.57: in this many steps the toy Q-Former learns the captions'
    # prior, not the image, so no blank-image control is asserted.)
    trained, control = fell(run_dir, "lm")[1], fell(pipeline["capctrl"][1], "lm")[1]
    assert trained < 0.95 * control, (trained, control)
    assert "CIDEr" in metrics and os.path.isfile(run_dir / "captions.json")


def test_grad_checkpointing_of_the_trained_vit_keeps_loss_and_gradients(toy_root, tmp_path):
    """Caption fine-tuning with the ViT trained, as LAVIS and BLIText run it (caption_coco_ft.yaml:
    use_grad_checkpoint): --grad_checkpoint true recomputes each ViT block in backward (its attention runs twice a
    step instead of once), and the loss and every gradient equal those of the run without it."""
    from common.config import parse_config
    from common.dist import Dist
    from data.toy import toy_paths
    runs = []
    for on in ("false", "true"):
        cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, [
            "--stage", "caption", "--train_vision", "true", "--grad_checkpoint", on] + common_args(toy_root, tmp_path)))
        toy_paths(cfg, *bp.toy_files(cfg))
        torch.manual_seed(0)
        model, frozen, toks, _ = bp.build(cfg, Dist())
        blocks, calls = model.vision.model.encoder.layers, []
        blocks[0].self_attn.register_forward_hook(lambda *a, c=calls: c.append(1))
        recs, images = bp.read_pairs(cfg.train_file)[:4], bp.open_images(cfg)
        raw = {"pixels": torch.stack([bp.load_pixels(images, r["image"]) for r in recs]),
               "caption": [r["captions"][0] for r in recs], "image_id": torch.arange(4)}
        model.train()
        loss = sum(model("caption", bp.make_batch(raw, "caption", cfg, toks, frozen, 0, 0, "cpu"), frozen).values())
        loss.backward()
        runs.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls),
                     [b.gradient_checkpointing for b in blocks]))
    (loss0, grads0, calls0, flags0), (loss1, grads1, calls1, flags1) = runs
    assert not any(flags0) and all(flags1) and (calls0, calls1) == (1, 2)
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    assert grads0.keys() == grads1.keys() and any(k.startswith("vision.") for k in grads0)
    for k in grads0:
        assert torch.allclose(grads0[k], grads1[k], atol=1e-6), k


def test_a_vit_run_at_another_size_resizes_its_position_table_once(toy_root, tmp_path, monkeypatch):
    """A run at another size than its ViT's (the paper's 364 px caption fine-tuning of a 224 px tower) interpolates
    the position table once, when the tower is loaded, as LAVIS does (eva_vit.py interpolate_pos_embed). A frozen
    tower computes what interpolating on every forward computes; a trained ViT trains the new table itself, its
    checkpoint keeps it, and --stage eval reloads it at the checkpoint's size or at another size."""
    def table(tower):
        return next(p for k, p in tower.model.embeddings.named_parameters() if k.startswith("position_embedding"))

    for name in ("blip2_vision", "clip"):
        tower = bp.load_vision(os.path.join(toy_root, "models", name))[0].eval()
        px = torch.randn(2, 3, 96, 96)
        with torch.no_grad():
            each_forward = tower(px)
            once = tower.resize(96)(px)
        assert table(tower).numel() == ((96 // 8) ** 2 + 1) * tower.width and tower.image_size == 96
        assert torch.allclose(once, each_forward, atol=1e-5), name
    start = table(bp.load_vision(os.path.join(toy_root, "models", "blip2_vision"))[0].resize(96)).detach()
    bp.main(["--stage", "caption", "--train_vision", "true", "--image_size", "96", "--max_steps", "2", "--lr", "1e-3",
             "--global_batch", "4", "--micro_batch", "4", "--warmup_steps", "1", "--report", "false"]
            + common_args(toy_root, tmp_path / "cap") + ["--eval_max", "2"])
    ck = tmp_path / "cap" / "checkpoint.pt"
    tuned = {k[len("vision."):]: v for k, v in torch.load(ck, weights_only=True)["model"].items()
             if k.startswith("vision.")}  # the trained ViT, as its checkpoint keeps it
    trained = tuned["model.embeddings.position_embedding"]
    assert trained.shape == start.shape and not torch.equal(trained, start)  # the 12 x 12 grid itself trained
    built, build = [], bp.build

    def keep(cfg, dist):  # what main builds for --stage eval --init: its size, model, frozen parts
        out = build(cfg, dist)
        built.append((cfg.image_size, *out))
        return out
    monkeypatch.setattr(bp, "build", keep)
    for size in ([], ["--image_size", "64"]):
        m = bp.main(["--stage", "eval", "--init", str(ck), "--eval_tasks", "caption", "--report", "false"] + size
                    + common_args(toy_root, tmp_path / f"eval{len(size)}") + ["--eval_max", "2"])
        assert "CIDEr" in m
        (run_size, model, frozen, _, _), = built[-1:]
        assert model.vision is None and run_size == (int(size[1]) if size else 96)  # a frozen tower, evaluated at
        tower = frozen.vision_tower                                                 # the checkpoint's size or 64
        pos = table(tower).detach().cpu()  # the trained 12 x 12 table, kept (interpolated per forward at 64 px)
        assert tower.image_size == 96 and torch.equal(pos.reshape(trained.shape), trained.to(pos.dtype))
        got = {k: v.cpu() for k, v in tower.state_dict().items()}  # the whole tower (in the frozen dtype)
        assert got.keys() == tuned.keys() and all(torch.equal(got[k], tuned[k].to(got[k].dtype)) for k in tuned)


def test_caption_finetuning_evaluates_the_best_epoch(toy_root, tmp_path, monkeypatch):
    """BLIP-2 and BLIText pick the caption fine-tuning epoch by val CIDEr + BLEU-4 (LAVIS tasks/captioning.py) and
    evaluate its weights (LAVIS runner_base.py: checkpoint_best). Val captions at each epoch end; here epoch 1 is
    made the best (its CIDEr raised by 100 when scored), so the final metrics and captions must be epoch 1's, read
    from best.pt, while checkpoint.pt keeps the last (resume) state. --test_file is scored from the same weights
    (LAVIS: the test split from checkpoint_best); here it is the val file, so its captions are epoch 1's."""
    from common import metrics as cm
    real, scored = cm.caption_metrics, []

    def epoch1_best(refs, preds):
        scored.append(real(refs, preds))
        return {**scored[-1], "CIDEr": scored[-1]["CIDEr"] + 100.0 * (len(scored) == 1)}

    monkeypatch.setattr(cm, "caption_metrics", epoch1_best)
    with open(os.path.join(toy_root, "pairs_train.jsonl")) as f:  # 4 images x 5 captions: 2 steps an epoch
        (tmp_path / "small.jsonl").write_text("".join(f.readlines()[:4]))
    m = bp.main(["--stage", "caption", "--train_file", str(tmp_path / "small.jsonl"), "--epochs", "2", "--lr", "1e-3",
                 "--global_batch", "10", "--micro_batch", "10", "--warmup_steps", "1", "--report", "false",
                 "--test_file", os.path.join(toy_root, "pairs_val.jsonl")]
                + common_args(toy_root, tmp_path / "run") + ["--eval_max", "4"])
    run = tmp_path / "run"
    assert [(r["step"], r["epoch"]) for r in metrics_log(run) if "epoch" in r] == [(2, 1), (4, 2)]
    assert (m["selected_epoch"], m["selected_step"]) == (1, 2) and len(scored) == 4  # 2 epochs, final val and test
    assert {k: m[k] for k in scored[0]} == scored[0] == scored[2] == scored[3]
    assert {k: m[f"test_{k}"] for k in scored[0]} == scored[0]
    for name in ("captions.json", "captions_test.json"):
        assert (run / name).read_text() == (run / "captions_epoch1.json").read_text()
    best, last = (torch.load(run / f, weights_only=True) for f in ("best.pt", "checkpoint.pt"))
    assert (best["kind"], best["step"], last["step"]) == ("caption", 2, 4) and "optimizer" not in best
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])  # epoch 2 moved them


@pytest.mark.parametrize("flag", ["true", "false"])
def test_llm_train_mode_dropout_in_training_steps_eval_in_generation(toy_root, tmp_path, monkeypatch, flag):
    """--llm_train_mode true (paper preset; LAVIS runner_base.py calls model.train(), which reaches the frozen LLM):
    the LLM is in training mode (dropout on) in every training step, also after the epoch-end val captions, and in
    eval mode whenever it generates; false (toy): in eval mode throughout."""
    seen, real = [], bp.build

    def spied(cfg, dist):
        built = real(cfg, dist)
        built[1].llm.register_forward_hook(lambda m, a, o: seen.append((torch.is_grad_enabled(), m.training)))
        return built

    monkeypatch.setattr(bp, "build", spied)
    with open(os.path.join(toy_root, "pairs_train.jsonl")) as f:  # 4 images x 5 captions: 2 steps an epoch
        (tmp_path / "small.jsonl").write_text("".join(f.readlines()[:4]))
    bp.main(["--stage", "caption", "--train_file", str(tmp_path / "small.jsonl"), "--epochs", "2",
             "--global_batch", "10", "--micro_batch", "10", "--report", "false", "--max_new_tokens", "3",
             "--llm_train_mode", flag] + common_args(toy_root, tmp_path / "run") + ["--eval_max", "2"])
    steps = [i for i, (grad, _) in enumerate(seen) if grad]
    gens = [i for i, (grad, _) in enumerate(seen) if not grad]
    assert len(steps) == 4 and gens and gens[0] < steps[-1]  # epoch 1's val captions come before step 3
    assert {seen[i][1] for i in steps} == {flag == "true"} and {seen[i][1] for i in gens} == {False}


def test_toy_blip2_tower_export_captions_like_transformers(pipeline, toy_root, tmp_path):
    """Stage 2 on the toy world (its BLIP-2-format vision tower), exported: transformers' own Blip2Processor +
    Blip2ForConditionalGeneration.generate give the script's beam-search captions word for word."""
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    out = tmp_path / "export"
    m = bp.main(["--stage", "2", "--max_steps", "6", "--global_batch", "16", "--micro_batch", "16", "--lr", "1e-3",
                 "--warmup_steps", "1", "--eval_tasks", "caption", "--hf_export", str(out)]
                + common_args(toy_root, tmp_path / "run")
                + ["--eval_max", "6"])
    assert "CIDEr" in m
    ours = json.load(open(tmp_path / "run" / "captions.json"))
    proc = Blip2Processor.from_pretrained(out)
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    images = [Image.open(os.path.join(toy_root, c["image"])).convert("RGB") for c in ours]
    inputs = proc(images=images, text=[""] * len(images), return_tensors="pt")
    cfg = json.load(open(tmp_path / "run" / "config.json"))
    with torch.no_grad():
        gen = hf.generate(**inputs, num_beams=cfg["num_beams"], max_new_tokens=cfg["max_new_tokens"],
                          min_new_tokens=cfg["min_new_tokens"], do_sample=False)
        image_only = hf.generate(**proc(images=images, return_tensors="pt"), num_beams=cfg["num_beams"],
                                 max_new_tokens=cfg["max_new_tokens"], min_new_tokens=cfg["min_new_tokens"])
    theirs = [t.strip() for t in proc.batch_decode(gen, skip_special_tokens=True)]
    assert theirs == [c["caption"] for c in ours] and any(theirs)
    # captioning without a text prompt (how imagechat_warmup.py --mode captions calls it) gives the same
    assert [t.strip() for t in proc.batch_decode(image_only, skip_special_tokens=True)] == theirs


def test_eval_stage_from_checkpoint(pipeline, toy_root, tmp_path):
    s1 = str(pipeline["1"][1] / "checkpoint.pt")
    m = bp.main(["--stage", "eval", "--init", s1, "--eval_tasks", "retrieval"] + common_args(toy_root, tmp_path)
                + ["--eval_max", "50"])
    assert m["r_mean"] == pytest.approx(pipeline["1"][0]["r_mean"])  # same checkpoint, same numbers


def test_frozen_pformer_keeps_fp32_weights_where_frozen_backbones_are_bf16(pipeline, toy_root, tmp_path, monkeypatch):
    """BLIText runs its frozen P-Former (a BertModel, never cast) in fp32 under autocast, beside a half LLM."""
    from common.config import parse_config
    from common.dist import Dist
    from data.toy import toy_paths
    monkeypatch.setattr(bp, "frozen_dtype", lambda device, dtype: torch.bfloat16)  # what a GPU run stores
    cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, common_args(toy_root, tmp_path) + [
        "--stage", "2", "--pformer_ckpt", str(pipeline["0t5"][1] / "checkpoint.pt")]))
    toy_paths(cfg, *bp.toy_files(cfg))  # as main: the toy world's backbones
    frozen = bp.build(cfg, Dist())[1]
    assert {p.dtype for p in frozen.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in frozen.pformer.parameters()} == {torch.float32}


def test_eval_of_a_plain_stage1_checkpoint_refuses_to_export_an_untrained_projection(pipeline, toy_root, tmp_path):
    """--stage eval --init <plain stage 1> built a fresh LLM projection (stage 1 trains none) and --hf_export wrote it
    into the folder as if trained; it is refused before any evaluation, naming the checkpoint. So are captions and
    VQA answers generated through that random projection."""
    s1 = str(pipeline["1"][1] / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"^--hf_export: --init .*checkpoint.pt holds no llm_proj.weight and this "
                                         r"run trains none"):
        bp.main(["--stage", "eval", "--init", s1, "--eval_tasks", "", "--hf_export", str(tmp_path / "hf")]
                + common_args(toy_root, tmp_path / "run"))
    assert not (tmp_path / "hf").exists()
    with pytest.raises(SystemExit, match=r"^--eval_tasks caption/vqa: --init .*checkpoint.pt holds no llm_proj"):
        bp.main(["--stage", "eval", "--init", s1, "--eval_tasks", "caption"] + common_args(toy_root, tmp_path / "c"))
    with pytest.raises(SystemExit, match=r"^--eval_tasks retrieval: a run without --init or --hf_import holds no "
                                         r"qformer.vision_proj.weight"):  # stage 2 from scratch: frozen random heads
        bp.main(["--stage", "2", "--eval_tasks", "retrieval"] + common_args(toy_root, tmp_path / "s2"))


def test_retrieval_of_a_generation_model_is_refused(hf_folders, tmp_path):
    """A released Blip2ForConditionalGeneration (blip2-opt-2.7b, -flan-t5-xl) has no ITC/ITM heads: retrieval after
    --hf_import of one scored random projections as a result; it stops, naming the missing tensors. Its caption
    evaluation runs (its llm_proj is in the folder)."""
    from common.dist import Dist
    (tmp_path / "val.jsonl").write_text("")
    args = ["--stage", "eval", "--hf_import", hf_folders["opt"], "--bert_path", hf_folders["bert"], "--image_size",
            "32", "--val_file", str(tmp_path / "val.jsonl"), "--out_dir", str(tmp_path), "--num_workers", "0"]
    with pytest.raises(SystemExit, match=r"^--eval_tasks retrieval: --hf_import .* holds no qformer.vision_proj.weight"
                                         r", qformer.text_proj.weight, qformer.itm_head.weight and this run"):
        bp.main(args + ["--eval_tasks", "retrieval"])
    from common.config import parse_config
    cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, args + ["--eval_tasks", "caption"]))
    bp.check_untrained(cfg, bp.build(cfg, Dist())[3]["loaded"])
    heads = {"qformer.vision_proj.weight", "qformer.text_proj.weight", "qformer.itm_head.weight"}
    cfg.eval_tasks = "retrieval,caption"  # the heads loaded, the projection not: the message names what reads it
    with pytest.raises(SystemExit, match=r"^--eval_tasks caption/vqa: --hf_import .* holds no llm_proj.weight and"):
        bp.check_untrained(cfg, heads)
    bp.check_untrained(cfg, heads | {"llm_proj.weight"})
    cfg.stage = "1"  # stage 1 trains the heads itself
    bp.check_untrained(cfg, set())


def test_retrieval_texts_are_tokenised_at_lavis_eval_length(pipeline, toy_root, tmp_path, monkeypatch):
    """LAVIS blip2.py compute_sim_matrix tokenises the eval texts at max_length=35 (ITC and the ITM re-ranking),
    above the training max_txt_len of 32."""
    lens, real = [], bp.Tokenizers.bert_batch
    monkeypatch.setattr(bp.Tokenizers, "bert_batch", lambda self, texts, max_len=0: lens.append(max_len) or
                        real(self, texts, max_len))
    bp.main(["--stage", "eval", "--init", str(pipeline["1"][1] / "checkpoint.pt"), "--eval_tasks", "retrieval",
             "--report", "false", "--k_test", "2"] + common_args(toy_root, tmp_path) + ["--eval_max", "2"])
    assert lens and set(lens) == {35}


def test_itm_rerank_equals_all_pairs_scored_by_hand(pipeline, toy_root, tmp_path, monkeypatch):
    """--k_test (BLIP-2 Sec. 4.4, LAVIS blip2.py compute_sim_matrix): ITM re-scores each ITC top-k. With k covering
    every candidate, the recalls equal ranking all pairs by ITC sim + ITM 'match' logit computed here pair by pair;
    the ITC-only recalls stay as itc_*."""
    from common.config import parse_config
    from common.data import pre_caption, read_pairs
    from common.dist import Dist
    from common.metrics import retrieval_recall
    from data.toy import toy_paths
    argv = ["--stage", "eval", "--init", str(pipeline["1"][1] / "checkpoint.pt"), "--eval_tasks", "retrieval",
            "--report", "false"] + common_args(toy_root, tmp_path) + ["--eval_max", "6"]
    itc, gathers, gather = bp.main(argv), [], bp.gather_dict
    monkeypatch.setattr(bp, "gather_dict", lambda d: gathers.append(len(d)) or gather(d))
    out = bp.main(argv + ["--k_test", "1000"])
    assert {k: out["itc_" + k] for k in itc} == itc
    assert gathers == [6, 30, 6]  # image and text features, then the images' ViT tokens once (not once per image)
    cfg = bp.resolve_config(parse_config(bp.Config, bp.PRESETS, argv))
    toy_paths(cfg, *bp.toy_files(cfg))
    model, frozen, toks, _ = bp.build(cfg, Dist())
    model.eval()
    recs = read_pairs(cfg.val_file)[:6]
    texts = [pre_caption(c, 50) for r in recs for c in r["captions"]]
    qf = model.qformer
    with torch.no_grad():
        images = bp.open_images(cfg)
        px = torch.stack([bp.load_pixels(images, r["image"]) for r in recs])
        image = model.encode_image(bp.on_device(px, cfg, "cpu"), frozen)  # (6, N, W)
        img = torch.nn.functional.normalize(qf.vision_proj(qf.query(image)), dim=-1)  # (6, Nq, E)
        ids, mask = toks.bert_batch(texts)
        txt = torch.nn.functional.normalize(qf.text_proj(qf.encode_text(ids, mask)[:, 0]), dim=-1)
        sim = torch.einsum("iqe,te->iqt", img, txt).amax(1)  # (6, T)
        itm = torch.stack([qf.itm_head(qf.joint(image[[i]].expand(len(texts), -1, -1), ids, mask)[:, :qf.num_query])
                           [..., 1].mean(1) for i in range(len(recs))])  # (6, T)
    owner = [i for i, r in enumerate(recs) for _ in r["captions"]]
    spans = [[t for t, o in enumerate(owner) if o == i] for i in range(len(recs))]
    by_hand = retrieval_recall(sim + itm, owner, spans)
    assert {k: out[k] for k in by_hand} == pytest.approx(by_hand, abs=1e-4)
    assert retrieval_recall(sim, owner, spans) == pytest.approx(itc, abs=1e-4)  # the ITC side, built the same way


# ---------------------------------------------------------------------------------------------------------------
# Resume and DDP
# ---------------------------------------------------------------------------------------------------------------

def stage1_args(toy_root, out, steps, *extra):
    return ["--stage", "1", "--max_steps", str(steps), "--global_batch", "16", "--micro_batch", "16",
            "--warmup_steps", "1", *extra] + common_args(toy_root, out) + ["--eval_tasks", ""]


def test_bench_times_data_apart_and_names_the_negatives_accumulation_leaves(toy_root, tmp_path, capsys, slowed):
    """Issue 18 (done when): --bench reports the loader's time apart from the step's; issue 17.2: with
    accumulation, ITC / ITM contrast one micro batch, and the start-up log says how many negatives that is."""
    delay = 0.02
    calls = slowed(bp, delay)  # the training loader's collate, made slow by a known amount
    out = bp.main(stage1_args(toy_root, tmp_path, 2, "--micro_batch", "4", "--bench", "1"))
    log = capsys.readouterr().out
    assert "ITC / ITM negatives per sample: 3 (the global batch's 15 need accumulation 1" in log
    assert out["bench_ms_step"] > 0 and "| ms_data " in log
    # every step draws its 4 micro batches from the loader: (3 warm-up + 1 timed [+ 1 FLOP count on a GPU]) x 4
    assert calls == [4] * 4 * (3 + 1 + ("bench_max_mem_gib" in out))
    assert out["bench_ms_data"] >= 4 * 1000 * delay  # the timed step waited for its 4 slow collates


def test_resume_continues_exactly(pipeline, toy_root, tmp_path):
    # stage 1 with the P-Former alignment term and dropout on (the restored RNG state matters)
    drop = ("--qformer_dropout", "0.1", "--pformer_ckpt", str(pipeline["0"][1] / "checkpoint.pt"))
    full = bp.main(stage1_args(toy_root, tmp_path / "a", 2, *drop))
    bp.main(stage1_args(toy_root, tmp_path / "b", 1, *drop))
    resumed = bp.main(stage1_args(toy_root, tmp_path / "b", 2, *drop, "--resume",
                                  str(tmp_path / "b" / "checkpoint.pt")))
    assert resumed["final_loss"] == full["final_loss"]  # bit-exact, dropout included
    assert resumed["final_itm"] == full["final_itm"] and "final_align" in full


def test_ddp_two_processes_match_one(toy_root, tmp_path):
    clip = ("--vision_path", os.path.join(toy_root, "models", "clip"))  # the CLIP-tower path (default: BLIP-2's)
    args = stage1_args(toy_root, tmp_path / "one", 2, "--qformer_dropout", "0", "--device", "cpu", *clip)
    one = bp.main(args)
    two_dir = tmp_path / "two"
    args2 = stage1_args(toy_root, two_dir, 2, "--qformer_dropout", "0", "--device", "cpu", "--micro_batch", "8", *clip)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    os.path.join(REPO, "blip2_pformer.py")] + args2, check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    two = json.load(open(two_dir / "metrics.json"))
    for key in ("final_itc", "final_itm", "final_itg", "final_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key
    rngs = torch.load(two_dir / "checkpoint.pt", weights_only=True)["rng"]  # each rank's own generators
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


@pytest.fixture(scope="module")
def shards(toy_root, tmp_path_factory):
    from data.toy import write_shards
    return write_shards(toy_root, n_shards=4, out_dir=str(tmp_path_factory.mktemp("shards")))


def test_stage1_from_shards_resumes_exactly_and_splits_ranks(toy_root, shards, tmp_path):
    """--train_shards (issue 20.2): stage 1 from webdataset shards; a resume continues the stream exactly; two
    gloo processes each read their own stream (ranks x workers split the shards)."""
    args = lambda out, steps, *a: stage1_args(toy_root, out, steps, "--train_shards", shards,  # noqa: E731
                                              "--qformer_dropout", "0", "--global_batch", "8", "--micro_batch", "8",
                                              *a)
    full = bp.main(args(tmp_path / "a", 3))
    bp.main(args(tmp_path / "b", 2))
    resumed = bp.main(args(tmp_path / "b", 3, "--resume", str(tmp_path / "b" / "checkpoint.pt")))
    assert resumed["final_loss"] == full["final_loss"] and math.isfinite(full["final_loss"])
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    os.path.join(REPO, "blip2_pformer.py")] + args(two, 2, "--device", "cpu", "--micro_batch", "4"),
                   check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    stream = torch.load(two / "checkpoint.pt", weights_only=True)["stream"]
    assert stream["n_slots"] == 2 and sorted(stream["slots"]) == [0, 1]  # one stream per rank
    assert all(pos == 4 * 2 for _, pos in stream["slots"].values())  # each rank drew its 2 x 4 samples


def test_stage2_with_retrieval_eval_trains_under_ddp(toy_root, tmp_path):
    """Stage 2 with retrieval among its evals builds the Q-Former's text parts, which no stage-2 loss uses: they
    must be frozen before DDP, or its unused-parameter check stops the second step. Its ITM re-ranked retrieval,
    rows split over the two ranks, equals one process's evaluation of the same checkpoint. The toy LLM is T5: its
    prefix/suffix cuts are each sample's, so the 2 processes' losses are one process's at the same global batch.
    (From a 1-step stage 1: retrieval reads the ITC/ITM heads, which stage 2 freezes; without --init it is refused,
    test_eval_of_a_plain_stage1_checkpoint_refuses_...)"""
    bp.main(["--stage", "1", "--max_steps", "1", "--global_batch", "8", "--micro_batch", "8", "--eval_tasks", "",
             "--report", "false"] + common_args(toy_root, tmp_path / "s1"))
    base = ["--stage", "2", "--max_steps", "3", "--global_batch", "8", "--micro_batch", "4", "--warmup_steps", "1",
            "--device", "cpu", "--eval_tasks", "retrieval", "--k_test", "3", "--init", str(tmp_path / "s1" /
                                                                                           "checkpoint.pt")]
    args = base + common_args(toy_root, tmp_path) + ["--eval_max", "8"]  # after common_args' --eval_max: it wins
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(REPO, "blip2_pformer.py")] + args, env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3 and any(k.startswith("qformer.itm_head") for k in ck["model"])
    two = json.load(open(tmp_path / "metrics.json"))  # the ITM re-ranking's rows split over the two ranks
    one = bp.main(["--stage", "eval", "--init", str(tmp_path / "checkpoint.pt"), "--eval_tasks", "retrieval",
                   "--k_test", "3", "--report", "false"] + common_args(toy_root, tmp_path / "one")
                  + ["--eval_max", "8"])
    assert "itc_r_mean" in one and {k: two[k] for k in one} == pytest.approx(one, abs=1e-6)
    single = bp.main(base + common_args(toy_root, tmp_path / "single") +  # the global batch in one micro batch
                     ["--eval_max", "8", "--report", "false", "--micro_batch", "8"])
    assert single["final_loss"] == pytest.approx(two["final_loss"], rel=1e-4, abs=1e-5)


def test_non_finite_loss_stops_with_step_and_terms(toy_root, tmp_path):
    from common.train import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match=r"step \d+: itc=.*itm=.*itg="):
        bp.main(stage1_args(toy_root, tmp_path, 20, "--lr", "1e4", "--warmup_steps", "0", "--save_every", "1"))
    last_good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    logged = metrics_log(tmp_path)
    assert last_good["step"] == logged[-1]["step"] < 20  # nothing saved for the failing step
    assert all(torch.isfinite(v).all() for v in last_good["model"].values())


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: stamped, checked before use; bad images counted once per image; resume config; first toy run
# ---------------------------------------------------------------------------------------------------------------

def test_checkpoints_are_stamped_and_checked(pipeline, toy_root, tmp_path):
    from common.checkpoint import CheckpointMismatch
    kinds = {"0": "stage 0", "1": "stage 1", "2": "stage 2", "cap": "caption"}
    for name, kind in kinds.items():
        ck = torch.load(pipeline[name][1] / "checkpoint.pt", weights_only=True)
        assert (ck["script"], ck["kind"]) == ("blip2_pformer", kind)
    s0, s1 = (str(pipeline[k][1] / "checkpoint.pt") for k in ("0t5", "1"))
    args = lambda *a: stage1_args(toy_root, tmp_path, 1, *a)  # noqa: E731
    # another script's checkpoint: before, 0 of its tensors loaded and stage 2 trained from scratch
    other = tmp_path / "imagechat.pt"
    torch.save({"script": "imagechat_warmup", "kind": "finetune", "model": {"w": torch.zeros(2)},
                "config": {"tasks": "all"}}, other)
    with pytest.raises(CheckpointMismatch, match=r"--init .*imagechat_warmup finetune checkpoint"):
        bp.main(args("--stage", "2", "--init", str(other)))
    with pytest.raises(CheckpointMismatch, match="stage 0 checkpoint"):  # a P-Former is no --init
        bp.main(args("--stage", "2", "--init", s0))
    with pytest.raises(CheckpointMismatch, match=r"--pformer_ckpt .*stage 1 checkpoint"):
        bp.main(args("--pformer_ckpt", s1))
    # this script's stamp on weights of something else: refused because (almost) nothing loads
    ck = torch.load(s1, weights_only=True)
    ck["model"] = {"other." + k: v for k, v in ck["model"].items()}
    torch.save(ck, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointMismatch, match=r"only 0 of \d+ tensors"):
        bp.main(args("--stage", "2", "--init", str(tmp_path / "renamed.pt")))
    # an unstamped checkpoint of this script still loads, its kind read from its config
    ck = torch.load(s1, weights_only=True)
    del ck["script"], ck["kind"]
    torch.save(ck, tmp_path / "old.pt")
    m = bp.main(["--stage", "eval", "--init", str(tmp_path / "old.pt"), "--eval_tasks", "retrieval"]
                + common_args(toy_root, tmp_path / "ev") + ["--eval_max", "50"])
    assert m["r_mean"] == pytest.approx(pipeline["1"][0]["r_mean"])


def corrupt_world(toy_root, root, n_images, n_bad):
    """A pairs file of `n_images` toy images (5 captions each) of which the first `n_bad` are corrupt."""
    import shutil
    with open(os.path.join(toy_root, "pairs_train.jsonl")) as f:
        recs = [json.loads(line) for line in f.readlines()[:n_images]]
    (root / "images").mkdir(parents=True)
    for i, r in enumerate(recs):
        dst = root / "images" / os.path.basename(r["image"])
        if i < n_bad:
            dst.write_bytes(b"not a png")
        else:
            shutil.copy(os.path.join(toy_root, r["image"]), dst)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return ["--train_file", str(root / "pairs.jsonl"), "--image_root", str(root)]


def test_bad_images_counted_once_per_image(toy_root, tmp_path, capsys):
    from common.data import DataError
    # 1 corrupt image of 34 (3%), 5 captions each: before, each draw of its captions counted again (up to 15
    # per epoch), and max_bad_frac 0.05 aborted the run; DataLoader workers must report their counts too
    files = corrupt_world(toy_root, tmp_path / "w3", 34, 1)
    m = bp.main(stage1_args(toy_root, tmp_path / "r3", 10, "--epochs", "2", *files, "--num_workers", "2"))
    assert "final_loss" in m
    assert "training images: 1 of 34 images unreadable" in capsys.readouterr().out
    files = corrupt_world(toy_root, tmp_path / "w20", 34, 7)  # 20%: stops with one line naming the root
    with pytest.raises(DataError, match="too many unreadable images under") as e:
        bp.main(stage1_args(toy_root, tmp_path / "r20", 10, "--epochs", "2", *files))
    assert "\n" not in str(e.value)
    files = corrupt_world(toy_root, tmp_path / "w100", 12, 12)  # no readable image, found by a worker
    with pytest.raises(DataError, match="no readable image under") as e:
        bp.main(stage1_args(toy_root, tmp_path / "r100", 2, *files, "--num_workers", "1"))
    assert "\n" not in str(e.value)


def test_resume_checks_config_and_logs_each_step_once(pipeline, toy_root, tmp_path):
    import shutil
    from common.checkpoint import CheckpointMismatch
    run = tmp_path / "run"
    bp.main(stage1_args(toy_root, run, 1))
    shutil.copy(run / "checkpoint.pt", tmp_path / "step1.pt")
    bp.main(stage1_args(toy_root, run, 3, "--resume", str(run / "checkpoint.pt")))
    # as after a kill at step 3 with the step-1 checkpoint: steps 2 and 3 are logged again, once each
    again = bp.main(stage1_args(toy_root, run, 3, "--resume", str(tmp_path / "step1.pt")))
    steps = [r["step"] for r in metrics_log(run) if "loss" in r]
    assert steps == [1, 2, 3] and again["final_loss"] == metrics_log(run)[-1]["loss"]
    with pytest.raises(CheckpointMismatch, match=r"lr .*-> 0\.005.*--resume_changes"):
        bp.main(stage1_args(toy_root, run, 2, "--lr", "5e-3", "--resume", str(tmp_path / "step1.pt")))
    # --epochs sets lavis_lr's per-epoch cosine: a changed one reshapes the schedule (--max_steps only stops early)
    with pytest.raises(CheckpointMismatch, match=r"epochs 1 -> 2.*--resume_changes"):
        bp.main(stage1_args(toy_root, run, 2, "--epochs", "2", "--resume", str(tmp_path / "step1.pt")))
    bp.main(stage1_args(toy_root, run, 2, "--lr", "5e-3", "--epochs", "2", "--resume", str(tmp_path / "step1.pt"),
                        "--resume_changes", "true"))
    with pytest.raises(CheckpointMismatch, match="stage 1 checkpoint"):  # a stage-2 run resumes stage 2 only
        bp.main(stage1_args(toy_root, tmp_path / "s2", 2, "--stage", "2", "--resume", str(tmp_path / "step1.pt")))


def test_caption_resume_must_keep_the_settings_of_the_val_captions_that_pick_best_pt(pipeline, toy_root, tmp_path):
    """At --stage caption the epoch-end val captions (decoding, eval_tasks, eval_max) pick best.pt (LAVIS
    runner_base.py): a resume that changes them needs --resume_changes; at stage 2 they only change the final
    evaluation and stay free (both runs resume at their last step: nothing is trained again)."""
    from common.checkpoint import CheckpointMismatch
    root = pipeline["cap"][1].parent
    ck = lambda name: str(root / name / "checkpoint.pt")  # noqa: E731
    same = ["--pformer_ckpt", ck("s0t5"), "--train_file", str(root / "pairs_small.jsonl"), "--epochs", "100",
            "--lr", "1e-3", "--report", "false", "--val_file", os.path.join(toy_root, "pairs_val.jsonl")]
    same += common_args(toy_root, tmp_path / "run")  # (the eval files given: --eval_tasks '' keeps them)
    cap = same + ["--stage", "caption", "--max_steps", "24", "--global_batch", "16", "--micro_batch", "16",
                  "--warmup_steps", "1", "--init", ck("s2"), "--eval_max", "4", "--resume", ck("cap")]
    for change, saved in ((("--num_beams", "2"), "3"), (("--eval_tasks", ""), "'caption'"),
                          (("--min_length", "9"), "0"), (("--eval_max", "3"), "4")):
        with pytest.raises(CheckpointMismatch, match=rf"config: {change[0][2:]} {saved} -> [^,]* \(an exact"):
            bp.main(cap + list(change))
    s2 = same + ["--stage", "2", "--max_steps", "12", "--global_batch", "16", "--micro_batch", "8",
                 "--warmup_steps", "2", "--init", ck("s1"), "--eval_max", "6", "--resume", ck("s2"),
                 "--vqa_file", os.path.join(toy_root, "vqa_val.jsonl")]
    assert bp.main(s2 + ["--num_beams", "2", "--eval_tasks", ""]) == {}


def test_toy_files_name_only_the_backbones_a_stage_reads():
    from common.config import parse_config
    cfg = lambda *a: bp.resolve_config(parse_config(bp.Config, bp.PRESETS, list(a)))  # noqa: E731
    assert bp.toy_files(cfg("--stage", "0"))[1] == ["bert", "t5"]
    assert bp.toy_files(cfg("--stage", "1"))[1] == ["blip2_vision", "bert"]
    assert bp.toy_files(cfg("--stage", "1", "--pformer_ckpt", "s0.pt"))[1] == ["blip2_vision", "bert"]
    assert bp.toy_files(cfg("--stage", "2", "--llm_path", "data/toy/models/opt"))[1] == [
        "blip2_vision", "bert", "opt"]
    assert bp.toy_files(cfg("--stage", "eval", "--eval_tasks", "retrieval"))[1] == ["blip2_vision", "bert"]


def test_first_stage1_run_builds_only_its_backbones_quietly(toy_root, tmp_path):
    """`python blip2_pformer.py --stage 1` on a world without the LLMs: it neither builds nor reads them, and
    its console has no transformers load report (BERT loaded as the class it was saved as) nor warning about
    image processors."""
    import shutil
    world = tmp_path / "world"
    shutil.copytree(toy_root, world, ignore=lambda d, names: [n for n in names if n in ("gpt2", "opt", "t5")])
    out = subprocess.run([sys.executable, os.path.join(REPO, "blip2_pformer.py"), "--stage", "1", "--toy_root",
                          str(world), "--max_steps", "1", "--global_batch", "8", "--micro_batch", "8",
                          "--num_workers", "0", "--eval_tasks", "", "--out_dir", str(tmp_path / "run")],
                         cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-2000:]
    assert sorted(os.listdir(world / "models")) == ["bert", "blip2_vision", "clip"]
    assert "LOAD REPORT" not in log and "UNEXPECTED" not in log and "torchvision" not in log, log[-2000:]
