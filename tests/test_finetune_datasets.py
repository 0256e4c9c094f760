"""The instruction and preference data sets shipped in scratchlm/finetune/data/ and the helper
that finds them: every line loads, held-out questions ask about other names than the training
ones, and the generator gives the same records on every run."""

import json
import random
from pathlib import Path

import pytest

from conftest import load_tool
from scratchlm.errors import ConfigError
from scratchlm.finetune.datasets import (
    resolve_data_path,
    shipped_dataset,
    shipped_datasets,
)
from scratchlm.finetune.dpo import load_preferences
from scratchlm.finetune.sft_data import load_instructions

md = load_tool("make_datasets")
QA_FILES = ("instructions_train", "instructions_eval", "preferences_train", "preferences_eval")


def _questions(name: str) -> list[str]:
    lines = shipped_dataset(name).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return [r["prompt"] if "prompt" in r else r["messages"][0]["content"] for r in records]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_shipped_instructions_and_preferences_load_without_rejections(split):
    conversations, report = load_instructions(shipped_dataset(f"instructions_{split}"))
    assert report.rejected == [] and len(conversations) == len(report.kept) >= 100
    pairs, report = load_preferences(shipped_dataset(f"preferences_{split}"))
    assert report.rejected == [] and len(pairs) == len(report.kept) >= 100
    assert all(p.chosen != p.rejected for p in pairs)


@pytest.mark.parametrize("kind", ["instructions", "preferences"])
def test_held_out_questions_ask_about_names_the_training_file_never_asks_about(kind):
    train = {md.split_key(md.question_name(q)) for q in _questions(f"{kind}_train")}
    held_out = {md.split_key(md.question_name(q)) for q in _questions(f"{kind}_eval")}
    assert held_out and train and not train & held_out


def test_preference_file_mixes_the_three_kinds_of_rejected_answer():
    lines = shipped_dataset("preferences_train").read_text(encoding="utf-8").splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert {k: kinds.count(k) > len(kinds) / 5 for k in md.REJECTED_KINDS} == dict.fromkeys(md.REJECTED_KINDS, True)


def test_answers_are_short_single_line_prose():
    for name in ("instructions_train", "instructions_eval"):
        for line in shipped_dataset(name).read_text(encoding="utf-8").splitlines():
            answer = json.loads(line)["messages"][1]["content"]
            assert md.MIN_ANSWER <= len(answer) <= md.MAX_ANSWER and "\n" not in answer and ">>>" not in answer


FACTS = [
    md.DocFact("json", "module", "JSON encoder and decoder."),
    md.DocFact("json.dumps", "function", "Serialize an object to a JSON formatted string."),
    md.DocFact("math.sqrt", "function", "Return the square root of x."),
    md.DocFact("shlex", "module", "A lexical analyzer class for simple shell-like syntaxes."),
    md.DocFact("str.join", "method", "Concatenate any number of strings."),
    md.DocFact("assert", "statement", "Assert statements insert debugging assertions into a program."),
] + [md.DocFact(f"mod{i}.f", "function", f"Return the number {i} of the test.") for i in range(40)]


def test_generator_gives_the_same_records_for_the_same_seed():
    assert md.make_qa_datasets(FACTS, seed=7) == md.make_qa_datasets(FACTS, seed=7)
    assert md.make_qa_datasets(FACTS, seed=7) != md.make_qa_datasets(FACTS, seed=8)


def test_split_keeps_a_module_and_its_functions_on_one_side():
    assert md.split_key("json.decoder.JSONDecoder.decode") == md.split_key("json") == "json"
    assert md.split_key("Boolean operations") == "Boolean operations"
    train, held_out = md.split_facts(FACTS)
    assert {f.split_key for f in train}.isdisjoint({f.split_key for f in held_out})
    assert md.is_held_out("json") == md.is_held_out("json.dumps")


def test_wrong_rejected_answer_is_another_names_answer_of_the_same_kind():
    fact = FACTS[2]
    wrong = md.rejected_answer(fact, "wrong", FACTS, random.Random(0))
    assert wrong != fact.answer and wrong in {f.answer for f in FACTS if f.kind == "function"}


@pytest.mark.parametrize("doc", [None, "", "Short.", "sqrt(x) -> float\n\nReturn the root.",
                                 "Return `x` with :func:`f` applied, as reST writes it.", "Run ``code`` >>> f()"])
def test_first_sentences_skips_missing_short_signature_and_markup_docstrings(doc):
    assert md.first_sentences(doc) is None


def test_first_sentences_takes_one_or_two_sentences_with_whitespace_normalised():
    doc = "Return the square root\n    of x.  It is never negative.\n\nMore text in a second paragraph."
    assert md.first_sentences(doc) == "Return the square root of x. It is never negative."
    long_second = "Return the square root\n    of x.  " + "It is a long second sentence, " * 8 + "too long to add."
    assert md.first_sentences(long_second) == "Return the square root of x."


def test_shipped_dataset_finds_each_shipped_file():
    assert set(QA_FILES) | {"spam_train", "spam_eval"} <= set(shipped_datasets())
    path = shipped_dataset("instructions_train")
    assert path.is_file() and path.name == "instructions_train.jsonl"


def test_unknown_shipped_dataset_is_a_config_error_listing_the_names():
    with pytest.raises(ConfigError, match=r"instructions_tran.*did you mean 'instructions_train'.*spam_eval"):
        shipped_dataset("instructions_tran")


def test_resolve_data_path_maps_builtin_names_and_keeps_other_paths():
    assert resolve_data_path("builtin:preferences_eval") == shipped_dataset("preferences_eval")
    assert resolve_data_path("my/data.jsonl") == Path("my/data.jsonl")
    assert resolve_data_path(Path("builtin:x")) == Path("builtin:x")  # only a string names a shipped set
    with pytest.raises(ConfigError):
        resolve_data_path("builtin:nope")
