"""Tokenizers in other formats: Hugging Face `tokenizer.json` (export and import) and the
vocabulary stored in a GGUF model file (import).

Both store byte-level BPE as token strings in GPT-2's byte-to-unicode alphabet, a merge list,
and added tokens. We keep tokens as bytes with ids as ranks, so an import checks that the ids
follow the merge order (then rank-based and merge-based BPE agree) and refuses anything else
(normalizers, SentencePiece-style models, byte fallback) with a message naming what it found.
"""

import json
import reprlib
from collections import Counter
from pathlib import Path

from scratchlm.atomic_io import write_text_atomic
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.gguf_file import gguf_metadata, open_gguf
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
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:  # not UTF-8, not JSON, or a number of more than 4300 digits
        raise TokenizerFormatError(f"{path}: not a JSON file ({exc})") from None
    except RecursionError:
        raise TokenizerFormatError(f"{path}: not a JSON file we can read (nested too deeply)") from None


def hf_tokenizer_from_dict(data: object, where: str, pattern: str | None = None, name: str = "imported") -> Tokenizer:
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise TokenizerFormatError(f"{where}: neither a scratchlm tokenizer nor a Hugging Face tokenizer.json")
    try:
        return _hf_tokenizer(data, where, pattern, name)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        # The net under the checks below, for the rarer corners of the pre-tokenizer tree.
        raise TokenizerFormatError(f"{where}: malformed tokenizer.json ({type(exc).__name__}: {exc})") from None


# Token ids index an embedding table, and tiktoken stores them as 32-bit ranks.
MAX_TOKEN_ID = 2**31 - 1


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_ID


def _hf_tokenizer(data: dict, where: str, pattern: str | None, name: str) -> Tokenizer:
    model = data["model"]
    if model.get("type") != "BPE":
        raise TokenizerFormatError(f"{where}: model type {reprlib.repr(model.get('type'))} is not supported; only byte-level BPE is")
    if model.get("byte_fallback"):
        raise TokenizerFormatError(f"{where}: BPE with byte_fallback (SentencePiece style) is not byte-level BPE; not supported")
    if data.get("normalizer") is not None:
        kind = data["normalizer"].get("type") if isinstance(data["normalizer"], dict) else data["normalizer"]
        raise TokenizerFormatError(f"{where}: normalizer {reprlib.repr(kind)} is not supported")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerFormatError(f"{where}: the BPE model has no vocabulary")
    bad = next((item for item in vocab.items() if not _is_token_id(item[1])), None)
    if bad is not None:
        raise TokenizerFormatError(f"{where}: vocabulary token {reprlib.repr(bad[0])} has id {reprlib.repr(bad[1])}; "
                                   f"expected an integer from 0 to {MAX_TOKEN_ID}")
    merges = model.get("merges", [])
    if not isinstance(merges, list) or not all(isinstance(m, str) or _is_pair_of_strings(m) for m in merges):
        raise TokenizerFormatError(f"{where}: model.merges is not a list of \"left right\" strings or [left, right] pairs")
    added_tokens = data.get("added_tokens") or []
    if not isinstance(added_tokens, list) or not all(
        isinstance(t, dict) and isinstance(t.get("content"), str) and _is_token_id(t.get("id")) for t in added_tokens
    ):
        raise TokenizerFormatError(f"{where}: added_tokens is not a list of {{\"content\": text, \"id\": integer}} entries")
    if pattern:
        resolved = resolve_pattern(pattern)
    else:
        try:
            resolved = _pattern_from_hf(data.get("pre_tokenizer"), where)
        except ConfigError as exc:  # the file's regex is refused in words that do not name the file
            raise TokenizerFormatError(f"{where}: pre-tokenizer regex: {exc}") from None
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    added = {t["content"]: t["id"] for t in added_tokens}
    return _tokenizer_from_token_strings(vocab, pairs, added, resolved, where, name=name)


def _is_pair_of_strings(merge: object) -> bool:
    return isinstance(merge, list) and len(merge) == 2 and all(isinstance(part, str) for part in merge)


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
    return gguf_metadata(reader if reader is not None else open_gguf(path), str(path), prefix)


