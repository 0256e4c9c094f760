"""Write the data sets shipped in scratchlm/finetune/data/: seeded, so a rerun gives the same
bytes (the files are committed; this script is how they were made and how to remake them).

    python tools/make_datasets.py            # writes scratchlm/finetune/data/

spam_train.jsonl, spam_eval.jsonl: short messages labelled "spam" or "ham", {"text", "label"}
per line. Ham is the talk of people working with Python (its vocabulary taken from the CPython
documentation: modules, functions, error names); spam is prizes, offers and urgent links. To
keep it from being solvable by one word, the two share vocabulary on purpose: ham says "free",
"offer", "win" and "click" in ordinary senses ("are you free Friday"), spam dresses up in Python
words ("master decorators in 3 days"), and 3% of labels are flipped as real spam filters' data
is noisy, so a perfect score is not reachable and a model has to read more than a keyword.
Half of the held-out messages come from sentence templates the training file never uses.

instructions_train.jsonl, instructions_eval.jsonl: questions about the standard library and the
language, {"messages": [user, assistant]} per line, each answered by the first sentence (or two)
of the documentation: a module's or function's docstring, read with `ast` from the stdlib source
as the embedded corpus does (scratchlm/text/embedded.py; nothing is imported, so nothing runs),
the docstrings of the builtins and of a few C modules that every CPython has, and the pages of
`pydoc_data.topics` ("What does the `assert` statement do?"). preferences_train.jsonl,
preferences_eval.jsonl: the same questions as {"prompt", "chosen", "rejected", "kind"}: chosen is
the documented answer, rejected is in about equal shares an evasive non-answer, the right answer
rambling on and repeating itself, or the answer to a different name ("kind" says which; the
loaders ignore it). Held-out questions are about names (top-level modules, builtins, topics) that
the training files never ask about, chosen by a SHA-256 of the name, so held-out loss measures
whether a model learnt the form of an answer rather than the answers themselves.

The shipped files were made with Python 3.11.7; docstrings change between Python versions, so
another version writes slightly different question files (the spam files do not depend on it).
"""

import ast
import hashlib
import importlib
import inspect
import json
import random
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from scratchlm.atomic_io import write_text_atomic
from scratchlm.text.embedded import pydoc_topics, stdlib_source_files
from scratchlm.finetune.datasets import SHIPPED_DIR

DATA_DIR = SHIPPED_DIR
SEED = 20240607
TRAIN_SIZE, EVAL_SIZE = 1200, 300
SPAM_SHARE = 0.4
LABEL_NOISE = 0.03
UNSEEN_TEMPLATES = 4  # per class: used only in the held-out file

# Words and names from the CPython documentation (library reference and tutorial).
MODULES = ["asyncio", "itertools", "functools", "collections", "pathlib", "argparse", "logging", "unittest", "datetime",
           "json", "re", "subprocess", "threading", "typing", "dataclasses", "contextlib", "sqlite3", "csv", "os.path",
           "shutil", "tempfile", "socket", "struct", "heapq", "bisect", "decimal", "fractions", "statistics", "zipfile"]
THINGS = ["decorator", "generator", "iterator", "context manager", "coroutine", "metaclass", "descriptor",
          "list comprehension", "lambda", "dictionary view", "named tuple", "type hint", "f-string", "slice",
          "exception handler", "keyword argument", "default argument", "virtual environment", "event loop", "test fixture"]
ERRORS = ["KeyError", "TypeError", "ValueError", "AttributeError", "IndexError", "ImportError", "RecursionError",
          "UnicodeDecodeError", "FileNotFoundError", "StopIteration", "TimeoutError", "ZeroDivisionError"]
