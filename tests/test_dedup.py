"""Exact and near deduplication: hashes, shingles, MinHash estimates, LSH bands, clusters."""

import math
import pickle
import random
from itertools import pairwise

import numpy as np
import pytest
from datasketch.lsh import _optimal_param
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.data.dedup import (
    MinHashConfig,
    MinHasher,
    UnionFind,
    balanced_bands,
    band_hashes,
    candidate_pairs,
    catch_probability,
    choose_bands,
    deduplicate,
    estimated_jaccard,
    exact_hash,
    exact_jaccard,
    near_duplicates,
    removal_curve,
    removal_probability,
    s_curve,
    shingle_hashes,
    words,
)
from scratchlm.errors import ConfigError

MASK64 = (1 << 64) - 1
VOCAB = [f"w{i:05d}" for i in range(20_000)]


def reference_shingle_hashes(text: str, ngram: int) -> list[int]:
    """The documented definition, one n-gram at a time in plain Python."""

    def fmix64(h: int) -> int:
        h ^= h >> 33
        h = h * 0xFF51AFD7ED558CCD & MASK64
        h ^= h >> 33
        h = h * 0xC4CEB9FE1A85EC53 & MASK64
        return h ^ (h >> 33)

    def polynomial(data: bytes) -> int:
        value = 0
        for byte in data:
            value = (value * 0x9E3779B97F4A7C15 + byte) & MASK64
        return value

    tokens = words(text)
    grams = [tokens[i : i + ngram] for i in range(len(tokens) - ngram + 1)] or ([tokens] if tokens else [])
    return sorted({fmix64(polynomial(" ".join(g).encode("utf-8", "surrogatepass"))) for g in grams})


def random_doc(rng: random.Random, length: int = 300) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(length)]


def replace_words(tokens: list[str], fraction: float, rng: random.Random) -> list[str]:
    out = list(tokens)
    for i in rng.sample(range(len(out)), round(fraction * len(out))):
        out[i] = rng.choice(VOCAB)
    return out


# ---- exact hashes, words, shingles -------------------------------------------------------
def test_exact_hash_is_equal_for_equal_texts_and_differs_otherwise():
    assert exact_hash("naïve café") == exact_hash("naïve " + "café")
    assert exact_hash("naïve café") != exact_hash("naive café")
    assert exact_hash("") == exact_hash("") and exact_hash("") != exact_hash(" ")
    assert isinstance(exact_hash("x"), int) and 0 <= exact_hash("x") < 2**64


def test_words_are_lowercased_runs_of_word_characters():
    assert words("Hello, WORLD! It's a_b 3.14 — Straße “quoted”") == [
        "hello", "world", "it", "s", "a_b", "3", "14", "straße", "quoted"
    ]
    assert words("") == [] and words(" \n\t—!") == []


@pytest.mark.parametrize("ngram", [1, 3, 5])
def test_shingle_hashes_follow_the_documented_definition(ngram):
    texts = [
        "The quick brown fox jumps over the lazy dog; the quick brown fox!",
        "Ünïcödé: naïve café — Straße “quoted” «x» 日本語のテキスト ÉCOLE école",
        "one two",
        "lone \ud800 surrogate",
        "",
    ]
    for text in texts:
        assert shingle_hashes(text, ngram).tolist() == reference_shingle_hashes(text, ngram)


def test_short_documents_are_one_shingle_and_empty_ones_have_none():
    assert len(shingle_hashes("just three words", 5)) == 1
    assert shingle_hashes("just three words", 5)[0] == shingle_hashes("Just, three... WORDS", 5)[0]
    assert shingle_hashes("", 5).dtype == np.uint64 and len(shingle_hashes("", 5)) == 0
    assert len(shingle_hashes("!!! ...", 5)) == 0
    assert len(shingle_hashes("a b c d e f", 5)) == 2


def test_exact_jaccard_of_texts():
    assert exact_jaccard("a b c d e f", "a b c d e f", 5) == 1.0
    assert exact_jaccard("a b c d e f", "a b c d e g", 5) == pytest.approx(1 / 3)
    assert exact_jaccard("", "", 5) == 1.0 and exact_jaccard("", "a", 5) == 0.0


