"""Training byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant).

1. Pre-tokenize: cut the corpus into chunks with the pattern and count each distinct chunk.
   This is the only pass over the text and runs in parallel, block by block.
2. Start from the 256 single bytes. Repeatedly merge the most frequent adjacent pair of
   tokens, counted across distinct chunks weighted by their frequency, into a new token.

Step 2 keeps the pair counts up to date instead of recounting: merging (a, b) only changes
the pairs in chunks that contain (a, b), and `where` remembers which chunks those are. A max-heap
finds the next pair; entries go stale as counts fall, so a popped entry whose count has changed
is pushed back with its current count (counts of existing pairs only ever fall; new pairs
appear only around the new token). `train_bpe_reference` is the same algorithm written the
slow, obvious way, and the tests hold the two to identical merges.

Tie rule, so that training is deterministic: among pairs with the highest count, the pair
with the smallest (left id, right id) wins. Ids are bytes 0-255, then merges in order.
"""

import heapq
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.text.reading import ReadReport, expand_inputs, read_text_blocks
from scratchlm.tokenizer.pretokenize import DEFAULT_PATTERN_NAME, count_chunks, resolve_pattern
from scratchlm.tokenizer.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer

Pair = tuple[int, int]


@dataclass
class TrainReport:
    """What training did, for the CLI and for tests."""

    distinct_chunks: int = 0
    total_chunks: int = 0
    merges: int = 0
    stopped_early: str | None = None  # why fewer merges than asked, if so
    warnings: list[str] = field(default_factory=list)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = DEFAULT_PATTERN_NAME,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    workers: int | None = None,
    progress: bool = False,
    report: TrainReport | None = None,
    name: str = "scratchlm",
) -> Tokenizer:
    """Learn a byte-level BPE tokenizer from an iterable of text blocks.

    `vocab_size` counts the 256 bytes, the merges and the special tokens, which take the
    top ids. Training stops early if no pair occurs at least `min_frequency` times.
    `workers` processes pre-tokenize in parallel (default: all cores).
    """
    pattern = resolve_pattern(pattern)
    num_merges = merges_for_vocab(vocab_size, special_tokens)
    if min_frequency < 1:
        raise ConfigError(f"min frequency must be at least 1, not {min_frequency}")
    report = report if report is not None else TrainReport()
    chunk_counts = count_corpus_chunks(texts, pattern, special_tokens, workers, progress)
    if not chunk_counts:
        raise InputFileError("the training corpus is empty: no text to learn merges from")
    report.distinct_chunks = len(chunk_counts)
    report.total_chunks = sum(chunk_counts.values())
    merges = learn_merges(chunk_counts, num_merges, min_frequency, progress)
    report.merges = len(merges)
    if len(merges) < num_merges:
        report.stopped_early = (
            f"only {len(merges)} of {num_merges} merges: no pair occurs {min_frequency} or more times; "
            f"vocab size is {256 + len(merges) + len(special_tokens)}"
        )
    return tokenizer_from_merges(merges, pattern, special_tokens, name=name)


# One vocabulary entry per this many bytes of training text, rounded down to a power of two. On
# 2 CPU cores with minutes of training, 512 tokens beat 1024 and 2048 on a 0.38 MB book, 1024
# won on a 0.67 MB one, and 2048 beat 4096 on the embedded corpus (docs/benchmarks.md): a token
# the text holds too few times is not learnt, and each costs a row of the embedding and the head.
BYTES_PER_VOCAB_ENTRY = 512
AUTO_VOCAB_MIN, AUTO_VOCAB_MAX = 512, 32768  # above 2048 an extrapolation, capped at common sizes


def auto_vocab_size(corpus_bytes: int) -> int:
    """The vocabulary `--vocab-size auto` picks for `corpus_bytes` of training text."""
    size = AUTO_VOCAB_MIN
    while size * 2 <= corpus_bytes // BYTES_PER_VOCAB_ENTRY and size < AUTO_VOCAB_MAX:
        size *= 2
    return size


