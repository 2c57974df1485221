"""Compositional benchmarks and retrieval: local copies in their published layouts, any model.

One scoring engine (`Scorer`): every unique image (path, crop box) and caption is embedded once
through two callbacks the caller supplies, `embed_images(list of PIL images) -> (n, D)` and
`embed_texts(list of str) -> (n, D)` (both L2-normalised), sharded over ranks; a pair's score is the
cosine.  Then one reader and one scoring rule per benchmark, as its authors' code computes it:
- retrieval: COCO / Flickr30k Karpathy test (BLIP test JSON, pairs JSONL or NegCLIP TSV), R@1/5/10;
- ARO (Yuksekgonul et al., arXiv 2210.01936; mertyg/vision-language-models-are-bows
  dataset_zoo/aro_datasets.py): VG-Relation and VG-Attribution macro accuracy (and per relation /
  attribute pair); COCO- and Flickr30k-Order P@1 over four word-order perturbations
  (data/negatives.py), mean/std over seeds;
- SugarCREPE (Hsieh et al., arXiv 2306.14610; RAIVNLab/sugar-crepe main_eval.py): 7 categories,
  micro-averaged per group;
- CREPE (Ma et al., arXiv 2212.07796; RAIVNLab/CREPE crepe_eval_utils.py): productivity hard
  negatives, R@k and mean rank with their stds, median rank;
- SVO-Probes (Hendricks & Nematzadeh, arXiv 2106.09141): pairwise accuracy per negative type (not
  the paper's thresholded image-sentence matching);
- Winoground (Thrush et al., arXiv 2204.03162): text / image / group scores;
- VL-CheckList (Zhao et al., arXiv 2207.00221; om-ai-lab/VL-CheckList vl_checklist/evaluate.py,
  radar.py): pairwise accuracy per corpus file, averaged per sub-category and per Object /
  Attribute / Relation;
- classification (NegCLIP, arXiv 2210.01936, Table 6: what hard negatives cost elsewhere, by linear
  probes; the authors in mertyg/vision-language-models-are-bows issues #18 and #29): every
  ImageFolder dataset under <root>/classification, zero-shot top-1/top-5 from class-name prompts
  (CLIP, arXiv 2103.00020, Sec. 3.1.4) and a linear probe (L2-regularised logistic regression on the
  frozen image embeddings, Sec. 3.2) when a train/ split is there.
Comparisons are strict (">"): a tie counts as wrong, except in the *-Order sets, where ARO's argmax
takes the first option (the original caption) on ties, and in retrieval, where
common.metrics.retrieval_recall counts a tie at its expected value under random tie-breaking.
Unreadable images score NaN and their cases are skipped; they are counted once per image
(`Scorer.images_seen`, common.data.ImageFolderLoader), reported, and more than max_bad_frac of them
stops the evaluation.
"""
import ast
import csv
import json
import math
import os
import random
import re

import numpy as np
import torch
from PIL import Image

from common import dist as D
from common.data import DataError, ImageFolderLoader, pre_caption, read_pairs
from common.image import load_image
from common.log import progress
from data.negatives import ORDER_PERTURBATIONS, make_tagger, read_negclip_tsv


# ================================================================================================ Scorer

class Scorer:
    """Embeds each unique image (path, crop box) and caption once, sharded over ranks; cosine."""

    def __init__(self, embed_images, embed_texts, batch=256, dist=None, max_bad_frac=0.05):
        self.embed_images, self.embed_texts, self.batch = embed_images, embed_texts, batch
        self.dist = dist or D.Dist()
        self.img_cache, self.txt_cache = {}, {}
        # distinct unreadable images, counted once each
        self.images_seen = ImageFolderLoader("the evaluation images", None, max_bad_frac)

    def _sharded(self, items, fn, desc):
        idx = D.shard_indices(len(items), self.dist)
        out = [fn([items[i] for i in idx[s:s + self.batch]])
               for s in progress(range(0, len(idx), self.batch), self.dist.is_main, desc=desc)]
        local = torch.cat(out) if out else torch.zeros(0)
        parts = [p for p in D.all_gather_object(local) if p.numel()]
        return torch.cat(parts) if parts else local

    @torch.no_grad()
    def _embed_images(self, refs):
        ims, ok = [], []
        for path, box in refs:
            img = load_image(path)
            if img is not None and box is not None:  # ARO / CREPE: crop to the region first
                x, y, w, h = box
                img = img.crop((int(x), int(y), int(x + w), int(y + h)))
            ok.append(img is not None)
            ims.append(img if img is not None else Image.new("RGB", (8, 8)))
        e = self.embed_images(ims).float().cpu()  # (n, D)
        e[~torch.tensor(ok)] = float("nan")  # unreadable: NaN, the benchmarks skip those cases
        return e

    def images(self, refs):
        """[(path, box or None)] -> (K, D) embeddings (NaN rows for unreadable images)."""
        new = sorted({r for r in refs if r not in self.img_cache}, key=str)
        if new:
            embs = self._sharded(new, self._embed_images, "images")
            for r, e in zip(new, embs):
                self.img_cache[r] = e
            bad = {p for (p, _), e in zip(new, embs) if torch.isnan(e).any()}
            self.images_seen.merge({p for p, _ in new}, bad)
        return torch.stack([self.img_cache[r] for r in refs])

    def texts(self, texts):
        new = sorted({t for t in texts if t not in self.txt_cache})
        if new:
            embs = self._sharded(new, lambda b: self.embed_texts(b).float().cpu(), "texts")
            self.txt_cache.update(zip(new, embs))
        return torch.stack([self.txt_cache[t] for t in texts])

    def pair_scores(self, refs, texts):
        """s(image_k, text_k) for aligned lists -> (K,) numpy (NaN: unreadable image)."""
        return (self.images(refs) * self.texts(texts)).sum(-1).numpy()


