"""Image-Chat: the reader of the published split files and the two preparation stages of
imagechat_warmup.py.

Image-Chat (Shuster et al., ACL 2020, arXiv 1811.00945) as ParlAI publishes it
(parlai/tasks/image_chat/build.py downloads image_chat.tgz): `train.json`, `valid.json`,
`test.json`, each a JSON list of episodes
    {"image_hash": "<hash>", "dialog": [[style, utterance], ...],
     "candidates": [{"100": [...], "1000": [...]} per turn]}
with the images at `<image_root>/<image_hash>.jpg`, and `personalities.json`, the style names
(parlai/tasks/image_chat/agents.py reads both; `known_styles`).  `read_image_chat` reads the
split files unchanged.

Preparation (VLAW-MDM release: clip_feature_extraction.py, captioning_blip2-*.py), both resumable
and keyed by image hash, both under the project's one bad-image rule (ImageFolderLoader):
    prepare_features  CLIP embeddings of a 3x3 grid of crops per image -> <cache>/features/part_*.pt
    prepare_captions  BLIP-2 beam-search captions -> <cache>/captions.r<rank>.jsonl + captions.json
each recording the settings that made it (<cache>/features.meta.json, captions.meta.json) and refusing
to add entries of other settings (`check_cache_settings`).
`load_features` / `load_captions` read the caches back for training (`run_features`: a --use_image
false run without features reads none), `Encoded` / `load_split` tokenise a split once;
`chat_image` prepares one image as both stages do (--mode chat).
`as_trained` / `selected_weights` read back what a checkpoint says of the model and of the best weights.
`turn_scores` scores one evaluated turn as the release does; `results_rows` (the per-turn
figures) and `write_report` (<out_dir>/report.html: curves, figures, dialogues) present its runs.
"""
import json
import os
from collections import Counter
from functools import reduce

import numpy as np
import torch
import torch.nn.functional as F

from common.amp import fp32, frozen_dtype
from common.checkpoint import clean_stale_temps, save_checkpoint
from common.data import DataError, ImageFolderLoader, too_many_bad
from common.dist import all_gather_object, barrier, same_on_every_rank, shard_indices
from common.image import CLIP_MEAN, CLIP_STD, load_image, normalize
from common.log import progress
from common.metrics import dialogue_scores, expand_contractions
from common.report import Report, card, grid, table, thumb, training_plots

SPLITS = ("train", "valid", "test")


# ---- reader
def read_image_chat(path, keep_candidates=True):
    """An Image-Chat split file as published: a JSON list of {image_hash, dialog: [[style,
    utterance], ...], candidates?: [{"100": [...], "1000": [...]} per turn]}.  Errors name the file,
    the episode and the field.  An episode with an empty dialog is kept as one without turns (the
    release's readers, e.g. VLAW-MDM training_ablation.py, skip `len(dialog) < 1`): Encoded and
    all_image_hashes leave it out, Encoded counting it in its log."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of episodes, got {type(data).__name__}")
    episodes = []
    for i, ep in enumerate(data):
        where = f"{path}: episode {i}"
        if not isinstance(ep, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(ep).__name__}")
        for key in ("image_hash", "dialog"):
            if key not in ep:
                raise DataError(f"{where}: missing field '{key}'")
        if not (isinstance(ep["image_hash"], str) and ep["image_hash"].strip()):
            # str() would read a null hash as the image "None.jpg", later counted as unreadable
            raise DataError(f"{where}: field 'image_hash' should be a non-empty string, got "
                            f"{ep['image_hash']!r}")
        _check_text(ep["image_hash"], f"{where}: field 'image_hash'")
        dialog = ep["dialog"]
        if not isinstance(dialog, list):
            raise DataError(f"{where}: field 'dialog' should be a list of [style, utterance]")
        for t, turn in enumerate(dialog):
            if not (isinstance(turn, list) and len(turn) == 2
                    and all(isinstance(s, str) for s in turn)):
                raise DataError(f"{where}: field 'dialog' turn {t} should be [style, utterance]")
            for name, text in zip(("style", "utterance"), turn):
                _check_text(text, f"{where}: field 'dialog' turn {t} {name}")
        rec = {"hash": ep["image_hash"], "dialog": [tuple(t) for t in dialog],
               "candidates": None}
        if keep_candidates and ep.get("candidates") is not None:
            cands = ep["candidates"]
            if not isinstance(cands, list) or len(cands) != len(dialog):
                raise DataError(f"{where}: field 'candidates' should hold one entry per turn")
            for t, c in enumerate(cands):  # ParlAI's agents.py reads candidates[turn][num_cands]
                if c is not None and not isinstance(c, dict):
                    raise DataError(f"{where}: field 'candidates' turn {t} should be "
                                    f"{{\"100\": [...], \"1000\": [...]}}, got {type(c).__name__}")
            rec["candidates"] = cands
        episodes.append(rec)
    if not episodes:
        raise DataError(f"{path}: no episodes")
    return episodes


def _check_text(text, where):
    """A JSON \\u escape can decode to a lone UTF-16 surrogate, a str that no tokenizer takes (the
    Rust tokenizers fail far from the data with "TextInputSequence must be str"): refused here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: unpaired surrogate {text[e.start]!r} at character {e.start}: "
                        "the JSON escape names half of a character") from None