# ---- MinHash signatures ------------------------------------------------------------------
def test_signatures_are_uint32_and_empty_documents_get_all_max():
    sig = MinHasher(MinHashConfig(num_perm=64)).signatures(["some words here", "", "..."])
    assert sig.shape == (3, 64) and sig.dtype == np.uint32
    assert (sig[1:] == np.iinfo(np.uint32).max).all() and (sig[0] < np.iinfo(np.uint32).max).all()


@pytest.mark.parametrize("similarity", [0.2, 0.5, 0.8, 0.95])
def test_minhash_estimate_is_within_three_sigma_of_the_jaccard(similarity):
    rng = np.random.default_rng(int(similarity * 100))
    hasher = MinHasher(MinHashConfig(num_perm=256))
    union = rng.permutation(np.unique(rng.integers(0, 2**64 - 1, 2100, dtype=np.uint64)))[:2000]
    common = round(similarity * len(union))
    only = (len(union) - common) // 2
    a = union[: common + only]
    b = np.concatenate([union[:common], union[common + only : common + 2 * only]])
    truth = common / (common + 2 * only)
    sigma = math.sqrt(truth * (1 - truth) / 256)
    estimate = estimated_jaccard(hasher.signature_of_hashes(a), hasher.signature_of_hashes(b))
    assert abs(estimate - truth) <= 3 * sigma + 1e-9


def test_minhash_estimate_is_unbiased_over_many_text_pairs():
    """Mean error over 40 document pairs with 10% of words replaced: within 3 standard errors."""
    rng = random.Random(0)
    hasher = MinHasher(MinHashConfig(num_perm=128))
    errors, variances = [], []
    for _ in range(40):
        base = random_doc(rng)
        pair = [" ".join(base), " ".join(replace_words(base, 0.1, rng))]
        truth = exact_jaccard(*pair, 5)
        sig = hasher.signatures(pair)
        errors.append(estimated_jaccard(sig[0], sig[1]) - truth)
        variances.append(truth * (1 - truth) / 128)
    assert abs(np.mean(errors)) <= 3 * math.sqrt(np.sum(variances)) / len(errors)
    assert all(abs(e) <= 4 * math.sqrt(v) for e, v in zip(errors, variances))


@settings(max_examples=50, deadline=None)
@given(hashes=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50), seed=st.integers(0, 2**32))
def test_signature_ignores_shingle_order_and_repeats(hashes, seed):
    hasher = MinHasher(MinHashConfig(num_perm=32, seed=seed))
    shuffled = list(hashes) * 2
    random.Random(seed).shuffle(shuffled)
    once = hasher.signature_of_hashes(np.array(hashes, np.uint64))
    assert np.array_equal(once, hasher.signature_of_hashes(np.array(shuffled, np.uint64)))


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(max_size=300), min_size=1, max_size=12))
def test_a_documents_signature_does_not_depend_on_its_batch(texts):
    hasher = MinHasher(MinHashConfig(num_perm=16, ngram=3))
    batch = hasher.signatures(texts)
    for text, row in zip(texts, batch):
        assert np.array_equal(row, hasher.signature_of_hashes(shingle_hashes(text, 3)))


def test_signatures_cross_permutation_blocks_and_batches_unchanged():
    rng = random.Random(1)
    texts = [" ".join(random_doc(rng, rng.randint(1, 3000))) for _ in range(40)]
    hasher = MinHasher(MinHashConfig(num_perm=32))
    expected = np.stack([hasher.signature_of_hashes(shingle_hashes(t, 5)) for t in texts])
    assert np.array_equal(hasher.signatures(texts), expected)


def test_minhasher_pickles_small_and_gives_the_same_signatures():
    hasher = MinHasher(MinHashConfig(num_perm=64, seed=7))
    texts = ["a document of a few words for the worker", "another one, quite different from the first"]
    before = hasher.signatures(texts)
    copy = pickle.loads(pickle.dumps(hasher))
    assert len(pickle.dumps(hasher)) < 10_000
    assert np.array_equal(copy.signatures(texts), before)
    assert not np.array_equal(MinHasher(MinHashConfig(num_perm=64, seed=8)).signatures(texts), before)