# ================================================================================================ Scoring rules
# pure functions on score arrays; strict ">" (a tie is wrong), but score_order: first option wins

# ARO's VG-Relation macro accuracy leaves out these 157 relations: the list `symmetric` of the
# authors' notebook (mertyg/vision-language-models-are-bows, notebooks/"Replicate ARO! VG-Relation,
# VG-Attribution.ipynb"), which drops them from evaluate_scores' relation records before the mean
VG_R_EXCLUDED = set("""adjusting;attached to;between;bigger than;biting;boarding;brushing;chewing;
cleaning;climbing;close to;coming from;coming out of;contain;crossing;dragging;draped over;drinking;
drinking from;driving;driving down;driving on;eating from;eating in;enclosing;exiting;facing;
filled with;floating in;floating on;flying;flying above;flying in;flying over;flying through;
full of;going down;going into;going through;grazing in;growing in;growing on;guiding;hanging from;
hanging in;hanging off;hanging over;higher than;holding onto;hugging;in between;jumping off;
jumping on;jumping over;kept in;larger than;leading;leaning over;leaving;licking;longer than;
looking in;looking into;looking out;looking over;looking through;lying next to;lying on top of;
making;mixed with;mounted on;moving;on the back of;on the edge of;on the front of;
on the other side of;opening;painted on;parked at;parked beside;parked by;parked in;
parked in front of;parked near;parked next to;perched on;petting;piled on;playing;playing in;
playing on;playing with;pouring;reaching for;reading;reflected on;riding on;running in;running on;
running through;seen through;sitting behind;sitting beside;sitting by;sitting in front of;
sitting near;sitting next to;sitting under;skiing down;skiing on;sleeping in;sleeping on;smiling at;
sniffing;splashing;sprinkled on;stacked on;standing against;standing around;standing behind;
standing beside;standing in front of;standing near;standing next to;staring at;stuck in;surrounding;
swimming in;swinging;talking to;topped with;touching;traveling down;traveling on;tying;typing on;
underneath;wading in;waiting for;walking across;walking by;walking down;walking next to;
walking through;working in;working on;worn on;wrapped around;wrapped in;by;of;near;next to;with;
beside;on the side of;around""".replace(
    "\n", " ").split(";"))
VG_R_EXCLUDED = {s.strip() for s in VG_R_EXCLUDED}


def group_accuracy(correct, groups, min_count=1):
    """{group: accuracy} of the groups with >= min_count cases, in order of first appearance."""
    acc = {}
    for c, g in zip(correct, groups):
        acc.setdefault(g, []).append(c)
    return {g: float(np.mean(v)) for g, v in acc.items() if len(v) >= min_count}


def macro_accuracy(correct, groups, min_count=1, exclude=()):
    """Mean over groups (with >= min_count cases, not excluded) of the group's accuracy."""
    kept = [a for g, a in group_accuracy(correct, groups, min_count).items() if g not in exclude]
    return float(np.mean(kept)) if kept else float("nan"), len(kept)


def score_vg(pos, neg, groups, min_count=1, exclude=()):
    """ARO VG-Relation / VG-Attribution: correct iff s(true) > s(false); macro (paper), micro, and
    per_group: {group: accuracy} for every group with >= min_count cases, excluded ones too, as
    the records of ARO's evaluate_scores (dataset_zoo/aro_datasets.py)."""
    correct = np.asarray(pos) > np.asarray(neg)
    macro, n_groups = macro_accuracy(correct, groups, min_count, exclude)
    return {"macro": macro, "micro": float(correct.mean()), "n": int(len(correct)),
            "groups": n_groups, "per_group": group_accuracy(correct, groups, min_count)}


def score_order(scores):
    """(N, 5) scores, column 0 = the original caption -> Precision@1 (argmax takes the first index
    on ties, so as in the ARO code a tie counts as right here)."""
    return float((np.argmax(np.asarray(scores), axis=1) == 0).mean())


def score_sugarcrepe(per_file):
    """{category: (pos, neg)} -> per-category accuracy, micro REPLACE/SWAP/ADD (the paper's Table 5
    columns are micro-averages: the maintainers in RAIVNLab/sugar-crepe issue #3) and the macro
    mean."""
    out, pooled = {}, {}
    for cat, (pos, neg) in per_file.items():
        c = np.asarray(pos) > np.asarray(neg)
        out[cat] = float(c.mean())
        pooled.setdefault(cat.split("_")[0], []).append(c)
    for group, cs in pooled.items():
        out[f"{group.upper()}_micro"] = float(np.concatenate(cs).mean())
    out["macro"] = float(np.mean([out[c] for c in per_file]))
    return out


def crepe_ranks(true_scores, neg_scores):
    """0-based rank of the true caption among [true] + negatives; ties count against it (read_crepe
    has dropped the negatives that are the caption itself, which CREPE's code ranks after it)."""
    return np.array([int((np.asarray(n) >= t).sum()) for t, n in zip(true_scores, neg_scores)])


def score_crepe(ranks, ks=(1, 3, 5, 10)):
    """0-based ranks -> R@k with its std over cases (R@k_std), mean rank, its std (rank_std) and
    median 1-based rank, as CREPE's get_one2many_metrics (crepe_eval_utils.py): population std
    (np.std), the median is floor(median of the 0-based ranks) + 1, a whole rank."""
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float((ranks < k).mean()) for k in ks}
    out.update({f"R@{k}_std": float((ranks < k).std()) for k in ks})
    out.update({"mean_rank": float((ranks + 1).mean()), "rank_std": float(ranks.std()),
                "median_rank": float(np.floor(np.median(ranks)) + 1), "n": int(len(ranks))})
    return out


