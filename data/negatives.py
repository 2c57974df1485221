"""NegCLIP's preparation: hard negative captions, ARO order perturbations, neighbour images.

What NegCLIP trains on (Yuksekgonul et al., ICLR 2023, arXiv 2210.01936, Sec. 4; released data and
code: github.com/vinid/neg_clip and github.com/mertyg/vision-language-models-are-bows): every
training caption gets up to six hard negative captions, each made by swapping two units of the
caption (two noun chunks, two verb phrases, two singular nouns, two plural nouns, two adverbs or two
adjectives; the authors' negative-generation script with spaCy), and every row gets its k nearest
neighbour images in a CLIP image space.  The result is the released layout `train_neg_clip.tsv`
(index, title, filepath, neg_caption, neg_image) that negclip.py reads.

The authors tag with spaCy's en_core_web_lg; offline there is no spaCy model, so a small
deterministic rule tagger (closed classes, a lexicon of caption words, suffix rules, neighbour-based
disambiguation) stands in, or nltk's perceptron tagger when its data is installed.  The same tagger
drives ARO's order perturbations (ARO dataset_zoo/perturbations.py), used by data/benchmarks.py for
COCO-/Flickr-Order.

`ensure_mined(...)` / `mine(...)` are the prepare step behind `python negclip.py --mode mine`
(negclip.py passes its image encoder as a callback); the mined TSV carries a sidecar
`<tsv>.key.json` naming its inputs, so a cached TSV is reused only for the same train file, image
root, model, image features (transform, precision, pooling) and mining settings.  `excluded_images`
reads `--exclude_images` (benchmark images kept out of training): `ensure_mined` drops them before
mining, `training_rows` from the TSV's rows before training.
`NegativeShardStream` gives webdataset shards (`--train_shards`) the same swaps on the fly
(`shard_batches`: negclip.py's micro batches of them); `negative_rows` / `score_rows` /
`write_report` make negclip.py's picture report; `resolve_paths` fills negclip.py's empty paths
from the toy world; `vision_preprocessing` reads a vision tower's input size and normalisation.
"""
import ast
import csv
import hashlib
import json
import math
import os
import random
import re
import zlib

import numpy as np
import torch

from common import dist as D
from common.data import DataError, ImageFolderLoader, ShardStream, read_pairs, stream_loader
from common.image import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, load_image


# ================================================================================================ Tagger
# Tokeniser: words (internal hyphens, o'clock), numbers, Penn-style clitics ('s, n't), each
# punctuation mark.  Words are of any script ("café" is one word, not "caf" + "é", which the tagger
# read as two nouns); the typographic apostrophe (’) works as ' does ("It’s" -> "It", "’s").
_L, _A, _Q = r"[^\W\d_]", r"[^\W_]", "['\u2019]"  # a letter, a letter or digit, an apostrophe
_TOKEN_RE = re.compile(
    rf"(?i){_L}+(?=n{_Q}t\b)|n{_Q}t\b|{_Q}(?:s|re|ve|ll|m|d)\b|\d+(?:[.,:]\d+)*|"
    rf"{_A}+(?:-{_A}+)*(?:{_Q}(?!(?:s|re|ve|ll|m|d)\b){_L}+)*|[^\s\w]|_")


def tokenize(text):
    return _TOKEN_RE.findall(text)


def _low(token):
    """The form the lexicon and the closed classes are looked up by: lower case, ' for ’."""
    return token.lower().replace("\u2019", "'")


# Closed classes win over everything (Penn tags).
_CLOSED = {}
for _tag, _words in {
    "DT": "a an the this that these those some any each every no another all both either neither",
    "PRP$": "his her its their my your our",
    "PRP": "he she it they them him we you i me us himself herself itself themselves someone "
           "something somebody everyone everything nothing anyone",
    "CD": "one two three four five six seven eight nine ten eleven twelve twenty dozen hundred",
    "IN": "in on at of with by near under over above below behind beside besides between among "
          "across along around through into onto from for about against inside outside off down "
          "out past toward towards upon within without underneath beneath atop like during after "
          "before while than as via up",
    "TO": "to", "CC": "and or but nor", "MD": "can could will would shall should may might must",
    "WDT": "what which whose", "WP": "who whom", "WRB": "where when why how", "EX": "there",
    "RB": "not n't very together just still away almost also too so here yet again well ever "
          "never always often soon now then quite rather instead ahead apart alone else already "
          "once twice forward sideways backwards",  # (adverbs the suffix rules would make NN)
    "POS": "'s", "VBZ": "is has does", "VBP": "are am have do 're 'm 've",
    "VBD": "was were had did",
    "VB": "be", "VBN": "been", "VBG": "being",
}.items():
    for _w in _words.split():
        _CLOSED[_w] = _tag
_AUX = set("is are am was were be been being has have had do does did 're 'm 've 's".split())
_RB_JJ = {"far", "only", "even"}  # adjectives after a determiner ("the far side"), else adverbs

# Multiword prepositions are tagged IN as a whole, so "left"/"front"/"top" are never swapped as
# nouns (spaCy would tag them NN; ours is the cleaner negative).  Longest first.  ARO's order
# perturbations (multiword=False) tag them as spaCy does instead: the noun after the phrase's
# first word NN ("in front of", "to the left of"), "the" DT, "other" JJ.
_MULTI_PREP = sorted([p.split() for p in (
    "next to|in front of|on top of|to the left of|to the right of|on the left of|on the right of|"
    "left of|right of|on the side of|in the middle of|on the other side of|close to|out of|"
    "in between").split("|")],
    key=len, reverse=True)
_PREP_NOUN = {"front": "NN", "top": "NN", "left": "NN", "right": "NN", "side": "NN", "middle": "NN",
              "the": "DT", "other": "JJ"}

