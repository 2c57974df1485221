"""Tests for common/metrics.py: COCO tokenisation against real CoreNLP output, hand-worked BLEU / CIDEr-D / ROUGE-L,
Hugging Face `evaluate` BLEU / ROUGE against reference values, VQA accuracy under both vqaEval.py rules, the OK-VQA
lemmatiser, Recall@K against an argsort reference."""
import itertools
import math
import os
import warnings

import numpy as np
import pytest
import torch
from nltk.translate.bleu_score import corpus_bleu

from common.metrics import (bleu, caption_metrics, caption_metrics_by_group, cider_d, coco_tokenize, dialogue_scores,
                            expand_contractions, gold_rank, hf_bleu, hf_caption_metrics, hf_rouge, label_matches,
                            normalize_vqa_answer, okvqa_lemmatize, parlai_normalize, retrieval_recall, rouge_l,
                            rouge_score_tokens, token_f1,
                            tokenize_13a, vqa_accuracy, vqa_score, word_f1)

# ---------------------------------------------------------------- COCO tokenisation
# Expected strings = pycocoevalcap's PTBTokenizer output (CoreNLP 3.4.1 jar, `-preserveLines -lowerCase`, then the
# toolkit's punctuation filter), produced by running the real jar on exactly these lines, in this order.
PTB_REFERENCE = [
    ("A man's dog (brown) isn't running.",
     "a man 's dog -lrb- brown -rrb- is n't running"),
    ('The colour of the grey T-shirt is black-and-white.',
     'the colour of the grey t-shirt is black-and-white'),
    ('"Stop," she said -- it\'s 3.5 inches, 1,000 people at 12:30 p.m. in the U.S.',
     "stop she said it 's 3.5 inches 1,000 people at 12:30 p.m. in the u.s."),
    ("I cannot believe they're gonna win... Wow?! Really!!",
     "i can not believe they 're gon na win wow ?! really !!"),
    ('Mr. Smith lives on Main St. near the Co. building, etc.',
     'mr. smith lives on main st. near the co. building etc.'),
    ("A [red] {blue} sign; a dog's bone: yes/no and/or 5% $10.",
     "a -lsb- red -rsb- -lcb- blue -rcb- sign a dog 's bone yes/no and/or 5 % $ 10"),
    ("Two dogs' toys and 'hello' world o'clock rock'n'roll.",
     "two dogs toys and hello world o'clock rock 'n' roll"),
    ('A man in a 1960s car with a 2-story house, x-ray of a 3rd floor.',
     'a man in a 1960s car with a 2-story house x-ray of a 3rd floor'),
    ("DON'T STOP I'M HE'S YOU'RE",
     "do n't stop i 'm he 's you 're"),
    ('an apple \u2014 a pear \u2013 a plum \u2026 and a cat.',
     'an apple a pear a plum and a cat'),
    ('She said \u201chello\u201d and \u2018bye\u2019 don\u2019t you\u2019re',
     "she said hello and bye do n't you 're"),
    ('A picture of vitamin c.',  # "c." loses its period because the NEXT caption starts with "The"
     'a picture of vitamin c'),
    ('The no. 5 bus, ca. 1980, goes to Ga. and la. near a U.S.-based company.',
     'the no. 5 bus ca. 1980 goes to ga. and la near a u.s.-based company'),
    ("a dog.,cat and y'all",
     "a dog. cat and y' all"),
    ('hello.world www.x.com a@b.com #tag @user \u00bfque?',
     'hello.world www.x.com a@b.com #tag @user \u00bf que'),
    ("The 3 boys are playing Xbox 360 at 5:30pm; ca. 1980 e.g. that's it",
     "the 3 boys are playing xbox 360 at 5:30 pm ca. 1980 e.g. that 's it"),
]


def test_coco_tokenize_matches_corenlp_reference():
    captions, expected = zip(*PTB_REFERENCE)
    got = coco_tokenize(list(captions))
    for c, g, e in zip(captions, got, expected):
        assert g == e, f"{c!r}: got {g!r}, CoreNLP gives {e!r}"


def test_coco_tokenize_context_and_edge_cases():
    # the same caption tokenises differently depending on the caption after it (the toolkit's joined text)
    assert coco_tokenize(["vitamin c.", "A dog"]) == ["vitamin c", "a dog"]
    assert coco_tokenize(["vitamin c.", "a dog"]) == ["vitamin c.", "a dog"]
    assert coco_tokenize(["two\nlines", "", "  spaced   out  "]) == ["two lines", "", "spaced out"]
    assert coco_tokenize([]) == []
    assert coco_tokenize(["A dog."]) == coco_tokenize(["a dog"]) == ["a dog"]


# ---------------------------------------------------------------- BLEU
def test_bleu_hand_worked_matches_coco_formula():
    gts = {1: ["the cat sat on the mat", "a cat is on the mat"], 2: ["a dog runs fast"]}
    res = {1: ["the cat is on the mat"], 2: ["dog runs"]}
    # Hand counts. Image 1 (6 words): clipped matches / n-grams = 6/6, 5/5, 3/4, 2/3; closest ref length 6.
    # Image 2 (2 words): 2/2, 1/1, no trigram, no 4-gram; ref length 4. Corpus: c = 8, r = 10.
    correct, total = [8, 6, 3, 2], [8, 6, 4, 3]
    bp = math.exp(1 - 10 / 8)
    expected = []
    for n in range(1, 5):
        prod = 1.0
        for k in range(n):
            prod *= (correct[k] + 1e-15) / (total[k] + 1e-9)  # pycocoevalcap's smoothing constants
        expected.append(bp * prod ** (1 / n))
    got = bleu(gts, res)
    assert got == pytest.approx(expected, rel=1e-9)
    # plain nltk counts a phantom trigram and 4-gram for the 2-word hypothesis (denominators 5 and 4): different
    plain = corpus_bleu([[r.split() for r in gts[i]] for i in (1, 2)], [res[i][0].split() for i in (1, 2)],
                        weights=[(1 / 3,) * 3, (0.25,) * 4])
    assert plain[0] == pytest.approx(bp * (1 * 1 * 3 / 5) ** (1 / 3))
    assert abs(plain[0] - got[2]) > 0.01


