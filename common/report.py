"""Picture reports: one self-contained HTML page that shows what a run learned.

A report is one file, `<out_dir>/report.html`, that opens anywhere without a server or a network:
the style is inline CSS, images are inlined as base64 data URIs (small thumbnails), plots are
inline SVG drawn here from the run's metrics.jsonl. Pillow, numpy and the standard library only;
torch tensors are accepted wherever a picture or a weight map is.

    rep = Report("BLIP-2 stage 1", enabled=cfg.report and is_main)  # rank 0 only; others skip
    if rep.enabled:
        with rep.timed():  # rep.seconds: what building the report cost
            rep.section("Training", training_plots(os.path.join(cfg.out_dir, "metrics.jsonl")))
            rep.section("Captions", grid(card(thumb(x, mean=CLIP_MEAN, std=CLIP_STD),
                                              ("generated", gen), ("references", refs))
                                         for x, gen, refs in examples))
            rep.write(cfg.out_dir)

Every helper returns `Html`: a str that is already markup. Anything else that reaches the page (a
caption, a question, a key of metrics.jsonl) is text and is escaped, so a caption "<script>" read
from data stays text. `read_report(path)` parses a written page back and checks it (each script's
test uses it); `python -m common.report RUN_DIR` writes a curves-and-results report for any run.
"""
import argparse
import base64
import html
import io
import json
import math
import os
import re
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from html.parser import HTMLParser

import numpy as np
from PIL import Image


class Html(str):
    """Markup built by this module: it goes into the page as it is (any other str is escaped)."""


def esc(x):
    """Text -> escaped markup (Html passes through); floats: 4 significant digits (3 below 1e-3 or from 1e5)."""
    if isinstance(x, Html):
        return x
    if getattr(x, "ndim", None) == 0:  # a numpy or torch scalar
        x = x.item()
    return html.escape(_num(x) if isinstance(x, float) else str(x))


def _num(v):
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.4g}"


def text(*lines):
    """A paragraph of text, one line per argument."""
    return Html("<p>" + "<br>".join(esc(s) for s in lines) + "</p>")


def strong(x):
    """Bold text, e.g. the true caption in a table of hard negatives."""
    return Html(f"<b>{esc(x)}</b>")


# ------------------------------------------------------------------------------------- the page
CSS = """
body{font-family:system-ui,sans-serif;color:#222;max-width:1200px;margin:24px auto;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:8px 0}nav a{margin-right:14px}svg.plot{max-width:100%;height:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;margin:0;background:#fafafa}
.card.ok{border:2px solid #2ca02c}.card.bad{border:2px solid #d62728}
.card img{display:block;margin:0 auto 6px}.card p{margin:2px 0;font-size:13px}
img.px{image-rendering:pixelated}table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0}.cols{display:flex;gap:16px;flex-wrap:wrap}
.cols>div{flex:1;min-width:280px}footer{color:#888;font-size:12px;margin-top:24px}
"""


