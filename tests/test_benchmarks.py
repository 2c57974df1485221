"""Tests for data/benchmarks.py: scoring rules on hand-computed cases, readers on fixtures in their published layouts,
and every runner end to end through a stand-in model whose answers can be derived by hand."""
import json
import math
import os
import random
import shutil
import zlib

import numpy as np
import pytest
import torch

import data.benchmarks as B
from common.image import CLIP_MEAN, CLIP_STD, ImageTransform
from data.negatives import ORDER_PERTURBATIONS, RuleTagger

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")  # the dataset-layout fixtures, published formats (fixtures/README.md)


def test_score_vg_macro_exclusion_and_min_count():
    pos = [0.9, 0.2, 0.5, 0.7, 0.3, 0.5]
    neg = [0.1, 0.4, 0.5, 0.6, 0.1, 0.1]   # case 2 is a tie: wrong (strict >)
    rel = ["on", "on", "on", "wearing", "next to", "next to"]
    r = B.score_vg(pos, neg, rel, exclude=B.VG_R_EXCLUDED)
    assert "next to" in B.VG_R_EXCLUDED and "on" not in B.VG_R_EXCLUDED
    assert math.isclose(r["macro"], (1 / 3 + 1.0) / 2) and math.isclose(r["micro"], 4 / 6) and r["groups"] == 2
    r = B.score_vg(pos, neg, ["a_b"] * 3 + ["c_d"] * 3, min_count=3)
    assert math.isclose(r["macro"], (1 / 3 + 1) / 2)
    r = B.score_vg(pos, neg, ["a_b"] * 2 + ["c_d"] * 4, min_count=3)
    assert math.isclose(r["macro"], 3 / 4) and r["groups"] == 1
    assert len(B.VG_R_EXCLUDED) == 157


def test_score_vg_accuracy_per_relation_and_attribute_pair():
    """As ARO's evaluate_scores (dataset_zoo/aro_datasets.py): VG-Relation records every relation, the ones its
    macro leaves out included; VG-Attribution every attribute pair with >= min_count cases."""
    pos, neg = [0.9, 0.2, 0.5, 0.7, 0.3, 0.5], [0.1, 0.4, 0.5, 0.6, 0.1, 0.1]
    r = B.score_vg(pos, neg, ["on", "on", "on", "wearing", "next to", "next to"], exclude=B.VG_R_EXCLUDED)
    assert r["per_group"] == {"on": pytest.approx(1 / 3), "wearing": 1.0, "next to": 1.0}
    r = B.score_vg(pos, neg, ["a_b"] * 2 + ["c_d"] * 4, min_count=3)
    assert r["per_group"] == {"c_d": 0.75}


def test_score_order_ties_count_right_for_the_first_option():
    s = np.array([[0.5, 0.5, 0.1, 0.1, 0.1], [0.1, 0.9, 0, 0, 0], [0.3, 0.1, 0.2, 0.2, 0.2]])
    assert math.isclose(B.score_order(s), 2 / 3)


def test_score_sugarcrepe_micro_and_macro():
    per = {"replace_obj": ([1, 1, 0, 1], [0, 0, 1, 1]), "replace_att": ([1], [0]), "swap_att": ([0, 1], [1, 0])}
    r = B.score_sugarcrepe(per)
    assert r["replace_obj"] == 0.5 and r["replace_att"] == 1.0 and r["swap_att"] == 0.5
    assert math.isclose(r["REPLACE_micro"], 3 / 5) and math.isclose(r["macro"], (0.5 + 1 + 0.5) / 3)


def test_crepe_ranks_and_metrics():
    ranks = B.crepe_ranks([0.5, 0.2, 0.9], [[0.1, 0.6, 0.5], [0.3, 0.4, 0.1], [0.1, 0.2, 0.3]])
    assert ranks.tolist() == [2, 2, 0]  # the tie with 0.5 counts against the true caption
    m = B.score_crepe(ranks)
    assert math.isclose(m["R@1"], 1 / 3) and m["R@3"] == 1.0 and math.isclose(m["mean_rank"], 7 / 3)
    assert m["median_rank"] == 3
    # CREPE's get_one2many_metrics (crepe_eval_utils.py): floor(median of 0-based ranks) + 1, an integer rank
    assert B.score_crepe([0, 1, 2, 5])["median_rank"] == 2  # median 1.5 -> 1 -> rank 2 (not 2.5)
    assert B.score_crepe([0, 3])["median_rank"] == 2 and B.score_crepe([4, 4, 0])["median_rank"] == 5


def test_crepe_reports_the_std_of_recall_as_its_released_eval(tmp_path):
    """CREPE's get_one2many_metrics (crepe_eval_utils.py) reports R@k_std = np.std(ranks < k) and rank_std =
    np.std(ranks) next to the means; eval_crepe used to compute them and drop them from the results.  CSVs in the
    published layout (the fixture's header), a red image, captions scored by their colour words: red (1.00) >
    red-and-blue (0.88) > no colour (0.80) > blue (0.53) > green (0.51); ties count against the true caption. A row
    whose negatives are all its caption (up to case and spacing) ranks first, as CREPE's tie rule has it (it
    stopped the evaluation with an empty stack before)."""
    header = open(f"{FIX}/crepe/prod_hard_negatives/atom/prod_vg_hard_negs_atom_complexity_4.csv").readline()
    rows = {4: [("red box.", ["a box.", "blue box.", "green box.", "box.", "one box."]),  # rank 0
                ("a box.", ["red box.", "blue box.", "green box.", "box here.", "one box."]),  # rank 3
                ("blue box.", ["red box.", "a box.", "green box.", "red and blue box.", "box."])],  # 4
            5: [("red and blue box.", ["red box.", "a box.", "blue box.", "green box.", "box."]),  # 1
                ("red box.", ["a box.", "box.", "one box.", "box here.", "the box."]),  # 0
                ("blue box.", ["Blue box.", "blue  box."])]}  # 0: no negative left
    folder = tmp_path / "crepe" / "prod_hard_negatives" / "atom"
    os.makedirs(folder)
    for n, rs in rows.items():
        with open(folder / f"prod_vg_hard_negs_atom_complexity_{n}.csv", "w") as f:
            f.write(header + "".join(f'1,{c},{n},2,1,1,1,"{negs!r}",0.0,0.0,100.0,100.0\n' for c, negs in rs))
    _png(str(tmp_path / "crepe" / "VG_100K" / "1.jpg"), (255, 0, 0), (700, 700))
    r = B.eval_crepe(_colour_scorer(), str(tmp_path))
    assert r["atom_c4_R@1"] == pytest.approx(1 / 3) and r["atom_c4_R@5"] == 1.0  # ranks 0, 3, 4
    assert r["atom_c4_R@1_std"] == pytest.approx(math.sqrt(2) / 3)  # sqrt(p (1 - p)), p = 1/3
    assert r["atom_c4_R@3_std"] == pytest.approx(math.sqrt(2) / 3) and r["atom_c4_R@5_std"] == 0.0
    assert r["atom_c4_rank_std"] == pytest.approx(math.sqrt(26) / 3)  # mean 7/3: (49 + 4 + 25) / 27 = 26/9
    assert r["atom_c5_R@1"] == pytest.approx(2 / 3) and r["atom_c5_R@1_std"] == pytest.approx(math.sqrt(2) / 3)
    assert r["atom_R@1"] == pytest.approx(0.5) and r["atom_R@1_std"] == pytest.approx(0.5)  # pooled: 0,3,4,1,0,0
    table = B.format_table({f"crepe/{k}": v for k, v in r.items()})
    assert any(line.split()[1:] == ["atom_c4_R@1_std", f"{math.sqrt(2) / 3:.4f}"] for line in table.splitlines())


