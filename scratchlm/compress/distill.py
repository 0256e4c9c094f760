"""Knowledge distillation (Hinton et al. 2015): train a student to give the next-token
distributions a teacher gives, on the teacher's own text. Here the student is a structurally
pruned model and the teacher the model it was cut from, so the student relearns what its cut
lost from far richer targets than the one next token.

    loss = KL(teacher || student) = sum_v p_teacher(v) (log p_teacher(v) - log p_student(v)),
           averaged over every position of every window

It runs through the one training loop (`scratchlm.train.loop`), with pretraining's AdamW and
warmup-then-cosine schedule, so the run folder gets metrics.jsonl, a loss curve and a report
like any other run.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchlm.errors import ConfigError
from scratchlm.model.model import GPT
from scratchlm.train.config import TrainConfig
from scratchlm.train.loop import LoopConfig, LoopResult, Run, StepOutput, train_loop
from scratchlm.train.metrics import MetricsLog, plot_loss_curve, read_metrics
from scratchlm.train.optim import build_optimizer, lr_multiplier


@dataclass
class DistillConfig:
    steps: int
    lr: float = 3e-4
    batch_size: int = 8  # windows per step
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # a few hundred steps from a trained model: nothing to regularise

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(f"distillation needs steps >= 1, batch_size >= 1 and lr > 0, not {self.steps}, "
                              f"{self.batch_size}, {self.lr}")


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over positions of KL(teacher || student) in nats, in float32."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean")


class DistillTask:
    """Windows of calibration text, `batch_size` a step in order, round and round; the teacher's
    logits computed as each batch is used (no grad)."""

    def __init__(self, teacher: GPT, windows: Tensor, batch_size: int) -> None:
        self.teacher, self.windows, self.batch_size = teacher, windows, batch_size

    def batch(self, index: int) -> Tensor:
        rows = torch.arange(index * self.batch_size, (index + 1) * self.batch_size) % self.windows.shape[0]
        return self.windows[rows]

    def step(self, model: nn.Module, batch: Tensor) -> StepOutput:
        device = next(model.parameters()).device
        batch = batch.to(device)
        with torch.no_grad():
            target = self.teacher(batch)[0]
        logits = model(batch)[0]
        return StepOutput(kl_to_teacher(logits, target), tokens=batch.numel())


@torch.no_grad()
def held_out_kl(student: nn.Module, teacher: GPT, windows: Tensor, batch_size: int = 8) -> dict[str, float]:
    """The student's KL to the teacher and its own next-token loss (nats) on `windows`."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    kl = loss = 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = student(batch)[0]
        rows = batch.shape[0] / windows.shape[0]
        kl += float(kl_to_teacher(logits, teacher(batch)[0])) * rows
        loss += float(GPT.loss(logits[:, :-1].contiguous(), batch[:, 1:])) * rows
    student.train(was_training)
    return {"val_kl": kl, "val_loss": loss}


def distill(student: GPT, teacher: GPT, windows: Tensor, held_out: Tensor, config: DistillConfig,
            folder: Path | None = None, progress: bool = True) -> LoopResult:
    """Train `student` towards `teacher` on `windows` (N, T) token ids for `config.steps` steps;
    `held_out` windows measure it before, during and after. With `folder`, the run's
    metrics.jsonl, loss.png and report.md go there."""
    device = student.embed.weight.device
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    train = TrainConfig(max_steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps,
                        min_lr_ratio=config.min_lr_ratio, weight_decay=config.weight_decay)
    loop = LoopConfig(lr=config.lr, schedule=lambda step, progress: lr_multiplier(step, progress, train),
                      max_steps=config.steps, dtype="float32", log_every=max(1, config.steps // 100),
                      eval_every=max(1, config.steps // 2), evaluate_at_start=True, desc="distilling", progress=progress)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(folder / "metrics.jsonl") if folder is not None else MetricsLog(Path(os.devnull), enabled=False)
    result = train_loop(student, lambda module: build_optimizer(module, train, device),
                        DistillTask(teacher, windows, config.batch_size), loop, Run(folder or Path(os.devnull), device),
                        metrics, evaluate=lambda model: held_out_kl(model, teacher, held_out, config.batch_size))
    student.eval()
    if folder is not None:
        rows = read_metrics(folder / "metrics.jsonl")
        plot_loss_curve(rows, folder / "loss.png", title="distillation: KL(teacher || student)")
        _write_report(folder / "report.md", rows, result, config, windows, held_out)
    return result


def _write_report(path: Path, rows: list[dict], result: LoopResult, config: DistillConfig, windows: Tensor,
                  held_out: Tensor) -> None:
    from scratchlm.atomic_io import write_text_atomic

    evals = [row for row in rows if "val_kl" in row]
    first, last = evals[0], evals[-1]
    write_text_atomic(path, "\n".join([
        "# Distillation",
        "",
        f"{result.steps} steps of {config.batch_size} windows of {windows.shape[1]} tokens "
        f"({windows.shape[0]} windows, round and round), AdamW at lr {config.lr:g}, in {result.seconds:.0f} s "
        f"({result.tokens_per_s:,.0f} tokens/s).",
        "",
        f"| on {held_out.shape[0]} held-out windows | before | after |",
        "| --- | --- | --- |",
        f"| KL(teacher \u2016 student), nats/token | {first['val_kl']:.4f} | {last['val_kl']:.4f} |",
        f"| student's next-token loss, nats | {first['val_loss']:.4f} | {last['val_loss']:.4f} |",
        "",
        "![loss](loss.png)",
        "",
    ]))
