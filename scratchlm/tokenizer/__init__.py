"""Tokenizer stage: byte-level BPE trained by our own code, encoded by tiktoken's engine."""

from pathlib import Path

from scratchlm.errors import InputFileError
from scratchlm.gguf_file import is_gguf_file
from scratchlm.tokenizer.formats import (
    hf_tokenizer_from_dict,
    import_gguf_tokenizer,
    import_hf_tokenizer,
    read_json,
    save_hf_tokenizer,
    to_hf_tokenizer_json,
)
from scratchlm.tokenizer.pretokenize import PATTERNS
from scratchlm.tokenizer.stats import TokenizerStats, tokenizer_stats
from scratchlm.tokenizer.tokenizer import DEFAULT_SPECIAL_TOKENS, ENDOFTEXT, FORMAT_NAME, Tokenizer, TokenizerFormatError
from scratchlm.tokenizer.train import TrainReport, train_bpe, train_bpe_reference, train_tokenizer


def load_tokenizer(path: str | Path, pattern: str | None = None) -> Tokenizer:
    """Load a tokenizer from any file we understand: our own JSON file, a Hugging Face
    `tokenizer.json`, or a GGUF model file (its embedded vocabulary). `pattern` overrides the
    pre-tokenizer of an imported one."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "scratchlm-tokenizer.json"):
            if (p / name).is_file():
                return load_tokenizer(p / name, pattern)
        raise InputFileError(f"{p}: folder holds no tokenizer.json")
    if not p.is_file():
        raise InputFileError(f"{p}: no such tokenizer file")
    if is_gguf_file(p):
        return import_gguf_tokenizer(p, pattern)
    data = read_json(p)
    if isinstance(data, dict) and data.get("format") == FORMAT_NAME:
        tokenizer = Tokenizer.from_dict(data, source=str(p))
        if pattern is None:
            return tokenizer
        return Tokenizer(tokenizer.ranks, tokenizer.special_tokens, pattern, tokenizer.name, tokenizer.metadata, tokenizer.vocab_size)
    return hf_tokenizer_from_dict(data, str(p), pattern, name=p.parent.name or "imported")


__all__ = [
    "DEFAULT_SPECIAL_TOKENS",
    "ENDOFTEXT",
    "PATTERNS",
    "Tokenizer",
    "TokenizerFormatError",
    "TokenizerStats",
    "TrainReport",
    "import_gguf_tokenizer",
    "import_hf_tokenizer",
    "load_tokenizer",
    "save_hf_tokenizer",
    "to_hf_tokenizer_json",
    "tokenizer_stats",
    "train_bpe",
    "train_bpe_reference",
    "train_tokenizer",
]
