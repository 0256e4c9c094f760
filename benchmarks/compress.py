"""What quantization and pruning cost and buy on SmolLM2-135M-Instruct. Every compressed model is
made by the product itself (`quantize_model`, `prune_model`, `prune_structure_model`,
`export_model`: what `scratchlm quantize`, `prune` and `export` run) into a folder under --work,
then each is measured in a fresh process of its own:

    bits per byte   on a held-out text (default: the first 20,000 characters of Frankenstein
                    from ../shared/corpora, else CPython's pydoc topics), `evaluate_text`
    tasks           the builtin tasks (`scratchlm eval --tasks builtin`), --limit examples each
    file (MB)       model.safetensors (or the GGUF file)
    peak RSS (MB)   the process's peak resident memory after loading the model and decoding
                    (before scoring, whose activations would swamp it); Python and torch alone
                    hold about 225 MB of it
    tok/s           greedy decode at batch 1 and 8, 32 new tokens, prefill included, the median
                    of 3 timings after a warm-up (with --speed; base and structured only, as GPTQ
                    runs int4's kernel and unstructured pruning and GGUF read back float32's)

    python benchmarks/compress.py --parts base [gptq gguf prune structured] [--speed] [--limit 30]
                                  [--distill 100] [--work DIR] [--out FILE.json]

Parts: base (float32, bfloat16, int8, int4 round-to-nearest in groups of 32 and 64: 128 does not
divide SmolLM2's width of 576), gptq
(int4 GPTQ, same groups; calibrated on the embedded corpus, 8 windows of 128 tokens), gguf (GGUF
Q8_0 and Q4_0 exports read back), prune (magnitude and Wanda, 50% unstructured and 2:4), structured
(depth and width 25%, before and after --distill steps of distillation on the embedded corpus,
4 windows of 128 tokens a step).
Bits per byte and tasks are deterministic; only the speed columns need a quiet machine.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPTS = ["The history of the printing press begins", "Photosynthesis is the process", "In 1969, astronauts",
           "A good cup of coffee needs", "The rules of chess say", "def quicksort(items):", "Rivers carry water from",
           "The French Revolution started"]
TASKS = ["python-docs-cloze", "python-docs-continuation", "python-docs-real-or-shuffled", "python-docs-completion"]
TASK_METRIC = {"python-docs-cloze": "acc", "python-docs-continuation": "acc", "python-docs-real-or-shuffled": "accuracy",
               "python-docs-completion": "f1"}


def held_out_text(path: str | None, chars: int) -> tuple[str, str]:
    from scratchlm.text.reading import read_text  # undecodable bytes replaced (the book is not all UTF-8)

    if path:
        return read_text(path)[0][:chars], path
    book = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "pg84.txt"
    if book.is_file():
        return read_text(book)[0][:chars], str(book)
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics.values())[:chars], "pydoc_data.topics"


def decode_rate(model, tokenizer, batch: int, new_tokens: int) -> float:
    from scratchlm.model.sampling import SamplingConfig, generate

    prompts = (PROMPTS * 2)[:batch]
    config = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
    generate(model, tokenizer, prompts, config, max_batch=batch)  # warm-up
    rates = []
    for _ in range(3):  # tokens actually generated (a sequence may stop early), prefill included
        start = time.perf_counter()
        completions = generate(model, tokenizer, prompts, config, max_batch=batch)
        rates.append(sum(len(c.token_ids) + 1 for c in completions) / (time.perf_counter() - start))
    return statistics.median(rates)


def peak_rss_mb() -> int:
    """This process's peak resident memory: VmHWM, which belongs to the process image (getrusage's
    ru_maxrss would carry over the parent's peak across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def measure(source: str, dtype: str, text_path: str | None, chars: int, limit: int, speed: bool, new_tokens: int) -> dict:
    """One model, in this process: what the module docstring lists."""
    from scratchlm.eval.language_modeling import evaluate_text
    from scratchlm.eval.runner import run_task
    from scratchlm.eval.tasks import load_task
    from scratchlm.model.model import count_params
    from scratchlm.serve.load import load_for_inference

    model, tokenizer = load_for_inference(source, dtype=dtype)
    row: dict = {"params": count_params(model.config)}
    if speed:
        row["tok_s_batch1"] = round(decode_rate(model, tokenizer, 1, new_tokens), 1)
        row["tok_s_batch8"] = round(decode_rate(model, tokenizer, 8, new_tokens), 1)
    else:
        decode_rate(model, tokenizer, 1, 4)  # the memory of a decode, without its timings
    row["peak_rss_mb"] = peak_rss_mb()
    text, _ = held_out_text(text_path, chars)
    with torch.no_grad():
        row["bits_per_byte"] = round(evaluate_text(model, tokenizer, text, batch_size=4).bits_per_byte, 4)
        for name in TASKS if limit else []:
            result = run_task(model, tokenizer, load_task(name), batch_size=8, limit=limit, progress=False)
            row[name] = round(result.metrics[TASK_METRIC[name]], 4)
    return row


