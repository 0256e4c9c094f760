"""What every fine-tuning method shares: classification, instruction SFT and DPO.

A method brings two things: a stream of batches (`batches(generator)` yields one epoch's
batches in an order drawn from `generator`) and a step function that turns a batch into a loss
(`step(model, batch) -> StepOutput`, with what to log beside it). `finetune_loop` hands them to
the one training loop of the project (`scratchlm.train.loop`, which pretraining runs through
too) with what fine-tuning adds: which parameters train (`prepare_trainable`: everything, a
freeze, or LoRA), AdamW with weight decay on matrices only, linear warmup then cosine decay over
a budget counted in epochs. Checkpoints, exact resume, the non-finite policy, metrics,
throughput and peak memory come from the loop. The settings (`FinetuneConfig`) live in
`config.py`, which imports no torch, for the command line.

    config = FinetuneConfig(lora=True, lr=1e-3, epochs=2)
    lora = prepare_trainable(model, config)
    result = finetune_loop(model, batches, step, config, run=Run(out, device), metrics=MetricsLog(out / "metrics.jsonl"))
"""

import math
import os
import random
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch import nn

from scratchlm.devices import resolve_device
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.finetune.config import DEFAULT_TARGETS, FinetuneConfig, FreezeSpec, LoRAConfig, parse_freeze
from scratchlm.finetune.lora import apply_lora, merge_lora, save_adapter, target_matches
from scratchlm.finetune.records import RecordReport
from scratchlm.model.folder import save_model_folder
from scratchlm.model.model import GPT
from scratchlm.model.quantize import require_float
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.distributed import DistInfo
from scratchlm.train.loop import LoopConfig, LoopResult, Run, StepOutput, train_loop
from scratchlm.train.metrics import MetricsLog, plot_loss_curve, read_metrics

B = TypeVar("B")
T = TypeVar("T")
C = TypeVar("C", bound=FinetuneConfig)


# ---- what trains ---------------------------------------------------------------------------
def apply_freeze(model: nn.Module, spec: FreezeSpec) -> nn.Module:
    """Set requires_grad per `spec`, in place, on our GPT or a model built on its modules (the
    classifier): anything with `embed`, `pos_embed` and `blocks`. What is not frozen trains: the
    final norm, and a head unless it is tied to the frozen token embedding (one matrix)."""
    model.requires_grad_(True)
    if spec.kind in ("embeddings", "all-but-last"):
        model.embed.requires_grad_(False)
        if model.pos_embed is not None:
            model.pos_embed.requires_grad_(False)
    if spec.kind == "all-but-last":
        n = len(model.blocks)
        if spec.last_blocks > n:
            raise ConfigError(f"freeze all-but-last:{spec.last_blocks}: the model has only {n} blocks")
        for block in model.blocks[: n - spec.last_blocks]:
            block.requires_grad_(False)
    return model


def default_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """Every block's linear layers (those of DEFAULT_TARGETS the model has: a GELU MLP has no
    gate), plus the language-model head when it is untied from the token embedding. The chat template's end-of-turn token never occurs in pretraining text, so
    its output row is untrained: with a frozen head the model cannot learn to end an answer.
    Measured on the quickstart model (docs/benchmarks.md): adapting the head too took held-out
    answer loss after SFT from 3.85 to 3.57, and the answers stop instead of running on. A
    tied head is one matrix with the embedding, which LoRA cannot adapt alone (`lora.py`)."""
    head, embed = getattr(model, "head", None), getattr(model, "embed", None)
    untied = isinstance(head, nn.Linear) and embed is not None and head.weight is not embed.weight
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    present = tuple(t for t in DEFAULT_TARGETS if any(target_matches(name, t) for name in linears))
    return (*present, "head") if untied else present


def prepare_trainable(model: nn.Module, config: FinetuneConfig) -> LoRAConfig | None:
    """LoRA adapters (every base weight frozen) or `config.freeze` applied to `model`, in place.
    Returns the LoRA config when adapters were added, for `save_adapter`."""
    if config.lora:
        lora = config.lora_config(default_lora_targets(model))
        apply_lora(model, lora)
        config.lora_targets = ",".join(lora.targets)  # "auto" resolved, for the report and results.json
        return lora
    apply_freeze(model, parse_freeze(config.freeze))
    return None


BIG_MODEL_PARAMS = 50e6


def with_default_lr(config: C, full: float, lora: float, model: nn.Module) -> C:
    """`config` with its lr set by `default_lr` for `model` when it is None (the user gave none)."""
    if config.lr is not None:
        return config
    return replace(config, lr=default_lr(full, lora, config.lora, sum(p.numel() for p in model.parameters())))


def default_lr(full: float, lora: float, use_lora: bool, params: int) -> float:
    """A method's default peak learning rate: `lora` with adapters (they start from a zero
    update and train few numbers), else `full`; a tenth of it for a model of 50M parameters or
    more. The base rates are tuned on the quickstart model (a few hundred thousand parameters);
    pretrained models of 100M+ parameters are fine-tuned with rates about ten times lower, as
    the SmolLM2-135M runs in docs/benchmarks.md are."""
    base = lora if use_lora else full
    return base / 10 if params >= BIG_MODEL_PARAMS else base


