"""scratchlm quickstart: the whole path on the embedded corpus."""

import argparse
from pathlib import Path


def add_commands(stages: argparse._SubParsersAction) -> None:
    qs = stages.add_parser(
        "quickstart",
        help="the whole path on the embedded corpus, in minutes on a CPU",
        description="Train a tokenizer on the embedded corpus (CPython's own documentation), tokenize it, "
        "pretrain a small Llama-style model within a wall-clock budget, evaluate it (validation loss and "
        "bits per byte), sample from it, and write a report. Under 10 minutes on 2 CPU cores.",
    )
    qs.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder (default: runs/quickstart)")
    qs.add_argument("--max-time", default=None, help="pretraining budget, e.g. 120s or 5m (default: the quickstart recipe's 300s)")
    qs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    qs.add_argument("--quiet", action="store_true", help="no progress bars")
    qs.set_defaults(run=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    from scratchlm.quickstart import quickstart

    overrides = list(args.set) + ([f"max_time={args.max_time}"] if args.max_time else [])
    result = quickstart(args.out, overrides, progress=not args.quiet)
    run = result.run
    print()
    for n, sample in enumerate(run.samples, 1):
        print(f"--- sample {n} ---\n{sample.strip()}\n")
    print(f"validation: {run.val_loss:.4f} nats/token, {run.val_bpb:.4f} bits per byte "
          f"({run.params / 1e6:.2f}M parameters, {run.tokens:,} tokens, {run.tokens_per_s:,.0f} tokens/s)")
    print(f"done in {result.seconds:.0f}s. Everything is in {result.out}/:")
    print(f"  tokenizer  {result.tokenizer}")
    print(f"  shards     {result.shards}/")
    print(f"  model      {run.run_dir / 'model'}/")
    print(f"  report     {run.run_dir / 'report.md'}  (loss curve: {run.run_dir / 'loss.png'}, metrics: {run.run_dir / 'metrics.jsonl'})")
    print(f"next: scratchlm generate {run.run_dir} --prompt \"The \"")
    print(f"      scratchlm eval {run.run_dir}    (builtin tasks and held-out text; or compare it with SmolLM2: README)")
    print(f"      scratchlm serve {run.run_dir}   (OpenAI-compatible API at http://127.0.0.1:8000/v1, chat page at /)")
    print(f"      scratchlm finetune sft {run.run_dir} --data builtin:instructions_train --out {result.out / 'sft'}"
          "   (teach it to answer questions)")
    return 0
