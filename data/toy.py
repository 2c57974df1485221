"""The toy world: a deterministic miniature of the vision-language setting (data/README.md, "The toy world").

Scenes are 64 px RGB images of 1-3 coloured shapes (6 shapes, 7 colours, small/large, placed so that every pair
of objects stands in exactly one clear relation: left of / right of / above / below).  From the same scenes the
builder writes every task file the five methods read, in the canonical formats (pairs, VQA, video) or in the
*native published layouts* (SugarCREPE, ARO, CREPE, SVO-Probes, Winoground, VL-CheckList, BLIP's Karpathy json,
Image-Chat, ImageFolder classification sets), and it pretrains tiny HF-format backbones (CLIP, BERT, GPT-2, OPT,
T5) on the toy text and images, so a frozen backbone carries real signal just as a real checkpoint does.

    python data/toy.py --out data/toy                 # full world  (~2000/250/250 scenes; 4-6 min on 2 cores)
    python data/toy.py --out data/toy_tiny --tiny     # test world  (~300/50/50 scenes; under 2 min)
    python data/toy.py --out /tmp/w --tiny --data_only  # only the data files, no backbones
    python data/toy.py --models clip,bert             # data + these backbones (others are added when a run needs them)
    python data/toy.py --shards 8                     # + the train pairs as webdataset shards (write_shards)

Python: `build_toy_world(out, tiny=False, seed=0)` -> manifest dict; `ensure_toy_world(root, models=(...))`
builds the data when `<root>/manifest.json` is missing and each listed backbone not built yet (a script's
first run builds only what it reads; `toy_paths` does this for a config).  The data are written to a
temporary folder renamed into place at the end, and a backbone into models/<name>, finished when its
toy_model.json is written last, so a half-built world or backbone is never mistaken for a complete one;
ensure_toy_world builds under a lock, so two processes never build the same part at once.  A folder that is
not a toy world is never replaced.  The same seed gives the same bytes (seeded `random.Random` / numpy
generators per component; torch single-process with a fixed thread count).

Why compositional negatives work here: every scene has distinct colours and distinct shapes, so swapping the
colours (or shapes) of two objects, replacing a colour/shape with one absent from the scene, flipping a size or
changing a relation always yields a *false* caption with (for swaps) exactly the same bag of words -- the
property that makes ARO / SugarCREPE / CREPE / Winoground separate bag-of-words from compositional models
(Yuksekgonul et al. 2023, "When and why VLMs behave like bags-of-words", sec. 2-3).
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tarfile
import time
import zlib

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------------
# World vocabulary
# ----------------------------------------------------------------------------------------------------------------
IMG = 64                      # image side in pixels
SUPER = 4                     # draw at 4x then box-downsample: anti-aliased edges without extra dependencies
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
          "diamond": "diamonds", "cross": "crosses"}
COLOURS = {"red": (220, 45, 45), "green": (45, 175, 70), "blue": (50, 95, 230), "yellow": (235, 215, 55),
           "purple": (150, 75, 205), "orange": (245, 145, 40), "white": (235, 235, 235)}
SIZES = {"small": (6, 7), "large": (11, 12)}      # radius range in pixels on the 64 px canvas
BACKGROUND = (28, 28, 34)
NOISE_STD = 6.0               # mild per-pixel Gaussian noise, so images are not trivially identical
RELATIONS = ("left", "right", "above", "below")
REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
REL_TERSE = {"left": "left of", "right": "right of", "above": "above", "below": "below"}  # CREPE scene-graph style
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
COUNT_WORD = {1: "one", 2: "two", 3: "three"}

# Image-Chat style traits (a small list in the published positive/neutral/negative grouping).
PERSONALITIES = {
    "positive": ["Appreciative (Grateful)", "Cheerful", "Enthusiastic", "Happy", "Sweet"],
    "neutral": ["Bland", "Calm", "Curious", "Questioning"],
    "negative": ["Anxious", "Bored", "Critical", "Gloomy", "Sarcastic"],
}

SIZES_FULL = dict(train=2000, val=250, test=250, corpus_scenes=4000, videos=(240, 30, 30), bench=300,
                  crepe_per_bin=40, winoground=200, classify=(50, 50))
SIZES_TINY = dict(train=300, val=50, test=50, corpus_scenes=600, videos=(40, 10, 10), bench=60,
                  crepe_per_bin=8, winoground=30, classify=(20, 10))


def _rng(seed, name):
    """An independent, reproducible stream per component, so adding one part never shifts another's draws."""
    return random.Random(f"toy-{seed}-{name}")


def _nprng(seed, name):
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


# ----------------------------------------------------------------------------------------------------------------
# Scenes: sampling, relations, rendering
# ----------------------------------------------------------------------------------------------------------------
def relation(a, b):
    """The relation of object a to object b ("a is <rel> b"); y grows downwards."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _pair_ok(a, b):
    """No overlap, and the dominant axis clearly dominates, so left/right/above/below is unambiguous."""
    dx, dy = abs(a["x"] - b["x"]), abs(a["y"] - b["y"])
    big, small = max(dx, dy), min(dx, dy)
    return big >= a["radius"] + b["radius"] + 2 and big >= 1.6 * small


def _in_bounds(o):
    return o["radius"] + 2 <= o["x"] <= IMG - 3 - o["radius"] and o["radius"] + 2 <= o["y"] <= IMG - 3 - o["radius"]


def _place(objs, rng):
    for _ in range(30):
        placed = []
        for o in objs:
            for _ in range(60):
                o["x"] = rng.randint(o["radius"] + 2, IMG - 3 - o["radius"])
                o["y"] = rng.randint(o["radius"] + 2, IMG - 3 - o["radius"])
                if all(_pair_ok(o, p) for p in placed):
                    placed.append(o)
                    break
            else:
                break
        if len(placed) == len(objs):
            return True
    return False


def sample_objects(rng, n=None):
    """1-3 objects with distinct shapes and distinct colours (so 'the red object' / 'the circle' are unique)."""
    n = n or rng.choices([1, 2, 3], weights=[0.25, 0.4, 0.35])[0]
    while True:
        shapes, colours = rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)
        objs = []
        for s, c in zip(shapes, colours):
            size = rng.choice(["small", "large"])
            objs.append({"shape": s, "colour": c, "size": size, "radius": rng.randint(*SIZES[size])})
        if _place(objs, rng):
            return [{k: o[k] for k in ("shape", "colour", "size", "x", "y", "radius")} for o in objs]


def _draw_shape(d, shape, cx, cy, r, fill):
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        d.polygon(pts, fill=fill)
    elif shape == "cross":
        w = 0.35 * r
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(objs, nprng):
    """Objects -> 64x64 RGB PIL image with mild Gaussian background/pixel noise."""
    S = IMG * SUPER
    im = Image.new("RGB", (S, S), BACKGROUND)
    d = ImageDraw.Draw(im)
    for o in objs:
        _draw_shape(d, o["shape"], o["x"] * SUPER, o["y"] * SUPER, o["radius"] * SUPER, COLOURS[o["colour"]])
    im = im.resize((IMG, IMG), Image.BOX)
    a = np.asarray(im, dtype=np.float32) + nprng.normal(0.0, NOISE_STD, (IMG, IMG, 3))  # (H, W, 3)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Text: captions, questions
# ----------------------------------------------------------------------------------------------------------------
def _article(words):
    return ("an " if words[0] in "aeiou" else "a ") + words


def np_(o, size=False, colour=True, det="a"):
    """Noun phrase for an object: 'a large red circle', 'the blue square', 'an orange star'."""
    w = " ".join(([o["size"]] if size else []) + ([o["colour"]] if colour else []) + [o["shape"]])
    return _article(w) if det == "a" else f"{det} {w}"


def _name(o):
    return f"{o['colour']} {o['shape']}"


def _region(o):
    h = "left" if o["x"] < 22 else "right" if o["x"] > 42 else None
    v = "top" if o["y"] < 22 else "bottom" if o["y"] > 42 else None
    if h and v:
        return f"in the {v} {h} corner"
    if h:
        return f"on the {h}"
    if v:
        return f"at the {v}"
    return "in the middle"


def scene_captions(objs, rng, k=5):
    """k distinct captions from varied templates; most name every object's colour and shape."""
    s = lambda: rng.random() < 0.4  # noqa: E731  -- mention the size in this noun phrase?
    n = len(objs)
    if n == 1:
        o = objs[0]
        c = [np_(o, s()), f"there is {np_(o, s())}", f"{np_(o, s())} on a dark background",
             f"a picture of {np_(o, s())}", f"{np_(o, s())} {_region(o)}", f"one {_name(o)}",
             f"a single {o['size']} {o['shape']} that is {o['colour']}", f"an image with only {np_(o, s())}",
             f"the {o['shape']} is {o['colour']}"]
    elif n == 2:
        a, b = rng.sample(objs, 2)
        r = relation(a, b)
        c = [f"{np_(a, s())} {REL_PHRASE[r]} {np_(b, s())}", f"{np_(b, s())} {REL_PHRASE[INVERSE[r]]} {np_(a, s())}",
             f"there is {np_(a, s())} and {np_(b, s())}", f"{np_(a, s())} and {np_(b, s())}",
             f"two shapes: {np_(a, s())} and {np_(b, s())}", f"the {_name(a)} is {REL_PHRASE[r]} the {_name(b)}",
             f"{np_(b, s())} with {np_(a, s())} {REL_PHRASE[r]} it",
             f"two objects, {np_(a, s())} {REL_PHRASE[r]} {np_(b, s())}"]
    else:
        a, b, d = rng.sample(objs, 3)
        rab, rdb, rad = relation(a, b), relation(d, b), relation(a, d)
        c = [f"{np_(a, s())} {REL_PHRASE[rab]} {np_(b, s())} and {np_(d, s())}",
             f"there are three shapes: {np_(a, s())}, {np_(b, s())} and {np_(d, s())}",
             f"{np_(a, s())}, {np_(b, s())} and {np_(d, s())}",
             f"the {_name(a)} is {REL_PHRASE[rab]} the {_name(b)} and the {_name(d)} is {REL_PHRASE[rdb]} the {_name(b)}",
             f"three objects including {np_(a, s())} {REL_PHRASE[rad]} {np_(d, s())}",
             f"{np_(d, s())} {REL_PHRASE[rdb]} {np_(b, s())}, and {np_(a, s())}",
             f"three shapes, {np_(a, s())} {REL_PHRASE[rab]} {np_(b, s())} and {np_(d, s())} {REL_PHRASE[rdb]} it"]
    cands = list(dict.fromkeys(c))
    return rng.sample(cands, k)


def _absent(objs, rng, compositional=True):
    """A (colour, shape) pair not in the scene; its shape is absent, its colour preferably present (harder)."""
    shapes = [s for s in SHAPES if s not in {o["shape"] for o in objs}]
    present = [o["colour"] for o in objs]
    colour = rng.choice(present) if compositional and rng.random() < 0.5 else rng.choice(list(COLOURS))
    return {"shape": rng.choice(shapes), "colour": colour, "size": rng.choice(["small", "large"])}


def scene_questions(objs, rng, n_q=3):
    """[(question, answer, alternatives, qtype)] covering colour / shape / count / existence / relation."""
    types = ["colour", "shape", "count", "exist", "relation"]
    if len(objs) < 2:
        types.remove("relation")
    out = []
    for t in rng.sample(types, n_q):
        o = rng.choice(objs)
        if t == "colour":
            q = rng.choice([f"what colour is the {o['shape']}?", f"what is the colour of the {o['shape']}?",
                            f"which colour does the {o['shape']} have?"])
            out.append((q, o["colour"], [c for c in COLOURS if c != o["colour"]], t))
        elif t == "shape":
            q = rng.choice([f"what shape is the {o['colour']} object?", f"what is the {o['colour']} shape?",
                            f"which shape is {o['colour']}?"])
            out.append((q, o["shape"], [s for s in SHAPES if s != o["shape"]], t))
        elif t == "count":
            q = rng.choice(["how many shapes are there?", "how many objects are in the image?",
                            "how many objects are there?"])
            out.append((q, str(len(objs)), [str(k) for k in (1, 2, 3, 4) if k != len(objs)], t))
        elif t == "exist":
            if rng.random() < 0.5:
                q, a = rng.choice([f"is there {np_(o)}?", f"are there any {PLURAL[o['shape']]}?"]), "yes"
            else:
                x = _absent(objs, rng)
                q, a = rng.choice([f"is there {np_(x)}?", f"are there any {PLURAL[x['shape']]}?"]), "no"
            out.append((q, a, ["no" if a == "yes" else "yes"], t))
        else:
            a_, b_ = rng.sample(objs, 2)
            r = relation(a_, b_)
            uniq = [x for x in objs if x is not b_ and relation(x, b_) == r] == [a_]
            mode = rng.random()
            if uniq and mode < 0.34:
                q = f"what shape is {REL_PHRASE[r]} the {_name(b_)}?"
                out.append((q, a_["shape"], [s for s in SHAPES if s != a_["shape"]], t))
            else:
                yes = rng.random() < 0.5
                rr = r if yes else rng.choice([x for x in RELATIONS if x != r])
                q = f"is the {_name(a_)} {REL_PHRASE[rr]} the {_name(b_)}?"
                out.append((q, "yes" if yes else "no", ["no" if yes else "yes"], t))
    return out


