"""End-to-end `data prepare` throughput, per stage, on a corpus the benchmark builds itself.

    python benchmarks/prepare_bench.py [--mb 40] [--html-share 0.25] [--workers 2] [--out FILE.json]

Corpus: the embedded corpus (CPython's documentation and docstrings), cut into documents of
200-800 words; a share of them wrapped in web-page boilerplate (navigation, cookie banner,
footer) and written as HTML files, the rest as JSONL; 5% exact copies and 5% near copies
(3% of words changed) planted, and a few malformed lines. The whole pipeline runs with its
defaults (all stages on, no language filter) and a vocabulary-4096 tokenizer trained on the
embedded corpus beforehand (not timed).

Reported: wall-clock MB/s of input for the whole run with `--workers` processes, and for each
stage its single-core rate (bytes entering the stage / CPU seconds the workers spent in it).
"""

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

from scratchlm.text.embedded import embedded_documents
from scratchlm.data.prepare import load_prepare_config, prepare
from scratchlm.tokenizer import train_tokenizer

PAGE = """<!DOCTYPE html><html><head><title>{title}</title><script>var tracking = {{id: {n}}};</script></head>
<body><nav><a href="/">Home</a> | <a href="/docs">Docs</a> | <a href="/about">About</a></nav>
<div class="cookie">We use cookies to improve your experience. Accept all cookies?</div>
<main><article><h1>{title}</h1>{paragraphs}</article></main>
<footer>Copyright 2026 Example Docs. All rights reserved. Privacy policy.</footer></body></html>"""


def base_documents(target_bytes: int, rng: random.Random) -> list[str]:
    """Documents cut from consecutive, non-overlapping windows of the embedded corpus's words
    (so they are not near copies of each other); past the end, from word-shuffled windows."""
    words = " ".join(embedded_documents()).split()
    docs, size, position = [], 0, 0
    while size < target_bytes:
        length = rng.randint(200, 800)
        if position + length > len(words):
            rng.shuffle(words)
            position = 0
        chunk = words[position : position + length]
        position += length
        sentences = [" ".join(chunk[i : i + 20]) + "." for i in range(0, length, 20)]
        text = "\n\n".join(" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4))
        docs.append(text)
        size += len(text.encode())
    return docs


def build_corpus(root: Path, megabytes: float, html_share: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    docs = base_documents(int(megabytes * 1e6 * 0.9), rng)
    planted = {"exact": 0, "near": 0}
    for doc in list(docs[: len(docs) // 20]):
        docs.append(doc)
        planted["exact"] += 1
    for doc in list(docs[len(docs) // 20 : len(docs) // 10]):
        words = doc.split(" ")
        for i in rng.sample(range(len(words)), max(1, len(words) * 3 // 100)):
            words[i] = "edited"
        docs.append(" ".join(words))
        planted["near"] += 1
    rng.shuffle(docs)
    (root / "html").mkdir(parents=True)
    html_count = int(len(docs) * html_share)
    for n, doc in enumerate(docs[:html_count]):
        paragraphs = "".join(f"<p>{p}</p>" for p in doc.split("\n\n"))
        (root / "html" / f"{n:06d}.html").write_text(PAGE.format(title=doc[:40], n=n, paragraphs=paragraphs))
    with (root / "docs.jsonl").open("w") as handle:
        for n, doc in enumerate(docs[html_count:]):
            handle.write(json.dumps({"text": doc}) + "\n")
            if n % 1000 == 999:
                handle.write("{malformed\n")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"documents": len(docs), "html_documents": html_count, "planted": planted, "input_bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=40.0, help="corpus size in MB (default: 40)")
    parser.add_argument("--html-share", type=float, default=0.25, help="share of documents written as HTML pages")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: every core)")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/results/prepare_work"), help="scratch folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prepare.json"))
    args = parser.parse_args()

    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    corpus = build_corpus(args.work / "corpus", args.mb, args.html_share)
    tokenizer, _, _ = train_tokenizer(None, 4096, max_bytes=5_000_000, workers=args.workers)
    tokenizer.save(args.work / "tokenizer.json")
    config = load_prepare_config(None, {"tokenizer": str(args.work / "tokenizer.json"), "workers": str(args.workers)}, [str(args.work / "corpus")])
    start = time.perf_counter()
    stats = prepare(config, args.work / "out", progress=True).stats
    wall = time.perf_counter() - start

    stages = {}
    entered: dict[str, int] = {}
    for source in stats["sources"].values():
        for stage, counts in source["stages"].items():
            entered[stage] = entered.get(stage, 0) + counts["bytes"]
    entered["exact_dedup"] = entered["near_dedup"] = entered["pii"]
    for stage, seconds in stats["stage_seconds"].items():
        stages[stage] = {"mb_in": entered.get(stage, 0) / 1e6, "cpu_seconds": seconds, "mb_per_cpu_second": entered.get(stage, 0) / 1e6 / seconds if seconds else None}
    result = {
        "corpus": corpus,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "wall_seconds": wall,
        "mb_per_second": corpus["input_bytes"] / 1e6 / wall,
        "phase_seconds": stats["phase_seconds"],
        "stages": stages,
        "outcome": {k: stats[k] for k in ("inputs", "kept", "rejected", "duplicates")},
        "dedup": {k: stats["dedup"][k] for k in ("exact_duplicates", "near_duplicates")},
        "tokens": stats["tokens"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
