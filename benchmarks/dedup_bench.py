"""Near-dedup benchmark: our MinHash LSH (scratchlm.data.dedup) against datasketch's.

    python benchmarks/dedup_bench.py [--mb 20] [--num-perm 128] [--threshold 0.8] [--repeats 5] [--seeds 10]
                                     [--out FILE.json]

Corpus (built here, no download): the embedded corpus (CPython's pydoc topics and stdlib
docstrings) as one word stream. Each base document is 4 spans of consecutive words from random
places in that stream, 200 to 600 words in all, so two base documents share almost no 5-gram.
A fifth of the base documents get a planted near-duplicate, and a tenth of those a second one:
a copy with 2% to 8% of its words edited in short runs (1 to 3 words, each run replaced by
random corpus words or deleted). The planted pairs are every pair inside such a group.

Both sides get the same documents, the same shingles (`dedup.words`, word 5-grams joined by a
space for datasketch, hashed by us), the same num_perm, threshold and (bands, rows), keep a
candidate when its signature agreement reaches the threshold, and cluster with the same
`UnionFind`. datasketch is used the fast way: permutations shared by all MinHash objects,
`update_batch` with xxh32 as hash function (sha1, its default, is also timed), `MinHashLSH` queried
before each insert. Throughput is end to end: shingling, signatures, LSH, clusters.

Each system runs --repeats times in this process, taking turns; the median time counts. Between
rounds, scratchlm's steps are timed apart (words, n-gram hashes, signatures, LSH and clusters);
the best round is reported. Recall and precision are means over --seeds permutation seeds
(datasketch's seed is ours).

Recall: a planted pair is found when both documents end in the same cluster; reported over all
planted pairs, over those whose exact shingle Jaccard reaches the threshold (the ones a
threshold-t deduplicator should find) and over those 0.1 above it. Precision: of the detected
pairs (each removed document with its keeper), the fraction that are planted pairs or have exact
Jaccard >= threshold.
"""

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import datasketch
import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH

from scratchlm.data import dedup
from scratchlm.data.dedup import (
    MinHashConfig,
    MinHasher,
    UnionFind,
    balanced_bands,
    band_hashes,
    deduplicate,
    exact_jaccard,
    near_duplicates,
    s_curve,
    words,
)
from scratchlm.text.embedded import embedded_documents
from provenance import git_commit


