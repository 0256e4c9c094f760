"""Generate the builtin tasks (scratchlm/eval/builtin/*.jsonl) from CPython's own documentation.

    python tools/make_builtin_tasks.py [--out FOLDER]

The source is `pydoc_data.topics`, the English reference pages behind `help()`, present offline
in every Python; most of it is in the quickstart's training text (scratchlm/text/embedded.py),
so the tasks ask whether a small model learned its training prose. A five-minute quickstart model
scores 0.61 on the cloze and 0.42 on the continuation (chance 0.25), where benchmarks like
HellaSwag sit at chance for every model this small.

Only prose sentences are used: letters, spaces and light punctuation, 8 to 30 words, no quotes
(pydoc writes code literals in double quotes), no parentheses, digits or symbols, no doubled
sentences. The generator is deterministic (fixed seeds, corpus order, ties broken by the word),
and the files it writes are committed, so every Python version evaluates the same examples; each
header records the SHA-256 of the topics text it was made from, and a test regenerates the files
when the installed Python's topics match that hash.
"""

import argparse
import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scratchlm.atomic_io import write_text_atomic
from scratchlm.text.embedded import pydoc_topics
from scratchlm.eval.tasks import BUILTIN_DIR

SEED = 1729
EXAMPLES_PER_TASK = 150
MIN_WORDS, MAX_WORDS = 8, 30
N_CHOICES = 4
SOURCE = "CPython's pydoc_data.topics (the reference text behind help())"

_PROSE = re.compile(r"[A-Z][A-Za-z ,;'-]*[a-z]\.")  # starts with a capital, ends "word.", nothing code-like
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"\b[a-z]+\b")  # lowercase words: names and acronyms are left out
# Rough word classes by ending, so a distractor is grammatically like the true word: a cloze of
# "...is called" against "functions" would be solved by syntax alone.
_SUFFIXES = ("ing", "ed", "ly", "tion", "sion", "ment", "ness", "able", "ible", "ity", "al", "ive", "ous", "es", "s", "er")


def topics_sha256(topics: Sequence[str]) -> str:
    return hashlib.sha256("\n\n".join(topics).encode("utf-8")).hexdigest()


def _join_wrapped(lines: Sequence[str]) -> str:
    """Undo the line wrapping of a paragraph. The wrapper breaks hyphenated words after the
    hyphen ("comma-" / "separated"), and those must not gain a space."""
    text = ""
    for line in lines:
        text += line if not text or re.search(r"[A-Za-z]-$", text) else " " + line
    return text


def _all_prose(topics: Sequence[str]):
    """Every prose sentence of the topics, any length, repeats included, in corpus order."""
    for doc in topics:
        for paragraph in re.split(r"\n\s*\n", doc):
            lines = [line.strip() for line in paragraph.splitlines()]
            if any(line.startswith((">>>", "...", "$")) for line in lines):  # interactive examples
                continue
            for sentence in _SENTENCE_BREAK.split(_join_wrapped(lines)):
                if _PROSE.fullmatch(sentence := sentence.strip()):
                    yield sentence


def prose_sentences(topics: Sequence[str]) -> list[str]:
    """Distinct prose sentences of MIN_WORDS to MAX_WORDS words, in corpus order."""
    return list(dict.fromkeys(s for s in _all_prose(topics) if MIN_WORDS <= len(s.split()) <= MAX_WORDS))


def prose_word_counts(topics: Sequence[str]) -> Counter:
    """Counts of the lowercase words of prose: distractors drawn from all the text would include
    identifiers such as "stopiteration" that appear only in code, and give themselves away."""
    return Counter(word for sentence in _all_prose(topics) for word in _WORD.findall(sentence))


def word_class(word: str) -> str:
    return next((suffix for suffix in _SUFFIXES if word.endswith(suffix)), "")


# ---- the four tasks ------------------------------------------------------------------------
def cloze_examples(sentences: Sequence[str], frequency: Counter, rng: random.Random) -> list[dict[str, Any]]:
    """The sentence without its last word; choices: that word and three of the same class,
    similar length and similar corpus frequency, so neither grammar nor word frequency alone
    gives the answer away."""
    vocabulary = sorted(w for w, count in frequency.items() if count >= 3 and len(w) >= 3)
    examples = []
    for sentence in sentences:
        words = sentence[:-1].split()
        target = words[-1]
        if not re.fullmatch(r"[a-z]{3,}", target):
            continue
        in_sentence = {w.lower().strip(",;") for w in words}
        candidates = [
            w for w in vocabulary
            if word_class(w) == word_class(target) and abs(len(w) - len(target)) <= 2
            and w[:4] != target[:4] and w not in in_sentence
        ]
        log_f = math.log(max(frequency[target], 1))
        candidates.sort(key=lambda w: (abs(math.log(frequency[w]) - log_f), w))
        if len(candidates) < 2 * (N_CHOICES - 1):
            continue
        choices = [target, *rng.sample(candidates[: 3 * (N_CHOICES - 1)], N_CHOICES - 1)]
        rng.shuffle(choices)
        examples.append({"context": " ".join(words[:-1]), "choices": choices, "label": choices.index(target)})
    return examples


