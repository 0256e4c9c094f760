import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.text.embedded import embedded_corpus_text, pydoc_topics
from scratchlm.errors import ConfigError, ContextTooLongError, InputFileError
from scratchlm.eval import runner
from scratchlm.eval.runner import default_results_dir, evaluate_model, run_task, save_report
from scratchlm.eval.scoring import split_context
from scratchlm.tokenizer.tokens import document_start
from scratchlm.eval.tasks import BUILTIN_DIR, builtin_tasks, load_task
from scratchlm.model import GPT, get_preset
from scratchlm.tokenizer import train_bpe

from conftest import load_tool

_generator = load_tool("make_builtin_tasks")  # tools/, the development script that wrote the builtin files
build_builtin_tasks, prose_sentences, topics_sha256 = _generator.build_builtin_tasks, _generator.prose_sentences, _generator.topics_sha256
BUILTINS = ["python-docs-cloze", "python-docs-completion", "python-docs-continuation", "python-docs-real-or-shuffled"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run 10-20x slower with two threads on a busy two-core machine (threads spin
    waiting for each other); one thread keeps the file's run time predictable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([embedded_corpus_text(max_bytes=40_000)], vocab_size=400, workers=1, min_frequency=1)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size, block_size=256)).eval()


@pytest.fixture(scope="module")
def uniform_model(tokenizer):
    """All weights zero: the logits are 0 everywhere, so every token has log-probability
    -ln(vocab) and a continuation's score is -(its tokens) * ln(vocab), known in advance."""
    model = GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size, block_size=256)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


# ---- loading -------------------------------------------------------------------------------
def test_kinds_are_read_from_the_fields_and_defaults_filled_in(tmp_path):
    mc = load_task(write_jsonl(tmp_path / "mc.jsonl", [{"context": "2+2 =", "choices": ["4", "5"], "label": 0}]))
    gen = load_task(write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Capital of France:", "answers": ["Paris", "paris"]}]))
    cls = load_task(write_jsonl(tmp_path / "cls.jsonl", [{"text": "great", "label": "pos"}, {"text": "bad", "label": "neg"}]))
    assert (mc.kind, mc.name, mc.settings["delimiter"]) == ("multiple_choice", "mc", " ")
    assert (gen.kind, gen.settings["max_new_tokens"], gen.settings["stop"]) == ("generation", 32, ["\n"])
    assert gen.settings["metrics"] == ["exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL"]
    assert (cls.kind, cls.settings["labels"], cls.settings["template"]) == ("classification", ["neg", "pos"], "{text}\nAnswer:")
    assert mc.source == tmp_path / "mc.jsonl" and mc.lines == [1]


def test_the_header_names_the_task_and_sets_options(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"task": {"name": "sentiment", "kind": "classification", "labels": ["neg", "neu", "pos"],
                  "template": "Review: {text}\nSentiment:", "description": "d"}},
        "",
        {"text": "fine", "label": "neu", "id": 7},
    ])
    task = load_task(path)
    assert task.name == "sentiment" and task.settings["labels"] == ["neg", "neu", "pos"]
    assert task.lines == [3] and task.where(0) == f"{path}:3 (id 7)"


