"""Instruction data for supervised fine-tuning: JSONL records in the common shapes as
conversations, conversations as token ids with a loss mask on the assistant's tokens, and
batches made of them by padding or by packing.

The loss mask is built from the model's own chat template, not from a hand-written copy of it
(litgpt's weak spot): for each assistant message we render the conversation up to the opening
of that message's turn (`add_generation_prompt=True`) and through the message, and train on the
tokens in between, cut after the end-of-turn token that closes the message so the model learns
to stop. Nothing of the system or user messages, and nothing of the template's own text, is
trained on.

Labels convention, matching `GPT.forward(idx, targets)`: the model applies
`cross_entropy(logits[t], targets[t])`, so `targets[t]` is the token that *follows*
`input_ids[t]`, or -100 where that next token is not the assistant's. An `EncodedExample` keeps
the whole token sequence (`tokens`) with one label per token (`labels`: the token itself where
it is trained on, else -100); `input_ids` (`tokens[:-1]`) and `targets` (`labels[1:]`) are the
shifted pair the model takes. A sequence of `block_size + 1` tokens therefore fills the
model's context exactly, as a pretraining window does.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.serve.chat_template import chat_stop_ids, render_chat
from scratchlm.tokenizer import Tokenizer

IGNORE = -100  # the ignore_index GPT.forward passes to cross_entropy
Truncate = Literal["drop", "right"]
TRUNCATE_CHOICES = ("drop", "right")
# ShareGPT's speaker names, as the role names of the chat templates.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_ROLES = ("system", "user", "assistant")

Message = dict[str, str]


# ---- reading JSONL ---------------------------------------------------------------------


@dataclass
class InstructionReport:
    """What `load_instructions` did with a file: how many records it kept, and each rejected
    line with the reason, so a user can fix the data instead of training on a silent subset."""

    path: str
    kept: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)

    def summary(self, limit: int = 5) -> str:
        """One line for a log: counts and the first few rejections as path:line."""
        text = f"{self.path}: kept {self.kept} conversations, rejected {len(self.rejected)}"
        if self.rejected:
            shown = "; ".join(f"{self.path}:{line}: {reason}" for line, reason in self.rejected[:limit])
            more = f"; ... {len(self.rejected) - limit} more" if len(self.rejected) > limit else ""
            text += f" ({shown}{more})"
        return text


class RecordError(ValueError):
    """A record that is not a usable conversation; its message is the reason reported."""


def _text(record: Mapping, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise RecordError(f"missing field {key!r}")
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} is {type(value).__name__}, not text")
    return value


def _alpaca(record: Mapping) -> list[Message]:
    instruction, extra, output = _text(record, "instruction"), _text(record, "input", required=False), _text(record, "output")
    # Alpaca's own prompt puts the input after the instruction; a blank line keeps them apart.
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    system = _text(record, "system", required=False)
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def _prompt_completion(record: Mapping) -> list[Message]:
    return [{"role": "user", "content": _text(record, "prompt")}, {"role": "assistant", "content": _text(record, "completion")}]


def _message_list(items: object, key: str, role_key: str, content_key: str, roles: Mapping[str, str]) -> list[Message]:
    if not isinstance(items, list) or not items:
        raise RecordError(f"field {key!r} is not a non-empty list of messages")
    messages = []
    for n, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise RecordError(f"{key}[{n}] is not an object")
        role = item.get(role_key)
        if role not in roles:
            raise RecordError(f"{key}[{n}] has role {role!r}; expected one of {', '.join(sorted(roles))}")
        content = item.get(content_key)
        if not isinstance(content, str):
            raise RecordError(f"{key}[{n}] has no text {content_key!r}")
        messages.append({"role": roles[role], "content": content})
    return messages


def record_to_messages(record: object) -> list[Message]:
    """One JSON record in any of the accepted shapes as a checked list of messages, or
    RecordError saying why it is unusable. Shapes: {"messages": [{"role", "content"}]},
    ShareGPT {"conversations": [{"from", "value"}]}, Alpaca {"instruction", "input"?,
    "output"}, {"prompt", "completion"}."""
    if not isinstance(record, Mapping):
        raise RecordError(f"record is {type(record).__name__}, not an object")
    if "messages" in record:
        messages = _message_list(record["messages"], "messages", "role", "content", {r: r for r in MESSAGE_ROLES})
    elif "conversations" in record:
        messages = _message_list(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    elif "instruction" in record or "output" in record:
        messages = _alpaca(record)
    elif "prompt" in record or "completion" in record:
        messages = _prompt_completion(record)
    else:
        raise RecordError("no known shape: expected 'messages', 'conversations', 'instruction'/'output' or 'prompt'/'completion'")
    check_conversation(messages)
    return messages


def check_conversation(messages: Sequence[Message]) -> None:
    """The rules a conversation must follow to train on: it has an answer to learn (ends with a
    non-empty assistant message), every assistant message answers something (a user message
    comes before the first one), and no user message is empty."""
    if messages[-1]["role"] != "assistant":
        raise RecordError(f"last message is from the {messages[-1]['role']}, not the assistant: nothing to learn")
    for n, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise RecordError(f"empty answer (message {n})")
        if message["role"] == "user" and not message["content"].strip():
            raise RecordError(f"empty user message (message {n})")
    first_assistant = next(n for n, m in enumerate(messages) if m["role"] == "assistant")
    if not any(m["role"] == "user" for m in messages[:first_assistant]):
        raise RecordError("the assistant speaks before any user message")


def load_instructions(path: str | Path) -> tuple[list[list[Message]], InstructionReport]:
    """Conversations from a JSONL file, one record a line, shapes mixed freely. A malformed
    record (bad JSON or UTF-8, missing field, wrong role, empty answer, not ending with the
    assistant) is skipped and reported by line number; blank lines are ignored. A file that is
    missing, unreadable or has no usable record raises InputFileError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a folder; give a JSONL file of instruction records") from None
    except OSError as error:
        raise InputFileError(f"{path}: cannot read ({error.strerror or error})") from None
    report = InstructionReport(path=str(path))
    conversations: list[list[Message]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            conversations.append(record_to_messages(record))
        except UnicodeDecodeError:
            report.rejected.append((number, "not UTF-8 text"))
        except json.JSONDecodeError as error:
            report.rejected.append((number, f"bad JSON ({error.msg} at column {error.colno})"))
        except RecordError as error:
            report.rejected.append((number, str(error)))
    report.kept = len(conversations)
    if not conversations:
        why = f"; first problem: line {report.rejected[0][0]}: {report.rejected[0][1]}" if report.rejected else ""
        raise InputFileError(f"{path}: no usable instruction records ({len(report.rejected)} rejected{why})")
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


def _end_of_answer(ids: list[int], stop_ids: tuple[int, ...]) -> int:
    """Length of the trained part of an assistant span: up to and including the last
    end-of-turn token, leaving out what the template writes after it (ChatML's newline)."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] in stop_ids:
            return i + 1
    raise ConfigError(
        "sft: the chat template does not close an assistant message with an end-of-turn or end-of-sequence token "
        f"(any of ids {list(stop_ids)}); a model fine-tuned on it would not learn to stop"
    )


def _render_prefixes(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """The conversation's text cut into consecutive pieces, each marked True when it is an
    assistant message's span. Raises ConfigError when the template does not render a shorter
    conversation as a prefix of a longer one: such a template (one that rewrites earlier turns)
    has no span we could train on that matches what the model sees at inference."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for n, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if n == 0:
            raise ConfigError("sft: a conversation starts with an assistant message; nothing prompts it")
        prompt = render_chat(tokenizer, messages[:n], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: n + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not through.startswith(prompt):
            raise ConfigError(
                "sft: the chat template does not render a conversation's beginning as a prefix of the whole "
                f"(at message {n}); the loss mask cannot be taken from it"
            )
        pieces += [(prompt[len(done) :], False), (through[len(prompt) :], True)]
        done = through
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    if not full.startswith(done):
        raise ConfigError("sft: the chat template renders the whole conversation differently from its beginning; the loss mask cannot be taken from it")
    pieces.append((full[len(done) :], False))
    return pieces


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[Message], block_size: int, truncate: Truncate = "drop") -> EncodedExample | None:
    """Tokens and labels of a conversation rendered with the model's chat template, the
    assistant's tokens labelled. Each piece between template boundaries is encoded on its own:
    that is how the model meets them at inference (the prompt is encoded, the answer is
    generated token by token), and it keeps the token prefix property exact even where BPE
    would merge characters across a boundary. A conversation whose `input_ids` exceed
    `block_size` is dropped (None) or, with truncate="right", cut to fit; one cut so far that
    no assistant token is left is dropped too."""
    if truncate not in TRUNCATE_CHOICES:
        raise ConfigError(f"sft: truncate is {truncate!r}; expected one of {', '.join(TRUNCATE_CHOICES)}")
    if block_size < 1:
        raise ConfigError(f"sft: block_size is {block_size}; it must be at least 1")
    stop_ids = chat_stop_ids(tokenizer)
    tokens: list[int] = []
    labels: list[int] = []
    for text, is_answer in _render_prefixes(tokenizer, messages):
        ids = tokenizer.encode(text, allowed_special="all")
        trained = _end_of_answer(ids, stop_ids) if is_answer else 0
        tokens += ids
        labels += ids[:trained] + [IGNORE] * (len(ids) - trained)
    if len(tokens) - 1 <= block_size:
        return EncodedExample(tokens, labels)
    if truncate == "drop":
        return None
    tokens, labels = tokens[: block_size + 1], labels[: block_size + 1]
    if all(label == IGNORE for label in labels[1:]):
        return None
    return EncodedExample(tokens, labels, truncated=True)


def encode_conversations(
    tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]], block_size: int, truncate: Truncate = "drop"
) -> tuple[list[EncodedExample], EncodeStats]:
    """`encode_conversation` over a data set, counting what was kept, truncated and dropped."""
    examples: list[EncodedExample] = []
    stats = EncodeStats()
    for messages in conversations:
        example = encode_conversation(tokenizer, messages, block_size, truncate)
        if example is None:
            stats.dropped += 1
            continue
        examples.append(example)
        if example.truncated:
            stats.truncated += 1
        else:
            stats.kept += 1
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


def document_mask(doc_ids: Tensor) -> Tensor:
    """Attention mask (B, 1, T, T), True where query position i may attend to key position j:
    j <= i and both belong to the same document. This is the boolean `attn_mask` convention of
    `F.scaled_dot_product_attention` (True takes part), broadcast over heads. Every position
    attends at least to itself, so no softmax row is empty."""
    if doc_ids.dim() != 2:
        raise ValueError(f"document_mask: doc_ids must be (B, T), got shape {tuple(doc_ids.shape)}")
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]
