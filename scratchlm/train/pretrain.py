"""Pretraining: next-token prediction on token shards, as a task of the one training loop
(`scratchlm.train.loop`), which steps, logs, evaluates, checkpoints and resumes it.

The data stream is read sequentially: micro-batch number i (step s, micro-step m, rank r:
i = (s * accum + m) * world + r) is the window of micro_batch x seq_len tokens starting at
i * micro_batch * seq_len, so the data position is the step number and a resumed or
distributed run reads exactly what an uninterrupted single process would. The evaluation hook
measures validation loss and bits per byte every eval_every steps.

Continued pretraining (`init_from`): the run starts from a trained model's weights and
architecture instead of a fresh one, on shards made with that model's tokenizer, and logs the
validation loss at step 0 so the report shows where it started.
"""

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scratchlm.data.shards import TokenShards
from scratchlm.devices import PeakFlops
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.model import GPT, ModelConfig, count_params, flops_per_token, get_preset
from scratchlm.tokenizer import Tokenizer, load_tokenizer
from scratchlm.tokenizer.tokens import token_byte_lengths, vocabulary_difference
from scratchlm.train.config import TrainConfig
from scratchlm.train.distributed import DistInfo, process_group
from scratchlm.train.loop import LoopConfig, Run, StepOutput, train_loop
from scratchlm.train.metrics import MetricsLog, plot_loss_curve, read_metrics
from scratchlm.train.optim import build_optimizer, lr_multiplier
from scratchlm.train.parallel import Pipeline, whole_tensor
from scratchlm.devices import autocast_dtype, resolve_device
from scratchlm.model.folder import save_model_folder
from scratchlm.train.runfolder import start_evaluation, write_report



@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    tokens: int
    seconds: float
    params: int
    final_loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    tokens_per_s: float = 0.0
    mfu: float | None = None
    samples: list[str] = field(default_factory=list)
    start_val_loss: float | None = None  # before the first step, for runs with init_from
    start_val_bpb: float | None = None
    peak_memory_mb: float = 0.0
    peak_flops: PeakFlops | None = None  # what MFU is a share of
    layout: str = "1 process"  # how the run was spread over torchrun's processes


# ---- model sizing ---------------------------------------------------------------------
# A corpus of fewer training tokens than this per second of a short budget is seen many times
# over (cpu-tiny reads 30-50k tokens/s on 2 cores: 10+ epochs), and then a larger model uses it
# better: on 2 cores in 2 minutes cpu-small at context 128 beat cpu-tiny on three books of
# 175k-360k tokens (1,500-3,000 per second of budget), and lost on the embedded corpus's 537k
# (4,500). docs/benchmarks.md has the runs.
SMALL_CORPUS_TOKENS_PER_SECOND = 4000