_ADJ = set("""red blue green yellow white black brown orange purple pink gray grey silver golden
gold dark bright tan beige large small big little tiny huge tall short long giant medium old young
new elderly wooden metal metallic plastic round square rectangular triangular circular oval empty
full open closed clean dirty wet dry hot cold warm happy busy cloudy sunny snowy grassy sandy rocky
striped colorful shiny fresh ripe pretty beautiful cute nice other same different single double
first second third various modern fancy plain assorted blurry wild lush leafy crowded adult female
male professional fluffy furry middle cramped homeless advanced close ready off wide narrow thick
thin heavy light soft hard high low deep shallow fat skinny smiling asian lone huge clear calm rainy
foggy stainless glazed fried baked grilled""".split())
_NOUN = """person man woman boy girl child kid baby guy lady player skier surfer skateboarder people
bicycle bike car motorcycle motorbike moped airplane plane jet bus train truck boat ship traffic
light fire hydrant stop sign parking meter bench bird cat dog horse sheep cow elephant bear zebra
giraffe backpack umbrella handbag bag tie suitcase frisbee ski snowboard ball kite bat glove
skateboard surfboard racket racquet bottle glass cup mug fork knife spoon bowl banana apple sandwich
orange broccoli carrot hot dog pizza donut doughnut cake pie chair couch sofa plant bed table toilet
tv television laptop computer mouse remote keyboard phone microwave oven toaster sink refrigerator
fridge book clock vase scissors teddy hair drier dryer toothbrush tree sky grass building window
wall street road field water snow sand beach ocean sea wave hill mountain cloud sun shirt pants hat
cap jacket coat shoe helmet head hand arm leg face eye ear nose mouth tail wheel door floor ground
plate food room kitchen bathroom counter shelf picture photo image fence pole track sidewalk walk
area top side front back background city park air wood tile mirror lamp pillow blanket box court net
game shower towel curtain rock leaf flower bush vehicle desk screen monitor camera house home
restaurant store market vegetable fruit meat cheese bread dish pan pot stove station passenger
headlight railroad fountain faucet control panel space combination cart cash apron pizza
baker dough wall fixture post appliance trick air athlete commuter view circle square triangle star
cross diamond heart hexagon ring rectangle shape object thing scene canvas umbrella yak hydrant
street corner crowd group team family pair couple bunch lot number variety side middle edge bottom
row line piece slice shopping stand display left right corner""".split()
_VERB = """sit stand hold ride eat walk run play look lay lie sleep drink fly carry wear watch wait
park cross cut throw catch hit swing talk smile pose prepare cook use take make read fill cover
surround rest hang lean grow graze drive travel pull push kick jump skate ski surf swim float line
display show place put stack pile top stuff slice serve feed pet hug kiss open close climb move go
come leave enter perch reach point face work try get give set stop land fix paint decorate dress tie
brush pour bite chew lick sniff fall check build attach mount block load pass pack pick buy sell
wash clean wave celebrate share enjoy blow beg roll chain lock perform board head see stare glance
gather hover fly follow lead approach dive dig splash sail paddle steer""".split()
_IRREGULAR_VERB = {"sat": "sit", "stood": "stand", "held": "hold", "rode": "ride", "ridden": "ride",
                   "ate": "eat", "eaten": "eat", "ran": "run", "lay": "lie", "lain": "lie",
                   "laid": "lay", "slept": "sleep", "drank": "drink", "drunk": "drink",
                   "flew": "fly", "flown": "fly", "wore": "wear", "worn": "wear", "caught": "catch",
                   "swung": "swing", "took": "take", "taken": "take", "made": "make",
                   "hung": "hang", "grew": "grow", "grown": "grow", "drove": "drive",
                   "driven": "drive", "threw": "throw", "thrown": "throw", "went": "go",
                   "gone": "go", "came": "come", "left": "leave", "got": "get", "gave": "give",
                   "given": "give", "fed": "feed", "built": "build", "bought": "buy",
                   "sold": "sell", "fell": "fall", "fallen": "fall", "bit": "bite",
                   "bitten": "bite", "blew": "blow", "blown": "blow", "lit": "light",
                   "swam": "swim", "shown": "show", "seen": "see", "saw": "see", "led": "lead",
                   "dug": "dig"}
_IRREGULAR_PLURAL = {"man": "men", "woman": "women", "person": "people", "child": "children",
                     "foot": "feet", "tooth": "teeth", "mouse": "mice", "sheep": "sheep",
                     "knife": "knives", "leaf": "leaves", "shelf": "shelves",
                     "scissors": "scissors", "pants": "pants", "people": "people", "fish": "fish",
                     "deer": "deer"}
_DOUBLE = set("sit run cut put get set swim hit stop pet hug skip drop step plan jog wrap dip chop "
              "grab drag nap tap pat rub spin begin sip trim knit dig".split())


def _plural(w):
    if w in _IRREGULAR_PLURAL:
        return _IRREGULAR_PLURAL[w]
    if re.search(r"(s|x|z|ch|sh)$", w):
        return w + "es"
    if re.search(r"[^aeiou]y$", w):
        return w[:-1] + "ies"
    return w + "s"


def _verb_forms(v):
    """base -> {form: Penn tag} with regular inflection rules (+ the doubling list)."""
    s = _plural(v) if v not in ("go", "do") else v + "es"
    if v.endswith("ie"):
        ing = v[:-2] + "ying"
    elif v.endswith("e") and not v.endswith(("ee", "ye", "oe")):
        ing = v[:-1] + "ing"
    elif v in _DOUBLE:
        ing = v + v[-1] + "ing"
    else:
        ing = v + "ing"
    if v.endswith("e"):
        ed = v + "d"
    elif re.search(r"[^aeiou]y$", v):
        ed = v[:-1] + "ied"
    elif v in _DOUBLE:
        ed = v + v[-1] + "ed"
    else:
        ed = v + "ed"
    return {v: "VB", s: "VBZ", ing: "VBG", ed: "VBN"}


def _build_lexicon():
    """form -> set of Penn tags (open classes).  Ambiguous words get several readings."""
    lex = {}

    def add(w, t):
        lex.setdefault(w, set()).add(t)
    for w in _ADJ:
        add(w, "JJ")
    for w in _NOUN:
        add(w, "NN")
        if w not in ("scissors", "pants", "people"):
            add(_plural(w), "NNS")
        else:
            add(w, "NNS")
    for w in ("scissors", "pants", "people"):  # plural only (Penn NNS): no NN reading
        lex[w].discard("NN")
    for v in _VERB:
        for form, tag in _verb_forms(v).items():
            add(form, tag)
    for form, base in _IRREGULAR_VERB.items():
        add(form, "VBD")
        add(form, "VBN")
    return lex


_LEXICON = _build_lexicon()
_COARSE = {"NN": "NOUN", "NNS": "NOUN", "NNP": "NOUN", "NNPS": "NOUN", "JJ": "ADJ", "JJR": "ADJ",
           "JJS": "ADJ", "RB": "ADV", "RBR": "ADV", "RBS": "ADV", "DT": "DET", "PDT": "DET",
           "PRP$": "PRON", "WDT": "DET", "CD": "NUM", "IN": "ADP", "TO": "PART", "CC": "CCONJ",
           "MD": "AUX", "PRP": "PRON", "WP": "PRON", "WRB": "ADV", "EX": "PRON", "POS": "PART",
           "RP": "ADP"}


def coarse(token, tag):
    """Penn tag -> universal-style coarse tag; be/have/do are AUX (the verb-phrase pattern), not/n't
    PART (as spaCy: neither an adverb swap nor part of a verb phrase)."""
    if _low(token) in ("not", "n't"):
        return "PART"
    if tag.startswith("VB"):
        return "AUX" if _low(token) in _AUX else "VERB"
    return _COARSE.get(tag, "PUNCT" if not any(c.isalnum() for c in token) else "X")


_HAVE_DO = set("has have had having do does did doing".split())


def coarse_tags(tokens, tags):
    """coarse() over a sentence. A have/do form with no verb after it (past adverbs and not) is the
    main verb, VERB, as spaCy tags "a man has a dog"; before a verb ("has eaten", "does not eat")
    it stays AUX. Be stays AUX either way: spaCy tags the copula AUX too."""
    out = [coarse(t, g) for t, g in zip(tokens, tags)]
    for i in reversed(range(len(out))):  # right to left: "does not have a dog" settles "have" first
        if tokens[i].lower() in _HAVE_DO and out[i] == "AUX":
            j = i + 1
            while j < len(out) and out[j] in ("ADV", "PART"):
                j += 1
            if j == len(out) or out[j] not in ("VERB", "AUX"):
                out[i] = "VERB"
    return out


def _suffix_tags(w):
    """Unknown words: suffix rules, default NN."""
    if w.isdigit() or re.fullmatch(r"\d+(?:[.,:]\d+)*", w):
        return {"CD"}
    if w.endswith("ly") and len(w) > 4:
        return {"RB"}
    if w.endswith("ing") and len(w) > 5:
        return {"VBG", "NN"}
    if w.endswith("ed") and len(w) > 4:
        return {"VBN", "JJ"}
    adj = w.endswith(("ous", "ful", "ive", "al", "ic", "less", "ish", "able"))
    if (adj or re.search("[^aeiou]y$", w)) and len(w) > 4:  # rocky; vowel + y: runway, jersey
        return {"JJ"}
    if w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        return {"NNS"}
    return {"NN"}