def make_models(parts: list[str], work: Path, distill_steps: int) -> list[tuple[str, str, str, dict]]:
    """(mode, folder or file, dtype to load it in, what making it reported) for every part asked,
    base and structured first: their decode speeds differ, the rest run one of base's kernels."""
    from models import smollm2_path

    from scratchlm.compress.distill import DistillConfig
    from scratchlm.compress.prune import prune_model
    from scratchlm.compress.quantize import quantize_model
    from scratchlm.compress.structured import prune_structure_model
    from scratchlm.interop.convert import export_model, import_model

    work.mkdir(parents=True, exist_ok=True)
    base = work / "float32"
    if not base.exists():
        import_model(smollm2_path(), base)
    made: list[tuple[str, str, str, dict]] = []

    def once(folder: Path, make) -> dict:
        """Make `folder` unless an earlier run did; what making it reported (with its seconds)."""
        report_file = folder.with_suffix(".made.json")
        if not report_file.exists():
            start = time.perf_counter()
            report = make(folder)
            info = (report.to_dict() if hasattr(report, "to_dict") else {}) | {"make_seconds": round(time.perf_counter() - start, 1)}
            report_file.write_text(json.dumps(info))
        return json.loads(report_file.read_text())

    if "base" in parts:
        made += [("float32", str(base), "float32", {}), ("bfloat16", str(base), "bfloat16", {})]
        made.append(("int8", str(work / "int8"), "float32", once(work / "int8", lambda f: quantize_model(base, f, "int8"))))
        for group in (32, 64):  # 128 does not divide SmolLM2's width of 576
            folder = work / f"int4-g{group}"
            made.append((f"int4 g{group}", str(folder), "float32",
                         once(folder, lambda f, g=group: quantize_model(base, f, "int4", "rtn", g))))
    if "structured" in parts:
        for method in ("depth", "width"):
            for steps in (0, distill_steps):
                folder = work / f"{method}-25-distill{steps}"
                config = DistillConfig(steps, batch_size=4) if steps else None
                label = f"{method} 25%" + (f", distilled {steps} steps" if steps else ", not distilled")
                made.append((label, str(folder), "float32",
                             once(folder, lambda f, m=method, c=config: prune_structure_model(
                                 base, f, m, 0.25, sequences=32, length=128, distill_config=c, progress=False))))
    if "gptq" in parts:
        for group in (32, 64):  # 128 does not divide SmolLM2's width of 576
            folder = work / f"gptq-g{group}"
            made.append((f"int4 g{group} GPTQ", str(folder), "float32",
                         once(folder, lambda f, g=group: quantize_model(base, f, "int4", "gptq", g, sequences=8, length=128))))
    if "gguf" in parts:
        for dtype in ("q8_0", "q4_0"):
            path = work / f"smollm2-{dtype}.gguf"
            made.append((f"GGUF {dtype.upper()} read back", str(path), "float32",
                         once(path, lambda f, d=dtype: export_model(base, "gguf", f, dtype=d))))
    if "prune" in parts:
        for method in ("magnitude", "wanda"):
            for pattern in ("unstructured", "2:4"):
                folder = work / f"{method}-{pattern.replace(':', '-')}"
                made.append((f"{method} 50% {pattern}", str(folder), "float32",
                             once(folder, lambda f, m=method, p=pattern: prune_model(base, f, m, 0.5, p, sequences=8, length=128))))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["base"], choices=["base", "gptq", "gguf", "prune", "structured"])
    parser.add_argument("--text", default=None)
    parser.add_argument("--chars", type=int, default=20000)
    parser.add_argument("--limit", type=int, default=30, help="examples per builtin task (0: no tasks)")
    parser.add_argument("--speed", action="store_true", help="also time decoding (needs a quiet machine)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--distill", type=int, default=100, help="distillation steps for the structured part")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scratchlm-compress-bench"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.text, args.chars, args.limit, args.speed, args.new_tokens)))
        return
    rows = []
    for mode, source, dtype, made in make_models(args.parts, args.work, args.distill):
        # GPTQ runs int4's kernel, unstructured pruning and GGUF read back float32's: the same speed
        timed = args.speed and not any(word in mode for word in ("GPTQ", "GGUF", "magnitude", "wanda"))
        command = [sys.executable, __file__, "--measure", source, dtype, "--chars", str(args.chars), "--limit", str(args.limit),
                   "--new-tokens", str(args.new_tokens)] + (["--speed"] if timed else []) + (["--text", args.text] if args.text else [])
        child = subprocess.run(command, capture_output=True, text=True, check=True)
        path = Path(source)
        size = (path / "model.safetensors" if path.is_dir() else path).stat().st_size
        row = {"mode": mode, "file_mb": round(size / 1e6, 1), **json.loads(child.stdout.strip().splitlines()[-1]), "made": made}
        rows.append(row)
        print(json.dumps(row), flush=True)
    text, source = held_out_text(args.text, args.chars)
    print(f"\nheld-out text: {source}, {len(text):,} characters; builtin tasks: {args.limit} examples each; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    speed = " tok/s batch 1 | batch 8 |" if args.speed else ""
    print(f"| mode | params | bits per byte | cloze | continuation | real/shuffled | completion F1 | file (MB) | peak RSS (MB) |{speed}")
    print("| --- " * (9 + 2 * args.speed) + "|")
    for r in rows:
        tasks = " | ".join(f"{r[name]:.2f}" if name in r else "-" for name in TASKS)
        timing = (f" {r['tok_s_batch1']:.1f} | {r['tok_s_batch8']:.1f} |" if "tok_s_batch1" in r else " as its kernel's | |") if args.speed else ""
        print(f"| {r['mode']} | {r['params'] / 1e6:.1f}M | {r['bits_per_byte']:.4f} | {tasks} | {r['file_mb']:.1f} | {r['peak_rss_mb']} |{timing}")
    if args.out:
        Path(args.out).write_text(json.dumps({"text": source, "chars": len(text), "limit": args.limit, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
