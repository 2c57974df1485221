"""The docs match the code. The commands they show run as written, as far as their command lines go: every
`python <script>.py ...` in README.md, docs/*.md, data/README.md and the scripts' own docstrings names only
flags that script has, with values of the right type, and a --mode / --stage that the README's script table
lists for it (or the field's default); running each is the toy tables' job. The same for data/toy.py and
data/convert.py through their argparse parsers. And the README's reading guide names definitions of each
script, in the order the file holds them."""
import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from common.config import parse_config

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("blip2_pformer", "dlip", "negclip", "perceiver_caption", "imagechat_warmup")
DOCS = [REPO / "README.md", REPO / "data" / "README.md", *sorted((REPO / "docs").glob("*.md")),
        *(REPO / f"{s}.py" for s in SCRIPTS)]
TOOLS = ("data/toy", "data/convert")  # argparse command lines (build_parser)
# a command ends at a newline, a closing backtick, a table cell's bar, or a following command
COMMAND = re.compile(r"\b(?:python3?|torchrun)\b[^\n`|]*?(?<![\w/])(" + "|".join(SCRIPTS + TOOLS) +
                     r")\.py([^\n`|;&]*)")


def commands():
    """(where, script, argv) of every documented command line of a method script or a data/ tool."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        text = ast.get_docstring(ast.parse(text)) if path.suffix == ".py" else text  # a script: its docstring
        logical, start, buf = [], 1, ""  # (first line number, the line with its continuations joined)
        for n, line in enumerate(text.splitlines(), 1):
            start = n if not buf else start
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            logical.append((start, buf + line))
            buf = ""
        for n, line in logical:
            for m in COMMAND.finditer(line):
                rest = re.sub(r"<[^>]*>", "X", m.group(2)).replace("[", " ").replace("]", " ")  # placeholders
                if "..." in rest:
                    continue  # an elided command ("torchrun ... x.py --preset paper ...")
                argv, tokens = [], shlex.split(rest, comments=True)
                for i, t in enumerate(tokens):  # "$C": a shell variable standing for several flags
                    if t.startswith("$") and not (i and tokens[i - 1].startswith("--")):
                        continue
                    argv.append(t)
                out.append((f"{path.relative_to(REPO)}:{n}", m.group(1), argv))
    return out


def readme_choices():
    """{script: {"mode" | "stage": allowed values}} from the README's script table."""
    out = {}
    for row in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        cells = re.split(r"(?<!\\)\|", row)  # a cell's own bars are escaped: \|
        m = re.fullmatch(r" `(\w+)\.py` ", cells[1]) if len(cells) > 3 else None
        if m:
            for flag, values in re.findall(r"--(mode|stage) ([\w \\|]+)", cells[-2]):
                out.setdefault(m.group(1), {}).setdefault(flag, set()).update(
                    v.strip() for v in values.replace("\\", "").split("|") if v.strip())
    return out


def test_the_docs_show_commands_of_every_script():
    found = commands()
    assert len(found) >= 60, len(found)
    for s in SCRIPTS:
        assert sum(script == s for _, script, _ in found) >= 3, s
    assert set(readme_choices()) == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_documented_commands_parse(script, capsys):
    module, choices = importlib.import_module(script), readme_choices()[script]
    bad = []
    for where, s, argv in commands():
        if s != script:
            continue
        try:
            cfg = parse_config(module.Config, module.PRESETS, argv)
        except SystemExit as e:  # argparse has printed why (an unknown preset: the exit's message)
            why = (capsys.readouterr().err.strip().splitlines() or [str(e)])[-1]
            bad.append(f"{where}: {' '.join(argv)}: {why}")
            continue
        for flag, allowed in choices.items():  # or the field's default (blip2's --mode run)
            if str(getattr(cfg, flag)) not in allowed | {str(getattr(module.Config, flag))}:
                bad.append(f"{where}: --{flag} {getattr(cfg, flag)} is not one of {sorted(allowed)}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("tool", TOOLS)
def test_documented_data_commands_parse(tool, capsys):
    """data/toy.py and data/convert.py: the flags exist, and every converter that a `{a,b,...}` list names
    (data/README's list of kinds) is one that convert.py has."""
    parser, bad, n = importlib.import_module(tool.replace("/", ".")).build_parser, [], 0
    for where, s, argv in commands():
        if s != tool:
            continue
        kinds = re.fullmatch(r"\{([\w,]+)\}", argv[0]) if argv else None
        for a in ([[k] + argv[1:] for k in kinds.group(1).split(",")] if kinds else [argv]):
            n += 1
            try:
                parser().parse_args(a)
            except SystemExit as e:  # --help exits with 0
                if e.code:
                    bad.append(f"{where}: {' '.join(a)}: {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert n >= 3 and not bad, (n, bad)


def reading_guide():
    """{script: [[names] per step]} of the README's reading guide: the definitions that hold each method's
    idea, in the steps (a -> b -> ...) a reader follows; a step's first name is the one read, others asides."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    guide = text[text.index("Reading guide"):text.index("## Quick start")]
    out = {}
    for item in re.split(r"\n- ", guide)[1:]:
        script, rest = re.match(r"`(\w+)\.py`:(.*)", item, flags=re.S).groups()
        depth, cuts = 0, [0]  # the arrows outside parentheses separate the steps
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0 and rest.startswith("->", i):
                cuts.append(i)
        parts = [rest[a:b] for a, b in zip(cuts, cuts[1:] + [len(rest)])]
        out[script] = [[n for n in re.findall(r"`([\w.]+)`", p) if not n.endswith(".py")] for p in parts]
    return out


def definitions(script):
    """{name: line} of the script's top-level functions and classes, and of their methods as Class.method."""
    out = {}
    for node in ast.parse((REPO / f"{script}.py").read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node.lineno
            for sub in node.body if isinstance(node, ast.ClassDef) else []:
                if isinstance(sub, ast.FunctionDef):
                    out[f"{node.name}.{sub.name}"] = sub.lineno
    return out


def test_reading_guide_names_definitions_in_reading_order():
    """Each script's guide: 3-6 steps, every name a definition of the script, the steps in the file's order
    (a reader going top to bottom meets them so)."""
    guide = reading_guide()
    assert set(guide) == set(SCRIPTS)
    for script, steps in guide.items():
        defs = definitions(script)
        assert 3 <= len(steps) <= 6 and all(steps), (script, steps)
        missing = [n for step in steps for n in step if n not in defs]
        assert not missing, f"README's reading guide names {missing}, which {script}.py does not define"
        lines = [defs[step[0]] for step in steps]
        assert lines == sorted(lines), f"{script}: the guide's steps {[s[0] for s in steps]} at lines {lines}"


def test_readme_layout_names_every_common_module():
    """The README's layout lists what common/ holds: each module, and no module that is gone."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):text.index("## Conventions")]
    common = layout[layout.index("common/"):layout.index("bench/")]
    named = set(re.findall(r"\b(\w+)\.py\b", common))
    present = {p.stem for p in (REPO / "common").glob("*.py")} - {"__init__"}
    assert named == present, f"README names {sorted(named - present)} not in common/; omits {sorted(present - named)}"