def _mark_multiword_preps(low, tags, multiword=True):
    """Tag every token of a multiword preposition ("in front of") IN, longest match first;
    multiword=False: its words after the first by _PREP_NOUN ("left" is NN there, not a verb)."""
    i = 0
    while i < len(low):
        mw = next((m for m in _MULTI_PREP if low[i:i + len(m)] == m), None)
        if mw:
            tags[i:i + len(mw)] = [_PREP_NOUN.get(w, "IN") if j and not multiword else "IN"
                                   for j, w in enumerate(mw)]
        i += len(mw) if mw else 1
    return tags


class RuleTagger:
    """Deterministic Penn tagger for caption English: closed classes, lexicon, suffix rules, then
    left-to-right disambiguation of ambiguous words by their neighbours.  Used when nltk's tagger
    data (averaged_perceptron_tagger_eng) is not installed -- the usual case offline."""

    name = "rule"

    def tag(self, tokens, multiword=True):
        low = [_low(t) for t in tokens]
        tags = _mark_multiword_preps(low, [None] * len(tokens), multiword)
        cands = [None if tags[i] else self._candidates(w) for i, w in enumerate(low)]
        for i, w in enumerate(low):
            if tags[i] is None:
                nxt = cands[i + 1] if i + 1 < len(low) else None
                tags[i] = self._choose(cands[i], tags[i - 1] if i else None,
                                       low[i - 1] if i else None, nxt, w)
        for i in range(len(low) - 1):  # "to" before a noun phrase is a preposition (IN)
            if tags[i] == "TO" and tags[i + 1] in ("DT", "PRP$", "CD", "NN", "NNS", "JJ", "PRP"):
                tags[i] = "IN"
        return tags

    @staticmethod
    def _candidates(w):
        if w in _CLOSED:
            return {_CLOSED[w]}
        if w in _RB_JJ:
            return {"RB", "JJ"}
        if not any(c.isalnum() for c in w):
            return {"."}
        return set(_LEXICON.get(w) or _suffix_tags(w))

    @staticmethod
    def _choose(c, prev, prev_word, nxt, w):
        if c == {"VB"} and prev in ("DT", "PRP$", "POS", "JJ", "CD"):
            return "NN"  # a verb of the lexicon as a noun: "a stack of", "the skate park"
        if len(c) == 1:
            return next(iter(c))
        if c == {"RB", "JJ"}:
            return "JJ" if prev in ("DT", "PRP$", "POS") else "RB"
        nouns = sorted(t for t in c if t.startswith("NN"))
        order = ["VBG", "VBZ", "VBN", "VBD", "VB"]
        verbs = sorted((t for t in c if t.startswith("VB")), key=order.index)
        adj = "JJ" in c
        next_nounish = bool(nxt) and any(t.startswith("NN") or t == "JJ" for t in nxt) and not (
            nxt and any(t in ("IN", "DT", "TO", "CC", ".") for t in nxt))
        next_det = bool(nxt) and any(t in ("DT", "PRP$", "CD") for t in nxt)
        if prev_word in _AUX and prev != "POS" and adj and not w.endswith(("ing", "ed")):
            return "JJ"  # "the kitchen is clean"
        if prev in ("MD", "TO") or (prev_word in _AUX and prev != "POS"):
            if verbs:  # "is sitting", "to eat", "are parked"
                if prev in ("MD", "TO") and "VB" in c:
                    return "VB"
                return verbs[0]
        if prev in ("NNS", "PRP") and "VB" in c and not next_nounish:
            return "VBP"  # plural subject + base form: "dwellers walk by"
        if prev in ("DT", "CD", "PRP$", "JJ", "POS", "IN", "NN") and next_nounish:
            if adj:
                return "JJ"  # "a square table", "the white shirt"
            if nouns:
                return nouns[0]  # compound modifier: "a fire hydrant" (spaCy tags it NN too)
        if prev in ("DT", "CD", "PRP$", "JJ", "POS", "IN", None, "CC") and nouns and not (
                prev in (None, "CC") and verbs and next_det):
            return nouns[0]
        if prev in ("NN", "NNS", "PRP", "EX", "RB") and verbs and (
                w.endswith(("s", "ing", "ed")) or next_det or not nouns):
            return verbs[0]  # "a dog runs", "man riding a", "cat sits"
        if verbs and next_det:
            return verbs[0]
        if nouns:
            return nouns[0]
        if adj:
            return "JJ"
        return verbs[0] if verbs else sorted(c)[0]


class NltkTagger:
    """nltk's averaged perceptron (Penn tags), when its data is installed; multiword IN as above."""

    name = "nltk"

    def tag(self, tokens, multiword=True):
        import nltk
        low = [_low(t) for t in tokens]
        tags = [t for _, t in nltk.pos_tag([t.replace("\u2019", "'") for t in tokens])]
        return _mark_multiword_preps(low, tags, multiword)


def make_tagger(kind="auto"):
    if kind in ("auto", "nltk"):
        try:
            import nltk
            nltk.data.find("taggers/averaged_perceptron_tagger_eng")
            return NltkTagger()
        except (ImportError, LookupError):
            if kind == "nltk":
                data = "averaged_perceptron_tagger_eng"
                raise RuntimeError(f"--tagger nltk: nltk tagger data '{data}' is not installed "
                                   f"(python -m nltk.downloader {data})")
    return RuleTagger()


# ---- hard negative captions (NegCLIP Sec. 4)

def norm_caption(s):
    """The authors' equality filter: drop '.' and ',', collapse spaces (and case, ours)."""
    return re.sub(r"\s+", " ", s.replace(".", "").replace(",", "")).strip().lower()


def noun_chunks(coarse_tags):
    """Maximal spans DET? NUM? (ADJ|NOUN|ADV before ADJ)* NOUN -> list of (start, end); spaCy's
    noun chunks keep an adjective's adverb too ("a very large dog")."""
    spans, i, n = [], 0, len(coarse_tags)
    while i < n:
        j = i + (coarse_tags[i] == "DET")
        j += j < n and coarse_tags[j] == "NUM"
        k = j
        while k < n and (coarse_tags[k] in ("ADJ", "NOUN") or coarse_tags[k] == "ADV" and
                         k + 1 < n and coarse_tags[k + 1] == "ADJ"):
            k += 1
        last = max((m for m in range(j, k) if coarse_tags[m] == "NOUN"), default=None)
        if last is not None:
            spans.append((i, last + 1))
            i = last + 1
        else:
            i += 1
    return spans


_VP = re.compile("v?a*x*v+")  # VERB? ADV* AUX* VERB+ over verb_phrases' one letter per tag