# ---- LSH parameters ----------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
@pytest.mark.parametrize("num_perm", [64, 128, 256])
def test_balanced_bands_match_datasketch_and_fit_the_signature(threshold, num_perm):
    bands, rows = balanced_bands(threshold, num_perm)
    assert (bands, rows) == _optimal_param(threshold, num_perm, 0.5, 0.5)
    assert bands * rows <= num_perm
    # The S-curve's steep part straddles the threshold: pairs 0.1 above are mostly caught, pairs
    # 0.2 below hardly ever.
    assert 0.25 <= catch_probability(threshold, bands, rows) <= 0.75
    assert catch_probability(min(1.0, threshold + 0.1), bands, rows) >= 0.75
    assert catch_probability(threshold - 0.2, bands, rows) <= 0.12


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
@pytest.mark.parametrize("num_perm", [64, 128, 256])
@pytest.mark.parametrize("recall", [0.9, 0.95, 0.99])
def test_choose_bands_catches_the_asked_share_at_the_threshold_with_fewest_false_candidates(threshold, num_perm, recall):
    bands, rows = choose_bands(threshold, num_perm, recall)
    assert bands * rows <= num_perm
    assert catch_probability(threshold, bands, rows) >= recall
    # Brute force: no other banding that reaches the recall catches fewer pairs at any of these
    # similarities below the threshold... up to the area criterion, which a sum over a grid checks.
    grid = np.linspace(0.0, threshold, 201)

    def false_area(b: int, r: int) -> float:
        return float(np.mean([catch_probability(float(s), b, r) for s in grid]))

    ours = false_area(bands, rows)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            if catch_probability(threshold, b, r) >= recall:
                assert ours <= false_area(b, r) + 1e-3


def test_default_banding_finds_pairs_at_the_threshold_where_datasketchs_rule_finds_half():
    bands, rows = MinHashConfig().lsh_params()
    assert catch_probability(0.8, bands, rows) >= 0.95
    assert catch_probability(0.8, *balanced_bands(0.8, 128)) < 0.5


def test_s_curve_rises_monotonically_from_zero_to_one():
    curve = s_curve(9, 13, points=[i / 20 for i in range(21)])
    probabilities = [p for _, p in curve]
    assert probabilities[0] == 0.0 and probabilities[-1] == 1.0
    assert all(a < b for a, b in pairwise(probabilities[1:]))
    assert [s for s, _ in s_curve(9, 13)] == [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


@pytest.mark.parametrize(
    "settings_, message",
    [
        ({"bands": 8}, "give both or neither"),
        ({"rows": 8}, "give both or neither"),
        ({"bands": 20, "rows": 8}, "at most num_perm=128"),
        ({"bands": 0, "rows": 8}, "must be positive"),
        ({"verify": "maybe"}, "verify must be one of"),
        ({"threshold": 0.0}, "threshold must be in"),
        ({"num_perm": 0}, "num_perm must be at least 1"),
        ({"ngram": 0}, "ngram must be at least 1"),
        ({"recall": 1.0}, "recall must be in"),
    ],
)
def test_bad_minhash_settings_raise_config_error(settings_, message):
    with pytest.raises(ConfigError, match=message):
        MinHashConfig(**settings_)


def test_given_bands_and_rows_are_used_as_is():
    assert MinHashConfig(bands=16, rows=8).lsh_params() == (16, 8)
    assert MinHashConfig().lsh_params() == choose_bands(0.8, 128)


# ---- clusters ----------------------------------------------------------------------------
def test_union_find_root_is_the_smallest_index_whatever_the_order():
    uf = UnionFind(10)
    assert uf.union(9, 7) and uf.union(7, 8) and uf.union(8, 3)
    assert not uf.union(9, 3)
    assert [uf.find(i) for i in (3, 7, 8, 9)] == [3, 3, 3, 3]
    assert uf.find(5) == 5
    assert uf.labels().tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 3, 3]
    with pytest.raises(IndexError):
        uf.find(10)


