"""What `scratchlm eval` and `scratchlm compare` measure when told nothing: the builtin tasks
and bits per byte on the embedded corpus's held-out documents. Both exist offline on every
machine. The held-out text is text the quickstart model never trained on; the builtin tasks are
sentences of CPython's documentation, most of which the quickstart did train on, so they measure
what a model learned of that prose rather than generalisation to new text."""

from scratchlm.eval.tasks import builtin_tasks

DEFAULT_TEXT_BYTES = 50_000  # ~12k tokens: a 135M model scores it in about a minute on 2 CPU cores
DEFAULT_TEXT_NAME = "embedded validation text"


def default_text(max_bytes: int = DEFAULT_TEXT_BYTES) -> str:
    from scratchlm.data.tokenize import embedded_validation_text

    return embedded_validation_text(max_bytes=max_bytes)


def default_tasks() -> list[str]:
    return builtin_tasks()
