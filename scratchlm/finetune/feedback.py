"""The human-feedback loop: find what the model is unsure of, have a person review it, and turn
the reviews into fine-tuning data.

    select: prompts -> the model's greedy answers, scored by uncertainty -> the most uncertain
            ones, written for review (JSONL, or CSV for a spreadsheet)
    build:  reviewed files and the web chat page's feedback -> SFT conversations and DPO pairs

Uncertainty is measured on the model's own answer, token by token (a prompt is only uncertain
through what the model would say to it): "entropy" is the mean entropy in nats of the
next-token distribution over the answer's tokens (Settles 2009's uncertainty sampling, per
token); "margin" is one minus the mean gap between the two most likely tokens' probabilities.
Either way, higher means less sure.

A review is a rating ("up" or "down") and/or an edited answer. What each becomes:

| review | SFT conversation | DPO pair |
| --- | --- | --- |
| up, not edited | prompt + the model's answer | - |
| edited (any rating) | prompt + the edited answer | chosen: edited, rejected: the model's answer |
| down, not edited | - (no better answer to learn) | - |
| none | - (not reviewed yet) | - |
"""

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.atomic_io import check_writable_file, write_text_atomic
from scratchlm.data.feedback_records import latest_per_reply, reply_key
from scratchlm.errors import ConfigError
from scratchlm.finetune.records import Message, RecordError, RecordReport, parse_messages, read_jsonl, text_field
from scratchlm.tokenizer.chat_template import chat_stop_ids, has_chat_template, render_chat
from scratchlm.model.sampling import SamplingConfig, encode_prompt, generate
from scratchlm.tokenizer import Tokenizer

METHODS = ("entropy", "margin")
RATINGS = ("up", "down")


@dataclass
class Candidate:
    """A prompt, the model's answer, and how unsure the model was of it."""

    id: str
    messages: list[Message]
    answer: str
    score: float
    method: str

    def review_record(self) -> dict:
        return {"id": self.id, "messages": self.messages, "answer": self.answer, "score": round(self.score, 6),
                "method": self.method, "rating": None, "edited": None}


# ---- select ----------------------------------------------------------------------------------
def load_prompts(path: str | Path) -> tuple[list[tuple[str, list[Message]]], RecordReport]:
    """(id, messages) of each prompt in a JSONL file: {"prompt": text} or {"messages": [...]},
    with an optional "id" (default: the line number). Messages must end with a user message."""
    report = RecordReport(str(path), kind="prompts")
    prompts = []
    for line, record in read_jsonl(path, report):
        try:
            if "messages" in record:
                messages = parse_messages(record["messages"], "messages")
            else:
                messages = [{"role": "user", "content": text_field(record, "prompt")}]
            if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
                raise RecordError("the last message must be a non-empty user message: the prompt to answer")
        except RecordError as error:
            report.reject(line, str(error))
            continue
        report.kept.append(line)
        prompts.append((str(record.get("id", line)), messages))
    report.require_some()
    return prompts, report


def prompt_text(tokenizer: Tokenizer, messages: Sequence[Message]) -> str:
    """The text the model continues: its chat template, or for a model without one the last
    user message as plain text (a base model completes text; it does not hold conversations)."""
    if has_chat_template(tokenizer):
        return render_chat(tokenizer, messages)
    return messages[-1]["content"]


@torch.no_grad()
def answer_uncertainty(model: nn.Module, prompt_ids: Sequence[int], answer_ids: Sequence[int], method: str) -> float:
    """Uncertainty of the model over the tokens of its answer (see the module's docstring).
    0 for an empty answer: the model was sure enough to stop at once."""
    if method not in METHODS:
        raise ConfigError(f"feedback: method must be one of {', '.join(METHODS)}, not {method!r}")
    if not answer_ids:
        return 0.0
    ids = list(prompt_ids) + list(answer_ids)
    ids = ids[-(model.config.block_size + 1) :]  # the answer is never longer than the context
    logits, _ = model(torch.tensor([ids[:-1]], device=next(model.parameters()).device))
    probs = F.softmax(logits[0, -len(answer_ids) :].float(), dim=-1)
    if method == "entropy":
        return float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
    top2 = probs.topk(2, dim=-1).values
    return float(1 - (top2[:, 0] - top2[:, 1]).mean())