def test_union_find_clusters_are_transitive_and_disjoint():
    uf = UnionFind(6)
    uf.union(0, 1)  # a ~ b
    uf.union(1, 2)  # b ~ c, so a ~ c
    uf.union(5, 4)
    assert uf.labels().tolist() == [0, 0, 0, 3, 4, 4]


def test_shared_bands_chain_into_one_cluster_keeping_the_first():
    # Documents 1 and 3 share band 0, documents 3 and 4 band 1; 0 and 2 share nothing.
    bands = np.array([[10, 20], [11, 21], [12, 22], [11, 23], [14, 23]], np.uint64)
    signatures = np.zeros((5, 4), np.uint32)
    keeper = near_duplicates(bands, signatures, MinHashConfig(num_perm=4, bands=2, rows=2, verify="none"))
    assert keeper.dtype == np.int64 and keeper.tolist() == [0, 1, 2, 1, 1]


def planted_corpus(copies_fraction: float, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    """120 unrelated documents and copies of 20 of them with a few percent of words replaced,
    shuffled; returns the texts and the planted (smaller, larger) index pairs."""
    rng = random.Random(seed)
    bases = [random_doc(rng) for _ in range(120)]
    docs = [(" ".join(b), i) for i, b in enumerate(bases)]
    docs += [(" ".join(replace_words(bases[i], copies_fraction, rng)), i) for i in range(20)]
    rng.shuffle(docs)
    where: dict[int, list[int]] = {}
    for position, (_, origin) in enumerate(docs):
        where.setdefault(origin, []).append(position)
    pairs = [tuple(sorted(p)) for p in where.values() if len(p) == 2]
    return [text for text, _ in docs], pairs


@pytest.mark.parametrize("verify", ["estimate", "exact", "none"])
def test_lsh_finds_planted_near_duplicates_and_keeps_the_first_copy(verify):
    # 2% of words replaced: Jaccard about 0.82. 32 bands of 4 rows catch such a pair with
    # probability 1 - 4e-9, and its estimate clears 0.7 by 3.5 standard deviations.
    texts, pairs = planted_corpus(0.02)
    assert min(exact_jaccard(texts[i], texts[j], 5) for i, j in pairs) > 0.75
    keeper = deduplicate(texts, MinHashConfig(threshold=0.7, bands=32, rows=4, verify=verify))
    expected = np.arange(len(texts))
    for i, j in pairs:
        expected[j] = i
    assert keeper.tolist() == expected.tolist()


def test_verification_rejects_candidates_below_the_threshold():
    # Copies with 12% of words replaced (Jaccard about 0.5) under bands of one row: LSH makes
    # them candidates, only verify="none" merges them.
    texts, pairs = planted_corpus(0.12, seed=1)
    config = {"num_perm": 64, "bands": 64, "rows": 1}
    assert exact_jaccard(texts[pairs[0][0]], texts[pairs[0][1]], 5) < 0.6
    loose = deduplicate(texts, MinHashConfig(verify="none", **config))
    assert all(loose[j] == i for i, j in pairs)
    for verify in ("estimate", "exact"):
        assert (deduplicate(texts, MinHashConfig(verify=verify, **config)) == np.arange(len(texts))).all()


def test_exact_verification_needs_the_texts():
    sig = np.zeros((2, 4), np.uint32)
    with pytest.raises(ConfigError, match="needs the texts"):
        near_duplicates(band_hashes(sig, 2, 2), sig, MinHashConfig(num_perm=4, bands=2, rows=2, verify="exact"))


def test_many_exact_copies_form_one_cluster():
    rng = random.Random(2)
    text = " ".join(random_doc(rng))
    texts = [" ".join(random_doc(rng)) for _ in range(5)] + [text] * 50
    keeper = deduplicate(texts, MinHashConfig())
    assert keeper.tolist() == [0, 1, 2, 3, 4] + [5] * 50


def test_near_duplicates_reads_signatures_from_a_memory_map(tmp_path):
    texts, _ = planted_corpus(0.01, seed=3)
    config = MinHashConfig(verify="estimate")
    signatures = MinHasher(config).signatures(texts)
    path = tmp_path / "signatures.u32"
    signatures.tofile(path)
    mapped = np.memmap(path, dtype=np.uint32, mode="r", shape=signatures.shape)
    bands = band_hashes(mapped, *config.lsh_params())
    assert bands.shape == (len(texts), config.lsh_params()[0]) and bands.dtype == np.uint64
    assert np.array_equal(near_duplicates(bands, mapped, config), deduplicate(texts, config))


def test_disabled_config_keeps_everything():
    assert deduplicate(["same text here"] * 3, MinHashConfig(enabled=False)).tolist() == [0, 1, 2]


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(max_size=200), min_size=1, max_size=8), data=st.data())
def test_identical_texts_are_always_one_cluster(texts, data):
    i = data.draw(st.integers(0, len(texts) - 1))
    j = data.draw(st.integers(0, len(texts)))
    texts = texts[:j] + [texts[i]] + texts[j:]  # a second copy of texts[i], anywhere
    keeper = deduplicate(texts, MinHashConfig(num_perm=32, ngram=3))
    copies = [k for k, t in enumerate(texts) if t == texts[i]]
    assert len({int(keeper[k]) for k in copies}) == 1 and keeper[copies[0]] <= copies[0]
    assert all(keeper[k] <= k for k in range(len(texts)))


