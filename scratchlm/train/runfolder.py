"""The run folder's model and report.

    RUN/model/                    the final model, a model folder (scratchlm/model/folder.py)
    RUN/report.md                 what ran, on what, how fast, how well, with samples

"""

import json
from pathlib import Path

import torch

from scratchlm.atomic_io import write_text_atomic
from scratchlm.model import ModelConfig


def start_evaluation(rows: list[dict]) -> dict | None:
    """The metrics row of the evaluation before the first step (runs with init_from)."""
    return next((r for r in rows if r["step"] == 0 and "val_loss" in r), None)


def write_report(run_dir: Path, summary, config, model_config: ModelConfig, shards, rows: list[dict]) -> Path:
    import platform

    evals = [r for r in rows if "val_bpb" in r]
    best = min(evals, key=lambda r: r["val_bpb"]) if evals else None
    start = start_evaluation(rows) if config.init_from is not None else None
    started_from = []
    if config.init_from is not None:
        started_from.append(f"| started from | `{config.init_from}` (continued pretraining) |")
        started_from.append(f"| validation loss at start | {start['val_loss']:.4f} nats/token, {start['val_bpb']:.4f} bits per byte |"
                            if start else "| validation loss at start | n/a |")
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        "## Result",
        "",
        "| | |",
        "| --- | --- |",
        *started_from,
        f"| final train loss | {summary.final_loss:.4f} nats/token |" if summary.final_loss is not None else "| final train loss | n/a |",
        f"| validation loss | {summary.val_loss:.4f} nats/token |" if summary.val_loss is not None else "| validation loss | n/a |",
        f"| validation bits per byte | {summary.val_bpb:.4f} |" if summary.val_bpb is not None else "| validation bits per byte | n/a |",
        f"| best validation bits per byte | {best['val_bpb']:.4f} (step {best['step']}) |" if best else "| best validation bits per byte | n/a |",
        f"| steps / tokens | {summary.steps:,} / {summary.tokens:,} |",
        f"| wall time | {summary.seconds:.1f} s |",
        f"| throughput | {summary.tokens_per_s:,.0f} tokens/s" + (f", MFU {summary.mfu:.1%}" if summary.mfu else "") + " |",
        *([f"| MFU is a share of | {summary.peak_flops.flops / 1e9:,.0f} GFLOP/s: {summary.peak_flops.source} |"]
          if summary.mfu and summary.peak_flops else []),
        f"| peak memory | {summary.peak_memory_mb:,.0f} MB" + (" per process" if summary.layout != "1 process" else "") + " |",
        f"| layout | {summary.layout} |",
        "",
        "## Model",
        "",
        f"{summary.params:,} parameters: {model_config.n_layer} layers, width {model_config.n_embd}, "
        f"{model_config.n_head} heads ({model_config.kv_heads} key/value), context {model_config.block_size}, "
        f"{model_config.positions} positions, {model_config.norm}, {model_config.mlp}, vocab {model_config.vocab_size}.",
        "",
        "## Data",
        "",
        f"`{shards.path}`: {shards.tokens('train'):,} train tokens, {shards.tokens('val'):,} validation tokens.",
        "",
        "## Training",
        "",
        f"Recipe: `{json.dumps({k: v for k, v in config.to_dict().items() if v not in (None, {}, '')})}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "",
        "![loss curve](loss.png)",
        "",
        "## Samples",
        "",
    ]
    for n, sample in enumerate(summary.samples, 1):
        lines += [f"**Sample {n}**", "", "```text", sample.strip(), "```", ""]
    return write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