PEOPLE = ["Ana", "Ben", "Chidi", "Dana", "Eitan", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena", "Mira", "Nils"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "tomorrow", "tonight", "next week", "this afternoon"]
PRIZES = ["iPhone", "cruise for two", "gift card", "laptop", "cash prize", "luxury watch", "vacation", "bonus"]
AMOUNTS = ["$500", "$1000", "$250", "£900", "€750", "$5,000", "$99", "90%"]
DOMAINS = ["bit.ly/x7Qz", "win-now.biz", "claim-prize.top", "free-deal.click", "py-master.xyz", "cash4u.info"]

HAM = [
    "Can you review my pull request for the {module} change before {day}?",
    "The {thing} in {module} raises {error} when the file is empty, any idea why?",
    "Are you free {day} to pair on the {module} tests?",
    "{person} says the {thing} docs have a nice example, worth a read.",
    "I fixed the {error} in the build; it was a missing import of {module}.",
    "Meeting moved to {day}. We'll go over the {thing} refactor.",
    "Thanks {person}! The {thing} trick saved me an hour.",
    "Quick question: does {module} release the GIL during long calls?",
    "We won the sprint demo, the {thing} rewrite was a hit. Drinks {day}?",
    "Their offer to maintain the {module} bindings sounds good to me.",
    "Click 'Run' again, the {error} was a flaky test in {module}.",
    "Lunch {day}? {person} wants to talk about the {thing} proposal.",
    "Reminder: the {module} upgrade is free of breaking changes, per the changelog.",
    "Got the {error} again. I think the {thing} closes the file too early.",
    "Can you send me the notes on {module} from {day}'s talk?",
    "{person}, your {thing} example needs a docstring before we merge.",
    "The CI is green now. {module} was pinned to an old version.",
    "Call me when you are done with the {thing} benchmark, no rush.",
]
SPAM = [
    "WINNER! You have been selected for a {prize}. Claim at {domain} now!",
    "Congratulations, you won {amount}! Reply YES to claim before {day}.",
    "URGENT: your account is locked. Verify at {domain} within 24 hours.",
    "Free {prize} for the first 100 users, click {domain} today only!",
    "Master the {thing} in 3 days and earn {amount} a week! Seats at {domain}",
    "Limited offer: {amount} off premium {module} courses, ends {day}. {domain}",
    "You are pre-approved for a loan of {amount}. No credit check, call now!",
    "Hot singles in your area want to learn {module}. Join free at {domain}",
    "Your parcel is waiting, pay the {amount} fee at {domain} to release it.",
    "Earn {amount} from home! No experience, no {thing} needed. Text START",
    "Final notice: claim your {prize} now or lose it. Visit {domain}",
    "Crypto bot made {amount} while I slept, get it free at {domain}!!!",
    "Dear user, a {error} was found on your PC. Fix it now at {domain}",
    "Act now! Exclusive {prize} giveaway for {module} developers: {domain}",
]
SLOTS = {"module": MODULES, "thing": THINGS, "error": ERRORS, "person": PEOPLE, "day": DAYS, "prize": PRIZES,
         "amount": AMOUNTS, "domain": DOMAINS}


def render(template: str, rng: random.Random) -> str:
    """A template with each {slot} filled by a random word of its list; sometimes lowercased,
    as people type, so capitals alone do not give spam away."""
    text = template.format(**{name: rng.choice(words) for name, words in SLOTS.items()})
    return text.lower() if rng.random() < 0.2 else text


def make_messages(n: int, rng: random.Random, unseen_share: float = 0.0) -> list[dict[str, str]]:
    """`n` labelled messages: `SPAM_SHARE` spam, `LABEL_NOISE` of labels flipped, and
    `unseen_share` of them from the last `UNSEEN_TEMPLATES` templates of each class, which the
    training set never uses: the held-out score then measures whether a model learnt what spam
    is, not only which sentence frames it has seen."""
    records = []
    for _ in range(n):
        label = "spam" if rng.random() < SPAM_SHARE else "ham"
        templates = SPAM if label == "spam" else HAM
        unseen = rng.random() < unseen_share
        pool = templates[-UNSEEN_TEMPLATES:] if unseen else templates[:-UNSEEN_TEMPLATES]
        text = render(rng.choice(pool), rng)
        if rng.random() < LABEL_NOISE:
            label = "ham" if label == "spam" else "spam"
        records.append({"text": text, "label": label})
    return records


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ---- instruction and preference data -----------------------------------------------------
QA_SEED = 20240612
INSTRUCTIONS_TRAIN, INSTRUCTIONS_EVAL = 1500, 150
PREFERENCES_TRAIN, PREFERENCES_EVAL = 600, 120
EVAL_PERCENT = 12  # of the split keys (top-level modules, builtins, topics) held out
MIN_ANSWER, MAX_ANSWER = 20, 220  # characters: one or two sentences, well inside a 256-token context
# Subjects left out: modules with side effects on import (even though we only read their
# source), GUI and platform-only code, generated codec tables and installer internals.
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "encodings", "ensurepip",
                "pydoc_data", "lib2to3", "distutils", "msilib", "test", "xxlimited", "xxsubtype"}
# C modules present in every CPython build, read through `inspect`: importing them runs nothing.
C_MODULES = ("builtins", "math", "cmath", "itertools", "time", "gc", "sys", "binascii", "zlib", "unicodedata",
             "atexit", "marshal", "array")
BUILTIN_TYPES = (str, bytes, bytearray, list, tuple, dict, set, frozenset, int, float, complex)

