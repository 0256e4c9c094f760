"""Pretraining quality per second against nanoGPT's CPU recipe, side by side, same text, same budget.

    python benchmarks/nanogpt_reference.py --nanogpt PATH/TO/nanoGPT --corpus BOOK.txt [BOOK.txt ...]
        [--budget 120] [--variants default vocab1024 ...] [--work DIR] [--out FILE.jsonl]

nanoGPT (karpathy/nanoGPT, a checkout outside this project; nothing of it is copied here) runs
its own `train.py` with `config/train_shakespeare_char.py` and its README's CPU overrides
(`--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0`) on a character-level dataset made the way its
`data/shakespeare_char/prepare.py` makes one. Its `max_iters` (= `lr_decay_iters`) is set so that
its training takes the budget: a 100-iteration calibration run measures its time per iteration,
and when the real run's training time (the sum of its logged iteration times) misses the budget by
more than 5% (its speed drifts), it runs again with `max_iters` scaled to fit. scratchlm then gets
exactly the training time nanoGPT took as its `max_time`, so both sides train for the same seconds.

For each corpus: the text is read and normalised by the data pipeline with the Project Gutenberg
header and licence stripped (`NormalizeConfig(strip_gutenberg=True)`); its last 10% (cut at a line
break) is the validation text for both sides, and neither side trains on it or builds its
vocabulary from it. Both are then scored on that whole text, each in windows of its own context:
nanoGPT's final checkpoint by this script (its `model.py`, non-overlapping 64-character windows),
scratchlm by `pretrain --val-text`. The figure is bits per byte: summed nats / ln 2 / UTF-8 bytes
scored, which does not depend on the tokenizer. Tokens/s is each side's own training rate
(characters for nanoGPT, BPE tokens for scratchlm).

Variants (scratchlm's side) are the default CPU recipe plus the overrides in VARIANTS; every row
is kept, the losing ones too (docs/benchmarks.md).
"""

import argparse
import json
import math
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scratchlm.data.normalize import NormalizeConfig, normalize_text
from scratchlm.data.tokenize import tokenize_files
from scratchlm.text.reading import read_text
from scratchlm.tokenizer import train_bpe
from scratchlm.train.config import load_train_config, resolve_recipe
from scratchlm.train.pretrain import pretrain

NANOGPT_CPU = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
               "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]

# name -> (tokenizer vocabulary, or "auto" for the recipe's own choice; recipe overrides)
VARIANTS: dict[str, tuple[int | str, list[str]]] = {
    "default": ("auto", []),
    "vocab2048": (2048, []),
    "vocab1024": (1024, []),
    "vocab512": (512, []),
    "vocab1024-width96": (1024, ["model_config.n_embd=96"]),
    "vocab1024-3layers": (1024, ["model_config.n_layer=3"]),
    "vocab1024-batch8": (1024, ["micro_batch=8"]),
    "vocab1024-muon0.04": (1024, ["muon_lr=0.04"]),
    # model size, the rest of the recipe as it is (Muon, QK-norm, untied head)
    "small": ("auto", ["model=cpu-small"]),
    "small-ctx128": ("auto", ["model=cpu-small", "seq_len=128"]),
    "small-ctx64-batch12": ("auto", ["model=cpu-small", "seq_len=64", "micro_batch=12"]),
    # nanoGPT's shapes (4 layers, width 128, 4 heads, context 64, batch 12, AdamW at its 1e-3) in our
    # architecture, for training speed side by side; 512 is our smallest sensible vocabulary (its: ~80 characters)
    "nanogpt-shapes": (512, ["model_config.n_layer=4", "model_config.n_head=4", "model_config.n_embd=128", "seq_len=64",
                             "micro_batch=12", "optimizer=adamw", "lr=1e-3"]),
}


def book_text(path: Path) -> tuple[str, str]:
    """(train, validation) text of one book: normalised, Gutenberg boilerplate gone, last 10% held out."""
    text, _ = read_text(path)
    text = normalize_text(text, NormalizeConfig(strip_gutenberg=True))
    cut = text.rfind("\n", 0, int(len(text) * 0.9))
    return text[:cut], text[cut + 1 :]


def nanogpt_dataset(folder: Path, train: str, val: str) -> int:
    """nanoGPT's character-level format: train.bin / val.bin of uint16 ids and meta.pkl. The
    vocabulary is the characters of the training text; a validation character it never saw
    maps to the most common one (scored as a miss, which only counts against nanoGPT)."""
    chars = sorted(set(train))
    stoi = {c: i for i, c in enumerate(chars)}
    fallback = stoi[max(chars, key=train.count)]
    folder.mkdir(parents=True, exist_ok=True)
    np.array([stoi[c] for c in train], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi.get(c, fallback) for c in val], dtype=np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as handle:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, handle)
    return len(chars)