# ---- recall at the threshold, by Jaccard bucket --------------------------------------------
def planted_pairs_by_bucket(per_fraction: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int, float]]]:
    """Unrelated documents, each followed by one copy with 0 to 8% of its words replaced (Jaccard
    of word 5-grams from about 0.65 to 1); returns the texts and (original, copy, exact Jaccard)."""
    rng = random.Random(seed)
    texts: list[str] = []
    pairs = []
    for fraction in (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.06, 0.08):
        for _ in range(per_fraction):
            base = random_doc(rng, 400)
            texts += [" ".join(base), " ".join(replace_words(base, fraction, rng))]
            pairs.append((len(texts) - 2, len(texts) - 1, exact_jaccard(texts[-2], texts[-1], 5)))
    return texts, pairs


def test_default_settings_remove_at_least_95_percent_of_pairs_at_or_above_the_threshold_and_none_below():
    texts, pairs = planted_pairs_by_bucket(60)
    keeper = deduplicate(texts, MinHashConfig())
    found = {j: keeper[j] == i for i, j, _ in pairs}
    above = [found[j] for _, j, s in pairs if s >= 0.8]
    below = [found[j] for _, j, s in pairs if s < 0.8]
    # Each pair at 0.8 is caught with probability >= 0.953 and pairs above it more often; with a
    # few hundred pairs the share found is within a few points of its mean (~0.98), seeds fixed.
    assert len(above) >= 200 and len(below) >= 100
    assert sum(above) / len(above) >= 0.95
    # The bucket nearest the threshold, on its own.
    edge = [found[j] for _, j, s in pairs if 0.8 <= s < 0.85]
    assert len(edge) >= 40 and sum(edge) / len(edge) >= 0.9
    # Exact verification: no pair below the threshold is merged, whatever LSH proposed.
    assert not any(below)


def test_candidate_pairs_are_the_same_whatever_the_partitions():
    texts, _ = planted_pairs_by_bucket(5, seed=4)
    config = MinHashConfig()
    bands = band_hashes(MinHasher(config).signatures(texts), *config.lsh_params())
    whole = candidate_pairs(bands)
    assert len(whole) >= 20
    for partitions in (2, 3, 7):
        assert np.array_equal(candidate_pairs(bands, partitions), whole)


def test_removal_curve_follows_the_verification():
    exact, estimate, none = (MinHashConfig(verify=v) for v in ("exact", "estimate", "none"))
    bands, rows = exact.lsh_params()
    for s in (0.5, 0.7, 0.79):
        assert removal_probability(s, exact) == 0.0
        assert removal_probability(s, none) == catch_probability(s, bands, rows)
    for s in (0.8, 0.9):
        assert removal_probability(s, exact) == catch_probability(s, bands, rows)
    # Signature agreement at exactly the threshold: a binomial about its mean, so about half pass.
    assert 0.4 < removal_probability(0.8, estimate) / catch_probability(0.8, bands, rows) < 0.6
    assert removal_curve(exact)[4] == (0.8, removal_probability(0.8, exact))