def split_path(data_dir, split):
    return os.path.join(data_dir, f"{split}.json")


def all_image_hashes(data_dir):
    """Sorted distinct image hashes of the episodes with turns in every split file present."""
    hashes, found = set(), False
    for split in SPLITS:
        if os.path.isfile(split_path(data_dir, split)):
            episodes = read_image_chat(split_path(data_dir, split), keep_candidates=False)
            found = True
            hashes.update(ep["hash"] for ep in episodes if ep["dialog"])
    if not hashes:
        raise DataError(f"{data_dir}: " + ("no episode with a turn in its split files" if found else
                                           "no Image-Chat split files (train/valid/test.json)"))
    return sorted(hashes)


# ---- caches
def feature_parts(cache_dir):
    """The part files of <cache_dir>/features, sorted (none: no features cache)."""
    folder = os.path.join(cache_dir, "features")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(n for n in names if n.endswith(".pt"))


def load_features(cache_dir):
    """All feature parts -> ({hash: row}, (N, 9, D) float32); a missing cache is an error."""
    folder, parts = os.path.join(cache_dir, "features"), feature_parts(cache_dir)
    if not parts:
        raise DataError(f"no CLIP features in {folder}: run --mode features first")
    index, rows = {}, []
    for name in parts:
        part = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
        for h, f in zip(part["hashes"], part["feats"]):
            if h not in index:  # a hash in two parts (two runs at once in one cache): the first
                index[h] = len(rows)
                rows.append(f)
    return index, torch.stack(rows).float()  # (N, 9, D)


class EveryImage(dict):
    """The feature index of a text-only run without a features cache: it holds every image hash,
    each at row 0 of a single zero row that the model (no image block) never reads, so Encoded
    keeps every episode with turns (none lacks a feature)."""

    def __contains__(self, image_hash):
        return True

    def __missing__(self, image_hash):
        return 0


def run_features(cfg, log):
    """The (index, (N, grid*grid, D) features) that training and evaluation read: load_features,
    all zeros with --blank_images.  A --use_image false run (the model has no image block) reads no
    feature, so without a features cache it takes EveryImage and one zero row instead of stopping
    for a --mode features pass it does not need (on Image-Chat ~200k images through CLIP).  D is
    still the features' width, CLIP's projection_dim (its config, no weights:
    common.hf.published_config): it sizes the unused img_proj and mrm_head, whose random
    initialisation comes before the segment embedding's (and an --untied_head's), so the model is
    the one a run with the cache builds, and their checkpoints interchange.  A run with a cache
    keeps only the episodes whose image was readable (Encoded): its counts can differ from this
    run's, which the log says."""
    if cfg.use_image or feature_parts(cfg.cache_dir):
        index, feats = load_features(cfg.cache_dir)
    else:
        index, feats = EveryImage(), unread_features(cfg)
        folder = os.path.join(cfg.cache_dir, "features")
        log.info(f"--use_image false and no CLIP features in {folder}: every episode of each "
                 "split is kept (no image to be unreadable); a run with a features cache, as every "
                 "image run, keeps only the episodes whose image was readable, so its counts can "
                 f"differ from these (feature width {feats.shape[-1]}: --clip's projection_dim, "
                 f"{cfg.clip})")
    if cfg.blank_images:
        feats.zero_()
    return index, feats


def unread_features(cfg):
    """(1, grid*grid, D) zeros: the features of a --use_image false model, which reads none.  D is
    --clip's projection_dim, from its config alone (common.hf.published_config: no weights)."""
    from common.hf import published_config
    return torch.zeros(1, cfg.grid ** 2, published_config(cfg.clip).projection_dim)


def run_captions(cfg):
    """The captions that training and evaluation read: load_captions, none with --use_caption false;
    an empty cache is an error naming the stage to run."""
    caps = load_captions(cfg.cache_dir) if cfg.use_caption else {}
    if cfg.use_caption and not caps:
        raise DataError(f"no captions in {cfg.cache_dir}: run --mode captions first (or "
                        "--use_caption false)")
    return caps