def corpus_bytes(inputs: Sequence[str | Path] | None, max_bytes: int | None = None) -> int:
    """Bytes `train_tokenizer` would read: the files' sizes, or the embedded corpus's."""
    if inputs:
        total = sum(path.stat().st_size for path in expand_inputs(inputs))
    else:
        from scratchlm.text.embedded import embedded_documents

        total = sum(len(text.encode()) for text in embedded_documents(max_bytes))
    return total if max_bytes is None else min(total, max_bytes)


def train_tokenizer(
    inputs: Sequence[str | Path] | None,
    vocab_size: int | str,
    pattern: str = DEFAULT_PATTERN_NAME,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    max_bytes: int | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[Tokenizer, TrainReport, ReadReport]:
    """Train on files and directories (streamed in blocks), or on the embedded corpus when
    `inputs` is empty. `vocab_size` "auto" sizes the vocabulary to the corpus
    (`auto_vocab_size`). Returns the tokenizer and what reading and training saw."""
    if vocab_size == "auto":
        vocab_size = auto_vocab_size(corpus_bytes(inputs, max_bytes))
    elif not isinstance(vocab_size, int):
        raise ConfigError(f"vocab_size must be a number or 'auto', not {vocab_size!r}")
    read = ReadReport()
    if inputs:
        blocks: Iterable[str] = read_text_blocks(expand_inputs(inputs), read, max_bytes=max_bytes)
    else:
        from scratchlm.text.embedded import embedded_documents

        blocks = _counted(embedded_documents(max_bytes), read)
    report = TrainReport()
    tokenizer = train_bpe(
        blocks, vocab_size, pattern=pattern, special_tokens=special_tokens, min_frequency=min_frequency,
        workers=workers, progress=progress, report=report,
    )
    return tokenizer, report, read


def _counted(texts: Iterable[str], read: ReadReport) -> Iterator[str]:
    for text in texts:
        read.bytes_read += len(text.encode())
        yield text


def merges_for_vocab(vocab_size: int, special_tokens: Sequence[str]) -> int:
    if len(set(special_tokens)) != len(special_tokens):
        raise ConfigError("special tokens must be distinct")
    smallest = 256 + len(special_tokens)
    if vocab_size < smallest:
        raise ConfigError(
            f"vocab size {vocab_size} is too small: it must hold the 256 byte tokens and "
            f"{len(special_tokens)} special tokens, so at least {smallest}"
        )
    return vocab_size - smallest


def tokenizer_from_merges(
    merges: Sequence[Pair], pattern: str, special_tokens: Sequence[str], name: str = "scratchlm"
) -> Tokenizer:
    vocab = [bytes([b]) for b in range(256)]
    for left, right in merges:
        vocab.append(vocab[left] + vocab[right])
    ranks = {token: i for i, token in enumerate(vocab)}
    specials = {token: len(vocab) + i for i, token in enumerate(special_tokens)}
    return Tokenizer(ranks, specials, pattern, name=name)


# ---- step 1: pre-tokenization, in parallel ----------------------------------------------
def count_corpus_chunks(
    texts: Iterable[str],
    pattern: str,
    special_tokens: Sequence[str] = (),
    workers: int | None = None,
    progress: bool = False,
) -> Counter[str]:
    """Count distinct chunks over all text blocks, `workers` processes at a time."""
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers}")
    count = partial(count_chunks, pattern=pattern, special_tokens=tuple(special_tokens))
    total: Counter[str] = Counter()
    bar = tqdm(desc="counting chunks", unit="B", unit_scale=True, disable=not progress)
    with bar:
        if workers == 1:
            results: Iterator[tuple[int, Counter[str]]] = ((len(t.encode()), count(t)) for t in texts)
        else:
            executor = ProcessPoolExecutor(max_workers=workers)
            results = _bounded_map(executor, partial(_sized, count), texts, in_flight=2 * workers)
        try:
            for size, counts in results:
                total.update(counts)
                bar.update(size)
        finally:
            if workers != 1:
                executor.shutdown(cancel_futures=True)
    return total


