"""Hostile data inputs: what the bounds in `data prepare`'s readers and PII pattern hold back, measured.

    python benchmarks/hostile_data.py [--kb 100] [--old-seconds 20] [--bomb-mb 200] [--limit 8MB]
                                      [--out benchmarks/results/hostile_data.json]

1. E-mail pattern. Texts built to make a backtracking pattern try a match at every position
   ("%41" or "a%" repeated, then an "@"; "a." repeated, then an "@"), of --kb KB and of ten times
   that: the time the pattern takes to replace in them, the current one (median of 3) and the one
   before it (OLD_EMAIL below), each in a child process stopped after --old-seconds; and the time
   `redact_pii` takes with all its patterns.
2. Gzip bomb. A JSON line of --bomb-mb MB of "a", then a good line, gzip-compressed (about
   1000 to 1), read by the source reader as a text file (`.txt.gz`) and as JSONL (`.jsonl.gz`)
   with `max_document_bytes` = --limit, against `gzip.open(path).read()` (what the text reader
   did before the limit): seconds and peak traced memory (tracemalloc).

Raw results go to --out (JSON), and markdown tables are printed.
"""

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from scratchlm.atomic_io import write_text_atomic
from scratchlm.data.pii import _EMAIL, redact_pii
from scratchlm.data.sources import SourceConfig, read_source
from provenance import git_commit

# scratchlm/data/pii.py's pattern at commit 92b56dd: `%` missing from its lookbehind let every
# letter after a `%` start a match that scans on to the next "@".
OLD_EMAIL = r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])"
UNITS = ("%41", "a%", "a.")  # each repeated, then an "@"
PATTERN_CHILD = "import re, sys, time; text = {unit!r} * {count} + '@'; t = time.perf_counter(); re.compile(sys.argv[1]).subn('<EMAIL>', text); print(time.perf_counter() - t)"


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pattern_seconds(pattern: str, unit: str, size: int, limit_s: float) -> float | None:
    """Seconds `pattern` takes to replace in the text, or None when still running after `limit_s`."""
    code = PATTERN_CHILD.format(unit=unit, count=size // len(unit))
    try:
        child = subprocess.run([sys.executable, "-c", code, pattern], capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return None
    return float(child.stdout)


def email_run(kb: int, old_seconds: float) -> list[dict]:
    rows = []
    for unit in UNITS:
        for size in (kb * 1000, kb * 10_000):
            new = [pattern_seconds(_EMAIL.pattern, unit, size, old_seconds) for _ in range(3)]
            rows.append({"text": unit, "bytes": size // len(unit) * len(unit) + 1, "new_s": statistics.median(new),
                         "old_s": pattern_seconds(OLD_EMAIL, unit, size, old_seconds), "redact_pii_s": seconds(lambda: redact_pii(unit * (size // len(unit)) + "@"))})
    return rows


def traced(fn: Callable[[], object]) -> tuple[float, int, object]:
    tracemalloc.start()
    try:
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def bomb_run(megabytes: int, limit: str, folder: Path) -> dict:
    path = folder / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(b'{"text": "')
        for _ in range(megabytes):
            handle.write(b"a" * 1_000_000)
        handle.write(b'"}\n{"text": "good"}\n')
    shutil.copy(path, folder / "bomb.txt.gz")
    report = {"compressed_bytes": path.stat().st_size, "decompressed_bytes": megabytes * 1_000_000 + 32, "limit": limit}
    for name, read in (("read_whole_before", lambda: len(gzip.open(folder / "bomb.txt.gz").read())),
                       ("text_reader", lambda: list(read_source(SourceConfig("t", paths=[str(folder / "bomb.txt.gz")], max_document_bytes=limit)))),
                       ("jsonl_reader", lambda: list(read_source(SourceConfig("j", paths=[str(path)], max_document_bytes=limit)))),
                       ):  # fmt: skip
        took, peak, result = traced(read)
        outcome = result if isinstance(result, int) else [getattr(r, "issue", None) or "kept" for r in result]
        report[name] = {"seconds": took, "peak_traced_mb": peak / 1e6, "outcome": outcome}
    return report


def print_tables(report: dict) -> None:
    def shown(value: float | None) -> str:
        return f"still running after {report['old_seconds']:g} s" if value is None else f"{value * 1000:,.1f} ms"

    print("| text | bytes | e-mail pattern before | e-mail pattern now | redact_pii now |\n| --- | --- | --- | --- | --- |")
    for row in report["email"]:
        print(f"| `{row['text']}` repeated, then `@` | {row['bytes']:,} | {shown(row['old_s'])} | {shown(row['new_s'])} | {shown(row['redact_pii_s'])} |")
    b = report["bomb"]
    print(f"\nGzip bomb: {b['compressed_bytes']:,} bytes, {b['decompressed_bytes']:,} decompressed, max_document_bytes = {b['limit']}")
    print("| read | seconds | peak traced memory | outcome |\n| --- | --- | --- | --- |")
    for name in ("read_whole_before", "text_reader", "jsonl_reader"):
        r = b[name]
        print(f"| {name} | {r['seconds']:.2f} | {r['peak_traced_mb']:,.1f} MB | {r['outcome']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kb", type=int, default=100, help="size of the smaller hostile texts in KB (default: 100)")
    parser.add_argument("--old-seconds", type=float, default=20.0, help="how long the old pattern may run on one text (default: 20)")
    parser.add_argument("--bomb-mb", type=int, default=200, help="decompressed size of the gzip bomb in MB (default: 200)")
    parser.add_argument("--limit", default="8MB", help="max_document_bytes for the bomb (default: 8MB, the default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hostile_data.json"))
    args = parser.parse_args()
    if not (1 <= args.kb <= 1000 and 0 < args.old_seconds <= 600 and 1 <= args.bomb_mb <= 4000):
        raise SystemExit("--kb in [1, 1000], --old-seconds in (0, 600], --bomb-mb in [1, 4000]")
    with tempfile.TemporaryDirectory(prefix="hostile-data-") as tmp:
        report = {
            "command": "python benchmarks/hostile_data.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
            "commit": git_commit(), "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
            "old_seconds": args.old_seconds, "email": email_run(args.kb, args.old_seconds), "bomb": bomb_run(args.bomb_mb, args.limit, Path(tmp)),
        }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