def load_captions(cache_dir):
    """{hash: [captions]} from the caption cache: captions.json in the release's layout {"<hash>.jpg":
    [c1, c2, c3]} (captioning_blip2-opt-2.7b.py's yfcc_images_added_captions.json, or this module's
    merged copy), then captions*.jsonl lines {"image": "<hash>.jpg", "captions": [...]} (a cut-off
    last line is ignored)."""
    caps = {}
    path = os.path.join(cache_dir, "captions.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a JSON object of captions ({e})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected {{\"<hash>.jpg\": [captions]}}, got {type(data).__name__}")
        for name, c in data.items():
            if not (isinstance(c, list) and c and all(isinstance(t, str) for t in c)):
                raise DataError(f"{path}: field '{name}' should be a non-empty list of captions")
            caps[name[:-len(".jpg")] if name.endswith(".jpg") else name] = c
    if os.path.isdir(cache_dir):
        for name in sorted(os.listdir(cache_dir)):
            if name.startswith("captions") and name.endswith(".jsonl"):
                with open(os.path.join(cache_dir, name), encoding="utf-8") as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # interrupted write
                        caps[rec["image"][:-len(".jpg")]] = rec["captions"]
    return caps


# ---- tokenised episodes (what training and evaluation of imagechat_warmup.py read)
class Encoded:
    """Image-Chat episodes tokenised once: caption, per-turn style and utterance ids, feature row
    (feat_index: {hash: row}, or run_features' EveryImage)."""

    def __init__(self, episodes, tok, feat_index, captions, cfg, log, name):
        n_empty = sum(not ep["dialog"] for ep in episodes)
        episodes = [ep for ep in episodes if ep["dialog"]]  # no turn: nothing to train on or score
        if not episodes:
            raise DataError(f"{name}: no episode has a turn ({n_empty} with an empty dialog)")
        lacks = [("feature" if ep["hash"] not in feat_index else "caption" if cfg.use_caption
                  and ep["hash"] not in captions else "") for ep in episodes]  # "": nothing
        kept = [ep for ep, why in zip(episodes, lacks) if not why]
        missing = Counter(why for why in lacks if why)
        n_missing, self.episodes = sum(missing.values()), []
        log.info(f"{name}: {len(kept)} episodes, {n_missing} skipped for a missing feature/caption "
                 f"({dict(missing)})" + (f", {n_empty} without turns skipped" if n_empty else ""))
        if not kept or n_missing > cfg.max_missing_frac * len(episodes):
            why = "all of them" if not kept else f"> max_missing_frac {cfg.max_missing_frac}"
            raise DataError(f"{name}: {n_missing} of {len(episodes)} episodes lack features or "
                            f"captions ({why}); --cache_dir?")

        def enc(s, n):
            return tok.encode(s, add_special_tokens=False)[:n]
        for ep in kept:
            cap = captions[ep["hash"]][0].strip() if cfg.use_caption else None
            self.episodes.append({
                "hash": ep["hash"], "row": feat_index[ep["hash"]], "candidates": ep["candidates"],
                "caption": enc(cap, cfg.seg_tokens) if cap is not None else None,
                "styles": [enc(s, cfg.seg_tokens) for s, _ in ep["dialog"]],
                "utts": [enc(u, cfg.max_tgt_len - 1) for _, u in ep["dialog"]],
                "dialog": ep["dialog"], "caption_text": cap})

    def __len__(self):
        return len(self.episodes)


def load_split(cfg, split, tok, index, caps, log, keep_candidates):
    episodes = read_image_chat(split_path(cfg.data_dir, split), keep_candidates)
    lists = [c for ep in episodes for c in ep.get("candidates") or [] if c]  # per turn: {"100": [...], ...}
    if keep_candidates and cfg.num_candidates and lists and not any(str(cfg.num_candidates) in c for c in lists):
        raise DataError(f"{split_path(cfg.data_dir, split)}: no candidate list of --num_candidates "
                        f"{cfg.num_candidates}; the file has {sorted({k for c in lists for k in c}, key=int)}")
    return Encoded(episodes, tok, index, caps, cfg, log, split)


def mix(*xs):
    """A seed from integers (step, micro-batch, ...): resume and world size keep the draws."""
    return reduce(lambda h, x: (h * 1_000_003 + int(x)) % (2 ** 61 - 1), xs, 0)