class Report:
    """A page of titled sections, written as one HTML file.

    `enabled=False` (a run with `--report false`, or any rank but 0) makes `section` and `write`
    do nothing; callers skip building the parts with `if rep.enabled:`, so then it costs nothing.
    """

    def __init__(self, title, enabled=True):
        self.title, self.enabled = str(title), bool(enabled)
        self.sections = []  # [(title, [Html, ...])]
        self.seconds = 0.0  # time spent inside `timed()` blocks and `write`
        self._depth = 0  # a timed() block inside another one counts once

    @contextmanager
    def timed(self):
        """Add the time spent in the block to `self.seconds` (a script logs what it cost)."""
        t0, self._depth = time.perf_counter(), self._depth + 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - t0

    def section(self, title, *parts):
        """Append a section. Parts: Html from the helpers (lists of them are flattened); a plain str
        becomes an escaped paragraph; None is left out."""
        if self.enabled:
            flat = [q for p in parts for q in (p if isinstance(p, (list, tuple)) else [p])]
            self.sections.append((str(title), [q if isinstance(q, Html) else text(q)
                                               for q in flat if q is not None]))
        return self

    def html(self):
        nav = " ".join(f'<a href="#s{i}">{esc(t)}</a>' for i, (t, _) in enumerate(self.sections))
        body = "\n".join(f'<section id="s{i}"><h2>{esc(t)}</h2>\n' + "\n".join(parts)
                         + "\n</section>" for i, (t, parts) in enumerate(self.sections))
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f"<title>{esc(self.title)}</title><style>{CSS}</style></head>\n"
                f"<body><h1>{esc(self.title)}</h1>\n<nav>{nav}</nav>\n{body}\n"
                f"<footer>written {stamp}; built in {self.seconds:.2f} s</footer></body></html>\n")

    def write(self, out_dir, name="report.html"):
        """Write `<out_dir>/<name>` atomically (temp file + rename); return its path (None when
        disabled). Its time counts in `seconds` too."""
        if not self.enabled:
            return None
        with self.timed():
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, name)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(self.html())
            os.replace(path + ".tmp", path)
        return path


# ------------------------------------------------------------------------------------- curves
def read_metrics(path):
    """metrics.jsonl (common/log.py) -> its records; lines cut by a kill and non-objects skipped."""
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)  # NaN and Infinity, as json.dumps writes them, read back
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                    records.append(rec)
    return records


def _scalars(rec):
    """The numeric fields of a record: not the step, wall time or markers; bools are no figures."""
    return {k: float(v) for k, v in rec.items() if k not in ("step", "time", "event")
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def curves(records):
    """Records -> {key: (steps, values)} by step; a step logged twice keeps its last value."""
    by_key = {}
    for rec in records:
        if "event" in rec:
            continue  # resume markers carry no figures
        for k, v in _scalars(rec).items():
            by_key.setdefault(k, {})[rec["step"]] = v
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by_key.items()}


def curves_from_metrics(path):
    """`<out_dir>/metrics.jsonl` -> {key: (steps, values)} for every scalar logged (NaN/inf kept:
    the plots skip them)."""
    return curves(read_metrics(path))


LR_KEYS = re.compile(r"^(lr|lr_.*|.*_lr)$")
SPEED_KEYS = {"ms_step", "samples_s", "tokens_s", "mfu", "bench_steps", "grad_norm"}


def training_plots(path, groups=None, log_loss=None):
    """The curves of a run, from its metrics.jsonl, as a list of Html parts:

    - loss terms: every key logged in the same records as the learning rate, except the lr, the
      grad norm and speed; one plot, on a log y axis when all are positive and span a factor of 5
      or more (`log_loss` True/False decides instead);
    - the learning rate; the gradient norm;
    - `groups`: {title: key prefix or list of keys}, one plot each (e.g. {"tanh gates": "gate_"});
      their keys leave the other plots;
    - eval figures (keys never logged with the lr): keys first logged in the same record share a
      plot, when logged at 2 or more steps; those logged at one step only go into a table.
    A dashed vertical line marks each resume.
    """
    records = read_metrics(path)
    if not records:
        return [text("no metrics logged")]
    cs = curves(records)
    resumes = [r["step"] for r in records if r.get("event") == "resume"]

    def plot(keys, title, log_y=False):
        return line_plot({k: cs[k] for k in keys}, title, log_y=log_y, marks=resumes)

    grouped = {title: [k for k in cs if k.startswith(sel)] if isinstance(sel, str)
               else [k for k in sel if k in cs] for title, sel in (groups or {}).items()}
    taken = {k for keys in grouped.values() for k in keys}
    logged = [list(_scalars(r)) for r in records if "event" not in r]  # the keys of each record
    train = {k for keys in logged if any(LR_KEYS.match(k) for k in keys) for k in keys} - taken
    lrs = [k for k in cs if LR_KEYS.match(k) and k not in taken]
    losses = [k for k in cs if k in train and k not in lrs and k not in SPEED_KEYS]
    out = []
    if losses:
        vals = [v for k in losses for v in cs[k][1] if math.isfinite(v)]
        auto = bool(vals) and min(vals) > 0 and max(vals) >= 5 * min(vals)
        out.append(plot(losses, "loss terms", auto if log_loss is None else log_loss))
    if lrs:
        out.append(plot(lrs, "learning rate"))
    if "grad_norm" in cs and "grad_norm" not in taken:
        out.append(plot(["grad_norm"], "gradient norm"))
    out += [plot(keys, title) for title, keys in grouped.items() if keys]
    evals, seen = [], train | taken | SPEED_KEYS
    for keys in logged:
        new = [k for k in keys if k not in seen]
        seen.update(new)
        if new:
            evals.append(new)
    once = []
    for keys in evals:
        several = [k for k in keys if len(cs[k][0]) > 1]
        once += [k for k in keys if len(cs[k][0]) == 1]
        if several:
            out.append(plot(several, ", ".join(several) if len(several) <= 3 else "eval figures"))
    if once:
        out.append(table([[k, cs[k][0][0], cs[k][1][0]] for k in once],
                         header=["figure", "step", "value"]))
    return out


