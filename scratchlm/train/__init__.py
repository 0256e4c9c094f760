"""Train stage: the one training loop every kind of training runs through, its run folder
(metrics.jsonl, loss.png, report.md, checkpoints), optimizers and schedules, and data-parallel
runs under torchrun."""
