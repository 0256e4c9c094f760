"""The run folder's record: `metrics.jsonl` (one JSON object per logged step), the loss-curve
PNG and `report.md`."""

import json
from pathlib import Path

from scratchlm.atomic_io import OutputFileError, fsync_file, save_figure_atomic, write_text_atomic
from scratchlm.errors import InputFileError


class MetricsLog:
    """Appends rows to `metrics.jsonl`, flushed at once so a killed run keeps its record."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            try:
                with self.path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
            except OSError as exc:  # a full disk, most likely: say so in one line
                raise OutputFileError(f"{self.path}: cannot append metrics ({exc.strerror or exc})") from None

    def sync(self) -> None:
        """Flush the log to disk; done before each checkpoint, so that after a power cut the log
        still holds every row up to the step the run resumes from."""
        if self.enabled and self.path.is_file():
            fsync_file(self.path)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, which the resumed run redoes, and a
        torn last line; the file is rewritten so that the next row starts on a line of its own."""
        if self.enabled and self.path.is_file():
            kept = [line for line, row in _metrics_lines(self.path) if row.get("step", 0) <= step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    return [row for _, row in _metrics_lines(path)]


def _metrics_lines(path: Path) -> list[tuple[str, dict]]:
    """Each row of a metrics log with its line. The log is only appended to, a whole line at a
    time, so only the last line can be torn (a kill, a full disk, a power cut mid-write): it is
    left out. A bad line before it is not a torn write but damage or an edit, and leaving it out
    would hide it: that is an error naming the line."""
    lines = [(number, line) for number, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    rows = []
    for number, line in lines:
        try:
            text = line.decode("utf-8")
            row = json.loads(text)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both
            if number == lines[-1][0]:
                break
            raise InputFileError(f"{path}:{number}: not a JSON line ({exc})") from None
        if not isinstance(row, dict):
            raise InputFileError(f"{path}:{number}: not a JSON object")
        rows.append((text, row))
    return rows


def plot_loss_curve(rows: list[dict], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8)
        smooth, average = [], None
        for loss in losses:  # exponential moving average: single steps are noisy
            average = loss if average is None else 0.9 * average + 0.1 * loss
            smooth.append(average)
        ax.plot(steps, smooth, color="tab:blue", label="train loss (smoothed)", linewidth=1.5)
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure_atomic(fig, out)