# ------------------------------------------------------------------------------------- SVG plots
# matplotlib's "tab10": ten colours most readers tell apart
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
MAX_POINTS = 2000  # a longer series is thinned to every k-th point (and its last) in the polyline


def nice_ticks(lo, hi, n=6):
    """Round values inside [lo, hi]: the finest step of 1, 2 or 5 times a power of ten that gives
    at most n of them. Returns [(value, label)]."""
    if not hi > lo:
        return [(lo, f"{lo:g}")]
    mag = 10.0 ** (math.floor(math.log10(hi - lo)) - 1)
    for step in (m * mag * 10 ** e for e in range(3) for m in (1, 2, 5)):
        k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        if k1 - k0 + 1 <= n:
            break
    ticks = [k * step for k in range(k0, k1 + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if decimals <= 4:
        return [(t, f"{t:.{decimals}f}") for t in ticks]
    # tiny steps (a learning rate): as many significant digits as the step needs
    top = max(abs(t) for t in ticks) or step
    digits = max(1, math.floor(math.log10(top)) - math.floor(math.log10(step) + 1e-9) + 1)
    return [(t, f"{t:.{digits}g}") for t in ticks]


def log_ticks(lo, hi):
    """Round values for a log axis over [lo, hi] (both > 0): the decades when there are 3 or more,
    else 1-2-5 steps, else 1..9 steps, else the two ends."""
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ts = []
    for mults, enough in (((1,), 3), ((1, 2, 5), 2), (range(1, 10), 2)):
        ts = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in mults if lo <= m * 10.0 ** e <= hi]
        if len(ts) >= enough:
            break
    if len(ts) < 2:  # a narrow range inside one decade
        ts = [float(f"{lo:.2g}"), float(f"{hi:.2g}")]
    while len(ts) > 8:
        ts = ts[::2]
    return [(t, f"{t:g}") for t in ts]


def _span(lo, hi, pad=0.05):
    """A data range widened by `pad` of itself on each side (a constant gets a window around it)."""
    if not hi > lo:
        d = abs(lo) * 0.1 or 1.0
        return lo - d, hi + d
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def _svg(width, height, body):
    return Html(f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width:.0f}" '
                f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
                f'font-family="sans-serif" font-size="11">{body}</svg>')


def _legend(names, x, y):
    return "".join(f'<rect x="{x:.1f}" y="{y + 16 * i - 8}" width="10" height="10" '
                   f'fill="{PALETTE[i % 10]}"/><text x="{x + 14:.1f}" y="{y + 16 * i + 1}">'
                   f"{esc(n)}</text>" for i, n in enumerate(names))