def test_score_svo_and_winoground():
    r = B.score_svo([0.5, 0.1, 0.4, 0.3], [0.2, 0.3, 0.4, 0.1], ["subj", "verb", "obj", "obj"])
    assert r["pairwise"] == 0.5 and r["subj"] == 1 and r["verb"] == 0 and r["obj"] == 0.5
    # s[n, caption, image]
    s = np.array([[[0.9, 0.1], [0.2, 0.8]],    # all right
                  [[0.9, 0.3], [0.7, 0.5]],    # text right, image wrong (c1 prefers i0)
                  [[0.5, 0.1], [0.5, 0.8]],    # tie s(c0,i0) = s(c1,i0): text wrong; image right
                  [[0.1, 0.9], [0.8, 0.2]]])   # all wrong
    r = B.score_winoground(s)
    assert r["text"] == 0.5 and r["image"] == 0.5 and r["group"] == 0.25


def test_read_aro_vg_fixtures():
    rel = B.read_aro_vg(f"{FIX}/aro/visual_genome_relation.json")
    assert len(rel) == 12 and rel[0]["true_caption"] == "the door is to the left of the shirt"
    assert rel[0]["relation_name"] == "to the left of" and rel[0]["image_path"] == "2410049.jpg"
    att = B.read_aro_vg(f"{FIX}/aro/visual_genome_attribution.json")
    assert att[0]["attributes"] == ["white", "open"]


def test_read_sugarcrepe_fixture_keeps_gapped_keys():
    d = B.read_sugarcrepe(f"{FIX}/sugarcrepe")
    assert set(d) == {"replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att"}
    assert all(len(v) == 10 for v in d.values())  # swap_obj has keys 0..5, 106, 107, 109, 110
    assert d["swap_att"][0] == ("000000565045.jpg", "Blue bathroom with two white towels hanging by the shower.",
                                "White bathroom with two blue towels hanging by the shower.")


def test_read_crepe_fixture_lists_and_sets():
    d = B.read_crepe(f"{FIX}/crepe")
    assert set(d) == {("atom", 4), ("atom", 12), ("negate", 4), ("swap", 4)}
    assert len(d[("atom", 4)]) == 16 and len(d[("negate", 4)]) == 10
    r = d[("atom", 4)][0]
    assert r["image_id"] == "13" and r["box"] == (237.0, 391.0, 402.0, 208.0) and len(r["negs"]) == 5
    neg0 = d[("negate", 4)][0]["negs"]  # a set literal: sorted for a defined order
    assert neg0 == sorted(neg0) and "Lamp not next to bed. There is an end table." in neg0


def test_read_svo_fixture():
    rows = B.read_svo(f"{FIX}/svo_probes/svo_probes.csv")
    assert len(rows) == 10
    assert rows[0] == {"sentence": "A woman lies on a beach.", "pos_image_id": "2", "neg_image_id": "3",
                       "kind": "verb"}
    assert rows[3]["kind"] == "obj"  # neg_triplet given as a list literal


def test_read_winoground_and_retrieval_fixtures():
    w = B.read_winoground(f"{FIX}/winoground/examples.jsonl")
    assert len(w) == 12 and w[0]["image_0"] == "ex_0_img_0"
    images, texts, t2i, i2t = B.read_retrieval(f"{FIX}/blip/coco_karpathy_test.json")
    assert len(images) == 6 and images[0] == "val2014/COCO_val2014_000000391895.jpg"
    assert texts[0] == "a man with a red helmet on a small moped on a dirt road"  # ARO/BLIP normalisation
    assert len(texts) == len(t2i) == sum(len(x) for x in i2t) and t2i[i2t[2][0]] == 2


