"""The `Tokenizer`: byte-level BPE ranks, a pre-tokenization pattern and special tokens.

Encoding and decoding run in tiktoken's Rust engine, built from our ranks. A rank is also the
token id, and tiktoken's rule (repeatedly merge the adjacent pair whose concatenation has the
lowest rank) gives the same tokens as applying the learned merges in order, because a token's
rank is the step at which its merge was learned.

On disk a tokenizer is one JSON file: format name and version, pattern, every token's bytes
(base64) with its id, special tokens, free-form metadata and a SHA-256 of the content, checked
on load so that a truncated or edited file is refused.
"""

import base64
import hashlib
import json
from collections.abc import Collection, Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

import regex
import tiktoken

from scratchlm.atomic_io import write_text_atomic
from scratchlm.errors import InputFileError, ScratchLMError, SpecialTokenInTextError
from scratchlm.tokenizer.pretokenize import resolve_pattern

FORMAT_NAME = "scratchlm-tokenizer"
FORMAT_VERSION = 1

ENDOFTEXT = "<|endoftext|>"
# ChatML markers (`<|im_start|>user\n...<|im_end|>`), the template SmolLM2 and many open models use.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, *CHAT_TOKENS)

AllowedSpecial = Collection[str] | Literal["all"]


class TokenizerFormatError(InputFileError):
    """A tokenizer file that is corrupt, foreign, or describes an impossible vocabulary."""