def _ytick(x0, x1, y, label):
    return (f'<line x1="{x0}" x2="{x1:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')


def line_plot(series, title="", log_y=False, marks=(), xlabel="step", width=560, height=240):
    """{name: (xs, ys)} -> an SVG line plot (Html): a polyline per series, a legend when several.

    NaN/inf points are skipped (and points <= 0 on a log y axis); a one-point series is a dot, and
    a series of at most 12 points gets a dot on each. `marks`: x of dashed lines (resumes).
    """
    pts = {}
    for name, (xs, ys) in series.items():
        p = [(float(x), float(y)) for x, y in zip(xs, ys)
             if math.isfinite(y) and (y > 0 or not log_y)]
        if len(p) > MAX_POINTS:  # thin to every k-th point, keeping the last
            k = math.ceil(len(p) / MAX_POINTS)
            p = p[::k] + ([p[-1]] if (len(p) - 1) % k else [])
        pts[name] = p
    allp = [q for p in pts.values() for q in p]
    head = f'<text x="8" y="14" font-weight="bold">{esc(title)}</text>'
    if not allp:
        return _svg(width, 60, head + '<text x="8" y="40">no finite values</text>')
    legend_w = 24 + 6.5 * max(len(str(n)) for n in series) if len(series) > 1 else 10
    x0, y0, x1, y1 = 58, 24, width - legend_w, height - 34  # the plot area
    xlo, xhi = min(x for x, _ in allp), max(x for x, _ in allp)
    xlo, xhi = (xlo, xhi) if xhi > xlo else _span(xlo, xhi)
    ys = [y for _, y in allp]
    log_y = log_y and max(ys) > min(ys)  # a constant has no decades to show
    f = math.log10 if log_y else (lambda v: v)
    ylo, yhi = _span(f(min(ys)), f(max(ys)))
    yticks = log_ticks(10 ** ylo, 10 ** yhi) if log_y else nice_ticks(ylo, yhi)

    def px(x):
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y):
        return y1 - (f(y) - ylo) / (yhi - ylo) * (y1 - y0)

    out = [head, f'<rect x="{x0}" y="{y0}" width="{x1 - x0:.1f}" height="{y1 - y0}" fill="#fff" '
                 f'stroke="#ccc"/>']
    out += [_ytick(x0, x1, py(v), label) for v, label in yticks]
    out += [f'<text x="{px(v):.1f}" y="{y1 + 14}" text-anchor="middle">{label}</text>'
            for v, label in nice_ticks(xlo, xhi)]
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{height - 4}" text-anchor="middle">'
               f"{esc(xlabel)}</text>")
    for m in marks:
        if xlo <= m <= xhi:
            out.append(f'<line class="resume" x1="{px(m):.1f}" x2="{px(m):.1f}" y1="{y0}" '
                       f'y2="{y1}" stroke="#999" stroke-dasharray="4 3">'
                       f"<title>resumed at {m}</title></line>")
    for i, (name, p) in enumerate(pts.items()):
        c = PALETTE[i % 10]
        if len(p) > 1:
            xy = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in p)
            out.append(f'<polyline data-series="{esc(name)}" fill="none" stroke="{c}" '
                       f'stroke-width="1.5" points="{xy}"><title>{esc(name)}</title></polyline>')
        if len(p) <= 12:
            out += [f'<circle data-series="{esc(name)}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" '
                    f'fill="{c}"><title>{esc(name)} {_num(y)} at {x:g}</title></circle>'
                    for x, y in p]
    if len(series) > 1:
        out.append(_legend(list(series), x1 + 10, y0 + 8))
    return _svg(width, height, "".join(out))


