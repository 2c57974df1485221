"""Evaluation metrics, written to give the numbers the reference toolkits give.

Captions follow the COCO caption evaluation (pycocoevalcap, github.com/tylin/coco-caption): PTB tokenisation,
then BLEU-1..4 (via nltk, see `bleu`), CIDEr-D (`Cider` of that toolkit, which is CIDEr-D: clipping, Gaussian
length penalty, x10) and ROUGE-L; `hf_bleu` / `hf_rouge` give the Hugging Face `evaluate` bleu and rouge metrics
that some papers report instead. VQA accuracy follows GT-Vision-Lab/VQA's vqaEval.py in either of its two
versions (`VQA_RULES`; default: the 2016-10 one, 458a8b2, that LAVIS copies), with LAVIS's OK-VQA lemmatiser (`okvqa_lemmatize`).
Recall@K follows the ALBEF/BLIP `itm_eval` convention (`reranked_recall`: after BLIP's ITM
re-ranking). Captions metrics are fractions (BLEU-4 0.40, CIDEr 1.35), VQA accuracy a fraction,
recalls percentages. Dialogue metrics (Image-Chat) reuse the one BLEU and the one ROUGE-L with the
options that give the rules dialogue evaluations use (torchmetrics' BLEU, the rouge-score package's
ROUGE-L), plus unigram F1 (on token ids, or on words normalised as ParlAI does).
"""
import itertools
import json
import math
import os
import re
from collections import Counter

import numpy as np
import torch

# ============================================================ COCO tokenisation (PTB rules)
# pycocoevalcap joins all captions with "\n" (newlines inside a caption become spaces), runs Stanford CoreNLP 3.4.1
# `PTBTokenizer -preserveLines -lowerCase` on that text, then drops the tokens in this list. The Java lowercases
# *every* token before Python filters, so "(" -> "-LRB-" -> "-lrb-" does not match "-LRB-" and survives.
COCO_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])

_L, _LD = r"[^\W\d_]", r"[^\W_]"                        # JFlex [:letter:], [:letter:]|[:digit:]
_AP, _APX = "['\u2019\u0092]", "['\u2019\u0092\u2018\u201b]"   # PTBLexer {APOS}, {APOSETCETERA}
_REDAUX = _AP + r"(?:[msdMSD]|(?i:re|ve|ll))"            # 's 'm 'd 're 've 'll
_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
_THING = rf"(?:[dDoOlL]{_APX}{_LD})?{_LD}+(?:[-_\u058a\u2010\u2011](?:[dDoOlL]{_APX}{_LD})?{_LD}+)*"
# Abbreviations that keep their period (CoreNLP 3.4.1's lists, checked against the jar; caseless except the
# (?-i:X) initials). Multi-dot ones first: Python alternation takes the first alternative that fits.
_ABBREV = (r"(?:ed|ph)\.d|a\.k\.a|jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu(?:rs)?|fri"
           r"|ala|ariz|(?-i:A)rk|calif|colo|conn|dak|(?-i:D)el|fla|ga|(?-i:I)ll|ind|kans?|ky|(?-i:L)a|(?-i:M)ass"
           r"|md|mich|minn|(?-i:M)iss|mo|mont|neb|nev|okla|(?-i:O)re|(?-i:P)a|penn|tenn|(?-i:T)ex|va|vt|(?-i:W)ash"
           r"|wisc?|wyo|inc|cos?|corp|p(?-i:p?tys?)|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys|ph|tel|est|ext|sq"
           r"|ft|jr|sr|bros|blvd|rd|esq|etc|al|seq|bldg|[a-z]|mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen"
           r"|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det"
           r"|vs|alex|wm|jos|cie|cf|treas|invt|elec|natl|m(?-i:[ft])g")
# A single letter or acronym before one of these sentence openers loses its period ("plan c. The" -> c . the).
_OPENERS = ("About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last|Many"
            r"|More|Mr\.|Ms\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Then|There|These|They|This"
            "|We|When|While|What|Yet|You")
_LATEX = str.maketrans({"\u2018": "`", "\u201b": "`", "\u2039": "`", "\u0091": "`", "\u2019": "'", "\u203a": "'",
                        "\u0092": "'", "\u201c": "``", "\u00ab": "``", "\u0093": "``", "\u201d": "''",
                        "\u00bb": "''", "\u0094": "''"})
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u20ac": "$", "\u0080": "$", "\u20a0": "$"}
_URL_END = r"[^\s\"<>|.!?(){},-]"
_SGML = r"</?[A-Za-z!][^>\s]*>"


def _quote(tok, left=False):
    """PTBLexer latexQuotes: ASCII quotes by guessed side, curly quotes by their own side."""
    tok = tok.replace('"', "``" if left else "''")
    return (tok.replace("'", "`") if left else tok).translate(_LATEX)


def _same(t):
    return len(t), [t]


