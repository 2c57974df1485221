"""Tests for common/: attention, config, checkpoint resume, distributed gather, readers, transforms, utils."""
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common import amp, attention, checkpoint, config, data, dist, image, log, train


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_sdpa_matches_math(causal, mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
        mask[..., 0] = True  # keep every row attendable under the causal mask too
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 1, 6, generator=g)
    a = attention.attention(q, k, v, mask, causal)
    b = attention.attention_math(q, k, v, mask, causal)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_fully_masked_row_is_finite_and_cross_lengths():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    mask = torch.ones(1, 1, 4, 7, dtype=torch.bool)
    mask[0, 0, 2] = False  # a query that may attend to nothing
    out = attention.attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention.attention_math(q, k, v, mask), atol=1e-5, rtol=1e-5)
    # causal with Lq < Lk aligns to the end of the keys (decoding with a cache)
    torch.testing.assert_close(attention.attention(q, k, v, causal=True), attention.attention_math(q, k, v, causal=True),
                               atol=1e-5, rtol=1e-5)
    # bool mask + causal together: every masked position has zero weight
    m = torch.ones(1, 1, 4, 7, dtype=torch.bool)
    m[..., 0] = False
    out = attention.attention(q, k, v, m, causal=True)
    v2 = v.clone()
    v2[:, :, 0] += 100.0  # changing a masked key's value must not change the output
    torch.testing.assert_close(out, attention.attention(q, k, v2, m, causal=True))


# ---------------------------------------------------------------- config
@dataclass
class _Cfg:
    preset: str = "toy"
    lr: float = 1e-3
    steps: int = 10
    flag: bool = False
    name: str = "x"
    ks: list[int] = field(default_factory=lambda: [1, 5])
    opt: Optional[str] = None


_PRESETS = {"toy": {}, "paper": {"lr": 1e-4, "steps": 1000, "flag": True}}


def test_config_presets_and_overrides(tmp_path):
    c = config.parse_config(_Cfg, _PRESETS, [])
    assert (c.lr, c.steps, c.flag, c.ks, c.opt) == (1e-3, 10, False, [1, 5], None)
    c = config.parse_config(_Cfg, _PRESETS, ["--preset", "paper", "--steps", "7", "--ks", "1,2", "--opt", "adam"])
    assert (c.preset, c.lr, c.steps, c.flag, c.ks, c.opt) == ("paper", 1e-4, 7, True, [1, 2], "adam")
    c = config.parse_config(_Cfg, _PRESETS, ["--flag", "false", "--preset", "paper"])
    assert c.flag is False
    saved = config.save_config(c, str(tmp_path))
    assert json.load(open(tmp_path / "config.json")) == saved and saved["steps"] == 1000


@pytest.mark.parametrize("argv", [["--bogus", "1"], ["--flag", "maybe"], ["--steps", "x"], ["--preset", "nope"]])
def test_config_rejects_bad_input(argv):
    with pytest.raises(SystemExit):
        config.parse_config(_Cfg, _PRESETS, argv)


@pytest.mark.parametrize("argv, said", [(["--steps", "x"], "--steps: invalid int value: 'x'"),
                                        (["--ks", "1,b"], "--ks: invalid comma-separated int value: '1,b'"),
                                        (["--maybe_lr", "fast"], "--maybe_lr: invalid float (or none) value")])
def test_config_error_names_the_expected_type(argv, said, capsys):
    @dataclass
    class C(_Cfg):
        maybe_lr: Optional[float] = None
    with pytest.raises(SystemExit):
        config.parse_config(C, _PRESETS, argv)
    assert said in capsys.readouterr().err  # not "invalid <lambda> value"


# ---------------------------------------------------------------- checkpoint: exact resume
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 16), torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.b(F.dropout(torch.relu(self.a(x)), 0.3, self.training))


def _train(model, opt, start, stop, losses):
    for step in range(start, stop):
        x = torch.randn(8, 4)  # data and dropout both draw from the global RNG
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())


def test_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    ref = _Net()
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    full = []
    _train(ref, opt, 0, 10, full)

    torch.manual_seed(0)
    m = _Net()
    m.load_state_dict(init)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    part = []
    _train(m, opt, 0, 5, part)
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, {"model": m.state_dict(), "opt": opt.state_dict(), "step": 5,
                                      "rng": checkpoint.rng_state()})
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # the temp file was renamed away

    torch.manual_seed(123)  # a fresh process would have other RNG state
    state = checkpoint.load_checkpoint(path)
    m2 = _Net()
    m2.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    opt2.load_state_dict(state["opt"])
    checkpoint.set_rng_state(state["rng"])
    _train(m2, opt2, state["step"], 10, part)
    assert part == full
    for k, v in ref.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": _Net()}, path)  # a whole pickled module is not weights-only data
    import pickle
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # refused, not missing or broken
        checkpoint.load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint.load_checkpoint(str(tmp_path / "none.pt"))


# ---------------------------------------------------------------- distributed: gather with gradient
def _clip_loss(img, txt, scale=10.0):
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    img, txt = dist.all_gather_with_grad(img), dist.all_gather_with_grad(txt)  # (world*B, D)
    logits = scale * img @ txt.t()
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _make_model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    x_img, x_txt = torch.randn(8, 6), torch.randn(8, 6)
    return model, x_img, x_txt


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    d = dist.setup_distributed("cpu")
    model, x_img, x_txt = _make_model_and_data()
    ddp = dist.wrap_ddp(model, d)
    per = x_img.shape[0] // world
    sl = slice(d.rank * per, (d.rank + 1) * per)
    loss = _clip_loss(ddp(x_img[sl]), ddp(x_txt[sl]))
    loss.backward()
    gathered = dist.all_gather_object(dist.shard_indices(10, d))
    if d.is_main:
        torch.save({"grad": model.weight.grad, "loss": loss.detach(), "shards": gathered,
                    "mean": dist.all_reduce_mean(torch.tensor([float(d.rank)]))}, os.path.join(out_dir, "r0.pt"))
    else:
        dist.all_reduce_mean(torch.tensor([float(d.rank)]))
    dist.cleanup_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gather_matches_one_process(tmp_path, spawn):
    model, x_img, x_txt = _make_model_and_data()
    ref_loss = _clip_loss(model(x_img), model(x_txt))
    ref_loss.backward()
    spawn(_worker, args=(2, _free_port(), str(tmp_path)))
    r0 = torch.load(tmp_path / "r0.pt", weights_only=True)
    torch.testing.assert_close(r0["loss"], ref_loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r0["grad"], model.weight.grad, atol=1e-6, rtol=1e-5)
    assert sorted(sum(r0["shards"], [])) == list(range(10))  # eval shards cover every index once
    assert r0["mean"].item() == 0.5