class Tokenizer:
    """Byte-level BPE tokenizer. `ranks` maps token bytes to ids; `special_tokens` maps strings
    such as `<|endoftext|>` to ids outside `ranks`."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        pattern: str,
        name: str = "scratchlm",
        metadata: dict | None = None,
        vocab_size: int | None = None,
    ) -> None:
        _check_vocabulary(ranks, special_tokens)
        self.ranks = ranks
        self.special_tokens = special_tokens
        self.pattern = resolve_pattern(pattern)
        self.name = name
        self.metadata = dict(metadata or {})
        self._encoding = tiktoken.Encoding(
            name=name, pat_str=self.pattern, mergeable_ranks=ranks, special_tokens=special_tokens
        )
        # Some imported vocabularies (SmolLM2's) lack a few single bytes, such as control
        # characters. tiktoken needs every byte, so those get ids from `vocab_size` up. Hugging
        # Face's BPE skips a byte it has no token for and merges its neighbours within the
        # chunk as if it were not there; `_encode_skipping_absent` does the same, for the rare
        # text that contains such a byte.
        self._vocab_size = vocab_size if vocab_size is not None else self._encoding.max_token_value + 1
        self._absent_bytes = bytes(b[0] for b, i in ranks.items() if len(b) == 1 and i >= self._vocab_size)
        if any(i >= self._vocab_size for i in special_tokens.values()):
            raise TokenizerFormatError(f"a special token's id is not below the vocab size {self._vocab_size}")

    # ---- sizes and lookups -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the size an embedding table needs."""
        return self._vocab_size

    def _has_absent_byte(self, text: str) -> bool:
        if not self._absent_bytes:
            return False
        data = text.encode("utf-8", errors="surrogatepass")
        return len(data.translate(None, self._absent_bytes)) != len(data)

    def _encode_skipping_absent(self, text: str, allowed: set[str]) -> list[int]:
        """Slow path: pre-tokenize, delete absent bytes inside each chunk, then BPE."""
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # lone surrogates, as tiktoken
        chunk_pattern = regex.compile(self.pattern)
        special = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")") if allowed else None
        ids: list[int] = []
        for n, part in enumerate(special.split(text) if special else [text]):
            if n % 2:  # odd parts are the allowed special tokens the split kept
                ids.append(self.special_tokens[part])
                continue
            for chunk in chunk_pattern.findall(part):
                data = chunk.encode("utf-8", errors="surrogatepass").translate(None, self._absent_bytes)
                ids.extend(self.ranks[p] for p in bpe_parts(data, self.ranks) if data)
        return ids

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(ENDOFTEXT)

    @property
    def eos_id(self) -> int | None:
        """The token that ends a generation: the model's own end-of-sequence token when its
        metadata names one (SmolLM2's <|im_end|> ends a chat turn), else <|endoftext|>."""
        eos = self.metadata.get("eos_token_id")
        return int(eos) if eos is not None else self.eot_id

    @cached_property
    def id_to_bytes(self) -> dict[int, bytes]:
        table = {i: b for b, i in self.ranks.items()}
        table.update({i: s.encode() for s, i in self.special_tokens.items()})
        return table

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self.id_to_bytes[token_id]
        except KeyError:
            raise ScratchLMError(f"token id {token_id} is not in the vocabulary (size {self.vocab_size})") from None

    # ---- encoding ---------------------------------------------------------------------
    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of `text`. A special token's string in the text raises
        `SpecialTokenInTextError` unless it is in `allowed_special` (or that is "all"), as in
        tiktoken: text from users must not be able to inject control tokens by accident."""
        allowed = self._allowed(allowed_special)
        try:
            ids = self._encoding.encode(text, allowed_special=allowed, disallowed_special="all")
        except ValueError:
            raise self._special_in_text_error([text], allowed) from None
        return self._encode_skipping_absent(text, allowed) if self._has_absent_byte(text) else ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, treating special-token strings as plain text."""
        if self._has_absent_byte(text):
            return self._encode_skipping_absent(text, set())
        return self._encoding.encode_ordinary(text)

    def encode_batch(
        self, texts: Sequence[str], num_threads: int = 1, allowed_special: AllowedSpecial = ()
    ) -> list[list[int]]:
        """Encode many texts; `num_threads` > 1 encodes them in parallel (the Rust engine
        releases the GIL)."""
        allowed = self._allowed(allowed_special)
        try:
            batch = self._encoding.encode_batch(
                list(texts), num_threads=num_threads, allowed_special=allowed, disallowed_special="all"
            )
        except ValueError:
            raise self._special_in_text_error(texts, allowed) from None
        if self._absent_bytes:
            batch = [self._encode_skipping_absent(t, allowed) if self._has_absent_byte(t) else ids for t, ids in zip(texts, batch)]
        return batch

    def _allowed(self, allowed_special: AllowedSpecial) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        unknown = set(allowed_special) - set(self.special_tokens)
        if unknown:
            raise ScratchLMError(f"not special tokens of this tokenizer: {', '.join(sorted(unknown))}")
        return set(allowed_special)

    def _special_in_text_error(self, texts: Sequence[str], allowed: set[str]) -> SpecialTokenInTextError:
        """tiktoken found a disallowed special token; say which, and where."""
        for n, text in enumerate(texts):
            for token in self.special_tokens:
                if token not in allowed and (at := text.find(token)) >= 0:
                    where = f"text {n}, character {at}" if len(texts) > 1 else f"character {at}"
                    return SpecialTokenInTextError(
                        f"text contains the special token {token!r} at {where}; allow it to encode it as "
                        "a special token (allowed_special, CLI --allow-special), or treat it as plain text "
                        "(encode_ordinary, CLI --special-as-text)"
                    )
        return SpecialTokenInTextError("text contains a special token that was not allowed")

    # ---- decoding ---------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes the ids stand for (may end inside a UTF-8 sequence)."""
        id_to_bytes = self.id_to_bytes
        try:
            return b"".join(id_to_bytes[i] for i in ids)
        except KeyError as exc:
            raise ScratchLMError(f"token id {exc.args[0]} is not in the vocabulary (size {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; bytes that are not valid UTF-8 (such as a cut multi-byte character)
        become U+FFFD instead of raising."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- merges -----------------------------------------------------------------------
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merge list in learning order, recovered from the ranks: each multi-byte token
        is what BPE makes of its own bytes using only lower-ranked tokens, and that ends in
        exactly two parts."""
        merges = []
        for token, rank in sorted(self.ranks.items(), key=lambda item: item[1]):
            if len(token) < 2 or rank >= self.vocab_size:
                continue
            parts = bpe_parts(token, self.ranks, max_rank=rank)
            if len(parts) != 2:
                raise TokenizerFormatError(
                    f"token {token!r} (id {rank}) cannot be made by merging two lower-ranked tokens"
                )
            merges.append((parts[0], parts[1]))
        return merges

    # ---- files ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        content = {
            "pattern": self.pattern,
            "tokens": [[i, base64.b64encode(b).decode("ascii")] for b, i in sorted(self.ranks.items(), key=lambda x: x[1])],
            "special_tokens": dict(sorted(self.special_tokens.items(), key=lambda x: x[1])),
            "name": self.name,
            "metadata": self.metadata,
            "vocab_size": self.vocab_size,
        }
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "sha256": _content_hash(content), **content}

    @property
    def content_hash(self) -> str:
        """SHA-256 of pattern, tokens, special tokens, name and metadata: identifies the tokenizer
        (shards record it so that a mismatched tokenizer is caught)."""
        return self.to_dict()["sha256"]

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=None) + "\n")

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer") -> "Tokenizer":
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise TokenizerFormatError(
                f"{source}: not a scratchlm tokenizer file (to use a Hugging Face tokenizer.json or a "
                "GGUF file, import it: scratchlm tokenizer import)"
            )
        if data.get("version") != FORMAT_VERSION:
            raise TokenizerFormatError(
                f"{source}: tokenizer format version {data.get('version')!r} is not supported (this scratchlm reads {FORMAT_VERSION})"
            )
        try:
            content = {k: data[k] for k in ("pattern", "tokens", "special_tokens", "name", "metadata", "vocab_size")}
            ranks = {base64.b64decode(b, validate=True): int(i) for i, b in content["tokens"]}
            specials = {str(s): int(i) for s, i in content["special_tokens"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise TokenizerFormatError(f"{source}: corrupt tokenizer file ({type(exc).__name__}: {exc})") from None
        if _content_hash(content) != data.get("sha256"):
            raise TokenizerFormatError(f"{source}: content hash does not match; the file is corrupt or was edited")
        return cls(
            ranks, specials, content["pattern"], name=content["name"], metadata=content["metadata"],
            vocab_size=int(content["vocab_size"]),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        p = Path(path)
        if not p.is_file():
            raise InputFileError(f"{p}: no such tokenizer file")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerFormatError(f"{p}: not a scratchlm tokenizer file (not JSON: {exc})") from None
        return cls.from_dict(data, source=str(p))

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, special_tokens={len(self.special_tokens)})"


def bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int | None = None) -> list[bytes]:
    """Byte-pair-encode `token` with the rank rule, using only ranks below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_at = None, -1
        for at in range(len(parts) - 1):
            rank = ranks.get(parts[at] + parts[at + 1])
            if rank is not None and (max_rank is None or rank < max_rank) and (best_rank is None or rank < best_rank):
                best_rank, best_at = rank, at
        if best_rank is None:
            break
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts


def _content_hash(content: dict) -> str:
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_vocabulary(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> None:
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerFormatError(f"vocabulary lacks {len(missing)} of the 256 single-byte tokens (first: {missing[0]})")
    ids = list(ranks.values()) + list(special_tokens.values())
    if len(set(ids)) != len(ids):
        raise TokenizerFormatError("two tokens share one id")
    if min(ids) < 0:
        raise TokenizerFormatError("negative token id")
    for token in special_tokens:
        if not token:
            raise TokenizerFormatError("empty special token")