def continuation_examples(sentences: Sequence[str], rng: random.Random) -> list[dict[str, Any]]:
    """HellaSwag-style: the first half of a sentence; choices: its second half and the second
    halves of three other sentences of about the same length in characters."""
    halves = []
    for sentence in sentences:
        words = sentence.split()
        if len(words) >= 10:
            cut = len(words) // 2
            halves.append((" ".join(words[:cut]), " ".join(words[cut:])))
    examples = []
    for first, second in halves:
        others = sorted({s for _, s in halves if s != second}, key=lambda s: (abs(len(s) - len(second)), s))
        choices = [second, *rng.sample(others[: 4 * (N_CHOICES - 1)], N_CHOICES - 1)]
        rng.shuffle(choices)
        examples.append({"context": first, "choices": choices, "label": choices.index(second)})
    return examples


def completion_examples(sentences: Sequence[str]) -> list[dict[str, Any]]:
    """The first two thirds of a sentence; the answer is the rest, without the final period
    (the task stops generating at "."), at least two words. A single newline does not stop
    generation: pydoc's text is wrapped at 70 columns, so a model trained on it breaks lines
    mid-sentence, and the metrics treat a newline as a space."""
    examples = []
    for sentence in sentences:
        words = sentence[:-1].split()
        keep = len(words) - max(2, len(words) // 3)
        examples.append({"prompt": " ".join(words[:keep]), "answer": " ".join(words[keep:])})
    return examples


def shuffled_sentence(sentence: str, rng: random.Random) -> str | None:
    """The sentence's words in a random order, capitalised as a sentence (so the capital letter
    does not mark the original first word); None if the shuffle cannot change it."""
    words = sentence[:-1].split()
    if words[0][0].isupper() and words[0][1:].islower():
        words[0] = words[0].lower()
    original = list(words)
    for _ in range(10):
        rng.shuffle(words)
        if words != original:
            return " ".join([words[0][0].upper() + words[0][1:], *words[1:]]) + "."
    return None


def real_or_shuffled_examples(sentences: Sequence[str], rng: random.Random) -> list[dict[str, Any]]:
    """Half the sentences as written, half with their words shuffled, in a random order."""
    examples = []
    for n, sentence in enumerate(sentences):
        if n % 2 == 0:
            examples.append({"text": sentence, "label": "real"})
        elif (shuffled := shuffled_sentence(sentence, rng)) is not None:
            examples.append({"text": shuffled, "label": "shuffled"})
    rng.shuffle(examples)
    return examples


# ---- files ---------------------------------------------------------------------------------
def _pick(sentences: Sequence[str], rng: random.Random, n: int) -> list[str]:
    return rng.sample(list(sentences), min(n, len(sentences)))


def _task_file(header: dict[str, Any], examples: list[dict[str, Any]], prefix: str) -> str:
    lines = [{"task": header}] + [{"id": f"{prefix}-{n:03d}", **example} for n, example in enumerate(examples)]
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


def build_builtin_tasks(topics: Sequence[str] | None = None) -> dict[str, str]:
    """File name -> content of every builtin task, from `topics` (the installed Python's when None)."""
    topics = pydoc_topics() if topics is None else list(topics)
    sentences = prose_sentences(topics)
    frequency = prose_word_counts(topics)
    metadata = {"generator": "python tools/make_builtin_tasks.py", "seed": SEED,
                "pydoc_topics_sha256": topics_sha256(topics)}

    def header(name: str, kind: str, description: str, **options: Any) -> dict[str, Any]:
        return {"name": name, "kind": kind, "description": description, **options, "source": SOURCE, "metadata": metadata}

    rng = random.Random(SEED)
    cloze = cloze_examples(sentences, frequency, rng)
    continuation = continuation_examples(sentences, rng)
    files = {
        "python-docs-cloze": (
            header("python-docs-cloze", "multiple_choice",
                   "Pick the last word of a sentence from the Python documentation among 4 words of the same kind and frequency."),
            _pick(cloze, rng, EXAMPLES_PER_TASK), "cloze"),
        "python-docs-continuation": (
            header("python-docs-continuation", "multiple_choice",
                   "HellaSwag-style: pick the true second half of a Python documentation sentence among 4 of similar length."),
            _pick(continuation, rng, EXAMPLES_PER_TASK), "continuation"),
        "python-docs-completion": (
            header("python-docs-completion", "generation",
                   "Complete the last third of a Python documentation sentence; greedy, up to the period.",
                   max_new_tokens=32, stop=[".", "\n\n"]),
            completion_examples(_pick(sentences, rng, EXAMPLES_PER_TASK)), "completion"),
        "python-docs-real-or-shuffled": (
            header("python-docs-real-or-shuffled", "classification",
                   "Tell a Python documentation sentence from the same words in a random order.",
                   labels=["real", "shuffled"],
                   template="Sentence: {text}\nIs this sentence real or shuffled? Answer:"),
            real_or_shuffled_examples(_pick(sentences, rng, EXAMPLES_PER_TASK), rng), "real-or-shuffled"),
    }
    return {f"{name}.jsonl": _task_file(head, examples, prefix) for name, (head, examples, prefix) in files.items()}


def write_builtin_tasks(out_dir: str | Path = BUILTIN_DIR) -> list[Path]:
    out = Path(out_dir)
    return [write_text_atomic(out / name, text) for name, text in build_builtin_tasks().items()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tools/make_builtin_tasks.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=BUILTIN_DIR, help=f"folder to write (default {BUILTIN_DIR})")
    args = parser.parse_args(argv)
    for path in write_builtin_tasks(args.out):
        print(path)


if __name__ == "__main__":
    main()
