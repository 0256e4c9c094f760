"""The one training loop. Every kind of training runs through `train_loop`: pretraining
(`scratchlm.train.pretrain`), classification, instruction SFT and DPO (`scratchlm.finetune`), and
distillation of a pruned model (`scratchlm.compress.distill`).

A kind of training brings a `Task`: `batch(index)`, the index-th micro-batch of the whole run,
and `step(model, batch)`, its loss and what to log beside it. The loop owns the rest, the same
for all of them:

    for each step:  grad_accum micro-batches on each rank (micro-batch number
                    (step * grad_accum + micro) * world + rank) -> loss scaled, backward
                    -> a non-finite mean loss: the step is skipped; max_nonfinite in a row stop the run
                    -> clip gradients -> optimizer step at lr * schedule(step, progress)
                    -> metrics.jsonl row (loss, lr, grad norm, tokens/s, MFU, the task's numbers)
                    -> every eval_every steps: the evaluate hook
                    -> every checkpoint_every steps: checkpoint (weights, optimizer, step, RNG)

Because a batch is a function of its number alone, the data position is the step number: a run
resumed from a checkpoint, or split across torchrun processes, reads exactly what one
uninterrupted process would, and on CPU a resumed run continues bit-identically.
"""

import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn
from tqdm import tqdm

from scratchlm.devices import PeakFlops, autocast_dtype, device_peak, peak_memory_mb, reset_peak_memory
from scratchlm.errors import ConfigError, TrainingError
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.checkpoint import resume_checkpoint, save_checkpoint, save_sharded_checkpoint, set_latest
from scratchlm.train.config import ParallelConfig
from scratchlm.train.distributed import DistInfo, mean_across_ranks
from scratchlm.train.parallel import Layout, parallelize, whole_tensor
from scratchlm.train.metrics import MetricsLog

B = TypeVar("B")
SPIKE_FACTOR = 1.5


