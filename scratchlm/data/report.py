"""`report.md` of a prepare run: where every document went, from `stats.json`."""

from pathlib import Path

from scratchlm.atomic_io import write_text_atomic

_STAGES = ("read", "extract", "normalize", "filter", "pii")


def _mb(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.2f} MB"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render_report(stats: dict) -> str:
    lines = ["# Data preparation report", ""]
    verdict = "every input document is accounted for" if stats["accounted"] else "**accounting mismatch: this is a bug, please report it**"
    lines += [
        f"- inputs: {stats['inputs']:,} documents ({_mb(stats['input_bytes'])} of input files)",
        f"- kept: {stats['kept']:,} · rejected: {stats['rejected']:,} · duplicates: {stats['duplicates']:,} ({verdict})",
        "- per-document outcomes: `ledger/*.jsonl`; kept documents: `documents/*.jsonl`",
    ]
    if stats["tokens"]:
        lines.append(f"- tokens written: {stats['tokens']['train']:,} train, {stats['tokens']['val']:,} validation")
    lines += ["", "## Stages, per source", "", "Documents (and bytes) entering each stage; HTML extraction only sees HTML documents.", ""]
    lines.append(_row("source", *_STAGES, "kept train", "kept val", "weight", "epochs: target (written)"))
    lines.append(_row(*["---"] * (len(_STAGES) + 5)))
    for name, source in stats["sources"].items():
        cells = [f"{s['documents']:,} ({_mb(s['bytes'])})" for s in (source["stages"][stage] for stage in _STAGES)]
        kept = [f"{source['kept'][split]:,} ({_mb(source['kept_bytes'][split])})" for split in ("train", "val")]
        weight = "natural" if source["weight"] is None else f"{source['weight']:g}"
        epochs = "-" if source["epochs"] is None else f"{source['epochs']:.3g}"
        if source.get("epochs_written") is not None:
            epochs += f" ({source['epochs_written']:.3g})"
        lines.append(_row(name, *cells, *kept, weight, epochs))
    lines += ["", "## Rejections", ""]
    if stats["rejection_reasons"]:
        lines.append(_row("reason", "documents", "examples"))
        lines.append(_row("---", "---", "---"))
        for reason, count in list(stats["rejection_reasons"].items())[:20]:
            shown = " · ".join(_example(e) for e in stats["examples"].get(reason, []))
            lines.append(_row(reason, f"{count:,}", shown))
    else:
        lines.append("None.")
    dedup = stats["dedup"]
    lines += ["", "## Deduplication", "", f"- exact copies removed: {dedup['exact_duplicates']:,}", f"- near copies removed: {dedup['near_duplicates']:,}"]
    if "bands" in dedup:
        curve = ", ".join(f"{s:.2f}: {p:.3f}" for s, p in dedup["s_curve"])
        lines.append(f"- MinHash LSH: {dedup['bands']} bands of {dedup['rows']} rows; chance of catching a pair by Jaccard similarity: {curve}")
    if dedup["cluster_sizes"]:
        sizes = ", ".join(f"{n:,} of size {size}" for size, n in dedup["cluster_sizes"].items())
        lines.append(f"- clusters: {sizes}")
    if stats["pii_replaced"] and any(stats["pii_replaced"].values()):
        lines += ["", "## PII replaced", "", ", ".join(f"{kind}: {n:,}" for kind, n in stats["pii_replaced"].items())]
    issues = stats["read_issues"]
    if issues["counts"]:
        lines += ["", "## Input problems that cost no document", ""]
        lines += [f"- {kind}: {n:,}" for kind, n in issues["counts"].items()]
        lines += [f"  - `{i['where']}`: {i['detail']}" for i in issues["first"][:10]]
    lines += ["", "## Time", ""]
    total = stats["phase_seconds"]["total"]
    chunks = stats.get("chunks", {})
    rate = f" ({stats['input_bytes'] / 1e6 / total:.2f} MB/s)" if stats["input_bytes"] and total and not chunks.get("cleaned_before") else ""
    if chunks.get("cleaned_before"):
        lines.append(f"- resumed: {chunks['cleaned_before']} of {chunks['total']} chunks were cleaned by an earlier run")
    lines.append(f"- wall clock: {total:.1f} s{rate}; " + ", ".join(f"{k} {v:.1f} s" for k, v in stats["phase_seconds"].items() if k != "total"))
    lines.append("- CPU seconds per stage, summed over workers: " + ", ".join(f"{k} {v:.1f}" for k, v in stats["stage_seconds"].items()))
    return "\n".join(lines) + "\n"


def _example(example: dict) -> str:
    text = example["text"]
    if text.startswith(example["id"]):  # a read failure's detail already names its place
        return _quote(text)
    return f"`{_quote(example['id'])}`: {_quote(text)}"


def _quote(text: str) -> str:
    # Control characters would make the report a "binary file" to grep and break the table.
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    flat = flat[:120] + ("…" if len(flat) > 120 else "")
    return flat.replace("|", "\\|").replace("`", "'")


def write_report(stats: dict, path: str | Path) -> Path:
    return write_text_atomic(path, render_report(stats))