def _ten_answers(answer, alts, rng, noise=0.08):
    """10 human-like answers: mostly the truth, with occasional disagreement (so VQA's leave-one-out matters)."""
    return [rng.choice(alts) if rng.random() < noise else answer for _ in range(10)]


# ----------------------------------------------------------------------------------------------------------------
# Videos: one object moving or resizing
# ----------------------------------------------------------------------------------------------------------------
MOTION_VERBS = {
    "right": ["moves to the right", "is moving right", "slides to the right", "goes right",
              "travels from left to right"],
    "left": ["moves to the left", "is moving left", "slides to the left", "goes left", "travels from right to left"],
    "up": ["moves up", "rises", "goes up", "is moving upwards", "travels from bottom to top"],
    "down": ["moves down", "falls", "goes down", "is moving downwards", "travels from top to bottom"],
    "grow": ["grows", "gets bigger", "is growing", "becomes larger", "expands"],
    "shrink": ["shrinks", "gets smaller", "is shrinking", "becomes smaller", "contracts"],
}


def sample_video(rng):
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    motion = rng.choice(list(MOTION_VERBS))
    T = rng.randint(4, 8)
    if motion in ("grow", "shrink"):
        r0, r1 = (6, 13) if motion == "grow" else (13, 6)
        x, y = rng.randint(16, 47), rng.randint(16, 47)
        track = [(x, y, round(r0 + (r1 - r0) * t / (T - 1))) for t in range(T)]
        size = None
    else:
        size = rng.choice(["small", "large"])
        r = rng.randint(*SIZES[size])
        lo, hi = r + 2, IMG - 3 - r
        dist = rng.randint(min(20, hi - lo), hi - lo)
        start = rng.randint(lo, hi - dist)
        other = rng.randint(lo, hi)
        path = [start + dist * t / (T - 1) for t in range(T)]
        if motion in ("left", "up"):
            path = path[::-1]
        track = [(round(p), other, r) if motion in ("left", "right") else (other, round(p), r) for p in path]
    o = {"shape": shape, "colour": colour, "size": size or "small"}
    subj = [np_(o, size=size is not None and rng.random() < 0.5), np_(o, det="the")]
    caps = [f"{rng.choice(subj)} {v}" for v in MOTION_VERBS[motion]]
    return {"shape": shape, "colour": colour, "motion": motion, "track": track}, caps


# ----------------------------------------------------------------------------------------------------------------
# Compositional benchmarks (native layouts), built from test-split scenes
# ----------------------------------------------------------------------------------------------------------------
def _mention(o, size=False, colour=True):
    return {"shape": o["shape"], "colour": o["colour"] if colour else None, "size": o["size"] if size else None}


def _say(m, det="a"):
    w = " ".join([x for x in (m["size"], m["colour"]) if x] + [m["shape"]])
    return _article(w) if det == "a" else f"{det} {w}"


def _rel_text(ma, r, mb):
    return f"{_say(ma)} {REL_PHRASE[r]} {_say(mb)}"


def _and_text(ms):
    parts = [_say(m) for m in ms]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def sugarcrepe_examples(objs, rng):
    """{type: (caption, negative_caption)} for one scene, following SugarCREPE's seven generators (Hsieh et al.
    2023, sec. 3): REPLACE-att/obj/rel, SWAP-att/obj, ADD-att/obj.  Every negative is false for the scene."""
    out = {}
    colours_in = {o["colour"] for o in objs}
    shapes_in = {o["shape"] for o in objs}
    sz = lambda: rng.random() < 0.3  # noqa: E731
    pair = rng.sample(objs, 2) if len(objs) >= 2 else None
    # replace_att: a colour absent from the scene (or the wrong size for a size that is mentioned)
    if pair:
        a, b = pair
        ma, mb, r = _mention(a, sz()), _mention(b, sz()), relation(a, b)
        t = rng.choice([0, 1])
        neg = [dict(ma), dict(mb)]
        if neg[t]["size"] and rng.random() < 0.4:
            neg[t]["size"] = "small" if neg[t]["size"] == "large" else "large"
        else:
            neg[t]["colour"] = rng.choice([c for c in COLOURS if c not in colours_in])
        out["replace_att"] = (_rel_text(ma, r, mb), _rel_text(neg[0], r, neg[1]))
        # replace_obj: a shape absent from the scene
        neg = [dict(ma), dict(mb)]
        neg[t]["shape"] = rng.choice([s for s in SHAPES if s not in shapes_in])
        out["replace_obj"] = (_rel_text(ma, r, mb), _rel_text(neg[0], r, neg[1]))
        # replace_rel: any other relation is false (each pair has exactly one relation)
        rr = INVERSE[r] if rng.random() < 0.6 else rng.choice([x for x in RELATIONS if x not in (r, INVERSE[r])])
        out["replace_rel"] = (_rel_text(ma, r, mb), _rel_text(ma, rr, mb))
        # swap_att: exchange the colours of the two objects (same bag of words, false binding)
        sa, sb = dict(ma), dict(mb)
        if ma["size"] and mb["size"] and a["size"] != b["size"] and rng.random() < 0.3:
            sa["size"], sb["size"] = mb["size"], ma["size"]
        else:
            sa["colour"], sb["colour"] = b["colour"], a["colour"]
        if rng.random() < 0.5:
            out["swap_att"] = (_rel_text(ma, r, mb), _rel_text(sa, r, sb))
        else:
            out["swap_att"] = (_and_text([ma, mb]), _and_text([sa, sb]))
        # swap_obj: exchange the shapes, keeping colours and relation in place
        sa, sb = dict(ma), dict(mb)
        sa["shape"], sb["shape"] = b["shape"], a["shape"]
        out["swap_obj"] = (_rel_text(ma, r, mb), _rel_text(sa, r, sb))
        # add_att: the positive omits an attribute; the negative adds a wrong one
        ma2 = _mention(a, size=False, colour=False)
        wrong = rng.choice([b["colour"], rng.choice([c for c in COLOURS if c not in colours_in])])
        if rng.random() < 0.3:
            na = dict(ma2, colour=a["colour"], size="small" if a["size"] == "large" else "large")
            pos = _rel_text(dict(ma2, colour=a["colour"]), r, mb)
        else:
            na, pos = dict(ma2, colour=wrong), _rel_text(ma2, r, mb)
        out["add_att"] = (pos, _rel_text(na, r, mb))
    else:
        o = objs[0]
        m = _mention(o, sz())
        out["replace_att"] = (_say(m), _say(dict(m, colour=rng.choice([c for c in COLOURS if c != o["colour"]]))))
        out["replace_obj"] = (_say(m), _say(dict(m, shape=rng.choice([s for s in SHAPES if s != o["shape"]]))))
        wrong = dict(_mention(o, colour=False), colour=rng.choice([c for c in COLOURS if c != o["colour"]]))
        out["add_att"] = (_say(_mention(o, colour=False)), _say(wrong))
    # add_obj: the negative mentions an extra object that is not in the scene
    ms = [_mention(o, sz()) for o in rng.sample(objs, len(objs))]
    x = _absent(objs, rng)
    extra = _mention(x, size=False)
    neg = ms[:]
    neg.insert(rng.randint(0, len(ms)), extra)
    out["add_obj"] = (_and_text(ms), _and_text(neg))
    return out


def _crepe_graph(objs, rng):
    """A random sub-scene-graph: objects, attribute atoms, relation clauses (CREPE, Ma et al. 2023, sec. 3.2)."""
    k = 2 if len(objs) == 2 else rng.choice([2, 3])
    sub = rng.sample(range(len(objs)), k)
    attrs = {i: [a for a in ("size", "colour") if rng.random() < 0.45] for i in sub}
    pairs = [(i, j) for i in sub for j in sub if i != j]
    n_rel = rng.randint(1, min(len(pairs), 4 if k == 3 else 2))
    if k == 2 and rng.random() < 0.6:
        n_rel = 2  # CREPE captions often state both directions: "computer on floor. floor under computer."
    rels = rng.sample(pairs, n_rel)
    if k == 2 and n_rel == 2:
        rels = [pairs[0], pairs[1]] if rng.random() < 0.5 else [pairs[1], pairs[0]]
    return sub, attrs, rels


def _desc(o, attrs, override=None):
    o = dict(o, **(override or {}))
    return " ".join([o[a] for a in ("size", "colour") if a in attrs] + [o["shape"]])


def _crepe_caption(objs, sub, attrs, rels, edit=None):
    """Scene-graph text; `edit` = (clause index, {"s"|"o"|"r": override}) changes one clause only."""
    clauses = []
    for ci, (i, j) in enumerate(rels):
        e = edit[1] if edit and edit[0] == ci else {}
        r = e.get("r", relation(objs[i], objs[j]))
        clauses.append(f"{_desc(objs[i], attrs[i], e.get('s'))} {REL_TERSE[r]} {_desc(objs[j], attrs[j], e.get('o'))}")
    linked = {x for ij in rels for x in ij}
    for i in sub:
        if i not in linked:
            clauses.append(f"there is {_article(_desc(objs[i], attrs[i]))}")
    return ". ".join(clauses) + "."


def _components(sub, rels):
    parent = {i: i for i in sub}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for i, j in rels:
        parent[find(i)] = find(j)
    return len({find(i) for i in sub})


def crepe_rows(objs, rng):
    """One caption with hard negatives of each CREPE productivity type: atom (one atom replaced by a foil),
    swap (two atoms of one kind exchanged), negate (a negation inserted).  Returns {type: (meta, caption, negs)}."""
    sub, attrs, rels = _crepe_graph(objs, rng)
    n_attr = sum(len(v) for v in attrs.values())
    meta = dict(n=len(sub) + len(rels) + n_attr, n_objects=len(sub), n_relations=len(rels), n_attributes=n_attr,
                n_connected_components=_components(sub, rels))
    cap = _crepe_caption(objs, sub, attrs, rels)
    colours_out = [c for c in COLOURS if c not in {o["colour"] for o in objs}]
    shapes_out = [s for s in SHAPES if s not in {o["shape"] for o in objs}]
    # atom: one clause, one slot, replaced by something false for the scene
    atoms = []
    for ci, (i, j) in enumerate(rels):
        r = relation(objs[i], objs[j])
        for rr in RELATIONS:
            if rr != r:
                atoms.append((ci, {"r": rr}))
        for side, x in (("s", i), ("o", j)):
            for s in shapes_out:
                atoms.append((ci, {side: {"shape": s}}))
            if "colour" in attrs[x]:
                for c in colours_out:
                    atoms.append((ci, {side: {"colour": c}}))
            if "size" in attrs[x]:
                atoms.append((ci, {side: {"size": "small" if objs[x]["size"] == "large" else "large"}}))
    rng.shuffle(atoms)
    atom_negs = list(dict.fromkeys(_crepe_caption(objs, sub, attrs, rels, a) for a in atoms))[:5]
    # swap: exchange shapes / colours / sizes between subject and object of one clause, relation words between
    # clauses, or two objects' shapes everywhere; all false because colours and shapes are unique per scene
    swaps = []
    for ci, (i, j) in enumerate(rels):
        swaps.append(_crepe_caption(objs, sub, attrs, rels, (ci, {"s": {"shape": objs[j]["shape"]},
                                                                 "o": {"shape": objs[i]["shape"]}})))
        if "colour" in attrs[i] and "colour" in attrs[j]:
            swaps.append(_crepe_caption(objs, sub, attrs, rels, (ci, {"s": {"colour": objs[j]["colour"]},
                                                                     "o": {"colour": objs[i]["colour"]}})))
        if "size" in attrs[i] and "size" in attrs[j] and objs[i]["size"] != objs[j]["size"]:
            swaps.append(_crepe_caption(objs, sub, attrs, rels, (ci, {"s": {"size": objs[j]["size"]},
                                                                     "o": {"size": objs[i]["size"]}})))
    if len(rels) >= 2:
        r0, r1 = relation(*[objs[x] for x in rels[0]]), relation(*[objs[x] for x in rels[1]])
        if r0 != r1:
            c = _crepe_caption(objs, sub, attrs, rels, (0, {"r": r1}))
            c2 = _crepe_caption(objs, sub, attrs, rels, (1, {"r": r0})).split(". ")
            swaps.append(". ".join(c.split(". ")[:1] + c2[1:2] + c.split(". ")[2:]))
    i, j = rels[0]
    gobjs = [dict(o) for o in objs]
    gobjs[i]["shape"], gobjs[j]["shape"] = objs[j]["shape"], objs[i]["shape"]
    swaps.append(_crepe_caption(gobjs, sub, attrs, rels))
    swaps = [s for s in dict.fromkeys(swaps) if s != cap]
    rng.shuffle(swaps)
    swap_negs = (swaps + [a for a in atom_negs if a not in swaps])[:5]  # top up with atom foils like CREPE does
    # negate: capitalised, CREPE's odd spacing kept ("... . There is no X.")
    parts = cap[:-1].split(". ")
    cands = []
    for ci, p in enumerate(parts):
        if p.startswith("there is "):
            cands.append(parts[:ci] + [""] + parts[ci + 1:] + [f"there is no {p[len('there is '):]}"])
            continue
        i, j = rels[ci]
        rw = REL_TERSE[relation(objs[i], objs[j])]
        cands.append(parts[:ci] + [p.replace(f" {rw} ", f" not {rw} ", 1)] + parts[ci + 1:])
        cands.append(parts[:ci] + [f"there is no {p}"] + parts[ci + 1:])
    for x in sub:
        cands.append(parts + [f"there is no {objs[x]['shape']}"])
    neg_texts = [". ".join(s[:1].upper() + s[1:] for s in c) + "." for c in cands]
    neg_texts = list(dict.fromkeys(neg_texts))
    rng.shuffle(neg_texts)
    return meta, cap, {"atom": atom_negs, "swap": swap_negs, "negate": neg_texts[:5]}


