"""Training throughput of a recipe through the real `pretrain` command, for before/after comparisons.

    python benchmarks/recipe_speed.py --data SHARDS [--source PATH ...] [--seconds 60] [--set KEY=VALUE ...]

Runs `python -m scratchlm.cli pretrain --data SHARDS` for `--seconds` with the default CPU recipe
(plus the `--set` overrides) once per `--source`: a scratchlm checkout (e.g. a `git worktree` of an
older commit) put first on PYTHONPATH; without `--source`, this checkout. The figure is the run's
training tokens/s: all logged windows together (tokens / seconds, evaluations excluded), the first
window left out (first-step allocations), so one slow window does not decide it. Sources run one
after another, alternating over `--repeats`, so a slow spell of a shared machine hits both.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_tokens_per_s(source: Path | None, data: Path, seconds: int, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as work:
        env = dict(os.environ, PYTHONPATH=str(source)) if source else dict(os.environ)
        command = [sys.executable, "-m", "scratchlm.cli", "pretrain", "--data", str(data.resolve()), "--out", f"{work}/run",
                   "--max-time", f"{seconds}s", "--quiet", "--set", "samples=0", "--set", "checkpoint_every=0"]
        for override in overrides:
            command += ["--set", override]
        subprocess.run(command, check=True, env=env, capture_output=True, cwd=work)  # (not this folder: PYTHONPATH decides)
        rows = [json.loads(line) for line in Path(work, "run", "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "tokens_per_s" in r and r["step"] > 1]
    steps = [b["step"] - a["step"] for a, b in zip(windows, windows[1:])]
    # Each logged rate covers the steps since the previous row; equal tokens per step, so the
    # rate of them all together is steps / sum(steps / rate).
    return sum(steps) / sum(n / r["tokens_per_s"] for n, r in zip(steps, windows[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a shard folder")
    parser.add_argument("--source", type=Path, nargs="*", default=[None], help="scratchlm checkouts to compare")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    results: dict[str, list[float]] = {str(s or "this checkout"): [] for s in args.source}
    for _ in range(args.repeats):
        for source in args.source:
            results[str(source or "this checkout")].append(run_tokens_per_s(source, args.data, args.seconds, args.overrides))
            print(json.dumps({"source": str(source or "this checkout"), "tokens_per_s": round(results[str(source or "this checkout")][-1])}), flush=True)
    for name, rates in results.items():
        print(f"{name}: median {statistics.median(rates):,.0f} tokens/s over {len(rates)} runs ({', '.join(f'{r:,.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
