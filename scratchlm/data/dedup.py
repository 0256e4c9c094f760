"""Exact and near deduplication of documents: xxhash for exact copies, MinHash LSH for near ones.

Near deduplication follows Broder (1997) as FineWeb and datatrove run it:

1. **Shingles**: each document becomes the *set* of its word 5-grams (`words`, `shingle_hashes`).
2. **Signatures**: `num_perm` random hash functions; a document's signature holds, for each one,
   the smallest hash over its shingles. Two documents agree at one position with probability
   equal to the Jaccard similarity of their shingle sets (`MinHasher`).
3. **LSH**: the signature is cut into `bands` bands of `rows` values; documents whose band is
   equal in at least one band become candidate pairs. A pair of similarity s is caught with
   probability 1-(1-s^r)^b, an S-curve centred near the threshold (`choose_bands`, `s_curve`).
4. **Verification and clusters**: candidates are checked (signature agreement or exact Jaccard),
   and union-find joins the survivors; each cluster keeps its first document (`near_duplicates`).

Everything runs in numpy over batches of about half a million characters; no Python object is
made per word or per shingle. `benchmarks/dedup_bench.py` compares it with datasketch (figures in
docs/benchmarks.md). The functions keep no state; a `MinHasher` holds its parameters and a cache,
and pickles small, for worker processes.
"""

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from xxhash import xxh3_64_intdigest

from scratchlm.errors import ConfigError

VERIFY_MODES = ("estimate", "exact", "none")

_WORD = re.compile(r"\w+")
# Bytes that belong to words: ASCII letters, digits and `_`; bytes of multi-byte characters
# count as word bytes until `_word_bytes` has looked at the character.
_WORD_TABLE = bytes(
    1 if byte >= 0x80 or chr(byte).isalnum() or byte == ord("_") else 0 for byte in range(256)
)
# The shingle polynomial's base and its inverse modulo 2^64 (any odd number is invertible).
_POLY_BASE = np.uint64(0x9E3779B97F4A7C15)
_POLY_INV = np.uint64(pow(0x9E3779B97F4A7C15, -1, 1 << 64))
# Odd 64-bit constants (splitmix64's multipliers). Odd multipliers are bijections modulo 2^64,
# so mixing steps never merge distinct states.
_BAND_MULT = np.uint64(0xBF58476D1CE4E5B9)
_BAND_SEED = np.uint64(0x94D049BB133111EB)
_MAX_SIG = np.uint32(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)

# Shingles per permutation block: a (num_perm, block) uint64 matrix of 8 MiB at 128 permutations.
# 4k-8k shingles measured fastest on a 2-core EPYC; 64k (the matrix far out of cache) was 2x slower.
_BLOCK_SHINGLES = 8192
# Characters per batch in `MinHasher.signatures`: bounds the per-byte arrays held at once.
_BATCH_CHARS = 1 << 19
# Within one LSH bucket, each document is paired with its `_BUCKET_WINDOW` predecessors (all
# pairs for buckets of up to 9 documents). Huge buckets (thousands of exact copies) would give
# quadratic pairs otherwise; union-find's transitivity makes a chain enough to cluster them.
_BUCKET_WINDOW = 8
# Candidate pairs verified per numpy step (two uint32 rows of num_perm each per pair).
_VERIFY_CHUNK = 1 << 15


def exact_hash(text: str) -> int:
    """64-bit xxh3 of the UTF-8 text: equal texts give equal hashes. Normalise first (the caller
    decides what counts as equal, e.g. NFC and stripped whitespace)."""
    return xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


