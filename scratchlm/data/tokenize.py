"""`scratchlm data tokenize`: text files (or the embedded corpus) into token shards.

Each input file is a document. With at least `MIN_DOCS_FOR_HASH_SPLIT` documents, whole
documents go to validation by a hash of their name (stable across runs). With fewer, a hash
split would put whole files on one side, so the last `val_fraction` of every document (cut at
a line break) is held out instead. The full cleaning and deduplication pipeline
(`scratchlm data prepare`) writes the same format.
"""

from collections.abc import Iterator, Sequence
from pathlib import Path

from scratchlm.data.shards import DEFAULT_SHARD_TOKENS, tokenize_documents, val_by_hash
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.tokenizer import Tokenizer
from scratchlm.text.reading import expand_inputs, read_text

MIN_DOCS_FOR_HASH_SPLIT = 20


def tokenize_files(
    inputs: Sequence[str | Path] | None,
    tokenizer: Tokenizer,
    out: str | Path,
    val_fraction: float = 0.1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """Tokenize files (or, with no inputs, the embedded corpus) into `out`, copying the
    tokenizer there as `tokenizer.json`. Returns the manifest."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val fraction must be in [0, 1), not {val_fraction}")
    undecodable = 0
    if inputs:
        documents = []
        for path in expand_inputs(inputs):
            text, bad = read_text(path)
            undecodable += bad
            documents.append((str(path), text))
        source = f"{len(documents)} files"
    else:
        documents = embedded_keyed_documents()
        source = "embedded corpus"
    if not any(text.strip() for _, text in documents):
        raise InputFileError("the inputs hold no text")
    if len(documents) >= MIN_DOCS_FOR_HASH_SPLIT:
        split_rule = f"{val_fraction:.0%} of documents, chosen by a hash of their name"
        splits = [("val" if val_by_hash(key, val_fraction) else "train", text) for key, text in documents]
    else:
        split_rule = f"the last {val_fraction:.0%} of each document"
        splits = list(tail_split(documents, val_fraction))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_dir / "tokenizer.json")
    extra = {"source": source, "split_rule": split_rule, "undecodable_bytes": undecodable}
    return tokenize_documents(splits, tokenizer, out_dir, shard_tokens, extra=extra)


def embedded_keyed_documents() -> list[tuple[str, str]]:
    """The embedded corpus as (key, text): the keys decide the train/validation split."""
    from scratchlm.text.embedded import embedded_documents

    return [(f"embedded:{n}", text) for n, text in enumerate(embedded_documents())]


def embedded_validation_text(val_fraction: float = 0.1, max_bytes: int | None = None) -> str:
    """The embedded corpus's validation documents, exactly those `tokenize_files(None, ...)`
    (and so the quickstart) holds out: text a quickstart model never trained on."""
    held_out = [text for key, text in embedded_keyed_documents() if val_by_hash(key, val_fraction)]
    text = "\n\n".join(held_out) + "\n"
    if max_bytes is not None:
        text = text.encode()[:max_bytes].decode("utf-8", errors="ignore")
    return text


def tail_split(documents: list[tuple[str, str]], val_fraction: float) -> Iterator[tuple[str, str]]:
    """(split, text) pairs: each document cut at the line break nearest `1 - val_fraction`."""
    for _, text in documents:
        cut = int(len(text) * (1.0 - val_fraction))
        line_break = text.rfind("\n", 0, cut)
        cut = line_break + 1 if line_break > 0 else cut
        if text[:cut]:
            yield "train", text[:cut]
        if text[cut:]:
            yield "val", text[cut:]
