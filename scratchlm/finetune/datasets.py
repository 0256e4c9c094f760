"""The data sets shipped inside the package (scratchlm/finetune/data/NAME.jsonl), found by name
so that an installed scratchlm, not only a checkout, can train on them:

    from scratchlm.finetune.datasets import shipped_dataset
    shipped_dataset("instructions_train")  # .../scratchlm/finetune/data/instructions_train.jsonl

On the command line `--data builtin:NAME` names the same files (`resolve_data_path`). They are
written by `python tools/make_datasets.py` (a development script, not installed), which says how each was made.
"""

import difflib
from pathlib import Path

from scratchlm.errors import ConfigError

SHIPPED_DIR = Path(__file__).with_name("data")
BUILTIN_PREFIX = "builtin:"


def shipped_datasets() -> list[str]:
    """Names of the shipped data sets, sorted: "instructions_train", "spam_eval", ..."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.jsonl"))


def shipped_dataset(name: str) -> Path:
    """The file of the shipped data set `name`; ConfigError listing the names when there is none."""
    names = shipped_datasets()
    if name in names:
        return SHIPPED_DIR / f"{name}.jsonl"
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"no shipped data set {name!r}{hint} (shipped: {', '.join(names) or 'none'})")


def resolve_data_path(value: str | Path) -> Path:
    """The shipped data set NAME for a value "builtin:NAME"; any other value as the path it is."""
    if isinstance(value, str) and value.startswith(BUILTIN_PREFIX):
        return shipped_dataset(value[len(BUILTIN_PREFIX) :])
    return Path(value)