def build_corpus(mb: float, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    """Documents (base and planted copies, shuffled) and the planted pairs (i < j)."""
    rng = random.Random(seed)
    stream = " ".join(embedded_documents()).split()
    docs: list[str] = []
    groups: list[list[int]] = []
    size = 0
    while size < mb * 1e6:
        length = rng.randint(200, 600)
        spans = [length // 4] * 3 + [length - 3 * (length // 4)]
        base = []
        for span in spans:
            start = rng.randrange(len(stream) - span)
            base.extend(stream[start : start + span])
        group = [len(docs)]
        docs.append(" ".join(base))
        copies = (1 + (rng.random() < 0.1)) if rng.random() < 0.2 else 0
        for _ in range(copies):
            group.append(len(docs))
            docs.append(" ".join(edit(base, rng.uniform(0.02, 0.08), stream, rng)))
        if len(group) > 1:
            groups.append(group)
        size += sum(len(docs[i].encode()) for i in group)
    order = list(range(len(docs)))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    pairs = sorted(
        tuple(sorted((position[a], position[b])))
        for group in groups
        for k, a in enumerate(group)
        for b in group[k + 1 :]
    )
    return [docs[old] for old in order], pairs


def edit(tokens: list[str], rate: float, stream: list[str], rng: random.Random) -> list[str]:
    """Edit about `rate` of the words, in runs of 1-3 words: replaced by random words or deleted."""
    out = list(tokens)
    budget = round(rate * len(tokens))
    while budget > 0:
        run = min(rng.randint(1, 3), budget)
        at = rng.randrange(max(1, len(out) - run))
        replacement = [rng.choice(stream) for _ in range(run)] if rng.random() < 0.5 else []
        out[at : at + run] = replacement
        budget -= run
    return out


# ---- the two systems -------------------------------------------------------------------
def ours(texts: Sequence[str], config: MinHashConfig) -> np.ndarray:
    return deduplicate(texts, config)


def ngram_strings(text: str, ngram: int) -> list[bytes]:
    """The same shingles as `dedup.shingle_hashes`, as UTF-8 strings for datasketch."""
    tokens = words(text)
    if len(tokens) < ngram:
        return [" ".join(tokens).encode()] if tokens else []
    return list({" ".join(tokens[i : i + ngram]).encode() for i in range(len(tokens) - ngram + 1)})


def with_datasketch(texts: Sequence[str], config: MinHashConfig, hashfunc: Callable | None) -> np.ndarray:
    bands, rows = config.lsh_params()
    template = MinHash(num_perm=config.num_perm, seed=config.seed)
    kwargs = {"hashfunc": hashfunc} if hashfunc else {}
    lsh = MinHashLSH(num_perm=config.num_perm, params=(bands, rows))
    clusters = UnionFind(len(texts))
    minhashes = []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=config.num_perm, permutations=template.permutations, scheme=template.scheme, **kwargs)
        m.update_batch(ngram_strings(text, config.ngram))
        for j in lsh.query(m):
            if m.jaccard(minhashes[j]) >= config.threshold:
                clusters.union(j, i)
        lsh.insert(i, m)
        minhashes.append(m)
    return clusters.labels()


def stage_seconds(texts: Sequence[str], config: MinHashConfig) -> dict[str, float]:
    """Where scratchlm's time goes: `deduplicate` taken apart into its steps (private helpers)."""
    hasher = MinHasher(config)
    signatures = np.full((len(texts), config.num_perm), np.iinfo(np.uint32).max, np.uint32)
    seconds = dict.fromkeys(["words", "ngram_hashes", "signatures", "lsh_and_clusters"], 0.0)
    for lo, hi in dedup._batches(texts):
        start = time.perf_counter()
        found = dedup._word_stream(texts[lo:hi])
        middle = time.perf_counter()
        hashes, counts = dedup._ngram_hashes(*found, config.ngram, hasher._powers)
        end = time.perf_counter()
        hasher._fill(signatures[lo:hi], hashes, counts)
        seconds["words"] += middle - start
        seconds["ngram_hashes"] += end - middle
        seconds["signatures"] += time.perf_counter() - end
    start = time.perf_counter()
    near_duplicates(band_hashes(signatures, *config.lsh_params()), signatures, config)
    seconds["lsh_and_clusters"] = time.perf_counter() - start
    return seconds


# ---- scoring ---------------------------------------------------------------------------
def score(
    keeper: np.ndarray,
    texts: Sequence[str],
    planted: list[tuple[int, int]],
    planted_jaccard: list[float],
    config: MinHashConfig,
) -> dict:
    planted_set = set(planted)
    found = [keeper[i] == keeper[j] for i, j in planted]

    def recall(least: float) -> float:
        hits = [f for f, jaccard in zip(found, planted_jaccard) if jaccard >= least]
        return sum(hits) / max(1, len(hits))

    detected = [(int(k), i) for i, k in enumerate(keeper.tolist()) if k != i]
    correct = sum(
        (k, i) in planted_set or exact_jaccard(texts[k], texts[i], config.ngram) >= config.threshold
        for k, i in detected
    )
    return {
        "removed": len(detected),
        "recall_planted": sum(found) / len(found),
        "recall_planted_above_threshold": recall(config.threshold),
        "recall_planted_above_threshold_plus_0.1": recall(config.threshold + 0.1),
        "precision": correct / max(1, len(detected)),
    }


def timed(run: Callable[[MinHashConfig], np.ndarray], config: MinHashConfig) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = run(config)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of UTF-8")
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per system; the median counts")
    parser.add_argument("--seeds", type=int, default=10, help="permutation seeds for recall and precision")
    parser.add_argument("--no-sha1", action="store_true", help="skip datasketch with its default sha1 hash")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    # datasketch's own banding and signature-agreement verification, so both sides run the same
    # algorithm (scratchlm's defaults since issue 19 band for recall and verify exactly).
    bands, rows = balanced_bands(args.threshold, args.num_perm)
    config = MinHashConfig(num_perm=args.num_perm, threshold=args.threshold, bands=bands, rows=rows, verify="estimate")
    texts, planted = build_corpus(args.mb)
    corpus_mb = sum(len(t.encode()) for t in texts) / 1e6
    planted_jaccard = [exact_jaccard(texts[i], texts[j], config.ngram) for i, j in planted]
    bands, rows = config.lsh_params()
    print(f"corpus: {len(texts)} documents, {corpus_mb:.2f} MB, {len(planted)} planted pairs")

    systems: dict[str, Callable[[MinHashConfig], np.ndarray]] = {
        "scratchlm": lambda c: ours(texts, c),
        "datasketch_xxh32": lambda c: with_datasketch(texts, c, xxhash.xxh32_intdigest),
    }
    if not args.no_sha1:
        systems["datasketch_sha1"] = lambda c: with_datasketch(texts, c, None)
    # Timed runs take turns (ours, datasketch, ours, ...), so that a busy moment on a shared
    # machine does not land on one system only.
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    keepers = {}
    stages: list[dict[str, float]] = []
    for _ in range(args.repeats):
        for name, run in systems.items():
            keepers[name], took = timed(run, config)
            seconds[name].append(took)
        stages.append(stage_seconds(texts, config))
    results = {}
    for name, run in systems.items():
        # Recall and precision move with the permutations drawn: averaged over seeds.
        scores = [score(keepers[name], texts, planted, planted_jaccard, config)]
        for seed in range(2, args.seeds + 1):
            scores.append(score(run(replace(config, seed=seed)), texts, planted, planted_jaccard, config))
        median = float(np.median(seconds[name]))
        results[name] = {
            "seconds": median,
            "mb_per_s": corpus_mb / median,
            "all_seconds": seconds[name],
            **{key: float(np.mean([s[key] for s in scores])) for key in scores[0]},
            "recall_planted_above_threshold_std_over_seeds": float(
                np.std([s["recall_planted_above_threshold"] for s in scores], ddof=1) if len(scores) > 1 else 0.0
            ),
            "per_seed": scores,
        }
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "per_seed"}))
    commit = git_commit()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "versions": {"numpy": np.__version__, "datasketch": datasketch.__version__, "xxhash": xxhash.VERSION},
        "commit": commit,
        "command": " ".join(["python", *sys.argv]),
        "config": {
            "num_perm": config.num_perm,
            "ngram": config.ngram,
            "threshold": config.threshold,
            "bands": bands,
            "rows": rows,
            "seeds": args.seeds,
        },
        "corpus": {
            "documents": len(texts),
            "mb": corpus_mb,
            "planted_pairs": len(planted),
            "planted_pairs_above_threshold": sum(j >= config.threshold for j in planted_jaccard),
            "planted_pairs_above_threshold_plus_0.1": sum(j >= config.threshold + 0.1 for j in planted_jaccard),
            "planted_jaccard_quartiles": np.quantile(planted_jaccard, [0.25, 0.5, 0.75]).round(3).tolist(),
        },
        "s_curve": s_curve(bands, rows),
        "scratchlm_stage_seconds_best": {key: min(st[key] for st in stages) for key in stages[0]},
        "results": results,
        "speedup": {
            name: results["scratchlm"]["mb_per_s"] / r["mb_per_s"] for name, r in results.items() if name != "scratchlm"
        },
    }
    print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