def score_svo(pos, neg, kinds, keys=None):
    """Pairwise accuracy s(sentence, pos image) > s(sentence, neg image), overall and per type.  Not
    the paper's binary matching (probing_image_text_models.ipynb: a 0/1 match decision per pair, i.e.
    a threshold on a dual encoder's cosine, which neither gives); see docs/negclip.md.  keys: one
    (sentence, pos image, neg image) per case; a case whose key came before counts once, overall and
    within its type, as that notebook's accuracy() counts each distinct (sentence, image) once
    (drop_duplicates over each type's rows and over all of them): a repeated row counts once."""
    c = np.asarray(pos) > np.asarray(neg)
    kinds = np.asarray(kinds)
    keys = list(range(len(c))) if keys is None else list(keys)

    def once(idx):  # the first case of each key among idx
        seen = set()
        return np.array([i for i in idx if not (keys[i] in seen or seen.add(keys[i]))], dtype=int)
    first = once(range(len(c)))
    out = {"pairwise": float(c[first].mean()) if len(first) else float("nan"), "n": int(len(first))}
    for k in ("subj", "verb", "obj"):
        if (kinds == k).any():
            out[k] = float(c[once(np.flatnonzero(kinds == k))].mean())
    return out


def score_winoground(s):
    """s (N, 2, 2) with s[n, c, i] = score(caption_c, image_i) -> text / image / group scores
    (Thrush et al.)."""
    s = np.asarray(s)
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    mean = lambda c: float(c.mean()) if len(c) else float("nan")  # noqa: E731  (no case left: NaN)
    return {"text": mean(text), "image": mean(image), "group": mean(text & image), "n": int(len(s))}


def score_vlc(per_file):
    """{(sub-category, corpus name): (pos, neg)} -> accuracies.  A case is right iff
    s(POS) > s(NEG) (evaluate.py's itc branch).  As radar.py with corpus.json: a sub-category (the
    corpus folder, e.g. Object/Size/small) is the mean over source datasets (the name before the
    first '_': vg_obj and vg_subj are both 'vg') of the mean accuracy of that dataset's files;
    Object / Attribute / Relation are the means of their sub-categories (the paper's three
    columns).  Files without a scored case are left out (the authors' code divides by zero)."""
    by_sub = {}
    for (sub, name), (pos, neg) in per_file.items():
        c = np.asarray(pos) > np.asarray(neg)
        if len(c):
            by_sub.setdefault(sub, {}).setdefault(name.split("_")[0], []).append(c.mean())
    out, by_cat = {}, {}
    for sub in sorted(by_sub):
        acc = float(np.mean([np.mean(v) for v in by_sub[sub].values()]))
        out[sub.lower().replace("/", "_")] = acc
        by_cat.setdefault(sub.split("/")[0], []).append(acc)
    out.update({cat.lower(): float(np.mean(v)) for cat, v in by_cat.items()})
    out["n"] = int(sum(len(p) for p, _ in per_file.values()))
    return out


def classification_accuracy(logits, labels, k=1):
    """Top-k accuracy: right when at most k classes (the true one included) score >= the true class, so a
    tie with it counts as wrong, as everywhere here."""
    true = logits.gather(1, labels[:, None])  # (N, 1)
    return float(((logits >= true).sum(1) <= k).float().mean())


def fit_linear_probe(x, y, num_classes, lam, iters=1000):
    """Multinomial logistic regression, mean cross-entropy + lam/2 * |W|^2 (the bias unpenalised), full-batch L-BFGS from
    zero for up to 1000 iterations (CLIP's probe: scikit-learn's L-BFGS, max_iter 1000); the loss is convex.
    -> (W (D, C), b (C,))."""
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


PROBE_LAMBDAS = tuple(10.0 ** k for k in range(-6, 2))