def verb_phrases(coarse_tags):
    """Spans of VERB? ADV* AUX* VERB+ (the authors' spaCy Matcher pattern) as the authors keep them:
    the Matcher yields every span the pattern matches, overlapping ones too, and spaCy's
    filter_spans (spacy/util.py) keeps the longest first, the earlier of two equally long, and none
    that overlaps a kept one -> list of (start, end) in sentence order.  ("is walking slowly
    carrying": one span, "walking slowly carrying", not "is walking" and "slowly carrying".)"""
    code = "".join({"VERB": "v", "ADV": "a", "AUX": "x"}.get(c, "-") for c in coarse_tags)
    spans = [(i, j) for run in re.finditer("[vax]+", code) for i in range(*run.span())
             for j in range(i + 1, run.end() + 1) if _VP.fullmatch(code, i, j)]
    kept, used = [], set()
    for i, j in sorted(spans, key=lambda s: (s[0] - s[1], s[0])):  # longest, then earliest
        if used.isdisjoint(range(i, j)):
            kept.append((i, j))
            used.update(range(i, j))
    return sorted(kept)


SWAP_TYPES = ("noun_chunk", "verb_phrase", "NN", "NNS", "ADV", "ADJ")


def hard_negatives(caption, tagger, seed=0):
    """Up to six hard negative captions (the authors' generation script): swap two noun chunks of
    more than 2 words, two verb phrases, two NN, two NNS, two adverbs, two adjectives -> list of
    (type, negative).  Deterministic given (caption, seed).  Swaps equal to the caption after the
    filter are dropped; two types' equal swaps are both kept, as the authors' list keeps them."""
    rng = random.Random(f"{seed}|{caption}")  # str seeds hash with sha512: stable across runs
    tokens = tokenize(caption)
    if len(tokens) < 2:
        return []
    tags = tagger.tag(tokens)
    ctags = coarse_tags(tokens, tags)
    out, same = [], norm_caption(caption)

    def keep(kind, new_tokens, lower):
        s = " ".join(new_tokens)
        s = s.lower() if lower else s
        if norm_caption(s) != same:
            out.append((kind, s))

    def swap_spans(spans, kind):
        if len(spans) < 2:
            return
        (a0, a1), (b0, b1) = sorted(rng.sample(spans, 2))
        if [t.lower() for t in tokens[a0:a1]] == [t.lower() for t in tokens[b0:b1]]:
            return  # ours: swapping "a man" with "a man" is no negative
        swapped = tokens[:a0] + tokens[b0:b1] + tokens[a1:b0] + tokens[a0:a1] + tokens[b1:]
        keep(kind, swapped, lower=True)

    # "his skateboard" is a noun chunk too
    chunk_tags = ["DET" if g == "PRP$" else c for g, c in zip(tags, ctags)]
    swap_spans([s for s in noun_chunks(chunk_tags) if s[1] - s[0] > 2], "noun_chunk")
    swap_spans(verb_phrases(ctags), "verb_phrase")
    for kind in ("NN", "NNS", "ADV", "ADJ"):
        if kind == "ADV":
            idx = [i for i, c in enumerate(ctags) if c == "ADV"]
        elif kind == "ADJ":
            idx = [i for i, c in enumerate(ctags) if c == "ADJ"]
        else:
            idx = [i for i, g in enumerate(tags) if g == kind]
        if len(idx) < 2:
            continue
        a, b = rng.sample(idx, 2)
        if tokens[a].lower() == tokens[b].lower():
            continue
        new = list(tokens)
        new[a], new[b] = new[b], new[a]
        keep(kind, new, lower=False)
    return out



# ================================================================================================ ARO order perturbations
# ARO dataset_zoo/perturbations.py, re-done with the tokeniser and tagger above (evaluation only);
# spaCy's tags there move the nouns of "in front of", "to the left of" (tag(multiword=False)).

def _trigrams(tokens):
    return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


def shuffle_nouns_and_adj(caption, tagger, rng):
    tokens = tokenize(caption)
    tags = tagger.tag(tokens, multiword=False)
    for group in (("NN", "NNS", "NNP", "NNPS"), ("JJ", "JJR", "JJS")):
        _shuffle_at(tokens, [i for i, t in enumerate(tags) if t in group], rng)
    return " ".join(tokens)


def _shuffle_at(tokens, idx, rng):
    """Shuffle tokens[i] for i in idx among those positions, in place."""
    vals = [tokens[i] for i in idx]
    rng.shuffle(vals)
    for i, v in zip(idx, vals):
        tokens[i] = v


def shuffle_allbut_nouns_and_adj(caption, tagger, rng):
    tokens = tokenize(caption)
    tags = tagger.tag(tokens, multiword=False)
    _shuffle_at(tokens, [i for i, t in enumerate(tags) if not t.startswith(("NN", "JJ"))], rng)
    return " ".join(tokens)


def shuffle_within_trigrams(caption, tagger, rng):
    tris = _trigrams(tokenize(caption))
    for t in tris:
        rng.shuffle(t)
    return " ".join(w for t in tris for w in t)


def shuffle_trigrams(caption, tagger, rng):
    tris = _trigrams(tokenize(caption))
    rng.shuffle(tris)
    return " ".join(w for t in tris for w in t)


ORDER_PERTURBATIONS = (shuffle_nouns_and_adj, shuffle_allbut_nouns_and_adj, shuffle_within_trigrams,
                       shuffle_trigrams)


# ================================================================================================ NegCLIP TSV
# columns: <index>, title, filepath, neg_caption, neg_image, as the released train_neg_clip.tsv
# (mertyg/vision-language-models-are-bows, temp_data/) that vinid/neg_clip src/training/data.py reads

def read_training_records(path, all_captions=False):
    """-> list of {"image", "caption", "image_id"}: one caption per image (the first) unless
    all_captions. Accepts canonical pairs (.jsonl), a BLIP/Karpathy per-caption list ({"image",
    "caption", "image_id"}), or a Karpathy dataset_*.json (train + restval splits)."""
    if path.endswith(".jsonl"):
        recs = [{"image": r["image"], "captions": r["captions"],
                 "image_id": r.get("image_id", r["image"])} for r in read_pairs(path)]
    else:
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            what = "empty file" if os.path.isfile(path) else "file not found"
            raise DataError(f"{path}: {what}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a JSON file ({e})") from None
        if isinstance(data, dict) and "images" in data:  # Karpathy dataset_coco.json
            recs = [{"image": os.path.join(im.get("filepath", ""), im["filename"]),
                     "captions": [s["raw"].strip() for s in im["sentences"]],
                     "image_id": im.get("cocoid", im["imgid"])}
                    for im in data["images"] if im["split"] in ("train", "restval")]
        elif isinstance(data, list):
            by_id = {}
            for i, r in enumerate(data):
                for k in ("image", "caption"):
                    if k not in r:
                        raise DataError(f"{path}: record {i}: missing field '{k}'")
                caps = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
                e = by_id.setdefault(r.get("image_id", r["image"]),
                                     {"image": r["image"], "captions": []})
                e["captions"] += [c.strip() for c in caps]
            recs = [{"image": e["image"], "captions": e["captions"], "image_id": k}
                    for k, e in by_id.items()]
        else:
            raise DataError(f"{path}: expected a JSON list or a Karpathy dataset file")
    out = []
    for r in recs:
        for c in (r["captions"] if all_captions else r["captions"][:1]):
            out.append({"image": r["image"], "caption": c, "image_id": str(r["image_id"])})
    if not out:
        raise DataError(f"{path}: no training records")
    return out