# ---- preparation
def grid_crops(img, crop, grid):
    """PIL image -> uint8 (grid*grid, 3, crop, crop): non-aspect-preserving bilinear resize to
    grid*crop, row-major crops (release clip_feature_extraction.py: extract_patches, Tensor.unfold).
    The resize is the release's torchvision `Resize` on a uint8 tensor (torch 1.13): bilinear in
    float, no antialiasing, rounded. PIL's BILINEAR would smooth an image larger than grid*crop.
    uint8, a quarter of float32's bytes: common.image.normalize finishes them on the device."""
    size = grid * crop
    x = torch.from_numpy(np.asarray(img.convert("RGB"), np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
    x = F.interpolate(x[None].float(), (size, size), mode="bilinear", align_corners=False, antialias=False)
    x = x[0].round().clamp(0, 255).to(torch.uint8)  # (3, S, S)
    x = x.reshape(3, grid, crop, grid, crop).permute(1, 3, 0, 2, 4)  # (gy, gx, 3, crop, crop)
    return x.reshape(grid * grid, 3, crop, crop)


def preprocessor_stats(folder, default_mean=CLIP_MEAN, default_std=CLIP_STD):
    """Normalisation of the image processor saved in the CLIP folder (CLIP's own when absent)."""
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            pc = json.load(f)
        return pc.get("image_mean", default_mean), pc.get("image_std", default_std)
    return default_mean, default_std


class _Stage:
    """What both stages share: the images still to do (every rank lists the cache before any rank
    writes), this rank's share, and the bad-image rule."""

    def __init__(self, cfg, dist, log, what, done):
        self.cfg, self.dist, self.log, self.what = cfg, dist, log, what
        self.hashes = all_image_hashes(cfg.data_dir)
        todo = [h for h in self.hashes if h not in done]
        self.n_done = len(self.hashes) - len(todo)
        log.info(f"{what}: {len(self.hashes)} images, {self.n_done} cached, {len(todo)} to do")
        if cfg.stop_after > 0:
            todo = todo[:cfg.stop_after]
        self.mine = [todo[i] for i in shard_indices(len(todo), dist)]  # this rank's share
        self.images = ImageFolderLoader(cfg.image_root, lambda im: im, cfg.max_bad_frac)
        self.computed = 0
        barrier()  # every rank has listed the cache (`done`) before any rank adds to it: the shares tile

    def batches(self, size):
        """(hashes, PIL images) of the readable images, `size` hashes at a time."""
        for s in progress(range(0, len(self.mine), size), self.dist.is_main, desc=self.what):
            ok, imgs = [], []
            for h in self.mine[s:s + size]:
                img = self.images(h + ".jpg")
                if img is not None:
                    ok.append(h)
                    imgs.append(img)
            self.check()  # a wrong --image_root stops after min_tried images, not at the end
            if ok:
                yield ok, imgs

    def finish(self):
        """Merge the ranks' counts, log and record unreadable images, enforce max_bad_frac."""
        computed = sum(all_gather_object(self.computed))
        bad = self.images.gather().bad_paths
        if self.dist.is_main and bad:
            with open(os.path.join(self.cfg.cache_dir, f"unreadable_{self.what}.json"), "w",
                      encoding="utf-8") as f:
                json.dump(bad, f)
        self.log.info(f"{self.what}: computed {computed}, {self.report()}")
        self.check(final=True)
        return {"images": len(self.hashes), "cached_before": self.n_done, "computed": computed,
                "unreadable": self.images.bad}

    def report(self):
        im, cached = self.images, f" ({self.n_done} of them cached before)" if self.n_done else ""
        return (f"{im.bad} of {self.n_done + im.tried} images unreadable{cached}"
                + (f" (e.g. {im.bad_paths[:3]})" if im.bad else ""))

    def check(self, final=False):
        """The one bad-image rule (common.data.too_many_bad) over all the images, the cached ones counted
        as read: an unreadable image is never cached, so every rerun tries it again, and the few images
        a rerun or resume has left must not be judged alone."""
        im = self.images
        if too_many_bad(self.n_done + im.tried, im.bad, im.max_bad_frac, im.min_tried, final):
            raise DataError(f"too many unreadable images under {im.root}: {self.report()} "
                            f"(max_bad_frac {im.max_bad_frac})")


def check_cache_settings(cache_dir, what, settings, cached, is_main, log):
    """The settings that made a cache's entries (<cache_dir>/<what>.meta.json): a rerun or resume with
    others would take every cached image as done (or mix two models' entries, or two grids that
    load_features cannot stack), so it is refused in one line.  A cache without the file (an older run,
    the release's captions.json copied in) is taken as made with these settings, and the file written;
    an empty cache takes the new settings."""
    path, saved = os.path.join(cache_dir, f"{what}.meta.json"), None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)

    def same(k, v):  # a model by model_id's rule, against older records too
        return same_model(saved.get(k), v) if k in ("clip", "captioner") else saved.get(k) == v
    differ = [f"{k} {saved.get(k)!r} (now {v!r})" for k, v in settings.items()
              if saved is not None and not same(k, v)]
    if differ and cached:
        raise DataError(f"{cache_dir}: the cached {what} were made with {', '.join(differ)}; use another "
                        f"--cache_dir (or delete its {what} and {path})")
    if saved is None and cached:
        log.info(f"{what}: {path} missing: the cached {what} are taken as made with {settings}")
    if is_main and (saved is None or differ):  # (another rank reads the old file or the same settings)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1)
        os.replace(path + ".tmp", path)


def model_id(path):
    """One name per model however it is given: a hub name and its folder in the hub cache
    (<cache>/models--<org>--<name>/snapshots/<commit>) as "<org>/<name>@<commit>", the commit that
    from_pretrained(<name>) reads offline; another local folder as its real path (the same folder
    however named); a hub name not in the cache as given."""
    if not path:
        return path
    if os.path.isdir(path):
        real = os.path.realpath(path)
        repo, snapshots, commit = ["", "", *real.split(os.sep)][-3:]
        if snapshots == "snapshots" and repo.startswith("models--"):  # (hub names hold no "--")
            return f"{repo[len('models--'):].replace('--', '/')}@{commit}"
        return real
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(path, "config.json")  # (None: not cached)
    except ValueError:  # not a hub name (HFValidationError)
        cached = None
    return model_id(os.path.dirname(cached)) if isinstance(cached, str) else path


def same_model(made, given):
    """Whether a cache's recorded model (a name model_id gave, maybe before the hub cache named it
    by commit) is the model given now."""
    return made == given or (isinstance(made, str) and model_id(made) == model_id(given))


def clip_featurizer(cfg, dev):
    """The frozen CLIP of --mode features, in fp32 as clip_feature_extraction.py: PIL images ->
    (n, 9, D) float32 projected embeddings of each image's 3x3 grid of crops (paper section 3.1).
    True fp32: common.amp.fp32 keeps autocast and the TF32 matmuls that pick_dtype allows on CUDA off,
    as under the release's torch 1.13, whose fp32 matmuls default to full precision (cuDNN's TF32
    convolutions, the patch embedding, are on in both)."""
    from transformers import CLIPModel
    clip = CLIPModel.from_pretrained(cfg.clip, local_files_only=True)
    clip = clip.to(dev, torch.float32).eval().requires_grad_(False)
    crop, (mean, std) = clip.config.vision_config.image_size, preprocessor_stats(cfg.clip)
    pin = dev.type == "cuda"  # page-locked: the copy to the GPU runs asynchronously

    @torch.no_grad()
    def features(imgs):
        x = torch.cat([grid_crops(im, crop, cfg.grid) for im in imgs])  # (n*9, 3, c, c) uint8
        x = normalize((x.pin_memory() if pin else x).to(dev, non_blocking=pin), mean, std)
        with fp32(dev):
            out = clip.get_image_features(pixel_values=x.float())
        f = getattr(out, "pooler_output", out).float()  # (n*9, D), projected
        return f.reshape(len(imgs), cfg.grid ** 2, -1)  # (n, 9, D)
    return features


@torch.no_grad()
def prepare_features(cfg, dist, log, dtype):
    """CLIP features of a 3x3 grid of crops per image (paper section 3.1), in parts keyed by hash.

    Each part file holds {"hashes", "feats" (n, 9, D) fp16} and is written atomically, so an
    interrupted run loses at most one batch per rank and a rerun skips every image in a part.
    The temp file of the part a killed run was writing has a name no later save_checkpoint cleans
    (each part has its own), so rank 0 removes such temps before any rank writes.
    """
    folder = os.path.join(cfg.cache_dir, "features")
    os.makedirs(folder, exist_ok=True)
    if dist.is_main:
        for n in os.listdir(folder):
            if ".pt.tmp." in n:  # <part>.pt.tmp.<pid>: kept while its writer lives
                clean_stale_temps(os.path.join(folder, n.rsplit(".tmp.", 1)[0]))
    parts = sorted(n for n in os.listdir(folder) if n.endswith(".pt"))
    done = {h for n in parts
            for h in torch.load(os.path.join(folder, n), weights_only=True)["hashes"]}
    check_cache_settings(cfg.cache_dir, "features", {"clip": model_id(cfg.clip), "grid": cfg.grid,
                         "dtype": "float16 of fp32 CLIP"}, bool(done), dist.is_main, log)
    stage = _Stage(cfg, dist, log, "features", done)  # waits until every rank has listed the parts
    features = clip_featurizer(cfg, dist.device)
    for i, (ok, imgs) in enumerate(stage.batches(cfg.feat_batch)):
        f = features(imgs)
        save_checkpoint(os.path.join(folder, f"part_{len(parts):05d}_r{dist.rank}_{i:05d}.pt"),
                        {"hashes": ok, "feats": f.half().cpu()})
        stage.computed += len(ok)
    return stage.finish()


def end_cut_line(path):
    """End the line a killed run left cut off at the end of a JSONL file: appended to unchanged, the
    first record of the resume would join it and be skipped with it by load_captions."""
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0, os.SEEK_END)
                f.write(b"\n")