# ---- configuration and LSH parameters ----------------------------------------------------
@dataclass(frozen=True)
class MinHashConfig:
    """Near-deduplication settings. Word 5-grams as FineWeb and datatrove use them (they take 112
    hashes in 14 bands of 8, a curve centred near 0.72 similarity and no verification); here
    `threshold` means "remove pairs at least this similar": the bands follow from it so that LSH
    catches at least `recall` of the pairs exactly at the threshold (more above it), and exact
    verification then drops the candidates below it. Give both `bands` and `rows` to choose them
    yourself. The signature uses all `num_perm` values for estimates, even when bands*rows is
    smaller."""

    enabled: bool = True
    num_perm: int = 128
    ngram: int = 5
    threshold: float = 0.8
    bands: int | None = None
    rows: int | None = None
    verify: str = "exact"
    recall: float = 0.95  # the least share of pairs at the threshold that LSH makes candidates
    seed: int = 1

    def __post_init__(self) -> None:
        if self.num_perm < 1:
            raise ConfigError(f"minhash num_perm must be at least 1, got {self.num_perm}")
        if self.ngram < 1:
            raise ConfigError(f"minhash ngram must be at least 1, got {self.ngram}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"minhash threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.recall < 1.0:
            raise ConfigError(f"minhash recall must be in (0, 1), got {self.recall}")
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"minhash verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")
        if (self.bands is None) != (self.rows is None):
            raise ConfigError(
                f"minhash bands and rows go together: give both or neither (got bands={self.bands}, rows={self.rows})"
            )
        if self.bands is not None and (self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm):
            raise ConfigError(
                f"minhash bands={self.bands} x rows={self.rows} must be positive and use at most "
                f"num_perm={self.num_perm} signature values"
            )

    def lsh_params(self) -> tuple[int, int]:
        """(bands, rows): the configured ones, else the best for the threshold."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        return choose_bands(self.threshold, self.num_perm, self.recall)


def catch_probability(similarity: float, bands: int, rows: int) -> float:
    """Probability that LSH makes a pair of this Jaccard similarity a candidate: some band of
    `rows` values agrees entirely."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def s_curve(
    bands: int, rows: int, points: Sequence[float] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
) -> list[tuple[float, float]]:
    """(similarity, catch probability) at each point: the table to read before trusting a
    choice of bands."""
    return [(float(s), catch_probability(float(s), bands, rows)) for s in points]


def removal_probability(similarity: float, config: MinHashConfig) -> float:
    """Probability that a pair of this Jaccard similarity is removed: LSH makes it a candidate
    and verification accepts it (`exact`: at or above the threshold; `estimate`: at least
    threshold * num_perm of the signature values agree, a binomial tail; `none`: always)."""
    bands, rows = config.lsh_params()
    caught = catch_probability(similarity, bands, rows)
    if config.verify == "exact":
        return caught if similarity >= config.threshold else 0.0
    if config.verify == "estimate":
        n, need = config.num_perm, math.ceil(config.threshold * config.num_perm - 1e-9)
        tail = sum(math.comb(n, k) * similarity**k * (1.0 - similarity) ** (n - k) for k in range(need, n + 1))
        return caught * tail
    return caught


def removal_curve(config: MinHashConfig, points: Sequence[float] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)) -> list[tuple[float, float]]:
    """(similarity, probability of removal) at each point: the expected recall curve of a run."""
    return [(float(s), removal_probability(float(s), config)) for s in points]