def linear_probe(x_train, y_train, x_test, y_test, num_classes, seed=0, lambdas=PROBE_LAMBDAS):
    """CLIP's protocol (Sec. 3.2, Appendix A.3) on a grid: lam is chosen on a held-out fifth of the train
    split (the largest lam among the best, so ties go to the simpler model), then the probe is refit on
    the whole train split and scored once on the test split (on the GPU when there is one: ImageNet's
    1.28M x 1000 problem takes a full-batch L-BFGS fit per lam, then the refit).  -> (test top-1, lam)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x_train, y_train, x_test, y_test = (t.to(dev) for t in (x_train, y_train, x_test, y_test))
    perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed)).to(dev)
    hold, fit = perm[:max(1, len(perm) // 5)], perm[max(1, len(perm) // 5):]
    val = [classification_accuracy(x_train[hold] @ w + b, y_train[hold])
           for w, b in (fit_linear_probe(x_train[fit], y_train[fit], num_classes, lam) for lam in lambdas)]
    lam = max(lam for lam, v in zip(lambdas, val) if v == max(val))
    w, b = fit_linear_probe(x_train, y_train, num_classes, lam)
    return classification_accuracy(x_test @ w + b, y_test), lam


# ================================================================================================ Readers
# the published layouts, read by field name

SUGARCREPE = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj",
              "add_att")
_BOX = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
_SVO = ("subj", "verb", "obj")


def _load_json(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_aro_vg(path, kind=""):
    """visual_genome_{relation,attribution}.json: list of records; the true/false captions are found
    by field name (some re-formatted copies reorder them), boxes (bbox_x, bbox_y, bbox_w, bbox_h)
    crop the image.  kind "relation": each record needs relation_name; "attribution": an attributes
    list of at least two (what ARO's loaders group by)."""
    recs = _load_json(path)
    for i, r in enumerate(recs):
        for k in ("image_path", "true_caption", "false_caption", *_BOX):
            if k not in r:
                raise DataError(f"{path}: record {i}: missing field '{k}'")
        if kind == "relation" and "relation_name" not in r:
            raise DataError(f"{path}: record {i}: missing field 'relation_name'")
        if kind == "attribution" and not (isinstance(r.get("attributes"), list)
                                          and len(r["attributes"]) >= 2):
            raise DataError(f"{path}: record {i}: 'attributes' is not a list of at least two")
    return recs


def aro_attribute_pair(record):
    """The group of a VG-Attribution record: its first two attributes joined by '_', as ARO's
    VG_Attribution (dataset_zoo/aro_datasets.py, all_attributes) keys it; any further attribute
    is not part of the key."""
    a = record["attributes"]
    return f"{a[0]}_{a[1]}"


def read_caption_sets(path):
    """-> list of (image path, [raw captions]) from pairs .jsonl | BLIP .json: a list of {"image",
    "caption": [..]}, one entry per image (val / test), or {"image", "caption": str}, one entry
    per caption (train) | NegCLIP .tsv (title, filepath).  The .json and .tsv entries are grouped
    by image in order of first appearance (as data/convert.py blip), so that retrieval has each
    image once."""
    recs = {}
    if path.endswith(".tsv"):
        for r in read_negclip_tsv(path):
            recs.setdefault(r["image"], []).append(r["caption"])
        return list(recs.items())
    if path.endswith(".jsonl"):
        return [(r["image"], r["captions"]) for r in read_pairs(path)]
    data = _load_json(path)
    if not isinstance(data, list):  # e.g. Karpathy's dataset_coco.json: {"images": [..], ..}
        raise DataError(f"{path}: not a BLIP annotation list of {{image, caption}} records (a "
                        "Karpathy dataset_*.json becomes a pairs .jsonl with "
                        "data/convert.py karpathy)")
    for i, r in enumerate(data):
        if not isinstance(r, dict) or "image" not in r or "caption" not in r:
            raise DataError(f"{path}: record {i}: missing field 'image' or 'caption'")
        caps = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
        recs.setdefault(r["image"], []).extend(caps)
    return list(recs.items())


def read_retrieval(path):
    """-> (image paths, captions, txt2img, img2txts), captions normalised as ARO's retrieval."""
    images, texts, txt2img, img2txts = [], [], [], []
    for i, (image, caps) in enumerate(read_caption_sets(path)):
        images.append(image)
        img2txts.append([])
        for c in caps:
            img2txts[-1].append(len(texts))
            texts.append(pre_caption(c))
            txt2img.append(i)
    return images, texts, txt2img, img2txts


def read_sugarcrepe(folder):
    """{category: list of (filename, caption, negative_caption)}; keys: string indices, gapped."""
    out = {}
    for cat in SUGARCREPE:
        d = _load_json(os.path.join(folder, f"{cat}.json"))
        out[cat] = [(r["filename"], r["caption"], r["negative_caption"]) for r in d.values()]
    return out


def read_crepe(folder):
    """prod_hard_negatives/<type>/prod_vg_hard_negs_<type>_complexity_<n>.csv -> {(type, n): rows};
    hard_negs is a Python list *or set* literal (sets have no order, so they are sorted).  A
    negative that is the caption itself up to case and spacing is dropped: the released CSVs have
    some (swap: exact copies; negate: capitalised ones), and CREPE's code (crepe_eval_utils.py
    get_one2many_rank: CPU argsort over [caption, negatives]; clip.tokenize lowercases) ties them
    with the caption and ranks the caption first.  Files beside the type folders (a .DS_Store of
    the unzipped copy) are not types."""
    out = {}
    base = os.path.join(folder, "prod_hard_negatives")
    if not os.path.isdir(base):
        raise DataError(f"{base}: folder not found")
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    for typ in sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))):
        for name in sorted(os.listdir(os.path.join(base, typ))):
            m = re.fullmatch(rf"prod_vg_hard_negs_{re.escape(typ)}_complexity_(\d+)\.csv", name)
            if not m:
                continue
            path = os.path.join(base, typ, name)
            rows = []
            with open(path, newline="", encoding="utf-8") as f:
                for line, r in enumerate(csv.DictReader(f), 2):
                    try:
                        negs = ast.literal_eval(r["hard_negs"])
                        box = tuple(float(r[k]) for k in ("x", "y", "width", "height"))
                        negs = sorted(negs) if isinstance(negs, set) else list(negs)
                        negs = [t for t in negs if norm(t) != norm(r["caption"])]
                        rows.append({"image_id": r["image_id"], "caption": r["caption"], "box": box,
                                     "negs": negs})
                    except KeyError as e:
                        raise DataError(f"{path}:{line}: missing field {e}") from None
            out[(typ, int(m.group(1)))] = rows
    if not out:
        raise DataError(f"{base}: no prod_vg_hard_negs_*_complexity_*.csv files")
    return out


def _crepe_image(folder, image_id):
    for sub in ("VG_100K", "VG_100K_2"):
        p = os.path.join(folder, sub, f"{image_id}.jpg")
        if os.path.isfile(p):
            return p
    return os.path.join(folder, "VG_100K", f"{image_id}.jpg")


def read_svo(path):
    """svo_probes.csv read by column name; neg_triplet may be a list literal; keeps rows with
    exactly one *_neg flag true -> [{"sentence", "pos_image_id", "neg_image_id", "kind"}]."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for line, r in enumerate(csv.DictReader(f), 2):
            try:
                flags = [str(r[f"{k}_neg"]).strip().lower() == "true" for k in _SVO]
                if sum(flags) != 1:
                    continue
                rows.append({"sentence": r["sentence"], "pos_image_id": r["pos_image_id"],
                             "neg_image_id": r["neg_image_id"], "kind": _SVO[flags.index(True)]})
            except KeyError as e:
                raise DataError(f"{path}:{line}: missing field {e}") from None
    return rows


def read_simple_yaml(path):
    """The VL-CheckList corpus files are `KEY: "value"` lines (ANNO_PATH, IMG_ROOT, TYPE); read
    those without a YAML library; anything else is an error naming the file and line."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line, s in enumerate(f, 1):
            if not s.strip() or s.lstrip().startswith("#"):
                continue
            m = re.fullmatch(r"""([A-Za-z_]\w*):[ \t]*"""
                             r"""(?:"([^"\\]*)"|'([^'\\]*)'|([^"'#\[\]{}&*!|>%@`\s][^#]*?))"""
                             r"""[ \t]*(?:#.*)?""", s.rstrip("\r\n"))
            if not m:
                raise DataError(f"{path}:{line}: not a simple 'KEY: value' line: {s.strip()!r}")
            out[m.group(1)] = next(g for g in m.groups()[1:] if g is not None)
    return out


