"""Classification fine-tuning, three ways, on the shipped spam/ham set: full fine-tuning, the
last N blocks only (transfer learning), and LoRA. Held-out accuracy and macro F1 before and
after, trainable parameters, training wall time and peak resident memory.

    scratchlm quickstart                       # or any model open_model opens
    python benchmarks/finetune_classify.py runs/quickstart/run [--epochs 3 | --max-steps N] [--last-blocks 1]
                                           [--lr 1e-3] [--lora-lr 3e-3] [--device cpu] [--out FILE.json]

Each method runs in a subprocess of its own (`--method`), so its peak resident set size
(getrusage ru_maxrss of that process) is its own and not the largest seen so far; every method
starts from the same base weights, seed and batch order. Training time excludes loading and
evaluation. The table is printed as Markdown and all numbers are written to --out.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).parents[1] / "scratchlm" / "finetune" / "data"
METHODS = ("full", "last-blocks", "lora")


def run_method(args: argparse.Namespace) -> dict:
    """One method in this process; returns its numbers."""
    import torch

    from scratchlm.finetune.classify import finetune_classifier
    from scratchlm.finetune.config import ClassifyConfig

    torch.set_num_threads(args.threads or torch.get_num_threads())
    common = {"epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size, "seed": 0,
              "device": args.device, "max_length": args.max_length}
    config = {
        "full": ClassifyConfig(freeze="none", lr=args.lr, **common),
        "last-blocks": ClassifyConfig(freeze=f"all-but-last:{args.last_blocks}", lr=args.lr, **common),
        # Adapters start at zero and move the base weights through a rank-r bottleneck: they
        # need a larger step than full fine-tuning (Hu et al. 2021 used 2e-4 to 5e-4 against
        # full fine-tuning's 1e-5-ish on RoBERTa; here both are scaled for a tiny model).
        "lora": ClassifyConfig(lora=True, lora_rank=args.lora_rank, lr=args.lora_lr, **common),
    }[args.method]
    with tempfile.TemporaryDirectory() as tmp:
        result = finetune_classifier(args.model, args.data, Path(tmp) / "run", config, eval_path=args.eval, progress=False)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 1024
    return {
        "method": args.method, "freeze": config.freeze, "lora": config.lora, "lr": config.lr,
        "before_accuracy": result.before["accuracy"], "after_accuracy": result.after["accuracy"],
        "before_macro_f1": result.before["macro_f1"], "after_macro_f1": result.after["macro_f1"],
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "steps": result.steps, "train_seconds": result.train_seconds, "peak_rss_mib": rss_mib,
    }


def table(rows: list[dict]) -> str:
    lines = ["| method | trainable params | accuracy before | accuracy after | macro F1 after | train time | peak RSS |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        name = {"full": "full fine-tuning", "last-blocks": r["freeze"], "lora": f"LoRA (lr {r['lr']:g})"}[r["method"]]
        lines.append(f"| {name} | {r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.1f}%) | "
                     f"{r['before_accuracy']:.3f} | {r['after_accuracy']:.3f} | {r['after_macro_f1']:.3f} | "
                     f"{r['train_seconds']:.1f} s | {r['peak_rss_mib']:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="base model: run folder, model folder, GGUF file or Hugging Face folder")
    parser.add_argument("--data", type=Path, default=DATA / "spam_train.jsonl")
    parser.add_argument("--eval", type=Path, default=DATA / "spam_eval.jsonl")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="overrides --epochs (large models on a CPU)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--last-blocks", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    parser.add_argument("--method", choices=METHODS, default=None, help=argparse.SUPPRESS)  # one method, in-process
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args)))
        return
    rows = []
    for method in METHODS:
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--method", method], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{method} failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{method}: {rows[-1]['after_accuracy']:.3f} after {rows[-1]['train_seconds']:.1f} s", file=sys.stderr)
    print(table(rows))
    if args.out:
        import torch

        info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                "torch": torch.__version__, "model": args.model, "command": " ".join(["python", *sys.argv])}
        args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