def choose_model(config: TrainConfig, vocab_size: int, train_tokens: int | None = None) -> ModelConfig:
    """The preset named by the config, or for "auto" a CPU preset sized to the time budget and
    the corpus. Up to 10 minutes, cpu-tiny (more steps beat more parameters: docs/benchmarks.md),
    or cpu-small at context 128 when the corpus is small for the budget (`train_tokens` fewer
    than SMALL_CORPUS_TOKENS_PER_SECOND per second); longer budgets afford more parameters
    (Chinchilla: N grows with the square root of compute)."""
    if config.model == "auto":
        seconds = config.max_seconds or 600.0
        name = "cpu-tiny" if seconds <= 600 else "cpu-small" if seconds <= 3600 else "cpu-base"
        base = get_preset(name)
        if name == "cpu-tiny" and train_tokens is not None and train_tokens < SMALL_CORPUS_TOKENS_PER_SECOND * seconds:
            base = get_preset("cpu-small").replace(block_size=base.block_size)
    else:
        base = get_preset(config.model)
    padded_vocab = -(-vocab_size // 64) * 64
    model_config = base.replace(vocab_size=padded_vocab)
    if config.model_config:
        model_config = model_config.replace(**config.model_config)
    if config.seq_len:
        model_config = model_config.replace(block_size=config.seq_len)
    if model_config.vocab_size < vocab_size:
        raise ConfigError(f"model vocab_size {model_config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return model_config


# ---- continued pretraining: starting from a model -------------------------------------
# Fields a run with init_from may change: they change neither the weights' shapes nor what
# the weights compute at inference. Others that keep shapes (mlp, rope_base, norm_eps) would
# silently turn the loaded weights into a different function, so they are refused too.
INIT_OVERRIDABLE = frozenset({"dropout"})


def init_model_config(config: TrainConfig, loaded: ModelConfig) -> ModelConfig:
    """The architecture of a run that starts from a model with architecture `loaded`: that one,
    with the run's dropout. Any other model_config key must repeat the loaded value."""
    changed = loaded.replace(**config.model_config)
    for key in config.model_config:
        if key not in INIT_OVERRIDABLE and getattr(changed, key) != getattr(loaded, key):
            hint = "; set seq_len for shorter training windows" if key == "block_size" else ""
            raise ConfigError(f"model_config.{key}={getattr(changed, key)!r} conflicts with init_from: the architecture "
                              f"comes from {config.init_from} ({key}={getattr(loaded, key)!r}); only "
                              f"{', '.join(sorted(INIT_OVERRIDABLE))} may be set{hint}")
    return changed


def training_seq_len(config: TrainConfig, model_config: ModelConfig) -> int:
    """Tokens per training window. A loaded model keeps its full context (block_size): shorter
    windows train every weight but the learned position rows past seq_len, which stay as they
    were, and the rotary tables are sized from block_size; so the model is not cut down to seq_len."""
    if config.init_from is None:
        return model_config.block_size  # choose_model already made block_size = seq_len
    if config.seq_len is None:
        return model_config.block_size
    if config.seq_len > model_config.block_size:
        raise ConfigError(f"seq_len {config.seq_len} is longer than the context of {config.init_from} ({model_config.block_size} tokens)")
    return config.seq_len


def load_init_model(config: TrainConfig, shards_tokenizer: Tokenizer, shards: TokenShards, device: torch.device) -> tuple[GPT, Tokenizer]:
    """The model named by `config.init_from` on `device`, with the run's dropout, and its own
    tokenizer (which keeps its chat template and BOS/EOS metadata for the final model folder)."""
    from scratchlm.interop import open_model
    from scratchlm.model.quantize import require_float

    opened = open_model(config.init_from, device, kind="language-model")
    model, tokenizer = opened.model, opened.tokenizer
    require_float(model, config.init_from, "training")
    check_same_vocabulary(shards_tokenizer, tokenizer, shards, config.init_from)
    model_config = init_model_config(config, model.config)
    if model_config != model.config:  # dropout lives in the modules: rebuild, keep the weights
        rebuilt = GPT(model_config).to(device)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    return model, tokenizer


def check_same_vocabulary(shards_tokenizer: Tokenizer, model_tokenizer: Tokenizer, shards: TokenShards, model_path: str) -> None:
    """Shards are ids; they mean the same text to the model only if both tokenizers give the same
    ids (`vocabulary_difference`; names and metadata may differ)."""
    what = vocabulary_difference(shards_tokenizer, model_tokenizer)
    if what is None:
        return
    data, source = shards.path, _tokenizer_source(Path(model_path))
    inputs = "" if shards.manifest.get("source") == "embedded corpus" else " --input CORPUS"
    raise InputFileError(f"{data}: the shards were made with a different tokenizer than {model_path} ({what}); tokenize "
                         f"the corpus with the model's tokenizer: scratchlm data tokenize{inputs} --tokenizer {source} "
                         f"--out {data.with_name(data.name + '-' + _model_name(Path(model_path)))}")


def _tokenizer_source(model_path: Path) -> Path:
    """What `scratchlm data tokenize --tokenizer` reads for this model: a GGUF file itself, else
    the tokenizer.json of the model folder (a run folder's model/, a checkpoint's run)."""
    if model_path.is_dir():
        for candidate in (model_path / "model" / "tokenizer.json", model_path / "tokenizer.json",
                          model_path.parent.parent / "model" / "tokenizer.json"):
            if candidate.is_file():
                return candidate
    return model_path


def _model_name(model_path: Path) -> str:
    return model_path.stem if model_path.is_file() else model_path.resolve().name


# ---- evaluation -----------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: "torch.nn.Module | Pipeline", tokens: np.ndarray, seq_len: int, batch: int, byte_lengths: np.ndarray,
    device: torch.device, amp: torch.dtype | None,
) -> tuple[float, float]:
    """Mean loss in nats per token and bits per byte over non-overlapping windows of `tokens`.
    Bits per byte = total nats over non-special targets / (ln 2 * their UTF-8 bytes): it does
    not depend on the tokenizer, so models with different vocabularies compare fairly."""
    was_training = model.training
    model.eval()
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise InputFileError(f"validation text has {len(tokens)} tokens, fewer than one context window ({seq_len + 1})")
    total_nats, total_tokens, bpb_nats, total_bytes = 0.0, 0, 0.0, 0
    lengths = torch.from_numpy(byte_lengths).to(device)
    for first in range(0, windows, batch):
        n = min(batch, windows - first)
        chunk = torch.from_numpy(tokens[first * seq_len : (first + n) * seq_len + 1].astype(np.int64))
        x = chunk[:-1].view(n, seq_len).to(device)
        y = chunk[1:].view(n, seq_len).to(device)
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            if isinstance(model, Pipeline):  # the last stage computes them, every stage gets them
                nats = model.token_nats(x, y)
            else:
                logits = whole_tensor(model(x)[0])
                nats = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="none")
        total_nats += nats.sum().item()
        total_tokens += nats.numel()
        nbytes = lengths[y.view(-1)]
        bpb_nats += (nats * (nbytes > 0)).sum().item()
        total_bytes += nbytes.sum().item()
    if was_training:
        model.train()
    return total_nats / total_tokens, bpb_nats / (math.log(2) * max(total_bytes, 1))