# (pattern, emit) in PTBLexer rule order. Group 1 is the text consumed; the whole match, trailing context
# included, is the length used for JFlex's longest-match choice (ties go to the earlier rule).
_RULES = [(re.compile(p), f) for p, f in [
    (r"((?i:cannot|gonna|gotta|lemme|gimme|wanna))", lambda t: (3, [t[:3]])),  # can|not, gon|na
    (rf"({_SGML})", _same),
    ("([\u2013\u2014\u2015\u0096\u0097])", lambda t: (1, ["--"])),
    (rf"({_L}+){_REDAUX}", _same),                                        # dog|'s
    (rf"([A-Za-z]*[A-MO-Za-mo-z])[nN]{_APX}[tT]", _same),                 # do|n't, ca|n't
    (rf"({_L}+)", _same),
    (rf"([A-HJ-XZn]{_APX}{_L}{{2,}}|{_L}+[aeiouyAEIOUY]{_APX}[aeiouA-Z]{_L}*|{_AP}n{_AP}?|{_AP}(?i:em|till?"
     rf"|cause|[2-9]0s)|(?i:c'mon|nor'easter|e'er|s'mores|ev'ry|li'l|nat'l))", _same),  # o'clock ma'am 'n' 'em
    (rf"([yY]{_AP}){_L}", _same),                                         # y'|all
    (rf"({_AP}[tT])(?i:is|was)\b", _same),                                # 't|is
    (rf"(https?://[^\s\"<>|()]*{_URL_END}|(?:www\.(?:[^\s\"<>|.!?(){{}},]+\.)+[a-zA-Z]{{2,4}}"
     rf"|(?:[^\s\"`'<>|.!?(){{}}\x2c-\x5f$]+\.)+(?:com|net|org|edu))(?:/[^\s\"<>|()]*{_URL_END})?)", _same),
    (r"([a-zA-Z0-9][^\s\"<>|()\u00a0]*@[^\s\"<>|().\u00a0]+(?:\.[^\s\"<>|().\u00a0]+)*)", _same),  # e-mail
    (rf"({_REDAUX})(?:[^A-Za-z]|$)", lambda t: (len(t), [_quote(t)])),
    (rf"([nN]{_APX}[tT])", lambda t: (3, [_quote(t)])),
    (r"([-+]?(?:\d*(?:[.:,\u00ad]\d+)+|\d+))", _same),                    # 3.5 1,000 12:30
    ("((?:\\d{1,4}[- \u00a0])?\\d{1,4}/\\d{1,4})", lambda t: (len(t), [t.replace(" ", "\u00a0")])),  # 5 7/8
    (r"([A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2})", _same),  # and/or
    (r"([A-Z]*\$)", _same),
    ("([\u00a2\u00a3\u00a4\u20ac\u0080\u20a0])", lambda t: (1, [_CURRENCY[t]])),
    (rf"([A-Za-z]|{_ACRO}\.)\.?(?:[ \t\u00a0]+|\n)(?:(?:{_OPENERS})\s|{_SGML})", _same),  # c|. The
    (rf"({_ACRO}\.?)", _same),                                            # u.s. a.m.
    (rf"((?i:{_ABBREV})\.)", _same),                                      # mr. st. etc.
    (r"((?i:nos?|ca|figs?|prop|art|pp|op)\.)\s?\d", _same),              # no. 5, ca. 1980
    (rf"({_L}+\.)[,;:]", _same),
    (r'(")[A-Za-z0-9$]', lambda t: (1, ["``"])),
    (r'(")', lambda t: (1, ["''"])),
    ("([+%&~^=/|\\\\<>\u2030\u2031])", _same),
    (r"([()\[\]{}])", lambda t: (1, [_BRACKETS[t]])),
    (r"(-+)", lambda t: (len(t), ["--" if 3 <= len(t) <= 4 else t])),
    ("(\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026])", lambda t: (len(t), ["..."])),
    (r"(#[A-Za-z]+|@[A-Za-z_][A-Za-z0-9_]*)", _same),                     # #tag @user
    (r"(@+|#+|_+|\*+)", _same),
    (r"([,;:])", _same),
    (r"([?!]+)", _same),                                                  # "?!" is one token, kept
    ("([.\u00a1\u00bf])", _same),
    (rf"([A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|{_ACRO}\.))+)", _same),  # 3.5-inch
    (rf"({_THING})", _same),                                              # black-and-white, 2-story, 3rd
    (r"([A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z][A-Za-z0-9]*)+)", _same),        # hello.world
    (rf"({_L}+(?:[!?]{_L}+)+)", _same),                                   # wow!look
    (r"([A-Z]+(?:[+&][A-Z]+)+)", _same),                                  # AT&T
    (r"(')[A-Za-z]\S", lambda t: (1, ["`"])),
    (rf"({_REDAUX})", lambda t: (len(t), [_quote(t)])),
    ("(['\u0092\u2019]|''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039\u203a"
     "\u00ab\u00bb]{1,2})", lambda t: (len(t), [_quote(t)])),
    (r"(\S)", _same),
]]
_PLAIN_WORD = re.compile(rf"{_L}+(?= |\n|$)")
_ASSIMILATIONS = {"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"}
_SPACE = re.compile(r"[^\S\n]+")
_OTHER_NEWLINES = re.compile("\r\n|[\r\u2028\u2029\x0b\x0c\x85]")


def _ptb_lines(captions):
    """Approximate CoreNLP's PTBLexer over the captions joined by newlines, as pycocoevalcap feeds them (context
    crosses captions: "c." before a next caption "The ..." loses its period). At each position the longest rule
    match wins (JFlex semantics). Returns the raw (unfiltered, original case) tokens of each caption."""
    text = "\n".join(_OTHER_NEWLINES.sub(" ", c).replace("\n", " ") for c in captions)
    lines, out, pos, n = [], [], 0, len(text)
    while pos < n:
        if text[pos] == "\n":
            lines.append(out)
            out, pos = [], pos + 1
            continue
        m = _SPACE.match(text, pos)
        if m:
            pos = m.end()
            continue
        m = _PLAIN_WORD.match(text, pos)        # fast path: a bare word before a space; no rule can beat it
        if m and m.group().lower() not in _ASSIMILATIONS:
            out.append(m.group())
            pos = m.end()
            continue
        best, best_len = None, 0
        for rx, emit in _RULES:
            m = rx.match(text, pos)
            if m and m.end() - pos > best_len:
                best, best_len = (m.group(1), emit), m.end() - pos
        consumed, toks = best[1](best[0])
        out.extend(toks)
        pos += consumed
    lines.append(out)
    return lines[:len(captions)]


def coco_tokenize(captions):
    """COCO caption evaluation tokenisation of a list of captions: PTB tokens, lowercased, the toolkit's
    punctuation list removed; one space-joined string per caption. Pass all captions of one evaluation side in
    one call, in the order pycocoevalcap would see them (its tokenizer reads them as one newline-joined text).

    Pure-Python re-implementation of CoreNLP 3.4.1's PTBLexer rules, checked against the real jar (see
    tests/test_metrics.py): punctuation split off; contractions and possessives split ("don't" -> "do n't",
    "can't" -> "ca n't", "dog's" -> "dog 's", "cannot" -> "can not", "gonna" -> "gon na"); hyphenated words,
    numbers ("3.5", "1,000", "12:30"), dotted words ("u.s.", "e.g.") and the lexer's abbreviations ("mr.", "st.",
    single letters "c.") kept whole; quotes, dashes and ellipses become PTB tokens that the list removes;
    ( ) [ ] { } become -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-, which survive (see COCO_PUNCTUATION), as do "?!" and
    "!!!"; no British->American respelling ("grey", "colour" stay). Measured against the jar: identical output on
    all our realistic test captions and on 99.8% of random adversarial token strings; the misses are glued
    emoticons (";{", "=)"), "<<", glued e-mail/URL fragments. Not covered: HTML entities, phone numbers, Unicode
    characters the Java deletes as untokenizable (kept here). Carriage returns and other Unicode line breaks
    inside a caption become spaces (in the toolkit they would shift every later caption by a line).
    """
    return [" ".join(t for t in (w.lower() for w in toks) if t not in COCO_PUNCTUATION)
            for toks in _ptb_lines(captions)]