def test_bleu_closest_length_tie_takes_shorter():
    # hypothesis of 5 words, references of 4 and 6 words, equally close: the toolkit picks 4, so no brevity
    # penalty (picking 6 would give exp(1 - 6/5) = 0.82); all 5 unigrams match the 6-word reference.
    gts = {0: ["a b c d", "a b c d e f"]}
    res = {0: "a b c d e"}
    assert bleu(gts, res)[0] == pytest.approx(1.0, rel=1e-9)


# ---------------------------------------------------------------- CIDEr-D
def test_cider_d_hand_worked():
    gts = {"A": ["a b", "a c"], "B": ["d e"]}
    res = {"A": ["a b"], "B": ["d"]}
    # 2 images -> every n-gram has df = 1, idf weight = log(2) - log(1) for all, so cosines are count-based.
    # A vs "a b": unigram 1, bigram 1; vs "a c": unigram (ln2^2) / (sqrt2 ln2 * sqrt2 ln2) = 1/2, bigram 0;
    # same bigram-count length -> no penalty; mean over n (4 orders) and refs (2), x10.
    score_a = 10 * ((1 + 1) + (0.5 + 0)) / 4 / 2
    # B: "d" vs "d e": unigram 1/sqrt2, bigram 0 (hyp has no bigram); length = #bigrams: 0 vs 1 -> penalty.
    score_b = 10 * (1 / math.sqrt(2)) * math.exp(-1 / (2 * 6.0 ** 2)) / 4 / 1
    mean, per = cider_d(gts, res)
    assert per["A"] == pytest.approx(score_a, rel=1e-12)
    assert per["B"] == pytest.approx(score_b, rel=1e-12)
    assert mean == pytest.approx((score_a + score_b) / 2, rel=1e-12)


def test_cider_d_clips_repeated_words():
    gts = {0: ["a b"], 1: ["c d"]}
    res = {0: "a a", 1: "c d"}
    # hyp weight for "a" is 2 ln2 (tf 2), ref weight ln2: clipped min(2ln2, ln2) * ln2 / (2ln2 * sqrt2 ln2)
    clipped = 1 / (2 * math.sqrt(2))
    unclipped = 2 / (2 * math.sqrt(2))
    _, per = cider_d(gts, res)
    assert per[0] == pytest.approx(10 * clipped / 4, rel=1e-12)
    assert per[0] < 10 * unclipped / 4
    assert per[1] == pytest.approx(10 * 2 / 4, rel=1e-12)  # perfect unigram + bigram, no 3/4-grams


def test_cider_d_single_image_is_zero_and_ids_checked():
    # the toolkit's idf uses log(#images): with one image every weight is 0
    assert cider_d({0: ["a dog"]}, {0: ["a dog"]})[0] == 0.0
    with pytest.raises(ValueError):
        cider_d({0: ["a"], 1: ["b"]}, {0: ["a"]})
    with pytest.raises(ValueError):
        cider_d({0: ["a"]}, {0: ["a", "b"]})


# ---------------------------------------------------------------- ROUGE-L
def test_rouge_l_hand_worked_max_p_and_r_from_different_refs():
    gts = {0: ["a c d e f", "b c"]}
    res = {0: ["a b c d"]}
    # ref1: LCS "a c d" = 3 -> P 3/4, R 3/5; ref2: LCS "b c" = 2 -> P 2/4, R 1. Toolkit: max P = 3/4, max R = 1.
    p, r, b2 = 0.75, 1.0, 1.2 ** 2
    expected = (1 + b2) * p * r / (r + b2 * p)
    mean, per = rouge_l(gts, res)
    assert per[0] == pytest.approx(expected, rel=1e-12)
    assert mean == pytest.approx(expected, rel=1e-12)
    assert rouge_l({0: ["x y"]}, {0: ""})[0] == 0.0