def write_negclip_tsv(path, rows):
    """Tab-separated like the released train_neg_clip.tsv (pandas to_csv: index column, list
    literals); an extra image_id column (readers pick columns by name)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["", "title", "filepath", "neg_caption", "neg_image", "image_id"])
        for i, r in enumerate(rows):
            w.writerow([i, r["caption"], r["image"], repr(list(r["negs"])),
                        repr([int(j) for j in r["nbrs"]]), r["image_id"]])
    os.replace(tmp, path)


def read_negclip_tsv(path):
    """-> list of {"caption", "image", "negs": [str], "nbrs": [row index], "image_id"}."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for line, r in enumerate(reader, 2):
            try:
                negs, nbrs = ast.literal_eval(r["neg_caption"]), ast.literal_eval(r["neg_image"])
                title, fp = r["title"], r["filepath"]
            except KeyError as e:
                raise DataError(f"{path}:{line}: missing field {e}") from None
            except (ValueError, SyntaxError):
                raise DataError(f"{path}:{line}: field 'neg_caption'/'neg_image' is not a list "
                                "literal") from None
            rows.append({"caption": title, "image": fp, "negs": list(negs),
                         "nbrs": [int(j) for j in nbrs], "image_id": r.get("image_id") or fp})
    if not rows:
        raise DataError(f"{path}: no rows (empty dataset)")
    return rows


def filter_rows(rows, image_root, images, exclude=frozenset()):
    """Drop rows whose image is in `exclude` (image_key values), whose image file is missing or
    that have no negative caption; remap neighbour indices (a dropped neighbour is removed; a row
    left without neighbours is dropped).  Missing files of the other rows count as unreadable
    images in `images` (a common.data.ImageFolderLoader), whose max_bad_frac rule applies."""
    kept = [image_key(r["image"]) not in exclude for r in rows]
    exists = [k and os.path.isfile(os.path.join(image_root, r["image"]))
              for r, k in zip(rows, kept)]
    images.merge({r["image"] for r, k in zip(rows, kept) if k},
                 {r["image"] for r, k, e in zip(rows, kept, exists) if k and not e})
    images.check(final=True)
    ok = [bool(r["negs"]) and e for r, e in zip(rows, exists)]
    changed = True
    while changed:  # dropping rows can empty others' neighbour lists
        changed = False
        for i, r in enumerate(rows):
            if ok[i] and not any(ok[j] for j in r["nbrs"] if 0 <= j < len(rows)):
                ok[i], changed = False, True
    new_index = np.cumsum(ok) - 1
    out = [dict(r, nbrs=[int(new_index[j]) for j in r["nbrs"] if 0 <= j < len(rows) and ok[j]])
           for i, r in enumerate(rows) if ok[i]]
    if not out:
        raise DataError(f"no usable training rows under {image_root}")
    return out, len(rows) - len(out)


def training_rows(cfg, images, log=print):
    """negclip.py's training rows: cfg.train_tsv (mined or released) less the images listed by
    cfg.exclude_images (excluded_images), then filter_rows -> (rows, dropped: all reasons)."""
    rows = read_negclip_tsv(cfg.train_tsv)
    exclude = excluded_images(cfg.exclude_images)
    out, dropped = filter_rows(rows, cfg.image_root, images, exclude)
    if exclude:
        hit = [r["image"] for r in rows if image_key(r["image"]) in exclude]
        log(f"exclude: {len(hit)} of {len(rows)} rows ({len(set(hit))} images) of {cfg.train_tsv} "
            f"dropped, listed in --exclude_images ({len(exclude)} images listed)")
    return out, dropped


# ======================================================================================== Excluded images
# NegCLIP fine-tunes on COCO Karpathy train + restval (arXiv 2210.01936, Sec. 4); SugarCREPE scores
# COCO val2017 images (arXiv 2306.14610), part of which are in those splits.  Neither the paper nor
# vinid/neg_clip (src/training/data.py reads the TSV whole) removes them; --exclude_images does.

def image_key(name):
    """The key an image is matched by: "coco:<id>" for a COCO file name (COCO_val2014_<12 digits>
    .jpg, 2017's <12 digits>.jpg), a bare number or coco_<number> (a COCO id, as BLIP's image_id),
    else the base name of the path."""
    base = os.path.basename(str(name).strip())
    m = re.fullmatch(r"(?:COCO_[a-z]+\d{4}_)?(\d{12})\.\w+|(?:coco_)?(\d+)", base)
    return f"coco:{int(m.group(1) or m.group(2))}" if m else base


def excluded_images(option):
    """--exclude_images: a comma list of list files (one image id, file name or path a line; blank
    lines and '#' comments skipped) and SugarCREPE folders (its <category>.json files: every
    record's "filename") -> set of image_key values; "" -> empty set."""
    keys = set()
    for path in filter(None, (p.strip() for p in option.split(","))):
        if os.path.isdir(path):
            names = [n for n in sorted(os.listdir(path)) if n.endswith(".json")]
            found = []
            for n in names:
                with open(os.path.join(path, n), encoding="utf-8") as f:
                    d = json.load(f)
                found += [r["filename"] for r in (d.values() if isinstance(d, dict) else d)
                          if isinstance(r, dict) and "filename" in r]
            if not found:
                raise DataError(f"{path}: no SugarCREPE <category>.json with 'filename' records")
            keys.update(image_key(n) for n in found)
        elif os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                keys.update(image_key(line) for line in f
                            if line.strip() and not line.lstrip().startswith("#"))
        else:
            raise DataError(f"{path}: --exclude_images file or folder not found")
    return keys


# ================================================================================================ Mining
# NegCLIP Sec. 4 pairs every image with its nearest neighbour images in a CLIP image space (mined
# once, before training; the released TSV lists 3 per row).  Same-image rows are excluded by global
# index.

def nearest_neighbours(x, img_id, k, chunk):
    """x (N, D) normalised, img_id (N,) -> (N, k) int32 indices of the most similar rows that are
    not the row itself and do not share its image id (chunks of rows against all N rows)."""
    n = x.shape[0]
    out = []
    for s in range(0, n, chunk):
        sim = (x[s:s + chunk] @ x.t()).float()  # (c, N)
        rows = torch.arange(s, min(s + chunk, n), device=x.device)
        sim[torch.arange(len(rows), device=x.device), rows] = float("-inf")  # self, by global index
        same = img_id[rows][:, None] == img_id[None, :]  # (c, N): same image (any caption)
        sim.masked_fill_(same, float("-inf"))
        out.append(sim.topk(k, dim=1).indices.int().cpu())
    return torch.cat(out)


# Raised whenever hard_negatives() gives other captions for the same input, so that a TSV mined by an
# older version is mined again (2: words of any script, spaCy's filter_spans for verb phrases).
GENERATOR_VERSION = 2


def mining_key(train_file, image_root, **settings):
    """What a mined TSV is made from: train file (absolute path, size, sha256), root, the caption
    generator's version, settings."""
    if not os.path.isfile(train_file):
        raise DataError(f"{train_file}: file not found")
    h = hashlib.sha256()
    with open(train_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"train_file": os.path.abspath(train_file), "size": os.path.getsize(train_file),
            "sha256": h.hexdigest(), "image_root": os.path.abspath(image_root),
            "generator": GENERATOR_VERSION, **settings}


def stale_reason(tsv, make_key):
    """None when `tsv` can be used as is, else why it must be mined again.  A TSV we mined has a
    sidecar `<tsv>.key.json` and is reused only while make_key() (see mining_key) gives the same
    key; a TSV without one (the released file, a hand-made one) is used as is, unless it has our
    `.summary.json` (mined before keys)."""
    if not os.path.isfile(tsv):
        return f"no NegCLIP TSV at {tsv}"
    side = tsv + ".key.json"
    if not os.path.isfile(side):
        old_mined = os.path.isfile(tsv + ".summary.json")
        return f"{tsv} has no {os.path.basename(side)}" if old_mined else None
    with open(side, encoding="utf-8") as f:
        old = json.load(f)
    key = make_key()
    diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    return f"{tsv} was mined from other inputs ({', '.join(diff)} differ)" if diff else None


