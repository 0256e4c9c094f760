"""Direct preference optimisation (Rafailov et al. 2023): the loss, the log-probabilities it
compares, and preference data from JSONL files and the web chat page's feedback.

DPO trains a policy on pairs (prompt, chosen answer, rejected answer) without a reward model:
the implicit reward of an answer is beta * (log pi(answer | prompt) - log ref(answer | prompt)),
with `ref` a frozen copy of the model before training (or its log-probabilities computed once
in advance), and the loss is -log sigmoid(reward(chosen) - reward(rejected)).

Token convention, the one `GPT.forward(idx, targets)` uses: `labels` are already shifted, so
labels[b, t] is the token the logits at position t must predict, i.e. input_ids[b, t + 1], or
-100 where the position is not scored. A training sequence of n tokens is therefore fed as
input_ids = tokens[:-1], labels = tokens[1:] with the prompt's positions set to -100, and the
same (input_ids, labels) pair works for SFT's `model(input_ids, targets=labels)`.
"""

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.serve.chat_template import (
    END_OF_TURN_TOKENS,
    ROLES,
    chat_template,
    render_chat,
)
from scratchlm.tokenizer import Tokenizer

IGNORE = -100  # the label of a position that is not scored: F.cross_entropy's ignore_index


# ---- log-probabilities and the loss ----------------------------------------------------
def sequence_logprobs(model: nn.Module, input_ids: Tensor, labels: Tensor) -> Tensor:
    """Summed log-probability of each row's label tokens, shape (B,). input_ids and labels are
    (B, T); labels are pre-shifted like `GPT.forward`'s targets (labels[b, t] is predicted by
    the logits at position t) and -100 where not scored, padding included."""
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    logits, _ = model(input_ids)
    # cross_entropy instead of log_softmax + gather: it never materialises a (B, T, vocab) tensor
    # of log-probabilities next to the logits, and ignored positions come out as exactly 0.
    token_nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return -token_nll.sum(dim=-1)


@dataclass
class DPOOutput:
    """The loss to minimise and what to log. Rewards, margins and accuracy are detached: they
    are measurements, and a gradient through them would be a bug waiting to happen."""

    loss: Tensor  # scalar, mean over the batch
    chosen_rewards: Tensor  # (B,) beta * (policy - reference) log-prob of the chosen answer
    rejected_rewards: Tensor  # (B,)
    margins: Tensor  # (B,) chosen_rewards - rejected_rewards
    accuracy: Tensor  # scalar: fraction of pairs whose chosen reward is strictly higher


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """The DPO loss of a batch of pairs from summed sequence log-probabilities, each (B,).

    With h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)), the loss
    is -log sigmoid(h) (Rafailov et al. 2023, eq. 7). `label_smoothing` eps > 0 is conservative
    DPO (Mitchell 2023): the pair's label is taken to be wrong with probability eps, giving
    -(1 - eps) log sigmoid(h) - eps log sigmoid(-h), which stops the margin growing without
    bound on noisy pairs. At policy == reference every pair costs log 2."""
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"dpo: beta must be a positive number, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"dpo: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"dpo_loss: the four log-probability tensors differ in shape: {sorted(shapes)}")
    # The reference is a constant: detaching here means a caller that forgot torch.no_grad()
    # around the reference pass still trains only the policy.
    chosen_logratio = policy_chosen - ref_chosen.detach()
    rejected_logratio = policy_rejected - ref_rejected.detach()
    h = beta * (chosen_logratio - rejected_logratio)
    # logsigmoid rather than log(sigmoid()): exact for large |h|, where sigmoid rounds to 0 or 1.
    losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    chosen_rewards = beta * chosen_logratio.detach()
    rejected_rewards = beta * rejected_logratio.detach()
    return DPOOutput(
        loss=losses.mean(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        accuracy=(chosen_rewards > rejected_rewards).float().mean(),
    )


# ---- preference data -------------------------------------------------------------------
@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair. `messages` is the conversation before the answer (a plain prompt
    string becomes one user message); `source` is "file:line", for reports."""

    messages: tuple[Mapping[str, str], ...]
    chosen: str
    rejected: str
    source: str = ""


@dataclass
class RejectedLine:
    line: int
    reason: str


@dataclass
class PreferenceReport:
    """What happened to each line of a preference file: kept, rejected with a reason, or (web
    chat feedback) skipped because it has no pair or a later record replaced it."""

    path: str
    kept: list[int] = field(default_factory=list)
    rejected: list[RejectedLine] = field(default_factory=list)
    without_pair: list[int] = field(default_factory=list)  # a rating with no edited answer
    superseded: list[int] = field(default_factory=list)  # an earlier record of the same reply

    def summary(self) -> str:
        """One line for the CLI, with the first few rejected lines named."""
        text = f"{self.path}: {len(self.kept)} pairs kept, {len(self.rejected)} malformed lines"
        if self.without_pair:
            text += f", {len(self.without_pair)} feedback records without an edited answer"
        if self.superseded:
            text += f", {len(self.superseded)} feedback records replaced by a later one"
        if self.rejected:
            shown = "; ".join(f"line {r.line}: {r.reason}" for r in self.rejected[:3])
            text += f" ({shown}{'; ...' if len(self.rejected) > 3 else ''})"
        return text


class _Malformed(Exception):
    """A line that is not a usable preference record; the message is the report's reason."""


def _answer(record: Mapping, key: str) -> str:
    """`chosen`/`rejected` as a non-blank string. TRL's conversational shape, a list holding
    one assistant message, is accepted too."""
    if key not in record or record[key] is None:
        raise _Malformed(f"missing field {key!r}")
    value = record[key]
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], Mapping) or value[0].get("role") != "assistant":
            raise _Malformed(f"{key!r} as a list must hold exactly one assistant message")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise _Malformed(f"{key!r} is not a string")
    if not value.strip():
        raise _Malformed(f"empty answer in {key!r}")
    return value