_REQUIRED = object()


def _gguf_typed(meta: dict, key: str, kind: type, where: str, default: object = _REQUIRED, of: type | None = None) -> object:
    """`meta[key]` checked to be a `kind` (of `of` elements for a list), or `default` if absent.
    The value types in a GGUF file are the file's claim; a corrupt one must not reach the code
    below as, say, a string where a list of tokens was expected."""
    value = meta.get(key)
    if value is None:
        if default is _REQUIRED:
            raise TokenizerFormatError(f"{where}: metadata key {key} is missing")
        return default
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if ok and of is not None:
        ok = all(isinstance(v, of) and not (of is int and isinstance(v, bool)) for v in value)
    if not ok:
        expected = f"a list of {of.__name__}" if of is not None else kind.__name__
        raise TokenizerFormatError(f"{where}: metadata key {key} is {reprlib.repr(value)}; expected {expected}")
    return value


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
            f"{where}: tokenizer model {reprlib.repr(model)} is not supported; only byte-level BPE ('gpt2') is"
        )
    if pattern is None:
        pre = _gguf_typed(meta, "tokenizer.ggml.pre", str, where, default="default")
        if pre not in GGUF_PRE_PATTERNS:
            raise TokenizerFormatError(
                f"{where}: pre-tokenizer {reprlib.repr(pre)} is not known (known: {', '.join(GGUF_PRE_PATTERNS)}); pass a pattern"
            )
        resolved = GGUF_PRE_PATTERNS[pre]
    else:
        resolved = resolve_pattern(pattern)
    tokens: list[str] = _gguf_typed(meta, "tokenizer.ggml.tokens", list, where, of=str)
    types: list[int] = _gguf_typed(meta, "tokenizer.ggml.token_type", list, where, default=[1] * len(tokens), of=int)
    if len(types) != len(tokens):
        raise TokenizerFormatError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    added = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}
    vocab = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == 1}
    if len(vocab) + len(added) != sum(kind in (1, 3, 4) for kind in types):
        counts = Counter(tok for tok, kind in zip(tokens, types) if kind in (1, 3, 4))
        twice = next(tok for tok, n in counts.items() if n > 1)
        raise TokenizerFormatError(f"{where}: token {reprlib.repr(twice)} appears twice in tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _gguf_typed(meta, "tokenizer.ggml.merges", list, where, default=[], of=str)]
    metadata: dict[str, object] = {"source": p.name}
    optional = (("chat_template", "tokenizer.chat_template", str), ("bos_token_id", "tokenizer.ggml.bos_token_id", int),
                ("eos_token_id", "tokenizer.ggml.eos_token_id", int), ("add_bos_token", "tokenizer.ggml.add_bos_token", bool))
    for name, key, kind in optional:
        value = _gguf_typed(meta, key, kind, where, default=None)
        if value is not None:
            metadata[name] = value
    for name in ("bos_token_id", "eos_token_id"):
        if not 0 <= metadata.get(name, 0) < len(tokens):
            raise TokenizerFormatError(f"{where}: tokenizer.ggml.{name} is {metadata[name]}; the ids are 0 to {len(tokens) - 1}")
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
        ranks = {token_string_to_bytes(t): i for t, i in vocab.items() if i not in added_ids}
    except KeyError as exc:
        raise TokenizerFormatError(f"{where}: token with character {exc.args[0]!r} outside the byte-level alphabet") from None
    _check_merge_order(ranks, merges, vocab, where)
    declared_size = max([*vocab.values(), *added.values()]) + 1
    absent = [b for b in range(256) if bytes([b]) not in ranks]
    for n, byte in enumerate(absent):
        ranks[bytes([byte])] = declared_size + n
    try:
        return Tokenizer(ranks, added, pattern, name=name, metadata=metadata, vocab_size=declared_size)
    except TokenizerFormatError as exc:  # its own checks (shared ids, empty special token) name no file
        raise TokenizerFormatError(f"{where}: {exc}") from None


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