def _png(path, color, size=(48, 40)):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _colour_scorer(batch=4, max_bad_frac=0.05):
    """Stand-in model for the runner tests, as the two callbacks of B.Scorer: image embedding = mean colour (of the
    CLIP-normalised pixels), text embedding from the colour words it names.  Lets the benchmark runners be checked
    end to end against hand-derived answers."""
    tf = ImageTransform(16, mean=CLIP_MEAN, std=CLIP_STD)

    def images(pils):
        return torch.nn.functional.normalize(torch.stack([tf(im) for im in pils]).mean((2, 3)) + 3, dim=-1)

    def texts(strs):
        ids = torch.tensor([[(w in t.lower().split()) * 1.0 for w in ("red", "green", "blue")] for t in strs])
        z = (ids - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        return torch.nn.functional.normalize(z + 3, dim=-1)

    return B.Scorer(images, texts, batch, max_bad_frac=max_bad_frac)


def test_benchmark_runners_on_fixture_layouts(tmp_path):
    """SugarCREPE / ARO / Winoground / SVO / CREPE runners read the published layouts with images at their
    conventional paths and score with the rules above (colour-world stand-in model, hand-derived answers)."""
    root = tmp_path
    shutil.copytree(f"{FIX}/sugarcrepe", root / "sugarcrepe")
    for name in {r[0] for v in B.read_sugarcrepe(str(root / "sugarcrepe")).values() for r in v}:
        _png(str(root / "sugarcrepe" / "val2017" / name), (255, 0, 0))
    # every caption of the fixture lacks colour words except those saying red/blue/green
    sc = _colour_scorer()
    r = B.eval_sugarcrepe(sc, str(root))
    # swap_att item 0: "Blue bathroom with two white towels" vs "White bathroom with two blue towels": both
    # mention blue, neither red -> equal scores -> wrong by the strict rule
    assert 0 <= r["macro"] <= 1 and set(B.read_sugarcrepe(str(root / "sugarcrepe"))) <= set(r)

    # ARO: records point into aro/images/<image_path>, boxes crop; image red on the left, blue on the right
    os.makedirs(root / "aro")
    recs = [{"image_id": "1", "true_caption": "the red box", "false_caption": "the blue box",
             "relation_name": "on", "bbox_x": 0, "bbox_y": 0, "bbox_w": 10, "bbox_h": 20, "image_path": "1.jpg"},
            {"image_id": "1", "true_caption": "the blue box", "false_caption": "the red box",
             "relation_name": "on", "bbox_x": 30, "bbox_y": 0, "bbox_w": 10, "bbox_h": 20, "image_path": "1.jpg"},
            {"image_id": "1", "true_caption": "the blue box", "false_caption": "the red box",
             "relation_name": "next to", "bbox_x": 0, "bbox_y": 0, "bbox_w": 10, "bbox_h": 20, "image_path": "1.jpg"}]
    from PIL import Image
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    os.makedirs(root / "aro" / "images")
    im.save(root / "aro" / "images" / "1.jpg")
    json.dump(recs, open(root / "aro" / "visual_genome_relation.json", "w"))
    att = [dict(r, attributes=["red", "blue"]) for r in recs]
    json.dump(att, open(root / "aro" / "visual_genome_attribution.json", "w"))
    r = B.eval_aro(sc, str(root), min_pair_count=1)
    assert r["vg_relation_micro"] == pytest.approx(2 / 3) and r["vg_relation_macro"] == 1.0  # "next to" excluded
    assert r["vg_attribution_macro"] == pytest.approx(2 / 3)
    # per relation (all of them, as ARO's evaluate_scores) and per attribute pair
    assert r["vg_relation/on"] == 1.0 and r["vg_relation/next to"] == 0.0
    assert r["vg_attribution/red_blue"] == pytest.approx(2 / 3)

    # Winoground: images/ex_<id>_img_<k>.png, captions by colour
    os.makedirs(root / "winoground")
    with open(root / "winoground" / "examples.jsonl", "w") as f:
        f.write(json.dumps({"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "caption_0": "a red one",
                            "caption_1": "a blue one", "tag": "x", "secondary_tag": "", "num_main_preds": 1,
                            "collapsed_tag": "Object"}) + "\n")
    _png(str(root / "winoground" / "images" / "ex_0_img_0.png"), (255, 0, 0))
    _png(str(root / "winoground" / "images" / "ex_0_img_1.png"), (0, 0, 255))
    r = B.eval_winoground(sc, str(root))
    assert r["text"] == r["image"] == r["group"] == 1.0 and r["Object_group"] == 1.0

    # SVO: images/<image_id>.jpg; a missing image drops its row (coverage)
    os.makedirs(root / "svo_probes")
    with open(root / "svo_probes" / "svo_probes.csv", "w") as f:
        f.write("sentence,pos_triplet,neg_triplet,pos_url,neg_url,pos_image_id,neg_image_id,subj_neg,verb_neg,"
                "obj_neg\nA red car.,\"car,be,red\",\"car,be,blue\",u,v,1,2,False,False,True\n"
                "A blue car.,\"car,be,blue\",\"car,be,red\",u,v,2,3,True,False,False\n")
    _png(str(root / "svo_probes" / "images" / "1.jpg"), (255, 0, 0))
    _png(str(root / "svo_probes" / "images" / "2.jpg"), (0, 0, 255))
    r = B.eval_svo(sc, str(root))
    assert r["pairwise"] == 1.0 and r["coverage"] == 0.5 and r["n"] == 1

    # COCO-Order from BLIP's coco_karpathy_test.json: the colour model scores all 5 options of a caption alike
    # (perturbations keep the words), and a tie counts as right for the order sets (original is first)
    for image, _ in B.read_caption_sets(f"{FIX}/blip/coco_karpathy_test.json"):
        _png(str(root / "coco" / image), (255, 0, 0))
    r = B.eval_order(sc, f"{FIX}/blip/coco_karpathy_test.json", str(root / "coco"),
                     seeds=2, tagger=RuleTagger())
    n_caps = sum(len(c) for _, c in B.read_caption_sets(f"{FIX}/blip/coco_karpathy_test.json"))
    assert r == {"coco_order_p1": 1.0, "coco_order_p1_std": 0.0, "coco_order_n": n_caps, "coco_order/tagger": "rule"}

    # CREPE: VG_100K_2 is searched too; boxes crop
    shutil.copytree(f"{FIX}/crepe", root / "crepe")
    for (typ, n), rows in B.read_crepe(str(root / "crepe")).items():
        for row in rows:
            _png(str(root / "crepe" / "VG_100K_2" / f"{row['image_id']}.jpg"), (0, 255, 0), (700, 700))
    r = B.eval_crepe(sc, str(root))
    assert {"atom_c4_R@1", "negate_c4_R@3", "swap_c4_mean_rank", "atom_R@1"} <= set(r)
    assert r["atom_c4_n"] == 16

    assert sc.images_seen.bad == 0 and sc.images_seen.tried > 20


def test_run_benchmarks_counts_unreadable_images_once_and_enforces_max_bad_frac(tmp_path):
    """An unreadable image scores NaN, its cases are skipped, it is counted once however many cases use it, the
    count is reported; more than max_bad_frac of the distinct images unreadable stops with one line."""
    os.makedirs(tmp_path / "winoground" / "images")
    with open(tmp_path / "winoground" / "examples.jsonl", "w") as f:
        for i in range(4):  # every example uses image "bad" as its image_1
            f.write(json.dumps({"id": i, "image_0": f"ok{i}", "image_1": "bad", "caption_0": "a red one",
                                "caption_1": "a blue one"}) + "\n")
    for i in range(4):
        _png(str(tmp_path / "winoground" / "images" / f"ok{i}.png"), (255, 0, 0))
    (tmp_path / "winoground" / "images" / "bad.png").write_bytes(b"not a png")
    lines = []
    sc = _colour_scorer(max_bad_frac=0.5)
    res = B.run_benchmarks(sc, ["winoground"], str(tmp_path), log=lines.append)
    assert res["unreadable_images"] == 1 and sc.images_seen.tried == 5 and res["winoground/n"] == 0
    assert lines == [f"eval: 1 of 5 images unreadable (e.g. ['{tmp_path}/winoground/images/bad.png'])"]
    with pytest.raises(B.DataError, match="too many unreadable images.*1 of 5"):
        B.run_benchmarks(_colour_scorer(max_bad_frac=0.1), ["winoground"], str(tmp_path), log=lines.append)
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        B.run_benchmarks(sc, ["nope"], str(tmp_path))


def test_run_benchmarks_skips_a_missing_benchmark_folder_and_scores_the_rest(tmp_path):
    """A benchmark whose folder (or retrieval/order file) is absent is skipped with one log line and the others are
    scored, so results.json is still written; it used to stop the whole eval with a DataError.  Bad data inside a
    present folder is still an error."""
    os.makedirs(tmp_path / "winoground" / "images")
    with open(tmp_path / "winoground" / "examples.jsonl", "w") as f:
        f.write(json.dumps({"id": 0, "image_0": "a", "image_1": "b", "caption_0": "a red one",
                            "caption_1": "a blue one"}) + "\n")
    _png(str(tmp_path / "winoground" / "images" / "a.png"), (255, 0, 0))
    _png(str(tmp_path / "winoground" / "images" / "b.png"), (0, 0, 255))
    os.makedirs(tmp_path / "svo_probes")  # the CSV without its downloaded images/: skipped as well
    shutil.copy(f"{FIX}/svo_probes/svo_probes.csv", tmp_path / "svo_probes")
    lines, names = [], [b for b in B.BENCHMARKS if b != "classification"]
    res = B.run_benchmarks(_colour_scorer(), names, str(tmp_path), retrieval_file=str(tmp_path / "none.json"),
                           order_file="", log=lines.append)
    assert res["winoground/group"] == 1.0 and {k.split("/")[0] for k in res} == {"winoground"}
    skipped = [m for m in lines if m.endswith(", skipped")]
    assert skipped == [f"retrieval: no {tmp_path}/none.json, skipped", f"aro: no {tmp_path}/aro, skipped",
                       "order: no --order_file, skipped", f"sugarcrepe: no {tmp_path}/sugarcrepe, skipped",
                       f"crepe: no {tmp_path}/crepe, skipped", f"svo: no {tmp_path}/svo_probes/images, skipped",
                       f"vlc: no {tmp_path}/vl_checklist, skipped"]
    os.makedirs(tmp_path / "aro")  # present but without its files: an error naming the file
    with pytest.raises(B.DataError, match="visual_genome_relation.json: file not found"):
        B.run_benchmarks(_colour_scorer(), ["winoground", "aro"], str(tmp_path), log=lines.append)


def test_retrieval_and_order_of_coco_and_flickr_in_one_eval(tmp_path):
    """--retrieval_file / --order_file as comma lists (image roots: one per file) score COCO and Flickr30k in one
    eval: retrieval keys start with the dataset, order keys name it already; each equals its single-file run."""
    coco, flickr = f"{FIX}/blip/coco_karpathy_test.json", f"{FIX}/blip/flickr30k_test.json"
    for k, (path, root) in enumerate(((coco, "coco"), (flickr, "flickr"))):
        for j, (image, _) in enumerate(B.read_caption_sets(path)):
            _png(str(tmp_path / root / image), [(255, 0, 0), (0, 0, 255), (0, 255, 0)][(j + k) % 3])
    roots = f"{tmp_path}/coco,{tmp_path}/flickr"
    run = lambda files, roots: B.run_benchmarks(  # noqa: E731
        _colour_scorer(), ["retrieval", "order"], str(tmp_path), files, roots, files, roots, order_seeds=1,
        tagger=RuleTagger(), log=lambda m: None)
    both = run(f"{coco},{flickr}", roots)
    for name, path, root in (("coco", coco, "coco"), ("flickr30k", flickr, "flickr")):
        single = run(path, f"{tmp_path}/{root}")
        assert single["retrieval/txt_r1"] == both[f"retrieval/{name}_txt_r1"]
        assert {f"retrieval/{name}_{k[len('retrieval/'):]}": v for k, v in single.items()
                if k.startswith("retrieval/")} == {k: v for k, v in both.items() if k.startswith(f"retrieval/{name}_")}
        assert both[f"order/{name}_order_p1"] == single[f"order/{name}_order_p1"]
    assert {k.split("/")[1].split("_")[0] for k in both if k.startswith("retrieval/")} == {"coco", "flickr30k"}
    with pytest.raises(ValueError, match="--retrieval_image_root: 3 roots for 2 --retrieval_file files"):
        run(f"{coco},{flickr}", roots + ",x")



def test_two_order_files_of_one_dataset_keep_their_scores_apart(tmp_path):
    """Two *-Order files both named as COCO (a test and a val split, or two test.json of two folders) each keep
    their scores under their own keys, each equal to its single-file run; one file keeps "coco_order_*"."""
    json.dump([{"image": "a.png", "caption": ["a red dog runs on green grass"]}],
              open(tmp_path / "coco_karpathy_test.json", "w"))
    json.dump([{"image": "a.png", "caption": ["a man rides a horse", "a cat sits on a mat", "two kids play ball"]}],
              open(tmp_path / "coco_karpathy_val.json", "w"))
    _png(str(tmp_path / "a.png"), (255, 0, 0))
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "coco_karpathy_val.json", tmp_path / "b" / "coco_karpathy_test.json")
    run = lambda files: B.run_benchmarks(_colour_scorer(), ["order"], str(tmp_path), order_file=files,  # noqa: E731
                                         order_image_root=str(tmp_path), order_seeds=1, tagger=RuleTagger(),
                                         log=lambda m: None)
    test, val, other = (str(tmp_path / f) for f in ("coco_karpathy_test.json", "coco_karpathy_val.json",
                                                    "b/coco_karpathy_test.json"))
    assert run(test) == {"order/coco_order_p1": 1.0, "order/coco_order_p1_std": 0.0, "order/coco_order_n": 1,
                         "order/coco_order/tagger": "rule"}
    both = run(f"{test},{val}")
    assert both["order/coco_karpathy_test_order_n"] == 1 and both["order/coco_karpathy_val_order_n"] == 3
    assert both["order/coco_karpathy_val_order_p1"] == run(val)["order/coco_order_p1"] and len(both) == 8
    same_stem = run(f"{test},{other}")  # two files named alike: numbered
    assert same_stem["order/coco_karpathy_test1_order_n"] == 1 and same_stem["order/coco_karpathy_test2_order_n"] == 3


