"""A sequence classifier on our GPT: its body (embedding, blocks, final norm), a pooling of the
hidden states and a linear head with one output per label.

    texts -> tokens (+ end token) -> embedding -> blocks -> final norm -> pool -> linear -> label

It lives in the model layer, below finetune (which trains it), eval and serve (which run it), so
those siblings open one class from one place. Pooling is "last" (the last real token: under right
padding and causal attention it has seen the whole text and no padding) or "mean" (the average of
the real tokens, pads masked out). `TextClassifier` is a loaded classifier with its tokenizer and
label names: `classify(texts)` and `probabilities(texts)`.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scratchlm.config import POOLINGS, Pooling
from scratchlm.errors import ConfigError
from scratchlm.model.config import ModelConfig
from scratchlm.model.model import GPT
from scratchlm.tokenizer import Tokenizer


def pool_hidden(hidden: Tensor, lengths: Tensor, pooling: Pooling) -> Tensor:
    """(B, T, C) hidden states of right-padded rows with `lengths` real tokens -> (B, C)."""
    if pooling == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, lengths.to(hidden.device) - 1]
    if pooling == "mean":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        mask = (positions[None] < lengths.to(hidden.device)[:, None]).to(hidden.dtype)[..., None]
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")


class SequenceClassifier(nn.Module):
    """Our GPT's embedding, blocks and final norm (its LM head left out), a pooling and a linear
    head to `num_labels` scores. The modules are taken from `gpt`, not copied."""

    def __init__(self, gpt: GPT, num_labels: int, pooling: Pooling = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        if num_labels < 2:
            raise ConfigError(f"a classifier needs at least two labels, not {num_labels}")
        self.config: ModelConfig = gpt.config
        self.pooling = pooling
        self.embed, self.pos_embed, self.drop = gpt.embed, gpt.pos_embed, gpt.drop
        self.blocks, self.norm = gpt.blocks, gpt.norm
        if self.config.positions == "rope":
            self.register_buffer("rope_cos", gpt.rope_cos, persistent=False)
            self.register_buffer("rope_sin", gpt.rope_sin, persistent=False)
        self.score = nn.Linear(self.config.n_embd, num_labels)
        # Small random weights, zero bias: the untrained head gives near-uniform class scores.
        device = self.embed.weight.device
        self.score.to(device)
        nn.init.normal_(self.score.weight, std=self.config.init_std)
        nn.init.zeros_(self.score.bias)

    def hidden(self, idx: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, C) final-norm hidden states: GPT.forward without the LM head
        (plain causal attention from position 0, no cache)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
        x = self.embed(idx)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=idx.device))[None]
        else:
            rope = (self.rope_cos[:T][None, None], self.rope_sin[:T][None, None])
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, None, layer)
        return self.norm(x)

    def forward(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """Class scores (B, num_labels) of right-padded rows with `lengths` real tokens."""
        return self.score(pool_hidden(self.hidden(idx), lengths, self.pooling))


def fit_ids(ids: list[int], max_length: int, end_id: int | None) -> list[int]:
    """`ids` with the end token appended, cut to `max_length` (keeping the end token, the
    position "last" pooling reads). Why an end token: a pretrained LM's state at a text's final
    token is about predicting what comes next; a fixed closing token gives every text the same
    read-out slot."""
    tail = [end_id] if end_id is not None else []
    full = ids + tail
    if len(full) <= max_length:
        return full
    return ids[: max_length - len(tail)] + tail


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids (B, longest), lengths (B,)): rows padded on the right. With a causal model a pad only
    affects positions after it, so real tokens compute exactly as they would unpadded."""
    if not rows:
        raise ValueError("no rows to pad")
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


@torch.no_grad()
def predict(model: SequenceClassifier, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32) -> tuple[list[int], Tensor]:
    """(predicted class numbers, logits (N, num_labels) on the CPU) for encoded texts."""
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    outputs = []
    try:
        for start in range(0, len(ids), batch_size):
            rows = range(start, min(start + batch_size, len(ids)))
            idx, lengths = pad_right([ids[i] for i in rows], pad_id)
            outputs.append(model(idx.to(device), lengths.to(device)).float().cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(outputs) if outputs else torch.empty(0, model.score.out_features)
    return logits.argmax(dim=-1).tolist(), logits


@dataclass
class TextClassifier:
    """A loaded classifier: `classify(texts)` gives a label per text, `probabilities(texts)` the
    probability of every label. Texts longer than `max_length` tokens are truncated (a
    classifier must answer for every text)."""

    model: SequenceClassifier
    tokenizer: Tokenizer
    labels: list[str]
    max_length: int

    @property
    def pad_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0  # any id: pads are never read

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids as training saw them (special-token strings read as plain text)."""
        encoded = []
        for n, text in enumerate(texts):
            ids = fit_ids(self.tokenizer.encode_ordinary(text), self.max_length, self.tokenizer.eos_id)
            if not ids:
                raise ConfigError(f"text {n} is empty, and this tokenizer has no end token to classify it by")
            encoded.append(ids)
        return encoded

    def logits(self, texts: Sequence[str], batch_size: int = 32) -> Tensor:
        """(N, len(labels)) class scores on the CPU."""
        return predict(self.model, self.encode(texts), self.pad_id, batch_size)[1]

    def classify(self, texts: Sequence[str], batch_size: int = 32) -> list[str]:
        return [self.labels[p] for p in self.logits(texts, batch_size).argmax(dim=-1).tolist()]

    def probabilities(self, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, float]]:
        """For each text, {label: probability} in label order (softmax of the scores)."""
        return self.probabilities_of(self.encode(texts), batch_size)

    def probabilities_of(self, ids: Sequence[Sequence[int]], batch_size: int = 32) -> list[dict[str, float]]:
        """`probabilities` of texts already `encode`d."""
        probs = predict(self.model, ids, self.pad_id, batch_size)[1].softmax(dim=-1).tolist()
        return [dict(zip(self.labels, row)) for row in probs]
