"""Token-level facts that every stage above the tokenizer needs and must agree on."""

import numpy as np

from scratchlm.tokenizer.tokenizer import Tokenizer


def token_byte_lengths(tokenizer: Tokenizer, size: int) -> np.ndarray:
    """UTF-8 bytes each id stands for; 0 for special tokens, which bits per byte leaves out."""
    lengths = np.zeros(size, dtype=np.int64)
    for token, i in tokenizer.ranks.items():
        if i < size:
            lengths[i] = len(token)
    return lengths