def run_nanogpt(nanogpt: Path, work: Path, dataset: str, iters: int, decay_iters: int | None = None) -> tuple[float, list[float]]:
    """Train nanoGPT for `iters` iterations; return the wall time of its run and its logged
    per-iteration times in seconds. Its train.py reads configurator.py and data/ from the
    working directory, so it runs in `work`."""
    (work / "configurator.py").unlink(missing_ok=True)
    (work / "configurator.py").symlink_to(nanogpt / "configurator.py")
    command = [sys.executable, str(nanogpt / "train.py"), str(nanogpt / "config" / "train_shakespeare_char.py"),
               f"--dataset={dataset}", f"--out_dir=out-{dataset}", *NANOGPT_CPU, f"--max_iters={iters}",
               f"--lr_decay_iters={decay_iters or iters}", f"--eval_interval={iters}", "--always_save_checkpoint=True"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"nanoGPT failed:\n{done.stderr[-2000:]}")
    times = [float(t) / 1000 for t in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", done.stdout, re.M)]
    return seconds, times


@torch.no_grad()
def nanogpt_val_bpb(nanogpt: Path, checkpoint: Path, val: str, meta: Path) -> float:
    """Bits per byte of nanoGPT's checkpoint on the whole validation text, in non-overlapping
    windows of its context."""
    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.eval()
    with open(meta, "rb") as handle:
        stoi = pickle.load(handle)["stoi"]
    ids = [stoi.get(c, -1) for c in val]
    block = saved["model_args"]["block_size"]
    nats = 0.0
    scored_bytes = 0
    for start in range(0, len(ids) - 1, block):
        x = ids[start : start + block]
        y = ids[start + 1 : start + block + 1]
        x = x[: len(y)]
        known = [max(i, 0) for i in x]
        logits, _ = model(torch.tensor([known]), torch.tensor([[max(i, 0) for i in y]]))
        logp = torch.log_softmax(logits[0].float(), -1)
        for position, target in enumerate(y):
            char = val[start + 1 + position]
            scored_bytes += len(char.encode())
            # A character outside nanoGPT's vocabulary cannot be predicted: charge it the worst
            # the model gives any character there (generous to nanoGPT; such characters are rare).
            nats -= float(logp[position, target] if target >= 0 else logp[position].min())
    return nats / math.log(2) / scored_bytes


def calibrate_nanogpt(nanogpt: Path, work: Path, dataset: str) -> float:
    """Mean seconds per nanoGPT iteration on this machine, from a 100-iteration run."""
    _, times = run_nanogpt(nanogpt, work, dataset, 100, decay_iters=5000)  # (its warmup is 100 iterations)
    return statistics.fmean(times[5:])


def run_ours(work: Path, name: str, train_path: Path, val_path: Path, train: str, budget: float,
             vocab: int | str, overrides: list[str]) -> dict:
    config = load_train_config(resolve_recipe("cpu-default"), overrides + [f"max_time={budget:.1f}s", "checkpoint_every=0", "samples=0"])
    if vocab == "auto":
        from scratchlm.tokenizer.train import auto_vocab_size

        vocab = auto_vocab_size(len(train.encode()))
    shards = work / f"shards-{vocab}"
    if not shards.exists():
        tokenize_files([train_path], train_bpe([train], vocab), shards, val_fraction=0.0)
    start = time.perf_counter()
    summary = pretrain(shards, work / f"run-{name}", config, val_text=val_path, progress=False)
    return {"vocab": vocab, "params": summary.params, "steps": summary.steps, "tokens_per_s": round(summary.tokens_per_s),
            "val_bpb": round(summary.val_bpb, 4), "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--corpus", type=Path, nargs="+", required=True, help="text files (Project Gutenberg books)")
    parser.add_argument("--budget", type=int, default=120, help="training seconds for each side")
    parser.add_argument("--variants", nargs="*", default=["default"], choices=list(VARIANTS))
    parser.add_argument("--no-reference", action="store_true", help="scratchlm's variants only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scratchlm-nanogpt-ref"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/nanogpt_reference.jsonl"))
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for book in args.corpus:
        work = args.work / book.stem
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        train, val = book_text(book)
        train_path, val_path = work / "train.txt", work / "val.txt"
        train_path.write_text(train)
        val_path.write_text(val)
        rows = []
        budget = float(args.budget)
        if not args.no_reference:
            dataset = "book"
            nanogpt_dataset(work / "data" / dataset, train, val)
            per_iter = calibrate_nanogpt(args.nanogpt, work, dataset)
            iters = max(1, round(args.budget / per_iter))
            for _ in range(3):
                seconds, times = run_nanogpt(args.nanogpt, work, dataset, iters)
                if abs(sum(times) - args.budget) <= 0.05 * args.budget:
                    break
                iters = max(1, round(iters * args.budget / sum(times)))
            trained = budget = sum(times)
            rows.append({"side": "nanoGPT", "variant": "README CPU recipe", "iters": iters,
                         "train_s": round(trained, 1), "tokens_per_s": round(iters * 12 * 64 / trained),
                         "val_bpb": round(nanogpt_val_bpb(args.nanogpt, work / f"out-{dataset}" / "ckpt.pt", val,
                                                          work / "data" / dataset / "meta.pkl"), 4)})
            print(json.dumps(rows[-1]), flush=True)
        for name in args.variants:
            vocab, overrides = VARIANTS[name]
            rows.append({"side": "scratchlm", "variant": name, "overrides": overrides,
                         **run_ours(work, name, train_path, val_path, train, budget, vocab, overrides)})
            print(json.dumps(rows[-1]), flush=True)
        with args.out.open("a") as handle:
            for row in rows:
                handle.write(json.dumps({"corpus": book.name, "train_bytes": len(train.encode()),
                                         "val_bytes": len(val.encode()), "budget_s": round(budget, 1),
                                         "machine": machine, **row}) + "\n")


if __name__ == "__main__":
    main()