def blip2_captioner(cfg, dev, dtype):
    """The frozen BLIP-2 of --mode captions (--captioner): PIL images -> per image its
    --caption_return beam-search captions (settings in prepare_captions)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    if not cfg.captioner:
        raise ValueError("--captioner: give a local BLIP-2 folder (transformers "
                         "Blip2ForConditionalGeneration, e.g. Salesforce/blip2-opt-2.7b-coco or "
                         "blip2_pformer.py's export)")
    fdtype, R = frozen_dtype(dev, dtype), cfg.caption_return
    proc = Blip2Processor.from_pretrained(cfg.captioner, local_files_only=True)
    model = Blip2ForConditionalGeneration.from_pretrained(cfg.captioner, local_files_only=True)
    model = model.to(dev, fdtype).eval().requires_grad_(False)

    @torch.no_grad()
    def captions(imgs):
        inputs = proc(images=imgs, return_tensors="pt").to(dev)
        inputs["pixel_values"] = inputs["pixel_values"].to(fdtype)
        out = model.generate(**inputs, num_beams=cfg.caption_beams, num_return_sequences=R,
                             min_new_tokens=cfg.caption_min_length, no_repeat_ngram_size=3,
                             max_new_tokens=cfg.caption_max_new_tokens, do_sample=False)
        texts = [t.strip() for t in proc.batch_decode(out, skip_special_tokens=True)]
        return [texts[j * R:(j + 1) * R] for j in range(len(imgs))]
    return captions


@torch.no_grad()
def prepare_captions(cfg, dist, log, dtype):
    """BLIP-2 captions (paper section 3.2; release captioning_blip2-*.py: beam 5, 3 returned,
    min_length 5, max_length 16, read here as new tokens; no 3-gram repeats, which only its
    captioning_blip2-opt-2.7b.py, the OPT captioner of the paper preset, sets).  The minimum is
    min_new_tokens: BLIP-2's generate passes the query-token placeholders and <s> as input_ids,
    which min_length would count.

    Appended per batch to captions.r<rank>.jsonl ({"image": "<hash>.jpg", "captions": [c1, c2,
    c3]}), so a rerun skips captioned images (a line a killed run cut off is ended first, see
    end_cut_line); at the end rank 0 writes the release layout
    captions.json {"<hash>.jpg": [...]}.
    """
    os.makedirs(cfg.cache_dir, exist_ok=True)
    done = load_captions(cfg.cache_dir)
    check_cache_settings(cfg.cache_dir, "captions", {"captioner": model_id(cfg.captioner), **{
        k: getattr(cfg, k) for k in ("caption_beams", "caption_return", "caption_min_length",
                                     "caption_max_new_tokens")}}, bool(done), dist.is_main, log)
    captions = blip2_captioner(cfg, dist.device, dtype)  # once the cache is known to take them
    stage = _Stage(cfg, dist, log, "captions", done)  # all ranks listed
    out_path = os.path.join(cfg.cache_dir, f"captions.r{dist.rank}.jsonl")
    end_cut_line(out_path)
    with open(out_path, "a", encoding="utf-8") as f:
        for ok, imgs in stage.batches(cfg.caption_batch):
            for h, caps in zip(ok, captions(imgs)):  # a line per image; flushed per batch
                rec = {"image": h + ".jpg", "captions": caps}
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
            stage.computed += len(ok)
    stats = stage.finish()
    barrier()
    if dist.is_main:
        caps = load_captions(cfg.cache_dir)
        final = os.path.join(cfg.cache_dir, "captions.json")
        tmp = final + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({h + ".jpg": c for h, c in sorted(caps.items())}, f)
        os.replace(tmp, final)
    return stats


# ---- one image for --mode chat (ParlAI's interactive script; ParlAI issue #4260)
# Styles that a few Image-Chat dialogues use although personalities.json lacks them (ParlAI,
# parlai/tasks/image_chat/agents.py, get_category_map adds both to its map)
RARE_STYLES = ("Crude", "Earnest")


def known_styles(data_dir):
    """The personalities a model trained on <data_dir> knows: where ParlAI's personalities.json
    ({"positive": [...], "neutral": [...], "negative": [...]}, 215 names) is present, its names and
    RARE_STYLES, else the styles of train.json."""
    path = os.path.join(data_dir, "personalities.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return sorted({s for names in json.load(f).values() for s in names} | set(RARE_STYLES))
    episodes = read_image_chat(split_path(data_dir, "train"), keep_candidates=False)
    return sorted({style for ep in episodes for style, _ in ep["dialog"]})


def chat_styles(data_dir, style, user_style=""):
    """(--style, --user_style or "") as known_styles spells them (matched case-insensitively); a
    name that is not a known personality is an error naming its flag."""
    styles = known_styles(data_dir)
    spelled, out = {s.lower(): s for s in styles}, []
    for flag, name in (("--style", style), ("--user_style", user_style)):
        if (name or flag == "--style") and name.strip().lower() not in spelled:
            raise ValueError(f"{flag} {name!r} is not one of the model's {len(styles)} "
                             "personalities: " + ", ".join(styles))
        out.append(spelled.get(name.strip().lower(), ""))
    return tuple(out)


def chat_image(cfg, path, dev, dtype, log):
    """(features (1, 9, D), caption or None) of one image, computed as the caches hold them: the
    CLIP of --mode features (fp16-rounded, as load_features reads a part back; a warning where
    --cache_dir's features were made by another --clip; zeros for a --use_image false model,
    unread_features), and --caption when
    given (it wins over a preset's --captioner), else BLIP-2's first caption (Encoded's choice) with
    --captioner, else "" with a warning.  A model that reads neither the image nor a caption made of it
    needs no --image."""
    captioned = cfg.use_caption and not cfg.caption.strip() and cfg.captioner
    img = load_image(path) if cfg.use_image or captioned else None
    if img is None and (cfg.use_image or captioned):
        raise DataError(f"--image {path!r}: missing or unreadable (the model reads "
                        f"{'its CLIP features' if cfg.use_image else 'its caption by --captioner'})")
    meta = os.path.join(cfg.cache_dir, "features.meta.json")
    if cfg.use_image and os.path.isfile(meta):  # the settings of the features training read
        with open(meta, encoding="utf-8") as f:  # (check_cache_settings)
            made = json.load(f).get("clip")
        if not same_model(made, model_id(cfg.clip)):
            log.info(f"warning: --clip {cfg.clip} is not the CLIP that made the cached features "
                     f"({made}, {meta}): the image's features are not of the kind training read")
    # a model without the image block (--use_image false) reads no feature: no CLIP to run
    feats = clip_featurizer(cfg, dev)([img]).half().float().cpu() if cfg.use_image else \
        unread_features(cfg)
    if not cfg.use_caption:
        return feats, None
    if cfg.caption.strip() or not cfg.captioner:
        if not cfg.caption.strip():
            log.info("warning: no --captioner and no --caption: the model reads an empty caption")
        return feats, cfg.caption.strip()
    return feats, blip2_captioner(cfg, dev, dtype)([img])[0][0]


# ---- what imagechat_warmup.py reads back from its checkpoints
MODEL_FIELDS = ("use_image", "use_caption", "grid", "max_positions", "share_pos", "untied_head", "seg_tokens")


def peek_checkpoint(path):
    """A checkpoint memory-mapped: what is read of it (its config, a score) is all that leaves the disk."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def as_trained(cfg, ck, given, log):
    """--mode eval|chat with --init: the fields that shape the model and its input (MODEL_FIELDS) as the
    checkpoint's run trained it, as ParlAI reads a model file's options, but those given on the command
    line (`given`, common.config.given_flags), named in a warning where they differ from the checkpoint's."""
    saved = {k: v for k, v in (ck.get("config") or {}).items() if k in MODEL_FIELDS}
    kept = [f"--{k} {getattr(cfg, k)!r} (trained: {v!r})" for k, v in saved.items()
            if k in given and v != getattr(cfg, k)]
    for k, v in saved.items():
        setattr(cfg, k, getattr(cfg, k) if k in given else v)
    if kept:
        log.info(f"warning: the model is not evaluated as --init was trained: {', '.join(kept)}")


def selected_weights(best, out_dir, resume, log):
    """The model state a fine-tuning's final test reads: best.pt holding the run's best selection score
    `best`, in out_dir or (a resume into another out_dir) the folder of the checkpoint it resumed; a
    best.pt of another score (a stale one of an earlier run) is not taken.  None: the last weights."""
    folders = dict.fromkeys(os.path.abspath(d) for d in
                            [out_dir, *([os.path.dirname(os.path.abspath(resume))] if resume else [])])
    found = {}
    for path in (os.path.join(d, "best.pt") for d in folders):
        ck = peek_checkpoint(path) if best is not None and os.path.isfile(path) else {}
        if best is not None and ck.get("best") == best:
            found = {"path": path, "step": ck.get("step"), "model": ck["model"]}
            break
    same_on_every_rank(found.get("step"), "the step of the final test's best.pt")
    if found:
        log.info(f"final test on the selected weights: {found['path']} (step {found['step']}, score {best:.4g})")
        return found["model"]
    log.info(f"final test on the last weights: no best.pt with the best score {best} in {', '.join(folders)}")
    return None


# ---- scores, eval figures and the picture report of imagechat_warmup.py
def turn_scores(rows, tok, cfg):
    """One turn scored as the release does (common.metrics, batches of eval_batch: the release's
    val/test loaders hold 64, training_ablation.py --batch_size, the paper preset's): references
    tokenizer round-tripped, both sides contractions-expanded; ParlAI's word F1 on the raw strings.
    rows: {"prediction", "reference", "nll", "n_tok", "rank"?}; a rank of None (the reference is
    not among the turn's candidates) is counted in "no_gold", not ranked."""
    def ids(text):
        return tok.encode(text, add_special_tokens=False)
    raw = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    preds = list(map(expand_contractions, raw[0]))
    refs = [expand_contractions(tok.decode(ids(r), skip_special_tokens=True)) for r in raw[1]]
    m = dialogue_scores(preds, refs, list(map(ids, preds)), list(map(ids, refs)), cfg.eval_batch,
                        nll=[r["nll"] for r in rows], n_tok=[r["n_tok"] for r in rows], raw=raw,
                        ranks=[r["rank"] for r in rows if "rank" in r], n_candidates=cfg.num_candidates)
    return {**m, "n": len(rows)}


def results_rows(res):
    """Per-turn rows of the paper's metrics (x100 but PPL), as in its Table 3: header, rows.  R@1,
    R@5, R@10 over as many candidates as were ranked (--num_candidates: "R@1/100", "R@1/1000")."""
    recall = sorted((k[len("IC/"):] for k in res if k.startswith("IC/R@")),
                    key=lambda n: int(n[len("R@"):n.index("/")]))
    names = [n for n in ("F1", "BLEU-4", "ROUGE-L", "PPL", *recall, "word_F1") if f"IC/{n}" in res]
    return ["turn", *names], [[k, *(res.get(f"{k}/{n}", float("nan")) for n in names)]
                              for k in ("turn1", "turn2", "turn3", "IC") if f"{k}/F1" in res]


def results_table(res):
    """results_rows as a Markdown table (the log's copy of the figures)."""
    head, rows = results_rows(res)
    return "\n".join("| " + " | ".join(c if isinstance(c, str) else f"{c:.2f}" for c in r) + " |"
                     for r in (head, ["---"] * len(head), *rows))


def write_predictions(run_dir, split, k, rows):
    """<run_dir>/predictions_<split>_turn<k>.jsonl: per evaluated example its hash, the decoded
    encoder text, the reference and the generated reply."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, f"predictions_{split}_turn{k}.jsonl"), "w",
              encoding="utf-8") as f:
        f.writelines(json.dumps({n: r[n] for n in ("hash", "context", "reference", "prediction")})
                     + "\n" for r in rows)


def dialogue_cards(episodes, shown, image_root, n_candidates=100, n=8):
    """Report cards (common/report.py) of the first n evaluated dialogues: the image and its
    caption, then per turn the speaker's style with the reference utterance (the gold history of
    the turns after it), under it the model's reply generated from that history, and the
    reference's rank among the turn's candidates.  episodes: [{"hash", "dialog": [(style,
    utterance)], "caption_text"}]; shown: {(episode index, turn k): {"prediction", "rank"?}}."""
    cards = []
    for i in sorted({i for i, _ in shown})[:n]:
        ep, lines = episodes[i], []
        for k, (style, utt) in enumerate(ep["dialog"], 1):
            row = shown.get((i, k), {})
            lines += [(f"{k}. {style}", utt)] + ([("generated", row["prediction"])] if row else [])
            if row.get("rank") is not None:
                lines.append(("rank of the reference", f"{row['rank']} of {n_candidates}"))
        img = load_image(os.path.join(image_root, ep["hash"] + ".jpg"))  # None: a card without
        caption = [("caption", ep["caption_text"])] if ep.get("caption_text") else []
        cards.append(card(thumb(img, 160) if img is not None else None, *caption, *lines))
    return grid(cards)


def write_report(cfg, is_main, log, took_eval=None, res=None, episodes=None, shown=None):
    """<out_dir>/report.html from rank 0 (unless --report false): the curves of this run and of
    its --init run (a fine-tuning shows the warm-up's task losses), and after an evaluation the
    per-turn figures and the first dialogues with the generated replies.  Logs its cost next to
    the eval's."""
    rep = Report(f"imagechat_warmup.py --mode {cfg.mode}", enabled=cfg.report and is_main)
    if not rep.enabled:
        return
    own = os.path.join(cfg.out_dir, "metrics.jsonl")
    init = os.path.join(os.path.dirname(cfg.init), "metrics.jsonl")
    with rep.timed():
        if cfg.mode != "eval":
            rep.section("Training", training_plots(own))
        if cfg.init and os.path.isfile(init) and os.path.abspath(init) != os.path.abspath(own):
            rep.section("Training of the --init run", cfg.init, training_plots(init))
        if res is not None:
            head, rows = results_rows(res)
            rep.section(f"Figures on {cfg.eval_split}", table(rows, head))
            rep.section(f"Dialogues from {cfg.eval_split}",
                        "Per turn: the speaker's style and the reference; under it the reply "
                        f"generated (beam {cfg.num_beams}) from the references above it, and the "
                        f"reference's rank among {cfg.num_candidates} candidates (1 = an R@1 "
                        f"hit).  The model saw the image: {cfg.use_image}, the caption: "
                        f"{cfg.use_caption}.",
                        dialogue_cards(episodes, shown, cfg.image_root, cfg.num_candidates))
        rep.write(cfg.out_dir)
    log.info(f"report: {os.path.join(cfg.out_dir, 'report.html')} ({rep.seconds:.2f} s"
             + (f"; eval {took_eval:.1f} s)" if took_eval is not None else ")"))
