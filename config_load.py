"""The machinery under the config dataclasses: how a field is declared, read, built and saved.

`opt` declares a field with its help text (and the CLI flag's name and --help panel when they
differ from the field's); `section` a nested section. `field_types` and `choices` read a
dataclass's fields as the CLI (cli.py) and the checks need them; `check_choices` refuses a value
outside a `Literal`. `build` makes a dataclass from a nested mapping, coercing each value to its
field's type (unknown keys and bad values are one-line `ConfigError`s); `load_file` reads a YAML or
TOML file, `parse_sets` the `--set key=value` overrides, and `resolve` applies them in order:
defaults < `--config FILE` < command-line flags < `--set`. `to_dict` and `dump_yaml` save a config.
Nothing here knows a setting: the dataclasses are in config.py and config_distill.py.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from dpal.errors import ConfigError

logger = logging.getLogger(__name__)

# keys renamed since older config files, `--set`s, store attributes and checkpoints spelled them:
# {config class: [(old key, new key, whether the old key's value is the renamed one)]}. Stage one's
# view section was `recipe` (a word `--recipe proteus` also uses) and K was `views`.
RENAMED: dict[str, list[tuple[str, str, Any]]] = {
    "CacheConfig": [
        ("views", "num_views", lambda v: isinstance(v, (int, str))),  # K; a mapping is the new section
        ("recipe", "views", lambda v: True),
    ],
    "DistillConfig": [("recipe_local_size", "local_size", lambda v: True)],
}

# the groups --help lists the options in (each field's `panel`)
PANEL_DATA = "Data and output"
PANEL_SCHEDULE = "Schedule"
PANEL_OPTIMISER = "Optimiser"
PANEL_METHOD = "Method"
PANEL_RECIPES = "Recipes and ablations"
PANEL_VALIDATION = "Validation"
PANEL_RUNTIME = "Runtime and distributed"
PANEL_TEACHER = "Teacher"
PANEL_VIEWS = "Views and targets"
PANEL_CONFIG = "Config file and overrides"


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = dataclasses.MISSING,
    flag: str | None = None,
    default_help: str | None = None,
    panel: str | None = None,
    choices: Any = None,
) -> Any:
    """A config field with its help text. `flag`: the CLI option's name when it is not the field's
    (`--slurm` for `use_slurm`); `default_help`: what --help says for a default computed at run time;
    `panel`: the group of options that --help lists it in (`PANEL_*`); `choices`: a function giving
    the allowed values of a `str` field whose choices are registered at run time (store codecs)."""
    meta = {"help": help, "flag": flag, "default_help": default_help, "panel": panel, "choices": choices}
    return field(default=default, default_factory=factory, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested config section: no option of its own, its keys are set with `--set name.key=value`."""
    return field(default_factory=cls, metadata={"help": help, "section": True})


# ---------------------------------------------------------------- field types and choices