@dataclass
class StepOutput:
    """A micro-batch's loss (what the optimizer minimises), the tokens it trained on (for
    tokens/s and MFU), and measurements logged beside it (averaged over the step's micro-batches)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int = 0


class Task(Protocol[B]):
    """What one kind of training brings to the loop."""

    def batch(self, index: int) -> B:
        """Micro-batch number `index` of the run, counted over all ranks; a pure function of
        `index`, so that resume and data parallelism read what one uninterrupted process would."""
        ...

    def step(self, model: nn.Module, batch: B) -> StepOutput:
        """The loss of `batch` under `model` (the module being trained, maybe DDP-wrapped)."""
        ...


@dataclass
class LoopConfig:
    """How the loop runs; each kind of training fills it from its own config."""

    lr: float
    schedule: Callable[[int, float], float]  # (step, progress in [0, 1]) -> factor of each group's base lr
    max_steps: int | None = None  # the first limit reached ends the run; the schedule spans the budget
    max_seconds: float | None = None
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    grad_clip: float = 1.0  # 0: no clipping
    dtype: str = "auto"  # autocast (devices.autocast_dtype)
    log_every: int = 1
    eval_every: int | None = None  # the evaluate hook also runs at the end, and at step 0 if evaluate_at_start
    evaluate_at_start: bool = False  # where the model starts (fine-tuning, continued pretraining)
    checkpoint_every: int | None = None  # steps; None or 0: no periodic checkpoints
    checkpoint_at_end: bool = False
    max_nonfinite: int = 5  # non-finite losses in a row before the run stops
    spike_after: int = 0  # steps before loss spikes are watched for (the warmup)
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # the layout over torchrun's processes
    loss_parallel: bool = False  # the task's loss is GPT.loss: tensor parallel may keep the logits sharded
    flops_per_token: float | None = None  # for MFU; None: not reported
    desc: str = "training"
    progress: bool = True


@dataclass
class Run:
    """Where a run lives: its folder (metrics.jsonl, checkpoints/), its device and process group.
    `identity` is what a checkpoint must match to be resumed (a model config as a dict, plus
    whatever else makes two runs incompatible). With `tokenizer` (and a classifier's `labels`
    and `max_length`), a checkpoint of a plain model is also a model folder that `open_model` opens."""

    folder: Path
    device: torch.device
    info: DistInfo = field(default_factory=DistInfo)
    resume: bool = False
    identity: dict = field(default_factory=dict)
    checkpoint_extra: dict = field(default_factory=dict)  # saved beside the state; a resume must give the same
    tokenizer: Tokenizer | None = None
    labels: list[str] | None = None
    max_length: int | None = None


@dataclass
class LoopResult:
    steps: int
    tokens: int
    seconds: float  # training time, evaluations included, summed over resumed sessions
    final_loss: float | None
    evaluation: dict[str, float] = field(default_factory=dict)  # the last one
    tokens_per_s: float = 0.0
    mfu: float | None = None
    peak_memory_mb: float = 0.0
    start_memory_mb: float = 0.0  # held when training began (the model, the data)
    peak_flops: PeakFlops | None = None  # what MFU is a share of
    model: nn.Module | None = None  # the trained model, whole, on the main process (None on the others)


@dataclass
class _Window:
    """Throughput counts training steps only, not evaluations or checkpoints."""

    tokens: int = 0
    seconds: float = 0.0


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", lr) * factor
    return lr * factor


def _progress(step: int, elapsed: float, max_steps: int | None, max_seconds: float | None) -> float:
    """How far through the budget the run is, in [0, 1]: steps when the budget is in steps,
    wall-clock when it is in time (whichever is further along when both are set)."""
    fractions = []
    if max_steps:
        fractions.append(step / max_steps)
    if max_seconds:
        fractions.append(elapsed / max_seconds)
    return min(1.0, max(fractions)) if fractions else 0.0


def _is_last(step: int, elapsed: float, max_steps: int | None, max_seconds: float | None) -> bool:
    return bool((max_steps and step >= max_steps) or (max_seconds and elapsed >= max_seconds))


def _resume(run: Run, layout: Layout, optimizer: torch.optim.Optimizer, metrics: MetricsLog) -> dict:
    checkpoint, state, passed_over = resume_checkpoint(run.folder, layout.model, run.identity, optimizer, layout.sharded)
    if passed_over and run.info.is_main:
        print(f"scratchlm: warning: {'; '.join(passed_over)}; resuming from {checkpoint}", file=sys.stderr, flush=True)
        set_latest(checkpoint)  # so that `latest` never names the damaged one while it is replaced
    for key, value in run.checkpoint_extra.items():  # e.g. tokens_per_step: another size is another run
        if key in state and state[key] != value:
            raise ConfigError(f"{checkpoint}: the run was saved with {key} = {state[key]}, and resuming it here gives "
                              f"{value}; resume with settings that give the same (for pretraining on another number of "
                              f"processes: batch_tokens = {state[key]} and a micro_batch that divides it)")
    torch.set_rng_state(state["rng_cpu"])
    random.setstate(state["rng_python"])
    if run.device.type == "cuda" and state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    metrics.truncate_after(state["step"])
    return state


def train_loop(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    task: Task[B],
    config: LoopConfig,
    run: Run,
    metrics: MetricsLog,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> LoopResult:
    """Train `model` on `task` until the budget is spent. The model is laid out over the run's
    processes first (`config.parallel`: FSDP2, tensor, pipeline or plain data parallelism;
    scratchlm.train.parallel), then `make_optimizer(module)` builds the optimizer over the
    parameters as laid out, then the run resumes from its latest checkpoint when `run.resume`.
    `evaluate(model)` returns numbers to log (e.g. val_loss); it is called every `eval_every`
    steps and at the end, on every rank (sharded models need all ranks for a forward pass).
    `on_row(row)` sees every metrics row as it is logged. Returns what the run did, for its
    report, with the trained model whole on the main process."""
    if config.max_steps is None and config.max_seconds is None:
        raise ConfigError("training needs a budget: max steps or max time")
    info, device = run.info, run.device
    amp = autocast_dtype(device, config.dtype)
    # float16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    layout = parallelize(model, config.parallel, info, device, compile=config.compile,
                         activation_checkpointing=config.activation_checkpointing, amp=amp, grad_accum=config.grad_accum,
                         loss_parallel=config.loss_parallel)
    optimizer = make_optimizer(layout.model)
    step, elapsed_before, tokens_total = 0, 0.0, 0
    if run.resume:
        state = _resume(run, layout, optimizer, metrics)
        step, elapsed_before, tokens_total = state["step"], state["elapsed"], state.get("tokens", 0)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    train_model = layout.train_model
    peak = device_peak(device, amp) if info.is_main and config.flops_per_token else None
    evaluation: dict[str, float] = {}
    if evaluate is not None and config.evaluate_at_start and step == 0:
        evaluation = evaluate(layout.eval_model)
        row = {"step": 0, **_rounded(evaluation)}
        metrics.write(row)
        if on_row is not None:
            on_row(row)

    max_steps, max_seconds = config.max_steps, config.max_seconds
    bar = tqdm(total=max_steps if max_steps else int(max_seconds), initial=step if max_steps else int(elapsed_before),
               unit="step" if max_steps else "s", desc=config.desc, disable=not (config.progress and info.is_main),
               dynamic_ncols=True)
    start_memory = reset_peak_memory(device)
    start = time.perf_counter() - elapsed_before
    nonfinite, loss_ema, last_loss = 0, None, None
    window = _Window()
    tokens_per_s, mfu = 0.0, None
    layout.eval_model.train()
    while not _is_last(step, time.perf_counter() - start, max_steps, max_seconds):
        step_start = time.perf_counter()
        factor = config.schedule(step, _progress(step, time.perf_counter() - start, max_steps, max_seconds))
        lr = _set_lr(optimizer, config.lr, factor)
        sums: dict[str, float] = {}
        step_tokens = 0
        for micro in range(config.grad_accum):
            # Ranks that share a data-parallel index (a tensor-parallel group, a pipeline) read the same batch.
            batch = task.batch((step * config.grad_accum + micro) * layout.dp + layout.dp_rank)
            with layout.micro_step(last=micro == config.grad_accum - 1):
                with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                    out = task.step(train_model, batch)
                if out.loss.requires_grad:  # a pipeline has already run its backward pass
                    scaler.scale(out.loss / config.grad_accum).backward()
            step_tokens += out.tokens
            for key, value in {"loss": whole_tensor(out.loss).item(), **out.metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) / config.grad_accum
        # Every rank of a tensor-parallel group or pipeline holds its batch's loss: the mean over
        # all ranks is the mean over the data-parallel ones.
        loss_value = mean_across_ranks(sums.pop("loss"), info, device)
        step_tokens = round(mean_across_ranks(float(step_tokens), info, device) * layout.dp)
        if not math.isfinite(loss_value):
            nonfinite += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1  # a skipped step still counts, and its row is numbered like any other
            metrics.write({"step": step, "nonfinite": True, "lr": lr})
            bar.update(1 if max_steps else 0)
            if nonfinite >= config.max_nonfinite:
                raise TrainingError(f"{config.desc}: the loss was not finite for {nonfinite} steps in a row (step {step}); "
                                    f"lower the learning rate (lr={config.lr:g})")
            continue
        nonfinite = 0
        scaler.unscale_(optimizer)
        grad_norm = layout.clip_grad_norm(config.grad_clip if config.grad_clip > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step += 1
        tokens_total += step_tokens
        last_loss = loss_value
        # A spike: the loss jumps well above its recent average after warmup. Logged, not fatal.
        spike = loss_ema is not None and step > config.spike_after and loss_value > SPIKE_FACTOR * loss_ema
        loss_ema = loss_value if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_value
        window.tokens += step_tokens
        window.seconds += time.perf_counter() - step_start

        last = _is_last(step, time.perf_counter() - start, max_steps, max_seconds)
        row: dict[str, Any] | None = None
        if step % config.log_every == 0 or step == 1 or last:
            tokens_per_s = window.tokens / max(window.seconds, 1e-9)
            window = _Window()
            if peak is not None:
                peak = peak.raised_to(config.flops_per_token * tokens_per_s)
                mfu = config.flops_per_token * tokens_per_s / peak.flops
            row = {"step": step, "loss": round(loss_value, 5), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                   **_rounded(sums), "tokens_per_s": round(tokens_per_s, 1), "tokens": tokens_total,
                   "elapsed": round(time.perf_counter() - start, 2)}
            if mfu is not None:
                row["mfu"] = round(mfu, 4)
        if spike:
            row = (row or {"step": step, "loss": round(loss_value, 5)}) | {"spike": True}
            if info.is_main:
                bar.write(f"loss spike at step {step}: {loss_value:.3f} against a recent average of {loss_ema:.3f}")
        if evaluate is not None and ((config.eval_every and step % config.eval_every == 0) or last):
            evaluation = evaluate(layout.eval_model)
            layout.eval_model.train()
            row = (row or {"step": step}) | _rounded(evaluation)
        if row is not None:
            metrics.write(row)
            if on_row is not None:
                on_row(row)
            shown = {k: row[k] for k in ("loss", "val_loss", "val_bpb") if k in row}
            bar.set_postfix(shown | {"tok/s": f"{tokens_per_s:,.0f}"} | ({"mfu": f"{mfu:.1%}"} if mfu else {}))
        periodic = config.checkpoint_every and step % config.checkpoint_every == 0
        if periodic or (last and config.checkpoint_at_end):
            metrics.sync()  # the log holds every row up to the checkpoint, even after a power cut
            state = {"step": step, "elapsed": time.perf_counter() - start,
                     "tokens": tokens_total, "rng_cpu": torch.get_rng_state(), "rng_python": random.getstate(),
                     "rng_cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                     "scaler": scaler.state_dict(), "model_config": run.identity, **run.checkpoint_extra}
            if layout.sharded:  # every rank writes its shards
                save_sharded_checkpoint(run.folder, step, layout.model, optimizer, state, info.is_main, run.tokenizer,
                                        whole=layout.template, labels=run.labels, max_length=run.max_length)
            elif info.is_main:
                save_checkpoint(run.folder, step, model, {"optimizer": optimizer.state_dict(), **state},
                                run.tokenizer, labels=run.labels, max_length=run.max_length)
        bar.update(1 if max_steps else int(time.perf_counter() - start) - bar.n)
    bar.close()
    if last_loss is None and nonfinite:  # a budget too short to reach max_nonfinite, and no step counted
        raise TrainingError(f"{config.desc}: the loss was not finite for {nonfinite} steps in a row (step {step}); "
                            f"lower the learning rate (lr={config.lr:g})")
    layout.eval_model.eval()
    seconds, peak_memory = time.perf_counter() - start, peak_memory_mb(device)
    whole = layout.whole_model()
    if whole is not None:
        whole.eval()
    return LoopResult(step, tokens_total, seconds, last_loss, evaluation, tokens_per_s, mfu, peak_memory, start_memory,
                      peak_flops=peak, model=whole)


def _rounded(numbers: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in numbers.items()}