def mine(records, image_root, embed_images, tagger, images, seed=0, k=3, chunk=4096, device="cpu",
         log=print):
    """Hard negative captions for every record + its top-k nearest images -> rows for
    write_negclip_tsv.

    records: from read_training_records.  embed_images(list of full paths) -> (N, D) L2-normalised
    embeddings of a frozen image encoder, NaN rows for unreadable images.  images: a
    common.data.ImageFolderLoader that counts them (once per image) and enforces its max_bad_frac.
    Rows without any negative or image are dropped."""
    counts = {t: 0 for t in SWAP_TYPES}
    for r in records:
        negs = hard_negatives(r["caption"], tagger, seed)
        r["negs"] = [n for _, n in negs]
        for t, _ in negs:
            counts[t] += 1
    uniq = sorted({r["image"] for r in records})
    emb = embed_images([os.path.join(image_root, p) for p in uniq])  # (U, D)
    bad = {p for p, e in zip(uniq, emb) if torch.isnan(e).any()}
    images.merge(uniq, bad)
    log(f"mine: {images.report()}")
    images.check(final=True)
    if len(bad) == len(uniq):
        raise DataError(f"no readable image under {image_root} ({images.report()})")
    rows = [r for r in records if r["image"] not in bad and r["negs"]]
    # neighbours are images: k-NN over the distinct images of the rows (with several captions per
    # image, --all_captions, the rows of one image share its embedding), then each neighbour image
    # -> one of its rows, chosen by the anchor row's index (deterministic, captions vary)
    rows_of, ids = {}, {}
    for i, r in enumerate(rows):
        rows_of.setdefault(r["image"], []).append(i)
    imgs = list(rows_of)  # (U,) in first-row order
    img_id = torch.tensor([ids.setdefault(rows[rows_of[p][0]]["image_id"], len(ids)) for p in imgs],
                          device=device)
    if len(ids) < 2:
        raise DataError(f"mine: {len(rows)} usable rows of {len(ids)} images (need >= 2 images)")
    pos = {p: i for i, p in enumerate(uniq)}
    x = emb[torch.tensor([pos[p] for p in imgs])].to(device)  # (U, D)
    x = x.half() if torch.device(device).type == "cuda" else x
    kk = min(k, len(ids) - 1)
    nbrs = nearest_neighbours(x, img_id, kk, chunk).tolist()  # (U, kk) image indices
    for u, p in enumerate(imgs):
        for i in rows_of[p]:
            rows[i]["nbrs"] = [rows_of[imgs[v]][i % len(rows_of[imgs[v]])] for v in nbrs[u]]
    return rows, {"rows": len(rows), "dropped_no_negative_or_unreadable": len(records) - len(rows),
                  "unreadable_images": len(bad), "negatives_per_type": counts, "k": kk,
                  "tagger": tagger.name}


def ensure_mined(cfg, embed_images, model, dtype, dist, force=False, log=print):
    """Make sure cfg.train_tsv holds NegCLIP rows for cfg.train_file: mined again when its key
    (mining_key: train file, image root, settings, mining model and the features it gives) differs
    or `force`; a released TSV (no key) is used as is.  cfg: negclip.py's Config (train_file,
    image_root, tagger, all_captions, seed, mine_k, mine_chunk, max_bad_frac, init, clip, vision,
    vision_pool, mine_prefix: the folder under image_root that the train file's image paths are
    relative to, which the mined rows' paths then start with); embed_images: as mine's; model: what
    embeds them (its image_size, image_mean, image_std), under autocast to `dtype` on dist.device.
    Every rank calls this; rank 0 decides and writes.  -> {"rows", "neg_<type>": count}, or None
    when the TSV is kept."""
    tsv, tagger = cfg.train_tsv, make_tagger(cfg.tagger)
    mine_model = cfg.clip if cfg.init == "clip" else cfg.vision
    # the features neighbours are ranked by: the model's, from its image transform, at a precision
    # (CUDA: bf16 autocast by default, fp16 similarities); towers: the cosine of the pooled feature,
    # CLS or patch mean.  A key without one of these fields (an older version's) is mined again.
    space = dict(image=[model.image_size, list(model.image_mean), list(model.image_std)],
                 precision=f"{torch.device(dist.device).type} {str(dtype).replace('torch.', '')}")
    if cfg.init != "clip":
        space.update(space="pooled vision feature, L2", vision_pool=cfg.vision_pool)

    extra = {"image_prefix": cfg.mine_prefix} if cfg.mine_prefix else {}

    exclude = excluded_images(cfg.exclude_images)
    if exclude:  # the images left out (their keys' hash), not the list files' names
        sha = hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest()
        extra["exclude_images"] = f"{len(exclude)} images, sha256 {sha}"

    def make_key():
        return mining_key(cfg.train_file, cfg.image_root, all_captions=cfg.all_captions,
                          tagger=tagger.name, seed=cfg.seed, k=cfg.mine_k, model=mine_model,
                          **space, **extra)
    why = "--mode mine" if force else stale_reason(tsv, make_key)
    why = D.broadcast_object(why)  # rank 0 decides: every rank takes part in mining or none does
    if why is None:
        return None
    log(f"{why}: mining {cfg.train_file} -> {tsv}")
    key, recs = make_key(), read_training_records(cfg.train_file, cfg.all_captions)
    for r in recs:  # TSV paths under image_root (paper: coco/val2014/..., as the released TSV)
        r["image"] = os.path.join(cfg.mine_prefix, r["image"])
    if exclude:  # before mining: no excluded image is embedded or becomes a neighbour
        n = len(recs)
        recs = [r for r in recs if image_key(r["image"]) not in exclude]
        log(f"exclude: {n - len(recs)} of {n} records of {cfg.train_file} dropped, listed in "
            f"--exclude_images ({len(exclude)} images listed)")
        if not recs:
            raise DataError(f"{cfg.train_file}: every record is in --exclude_images")
    images = ImageFolderLoader(cfg.image_root, None, cfg.max_bad_frac)
    rows, summary = mine(recs, cfg.image_root, embed_images, tagger, images, cfg.seed, cfg.mine_k,
                         cfg.mine_chunk, dist.device, log)
    if dist.is_main:
        save_mined(tsv, rows, dict(summary, mine_model=mine_model), key)
    D.barrier()
    counts = summary["negatives_per_type"]
    log(f"mine: {len(rows)} rows -> {tsv} (negatives per type {counts})")
    return {"rows": len(rows), **{f"neg_{t}": c for t, c in counts.items()}}


def save_mined(tsv, rows, summary, key):
    """The summary, the TSV and, last, the key sidecar, each file replaced whole.  A key of other
    inputs is removed first, so that a write killed on the way leaves our summary and no key, a
    TSV that stale_reason mines again (not the new rows under the old key, nor a first mined TSV
    without sidecars, which would pass for the released file and be used as is)."""
    def dump(path, obj):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
        os.replace(path + ".tmp", path)
    if os.path.isfile(tsv + ".key.json"):
        os.remove(tsv + ".key.json")
    os.makedirs(os.path.dirname(os.path.abspath(tsv)), exist_ok=True)
    dump(tsv + ".summary.json", summary)
    write_negclip_tsv(tsv, rows)
    dump(tsv + ".key.json", key)


