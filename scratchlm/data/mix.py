"""Mixing sources by weight, and the stable train/validation split.

A source's weight is its share of the training mixture, measured in bytes of kept text. The
mixture has the size of all kept training text unless `train_bytes` says otherwise, so a source
whose share is above its natural one is up-sampled (repeated, more than one epoch) and one below
is down-sampled (a fraction of an epoch). Which documents repeat is decided by a hash of the
document and the seed: the same run always picks the same ones, and a fractional epoch takes a
uniform sample of the source rather than its first files.

The split comes first and ignores weights: validation holds each of its documents once, so it
measures the data as it is, not as mixed.
"""

import math

import numpy as np

from scratchlm.errors import ConfigError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads structured keys over 64 bits


def unit_interval(hashes: np.ndarray, seed: int) -> np.ndarray:
    """A number in [0, 1) per 64-bit hash, different for each seed."""
    mixed = (np.asarray(hashes, dtype=np.uint64) ^ np.uint64(seed & (2**64 - 1))) * _GOLDEN
    mixed ^= mixed >> np.uint64(29)
    mixed *= _GOLDEN
    return (mixed >> np.uint64(11)).astype(np.float64) / 2.0**53


def is_validation(hashes: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """The train/val split by a hash of each document's text: stable across runs, and exact
    copies always land on the same side."""
    return unit_interval(hashes, seed) < val_fraction


def source_epochs(kept_bytes: dict[str, int], weights: dict[str, float | None], train_bytes: int | None = None) -> dict[str, float]:
    """How many times each source is seen in the training mixture.

    With no weights, every source is used once (its natural share). With weights (all sources
    must have one), source s gets `weight_s / sum(weights)` of the mixture's bytes.
    """
    given = {name: w for name, w in weights.items() if w is not None}
    if not given:
        if train_bytes is None:
            return {name: 1.0 for name in kept_bytes}
        given = {name: float(size) for name, size in kept_bytes.items()}
    missing = sorted(set(weights) - set(given))
    if missing and len(given) != len(kept_bytes):
        raise ConfigError(f"mixture: give a weight to every source or to none (no weight on: {', '.join(missing)})")
    total_weight = sum(given.values())
    total = train_bytes if train_bytes is not None else sum(kept_bytes.values())
    epochs = {}
    for name, size in kept_bytes.items():
        share = given[name] / total_weight
        epochs[name] = share * total / size if size else 0.0
    return epochs


def repeats(hashes: np.ndarray, epochs: float, seed: int) -> np.ndarray:
    """Copies of each document for `epochs` passes over its source: floor(epochs) for every
    document, plus one more for a hash-chosen `epochs - floor(epochs)` share of them."""
    whole = math.floor(epochs)
    extra = unit_interval(hashes, seed + 1) < (epochs - whole)
    return whole + extra.astype(np.int64)