def _messages(value: object, key: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise _Malformed(f"{key!r} must be a non-empty list of messages")
    checked = []
    for n, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise _Malformed(f"{key}[{n}] is not an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _Malformed(f"{key}[{n}] has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _Malformed(f"{key}[{n}] has no text content")
        checked.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in checked):
        raise _Malformed(f"every message in {key!r} is empty")
    return tuple(checked)


def _prompt(record: Mapping) -> tuple[dict[str, str], ...]:
    """The conversation before the answer: `messages`, or `prompt` as a string or a list."""
    if "messages" in record:
        return _messages(record["messages"], "messages")
    if "prompt" not in record:
        raise _Malformed("missing field 'prompt' (or 'messages')")
    prompt = record["prompt"]
    if isinstance(prompt, list):
        return _messages(prompt, "prompt")
    if not isinstance(prompt, str):
        raise _Malformed("'prompt' is neither a string nor a list of messages")
    if not prompt.strip():
        raise _Malformed("empty prompt")
    return ({"role": "user", "content": prompt},)


def _is_feedback_record(record: Mapping) -> bool:
    # The web chat page's PreferenceRecord (scratchlm/serve/web.py) always has `completion`;
    # plain preference files never do.
    return "completion" in record and "messages" in record


def load_preferences(path: str | Path) -> tuple[list[PreferenceExample], PreferenceReport]:
    """Preference pairs from a JSONL file: one object per line with `prompt` (a string or a list
    of messages) or `messages`, and `chosen` and `rejected`. Records the web chat page saves are
    read too: a record with an edited answer is a pair (chosen = edit, rejected = the model's
    reply), a rating alone is skipped and counted, and of several records of the same reply only
    the last counts (the page resends its whole state with each change). Malformed lines are
    counted with their line numbers in the report, never raised; an unreadable file raises
    InputFileError."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{source}: cannot read preferences ({exc.strerror or exc})") from None
    report = PreferenceReport(path=str(source))
    found: list[tuple[int, PreferenceExample]] = []
    feedback_lines: dict[str, int] = {}  # reply id -> line number of its latest record
    no_pair: set[int] = set()  # feedback records with a rating but no edited answer
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            report.rejected.append(RejectedLine(number, "not UTF-8 text"))
            continue
        except json.JSONDecodeError as exc:
            report.rejected.append(RejectedLine(number, f"not JSON ({exc.msg}, column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            report.rejected.append(RejectedLine(number, "not a JSON object"))
            continue
        feedback = _is_feedback_record(record)
        if feedback:
            reply = record.get("reply_id") or record.get("id") or f"line {number}"
            if reply in feedback_lines:
                report.superseded.append(feedback_lines[reply])
            feedback_lines[reply] = number
            if record.get("chosen") is None and record.get("rejected") is None:
                no_pair.add(number)
                continue
        try:
            example = PreferenceExample(_prompt(record), _answer(record, "chosen"), _answer(record, "rejected"),
                                        source=f"{source}:{number}")
        except _Malformed as reason:
            report.rejected.append(RejectedLine(number, str(reason)))
            continue
        if example.chosen == example.rejected:
            report.rejected.append(RejectedLine(number, "chosen and rejected are the same answer"))
            continue
        found.append((number, example))
    # Of each reply's feedback records only the latest counts, pair or not.
    replaced = set(report.superseded)
    examples = []
    for number, example in found:
        if number not in replaced:
            examples.append(example)
            report.kept.append(number)
    report.without_pair = sorted(no_pair - replaced)
    report.superseded.sort()
    return examples, report


# ---- tokens ------------------------------------------------------------------------------
EncodedPair = tuple[list[int], list[int], list[int], list[int]]


def _has_chat_template(tokenizer: Tokenizer) -> bool:
    try:
        chat_template(tokenizer)
    except ConfigError:
        return False
    return True


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    """The token that closes an assistant's answer: the end-of-turn token the chat template
    writes (<|im_end|> for ChatML, <|eot_id|> for Llama 3, ...), else end of sequence."""
    if _has_chat_template(tokenizer):
        template = chat_template(tokenizer)
        for token in END_OF_TURN_TOKENS:
            if token in tokenizer.special_tokens and token in template:
                return tokenizer.special_tokens[token]
    if tokenizer.eos_id is None:
        raise ConfigError("dpo: the tokenizer has no end-of-turn or end-of-sequence token to end an answer with")
    return tokenizer.eos_id


def prompt_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The prompt as the model sees it at generation time: the chat template with the opening
    of the assistant's turn, or, for a model without one, a single user message's text."""
    if _has_chat_template(tokenizer):
        # Special tokens allowed: the template's own markers must encode as single tokens.
        return tokenizer.encode(render_chat(tokenizer, messages, add_generation_prompt=True), allowed_special="all")
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise ConfigError("dpo: the model has no chat template, so each prompt must be a single user message")
    return tokenizer.encode_ordinary(messages[0]["content"])


def encode_preference(
    tokenizer: Tokenizer,
    example: PreferenceExample,
    block_size: int,
    truncate: Literal["drop", "left"] = "drop",
) -> EncodedPair | None:
    """(chosen_ids, chosen_labels, rejected_ids, rejected_labels) for one pair, labels
    pre-shifted (see the module docstring) and set only on the answer's tokens and the
    end-of-turn token that follows them, so the model learns where an answer stops.

    A pair longer than the context (more than block_size + 1 tokens, since the last token is
    only ever a label) is None with truncate="drop"; with "left" the prompt loses tokens from its
    start, the same number for both answers so that they still answer the same prompt, and the
    pair is None only when an answer alone does not fit."""
    if truncate not in ("drop", "left"):
        raise ConfigError(f"dpo: truncate must be 'drop' or 'left', got {truncate!r}")
    prompt = prompt_ids(tokenizer, example.messages)
    end = end_of_turn_id(tokenizer)
    # Answers are encoded as text: an answer that contains "<|im_end|>" must not end the turn.
    answers = [tokenizer.encode_ordinary(text) + [end] for text in (example.chosen, example.rejected)]
    room = block_size + 1 - max(len(a) for a in answers)  # prompt tokens that fit
    if len(prompt) > room:
        if truncate == "drop" or room < 1:  # the first answer token needs a position before it
            return None
        prompt = prompt[len(prompt) - room :]
    encoded: list[list[int]] = []
    for answer in answers:
        tokens = prompt + answer
        labels = [IGNORE] * (len(prompt) - 1) + answer
        encoded += [tokens[:-1], labels]
    return encoded[0], encoded[1], encoded[2], encoded[3]


@dataclass
class PreferenceBatch:
    """Pairs as one padded batch: rows 0..n-1 the chosen answers, rows n..2n-1 the rejected
    ones, so the policy (and the reference) scores a whole batch in one forward pass."""

    input_ids: Tensor  # (2n, T)
    labels: Tensor  # (2n, T), -100 on prompt and padding

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def collate_preferences(encoded: Sequence[EncodedPair], pad_id: int = 0) -> PreferenceBatch:
    """Right-pad encoded pairs to the longest row. Padding sits after every real token and its
    label is -100, so under causal attention it changes no scored log-probability."""
    if not encoded:
        raise ValueError("collate_preferences: no pairs")
    rows = [(e[0], e[1]) for e in encoded] + [(e[2], e[3]) for e in encoded]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for row, (ids, labs) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
    return PreferenceBatch(input_ids, labels)


def preference_logprobs(model: nn.Module, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed answer log-probabilities, each (n,), from one forward pass."""
    device = next(model.parameters()).device
    logprobs = sequence_logprobs(model, batch.input_ids.to(device), batch.labels.to(device))
    return logprobs[: batch.pairs], logprobs[batch.pairs :]