def bar_chart(categories, series, title="", ylabel="", height=260):
    """Grouped bars: `series` {name: [a value per category]}, e.g. {"before": [...], "after":
    [...]} over benchmarks. A legend names the series, each bar shows its value, NaN draws none."""
    names, cats = list(series), [str(c) for c in categories]
    vals = [v for n in names for v in series[n] if math.isfinite(v)]
    lo, hi = min(vals + [0.0]), max(vals + [0.0])
    ylo = lo - 0.08 * (hi - lo) if lo < 0 else 0.0  # room for the value labels
    yhi = hi + 0.08 * (hi - lo) if hi > 0 else 0.0
    ylo, yhi = (ylo, yhi) if yhi > ylo else (-1.0, 1.0)  # all bars zero
    bar, gap = 18, 18
    group_w = bar * len(names) + gap
    longest = max(len(c) for c in cats)
    slant = longest * 6 > group_w  # long benchmark names are written at a slant
    # a slanted label (35 degrees, ~6 px a character) reaches left of its group and down
    reach = min(28, longest) * 6 * math.cos(math.radians(35)) - group_w / 2 + 8
    drop = min(28, longest) * 6 * math.sin(math.radians(35)) if slant else 0
    x0, y0, y1 = max(58, reach if slant else 0), 24, height - 20 - drop
    x1 = x0 + group_w * len(cats)
    width = x1 + (34 + 6.5 * max(len(n) for n in names) if len(names) > 1 else 20)

    def py(y):
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    mid = (y0 + y1) / 2
    out = [f'<text x="8" y="14" font-weight="bold">{esc(title)}</text>',
           f'<text x="12" y="{mid:.1f}" transform="rotate(-90 12 {mid:.1f})" '
           f'text-anchor="middle">{esc(ylabel)}</text>']
    out += [_ytick(x0, x1, py(v), label) for v, label in nice_ticks(ylo, yhi)]
    for j, cat in enumerate(cats):
        gx = x0 + j * group_w + gap / 2
        for i, n in enumerate(names):
            v = series[n][j]
            if not math.isfinite(v):
                continue
            top, base = py(max(v, 0.0)), py(min(v, 0.0))
            out.append(f'<rect data-series="{esc(n)}" x="{gx + i * bar:.1f}" y="{top:.1f}" '
                       f'width="{bar - 1}" height="{base - top:.1f}" fill="{PALETTE[i % 10]}">'
                       f"<title>{esc(cat)} / {esc(n)}: {_num(v)}</title></rect>"
                       f'<text x="{gx + (i + 0.5) * bar:.1f}" y="{top - 2:.1f}" font-size="8" '
                       f'text-anchor="middle">{v:.3g}</text>')
        label = esc(cat if len(cat) <= 28 else cat[:27] + "\u2026")
        cx, ly = gx + bar * len(names) / 2, y1 + 14
        turn = f' transform="rotate(-35 {cx:.1f} {ly:.1f})"' if slant else ""
        out.append(f'<text x="{cx:.1f}" y="{ly:.1f}" text-anchor="{"end" if slant else "middle"}"'
                   f"{turn}>{label}</text>")
    out.append(f'<line x1="{x0}" x2="{x1}" y1="{py(0.0):.1f}" y2="{py(0.0):.1f}" stroke="#444"/>')
    if len(names) > 1:
        out.append(_legend(names, x1 + 10, y0 + 8))
    return _svg(width, height, "".join(out))


