"""The human-feedback loop: uncertainty scores, review files, and reviews to SFT and DPO data."""

import csv
import json
import math

import pytest
import torch

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.finetune.dpo import load_preferences
from scratchlm.finetune.feedback import (
    Candidate,
    answer_uncertainty,
    build_datasets,
    load_prompts,
    most_uncertain,
    score_prompts,
    write_review_file,
)
from scratchlm.finetune.sft_data import load_instructions
from scratchlm.model import get_preset
from scratchlm.serve.web import FeedbackRequest, PreferenceRecord

from conftest import tiny_tokenizer

TEXT = ("The interpreter reads a line. A list holds items in order. A dict maps keys to values.\n") * 30
USER = [{"role": "user", "content": "What does a dict do?"}]


@pytest.fixture(scope="module")
def tokenizer():
    """Overrides conftest's: conftest's `model` then uses this one."""
    return tiny_tokenizer(TEXT)


class Fixed(torch.nn.Module):
    """Gives the same next-token distribution at every position."""

    def __init__(self, probs: list[float]) -> None:
        super().__init__()
        self.config = get_preset("cpu-tiny").replace(vocab_size=len(probs))
        self.logits = torch.tensor(probs).log()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None):
        return self.logits.expand(*idx.shape, -1), None


def test_entropy_and_margin_of_a_known_distribution():
    model = Fixed([0.5, 0.25, 0.25])
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert answer_uncertainty(model, [0, 1], [2, 0, 1], "entropy") == pytest.approx(entropy, rel=1e-5)
    assert answer_uncertainty(model, [0, 1], [2, 0, 1], "margin") == pytest.approx(1 - (0.5 - 0.25), rel=1e-5)
    assert answer_uncertainty(Fixed([0.98, 0.01, 0.01]), [0], [1], "entropy") < entropy  # a surer model scores lower
    assert answer_uncertainty(model, [0], [], "entropy") == 0.0
    with pytest.raises(ConfigError, match="method"):
        answer_uncertainty(model, [0], [1], "variance")


def test_select_scores_the_models_own_answers_and_keeps_the_most_uncertain(model, tokenizer, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"prompt": "What is a list?"}) + "\n" + "not json\n"
                    + json.dumps({"id": "q3", "messages": USER}) + "\n" + json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    prompts, report = load_prompts(pool)
    assert [p[0] for p in prompts] == ["1", "q3"]
    assert [r.line for r in report.rejected] == [2, 4]
    candidates = score_prompts(model, tokenizer, prompts, "entropy", max_new_tokens=8)
    assert all(c.answer and c.score > 0 for c in candidates)
    top = most_uncertain(candidates, 1)
    assert top[0].score == max(c.score for c in candidates)
    review = write_review_file(tmp_path / "review.jsonl", top)
    record = json.loads(review.read_text())
    assert record["rating"] is None and record["edited"] is None and record["messages"][-1]["role"] == "user"


def test_prompt_file_with_nothing_usable_is_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[]\n")
    with pytest.raises(InputFileError, match="no usable prompts"):
        load_prompts(bad)


def test_reviews_become_sft_conversations_and_dpo_pairs(tmp_path):
    candidates = [Candidate(str(n), USER, f"answer {n}", 1.0, "entropy") for n in range(4)]
    review = write_review_file(tmp_path / "review.jsonl", candidates)
    records = [json.loads(line) for line in review.read_text().splitlines()]
    records[0]["rating"] = "up"
    records[1]["rating"], records[1]["edited"] = "down", "A dict maps keys to values."
    records[2]["rating"] = "down"  # no edit: nothing better to learn
    review.write_text("".join(json.dumps(r) + "\n" for r in records))  # record 3: not reviewed
    report = build_datasets([review], tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl")
    assert (report.sft, report.dpo, report.rated_down, report.not_reviewed) == (2, 1, 1, 1)
    conversations, _ = load_instructions(tmp_path / "sft.jsonl")
    assert [c[-1]["content"] for c in conversations] == ["answer 0", "A dict maps keys to values."]
    pairs, _ = load_preferences(tmp_path / "dpo.jsonl")
    assert (pairs[0].chosen, pairs[0].rejected) == ("A dict maps keys to values.", "answer 1")


def test_csv_review_files_round_trip(tmp_path):
    review = write_review_file(tmp_path / "review.csv", [Candidate("a", USER, "maybe", 2.0, "margin")])
    rows = list(csv.DictReader(review.open()))
    rows[0]["edited"] = "It maps keys to values."
    with review.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = build_datasets([review], None, tmp_path / "dpo.jsonl")
    assert report.dpo == 1


def test_web_chat_feedback_becomes_training_data_latest_review_wins(tmp_path):
    feedback = tmp_path / "feedback.jsonl"
    lines = []
    for body in (
        {"reply_id": "chatcmpl-1", "model": "m", "messages": USER, "completion": "No idea.", "rating": "down"},
        {"reply_id": "chatcmpl-1", "model": "m", "messages": USER, "completion": "No idea.", "rating": "down",
         "edited": "A dict maps keys to values."},
        {"reply_id": "chatcmpl-2", "model": "m", "messages": USER, "completion": "It maps keys.", "rating": "up"},
    ):
        lines.append(PreferenceRecord.from_feedback(FeedbackRequest(**body)).to_json_line())
    feedback.write_text("".join(lines))
    report = build_datasets([feedback], tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl")
    assert (report.sft, report.dpo, report.replaced) == (2, 1, 1)
    pairs, _ = load_preferences(tmp_path / "dpo.jsonl")
    assert pairs[0].rejected == "No idea."


def test_malformed_reviews_are_reported_by_line(tmp_path):
    review = tmp_path / "review.jsonl"
    review.write_text(json.dumps({"messages": USER, "answer": "a", "rating": "meh"}) + "\n"
                      + json.dumps({"answer": "a", "rating": "up"}) + "\n")
    report = build_datasets([review], tmp_path / "sft.jsonl", None)
    rejected = report.reports[0].rejected
    assert [(r.line, "rating" in r.reason or "messages" in r.reason) for r in rejected] == [(1, True), (2, True)]
    with pytest.raises(ConfigError, match="--sft"):
        build_datasets([review], None, None)


@pytest.mark.slow  # fresh interpreters import torch
def test_feedback_commands_end_to_end(model, tokenizer, tmp_path):
    import subprocess
    import sys

    from scratchlm.model.folder import save_model_folder

    folder = save_model_folder(tmp_path / "tiny", model, tokenizer)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["What is a list?", "What is a dict?", "Why?"]))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "scratchlm.cli", "feedback", *args], capture_output=True, text=True, timeout=300)

    selected = run("select", str(folder), "--prompts", str(pool), "--out", str(tmp_path / "review.jsonl"), "--top", "2",
                   "--max-new-tokens", "6")
    assert selected.returncode == 0, selected.stderr
    records = [json.loads(line) for line in (tmp_path / "review.jsonl").read_text().splitlines()]
    assert len(records) == 2
    records[0]["edited"] = "A list holds items in order."
    (tmp_path / "review.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    built = run("build", str(tmp_path / "review.jsonl"), "--sft", str(tmp_path / "sft.jsonl"), "--dpo", str(tmp_path / "dpo.jsonl"))
    assert built.returncode == 0, built.stderr
    assert "1 SFT conversations, 1 DPO pairs" in built.stdout
    missing = run("build", str(tmp_path / "nope.jsonl"), "--sft", str(tmp_path / "x.jsonl"))
    assert missing.returncode == 2 and missing.stderr.startswith("scratchlm: error:") and "Traceback" not in missing.stderr
