"""Instruction data for supervised fine-tuning: JSONL records in the common shapes as
conversations, conversations as token ids with a loss mask on the assistant's tokens, and
batches made of them by padding or by packing. DPO (`dpo.py`) encodes each answer of a pair
with the same `encode_conversation`, labelling only the last assistant message.

The loss mask is built from the model's own chat template, not from a hand-written copy of it
(litgpt's weak spot): for each assistant message we render the conversation up to the opening
of that message's turn (`add_generation_prompt=True`) and through the message, and train on the
tokens in between, cut after the end-of-turn token that closes the message so the model learns
to stop. Nothing of the system or user messages, and nothing of the template's own text, is
trained on. A model without a chat template (and without ChatML's tokens) takes a single user
message as plain text followed by the answer and the end-of-sequence token.

Labels convention, the one place it is defined for `scratchlm.finetune` (SFT and DPO alike),
matching `GPT.forward(idx, targets)`: the model applies `cross_entropy(logits[t], targets[t])`,
so `targets[t]` is the token that *follows* `input_ids[t]`, or -100 where that next token is not
trained on. An `EncodedExample` keeps the whole token sequence (`tokens`) with one label per
token (`labels`: the token itself where it is trained on, else -100); `input_ids`
(`tokens[:-1]`) and `targets` (`labels[1:]`) are the shifted pair the model takes, and every
batch function builds its rows from those two. A sequence of `block_size + 1` tokens therefore
fills the model's context exactly, as a pretraining window does.

Truncation vocabulary, shared with DPO: an example whose `input_ids` exceed `block_size` is
dropped (`truncate="drop"`, the default) or loses tokens from its start (`"left"`), never from
its last answer: that answer and its end-of-turn token are what is learnt (or, in DPO, compared),
while the start of a long prompt is the part the answer depends on least. An example whose last
answer alone does not fit is dropped either way.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from scratchlm.errors import ConfigError
from scratchlm.finetune.config import TRUNCATE_CHOICES, Truncate
from scratchlm.finetune.records import (
    SHAREGPT_ROLES,
    Message,
    RecordError,
    RecordReport,
    check_conversation,
    parse_messages,
    read_jsonl,
    text_field,
)
from scratchlm.tokenizer.chat_template import chat_stop_ids, has_chat_template, render_chat
from scratchlm.tokenizer import Tokenizer

IGNORE = -100  # the ignore_index GPT.forward passes to cross_entropy
TrainOn = Literal["all", "last"]
TRAIN_ON_CHOICES = ("all", "last")


# ---- reading JSONL ---------------------------------------------------------------------


def _alpaca(record: Mapping) -> list[Message]:
    instruction, extra, output = text_field(record, "instruction"), text_field(record, "input", required=False), text_field(record, "output")
    # Alpaca's own prompt puts the input after the instruction; a blank line keeps them apart.
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    system = text_field(record, "system", required=False)
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def record_to_messages(record: object) -> list[Message]:
    """One JSON record in any of the accepted shapes as a checked list of messages, or
    RecordError saying why it is unusable. Shapes: {"messages": [{"role", "content"}]},
    ShareGPT {"conversations": [{"from", "value"}]}, Alpaca {"instruction", "input"?,
    "output"}, {"prompt", "completion"}."""
    if not isinstance(record, Mapping):
        raise RecordError(f"not a JSON object (a {type(record).__name__})")
    if "messages" in record:
        messages = parse_messages(record["messages"], "messages")
    elif "conversations" in record:
        messages = parse_messages(record["conversations"], "conversations", SHAREGPT_ROLES, "from", "value")
    elif "instruction" in record or "output" in record:
        messages = _alpaca(record)
    elif "prompt" in record or "completion" in record:
        messages = [{"role": "user", "content": text_field(record, "prompt")}, {"role": "assistant", "content": text_field(record, "completion")}]
    else:
        raise RecordError("no known shape: expected 'messages', 'conversations', 'instruction'/'output' or 'prompt'/'completion'")
    check_conversation(messages)
    return messages


def load_instructions(path: str | Path) -> tuple[list[list[Message]], RecordReport]:
    """Conversations from a JSONL file, one record a line, shapes mixed freely. A malformed
    record (bad JSON or UTF-8, missing field, wrong role, empty answer, not ending with the
    assistant) is skipped and reported by line number; blank lines are ignored. A file that is
    missing, unreadable or has no usable record raises InputFileError."""
    report = RecordReport(path=str(path), kind="conversations")
    conversations: list[list[Message]] = []
    for number, record in read_jsonl(path, report):
        try:
            conversations.append(record_to_messages(record))
        except RecordError as error:
            report.reject(number, str(error))
            continue
        report.kept.append(number)
    report.require_some()
    return conversations, report


# ---- encoding with the loss mask -------------------------------------------------------


@dataclass(frozen=True)
class EncodedExample:
    """One conversation as tokens, with `labels[i] = tokens[i]` where token i is the
    assistant's (its answer and the end-of-turn token closing it) and -100 elsewhere."""

    tokens: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def input_ids(self) -> list[int]:
        """What the model reads: every token but the last, which has nothing after it to predict."""
        return self.tokens[:-1]

    @property
    def targets(self) -> list[int]:
        """`targets[t]`: the label of the token after `input_ids[t]`, as GPT.forward wants."""
        return self.labels[1:]