# ------------------------------------------------------------------------------------- images
def to_pil(img, mean=None, std=None):
    """A picture in any form the scripts hold -> an RGB PIL image.

    A PIL image; an (H, W, 3) or (H, W) array, uint8 or float in [0, 1]; a (3, H, W) tensor or
    array in [0, 1], or normalised as common/image.to_tensor leaves it: then pass its mean and std;
    a uint8 one (torchvision.io.read_image's) in 0..255, as a uint8 array.
    """
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    is_tensor = hasattr(img, "detach")
    if is_tensor:  # floats as float32 (numpy has no bfloat16); integer tensors stay 0..255
        img = img.detach().cpu()
        a = (img.float() if img.is_floating_point() else img).numpy()
    else:
        a = np.asarray(img)
    if a.ndim == 3 and (is_tensor or (a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3))):
        a = a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if a.ndim == 2:
        a = a[:, :, None]  # (H, W) -> (H, W, 1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"not an image: shape {tuple(np.shape(img))}")
    if a.dtype.kind in "iu":  # integers (uint8 above all) are 0..255; a bool mask is 0.0 or 1.0
        a = np.clip(a, 0, 255).astype(np.uint8)
    else:
        a = a.astype(np.float32)
        if mean is not None:  # undo to_tensor's (x - mean) / std
            a = a * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
        a = np.round(np.clip(np.nan_to_num(a), 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(a, 3, axis=2) if a.shape[-1] == 1 else a)


def data_uri(pil, fmt="PNG", quality=85):
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumb(img, size=128, mean=None, std=None, alt="", fmt=None):
    """An <img> with the picture inlined (a few KB), shown `size` px on its longest side.

    The file holds at most `size` px, and a smaller picture is never enlarged in it: a 64-px toy
    image is stored at 64 px and shown at `size` with crisp pixels. PNG or JPEG, whichever is
    smaller (`fmt` forces one). `img`, mean, std: as `to_pil` takes them.
    """
    pil = to_pil(img, mean, std)
    if max(pil.size) > size:
        pil = pil.copy()
        pil.thumbnail((size, size), Image.BICUBIC)
    uri = min((data_uri(pil, f) for f in ([fmt] if fmt else ["PNG", "JPEG"])), key=len)
    scale = size / max(pil.size)
    w, h = round(pil.width * scale), round(pil.height * scale)
    px = ' class="px"' if scale > 1 else ""
    return Html(f'<img{px} src="{uri}" width="{w}" height="{h}" alt="{esc(alt)}">')


# Anchors of a dark blue -> purple -> red -> orange -> pale yellow map (close to matplotlib's
# "inferno"): dark for little attention, bright for much, still ordered when printed in grey.
COLORMAP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                    np.float32)


def colormap(v):
    """Values in [0, 1], any shape -> RGB floats in [0, 255] of shape (..., 3), interpolated."""
    x = np.clip(v, 0, 1) * (len(COLORMAP) - 1)
    i = np.minimum(x.astype(int), len(COLORMAP) - 2)
    t = (x - i)[..., None]
    return COLORMAP[i] * (1 - t) + COLORMAP[i + 1] * t


def heatmap(img, weights, alpha=0.5, mean=None, std=None, smooth=False):
    """Overlay an (h, w) attention map on a picture as a translucent coloured layer -> PIL image.

    `weights`: (h, w), or flat h*w with h == w; array or tensor; e.g. one Q-Former query's
    cross-attention over 16x16 patches (drop the CLS column first). Scaled to [0, 1] by its own
    min and max (the map shows where the query looks, not how sharply), coloured by COLORMAP and
    blended with `alpha`. Each patch is a block of colour; `smooth=True` upsamples bilinearly.
    """
    if hasattr(weights, "detach"):
        weights = weights.detach().float().cpu().numpy()
    w = np.nan_to_num(np.asarray(weights, np.float32))
    if w.ndim == 1:
        side = math.isqrt(w.size)
        if side * side != w.size:
            raise ValueError(f"{w.size} weights are not a square grid of patches: pass (h, w)")
        w = w.reshape(side, side)  # (h*w,) -> (h, w): ViTs flatten patches row by row
    span = w.max() - w.min()
    w = (w - w.min()) / span if span > 0 else np.zeros_like(w)
    pil = to_pil(img, mean, std)
    up = Image.fromarray(w).resize(pil.size, Image.BILINEAR if smooth else Image.NEAREST)
    mixed = (1 - alpha) * np.asarray(pil, np.float32) + alpha * colormap(np.asarray(up))
    return Image.fromarray(np.round(mixed).astype(np.uint8))


