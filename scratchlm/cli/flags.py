"""Command-line flags made from a config dataclass: one flag per field, so a field added to the
config is a flag of every command built on it, and the config stays the one list of settings.

A field `lora_rank: int = 8` becomes `--lora-rank LORA_RANK` (type int); `x: int | None`
becomes `--x` of type int (None stays the config's default); a `Literal` field gets its values
as choices; a bool field that defaults to False is a switch `--name`, one that defaults to True
is `--no-name` (either way, giving the flag flips the default). Every flag defaults to "not given" (argparse.SUPPRESS), so `given_flags` returns
only what the user typed and a recipe's values are not overwritten by the flags' defaults.
"""

import argparse
import dataclasses
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from scratchlm.cli.common import argument_type
from scratchlm.config import convert


@dataclass(frozen=True)
class Flag:
    """How one field reads on the command line. `help` may hold "{default}": the field's default
    in the dataclass the flag is made for (so a subclass's own default shows)."""

    help: str
    name: str | None = None  # the flag, when not --field-name (or --no-field-name)
    metavar: str | None = None
    choices: tuple | None = None


def add_config_flags(parser: argparse.ArgumentParser, cls: type, flags: Mapping[str, Flag | str],
                     skip: Collection[str] = ()) -> None:
    """A flag on `parser` for each field of dataclass `cls` not in `skip`, in field order, read
    as `flags` says (a plain string is the help); a field `flags` does not know still gets a
    flag, with the field's metadata["help"] or its name as help."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        spec = flags.get(field.name) or field.metadata.get("help") or field.name.replace("_", " ") + " (default: {default})"
        spec = Flag(spec) if isinstance(spec, str) else spec
        _add_field_flag(parser, field, hints[field.name], spec)


def given_flags(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` whose flags were given on the command line, with their values."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(cls) if hasattr(args, field.name)}


def _add_field_flag(parser: argparse.ArgumentParser, field: dataclasses.Field, annotation: Any, spec: Flag) -> None:
    default = _default(field)
    help_text = spec.help.replace("{default}", _default_text(default))
    common = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
    if annotation is bool:
        name = spec.name or ("--no-" if default is True else "--") + field.name.replace("_", "-")
        parser.add_argument(name, action="store_false" if default is True else "store_true", **common)
        return
    name = spec.name or "--" + field.name.replace("_", "-")
    base = _without_none(annotation)
    choices = spec.choices or (typing.get_args(base) if typing.get_origin(base) is typing.Literal else None)
    if choices is not None:
        parser.add_argument(name, choices=list(choices), metavar=spec.metavar, **common)
    elif base in (int, float, str):  # argparse's own types, for its usual messages
        parser.add_argument(name, type=base, metavar=spec.metavar, **common)
    else:  # anything else as the config loader reads a --set value
        parser.add_argument(name, type=argument_type(lambda value: convert(value, annotation, name)),
                            metavar=spec.metavar, **common)


def _without_none(annotation: Any) -> Any:
    """`int | None` -> int; anything else as it is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        if len(options) == 1:
            return options[0]
    return annotation


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _default_text(value: Any) -> str:
    if value is None:
        return "none"
    return format(value, "g") if isinstance(value, float) else str(value)