def read_vlc(root, version="v1"):
    """VL-CheckList: every corpus/<version>/<Category>/.../<name>.yaml under `root` (the folder
    holding corpus/ and data/, where the authors run) -> {(sub-category, name): [(image path, POS,
    NEG)]}.  ANNO_PATH is relative to root; its JSON is a list of [image, {"POS": [..], "NEG":
    [..]}]; the image is IMG_ROOT/image, IMG_ROOT relative to root unless absolute (hake/, swig/,
    vg/)."""
    base = os.path.join(root, "corpus", version)
    if not os.path.isdir(base):
        raise DataError(f"{base}: folder not found")
    out = {}
    for d, dirs, files in os.walk(base):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".yaml")):
            path = os.path.join(d, name)
            cfg = read_simple_yaml(path)
            for k in ("ANNO_PATH", "IMG_ROOT"):
                if k not in cfg:
                    raise DataError(f"{path}: missing key '{k}'")
            if cfg.get("TYPE", "TUPLE_JSON") != "TUPLE_JSON":
                raise DataError(f"{path}: TYPE {cfg['TYPE']!r}; only TUPLE_JSON is published")
            anno, items = os.path.join(root, cfg["ANNO_PATH"]), []
            for i, r in enumerate(_load_json(anno)):
                try:
                    img, t = r
                    pos, neg = list(t["POS"]), list(t["NEG"])
                except (KeyError, TypeError, ValueError):
                    img = pos = neg = None
                if not (pos and neg and isinstance(img, str)):
                    raise DataError(f"{anno}: record {i}: not [image, {{POS: [..], NEG: [..]}}]")
                items.append((os.path.join(root, cfg["IMG_ROOT"], img), pos, neg))
            out[(os.path.relpath(d, base).replace(os.sep, "/"), name[:-5])] = items
    if not out:
        raise DataError(f"{base}: no corpus .yaml files")
    return out