@lru_cache(maxsize=64)
def choose_bands(threshold: float, num_perm: int, recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm that catch at least `recall` of the pairs at
    exactly `threshold` (and so more of every pair above it: the curve rises), with the least
    area of false positives below the threshold among those: each false candidate costs a
    verification. When no banding reaches `recall`, the one that catches most at the threshold.

    datasketch's rule (`balanced_bands`) centres the curve on the threshold instead, which finds
    a pair at the threshold about half the time."""
    if not 0.0 < threshold <= 1.0 or num_perm < 1 or not 0.0 < recall < 1.0:
        raise ConfigError(f"choose_bands needs 0 < threshold <= 1, num_perm >= 1 and 0 < recall < 1, got {threshold}, {num_perm}, {recall}")
    b, r = _bandings(num_perm)
    caught = 1.0 - (1.0 - threshold**r[:, 0]) ** b[:, 0]
    if not (caught >= recall).any():
        best = int(np.argmax(caught))
    else:
        below = np.linspace(0.0, threshold, 513)
        false_pos = _simpson(1.0 - (1.0 - below**r) ** b, below)
        best = int(np.argmin(np.where(caught >= recall, false_pos, np.inf)))
    return int(b[best, 0]), int(r[best, 0])


@lru_cache(maxsize=64)
def balanced_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the area of false positives (catch
    probability below the threshold) plus false negatives (miss probability above it), equally
    weighted. This is datasketch's `_optimal_param`, integrated with Simpson's rule on a fixed
    grid instead of scipy's quad, so numpy is enough."""
    if not 0.0 < threshold <= 1.0 or num_perm < 1:
        raise ConfigError(f"balanced_bands needs 0 < threshold <= 1 and num_perm >= 1, got {threshold}, {num_perm}")
    b, r = _bandings(num_perm)
    below = np.linspace(0.0, threshold, 513)
    above = np.linspace(threshold, 1.0, 513)
    false_pos = _simpson(1.0 - (1.0 - below**r) ** b, below)
    false_neg = _simpson((1.0 - above**r) ** b, above)
    best = int(np.argmin(false_pos + false_neg))  # first minimum: fewest bands among ties, like datasketch
    return int(b[best, 0]), int(r[best, 0])


def _bandings(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (bands, rows) with bands*rows <= num_perm, as two (k, 1) float columns, fewest bands first."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    return pairs[:, :1], pairs[:, 1:]


def _simpson(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Simpson's rule along the last axis of an odd number of evenly spaced points."""
    step = (grid[-1] - grid[0]) / (len(grid) - 1)
    weights = np.ones(len(grid))
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return values @ weights * step / 3.0


# ---- shingles ----------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """The text lowercased, as its runs of Unicode word characters (`\\w` in `re`: letters,
    digits, `_`). Punctuation and whitespace only separate words, so re-wrapping or
    re-punctuating a document does not hide a copy. Scripts written without spaces (Chinese,
    Japanese) give one word per run, a known weakness of word shingles."""
    return _WORD.findall(text.lower())


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """The sorted, distinct uint64 hashes of the text's word n-grams. A document of fewer than
    `ngram` words is one shingle of all its words; an empty one has none.

    A shingle's hash is `fmix64(polynomial(" ".join(its words).encode()))`: the UTF-8 bytes
    b_0..b_(L-1) of the words joined by single spaces, as sum b_k * M^(L-1-k) modulo 2^64, then
    MurmurHash3's 64-bit finalizer. `_shingle_batch` computes the same numbers for many documents
    at once from prefix sums, without making a Python string per word or per n-gram."""
    hashes, _ = _shingle_batch([text], ngram)
    return np.unique(hashes)


def _shingle_batch(
    texts: Sequence[str], ngram: int, powers: "_PowerTable | None" = None
) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of several documents, concatenated in document order, and the count of
    each document's hashes. Repeated n-grams stay (a minimum does not care, and removing them
    costs a sort per document).

    The documents become one byte stream in which each word is followed by one space. With
    G[i] = sum_(k<i) s_k * M^-k over the stream s, the polynomial of any span [a, e) is
    (G[e] - G[a]) * M^(e-1): a few numpy passes over the bytes and two gathers per n-gram. This
    replaced a regex split plus a dict of word hashes, which cost 3x more (measured)."""
    return _ngram_hashes(*_word_stream(texts), ngram, powers)


def _ngram_hashes(
    words_per_doc: np.ndarray, word_lengths: np.ndarray, stream: np.ndarray, ngram: int, powers: "_PowerTable | None"
) -> tuple[np.ndarray, np.ndarray]:
    """`_shingle_batch` once the words are found: the polynomial of every n-gram's span."""
    if len(word_lengths) == 0:
        return np.zeros(0, np.uint64), np.zeros(len(words_per_doc), np.int64)
    forward, inverse = (powers or _PowerTable()).upto(len(stream))
    prefix = np.empty(len(stream) + 1, np.uint64)
    prefix[0] = 0
    np.multiply(stream, inverse[: len(stream)], out=prefix[1:], dtype=np.uint64)
    np.cumsum(prefix[1:], out=prefix[1:])

    # n-gram j of a document starts at its word j and ends with word j+ngram-1, or with the
    # document's last word when the document is shorter than `ngram` words.
    counts = np.where(words_per_doc >= ngram, words_per_doc - ngram + 1, np.minimum(words_per_doc, 1))
    first_word = np.cumsum(words_per_doc) - words_per_doc
    first_gram = np.cumsum(counts) - counts
    rank = np.arange(int(counts.sum())) - np.repeat(first_gram, counts)
    start_word = np.repeat(first_word, counts) + rank
    end_word = np.minimum(start_word + ngram, np.repeat(first_word + words_per_doc, counts)) - 1
    word_starts = np.cumsum(word_lengths + 1) - (word_lengths + 1)
    span_start = word_starts[start_word]
    span_end = word_starts[end_word] + word_lengths[end_word]
    hashes = prefix[span_end] - prefix[span_start]
    hashes *= forward[span_end - 1]
    return _fmix64(hashes), counts


def _word_stream(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words per document, length in bytes of every word, the stream): the lowercased words'
    UTF-8 bytes, each followed by one space. The same words as `words` gives."""
    encoded = [text.lower().encode("utf-8", "surrogatepass") for text in texts]
    doc_bytes = np.fromiter(map(len, encoded), np.int64, len(encoded)) + 1
    joined = b" ".join(encoded) + b" "
    data = np.frombuffer(joined, np.uint8)
    is_word = _word_bytes(joined, data).view(np.int8)
    edges = np.diff(is_word, prepend=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)  # the buffer ends with a space: every word has an end
    words_per_doc = np.diff(np.searchsorted(starts, np.cumsum(doc_bytes)), prepend=0)
    # Keep word bytes and the first byte after each word, made a space.
    keep = is_word.view(np.bool_).copy()
    keep[ends] = True
    stream = data[keep]
    stream[np.cumsum(ends - starts + 1) - 1] = ord(" ")
    return words_per_doc, ends - starts, stream


def _word_bytes(text: bytes, data: np.ndarray) -> np.ndarray:
    """Which bytes of UTF-8 `text` (also given as the uint8 array `data`) belong to a word
    character (`\\w`). ASCII goes by a table, with `bytes.translate` (3x faster than indexing a
    numpy table). Each multi-byte character is decoded from its lead byte, and its distinct code
    points are asked of the regex once each. On the 20 MB benchmark corpus (a third of the
    documents have some non-ASCII character) this takes 0.025 s, against 0.12 s for blanking
    non-word characters with `re.sub` first."""
    is_word = np.frombuffer(text.translate(_WORD_TABLE), np.bool_)
    if text.isascii():
        return is_word
    lead = np.flatnonzero(data >= 0xC0)
    first = data[lead].astype(np.uint32)
    size = 2 + (first >= 0xE0) + (first >= 0xF0)
    code = first & (np.uint32(0x7F) >> size.astype(np.uint32))
    for k in range(1, 4):
        more = size > k
        following = data[np.minimum(lead + k, len(data) - 1)].astype(np.uint32) & np.uint32(0x3F)
        code = np.where(more, (code << np.uint32(6)) | following, code)
    distinct, which = np.unique(code, return_inverse=True)
    word_char = np.array([_WORD.fullmatch(chr(c)) is not None for c in distinct.tolist()], np.bool_)
    not_word = ~word_char[which]
    if not not_word.any():
        return is_word
    lead, size = lead[not_word], size[not_word]
    is_word = is_word.copy()  # the translated bytes are read-only
    for k in range(4):
        is_word[lead[size > k] + k] = False
    return is_word


class _PowerTable:
    """M^k and M^-k modulo 2^64 for k < n, kept between batches and grown by doubling: building
    them for every batch took about 15% of the shingling time (measured)."""

    def __init__(self) -> None:
        self.forward = self.inverse = np.ones(0, np.uint64)

    def upto(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.forward) < n:
            size = max(n, 2 * len(self.forward), 1 << 16)
            self.forward, self.inverse = _powers(_POLY_BASE, size), _powers(_POLY_INV, size)
        return self.forward, self.inverse


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) modulo 2^64: a cumulative product of 1024 values, then one vectorised
    multiply per block of 1024 (a cumprod over all n is a serial loop, several times slower)."""
    width = 1024
    head = np.full(width, base, np.uint64)
    head[0] = 1
    head = np.cumprod(head)
    step = np.full(-(-n // width), int(head[-1]) * int(base) % (1 << 64), np.uint64)
    step[0] = 1
    return (np.cumprod(step)[:, None] * head[None, :]).ravel()[:n]


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place: every input bit affects every output bit, so
    the weak low bits of a polynomial hash do not reach the permutations."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


# ---- signatures --------------------------------------------------------------------------
class MinHasher:
    """MinHash signatures: (n, num_perm) uint32, one row per document.

    Permutation i is the multiply-shift hash h_i(x) = (a_i * x mod 2^64) >> 32 of the 64-bit
    shingle hash x, with a_i random and odd (Dietzfelbinger, Hagerup, Katajainen, Penttonen
    1997): universal, P[h(x) = h(y)] <= 2^-31 for x != y, and no division. (a*x + b) mod
    (2^61-1), datasketch's legacy scheme, costs a 64-bit modulo per value. The shift commutes
    with the minimum, so it runs once per document, not once per shingle and permutation.

    Why no "+ b" (multiply-add-shift, 2-independent): the keys are already fmix64 outputs,
    indistinguishable from random, so the family only has to decorrelate the permutations. On
    1500 set pairs the estimate's error had mean 0.0000 and 0.985 of the binomial standard
    deviation without b, 0.0004 and 1.004 with it, while the extra pass over the
    (num_perm, shingles) matrix made the whole `deduplicate` 26% slower (20 MB benchmark corpus).
    uint32 arithmetic (a*x + b mod 2^32, datasketch's "affine32") was 13% faster again, but
    needs keys folded to 32 bits, and its low output bits depend only on the low key bits.
    """

    def __init__(self, config: MinHashConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        full = np.iinfo(np.uint64).max
        self.a = rng.integers(0, full, config.num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self._powers = _PowerTable()

    def __getstate__(self) -> dict:
        # The power table is a cache of up to tens of MB: rebuilt, not shipped to workers.
        return {**self.__dict__, "_powers": _PowerTable()}

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """Signatures of the documents, in order. A document without shingles (no words) gets
        all 0xFFFFFFFF: it matches only other empty documents."""
        out = np.full((len(texts), self.config.num_perm), _MAX_SIG, dtype=np.uint32)
        for lo, hi in _batches(texts):
            hashes, counts = _shingle_batch(texts[lo:hi], self.config.ngram, self._powers)
            self._fill(out[lo:hi], hashes, counts)
        return out

    def signature_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """The signature of one document given its shingle hashes (any order, repeats allowed).
        The hashes should look random, as `shingle_hashes` makes them."""
        out = np.full((1, self.config.num_perm), _MAX_SIG, dtype=np.uint32)
        hashes = np.asarray(hashes, dtype=np.uint64)
        self._fill(out, hashes, np.array([len(hashes)]))
        return out[0]

    def _fill(self, out: np.ndarray, hashes: np.ndarray, counts: np.ndarray) -> None:
        """Lower `out[d]` to the per-permutation minimum of document d's hashes, where document d
        owns `counts[d]` consecutive entries of `hashes`.

        Shingles go through in fixed blocks across document boundaries; the matrix is laid out
        (num_perm, block) because `minimum.reduceat` over contiguous runs is several times faster
        than over strided rows (measured). A document cut by a block edge gets two partial minima,
        which `np.minimum` with what is already in `out` merges."""
        docs = np.flatnonzero(counts)
        doc_starts = (np.cumsum(counts) - counts)[docs]
        a = self.a[:, None]
        buffer = np.empty((self.config.num_perm, _BLOCK_SHINGLES), np.uint64)
        for lo in range(0, len(hashes), _BLOCK_SHINGLES):
            hi = min(lo + _BLOCK_SHINGLES, len(hashes))
            first = np.searchsorted(doc_starts, lo, side="right") - 1
            last = np.searchsorted(doc_starts, hi, side="left")
            segments = doc_starts[first:last] - lo
            segments[0] = 0
            block = buffer[:, : hi - lo]
            np.multiply(a, hashes[lo:hi], out=block)
            minima = (np.minimum.reduceat(block, segments, axis=1) >> _SHIFT32).astype(np.uint32).T
            rows = docs[first:last]
            out[rows] = np.minimum(out[rows], minima)


def _batches(texts: Sequence[str]) -> list[tuple[int, int]]:
    """[lo, hi) ranges of about `_BATCH_CHARS` characters (at least one document each): the
    per-byte arrays of a batch are about 30 bytes per character."""
    bounds, lo, size = [], 0, 0
    for i, text in enumerate(texts):
        size += len(text) + 1
        if size >= _BATCH_CHARS:
            bounds.append((lo, i + 1))
            lo, size = i + 1, 0
    if lo < len(texts):
        bounds.append((lo, len(texts)))
    return bounds


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: one hash per band of `rows` consecutive signature values. Reads the
    signatures in chunks, so a memory-mapped array is never loaded whole."""
    n, num_perm = signatures.shape
    if bands < 1 or rows < 1 or bands * rows > num_perm:
        raise ConfigError(f"bands={bands} x rows={rows} needs at most {num_perm} signature values")
    out = np.empty((n, bands), np.uint64)
    step = max(1, (1 << 22) // (bands * rows))
    for lo in range(0, n, step):
        chunk = np.asarray(signatures[lo : lo + step, : bands * rows]).astype(np.uint64)
        chunk = chunk.reshape(len(chunk), bands, rows)
        h = np.full((len(chunk), bands), _BAND_SEED, np.uint64)
        for r in range(rows):  # each step is a bijection of the state, given the value
            h ^= chunk[:, :, r]
            h *= _BAND_MULT
        out[lo : lo + len(chunk)] = h
    return out


# ---- clusters ----------------------------------------------------------------------------
class UnionFind:
    """Disjoint sets over 0..n-1 with union by size and path halving, stored sparsely: only
    elements ever joined take memory, so a corpus of millions with few duplicates stays small.

    `find(i)` answers the set's smallest element, which the tree root keeps track of; union by
    size picks tree roots for depth, not for their index. The smallest element is the copy that
    deduplication keeps."""

    def __init__(self, n: int):
        self.n = n
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.smallest: dict[int, int] = {}

    def _root(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"element {i} is outside 0..{self.n - 1}")
        parent = self.parent
        while parent.get(i, i) != i:
            grand = parent.get(parent[i], parent[i])
            parent[i] = grand
            i = grand
        return i

    def find(self, i: int) -> int:
        return self.smallest.get(root := self._root(i), root)

    def union(self, i: int, j: int) -> bool:
        """Join the sets of i and j; False if they were already one set."""
        ri, rj = self._root(i), self._root(j)
        if ri == rj:
            return False
        if self.size.get(ri, 1) < self.size.get(rj, 1):
            ri, rj = rj, ri
        self.parent[rj] = ri
        self.parent.setdefault(ri, ri)
        self.size[ri] = self.size.get(ri, 1) + self.size.get(rj, 1)
        self.smallest[ri] = min(self.smallest.get(ri, ri), self.smallest.get(rj, rj))
        return True

    def labels(self) -> np.ndarray:
        """int64 array: the smallest element of each element's set."""
        out = np.arange(self.n, dtype=np.int64)
        for i in self.parent:
            out[i] = self.find(i)
        return out


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity estimated from two signatures: the fraction of positions that agree."""
    return float(np.count_nonzero(np.asarray(a) == np.asarray(b))) / len(a)


def exact_jaccard(text_a: str, text_b: str, ngram: int) -> float:
    """Jaccard similarity of the two texts' shingle sets (as 64-bit hashes, so exact up to a
    collision chance of about 2^-64 per pair of shingles). Two texts without words: 1.0."""
    return _set_jaccard(shingle_hashes(text_a, ngram), shingle_hashes(text_b, ngram))


def _set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = len(np.union1d(a, b))
    return 1.0 if union == 0 else len(np.intersect1d(a, b, assume_unique=True)) / union


def candidate_pairs(band_hashes: np.ndarray, partitions: int = 1) -> np.ndarray:
    """(m, 2) int64 pairs (i < j) of documents that share a band hash, each pair once, sorted:
    `bucket_pairs` over every group of `band_groups`, merged. A distributed run maps
    `bucket_pairs` over the groups on its workers and merges the same way, with the same result."""
    n = band_hashes.shape[0]
    return merge_pairs((bucket_pairs(indices, hashes) for indices, hashes in band_groups(band_hashes, partitions)), n)


def band_groups(band_hashes: np.ndarray, partitions: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The shuffle by (band, band hash): for each band and each of `partitions` ranges of hash
    values, the (document indices, band hashes) whose hash falls there, indices ascending. Equal
    hashes of one band always meet in one group, so each group's buckets are whole."""
    n = band_hashes.shape[0]
    indices = np.arange(n, dtype=np.int64)
    for band in range(band_hashes.shape[1]):
        column = np.asarray(band_hashes[:, band])
        if partitions == 1:
            yield indices, column
            continue
        part = column % np.uint64(partitions)
        for p in range(partitions):
            mine = part == p
            yield indices[mine], column[mine]


def bucket_pairs(indices: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """(m, 2) int64 pairs of documents (by `indices`, ascending) with equal `hashes`.

    The hashes are argsorted (stable, so a bucket lists its documents in index order) and each
    document is paired with up to `_BUCKET_WINDOW` predecessors in its bucket, by comparing the
    sorted hashes with themselves shifted. No dict of buckets: the memory is a few arrays of n."""
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    found = [np.zeros((0, 2), np.int64)]
    for shift in range(1, _BUCKET_WINDOW + 1):
        same = ordered[shift:] == ordered[:-shift]
        if not same.any():  # no bucket holds more than `shift` documents
            break
        found.append(np.stack([indices[order[:-shift][same]], indices[order[shift:][same]]], axis=1))
    return np.concatenate(found)


def merge_pairs(groups: Iterable[np.ndarray], n: int) -> np.ndarray:
    """The union of pair arrays over n documents, each pair once, sorted."""
    keys = np.zeros(0, np.int64)
    for pairs in groups:
        if len(pairs):
            keys = np.unique(np.concatenate([keys, pairs[:, 0] * n + pairs[:, 1]]))
    return np.stack([keys // n, keys % n], axis=1) if n else np.zeros((0, 2), np.int64)


def near_duplicates(
    band_hashes: np.ndarray,
    signatures: np.ndarray,
    config: MinHashConfig,
    texts: Callable[[int], str] | None = None,
) -> np.ndarray:
    """`keeper`, int64 of length n: keeper[i] == i for a kept document, else the smallest index
    of i's cluster (the copy that is kept).

    Candidates come from `candidate_pairs`; `config.verify` decides which are duplicates:
    "estimate" keeps a pair whose signatures agree on at least `threshold` of their values,
    "exact" one whose exact shingle Jaccard (texts(i) gives document i) reaches the threshold,
    "none" keeps every candidate. Signatures may be a memory map: only candidate rows are read.
    """
    n = band_hashes.shape[0]
    if not config.enabled:
        return np.arange(n, dtype=np.int64)
    if config.verify == "exact" and texts is None:
        raise ConfigError('minhash verify = "exact" needs the texts (texts(i) -> document i)')
    pairs = candidate_pairs(band_hashes)
    shingles = lru_cache(maxsize=4096)(lambda i: shingle_hashes(texts(i), config.ngram)) if texts else None
    return clusters(n, verify_pairs(pairs, config, signatures, shingles))


def verify_pairs(
    pairs: np.ndarray, config: MinHashConfig, signatures: np.ndarray | None = None,
    shingles: Callable[[int], np.ndarray] | None = None,
) -> np.ndarray:  # fmt: skip
    """The candidate pairs that `config.verify` accepts: signature agreement at least the
    threshold (`estimate`, needs `signatures`), exact shingle Jaccard at least the threshold
    (`exact`, needs `shingles(i)`, document i's shingle hashes), or all of them (`none`)."""
    if config.verify == "estimate":
        return pairs[_signature_agreement(signatures, pairs) >= config.threshold]
    if config.verify == "exact":
        exact = [_set_jaccard(shingles(int(i)), shingles(int(j))) for i, j in pairs]
        return pairs[np.asarray(exact, dtype=np.float64) >= config.threshold]
    return pairs


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of the pairs by union-find on one machine (it holds only the
    documents that have a pair): `keeper`, each document's cluster's smallest index."""
    found = UnionFind(n)
    for i, j in pairs.tolist():
        found.union(i, j)
    return found.labels()


def _signature_agreement(signatures: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    agreement = np.empty(len(pairs), np.float64)
    for lo in range(0, len(pairs), _VERIFY_CHUNK):
        chunk = pairs[lo : lo + _VERIFY_CHUNK]
        same = np.asarray(signatures[chunk[:, 0]]) == np.asarray(signatures[chunk[:, 1]])
        agreement[lo : lo + len(chunk)] = same.mean(axis=1)
    return agreement


def deduplicate(texts: Sequence[str], config: MinHashConfig) -> np.ndarray:
    """The whole near-dedup of texts held in memory: signatures, band hashes, clusters. Returns
    `keeper` as `near_duplicates` does; keep the documents where keeper[i] == i."""
    if not config.enabled:
        return np.arange(len(texts), dtype=np.int64)
    signatures = MinHasher(config).signatures(texts)
    bands, rows = config.lsh_params()
    return near_duplicates(band_hashes(signatures, bands, rows), signatures, config, texts.__getitem__)

