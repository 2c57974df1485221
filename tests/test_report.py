"""common/report.py: a page built with every helper is one self-contained file whose images decode,
whose plots parse as XML and whose text from data stays text; curves come from metrics.jsonl."""
import base64
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from common import report as R
from common.image import CLIP_MEAN, CLIP_STD, to_tensor

EVIL = '<script>alert("x")</script> & a red circle'
SVG = "{http://www.w3.org/2000/svg}"


def scene(size=64, seed=0):
    """A toy-world-like picture: a red square and a blue disc on grey, one random pixel."""
    a = np.full((size, size, 3), 200, np.uint8)
    a[size // 8:size // 2 - 4, size // 8:size // 2 - 4] = (220, 30, 30)
    yy, xx = np.mgrid[:size, :size]
    a[(yy - 0.7 * size) ** 2 + (xx - 0.7 * size) ** 2 < (size / 6) ** 2] = (30, 30, 220)
    a[0, 0] = np.random.default_rng(seed).integers(0, 255, 3)
    return Image.fromarray(a)


def write_metrics(path):
    """What common/log.py leaves after a resume, and worse. Steps 0..9 each log loss terms, lr,
    grad norm, speed and two gates; a NaN and an inf; a resume at step 5 whose killed run had
    logged step 6 (logged again after it); two eval figures logged together at steps 4 and 9; a
    figure logged once, a string and a bool; a last line cut mid-write."""
    recs = []
    for s in range(10):
        recs.append({"step": s, "time": 1.0 + s, "loss": 3.0 / (s + 1), "itc": 1.0 / (s + 1),
                     "lr": 1e-4 * s, "grad_norm": 2.0, "ms_step": 12.0,
                     "gate_attn_0": 0.01 * s, "gate_attn_1": 0.02 * s})
        if s == 5:
            recs.append({"step": 5, "time": 7.0, "event": "resume"})
        if s in (4, 9):
            recs.append({"step": s, "val_r_mean": 10.0 * s, "val_r1": 5.0 * s})
    recs[2]["loss"] = float("nan")
    recs[3]["itc"] = float("inf")
    recs.append({"step": 9, "IC/f1": 0.5, "note": "text is not a figure", "flag": True})
    lines = [json.dumps(r) for r in recs]
    lines.insert(7, json.dumps({"step": 6, "loss": 123.0}))  # the killed run's step 6
    with open(path, "w") as f:
        f.write("\n".join(lines) + '\n{"step": 10, "loss"')


class Page(HTMLParser):
    """An independent reading of the page: its tags, text, h2 titles and img sources."""

    def __init__(self):
        super().__init__()
        self.tags, self.text, self.h2, self.srcs, self._h2 = [], [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._h2 = tag == "h2"
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)
        if self._h2:
            self.h2.append(data)
            self._h2 = False


def polylines(root):
    """{series: [(x, y), ...]} of an SVG plot's polylines."""
    return {p.get("data-series"): [tuple(map(float, xy.split(","))) for xy in p.get("points").split()]
            for p in root.iter(SVG + "polyline")}


def test_report_with_every_helper(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    img = scene()
    # (T, 3, H, W) frames, normalised as the scripts feed them
    frames = torch.stack([to_tensor(scene(seed=i).rotate(30 * i)) for i in range(4)])
    attn = torch.zeros(16, 16)
    attn[2:6, 2:6] = 1.0  # a query looking at the red square
    chw01 = torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255.0  # (3, H, W) in [0, 1]
    rep = R.Report(f"toy run {EVIL}")
    with rep.timed():
        rep.section("Training", R.training_plots(tmp_path / "metrics.jsonl",
                                                 groups={"tanh gates": "gate_"}))
        rep.section("Benchmarks", R.bar_chart(["VG-Relation", "SugarCREPE swap-att"],
                                              {"before": [51.2, 60.0], "after": [52.0, math.nan]}))
        rep.section("Captions", R.grid([
            R.card(R.thumb(img), ("generated", EVIL), ("references", ["a red square", "a disc"])),
            R.card(R.thumb(np.asarray(img)), "from an HxWx3 uint8 array", mark=True),
            R.card(R.thumb(to_tensor(img), mean=CLIP_MEAN, std=CLIP_STD), "normalised", mark=False),
            R.card(R.thumb(chw01), "a [0, 1] tensor",
                   R.table([["true", 0.31], ["negative", 0.12]], header=["caption", "score"])),
        ]))
        rep.section("Attention", R.thumb(R.heatmap(img, attn.flatten(), alpha=0.6)),
                    R.thumb(R.heatmap(img, attn[::2, ::2], smooth=True)))
        rep.section("Video", R.thumb(R.strip(frames, mean=CLIP_MEAN, std=CLIP_STD), size=300))
        rep.section("Dialogue", R.columns({"turns": R.table([["A", EVIL], ["B", "nice & bright"]]),
                                           "config": R.table({"lr": 1e-4, "k": {"v": "<v>"}})}),
                    f"plain note {EVIL}")
    path = rep.write(tmp_path)
    assert path == str(tmp_path / "report.html") and rep.seconds > 0
    page = open(path, encoding="utf-8").read()
    info = R.read_report(path)
    assert info["sections"] == ["Training", "Benchmarks", "Captions", "Attention", "Video",
                                "Dialogue"]
    assert info["images"] == 7  # 4 cards, 2 heat maps, a strip
    assert info["svgs"] == 6  # loss terms, lr, grad norm, gates, the eval pair; the bars

    p = Page()
    p.feed(page)
    assert p.h2 == info["sections"]
    assert "script" not in p.tags  # the caption's <script> is text, not a tag
    assert sum(EVIL in t for t in p.text) == 5  # <title>, h1, card, table cell, plain note
    assert len(p.srcs) == 7
    for src in p.srcs:  # self-contained: every image inline, and it decodes
        head, b64 = src.split(",", 1)
        assert head in ("data:image/png;base64", "data:image/jpeg;base64")
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            im.load()
            assert im.mode == "RGB" and min(im.size) > 0
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    assert len(svgs) == 6 and all(ET.fromstring(s).tag == SVG + "svg" for s in svgs)
    assert "<td>k/v</td><td>&lt;v&gt;</td>" in page  # a nested dict as outer/inner rows
    # mark=True: a hit's green frame, False: a miss's red one, None: plain
    assert re.findall(r'<figure class="([^"]+)">', page) == ["card", "card ok", "card bad", "card"]
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no fetches


def test_curves_from_metrics(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    cs = R.curves_from_metrics(tmp_path / "metrics.jsonl")
    steps, loss = cs["loss"]
    assert steps == list(range(10))
    assert loss[6] == pytest.approx(3.0 / 7)  # the resumed run's step 6, not the killed run's 123
    assert math.isnan(loss[2]) and math.isinf(cs["itc"][1][3])
    assert cs["val_r_mean"] == ([4, 9], [40.0, 90.0])
    assert cs["IC/f1"] == ([9], [0.5])
    assert not {"time", "event", "note", "flag", "step"} & set(cs)
    assert R.curves_from_metrics(tmp_path / "missing.jsonl") == {}


def test_training_plots_sort_keys_into_plots(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    parts = R.training_plots(tmp_path / "metrics.jsonl", groups={"tanh gates": "gate_"})
    roots = [ET.fromstring(p) for p in parts if p.startswith("<svg")]
    titles = [r.find(SVG + "text").text for r in roots]
    assert titles == ["loss terms", "learning rate", "gradient norm", "tanh gates",
                      "val_r_mean, val_r1"]
    assert [set(polylines(r)) for r in roots] == [
        {"loss", "itc"}, {"lr"}, {"grad_norm"}, {"gate_attn_0", "gate_attn_1"},
        {"val_r_mean", "val_r1"}]
    loss = polylines(roots[0])
    assert len(loss["loss"]) == 9 and len(loss["itc"]) == 9  # 10 steps, a NaN / an inf skipped
    for r in roots:  # the resume at step 5 is marked on every plot that spans it
        assert len([e for e in r.iter(SVG + "line") if e.get("class") == "resume"]) == 1
    assert parts[-1].startswith("<table") and "IC/f1" in parts[-1] and "note" not in parts[-1]
    assert "ms_step" not in "".join(parts)  # speed is not a learning curve
    # without the group the gates join the loss terms (logged with the lr)
    plain = ET.fromstring(R.training_plots(tmp_path / "metrics.jsonl")[0])
    assert set(polylines(plain)) == {"loss", "itc", "gate_attn_0", "gate_attn_1"}
    assert R.training_plots(tmp_path / "missing.jsonl") == [R.text("no metrics logged")]


def test_training_plots_group_takes_its_keys_from_the_lr_and_grad_norm_plots(tmp_path):
    # a group may name learning rates or the grad norm; they then leave the other plots
    write_metrics(tmp_path / "metrics.jsonl")
    parts = R.training_plots(tmp_path / "metrics.jsonl", groups={"lr and norm": ["lr", "grad_norm"]})
    roots = [ET.fromstring(p) for p in parts if p.startswith("<svg")]
    shown = {r.find(SVG + "text").text: set(polylines(r)) for r in roots}
    assert shown["lr and norm"] == {"lr", "grad_norm"}
    assert "learning rate" not in shown and "gradient norm" not in shown
    assert shown["loss terms"] == {"loss", "itc", "gate_attn_0", "gate_attn_1"}


def test_line_plot_one_point_per_finite_value_and_dots():
    nan, inf = math.nan, math.inf
    root = ET.fromstring(R.line_plot({"a": ([0, 1, 2, 3, 4, 5], [1.0, nan, 3.0, inf, -inf, 2.0]),
                                      "one": ([3], [2.5]), "none": ([1, 2], [nan, nan])}, "t"))
    lines = polylines(root)
    assert set(lines) == {"a"} and len(lines["a"]) == 3
    xs = [x for x, _ in lines["a"]]
    assert xs == sorted(xs) and len(set(xs)) == 3
    dots = [c.get("data-series") for c in root.iter(SVG + "circle")]
    assert dots.count("one") == 1 and dots.count("a") == 3  # a short series: a dot on each point
    assert {"a", "one", "none"} <= {t.text for t in root.iter(SVG + "text")}  # the legend
    # higher values are drawn higher (smaller SVG y), on a linear and on a log axis
    for log_y in (False, True):
        svg = R.line_plot({"s": ([0, 1, 2], [0.01, 1.0, 100.0])}, log_y=log_y)
        pts = polylines(ET.fromstring(svg))["s"]
        assert pts[0][1] > pts[1][1] > pts[2][1]
        if log_y:  # equal ratios, equal distances
            assert pts[0][1] - pts[1][1] == pytest.approx(pts[1][1] - pts[2][1], abs=0.2)
    empty = ET.fromstring(R.line_plot({"x": ([0], [nan])}, "nothing"))
    assert "no finite values" in [t.text for t in empty.iter(SVG + "text")]


def test_long_series_are_thinned_keeping_the_last_point():
    n = 5001  # thinned to every 3rd point: the last (index 5000) is not one of them and is added
    spike = [0.0] * (n - 1) + [1.0]  # only the last point is high
    svg = R.line_plot({"s": (list(range(n)), spike), "ends": ([0, n - 1], [0.0, 1.0])})
    lines = polylines(ET.fromstring(svg))
    pts = lines["s"]
    assert R.MAX_POINTS // 2 < len(pts) <= R.MAX_POINTS + 1
    assert pts[0] == lines["ends"][0] and pts[-1] == lines["ends"][-1]  # drawn where the 2-point series ends


def test_ticks_are_round_and_inside():
    for lo, hi in [(0, 312), (0.0123, 0.0456), (-3.2, 7.9), (2.1, 2.9), (1e-6, 3e-4), (99.5, 100.5)]:
        ticks = R.nice_ticks(lo, hi)
        vals = [v for v, _ in ticks]
        assert 2 <= len(vals) <= 6 and all(lo - 1e-12 <= v <= hi + 1e-12 for v in vals)
        step = vals[1] - vals[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6
        assert all(float(label) == pytest.approx(v) for v, label in ticks)
    assert [v for v, _ in R.nice_ticks(0, 312)] == [0, 100, 200, 300]
    assert [label for _, label in R.nice_ticks(0, 3e-5)] == ["0", "1e-05", "2e-05", "3e-05"]
    assert [label for _, label in R.log_ticks(0.005, 20)] == ["0.01", "0.1", "1", "10"]
    assert [v for v, _ in R.log_ticks(1.5, 9)] == [2, 5]
    assert len(R.log_ticks(2.1, 2.9)) == 2


def test_bar_chart_groups_and_signs():
    root = ET.fromstring(R.bar_chart(["ARO", "SugarCREPE", "Winoground"],
                                     {"before": [50.0, -2.0, 30.0], "after": [60.0, 4.0, math.nan]},
                                     "acc"))
    bars = [(r.get("data-series"), float(r.get("y")), float(r.get("height")))
            for r in root.iter(SVG + "rect") if r.get("data-series")]
    assert [b[0] for b in bars] == ["before", "after", "before", "after", "before"]  # NaN: no bar
    zero = bars[2][1]  # the negative bar hangs from the zero line
    assert bars[1][1] + bars[1][2] == pytest.approx(zero, abs=0.2)
    assert bars[0][2] < bars[1][2] and bars[2][2] > 0  # 50 is shorter than 60
    assert {"before", "after"} <= {t.text for t in root.iter(SVG + "text")}  # the legend


def test_to_pil_reads_every_form_and_undoes_normalisation():
    img = scene()
    ref = np.asarray(img).astype(int)
    forms = [img, np.asarray(img), np.asarray(img).transpose(2, 0, 1), np.asarray(img) / 255.0,
             torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255]
    for f in forms:
        assert np.abs(np.asarray(R.to_pil(f)).astype(int) - ref).max() <= 1
    x = to_tensor(img, CLIP_MEAN, CLIP_STD)
    back = R.to_pil(x, mean=CLIP_MEAN, std=CLIP_STD)
    assert np.abs(np.asarray(back).astype(int) - ref).max() <= 1
    wrong = R.to_pil(x)  # forgetting mean/std visibly breaks the picture
    assert np.abs(np.asarray(wrong).astype(int) - ref).max() > 50
    gray = R.to_pil(np.zeros((5, 7), np.uint8))
    assert gray.size == (7, 5) and gray.mode == "RGB"
    with pytest.raises(ValueError, match="not an image"):
        R.to_pil(np.zeros((4, 5, 6)))


def test_to_pil_keeps_a_uint8_tensor_in_0_255_and_shows_a_bool_mask():
    # torchvision.io.read_image gives (3, H, W) uint8: 200 stays 200, not 200.0 clipped to white
    img = scene()
    ref = np.asarray(img)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    assert (np.asarray(R.to_pil(t)) == ref).all()
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True  # a bool mask: black and white, as the same mask in floats
    for m in (mask, torch.from_numpy(mask)):
        assert set(np.unique(np.asarray(R.to_pil(m)))) == {0, 255}
    assert (np.asarray(R.to_pil(mask)) == np.asarray(R.to_pil(mask.astype(np.float32)))).all()


def decode(tag):
    src = re.search(r'src="data:image/\w+;base64,([^"]+)"', tag).group(1)
    return Image.open(io.BytesIO(base64.b64decode(src)))


def test_thumb_is_small_and_never_enlarged_in_the_file():
    big = scene(512).resize((512, 384))
    tag = R.thumb(big, size=128)
    assert decode(tag).size == (128, 96) and 'width="128" height="96"' in tag
    assert len(tag) < 12_000  # a few KB inline
    small = R.thumb(scene(64), size=128, alt=EVIL)
    assert decode(small).size == (64, 64) and 'width="128"' in small and 'class="px"' in small
    assert "<script>" not in small
    assert R.thumb(big, fmt="JPEG").startswith('<img src="data:image/jpeg')


def test_heatmap_colours_where_the_weights_are():
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    w = np.zeros((4, 4), np.float32)
    w[0, 3] = 5.0  # the top-right patch
    out = np.asarray(R.heatmap(img, w, alpha=0.5)).astype(int)
    assert out.shape == (64, 64, 3)
    hot, cold = out[:16, 48:].mean((0, 1)), out[48:, :16].mean((0, 1))
    assert hot.sum() > cold.sum() + 150  # pale yellow over the attended patch, dark elsewhere
    flat = np.asarray(R.heatmap(img, torch.from_numpy(w).flatten(), alpha=0.5)).astype(int)
    assert (flat == out).all()  # flat h*w weights are the same map, row by row as ViT patches
    assert (np.asarray(R.heatmap(img, np.ones((4, 4)), alpha=0.0)) == 128).all()  # the picture
    with pytest.raises(ValueError, match="square"):
        R.heatmap(img, np.ones(15))
    # a constant map has no spread: it is all "little attention" (COLORMAP[0] = (0, 0, 4)), not a division by 0;
    # half of grey 128 and half of (0, 0, 4) is (64, 64, 66) everywhere
    assert (np.asarray(R.heatmap(img, np.full((4, 4), 2.0))) == (64, 64, 66)).all()


def test_strip_puts_frames_side_by_side():
    frames = [scene(32, i) for i in range(3)] + [scene(64, 3)]
    s = R.strip(frames, gap=2)
    assert s.size == (4 * 32 + 3 * 2, 32)  # the 64-px frame scaled to the first one's height
    assert (np.asarray(s)[:, 32:34] == 255).all()  # the white gap
    assert (np.asarray(s)[:, :32] == np.asarray(frames[0])).all()


def test_caption_report_shows_16_image_cards_or_8_clip_strips(tmp_path):
    """caption_report: training curves, the results table and the first 16 predictions as cards (a clip's frames
    as one strip per card, the first 8); a picture smaller than 128 px is shown enlarged by a whole factor."""
    rows = [{"prediction": f"pred {i} {EVIL}", "target": [f"ref {i}", "another"]} for i in range(20)]
    for video, frames, want in ((False, [scene(64)], ((64, 64), 'width="128" height="128"')),
                                (True, [scene(32, k) for k in range(4)], ((4 * 32 + 3 * 2, 32),
                                                                           'width="536" height="128"'))):
        out = tmp_path / str(video)
        out.mkdir()
        write_metrics(out / "metrics.jsonl")
        path, secs = R.caption_report(str(out), "run", {"CIDEr": 95.9}, rows=rows, frames_of=lambda r: frames,
                                      video=video)
        n = 8 if video else 16
        info = R.read_report(path)
        assert info["sections"] == ["Training", "Results", "Video captions (test)" if video else "Captions (test)"]
        assert info["images"] == n and secs > 0
        page = open(path, encoding="utf-8").read()
        assert re.findall(r"pred (\d+) ", page) == [str(i) for i in range(n)]  # in order, the first n
        assert "<script>" not in page and "<td>CIDEr</td><td>95.9</td>" in page
        assert page.count("<b>references:</b> ref ") == n and ('<div class="grid">' in page) != video
        imgs = re.findall(r"<img[^>]*>", page)
        assert len(imgs) == n and all(want[1] in t and 'class="px"' in t and decode(t).size == want[0] for t in imgs)
    assert R.read_report(R.caption_report(str(tmp_path / "False"), "run", {}, rows=[])[0])["sections"] == [
        "Training", "Results"]


def test_disabled_report_writes_nothing_and_timing_counts_once(tmp_path):
    off = R.Report("x", enabled=False)
    off.section("a", R.text("b"))
    assert off.write(tmp_path) is None and off.sections == []
    assert not (tmp_path / "report.html").exists()
    rep = R.Report("x")
    with rep.timed():
        with rep.timed():
            rep.section("a", ["plain <b>", R.text("t")], None)
        inner = rep.seconds
        rep.write(tmp_path)  # write's own timing nests inside: counted once
    assert inner == 0 and rep.seconds > 0
    assert R.read_report(tmp_path / "report.html")["sections"] == ["a"]
    assert "<p>plain &lt;b&gt;</p>\n<p>t</p>" in (tmp_path / "report.html").read_text()


def test_read_report_finds_broken_parts(tmp_path):
    good = R.thumb(scene(), fmt="PNG")
    b64 = re.search(r'base64,([^"]+)', good).group(1)
    cut = R.Html(good.replace(b64, b64[:len(b64) // 8 * 4]))  # a PNG cut in half
    svg = R.Html('<svg xmlns="http://www.w3.org/2000/svg"><text>a<b</text></svg>')
    for part, msg in [(cut, "does not decode"), (R.Html('<img src="http://x/y.png">'), "inline"),
                      (svg, "not well-formed")]:
        rep = R.Report("broken")
        rep.section("s", part)
        with pytest.raises(ValueError, match=msg):
            R.read_report(rep.write(tmp_path))


def test_command_line_report_of_a_run_directory(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    results = {"coco": {"cider": 95.9, "bleu4": 0.31}, "note": EVIL}
    (tmp_path / "results.json").write_text(json.dumps(results))
    info = R.read_report(R.main([str(tmp_path)]))
    assert info["sections"] == ["Training curves", "Results"]
    assert info["svgs"] == 4  # loss terms (gates among them), lr, grad norm, eval pair
    page = (tmp_path / "report.html").read_text()
    assert "<td>coco/cider</td><td>95.9</td>" in page and "<script>" not in page


def test_command_line_without_a_run_directory_is_a_usage_error(tmp_path, capsys):
    """No RUN_DIR is argparse's usage message and exit status 2, not an IndexError; a RUN_DIR that
    is not a folder is one too (a mistyped path would get a new folder holding an empty page)."""
    for argv in ([], [str(tmp_path / "no-such-run")]):
        with pytest.raises(SystemExit) as e:
            R.main(argv)
        assert e.value.code == 2 and "usage: python -m common.report" in capsys.readouterr().err
    assert not (tmp_path / "no-such-run").exists()
