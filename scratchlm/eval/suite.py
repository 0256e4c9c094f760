"""What `scratchlm eval` and `scratchlm compare` measure when told nothing: the builtin tasks
and bits per byte on the embedded corpus's held-out documents. Both exist offline on every
machine. The held-out text is text the quickstart model never trained on; the builtin tasks are
sentences of CPython's documentation, most of which the quickstart did train on, so they measure
what a model learned of that prose rather than generalisation to new text."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scratchlm.eval.tasks import builtin_tasks

BUILTIN = "builtin"  # in a task list: every builtin task

DEFAULT_TEXT_BYTES = 50_000  # ~12k tokens: a 135M model scores it in about a minute on 2 CPU cores
DEFAULT_TEXT_NAME = "embedded validation text"


def default_text(max_bytes: int = DEFAULT_TEXT_BYTES) -> str:
    from scratchlm.data.tokenize import embedded_validation_text

    return embedded_validation_text(max_bytes=max_bytes)


def default_tasks() -> list[str]:
    return builtin_tasks()


@dataclass(frozen=True)
class Suite:
    """What one evaluation measures: task files or builtin task names, and a text to score."""

    tasks: list[str]
    text: str | Path | None
    default: bool  # nothing was asked for, so this is the offline default suite


def choose_suite(tasks: Sequence[str] = (), text: str | Path | None = None, shards: str | Path | None = None) -> Suite:
    """The tasks and text asked for, with "builtin" standing for every builtin task; when none
    of tasks, text and shards is asked for, the builtin tasks and the embedded held-out text."""
    chosen = [t for t in tasks if t != BUILTIN] + (default_tasks() if BUILTIN in tasks else [])
    if not chosen and text is None and shards is None:
        return Suite(default_tasks(), default_text(), default=True)
    return Suite(chosen, text, default=False)
