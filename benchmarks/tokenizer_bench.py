"""Tokenizer benchmark: our BPE trainer against Hugging Face `tokenizers`' BpeTrainer, and
encoding throughput against tiktoken and Hugging Face tokenizers with the same vocabulary.

    python benchmarks/tokenizer_bench.py [--train-mb 10.5] [--vocab-size 8192] [--out FILE.json]

Corpus: the Python standard library's own sources (every machine has them), files in sorted
order; every 20th file is held out for bytes-per-token and encoding, the rest (capped at
--train-mb) is the training set. Both trainers get the same text blocks, pattern, vocab size,
special tokens and minimum pair frequency, and run in the same process one after the other.
"""

import argparse
import json
import os
import platform
import sysconfig
import time
from pathlib import Path

import tiktoken
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from scratchlm.text.reading import ReadReport, read_text_blocks
from scratchlm.tokenizer.formats import to_hf_tokenizer_json
from scratchlm.tokenizer.pretokenize import resolve_pattern
from scratchlm.tokenizer.tokenizer import DEFAULT_SPECIAL_TOKENS
from scratchlm.tokenizer.train import TrainReport, train_bpe


def corpus_files(train_mb: float) -> tuple[list[Path], list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
    held_out = files[::20]
    train, size = [], 0
    for f in files:
        if f in held_out or size >= train_mb * 1e6:
            continue
        train.append(f)
        size += f.stat().st_size
    return train, held_out


def hf_trainer_tokenizer(blocks: list[str], pattern: str, vocab_size: int) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(DEFAULT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(blocks, trainer=trainer)
    return tok


def throughput(fn, data_bytes: int, repeats: int = 7) -> float:
    """Best of `repeats` runs, in MB/s."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return data_bytes / best / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-mb", type=float, default=10.5)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--pattern", default="gpt4")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    pattern = resolve_pattern(args.pattern)

    train_files, held_files = corpus_files(args.train_mb)
    blocks = list(read_text_blocks(train_files, ReadReport()))
    train_bytes = sum(len(b.encode()) for b in blocks)
    held_docs = [b for b in read_text_blocks(held_files, ReadReport(), block_bytes=1 << 14)]
    held_text = "".join(held_docs)
    held_bytes = len(held_text.encode())
    print(f"train: {len(train_files)} files, {train_bytes / 1e6:.2f} MB; held out: {len(held_files)} files, {held_bytes / 1e6:.2f} MB")

    start = time.perf_counter()
    report = TrainReport()
    ours = train_bpe(blocks, args.vocab_size, pattern=pattern, report=report)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    hf = hf_trainer_tokenizer(blocks, pattern, args.vocab_size)
    hf_s = time.perf_counter() - start
    print(f"train time: scratchlm {ours_s:.2f}s, HF BpeTrainer {hf_s:.2f}s, ratio {ours_s / hf_s:.2f}x")

    ours_tokens = len(ours.encode_ordinary(held_text))
    hf_tokens = len(hf.encode(held_text).ids)
    ours_bpt, hf_bpt = held_bytes / ours_tokens, held_bytes / hf_tokens
    print(f"held-out bytes/token: scratchlm {ours_bpt:.4f}, HF {hf_bpt:.4f} ({(ours_bpt / hf_bpt - 1) * 100:+.2f}%)")

    # Encoding: the same vocabulary (ours) in all three engines.
    raw = tiktoken.Encoding("bench", pat_str=pattern, mergeable_ranks=ours.ranks, special_tokens=ours.special_tokens)
    hf_same = HFTokenizer.from_str(json.dumps(to_hf_tokenizer_json(ours)))
    assert hf_same.encode(held_docs[0]).ids == ours.encode(held_docs[0]), "engines disagree"
    enc = {
        "scratchlm_1t": throughput(lambda: ours.encode_batch(held_docs, num_threads=1), held_bytes),
        "tiktoken_1t": throughput(lambda: raw.encode_batch(held_docs, num_threads=1), held_bytes),
        "hf_1t": throughput(lambda: [hf_same.encode(d) for d in held_docs], held_bytes),
        "scratchlm_2t": throughput(lambda: ours.encode_batch(held_docs, num_threads=2), held_bytes),
        "tiktoken_2t": throughput(lambda: raw.encode_batch(held_docs, num_threads=2), held_bytes),
        "hf_2t": throughput(lambda: hf_same.encode_batch(held_docs), held_bytes),
    }
    for k, v in enc.items():
        print(f"encode {k}: {v:.2f} MB/s")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "train_mb": round(train_bytes / 1e6, 2),
        "held_out_mb": round(held_bytes / 1e6, 2),
        "vocab_size": args.vocab_size,
        "pattern": args.pattern,
        "train_s": {"scratchlm": round(ours_s, 2), "hf": round(hf_s, 2), "ratio": round(ours_s / hf_s, 2)},
        "distinct_chunks": report.distinct_chunks,
        "bytes_per_token": {"scratchlm": round(ours_bpt, 4), "hf": round(hf_bpt, 4)},
        "encode_mb_s": {k: round(v, 2) for k, v in enc.items()},
        "encode_ratio_vs_tiktoken": {
            "1t": round(enc["scratchlm_1t"] / enc["tiktoken_1t"], 3),
            "2t": round(enc["scratchlm_2t"] / enc["tiktoken_2t"], 3),
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
