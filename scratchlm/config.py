"""The one config loader: TOML files and `key=value` overrides into dataclasses.

Unknown keys are errors that name the key and the closest valid one; values are converted to
the field's type ("3e-4" -> float, "true" -> bool), so a recipe and the command line behave
the same.
"""

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from scratchlm.errors import ConfigError, InputFileError

T = TypeVar("T")

# Names a config field may take that more than one stage checks, kept here because this module
# imports no torch: the command line builds its flags from configs that check them.
# The precisions a user may name; `devices.TORCH_DTYPES` maps each but "auto" (decided per device
# by `devices.autocast_dtype`) to its torch dtype.
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# How a classifier pools the hidden states (scratchlm/model/classifier.py).
Pooling = Literal["last", "mean"]
POOLINGS = ("last", "mean")


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: no such config file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None


def parse_overrides(items: list[str]) -> dict:
    """["lr=3e-4", "model_config.n_layer=6"] -> {"lr": "3e-4", "model_config": {"n_layer": "6"}}."""
    result: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        node = result
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return result


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, flags: dict | None = None) -> T:
    """Dataclass `cls` from its defaults, then `base`, then the TOML `recipe`, then `--set
    key=value` `overrides`, then `flags` (the values a command's own flags were given: a flag
    names one key, so it wins over a general --set of that key). An unknown key is one error
    naming the key and where it came from (the recipe file or --set)."""
    data = dict(base or {})
    if recipe is not None:
        from_file = load_toml(recipe)
        check_keys(cls, from_file, str(recipe))
        check_tables(cls, from_file, str(recipe))
        data = merge(data, from_file)
    from_cli = parse_overrides(overrides or [])
    check_keys(cls, from_cli, "--set")
    check_tables(cls, from_cli, "--set")
    data = merge(merge(data, from_cli), flags or {})
    return build(cls, data, str(recipe) if recipe is not None else "config")


def check_keys(cls: type, data: dict, where: str) -> None:
    """Refuse a key `cls` does not have, naming the closest one that exists."""
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def check_tables(cls: type, data: dict, where: str) -> None:
    """Check the tables of `data` that are dataclasses of their own ([parallel]) where they come
    from, so that a wrong key or value under --set is blamed on --set, not on the recipe file."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(hints.get(key)):
            build(hints[key], value, f"{where}: {key}")


def build(cls: type[T], data: dict, where: str = "config") -> T:
    """Instantiate dataclass `cls` from `data`, converting values and refusing unknown keys."""
    check_keys(cls, data, where)
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: convert(value, hints[key], f"{where}: {key}") for key, value in data.items()})


def convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert a TOML value or a command-line string to `annotation`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in options):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, allowed))}, not {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        try:
            number = annotation(float(value)) if annotation is int and isinstance(value, str) and "e" in value.lower() else annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {'an integer' if annotation is int else 'a number'}, not {value!r}") from None
        if annotation is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        return number
    if annotation is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, not {value!r}")
        return str(value)
    if dataclasses.is_dataclass(annotation):  # a table of its own: [parallel] in TOML, parallel.tp=2 with --set
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table of key = value")
        return build(annotation, value, where)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table of key = value")
        return dict(value)
    return value