# ============================================================ caption metrics (inputs already tokenised)
def _check(gts, res):
    """Same image ids on both sides (the toolkit asserts this); one hypothesis per image (str or [str])."""
    if set(gts) != set(res):
        raise ValueError(f"gts and res must have the same ids ({len(set(gts) ^ set(res))} differ)")
    if not gts:
        raise ValueError("no images to evaluate")
    hyps = {}
    for k, h in res.items():
        if not isinstance(h, str):
            if len(h) != 1:
                raise ValueError(f"id {k!r}: expected exactly one hypothesis, got {len(h)}")
            h = h[0]
        if isinstance(gts[k], str) or not gts[k]:
            raise ValueError(f"id {k!r}: references must be a non-empty list of strings")
        hyps[k] = h
    return list(gts), hyps


def bleu(gts, res, smooth=True):
    """Corpus BLEU-1..4 as pycocoevalcap's `Bleu(4)` (option 'closest'), computed with nltk's `corpus_bleu`.

    nltk does the n-gram counting, clipping by the max reference count, corpus-level sums, the closest reference
    length (ties -> shorter, as the toolkit) and the brevity penalty. One difference remains in nltk's counting:
    it floors each sentence's n-gram total at 1 (`max(1, ...)`), so a hypothesis shorter than n adds a phantom
    n-gram, where the toolkit adds 0. The precision hook below removes exactly those phantom counts and applies
    the toolkit's (correct + 1e-15) / (total + 1e-9). What is left: nltk returns exactly 0 when no unigram
    matches (toolkit: ~1e-15), and nltk's brevity penalty has no 1e-9 epsilons (relative difference < 1e-9).

    smooth=False: the rule of torchmetrics' `BLEUScore` (torchmetrics/functional/text/bleu.py, no smoothing), which
    dialogue evaluations report (VLAW-MDM release src/utils.py): exact precisions, and BLEU-n is 0 as soon as one
    precision up to order n is 0 (the toolkit's epsilons would leave ~1e-4). Counting, clipping and the brevity
    penalty are the same; with several references torchmetrics breaks a closest-length tie by list order.
    """
    from nltk.translate.bleu_score import corpus_bleu  # here, not at the top: nltk is a slow import

    ids, hyps = _check(gts, res)
    refs = [[r.split() for r in gts[i]] for i in ids]
    hyp = [hyps[i].split() for i in ids]
    short = [sum(len(h) < k for h in hyp) for k in range(1, 5)]  # phantom n-grams nltk added per order
    exact = []

    def coco_precision(p_n, **_):
        if smooth:
            return [(p.numerator + 1e-15) / (p.denominator - s + 1e-9) for p, s in zip(p_n, short)]
        exact[:] = [p.numerator / (p.denominator - s) if p.denominator > s else 0.0 for p, s in zip(p_n, short)]
        return exact

    weights = [tuple([1.0 / n] * n) for n in range(1, 5)]
    out = [float(b) for b in corpus_bleu(refs, hyp, weights=weights, smoothing_function=coco_precision)]
    if not smooth:  # nltk skips a zero precision's log term; torchmetrics' BLEU-n is then 0
        out = [0.0 if 0.0 in exact[:n] else b for n, b in enumerate(out, 1)]
    return out


def _ngrams(words, n):
    c = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            c[tuple(words[i:i + k])] += 1
    return c


def cider_d(gts, res, n=4, sigma=6.0):
    """CIDEr-D exactly as pycocoevalcap's Cider scorer (= CIDEr-D, Vedantam et al. 2015, Sec. 4): returns
    (mean, {id: score}).

    TF-IDF n-gram vectors (n = 1..4), IDF from the evaluated set's references: log(N_images) - log(max(1, df)),
    df counting each image once; per n the hypothesis weight is clipped to the reference weight (min(h, r) * r:
    the "D" against repetition) and divided by both norms (skipped when a norm is 0); a Gaussian penalty
    exp(-delta^2 / (2 sigma^2)) on the length difference; mean over n, mean over references, x10.
    Toolkit quirk kept: "length" counts bigrams, not words (the same difference whenever both sentences are
    non-empty; an empty one scores 0 anyway).
    """
    ids, hyps = _check(gts, res)
    refs = {i: [_ngrams(r.split(), n) for r in gts[i]] for i in ids}
    df = Counter()
    for i in ids:
        df.update(set().union(*refs[i]))  # an n-gram counts once per image
    log_images = math.log(len(ids))

    def vec(counts):
        v, norm, length = [{} for _ in range(n)], [0.0] * n, 0
        for g, tf in counts.items():
            w = tf * (log_images - math.log(max(1.0, df[g])))
            v[len(g) - 1][g] = w
            norm[len(g) - 1] += w * w
            length += tf if len(g) == 2 else 0
        return v, [math.sqrt(x) for x in norm], length

    per = {}
    for i in ids:
        vh, nh, lh = vec(_ngrams(hyps[i].split(), n))
        total = np.zeros(n)
        for r in refs[i]:
            vr, nr, lr = vec(r)
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
        per[i] = float(total.mean() / len(refs[i]) * 10.0)
    return float(np.mean(list(per.values()))), per


