"""Config = one dataclass per script; presets = small dicts of overrides; CLI = `--key value` per field.

    cfg = parse_config(Config, PRESETS, argv)   # --preset toy|paper first, then --key value overrides

Booleans parse true/false (also 1/0, yes/no); list fields take comma-separated values; unknown keys are errors.
No YAML, no registries: the dataclass is the single source of truth for what a run can set.
"""
import argparse
import dataclasses
import json
import os
import typing


def _parse_bool(s):
    v = str(s).strip().lower()
    if v in ("true", "1", "yes", "y", "on"):
        return True
    if v in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _named(fn, name):
    """argparse names a parser in its error ("invalid float value: 'abc'"): a lambda would read "<lambda>"."""
    fn.__name__ = name
    return fn


def _caster(tp):
    """Turn a dataclass field type into a str -> value parser."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        base = _caster(inner)
        return _named(lambda s: None if s.lower() in ("none", "null") else base(s), f"{base.__name__} (or none)")
    if tp is bool:
        return _parse_bool
    if origin in (list, tuple):
        item = _caster(args[0]) if args else str
        return _named(lambda s: [item(x) for x in s.split(",") if x != ""], f"comma-separated {item.__name__}")
    if tp in (int, float, str):
        return tp
    raise TypeError(f"unsupported config field type {tp}")


def parse_config(cls, presets, argv=None, description=None):
    """Build `cls` from defaults <- presets[--preset] <- command-line `--key value` overrides."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls)]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="toy")
    known, _ = pre.parse_known_args(argv)
    if known.preset not in presets:
        raise SystemExit(f"unknown preset {known.preset!r}; choose from {sorted(presets)}")
    overrides = dict(presets[known.preset])
    bad = set(overrides) - {f.name for f in fields}
    if bad:
        raise ValueError(f"preset {known.preset!r} sets unknown fields {sorted(bad)}")

    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    if "preset" not in {f.name for f in fields}:
        parser.add_argument("--preset", default=known.preset, help=f"one of {sorted(presets)}")
    for f in fields:
        default = overrides.get(f.name, f.default if f.default is not dataclasses.MISSING else
                                (f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
        if f.name == "preset":
            default = known.preset
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        parser.add_argument(f"--{f.name}", type=_caster(hints[f.name]), default=default,
                            help=f"(default: {shown})", metavar=f.name.upper())
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields}
    return cls(**values)


def given_flags(argv=None):
    """The field names set on the command line (argv; None: sys.argv[1:]): what a preset's recipe or a
    checkpoint's saved config must not override."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    return {str(a)[2:].split("=")[0] for a in argv if str(a).startswith("--")}


def asdict_config(cfg):
    return dataclasses.asdict(cfg)


def save_config(cfg, run_dir):
    """Write the resolved config as JSON (run_dir/config.json) and return it as a dict."""
    os.makedirs(run_dir, exist_ok=True)
    d = asdict_config(cfg)
    tmp = os.path.join(run_dir, "config.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, "config.json"))
    return d


def check_choices(cfg, **choices):
    """A one-line ValueError for a field outside its choices: check_choices(cfg, mode="train|test")."""
    for name, ok in choices.items():
        if getattr(cfg, name) not in ok.split("|"):
            raise ValueError(f"--{name} must be {ok}, got {getattr(cfg, name)!r}")


def format_config(cfg):
    return "\n".join(f"  {k} = {v!r}" for k, v in asdict_config(cfg).items())