def _ddp_flags_worker(rank, world, port, out_dir):
    """Both ways wrap_ddp keeps buffers off the per-forward broadcast (torch's forward_sync_buffers,
    or broadcast_buffers plus its own start-up broadcast): flags, buffer values, two SGD steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    d = dist.setup_distributed("cpu")
    out = {}
    for forward_sync in sorted({dist._FORWARD_SYNC, False}):
        dist._FORWARD_SYNC = forward_sync
        model, x_img, x_txt = _make_model_and_data()
        model.register_buffer("queue", torch.full((3,), float(rank + 1)))  # differs per rank
        ddp = dist.wrap_ddp(model, d)
        res = {"bucket_view": ddp.gradient_as_bucket_view, "queue_at_wrap": model.queue.clone(),
               "syncs_buffers": ddp.will_sync_module_buffers()}
        model.queue.fill_(10.0 * (rank + 1))  # a rank-local update, as dlip's enqueue
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        per = x_img.shape[0] // world
        sl = slice(d.rank * per, (d.rank + 1) * per)
        for _ in range(2):
            _clip_loss(ddp(x_img[sl]), ddp(x_txt[sl])).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[forward_sync] = dict(res, queue_after=model.queue.clone(),
                                 weight=model.weight.detach().clone())
    gathered = dist.all_gather_object(out)
    if d.is_main:
        torch.save(gathered, os.path.join(out_dir, "flags.pt"))
    dist.cleanup_distributed()


def test_wrap_ddp_bucket_view_and_no_per_step_buffer_broadcast(tmp_path, spawn):
    model, x_img, x_txt = _make_model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(2):
        _clip_loss(model(x_img), model(x_txt)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    spawn(_ddp_flags_worker, args=(2, _free_port(), str(tmp_path)))
    ranks = torch.load(tmp_path / "flags.pt", weights_only=True)
    assert set(ranks[0]) == ({True, False} if dist._FORWARD_SYNC else {False})  # both paths ran
    for r, out in enumerate(ranks):
        for res in out.values():
            assert res["bucket_view"] and not res["syncs_buffers"]
            assert torch.equal(res["queue_at_wrap"], torch.ones(3))  # rank 0's, once, at the start
            # each rank's own update survives the steps: no per-forward broadcast
            assert torch.equal(res["queue_after"], torch.full((3,), 10.0 * (r + 1)))
            torch.testing.assert_close(res["weight"], model.weight.detach(), atol=1e-6, rtol=1e-5)


def _same_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.setup_distributed("cpu")
    import logging

    from common.checkpoint import save_checkpoint
    from data.imagechat import selected_weights

    def error(fn):  # what fn raised, as text
        try:
            return fn()
        except RuntimeError as e:
            return str(e)
    log = logging.getLogger("same_on_every_rank")
    shared, own = os.path.join(out_dir, "shared"), os.path.join(out_dir, f"own{rank}")  # own0 holds best.pt
    if rank == 0:
        for d in (shared, own):
            save_checkpoint(os.path.join(d, "best.pt"), {"model": {"w": torch.ones(1)}, "best": 0.5, "step": 7})
    dist.barrier()
    out = {"agreed": dist.same_on_every_rank(3, "three"), "shared": selected_weights(0.5, shared, None, log),
           "own": error(lambda: selected_weights(0.5, own, None, log)),
           "value": error(lambda: dist.same_on_every_rank(rank, "the rank"))}
    torch.save(out, os.path.join(out_dir, f"same{rank}.pt"))
    dist.cleanup_distributed()


def test_a_rank_that_finds_another_best_pt_stops_every_rank(tmp_path, spawn):
    """A final test sharded over ranks that do not share --out_dir (rank 1 finds no best.pt where rank 0 finds
    it) would mix the selected and the last weights: every rank raises instead (Image-Chat's selection here;
    blip2, dlip, negclip and perceiver check their best.pt's step the same way)."""
    spawn(_same_worker, args=(2, _free_port(), str(tmp_path)))
    for r in (0, 1):
        out = torch.load(tmp_path / f"same{r}.pt")
        assert out["agreed"] == 3 and torch.equal(out["shared"]["w"], torch.ones(1))
        assert "the step of the final test's best.pt differs between ranks (7, None)" in out["own"]
        assert "shared filesystem" in out["own"] and "the rank differs between ranks (0, 1)" in out["value"]


def test_single_process_fallback():
    d = dist.setup_distributed("cpu")
    assert (d.rank, d.world_size, d.is_main) == (0, 1, True)
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_with_grad(x) is x and dist.wrap_ddp(torch.nn.Linear(2, 2), d).__class__ is torch.nn.Linear
    assert dist.shard_indices(5, d) == list(range(5))


def _fetch_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.setup_distributed("cpu")
    torch.manual_seed(0)
    x_all, w = torch.randn(6, 2, 3), torch.randn(2, 3)  # 3 rows per rank
    wanted = torch.tensor([[4, 0, 5, 3], [1, 2, 2, 0]])  # global rows each rank asks for: rank 1 wants only rank 0's
    x = x_all[3 * rank:3 * rank + 3].clone().requires_grad_()
    got = dist.fetch_rows(x, wanted.flatten())
    ref_x = dist.all_gather_with_grad(x)  # the old way: everything, then index
    mine = [g for g in wanted[rank].tolist() if g // 3 != rank]
    ((got * w).sum() * (rank + 1)).backward()
    g_new = x.grad.clone()
    x.grad = None
    ((ref_x[mine] * w).sum() * (rank + 1)).backward()
    ids, mask = torch.full((2, 3 + 2 * rank), 7), torch.ones(2, 3 + 2 * rank, dtype=torch.long)  # L = 3 | 5
    ids, mask = dist.pad_across_ranks(ids, mask, pad_id=0)
    torch.save({"got": got.detach(), "ref": ref_x[mine].detach(), "g_new": g_new, "g_ref": x.grad,
                "ids": ids, "mask": mask}, os.path.join(out_dir, f"fetch{rank}.pt"))
    dist.cleanup_distributed()


def test_fetch_rows_and_pad_across_ranks(tmp_path, spawn):
    """blip2's ITM negatives from other ranks: point to point, the same rows and gradients as all-gathering the
    whole batch and indexing it (rank 1 wants 4 rows of rank 0; rank 0 wants 3 of rank 1 and reads 1 itself).
    Texts of 3 and 5 tokens on the two ranks are padded to 5 on both."""
    spawn(_fetch_worker, args=(2, _free_port(), str(tmp_path)))
    for r, n in ((0, 3), (1, 4)):
        out = torch.load(tmp_path / f"fetch{r}.pt")
        assert out["got"].shape == (n, 2, 3) and torch.equal(out["got"], out["ref"])
        assert torch.allclose(out["g_new"], out["g_ref"], atol=1e-6) and out["g_new"].abs().sum() > 0
        # texts padded to each rank's longest -> to the longest over ranks (ITM gathers the ids)
        assert out["ids"].shape == out["mask"].shape == (2, 5)
        assert out["ids"][:, 3 + 2 * r:].eq(0).all() and out["mask"].sum() == 2 * (3 + 2 * r)


# ---------------------------------------------------------------- amp
def test_pick_dtype_on_cpu():
    assert amp.pick_dtype("cpu") == torch.float32
    assert amp.pick_dtype("cpu", "bf16") == torch.bfloat16
    assert not amp.make_scaler(torch.bfloat16).is_enabled()
    with pytest.raises(ValueError):
        amp.pick_dtype("cpu", "int8")
    with amp.autocast("cpu", torch.bfloat16):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16


@pytest.fixture
def tf32_flags():
    """pick_dtype on a (faked) CUDA device sets torch's global TF32 flags: put them back after."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def test_tf32_enabled_on_cuda_only(monkeypatch, tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for precision in ("auto", "fp32", "bf16"):
        amp.pick_dtype("cpu", precision)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp.pick_dtype("cuda:0", "fp32") == torch.float32
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with amp.fp32("cpu"):  # contrastive logits: true fp32, no TF32 inside the block, restored after it
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.is_autocast_enabled("cpu")
    assert torch.backends.cuda.matmul.allow_tf32


# ---------------------------------------------------------------- images
def test_image_transforms_and_loading(tmp_path):
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = (255, 0, 0)  # left half red, right half black
    Image.fromarray(arr).save(tmp_path / "a.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    img = image.load_image(tmp_path / "a.png")
    assert image.load_image(tmp_path / "bad.jpg") is None and image.load_image(tmp_path / "missing.png") is None
    x = image.ImageTransform(32)(img)
    assert x.shape == (3, 32, 32)
    # centre crop of the 80x40 image resized to 64x32 keeps the middle: left columns red, right columns black
    red = (1.0 - image.CLIP_MEAN[0]) / image.CLIP_STD[0]
    black = (0.0 - image.CLIP_MEAN[0]) / image.CLIP_STD[0]
    assert abs(x[0, :, 0].mean().item() - red) < 1e-3 and abs(x[0, :, -1].mean().item() - black) < 1e-3
    import random
    t = image.ImageTransform(16, train=True, hflip=True, rng=random.Random(0))
    outs = [t(img) for _ in range(8)]
    assert all(o.shape == (3, 16, 16) for o in outs) and len({o.sum().item() for o in outs}) > 1


def test_square_eval_uint8_path_randaugment_and_load(tmp_path):
    import random
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # the left quarter red: a centre crop loses it, BLIP's square resize keeps it
    img = Image.fromarray(arr)
    red = (1.0 - image.CLIP_MEAN[0]) / image.CLIP_STD[0]
    sq, crop = image.ImageTransform(32, resize="square")(img), image.ImageTransform(32)(img)
    assert abs(sq[0, :, 0].mean().item() - red) < 1e-3 and abs(crop[0, :, 0].mean().item() - red) > 1
    with pytest.raises(ValueError, match="resize"):
        image.ImageTransform(32, resize="centre")
    # uint8 + normalize on the device gives the float path's values, for eval and for a seeded training draw
    for kw in ({}, {"resize": "square"}, {"train": True, "hflip": True, "randaug": True}):
        f = image.ImageTransform(24, rng=random.Random(3), **kw)(img)
        t = image.ImageTransform(24, rng=random.Random(3), uint8=True, **kw)
        u = t(img)
        assert u.dtype == torch.uint8 and u.shape == (3, 24, 24) and torch.equal(t.normalize(u[None])[0], f)
    # BLIP's RandomAugment(2, 5): seeded by the sample's rng, geometry kept, and it does change images
    noisy = Image.fromarray((np.random.RandomState(0).rand(24, 24, 3) * 255).astype(np.uint8))
    outs = [np.asarray(image.rand_augment(noisy, random.Random(i))) for i in range(12)]
    assert all(o.shape == (24, 24, 3) for o in outs)
    assert np.array_equal(outs[0], np.asarray(image.rand_augment(noisy, random.Random(0))))
    assert sum(not np.array_equal(o, np.asarray(noisy)) for o in outs) >= 4
    big = Image.fromarray((np.random.RandomState(1).rand(480, 640, 3) * 255).astype(np.uint8))
    big.save(tmp_path / "big.jpg", quality=90)
    assert image.load_image(tmp_path / "big.jpg").size == (640, 480)
    ev = image.ImageTransform(224)
    assert ev.load(tmp_path / "big.jpg").shape == (3, 224, 224) and ev.load(tmp_path / "none.jpg") is None


def _photo(w, h, seed=0):
    """A smooth image with texture and edges (a pure-noise image hides resampling differences)."""
    yy, xx = np.mgrid[0:h, 0:w] / 30.0
    a = np.stack([128 + 60 * np.sin(xx * (c + 1) * 0.7 + yy * 0.5) + 40 * np.cos(yy * 1.3 * (c + 1))
                  for c in range(3)], -1) + np.random.RandomState(seed).normal(0, 6, (h, w, 3))
    a[h // 4:h // 2, w // 3:w // 2] = (250, 20, 20)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_clip_eval_geometry_is_torchvision_resize_and_center_crop():
    # torchvision Resize(224) (_compute_resized_output_size: long side int(224 * long / short), truncated, as
    # transformers' get_resize_output_image_size) + CenterCrop(224) (offset int(round(margin / 2.0)))
    tf = image.ImageTransform(224, uint8=True)
    for (w, h), resized, box in (((640, 480), (298, 224), (37, 0, 261, 224)),   # ours was 299 wide
                                 ((640, 427), (335, 224), (56, 0, 280, 224)),   # 336; 55.5 rounds to 56
                                 ((427, 640), (224, 335), (0, 56, 224, 280)),
                                 ((500, 333), (336, 224), (56, 0, 280, 224))):
        img = _photo(w, h)
        assert image.resize_short_side(img, 224).size == resized
        ref = np.asarray(img.resize(resized, Image.BICUBIC).crop(box)).transpose(2, 0, 1)
        assert torch.equal(tf(img), torch.from_numpy(ref.copy())), (w, h)


def test_transforms_decode_jpegs_in_full(tmp_path):
    # LAVIS BlipImageEvalProcessor, BLIP's and CLIP's transforms resize the fully decoded image; a 640x480
    # JPEG decoded at 1/2 DCT scale (320x240) and then resized is another image
    _photo(640, 480).save(tmp_path / "a.jpg", quality=90)
    full = Image.open(tmp_path / "a.jpg").convert("RGB")
    assert full.size == (640, 480)
    for kw in ({"resize": "square"}, {}):
        tf = image.ImageTransform(224, uint8=True, **kw)
        assert torch.equal(tf.load(tmp_path / "a.jpg"), tf(full)), kw
        assert torch.equal(data.ImageFolderLoader(str(tmp_path), tf)("a.jpg"), tf(full)), kw
    import random  # training crops too (scale 0.9-1: the old draft decoded this image at 320x240)
    tr = [image.ImageTransform(224, train=True, scale=(0.9, 1.0), rng=random.Random(5), uint8=True)
          for _ in range(2)]
    assert all(torch.equal(tr[0].load(tmp_path / "a.jpg"), tr[1](full)) for _ in range(4))


def test_random_resized_crop_fallback_is_torchvisions():
    import random
    # torchvision RandomResizedCrop.get_params: after 10 failed draws, the whole image if its aspect lies in
    # 3/4..4/3, else the central box of the whole short side at aspect 4/3 (3/4); open_clip's scale (0.9, 1.0)
    # never fits a 4/3 box into 640x427, so every view falls back
    a = np.full((427, 640, 3), 200, np.uint8)
    a[:, :96] = (255, 0, 0)  # red left 15%: the old fallback (a centre square) cut it off
    img = Image.fromarray(a)
    box = (35, 0, 604, 427)  # width round(427 * 4/3) = 569, left (640 - 569) // 2
    ref = np.asarray(img.resize((224, 224), Image.BICUBIC, box=box)).transpose(2, 0, 1)
    tf = image.ImageTransform(224, train=True, scale=(0.9, 1.0), rng=random.Random(0), uint8=True)
    for _ in range(5):
        x = tf(img)
        assert x[0, :, 0].min() > 230 and x[1, :, 0].max() < 30 and torch.equal(x, torch.from_numpy(ref.copy()))
    tall = image.random_resized_crop(img.transpose(Image.TRANSPOSE), 224, (0.9, 1.0), rng=random.Random(0))
    assert np.array_equal(np.asarray(tall), np.asarray(img.transpose(Image.TRANSPOSE).resize(
        (224, 224), Image.BICUBIC, box=(0, 35, 427, 604))))
    # 640x480 (aspect 4/3, inside the range) at area 1: the whole image, squashed to 224x224
    whole = _photo(640, 480)
    out = image.random_resized_crop(whole, 224, (1.0, 1.0), rng=random.Random(1))
    assert np.array_equal(np.asarray(out), np.asarray(whole.resize((224, 224), Image.BICUBIC)))


class _Items(torch.utils.data.Dataset):
    def __getitem__(self, i):
        return {"x": torch.full((2,), float(i)), "pid": os.getpid()}

    def __len__(self):
        return 100


def test_make_loader_splits_micro_batches_over_workers():
    """workers > 1: each micro batch is loaded by all workers side by side and comes out as the same batch,
    in order, as with one process."""
    batches = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3]]
    collate = lambda items: torch.stack([it["x"] for it in items])  # noqa: E731
    ref = list(data.make_loader(_Items(), batches, collate, workers=0))
    loader = data.make_loader(_Items(), batches, lambda items: items, workers=2)
    got = list(loader)
    assert len(loader) == 3 and len(got) == 3
    assert all(torch.equal(collate(g), r) for g, r in zip(got, ref))
    assert len({it["pid"] for it in got[0]}) == 2  # the 7 samples of the first batch came from 2 workers


def test_run_bench_reports_data_and_step_time_apart():
    import time
    calls = []
    lin = torch.nn.Linear(4, 2)

    def data_fn():
        time.sleep(0.02)
        calls.append(1)
        return torch.randn(3, 4)

    out = train.run_bench(lambda b: lin(b), n=3, samples_per_step=3, device="cpu", warmup=1, data_fn=data_fn)
    assert len(calls) == 4 and out["ms_data"] >= 20 and out["ms_step"] > 0
    assert out["samples_s"] < out["samples_s_step"]  # end to end includes the loader's 20 ms


def test_image_folder_loader_counts_bad(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    loader = data.ImageFolderLoader(str(tmp_path), image.ImageTransform(8), max_bad_frac=0.4)
    assert loader("ok.png").shape == (3, 8, 8) and loader("bad.png") is None
    assert "1 of 2" in loader.report()
    loader.check()  # fewer than min_tried images: not yet
    with pytest.raises(data.DataError, match="too many unreadable"):
        loader.check(final=True)
    batch = data.collate_skip_none([torch.ones(2), None, torch.zeros(2)])
    assert batch.shape == (2, 2)


# ---------------------------------------------------------------- readers
def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_readers_ok(tmp_path):
    p = _write(tmp_path / "p.jsonl", [json.dumps({"image": "a.png", "captions": ["x", "y"]})])
    assert data.read_pairs(p)[0]["captions"] == ["x", "y"]
    q = _write(tmp_path / "q.jsonl", [json.dumps({"image": "a.png", "question": "q?", "answers": ["a"] * 10,
                                                  "question_id": 1})])
    assert data.read_vqa(q)[0]["question_id"] == 1
    (tmp_path / "clip1").mkdir()
    for k in (2, 0, 1):
        Image.new("RGB", (4, 4)).save(tmp_path / "clip1" / f"{k}.png")
    v = _write(tmp_path / "v.jsonl", [json.dumps({"folder": "clip1", "captions": ["moves"]}),
                                      json.dumps({"frames": ["a.png"], "captions": ["c"]})])
    recs = data.read_video(v)
    assert recs[0]["frames"] == [os.path.join("clip1", f"{k}.png") for k in range(3)]


@pytest.mark.parametrize("lines,msg", [
    ([json.dumps({"image": "a.png"})], r"p.jsonl:1: missing field 'captions'"),
    ([json.dumps({"image": "a", "captions": ["x"]}), "{oops"], r"p.jsonl:2: invalid JSON"),
    ([json.dumps({"image": 3, "captions": ["x"]})], r"p.jsonl:1: field 'image' should be str"),
    ([""], r"no records"),
])
def test_reader_errors_name_file_line_field(tmp_path, lines, msg):
    p = _write(tmp_path / "p.jsonl", lines)
    with pytest.raises(data.DataError, match=msg):
        data.read_pairs(p)


def test_reader_missing_file(tmp_path):
    with pytest.raises(data.DataError, match="file not found"):
        data.read_vqa(str(tmp_path / "nope.jsonl"))


def test_read_lines_holds_what_the_list_of_stripped_lines_held(tmp_path):
    """read_lines (blip2_pformer.py's stage-0 sentences): an index of line offsets instead of a Python list of every
    line; the same lines in the same order as `[s.strip() for s in open(p) if s.strip()]`: blank lines skipped, a
    last line without newline kept, "\\r\\n" and a lone "\\r" (universal newlines) end a line too."""
    import pickle
    p = tmp_path / "s.txt"
    p.write_bytes("a red circle\n\n   \n  two  words \r\nwindows\r\nold mac\rline\n\tcaf\u00e9 \u00fcber\n\nlast".encode())
    want = [s.strip() for s in open(p, encoding="utf-8") if s.strip()]
    lines = data.read_lines(str(p))
    assert list(lines) == want and len(want) == 7 and want[-1] == "last" and want[4] == "line"
    assert list(lines[2:5]) == want[2:5] and lines[-2] == want[-2] and pickle.loads(pickle.dumps(lines))[3] == want[3]
    assert lines.nbytes == 12 * len(want)  # 8-byte offset + 4-byte length a line
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(data.DataError, match="blank.txt: no lines"):
        data.read_lines(str(tmp_path / "blank.txt"))
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\n")
    with pytest.raises(data.DataError, match="bad.txt:2: not UTF-8"):
        data.read_lines(str(tmp_path / "bad.txt"))


# ---------------------------------------------------------------- train utils + logging
def test_cosine_lr_and_param_groups():
    assert train.cosine_lr(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert train.cosine_lr(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert train.cosine_lr(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert train.cosine_lr(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    m[0].bias.requires_grad_(False)
    decay, no_decay = train.param_groups(m, 0.05)
    assert [p.shape for p in decay["params"]] == [(3, 3)] and len(no_decay["params"]) == 2
    assert no_decay["weight_decay"] == 0.0


def test_check_finite_and_clip():
    train.check_finite(3, {"itc": torch.tensor(1.0)})
    with pytest.raises(train.NonFiniteLossError, match=r"step 7: itc=1.0, itm=nan"):
        train.check_finite(7, {"itc": torch.tensor(1.0), "itm": torch.tensor(float("nan"))})
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 2.0)
    assert train.clip_grad([p], 1.0) == pytest.approx(4.0) and p.grad.norm().item() == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there are global hooks")
def test_counting_flops_leaves_a_compiled_module_compiled():
    """FlopCounterMode over a compiled module's call used to leave it (and its class) eager for good."""
    graphs = []

    def backend(gm, example_inputs):  # counts the calls of each compiled graph
        def run(*args):
            graphs.append(1)
            return gm.forward(*args)
        return run
    x = torch.randn(2, 8)
    compiled = torch.compile(torch.nn.Linear(8, 8), backend=backend)
    compiled(x)
    # forward 2*2*8*8, backward the weight gradient alone (x needs none): the same again
    assert train.count_flops(lambda: compiled(x).sum().backward()) == 2 * (2 * 2 * 8 * 8)
    del graphs[:]
    compiled(x), compiled(x)
    assert len(graphs) == 2
    other = torch.compile(torch.nn.Linear(8, 8), backend=backend)
    other(x)
    assert len(graphs) == 3


def test_bench_and_flops_and_logger(tmp_path, capsys, monkeypatch):
    import types
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    assert train.count_flops(lambda: lin(x)) == 2 * 4 * 16 * 8
    now = [0.0]  # a fake clock: each step takes 0.5 s, so 4 samples a step run at 8 samples/s

    def step():
        now[0] += 0.5
        return lin(x)
    with monkeypatch.context() as m:
        m.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
        out = train.run_bench(step, n=3, samples_per_step=4, device="cpu", warmup=1)
    assert out == {"bench_steps": 3, "ms_step": 500.0, "samples_s": 8.0}  # no mfu on a CPU
    assert "bench | bench_steps 3 | ms_step 500 | samples_s 8" in capsys.readouterr().out
    lg = log.Logger(str(tmp_path), is_main=True)
    lg.log(5, loss=torch.tensor(1.5), lr=1e-3)
    assert "step 5 | loss 1.5 | lr 0.001" in capsys.readouterr().out
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["step"] == 5 and rec["loss"] == 1.5
    log.Logger(str(tmp_path / "other"), is_main=False).log(1, loss=1.0)
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------- reliability (bad input, files, resume)
def test_image_folder_loader_counts_each_image_once(tmp_path):
    """The one bad-image rule: a bad image drawn 15 times is one bad image, so 1 bad of 34 (3%) passes
    max_bad_frac 0.05 however often it is drawn; 20% bad stops the run, naming the count."""
    for i in range(33):
        Image.new("RGB", (8, 8)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    loader = data.ImageFolderLoader(str(tmp_path), image.ImageTransform(8), max_bad_frac=0.05)
    for epoch in range(15):
        for i in range(33):
            loader(f"ok{i}.png")
        assert loader("bad.png") is None
        loader.check()
    assert (loader.tried, loader.bad) == (34, 1) and "1 of 34" in loader.report()
    for i in range(8):
        (tmp_path / f"bad{i}.png").write_bytes(b"junk")
    merged = data.ImageFolderLoader(str(tmp_path), image.ImageTransform(8), max_bad_frac=0.05)
    merged.merge([f"ok{i}.png" for i in range(33)], [f"bad{i}.png" for i in range(8)])  # a worker's counts
    with pytest.raises(data.DataError, match=r"8 of 41 images unreadable"):
        merged.check()
    few = data.ImageFolderLoader(str(tmp_path), image.ImageTransform(8), max_bad_frac=0.05, min_tried=20)
    few("bad.png")
    few.check()  # one early bad file does not stop a run ...
    with pytest.raises(data.DataError):
        few.check(final=True)  # ... but a set with nothing readable does


def test_high_bit_depth_images_load_at_8_bits_and_8_bit_ones_as_before(tmp_path):
    """PIL's convert("RGB") clips 16/32-bit grey values at 255: a 16-bit PNG would come back almost white."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")  # (Pillow 10.0 opens it as I)
    x = np.asarray(image.load_image(tmp_path / "g16.png"))
    assert x.shape == (64, 64, 3) and abs(x.mean() - 127.5) < 1 and (x == 255).mean() < 0.01
    assert np.array_equal(x[..., 0], (ramp >> 8).astype(np.uint8))  # the high byte
    big_endian = Image.frombytes("I;16B", (64, 64), ramp.astype(">u2").tobytes())
    big_endian.save(tmp_path / "g16b.tif")
    assert np.array_equal(np.asarray(image.load_image(tmp_path / "g16b.tif"))[..., 0], x[..., 0])
    as_int = Image.fromarray(ramp.astype(np.int32))  # mode I (as TIFFs and older PIL's 16-bit PNGs open)
    floats = Image.fromarray(ramp.astype(np.float32) / 65535)  # mode F in 0..1
    for im, name in ((as_int, "i.tif"), (floats, "f.tif")):
        im.save(tmp_path / name)
        y = np.asarray(image.load_image(tmp_path / name))
        assert abs(y.mean() - 127.5) < 1 and (y == 255).mean() < 0.01 and y.min() == 0, name
    # every 8-bit mode (and I/F values already in 0..255) exactly as PIL's own conversion
    rgb = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    eight = {"rgb.png": rgb, "l.png": rgb.convert("L"), "p.png": rgb.convert("P"), "la.png": rgb.convert("LA"),
             "rgba.png": rgb.convert("RGBA"), "cmyk.jpg": rgb.convert("CMYK"), "rgb.jpg": rgb,
             "i8.tif": Image.fromarray(np.asarray(rgb.convert("L")).astype(np.int32)),
             "f8.tif": Image.fromarray(np.asarray(rgb.convert("L")).astype(np.float32) + 0.4)}
    for name, im in eight.items():
        im.save(tmp_path / name)
        with Image.open(tmp_path / name) as ref:
            want = np.asarray(ref.convert("RGB"))
        assert np.array_equal(np.asarray(image.load_image(tmp_path / name)), want), name


def test_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 64x64 is now > 2x the limit: a "bomb"
    assert image.load_image(str(tmp_path / "big.png")) is None
    loader = data.ImageFolderLoader(str(tmp_path), image.ImageTransform(8))
    assert loader("big.png") is None and loader.bad == 1


def test_readers_reject_non_utf8_and_non_string_captions(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(json.dumps({"image": "a.png", "captions": ["ok"]}).encode() + b"\n"
                  + b'{"image": "b.png", "captions": ["caf\xe9"]}\n')
    with pytest.raises(data.DataError, match=r"p\.jsonl:2: not UTF-8"):
        data.read_pairs(str(p))
    q = _write(tmp_path / "q.jsonl", [json.dumps({"image": "a.png", "captions": ["ok", 3]})])
    with pytest.raises(data.DataError, match=r"q\.jsonl:1: field 'captions'\[1\] should be str, got int"):
        data.read_pairs(q)
    v = _write(tmp_path / "v.jsonl", [json.dumps({"frames": ["f.png"], "captions": [None]})])
    with pytest.raises(data.DataError, match=r"field 'captions'\[0\] should be str"):
        data.read_video(v)


def test_save_checkpoint_removes_stale_temp_files(tmp_path):
    path = tmp_path / "last.pt"
    dead = tmp_path / "last.pt.tmp.999999999"  # a save killed mid-write (pid long gone)
    dead.write_bytes(b"half a checkpoint")
    mine = tmp_path / f"last.pt.tmp.{os.getpid()}"
    mine.write_bytes(b"x")
    other = tmp_path / "other.pt.tmp.999999999"  # another checkpoint's temp file is not ours to remove
    other.write_bytes(b"x")
    checkpoint.save_checkpoint(str(path), {"step": 1})
    assert checkpoint.load_checkpoint(str(path))["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "other.pt.tmp.999999999"]

    class Boom:
        def __reduce__(self):
            raise OSError("No space left on device")
    with pytest.raises(Exception):
        checkpoint.save_checkpoint(str(path), {"step": 2, "x": Boom()})  # a failed write leaves no temp file
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "other.pt.tmp.999999999"]
    assert checkpoint.load_checkpoint(str(path))["step"] == 1


def test_checkpoint_identity_and_resume_config(tmp_path):
    ck = {"script": "imagechat_warmup", "kind": "finetune", "model": {}}
    assert checkpoint.describe(ck) == "imagechat_warmup finetune"
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=r"--init x\.pt: this is a imagechat_warmup finetune checkpoint; blip2_pformer expects "
                             r"a blip2_pformer stage 1 or stage 2 checkpoint"):
        checkpoint.expect_checkpoint(ck, "x.pt", "blip2_pformer", kinds=("stage 1", "stage 2"))
    checkpoint.expect_checkpoint({"script": "blip2_pformer", "kind": "stage 1"}, "x.pt", "blip2_pformer",
                                 kinds=("stage 1", "stage 2"))
    assert checkpoint.describe({"config": {"bridge": "xattn"}}) == "perceiver_caption (unstamped)"
    with pytest.raises(checkpoint.CheckpointMismatch, match="only 0 of 49 tensors"):
        checkpoint.check_loaded(0, 49, "x.pt", "imagechat_warmup finetune", "blip2_pformer")
    checkpoint.check_loaded(49, 49, "x.pt", "blip2_pformer stage 1", "blip2_pformer")

    saved = {"lr": 1e-4, "global_batch": 32, "out_dir": "a", "dropout": 0.1}
    assert checkpoint.check_resume_config(saved, dict(saved, out_dir="b")) == []
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"lr 0\.0001 -> 0\.001, global_batch 32 -> 64"):
        checkpoint.check_resume_config(saved, dict(saved, lr=1e-3, global_batch=64))
    said = []
    diff = checkpoint.check_resume_config(saved, dict(saved, dropout=0.0), allow=True, log=said.append)
    assert diff == [("dropout", 0.1, 0.0)] and "dropout 0.1 -> 0.0" in said[0]


def test_logger_resume_truncates_metrics(tmp_path):
    lg = log.Logger(str(tmp_path))
    for s in range(1, 7):
        lg.log(s, loss=1.0 / s)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss"')  # the line the kill cut
    lg.resumed(4)
    for s in range(5, 8):
        lg.log(s, loss=2.0)
    recs = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    steps = [r["step"] for r in recs if "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7] and [r["step"] for r in recs if r.get("event") == "resume"] == [4]


def test_step_sampler_global_batch_is_rank_and_accumulation_invariant():
    """One process and 2 ranks x 2 micro steps see the same global batch at every step; resume = the step."""
    one = data.StepSampler(50, 8, 8, world=1, rank=0, seed=3, start_step=0, total_steps=9)
    steps = list(one)
    assert len(steps) == 9 and one.steps_per_epoch == 6
    assert sorted(i for _, i in steps[0] + steps[1] + steps[2] + steps[3] + steps[4] + steps[5]) != list(range(48))
    epoch0 = [i for b in steps[:6] for _, i in b]
    assert len(set(epoch0)) == 48 and {e for b in steps[6:] for e, _ in b} == {1}  # drop_last, then epoch 1
    for world in (2, 4):
        ranks = [list(data.StepSampler(50, 8, 2, world=world, rank=r, seed=3, total_steps=9)) for r in range(world)]
        accum = 8 // (2 * world)
        for s in range(9):
            got = sorted(x for r in range(world) for m in ranks[r][s * accum:(s + 1) * accum] for x in m)
            assert got == sorted(steps[s])
    tail = list(data.StepSampler(50, 8, 8, seed=3, start_step=5, total_steps=9))
    assert tail == steps[5:]
    assert data.draw(3, 1, 17, 5) == data.draw(3, 1, 17, 5) and {data.draw(3, e, 17, 5) for e in range(30)} == set(
        range(5))
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        data.StepSampler(50, 8, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.StepSampler(5, 8, 8)


def test_fit_micro_batch_is_the_largest_divisor_of_a_processs_share():
    """The paper presets at the world sizes where StepSampler stopped them (after the models loaded): 16 ranks x
    1024 (blip2 stage 1, micro 128), 8 x 1152 (dlip, micro 288), 8 x 2016 (imagechat warm-up, micro 16); a micro
    batch that already fits is kept; a global batch that the ranks cannot share equally is an error."""
    fit = data.fit_micro_batch
    assert fit(1024, 128, 16) == 64 and fit(1152, 288, 8) == 144 and fit(2016, 16, 8) == 14
    assert fit(384, 128, 3) == 128 and fit(384, 128, 8) == 48 and fit(256, 256, 8) == 32 and fit(32, 32, 1) == 32
    assert fit(32, 32, 2) == 16 and fit(30, 8, 1) == 6  # perceiver's old clamp gave 8 here: 30 = 6 x 5
    for G, m, world in ((1024, 128, 16), (1152, 288, 8), (2016, 16, 8), (384, 128, 8), (96, 7, 4)):
        f = fit(G, m, world)
        assert f <= m and data.StepSampler(G, G, f, world).accum * f * world == G
    with pytest.raises(ValueError, match="global_batch 1024 must be a multiple of the world size 3"):
        fit(1024, 128, 3)
    with pytest.raises(ValueError, match="micro_batch must be at least 1"):
        fit(32, 0, 1)

    @dataclass
    class Run:
        global_batch: int = 1024
        micro_batch: int = 128
        warmup_batch: int = 2016
        warmup_micro: int = 16
    lines = []
    cfg = data.fit_micro(Run(), 16, lines.append)
    assert cfg.micro_batch == 64 and cfg.warmup_micro == 16 and len(lines) == 1
    assert "--micro_batch 64, not 128" in lines[0] and "--global_batch 1024" in lines[0]
    assert data.fit_micro(cfg, 16, lines.append).micro_batch == 64 and len(lines) == 1  # fits: no line
    assert data.fit_micro(Run(), 8, lines.append, "warmup_batch", "warmup_micro").warmup_micro == 14


def test_make_loader_ignores_global_rng():
    """A plain DataLoader draws its base seed from the global RNG (so a resumed run, whose global RNG was restored,
    draws something else than the unbroken run did); make_loader's loaders never touch it."""
    ds, sampler = list(range(20)), [[0, 1], [2, 3]]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert [b.tolist() for b in data.make_loader(ds, sampler, seed=1)] == [[0, 1], [2, 3]]
    assert torch.equal(torch.get_rng_state(), state)
    list(torch.utils.data.DataLoader(ds, batch_sampler=sampler))
    assert not torch.equal(torch.get_rng_state(), state)
    assert data.pre_caption("A  man (left)!  rides; a horse.", 4) == "a man left rides"


def test_optimizer_update_stops_before_a_nonfinite_step():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    (w * torch.tensor([1.0, 2.0, 2.0])).sum().backward()
    gnorm = train.optimizer_update(opt, scaler, [w], 1.0, 1, {"loss": torch.tensor(0.5)})
    assert abs(gnorm - 3.0) < 1e-6 and w.grad is None and torch.allclose(w, 1 - 0.1 * torch.tensor([1, 2, 2.]) / 3)
    before = w.detach().clone()
    (w * float("nan")).sum().backward()
    with pytest.raises(train.NonFiniteLossError, match=r"step 2: .*grad_norm=nan"):
        train.optimizer_update(opt, scaler, [w], 1.0, 2, {"loss": torch.tensor(0.5)})
    assert torch.equal(w.detach(), before)


# ---------------------------------------------------------------- multi-GPU bookkeeping (faked devices)
def test_peak_table_mfu_and_world_size(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert train.peak_flops("cuda:0") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert train.peak_flops("cuda:0") == 989e12 and train.peak_flops("cpu") is None
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert train.peak_flops("cuda:0", torch.float32) == 67e12  # fp32 is not measured against bf16's peak
        torch.backends.cuda.matmul.allow_tf32 = True
        assert train.peak_flops("cuda:0", torch.float32) == 495e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    one = train.mfu(100e12, 1.0, "cuda:0")
    assert abs(one - 100 / 989) < 1e-9
    assert abs(train.mfu(8 * 100e12, 1.0, "cuda:0", world_size=8) - one) < 1e-12  # global FLOPs over 8 GPUs


def test_bf16_only_where_it_is_not_emulated(monkeypatch, tf32_flags):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp.pick_dtype("cuda:0") == torch.float32  # V100/T4: emulated bf16 only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp.pick_dtype("cuda:0") == torch.bfloat16


def test_device_from_local_rank_with_one_gpu_per_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dist._pick_device("cuda", 3) == torch.device("cuda", 0)  # SLURM --gpus-per-task=1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert dist._pick_device("cuda", 3) == torch.device("cuda", 3)  # torchrun: every GPU visible
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="LOCAL_RANK 3 but only 2 GPUs"):
        dist._pick_device("cuda", 3)
    assert dist._pick_device("cuda:1", 0) == torch.device("cuda", 1)  # an explicit index is kept
    with pytest.raises(RuntimeError, match=r"--device cuda:2: only 2 GPUs"):
        dist._pick_device("cuda:2", 0)


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_asked_where_none_is_visible_is_named(monkeypatch, device):
    """--device cuda on a machine without a GPU: one line naming the flag, not a LOCAL_RANK riddle or torch's
    assertion at the first tensor moved."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match=rf"--device {device}: this process sees no CUDA GPU \(torch "):
        dist._pick_device(device, 0)


def test_rng_state_holds_this_device_only_and_restores_per_rank(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every visible GPU's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a: restored.append(int(s[0])))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    torch.manual_seed(1)
    states = [checkpoint.rng_state()]
    torch.manual_seed(2)
    states.append(dict(checkpoint.rng_state(), cuda=torch.tensor([9], dtype=torch.uint8)))
    a = torch.rand(3)
    checkpoint.set_rng_state(states, rank=1)
    assert torch.equal(torch.rand(3), a) and restored == [9]  # rank 1 gets rank 1's generators
    checkpoint.set_rng_state(states, rank=5)  # a rank the saving run lacked: seeded, not rank 0's copied
    checkpoint.set_rng_state(dict(states[0], cuda=[torch.tensor([4], dtype=torch.uint8)] * 8))  # old format
    assert restored == [9, 4]


def test_resume_on_more_ranks_gives_new_ranks_their_own_generators():
    """A 1-rank checkpoint resumed on 2 ranks: rank 0 continues exactly as saved; rank 1 draws its own
    dropout / masking stream (the same one at every resume from this checkpoint), not rank 0's."""
    import random
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    saved = [checkpoint.rng_state()]
    want = (torch.rand(4), random.random(), np.random.rand())

    def draws(rank):
        checkpoint.set_rng_state(saved, rank)
        return torch.rand(4), random.random(), np.random.rand()
    r0, r1, r1_again, r2 = draws(0), draws(1), draws(1), draws(2)
    assert torch.equal(r0[0], want[0]) and r0[1:] == want[1:]
    assert not torch.equal(r1[0], r0[0]) and r1[1] != r0[1] and r1[2] != r0[2]
    assert torch.equal(r1[0], r1_again[0]) and r1[1:] == r1_again[1:]
    assert not torch.equal(r2[0], r1[0]) and not torch.equal(r2[0], r0[0])


# ---------------------------------------------------------------- model size: parameters, FLOPs, throughput
def test_count_params_counts_shared_tensors_once_and_splits_trainable_from_frozen():
    emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, as a language model's output layer
    frozen = torch.nn.Linear(4, 2).requires_grad_(False)
    assert train.count_params(emb) == 40 and train.count_params([emb, head]) == 40
    assert train.count_params([emb, head, frozen]) == 50
    assert train.count_params([emb, frozen], trainable=True) == 40
    assert train.count_params([emb, frozen], trainable=False) == 10


def test_size_table_reports_params_and_flops_per_part():
    enc, dec = torch.nn.Linear(8, 4), torch.nn.Linear(4, 3)
    x = torch.randn(1, 8)
    out = train.size_table({"encoder": ([enc], None), "both": ([enc, dec], lambda: dec(enc(x)))})
    assert out == {"params_encoder": 36, "params_both": 51, "gflops_both": pytest.approx(2 * (8 * 4 + 4 * 3) / 1e9)}


def test_step_timer_measures_stop_to_stop_without_syncing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("StepTimer synchronised"))
    now = [10.0]
    timer = train.StepTimer("cuda:0", clock=lambda: now[0])
    timer.start()
    now[0] = 10.5
    assert timer.stop(8) == {"ms_step": 500.0, "samples_s": 16.0}  # the first step: from its start
    now[0] = 11.0
    timer.start()  # the 0.5 s since the last stop (data, logging) belongs to this step
    now[0] = 12.5
    assert timer.stop(8) == {"ms_step": 2000.0, "samples_s": 4.0}
    for t in (13.0, 14.0, 15.0):  # stop() at log steps only (perceiver): the mean over the steps
        now[0] = t
        timer.start()
    now[0] = 15.5
    assert timer.stop(8) == {"ms_step": 1000.0, "samples_s": 8.0}


def test_samples_per_second_runs_warmup_and_timed_calls(monkeypatch):
    """2 untimed calls, then 3 timed ones: call i takes i seconds of a fake clock, so the timed mean is
    (3 + 4 + 5) / 3 = 4 s a call and 16 samples a call run at 4 samples/s."""
    import types
    calls, now = [], [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def fn():
        calls.append(1)
        now[0] += len(calls)
    rate = train.samples_per_second(fn, 16, "cpu", n=3, warmup=2)
    assert len(calls) == 5 and rate == pytest.approx(16 / 4)


def test_given_flags_names_the_fields_set_on_the_command_line(monkeypatch):
    """What a preset's recipe or a checkpoint's saved config may not override (dlip.py --mode eval,
    perceiver_caption.py --mode test): `--key value` and `--key=value`, not values or the preset."""
    argv = ["--mode", "eval", "--image_size=384", "--num_frames", "30", "-x", 7]
    assert config.given_flags(argv) == {"mode", "image_size", "num_frames"}
    monkeypatch.setattr("sys.argv", ["dlip.py", "--max_len", "35"])
    assert config.given_flags() == {"max_len"} and config.given_flags([]) == set()


def test_fp16_scaler_is_on_where_no_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    scaler = amp.make_scaler(torch.float16)  # torch's default, cuda, is disabled here (a warning)
    assert scaler.is_enabled() and not amp.make_scaler(torch.bfloat16).is_enabled()
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    before = lin.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = lin(torch.randn(3, 4)).float().mean()  # d loss / d output: 2**16 / 6 in fp16
    scaler.scale(loss).backward()
    assert lin.weight.grad.abs().max() > 1.0  # scaled by the scaler's 2**16
    gnorm = train.optimizer_update(opt, scaler, list(lin.parameters()), 0.0, 1,
                                   {"loss": loss.detach()})
    assert 0 < gnorm < 1e3 and not torch.equal(lin.weight.detach(), before)  # unscaled, stepped


def test_fp32_output_computes_logits_in_fp32_under_autocast():
    """fp32_output: a frozen output layer's logits are fp32 under a bf16 autocast (not rounded to bf16), equal to
    the fp32 layer's; a deepcopy reads its own weight."""
    import copy
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(8, 5), torch.randn(3, 8) * 40
    amp.fp32_output(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lin(x.bfloat16())
        twin = copy.deepcopy(lin)
        with torch.no_grad():
            twin.weight.mul_(2)
        doubled = twin(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x.bfloat16().float(), lin.weight, lin.bias), rtol=0, atol=0)
    torch.testing.assert_close(doubled, F.linear(x, 2 * lin.weight, lin.bias), rtol=1e-6, atol=1e-5)


def test_set_lr_scales_each_group_by_its_lr_scale():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    train.set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, pytest.approx(0.05)]


def test_all_reduce_mean_is_a_detached_copy_on_one_process_too():
    x = torch.ones(2, requires_grad=True)
    y = dist.all_reduce_mean(x)
    assert y is not x and not y.requires_grad and torch.equal(y, x.detach())
    y += 1  # a caller's in-place update leaves the input alone
    assert torch.equal(x.detach(), torch.ones(2))


@pytest.mark.parametrize("n", [0, -1])
def test_run_bench_refuses_no_timed_steps(n):
    with pytest.raises(ValueError, match=f"--bench must be .* got {n}"):
        train.run_bench(lambda: None, n=n, samples_per_step=1, device="cpu", warmup=0)
    with pytest.raises(ValueError, match="--bench"):
        train.run_bench(lambda b: None, n=n, samples_per_step=1, device="cpu", warmup=0,
                        data_fn=lambda: 0)