def field_types(cls: type) -> dict[str, Any]:
    """{field name: its resolved type} of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` type (or of `Literal[...] | None`); None for any other type."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,):  # tuple[Literal[...], ...]
        return choices(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if (found := choices(a)) is not None:
                return found
    return None


def check_choices(cfg: Any) -> None:
    """Every `Literal` field of `cfg` (and every field with `opt`'s `choices`) holds one of its
    choices, however the config was built."""
    registered = {f.name: f.metadata.get("choices") for f in dataclasses.fields(cfg)}
    for name, tp in field_types(type(cfg)).items():
        allowed, value = choices(tp) or (registered[name] and registered[name]()), getattr(cfg, name)
        for v in value if isinstance(value, tuple) else (value,):
            if allowed is not None and v not in allowed and v is not None:
                raise ConfigError(f"{name} {v!r} is not one of {', '.join(map(str, allowed))}")
        if isinstance(value, tuple) and allowed is not None and len(set(value)) < len(value):
            raise ConfigError(f"{name} {list(value)} names one twice")


# ---------------------------------------------------------------- loading and overrides


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a parsed value (a YAML scalar, list or mapping, or a flag's text) to the field type `tp`.
    A text given for a number, list or mapping is read as YAML first."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), name)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping")
        return build(tp, value, prefix=name + ".")
    if origin is Literal or tp is str:
        return str(value)  # a Literal's choices are checked where the config is built (check_choices)
    if isinstance(value, str) and (origin in (dict, tuple) or tp in (int, float)):
        value = _yaml_value(value, name) if origin in (dict, tuple) else _number_text(value, name)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, e.g. {{depth: 2}}")
        return dict(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, str):
            value = [value]  # --set loggers=mlflow: a list of one
        if not isinstance(value, (list, tuple)):
            n = "" if len(args) == 2 and args[1] is Ellipsis else f" of {len(args)} values"
            raise ConfigError(
                f"{name} must be a list{n}: one YAML list such as [0.9, 0.95], or on the command line the "
                f"option once per value; got {value!r}"
            )
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{name} needs {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    if tp is bool:
        return _bool(value, name)
    if tp in (int, float):
        return _number(value, tp, name)
    return value


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # --set strict=1 arrives as YAML's int 1
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _number_text(text: str, name: str) -> Any:
    """A number's text as YAML reads it (1e3 stays text, which int() and float() then judge)."""
    value = _yaml_value(text, name)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def _number(value: Any, tp: type, name: str) -> int | float:
    what = "an integer" if tp is int else "a number"
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        v = tp(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(1e400), int(inf)
        raise ConfigError(f"{name} must be {what}, got {value!r}") from None
    if tp is int and isinstance(value, float) and value != v:
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return v


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) mapping; unknown keys raise ConfigError."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; known keys: {', '.join(prefix + k for k in types_)}"
        )
    kwargs = {k: _coerce(v, types_[k], _display_name(cls, k, prefix)) for k, v in values.items()}
    return cls(**kwargs)


def _display_name(cls: type, key: str, prefix: str) -> str:
    """A key as errors name it: with its flag where the flag is spelled otherwise (`num_views
    (--views)`), so that a user who typed either finds it."""
    flag = next((f.metadata.get("flag") for f in dataclasses.fields(cls) if f.name == key), None)
    return f"{prefix}{key} (--{flag})" if flag and flag != key else prefix + key


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists for tuples) for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def _yaml_value(text: str, where: str) -> Any:
    """`text` parsed as YAML; a syntax error is a one-line ConfigError naming `where` and the spot."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None


def load_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; give a YAML or TOML file")
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text (YAML or TOML expected)") from None
    if p.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    else:
        data = _yaml_value(text, f"config file {p}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values")
    return data


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    d[parts[-1]] = value


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """`key=value` strings -> nested mapping; values parsed as YAML (numbers, lists, true/false)."""
    out: dict[str, Any] = {}
    for s in sets:
        if "=" not in s:
            raise ConfigError(f"--set {s!r} must look like key=value")
        k, v = s.split("=", 1)
        _set_dotted(out, k.strip(), _yaml_value(v, f"--set {s}") if v.strip() else "")
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def upgrade_keys(cls: type, values: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """`values` with the keys of `cls` that RENAMED lists spelled the new way. `where` (the config
    file, `--set`): say each renamed key in one line; None: a saved config, upgraded silently."""
    out = dict(values)
    for old, new, applies in RENAMED.get(cls.__name__, ()):
        if old in out and applies(out[old]):
            value = out.pop(old)
            out[new] = _merge(value, out[new]) if isinstance(out.get(new), dict) else out.get(new, value)
            if where:
                logger.warning("%s: the key %r is now %r; read as %r (rename it)", where, old, new, new)
    return out


def stored_keys(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` (a `to_dict` of `cls`) spelled as before the renames in RENAMED, key order kept: how a
    store's `config` attribute records it, so that the store's attributes and their checksum stay
    what they were (the store's own attribute `recipe` keeps its name for the same reason)."""
    old_name = {new: old for old, new, _ in RENAMED.get(cls.__name__, ())}
    return {old_name.get(k, k): v for k, v in values.items()}


def resolve(cls: type, config_file: str | None, flags: dict[str, Any], sets: list[str]) -> Any:
    """Defaults < config file < flags given on the command line (not None) < --set. Keys renamed
    since (RENAMED) are read under their new names, with a note."""
    values = upgrade_keys(cls, load_file(config_file), f"config file {config_file}") if config_file else {}
    values = _merge(values, {k: v for k, v in flags.items() if v is not None})
    values = _merge(values, upgrade_keys(cls, parse_sets(sets), "--set"))
    return build(cls, values)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
