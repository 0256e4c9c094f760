"""Side by side: several models on the same text and tasks, in one table.

Models are loaded and evaluated one at a time (two 1B-parameter models need not fit in memory
together), each through `evaluate_model`, so a comparison's numbers are exactly those each
`scratchlm eval` would print.

Only per-byte numbers compare models with different tokenizers: perplexity is per token, and a
tokenizer with longer tokens has fewer, harder-to-predict tokens for the same text. The table
keeps perplexity for reference but says so; the chart leaves it out.
"""

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scratchlm.atomic_io import save_figure_atomic, write_text_atomic
from scratchlm.errors import ConfigError
from scratchlm.eval.runner import EvalReport, json_ready, evaluate_model, prepare_for_evaluation

TOKENIZER_NOTE = (
    "Bits per byte is measured per UTF-8 byte of the same text, so it compares models with different "
    "tokenizers; perplexity is per token and only compares models that share a tokenizer."
)
# Metrics worth a column; *_stderr and per-example details stay in each model's results.json.
_TASK_METRICS = ("acc", "acc_norm", "accuracy", "macro_f1", "exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL")


@dataclass
class Comparison:
    labels: list[str]
    sources: list[str]
    reports: list[EvalReport]

    def columns(self) -> list[str]:
        """Metric columns in a fixed order: model facts, language modelling, then each task's metrics."""
        columns = ["parameters", "vocab"]
        for name in _unique(r.name for report in self.reports for r in report.language_modeling):
            columns += [f"{name} bits/byte", f"{name} perplexity"]
        for report in self.reports:
            for task in report.tasks:
                columns += [f"{task.task} {m}" for m in _TASK_METRICS if m in task.metrics]
        return _unique(columns)

    def rows(self) -> list[dict[str, float | int | str | None]]:
        rows = []
        for label, report in zip(self.labels, self.reports):
            row: dict[str, float | int | str | None] = {
                "model": label, "parameters": report.model["parameters"], "vocab": report.model["tokenizer"]["vocab_size"],
            }
            for lm in report.language_modeling:
                row[f"{lm.name} bits/byte"] = lm.score.bits_per_byte
                row[f"{lm.name} perplexity"] = lm.score.perplexity
            for task in report.tasks:
                for metric, value in task.metrics.items():
                    row[f"{task.task} {metric}"] = value
            rows.append({"model": label, **{c: row.get(c) for c in self.columns()}})
        return rows


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def model_labels(sources: Sequence[str | Path]) -> list[str]:
    """Short names for the table: the file's stem or the folder's name (a run's model/ folder is
    named after its run), numbered when two would be the same."""
    names = []
    for source in sources:
        p = Path(source)
        name = p.parent.name if p.name == "model" and p.parent.name else (p.stem if p.is_file() else p.name)
        names.append(name or str(p))
    labels, seen = [], {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(f"{name} ({seen[name]})" if names.count(name) > 1 else name)
    return labels


def check_comparison(sources: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[str]:
    """The labels of a comparison of `sources`, after checking what is cheap to check: at least
    two models, one distinct label each, and every model there (a missing last model fails now,
    not after the others ran; a caller building the default text checks first, too)."""
    from scratchlm.interop import detect_model

    if len(sources) < 2:
        raise ConfigError("compare needs at least two models")
    labels = list(labels) if labels else model_labels(sources)
    if len(labels) != len(sources):
        raise ConfigError(f"compare: {len(labels)} labels for {len(sources)} models")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"compare: labels must differ, got {', '.join(labels)}")
    for source in sources:
        detect_model(source)
    return labels


def compare_models(
    sources: Sequence[str | Path],
    *,
    labels: Sequence[str] | None = None,
    tasks: Sequence[str | Path] = (),
    text: str | Path | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    truncate: bool = False,
    device: str = "cpu",
    progress: bool = True,
    log=print,
    dtype: str = "float32",
) -> Comparison:
    """Evaluate each model in `sources` (anything `open_model` opens) on the same text and tasks."""
    from scratchlm.interop import open_model

    labels = check_comparison(sources, labels)
    reports = []
    for label, source in zip(labels, sources):
        log(f"[{label}] loading {source}")
        opened = open_model(source, device)
        model, tokenizer = prepare_for_evaluation(opened.model, dtype), opened.tokenizer
        reports.append(evaluate_model(model, tokenizer, tasks=tasks, text=text, stride=stride, batch_size=batch_size,
                                      limit=limit, truncate=truncate, progress=progress))
        del model  # free it before the next model loads
    return Comparison(labels, [str(s) for s in sources], reports)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value / 1e6:.1f}M" if value >= 1_000_000 else f"{value:,}"
    return f"{value:.4f}" if math.isfinite(value) else "inf"


def comparison_markdown(comparison: Comparison) -> str:
    """The table as markdown: one row per model, one column per metric, and the tokenizer note."""
    columns = comparison.columns()
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in comparison.rows():
        lines.append(f"| {row['model']} | " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n\n" + TOKENIZER_NOTE + "\n"


def comparison_csv(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["model", *comparison.columns()], lineterminator="\n")
    writer.writeheader()
    writer.writerows(comparison.rows())
    return buffer.getvalue()


def plot_comparison(comparison: Comparison, out: Path) -> Path:
    """One bar chart per metric (parameters, vocabulary and perplexity left out), models as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in comparison.columns() if c not in ("parameters", "vocab") and not c.endswith("perplexity")]
    rows = comparison.rows()
    if not metrics:
        raise ConfigError("compare: no metrics to plot")
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics):
        values = [row[metric] if row[metric] is not None else float("nan") for row in rows]
        ax.bar(range(len(rows)), values, color=[colors[i % len(colors)] for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), [str(row["model"]) for row in rows], rotation=20, ha="right", fontsize=8)
        ax.set_title(metric + (" (lower is better)" if "bits/byte" in metric else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure_atomic(fig, out)


def save_comparison(comparison: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """compare.md, compare.csv, compare.png and results.json (every model's full report)."""
    out = Path(out_dir)
    full = {"note": TOKENIZER_NOTE, "models": [
        {"label": label, "source": source, **report.to_dict()}
        for label, source, report in zip(comparison.labels, comparison.sources, comparison.reports)
    ]}
    return {
        "markdown": write_text_atomic(out / "compare.md", comparison_markdown(comparison)),
        "csv": write_text_atomic(out / "compare.csv", comparison_csv(comparison)),
        "chart": plot_comparison(comparison, out / "compare.png"),
        "results": write_text_atomic(out / "results.json", json.dumps(json_ready(full), indent=2, ensure_ascii=False) + "\n"),
    }
