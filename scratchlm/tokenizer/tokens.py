"""Token-level facts that every stage above the tokenizer needs and must agree on."""

import numpy as np

from scratchlm.errors import ConfigError
from scratchlm.tokenizer.tokenizer import Tokenizer


def token_byte_lengths(tokenizer: Tokenizer, size: int) -> np.ndarray:
    """UTF-8 bytes each id stands for; 0 for special tokens, which bits per byte leaves out."""
    lengths = np.zeros(size, dtype=np.int64)
    for token, i in tokenizer.ranks.items():
        if i < size:
            lengths[i] = len(token)
    return lengths


def vocabulary_difference(ours: Tokenizer, theirs: Tokenizer) -> str | None:
    """None when the two tokenizers give the same ids: the same text encodes to the same ids
    (same pre-tokenization pattern, byte tokens, special tokens and vocab size, which decides
    the bytes an imported vocabulary lacks) and the same ids decode to the same text. Otherwise
    what differs, for an error message. Names and metadata (a chat template) may differ."""
    if len(ours.ranks) != len(theirs.ranks):
        return f"a {len(ours.ranks)}-token vocabulary vs {len(theirs.ranks)}"
    if ours.ranks != theirs.ranks:
        return f"{len(ours.ranks)} tokens on both sides, but not the same tokens at the same ids"
    if ours.special_tokens != theirs.special_tokens:
        return f"special tokens {ours.special_tokens} vs {theirs.special_tokens}"
    if ours.vocab_size != theirs.vocab_size:
        return f"vocab size {ours.vocab_size} vs {theirs.vocab_size}"
    if ours.pattern != theirs.pattern:
        return "the same tokens, but a different pre-tokenization pattern"
    return None


def same_ids(ours: Tokenizer, theirs: Tokenizer) -> bool:
    """Whether token ids mean the same to both tokenizers (see `vocabulary_difference`)."""
    return vocabulary_difference(ours, theirs) is None


def check_fits_model(tokenizer: Tokenizer, model_vocab_size: int, where: str = "") -> None:
    """ConfigError unless every id of `tokenizer` has a row in a model embedding of
    `model_vocab_size` rows (a larger embedding is fine: vocabularies are padded for speed).
    `where` prefixes the message, e.g. "sampling"."""
    if tokenizer.vocab_size > model_vocab_size:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}the tokenizer has {tokenizer.vocab_size} tokens but the model only {model_vocab_size}; "
                          "they were not trained together")


def adds_bos(tokenizer: Tokenizer) -> int | None:
    """The beginning-of-sequence id the model puts before every text, or None. As Hugging Face
    tokenizers do, this follows the tokenizer's `add_bos_token` metadata (Llama 2 and 3 say
    yes; GPT-2, SmolLM2 and our own models say no or nothing)."""
    bos = tokenizer.metadata.get("bos_token_id")
    return int(bos) if bos is not None and tokenizer.metadata.get("add_bos_token") else None


def document_start(tokenizer: Tokenizer) -> list[int]:
    """The token a model saw before the first token of every training document; [] when the
    tokenizer names none.

    Models that always get a beginning-of-sequence token (`add_bos_token`, Llama 2/3) start from
    it. Otherwise <|endoftext|>: our own models, GPT-2 and SmolLM2 were trained on documents
    joined by it. SmolLM2's "bos" is <|im_start|>, the opening of a chat turn, which would put
    every plain text inside a malformed chat message; a declared BOS is the last resort. Scoring
    and generating after the start token means the first real token of a text comes from the
    state the model was trained to start in."""
    bos = adds_bos(tokenizer)
    if bos is not None:
        return [bos]
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    declared = tokenizer.metadata.get("bos_token_id")
    return [int(declared)] if declared is not None else []


def encode_text_start(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of a text as a model reads it from the start: `text` (special-token strings in it
    allowed) after BOS when the tokenizer adds one and the text does not already begin with it
    (a rendered chat template often writes it itself), as `transformers` encodes a prompt."""
    ids = tokenizer.encode(text, allowed_special="all")
    bos = adds_bos(tokenizer)
    if bos is not None and ids[:1] != [bos]:
        return [bos, *ids]
    return ids
