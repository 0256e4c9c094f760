"""`scratchlm quickstart`: the whole path on the embedded corpus, in minutes on a laptop CPU.

    train a tokenizer -> tokenize into shards -> pretrain a small Llama-style model within a
    wall-clock budget -> evaluate (validation loss, bits per byte) -> sample -> report
"""

import time
from dataclasses import dataclass
from pathlib import Path

from scratchlm.data.shards import split_tokens
from scratchlm.data.tokenize import tokenize_files
from scratchlm.errors import ConfigError
from scratchlm.tokenizer import train_tokenizer
from scratchlm.tokenizer.train import auto_vocab_size, corpus_bytes
from scratchlm.train.config import load_train_config, resolve_recipe
from scratchlm.train.pretrain import RunSummary, pretrain

QUICKSTART_VOCAB = "auto"  # sized to the corpus: 2048 for the embedded corpus (docs/benchmarks.md)


@dataclass
class QuickstartResult:
    out: Path
    tokenizer: Path
    shards: Path
    run: RunSummary
    seconds: float


def quickstart(
    out: str | Path = "runs/quickstart",
    overrides: list[str] | None = None,
    vocab_size: int | str = QUICKSTART_VOCAB,
    progress: bool = True,
    log=print,
) -> QuickstartResult:
    start = time.perf_counter()
    root = Path(out)
    if (root / "run" / "metrics.jsonl").exists():
        raise ConfigError(f"{root} already holds a quickstart; choose another --out or delete it")
    config = load_train_config(resolve_recipe("quickstart"), overrides)
    if vocab_size == "auto":
        vocab_size = auto_vocab_size(corpus_bytes(None))
    log(f"[1/3] training a {vocab_size}-token BPE tokenizer on the embedded corpus (CPython's documentation)")
    tokenizer, _, read = train_tokenizer(None, vocab_size, progress=progress)
    tokenizer_path = tokenizer.save(root / "tokenizer.json")
    log(f"      {read.bytes_read / 1e6:.2f} MB of text -> {tokenizer_path}")
    log("[2/3] tokenizing the corpus into train/val shards")
    manifest = tokenize_files(None, tokenizer, root / "shards")
    counts = split_tokens(manifest)
    log(f"      {counts['train']:,} train tokens, {counts['val']:,} validation tokens -> {root / 'shards'}")
    log(f"[3/3] pretraining for {config.max_time} (model: {config.model}), then evaluating and sampling")
    run = pretrain(root / "shards", root / "run", config, progress=progress)
    return QuickstartResult(root, tokenizer_path, root / "shards", run, time.perf_counter() - start)