def read_winoground(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    recs = []
    with open(path, encoding="utf-8") as f:
        for line, s in enumerate(f, 1):
            if s.strip():
                r = json.loads(s)
                for k in ("id", "caption_0", "caption_1", "image_0", "image_1"):
                    if k not in r:
                        raise DataError(f"{path}:{line}: missing field '{k}'")
                recs.append(r)
    return recs


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def read_class_names(folder, classes):
    """The name a zero-shot prompt says for each class folder: <folder>/classnames.txt lines "<folder> <name>"
    (ImageNet's LOC_synset_mapping.txt layout, "n01440764 tench, Tinca tinca": the first name is kept), else the
    folder name with '_' read as a space (CIFAR-100's "aquarium_fish")."""
    names = {c: c.replace("_", " ") for c in classes}
    for fn in ("classnames.txt", "LOC_synset_mapping.txt"):
        path = os.path.join(folder, fn)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    key, _, name = line.strip().partition(" ")
                    if key in names and not name.split(",")[0].strip():
                        raise DataError(f"{path}: line {n}: no name after {key!r}")
                    if key in names:
                        names[key] = name.split(",")[0].strip()
            break
    return [names[c] for c in classes]


def read_image_folder(folder):
    """A classification dataset in the ImageFolder layout (ImageNet's train/ and val/, and what
    `data/convert.py cifar` writes): <folder>/{train,val or test}/<class>/<image>.  -> {"classes": [folder
    names], "names": [prompt names], "templates": [...], "train": [(path, label)] (may be empty), "test": [...]};
    templates.txt (one prompt per line with "{}") else "a photo of a {}."."""
    test = next((os.path.join(folder, s) for s in ("test", "val") if os.path.isdir(os.path.join(folder, s))), "")
    if not test:
        raise DataError(f"{folder}: no test/ or val/ folder of class folders")
    splits = [d for d in (os.path.join(folder, "train"), test) if os.path.isdir(d)]
    classes = sorted({c for d in splits for c in os.listdir(d) if os.path.isdir(os.path.join(d, c))})
    if len(classes) < 2:  # one label space for both splits: a class may lack images in one of them
        raise DataError(f"{folder}: {len(classes)} class folder(s); a classification set needs at least 2")

    def items(split):
        return [(os.path.join(split, c, f), k) for k, c in enumerate(classes) if os.path.isdir(os.path.join(split, c))
                for f in sorted(os.listdir(os.path.join(split, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
    templates = ["a photo of a {}."]
    if os.path.isfile(os.path.join(folder, "templates.txt")):
        with open(os.path.join(folder, "templates.txt"), encoding="utf-8") as f:
            templates = [t.strip() for t in f if "{}" in t] or templates
    out = {"classes": classes, "names": read_class_names(folder, classes), "templates": templates,
           "train": items(os.path.join(folder, "train")) if len(splits) == 2 else [], "test": items(test)}
    if not out["test"]:
        raise DataError(f"{test}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return out


# ================================================================================================ Runners
# reader + scorer + scoring rule

def _finite(*arrays):
    keep = np.all([np.isfinite(a) for a in arrays], axis=0)
    return keep


def eval_retrieval(sc, path, image_root):
    from common.metrics import retrieval_recall
    images, texts, txt2img, img2txts = read_retrieval(path)
    img = sc.images([(os.path.join(image_root, p), None) for p in images])  # (N_img, D)
    ok = ~torch.isnan(img).any(1)  # unreadable images leave the set together with their captions
    keep_txt = [j for j, i in enumerate(txt2img) if ok[i]]
    new_id = (torch.cumsum(ok.long(), 0) - 1).tolist()
    sim = img[ok] @ sc.texts([texts[j] for j in keep_txt]).t()  # (N_img, N_txt)
    pos = {j: n for n, j in enumerate(keep_txt)}
    return retrieval_recall(sim.numpy(), [new_id[txt2img[j]] for j in keep_txt],
                            [[pos[j] for j in ts] for i, ts in enumerate(img2txts) if ok[i]])


def eval_aro(sc, root, min_pair_count=25):
    """VG-Relation (relations of VG_R_EXCLUDED left out of the macro) and VG-Attribution (attribute
    pairs, aro_attribute_pair, with >= min_pair_count cases), each case an image region with its
    true and its swapped caption.  Also the accuracy of each relation ("vg_relation/<relation>",
    all of them) and of each attribute pair ("vg_attribution/<attr>_<attr>"), as ARO's
    evaluate_scores records."""
    out = {}
    for name, group_of, kw in (
            ("vg_relation", lambda r: r["relation_name"], {"exclude": VG_R_EXCLUDED}),
            ("vg_attribution", aro_attribute_pair, {"min_count": min_pair_count})):
        kind = name.split("_")[1]
        recs = read_aro_vg(os.path.join(root, "aro", f"visual_genome_{kind}.json"), kind)
        refs = [(os.path.join(root, "aro", "images", r["image_path"]),
                 (r["bbox_x"], r["bbox_y"], r["bbox_w"], r["bbox_h"])) for r in recs]
        pos = sc.pair_scores(refs, [r["true_caption"] for r in recs])
        neg = sc.pair_scores(refs, [r["false_caption"] for r in recs])
        keep = _finite(pos, neg)
        res = score_vg(pos[keep], neg[keep], [group_of(r) for r, k in zip(recs, keep) if k], **kw)
        per = res.pop("per_group")
        out.update({f"{name}_{k}": v for k, v in res.items()})
        out.update({f"{name}/{g}": per[g] for g in sorted(per)})
    return out


def order_name(path):
    """eval_order's key prefix: flickr30k_order for a Flickr30k file (by name), else coco_order."""
    return "flickr30k_order" if "flickr" in os.path.basename(path) else "coco_order"


def eval_order(sc, path, image_root, seeds=5, tagger=None, name=""):
    """COCO-/Flickr30k-Order: 5 options per (image, caption); P@1 mean +- std over `seeds` draws.
    Keys "<name>_p1", ...; name "" = order_name(path).  "<name>/tagger" names the part-of-speech
    tagger the perturbations used (nltk or rule: --tagger auto picks by what is installed, and
    the two perturb differently); a nested key, so the report's bar charts leave it out.  A
    perturbation may return a short caption unchanged; ARO (model_zoo/clip_models.py np.einsum,
    aro_datasets.py argmax) then ties it with the original and picks the original, so here an
    option whose text is the original's gets the original's score exactly (a batched einsum
    rounds rows differently).  "<name>_n" counts the scored cases, those of unreadable images
    left out, as the other benchmarks' n."""
    tagger = tagger or make_tagger("auto")
    refs, caps = [], []
    for img, cs in read_caption_sets(path):
        for c in cs:
            refs.append((os.path.join(image_root, img), None))
            caps.append(c)
    img_emb = sc.images(refs)  # (K, D)
    p1 = []
    for seed in range(seeds):
        rng = random.Random(seed)
        options = [[pre_caption(c)] + [pre_caption(f(c, tagger, rng)) for f in ORDER_PERTURBATIONS]
                   for c in caps]
        txt = sc.texts([o for opts in options for o in opts]).reshape(len(caps), 5, -1)  # (K, 5, D)
        s = (img_emb[:, None, :] * txt).sum(-1).numpy()  # (K, 5)
        same = np.array([[o == opts[0] for o in opts] for opts in options]).reshape(-1, 5)
        s = np.where(same, s[:, :1], s)
        keep = np.isfinite(s).all(1)
        p1.append(score_order(s[keep]))
    name, n = name or order_name(path), int(torch.isfinite(img_emb).all(1).sum())
    return {f"{name}_p1": float(np.mean(p1)), f"{name}_p1_std": float(np.std(p1)),
            f"{name}_n": n, f"{name}/tagger": getattr(tagger, "name", str(tagger))}


def eval_sugarcrepe(sc, root):
    data = read_sugarcrepe(os.path.join(root, "sugarcrepe"))
    per = {}
    for cat, rows in data.items():
        refs = [(os.path.join(root, "sugarcrepe", "val2017", fn), None) for fn, _, _ in rows]
        pos = sc.pair_scores(refs, [c for _, c, _ in rows])
        neg = sc.pair_scores(refs, [n for _, _, n in rows])
        keep = _finite(pos, neg)
        per[cat] = (pos[keep], neg[keep])
    return score_sugarcrepe(per)


def eval_crepe(sc, root):
    out, ranks_by_type = {}, {}
    data = read_crepe(os.path.join(root, "crepe"))

    def ref(r):
        return _crepe_image(os.path.join(root, "crepe"), r["image_id"]), r["box"]
    sc.images([ref(r) for rows in data.values() for r in rows])  # all at once, in large batches
    sc.texts([t for rows in data.values() for r in rows for t in [r["caption"], *r["negs"]]])
    for (typ, n), rows in data.items():
        img = sc.images([ref(r) for r in rows])
        true = (img * sc.texts([r["caption"] for r in rows])).sum(-1).numpy()  # (K,)
        negs = [(img[k:k + 1] * sc.texts(r["negs"])).sum(-1).numpy() if r["negs"] else np.zeros(0)
                for k, r in enumerate(rows)]  # no negative left (read_crepe): the caption ranks first
        keep = np.isfinite(true)
        ranks = crepe_ranks(true[keep], [x for x, k in zip(negs, keep) if k])
        res = score_crepe(ranks)
        out.update({f"{typ}_c{n}_{k}": v for k, v in res.items()})
        ranks_by_type.setdefault(typ, []).extend(ranks.tolist())
    for t, v in ranks_by_type.items():  # every complexity of a type pooled: R@1 and its std
        hit = np.asarray(v) < 1
        out.update({f"{t}_R@1": float(hit.mean()), f"{t}_R@1_std": float(hit.std())})
    return out


def eval_svo(sc, root):
    folder = os.path.join(root, "svo_probes")
    rows = read_svo(os.path.join(folder, "svo_probes.csv"))
    img = lambda i: os.path.join(folder, "images", f"{i}.jpg")
    have = [r for r in rows
            if os.path.isfile(img(r["pos_image_id"])) and os.path.isfile(img(r["neg_image_id"]))]
    if not have:
        raise DataError(f"{folder}/images: none of the {len(rows)} SVO image pairs is present")
    sentences = [r["sentence"] for r in have]
    pos = sc.pair_scores([(img(r["pos_image_id"]), None) for r in have], sentences)
    neg = sc.pair_scores([(img(r["neg_image_id"]), None) for r in have], sentences)
    keep = _finite(pos, neg)
    kept = [r for r, k in zip(have, keep) if k]
    out = score_svo(pos[keep], neg[keep], [r["kind"] for r in kept],
                    [(r["sentence"], r["pos_image_id"], r["neg_image_id"]) for r in kept])
    out["coverage"] = len(have) / len(rows)  # many SVO URLs are dead (svo_probes issue #1)
    return out


def eval_winoground(sc, root):
    folder = os.path.join(root, "winoground")
    recs = read_winoground(os.path.join(folder, "examples.jsonl"))
    refs = [(os.path.join(folder, "images", f"{r[f'image_{i}']}.png"), None)
            for r in recs for i in (0, 1)]
    img = sc.images(refs).reshape(len(recs), 2, -1)  # (N, 2, D)
    txt = sc.texts([r[f"caption_{c}"] for r in recs for c in (0, 1)])
    txt = txt.reshape(len(recs), 2, -1)  # (N, 2, D)
    s = torch.einsum("ncd,nid->nci", txt, img).numpy()  # (N, caption, image)
    keep = np.isfinite(s).all((1, 2))
    out = score_winoground(s[keep])
    for tag in sorted({r.get("collapsed_tag", "") for r in recs} - {""}):
        m = np.array([r.get("collapsed_tag") == tag for r in recs]) & keep
        out.update({f"{tag}_{k}": v for k, v in score_winoground(s[m]).items() if k != "n"})
    return out


def eval_vlc(sc, root, max_num=0):
    """VL-CheckList from <root>/vl_checklist (corpus/, data/, hake/ swig/ vg/).  As the authors'
    loader, cases whose image file is absent are dropped (reported as coverage), and only the first
    POS and the first NEG caption of a case are compared.  max_num > 0 keeps the first
    max_num // 2 present cases of each file, as their itc evaluation does with its MAX_NUM (2000 in
    configs/sample.yaml); the default, a deviation from that config, scores every case."""
    folder = os.path.join(root, "vl_checklist")
    data = read_vlc(folder)
    have = {k: [it for it in v if os.path.isfile(it[0])] for k, v in data.items()}
    n_all, n_have = sum(map(len, data.values())), sum(map(len, have.values()))
    if not n_have:
        raise DataError(f"{folder}: none of the {n_all} VL-CheckList images is present")
    if max_num:
        have = {k: v[:max_num // 2] for k, v in have.items()}
    sc.images(sorted({(p, None) for v in have.values() for p, _, _ in v}))  # at once: large batches
    per = {}
    for key, items in have.items():
        if not items:
            continue
        refs = [(p, None) for p, _, _ in items]
        pos = sc.pair_scores(refs, [ps[0] for _, ps, _ in items])
        neg = sc.pair_scores(refs, [ns[0] for _, _, ns in items])
        keep = _finite(pos, neg)
        per[key] = (pos[keep], neg[keep])
    out = score_vlc(per)
    out["coverage"] = n_have / n_all
    return out


def eval_classification(sc, root, seed=0, log=print):
    """Every dataset folder under <root>/classification: zero-shot top-1 (top-5 when there are more than 5
    classes) with each class's prompt embeddings averaged and re-normalised (CLIP's prompt ensembling); with a
    train/ split also a linear-probe top-1.  Unreadable images leave the set.  The datasets are the user's
    choice (CIFAR, ImageNet, ...): without the folder this benchmark says so and scores nothing."""
    folder = os.path.join(root, "classification")
    if not os.path.isdir(folder):
        log(f"classification: no {folder} (ImageFolder datasets; data/convert.py cifar), skipped")
        return {}
    sets = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not sets:
        raise DataError(f"{folder}: no dataset folders (<name>/test/<class>/<image>; data/convert.py cifar)")
    out = {}
    for name in sets:
        data = read_image_folder(os.path.join(folder, name))
        C, prompts = len(data["classes"]), data["templates"]
        txt = sc.texts([t.format(c) for c in data["names"] for t in prompts]).reshape(C, len(prompts), -1)
        cls = torch.nn.functional.normalize(txt.mean(1), dim=-1)  # (C, D)

        def split(items):
            x, y = sc.images([(p, None) for p, _ in items]), torch.tensor([k for _, k in items])
            ok = ~torch.isnan(x).any(1)
            return x[ok], y[ok]
        x, y = split(data["test"])
        logits = x @ cls.t()  # (N, C)
        out[f"{name}_zeroshot_top1"] = classification_accuracy(logits, y)
        if C > 5:
            out[f"{name}_zeroshot_top5"] = classification_accuracy(logits, y, 5)
        if data["train"]:
            out[f"{name}_probe_top1"], lam = linear_probe(*split(data["train"]), x, y, C, seed)
            out[f"{name}_probe_log10_lambda"] = round(math.log10(lam), 3)
        out[f"{name}_n"] = len(y)
    return out


BENCHMARKS = ("retrieval", "aro", "order", "sugarcrepe", "crepe", "svo", "winoground", "vlc", "classification")
# under bench_root: a benchmark without its folder is skipped (SVO's images are downloaded apart)
BENCHMARK_FOLDERS = {"aro": "aro", "sugarcrepe": "sugarcrepe", "crepe": "crepe",
                     "svo": os.path.join("svo_probes", "images"), "winoground": "winoground",
                     "vlc": "vl_checklist"}


def dataset_name(path):
    """A retrieval / order file's dataset: coco or flickr30k by its name (BLIP's coco_karpathy_test.json,
    flickr30k_test.json), else the file's stem."""
    base = os.path.basename(path).lower()
    return "flickr30k" if "flickr" in base else "coco" if "coco" in base else base.split(".")[0]


def file_list(files, roots, what):
    """--<what>_file as a comma list (COCO and Flickr30k in one eval) and --<what>_image_root as one root
    for all or a comma list of as many -> [(dataset name, file, image root)]; names made unique by
    the file stems when dataset_name gives two files the same (numbered when stems clash too)."""
    fs, rs = files.split(","), roots.split(",")
    rs = rs * len(fs) if len(rs) == 1 else rs
    if len(rs) != len(fs):
        raise ValueError(f"--{what}_image_root: {len(rs)} roots for {len(fs)} --{what}_file files")
    names = [dataset_name(f) for f in fs]
    if len(set(names)) < len(names):
        names = [os.path.basename(f).split(".")[0] for f in fs]
    if len(set(names)) < len(names):  # (e.g. two test.json of two folders)
        names = [f"{n}{i + 1}" for i, n in enumerate(names)]
    return list(zip(names, fs, rs))


def run_benchmarks(sc, names, bench_root, retrieval_file="", retrieval_image_root="",
                   order_file="", order_image_root="", order_seeds=5, aro_min_pair_count=25,
                   tagger=None, log=print, vlc_max_num=0):
    """Run the listed benchmarks with Scorer `sc` -> flat {"bench/metric": value}.  bench_root holds
    aro/ sugarcrepe/ crepe/ svo_probes/ winoground/ vl_checklist/ in their published layouts and
    classification/<dataset>/ ImageFolders.  retrieval_file / order_file may be comma lists (file_list;
    retrieval keys then start with the dataset: "retrieval/flickr30k_txt_r1"; order keys always name
    it, "order/coco_order_p1", or file_list's name when two files would both be coco or flickr30k:
    "order/coco_karpathy_val_order_p1").  A benchmark whose folder (or file: retrieval, order; SVO:
    its images/ too, downloaded apart) is absent is skipped with one log line, so the others are
    still scored and written; bad data in a present one is an error."""
    need = {b: os.path.join(bench_root, d) for b, d in BENCHMARK_FOLDERS.items()}  # (classification:
    sets = {"retrieval": file_list(retrieval_file, retrieval_image_root, "retrieval"),  # its own)
            "order": file_list(order_file, order_image_root, "order")}
    clash = len({order_name(f) for _, f, _ in sets["order"]}) < len(sets["order"])

    def per_set(b, run):  # retrieval / order: each file that exists; several: keys by dataset
        out, many = {}, len(sets[b]) > 1
        for name, path, root in sets[b]:
            if not os.path.isfile(path):
                log(f"{b}: no {path or f'--{b}_file'}, skipped")
                continue
            res = run(path, root, name)
            out.update({f"{name}_{k}" if many and b == "retrieval" else k: v for k, v in res.items()})
        return out
    runners = {"retrieval": lambda: per_set("retrieval", lambda f, r, n: eval_retrieval(sc, f, r)),
               "aro": lambda: eval_aro(sc, bench_root, aro_min_pair_count),
               "order": lambda: per_set("order", lambda f, r, n: eval_order(
                   sc, f, r, order_seeds, tagger, f"{n}_order" * clash)),
               "sugarcrepe": lambda: eval_sugarcrepe(sc, bench_root),
               "crepe": lambda: eval_crepe(sc, bench_root), "svo": lambda: eval_svo(sc, bench_root),
               "winoground": lambda: eval_winoground(sc, bench_root),
               "vlc": lambda: eval_vlc(sc, bench_root, vlc_max_num),
               "classification": lambda: eval_classification(sc, bench_root, log=log)}
    res = {}
    for b in names:
        if b not in runners:
            raise ValueError(f"unknown benchmark {b!r}; choose from {list(BENCHMARKS)}")
        if b in need and not os.path.exists(need[b]):
            log(f"{b}: no {need[b]}, skipped")
            continue
        res.update({f"{b}/{k}": v for k, v in runners[b]().items()})
    if sc.images_seen.bad:
        res["unreadable_images"] = sc.images_seen.bad
        sc.images_seen.check(final=True)
    log(f"eval: {sc.images_seen.report()}")
    return res


def format_table(res):
    wb, wm = (max([w] + [len(k.split("/", 1)[i]) for k in res if "/" in k]) for i, w in ((0, 12), (1, 28)))
    lines = [f"{'benchmark':<{wb}} {'metric':<{wm}} {'value':>9}", "-" * (wb + wm + 11)]
    for k, v in res.items():
        b, _, m = k.partition("/")
        lines.append(f"{b:<{wb}} {m:<{wm}} " + (f"{v:>9.4f}" if isinstance(v, float) else f"{v:>9}"))
    return "\n".join(lines)