def _lcs(a, b):
    """Length of the longest common subsequence of two token lists (one-row dynamic programme)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_score_tokens(text):
    """The rouge-score package's tokenizer (google-research/rouge, rouge/tokenize.py, no stemmer): lower-case,
    every run of characters other than a-z 0-9 becomes a space, whitespace split."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(gts, res, beta=1.2, tokenize=None):
    """ROUGE-L as pycocoevalcap's Rouge: returns (mean, {id: score}).

    Per reference: LCS-based P = lcs/len(hyp), R = lcs/len(ref); the max P and the max R are taken separately
    over references (possibly from different ones, as the toolkit does), F = (1+b^2) P R / (R + b^2 P), b = 1.2.
    Tokens come from split(" ") as in the toolkit (an empty sentence is one empty token).
    beta=1.0, tokenize=rouge_score_tokens: the rouge-score package's ROUGE-L F-measure (rouge/rouge_scorer.py, as
    torchmetrics' ROUGEScore computes it), which dialogue evaluations report; an empty side scores 0. With one
    reference (dialogue) both rules take the same maximum; with several, rouge-score keeps the best single F.
    """
    ids, hyps = _check(gts, res)
    split = tokenize or (lambda t: t.split(" "))
    per = {}
    for i in ids:
        c = split(hyps[i])
        lcs = [(_lcs(split(r), c), len(split(r))) for r in gts[i]]
        if not c or not all(lr for _, lr in lcs):
            per[i] = 0.0
            continue
        p, r = max(l / len(c) for l, _ in lcs), max(l / lr for l, lr in lcs)
        per[i] = (1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p > 0 and r > 0 else 0.0
    return float(np.mean(list(per.values()))), per


def caption_metrics(gts, res):
    """COCO caption evaluation on raw strings: {id: [refs]} and {id: str or [str]} -> BLEU-1..4, CIDEr (CIDEr-D),
    ROUGE-L as fractions (multiply by 100 for paper tables). Both sides are tokenised with `coco_tokenize`."""
    ids, hyps = _check(gts, res)
    flat = coco_tokenize([c for i in ids for c in gts[i]])  # one call per side, in dict order, as the toolkit
    tok_gts, at = {}, 0
    for i in ids:
        tok_gts[i], at = flat[at:at + len(gts[i])], at + len(gts[i])
    tok_res = dict(zip(ids, coco_tokenize([hyps[i] for i in ids])))
    b = bleu(tok_gts, tok_res)
    out = {f"BLEU-{k + 1}": b[k] for k in range(4)}
    out["CIDEr"] = cider_d(tok_gts, tok_res)[0]
    out["ROUGE-L"] = rouge_l(tok_gts, tok_res)[0]
    return out


def caption_metrics_by_group(gts, res, groups):
    """`caption_metrics` over all images (keys as there) and over each group of images ("<group>/CIDEr", ...), e.g.
    NoCaps' in-domain, near-domain and out-domain. `groups` is {id: label}; ids labelled None (or absent) count in the
    overall scores only; no label at all gives `caption_metrics` alone.

    Each group is scored alone, as if its images were the whole evaluated set: CIDEr's document frequencies (and
    BLEU's corpus sums) come from that group's references only, so a group's CIDEr is not the mean of its images'
    scores from the overall pass. That is how NoCaps' numbers are computed: the evaluation server returns separate
    pycocoevalcap COCOEvalCap results for "in-domain", "near-domain", "out-domain" and "entire" (nocaps-org/
    updown-baseline, updown/utils/evalai.py), and LAVIS scores a subset by restricting COCOEvalCap to its image ids
    (lavis/tasks/captioning.py coco_caption_eval, img_ids), which builds the CIDEr corpus from those images alone.
    """
    out = caption_metrics(gts, res)
    labels = {i: groups.get(i) for i in gts}
    for g in sorted({g for g in labels.values() if g is not None}):
        ids = [i for i in gts if labels[i] == g]
        out.update({f"{g}/{k}": v for k, v in caption_metrics({i: gts[i] for i in ids},
                                                              {i: res[i] for i in ids}).items()})
    return out


# ============================================================ Hugging Face `evaluate` "bleu" and "rouge"
# Some papers report captions with these instead of the COCO toolkit; their tokenisation and BLEU rules differ
# (no PTB tokenisation, shortest-reference brevity penalty, no smoothing), often by several points.
# mteval-v13a tokenisation (evaluate's metrics/bleu/tokenizer_13a.py, as sacrebleu's "13a"): case kept, these
# symbols split off, periods and commas split off unless between digits, a dash split off after a digit.
_13A_SYMBOLS = re.compile(r"([!-&(-+/:-@\[-`{-~])")   # ASCII punctuation except ' , - .
_13A_RULES = [(_13A_SYMBOLS, r" \1 "), (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
              (re.compile(r"([.,])([^0-9])"), r" \1 \2"), (re.compile(r"([0-9])(-)"), r"\1 \2 ")]


def tokenize_13a(line):
    """mteval-v13a tokens of one line, the default tokenizer of `evaluate`'s bleu."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for esc, ch in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(esc, ch)
    line = f" {line} "
    for rx, rep in _13A_RULES:  # applied in this order, each over the whole line
        line = rx.sub(rep, line)
    return line.split()


def hf_bleu(predictions, references, max_order=4, smooth=False, tokenize=tokenize_13a):
    """BLEU as `evaluate.load("bleu")` computes it (tensorflow/nmt nmt/scripts/bleu.py `compute_bleu` on
    `tokenize_13a` tokens): corpus n-gram matches clipped by the max count over a prediction's references; the
    brevity penalty uses the SHORTEST reference (not the closest, as the COCO toolkit); smooth=False: a zero
    precision makes BLEU 0; smooth=True: Lin & Och 2004 add-one on every order. references: one string or a
    list of strings per prediction. Returns evaluate's dict: bleu, precisions, brevity_penalty, length_ratio,
    translation_length, reference_length (fractions)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    refs = [[r] if isinstance(r, str) else r for r in references]
    matches, possible, ref_len, hyp_len = [0] * max_order, [0] * max_order, 0, 0
    for pred, rs in zip(predictions, refs):
        hyp, rs = tokenize(pred), [tokenize(r) for r in rs]
        ref_len += min(len(r) for r in rs)
        hyp_len += len(hyp)
        max_ref = Counter()
        for r in rs:
            max_ref |= _ngrams(r, max_order)  # | keeps each n-gram's max count over the references
        for g, c in (_ngrams(hyp, max_order) & max_ref).items():
            matches[len(g) - 1] += c
        for k in range(max_order):
            possible[k] += max(0, len(hyp) - k)
    if smooth:
        prec = [(m + 1.0) / (p + 1.0) for m, p in zip(matches, possible)]
    else:
        prec = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
    geo = math.exp(sum(math.log(p) for p in prec) / max_order) if min(prec) > 0 else 0.0
    ratio = hyp_len / ref_len if ref_len and hyp_len else 0.0
    bp = 0.0 if ratio == 0.0 else 1.0 if ratio > 1.0 else math.exp(1 - 1 / ratio)
    return {"bleu": geo * bp, "precisions": prec, "brevity_penalty": bp, "length_ratio": ratio,
            "translation_length": hyp_len, "reference_length": ref_len}


def _f(p, r):
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _lcs_indices(a, b):
    """Indices into `a` of one longest common subsequence of a and b (rouge-score's table and backtrack)."""
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            t[i][j] = t[i - 1][j - 1] + 1 if x == y else max(t[i - 1][j], t[i][j - 1])
    out, i, j = [], len(a), len(b)
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif t[i][j - 1] > t[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def _rouge_lsum(ref, pred, tokenize):
    """rouge-score's rougeLsum F: summary-level union LCS over newline-separated sentences (Lin 2004, Sec. 3.2),
    each token counted at most as often as it occurs on both sides (as ROUGE-1.5.5)."""
    rs = [tokenize(x) for x in ref.split("\n") if x]
    ps = [tokenize(x) for x in pred.split("\n") if x]
    m, n = sum(map(len, rs)), sum(map(len, ps))
    if not m or not n:
        return 0.0
    left_r, left_p = Counter(t for s in rs for t in s), Counter(t for s in ps for t in s)
    hits = 0
    for r in rs:
        for t in (r[i] for i in sorted(set().union(*[_lcs_indices(r, p) for p in ps]))):
            if left_r[t] > 0 and left_p[t] > 0:
                hits, left_r[t], left_p[t] = hits + 1, left_r[t] - 1, left_p[t] - 1
    return _f(hits / n, hits / m)


def hf_rouge(predictions, references, use_stemmer=False):
    """ROUGE as `evaluate.load("rouge")` computes it (google-research rouge-score's RougeScorer with its default
    tokenizer, `rouge_score_tokens`; use_stemmer: nltk's Porter stemmer on tokens longer than 3 characters, as
    rouge-score): per example the F-measure of rouge1, rouge2 (n-gram overlap clipped by counts), rougeL (LCS)
    and rougeLsum (`_rouge_lsum`); with several references the best F per type (`score_multi`); an empty side
    scores 0. Aggregated by the mean over examples: evaluate reports the median of 1000 bootstrap means
    (unseeded numpy), which scatters around this mean by a small fraction of its standard error."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    if use_stemmer:
        from nltk.stem.porter import PorterStemmer
        stem = PorterStemmer().stem

        def tokenize(t):
            return [stem(w) if len(w) > 3 else w for w in rouge_score_tokens(t)]
    else:
        tokenize = rouge_score_tokens
    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    per = []
    for pred, rs in zip(predictions, references):
        p = tokenize(pred)
        best = dict.fromkeys(keys, 0.0)
        for ref in [rs] if isinstance(rs, str) else rs:
            r, f = tokenize(ref), {}
            for n in (1, 2):
                gp, gr = Counter(zip(*[p[i:] for i in range(n)])), Counter(zip(*[r[i:] for i in range(n)]))
                hit = sum((gp & gr).values())
                f[f"rouge{n}"] = _f(hit / max(1, sum(gp.values())), hit / max(1, sum(gr.values())))
            f["rougeL"] = _f(_lcs(r, p) / len(p), _lcs(r, p) / len(r)) if r and p else 0.0
            f["rougeLsum"] = _rouge_lsum(ref, pred, tokenize)
            best = {k: max(best[k], f[k]) for k in keys}
        per.append(best)
    return {k: float(np.mean([x[k] for x in per])) for k in keys}


def hf_caption_metrics(gts, res):
    """Caption scores as the perceiver seed reports them (shan18/Perceiver-Resampler-XAttn-Captioning,
    engine.py `_compute_metrics`): `hf_bleu` with max_order 1 and 4 and `hf_rouge`'s rougeL against all
    references of each item, on stripped strings; empty predictions are dropped and every score is scaled by
    the fraction of non-empty ones. {id: [refs]}, {id: str or [str]} -> hf_BLEU-1, hf_BLEU-4, hf_ROUGE-L
    (fractions), keys distinct from `caption_metrics`' COCO-toolkit BLEU / ROUGE-L."""
    ids, hyps = _check(gts, res)
    keep = [i for i in ids if hyps[i].strip()]
    if not keep:
        return {"hf_BLEU-1": 0.0, "hf_BLEU-4": 0.0, "hf_ROUGE-L": 0.0}
    preds, refs = [hyps[i].strip() for i in keep], [[r.strip() for r in gts[i]] for i in keep]
    frac = len(keep) / len(ids)
    return {"hf_BLEU-1": frac * hf_bleu(preds, refs, max_order=1)["bleu"],
            "hf_BLEU-4": frac * hf_bleu(preds, refs)["bleu"], "hf_ROUGE-L": frac * hf_rouge(preds, refs)["rougeL"]}


# ============================================================ dialogue metrics (Image-Chat)
# ParlAI's answer normalisation (parlai/core/metrics.py `normalize_answer`, used by its F1Metric).
_PARLAI_PUNC = re.compile(r"[!\"#$%&()*+,-./:;<=>?@\[\]\\^`{|}~_']")
_PARLAI_ART = re.compile(r"\b(a|an|the)\b")
# Contraction expansion as the VLAW-MDM release scores (src/model/model_blender_bot.py: predictions
# and references both go through `contractions.fix(text.strip().lower())`), reproduced from
# kootenpv/contractions 0.1.73 (contractions/__init__.py, on textsearch's TextSearch("insensitive",
# "norm")). Its three tables are in common/contractions.json, verbatim. fix() defaults to
# leftovers=True, slang=True and then searches, in this order of adding (a later value wins): the
# contractions (plus "jan." .. "dec." but "may", plus a copy of every key with a typographic
# apostrophe), the leftovers (same copies), the slang, and the "unsafe" apostrophe-less forms of
# each contraction with "'" ("dont", "im", "cant", "shell" -> "she will") but those of `_SAFE`.
_SAFE = {"he's", "he'll", "we'll", "we'd", "it's", "i'd", "we're", "i'll", "who're", "o'"}
_MONTHS = "january february march april june july august september october november december".split()
# textsearch's word boundary: a match must not touch [A-Za-z0-9_] (ASCII only: "é" is a boundary).
_WORDCHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _fix_table():
    """{key: value} as contractions.fix's automaton holds them (lower-cased), and the key lengths,
    longest first."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "contractions.json")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    base, left = dict(d["contractions"], **{m[:3] + ".": m for m in _MONTHS}), dict(d["leftovers"])
    for t in (base, left):
        t.update({k.replace("'", "\u2019"): v for k, v in list(t.items())})
    unsafe = {}
    for k, v in base.items():
        if "'" in k and k.lower() not in _SAFE:  # each "'" kept or dropped: "can't" -> "cant", "can't"
            parts = k.split("'")
            for keep in itertools.product(("", "'"), repeat=len(parts) - 1):
                unsafe["".join(a + b for a, b in zip(parts, keep + ("",)))] = v
    table = {}
    for t in (base, left, {**d["slang"], **unsafe}):
        table.update((k.lower(), v.lower()) for k, v in t.items())  # lower case: see below
    return table, sorted({len(k) for k in table}, reverse=True)


_FIX, _FIX_LENGTHS = _fix_table()


def expand_contractions(text):
    """`contractions.fix(text.strip().lower())`, as the release scores ("i'm gonna" -> "i am going
    to"; "u r gonna" -> "you r going to": the package's "r " key wants no letter after its space).
    textsearch's replace: every key found (by end position, the longest first) with a word
    boundary on both sides; one that starts before the last kept match ends replaces that match
    only if longer (so "to cause" keeps "cause" -> "because" away). Each value takes the case of its
    match: lower case here."""
    text = text.strip().lower()
    kept, stop_max = [], -1  # (length, start, stop, value) of the matches kept
    for end in range(1, len(text) + 1):
        for n in _FIX_LENGTHS:
            start = end - n
            if start < 0 or text[start:end] not in _FIX:
                continue
            if end < len(text) and text[end] in _WORDCHARS or start > 0 and text[start - 1] in _WORDCHARS:
                continue
            if start >= stop_max:
                stop_max = end
                kept.append((end - start, start, end, _FIX[text[start:end]]))
            elif end - start > kept[-1][0]:
                stop_max = max(stop_max, end)
                kept[-1] = (stop_max - start, start, stop_max, _FIX[text[start:end]])
    out, prev = [], 0
    for _, start, stop, value in kept:
        out += [text[prev:start], value]  # empty where a longer match overlaps the one kept before it
        prev = stop
    return "".join(out) + text[prev:]


def parlai_normalize(text):
    """ParlAI `normalize_answer`: lower-case, punctuation -> space, articles a/an/the dropped, spaces collapsed."""
    return " ".join(_PARLAI_ART.sub(" ", _PARLAI_PUNC.sub(" ", text.lower())).split())


def token_f1(pred, ref):
    """Unigram multiset F1 of two token sequences (ids or words), as the VLAW-MDM release (src/utils.py, on
    BlenderBot token ids): P = overlap/|pred|, R = overlap/|ref|; 1 when both are empty, 0 without overlap."""
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def word_f1(pred, ref):
    """ParlAI's F1 (parlai/core/metrics.py F1Metric): `token_f1` of the `parlai_normalize`d words, except that two
    empty answers score 0 there (no overlap)."""
    p, r = parlai_normalize(pred).split(), parlai_normalize(ref).split()
    return token_f1(p, r) if p or r else 0.0


def label_matches(cands, label):
    """Which candidates ParlAI's hits@k takes for the label (parlai/core/metrics.py `_update_ranking_metrics`): those
    equal to it after `parlai_normalize` (its normalize_answer), so a repeated or re-punctuated gold counts too."""
    ref = parlai_normalize(label)
    return [parlai_normalize(c) == ref for c in cands]


def gold_rank(scores, gold):
    """ParlAI's hits@k rank: the 1-based position, in the candidates sorted by `scores` (higher is
    better), of the first gold one (a hit@k when it is <= k: any of the top k matches the label).
    `gold`: an index, or a mask as `label_matches` gives; None when no candidate is gold (also with
    no candidates: `label_matches` gives []).  A candidate that ties the best gold ranks before it
    (ParlAI leaves that order to torch's sort): a model that scores every candidate alike ranks the
    gold last."""
    scores = torch.as_tensor(scores).detach().cpu()  # one turn's candidates: read once
    gold = torch.as_tensor(gold)
    if gold.numel() == 0:  # an empty mask or index list (torch reads [] as float, no index)
        return None
    is_gold = torch.zeros(len(scores), dtype=torch.bool)
    is_gold[gold] = True
    if not is_gold.any():
        return None
    return 1 + int((scores[~is_gold] >= scores[is_gold].max()).sum())


def dialogue_scores(preds, refs, pred_tokens, ref_tokens, chunk, nll=None, n_tok=None, ranks=None,
                    n_candidates=100, raw=None):
    """One Image-Chat turn scored as the VLAW-MDM release does (x100): F1 on token ids (`token_f1`), BLEU-4 with
    torchmetrics' rule (`bleu(smooth=False)`) and ROUGE-L with rouge-score's (`rouge_l(beta=1, rouge_score_tokens)`),
    each averaged over batches of `chunk` examples ("paper mode"); "corpus_*": the same over the whole turn (BLEU
    corpus-level, F1/ROUGE-L mean over examples). preds/refs: the release's normalised strings. "word_F1": ParlAI's,
    from `raw` = (predictions, references) as generated and as written: ParlAI's F1Metric normalises the raw guess
    and label itself (no contraction expansion, no tokenizer round trip); absent without `raw`.
    Optional: "PPL" = exp(token-mean NLL) per batch, averaged over batches, from per-example summed `nll` and
    token counts `n_tok`; "R@k/<n_candidates>" for k = 1, 5, 10 (ParlAI's hits@1/5/10, k <= n_candidates) and "MRR"
    from the gold answers' 1-based `ranks` among the candidates (`gold_rank`; a plain percentage over the examples
    ranked); a rank of None (no candidate matches the gold answer) is left out and counted in "no_gold"."""
    n = len(preds)
    gts, res = {i: [r] for i, r in enumerate(refs)}, dict(enumerate(preds))
    f1 = [token_f1(a, b) for a, b in zip(pred_tokens, ref_tokens)]
    rl = rouge_l(gts, res, beta=1.0, tokenize=rouge_score_tokens)[1]
    rl = [rl[i] for i in range(n)]

    def bleu4(ids):
        return bleu({i: gts[i] for i in ids}, {i: res[i] for i in ids}, smooth=False)[3]
    batches = [range(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    out = {"F1": np.mean([np.mean([f1[i] for i in b]) for b in batches]),
           "BLEU-4": np.mean([bleu4(b) for b in batches]),
           "ROUGE-L": np.mean([np.mean([rl[i] for i in b]) for b in batches]),
           "corpus_F1": np.mean(f1), "corpus_BLEU-4": bleu4(range(n)), "corpus_ROUGE-L": np.mean(rl)}
    if raw is not None:
        out["word_F1"] = np.mean([word_f1(p, r) for p, r in zip(*raw)])
    ranked = [r for r in ranks or [] if r is not None]
    if ranked:
        out.update({f"R@{k}/{n_candidates}": np.mean([r <= k for r in ranked])
                    for k in (1, 5, 10) if k <= n_candidates})
        out["MRR"] = np.mean([1 / r for r in ranked])
    out = {k: 100 * float(v) for k, v in out.items()}
    if ranks:
        out["no_gold"] = len(ranks) - len(ranked)
    if nll is not None:
        out["PPL"] = float(np.mean([math.exp(sum(nll[i] for i in b) / max(1, sum(n_tok[i] for i in b)))
                                    for b in batches]))
    return out


# ============================================================ VQA accuracy (GT-Vision-Lab/VQA vqaEval.py)
# Lists of the official code (unchanged since 2016). Note "'" and ":" are not punctuation there.
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
# Contractions map, stated by its values: a one-apostrophe value is looked up without its apostrophe
# ("dont" -> "don't"); a value with several is looked up with any one of them missing ("couldnt've" and
# "couldn'tve" -> "couldn't've"); plus three irregular entries. This reproduces the official dict's 120 keys.
_ONE = ("ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
        "I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't "
        "should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's "
        "there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's "
        "what've when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've "
        "wouldn't y'all you'd you'll you're you've").split()
_MANY = ("couldn't've hadn't've he'd've I'd've it'd've mightn't've 'ow's'at she'd've shouldn't've somebody'd've "
         "someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll y'all'd've "
         "you'd've").split()
_VQA_CONTRACTIONS = {v.replace("'", ""): v for v in _ONE}
_VQA_CONTRACTIONS.update({v[:i] + v[i + 1:]: v for v in _MANY for i, ch in enumerate(v) if ch == "'"})
_VQA_CONTRACTIONS.update({"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"})
_VQA_COMMA = re.compile(r"(\d)(,)(\d)")
_VQA_PERIOD = re.compile(r"\.(?!\d)")  # official "(?!<=\d)(\.)(?!\d)": its "(?!<=" is a lookahead, never a lookbehind


def _vqa_punctuation(text):
    """Official processPunctuation: a mark touching a space (or any text with a digit,digit comma) is deleted,
    otherwise replaced by a space; then periods not followed by a digit are deleted."""
    out = text
    for p in _VQA_PUNCT:
        if p + " " in text or " " + p in text or _VQA_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (= 32) where `count` goes: at most 32 periods are removed.
    return _VQA_PERIOD.sub("", out, count=32)


def normalize_vqa_answer(s):
    """The evaluation code's full processing of an answer: newlines/tabs to spaces, strip, punctuation rules,
    lowercase, number words to digits ("two" -> "2", "none" -> "0"), articles dropped, contractions."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    words = [_VQA_NUMBERS.get(w, w) for w in _vqa_punctuation(s).lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


# Two versions of vqaEval.py give different numbers:
# "lavis2017": GT-Vision-Lab/VQA as of 2016-10 (commit 458a8b2), copied into LAVIS as
#   lavis/common/vqa_tools/vqa_eval.py: the prediction always gets the full processing; the human answers get
#   only the punctuation step, and only when the ten disagree (unstripped, compared as written).
# "official": the current code (commit a013f00, 2021-03): both sides are stripped; when the ten answers
#   disagree, prediction and answers both get the full processing; when all ten agree, nothing more is done
#   and the stripped strings are compared as they are ("Two" does not match ten "2").
# Default "lavis2017": the published zero-shot VQAv2 / OK-VQA / GQA numbers of BLIP-2 (arXiv 2301.12597) and
# P-Former (arXiv 2307.07063) were computed by LAVIS (and BLIText, its fork) with that copy: only it gives them.
VQA_RULES = ("lavis2017", "official")


def vqa_accuracy(pred, answers, rule="lavis2017"):
    """VQA accuracy of one prediction under `rule` (see VQA_RULES above): process the prediction and the human
    answers as that version of vqaEval.py does, then the mean over the leave-one-out subsets of
    min(1, #matches / 3) (10 subsets for the 10 VQA answers). Not in vqaEval.py: a single answer (GQA-style) is
    scored by exact match with the same processing (for "lavis2017" that is LAVIS's GQA task: normalised
    prediction == raw answer), since leave-one-out would always give 0."""
    if rule not in VQA_RULES:
        raise ValueError(f"unknown VQA rule {rule!r}; one of {VQA_RULES}")
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if rule == "lavis2017":
        pred = normalize_vqa_answer(pred)
        if len(set(answers)) > 1:
            answers = [_vqa_punctuation(a) for a in answers]
    else:
        pred = pred.replace("\n", " ").replace("\t", " ").strip()
        answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        if len(set(answers)) > 1:
            pred, answers = normalize_vqa_answer(pred), [normalize_vqa_answer(a) for a in answers]
    if len(answers) == 1:
        return float(pred == answers[0])
    hits = sum(a == pred for a in answers)
    # leaving out a matching answer leaves hits - 1 matches, leaving out another leaves hits
    return sum(min(1.0, (hits - (a == pred)) / 3.0) for a in answers) / len(answers)


def vqa_score(preds, gts, rule="lavis2017"):
    """Mean `vqa_accuracy` under `rule` (a fraction; x100 for paper tables) over question ids; both dicts must
    have the same ids, as the official loader asserts."""
    if set(preds) != set(gts) or not gts:
        raise ValueError(f"preds and gts must have the same non-empty question ids "
                         f"({len(set(preds) ^ set(gts))} differ)")
    return float(np.mean([vqa_accuracy(preds[q], gts[q], rule) for q in gts]))


# ============================================================ OK-VQA answer lemmatiser
# OK-VQA's answers are lemmatised, so LAVIS and BLIText lemmatise each predicted answer before VQA accuracy
# (lavis/models/blip2_models/blip2_opt.py and blip2_t5.py `_lemmatize`, on through `apply_lemmatizer` in their
# OK-VQA configs): spaCy en_core_web_sm tokens whose coarse tag is NOUN or VERB become their lemma, every other
# token stays as written, tokens joined by single spaces. Here the same rule with nltk (spaCy is no dependency):
# Treebank tokens, the averaged-perceptron Penn tags NN/NNS (spaCy's NOUN; NNP/NNPS are spaCy's PROPN and stay)
# and VB* (VERB), the lemma from WordNetLemmatizer; forms of "be" stay, as spaCy tags them AUX (copula or
# auxiliary). Known differences: auxiliary have/do (AUX there, lemmatised here); spaCy's tagger and lemmatiser.
_LEMMA_POS = {"NN": "n", "NNS": "n", "VB": "v", "VBD": "v", "VBG": "v", "VBN": "v", "VBP": "v", "VBZ": "v"}
_TAGGERS = {}


def okvqa_lemmatize(answers):
    """Lemmatise predicted answers (list of str -> list of str) as LAVIS's OK-VQA evaluation, before
    `vqa_accuracy`. Needs nltk's "wordnet" and "averaged_perceptron_tagger_eng" data on nltk.data.path."""
    import nltk
    from nltk.stem import WordNetLemmatizer
    from nltk.tag.perceptron import PerceptronTagger
    from nltk.tokenize import TreebankWordTokenizer
    try:
        nltk.data.find("corpora/wordnet")  # also finds corpora/wordnet.zip, as the downloader leaves it
        where = nltk.data.find("taggers/averaged_perceptron_tagger_eng/")
    except LookupError:
        raise LookupError("the OK-VQA lemmatiser needs nltk data: python -m nltk.downloader wordnet "
                          "averaged_perceptron_tagger_eng (or copy them under one of nltk.data.path: "
                          f"{', '.join(nltk.data.path)})") from None
    if str(where) not in _TAGGERS:
        _TAGGERS[str(where)] = tagger = PerceptronTagger(load=False)
        tagger.load_from_json("eng", where)
    tagger, wnl, tok = _TAGGERS[str(where)], WordNetLemmatizer(), TreebankWordTokenizer()

    def lemma(word, tag):
        out = wnl.lemmatize(word.lower(), _LEMMA_POS[tag]) if tag in _LEMMA_POS else word
        return word if out == "be" else out
    return [" ".join(lemma(w, t) for w, t in tagger.tag(tok.tokenize(a))) for a in answers]


# ============================================================ retrieval Recall@K
def _hit_prob(g, t, c, k):
    """P(a correct item lands in the top k) when g wrong items score strictly higher and the best correct score
    is shared by c correct and t wrong items, ties broken uniformly at random: 1 - C(t, k-g) / C(t+c, k-g)."""
    slots = k - g
    if slots <= 0:
        return 0.0
    if slots > t:
        return 1.0
    miss = 1.0
    for i in range(slots):  # probability that all `slots` places go to wrong items
        miss *= (t - i) / (t + c - i)
    return 1.0 - miss


def _recalls(scores, correct, ks):
    """scores (B, N), correct bool (B, N) -> per-row hit probabilities (B, len(ks)) of the best correct item."""
    best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)  # (B, 1)
    wrong = ~correct
    g = ((scores > best) & wrong).sum(1)
    t = ((scores == best) & wrong).sum(1)
    c = ((scores == best) & correct).sum(1)
    hits = (g[:, None] < np.asarray(ks)[None, :]).astype(np.float64)  # (B, len(ks)); exact when no tie (t == 0)
    for row in np.nonzero(t)[0]:
        hits[row] = [_hit_prob(g[row], t[row], c[row], k) for k in ks]
    return hits


def retrieval_recall(sim, txt2img, img2txts, ks=(1, 5, 10), chunk=1024):
    """Image-text retrieval Recall@K, in PERCENT, as ALBEF/BLIP `itm_eval`.

    sim: (N_img, N_txt) scores, numpy or torch (any float dtype, any device). Text retrieval (txt_r*): for each
    image, the rank of its best-ranked correct caption (img2txts[i]). Image retrieval (img_r*): for each
    caption, the rank of its image (txt2img[j]); a caption with txt2img[j] < 0 has no image in the set (e.g. its
    image was unreadable): it stays a distractor for text retrieval and is left out of image retrieval.
    r_mean is the mean of all recalls. Ties (which `argsort`
    would break arbitrarily) count as their expected value under random tie-breaking, so a constant `sim`
    gives chance level (e.g. img_r1 = 100 / N_img), never a flattering or an order-dependent number.
    """
    if hasattr(sim, "detach"):
        sim = sim.detach().float().cpu().numpy()
    sim = np.asarray(sim)
    sim = sim if sim.dtype in (np.float32, np.float64) else sim.astype(np.float32)
    n_img, n_txt = sim.shape
    if len(img2txts) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"sim is {sim.shape} but img2txts has {len(img2txts)} images, txt2img {len(txt2img)} texts")
    if np.isnan(sim).any():
        raise ValueError("sim contains NaN")
    if any(len(t) == 0 for t in img2txts):
        raise ValueError("every image needs at least one caption in img2txts")
    txt_hits, img_hits = [], []
    for s in range(0, n_img, chunk):  # image -> texts, a chunk of image rows
        rows = sim[s:s + chunk]                                  # (B, N_txt)
        correct = np.zeros(rows.shape, dtype=bool)
        for r, txts in enumerate(img2txts[s:s + chunk]):
            correct[r, list(txts)] = True
        txt_hits.append(_recalls(rows, correct, ks))
    target = np.asarray(txt2img, dtype=np.int64)
    if (target >= n_img).any() or not (target >= 0).any():
        raise ValueError("txt2img must index images of sim (negative = caption without an image)")
    queries = np.nonzero(target >= 0)[0]
    for s in range(0, len(queries), chunk):  # text -> images, a chunk of caption columns
        cols = sim[:, queries[s:s + chunk]].T                    # (B, N_img)
        correct = np.zeros(cols.shape, dtype=bool)
        correct[np.arange(cols.shape[0]), target[queries[s:s + chunk]]] = True
        img_hits.append(_recalls(cols, correct, ks))
    txt = 100.0 * np.concatenate(txt_hits).mean(0)
    img = 100.0 * np.concatenate(img_hits).mean(0)
    out = {f"txt_r{k}": float(v) for k, v in zip(ks, txt)}
    out.update({f"img_r{k}": float(v) for k, v in zip(ks, img)})
    out["r_mean"] = float(np.mean(list(out.values())))
    return out


@torch.no_grad()
def rerank_scores(sim, itm_fn, k, rows):
    """ITC shortlist + ITM re-rank of rows `rows` of sim (R, C): each row's top-k columns get
    itm_fn(row, cols) (the raw ITM 'match' logit) + their ITC sim -> {row: (cols, scores)}."""
    out = {}
    for r in rows:
        top_sim, top = sim[r].topk(min(k, sim.shape[1]))
        out[r] = (top, itm_fn(r, top) + top_sim)
    return out


@torch.no_grad()
def reranked_recall(sim, i2t, t2i, k, txt2img, img2txts, dist):
    """Recall@K of the two-step retrieval of BLIP (salesforce/BLIP train_retrieval.py `evaluation`)
    and BLIP-2 (LAVIS blip2.py `compute_sim_matrix`): for each image the k best texts by the ITC
    sim (N_img, N_txt) are scored i2t(image, texts) + sim, for each text the k best images
    t2i(text, images) + sim, every other pair -100. (ALBEF's Retrieval.py `evaluation` ranks its
    shortlist by the ITM score alone, without + sim.) Rows are split over ranks, the scores
    gathered; text retrieval is read from the image->text scores, image retrieval from the
    text->image ones."""
    from common import dist as D
    recalls = []
    for s, fn in ((sim, i2t), (sim.T, t2i)):
        part = rerank_scores(s, fn, k, D.shard_indices(s.shape[0], dist))
        part = {r: (c.cpu(), v.float().cpu()) for r, (c, v) in part.items()}
        score = torch.full(s.shape, -100.0)
        for p in D.all_gather_object(part):
            for r, (c, v) in p.items():
                score[r, c] = v
        recalls.append(retrieval_recall(score if s is sim else score.T, txt2img, img2txts))
    out = {n: v for n, v in recalls[0].items() if n.startswith("txt")}
    out.update({n: v for n, v in recalls[1].items() if n.startswith("img")})
    out["r_mean"] = float(np.mean(list(out.values())))
    return out
