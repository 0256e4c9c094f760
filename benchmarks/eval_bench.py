"""Evaluation throughput: a multiple-choice task on SmolLM2-135M-Instruct, scored by scratchlm
and by Hugging Face transformers, on the same machine, from the same GGUF file.

    python benchmarks/eval_bench.py [--task python-docs-continuation] [--limit 150] [--batch-sizes 1,16]
                                    [--threads N] [--out FILE.json]

Both sides score exactly the same requests: the (context ids, continuation ids) pairs that
`scratchlm.eval.scoring.split_context` makes for every choice of every example. scratchlm runs
`runner.run_task` (all choices of all examples in one `score_continuations` call: sorted longest
first, right-padded batches, log-softmax only at the continuation's positions). transformers
runs the same batches in the same order through `AutoModelForCausalLM` (float32, loaded with
`gguf_file=`), with an attention mask, taking the log-softmax of the same positions. So the
difference measured is the model implementation and the scoring loop, not the batching plan.
Examples per second = examples / wall time of scoring (loading excluded; timed separately).
The accuracy of both is printed: it must agree, or the comparison is void.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from models import smollm2_path


@torch.no_grad()
def hf_scores(model, requests: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """Summed log-probabilities of each continuation, with the batching plan scratchlm uses."""
    runs = [ctx + cont for ctx, cont in requests]
    order = sorted(range(len(runs)), key=lambda n: len(runs[n]), reverse=True)
    scores = [0.0] * len(runs)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(runs[n]) - 1 for n in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, n in enumerate(batch):
            fed = runs[n][:-1]
            ids[row, : len(fed)] = torch.tensor(fed)
            mask[row, : len(fed)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, n in enumerate(batch):
            cont = requests[n][1]
            first = len(runs[n]) - 1 - len(cont)
            logprobs = F.log_softmax(logits[row, first : first + len(cont)].float(), dim=-1)
            scores[n] = logprobs.gather(-1, torch.tensor(cont)[:, None]).sum().item()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="python-docs-continuation")
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per system and batch size; the median counts")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--modes", default="float32",
                        help="scratchlm sides, comma-separated: float32 and bfloat16 (`scratchlm eval --dtype`, oneDNN's "
                             "packed layers on a CPU), mkl-float32 (the model as loaded: PyTorch's default linear layers)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from scratchlm.eval.runner import prepare_for_evaluation, run_task
    from scratchlm.eval.scoring import split_context
    from scratchlm.tokenizer.tokens import document_start
    from scratchlm.eval.tasks import load_task
    from scratchlm.interop.gguf import import_gguf

    path = smollm2_path()
    t0 = time.perf_counter()
    model, tokenizer = import_gguf(path)
    ours_load = time.perf_counter() - t0
    modes = args.modes.split(",")
    models = {mode: model if mode == "mkl-float32" else prepare_for_evaluation(import_gguf(path)[0], mode) for mode in modes}

    import transformers

    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf_load = time.perf_counter() - t0

    task = load_task(args.task)
    examples = task.examples[: args.limit]
    prefix = document_start(tokenizer)
    delimiter = task.settings["delimiter"]
    requests, owner = [], []
    for n, example in enumerate(examples):
        for choice in example["choices"]:
            requests.append(split_context(tokenizer, example["context"], delimiter + choice, prefix))
            owner.append(n)

    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        ours_times, hf_times, results = {mode: [] for mode in modes}, [], {}
        for _ in range(args.repeats):
            for mode in modes:
                t0 = time.perf_counter()
                results[mode] = run_task(models[mode], tokenizer, task, batch_size=batch_size, limit=args.limit)
                ours_times[mode].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            scores = hf_scores(hf, requests, batch_size)
            hf_times.append(time.perf_counter() - t0)
        hf_correct = 0
        for n, example in enumerate(examples):
            mine = [s for s, o in zip(scores, owner) if o == n]
            hf_correct += max(range(len(mine)), key=mine.__getitem__) == example["label"]
        hf_s = statistics.median(hf_times)
        for mode in modes:
            ours_s = statistics.median(ours_times[mode])
            rows.append({
                "batch_size": batch_size, "mode": mode, "examples": len(examples), "requests": len(requests),
                "scratchlm_examples_per_s": len(examples) / ours_s, "transformers_examples_per_s": len(examples) / hf_s,
                "speedup": hf_s / ours_s, "scratchlm_acc": results[mode].metrics["acc"],
                "transformers_acc": hf_correct / len(examples),
            })
            print(json.dumps(rows[-1]))

    report = {
        "command": "python benchmarks/eval_bench.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "task": args.task, "load_seconds": {"scratchlm": ours_load, "transformers": hf_load}, "rows": rows,
    }
    print(f"\nload: scratchlm {ours_load:.1f} s, transformers {hf_load:.1f} s ({torch.get_num_threads()} threads)")
    print("| batch | scratchlm side | scratchlm examples/s | transformers examples/s | speedup | acc (ours / HF) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch_size']} | {r['mode']} | {r['scratchlm_examples_per_s']:.2f} | {r['transformers_examples_per_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['scratchlm_acc']:.3f} / {r['transformers_acc']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
