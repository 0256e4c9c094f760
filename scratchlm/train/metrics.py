"""The run folder's record: `metrics.jsonl` (one JSON object per logged step), the loss-curve
PNG and `report.md`."""

import json
from pathlib import Path

from scratchlm.atomic_io import save_figure_atomic, write_text_atomic


class MetricsLog:
    """Appends rows to `metrics.jsonl`, flushed at once so a killed run keeps its record."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, which the resumed run redoes."""
        if self.enabled and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    try:
        return save_figure_atomic(fig, out)
    finally:
        plt.close(fig)