def strip(frames, height=None, gap=2, mean=None, std=None):
    """Video frames side by side -> one PIL image, each frame scaled to `height` (default: the
    first frame's) with a white gap. A (T, 3, H, W) tensor iterates over its frames."""
    pils = [to_pil(f, mean, std) for f in frames]
    height = height or pils[0].height
    pils = [p if p.height == height else
            p.resize((max(1, round(p.width * height / p.height)), height), Image.BICUBIC)
            for p in pils]
    out = Image.new("RGB", (sum(p.width for p in pils) + gap * (len(pils) - 1), height), "white")
    x = 0
    for p in pils:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


# ------------------------------------------------------------------------------------- layout
def _line(item):
    """A card line: text, Html (a table), or (label, value) where a list value is joined."""
    if isinstance(item, tuple) and len(item) == 2:
        label, value = item
        if isinstance(value, (list, tuple)):
            value = Html(" \u00b7 ".join(esc(v) for v in value))
        return f"<p><b>{esc(label)}:</b> {esc(value)}</p>"
    return item if isinstance(item, Html) else f"<p>{esc(item)}</p>"


def card(image, *lines, mark=None):
    """An image (Html from `thumb`, or None) over lines, e.g. ("generated", caption),
    ("references", [five captions]), a `table`. mark=True: a green frame (a hit), False: red."""
    cls = {True: "card ok", False: "card bad", None: "card"}[mark]
    return Html(f'<figure class="{cls}">{image or ""}' + "".join(map(_line, lines)) + "</figure>")