CKPT_MODES = ("eval", "export")  # negclip.py's modes that load --ckpt (negclip.py load_for_eval)
MODEL_PATHS = ("clip", "vision", "text")  # ModelConfig's model folders (the rest: architecture)


def resolve_paths(cfg, is_main=True):
    """negclip.py's Config: fill empty paths from the toy world, building it (only the backbones
    read) on first use, except the models outside --preset toy (an error); --lr 0: the init's
    learning rate (init_lr).  --ckpt outside eval/export (where nothing reads it): an error."""
    from data.toy import toy_paths
    if cfg.train_shards and cfg.exclude_images:
        raise DataError("--exclude_images applies to mined or released TSV rows, not --train_shards")
    cfg.lr = cfg.lr or init_lr(cfg.init)
    uni, reads_ckpt = cfg.init == "unimodal", cfg.mode in CKPT_MODES
    towers = dict(vision="models/clip", text="models/bert") if uni else dict(clip="models/clip")
    for k in towers if cfg.preset != "toy" and not (cfg.ckpt and reads_ckpt) else ():  # (the ckpt's)
        if not getattr(cfg, k):
            raise ValueError(f"--preset {cfg.preset} --init {cfg.init}: pass --{k} (a model folder "
                             f"or hub name); only --preset toy fills it with the toy world's model")
    if cfg.ckpt and not reads_ckpt:  # (mine, train, params build the --init model)
        hint = "to continue a run, pass its checkpoint as --resume; " * (cfg.mode == "train")
        raise ValueError(f"--mode {cfg.mode} does not read --ckpt (only eval and export do): {hint}"
                         f"the model is --init's (--clip, or --vision and --text)")
    toy = dict(train_file="pairs_train.jsonl", image_root="", val_file="pairs_val.jsonl",
               bench_root="", retrieval_file="pairs_test.jsonl", retrieval_image_root="",
               order_file=os.path.join("blip", "coco_karpathy_test.json"), order_image_root="", **towers)
    toy_paths(cfg, toy, ["clip", "bert"] if uni else ["clip"], is_main, D.barrier)
    for k in ("image_root", "bench_root", "retrieval_image_root", "order_image_root"):
        setattr(cfg, k, os.path.normpath(getattr(cfg, k)))  # toy_root/"" -> toy_root
    if not cfg.train_shards:  # (shards: nothing is mined)
        cfg.train_tsv = cfg.train_tsv or os.path.join(cfg.out_dir, "train_neg_clip.tsv")
    return cfg


def checkpoint_model_fields(cfg, saved, given, log):
    """--ckpt (eval, export): set the model fields of negclip.py's Config to the checkpoint's model
    config `saved`, which rebuilds its architecture, but for the model folders given on the command
    line (`given`: common.config.given_flags), e.g. a moved or copied folder.  A given architecture
    field that the checkpoint overrides is named in one warning line."""
    keep = {k for k in MODEL_PATHS if k in given}
    if lost := sorted(k for k in given - keep if k in saved and saved[k] != getattr(cfg, k)):
        log(f"warning: the checkpoint's model fields override --{', --'.join(lost)}")
    for k, v in saved.items():
        if k not in keep:
            setattr(cfg, k, v)
    if moved := [f"--{k} {getattr(cfg, k)} (trained from {saved[k]})" for k in sorted(keep)
                 if saved.get(k) != getattr(cfg, k)]:
        log(f"checkpoint's model read from {', '.join(moved)}")
    return cfg


def check_val_file(cfg):
    """--mode train: --val_file (model selection, unless "none") is first read after an epoch, when
    nothing is saved yet; a missing file, a bad layout or no readable image under --image_root stop
    the run here, before any step (as blip2_pformer.py check_eval_files).  --bench reads none."""
    if cfg.mode != "train" or cfg.bench or cfg.val_file == "none":
        return
    from data.benchmarks import read_caption_sets  # (it imports this module)
    hint = "pass a retrieval set, or --val_file none (no model selection: the last weights)"
    try:
        sets = read_caption_sets(cfg.val_file)
    except (DataError, ValueError, TypeError, KeyError, AttributeError) as e:  # (a bad layout)
        msg = e if isinstance(e, DataError) else f"{cfg.val_file}: {type(e).__name__}: {e}"
        raise DataError(f"--val_file: {msg}; {hint}") from None
    if not any(load_image(os.path.join(cfg.image_root, image)) is not None for image, _ in sets):
        raise DataError(f"--val_file: {cfg.val_file}: none of its {len(sets)} images is readable "
                        f"under --image_root {cfg.image_root}; {hint}")


def processor_config(path, meta=False):
    """The preprocessor_config.json of a model given as a local folder or a hub name -> dict ({}
    when the checkpoint has none), so that negclip.py normalises one checkpoint alike either way.
    A hub name's file comes from the Hugging Face cache or is downloaded into it alone, as
    from_pretrained fetches a model's files (common.hf.resolve_local would fetch every weight file
    of the repo too).  meta (--mode params, no network): {} for a hub name."""
    name = "preprocessor_config.json"
    if os.path.isdir(path):
        file = os.path.join(path, name)
    elif meta:
        return {}
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
        try:
            file = hf_hub_download(path, name)
        except LocalEntryNotFoundError as e:  # offline, not cached (an EntryNotFoundError too)
            raise FileNotFoundError(f"{path}: cannot read its {name}, not in the Hugging Face cache "
                                    f"nor downloadable ({type(e).__name__}); run huggingface-cli "
                                    f"download {path} {name}, or pass a local folder") from None
        except EntryNotFoundError:  # the repo has no such file
            return {}
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


# ---- defaults of the two inits (negclip.py --init clip | unimodal)

def init_lr(init):
    """The tower learning rate when --lr is 0.  clip: 1e-6, the released NegCLIP command (the
    README of mertyg/vision-language-models-are-bows; the paper's grid was {1e-5, 5e-6, 1e-6}).
    unimodal: 1e-5, the one learning rate (towers and fresh heads alike, --head_lr 0) of the
    uni-modal NegCLIP configs of github.com/JiH00nKw0n/multimodal
    (configs/train/negclip_dinov2_large_bert_base.yml; negclip_dinov2_lora.yml at commit b188164,
    deleted in 0e68822)."""
    return 1e-5 if init == "unimodal" else 1e-6


CLIP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def lora_targets(targets, model_type):
    """--lora_targets for one tower: ["auto"] -> CLIP's attention and MLP Linears for a CLIP tower
    (every Linear it has), "all-linear" for any other (BERT, RoBERTa, DistilBERT, ViT, DINOv2: their
    module names differ), as the LoRA configs of github.com/JiH00nKw0n/multimodal (configs/lora/
    clip_vit_large_patch14_336.yml; dinov2_base.yml, roberta_base.yml, distillbert_base.yml).  Any
    other list is used as given."""
    if list(targets) != ["auto"]:
        return list(targets)
    return list(CLIP_LORA_TARGETS) if model_type.startswith("clip") else ["all-linear"]