# ----------------------------------------------------------------------------------------------------------------
# Image-Chat dialogues
# ----------------------------------------------------------------------------------------------------------------
STYLE_TEMPLATES = {  # per style: turn-1 comments on {x}; turn-2/3 wrappers around a content clause {c}
    "Appreciative (Grateful)": (["i am thankful for this lovely {x}", "so grateful to see the {x} today"],
                                ["thanks for noticing, {c}", "i appreciate that {c}"]),
    "Cheerful": (["what a bright {x}!", "the {x} looks so cheerful"], ["yes, and {c}, how fun!", "yay, {c}"]),
    "Enthusiastic": (["wow, look at that {x}!", "amazing {x}, i want one!"], ["totally! {c}, so cool!",
                                                                              "yes yes, {c}!"]),
    "Happy": (["i love this {x}!", "this {x} makes me so happy"], ["i agree, {c} and that makes me happy",
                                                                   "so happy that {c}"]),
    "Sweet": (["aww, the little {x} is so sweet", "what a sweet {x}"], ["yes, {c}, so cute", "aww, {c}"]),
    "Bland": (["it is just the {x}", "there is the {x}"], ["ok, {c}", "fine, {c}"]),
    "Calm": (["the {x} looks calm and quiet", "the {x} is resting peacefully"], ["relax, {c}",
                                                                                 "no rush, {c}"]),
    "Curious": (["i wonder why the {x} is here", "where did this {x} come from?"], ["but why is it that {c}?",
                                                                                    "interesting, {c}, why?"]),
    "Questioning": (["is this really the {x}?", "are you sure that is the {x}?"], ["are you sure? {c}",
                                                                                   "really? {c}"]),
    "Anxious": (["the {x} makes me nervous", "i hope the {x} does not move"], ["careful, {c}",
                                                                               "oh no, {c}"]),
    "Bored": (["boring, just the {x} again", "the {x} is so dull"], ["whatever, {c}", "yawn, {c}"]),
    "Critical": (["the {x} is badly drawn", "whoever made this {x} did a poor job"], ["no, {c} and it looks wrong",
                                                                                      "meh, {c}, badly done"]),
    "Gloomy": (["the {x} looks so lonely", "that {x} makes me sad"], ["sadly {c}", "it is gloomy that {c}"]),
    "Sarcastic": (["oh great, another {x}, how original", "wow, the {x}, what a surprise"],
                  ["oh sure, and {c}, thrilling", "right, {c}, how exciting"]),
}
ALL_STYLES = [s for g in PERSONALITIES.values() for s in g]


