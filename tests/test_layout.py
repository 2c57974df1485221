"""The house layout (README.md, "Layout"): line budgets of the method scripts, their reading order, and the import rule
(nothing under common/ or data/ imports a method script), and shared code opening text as UTF-8."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUDGETS = {"blip2_pformer.py": 1050, "dlip.py": 1150, "negclip.py": 800, "imagechat_warmup.py": 900,
           "perceiver_caption.py": 900}
SCRIPTS = sorted(BUDGETS)
# Not yet within budget (issue 16 open): both were cut to their method, shared plumbing and the tested features later
# issues asked for, and each is still 600-700 lines over. strict: the mark fails once a script fits, so it comes off.
OVER_BUDGET = {"blip2_pformer.py", "dlip.py"}
SECTIONS = ("Config", "Model", "Losses", "Data", "Eval", "Train")


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.xfail(
    strict=True, reason="over its line budget (issue 16)")) if s in OVER_BUDGET else s for s in SCRIPTS])
def test_line_budget(script):
    lines = (REPO / script).read_text(encoding="utf-8").splitlines()
    assert len(lines) <= BUDGETS[script], f"{script}: {len(lines)} lines, budget {BUDGETS[script]}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_line_width(script):
    lines = (REPO / script).read_text(encoding="utf-8").splitlines()
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 100]
    assert len(long) < 0.05 * len(lines), f"{script}: {len(long)} lines over 100 characters, e.g. {long[:5]}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_reading_order(script):
    """Docstring first (at most ~25 lines), then the sections in the house order, one banner style."""
    text = (REPO / script).read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc.splitlines()) <= 27, f"{script}: module docstring of {len(doc.splitlines())} lines"
    banners = re.findall(r"^# ={96} (\w[\w /()-]*)$", text, flags=re.M)
    order = [b for b in banners if b in SECTIONS]
    assert order == list(SECTIONS), f"{script}: sections {banners}"
    assert "main" in " ".join(banners[banners.index("Train"):]) or "def main(" in text.split("= Train")[-1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_comments_cite_papers_not_private_specs(script):
    text = (REPO / script).read_text(encoding="utf-8")
    assert not re.findall(r"\bspec\b(?:'s)? ?(?:section )?\d", text, flags=re.I), f"{script} cites a 'spec'"


def _imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_common_and_data_never_import_a_method_script():
    methods = {s[:-3] for s in SCRIPTS}
    files = sorted((REPO / "common").glob("*.py")) + sorted((REPO / "data").glob("*.py"))
    assert len(files) > 10
    bad = {str(f.relative_to(REPO)): sorted(set(_imports(f)) & methods) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_shared_code_opens_text_files_as_utf8():
    """Published annotations are UTF-8 (COCO and Image-Chat captions hold non-ASCII text); open() without an
    encoding uses the locale's, so a cp1252 machine read them as other characters or stopped on them."""
    files = sorted((REPO / "common").glob("*.py")) + sorted((REPO / "data").glob("*.py"))
    bad = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"):
                continue
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                  ast.Constant("r"))
            binary = isinstance(mode, ast.Constant) and "b" in mode.value
            if not binary and not any(k.arg == "encoding" for k in node.keywords):
                bad.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert len(files) > 10 and not bad, f"text files opened without encoding=: {bad}"