def _sized(count, text: str) -> tuple[int, Counter[str]]:
    return len(text.encode()), count(text)


def _bounded_map(executor: Executor, fn, items: Iterable, in_flight: int) -> Iterator:
    """`executor.map` that reads `items` lazily, keeping at most `in_flight` tasks queued, so
    a corpus larger than memory streams through; results come back in input order."""
    pending: list[Future] = []
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= in_flight:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


# ---- step 2: merges with incremental pair counts ----------------------------------------
def learn_merges(
    chunk_counts: dict[str, int], num_merges: int, min_frequency: int = 2, progress: bool = False
) -> list[Pair]:
    """Learn up to `num_merges` merges from chunk frequencies; returns (left id, right id)
    pairs, the i-th producing token id 256 + i."""
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    pair_counts: dict[Pair, int] = {}
    where: dict[Pair, set[int]] = {}
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + freq
            where.setdefault(pair, set()).add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[Pair] = []
    bar = tqdm(total=num_merges, desc="learning merges", unit="merge", disable=not progress)
    with bar:
        while len(merges) < num_merges and heap:
            neg_count, pair = heapq.heappop(heap)
            current = pair_counts.get(pair, 0)
            if current != -neg_count:
                if current > 0:
                    heapq.heappush(heap, (-current, pair))
                continue
            if current < min_frequency:
                break
            new_id = 256 + len(merges)
            merges.append(pair)
            for new_pair in _apply_merge(pair, new_id, words, freqs, pair_counts, where):
                heapq.heappush(heap, (-pair_counts[new_pair], new_pair))
            bar.update(1)
    return merges


def _apply_merge(
    pair: Pair,
    new_id: int,
    words: list[list[int]],
    freqs: list[int],
    pair_counts: dict[Pair, int],
    where: dict[Pair, set[int]],
) -> set[Pair]:
    """Merge `pair` into `new_id` in every word holding it, updating counts in place; returns
    the new pairs (those containing `new_id`) that still occur."""
    left, right = pair
    new_pairs: set[Pair] = set()
    for w in where.pop(pair):
        word = words[w]
        merged = merge_pair(word, left, right, new_id)
        if len(merged) == len(word):
            continue  # stale entry: an earlier merge already consumed this word's occurrences
        freq = freqs[w]
        for old in zip(word, word[1:]):
            pair_counts[old] -= freq
        for new in zip(merged, merged[1:]):
            pair_counts[new] = pair_counts.get(new, 0) + freq
            if new_id in new:
                where.setdefault(new, set()).add(w)
                new_pairs.add(new)
        words[w] = merged
    del pair_counts[pair]
    return {p for p in new_pairs if pair_counts[p] > 0}


def merge_pair(word: list[int], left: int, right: int, new_id: int) -> list[int]:
    """Replace each non-overlapping occurrence of (left, right), scanning left to right."""
    out: list[int] = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == left and word[i + 1] == right:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe_reference(chunk_counts: dict[str, int], num_merges: int, min_frequency: int = 2) -> list[Pair]:
    """The same training, written plainly: recount every pair before every merge. Quadratic;
    for teaching and for checking `learn_merges` on small corpora."""
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    merges: list[Pair] = []
    while len(merges) < num_merges:
        counts: Counter[Pair] = Counter()
        for word, freq in zip(words, freqs):
            for pair in zip(word, word[1:]):
                counts[pair] += freq
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < min_frequency:
            break
        new_id = 256 + len(merges)
        merges.append(best)
        words = [merge_pair(word, best[0], best[1], new_id) for word in words]
    return merges