def _random_text_scorer(dim=512):
    """B.Scorer whose text embedding is a fixed random unit vector per string (seeded by the string), so equal
    strings embed equally and different ones are near-orthogonal in 512-d."""
    def texts(strs):
        gens = (torch.Generator().manual_seed(zlib.crc32(t.encode())) for t in strs)
        return torch.nn.functional.normalize(torch.stack([torch.randn(dim, generator=g) for g in gens]), dim=-1)
    return B.Scorer(None, texts)


def test_order_option_equal_to_the_original_ties_and_counts_right():
    """A perturbation may return a short caption unchanged (shuffle_trigrams does); ARO (model_zoo/clip_models.py
    np.einsum, aro_datasets.py argmax) ties it with the original and picks the original.  Each image's embedding is
    the sum of its captions' random 512-d embeddings, so every original is best or tied: P@1 must be 1.0 (the
    batched torch.einsum scored such copies ~1e-8 apart from the original and lost about half of those ties)."""
    path = f"{FIX}/blip/coco_karpathy_test.json"
    sc, sets, tagger = _random_text_scorer(), B.read_caption_sets(path), RuleTagger()
    img = {os.path.join("/imgs", i): sc.texts([B.pre_caption(c) for c in cs]).sum(0) for i, cs in sets}
    sc.images = lambda refs: torch.stack([img[p] for p, _ in refs])
    unchanged = sum(B.pre_caption(f(c, tagger, random.Random(s))) == B.pre_caption(c)
                    for s in range(5) for _, cs in sets for c in cs for f in ORDER_PERTURBATIONS)
    assert unchanged > 0  # the case under test occurs in the fixture
    r = B.eval_order(sc, path, "/imgs", seeds=5, tagger=tagger)
    assert r["coco_order_p1"] == 1.0 and r["coco_order_p1_std"] == 0.0