@dataclass
class EncodeStats:
    """How many conversations `encode_conversations` kept whole, cut to the context, or dropped."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0

    def count(self, truncated: bool | None) -> None:
        """One more item: dropped (None), cut to fit (True) or kept whole (False)."""
        if truncated is None:
            self.dropped += 1
        elif truncated:
            self.truncated += 1
        else:
            self.kept += 1


def _end_of_answer(ids: list[int], stop_ids: tuple[int, ...]) -> int:
    """Length of the trained part of an assistant span: up to and including the last
    end-of-turn token, leaving out what the template writes after it (ChatML's newline)."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] in stop_ids:
            return i + 1
    raise ConfigError(
        "chat template: it does not close an assistant message with an end-of-turn or end-of-sequence token "
        f"(any of ids {list(stop_ids)}); a model fine-tuned on it would not learn to stop"
    )


def _answer_ids(tokenizer: Tokenizer, span: str, content: str) -> list[int]:
    """Tokens of an assistant span (the answer and the template text closing it). The answer is
    encoded as plain text: at inference the model generates ids, so an answer containing the
    string "<|im_end|>" must not become the end-of-turn token and end its turn early. A
    template that rewrites the answer (not found at the span's start, even stripped) leaves
    only the span as a whole to encode, special tokens allowed."""
    for body in (content, content.strip()):
        if body and span.startswith(body):
            return tokenizer.encode_ordinary(body) + tokenizer.encode(span[len(body) :], allowed_special="all")
    return tokenizer.encode(span, allowed_special="all")


def _render_pieces(tokenizer: Tokenizer, messages: Sequence[Message], labelled: Sequence[int]) -> list[tuple[str, str | None]]:
    """The conversation's text cut into consecutive pieces, each paired with the answer's text
    when it is the span of a labelled assistant message (None otherwise). Raises ConfigError
    when the template does not render a shorter conversation as a prefix of a longer one: such a
    template (one that rewrites earlier turns) has no span we could train on that matches what
    the model sees at inference."""
    pieces: list[tuple[str, str | None]] = []
    done = ""
    for n in labelled:
        if n == 0:
            raise ConfigError("chat template: a conversation starts with an assistant message; nothing prompts it")
        prompt = render_chat(tokenizer, messages[:n], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: n + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not through.startswith(prompt):
            raise ConfigError(
                "chat template: it does not render a conversation's beginning as a prefix of the whole "
                f"(at message {n}); the loss mask cannot be taken from it"
            )
        pieces += [(prompt[len(done) :], None), (through[len(prompt) :], messages[n]["content"])]
        done = through
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    if not full.startswith(done):
        raise ConfigError("chat template: it renders the whole conversation differently from its beginning; the loss mask cannot be taken from it")
    pieces.append((full[len(done) :], None))
    return pieces


def _encode_plain(tokenizer: Tokenizer, messages: Sequence[Message]) -> EncodedExample:
    """A model without a chat template continues text: the user's message as it is, then the
    answer and end of sequence (labelled, so it learns to stop)."""
    if [m["role"] for m in messages] != ["user", "assistant"]:
        raise ConfigError("the model has no chat template, so each conversation must be a single user message and its answer")
    if tokenizer.eos_id is None:
        raise ConfigError("the tokenizer has no end-of-sequence token to end an answer with")
    prompt = tokenizer.encode_ordinary(messages[0]["content"])
    answer = tokenizer.encode_ordinary(messages[1]["content"]) + [tokenizer.eos_id]
    return EncodedExample(prompt + answer, [IGNORE] * len(prompt) + answer)


def encode_messages(tokenizer: Tokenizer, messages: Sequence[Message], train_on: TrainOn = "all") -> EncodedExample:
    """Tokens and labels of a whole conversation, not fitted to any context: every assistant
    message labelled (`train_on="all"`, SFT) or only the last one (`"last"`: DPO scores one answer
    to a prompt that may hold earlier answers). Each piece between template boundaries is
    encoded on its own: that is how the model meets them at inference (the prompt is encoded,
    the answer is generated token by token), and it keeps the token prefix property exact even
    where BPE would merge characters across a boundary."""
    if train_on not in TRAIN_ON_CHOICES:
        raise ConfigError(f"train_on is {train_on!r}; expected one of {', '.join(TRAIN_ON_CHOICES)}")
    if not has_chat_template(tokenizer):
        return _encode_plain(tokenizer, messages)
    answers = [n for n, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise ConfigError("a conversation to encode has no assistant message to label")
    stop_ids = chat_stop_ids(tokenizer)
    tokens: list[int] = []
    labels: list[int] = []
    for text, answer in _render_pieces(tokenizer, messages, answers if train_on == "all" else answers[-1:]):
        if answer is None:
            ids, trained = tokenizer.encode(text, allowed_special="all"), 0
        else:
            ids = _answer_ids(tokenizer, text, answer)
            trained = _end_of_answer(ids, stop_ids)
        tokens += ids
        labels += ids[:trained] + [IGNORE] * (len(ids) - trained)
    return EncodedExample(tokens, labels)


def _last_answer_start(labels: Sequence[int]) -> int:
    """Index of the first labelled token of the last labelled run (0 when nothing is labelled)."""
    end = next((i for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE), None)
    if end is None:
        return 0
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start


def cut_left(example: EncodedExample, count: int) -> EncodedExample | None:
    """`example` without its first `count` tokens, or None when that would cut into its last
    answer: all of that answer's labelled tokens stay, and its first one keeps a token before it,
    since only a token that follows another is ever a target."""
    if count <= 0:
        return example
    if count >= _last_answer_start(example.labels):
        return None
    return EncodedExample(example.tokens[count:], example.labels[count:], truncated=True)


def check_truncation(block_size: int, truncate: str) -> None:
    """ConfigError for a truncation mode outside TRUNCATE_CHOICES or a block_size below 1."""
    if truncate not in TRUNCATE_CHOICES:
        raise ConfigError(f"truncate is {truncate!r}; expected one of {', '.join(TRUNCATE_CHOICES)}")
    if block_size < 1:
        raise ConfigError(f"block_size is {block_size}; it must be at least 1")


def encode_conversation(
    tokenizer: Tokenizer, messages: Sequence[Message], block_size: int, truncate: Truncate = "drop", train_on: TrainOn = "all"
) -> EncodedExample | None:
    """`encode_messages` fitted to a context of `block_size`: a conversation whose `input_ids`
    exceed it is dropped (None) or, with truncate="left", loses tokens from its start (see the
    module docstring); one whose last answer alone does not fit is dropped either way."""
    check_truncation(block_size, truncate)
    example = encode_messages(tokenizer, messages, train_on)
    excess = len(example.input_ids) - block_size
    if excess <= 0:
        return example
    return None if truncate == "drop" else cut_left(example, excess)


def encode_conversations(
    tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]], block_size: int, truncate: Truncate = "drop"
) -> tuple[list[EncodedExample], EncodeStats]:
    """`encode_conversation` over a data set, counting what was kept, truncated and dropped."""
    examples: list[EncodedExample] = []
    stats = EncodeStats()
    for messages in conversations:
        example = encode_conversation(tokenizer, messages, block_size, truncate)
        stats.count(None if example is None else example.truncated)
        if example is not None:
            examples.append(example)
    return examples, stats


# ---- batches ---------------------------------------------------------------------------


def pad_batch(examples: Sequence[EncodedExample], pad_id: int) -> tuple[Tensor, Tensor]:
    """(idx, targets), both (B, T) int64 with T the longest example's input length; shorter
    rows padded on the right with `pad_id` and targets -100 there. Right padding keeps each
    row's real tokens at positions 0.. so causal attention never sees the padding."""
    if not examples:
        raise ValueError("pad_batch: no examples")
    width = max(len(e.input_ids) for e in examples)
    idx = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        idx[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        targets[row, :n] = torch.tensor(example.targets, dtype=torch.long)
    return idx, targets


@dataclass(frozen=True)
class PackedRow:
    """One row of `block_size` positions holding several examples back to back. `doc_ids[t]`
    numbers the example position t belongs to (0, 1, ... within the row; -1 for the padding
    after the last one), for `document_mask`."""

    input_ids: list[int]
    targets: list[int]
    doc_ids: list[int]


def pack_examples(examples: Sequence[EncodedExample], block_size: int, pad_id: int = 0) -> list[PackedRow]:
    """Examples concatenated, in order, into rows of exactly `block_size` positions: a new row
    starts when the next example does not fit, and the rest of a row is padding (`pad_id`,
    targets -100, its own document id -1, so it changes no loss and, under `document_mask`, no
    real token sees it). Short SFT examples would otherwise waste most of each padded row.
    Each example brings its own shifted targets, so the last position of an example never
    predicts the first token of the next one: that target is the example's own (-100 after its
    closing end-of-turn token)."""
    rows: list[PackedRow] = []
    ids: list[int] = []
    targets: list[int] = []
    docs: list[int] = []

    def close_row() -> None:
        pad = block_size - len(ids)
        rows.append(PackedRow(ids + [pad_id] * pad, targets + [IGNORE] * pad, docs + [-1] * pad))

    for example in examples:
        n = len(example.input_ids)
        if n > block_size:
            raise ConfigError(f"sft: an example of {n} tokens does not fit block_size {block_size}; encode with the same block_size")
        if len(ids) + n > block_size:
            close_row()
            ids, targets, docs = [], [], []
        docs += [docs[-1] + 1 if docs else 0] * n
        ids += example.input_ids
        targets += example.targets
    if ids:
        close_row()
    return rows


def stack_rows(rows: Sequence[PackedRow]) -> tuple[Tensor, Tensor, Tensor]:
    """(idx, targets, doc_ids) tensors of shape (B, block_size) from packed rows."""
    if not rows:
        raise ValueError("stack_rows: no rows")
    return (
        torch.tensor([r.input_ids for r in rows], dtype=torch.long),
        torch.tensor([r.targets for r in rows], dtype=torch.long),
        torch.tensor([r.doc_ids for r in rows], dtype=torch.long),
    )