def score_prompts(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[tuple[str, list[Message]]],
    method: str = "entropy",
    max_new_tokens: int = 64,
    max_batch: int = 8,
) -> list[Candidate]:
    """The model's greedy answer to each prompt (batched, through the one sampling
    implementation), and its uncertainty over that answer."""
    if method not in METHODS:
        raise ConfigError(f"feedback: method must be one of {', '.join(METHODS)}, not {method!r}")
    texts = [prompt_text(tokenizer, messages) for _, messages in prompts]
    config = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=chat_stop_ids(tokenizer),
                            truncate=True)
    completions = generate(model, tokenizer, texts, config, max_batch=max_batch)
    candidates = []
    was_training = model.training
    model.eval()
    try:
        for (prompt_id, messages), text, completion in zip(prompts, texts, completions):
            score = answer_uncertainty(model, encode_prompt(tokenizer, text), completion.token_ids, method)
            candidates.append(Candidate(prompt_id, messages, completion.text, score, method))
    finally:
        model.train(was_training)
    return candidates


def most_uncertain(candidates: Sequence[Candidate], top: int) -> list[Candidate]:
    if top < 1:
        raise ConfigError(f"feedback: --top must be >= 1, not {top}")
    return sorted(candidates, key=lambda c: c.score, reverse=True)[:top]


def write_review_file(path: str | Path, candidates: Sequence[Candidate]) -> Path:
    """The candidates for review: JSONL, or CSV when the path ends in .csv (messages as JSON in
    one column; fill in `rating` and/or `edited`)."""
    path = Path(path)
    records = [c.review_record() for c in candidates]
    if path.suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]) if records else ["id"])
        writer.writeheader()
        for record in records:
            writer.writerow({**record, "messages": json.dumps(record["messages"], ensure_ascii=False),
                             "rating": "", "edited": ""})
        return write_text_atomic(path, buffer.getvalue())
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@dataclass
class Selection:
    """What `select_for_review` wrote: the chosen answers, out of how many were scored."""

    out: Path
    chosen: list[Candidate]
    scored: int


def select_for_review(
    model_path: str | Path,
    prompts_path: str | Path,
    out: str | Path,
    top: int = 20,
    method: str = "entropy",
    max_new_tokens: int = 64,
    device: str = "cpu",
    note: Callable[[str], None] | None = None,
) -> Selection:
    """The whole select step: answer every prompt of `prompts_path` with the model at
    `model_path`, score the answers by `method`, and write the `top` most uncertain to `out` for
    review. Everything a user can get wrong (the output path, --top, --method, the prompts file)
    fails before the model loads; `note` hears the prompts file's report."""
    from scratchlm.interop import open_model

    out = Path(out)
    check_writable_file(out)
    most_uncertain([], top)  # a bad --top fails now, not after every prompt is answered
    if method not in METHODS:
        raise ConfigError(f"feedback: method must be one of {', '.join(METHODS)}, not {method!r}")
    prompts, report = load_prompts(prompts_path)
    if note is not None:
        note(report.summary())
    opened = open_model(model_path, device, kind="language-model")
    model, tokenizer = opened.model, opened.tokenizer
    candidates = score_prompts(model, tokenizer, prompts, method, max_new_tokens)
    chosen = most_uncertain(candidates, top)
    write_review_file(out, chosen)
    return Selection(out, chosen, len(candidates))


# ---- build -----------------------------------------------------------------------------------
@dataclass
class Review:
    """One reviewed answer, from a review file or the web chat page's feedback."""

    key: str  # the reply it reviews: a later review of the same reply replaces an earlier one
    messages: list[Message]
    answer: str
    rating: str | None
    edited: str | None