def _vlc_location(o):
    """VL-CheckList's Object/Location buckets (center / mid / margin) go by how far an object lies from the image
    centre (Zhao et al. 2022, arXiv 2207.00221, sec. 3.2); here the shape centre's Chebyshev distance in pixels
    (at most 24 on the toy canvas), cut so that each bucket holds about a third of the objects."""
    d = max(abs(o["x"] - IMG // 2), abs(o["y"] - IMG // 2))
    return "center" if d < 14 else "mid" if d < 19 else "margin"


def vlc_examples(objs, rng):
    """[(sub-category, corpus name, positive, negative)] for one scene, in VL-CheckList's taxonomy: Object (an object
    replaced by a shape absent from the scene; filed by the object's location and size, as subject or object of a
    relation), Attribute (colour: a colour absent from the scene; size: flipped), Relation/spatial (another
    relation; each pair has exactly one).  Shapes and colours are distinct in a scene, so every negative is false."""
    out = []
    absent = [x for x in SHAPES if x not in {o["shape"] for o in objs}]
    for o in objs:
        others = [b for b in objs if b is not o]
        m, neg = _mention(o), dict(_mention(o), shape=rng.choice(absent))
        if others:
            b = rng.choice(others)
            mb, subj = _mention(b), rng.random() < 0.5
            pos = _rel_text(m, relation(o, b), mb) if subj else _rel_text(mb, relation(b, o), m)
            bad = _rel_text(neg, relation(o, b), mb) if subj else _rel_text(mb, relation(b, o), neg)
        else:
            subj, pos, bad = True, _say(m), _say(neg)
        name = "vg_subj" if subj else "vg_obj"
        out += [(f"Object/Location/{_vlc_location(o)}", name, pos, bad), (f"Object/Size/{o['size']}", name, pos, bad)]
    o = rng.choice(objs)
    m = _mention(o, size=rng.random() < 0.3)
    out.append(("Attribute/color", "vg", _say(m),
                _say(dict(m, colour=rng.choice([c for c in COLOURS if c not in {x["colour"] for x in objs}])))))
    m = _mention(o, size=True, colour=rng.random() < 0.7)
    out.append(("Attribute/size", "vg", _say(m), _say(dict(m, size="small" if o["size"] == "large" else "large"))))
    if len(objs) >= 2:
        a, b = rng.sample(objs, 2)
        r = relation(a, b)
        rr = INVERSE[r] if rng.random() < 0.6 else rng.choice([x for x in RELATIONS if x not in (r, INVERSE[r])])
        out.append(("Relation/spatial", "vg", _rel_text(_mention(a), r, _mention(b)),
                    _rel_text(_mention(a), rr, _mention(b))))
    return out


def write_vlc(out, test_scenes, image_of, per_file, seed):
    """VL-CheckList in its published layout under <out>/vl_checklist: corpus/v1/<sub-category>/<name>.yaml
    (ANNO_PATH, IMG_ROOT, TYPE), data/... JSON lists of [image, {"POS": [..], "NEG": [..]}], images in
    vg/VG_100K and vg/VG_100K_2.  Its own random stream, and its captions only reuse words of the other toy
    texts, so no other file, vocabulary or backbone changes.  Returns {file: cases} for the manifest."""
    rng, files, used = _rng(seed, "vlc"), {}, set()
    for _ in range(3):
        for sc in test_scenes:
            for sub, name, pos, neg in vlc_examples(sc["objects"], rng):
                rows = files.setdefault((sub, name), [])
                if len(rows) < per_file and (sub, sc["image_id"], pos, neg) not in used:
                    used.add((sub, sc["image_id"], pos, neg))
                    vg = 2500000 + int(sc["image_id"])
                    rows.append((sc["image_id"], f"VG_100K{'_2' if vg % 2 else ''}/{vg}.jpg", pos, neg))
    root, counts = os.path.join(out, "vl_checklist"), {}
    for (sub, name), rows in sorted(files.items()):
        cat, leaf = sub.split("/")[0], sub.split("/")[-1]
        anno = {"Object": f"data/Object/{sub.split('/')[1]}/vg_{sub.split('/')[1].lower()}/{name}_{leaf}.json",
                "Attribute": f"data/Attribute/vg/{leaf}.json", "Relation": f"data/Relation/vg/{leaf}.json"}[cat]
        os.makedirs(os.path.dirname(os.path.join(root, anno)), exist_ok=True)
        with open(os.path.join(root, anno), "w", encoding="utf-8") as f:
            f.write(json.dumps([[p, {"POS": [pos], "NEG": [neg]}] for _, p, pos, neg in rows]))
        os.makedirs(os.path.join(root, "corpus", "v1", sub), exist_ok=True)
        with open(os.path.join(root, "corpus", "v1", sub, f"{name}.yaml"), "w", encoding="utf-8") as f:
            # no final newline, as 55 of the 56 corpus/v1 files of om-ai-lab/VL-CheckList
            f.write(f'ANNO_PATH: "{anno}"\nIMG_ROOT: "vg/"\nTYPE: "TUPLE_JSON"')
        counts[f"vlc_{sub.lower().replace('/', '_')}_{name}"] = len(rows)
    for sid, p in sorted({(sid, p) for rows in files.values() for sid, p, _, _ in rows}):
        _save_jpg(image_of(sid), os.path.join(root, "vg", p))
    return counts


def _join_world(root, name, write, log):
    """Give a world built before <root>/<name> joined its files, with the same bytes as a fresh build: `write(tmp,
    manifest)` writes <tmp>/<name> aside, and it is renamed into place, so a concurrent reader never sees half."""
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        man = json.load(f)
    _remove_dead(root, re.compile(rf"\.{re.escape(name)}-([0-9]+)"), log)  # what a killed join left
    tmp = os.path.join(root, f".{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp, man)
    try:
        os.rename(os.path.join(tmp, name), os.path.join(root, name))
        log(f"added {name}/ to {root}")
    except OSError:  # another process added them first
        if not os.path.isdir(os.path.join(root, name)):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_vlc(root, log=print):
    """VL-CheckList's files for an older world, from its own test scenes and images."""
    def write(tmp, man):
        with open(os.path.join(root, "scenes.jsonl"), encoding="utf-8") as f:
            test = [s for s in map(json.loads, f) if s["split"] == "test"]
        write_vlc(tmp, test, lambda sid: Image.open(os.path.join(root, "images", f"{sid}.png")).convert("RGB"),
                  (SIZES_TINY if man["tiny"] else SIZES_FULL)["bench"], man["seed"])
    _join_world(root, "vl_checklist", write, log)


# Classification (zero-shot and linear probe, as NegCLIP's Table 6 checks what hard negatives cost elsewhere):
# one object per image, labelled by its shape or by its colour; templates.txt holds the zero-shot prompts.
CLASSIFY = {"toy_shapes": ("shape", SHAPES, "a photo of a {}."),
            "toy_colours": ("colour", tuple(COLOURS), "a photo of a {} object.")}


def write_classification(out, per_class, seed):
    """<out>/classification/<dataset>/{train,test}/<class>/<n>.jpg (the ImageFolder layout ImageNet's train and val
    folders have) and templates.txt.  Its own random streams: no other file, vocabulary or backbone changes.
    Returns {file: images} for the manifest."""
    rng, nprng, counts = _rng(seed, "classification"), _nprng(seed, "classification"), {}
    for name, (attr, classes, template) in CLASSIFY.items():
        root = os.path.join(out, "classification", name)
        for split, n in zip(("train", "test"), per_class):
            for c in classes:
                for k in range(n):
                    o = dict(sample_objects(rng, n=1)[0], **{attr: c})
                    _save_jpg(render([o], nprng), os.path.join(root, split, c, f"{k:05d}.jpg"))
            counts[f"classification_{name}_{split}"] = n * len(classes)
        with open(os.path.join(root, "templates.txt"), "w", encoding="utf-8") as f:
            f.write(template + "\n")
    return counts


def add_classification(root, log=print):
    """The classification sets for an older world."""
    _join_world(root, "classification", lambda tmp, man: write_classification(
        tmp, (SIZES_TINY if man["tiny"] else SIZES_FULL)["classify"], man["seed"]), log)


def imagechat_dialog(objs, rng):
    """3 turns [[style, utterance]]: speaker A comments on an object (turn 1), B answers about another object and
    its relation to the first (turn 2, needs the image), A follows up with the count or the third object (turn 3)."""
    sa, sb = rng.sample(ALL_STYLES, 2)
    x = rng.choice(objs)
    others = [o for o in objs if o is not x]
    t1 = rng.choice(STYLE_TEMPLATES[sa][0]).format(x=_name(x))
    if others:
        y = rng.choice(others)
        c2 = f"the {_name(y)} is {REL_PHRASE[relation(y, x)]} the {_name(x)}"
    else:
        y = None
        c2 = f"the {_name(x)} is {x['size']} and all alone"
    rest = [o for o in objs if o is not x and o is not y]
    if rest:
        c3 = f"there is also {np_(rest[0])} {REL_PHRASE[relation(rest[0], x)]} the {x['shape']}"
    else:
        n = len(objs)
        c3 = f"there {'is' if n == 1 else 'are'} only {COUNT_WORD[n]} shape{'s' if n > 1 else ''} here"
    t2 = rng.choice(STYLE_TEMPLATES[sb][1]).format(c=c2)
    t3 = rng.choice(STYLE_TEMPLATES[sa][1]).format(c=c3)
    return [[sa, t1], [sb, t2], [sa, t3]]


# ----------------------------------------------------------------------------------------------------------------
# File helpers
# ----------------------------------------------------------------------------------------------------------------
def _write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def _save_png(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="PNG", optimize=False)


def _save_jpg(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="JPEG", quality=95, subsampling=0)  # 4:4:4 keeps small shapes' colours clean


def _pyset_repr(items):
    """CREPE writes some hard-negative lists as Python *set* literals; build the text in a fixed order
    (repr(set) would depend on string-hash randomisation and break byte determinism)."""
    return "{" + ", ".join(repr(s) for s in items) + "}"


# ----------------------------------------------------------------------------------------------------------------
# Data build
# ----------------------------------------------------------------------------------------------------------------
def build_data(out, tiny=False, seed=0, log=print):
    """Write every data file under `out` (no backbones).  Returns (manifest part, all texts for the vocabulary)."""
    cfg = SIZES_TINY if tiny else SIZES_FULL
    texts = []
    counts = {}
    os.makedirs(os.path.join(out, "images"), exist_ok=True)

    # --- scenes, pairs, VQA -------------------------------------------------------------------------------------
    rng, nprng = _rng(seed, "scenes"), _nprng(seed, "scenes")
    scenes, images = [], {}
    gid = 0
    for split in ("train", "val", "test"):
        for _ in range(cfg[split]):
            objs = sample_objects(rng)
            sid = f"{gid:06d}"
            img = render(objs, nprng)
            _save_png(img, os.path.join(out, "images", f"{sid}.png"))
            images[sid] = img
            scenes.append({"image_id": sid, "image": f"images/{sid}.png", "split": split, "objects": objs})
            gid += 1
    _write_jsonl(os.path.join(out, "scenes.jsonl"), scenes)
    crng, qrng = _rng(seed, "captions"), _rng(seed, "vqa")
    captions = {}
    for split in ("train", "val", "test"):
        pairs, vqa = [], []
        for sc in (s for s in scenes if s["split"] == split):
            caps = scene_captions(sc["objects"], crng)
            captions[sc["image_id"]] = caps
            pairs.append({"image": sc["image"], "captions": caps, "image_id": sc["image_id"]})
            for k, (q, a, alts, qt) in enumerate(scene_questions(sc["objects"], qrng)):
                vqa.append({"image": sc["image"], "question": q, "answers": _ten_answers(a, alts, qrng),
                            "question_id": int(sc["image_id"]) * 10 + k, "question_type": qt,
                            "image_id": sc["image_id"]})
                texts += [q, a] + alts
            texts += caps
        _write_jsonl(os.path.join(out, f"pairs_{split}.jsonl"), pairs)
        _write_jsonl(os.path.join(out, f"vqa_{split}.jsonl"), vqa)
        counts[f"pairs_{split}"], counts[f"vqa_{split}"] = len(pairs), len(vqa)
    by_split = {sp: [s for s in scenes if s["split"] == sp] for sp in ("train", "val", "test")}

    # --- text-only corpus (same grammar, random scenes that are never rendered) ---------------------------------
    rng = _rng(seed, "corpus")
    corpus = []
    for _ in range(cfg["corpus_scenes"]):
        corpus += scene_captions(sample_objects(rng), rng)
    with open(os.path.join(out, "corpus.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(corpus) + "\n")
    counts["corpus"] = len(corpus)
    texts += corpus

    # --- videos ---------------------------------------------------------------------------------------------------
    rng, nprng = _rng(seed, "videos"), _nprng(seed, "videos")
    vid = 0
    for split, nv in zip(("train", "val", "test"), cfg["videos"]):
        recs = []
        for _ in range(nv):
            spec, caps = sample_video(rng)
            name = f"v{vid:05d}"
            frames = []
            for k, (x, y, r) in enumerate(spec["track"]):
                o = {"shape": spec["shape"], "colour": spec["colour"], "x": x, "y": y, "radius": r}
                rel = f"videos/{name}/{k}.png"
                _save_png(render([o], nprng), os.path.join(out, rel))
                frames.append(rel)
            recs.append({"video_id": name, "frames": frames, "captions": caps, "motion": spec["motion"]})
            texts += caps
            vid += 1
        _write_jsonl(os.path.join(out, f"video_{split}.jsonl"), recs)
        counts[f"video_{split}"] = len(recs)

    test = by_split["test"]
    bench = cfg["bench"]

    # --- SugarCREPE: {str index: {filename, caption, negative_caption}}, indent=4 --------------------------------
    rng = _rng(seed, "sugarcrepe")
    sc_dir = os.path.join(out, "sugarcrepe")
    per_type = {t: [] for t in ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att",
                                "swap_obj")}
    used = set()
    rounds = 0
    while any(len(v) < bench for v in per_type.values()) and rounds < 6:
        for sc in test:
            for t, (p, n) in sugarcrepe_examples(sc["objects"], rng).items():
                if len(per_type[t]) < bench and (sc["image_id"], p, n) not in used:
                    used.add((sc["image_id"], p, n))
                    per_type[t].append((sc["image_id"], p, n))
        rounds += 1
    for t, rows in per_type.items():
        d, key = {}, 0
        for sid, p, n in rows:
            if t == "swap_obj" and key == 108:
                key += 1  # upstream swap_obj.json has no key "108": keep the gap so readers use .items()
            fname = f"{int(sid):012d}.jpg"  # a COCO val2017-style file name
            d[str(key)] = {"filename": fname, "caption": p, "negative_caption": n}
            texts += [p, n]
            key += 1
        os.makedirs(sc_dir, exist_ok=True)
        with open(os.path.join(sc_dir, f"{t}.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(d, indent=4) + ("\n" if t == "swap_obj" else ""))  # only swap_obj ends with \n
        counts[f"sugarcrepe_{t}"] = len(d)
    for sid in sorted({sid for rows in per_type.values() for sid, _, _ in rows}):
        _save_jpg(images[sid], os.path.join(sc_dir, "val2017", f"{int(sid):012d}.jpg"))

    # --- ARO VG-Relation / VG-Attribution (json lists; bbox = whole image) ----------------------------------------
    rng = _rng(seed, "aro")
    rel_recs, att_recs, aro_imgs = [], [], set()
    for sc in test:
        objs = sc["objects"]
        if len(objs) < 2:
            continue
        vg_id = str(2400000 + int(sc["image_id"]))
        for i, j in rng.sample([(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))],
                               k=min(2, len(objs) * (len(objs) - 1) // 2)):
            if rng.random() < 0.5:
                i, j = j, i
            a, b = objs[i], objs[j]
            r = REL_PHRASE[relation(a, b)]
            rel_recs.append({"image_id": vg_id, "true_caption": f"the {a['shape']} is {r} the {b['shape']}",
                             "false_caption": f"the {b['shape']} is {r} the {a['shape']}",
                             "relation_info": {"object": str(int(vg_id) * 10 + j), "name": r},
                             "primary_object_id": str(int(vg_id) * 10 + i), "primary_object_name": a["shape"],
                             "bbox_x": 0, "bbox_y": 0, "bbox_w": IMG, "bbox_h": IMG, "relation_name": r,
                             "image_path": f"{vg_id}.jpg"})
            if a["size"] != b["size"] and rng.random() < 0.3:
                att = [a["size"], b["size"]]
            else:
                att = [a["colour"], b["colour"]]
            att_recs.append({"image_id": vg_id,
                             "true_caption": f"the {att[0]} {a['shape']} and the {att[1]} {b['shape']}",
                             "false_caption": f"the {att[1]} {a['shape']} and the {att[0]} {b['shape']}",
                             "attributes": att, "bbox_x": 0, "bbox_y": 0, "bbox_w": IMG, "bbox_h": IMG,
                             "image_path": f"{vg_id}.jpg"})
            aro_imgs.add(sc["image_id"])
    rel_recs, att_recs = rel_recs[:bench], att_recs[:bench]
    os.makedirs(os.path.join(out, "aro", "images"), exist_ok=True)
    for name, recs in (("relation", rel_recs), ("attribution", att_recs)):
        with open(os.path.join(out, "aro", f"visual_genome_{name}.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(recs))
        texts += [r["true_caption"] for r in recs] + [r["false_caption"] for r in recs]
        counts[f"aro_{name}"] = len(recs)
    for sid in sorted(aro_imgs):
        _save_jpg(images[sid], os.path.join(out, "aro", "images", f"{2400000 + int(sid)}.jpg"))

    # --- CREPE productivity CSVs (one file per type and complexity) -----------------------------------------------
    rng = _rng(seed, "crepe")
    header = ["image_id", "caption", "n", "n_objects", "n_relations", "n_attributes", "n_connected_components",
              "hard_negs", "x", "y", "width", "height"]
    bins = {t: {} for t in ("atom", "swap", "negate")}
    crepe_imgs = set()
    multi = [sc for sc in test if len(sc["objects"]) >= 2]
    for _ in range(12):
        for sc in multi:
            meta, cap, negs = crepe_rows(sc["objects"], rng)
            if not 4 <= meta["n"] <= 12:
                continue
            for t, hn in negs.items():
                rows = bins[t].setdefault(meta["n"], [])
                if len(hn) == 5 and len(rows) < cfg["crepe_per_bin"] and all(r[1] != cap for r in rows):
                    vg = 2300000 + int(sc["image_id"])
                    hn_s = _pyset_repr(hn) if t == "negate" and len(rows) % 3 != 2 else repr(hn)
                    rows.append([vg, cap, meta["n"], meta["n_objects"], meta["n_relations"], meta["n_attributes"],
                                 meta["n_connected_components"], hn_s, "0.0", "0.0", f"{IMG:.1f}", f"{IMG:.1f}"])
                    crepe_imgs.add(sc["image_id"])
                    texts += [cap] + hn
    crepe_files = []
    for t, by_n in bins.items():
        os.makedirs(os.path.join(out, "crepe", "prod_hard_negatives", t), exist_ok=True)
        for n in sorted(by_n):
            if not by_n[n]:
                continue
            rel = f"crepe/prod_hard_negatives/{t}/prod_vg_hard_negs_{t}_complexity_{n}.csv"
            with open(os.path.join(out, rel), "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(header)
                w.writerows(by_n[n])
            crepe_files.append(rel)
            counts[f"crepe_{t}_{n}"] = len(by_n[n])
    for sid in sorted(crepe_imgs):
        _save_jpg(images[sid], os.path.join(out, "crepe", "VG_100K", f"{2300000 + int(sid)}.jpg"))

    # --- SVO-Probes: sentence with a positive image and a negative image differing in subj / verb / obj -----------
    rng = _rng(seed, "svo")
    triples = {}  # (subj, rel, obj) -> [scene ids where it holds]
    facts = {}
    for sc in test:
        objs = sc["objects"]
        f = {(a["shape"], relation(a, b), b["shape"]) for a in objs for b in objs if a is not b}
        facts[sc["image_id"]] = f
        for tr in sorted(f):
            triples.setdefault(tr, []).append(sc["image_id"])
    svo_rows, svo_imgs = [], set()  # one row per (triplet, negated slot), like the published probes
    keys = sorted(triples)
    rng.shuffle(keys)
    for tr in keys:
        s, r, o = tr
        for slot in rng.sample(["subj", "verb", "obj"], 3):
            if slot == "subj":
                cands = [(x, r, o) for x in SHAPES if x not in (s, o)]
            elif slot == "verb":
                cands = [(s, x, o) for x in RELATIONS if x != r]
            else:
                cands = [(s, r, x) for x in SHAPES if x not in (s, o)]
            cands = [c for c in cands if c in triples]
            if not cands:
                continue
            neg = rng.choice(cands)
            neg_imgs = [i for i in triples[neg] if tr not in facts[i]]
            if not neg_imgs:
                continue
            pos_id, neg_id = rng.choice(triples[tr]), rng.choice(neg_imgs)
            sent = f"{_article(s)} is {REL_PHRASE[r]} {_article(o)}."
            sent = sent[0].upper() + sent[1:]
            neg_t = ",".join(neg)
            if len(svo_rows) % 7 == 3:
                neg_t = repr([neg_t])  # the published CSV sometimes stores neg_triplet as a Python-list string
            svo_rows.append([sent, ",".join(tr), neg_t, f"https://toy.invalid/svo/{int(pos_id)}.jpg",
                             f"https://toy.invalid/svo/{int(neg_id)}.jpg", int(pos_id), int(neg_id),
                             slot == "subj", slot == "verb", slot == "obj"])
            svo_imgs.update([pos_id, neg_id])
            texts.append(sent)
            if rng.random() < 0.5:  # usually one probe per triplet, sometimes two or three slots
                break
        if len(svo_rows) >= bench:
            break
    os.makedirs(os.path.join(out, "svo_probes", "images"), exist_ok=True)
    with open(os.path.join(out, "svo_probes", "svo_probes.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["sentence", "pos_triplet", "neg_triplet", "pos_url", "neg_url", "pos_image_id", "neg_image_id",
                    "subj_neg", "verb_neg", "obj_neg"])
        w.writerows(svo_rows)
    counts["svo_probes"] = len(svo_rows)
    for sid in sorted(svo_imgs):
        _save_jpg(images[sid], os.path.join(out, "svo_probes", "images", f"{int(sid)}.jpg"))

    # --- Winoground: two images x two captions with the same words ------------------------------------------------
    rng, nprng = _rng(seed, "winoground"), _nprng(seed, "winoground")
    wg, wid = [], 0
    os.makedirs(os.path.join(out, "winoground", "images"), exist_ok=True)
    for rnd in range(4):
        for sc in multi:
            if wid >= cfg["winoground"]:
                break
            objs = sc["objects"]
            a, b = rng.sample(objs, 2)
            r = relation(a, b)
            kind = rng.choice(["colour", "position"]) if rnd == 0 else ("position" if rnd % 2 else "colour")
            alt = [dict(o) for o in objs]
            ia, ib = objs.index(a), objs.index(b)
            if kind == "colour":  # same layout, the two objects' colours exchanged
                alt[ia]["colour"], alt[ib]["colour"] = b["colour"], a["colour"]
                c0 = f"{np_(a)} {REL_PHRASE[r]} {np_(b)}"
                c1 = f"{np_(alt[ia])} {REL_PHRASE[r]} {np_(alt[ib])}"
                tag, collapsed = "Adjective-Color", "Relation"
            else:  # the two objects exchange places, so the relation between them reverses
                for key in ("x", "y"):
                    alt[ia][key], alt[ib][key] = b[key], a[key]
                if not all(_in_bounds(o) for o in alt) or not all(
                        _pair_ok(p, q) for p in alt for q in alt if p is not q):
                    continue
                c0 = f"{np_(a)} {REL_PHRASE[r]} {np_(b)}"
                c1 = f"{np_(b)} {REL_PHRASE[r]} {np_(a)}"
                tag, collapsed = "Noun", "Object"
            if rng.random() < 0.5:  # which of the pair is image_0 varies
                img0, img1 = images[sc["image_id"]], render(alt, nprng)
            else:
                img0, img1, c0, c1 = render(alt, nprng), images[sc["image_id"]], c1, c0
            _save_png(img0, os.path.join(out, "winoground", "images", f"ex_{wid}_img_0.png"))
            _save_png(img1, os.path.join(out, "winoground", "images", f"ex_{wid}_img_1.png"))
            wg.append({"id": wid, "image_0": f"ex_{wid}_img_0", "image_1": f"ex_{wid}_img_1", "caption_0": c0,
                       "caption_1": c1, "tag": tag, "secondary_tag": "", "num_main_preds": 1,
                       "collapsed_tag": collapsed})
            texts += [c0, c1]
            wid += 1
    _write_jsonl(os.path.join(out, "winoground", "examples.jsonl"), wg)
    counts["winoground"] = len(wg)

    # --- VL-CheckList: corpus YAML -> JSON [image, {POS, NEG}] per sub-category, images under vg/ --------------
    counts.update(write_vlc(out, test, images.__getitem__, bench, seed))
    counts.update(write_classification(out, cfg["classify"], seed))  # single-object scenes, own stream

    # --- BLIP layout Karpathy test file (ARO COCO-Order reads it and perturbs captions at run time) ---------------
    os.makedirs(os.path.join(out, "blip"), exist_ok=True)
    with open(os.path.join(out, "blip", "coco_karpathy_test.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps([{"image": sc["image"], "caption": captions[sc["image_id"]]} for sc in test]))
    counts["blip_coco_karpathy_test"] = len(test)

    # --- Image-Chat -----------------------------------------------------------------------------------------------
    rng = _rng(seed, "imagechat")
    ic_dir = os.path.join(out, "image_chat")
    os.makedirs(os.path.join(ic_dir, "images"), exist_ok=True)
    episodes = {}
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        eps = []
        for sc in by_split[split]:
            h = hashlib.md5(f"toy-image-chat-{seed}-{sc['image_id']}".encode()).hexdigest()
            _save_jpg(images[sc["image_id"]], os.path.join(ic_dir, "images", f"{h}.jpg"))
            eps.append({"image_hash": h, "dialog": imagechat_dialog(sc["objects"], rng)})
            texts += [u for _, u in eps[-1]["dialog"]]
        episodes[name] = eps
    pool_train = sorted({u for e in episodes["train"] for _, u in e["dialog"]})
    for name in ("valid", "test"):
        pool = sorted({u for e in episodes[name] for _, u in e["dialog"]} | set(pool_train))
        for e in episodes[name]:
            cands = []
            for _, gold in e["dialog"]:
                distract = rng.sample([u for u in pool if u != gold], 99)
                distract.insert(rng.randint(0, 99), gold)
                # "1000" holds the same 100 strings: the key layout is kept, the files stay small
                cands.append({"100": distract, "1000": list(distract)})
            e["candidates"] = cands
    for name, eps in episodes.items():
        with open(os.path.join(ic_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(eps))
        counts[f"image_chat_{name}"] = len(eps)
    with open(os.path.join(ic_dir, "personalities.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(PERSONALITIES))
    texts += ALL_STYLES
    texts += PROMPT_TEXTS

    part = {
        "counts": counts,
        "crepe_files": crepe_files,
        "image_roots": {  # where each file's image paths are relative to (relative to the world root)
            "pairs/vqa/video/scenes/blip": ".", "sugarcrepe": "sugarcrepe/val2017", "aro": "aro/images",
            "crepe": "crepe/VG_100K", "svo_probes": "svo_probes/images", "winoground": "winoground/images",
            "image_chat": "image_chat/images", "vl_checklist": "vl_checklist (IMG_ROOT of each corpus YAML)",
            "classification": "classification/<dataset>/{train,test}/<class>"},
        "notes": {"image_chat": "candidates['1000'] repeats the 100 candidates (files kept small)",
                  "sugarcrepe": "swap_obj.json skips key '108' as upstream does",
                  "bbox": "ARO/CREPE boxes cover the whole 64 px image",
                  "vl_checklist": "toy sub-categories only: Object Location/Size (no medium), Attribute color/size, "
                                  "Relation spatial"},
    }
    return part, texts


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary and tokenizers (one word list, each model's own special tokens and post-processing)
# ----------------------------------------------------------------------------------------------------------------
N_SENTINELS = 10
# Prompts the scripts put in front of generation (BLIP-2's VQA and caption prompts), so their words are in vocabulary.
PROMPT_TEXTS = ["question: short answer:", "a photo of"]
QA_PROMPT = "{} question: {} short answer:"   # the toy Flan-T5's instruction format (see train_t5)


def _with_spare_rows(n):
    """Embedding rows for a vocabulary of n: rounded up past n, as real checkpoints have (OPT-2.7B 50272 rows for
    50265 tokens, Flan-T5 32128 for 32100); BLIP-2's <image> placeholder token takes the first spare row."""
    return (n // 64 + 1) * 64


def build_word_list(texts):
    """Lowercased word/punctuation units of all toy text, split exactly as the tokenizers will split them."""
    from tokenizers import normalizers, pre_tokenizers
    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Whitespace()
    words = set(str(d) for d in range(10)) | {".", ",", "?", "!", ":", "'", "(", ")"}
    for t in dict.fromkeys(texts):
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    return sorted(words)


def _tok_spec(kind):
    """(leading specials, trailing specials, tokenizer kwargs, post-processor template) per backbone,
    mirroring the real checkpoints' conventions."""
    if kind == "bert":
        return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], [],
                dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"),
                ("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1", ["[CLS]", "[SEP]"]))
    if kind == "clip":  # sot/eot are the last ids, as in CLIP's BPE vocabulary; pad = eot as in HF's CLIP tokenizer
        return (["<unk>"], ["<|startoftext|>", "<|endoftext|>"],
                dict(unk_token="<unk>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                     pad_token="<|endoftext|>"),
                ("<|startoftext|> $A <|endoftext|>", "<|startoftext|> $A <|endoftext|> $B <|endoftext|>",
                 ["<|startoftext|>", "<|endoftext|>"]))
    if kind == "gpt2":  # no post-processing; eos doubles as bos and pad
        return (["<unk>"], ["<|endoftext|>"],
                dict(unk_token="<unk>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                     pad_token="<|endoftext|>"), None)
    if kind == "opt":  # OPT ids: <s>=0 <pad>=1 </s>=2 <unk>=3; the tokenizer prepends </s> as BOS
        return (["<s>", "<pad>", "</s>", "<unk>"], ["\n"],
                dict(unk_token="<unk>", bos_token="</s>", eos_token="</s>", pad_token="<pad>"),
                ("</s> $A", "</s> $A $B", ["</s>"]))
    if kind == "t5":  # <pad>=0 </s>=1 <unk>=2, sentinels at the top of the vocabulary (<extra_id_0> last)
        sent = [f"<extra_id_{k}>" for k in range(N_SENTINELS - 1, -1, -1)]
        return (["<pad>", "</s>", "<unk>"], sent,
                dict(unk_token="<unk>", eos_token="</s>", pad_token="<pad>",
                     additional_special_tokens=[f"<extra_id_{k}>" for k in range(N_SENTINELS)]),
                ("$A </s>", "$A </s> $B </s>", ["</s>"]))
    raise ValueError(kind)


def make_tokenizer(kind, words, max_len):
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    lead, trail, kw, post = _tok_spec(kind)
    vocab = {t: i for i, t in enumerate(lead + words + trail)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=kw["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = [t for t in lead + trail if t != "\n"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if "\n" in trail:  # OPT: BLIP-2 ends captions with "\n" and stops generation on it; keep it a real token
        tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
    if post:
        single, pair, sp = post
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=[(t, vocab[t]) for t in sp])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, **kw)
    return fast, vocab


# ----------------------------------------------------------------------------------------------------------------
# Backbones: configs and brief pretraining on the toy world
# ----------------------------------------------------------------------------------------------------------------
def _model_sizes(tiny):
    return dict(hidden=64, layers=2, heads=4, t5_layers=2) if tiny else dict(hidden=128, layers=4, heads=4,
                                                                              t5_layers=2)


TRAIN_STEPS_FULL = dict(clip=200, blip2_vision=60, bert=250, gpt2=500, opt=150, t5=400)
CLIP_BATCH_FULL, CLIP_BATCH_TINY = 64, 128
TRAIN_STEPS_TINY = dict(clip=120, blip2_vision=40, bert=150, gpt2=600, opt=100, t5=400)
TEXT_MAX = 48


def _lr_at(step, total, base, warmup=20):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _fit(model, loss_fn, steps, lr, seed, name, log):
    """AdamW + warm-up/cosine; returns the mean loss over the last 20 steps."""
    import torch
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    hist, t0 = [], time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"  {name} step {step:4d} loss {hist[-1]:.4f} ({time.time() - t0:.1f}s)")
    model.eval()
    return float(np.mean(hist[-20:]))


def _pad(seqs, pad_id):
    import torch
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def _features(out):
    """transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor."""
    return out if hasattr(out, "norm") else out.pooler_output


def train_clip(root, words, pairs_tr, pairs_va, sizes, steps, seed, log):
    """CLIP (Radford et al. 2021, sec. 2.3): symmetric InfoNCE over in-batch image/caption pairs."""
    import torch
    import transformers
    from transformers import CLIPConfig, CLIPModel
    # the pillow image processor: the default CLIPImageProcessor wants torchvision (not a dependency here)
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    from common.image import ImageTransform, load_image
    tok, vocab = make_tokenizer("clip", words, TEXT_MAX)
    H, L = sizes["hidden"], sizes["layers"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=H, intermediate_size=4 * H, num_hidden_layers=L,
                         num_attention_heads=sizes["heads"], max_position_embeddings=TEXT_MAX,
                         pad_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=H, intermediate_size=4 * H, num_hidden_layers=L,
                           num_attention_heads=sizes["heads"], image_size=IMG, patch_size=8),
        projection_dim=H)
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    tf = ImageTransform(IMG)  # the eval transform every script uses to feed this backbone

    def pix(recs):
        return torch.stack([tf(load_image(os.path.join(root, r["image"]))) for r in recs])  # (N, 3, 64, 64)

    X_tr, X_va = pix(pairs_tr), pix(pairs_va)
    cap_tr = [tok(r["captions"])["input_ids"] for r in pairs_tr]  # [N][5][len]
    g = torch.Generator().manual_seed(seed)
    B = min(CLIP_BATCH_TINY if sizes["hidden"] < 128 else CLIP_BATCH_FULL, len(pairs_tr))
    rng = random.Random(seed)

    def loss_fn(step):
        idx = torch.randperm(len(pairs_tr), generator=g)[:B].tolist()
        ids, mask = _pad([cap_tr[i][rng.randrange(5)] for i in idx], vocab["<|endoftext|>"])
        return model(input_ids=ids, attention_mask=mask, pixel_values=X_tr[idx], return_loss=True).loss

    loss = _fit(model, loss_fn, steps, 2e-3, seed, "clip", log)
    # zero-shot retrieval on val: i2t R@1 (any of the 5 captions), t2i R@1
    with torch.no_grad():
        im = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=X_va)), dim=-1)
        flat = [c for r in pairs_va for c in r["captions"]]
        owner = torch.tensor([i for i, r in enumerate(pairs_va) for _ in r["captions"]])
        ids, mask = _pad(tok(flat)["input_ids"], vocab["<|endoftext|>"])
        tx = torch.nn.functional.normalize(_features(model.get_text_features(input_ids=ids, attention_mask=mask)),
                                           dim=-1)
        sim = im @ tx.T  # (N_img, N_txt)
        i2t = float((owner[sim.argmax(1)] == torch.arange(len(pairs_va))).float().mean())
        t2i = float((sim.argmax(0) == owner).float().mean())
    d = os.path.join(root, "models", "clip")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    processor_cls(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG},
                       do_center_crop=True).save_pretrained(d)
    log(f"  clip val zero-shot R@1 i2t {i2t:.3f} t2i {t2i:.3f} (chance {1 / len(pairs_va):.3f})")
    return {"final_loss": loss, "val_i2t_r1": i2t, "val_t2i_r1": t2i, "val_chance_r1": 1 / len(pairs_va),
            "steps": steps, "vocab_size": len(vocab)}


def train_blip2_vision(root, pairs_tr, pairs_va, steps, seed, log):
    """A BLIP-2-format vision tower (transformers Blip2VisionModel, the class that holds EVA ViT-g in the released
    BLIP-2 checkpoints), so the toy BLIP-2 can be exported to and captioned with Blip2ForConditionalGeneration.

    Like EVA ViT-g in BLIP-2 (its last block dropped), it has one block fewer than the toy CLIP tower.  Its weights
    start as the CLIP tower's (q/k/v fused; CLIP's key bias is dropped, which is exact because a bias on the keys
    adds the same amount to every logit of a softmax row) and are then distilled onto CLIP's penultimate-layer
    tokens, because Blip2VisionModel has no pre-LayerNorm after its embeddings where CLIP has one."""
    import torch
    from transformers import Blip2VisionConfig, Blip2VisionModel, CLIPModel
    from common.image import ImageTransform, load_image
    clip = CLIPModel.from_pretrained(os.path.join(root, "models", "clip")).vision_model.eval()
    cc = clip.config
    conf = Blip2VisionConfig(hidden_size=cc.hidden_size, intermediate_size=cc.intermediate_size,
                             num_hidden_layers=cc.num_hidden_layers - 1, num_attention_heads=cc.num_attention_heads,
                             image_size=cc.image_size, patch_size=cc.patch_size, hidden_act=cc.hidden_act,
                             layer_norm_eps=cc.layer_norm_eps, qkv_bias=True)
    torch.manual_seed(seed)
    model = Blip2VisionModel(conf)
    sd = {"embeddings.class_embedding": clip.embeddings.class_embedding.view(1, 1, -1),
          "embeddings.patch_embedding.weight": clip.embeddings.patch_embedding.weight,
          "embeddings.patch_embedding.bias": torch.zeros(cc.hidden_size),
          "embeddings.position_embedding": clip.embeddings.position_embedding.weight[None],
          "post_layernorm.weight": torch.ones(cc.hidden_size), "post_layernorm.bias": torch.zeros(cc.hidden_size)}
    for i in range(conf.num_hidden_layers):
        c, b = clip.encoder.layers[i], f"encoder.layers.{i}."
        a = c.self_attn
        sd[b + "self_attn.qkv.weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        sd[b + "self_attn.qkv.bias"] = torch.cat([a.q_proj.bias, torch.zeros_like(a.k_proj.bias), a.v_proj.bias])
        sd[b + "self_attn.projection.weight"], sd[b + "self_attn.projection.bias"] = a.out_proj.weight, a.out_proj.bias
        for n in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            m = c.get_submodule(n)
            sd[b + n + ".weight"], sd[b + n + ".bias"] = m.weight, m.bias
    model.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    tf = ImageTransform(IMG)
    X_tr = torch.stack([tf(load_image(os.path.join(root, r["image"]))) for r in pairs_tr])  # (N, 3, 64, 64)
    X_va = torch.stack([tf(load_image(os.path.join(root, r["image"]))) for r in pairs_va])

    def penultimate(x):  # CLIP tokens entering its last block: what BLIP-2 reads from its ViT
        with torch.no_grad():
            return clip(pixel_values=x, output_hidden_states=True).hidden_states[-2]  # (N, 1+P, C)

    def ours(x):
        return model.encoder(inputs_embeds=model.embeddings(x)).last_hidden_state  # (N, 1+P, C), no post-LN

    T_tr, T_va = penultimate(X_tr), penultimate(X_va)
    scale = T_tr.var()
    g = torch.Generator().manual_seed(seed)
    B = min(32, len(pairs_tr))

    def loss_fn(step):
        idx = torch.randperm(len(pairs_tr), generator=g)[:B]
        return torch.nn.functional.mse_loss(ours(X_tr[idx]), T_tr[idx]) / scale

    with torch.no_grad():
        before = float(torch.nn.functional.mse_loss(ours(X_va), T_va) / T_va.var())
    _fit(model, loss_fn, steps, 2e-3, seed, "blip2_vision", log)
    with torch.no_grad():
        rel = float(torch.nn.functional.mse_loss(ours(X_va), T_va) / T_va.var())
    d = os.path.join(root, "models", "blip2_vision")
    model.save_pretrained(d)
    shutil.copy(os.path.join(root, "models", "clip", "preprocessor_config.json"), d)
    log(f"  blip2_vision val relative MSE to CLIP's penultimate tokens {rel:.4f} (copied weights: {before:.4f})")
    return {"val_rel_mse": rel, "val_rel_mse_before": before, "steps": steps}


def _lm_texts(pairs_tr, corpus):
    return [c for r in pairs_tr for c in r["captions"]] + corpus


def _scene_documents(groups, seed, per_scene=2):
    """Two captions of one scene joined by GPT-2's end-of-text token: a toy stand-in for web documents.

    Real GPT-2 learns from documents whose earlier text predicts later text, which is why a prefix (ClipCap's
    mapper, perceiver_caption.py --bridge mapper) can steer it. A toy GPT-2 trained only on isolated captions
    always starts from the same token and learns to ignore what precedes a caption, and a mapped prefix then
    scored about as well as blank images (the figures: docs/perceiver_caption.md).
    """
    rng = _rng(seed, "gpt2-documents")
    return [" <|endoftext|> ".join(rng.sample(g, 2)) for g in groups for _ in range(per_scene) if len(g) > 1]


def _causal_eval(model, seqs, pad_id):
    """Token perplexity of held-out sequences (predict every token after the first)."""
    import torch
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), 256):
            ids, mask = _pad(seqs[i:i + 256], pad_id)
            labels = ids.masked_fill(mask == 0, -100)[:, 1:]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
            tot += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                           reduction="sum"))
            n += int((labels != -100).sum())
    return math.exp(tot / n)


def train_causal(kind, root, words, texts, val_texts, sizes, steps, seed, log):
    """GPT-2 / OPT next-token prediction on captions + corpus (Radford et al. 2019; Zhang et al. 2022)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM
    # GPT-2's tokenizer allows what its positions allow (as the released one: 1024 = n_positions); the
    # two-caption documents below are longer than one caption's TEXT_MAX
    tok, vocab = make_tokenizer(kind, words, 128 if kind == "gpt2" else TEXT_MAX)
    H, L = sizes["hidden"], sizes["layers"]
    torch.manual_seed(seed)
    if kind == "gpt2":
        eot = vocab["<|endoftext|>"]
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=H, n_layer=L,
                                           n_head=sizes["heads"], bos_token_id=eot, eos_token_id=eot,
                                           pad_token_id=eot))
        enc = lambda ts: [[eot] + s + [eot] for s in tok(ts)["input_ids"]]  # noqa: E731
        pad = eot
    else:
        model = OPTForCausalLM(OPTConfig(vocab_size=_with_spare_rows(len(vocab)), hidden_size=H, ffn_dim=4 * H, num_hidden_layers=L,
                                         num_attention_heads=sizes["heads"], max_position_embeddings=128,
                                         word_embed_proj_dim=H, pad_token_id=vocab["<pad>"],
                                         bos_token_id=vocab["</s>"], eos_token_id=vocab["</s>"]))
        nl = vocab["\n"]
        enc = lambda ts: [s + [nl] for s in tok(ts)["input_ids"]]  # noqa: E731  "</s> caption \n" as BLIP-2 feeds OPT
        pad = vocab["<pad>"]
    seqs, val = enc(texts), enc(val_texts)
    g = torch.Generator().manual_seed(seed)
    B = 64

    def loss_fn(step):
        idx = torch.randint(len(seqs), (B,), generator=g).tolist()
        ids, mask = _pad([seqs[i] for i in idx], pad)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V): token t predicts token t+1
        labels = ids.masked_fill(mask == 0, -100)[:, 1:]
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)

    loss = _fit(model, loss_fn, steps, 3e-3, seed, kind, log)
    ppl = _causal_eval(model, val, pad)
    d = os.path.join(root, "models", kind)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    log(f"  {kind} val perplexity {ppl:.2f} (uniform {len(vocab)})")
    return {"final_loss": loss, "val_ppl": ppl, "uniform_ppl": len(vocab), "steps": steps, "vocab_size": len(vocab)}


def train_bert(root, words, texts, val_texts, sizes, steps, seed, log):
    """BERT masked-LM (Devlin et al. 2019, sec. 3.1): 15% of tokens, 80% [MASK] / 10% random / 10% kept."""
    import torch
    from transformers import BertConfig, BertForPreTraining
    tok, vocab = make_tokenizer("bert", words, TEXT_MAX)
    H, L = sizes["hidden"], sizes["layers"]
    torch.manual_seed(seed)
    # BertForPreTraining: saves encoder + pooler + MLM head, so BertModel (with pooler) and BertForMaskedLM
    # both load every weight they need from this folder
    model = BertForPreTraining(BertConfig(vocab_size=len(vocab), hidden_size=H, num_hidden_layers=L,
                                          num_attention_heads=sizes["heads"], intermediate_size=4 * H,
                                          max_position_embeddings=64, pad_token_id=0))
    seqs, val = tok(texts)["input_ids"], tok(val_texts)["input_ids"]
    n_special = 5
    g = torch.Generator().manual_seed(seed)

    def mlm_batch(batch, gen):
        ids, mask = _pad(batch, 0)
        cand = mask.bool() & (ids >= n_special)
        sel = (torch.rand(ids.shape, generator=gen) < 0.15) & cand
        labels = ids.masked_fill(~sel, -100)
        u = torch.rand(ids.shape, generator=gen)
        ids = ids.masked_fill(sel & (u < 0.8), vocab["[MASK]"])
        rnd = sel & (u >= 0.8) & (u < 0.9)
        ids = torch.where(rnd, torch.randint(n_special, len(vocab), ids.shape, generator=gen), ids)
        return ids, mask, labels

    def mlm_loss(ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask).prediction_logits  # (B, L, V)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    def loss_fn(step):
        idx = torch.randint(len(seqs), (64,), generator=g).tolist()
        return mlm_loss(*mlm_batch([seqs[i] for i in idx], g))

    loss = _fit(model, loss_fn, steps, 2e-3, seed, "bert", log)
    with torch.no_grad():
        gv = torch.Generator().manual_seed(seed + 1)
        val_loss = float(np.mean([float(mlm_loss(*mlm_batch(val[i:i + 256], gv))) for i in range(0, len(val), 256)]))
    d = os.path.join(root, "models", "bert")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    log(f"  bert val masked-token perplexity {math.exp(val_loss):.2f} (uniform {len(vocab)})")
    return {"final_loss": loss, "val_mlm_ppl": math.exp(val_loss), "uniform_ppl": len(vocab), "steps": steps,
            "vocab_size": len(vocab)}


def _qa_examples(pairs, vqa):
    """(captions of the image, question, majority answer) for every VQA record: the toy instruction-tuning data."""
    caps = {r["image"]: r["captions"] for r in pairs}
    out = []
    for q in vqa:
        answer = max(set(q["answers"]), key=q["answers"].count)
        out.append((caps[q["image"]], q["question"], answer))
    return out


# Examples of each task in a batch of 64.  The reading tasks (paraphrase, continuation, QA) dominate: with span
# corruption and prefix -> suffix alone the toy T5 ignores soft prompts (BLIP-2 stage-2 captions came out
# the same for every image, scoring like the blank-image pipeline; data/README.md has the figures).
T5_MIX = dict(span=8, prefix=8, paraphrase=16, continuation=16, qa=16)


def train_t5(root, words, texts, val_texts, groups, qa, val_qa, sizes, steps, seed, log):
    """A toy Flan-T5, trained on a mixture of text-only tasks: T5 span corruption (Raffel et al. 2020, sec. 3.1.4),
    BLIP-2's prefix -> suffix split, paraphrasing (one caption of a scene -> another of the same scene) and
    instruction-style question answering from a caption ("<caption> question: <q> short answer:" -> answer).
    The last two make the decoder write what its encoder input says -- the skill an instruction-tuned Flan-T5
    brings to BLIP-2 (Chung et al. 2022; BLIP-2 sec. 3.3, 4.2), without which soft visual prompts and the
    zero-shot VQA prompt have nothing to act on.  `groups`: lists of captions of one scene."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    tok, vocab = make_tokenizer("t5", words, TEXT_MAX)
    H = sizes["hidden"]
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=_with_spare_rows(len(vocab)), d_model=H, d_kv=H // sizes["heads"], d_ff=4 * H,
        num_layers=sizes["t5_layers"], num_decoder_layers=sizes["t5_layers"], num_heads=sizes["heads"],
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    # Word embeddings start at N(0, 0.2) instead of T5's N(0, 1): the tiny model pretrains faster in its few
    # hundred steps (data/README.md has the figures).
    torch.nn.init.normal_(model.shared.weight, std=0.2)
    words_only = [s[:-1] for s in tok(texts)["input_ids"]]  # drop the appended </s>
    val_words = [s[:-1] for s in tok(val_texts)["input_ids"]]
    group_ids = [tok(g)["input_ids"] for g in groups]  # [scene][caption][tokens + </s>]
    eos = vocab["</s>"]
    sent = [vocab[f"<extra_id_{k}>"] for k in range(N_SENTINELS)]

    def span_example(s, rng):  # 1-2 spans of 1-3 tokens
        n_spans = 1 if len(s) < 8 else 2
        starts = sorted(rng.sample(range(len(s)), n_spans))
        src, tgt, pos, k = [], [], 0, 0
        for st in starts:
            if st < pos:
                continue
            ln = min(rng.randint(1, 3), len(s) - st)
            src += s[pos:st] + [sent[k]]
            tgt += [sent[k]] + s[st:st + ln]
            pos, k = st + ln, k + 1
        return src + s[pos:] + [eos], tgt + [eos]

    def prefix_example(s, rng):
        m = rng.randint(1, max(1, len(s) // 2))
        return s[:m] + [eos], s[m:] + [eos]

    def paraphrase_example(g, rng):
        a, b = rng.sample(range(len(g)), 2)
        return g[a], g[b]

    def continuation_example(g, rng):  # another caption of the scene as context, then a prefix -> the suffix
        a, b = rng.sample(range(len(g)), 2)
        s = g[b][:-1]
        m = rng.randint(1, max(1, len(s) // 2))
        return g[a][:-1] + s[:m] + [eos], s[m:] + [eos]

    def qa_example(item, rng):
        caps, question, answer = item
        src = tok(QA_PROMPT.format(rng.choice(caps), question))["input_ids"]  # ends with </s>
        return src, tok(answer)["input_ids"]

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)

    def batch_loss(exs):
        src, sm = _pad([e[0] for e in exs], 0)
        tgt, tm = _pad([e[1] for e in exs], 0)
        return model(input_ids=src, attention_mask=sm, labels=tgt.masked_fill(tm == 0, -100)).loss

    def draw(n, pool):
        return [pool[i] for i in torch.randint(len(pool), (n,), generator=g).tolist()]

    def loss_fn(step):
        long = [s for s in draw(T5_MIX["span"], words_only) if len(s) >= 4]
        return batch_loss([span_example(s, rng) for s in long] +
                          [prefix_example(s, rng) for s in draw(T5_MIX["prefix"], words_only)] +
                          [paraphrase_example(x, rng) for x in draw(T5_MIX["paraphrase"], group_ids)] +
                          [continuation_example(x, rng) for x in draw(T5_MIX["continuation"], group_ids)] +
                          [qa_example(x, rng) for x in draw(T5_MIX["qa"], qa)])

    loss = _fit(model, loss_fn, steps, 3e-3, seed, "t5", log)
    vr = random.Random(seed + 1)
    with torch.no_grad():
        val_loss = float(np.mean([float(batch_loss([prefix_example(s, vr) for s in val_words[i:i + 256]]))
                                  for i in range(0, len(val_words), 256)]))
        items = val_qa[:300]
        src, sm = _pad([qa_example(it, vr)[0] for it in items], 0)
        out = model.generate(input_ids=src, attention_mask=sm, max_new_tokens=4, do_sample=False)
        qa_acc = float(np.mean([a == it[2] for a, it in zip(tok.batch_decode(out, skip_special_tokens=True), items)]))
    d = os.path.join(root, "models", "t5")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    log(f"  t5 val prefix -> suffix perplexity {math.exp(val_loss):.2f} (uniform {len(vocab)}); "
        f"answers {qa_acc:.1%} of val questions from a caption")
    return {"final_loss": loss, "val_ppl": math.exp(val_loss), "uniform_ppl": len(vocab), "steps": steps,
            "vocab_size": len(vocab), "val_qa_from_caption_acc": qa_acc}


MODEL_NAMES = ("clip", "blip2_vision", "bert", "gpt2", "opt", "t5")
MODEL_DEPS = {"blip2_vision": ("clip",)}   # the BLIP-2 tower starts from the toy CLIP's weights
MODEL_SEED_OFFSET = dict(clip=0, bert=1, gpt2=2, opt=3, t5=4, blip2_vision=5)
MODEL_DONE = "toy_model.json"               # written last into models/<name>: its presence marks a finished backbone


def with_deps(names):
    """`names` plus the backbones they are built from, in build order."""
    need = set()
    for n in names:
        if n not in MODEL_NAMES:
            raise ValueError(f"unknown toy backbone {n!r}; choose from {MODEL_NAMES}")
        need.update((n,) + MODEL_DEPS.get(n, ()))
    return [n for n in MODEL_NAMES if n in need]


def _train_one(name, root, tiny, seed, log):
    """Pretrain one backbone into <root>/models/<name>.  Each backbone's inputs come only from the data files,
    its own seed and (the BLIP-2 tower) the toy CLIP, so building one alone gives the same bytes as building
    all (on a given machine)."""
    import torch
    from common.data import read_pairs, read_vqa
    prev = torch.get_num_threads()
    torch.set_num_threads(2)  # fixed thread count: same reductions -> same bytes on a given machine
    try:
        with open(os.path.join(root, "models_vocab.txt"), encoding="utf-8") as f:
            words = f.read().split()
        sizes = _model_sizes(tiny)
        steps = (TRAIN_STEPS_TINY if tiny else TRAIN_STEPS_FULL)[name]
        s = seed + MODEL_SEED_OFFSET[name]
        tr, va = read_pairs(os.path.join(root, "pairs_train.jsonl")), read_pairs(os.path.join(root, "pairs_val.jsonl"))
        with open(os.path.join(root, "corpus.txt"), encoding="utf-8") as f:
            corpus = f.read().splitlines()
        # captions of one scene: the corpus writes 5 per (never rendered) scene, in order
        groups = [r["captions"] for r in tr] + [corpus[i:i + 5] for i in range(0, len(corpus) - 4, 5)]
        lm_texts = _lm_texts(tr, corpus)
        val_texts = [c for r in va for c in r["captions"]]
        if name == "clip":
            return train_clip(root, words, tr, va, sizes, steps, s, log)
        if name == "blip2_vision":
            return train_blip2_vision(root, tr, va, steps, s, log)
        if name == "bert":
            return train_bert(root, words, lm_texts, val_texts, sizes, steps, s, log)
        if name == "gpt2":
            return train_causal("gpt2", root, words, lm_texts + _scene_documents(groups, seed), val_texts, sizes,
                                steps, s, log)
        if name == "opt":
            return train_causal("opt", root, words, lm_texts, val_texts, sizes, steps, s, log)
        qa = _qa_examples(tr, read_vqa(os.path.join(root, "vqa_train.jsonl")))
        val_qa = _qa_examples(va, read_vqa(os.path.join(root, "vqa_val.jsonl")))
        return train_t5(root, words, lm_texts, val_texts, groups, qa, val_qa, sizes, steps, s, log)
    finally:
        torch.set_num_threads(prev)


def _write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def model_ready(root, name):
    return os.path.isfile(os.path.join(root, "models", name, MODEL_DONE))


def write_shards(root, split="train", n_shards=8, out_dir=None, fmt="jpg"):
    """Write <root>/pairs_<split>.jsonl as webdataset shards in img2dataset's layout, so the shard path
    (common.data.ShardStream, `--train_shards`) runs on the toy world: `<out_dir>/{00000..N}.tar` (default
    out_dir <root>/shards/<split>) holding one sample per (image, caption) pair -- key.jpg (or key.png with
    fmt="png"), key.txt, key.json -- and NNNNN_stats.json beside each shard.  Samples are dealt to shards in
    record order; the same world gives the same bytes.  Shards already written with the same arguments are kept
    (written.json says which).  Returns the brace spec.
    """
    from common.data import read_pairs
    if not isinstance(n_shards, int) or n_shards < 1:  # 0 divided by zero; below 0 wrote no shard at all
        raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
    if fmt not in ("jpg", "png"):  # any other name held PNG bytes under that extension
        raise ValueError(f"fmt must be 'jpg' or 'png', got {fmt!r}")
    out_dir = out_dir or os.path.join(root, "shards", split)
    spec = os.path.join(out_dir, "{00000..%05d}.tar" % (n_shards - 1))
    marker, want = os.path.join(out_dir, "written.json"), {"split": split, "n_shards": n_shards, "fmt": fmt}
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == want:
                return spec
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # shards of another layout: a glob must not pick them up
        if re.fullmatch(r"\d{5}(\.tar|_stats\.json)|written\.json", name):
            os.remove(os.path.join(out_dir, name))
    recs = read_pairs(os.path.join(root, f"pairs_{split}.jsonl"))
    samples = [(i, j) for i, r in enumerate(recs) for j in range(len(r["captions"]))]
    per = -(-len(samples) // n_shards)
    encoded = {}
    for k in range(n_shards):
        tmp = os.path.join(out_dir, f"{k:05d}.tar.tmp.{os.getpid()}")
        mine = samples[k * per:(k + 1) * per]
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for n, (i, j) in enumerate(mine):
                rec, key = recs[i], f"{k:05d}{n:04d}"  # img2dataset keys: shard number, then index in the shard
                if i not in encoded:  # each image once for its five captions
                    with Image.open(os.path.join(root, rec["image"])) as im:
                        buf = io.BytesIO()
                        if fmt == "jpg":
                            im.convert("RGB").save(buf, format="JPEG", quality=95, subsampling=0)
                        else:
                            im.save(buf, format="PNG")
                        encoded = {i: (buf.getvalue(), im.size)}
                data, (w, h) = encoded[i]
                meta = {"key": key, "caption": rec["captions"][j], "status": "success", "width": w, "height": h,
                        "original_width": w, "original_height": h, "image": rec["image"], "caption_index": j}
                for ext, payload in ((fmt, data), ("txt", rec["captions"][j].encode()),
                                     ("json", json.dumps(meta).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size, ti.mtime, ti.mode = len(payload), 0, 0o644  # fixed mtime: same bytes each time
                    tf.addfile(ti, io.BytesIO(payload))
        os.replace(tmp, os.path.join(out_dir, f"{k:05d}.tar"))
        _write_atomic(os.path.join(out_dir, f"{k:05d}_stats.json"), json.dumps(
            {"count": len(mine), "successes": len(mine), "failed_to_download": 0, "failed_to_resize": 0,
             "status_dict": {"success": len(mine)}}, indent=4))
    _write_atomic(marker, json.dumps(want))
    return spec


def build_model(root, name, tiny, seed, log=print):
    """Build backbone `name` (and what it is built from) into an existing world unless already finished."""
    from common.hf import quiet_model_bars
    quiet_model_bars()
    out = {}
    for n in with_deps([name]):
        if model_ready(root, n):
            continue
        d = os.path.join(root, "models", n)
        if os.path.exists(d):  # a build that was killed half-way
            shutil.rmtree(d)
        t0 = time.time()
        log(f"pretraining toy {n} ...")
        stats = _train_one(n, root, tiny, seed, log)
        stats["seconds"] = round(time.time() - t0, 1)
        _write_atomic(os.path.join(d, MODEL_DONE), json.dumps(stats, indent=1))
        out[n] = stats
    return out


def build_models(root, tiny, seed, log, names=MODEL_NAMES):
    out = {}
    for name in names:
        out.update(build_model(root, name, tiny, seed, log))
    out["_sizes"] = _model_sizes(tiny)
    return out


def model_stats(root):
    """Per-backbone training figures of the backbones built so far (from models/<name>/toy_model.json)."""
    out = {}
    for n in MODEL_NAMES:
        if model_ready(root, n):
            with open(os.path.join(root, "models", n, MODEL_DONE), encoding="utf-8") as f:
                out[n] = json.load(f)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------
def _repo_on_path():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)


def _check_replaceable(out):
    """Raise FileExistsError unless `out` is missing, an empty folder or a toy world (a folder holding
    manifest.json, or scenes.jsonl: a world whose manifest was deleted): a mistyped --out must not delete
    someone's folder, and a file in the way is not a world either."""
    if not os.path.lexists(out):
        return
    names = set(os.listdir(out)) if os.path.isdir(out) else None
    if names is not None and (not names or names & {"manifest.json", "scenes.jsonl"}):
        return
    raise FileExistsError(f"{out} exists and is not a toy world (no manifest.json or scenes.jsonl in it); "
                          f"not replacing it: choose another folder, or move it away first")


def _pid_gone(pid):
    """True only when no process `pid` exists here (os.kill(pid, 0) raises ProcessLookupError); a running
    process, one of another user (PermissionError) or any doubt counts as alive.  Windows: never gone (its
    os.kill would terminate the process)."""
    if os.name == "nt" or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _remove_dead(parent, pattern, log):
    """Delete the folders in `parent` whose name fullmatches `pattern` (group 1: the pid of the process that
    made it) when that process no longer runs; a live one's folder and any other name are kept.  (A pid is only
    checked on this machine: on a folder shared by several hosts another host's live build counts as dead.)"""
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
        m = pattern.fullmatch(name)
        path = os.path.join(parent, name)
        if m and os.path.isdir(path) and not os.path.islink(path) and _pid_gone(int(m.group(1))):
            log(f"removing {path}, left by a toy build (pid {m.group(1)}) that no longer runs")
            shutil.rmtree(path, ignore_errors=True)


def remove_dead_builds(out, log=print):
    """Delete what a build_toy_world killed half-way left beside `out`: its `<out>.building-<pid>` folder, and
    the `<out>.old-<pid>` it renames the world it replaces to (killed between its two renames, the old world
    stays there, out of use), each only once its process no longer runs (`_remove_dead`)."""
    parent, base = os.path.split(os.path.abspath(out))
    _remove_dead(parent, re.compile(re.escape(base) + r"\.(?:building|old)-([0-9]+)"), log)


def build_toy_world(out, tiny=False, seed=0, models=True, log=print, replace=True):
    """Build the world into `out` via a temporary sibling folder + rename.  An existing complete world is
    replaced, unless `replace=False`, in which case a world another process finished meanwhile is kept; the
    temporary folders of killed builds of `out` are removed first (remove_dead_builds).
    `models`: True = every backbone, False = data only, or a list of backbone names (more are built on demand by
    `ensure_toy_world`).  Returns the manifest dict (<out>/manifest.json, whose presence marks complete data).
    An existing `out` that is not a toy world (`_check_replaceable`) is refused before anything is built."""
    _repo_on_path()
    t0 = time.time()
    out = os.path.abspath(out)
    names = MODEL_NAMES if models is True else with_deps(models or ())  # unknown names: before any folder
    _check_replaceable(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    remove_dead_builds(out, log)
    tmp = f"{out}.building-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        log(f"building {'tiny ' if tiny else ''}toy world (seed {seed}) into {out}")
        part, texts = build_data(tmp, tiny=tiny, seed=seed, log=log)
        with open(os.path.join(tmp, "models_vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(build_word_list(texts)) + "\n")
        t_data = time.time() - t0
        log(f"data written in {t_data:.1f}s: " + ", ".join(f"{k}={v}" for k, v in part["counts"].items()))
        manifest = {"seed": seed, "tiny": tiny, "image_size": IMG, **part, "data_seconds": round(t_data, 1)}
        if names:
            manifest["models"] = build_models(tmp, tiny, seed, log, names)
        manifest["build_seconds"] = round(time.time() - t0, 1)
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        done = os.path.join(out, "manifest.json")
        if not replace and os.path.isfile(done):  # someone else completed it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            with open(done, encoding="utf-8") as f:
                return json.load(f)
        if os.path.lexists(out):  # an older world, or a stale world folder without manifest
            _check_replaceable(out)  # (again: it may have changed during the build)
            trash = f"{out}.old-{os.getpid()}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"toy world complete in {manifest['build_seconds']:.1f}s -> {out}")
    return manifest


@contextlib.contextmanager
def _build_lock(root, log=print):
    """An exclusive flock on the folder that holds `root` (the directory itself: no lock file is left behind),
    held while ensure_toy_world builds.  Without it two processes that found the same backbone missing both
    trained it into models/<name>, one deleting or overwriting the files the other was writing or reading.
    Where flock is missing (Windows) or refused (some network file systems) the build runs unlocked."""
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    try:
        import fcntl
        fd = os.open(parent, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"waiting for another process building a toy world in {parent} ...")
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _world_complete(root, names):
    return (os.path.isfile(os.path.join(root, "manifest.json")) and all(
        os.path.isdir(os.path.join(root, d)) for d in ("vl_checklist", "classification"))
        and all(model_ready(root, n) for n in names))


def ensure_toy_world(root="data/toy", tiny=False, seed=0, models=MODEL_NAMES, log=print):
    """Return `root`, building what is missing: the data when `<root>/manifest.json` is absent, then each
    backbone of `models` (and what it is built from) that is not finished yet.  A script's first toy run thus
    builds only the backbones it reads.  An existing world is kept whatever `tiny` and `seed` say: backbones
    added to it use the world's own seed and size.  Building happens under `_build_lock`, so a second process
    waits and then finds done what the first built; a complete world is returned without the lock."""
    names = with_deps(models)  # unknown names fail here, before anything is built
    if _world_complete(root, names):
        return root
    with _build_lock(root, log):
        if not os.path.isfile(os.path.join(root, "manifest.json")):
            try:
                build_toy_world(root, tiny=tiny, seed=seed, models=names, log=log, replace=False)
            except OSError:
                # an unlocked builder renamed its world into place between our check and our rename: take it
                if not os.path.isfile(os.path.join(root, "manifest.json")):
                    raise
        else:
            if not os.path.isdir(os.path.join(root, "vl_checklist")):
                add_vlc(root, log)
            if not os.path.isdir(os.path.join(root, "classification")):
                add_classification(root, log)
        missing = [n for n in names if not model_ready(root, n)]
        if missing:
            _repo_on_path()
            with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
                man = json.load(f)
            for n in missing:
                build_model(root, n, man["tiny"], man["seed"], log)
    return root


def toy_paths(cfg, defaults, models, is_main=True, barrier=None):
    """Fill every empty field of `cfg` named in `defaults` ({field: path relative to cfg.toy_root}); when any was
    filled, make sure the toy world with backbones `models` exists (rank 0 builds it, the others wait at
    `barrier`).  Returns True when the run reads the toy world.  The one toy-path helper of the five scripts."""
    used = False
    for field, rel in defaults.items():
        if not getattr(cfg, field):
            setattr(cfg, field, os.path.join(cfg.toy_root, rel))
            used = True
    if used:
        if is_main:
            ensure_toy_world(cfg.toy_root, models=models)
        if barrier is not None:
            barrier()
    return used


def build_parser():
    p = argparse.ArgumentParser(description="Build the toy world (data files + tiny pretrained HF backbones).")
    p.add_argument("--out", default="data/toy", help="output folder (default data/toy)")
    p.add_argument("--tiny", action="store_true", help="small world for tests (~300/50/50 scenes, smaller models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if <out>/manifest.json exists")
    p.add_argument("--data_only", action="store_true", help="write the data files only, no backbones")
    p.add_argument("--models", default=",".join(MODEL_NAMES),
                   help="comma-separated backbones to build (default all: " + ",".join(MODEL_NAMES) + ")")
    p.add_argument("--shards", type=int, default=0,
                   help="also write the train pairs as N webdataset shards into <out>/shards/train (write_shards)")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    names = [] if a.data_only else [n for n in a.models.split(",") if n]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:  # refused before anything is built
        p.error(f"--models: unknown toy backbone(s) {', '.join(unknown)}; choose from {','.join(MODEL_NAMES)}")
    if a.shards < 0:
        p.error(f"--shards must be 0 (none) or a positive number, got {a.shards}")
    if not a.force and os.path.isfile(os.path.join(a.out, "manifest.json")):
        ensure_toy_world(a.out, models=names)
        with open(os.path.join(a.out, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        kind = f"{'tiny' if manifest['tiny'] else 'full'} world of seed {manifest['seed']}"
        # the built world's own size and seed: --tiny and --seed do not change it
        print(f"{a.out} already built ({kind}; missing backbones added); use --force to rebuild")
    else:
        manifest = build_toy_world(a.out, tiny=a.tiny, seed=a.seed, models=names)
    if a.shards:
        _repo_on_path()
        print("shards:", write_shards(a.out, n_shards=a.shards))
    return manifest


if __name__ == "__main__":
    main()