def frames_card(frames, *lines, height=128):
    """`card` of an image or a clip's frames (PIL, a strip of them) over lines: shown `height` px
    high at most, a smaller picture enlarged by a whole factor (crisp 64-px toy frames); JPEG, which
    `thumb` picks for frames and photos anyway, without its slower PNG try. frames=[]: no picture."""
    pic = strip(frames, height=min(height, frames[0].height)) if frames else None
    pic = thumb(pic, max(pic.size) * max(1, height // pic.height), fmt="JPEG") if frames else None
    return card(pic, *lines)


def caption_report(out_dir, title, metrics, groups=None, rows=(), frames_of=None, video=False):
    """<out_dir>/report.html of a captioning run -> (path, seconds it took): the training curves
    (`training_plots` of <out_dir>/metrics.jsonl with `groups`), the results table, and the first
    16 `rows` of a predictions file ({"prediction", "target", ...}) as cards of frames_of(row)
    (PIL frames) with the generated caption and the references; video=True: the first 8, each a
    strip of the clip's frames, one card a row (a strip takes the page's width)."""
    rep = Report(title)
    with rep.timed():
        rep.section("Training", training_plots(os.path.join(out_dir, "metrics.jsonl"), groups))
        rep.section("Results", table(metrics, header=["figure", "value"]))
        cards = [frames_card(frames_of(r), ("generated", r["prediction"]), ("references", r["target"]))
                 for r in rows[:8 if video else 16]]
        if cards:
            rep.section(f"{'Video c' if video else 'C'}aptions (test)", cards if video else grid(cards))
        path = rep.write(out_dir)
    return path, rep.seconds


def read_test_predictions(out_dir, image_root, num_frames, video):
    """(rows of <out_dir>/predictions_test.json, frames_of(row): the PIL frames the model saw of it,
    as sample_frames picks them; unreadable ones left out) for caption_report."""
    from common.image import load_image, sample_frames
    with open(os.path.join(out_dir, "predictions_test.json"), encoding="utf-8") as f:
        rows = json.load(f)

    def frames_of(r):
        paths = r["sample_path"] if video else [r["sample_path"]]
        return [x for x in (load_image(os.path.join(image_root, paths[j]))
                            for j in sample_frames(len(paths), num_frames)) if x is not None]
    return rows, frames_of


def grid(cards):
    """Cards side by side, wrapping at the page width."""
    return Html('<div class="grid">' + "".join(cards) + "</div>")


def columns(named):
    """{heading: Html} -> columns side by side, e.g. {"teacher": grid(..), "student": grid(..)}."""
    cols = "".join(f"<div><h3>{esc(k)}</h3>{v}</div>" for k, v in named.items())
    return Html(f'<div class="cols">{cols}</div>')


def table(rows, header=None):
    """A small table: rows of cells (text, numbers, or Html such as thumbs), or a dict shown as
    key / value rows (a nested dict, such as a script's results, as "outer/inner" keys)."""
    if isinstance(rows, dict):
        rows = _flatten(rows)
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return Html(f"<table>{head}{body}</table>")


def _flatten(d, prefix=""):
    """{"coco": {"cider": 95.9}} -> [("coco/cider", 95.9)]."""
    rows = []
    for k, v in d.items():
        rows += _flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else [(prefix + str(k), v)]
    return rows


# ------------------------------------------------------------------------------------- checking
class _Parser(HTMLParser):
    """Collects the h1 title, the h2 section titles, the <img> sources and a count of each tag."""

    def __init__(self):
        super().__init__()
        self.title, self.sections, self.images, self.tags, self._in = "", [], [], {}, None

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        elif tag in ("h1", "h2"):
            self._in = tag
            if tag == "h2":
                self.sections.append("")

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "h1":
            self.title += data
        elif self._in == "h2":
            self.sections[-1] += data


def read_report(path):
    """Parse a written report and check it: every <img> is an inline PNG/JPEG that PIL decodes,
    every <svg> is well-formed XML. Returns {"title", "sections": [titles], "images": n,
    "svgs": n, "tags": {tag: count}}; raises ValueError naming the first broken part."""
    with open(path, encoding="utf-8") as f:
        page = f.read()
    p = _Parser()
    p.feed(page)
    p.close()
    for i, src in enumerate(p.images):
        m = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
        if not m:
            raise ValueError(f"{path}: image {i} is not an inline PNG/JPEG: {src[:60]!r}")
        try:
            with Image.open(io.BytesIO(base64.b64decode(m.group(2), validate=True))) as im:
                im.load()
        except Exception as e:  # PIL raises several kinds for broken data
            raise ValueError(f"{path}: image {i} does not decode: {e}") from None
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    for i, s in enumerate(svgs):
        try:
            ET.fromstring(s)
        except ET.ParseError as e:
            raise ValueError(f"{path}: svg {i} is not well-formed XML: {e}") from None
    return {"title": p.title, "sections": p.sections, "images": len(p.images), "svgs": len(svgs),
            "tags": p.tags}


def main(argv=None):
    """`python -m common.report RUN_DIR`: the curves and results.json of any run, then a check.
    No RUN_DIR, or one that is not a folder, is a usage error (exit status 2), as argparse gives."""
    parser = argparse.ArgumentParser(prog="python -m common.report",
                                     description="Write RUN_DIR/report.html, a run's curves.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's folder (metrics.jsonl, ...)")
    run_dir = parser.parse_args(argv).run_dir
    if not os.path.isdir(run_dir):  # else the page would go into a new folder holding no run
        parser.error(f"{run_dir}: not a folder")
    rep = Report(f"run {os.path.basename(os.path.normpath(run_dir))}")
    with rep.timed():
        rep.section("Training curves", training_plots(os.path.join(run_dir, "metrics.jsonl")))
        res = os.path.join(run_dir, "results.json")
        if os.path.isfile(res):
            with open(res, encoding="utf-8") as f:
                rep.section("Results", table(json.load(f), header=["figure", "value"]))
        path = rep.write(run_dir)
    print(path, read_report(path)["sections"], f"{rep.seconds:.3f} s")
    return path


if __name__ == "__main__":
    main()