@dataclass
class BuildReport:
    reports: list[RecordReport] = field(default_factory=list)
    sft: int = 0
    dpo: int = 0
    not_reviewed: int = 0
    rated_down: int = 0  # down without an edit: nothing better to learn from
    replaced: int = 0

    def summary(self) -> str:
        lines = [r.summary() for r in self.reports]
        lines.append(f"{self.sft} SFT conversations, {self.dpo} DPO pairs; skipped: {self.not_reviewed} not reviewed, "
                     f"{self.rated_down} rated down without an edit, {self.replaced} replaced by a later review")
        return "\n".join(lines)


def _optional_text(record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None  # a CSV cell left empty, or JSON null: no review of that kind
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} is {type(value).__name__}, not text")
    return value


def _review(record: dict, line: int, path: str) -> Review:
    rating = _optional_text(record, "rating")
    if rating is not None and rating not in RATINGS:
        raise RecordError(f"rating must be 'up', 'down' or empty, not {rating!r}")
    messages = record["messages"]
    if isinstance(messages, str):  # the CSV review file holds them as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RecordError("field 'messages' is not a JSON list of messages") from None
    answer_key = "completion" if "completion" in record else "answer"  # the web page's name, or ours
    key = reply_key(record.get("reply_id"), record.get("id"), f"{path}:{line}")
    return Review(key, parse_messages(messages, "messages"), text_field(record, answer_key), rating,
                  _optional_text(record, "edited"))


def _review_rows(path: Path, report: RecordReport):
    if path.suffix.lower() != ".csv":
        yield from read_jsonl(path, report)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read as UTF-8 CSV ({error})") from None
    for number, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):  # line 1 is the header
        yield number, dict(row)


def load_reviews(paths: Sequence[str | Path]) -> tuple[list[Review], BuildReport]:
    """Every review in the files (review files from `select`, JSONL or CSV, and the web chat
    page's feedback.jsonl), the latest review of each reply only."""
    build = BuildReport()
    reviews: list[Review] = []
    for path in map(Path, paths):
        report = RecordReport(str(path), kind="reviews")
        build.reports.append(report)
        for line, record in _review_rows(path, report):
            try:
                review = _review(record, line, str(path))
            except (RecordError, KeyError) as error:
                report.reject(line, str(error) if isinstance(error, RecordError) else f"missing field {error}")
                continue
            report.kept.append(line)
            reviews.append(review)
    latest, replaced = latest_per_reply(reviews, lambda r: r.key)
    build.replaced += len(replaced)
    return latest, build


def build_datasets(paths: Sequence[str | Path], sft_out: str | Path | None, dpo_out: str | Path | None) -> BuildReport:
    """Turn reviews into `{"messages": [...]}` SFT lines and `{"prompt": [...], "chosen",
    "rejected"}` DPO lines (the formats `sft_data.load_instructions` and `dpo.load_preferences`
    read), as the table in the module's docstring says."""
    if sft_out is None and dpo_out is None:
        raise ConfigError("feedback build: give --sft and/or --dpo, the files to write")
    reviews, build = load_reviews(paths)
    sft_lines, dpo_lines = [], []
    for review in reviews:
        if review.edited is not None:
            sft_lines.append({"messages": review.messages + [{"role": "assistant", "content": review.edited}]})
            if review.edited.strip() != review.answer.strip():
                dpo_lines.append({"prompt": review.messages, "chosen": review.edited, "rejected": review.answer})
        elif review.rating == "up":
            sft_lines.append({"messages": review.messages + [{"role": "assistant", "content": review.answer}]})
        elif review.rating == "down":
            build.rated_down += 1
        else:
            build.not_reviewed += 1
    if sft_out is not None:
        write_text_atomic(sft_out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sft_lines))
        build.sft = len(sft_lines)
    if dpo_out is not None:
        write_text_atomic(dpo_out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dpo_lines))
        build.dpo = len(dpo_lines)
    return build


__all__ = [
    "METHODS", "BuildReport", "Candidate", "Review", "answer_uncertainty", "build_datasets", "load_prompts",
    "load_reviews", "most_uncertain", "prompt_text", "score_prompts", "write_review_file",
]