QUESTIONS = {
    "module": ["What is the Python module `{name}` for?", "What does the `{name}` module do?",
               "What is `{name}` in the standard library?", "Describe the module `{name}`.",
               "Tell me about Python's `{name}` module."],
    "function": ["What does `{name}` do?", "What does the function `{name}` do?", "What is `{name}` for?",
                 "Explain what `{name}` does.", "In Python, what does `{name}` do?"],
    "class": ["What is `{name}`?", "What is the class `{name}` for?", "What does the class `{name}` represent?",
              "Explain the class `{name}`.", "In Python, what is `{name}`?"],
    "method": ["What does the method `{name}` do?", "What does `{name}` do?", "What is `{name}` for?",
               "Explain the method `{name}`.", "In Python, what does the method `{name}` do?"],
    "statement": ["What does the `{name}` statement do?", "What is the `{name}` statement for?",
                  "Explain Python's `{name}` statement.", "In Python, what does `{name}` do?"],
    "topic": ['What does the Python reference say about "{name}"?', 'Explain "{name}" in Python.',
              'Summarise the Python documentation on "{name}".', 'What should I know about "{name}" in Python?'],
}
EVASIVE = ["I'm not sure; please check the documentation.", "That depends on what you are trying to do.",
           "I don't know much about that, sorry.", "You can find that in the Python docs.",
           "It is hard to say without more context.", "Good question! Try it in the interpreter and see."]
RAMBLE_MIDDLE = ["In other words,", "To say it again,", "Put another way,", "As I said,", "Basically,"]
RAMBLE_END = ["I hope that helps, there is a lot more to say about it but that is the main idea more or less.",
              "Anyway, that is what it does, as far as I know, and you can read about it in the docs too.",
              "So that is basically it, and it is really useful, and a lot of people use it all the time.",
              "It is a good thing to know about and I think it is worth knowing, as I said before."]
REJECTED_KINDS = ("evasive", "rambling", "wrong")

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_SIGNATURE = re.compile(r"^[\w.]+\(|->|-->")
_CLEAN = re.compile(r"[A-Z\"][A-Za-z0-9 ,.;:'\"()/%+-]*[.!?]")  # plain ASCII prose: no reST, markup or code
_NOISE = (">>>", "::", ".py", "e.g.", "i.e.", "XXX", "TODO", "Copyright", "self.", " - ", "Returns:",
          "following", "below", "above", "deprecated", "Deprecated", "DEPRECATED")
_DANGLING = re.compile(r"\b(for example|for instance|equivalent to|as follows|like this|such as|is|are|to|of|by)\.$")
_QUESTION_NAME = re.compile(r"`([^`]+)`|\"([^\"]+)\"")


@dataclass(frozen=True)
class DocFact:
    """One thing the documentation says: `name` (a dotted name, keyword or topic title, as the
    question shows it), what kind of thing it is (a key of QUESTIONS) and the answer."""

    name: str
    kind: str
    answer: str

    @property
    def split_key(self) -> str:
        return split_key(self.name)


def split_key(name: str) -> str:
    """What decides a name's split: its top-level module or type (`json.dumps` -> `json`,
    `str.join` -> `str`), or a topic's whole title, so a package and its functions are held out
    together."""
    return name if " " in name else name.split(".")[0]