def processor_size(d):
    """The input side a preprocessor_config.json dict gives, in the forms HF image processors write:
    the centre crop (crop_size) when the processor crops, else its resize (size); each an int,
    {"height", "width"} or {"shortest_edge"}.  None when it names neither."""
    keys = (("crop_size",) if d.get("do_center_crop", True) else ()) + ("size",)
    for v in (d[k] for k in keys if k in d):
        if isinstance(v, int):
            return v
        if isinstance(v, dict) and "height" in v and "width" in v:
            if v["height"] != v["width"]:
                raise ValueError(f"non-square processor input {v}: the transform here is square")
            return v["height"]
        if isinstance(v, dict) and "shortest_edge" in v:
            return v["shortest_edge"]
    return None


def vision_preprocessing(path, config, meta=False):
    """(input side, mean, std) of a uni-modal vision tower (negclip.py --init unimodal): from the
    checkpoint's preprocessor_config.json (processor_config, processor_size), else by family.  The
    model config's image_size is the size of its position embeddings, not always the input:
    facebook/dinov2-* say 518 while their processors resize to 256 and centre-crop 224 (as the
    evaluation transform of facebookresearch/dinov2, dinov2/data/transforms.py); DINOv2 interpolates
    its position embeddings to the input, so without a processor config it gets that 224 too."""
    d = processor_config(path, meta)
    size = processor_size(d)
    if size is None and config.model_type == "dinov2":
        size = 224
    elif size is None:
        size = config.image_size
        size = size[0] if isinstance(size, (list, tuple)) else size
    if "image_mean" in d and "image_std" in d:
        return size, tuple(d["image_mean"]), tuple(d["image_std"])
    clip = config.model_type.startswith("clip")
    return (size, *((CLIP_MEAN, CLIP_STD) if clip else (IMAGENET_MEAN, IMAGENET_STD)))


def negative_rows(cfg, n=6, k=3):
    """The picture report's rows: the first n images of cfg.val_file (cfg.retrieval_file when it is
    "none"; no rows when the file is missing) that load and whose first caption has a swap ->
    [{"pil": the image, "texts": [caption, up to k of its hard negatives]}]."""
    from data.benchmarks import read_caption_sets  # (it imports this module)
    path, root = cfg.val_file, cfg.image_root
    if path == "none":  # (a comma list of test sets: the first)
        path, root = cfg.retrieval_file.split(",")[0], cfg.retrieval_image_root.split(",")[0]
    rows, tagger = [], make_tagger(cfg.tagger)
    for image, caps in read_caption_sets(path) if os.path.isfile(path) else []:
        negs = [t for _, t in hard_negatives(caps[0], tagger, cfg.seed)][:k]
        pil = load_image(os.path.join(root, image)) if negs else None
        rows += [{"pil": pil, "texts": [caps[0], *negs]}] if pil is not None else []
        if len(rows) == n:
            break
    return rows


def score_rows(scorer, rows):
    """negative_rows' images against their texts: cosine similarities -> [[float]].  scorer: a
    data/benchmarks.py Scorer, of which only the embedders are used (no collective: rank 0 alone
    may call this)."""
    img = scorer.embed_images([r["pil"] for r in rows]) if rows else []
    return [(scorer.embed_texts(r["texts"]) @ e).tolist() for r, e in zip(rows, img)]


def write_report(cfg, rows, before, after, results):
    """<cfg.out_dir>/report.html (common/report.py) of a negclip.py run -> its path: the training
    curves (train mode); negative_rows' images with their caption and its hard negatives, a column
    of score_rows' scores per model (`before`: the initial weights of a train run, or None; `after`:
    the trained model, or the init model of a plain eval), the last deciding the frame (green when
    the caption wins); a bar chart per benchmark of `results` (named as the last scores), next to
    the figures of cfg.report_before (a results.json path, e.g. the init model's eval) if given."""
    from common.report import Report, bar_chart, card, grid, table, thumb, training_plots
    out_dir, benchmarks, curves = cfg.out_dir, cfg.benchmarks, cfg.mode == "train"
    now = "after" if cfg.mode == "train" or cfg.ckpt else "init"
    scores = dict({"before": before} if before else {}, **{now: after})
    rep, last = Report(f"negclip.py --mode {cfg.mode}"), after
    prev = json.loads(open(cfg.report_before, encoding="utf-8").read()) if cfg.report_before else {}
    with rep.timed():
        if curves:
            groups = {"temperature": ["scale"], "hard negatives, bad images": ["hard", "bad_images"]}
            rep.section("Training", training_plots(os.path.join(out_dir, "metrics.jsonl"), groups))
        cards = []
        for i, r in enumerate(rows):
            cells = [[("negative: " if j else "caption: ") + t, *(s[i][j] for s in scores.values())]
                     for j, t in enumerate(r["texts"])]
            wins = last[i][0] > max(last[i][1:])  # the caption beats all its hard negatives
            cards.append(card(thumb(r["pil"]), table(cells, ["", *scores]), mark=wins))
        rep.section("Captions against their hard negatives (cosine similarity)", grid(cards))
        for b in benchmarks:  # scores: not counts, spreads, ranks, CREPE's per-complexity rows or
            keys = [k for k in results if re.fullmatch(  # ARO's per-relation / pair ("aro/x/y")
                rf"{b}/(?![^/]*/)(?!n$)(?!.*_c\d)(?!.*(_n|_std|_groups|coverage|_rank|_lambda)$).*", k)]
            old = [prev.get(k, math.nan) for k in keys]
            bars = {"before": old} if set(keys) & set(prev) else {}
            if keys:
                bars[list(scores)[-1]] = [results[k] for k in keys]
                rep.section(f"Benchmark: {b}", bar_chart([k[len(b) + 1:] for k in keys], bars))
        return rep.write(out_dir)


# ================================================================================================ Streams
# Webdataset shards are a stream: no fixed set to mine neighbour images in, and no TSV to write.
# Their captions get hard negatives on the fly, from the same swaps as the mine step.

class NegativeShardStream(ShardStream):
    """common.data.ShardStream whose samples carry one hard negative of their caption as meta
    "neg" (None when no swap applies): one of hard_negatives(caption, tagger, seed), drawn per
    (seed, epoch, shard, key), so a resumed stream draws the same; made in the DataLoader
    workers, beside the image decoding.  meta "img_id": an integer id of the image (key.json's
    "image" where given, as the toy shards repeat each image once per caption, else the key)."""

    def __init__(self, tagger, *args, **kw):
        super().__init__(*args, **kw)
        self.tagger = tagger

    def __iter__(self):
        for s in super().__iter__():
            negs = [n for _, n in hard_negatives(s["caption"], self.tagger, self.seed)]
            rng = random.Random(f"{self.seed}|{s['epoch']}|{s['shard']}|{s['key']}")
            name = str(s["meta"].get("image", s["key"])).encode()
            neg = rng.choice(negs) if negs else None
            s["meta"] = dict(s["meta"], neg=neg, img_id=zlib.crc32(name))
            yield s


def shard_batches(stream, tracker, collate, micro_batch, workers, pin, start, accum, hard_from):
    """negclip.py's micro batches of steps start.. from a NegativeShardStream (`tracker`, a
    common.data.StreamTracker, counts its unreadable samples): per row image x, caption t and a hard
    caption n of t (from step hard_from on), no neighbour image; collate(items) -> the batch."""
    for k, b in enumerate(stream_loader(stream, micro_batch, workers, pin)):
        tracker.update(b)
        tracker.check()
        step = start + k // accum
        items = [dict(x=x, t=t, n=m["neg"], img_id=m["img_id"], hard=step >= hard_from, step=step,
                      tried=(), bad=()) for x, t, m in zip(b["image"], b["caption"], b["meta"])]
        yield dict(collate(items), keys=b["key"])
