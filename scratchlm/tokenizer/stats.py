"""How well a tokenizer fits a text: bytes per token, vocabulary use, longest tokens."""

from collections import Counter
from dataclasses import dataclass

from scratchlm.tokenizer.tokenizer import Tokenizer


@dataclass
class TokenizerStats:
    text_bytes: int
    tokens: int
    distinct_tokens: int
    vocab_size: int
    longest: list[tuple[int, bytes]]  # (id, bytes), longest first
    most_common: list[tuple[int, int]]  # (id, count) in the text

    @property
    def bytes_per_token(self) -> float:
        return self.text_bytes / self.tokens if self.tokens else 0.0

    @property
    def vocab_used(self) -> float:
        """Share of the vocabulary that occurs at least once in the text."""
        return self.distinct_tokens / self.vocab_size


def tokenizer_stats(tokenizer: Tokenizer, text: str, top: int = 10) -> TokenizerStats:
    ids = tokenizer.encode_ordinary(text)
    counts = Counter(ids)
    in_vocab = [(i, b) for b, i in tokenizer.ranks.items() if i < tokenizer.vocab_size]
    longest = sorted(in_vocab, key=lambda item: (-len(item[1]), item[0]))[:top]
    return TokenizerStats(
        text_bytes=len(text.encode()),
        tokens=len(ids),
        distinct_tokens=len(counts),
        vocab_size=tokenizer.vocab_size,
        longest=longest,
        most_common=counts.most_common(top),
    )