BAD_FILES = [
    # (lines, line number reported, words in the message)
    (['{"context": "a", "choices": ["x", "y"], "label": 0}', '{"context": "a", "choices": ["x", "y"], "label": 0'], 2, "not valid JSON"),
    (['[1, 2]'], 1, "expected a JSON object"),
    ([{"context": "a", "choices": ["x", "y"]}], 1, "missing field 'label'"),
    ([{"context": "a", "choices": ["x", "y"], "label": "0"}], 1, "must be the index"),
    ([{"context": "a", "choices": ["x", "y"], "label": True}], 1, "must be the index"),
    ([{"context": "a", "choices": ["x", "y"], "label": 2}], 1, "out of range for 2 choices"),
    ([{"context": "a", "choices": ["x"], "label": 0}], 1, "at least 2"),
    ([{"context": "a", "choices": ["x", 3], "label": 0}], 1, "choice 1 must be a string"),
    ([{"context": "a", "choices": ["x", "y"], "label": 0}, {"prompt": "p", "answer": "a"}], 2, "generation example, but line 1"),
    ([{"task": {"kind": "generation"}}, {"text": "t", "label": "x"}], 2, "the header (line 1) says a generation task"),
    ([{"task": {"delimeter": "\n"}}, {"context": "a", "choices": ["x", "y"], "label": 0}], 1, "did you mean 'delimiter'"),
    ([{"task": {"stop": ["\n"]}}, {"context": "a", "choices": ["x", "y"], "label": 0}], 1, "'stop' is for generation tasks"),
    ([{"task": {"kind": "regression"}}, {"prompt": "p", "answer": "a"}], 1, "unknown kind"),
    ([{"task": {"metrics": ["blue"]}}, {"prompt": "p", "answer": "a"}], 1, "did you mean 'bleu'"),
    ([{"task": {"max_new_tokens": 0}}, {"prompt": "p", "answer": "a"}], 1, "positive integer"),
    ([{"task": {"template": "Q: {txt}"}}, {"text": "t", "label": "a"}, {"text": "u", "label": "b"}], 1, "{txt}"),
    ([{"task": {"template": "no field"}}, {"text": "t", "label": "a"}, {"text": "u", "label": "b"}], 1, "must contain {text}"),
    ([{"task": {"labels": ["a", "b"]}}, {"text": "t", "label": "c"}], 2, "not one of the header's labels"),
    ([{"prompt": "p", "answer": "a"}, {"task": {"name": "x"}}], 2, "only be the first line"),
    ([{"prompt": "p", "answr": "a"}], 1, "did you mean 'answer'"),
    ([{"prompt": "p", "answer": "a", "answers": ["b"]}], 1, "exactly one of"),
    ([{"prompt": "p", "answers": []}], 1, "non-empty list"),
    ([{"prompt": "", "answer": "a"}], 1, "\"prompt\" is empty"),
    ([{"prompt": "p", "text": "t", "label": "x"}], 1, "fields of different kinds"),
    ([{"question": "q", "label": "x"}], 1, "cannot tell the kind"),
    ([{"prompt": "p", "answer": "a", "id": 1}, {"prompt": "q", "answer": "b", "id": 1}], 2, "already used on line 1"),
]