def test_order_results_name_the_tagger(tmp_path):
    """--tagger auto picks nltk when its data is installed, else the rule tagger, and the two perturb differently:
    the results (results.json, the eval table) name the one used, under a nested key the report's charts skip."""
    json.dump([{"image": "a.png", "caption": ["a red dog runs on green grass"]}],
              open(tmp_path / "coco_karpathy_test.json", "w"))
    _png(str(tmp_path / "a.png"), (255, 0, 0))
    res = B.run_benchmarks(_colour_scorer(), ["order"], str(tmp_path), order_file=f"{tmp_path}/coco_karpathy_test.json",
                           order_image_root=str(tmp_path), order_seeds=1, tagger=RuleTagger(), log=lambda m: None)
    assert res["order/coco_order/tagger"] == "rule"
    assert any(line.split() == ["order", "coco_order/tagger", "rule"] for line in B.format_table(res).splitlines())
    json.dumps(res)  # results.json holds it


_CREPE_HEADER = open(f"{FIX}/crepe/prod_hard_negatives/atom/prod_vg_hard_negs_atom_complexity_4.csv").readline()


def test_crepe_negative_equal_to_the_caption_does_not_count_against_it(tmp_path):
    """The released CSVs list the caption itself among its hard negatives (swap: exact copies; negate: capitalised
    copies, e.g. the row below, prod_vg_hard_negs_negate_complexity_4.csv).  CREPE's get_one2many_rank
    (crepe_eval_utils.py: CPU argsort over [caption, negatives], clip.tokenize lowercases) ties them with the
    caption and ranks the caption first: rank 0 here, where such a copy used to count against it."""
    cap = "beacon on top rock mountain. there is a mountain."
    negs = {"There is no beacon on top rock mountain. There is a mountain.",
            "Beacon on top rock mountain. There is a mountain. There is no rock mountain.",
            "Beacon not on top rock mountain. There is a mountain.",
            "Beacon on top rock mountain. There is a mountain.",
            "Beacon on top rock mountain. There is a mountain. There is no mountain."}
    swap_negs = ["snow covering rock. there is a mountain.", "rock covering snow. there is a ground.", cap,
                 " beacon  on top rock mountain. there is a mountain."]
    for typ, hard in (("negate", negs), ("swap", swap_negs)):
        os.makedirs(tmp_path / "crepe" / "prod_hard_negatives" / typ)
        with open(tmp_path / "crepe" / "prod_hard_negatives" / typ / f"prod_vg_hard_negs_{typ}_complexity_4.csv",
                  "w") as f:
            f.write(_CREPE_HEADER + f'2359484,{cap},4,4,1,0,2,"{hard!r}",183.0,4.0,314.0,157.0\n')
    base = _random_text_scorer()
    sc = _random_text_scorer()
    sc.embed_texts = lambda strs: base.embed_texts([" ".join(t.lower().split()) for t in strs])  # clip.tokenize
    sc.images = lambda refs: base.embed_texts([cap]).expand(len(refs), -1)  # the image "is" the caption
    d = B.read_crepe(str(tmp_path / "crepe"))
    assert len(d[("negate", 4)][0]["negs"]) == 4 and len(d[("swap", 4)][0]["negs"]) == 2
    r = B.eval_crepe(sc, str(tmp_path))
    assert r["negate_c4_R@1"] == 1.0 and r["swap_c4_R@1"] == 1.0 and r["negate_c4_mean_rank"] == 1.0