# ---- the loop -------------------------------------------------------------------------
def pretrain(
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    val_text: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Train a model on the shard folder `data`, writing the run folder `out`: from scratch, or
    from the weights of `config.init_from` (continued pretraining)."""
    run_dir = Path(out)
    shards = TokenShards.open(data)
    tokenizer = _shard_tokenizer(Path(data), shards)
    with process_group(config.device, config.parallel) as info:
        return _train(run_dir, shards, tokenizer, config, info, val_text, resume, progress)


def _shard_tokenizer(data: Path, shards: TokenShards) -> Tokenizer:
    path = data / "tokenizer.json"
    if not path.is_file():
        raise InputFileError(f"{data}: no tokenizer.json beside the shards (scratchlm data tokenize writes one)")
    tokenizer = load_tokenizer(path)
    shards.check_tokenizer(tokenizer)
    return tokenizer


@dataclass
class PretrainTask:
    """Next-token prediction on the train split, read sequentially: micro-batch `index` is the
    window of micro_batch x seq_len tokens (+1 for the targets) starting at index x window."""

    shards: TokenShards
    micro_batch: int
    seq_len: int
    device: torch.device

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.micro_batch * self.seq_len
        data = torch.from_numpy(self.shards.read("train", index * window, window + 1))
        x = data[:-1].view(self.micro_batch, self.seq_len)
        y = data[1:].view(self.micro_batch, self.seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def step(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutput:
        x, y = batch
        _, loss = model(x, y)
        return StepOutput(loss, tokens=x.numel())


def _train(run_dir: Path, shards: TokenShards, tokenizer: Tokenizer, config: TrainConfig, info: DistInfo,
           val_text: str | Path | None, resume: bool, progress: bool) -> RunSummary:
    device = resolve_device(config.device, info.local_rank)
    amp = autocast_dtype(device, config.dtype)
    init_model = None
    if config.init_from is not None:
        # On resume too: its config and tokenizer; the checkpoint's weights then replace its own.
        init_model, tokenizer = load_init_model(config, tokenizer, shards, device)
    train_tokens = shards.tokens("train")
    model_config = init_model.config if init_model is not None else choose_model(config, tokenizer.vocab_size, train_tokens)
    seq_len = training_seq_len(config, model_config)
    if train_tokens < seq_len + 1:
        raise InputFileError(f"{shards.path}: train split has {train_tokens} tokens, fewer than one context window ({seq_len + 1})")
    val_tokens = _validation_tokens(shards, tokenizer, val_text, seq_len, config.eval_tokens)

    # Each data-parallel rank reads its own micro-batches; tensor-parallel and pipeline ranks share theirs.
    dp = config.parallel.degrees(info.world).dp
    per_micro = config.micro_batch * seq_len
    target = config.batch_tokens or per_micro * dp
    accum = max(1, round(target / (per_micro * dp)))
    tokens_per_step = accum * per_micro * dp

    if info.is_main:
        _prepare_run_dir(run_dir, resume)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = init_model if init_model is not None else GPT(model_config).to(device)
    params = count_params(model_config)
    byte_lengths = token_byte_lengths(tokenizer, model_config.vocab_size)
    if info.is_main:
        _write_run_config(run_dir, config, model_config, shards, tokens_per_step, accum, info)
    loop_config = LoopConfig(
        lr=config.lr, schedule=lambda step, progress: lr_multiplier(step, progress, config),
        max_steps=_max_steps(config, tokens_per_step), max_seconds=config.max_seconds, grad_accum=accum,
        grad_clip=config.grad_clip, dtype=config.dtype, log_every=config.log_every, eval_every=config.eval_every,
        evaluate_at_start=config.init_from is not None, checkpoint_every=config.checkpoint_every, checkpoint_at_end=True,
        max_nonfinite=config.max_nonfinite, spike_after=config.warmup_steps, compile=config.compile,
        activation_checkpointing=config.activation_checkpointing, parallel=config.parallel, loss_parallel=True,
        flops_per_token=flops_per_token(model_config, seq_len),
        desc="pretraining", progress=progress,
    )
    run = Run(run_dir, device, info, resume, identity=model_config.to_dict(),
              checkpoint_extra={"tokens_per_step": tokens_per_step}, tokenizer=tokenizer)

    def validation(m: torch.nn.Module) -> dict[str, float]:
        loss, bpb = evaluate(m, val_tokens, seq_len, config.micro_batch, byte_lengths, device, amp)
        return {"val_loss": loss, "val_bpb": bpb}

    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=info.is_main)
    task = PretrainTask(shards, config.micro_batch, seq_len, device)
    result = train_loop(model, lambda m: build_optimizer(m, config, device), task, loop_config, run, metrics,
                        evaluate=validation)
    summary = RunSummary(run_dir, result.steps, result.tokens, result.seconds, params, result.final_loss,
                         result.evaluation.get("val_loss"), result.evaluation.get("val_bpb"), result.tokens_per_s,
                         result.mfu, peak_memory_mb=result.peak_memory_mb, peak_flops=result.peak_flops,
                         layout=_layout_text(config, info))
    if info.is_main:
        model = result.model  # whole again: shards gathered, pipeline stages collected
        save_model_folder(run_dir / "model", model, tokenizer)
        summary.samples = _samples(model, tokenizer, config)
        rows = read_metrics(run_dir / "metrics.jsonl")
        start_row = start_evaluation(rows) if config.init_from is not None else None
        if start_row:
            summary.start_val_loss, summary.start_val_bpb = start_row["val_loss"], start_row["val_bpb"]
        plot_loss_curve(rows, run_dir / "loss.png", title=f"{run_dir.name}: {params / 1e6:.2f}M parameters")
        write_report(run_dir, summary, config, model_config, shards, rows)
    return summary


def _layout_text(config: TrainConfig, info: DistInfo) -> str:
    """"1 process", or e.g. "4 processes: dp_shard=2, tp=2, FSDP2", for the report."""
    if info.world == 1:
        return "1 process" + (", FSDP2" if config.parallel.fsdp else "")
    fsdp = ", FSDP2" if config.parallel.fsdp else ""
    return f"{info.world} processes: {config.parallel.degrees(info.world).describe()}{fsdp}"


def _validation_tokens(shards: TokenShards, tokenizer: Tokenizer, val_text: str | Path | None, seq_len: int, limit: int) -> np.ndarray:
    if val_text is not None:
        from scratchlm.text.reading import read_text

        text, _ = read_text(val_text)
        tokens = np.asarray(tokenizer.encode_ordinary(text), dtype=np.int64)
        where = str(val_text)
    else:
        available = shards.tokens("val")
        tokens = shards.read("val", 0, min(available, limit + 1)) if available else np.zeros(0, np.int64)
        where = f"{shards.path} (val split)"
    if len(tokens) < seq_len + 1:
        raise InputFileError(f"{where}: {len(tokens)} validation tokens, fewer than one context window ({seq_len + 1}); give more text or a shorter seq_len")
    return tokens[: limit + 1]


def _max_steps(config: TrainConfig, tokens_per_step: int) -> int | None:
    limits = [config.max_steps] if config.max_steps else []
    if config.max_tokens:
        limits.append(-(-config.max_tokens // tokens_per_step))
    return min(limits) if limits else None


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)


def _write_run_config(run_dir: Path, config: TrainConfig, model_config: ModelConfig, shards: TokenShards, tokens_per_step: int, accum: int, info: DistInfo) -> None:
    import json

    from scratchlm.atomic_io import write_text_atomic

    write_text_atomic(run_dir / "config.json", json.dumps({
        "train": config.to_dict(), "model": model_config.to_dict(), "data": str(shards.path),
        "tokens_per_step": tokens_per_step, "grad_accum": accum, "world_size": info.world,
    }, indent=2) + "\n")


def _samples(model: GPT, tokenizer: Tokenizer, config: TrainConfig) -> list[str]:
    sampling = config.sampling()
    if sampling is None:
        return []
    from scratchlm.model.sampling import generate_text

    return [config.sample_prompt + text for text in generate_text(model, tokenizer, config.sample_prompt, sampling)]