@pytest.mark.parametrize("lines, line, words", BAD_FILES)
def test_a_malformed_line_is_reported_with_file_line_and_what_is_wrong(tmp_path, lines, line, words):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(InputFileError) as info:
        load_task(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ") and words in message and "\n" not in message


@pytest.mark.parametrize("content, words", [
    (b"", "no examples"),
    (b'{"task": {"name": "x"}}\n\n', "no examples"),
    (b'{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "at least 2 labels"),
    (b'{"prompt": "caf\xe9", "answer": "a"}\n', ":1: not UTF-8"),
])
def test_an_empty_or_degenerate_file_is_refused(tmp_path, content, words):
    path = tmp_path / "t.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=words):
        load_task(path)


def test_a_task_name_resolves_to_a_builtin_task_and_a_typo_gets_a_suggestion():
    assert builtin_tasks() == BUILTINS
    assert load_task("python-docs-cloze").source == BUILTIN_DIR / "python-docs-cloze.jsonl"
    with pytest.raises(InputFileError, match="did you mean 'python-docs-cloze'"):
        load_task("python-doc-cloze")


# ---- round trip (property) -----------------------------------------------------------------
text = st.text(max_size=12)
nonempty = st.text(min_size=1, max_size=12)


@st.composite
def task_files(draw) -> tuple[list, str]:
    """(lines, kind) of a valid task file: optional header, 1-6 examples, optional id and meta."""
    kind = draw(st.sampled_from(["multiple_choice", "generation", "classification"]))
    header: dict = {}
    labels = draw(st.lists(nonempty, min_size=2, max_size=4, unique=True))
    if kind == "classification":
        header["labels"] = labels
    if draw(st.booleans()):
        header["kind"] = kind
    examples = []
    for n in range(draw(st.integers(1, 6))):
        if kind == "multiple_choice":
            choices = draw(st.lists(nonempty, min_size=2, max_size=5))
            example = {"context": draw(text), "choices": choices, "label": draw(st.integers(0, len(choices) - 1))}
        elif kind == "generation":
            example = {"prompt": draw(nonempty)}
            if draw(st.booleans()):
                example["answer"] = draw(text)
            else:
                example["answers"] = draw(st.lists(text, min_size=1, max_size=3))
        else:
            example = {"text": draw(text), "label": draw(st.sampled_from(labels))}
        if draw(st.booleans()):
            example["id"] = draw(st.sampled_from([f"ex-{n}", n]))
        if draw(st.booleans()):
            example["meta"] = draw(st.dictionaries(text, st.integers() | text, max_size=2))
        examples.append(example)
    return ([{"task": header}] if header else []) + examples, kind


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=task_files())
def test_valid_examples_load_back_unchanged(tmp_path, file):
    lines, kind = file
    task = load_task(write_jsonl(tmp_path / "t.jsonl", lines))
    examples = [line for line in lines if "task" not in line]
    assert task.kind == kind and task.examples == examples


def _not_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return True
    return False


garbage = st.one_of(
    st.text(min_size=1, max_size=20).filter(lambda s: "\n" not in s and s.strip() and _not_json(s)),
    st.sampled_from(["[]", "1", "null", '"text"', "true", "{}", '{"label": 0}', '{"id": "x"}', '{"task": 3}',
                     '{"context": 1, "choices": ["a", "b"], "label": 0}', '{"context": "c", "choices": ["a", "b"], "label": 5}',
                     '{"prompt": "p", "answers": "a"}', '{"text": "t", "label": 4}', '{"text": "t", "label": ""}']),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=task_files(), junk=garbage, data=st.data())
def test_any_line_replaced_by_garbage_is_reported_with_its_line_number(tmp_path, file, junk, data):
    lines, _ = file
    index = data.draw(st.integers(0, len(lines) - 1))
    lines = [junk if n == index else line for n, line in enumerate(lines)]
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    with pytest.raises(InputFileError) as info:
        load_task(path)
    assert str(info.value).startswith(f"{path}:{index + 1}: ")


# ---- builtin tasks -------------------------------------------------------------------------
def test_builtin_tasks_are_valid_labelled_and_free_of_duplicates():
    for name in BUILTINS:
        task = load_task(name)
        assert task.name == name and task.settings["description"]
        assert 100 <= len(task.examples) <= 200
        firsts = [e.get("context") or e.get("prompt") or e.get("text") for e in task.examples]
        assert len(set(firsts)) == len(firsts), name
        assert len({e["id"] for e in task.examples}) == len(task.examples)
    labels = [e["label"] for e in load_task("python-docs-real-or-shuffled").examples]
    assert labels.count("real") == labels.count("shuffled")


def test_builtin_sentences_are_prose_not_code():
    sentences = prose_sentences(pydoc_topics())
    assert len(sentences) > 300 and len(set(sentences)) == len(sentences)
    assert not any(ch in s for s in sentences for ch in '"()=_*[]{}<>:`')
    assert all(8 <= len(s.split()) <= 30 and s.endswith(".") for s in sentences)


def test_the_generator_reproduces_the_shipped_files_byte_for_byte():
    topics = pydoc_topics()
    shipped = {p.name: p.read_text(encoding="utf-8") for p in sorted(BUILTIN_DIR.glob("*.jsonl"))}
    header = json.loads(shipped["python-docs-cloze.jsonl"].split("\n", 1)[0])["task"]
    if header["metadata"]["pydoc_topics_sha256"] != topics_sha256(topics):
        pytest.skip("this Python's pydoc_data.topics differs from the one the builtin tasks were made from")
    assert build_builtin_tasks(topics) == shipped


# ---- running -------------------------------------------------------------------------------
@pytest.fixture
def choice_task(tmp_path):
    """Choices of very different lengths in tokens and bytes, so acc and acc_norm disagree."""
    return load_task(write_jsonl(tmp_path / "mc.jsonl", [
        {"context": "The value is", "choices": ["a", "object", "documentation"], "label": 1},
        {"context": "A function", "choices": ["object", "q", "it is called"], "label": 0},
        {"context": "Names are", "choices": ["interpreter interpreter", "z", "the"], "label": 1},
    ]))


def test_acc_takes_the_highest_sum_and_acc_norm_the_highest_per_byte(uniform_model, tokenizer, choice_task):
    result = run_task(uniform_model, tokenizer, choice_task)
    log_v = math.log(uniform_model.config.vocab_size)
    prefix = document_start(tokenizer)
    for example, record in zip(choice_task.examples, result.records):
        pieces = [split_context(tokenizer, example["context"], " " + c, prefix)[1] for c in example["choices"]]
        counts = [len(p) for p in pieces]
        sizes = [len(tokenizer.decode_bytes(p)) for p in pieces]
        assert sizes == [len((" " + c).encode()) for c in example["choices"]] == record["bytes"]
        assert record["logprobs"] == pytest.approx([-n * log_v for n in counts], rel=1e-5)
        assert record["prediction"] == counts.index(min(counts))
        ratios = [n / b for n, b in zip(counts, sizes)]
        assert record["prediction_norm"] == ratios.index(min(ratios))
    assert any(r["prediction"] != r["prediction_norm"] for r in result.records), "the fixture must tell them apart"
    assert result.metrics["acc"] == sum(r["prediction"] == r["label"] for r in result.records) / 3
    assert result.metrics["acc_norm"] == sum(r["prediction_norm"] == r["label"] for r in result.records) / 3


def test_all_choices_of_all_examples_are_scored_in_one_call(model, tokenizer, choice_task, monkeypatch):
    calls = []

    def counting(model, requests, **kwargs):
        calls.append(len(requests))
        return score(model, requests, **kwargs)

    score = runner.score_continuations
    monkeypatch.setattr(runner, "score_continuations", counting)
    run_task(model, tokenizer, choice_task, batch_size=4)
    assert calls == [9]


def test_classification_picks_the_most_likely_label_and_counts_a_confusion_matrix(uniform_model, tokenizer, tmp_path):
    # Under the uniform model the label with fewer tokens always wins.
    task = load_task(write_jsonl(tmp_path / "cls.jsonl", [
        {"task": {"labels": ["the", "xqzjvk"], "template": "Text: {text}\nLabel:"}},
        {"text": "one", "label": "the"}, {"text": "two", "label": "the"}, {"text": "three", "label": "xqzjvk"},
    ]))
    result = run_task(uniform_model, tokenizer, task)
    assert [r["prediction"] for r in result.records] == ["the"] * 3
    assert result.records[0]["prompt"] == "Text: one\nLabel:"
    assert result.labels == ["the", "xqzjvk"] and result.confusion_matrix == [[2, 0], [1, 0]]
    assert result.metrics["accuracy"] == pytest.approx(2 / 3)
    assert result.metrics["macro_f1"] == pytest.approx((0.8 + 0) / 2)


def test_generation_scores_a_model_against_its_own_greedy_output_as_perfect(model, tokenizer, tmp_path):
    prompts = ["The value of", "A class is", "Names are bound"]
    header = {"task": {"max_new_tokens": 6, "stop": []}}
    first = run_task(model, tokenizer, load_task(write_jsonl(tmp_path / "a.jsonl",
                                                             [header, *({"prompt": p, "answer": "-"} for p in prompts)])))
    outputs = [r["prediction"] for r in first.records]
    again = run_task(model, tokenizer, load_task(write_jsonl(tmp_path / "b.jsonl",
                                                             [header, *({"prompt": p, "answers": ["nope", o]} for p, o in zip(prompts, outputs))])))
    assert [r["prediction"] for r in again.records] == outputs
    assert again.metrics["exact_match"] == 1.0 and again.metrics["f1"] == 1.0
    assert all(r["correct"] for r in again.records) and not any(r["correct"] for r in first.records)


def test_limit_evaluates_the_first_examples_only(model, tokenizer):
    result = run_task(model, tokenizer, load_task("python-docs-cloze"), limit=5)
    assert result.n == 5 and [r["id"] for r in result.records] == [f"cloze-{n:03d}" for n in range(5)]
    with pytest.raises(ConfigError, match="limit"):
        run_task(model, tokenizer, load_task("python-docs-cloze"), limit=0)


def test_an_example_longer_than_the_context_names_the_task_and_the_example(tokenizer, tmp_path):
    short = GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size, block_size=32)).eval()
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"context": "Short.", "choices": ["a", "b"], "label": 0},
        {"id": "big", "context": "word " * 60, "choices": ["a", "b"], "label": 0},
    ])
    with pytest.raises(ContextTooLongError, match=rf"task 'long', example {tmp_path}/long.jsonl:2 \(id 'big'\): example needs"):
        run_task(short, tokenizer, load_task(path))
    assert run_task(short, tokenizer, load_task(path), truncate=True).n == 2
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"task": {"max_new_tokens": 4}}, {"prompt": "Hi", "answer": "a"},
                                                 {"prompt": "word " * 60, "answer": "a"}])
    with pytest.raises(ContextTooLongError, match=rf"task 'gen', example {tmp_path}/gen.jsonl:3: "):
        run_task(short, tokenizer, load_task(gen))


