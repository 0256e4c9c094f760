"""Tokenizers in other formats: Hugging Face `tokenizer.json` (export and import) and the
vocabulary stored in a GGUF model file (import).

Both store byte-level BPE as token strings in GPT-2's byte-to-unicode alphabet, a merge list,
and added tokens. We keep tokens as bytes with ids as ranks, so an import checks that the ids
follow the merge order (then rank-based and merge-based BPE agree) and refuses anything else
(normalizers, SentencePiece-style models, byte fallback) with a message naming what it found.
"""

import json
from pathlib import Path

from scratchlm.atomic_io import write_text_atomic
from scratchlm.errors import InputFileError
from scratchlm.tokenizer.bytelevel import bytes_to_token_string, token_string_to_bytes
from scratchlm.tokenizer.pretokenize import GPT2_PATTERN, LLAMA3_PATTERN, SMOLLM_PATTERN, resolve_pattern
from scratchlm.tokenizer.tokenizer import Tokenizer, TokenizerFormatError

# llama.cpp's names for pre-tokenizers (GGUF key `tokenizer.ggml.pre`) that we can express.
GGUF_PRE_PATTERNS = {
    "gpt2": GPT2_PATTERN,
    "default": GPT2_PATTERN,
    "smollm": SMOLLM_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
}


# ---- Hugging Face tokenizer.json: export ------------------------------------------------
def to_hf_tokenizer_json(tokenizer: Tokenizer) -> dict:
    """A `tokenizer.json` that Hugging Face `tokenizers` (and `PreTrainedTokenizerFast`) load
    and that encodes exactly as `tokenizer` does: our pattern as a Split pre-tokenizer, then
    the byte-to-unicode mapping, then BPE with the merge list recovered from the ranks."""
    to_str = bytes_to_token_string
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for s, i in sorted(tokenizer.special_tokens.items(), key=lambda x: x[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": _hf_vocab(tokenizer),
            "merges": [[to_str(a), to_str(b)] for a, b in tokenizer.merges()],
        },
    }


def _hf_vocab(tokenizer: Tokenizer) -> dict[str, int]:
    """The BPE vocabulary as Hugging Face `tokenizers` needs it. Two traps: it ignores the id of
    an added token whose string is not in the vocabulary and numbers it after the vocabulary
    (SmolLM2's <|im_start|> = 1 would come back as 49157), so special tokens are listed here too,
    as real checkpoints do; and single bytes the vocabulary lacks (our ids from `vocab_size` up,
    see `Tokenizer`) must stay absent, or they would get ids beyond the model's embeddings."""
    vocab = {bytes_to_token_string(b): i for b, i in tokenizer.ranks.items() if i < tokenizer.vocab_size}
    for token, i in tokenizer.special_tokens.items():
        if vocab.setdefault(token, i) != i:
            raise TokenizerFormatError(f"special token {token!r} (id {i}) is also an ordinary token (id {vocab[token]}); "
                                       "Hugging Face tokenizers cannot hold both")
    return dict(sorted(vocab.items(), key=lambda item: item[1]))


def save_hf_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    return write_text_atomic(path, json.dumps(to_hf_tokenizer_json(tokenizer), ensure_ascii=False) + "\n")


# ---- Hugging Face tokenizer.json: import ------------------------------------------------
def import_hf_tokenizer(path: str | Path, pattern: str | None = None) -> Tokenizer:
    """Read a byte-level BPE `tokenizer.json` (GPT-2, Llama 3, SmolLM2 style)."""
    p = Path(path)
    return hf_tokenizer_from_dict(read_json(p), str(p), pattern, name=p.parent.name or "imported")


def read_json(path: Path) -> object:
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerFormatError(f"{path}: not a JSON file ({exc})") from None


def hf_tokenizer_from_dict(data: object, where: str, pattern: str | None = None, name: str = "imported") -> Tokenizer:
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise TokenizerFormatError(f"{where}: neither a scratchlm tokenizer nor a Hugging Face tokenizer.json")
    try:
        return _hf_tokenizer(data, where, pattern, name)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        raise TokenizerFormatError(f"{where}: malformed tokenizer.json ({type(exc).__name__}: {exc})") from None


def _hf_tokenizer(data: dict, where: str, pattern: str | None, name: str) -> Tokenizer:
    model = data["model"]
    if model.get("type") != "BPE":
        raise TokenizerFormatError(f"{where}: model type {model.get('type')!r} is not supported; only byte-level BPE is")
    if model.get("byte_fallback"):
        raise TokenizerFormatError(f"{where}: BPE with byte_fallback (SentencePiece style) is not byte-level BPE; not supported")
    if data.get("normalizer") is not None:
        kind = data["normalizer"].get("type") if isinstance(data["normalizer"], dict) else data["normalizer"]
        raise TokenizerFormatError(f"{where}: normalizer {kind!r} is not supported")
    if not isinstance(model.get("vocab"), dict) or not model["vocab"]:
        raise TokenizerFormatError(f"{where}: the BPE model has no vocabulary")
    resolved = resolve_pattern(pattern) if pattern else _pattern_from_hf(data.get("pre_tokenizer"), where)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    return _tokenizer_from_token_strings(model.get("vocab", {}), merges, added, resolved, where, name=name)