def test_read_crepe_skips_stray_files_beside_the_type_folders(tmp_path):
    """The public unzipped prod_hard_negatives/ holds a macOS .DS_Store beside atom/ negate/ swap/; it is not a
    type folder (listing it raised NotADirectoryError and lost every benchmark's results)."""
    shutil.copytree(f"{FIX}/crepe", tmp_path / "crepe")
    (tmp_path / "crepe" / "prod_hard_negatives" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "crepe" / "prod_hard_negatives" / "atom" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    assert set(B.read_crepe(str(tmp_path / "crepe"))) == set(B.read_crepe(f"{FIX}/crepe"))


# ---------------------------------------------------------------------------------------------------------------
# VL-CheckList
def test_read_simple_yaml_accepts_key_value_lines_only(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text('ANNO_PATH: "data/x.json"\n# a comment\n\nIMG_ROOT: vg/  # trailing\nTYPE: \'TUPLE_JSON\'')
    assert B.read_simple_yaml(str(p)) == {"ANNO_PATH": "data/x.json", "IMG_ROOT": "vg/", "TYPE": "TUPLE_JSON"}
    for bad, line in (('A: "x"\nDATA:\n  TYPES: ["vg"]\n', 2), ("A: [1, 2]\n", 1), ('  A: "x"\n', 1)):
        p.write_text(bad)
        with pytest.raises(B.DataError, match=rf"a\.yaml:{line}: not a simple 'KEY: value' line"):
            B.read_simple_yaml(str(p))


def test_read_vlc_fixture(tmp_path):
    root = f"{FIX}/vl_checklist"
    d = B.read_vlc(root)
    assert sorted(d) == [("Attribute/action", "vaw"), ("Attribute/state", "vg"),
                         ("Object/Location/margin", "swig_destination"), ("Object/Size/small", "hake"),
                         ("Object/Size/small", "vg_obj"), ("Object/Size/small", "vg_subj"),
                         ("Relation/action", "vg"), ("Relation/spatial", "vg")]
    assert all(len(v) == 6 for v in d.values())
    assert d[("Relation/spatial", "vg")][0] == (f"{root}/vg/VG_100K/2361911.jpg", ["control switch ON oven"],
                                               ["control switch under oven"])
    assert d[("Object/Size/small", "hake")][4][0] == f"{root}/hake/hcvrd/107905.jpg"  # IMG_ROOT "hake/"
    swig = d[("Object/Location/margin", "swig_destination")][0]
    assert swig[0] == f"{root}/swig/plunging_16.jpg" and len(swig[1]) == len(swig[2]) == 3
    assert d[("Object/Size/small", "vg_obj")][0][2] == [" customers"]  # upstream's leading space is kept
    with pytest.raises(B.DataError, match="corpus/v2: folder not found"):
        B.read_vlc(root, version="v2")
    shutil.copytree(root, tmp_path / "v")
    (tmp_path / "v" / "data" / "Relation" / "vg" / "spatial.json").write_text('[["a.jpg", {"POS": ["x"], "NEG": []}]]')
    with pytest.raises(B.DataError, match=r"spatial\.json: record 0: not \[image, \{POS"):
        B.read_vlc(str(tmp_path / "v"))


def test_score_vlc_averages_files_per_dataset_then_datasets_then_sub_categories():
    per = {("Object/Size/small", "vg_obj"): ([1, 1, 0, 0], [0, 0, 1, 1]),     # 1/2
           ("Object/Size/small", "vg_subj"): ([1, 1], [0, 0]),               # 1   -> vg: 3/4
           ("Object/Size/small", "hake"): ([0.5, 0.2], [0.5, 0.1]),          # tie wrong: 1/2 -> small 5/8
           ("Object/Size/large", "swig_agent"): ([1], [0]),                  # 1
           ("Object/Size/medium", "swig_place"): ([], []),                   # no case: left out
           ("Relation/spatial", "vg"): ([0, 1, 1], [1, 0, 0])}               # 2/3
    r = B.score_vlc(per)
    assert r["object_size_small"] == pytest.approx(5 / 8) and r["object_size_large"] == 1.0
    assert "object_size_medium" not in r and r["object"] == pytest.approx((5 / 8 + 1) / 2)
    assert r["relation"] == r["relation_spatial"] == pytest.approx(2 / 3) and "attribute" not in r
    assert r["n"] == 12


def _length_scorer():
    """Stand-in model: one image embedding for every image, a caption's embedding turned from it by len(caption)/100
    radians, so s(image, caption) = cos(len / 100): the shorter caption wins, equal lengths tie."""
    def images(pils):
        return torch.tensor([[1.0, 0.0]]).repeat(len(pils), 1)

    def texts(strs):
        a = torch.tensor([len(t) / 100 for t in strs], dtype=torch.float64)
        return torch.stack([a.cos(), a.sin()], 1).float()
    return B.Scorer(images, texts, batch=4)


def test_eval_vlc_on_fixture_hand_checked(tmp_path):
    """The fixture scored by caption length (shorter POS[0] than NEG[0] = right; ties wrong); each image at
    IMG_ROOT/<path>, one left out (its case is dropped, as the authors' loader does)."""
    shutil.copytree(f"{FIX}/vl_checklist", tmp_path / "vl_checklist")
    data = B.read_vlc(str(tmp_path / "vl_checklist"))
    missing = str(tmp_path / "vl_checklist" / "vg" / "VG_100K_2" / "2393269.jpg")  # last case of vg_subj
    for v in data.values():
        for path, _, _ in v:
            if path != missing:
                _png(path, (9, 9, 9), (8, 8))
    r = B.eval_vlc(_length_scorer(), str(tmp_path))
    # right per file (by hand from the fixture's first POS / NEG): vaw action 5/6, vg state 3/6, swig_destination
    # 5/6, hake 2/6, vg_obj 0/6, vg_subj 3/5 (one image missing), Relation action 1/6, spatial 6/6
    assert r["attribute_action"] == pytest.approx(5 / 6) and r["attribute_state"] == pytest.approx(1 / 2)
    assert r["attribute"] == pytest.approx(2 / 3)
    assert r["object_size_small"] == pytest.approx((2 / 6 + (0 + 3 / 5) / 2) / 2)  # hake, then vg = obj + subj
    assert r["object_location_margin"] == pytest.approx(5 / 6)
    assert r["object"] == pytest.approx((5 / 6 + (2 / 6 + 3 / 10) / 2) / 2)
    assert r["relation_action"] == pytest.approx(1 / 6) and r["relation"] == pytest.approx((1 / 6 + 1) / 2)
    assert r["n"] == 47 and r["coverage"] == pytest.approx(47 / 48)
    r = B.eval_vlc(_length_scorer(), str(tmp_path), max_num=4)  # the authors' MAX_NUM: first MAX_NUM // 2 cases
    assert r["n"] == 16 and r["relation_action"] == 0.5 and r["attribute_state"] == 1.0
    res = B.run_benchmarks(_length_scorer(), ["vlc"], str(tmp_path), log=lambda *a: None)
    assert res["vlc/object"] == pytest.approx((5 / 6 + (2 / 6 + 3 / 10) / 2) / 2) and "vlc" in B.BENCHMARKS
    res = B.run_benchmarks(_length_scorer(), ["vlc"], str(tmp_path), log=lambda *a: None, vlc_max_num=4)
    assert res["vlc/n"] == 16 and res["vlc/relation_action"] == 0.5  # negclip.py --vlc_max_num
    shutil.rmtree(tmp_path / "vl_checklist" / "vg")
    shutil.rmtree(tmp_path / "vl_checklist" / "hake")
    shutil.rmtree(tmp_path / "vl_checklist" / "swig")
    with pytest.raises(B.DataError, match="none of the 48 VL-CheckList images is present"):
        B.eval_vlc(_length_scorer(), str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# real-layout fixtures through the readers and runners
def test_blip_train_layout_is_grouped_by_image_for_retrieval(tmp_path):
    """BLIP's train files (blip/coco_karpathy_train.json) hold one {"image", "caption": str} entry
    per caption, so an image recurs once per caption.  read_caption_sets groups them by image, as
    data/convert.py blip does: it used to put one copy of the image in the retrieval gallery per
    caption, each copy right for its own caption only, so the copies tied and image R@1 fell to
    2/3 here although the (colour) model ranks every pair right."""
    first, second = json.load(open(f"{FIX}/blip/coco_karpathy_train.json"))
    layout = [dict(first, caption="A red cake on a table. "), dict(first, caption="a red net"),
              dict(second, caption="A blue bowl.")]
    path = tmp_path / "coco_karpathy_train.json"
    json.dump(layout, open(path, "w"))
    assert B.read_caption_sets(str(path)) == [
        (first["image"], ["A red cake on a table. ", "a red net"]),
        (second["image"], ["A blue bowl."])]
    images, texts, t2i, i2t = B.read_retrieval(str(path))
    assert images == [first["image"], second["image"]] and t2i == [0, 0, 1] and i2t == [[0, 1], [2]]
    _png(str(tmp_path / first["image"]), (255, 0, 0))
    _png(str(tmp_path / second["image"]), (0, 0, 255))
    r = B.eval_retrieval(_colour_scorer(), str(path), str(tmp_path))
    assert r["img_r1"] == pytest.approx(100.0) and r["txt_r1"] == pytest.approx(100.0)


def test_a_karpathy_split_file_given_as_a_blip_file_names_the_converter():
    """Karpathy's dataset_coco.json is a dict ({"images": [..], "dataset": "coco"}), not BLIP's
    list: the error says so and names the converter (it used to read the dict's keys as records
    and report a missing field)."""
    with pytest.raises(B.DataError, match=r"dataset_coco\.json: not a BLIP annotation list"
                                          r".*convert\.py karpathy"):
        B.read_caption_sets(f"{FIX}/karpathy/dataset_coco.json")


def test_missing_svo_csv_and_winoground_jsonl_are_data_errors(tmp_path):
    """A present svo_probes/images/ or winoground/ folder without its annotation file stops with a
    DataError naming the file, as every other reader here (it raised a bare FileNotFoundError)."""
    os.makedirs(tmp_path / "svo_probes" / "images")
    os.makedirs(tmp_path / "winoground")
    with pytest.raises(B.DataError, match=r"svo_probes\.csv: file not found"):
        B.run_benchmarks(_colour_scorer(), ["svo"], str(tmp_path), log=lambda m: None)
    with pytest.raises(B.DataError, match=r"examples\.jsonl: file not found"):
        B.run_benchmarks(_colour_scorer(), ["winoground"], str(tmp_path), log=lambda m: None)


def test_eval_aro_on_the_fixture_layout_ties_swapped_captions_as_wrong(tmp_path):
    """The ARO fixtures through eval_aro: images at aro/images/<image_path>, each record's box
    cropped.  The true and false captions hold the same words (VG-Relation swaps the objects,
    VG-Attribution the attributes), so the colour model scores them alike; ARO's argmax over
    [false, true] (dataset_zoo/aro_datasets.py evaluate_scores) takes the false one on a tie:
    every case is wrong."""
    shutil.copytree(f"{FIX}/aro", tmp_path / "aro")
    recs = [r for kind in ("relation", "attribution")
            for r in B.read_aro_vg(f"{FIX}/aro/visual_genome_{kind}.json")]
    for name in {r["image_path"] for r in recs}:
        _png(str(tmp_path / "aro" / "images" / name), (255, 0, 0), (500, 500))
    sc = _colour_scorer()
    r = B.eval_aro(sc, str(tmp_path), min_pair_count=1)
    assert r["vg_relation_n"] == 12 and r["vg_relation_groups"] == 7
    assert r["vg_relation_macro"] == r["vg_relation_micro"] == 0.0
    assert r["vg_relation/to the left of"] == 0.0
    assert r["vg_attribution_n"] == 4 and r["vg_attribution_groups"] == 4
    assert r["vg_attribution_macro"] == r["vg_attribution/white_open"] == 0.0
    assert sc.images_seen.tried == 4 and sc.images_seen.bad == 0
    r = B.eval_aro(sc, str(tmp_path))  # ARO's 25 cases per attribute pair: none in the fixture
    assert r["vg_attribution_groups"] == 0 and math.isnan(r["vg_attribution_macro"])


def test_eval_aro_groups_attributes_by_their_first_two_as_aro(tmp_path):
    """ARO's VG_Attribution keys a case by f"{attributes[0]}_{attributes[1]}" (dataset_zoo/aro_datasets.py):
    a record with a third attribute joins the pair of its first two.  Joining all of them made one group per
    record here, none with 4 cases, so the macro was NaN; a list of fewer than two is a data error."""
    shutil.copytree(f"{FIX}/aro", tmp_path / "aro")
    path = tmp_path / "aro" / "visual_genome_attribution.json"
    recs = B.read_aro_vg(str(path))
    for i, r in enumerate(recs):
        r["attributes"] = ["white", "open", f"extra{i}"]
        _png(str(tmp_path / "aro" / "images" / r["image_path"]), (255, 0, 0), (500, 500))
    path.write_text(json.dumps(recs))
    r = B.eval_aro(_colour_scorer(), str(tmp_path), min_pair_count=4)
    assert r["vg_attribution_groups"] == 1 and r["vg_attribution_n"] == 4
    assert r["vg_attribution_macro"] == r["vg_attribution/white_open"] == 0.0  # same words: ties, wrong
    assert not [k for k in r if "extra" in k]
    recs[2]["attributes"] = ["white"]
    path.write_text(json.dumps(recs))
    with pytest.raises(B.DataError, match=r"record 2: 'attributes'"):
        B.eval_aro(_colour_scorer(), str(tmp_path))


def test_svo_a_repeated_row_counts_once(tmp_path):
    """The SVO-Probes notebook (probing_image_text_models.ipynb, accuracy()) drops duplicate (sentence, image,
    score) rows before averaging, over each negative type and over all types; here a repeated (sentence, pos
    image, neg image) case counts once.  It counted as often as it appeared."""
    os.makedirs(tmp_path / "svo_probes")
    row = "A red car.,\"car,be,red\",\"car,be,blue\",u,v,1,2,False,False,True\n"
    with open(tmp_path / "svo_probes" / "svo_probes.csv", "w") as f:
        f.write("sentence,pos_triplet,neg_triplet,pos_url,neg_url,pos_image_id,neg_image_id,subj_neg,verb_neg,"
                "obj_neg\n" + row + row + row + "A blue car.,\"car,be,blue\",\"car,be,red\",u,v,1,2,"
                "True,False,False\n")
    _png(str(tmp_path / "svo_probes" / "images" / "1.jpg"), (255, 0, 0))
    _png(str(tmp_path / "svo_probes" / "images" / "2.jpg"), (0, 0, 255))
    r = B.eval_svo(_colour_scorer(), str(tmp_path))
    assert r["n"] == 2 and r["pairwise"] == 0.5 and r["obj"] == 1.0 and r["subj"] == 0.0
    assert r["coverage"] == 1.0
    r = B.score_svo([0.5, 0.5, 0.1], [0.2, 0.2, 0.3], ["obj"] * 3, [("s", 1, 2), ("s", 1, 2), ("t", 1, 2)])
    assert r == {"pairwise": 0.5, "n": 2, "obj": 0.5}


def test_eval_winoground_on_the_fixture_layout(tmp_path):
    """The Winoground fixture (ids 0-9, 21, 73) through eval_winoground, images at
    images/<image_k>.png.  Image k is embedded as its own caption under a bag-of-words text model:
    the 10 pairs whose two captions hold the same words tie (wrong); ids 6 ("organism," /
    "plant,") and 73 ("watching the present" / "presenting the watch") do not, and score right.
    Per collapsed_tag: Object 1/6 (id 6), Relation 0/5, Both 1/1 (id 73)."""
    shutil.copytree(f"{FIX}/winoground", tmp_path / "winoground")
    recs = B.read_winoground(str(tmp_path / "winoground" / "examples.jsonl"))

    def vec(w):
        return torch.randn(64, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))

    def bag(strs):  # the words summed in sorted order: a permutation gives the same bits
        return torch.nn.functional.normalize(
            torch.stack([sum(vec(w) for w in sorted(t.lower().split())) for t in strs]), dim=-1)
    sc = B.Scorer(None, bag)
    folder = os.path.join(str(tmp_path), "winoground", "images")
    of = {os.path.join(folder, f"{r[f'image_{k}']}.png"): r[f"caption_{k}"]
          for r in recs for k in (0, 1)}
    sc.images = lambda refs: bag([of[p] for p, _ in refs])
    r = B.eval_winoground(sc, str(tmp_path))
    assert r["n"] == 12 and r["text"] == r["image"] == r["group"] == pytest.approx(2 / 12)
    assert r["Object_group"] == pytest.approx(1 / 6) and r["Relation_group"] == 0.0
    assert r["Both_group"] == 1.0


def test_order_n_counts_the_scored_cases_only(tmp_path):
    """*-Order skips the cases of an unreadable image (NaN scores); its n counts the scored cases,
    as ARO's, CREPE's, SVO's and Winoground's n do (it counted every caption of the file)."""
    json.dump([{"image": "a.png", "caption": ["a red dog runs on green grass"]},
               {"image": "b.png", "caption": ["a man rides a horse", "two kids play ball"]}],
              open(tmp_path / "coco_karpathy_test.json", "w"))
    _png(str(tmp_path / "a.png"), (255, 0, 0))
    (tmp_path / "b.png").write_bytes(b"not a png")
    sc = _colour_scorer()
    r = B.eval_order(sc, str(tmp_path / "coco_karpathy_test.json"), str(tmp_path), seeds=1,
                     tagger=RuleTagger())
    assert r["coco_order_n"] == 1 and r["coco_order_p1"] == 1.0 and sc.images_seen.bad == 1
