"""Language-modelling scores of a text or of token shards: perplexity and bits per byte.

Perplexity depends on the tokenizer: a vocabulary with longer tokens has fewer, harder
predictions. Bits per byte divides the same total surprise by the UTF-8 bytes of the text, so two
models with different tokenizers compare fairly (nanochat's yardstick; the Pile paper's, Gao et
al. 2020). Both come from one sum of per-token nats, computed by `rolling_token_nats`'s sliding
window, so a text longer than the context is scored with as much context as the window allows.

Every token is scored: the text is preceded by the document-start token the model was trained
to begin from, so its first token is a prediction too.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scratchlm.data.shards import TokenShards
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.eval.scoring import rolling_token_nats
from scratchlm.model import GPT
from scratchlm.tokenizer import Tokenizer, TokenizerFormatError, load_tokenizer
from scratchlm.tokenizer.tokens import check_fits_model, document_start, same_ids, token_byte_lengths  # bpb counts bytes as the training loop does

LN2 = math.log(2.0)


@dataclass(frozen=True)
class LanguageModelScore:
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text scored
    nats: float  # total negative log-likelihood

    @property
    def perplexity(self) -> float:
        """exp(mean nats per token): depends on the tokenizer."""
        try:
            return math.exp(self.nats / self.tokens)
        except OverflowError:
            return math.inf

    @property
    def bits_per_token(self) -> float:
        return self.nats / LN2 / self.tokens

    @property
    def bits_per_byte(self) -> float:
        """Comparable across tokenizers: the same text has the same bytes whatever cuts it."""
        return self.nats / LN2 / self.bytes

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nats": self.nats,
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_token,
            "bits_per_byte": self.bits_per_byte,
        }


def evaluate_text(
    model: GPT, tokenizer: Tokenizer, text: str, *, stride: int | None = None, batch_size: int = 8, progress: bool = False
) -> LanguageModelScore:
    """Score every token of `text` (special-token strings in it are plain text)."""
    check_fits_model(tokenizer, model.config.vocab_size)
    ids = tokenizer.encode_ordinary(text)
    if not ids:
        raise ConfigError("the text to score is empty")
    start = document_start(tokenizer)
    if not start:
        # Without a start token the first token has no context: score the rest, and count only
        # their bytes, so bits per byte stays an honest ratio.
        nats = rolling_token_nats(model, ids, stride=stride, batch_size=batch_size, progress=progress)
        scored_bytes = len(tokenizer.decode_bytes(ids[1:]))
        if not len(nats):
            raise ConfigError("the text is one token and the tokenizer has no document-start token to score it after")
        return LanguageModelScore(tokens=len(nats), bytes=scored_bytes, nats=float(nats.sum()))
    nats = rolling_token_nats(model, start + ids, stride=stride, batch_size=batch_size, progress=progress)
    return LanguageModelScore(tokens=len(ids), bytes=len(text.encode("utf-8")), nats=float(nats.sum()))


def _check_shard_tokenizer(shards: TokenShards, tokenizer: Tokenizer) -> None:
    """Shards record their tokenizer's content hash; that hash also covers the name and metadata,
    so on a mismatch the tokenizer.json beside the shards decides whether it gives the same ids."""
    expected = shards.manifest.get("tokenizer_sha256")
    if expected is None or expected == tokenizer.content_hash:
        return
    beside = shards.path / "tokenizer.json"
    if beside.is_file():
        try:
            theirs = load_tokenizer(beside)
        except TokenizerFormatError as exc:
            raise InputFileError(f"{beside}: cannot read the shards' tokenizer ({exc})") from None
        if same_ids(theirs, tokenizer):
            return
    raise ConfigError(
        f"{shards.path}: shards were made with a different tokenizer (sha256 {expected[:12]}…) than the model's "
        f"({tokenizer.content_hash[:12]}…); evaluate with the model trained on them, or re-tokenize"
    )


def evaluate_shards(
    model: GPT,
    tokenizer: Tokenizer,
    shards_dir: str | Path,
    *,
    split: str = "val",
    max_tokens: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> LanguageModelScore:
    """Score the first `max_tokens` tokens (all when None) of a split of a shard folder.

    Like the training loop's validation bits per byte, predictions of special tokens (the
    <|endoftext|> between documents) are left out of all three counts: they stand for no bytes,
    and with them bits per byte would no longer be a ratio of text."""
    check_fits_model(tokenizer, model.config.vocab_size)
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, not {max_tokens}")
    shards = TokenShards.open(shards_dir)
    _check_shard_tokenizer(shards, tokenizer)
    available = shards.tokens(split)
    if not available:
        splits = ", ".join(s for s in shards.streams if shards.tokens(s)) or "none"
        raise ConfigError(f"{shards.path}: split {split!r} has no tokens (splits with tokens: {splits})")
    count = available if max_tokens is None else min(max_tokens, available)
    stream = shards.read(split, 0, count)
    if int(stream.max()) >= model.config.vocab_size:
        raise InputFileError(f"{shards.path}: token id {int(stream.max())} is outside the model's vocabulary ({model.config.vocab_size})")
    start = document_start(tokenizer)
    tokens = np.concatenate([np.asarray(start, dtype=np.int64), stream])
    nats = rolling_token_nats(model, tokens, stride=stride, batch_size=batch_size, progress=progress)
    targets = tokens[1:]
    is_text = ~np.isin(targets, list(tokenizer.special_tokens.values()))
    scored_bytes = int(token_byte_lengths(tokenizer, model.config.vocab_size)[targets].sum())
    if not is_text.any():
        raise ConfigError(f"{shards.path}: split {split!r} holds only special tokens; there is no text to score")
    return LanguageModelScore(tokens=int(is_text.sum()), bytes=scored_bytes, nats=float(nats[is_text].sum()))
