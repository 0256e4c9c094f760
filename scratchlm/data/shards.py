"""Token shards: the format pretraining reads.

A shard folder holds flat binary files of token ids (`uint16` when the vocabulary fits, else
`uint32`), one stream per split, cut into files of at most `shard_tokens` tokens, and a
`manifest.json`:

    {"format": "scratchlm-shards", "version": 1, "dtype": "uint16", "vocab_size": 8192,
     "tokenizer_sha256": "...", "eot_id": 8189,
     "splits": {"train": [{"file": "train_000000.bin", "tokens": 1048576}, ...], "val": [...]},
     "documents": {"train": 1234, "val": 137}, "sources": {...}}

Documents are separated by `<|endoftext|>`. The manifest records the tokenizer's content hash,
so training with a different tokenizer is caught. Files are written atomically (temporary
name, then rename), and the manifest last: a folder without a manifest is incomplete.
"""

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scratchlm.atomic_io import write_bytes_atomic, write_text_atomic
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.tokenizer import Tokenizer

FORMAT_NAME = "scratchlm-shards"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 24
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def split_tokens(manifest: dict) -> dict[str, int]:
    """Token count of each split, from a manifest."""
    return {split: sum(f["tokens"] for f in files) for split, files in manifest["splits"].items()}


def val_by_hash(key: str, val_fraction: float) -> bool:
    """Stable train/val assignment: the same document goes to the same split on every run."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


@dataclass
class ShardWriter:
    """Appends token ids per split and writes full shards as it goes, so memory stays at one
    shard per split whatever the corpus size."""

    out: Path
    vocab_size: int
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    buffers: dict[str, list[np.ndarray]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    buffered: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    files: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    documents: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})

    def __post_init__(self) -> None:
        if self.shard_tokens < 1:
            raise ConfigError(f"shard size must be at least 1 token, not {self.shard_tokens}")

    def add(self, split: str, ids: list[int] | np.ndarray, documents: int = 1) -> None:
        array = np.asarray(ids, dtype=token_dtype(self.vocab_size))
        self.buffers[split].append(array)
        self.buffered[split] += len(array)
        self.documents[split] += documents
        while self.buffered[split] >= self.shard_tokens:
            self._flush(split, self.shard_tokens)

    def _flush(self, split: str, count: int) -> None:
        data = np.concatenate(self.buffers[split]) if self.buffers[split] else np.zeros(0, token_dtype(self.vocab_size))
        head, rest = data[:count], data[count:]
        name = f"{split}_{len(self.files[split]):06d}.bin"
        write_bytes_atomic(self.out / name, head.tobytes())
        self.files[split].append({"file": name, "tokens": int(len(head))})
        self.buffers[split] = [rest] if len(rest) else []
        self.buffered[split] = len(rest)

    def finish(self, tokenizer: Tokenizer, extra: dict | None = None) -> dict:
        for split in SPLITS:
            if self.buffered[split]:
                self._flush(split, self.buffered[split])
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": token_dtype(self.vocab_size).name,
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": tokenizer.content_hash,
            "eot_id": tokenizer.eot_id,
            "splits": self.files,
            "documents": self.documents,
            **(extra or {}),
        }
        write_text_atomic(self.out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        return manifest


def tokenize_documents(
    documents: Iterable[tuple[str, str]],
    tokenizer: Tokenizer,
    out: str | Path,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_size: int = 256,
    num_threads: int = 2,
    extra: dict | None = None,
) -> dict:
    """Tokenize `(split, text)` documents into a shard folder, each followed by `<|endoftext|>`."""
    if tokenizer.eot_id is None:
        raise ConfigError("the tokenizer has no <|endoftext|> token to separate documents")
    Path(out).mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(Path(out), tokenizer.vocab_size, shard_tokens)
    for batch in _batches(documents, batch_size):
        encoded = tokenizer.encode_batch([text for _, text in batch], num_threads=num_threads)
        for (split, _), ids in zip(batch, encoded):
            ids.append(tokenizer.eot_id)
            writer.add(split, ids)
    return writer.finish(tokenizer, extra)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- reading ----------------------------------------------------------------------------
@dataclass
class TokenShards:
    """A shard folder opened for reading: each split as one memory-mapped token stream."""

    path: Path
    manifest: dict
    streams: dict[str, list[np.memmap]]

    @classmethod
    def open(cls, path: str | Path) -> "TokenShards":
        folder = Path(path)
        manifest_path = folder / "manifest.json"
        if not folder.is_dir():
            raise InputFileError(f"{folder}: no such shard folder (make one with: scratchlm data tokenize)")
        if not manifest_path.is_file():
            raise InputFileError(f"{folder}: no manifest.json; not a shard folder, or tokenizing did not finish")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{manifest_path}: corrupt manifest ({exc})") from None
        if manifest.get("format") != FORMAT_NAME:
            raise InputFileError(f"{manifest_path}: not a scratchlm shard manifest")
        dtype = np.dtype(manifest["dtype"])
        streams: dict[str, list[np.memmap]] = {}
        for split, files in manifest["splits"].items():
            streams[split] = []
            for entry in files:
                file = folder / entry["file"]
                if not file.is_file():
                    raise InputFileError(f"{file}: shard listed in the manifest is missing")
                if file.stat().st_size != entry["tokens"] * dtype.itemsize:
                    raise InputFileError(f"{file}: size does not match the manifest ({entry['tokens']} tokens); the shard is truncated or corrupt")
                if entry["tokens"]:
                    streams[split].append(np.memmap(file, dtype=dtype, mode="r"))
        return cls(folder, manifest, streams)

    def tokens(self, split: str) -> int:
        return sum(len(s) for s in self.streams.get(split, []))

    def read(self, split: str, start: int, count: int) -> np.ndarray:
        """`count` tokens of `split` from position `start`, wrapping around at the end."""
        streams = self.streams[split]
        total = self.tokens(split)
        out = np.empty(count, dtype=np.int64)
        filled, pos = 0, start % total
        while filled < count:
            offset = pos
            for stream in streams:  # find the shard holding `pos`
                if offset < len(stream):
                    take = min(len(stream) - offset, count - filled)
                    out[filled : filled + take] = stream[offset : offset + take]
                    filled += take
                    pos = (pos + take) % total
                    break
                offset -= len(stream)
        return out

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        expected = self.manifest.get("tokenizer_sha256")
        if expected and expected != tokenizer.content_hash:
            raise ConfigError(
                f"{self.path}: shards were made with a different tokenizer (sha256 {expected[:12]}…, "
                f"given {tokenizer.content_hash[:12]}…)"
            )