def _pattern_from_hf(pre: dict | None, where: str) -> str:
    def kind(node: dict) -> str:
        return node.get("type", "?")

    if pre is None:
        raise TokenizerFormatError(f"{where}: no pre-tokenizer; pass a pattern explicitly")
    steps = pre["pretokenizers"] if kind(pre) == "Sequence" else [pre]
    kinds = [kind(s) for s in steps]
    last = steps[-1]
    if kinds[-1] != "ByteLevel" or last.get("add_prefix_space"):
        raise TokenizerFormatError(f"{where}: pre-tokenizer {kinds} is not byte-level BPE without a prefix space; not supported")
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return SMOLLM_PATTERN
    if (
        kinds == ["Split", "ByteLevel"]
        and not last.get("use_regex", True)
        and "Regex" in steps[0].get("pattern", {})
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
    ):
        return resolve_pattern(steps[0]["pattern"]["Regex"])
    raise TokenizerFormatError(f"{where}: pre-tokenizer {kinds} is not supported; pass the equivalent regex as pattern")


# ---- GGUF -------------------------------------------------------------------------------
def read_gguf_metadata(path: str | Path, prefix: str = "", reader=None) -> dict:
    """The key/value metadata of a GGUF file whose keys start with `prefix`, as Python values.
    `reader`: a GGUFReader already open on `path` (parsing the metadata of a 49k vocabulary
    takes seconds; a model import needs it once, not twice)."""
    p = Path(path)
    if reader is not None:
        return {key: field.contents() for key, field in reader.fields.items() if key.startswith(prefix)}
    if not p.is_file():
        raise InputFileError(f"{p}: no such file")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise InputFileError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    try:
        reader = GGUFReader(p)
    except Exception as exc:  # the reader raises ValueError, struct and numpy errors alike
        raise TokenizerFormatError(f"{p}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith(prefix)}


def import_gguf_tokenizer(path: str | Path, pattern: str | None = None, reader=None) -> Tokenizer:
    """Read the byte-level BPE tokenizer from a GGUF model file's `tokenizer.ggml.*` metadata.

    The pre-tokenizer comes from `tokenizer.ggml.pre` (llama.cpp's names); `pattern` overrides
    it. Note: transformers' own GGUF loader ignores that key and always uses GPT-2's pattern,
    which differs from the model's training tokenizer for SmolLM2 (digits are split singly);
    pass pattern="gpt2" to reproduce transformers."""
    p = Path(path)
    meta = read_gguf_metadata(p, prefix="tokenizer.", reader=reader)
    where = str(p)
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerFormatError(
            f"{where}: tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2') is"
        )
    if pattern is None:
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_PATTERNS:
            raise TokenizerFormatError(
                f"{where}: pre-tokenizer {pre!r} is not known (known: {', '.join(GGUF_PRE_PATTERNS)}); pass a pattern"
            )
        resolved = GGUF_PRE_PATTERNS[pre]
    else:
        resolved = resolve_pattern(pattern)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    added = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}
    vocab = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == 1}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    metadata = {
        "source": p.name,
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token"),
    }
    metadata = {k: v for k, v in metadata.items() if v is not None}
    return _tokenizer_from_token_strings(vocab, merges, added, resolved, where, name=p.stem, metadata=metadata)


# ---- shared -----------------------------------------------------------------------------
def _tokenizer_from_token_strings(
    vocab: dict[str, int],
    merges: list[tuple[str, ...]],
    added: dict[str, int],
    pattern: str,
    where: str,
    name: str,
    metadata: dict | None = None,
) -> Tokenizer:
    if not vocab:
        raise TokenizerFormatError(f"{where}: the vocabulary is empty")
    added_ids = set(added.values())
    try:
        ranks = {token_string_to_bytes(t): int(i) for t, i in vocab.items() if int(i) not in added_ids}
    except KeyError as exc:
        raise TokenizerFormatError(f"{where}: token with character {exc.args[0]!r} outside the byte-level alphabet") from None
    _check_merge_order(ranks, merges, vocab, where)
    declared_size = max([*vocab.values(), *added.values()]) + 1
    absent = [b for b in range(256) if bytes([b]) not in ranks]
    for n, byte in enumerate(absent):
        ranks[bytes([byte])] = declared_size + n
    return Tokenizer(ranks, added, pattern, name=name, metadata=metadata, vocab_size=declared_size)


def _check_merge_order(ranks: dict[bytes, int], merges: list[tuple[str, ...]], vocab: dict[str, int], where: str) -> None:
    """Rank-based BPE (tiktoken) equals merge-list BPE when each merge's result has a larger id
    than its parts and than every earlier merge's result. Verify it rather than assume it."""
    previous = -1
    for n, merge in enumerate(merges):
        if len(merge) != 2:
            raise TokenizerFormatError(f"{where}: merge {n} {merge!r} is not a pair")
        left, right = merge
        try:
            result = vocab[left + right]
            parts = (vocab[left], vocab[right])
        except KeyError as exc:
            raise TokenizerFormatError(f"{where}: merge {n} uses token {exc.args[0]!r}, which is not in the vocabulary") from None
        if result <= max(parts) or result <= previous:
            raise TokenizerFormatError(
                f"{where}: token ids do not follow the merge order (merge {n}: {left!r} + {right!r}); "
                "such vocabularies cannot be encoded by rank"
            )
        previous = result
    merged = {vocab[left + right] for left, right in merges}
    unmade = [t for t, i in ranks.items() if len(t) > 1 and i not in merged]
    if unmade:
        raise TokenizerFormatError(f"{where}: {len(unmade)} multi-byte tokens are made by no merge (first: {unmade[0]!r})")
