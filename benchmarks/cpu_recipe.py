"""Tuning the default CPU recipe: validation bits per byte after a fixed wall-clock budget.

    python benchmarks/cpu_recipe.py [--budget 120s] [--variants NAME ...] [--out FILE.jsonl]

Data: the first ~1 MB of the embedded corpus (CPython's documentation) as one text file,
with its last 10% held out (`scratchlm data tokenize` on a single file). A tokenizer is trained
on the training 90% only. Every variant is the default CPU recipe plus a few overrides, trained
for the same budget on the same machine, one after another; the figure is the validation bits
per byte at the end (which does not depend on the tokenizer, so vocab sizes compare fairly).
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from scratchlm.text.embedded import embedded_corpus_text
from scratchlm.data.tokenize import tail_split, tokenize_files
from scratchlm.tokenizer import train_bpe
from scratchlm.train.config import load_train_config, resolve_recipe
from scratchlm.train.pretrain import pretrain

# name -> (tokenizer vocab size, recipe overrides)
VARIANTS: dict[str, tuple[int, list[str]]] = {
    "recipe": (4096, []),
    "tiny": (4096, ["model=cpu-tiny"]),
    "small": (4096, ["model=cpu-small"]),
    "base": (4096, ["model=cpu-base"]),
    "small-lr1e-2": (4096, ["model=cpu-small", "lr=1e-2"]),
    "small-lr1e-3": (4096, ["model=cpu-small", "lr=1e-3"]),
    "small-qknorm-untied": (4096, ["model=cpu-small", "model_config.qk_norm=true", "model_config.tie_embeddings=false"]),
    "small-relu2": (4096, ["model=cpu-small", "model_config.mlp=relu2"]),
    "small-gpt2-style": (4096, ["model=cpu-small", "model_config.positions=learned", "model_config.norm=layernorm",
                                "model_config.mlp=gelu", "model_config.bias=true"]),
    "small-wsd": (4096, ["model=cpu-small", "schedule=wsd"]),
    "small-batch8": (4096, ["model=cpu-small", "micro_batch=8"]),
    "small-batch32": (4096, ["model=cpu-small", "micro_batch=32"]),
    "small-vocab2048": (2048, ["model=cpu-small"]),
    "small-vocab8192": (8192, ["model=cpu-small"]),
    "small-ctx128": (4096, ["model=cpu-small", "seq_len=128", "micro_batch=32"]),
    # second round, around the best of the first (cpu-tiny: more steps beat more parameters)
    "tiny-lr1e-2": (4096, ["model=cpu-tiny", "lr=1e-2"]),
    "tiny-vocab2048": (2048, ["model=cpu-tiny"]),
    "tiny-batch8": (4096, ["model=cpu-tiny", "micro_batch=8"]),
    "tiny-qknorm-untied-lr1e-2": (4096, ["model=cpu-tiny", "lr=1e-2", "model_config.qk_norm=true", "model_config.tie_embeddings=false"]),
    "small-ctx128-vocab2048": (2048, ["model=cpu-small", "seq_len=128"]),
    "tiny-muon": (4096, ["model=cpu-tiny", "optimizer=muon"]),
    "small-muon": (4096, ["model=cpu-small", "optimizer=muon"]),
    # third round: the winners of the second combined
    "tiny-v2048-b8": (2048, ["model=cpu-tiny", "micro_batch=8"]),
    "tiny-v2048-b8-qk-untied-lr1e-2": (2048, ["model=cpu-tiny", "micro_batch=8", "lr=1e-2", "model_config.qk_norm=true",
                                              "model_config.tie_embeddings=false"]),
    "tiny-v2048-b8-muon": (2048, ["model=cpu-tiny", "micro_batch=8", "optimizer=muon"]),
    "tiny-v2048-b8-muon-qk-untied": (2048, ["model=cpu-tiny", "micro_batch=8", "optimizer=muon", "model_config.qk_norm=true",
                                            "model_config.tie_embeddings=false"]),
    # fourth round: the best of the third at the second round's batch, and a larger Muon step
    "tiny-v2048-muon-qk-untied": (2048, ["model=cpu-tiny", "optimizer=muon", "model_config.qk_norm=true",
                                         "model_config.tie_embeddings=false"]),
    "tiny-v2048-b8-muon-qk-untied-lr0.05": (2048, ["model=cpu-tiny", "micro_batch=8", "optimizer=muon", "muon_lr=0.05",
                                                   "model_config.qk_norm=true", "model_config.tie_embeddings=false"]),
}


def make_corpus(folder: Path, size: int = 1_000_000) -> Path:
    path = folder / "corpus.txt"
    path.write_text(embedded_corpus_text(max_bytes=size))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="120s")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_recipe.jsonl"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scratchlm-recipe-"))
    corpus = make_corpus(work)
    text = corpus.read_text()
    train_text = "".join(t for split, t in tail_split([("corpus", text)], 0.1) if split == "train")
    shards: dict[int, Path] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        vocab, overrides = VARIANTS[name]
        if vocab not in shards:
            tokenizer = train_bpe([train_text], vocab)
            shards[vocab] = work / f"shards-{vocab}"
            tokenize_files([corpus], tokenizer, shards[vocab])
        config = load_train_config(resolve_recipe("cpu-default"), overrides + [f"max_time={args.budget}", "checkpoint_every=0", "samples=2", "sample_prompt=The "])
        run_dir = work / f"run-{name}"
        start = time.perf_counter()
        summary = pretrain(shards[vocab], run_dir, config, progress=False)
        row = {
            "variant": name, "vocab": vocab, "overrides": overrides, "budget": args.budget,
            "val_bpb": round(summary.val_bpb, 4), "val_loss": round(summary.val_loss, 4), "params": summary.params,
            "steps": summary.steps, "tokens": summary.tokens, "tokens_per_s": round(summary.tokens_per_s),
            "wall_s": round(time.perf_counter() - start, 1), "samples": summary.samples,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        }
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
