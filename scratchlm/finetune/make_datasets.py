"""Write the data sets shipped in scratchlm/finetune/data/: seeded, so a rerun gives the same
bytes (the files are committed; this script is how they were made and how to remake them).

    python -m scratchlm.finetune.make_datasets            # writes scratchlm/finetune/data/

spam_train.jsonl, spam_eval.jsonl: short messages labelled "spam" or "ham", {"text", "label"}
per line. Ham is the talk of people working with Python (its vocabulary taken from the CPython
documentation: modules, functions, error names); spam is prizes, offers and urgent links. To
keep it from being solvable by one word, the two share vocabulary on purpose: ham says "free",
"offer", "win" and "click" in ordinary senses ("are you free Friday"), spam dresses up in Python
words ("master decorators in 3 days"), and 3% of labels are flipped as real spam filters' data
is noisy, so a perfect score is not reachable and a model has to read more than a keyword.
Half of the held-out messages come from sentence templates the training file never uses.
"""

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
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


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def main() -> None:
    rng = random.Random(SEED)
    write_jsonl(DATA_DIR / "spam_train.jsonl", make_messages(TRAIN_SIZE, rng))
    write_jsonl(DATA_DIR / "spam_eval.jsonl", make_messages(EVAL_SIZE, rng, unseen_share=0.5))
    print(f"wrote {DATA_DIR}/spam_train.jsonl ({TRAIN_SIZE}) and spam_eval.jsonl ({EVAL_SIZE})")


if __name__ == "__main__":
    main()
