"""Training throughput (tokens/s) and MFU of model presets on this machine.

    python benchmarks/train_throughput.py [--presets cpu-tiny cpu-small ...] [--device cpu|cuda]
                                          [--micro-batch 8] [--steps 5] [--compile] [--dtype bfloat16]

Each preset trains `--steps` optimizer steps (after one warm-up step) on random tokens at its own
context length (capped by --seq-len), with AdamW, exactly as `pretrain` runs them. MFU is
achieved FLOP/s (6 N + attention per token, `flops_per_token`) over the peak: the published
dense bf16 peak for known GPUs, the measured float32 matmul rate on a CPU.
"""

import argparse
import json
import os
import platform
import time
from contextlib import nullcontext

import torch

from scratchlm.model import GPT, PRESETS, count_params, flops_per_token
from scratchlm.devices import peak_flops


def measure(name: str, device: torch.device, micro_batch: int, steps: int, seq_cap: int, compile_: bool, dtype) -> dict:
    config = PRESETS[name]
    seq = min(config.block_size, seq_cap)
    config = config.replace(block_size=seq)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    train_model = torch.compile(model) if compile_ else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, config.vocab_size, (micro_batch, seq + 1), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            _, loss = train_model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2 if compile_ else 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = steps * micro_batch * seq / seconds
    peak = peak_flops(device)
    return {
        "preset": name, "params": count_params(config), "seq_len": seq, "micro_batch": micro_batch,
        "tokens_per_s": round(tokens_per_s, 1), "mfu": round(flops_per_token(config, seq) * tokens_per_s / peak, 4) if peak else None,
        "peak_flops": peak, "compile": compile_, "dtype": str(dtype).replace("torch.", "") if dtype else "float32",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", default=["cpu-tiny", "cpu-small", "cpu-base", "cpu-large", "llama-40m", "gpt2-124m"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    for name in args.presets:
        print(json.dumps(measure(name, device, args.micro_batch, args.steps, args.seq_len, args.compile, dtype)), flush=True)


if __name__ == "__main__":
    main()