def lr_factor(step: int, total: int, warmup_fraction: float, min_ratio: float) -> float:
    """Linear warmup over the first `warmup_fraction` of `total` steps, then cosine decay to
    `min_ratio`: early gradients (a fresh head, a new loss) are the largest, and warmup keeps
    them from wrecking the pretrained weights before the rest has settled."""
    warmup = int(total * warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def total_steps(config: FinetuneConfig, batches_per_epoch: int, world: int = 1) -> int:
    """Optimizer steps of a run: `max_steps`, or `epochs` passes of `grad_accum` batches a step
    on each of `world` processes (torchrun: each rank trains its own batches of every step)."""
    if batches_per_epoch < 1:
        raise ConfigError("nothing to train on: the training set gives no batch")
    return config.max_steps or math.ceil(batches_per_epoch * config.epochs / (config.grad_accum * world))


# ---- the loop ------------------------------------------------------------------------------
@dataclass
class Batches(Generic[B]):
    """A training set as batches: `epoch(generator)` yields one pass in a random order drawn
    from `generator`; `per_epoch` is how many batches one pass gives."""

    epoch: Callable[[torch.Generator], Iterable[B]]
    per_epoch: int


def shuffled_groups(n: int, size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Indices 0..n-1 in a random order, `size` at a time (the last group may be shorter)."""
    order = torch.randperm(n, generator=generator).tolist()
    return (order[i : i + size] for i in range(0, n, size))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class EpochTask(Generic[B]):
    """A data set counted in epochs as a task of the one training loop: micro-batch `index` is
    batch `index % per_epoch` of epoch `index // per_epoch`. The epochs' orders are drawn one
    after another from one generator seeded with `seed`, so a resumed run (which redraws the
    batches before its own) and an uninterrupted one see the same batches. The loop asks for
    increasing numbers, so the batches stream: one at a time is built and held, never an epoch."""

    def __init__(self, batches: Batches[B], step: Callable[[nn.Module, B], StepOutput], seed: int) -> None:
        self.batches, self.step_fn = batches, step
        self.generator = torch.Generator().manual_seed(seed)
        self.next_index, self.stream = 0, iter(())

    def batch(self, index: int) -> B:
        if index < self.next_index:
            raise ValueError(f"batch {index} asked for after batch {self.next_index - 1}: batches stream in order")
        while True:  # past the batches of other ranks, and before a resumed run's first step
            if self.next_index % self.batches.per_epoch == 0:
                self.stream = iter(self.batches.epoch(self.generator))
            found, self.next_index = next(self.stream), self.next_index + 1
            if self.next_index > index:
                return found

    def step(self, model: nn.Module, batch: B) -> StepOutput:
        return self.step_fn(model, batch)


def finetune_loop(
    model: nn.Module,
    batches: Batches[B],
    step: Callable[[nn.Module, B], StepOutput],
    config: FinetuneConfig,
    run: Run | None = None,
    metrics: MetricsLog | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    desc: str = "fine-tuning",
) -> LoopResult:
    """Train the parameters of `model` that require grad through the one training loop
    (`scratchlm.train.loop.train_loop`): AdamW with weight decay on matrices only, linear warmup
    then cosine decay over `total_steps`, a row in `metrics` per step. `step(model, batch)` gives
    a batch's loss under the module being trained. With `run` (a run folder) it checkpoints every
    `config.checkpoint_every` steps and resumes when `run.resume`; `evaluate(model)` runs before
    the first step and at the end. `on_step(n, row)` sees each step's row (n from 1)."""
    if config.lr is None:
        raise ConfigError("no learning rate: set lr, or let the method's run pick its default (default_lr)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    device = model_device(model)

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        trained = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in trained if p.dim() >= 2]  # no decay on norms' gains and biases
        no_decay = [p for p in trained if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95),
                                 fused=device.type == "cuda")

    total = total_steps(config, batches.per_epoch, config.parallel.degrees(run.info.world).dp if run is not None else 1)
    loop_config = LoopConfig(
        lr=config.lr, schedule=lambda n, _: lr_factor(n, total, config.warmup_fraction, config.min_lr_ratio),
        max_steps=total, grad_accum=config.grad_accum, grad_clip=config.grad_clip, dtype=config.dtype, log_every=1,
        evaluate_at_start=evaluate is not None, checkpoint_every=config.checkpoint_every if run is not None else None,
        max_nonfinite=config.max_nonfinite, spike_after=int(total * config.warmup_fraction),
        activation_checkpointing=config.activation_checkpointing, parallel=config.parallel, desc=desc, progress=progress,
    )
    if run is None:
        run = Run(Path(os.devnull), device)
    elif not run.identity:  # what a checkpoint must match: the method and every trainable tensor's shape
        run.identity = {"method": desc, **{name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}}
    on_row = None if on_step is None else (lambda row: on_step(row["step"], row) if "loss" in row else None)
    return train_loop(model, make_optimizer, EpochTask(batches, step, config.seed), loop_config, run,
                      metrics or MetricsLog(Path(os.devnull), enabled=False), evaluate, on_row)


# ---- run folders ---------------------------------------------------------------------------
def check_out(out: Path, force: bool) -> None:
    """Refuse a folder that already holds something, unless `force` (as pretrain refuses a
    folder holding a run): a second run would mix its metrics into the first one's. Called
    before anything is loaded, so the mistake costs no time."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; --out must be a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} is not empty; choose another --out or pass --force to overwrite")


def prepare_out(out: Path, force: bool) -> None:
    """`check_out`, then create the folder (with `force`, clearing the files a run appends to or
    writes only sometimes)."""
    check_out(out, force)
    for name in ("metrics.jsonl", "adapter.safetensors"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # another run's: resuming from them would mix two runs
    out.mkdir(parents=True, exist_ok=True)


def check_resumable(out: Path) -> None:
    """A run folder `--resume` can continue: one holding checkpoints."""
    if not (out / "checkpoints").is_dir():
        raise InputFileError(f"{out}: nothing to resume (no checkpoints/; runs checkpoint with --checkpoint-every N)")


@contextmanager
def run_folder(out: Path, force: bool, resume: bool = False, main: bool = True) -> Iterator[Path]:
    """`prepare_out` for the body of a run. If the run fails or is interrupted and the folder
    did not exist before, it is removed: a half-written run folder would look finished and
    block the rerun of the same command. A folder the user already had (--force) is left. With
    `resume`, the folder must hold the run's checkpoints, and is left as it is. Under torchrun
    only rank 0 (`main`) creates, clears and removes the folder; the other ranks write nothing."""
    if resume:
        check_resumable(out)
        yield out
        return
    if not main:
        yield out
        return
    existed = out.exists()
    prepare_out(out, force)
    try:
        yield out
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise


def split_off(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held-out): a seeded random `fraction` of `items` held out, both parts kept in
    their original order. Without an eval file a run still measures itself on data it never
    trained on."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"val fraction must be between 0 and 1 (exclusive), not {fraction}")
    n_held = round(len(items) * fraction)
    if n_held < 1 or n_held >= len(items):
        raise ConfigError(f"a val fraction of {fraction} of {len(items)} usable record{'' if len(items) == 1 else 's'} leaves "
                          "no held-out or no training example; give more data, another --val-fraction or an --eval file")
    held = set(random.Random(seed).sample(range(len(items)), n_held))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def load_splits(load: Callable[[Path], tuple[list[T], RecordReport]], data: Path, eval_path: Path | None,
                fraction: float, seed: int,
                split: Callable[[list[T], float, int], tuple[list[T], list[T]]] | None = None) -> tuple[list[T], list[T], list[RecordReport]]:
    """(train, held-out, reports): `eval_path` read with `load` when given, else a seeded
    `fraction` of `data` held out by `split` (default `split_off`). Both files are read and
    checked before any model loads, so bad data fails in seconds."""
    train, report = load(data)
    reports = [report]
    if eval_path is not None:
        held, eval_report = load(eval_path)
        reports.append(eval_report)
        return train, held, reports
    try:
        train, held = (split or split_off)(train, fraction, seed)
    except ConfigError as error:
        raise ConfigError(f"{report.summary(limit=1)}; {error}") from None
    return train, held, reports


def load_base(model_path: str | Path, out: Path, force: bool, resume: bool, device_name: str,
              reports: Sequence[RecordReport], say: Callable[[str], None],
              info: DistInfo = DistInfo()) -> tuple[GPT, Tokenizer, torch.device]:
    """How every method's run goes on once its data is read and checked: say what was read,
    refuse a run folder in use (unless resuming it), and load the base model, float32 on the
    config's device (under torchrun a bare "cuda" is this rank's GPU, `resolve_device`)."""
    from scratchlm.interop import open_model

    for report in reports:
        say(report.summary())
    if resume:  # both before the seconds a model takes to load
        check_resumable(out)
    else:
        check_out(out, force)
    device = resolve_device(device_name, info.local_rank)
    say(f"loading {model_path}")
    opened = open_model(model_path, device, kind="language-model")
    require_float(opened.model, model_path, "fine-tuning")
    return opened.model, opened.tokenizer, device


def save_finetuned(out: Path, model: GPT, tokenizer: Tokenizer, lora: LoRAConfig | None) -> Path:
    """Write the fine-tuned language model: with LoRA, first the adapter alone
    (out/adapter.safetensors, for `load_adapter` on the base model), then the model merged into
    plain weights as a model folder (out/model), which every command opens (chat, serve, eval,
    export, a further fine-tuning run)."""
    if lora is not None:
        save_adapter(out / "adapter.safetensors", model, lora)
        merge_lora(model)
    return save_model_folder(out / "model", model, tokenizer)


def write_loss_curve(out: Path, title: str) -> Path:
    """out/loss.png from out/metrics.jsonl."""
    return plot_loss_curve(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=title)
