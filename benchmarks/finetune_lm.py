"""Instruction SFT and DPO, full fine-tuning against LoRA, on the shipped data sets (questions
about CPython's documentation): held-out answer loss before and after SFT; held-out preference
accuracy and reward margin before and after DPO; trainable parameters, training wall time and
peak memory of each run.

    scratchlm quickstart                                    # or any model open_model opens
    python benchmarks/finetune_lm.py runs/quickstart/run [--runs sft-full,sft-lora,dpo-full,dpo-lora]
           [--epochs N] [--max-steps N] [--batch-size N] [--max-length N] [--set run:--flag=value ...] [--out FILE.json]

Each run is the real command (`scratchlm finetune sft|dpo ...`) in a process of its own, so its
peak memory (getrusage's peak resident set on a CPU, `max_memory_allocated` on a GPU, as the run
folder's results.json records it) is its own. Every run starts from the same weights, seed and
batch order; the flags not given here are the commands' defaults. Numbers come from each run
folder's results.json; the table is printed as Markdown and everything is written to --out.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {
    "sft-full": ["sft"],
    "sft-lora": ["sft", "--lora"],
    "dpo-full": ["dpo"],
    "dpo-lora": ["dpo", "--lora"],
}
DATA = {"sft": ("builtin:instructions_train", "builtin:instructions_eval"),
        "dpo": ("builtin:preferences_train", "builtin:preferences_eval")}


def run(name: str, args: argparse.Namespace, folder: Path) -> dict:
    """One fine-tuning run through the CLI; returns its results.json plus what was run."""
    method, *flags = RUNS[name]
    train, held = DATA[method]
    out = folder / name
    command = [sys.executable, "-m", "scratchlm.cli", "finetune", method, str(args.model), "--data", train, "--eval", held,
               "--out", str(out), "--device", args.device, "--quiet", *flags]
    for option, value in (("--epochs", args.epochs), ("--max-steps", args.max_steps), ("--batch-size", args.batch_size),
                          ("--max-length", args.max_length)):
        if value is not None:
            command += [option, str(value)]
    command += [flag for run_name, flag in args.extra if run_name == name]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({' '.join(command)}):\n{done.stdout}\n{done.stderr}")
    results = json.loads((out / "results.json").read_text())
    return {"run": name, "method": method, "command": " ".join(["scratchlm", *command[3:]]), **results}


def sft_row(r: dict) -> str:
    b, a = r["before"], r["after"]
    return (f"| {r['run']} | {r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.1f}%) | "
            f"{r['steps']} | {b['loss']:.3f} (ppl {b['perplexity']:.1f}) | {a['loss']:.3f} (ppl {a['perplexity']:.1f}) | "
            f"{r['train_seconds']:.0f} s | {memory(r)} |")


def memory(r: dict) -> str:
    """Peak memory, and how much of it training added to what the loaded model already held."""
    start = r.get("start_memory_mb")
    added = f" (+{r['peak_memory_mb'] - start:,.0f} MB in training)" if start else ""
    return f"{r['peak_memory_mb']:,.0f} MB{added}"


def dpo_row(r: dict) -> str:
    b, a = r["before"], r["after"]
    return (f"| {r['run']} | {r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.1f}%) | "
            f"{r['steps']} | {b['logp_accuracy']:.3f} | {a['logp_accuracy']:.3f} | {a['reward_accuracy']:.3f} | "
            f"{a['margin']:.3f} | {b['loss']:.3f} / {a['loss']:.3f} | {r['train_seconds']:.0f} s | {memory(r)} |")


def tables(rows: list[dict]) -> str:
    parts = []
    sft = [r for r in rows if r["method"] == "sft"]
    dpo = [r for r in rows if r["method"] == "dpo"]
    if sft:
        parts += ["| SFT run | trainable params | steps | held-out answer loss before | after | train time | peak memory |",
                  "| --- | --- | --- | --- | --- | --- | --- |", *map(sft_row, sft), ""]
    if dpo:
        parts += ["| DPO run | trainable params | steps | log-prob preference accuracy before | after | reward accuracy after "
                  "| mean reward margin after | DPO loss before / after | train time | peak memory |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *map(dpo_row, dpo), ""]
    return "\n".join(parts)


def extra_flag(value: str) -> tuple[str, str]:
    name, sep, flag = value.partition(":")
    if not sep or name not in RUNS or not flag.startswith("--"):
        raise argparse.ArgumentTypeError(f"--set takes RUN:--flag=value with RUN one of {', '.join(RUNS)}, not {value!r}")
    return name, flag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="base model: run folder, model folder, GGUF file or Hugging Face folder")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="extra", type=extra_flag, action="append", default=[],
                        help="a flag for one run, e.g. sft-lora:--lr=1e-3 (repeatable)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        for name in names:
            rows.append(run(name, args, folder))
            print(f"{name}: {rows[-1]['steps']} steps in {rows[-1]['train_seconds']:.0f} s", file=sys.stderr)
    print(tables(rows))
    for r in rows:
        if r["method"] == "sft" and r.get("samples"):
            print(f"\n{r['run']}: held-out answers (reference / before / after)")
            for s in r["samples"]:
                print(f"  Q: {s['prompt'][-1]['content']}\n  reference: {s['reference']}\n  before: {s['before']!r}\n  after:  {s['after']!r}")
    if args.out:
        import torch

        info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                "torch": torch.__version__, "model": args.model, "command": " ".join(["python", *sys.argv])}
        args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
