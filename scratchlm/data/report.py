"""`report.md` of a prepare run: where every document went, from `stats.json`; and
`diversity.png` beside it, the plots of its `diversity` section."""

from pathlib import Path

from scratchlm.atomic_io import save_figure_atomic, write_text_atomic
from scratchlm.data.diversity import LANGUAGE_SAMPLE

_STAGES = ("read", "extract", "normalize", "filter", "pii")
DIVERSITY_PLOT = "diversity.png"


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
    lines += _sources_section(stats["sources"])
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
    if "removal_curve" in dedup:
        curve = ", ".join(f"{s:.2f}: {p:.3f}" for s, p in dedup["removal_curve"])
        lines.append(f"- candidate pairs: {dedup['candidate_pairs']:,}, of which {dedup['verified_pairs']:,} passed verification ({dedup['verify']})")
        lines.append(f"- expected share of near copies removed, by Jaccard similarity (the recall curve): {curve}")
    if dedup["cluster_sizes"]:
        sizes = ", ".join(f"{n:,} of size {size}" for size, n in dedup["cluster_sizes"].items())
        lines.append(f"- clusters: {sizes}")
    if stats["pii_replaced"] and any(stats["pii_replaced"].values()):
        lines += ["", "## PII replaced", "", ", ".join(f"{kind}: {n:,}" for kind, n in stats["pii_replaced"].items())]
    if stats.get("diversity"):
        lines += _diversity_section(stats["diversity"])
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


def _sources_section(sources: dict) -> list[str]:
    """Where each source came from and on what terms, as its config declared."""
    lines = ["", "## Sources", "", _row("source", "license", "url", "weight", "notes"), _row(*["---"] * 5)]
    for name, source in sources.items():
        weight = "natural" if source.get("weight") is None else f"{source['weight']:g}"
        cells = [_quote(source.get(key) or "-") for key in ("license", "url")]
        lines.append(_row(name, *cells, weight, _quote(source.get("notes") or "-")))
    return lines


def _diversity_section(diversity: dict) -> list[str]:
    unit = diversity["share_unit"]
    lines = ["", "## Diversity", "", f"![languages, lengths, domains and shares per source]({DIVERSITY_PLOT})", "",
             f"Kept documents; share: of the {unit} of the training mixture; languages by py3langid on the first "
             f"{diversity['language_chars']:,} characters of every {LANGUAGE_SAMPLE}th document of each source and chunk; lengths in bytes (percentiles to within a histogram bin).", ""]  # fmt: skip
    lines.append(_row("source", "documents", "share", "top languages", "median length", "p5 – p95", "top domains"))
    lines.append(_row(*["---"] * 7))
    for name, group in [*diversity["sources"].items(), ("all", diversity["overall"])]:
        share = "-" if group["share"] is None else f"{group['share']:.1%}"
        total = sum(group["languages"].values()) or 1  # a sample of the documents
        languages = ", ".join(f"{code} {n / total:.0%}" for code, n in list(group["languages"].items())[:3]) or "-"
        p = group["length_bytes"]["percentiles"]
        spread = "-" if p["p5"] is None else f"{p['p5']:,} – {p['p95']:,}"
        median = "-" if p["p50"] is None else f"{p['p50']:,}"
        domains = ", ".join(f"{host} ({n:,})" for host, n in group["domains"]["top"][:3]) or "-"
        lines.append(_row(name, f"{group['documents']:,}", share, languages, median, spread, _quote(domains)))
    return lines


def plot_diversity(diversity: dict, path: str | Path) -> Path:
    """Four panels: each source's share of the mixture, its length histogram, its languages and
    the top domains overall."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    sources = diversity["sources"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=100)
    share, lengths, languages, domains = axes.flat
    share.barh(list(sources), [g["share"] or 0 for g in sources.values()], color="tab:blue")
    share.set_xlabel(f"share of the training mixture ({diversity['share_unit']})")
    share.invert_yaxis()
    for name, group in sources.items():
        rows = group["length_bytes"]["histogram"]
        if rows:
            lengths.stairs([n for _, _, n in rows], [rows[0][0], *(high for _, high, _ in rows)], label=name)
    lengths.set_xscale("log")
    lengths.set_xlabel("document length (bytes)")
    lengths.set_ylabel("documents")
    codes = list(diversity["overall"]["languages"])[:8]
    left = [0.0] * len(codes)
    for name, group in sources.items():
        counts = [group["languages"].get(code, 0) for code in codes]
        languages.barh(codes, counts, left=left, label=name)
        left = [a + b for a, b in zip(left, counts)]
    languages.set_xlabel(f"documents classified (every {LANGUAGE_SAMPLE}th)")
    languages.invert_yaxis()
    top = diversity["overall"]["domains"]["top"][:10]
    if top:
        domains.barh([host for host, _ in top], [n for _, n in top], color="tab:green")
        domains.invert_yaxis()
    else:
        domains.text(0.5, 0.5, "no document URLs\n(set url_field on a source)", ha="center", va="center", transform=domains.transAxes)
    domains.set_xlabel("documents")
    for ax, title in zip(axes.flat, ("share per source", "length distribution", "languages", "top domains")):
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if len(sources) > 1:
        lengths.legend()
        languages.legend()
    fig.tight_layout()
    return save_figure_atomic(fig, path)


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
    """`report.md` at `path`, and the diversity plots beside it."""
    if stats.get("diversity"):
        plot_diversity(stats["diversity"], Path(path).with_name(DIVERSITY_PLOT))
    return write_text_atomic(path, render_report(stats))
