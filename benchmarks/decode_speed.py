"""Decode speed at batch 1: SmolLM2-135M-Instruct, greedy, scratchlm against transformers'
`generate`, same machine, same run, same prompt, same number of new tokens.

    python benchmarks/decode_speed.py [--new-tokens 128] [--repeats 3] [--modes float32,bfloat16,int8,int4]
                                      [--compile] [--batch-sizes 1,8] [--out FILE.json]

Both load the same GGUF file, dequantised to float32. transformers runs
`generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)` (its default dynamic KV cache;
`--static-cache` adds a run with `cache_implementation="static"`); scratchlm runs
`generate_tokens` (preallocated cache, end-of-sequence ignored so both produce N tokens) in
each of `--modes`: float32, bfloat16 weights, int8 or int4 (group 64) weight-only matmuls. Sides alternate within
each repeat, so a slow spell of a shared machine hits both; the median repeat is reported.

- time to first token: prefill of the prompt and the first token (transformers:
  `generate(max_new_tokens=1)`, timed separately);
- decode tokens/s: (N - 1) / (total time - time to first token);
- greedy agreement: how many leading tokens equal transformers' float32 output.

`--batch-sizes 1,8` adds scratchlm's aggregate tokens/s for 8 different prompts decoded together.
`--before` adds float32 and bfloat16 on PyTorch's default linear layers (MKL), as they ran before
the CPU default became oneDNN's packed layers (`scratchlm.model.packed`).

The bandwidth limit of each mode: at batch 1 every weight of every linear layer (the head
included; not the embedding table, of which a token reads one row) is read once per token, so
no engine decodes faster than read bandwidth / weight bytes. Read bandwidth is measured here:
the best of 5 sums of a 1 GiB float32 tensor on all threads.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from models import smollm2_path

PROMPT = "The history of the printing press begins"
BATCH_PROMPTS = [
    "The history of the printing press begins", "Photosynthesis is the process", "In 1969, astronauts",
    "A good cup of coffee needs", "The rules of chess say", "def quicksort(items):",
    "Rivers carry water from", "The French Revolution started",
]


def time_ours(model, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    from scratchlm.model.sampling import SamplingConfig, generate_tokens

    config = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
    start, first, tokens = time.perf_counter(), None, []
    for step in generate_tokens(model, ids, config):  # no eot_id: always N tokens
        tokens.append(step[0])
        first = first or time.perf_counter()
    total = time.perf_counter() - start
    return first - start, total, tokens


@torch.inference_mode()
def time_hf(model, ids: list[int], new_tokens: int, **kwargs) -> tuple[float, float, list[int]]:
    x = torch.tensor([ids])
    start = time.perf_counter()
    model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=1, **kwargs)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, min_new_tokens=new_tokens,
                         max_new_tokens=new_tokens, **kwargs)
    return ttft, time.perf_counter() - start, out[0, len(ids):].tolist()


def weight_bytes(model) -> int:
    """Bytes of linear-layer weights (and their scales) one batch-1 decoding step reads."""
    from scratchlm.model.packed import PackedLinear
    from scratchlm.model.quantize import Int4Linear, Int8Linear

    total = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            total += module.in_features * module.out_features * module.dtype.itemsize
        elif isinstance(module, (torch.nn.Linear, Int8Linear, Int4Linear)):
            total += sum(t.numel() * t.element_size() for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])
    return total


def read_bandwidth() -> float:
    """Bytes per second: the best of 5 sums of a 1 GiB float32 tensor."""
    big = torch.ones(2**28)
    big.sum()
    best = min(_timed(big.sum) for _ in range(5))
    return big.numel() * 4 / best


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def agreement(a: list[int], b: list[int]) -> int:
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="float32,bfloat16,int8")
    parser.add_argument("--compile", action="store_true", help="also scratchlm float32 under torch.compile")
    parser.add_argument("--static-cache", action="store_true", help="also transformers with its static cache")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--before", action="store_true", help="also float32 and bfloat16 on PyTorch's default (MKL) linear layers")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_speed.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM

    from scratchlm.interop import open_model
    from scratchlm.model.sampling import SamplingConfig, generate
    from scratchlm.model.quantize import cast_for_inference, prepare_for_inference

    path = smollm2_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    opened = open_model(path, kind="language-model")
    base, tokenizer = opened.model, opened.tokenizer
    ids = tokenizer.encode(PROMPT)
    sides = {"transformers float32": lambda: time_hf(hf, ids, args.new_tokens)}
    if args.static_cache:
        sides["transformers float32, static cache"] = lambda: time_hf(hf, ids, args.new_tokens, cache_implementation="static")
    models = {}
    for mode in args.modes.split(","):
        model = open_model(path, kind="language-model").model
        quantized = mode in ("int8", "int4")
        models[mode] = prepare_for_inference(model, "float32" if quantized else mode, mode if quantized else "none")
        sides[f"scratchlm {mode}"] = (lambda m: lambda: time_ours(m, ids, args.new_tokens))(models[mode])
    if args.before:
        for mode in ("float32", "bfloat16"):
            name = f"{mode}, MKL linear (before)"
            models[name] = cast_for_inference(open_model(path, kind="language-model").model, mode)
            sides[f"scratchlm {name}"] = (lambda m: lambda: time_ours(m, ids, args.new_tokens))(models[name])
    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    if args.compile:
        compiled = open_model(path, kind="language-model").model
        compiled.forward = torch.compile(compiled.forward, dynamic=True)
        time_ours(compiled, ids, 8)  # compile outside the timed runs
        models["float32 + torch.compile"] = compiled
        sides["scratchlm float32 + torch.compile"] = lambda: time_ours(compiled, ids, args.new_tokens)
    time_ours(base, ids, 4)  # warm-up: first-call allocations, thread pools
    time_hf(hf, ids, 4)
    runs: dict[str, list[tuple[float, float, list[int]]]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, run in sides.items():
            runs[name].append(run())
            ttft, total, _ = runs[name][-1]
            print(f"repeat {repeat + 1} {name}: ttft {ttft * 1000:.0f} ms, {(args.new_tokens - 1) / (total - ttft):.2f} tok/s", flush=True)
    reference = runs["transformers float32"][0][2]
    rows = []
    for name, results in runs.items():
        ttft = statistics.median(r[0] for r in results)
        decode = statistics.median((args.new_tokens - 1) / (r[1] - r[0]) for r in results)
        rows.append({"side": name, "ttft_ms": round(ttft * 1000, 1), "decode_tokens_per_s": round(decode, 2),
                     "greedy_agreement": f"{agreement(results[0][2], reference)}/{args.new_tokens}"})
    hf_speed = rows[0]["decode_tokens_per_s"]
    for row in rows:
        row["speedup_vs_transformers"] = round(row["decode_tokens_per_s"] / hf_speed, 2)
        model = models.get(row["side"].removeprefix("scratchlm "), hf if row["side"].startswith("transformers") else None)
        limit = bandwidth / weight_bytes(model)
        row["weight_mb_per_token"] = round(weight_bytes(model) / 1e6, 1)
        row["bandwidth_limit_tokens_per_s"] = round(limit, 1)
        row["share_of_limit"] = round(row["decode_tokens_per_s"] / limit, 3)
    batch_rows = []
    for size in (int(b) for b in args.batch_sizes.split(",")):
        if size == 1:
            continue
        for mode in args.modes.split(","):
            model = models[mode]
            config = SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens)
            prompts = (BATCH_PROMPTS * size)[:size]
            start = time.perf_counter()
            out = generate(model, tokenizer, prompts, config, max_batch=size)
            elapsed = time.perf_counter() - start
            batch_rows.append({"batch": size, "mode": mode, "tokens": sum(len(c.token_ids) for c in out),
                               "aggregate_tokens_per_s": round(sum(len(c.token_ids) for c in out) / elapsed, 2)})
    print("\n| side | time to first token | decode tokens/s | vs transformers | weights read per token | bandwidth limit | share of limit | greedy agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['side']} | {row['ttft_ms']:.0f} ms | {row['decode_tokens_per_s']:.2f} | "
              f"{row['speedup_vs_transformers']:.2f}x | {row['weight_mb_per_token']:.0f} MB | "
              f"{row['bandwidth_limit_tokens_per_s']:.1f} tok/s | {row['share_of_limit']:.0%} | {row['greedy_agreement']} |")
    for row in batch_rows:
        print(f"batch {row['batch']} {row['mode']}: {row['aggregate_tokens_per_s']} tokens/s aggregate ({row['tokens']} tokens)")
    report = {
        "command": " ".join(["python", *sys.argv]),
        "prompt": PROMPT, "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "repeats": args.repeats,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "read_bandwidth_gb_s": round(bandwidth / 1e9, 2), "rows": rows, "batched": batch_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
