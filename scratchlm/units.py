"""Parsing the human-friendly quantities the CLI accepts ("10MB", "500k")."""

import re

from scratchlm.errors import ConfigError

_SIZE_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "kb": 10**3, "mb": 10**6, "gb": 10**9,
                  "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: str | int) -> int:
    """'10MB' -> 10_000_000, '1MiB' -> 1_048_576, '2500' -> 2500."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_SUFFIXES:
        raise ConfigError(f"{value!r} is not a size (examples: 2500, 500k, 10MB, 1MiB)")
    return int(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).lower()])


_DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | int | float) -> float:
    """'120s' -> 120.0, '5m' -> 300.0, '1.5h' -> 5400.0, 90 -> 90.0 (seconds)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _DURATION_UNITS:
        raise ConfigError(f"{value!r} is not a duration (examples: 90, 120s, 5m, 1.5h)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def parse_vocab_size(value: str) -> int | str:
    """A vocabulary size as a user writes it: a number, or "auto" (sized to the corpus)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{value!r} is not a number or 'auto'") from None