def test_a_random_model_scores_near_chance_on_every_builtin_task(model, tokenizer):
    results = {name: run_task(model, tokenizer, load_task(name), limit=20 if name == "python-docs-completion" else None)
               for name in BUILTINS}
    for name in ("python-docs-cloze", "python-docs-continuation"):
        assert abs(results[name].metrics["acc"] - 0.25) < 0.15, results[name].metrics  # 4 standard errors at n=150
        assert abs(results[name].metrics["acc_norm"] - 0.25) < 0.15, results[name].metrics
    assert abs(results["python-docs-real-or-shuffled"].metrics["accuracy"] - 0.5) < 0.15
    assert results["python-docs-completion"].metrics["exact_match"] < 0.1
    assert results["python-docs-completion"].n == 20


# ---- the whole evaluation ------------------------------------------------------------------
def test_evaluate_model_runs_tasks_and_text_and_save_report_writes_results_and_predictions(model, tokenizer, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "predictions-old-task.jsonl").write_text("{}\n")
    report = evaluate_model(model, tokenizer, tasks=BUILTINS, text="The quick brown fox. " * 20, limit=4, progress=False)
    results = save_report(report, out)
    data = json.loads(results.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert results == out / "results.json"
    assert list(data["tasks"]) == BUILTINS
    assert data["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert data["model"]["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    assert data["language_modeling"]["text"]["bits_per_byte"] > 0
    assert data["settings"]["limit"] == 4
    for name in BUILTINS:
        entry = data["tasks"][name]
        assert entry["n"] == 4 and entry["examples_per_second"] > 0
        lines = (out / entry["predictions"]).read_text().splitlines()
        assert len(lines) == 4 and all("prediction" in json.loads(line) for line in lines)
    assert data["tasks"]["python-docs-real-or-shuffled"]["labels"] == ["real", "shuffled"]
    assert not (out / "predictions-old-task.jsonl").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", *(f"predictions-{n}.jsonl" for n in BUILTINS)])


def test_evaluate_model_refuses_nothing_to_do_and_two_tasks_of_one_name(model, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate_model(model, tokenizer, progress=False)
    other = write_jsonl(tmp_path / "x.jsonl", [{"task": {"name": "python-docs-cloze"}}, {"prompt": "p", "answer": "a"}])
    with pytest.raises(ConfigError, match="two tasks are named 'python-docs-cloze'"):
        evaluate_model(model, tokenizer, tasks=["python-docs-cloze", other], progress=False)


def test_results_go_next_to_the_model(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    gguf = tmp_path / "SmolLM2.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert default_results_dir(folder) == folder / "eval"
    assert default_results_dir(gguf) == tmp_path / "SmolLM2.Q4_1.eval"
