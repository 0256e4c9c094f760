"""Direct preference optimisation (Rafailov et al. 2023): the loss, the log-probabilities it
compares, and preference data from JSONL files and the web chat page's feedback.

DPO trains a policy on pairs (prompt, chosen answer, rejected answer) without a reward model:
the implicit reward of an answer is beta * (log pi(answer | prompt) - log ref(answer | prompt)),
with `ref` a frozen copy of the model before training (or its log-probabilities computed once
in advance), and the loss is -log sigmoid(reward(chosen) - reward(rejected)).

Tokens follow the one labels convention of `scratchlm.finetune` (see `sft_data`): each answer
is its prompt plus that answer encoded by `sft_data.encode_messages` with only the last
assistant message labelled, an `EncodedExample` whose shifted `input_ids`/`targets` are what
the model reads and scores, exactly as `GPT.forward(idx, targets)` takes them for SFT.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from scratchlm.data.feedback_records import reply_key
from scratchlm.finetune.config import Truncate, check_dpo_settings
from scratchlm.finetune.records import (
    Message,
    RecordError,
    RecordReport,
    check_conversation,
    parse_messages,
    read_jsonl,
)
from scratchlm.finetune.sft_data import (
    IGNORE,
    EncodedExample,
    check_truncation,
    cut_left,
    encode_messages,
    pad_batch,
)
from scratchlm.tokenizer import Tokenizer


# ---- log-probabilities and the loss ----------------------------------------------------
def sequence_logprobs(model: nn.Module, input_ids: Tensor, targets: Tensor) -> Tensor:
    """Summed log-probability of each row's scored tokens, shape (B,). input_ids and targets are
    (B, T), shifted as `GPT.forward` takes them (targets[b, t] is predicted by the logits at
    position t) and -100 where not scored, padding included."""
    if input_ids.shape != targets.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and targets {tuple(targets.shape)} differ in shape")
    logits, _ = model(input_ids)
    # cross_entropy instead of log_softmax + gather: it never materialises a (B, T, vocab) tensor
    # of log-probabilities next to the logits, and ignored positions come out as exactly 0.
    token_nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
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
    check_dpo_settings(beta, label_smoothing)
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


def _answer(record: Mapping, key: str) -> str:
    """`chosen`/`rejected` as a non-blank string. TRL's conversational shape, a list holding
    one assistant message, is accepted too."""
    value = record.get(key)
    if value is None:
        raise RecordError(f"missing field {key!r}")
    if isinstance(value, list):
        messages = parse_messages(value, key)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise RecordError(f"{key!r} as a list must hold exactly one assistant message")
        value = messages[0]["content"]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} is {type(value).__name__}, not text")
    if not value.strip():
        raise RecordError(f"empty answer in {key!r}")
    return value


def _prompt(record: Mapping) -> list[Message]:
    """The conversation before the answer: `messages`, or `prompt` as a string or a list."""
    if "messages" in record:
        return parse_messages(record["messages"], "messages")
    if "prompt" not in record:
        raise RecordError("missing field 'prompt' (or 'messages')")
    prompt = record["prompt"]
    if isinstance(prompt, list):
        return parse_messages(prompt, "prompt")
    if not isinstance(prompt, str):
        raise RecordError("field 'prompt' is neither text nor a list of messages")
    return [{"role": "user", "content": prompt}]


def record_to_preference(record: Mapping, source: str = "") -> PreferenceExample:
    """One JSON record as a checked preference pair, or RecordError saying why it is unusable.
    The prompt followed by either answer must be a conversation SFT could train on
    (`records.check_conversation`): a user message first, nothing blank."""
    prompt = _prompt(record)
    chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    check_conversation([*prompt, {"role": "assistant", "content": chosen}])
    if chosen == rejected:
        raise RecordError("chosen and rejected are the same answer")
    return PreferenceExample(tuple(prompt), chosen, rejected, source)


def _is_feedback_record(record: Mapping) -> bool:
    # The web chat page's PreferenceRecord (scratchlm/serve/web.py) always has `completion`;
    # plain preference files never do.
    return "completion" in record and "messages" in record


def load_preferences(path: str | Path) -> tuple[list[PreferenceExample], RecordReport]:
    """Preference pairs from a JSONL file: one object per line with `prompt` (a string or a list
    of messages) or `messages`, and `chosen` and `rejected`. Records the web chat page saves are
    read too: a record with an edited answer is a pair (chosen = edit, rejected = the model's
    reply), a rating alone is skipped and counted in `without_pair`, and of several records of
    the same reply only the last counts (the page resends its whole state with each change).
    Malformed lines are listed with their line numbers in the report, never raised; a file that
    cannot be read or holds no pair raises InputFileError."""
    report = RecordReport(path=str(path), kind="pairs")
    found: list[tuple[int, PreferenceExample]] = []
    feedback_lines: dict[str, int] = {}  # reply id -> line number of its latest record
    no_pair: set[int] = set()  # feedback records with a rating but no edited answer
    for number, record in read_jsonl(path, report):
        if _is_feedback_record(record):
            reply = reply_key(record.get("reply_id"), record.get("id"), f"line {number}")
            if reply in feedback_lines:
                report.superseded.append(feedback_lines[reply])
            feedback_lines[reply] = number
            if record.get("chosen") is None and record.get("rejected") is None:
                no_pair.add(number)
                continue
        try:
            found.append((number, record_to_preference(record, source=f"{path}:{number}")))
        except RecordError as reason:
            report.reject(number, str(reason))
    # Of each reply's feedback records only the latest counts, pair or not.
    replaced = set(report.superseded)
    examples = []
    for number, example in found:
        if number not in replaced:
            examples.append(example)
            report.kept.append(number)
    report.without_pair = sorted(no_pair - replaced)
    report.superseded.sort()
    report.require_some()
    return examples, report


# ---- tokens ------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedPair:
    """Both answers of a pair, each its prompt plus the answer with only the answer (and the
    end-of-turn token closing it) labelled. The prompt tokens are the same in both."""

    chosen: EncodedExample
    rejected: EncodedExample


def encode_preference(tokenizer: Tokenizer, example: PreferenceExample, block_size: int, truncate: Truncate = "drop") -> EncodedPair | None:
    """One pair as tokens, each answer encoded by `sft_data.encode_messages` (the chat template,
    or a model's plain prompt + answer + end of sequence without one) with the last assistant
    message labelled, so the model also learns where an answer stops.

    The truncation vocabulary is SFT's: a pair whose longer side exceeds `block_size` is None
    with truncate="drop"; with "left" both sides lose the same number of tokens from the start
    of the prompt, so that they still answer the same prompt, and the pair is None only when an
    answer alone does not fit. Answers are never cut: the preference is about the whole answer."""
    check_truncation(block_size, truncate)
    whole = [
        encode_messages(tokenizer, [*example.messages, {"role": "assistant", "content": answer}], train_on="last")
        for answer in (example.chosen, example.rejected)
    ]
    excess = max(len(e.input_ids) for e in whole) - block_size
    if excess <= 0:
        return EncodedPair(whole[0], whole[1])
    if truncate == "drop":
        return None
    chosen, rejected = (cut_left(e, excess) for e in whole)
    if chosen is None or rejected is None:
        return None
    return EncodedPair(chosen, rejected)


@dataclass
class PreferenceBatch:
    """Pairs as one padded batch: rows 0..n-1 the chosen answers, rows n..2n-1 the rejected
    ones, so the policy (and the reference) scores a whole batch in one forward pass."""

    input_ids: Tensor  # (2n, T)
    targets: Tensor  # (2n, T), shifted; -100 on prompt and padding

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def collate_preferences(encoded: Sequence[EncodedPair], pad_id: int = 0) -> PreferenceBatch:
    """`sft_data.pad_batch` over the chosen sides, then the rejected ones: right padding with
    targets -100, which under causal attention changes no scored log-probability."""
    if not encoded:
        raise ValueError("collate_preferences: no pairs")
    input_ids, targets = pad_batch([p.chosen for p in encoded] + [p.rejected for p in encoded], pad_id)
    return PreferenceBatch(input_ids, targets)


def preference_logprobs(model: nn.Module, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed answer log-probabilities, each (n,), from one forward pass."""
    device = next(model.parameters()).device
    logprobs = sequence_logprobs(model, batch.input_ids.to(device), batch.targets.to(device))
    return logprobs[: batch.pairs], logprobs[batch.pairs :]