# ---------------------------------------------------------------- dialogue rules (Image-Chat)
def test_bleu_torchmetrics_rule_is_exact_and_zero_without_ngram_matches():
    gts, res = {0: ["a b c d y z"]}, {0: "a b c d x"}
    # unigrams 4/5, bigrams 3/4, trigrams 2/3, 4-grams 1/2; hypothesis shorter than the reference (5 < 6)
    bp = math.exp(1 - 6 / 5)
    want = bp * math.exp((math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert bleu(gts, res, smooth=False)[3] == pytest.approx(want, rel=1e-12)
    assert bleu({0: ["a b c d e"]}, {0: "a b c d e"}, smooth=False)[3] == pytest.approx(1.0)
    # no 4-gram match: torchmetrics gives exactly 0, the COCO toolkit's epsilons leave a small positive number
    gts, res = {0: ["a b c x e"]}, {0: "a b c d e"}
    # "a b c d e" vs "a b c x e": unigrams 4/5, bigrams 2/4 ("a b", "b c"), trigrams 1/3 ("a b c"), 4-grams 0/2;
    # equal lengths: bp 1. BLEU-3 = (4/5 * 2/4 * 1/3) ** (1/3) = 0.5109; the toolkit's BLEU-4 keeps 1e-15 / 2
    exact = bleu(gts, res, smooth=False)
    assert exact[3] == 0.0 and exact[2] == pytest.approx((4 / 5 * 2 / 4 * 1 / 3) ** (1 / 3), rel=1e-12)
    coco = [(c + 1e-15) / (t + 1e-9) for c, t in ((4, 5), (2, 4), (1, 3), (0, 2))]
    assert bleu(gts, res)[3] == pytest.approx(math.prod(coco) ** (1 / 4), rel=1e-9) and bleu(gts, res)[3] < 1e-4
    assert bleu({0: ["x y z"]}, {0: "a b c"}, smooth=False) == [0.0] * 4
    # a hypothesis shorter than n: no phantom n-gram (as torchmetrics); BLEU-4 is 0, BLEU-2 exact
    two = bleu({0: ["a b c"]}, {0: "a b"}, smooth=False)
    assert two[3] == 0.0 and two[1] == pytest.approx(math.exp(1 - 3 / 2))


def test_rouge_l_rouge_score_rule_beside_the_toolkit_rule():
    gts, res = {0: ["the cat is on it"]}, {0: "The cat, sat on it"}
    assert rouge_score_tokens("The cat, sat on-it!") == ["the", "cat", "sat", "on", "it"]
    # rouge-score: LCS 4 of 5 and 5 -> F1 0.8; the toolkit's split(" ") keeps "The" and "cat," apart -> LCS 2
    assert rouge_l(gts, res, beta=1.0, tokenize=rouge_score_tokens)[0] == pytest.approx(0.8)
    p, r, b2 = 2 / 5, 2 / 5, 1.2 ** 2
    assert rouge_l(gts, res)[0] == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    assert rouge_l({0: ["a b"]}, {0: "!!"}, beta=1.0, tokenize=rouge_score_tokens)[0] == 0.0


def test_f1_and_normalisations():
    assert token_f1([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert token_f1([], []) == 1.0 and token_f1([1], [2]) == 0.0
    assert parlai_normalize("The dog's ball, a_b!") == "dog s ball b"
    assert word_f1("The dog!", "a dog") == 1.0 and word_f1("the", "a") == 0.0  # ParlAI: no overlap -> 0
    assert expand_contractions("  It's NOT what I'd say, won't  ") == "it is not what i would say, will not"


# Outputs of kootenpv/contractions 0.1.73: contractions.fix(text.strip().lower()), the VLAW-MDM release's call.
CONTRACTIONS_FIX = [
    ("u look great, im so happy", "you look great, i am so happy"),  # slang; apostrophe-less ("unsafe") form
    ("dont be sad, thats life", "do not be sad, that is life"),
    ("I dunno, wanna go? gonna be fun tbh", "i do not know, want to go? going to be fun to be honest"),
    ("  It's NOT what I'd say, won't  ", "it is not what i would say, will not"),
    ("Whats up? ur so cool", "what is up? you are so cool"),
    ("ill be there, id say its fine, hes here, were here", "ill be there, id say its fine, hes here, were here"),
    ("shell we? lets go", "she will we? let us go"),  # unsafe forms of she'll, let's (not in its safety list)
    ("to cause harm 'cause cause", "to cause harm because because"),  # the longer "to cause" wins
    ("r u ok? r  u sure?", "r you ok? are  you sure?"),  # its "r " key: the next character must not be a letter
    ("don\u2019t i\u2019m can\u2019t y'all\u2019re", "do not i am cannot you all\u2019re"),
    ("jan. 5, may 1", "january 5, may 1"),
    ("u_u u2 _u caf\u00e9 u", "u_u u2 _u caf\u00e9 you"),  # word boundary = not [A-Za-z0-9_]
    ("sux to be u, kinda cool, gimme", "sucks to be you, kind of cool, give me"),
    ("y'all'd've", "you all would have"), ("I'M DONE. U R GREAT", "i am done. you r great"),
    ("'d 'll n't", " would  will n't"), ("doin' nothin'", "doing nothing")]


@pytest.mark.parametrize("text,fixed", CONTRACTIONS_FIX)
def test_expand_contractions_is_contractions_fix(text, fixed):
    assert expand_contractions(text) == fixed


def test_dialogue_word_f1_is_parlai_f1_on_the_raw_strings():
    raw = ["I don't know, it's great"], ["I do not know, it is great"]
    preds, refs = [expand_contractions(t) for t in raw[0]], [expand_contractions(t) for t in raw[1]]
    assert preds == refs
    s = dialogue_scores(preds, refs, [p.split() for p in preds], [r.split() for r in refs], chunk=2, raw=raw)
    # ParlAI normalize_answer: "i don t know it s great" vs "i do not know it is great": 4 of 7 and 4 of 7
    assert s["F1"] == 100.0 and s["word_F1"] == pytest.approx(100 * 4 / 7)
    assert "word_F1" not in dialogue_scores(preds, refs, [["i"]], [["i"]], chunk=2)


def test_dialogue_scores_batch_means_and_corpus():
    preds, refs = ["a b c d e", "x y", "a b"], ["a b c d e", "x z", "a b"]
    toks = [p.split() for p in preds], [r.split() for r in refs]
    s = dialogue_scores(preds, refs, *toks, chunk=2, raw=(preds, refs))
    f1 = [1.0, 0.5, 1.0]
    assert s["F1"] == pytest.approx(100 * np.mean([np.mean(f1[:2]), f1[2]]))
    assert s["corpus_F1"] == pytest.approx(100 * np.mean(f1))
    b1 = bleu({0: [refs[0]], 1: [refs[1]]}, {0: preds[0], 1: preds[1]}, smooth=False)[3]
    b2 = bleu({0: [refs[2]]}, {0: preds[2]}, smooth=False)[3]
    assert s["BLEU-4"] == pytest.approx(100 * (b1 + b2) / 2) and b2 == 0.0  # 2 words: no 4-gram
    assert s["corpus_BLEU-4"] == pytest.approx(100 * bleu({i: [r] for i, r in enumerate(refs)},
                                                          dict(enumerate(preds)), smooth=False)[3])
    assert s["ROUGE-L"] == pytest.approx(100 * np.mean([np.mean([1.0, 0.5]), 1.0]))
    assert s["word_F1"] == pytest.approx(100 * np.mean([1.0, 0.5, 1.0]))


def test_dialogue_scores_hits_at_1_5_10_and_references_missing_from_the_candidates():
    """ParlAI's hits@1/5/10 and MRR over the ranked examples; a rank of None (the reference is not among the
    candidates) is counted in "no_gold" instead of being dropped silently; R@k only for k <= the candidates."""
    preds = refs = ["a b"] * 5
    toks = [p.split() for p in preds]
    s = dialogue_scores(preds, refs, toks, toks, chunk=2, ranks=[1, 3, 7, 12, None], n_candidates=100)
    assert (s["R@1/100"], s["R@5/100"], s["R@10/100"]) == (25.0, 50.0, 75.0) and s["no_gold"] == 1
    assert s["MRR"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 7 + 1 / 12) / 4)
    few = dialogue_scores(preds[:2], refs[:2], toks[:2], toks[:2], chunk=2, ranks=[2, 5], n_candidates=5)
    assert few["R@1/5"] == 0.0 and few["R@5/5"] == 100.0 and "R@10/5" not in few and few["no_gold"] == 0
    assert "no_gold" not in dialogue_scores(preds, refs, toks, toks, chunk=2) and "R@1/100" not in dialogue_scores(
        preds, refs, toks, toks, chunk=2, ranks=[None] * 5)



def parlai_hits(scores, cands, label, k):
    """ParlAI's hits@k as written (parlai/core/metrics.py `_update_ranking_metrics`): the candidates sorted by
    score (here with no ties), a hit when any of the first k normalises to the label."""
    ranked = [cands[i] for i in sorted(range(len(cands)), key=lambda i: -scores[i])]
    return any(parlai_normalize(c) == parlai_normalize(label) for c in ranked[:k])


def test_gold_rank_follows_parlai_hits_at_k():
    """A hit@k when any of the top k candidates equals the label after ParlAI's normalize_answer: a repeated gold
    scored best, or a variant differing in case, punctuation or articles, ranks 1 (not the first copy's rank)."""
    cands, ref = ["i love this", "red", "so blue", "i love this"], "i love this"
    scores = [0.1, 0.5, 0.3, 0.9]  # the second copy of the gold is the best candidate
    assert label_matches(cands, ref) == [True, False, False, True] and gold_rank(scores, label_matches(cands, ref)) == 1
    toks = [["x"]]
    assert dialogue_scores(["x"], ["x"], toks, toks, chunk=1, ranks=[1], n_candidates=4)["R@1/4"] == 100.0
    variants = ["red", "I love this!", "The dog.", "i love  this", "i loved this"]  # normalisation: 1, 3 match
    assert label_matches(variants, ref) == [False, True, False, True, False]
    assert label_matches(variants, "dog") == [False, False, True, False, False]  # "the" and "." dropped
    sc = [0.9, 0.2, 0.5, 0.4, 0.8]
    assert gold_rank(sc, label_matches(variants, ref)) == 4  # "i love  this" (0.4) after 0.9, 0.8, 0.5
    rng = np.random.default_rng(0)
    words = ["a", "the", "dog", "Dog!", "red", "an", "cat."]
    for _ in range(200):  # against ParlAI's loop on random lists with repeats and variants, no ties
        cands = [" ".join(rng.choice(words, rng.integers(1, 3))) for _ in range(12)]
        label, scores = cands[rng.integers(12)], rng.permutation(12).tolist()
        rank = gold_rank(scores, label_matches(cands, label))
        assert all((rank <= k) == parlai_hits(scores, cands, label, k) for k in (1, 2, 5, 10))
    assert gold_rank([0.5, 0.5, 0.5], label_matches(["dog", "a dog", "cat"], "dog")) == 2  # a tie: behind "cat"
    assert gold_rank([0.9, 0.1], label_matches(["cat", "red"], "dog")) is None
    assert gold_rank(torch.zeros(100), 7) == 100 and gold_rank(torch.tensor([0.5, 0.1, 0.5, 0.9]), 0) == 3


def test_gold_rank_of_a_turn_without_candidates_is_none():
    """No candidates: label_matches gives [] and no candidate is gold (None, counted in no_gold),
    not an IndexError from indexing with torch's float reading of []."""
    assert label_matches([], "dog") == [] and gold_rank([], label_matches([], "dog")) is None
    assert gold_rank(torch.zeros(0), []) is None and gold_rank([0.3, 0.2], []) is None
    toks = [["x"]]
    assert dialogue_scores(["x"], ["x"], toks, toks, chunk=1, ranks=[None])["no_gold"] == 1


# ---------------------------------------------------------------- caption_metrics
def test_caption_metrics_tokenises_then_scores():
    gts = {1: ["A cat sits on the mat.", "There is a cat on the mat!"], 2: ["A dog (brown) runs fast."]}
    res = {1: "The cat is on the mat.", 2: ["A dog runs."]}
    got = caption_metrics(gts, res)
    tok_gts = {1: ["a cat sits on the mat", "there is a cat on the mat"], 2: ["a dog -lrb- brown -rrb- runs fast"]}
    tok_res = {1: ["the cat is on the mat"], 2: ["a dog runs"]}
    b = bleu(tok_gts, tok_res)
    assert [got[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(b, rel=1e-12)
    assert got["CIDEr"] == pytest.approx(cider_d(tok_gts, tok_res)[0], rel=1e-12)
    assert got["ROUGE-L"] == pytest.approx(rouge_l(tok_gts, tok_res)[0], rel=1e-12)
    assert 0 < got["BLEU-4"] < got["BLEU-1"] <= 1
    perfect = caption_metrics({1: ["a red circle"], 2: ["a blue square"]}, {1: "A red circle.", 2: "a blue square"})
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["ROUGE-L"] == pytest.approx(1.0)
    # CIDEr-D by hand: 2 images, "a" in both references -> idf log2 - log2 = 0; every other n-gram idf log2.
    # Each image: unigram cosine 1 ("a" weighs 0 on both sides), bigram 1, trigram 1, no 4-gram -> 0; equal
    # lengths, no penalty; 10 * (1 + 1 + 1 + 0) / 4 = 7.5 per image and as the mean
    assert perfect["CIDEr"] == pytest.approx(7.5, rel=1e-12)


def test_caption_metrics_by_group_scores_each_group_alone():
    """NoCaps' per-domain numbers: each domain scored as its own evaluated set (CIDEr's document frequencies from
    that domain's references), the overall row in one pass over all images."""
    gts = {"A": ["a b"], "B": ["a c"], "C": ["d e"], "D": ["f g"], "E": ["h i"]}
    res = {"A": "a", "B": "a c", "C": "d e", "D": "f g", "E": "h i"}
    groups = {"A": "in-domain", "B": "in-domain", "C": "out-domain", "D": "out-domain", "E": None}
    got = caption_metrics_by_group(gts, res, groups)
    # in-domain alone (2 images): "a" is in both references, idf log2 - log2 = 0, so A's only unigram weighs 0 and
    # A scores 0; B matches its reference exactly (unigram and bigram cosine 1, no 3/4-grams): 10 * 2 / 4 = 5.
    assert got["in-domain/CIDEr"] == pytest.approx((0 + 5) / 2, rel=1e-12)
    assert got["out-domain/CIDEr"] == pytest.approx(5.0, rel=1e-12)  # exact matches, all n-grams distinct
    # one pass over all 5 images: idf("a") = log5 - log2 > 0, so A scores: cosine with "a b" is
    # w_a^2 / (w_a * sqrt(w_a^2 + w_b^2)), lengths differ by one bigram
    w_a, w_b = math.log(5) - math.log(2), math.log(5)
    a_overall = 10 * (w_a / math.sqrt(w_a ** 2 + w_b ** 2)) * math.exp(-1 / (2 * 6.0 ** 2)) / 4
    assert got["CIDEr"] == pytest.approx((a_overall + 5 * 4) / 5, rel=1e-12)
    one_pass = cider_d({i: gts[i] for i in gts}, {i: [res[i]] for i in res})[1]
    assert (one_pass["A"] + one_pass["B"]) / 2 > got["in-domain/CIDEr"] + 0.5  # the rule matters here
    for g, ids in (("in-domain", "AB"), ("out-domain", "CD")):  # every metric of a group = the group alone
        alone = caption_metrics({i: gts[i] for i in ids}, {i: res[i] for i in ids})
        assert {k: got[f"{g}/{k}"] for k in alone} == alone
    assert {k: got[k] for k in caption_metrics(gts, res)} == caption_metrics(gts, res)
    assert set(got) == {f"{p}{k}" for p in ("", "in-domain/", "out-domain/") for k in caption_metrics(gts, res)}
    assert caption_metrics_by_group(gts, res, {}) == caption_metrics(gts, res)  # no labels: the plain metrics


# ---------------------------------------------------------------- Hugging Face `evaluate` bleu / rouge
# Reference values computed once in a throwaway venv (Python 3.11): BLEU with tensorflow/nmt's
# nmt/scripts/bleu.py (commit 0be8642, the `compute_bleu` evaluate's bleu metric vendors) on the tokens of evaluate's
# metrics/bleu/tokenizer_13a.py (commit a7dd338; identical tokens to sacrebleu 2.6.0's Tokenizer13a on every
# string below); ROUGE with rouge_score 0.1.2 (RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
# use_stemmer), score_multi, numpy 2.4.6, nltk 3.10.4 for the stemmer), mean of the F-measures over examples
# (evaluate's bootstrap median with numpy seed 0 gave the same values to 6 decimals on these sets).
HF_CASES = [
    # 1 one reference each, plain captions
    (["a red circle to the left of a blue square", "a small green triangle"],
     ["a red circle left of a blue square", "a large green triangle above a circle"]),
    # 2 several references: clipping by the max count, shortest reference for the brevity penalty
    (["the cat is on the mat", "a dog runs fast in the park today"],
     [["the cat sat on the mat", "a cat is on the mat", "there is a cat on the mat here"],
      ["a dog runs", "the dog is running fast in a park"]]),
    # 3 punctuation, case, numbers, contractions, entities
    (["A man's dog, running at 3.5 mph (fast)!", "It's 12:30 p.m. in the U.S.; 1,000 people & 5-star food."],
     [["a man's dog is running at 3.5 mph.", "The dog runs fast"],
      ["it is 12:30 pm in the us, 1,000 people &amp; 5-star food", "IT'S NOON IN THE U.S."]]),
    # 4 predictions shorter than 4 words (zero 4-gram precision: BLEU 0 without smoothing)
    (["a dog", "red circle moves"], [["a dog runs"], ["a red circle moves to the right"]]),
    # 5 an empty prediction and an unmatched one
    (["", "completely different words"], ["a blue square", "a green circle on the left"]),
    # 6 repeated words (clipping), prediction longer than the reference
    (["the the the the cat cat on on the mat mat"], [["the cat is on the mat"]]),
    # 7 two sentences per text (rougeLsum splits on newlines)
    (["a red circle moves right\na blue square stays", "one line only"],
     [["a blue square stays still\na red circle moves to the right"], ["one line\nonly two"]]),
]
HF_REFERENCE = [  # bleu, bleu smooth=True, precisions; (rouge1, rouge2, rougeL, rougeLsum) F; same stemmed
    (0.4307986428250798, 0.48657762818982603, [0.7857142857142857, 0.5833333333333334, 0.4, 0.25],
     (0.7171717171717171, 0.4861111111111111, 0.7171717171717171, 0.7171717171717171),
     (0.7171717171717171, 0.4861111111111111, 0.7171717171717171, 0.7171717171717171)),
    (0.49880524833251266, 0.5593684915933073, [0.9285714285714286, 0.6666666666666666, 0.4, 0.25],
     (0.7916666666666667, 0.6222222222222223, 0.6893939393939394, 0.6893939393939394),
     (0.8541666666666667, 0.6222222222222223, 0.7291666666666667, 0.7291666666666667)),
    (0.38186895107044744, 0.40436593235942225,
     [0.6571428571428571, 0.48484848484848486, 0.3225806451612903, 0.20689655172413793],
     (0.8048387096774193, 0.5957854406130269, 0.8048387096774193, 0.8048387096774193),
     (0.8048387096774193, 0.5957854406130269, 0.8048387096774193, 0.8048387096774193)),
    (0.0, 0.36787944117144233, [1.0, 1.0, 1.0, 0.0],
     (0.7, 0.5833333333333333, 0.7, 0.7),
     (0.7, 0.5833333333333333, 0.7, 0.7)),
    (0.0, 0.06114461654585454, [0.0, 0.0, 0.0, 0.0],
     (0.0, 0.0, 0.0, 0.0),
     (0.0, 0.0, 0.0, 0.0)),
    (0.0, 0.2521193618434983, [0.45454545454545453, 0.3, 0.1111111111111111, 0.0],
     (0.5882352941176471, 0.4, 0.5882352941176471, 0.5882352941176471),
     (0.5882352941176471, 0.4, 0.5882352941176471, 0.5882352941176471)),
    (0.45782273986766686, 0.4982308529026769, [1.0, 0.8, 0.625, 0.3333333333333333],
     (0.8571428571428571, 0.7157894736842105, 0.6666666666666666, 0.8571428571428571),
     (0.8571428571428571, 0.7157894736842105, 0.6666666666666666, 0.8571428571428571)),
]


@pytest.mark.parametrize("case,want", list(zip(HF_CASES, HF_REFERENCE)))
def test_hf_bleu_and_rouge_match_reference_implementations(case, want):
    preds, refs = case
    bleu_ref, bleu_smooth_ref, prec_ref, rouge_ref, rouge_stem_ref = want
    got = hf_bleu(preds, refs)
    assert got["bleu"] == pytest.approx(bleu_ref, abs=1e-12)
    assert got["precisions"] == pytest.approx(prec_ref, abs=1e-12)
    assert hf_bleu(preds, refs, smooth=True)["bleu"] == pytest.approx(bleu_smooth_ref, abs=1e-12)
    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    assert [hf_rouge(preds, refs)[k] for k in keys] == pytest.approx(rouge_ref, abs=1e-12)
    assert [hf_rouge(preds, refs, use_stemmer=True)[k] for k in keys] == pytest.approx(rouge_stem_ref, abs=1e-12)


def test_tokenize_13a_and_hf_bleu_rules():
    # tokens from evaluate's Tokenizer13a on these strings (reference run above)
    assert tokenize_13a("It's 12:30 p.m. in the U.S.; 1,000 people &amp; 5-star food.") == [
        "It's", "12", ":", "30", "p", ".", "m", ".", "in", "the", "U", ".", "S", ".", ";", "1,000", "people", "&",
        "5", "-", "star", "food", "."]
    assert tokenize_13a('A man\'s dog, (fast)! 3.5-inch x-ray "hi" $10/day') == [
        "A", "man's", "dog", ",", "(", "fast", ")", "!", "3.5", "-", "inch", "x-ray", '"', "hi", '"', "$", "10", "/",
        "day"]
    # brevity penalty from the SHORTEST reference: 5 words against refs of 2 and 6 -> ratio 5/2, bp 1, and every
    # n-gram matches the 6-word ref -> BLEU 1 (the COCO toolkit's closest ref, 6 words, would give exp(1 - 6/5))
    r = hf_bleu(["a b c d e"], [["a b", "a b c d e f"]])
    assert (r["reference_length"], r["length_ratio"], r["bleu"]) == (2, 2.5, 1.0)
    r = hf_bleu(["a b c d"], [["a b c d e f", "a b c d e f g h"]])  # shortest 6 -> bp = exp(1 - 6/4)
    assert r["brevity_penalty"] == pytest.approx(math.exp(-0.5)) and r["bleu"] == pytest.approx(math.exp(-0.5))
    # case-sensitive BLEU, case-insensitive ROUGE
    assert hf_bleu(["A B C D"], ["a b c d"])["bleu"] == 0.0
    assert hf_rouge(["A B C D"], ["a b c d"])["rougeL"] == 1.0
    with pytest.raises(ValueError):
        hf_bleu(["a"], [])


def test_hf_caption_metrics_seed_rule_drops_and_scales_empty_predictions():
    gts = {1: ["a red circle", "the red circle  "], 2: ["a blue square"], 3: ["a green dot on the left"]}
    res = {1: " a red circle ", 2: ["  "], 3: "a green dot on the right"}
    # item 2 is empty: dropped, each score x 2/3. Items 1 + 3 (stripped): BLEU-1 = (3 + 5) / (3 + 6) = 8/9 ("right"
    # misses; shortest refs 3 + 6 words = hyp length: bp 1); ROUGE-L F: item 1 = 1, item 3 = LCS 5 of 6 and 6
    # -> 5/6; mean 11/12
    got = hf_caption_metrics(gts, res)
    assert got["hf_BLEU-1"] == pytest.approx(2 / 3 * 8 / 9)
    assert got["hf_ROUGE-L"] == pytest.approx(2 / 3 * 11 / 12)
    kept = (["a red circle", "a green dot on the right"], [["a red circle", "the red circle"], gts[3]])
    assert got["hf_BLEU-4"] == pytest.approx(2 / 3 * hf_bleu(*kept)["bleu"]) and got["hf_BLEU-4"] > 0
    assert hf_caption_metrics({1: ["a b"]}, {1: ""}) == {"hf_BLEU-1": 0.0, "hf_BLEU-4": 0.0, "hf_ROUGE-L": 0.0}


# ---------------------------------------------------------------- VQA
@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"), ("a dog.", "dog"), ("none", "0"), ("3,000.", "3000"), ("3.5", "3.5"), ("dont", "don't"),
    ("the man's hat", "man's hat"), ("yes!", "yes"), ("x/y", "x y"), ("Hello, world", "hello world"),
    (" An\tapple\n", "apple"), ("couldnt've", "couldn't've"),
])
def test_normalize_vqa_answer(raw, norm):
    assert normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_leave_one_out():
    answers = ["2"] * 3 + ["3"] * 7
    # removing one of the three "2": 2 matches -> 2/3 (x3); removing another: 3 matches -> 1 (x7) => 0.9
    assert vqa_accuracy("2", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)  # 9 subsets keep 1 match: 1/3
    assert vqa_accuracy("a dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"]) == 1.0  # single answer (GQA-style): exact match


def test_vqa_accuracy_official_gt_processing_quirk():
    # the 2017 code (LAVIS, the default) punctuation-processes human answers only when they disagree
    assert vqa_accuracy("dog", ["dog."] * 10) == 0.0
    assert vqa_accuracy("dog", ["dog."] * 9 + ["cat"]) == 1.0


# Hand-worked cases of the two rules; `h` matches of the processed prediction among 10 answers give
# (h * min(1, (h-1)/3) + (10-h) * min(1, h/3)) / 10.
VQA_RULE_CASES = [
    # (pred, answers, lavis2017, official)
    # unanimous, number word: 2017 turns "Two" into "2" -> h=10 -> 1.0; current compares raw "Two" != "2" -> 0
    ("Two", ["2"] * 10, 1.0, 0.0),
    # unanimous, case and punctuation: 2017 "Yes." -> "yes", h=10 -> 1.0; current raw "Yes." != "yes" -> 0
    ("Yes.", ["yes"] * 10, 1.0, 0.0),
    # unanimous, exact string: both rules h=10 -> 1.0
    ("2", ["2"] * 10, 1.0, 1.0),
    # surrounding whitespace: current strips both sides -> h=10 -> 1.0; 2017 strips the prediction too
    (" 2\n", ["2"] * 10, 1.0, 1.0),
    # disagreeing, number words in the answers: 2017 keeps "two"/"three" (punctuation only), pred "2" -> h=0 -> 0;
    # current maps them to "2"/"3" -> h=4: 4 subsets keep 3 matches (1), 6 keep 4 (1) -> 1.0
    ("2", ["two"] * 4 + ["three"] * 6, 0.0, 1.0),
    # disagreeing, articles: pred -> "dog" in both; 2017 answers stay "the dog" -> h=0 -> 0;
    # current "the dog" -> "dog", h=3: 3 subsets keep 2 (2/3), 7 keep 3 (1) -> (3 * 2/3 + 7) / 10 = 0.9
    ("the dog", ["the dog"] * 3 + ["cat"] * 7, 0.0, 0.9),
    # disagreeing, contractions: pred "dont" -> "don't" in both; 2017 answers stay "dont" -> 0;
    # current answers -> "don't", h=5: every subset keeps >= 4 matches -> 1.0
    ("dont", ["dont"] * 5 + ["no"] * 5, 0.0, 1.0),
    # disagreeing, punctuation: both rules strip "dog." -> "dog"; h=2: 2 subsets keep 1 (1/3), 8 keep 2 (2/3)
    # -> (2/3 + 16/3) / 10 = 0.6
    ("dog", ["dog."] * 2 + ["cat"] * 8, 0.6, 0.6),
    # disagreeing, case in the answers: 2017 does not lowercase answers -> "Yes" != "yes" -> h=0 -> 0;
    # current lowercases both -> h=8: every subset keeps >= 7 matches -> 1.0
    ("yes", ["Yes"] * 8 + ["no"] * 2, 0.0, 1.0),
]


@pytest.mark.parametrize("pred,answers,lavis,official", VQA_RULE_CASES)
def test_vqa_accuracy_two_rules_hand_worked(pred, answers, lavis, official):
    assert vqa_accuracy(pred, answers) == pytest.approx(lavis)  # default = LAVIS's 2017 copy
    assert vqa_accuracy(pred, answers, rule="lavis2017") == pytest.approx(lavis)
    assert vqa_accuracy(pred, answers, rule="official") == pytest.approx(official)


def test_vqa_accuracy_rule_checked_and_single_answer():
    with pytest.raises(ValueError):
        vqa_accuracy("a", ["a"] * 10, rule="2021")
    # GQA-style single answer: LAVIS's GQA task normalises the prediction only; current rule = raw stripped match
    assert vqa_accuracy("Two", ["2"], rule="lavis2017") == 1.0
    assert vqa_accuracy("Two", ["2"], rule="official") == 0.0
    assert vqa_score({1: "Two", 2: "2"}, {1: ["2"] * 10, 2: ["2"] * 10}, rule="official") == pytest.approx(0.5)


def test_vqa_score_mean_and_ids():
    gts = {1: ["2"] * 10, 2: ["red"] * 10}
    assert vqa_score({1: "two", 2: "blue"}, gts) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        vqa_score({1: "two"}, gts)


# ---------------------------------------------------------------- OK-VQA lemmatiser
def test_okvqa_lemmatize_says_how_to_install_nltk_data(monkeypatch, tmp_path):
    import nltk
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # an nltk data path without wordnet or the tagger
    with pytest.raises(LookupError, match="python -m nltk.downloader wordnet averaged_perceptron_tagger_eng") as e:
        okvqa_lemmatize(["dogs"])
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_okvqa_lemmatize_on_wordnet_fixture(monkeypatch):
    # tests/fixtures/nltk_data: a few WordNet 3.0 database files and a perceptron tagger whose tag dictionary
    # holds the words below (unknown words fall to NN through the bias weight); see its README.md
    import nltk.corpus
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    from nltk.corpus.util import LazyCorpusLoader
    monkeypatch.setattr(nltk.data, "path", [os.path.join(os.path.dirname(__file__), "fixtures", "nltk_data")])
    # a fresh loader, so that the fixture WordNet is not what nltk.corpus.wordnet holds after this test
    monkeypatch.setattr(nltk.corpus, "wordnet", LazyCorpusLoader("wordnet", WordNetCorpusReader, None))
    answers = ["dogs", "mice", "glasses", "ran", "running", "Dogs", "red", "better", "Paris", "is",
               "the men's bus", "flew quickly", ""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "multilingual functions are not available" (no OMW)
        got = okvqa_lemmatize(answers)
    assert got == [
        "dog", "mouse",     # NNS: regular plural, noun.exc irregular
        "glass",            # both "glasses" and "glass" are WordNet nouns: the shortest lemma wins
        "run", "run",       # VBD / VBG through verb.exc
        "dog",              # not in the tag dictionary -> NN; lower-cased as spaCy's lemma_
        "red", "better",    # JJ, JJR: adjectives stay (only NOUN and VERB are lemmatised)
        "Paris",            # NNP (spaCy PROPN) stays
        "is",               # a form of "be" stays (spaCy: AUX)
        "the man 's bus",   # tokens re-joined by spaces, as LAVIS joins spaCy tokens
        "fly quickly", ""]


# ---------------------------------------------------------------- retrieval
def _argsort_recall(sim, txt2img, img2txts, ks, txt_order, img_order):
    """ALBEF/BLIP itm_eval ranking with a given tie-breaking order (candidates visited in that order)."""
    txt_hits, img_hits = [], []
    for i, txts in enumerate(img2txts):
        order = [txt_order[j] for j in np.argsort(-sim[i, txt_order], kind="stable")]
        rank = min(order.index(t) for t in txts)
        txt_hits.append([rank < k for k in ks])
    for j, i in enumerate(txt2img):
        order = [img_order[r] for r in np.argsort(-sim[img_order, j], kind="stable")]
        img_hits.append([order.index(i) < k for k in ks])
    return 100 * np.mean(txt_hits, 0), 100 * np.mean(img_hits, 0)


def test_retrieval_recall_hand_worked():
    sim = np.array([[0.1, 0.9, 0.8, 0.2],
                    [0.7, 0.3, 0.4, 0.6]])
    # image 0: its best caption (1) ranks first; image 1: caption 3 (0.6) is behind caption 0 (0.7) -> rank 2.
    # captions 1 and 3 rank their image first, captions 0 and 2 second.
    out = retrieval_recall(sim, [0, 0, 1, 1], [[0, 1], [2, 3]], ks=(1, 5, 10))
    assert out == pytest.approx({"txt_r1": 50.0, "txt_r5": 100.0, "txt_r10": 100.0,
                                 "img_r1": 50.0, "img_r5": 100.0, "img_r10": 100.0, "r_mean": 500 / 6})
    same = retrieval_recall(torch.tensor(sim, dtype=torch.bfloat16), [0, 0, 1, 1], [[0, 1], [2, 3]])
    assert same == pytest.approx(out)


def test_retrieval_recall_matches_argsort_without_ties():
    rng = np.random.default_rng(0)
    img2txts = [[0, 1], [2], [3, 4, 5], [6, 7], [8], [9, 10], [11], [12, 13]]
    txt2img = [i for i, ts in enumerate(img2txts) for _ in ts]
    sim = rng.standard_normal((8, 14))
    ks = (1, 2, 5)
    txt, img = _argsort_recall(sim, txt2img, img2txts, ks, list(range(14)), list(range(8)))
    out = retrieval_recall(sim, txt2img, img2txts, ks=ks, chunk=3)  # chunking must not change anything
    assert [out[f"txt_r{k}"] for k in ks] == pytest.approx(list(txt))
    assert [out[f"img_r{k}"] for k in ks] == pytest.approx(list(img))


def test_retrieval_recall_ties_are_expected_value_over_orders():
    sim = np.array([[1, 0, 1, 1, 0],
                    [0, 0, 1, 0, 1],
                    [1, 1, 1, 0, 0]], dtype=np.float32)
    img2txts, txt2img, ks = [[0, 1], [2, 4], [3]], [0, 0, 1, 2, 1], (1, 2, 3)
    runs = [_argsort_recall(sim, txt2img, img2txts, ks, list(t), list(i))
            for t in itertools.permutations(range(5)) for i in itertools.permutations(range(3))]
    txt = np.mean([r[0] for r in runs], 0)
    img = np.mean([r[1] for r in runs], 0)
    out = retrieval_recall(sim, txt2img, img2txts, ks=ks)
    assert [out[f"txt_r{k}"] for k in ks] == pytest.approx(list(txt))
    assert [out[f"img_r{k}"] for k in ks] == pytest.approx(list(img))
    const = retrieval_recall(np.zeros((4, 4)), [0, 1, 2, 3], [[0], [1], [2], [3]], ks=(1, 2))
    assert const["img_r1"] == pytest.approx(25.0) and const["txt_r2"] == pytest.approx(50.0)


def test_retrieval_recall_caption_without_image_is_only_a_distractor():
    sim = np.array([[0.9, 0.1, 0.95],
                    [0.2, 0.8, 0.1]])
    # caption 2 (no image) outscores image 0's caption: txt_r1 drops to 50; image retrieval uses captions 0, 1
    out = retrieval_recall(sim, [0, 1, -1], [[0], [1]], ks=(1, 2))
    assert out["txt_r1"] == pytest.approx(50.0) and out["txt_r2"] == pytest.approx(100.0)
    assert out["img_r1"] == pytest.approx(100.0)


def test_reranked_recall_itm_reorders_only_the_itc_shortlist():
    """BLIP / BLIP-2 retrieval: ITM re-scores each row's ITC top-k; what ITC leaves out of the top-k stays out."""
    from common.dist import Dist
    from common.metrics import reranked_recall
    sim = torch.tensor([[0.5, 0.9, 0.1],   # image 0: ITC prefers text 1
                        [0.4, 0.3, 0.2],   # image 1: ITC prefers text 0
                        [0.0, 0.1, 0.6]])
    match = lambda r, cols: (cols == r).float()  # noqa: E731  a perfect matcher, in both directions
    one = Dist(0, 0, 1, torch.device("cpu"))
    itc = retrieval_recall(sim, [0, 1, 2], [[0], [1], [2]])
    assert itc["txt_r1"] == pytest.approx(100 / 3) and itc["img_r1"] == pytest.approx(200 / 3)
    out = reranked_recall(sim, match, match, 2, [0, 1, 2], [[0], [1], [2]], one)
    assert out["txt_r1"] == out["img_r1"] == out["r_mean"] == pytest.approx(100.0)
    # k = 1: the right texts of images 0 and 1 are outside the shortlist, so the perfect matcher cannot rescue them
    top1 = reranked_recall(sim, match, match, 1, [0, 1, 2], [[0], [1], [2]], one)
    assert top1["txt_r1"] == pytest.approx(itc["txt_r1"]) and top1["img_r1"] == pytest.approx(itc["img_r1"])


def test_retrieval_recall_rejects_bad_input():
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros((2, 3)), [0, 1], [[0], [1]])
    with pytest.raises(ValueError):
        retrieval_recall(np.full((1, 1), np.nan), [0], [[0]])
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros((2, 2)), [0, 2], [[0], [1]])
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros((2, 2)), [0, 0], [[0, 1], []])