def is_held_out(name: str) -> bool:
    """Whether questions about `name` go to the eval files: a SHA-256 of its split key, the same
    on every run and Python (the built-in hash() is salted per process)."""
    digest = hashlib.sha256(split_key(name).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < EVAL_PERCENT


def question_name(question: str) -> str:
    """The name a generated question asks about (the text in backticks or quotes)."""
    match = _QUESTION_NAME.search(question)
    if match is None:
        raise ValueError(f"no `name` or \"topic\" in question {question!r}")
    return match.group(1) or match.group(2)


def first_sentences(doc: str | None) -> str | None:
    """The first sentence of a docstring's first paragraph, with the second one when the first is
    short and both fit MAX_ANSWER; None when the text is missing, too short, starts with a
    signature ("f(x) -> y") or holds markup, code or a non-ASCII character."""
    if not isinstance(doc, str) or not doc.strip():  # a class's __doc__ slot can be a descriptor
        return None
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    if _SIGNATURE.search(paragraph.splitlines()[0] if paragraph else ""):
        return None
    paragraph = re.sub(r"(?<=[a-z]-)\n\s*(?=[a-z])", "", paragraph)  # "non-\nnumeric" wrapped at its hyphen
    text = " ".join(paragraph.replace(" \u2014 ", "; ").split())
    if text and text[-1].isalnum():
        text += "."  # a one-line docstring without its full stop
    # A sentence ending in ":" introduces a list or an example: kept with a full stop when it still
    # says something ("... into a program:"), dropped when it leads nowhere ("... for example:").
    sentences = [s[:-1] + "." if s.endswith(":") else s for s in _SENTENCE_BREAK.split(text)]
    if _DANGLING.search(sentences[0]):
        return None
    answer = sentences[0]
    second = sentences[1] if len(sentences) > 1 and not _DANGLING.search(sentences[1]) else ""
    if second and len(answer) < 80 and len(answer) + 1 + len(second) <= MAX_ANSWER:
        answer += " " + second
    if not MIN_ANSWER <= len(answer) <= MAX_ANSWER or not _CLEAN.fullmatch(answer):
        return None
    if any(noise in answer for noise in _NOISE):
        return None
    return answer


# ---- where the facts come from --------------------------------------------------------------
def _module_name(path: Path, root: Path) -> str | None:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or parts[0] in SKIP_MODULES or any("windows" in p for p in parts):
        return None
    if any(not p.isidentifier() or p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def _literal_all(tree: ast.Module) -> set[str] | None:
    """A module's `__all__` when it is written as a literal list or tuple of strings."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                names = ast.literal_eval(node.value)
            except ValueError:
                return None
            return {n for n in names if isinstance(n, str)}
    return None


def source_facts(module: str, source: str) -> Iterator[DocFact]:
    """Facts from one pure-Python module's source: its docstring, its public functions and
    classes (those in `__all__` when it lists them) and the public methods of those classes."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    if answer := first_sentences(ast.get_docstring(tree)):
        yield DocFact(module, "module", answer)
    public = _literal_all(tree)
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_") or (public is not None and node.name not in public):
            continue
        is_class = isinstance(node, ast.ClassDef)
        if answer := first_sentences(ast.get_docstring(node)):
            yield DocFact(f"{module}.{node.name}", "class" if is_class else "function", answer)
        if is_class:
            for item in node.body:
                if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) or item.name.startswith("_"):
                    continue
                if answer := first_sentences(ast.get_docstring(item)):
                    yield DocFact(f"{module}.{node.name}.{item.name}", "method", answer)


def stdlib_facts() -> Iterator[DocFact]:
    """Facts of the standard library's pure-Python modules, in sorted file order."""
    files = stdlib_source_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in files:
        if (module := _module_name(path, root)) is not None:
            yield from source_facts(module, path.read_text(encoding="utf-8", errors="replace"))


def builtin_facts() -> Iterator[DocFact]:
    """Facts of C_MODULES (builtins without a module prefix) and of the builtin types' methods."""
    for module_name in C_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        prefix = "" if module_name == "builtins" else module_name + "."
        if prefix and (answer := first_sentences(module.__doc__)):
            yield DocFact(module_name, "module", answer)
        for name in sorted(vars(module)):
            obj = vars(module)[name]
            if name.startswith("_") or not (inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
            if answer := first_sentences(doc):
                yield DocFact(prefix + name, "class" if inspect.isclass(obj) else "function", answer)
    for cls in BUILTIN_TYPES:
        for name in sorted(vars(cls)):
            obj = vars(cls)[name]
            if not name.startswith("_") and callable(obj) and (answer := first_sentences(obj.__doc__)):
                yield DocFact(f"{cls.__name__}.{name}", "method", answer)


def topic_facts() -> Iterator[DocFact]:
    """Facts of the `pydoc_data.topics` pages: a page on a statement ('The "assert" statement')
    asks about the keyword, any other page about its title."""
    for page in pydoc_topics():
        lines = page.splitlines()
        title = lines[0].strip().replace("\u2014", "-")
        body = "\n".join(lines[2:]).strip("\n")  # lines[1] underlines the title
        # The first prose paragraph: grammar rules and examples are indented.
        paragraph = next((p for p in body.split("\n\n") if p.strip() and not p[0].isspace()), "")
        answer = first_sentences(paragraph)
        if answer is None:
            continue
        statement = re.fullmatch(r'The "(\w+)" statement', title)
        if statement:
            yield DocFact(statement.group(1), "statement", answer)
        else:
            yield DocFact(title.replace('"', "'"), "topic", answer)


def doc_facts() -> list[DocFact]:
    """Every usable fact, sorted by name, one per name and one per answer: a docstring repeated
    by many overrides ("Emit a record.") would otherwise dominate, and the same answer could sit
    on both sides of the split."""
    facts: dict[str, DocFact] = {}
    answers: set[str] = set()
    for fact in sorted([*topic_facts(), *builtin_facts(), *stdlib_facts()], key=lambda f: (f.name, f.kind)):
        if fact.name not in facts and fact.answer not in answers:
            facts[fact.name] = fact
            answers.add(fact.answer)
    return list(facts.values())


# ---- records ----------------------------------------------------------------------------------
HEADLINE_KINDS = ("module", "statement", "topic")


def split_facts(facts: Sequence[DocFact]) -> tuple[list[DocFact], list[DocFact]]:
    """(training facts, held-out facts), by `is_held_out` of each name."""
    return [f for f in facts if not is_held_out(f.name)], [f for f in facts if is_held_out(f.name)]


def pick_facts(facts: Sequence[DocFact], n: int, rng: random.Random) -> list[DocFact]:
    """`n` facts in random order: every module, statement and topic (the questions a user asks
    first) while they fit, the rest drawn from functions, classes and methods."""
    headline = [f for f in facts if f.kind in HEADLINE_KINDS]
    rest = [f for f in facts if f.kind not in HEADLINE_KINDS]
    chosen = rng.sample(headline, min(n, len(headline)))
    chosen += rng.sample(rest, min(n - len(chosen), len(rest)))
    rng.shuffle(chosen)
    return chosen


def ask(fact: DocFact, rng: random.Random) -> str:
    return rng.choice(QUESTIONS[fact.kind]).format(name=fact.name)


def instruction_records(facts: Sequence[DocFact], n: int, rng: random.Random) -> list[dict]:
    """`n` conversations {"messages": [question, documented answer]}."""
    return [
        {"messages": [{"role": "user", "content": ask(f, rng)}, {"role": "assistant", "content": f.answer}]}
        for f in pick_facts(facts, n, rng)
    ]


def rejected_answer(fact: DocFact, kind: str, facts: Sequence[DocFact], rng: random.Random) -> str:
    """A worse answer to the question about `fact`: evasive (no answer), rambling (the right
    answer drowned in repetition and filler) or wrong (the answer about another name of the same
    kind where there is one, from `facts`, so it has the right form and a false content)."""
    if kind == "evasive":
        return rng.choice(EVASIVE)
    if kind == "rambling":
        again = fact.answer[0].lower() + fact.answer[1:] if fact.answer[1:2].islower() else fact.answer
        return f"{fact.answer} {rng.choice(RAMBLE_MIDDLE)} {again} {rng.choice(RAMBLE_END)}"
    others = [f.answer for f in facts if f.answer != fact.answer]
    same_kind = [f.answer for f in facts if f.kind == fact.kind and f.answer != fact.answer]
    return rng.choice(same_kind or others)


def preference_records(facts: Sequence[DocFact], n: int, rng: random.Random) -> list[dict]:
    """`n` pairs {"prompt", "chosen", "rejected", "kind"}; the kind of rejected answer drawn
    uniformly from REJECTED_KINDS for each pair."""
    records = []
    for fact in pick_facts(facts, n, rng):
        kind = rng.choice(REJECTED_KINDS)
        prompt = ask(fact, rng)
        records.append({"prompt": prompt, "chosen": fact.answer, "rejected": rejected_answer(fact, kind, facts, rng), "kind": kind})
    return records


def make_qa_datasets(facts: Sequence[DocFact], seed: int = QA_SEED) -> dict[str, list[dict]]:
    """The four files' records by file stem. Each file draws from its own seeded generator, so
    changing one's size leaves the others as they were."""
    train, held_out = split_facts(facts)
    return {
        "instructions_train": instruction_records(train, INSTRUCTIONS_TRAIN, random.Random(f"{seed}/instructions_train")),
        "instructions_eval": instruction_records(held_out, INSTRUCTIONS_EVAL, random.Random(f"{seed}/instructions_eval")),
        "preferences_train": preference_records(train, PREFERENCES_TRAIN, random.Random(f"{seed}/preferences_train")),
        "preferences_eval": preference_records(held_out, PREFERENCES_EVAL, random.Random(f"{seed}/preferences_eval")),
    }


def main() -> None:
    rng = random.Random(SEED)
    write_jsonl(DATA_DIR / "spam_train.jsonl", make_messages(TRAIN_SIZE, rng))
    write_jsonl(DATA_DIR / "spam_eval.jsonl", make_messages(EVAL_SIZE, rng, unseen_share=0.5))
    print(f"wrote {DATA_DIR}/spam_train.jsonl ({TRAIN_SIZE}) and spam_eval.jsonl ({EVAL_SIZE})")
    for stem, records in make_qa_datasets(doc_facts()).items():
        write_jsonl(DATA_DIR / f"{stem}.jsonl", records)
        print(f"wrote {DATA_DIR}/{stem}.jsonl ({len(records)})")


if __name__ == "__main__":
    main()
