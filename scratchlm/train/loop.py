"""Pretraining: next-token prediction on token shards.

    for each step:  (micro_batch x seq_len tokens) x grad_accum micro-steps on each rank
                    -> clip gradients -> AdamW step with the scheduled learning rate
                    -> log; every eval_every steps: validation loss and bits per byte
                    -> every checkpoint_every steps: checkpoint (weights, optimizer, data
                       position, RNG), so that --resume continues bit-identically on CPU

The data stream is read sequentially: step s, micro-step m, rank r reads the window starting at
`(s * accum * world + m * world + r) * micro_batch * seq_len`, so the data position is the
step number and a resumed or distributed run reads exactly what an uninterrupted single
process would.

Continued pretraining (`init_from`): the run starts from a trained model's weights and
architecture instead of a fresh one, on shards made with that model's tokenizer, and logs the
validation loss at step 0 so the report shows where it started.
"""

import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from scratchlm.data.shards import TokenShards
from scratchlm.errors import ConfigError, InputFileError, TrainingError
from scratchlm.model import GPT, ModelConfig, count_params, flops_per_token, get_preset
from scratchlm.tokenizer import Tokenizer, load_tokenizer
from scratchlm.tokenizer.tokens import token_byte_lengths
from scratchlm.train.checkpoint import resume_checkpoint, save_checkpoint, set_latest
from scratchlm.train.config import TrainConfig
from scratchlm.train.distributed import DistInfo, init_distributed, mean_across_ranks, shutdown
from scratchlm.train.metrics import MetricsLog, plot_loss_curve, read_metrics
from scratchlm.train.optim import build_optimizer, lr_multiplier
from scratchlm.devices import autocast_dtype, parse_device, peak_flops, resolve_device
from scratchlm.model.folder import save_model_folder
from scratchlm.train.runfolder import start_evaluation, write_report


SPIKE_FACTOR = 1.5


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


# ---- model sizing ---------------------------------------------------------------------
def choose_model(config: TrainConfig, vocab_size: int) -> ModelConfig:
    """The preset named by the config, or for "auto" a CPU preset sized to the time budget.
    At 2 minutes on 2 cores cpu-tiny beat cpu-small and cpu-base (docs/benchmarks.md); longer
    budgets afford more parameters (Chinchilla: N grows with the square root of compute)."""
    if config.model == "auto":
        seconds = config.max_seconds or 600.0
        name = "cpu-tiny" if seconds <= 600 else "cpu-small" if seconds <= 3600 else "cpu-base"
        base = get_preset(name)
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
    from scratchlm.interop import load_pretrained

    model, tokenizer = load_pretrained(config.init_from, device)
    check_same_vocabulary(shards_tokenizer, tokenizer, shards, config.init_from)
    model_config = init_model_config(config, model.config)
    if model_config != model.config:  # dropout lives in the modules: rebuild, keep the weights
        rebuilt = GPT(model_config).to(device)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    return model, tokenizer


def check_same_vocabulary(shards_tokenizer: Tokenizer, model_tokenizer: Tokenizer, shards: TokenShards, model_path: str) -> None:
    """Shards are ids; they mean the same text to the model only if both tokenizers map the same
    byte sequences and special tokens to the same ids (names and metadata may differ)."""
    if shards_tokenizer.ranks == model_tokenizer.ranks and shards_tokenizer.special_tokens == model_tokenizer.special_tokens:
        return
    ours, theirs = len(shards_tokenizer.ranks), len(model_tokenizer.ranks)
    if ours != theirs:
        what = f"a {ours}-token vocabulary, the model's has {theirs}"
    elif shards_tokenizer.ranks != model_tokenizer.ranks:
        what = f"{ours} tokens like the model's, but not the same tokens at the same ids"
    else:
        what = f"special tokens {shards_tokenizer.special_tokens} vs {model_tokenizer.special_tokens}"
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
    model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch: int, byte_lengths: np.ndarray,
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
            logits, _ = model(x)
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
    info = init_distributed(parse_device(config.device))  # "cuda:0" too is a GPU: NCCL, not gloo
    try:
        return _train(run_dir, shards, tokenizer, config, info, val_text, resume, progress)
    finally:
        shutdown(info)


def _shard_tokenizer(data: Path, shards: TokenShards) -> Tokenizer:
    path = data / "tokenizer.json"
    if not path.is_file():
        raise InputFileError(f"{data}: no tokenizer.json beside the shards (scratchlm data tokenize writes one)")
    tokenizer = load_tokenizer(path)
    shards.check_tokenizer(tokenizer)
    return tokenizer


def _train(run_dir: Path, shards: TokenShards, tokenizer: Tokenizer, config: TrainConfig, info: DistInfo,
           val_text: str | Path | None, resume: bool, progress: bool) -> RunSummary:
    device = resolve_device(config.device, info.local_rank)
    amp = autocast_dtype(device, config.dtype)
    init_model = None
    if config.init_from is not None:
        # On resume too: its config and tokenizer; the checkpoint's weights then replace its own.
        init_model, tokenizer = load_init_model(config, tokenizer, shards, device)
    model_config = init_model.config if init_model is not None else choose_model(config, tokenizer.vocab_size)
    seq_len = training_seq_len(config, model_config)
    train_tokens = shards.tokens("train")
    if train_tokens < seq_len + 1:
        raise InputFileError(f"{shards.path}: train split has {train_tokens} tokens, fewer than one context window ({seq_len + 1})")
    val_tokens = _validation_tokens(shards, tokenizer, val_text, seq_len, config.eval_tokens)

    per_micro = config.micro_batch * seq_len
    target = config.batch_tokens or per_micro * info.world
    accum = max(1, round(target / (per_micro * info.world)))
    tokens_per_step = accum * per_micro * info.world

    if info.is_main:
        _prepare_run_dir(run_dir, resume)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = init_model if init_model is not None else GPT(model_config).to(device)
    optimizer = build_optimizer(model, config, device)
    step, elapsed_before, resumed_scaler = 0, 0.0, None
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=info.is_main)
    if resume:
        checkpoint, state, passed_over = resume_checkpoint(run_dir, model, model_config.to_dict())
        if passed_over and info.is_main:
            print(f"scratchlm: warning: {'; '.join(passed_over)}; resuming from {checkpoint}", file=sys.stderr, flush=True)
            set_latest(checkpoint)  # so that `latest` never names the damaged one while it is replaced
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError:  # torch's message is about parameter groups; the cause is the optimizer setting
            raise ConfigError(f"{checkpoint}: the saved optimizer state does not fit optimizer={config.optimizer!r}; "
                              "resume with the optimizer the run started with") from None
        step, elapsed_before = state["step"], state["elapsed"]
        torch.set_rng_state(state["rng_cpu"])
        random.setstate(state["rng_python"])
        if device.type == "cuda" and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        resumed_scaler = state.get("scaler")
        metrics.truncate_after(step)
    train_model: torch.nn.Module = model
    if config.activation_checkpointing:
        from scratchlm.train.wrap import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    if config.compile:
        train_model = torch.compile(model)
    if info.enabled:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    params = count_params(model_config)
    flops_tok = flops_per_token(model_config, seq_len)
    peak = peak_flops(device) if info.is_main else None
    byte_lengths = token_byte_lengths(tokenizer, model_config.vocab_size)
    max_seconds = config.max_seconds
    max_steps = _max_steps(config, tokens_per_step)
    if info.is_main:
        _write_run_config(run_dir, config, model_config, shards, tokens_per_step, accum, info)
    if config.init_from is not None and step == 0:  # where the loaded model starts on this data
        start_loss, start_bpb = evaluate(model, val_tokens, seq_len, config.micro_batch, byte_lengths, device, amp)
        metrics.write({"step": 0, "val_loss": round(start_loss, 5), "val_bpb": round(start_bpb, 5)})

    bar = tqdm(
        total=max_steps if max_steps else int(max_seconds), initial=step if max_steps else int(elapsed_before),
        unit="step" if max_steps else "s", desc="pretraining", disable=not (progress and info.is_main), dynamic_ncols=True,
    )
    start = time.perf_counter() - elapsed_before
    nonfinite = 0
    # float16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    if resume and resumed_scaler:
        scaler.load_state_dict(resumed_scaler)
    loss_ema = None  # for spike detection
    last_loss = val_loss = val_bpb = None
    window_tokens, window_seconds = 0, 0.0  # throughput counts training steps only, not evals
    tokens_per_s, mfu = 0.0, None
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        if _is_last(step, elapsed, max_steps, max_seconds):
            break
        step_start = time.perf_counter()
        progress_fraction = _progress(step, elapsed, max_steps, max_seconds)
        factor = lr_multiplier(step, progress_fraction, config)
        lr = config.lr * factor
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss_sum = 0.0
        for micro in range(accum):
            x, y = _batch(shards, step, micro, accum, info, config.micro_batch, seq_len, device)
            sync = nullcontext() if not info.enabled or micro == accum - 1 else train_model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                    _, loss = train_model(x, y)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.item()
        loss_value = mean_across_ranks(loss_sum / accum, info, device)
        if not math.isfinite(loss_value):
            nonfinite += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1  # a skipped step still counts, and its row is numbered like any other
            metrics.write({"step": step, "nonfinite": True, "lr": lr})
            if nonfinite >= config.max_nonfinite:
                raise TrainingError(f"loss was not finite for {nonfinite} steps in a row (step {step}); lower the learning rate (lr={config.lr})")
            continue
        nonfinite = 0
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step += 1
        last_loss = loss_value
        # A spike: the loss jumps well above its recent average after warmup. Logged, not fatal.
        spike = loss_ema is not None and step > config.warmup_steps and loss_value > SPIKE_FACTOR * loss_ema
        loss_ema = loss_value if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_value
        window_tokens += tokens_per_step
        window_seconds += time.perf_counter() - step_start

        last = _is_last(step, time.perf_counter() - start, max_steps, max_seconds)
        row = None
        if step % config.log_every == 0 or step == 1 or last:
            tokens_per_s = window_tokens / max(window_seconds, 1e-9)
            window_tokens, window_seconds = 0, 0.0
            mfu = flops_tok * tokens_per_s / peak if peak else None
            row = {"step": step, "loss": round(loss_value, 5), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                   "tokens_per_s": round(tokens_per_s, 1), "tokens": step * tokens_per_step,
                   "elapsed": round(time.perf_counter() - start, 2)}
            if mfu is not None:
                row["mfu"] = round(mfu, 4)
        if spike:
            row = (row or {"step": step, "loss": round(loss_value, 5)}) | {"spike": True}
            if info.is_main:
                bar.write(f"loss spike at step {step}: {loss_value:.3f} against a recent average of {loss_ema:.3f}")
        if step % config.eval_every == 0 or last:
            val_loss, val_bpb = evaluate(model, val_tokens, seq_len, config.micro_batch, byte_lengths, device, amp)
            row = (row or {"step": step}) | {"val_loss": round(val_loss, 5), "val_bpb": round(val_bpb, 5)}
        if row is not None:
            metrics.write(row)
            bar.set_postfix({k: row[k] for k in ("loss", "val_bpb") if k in row} | {"tok/s": f"{tokens_per_s:,.0f}"} | ({"mfu": f"{mfu:.1%}"} if mfu else {}))
        if info.is_main and (last or (config.checkpoint_every and step % config.checkpoint_every == 0)):
            metrics.sync()  # the log holds every row up to the checkpoint, even after a power cut
            save_checkpoint(run_dir, step, model, {
                "optimizer": optimizer.state_dict(), "step": step, "elapsed": time.perf_counter() - start,
                "rng_cpu": torch.get_rng_state(), "rng_python": random.getstate(),
                "rng_cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "scaler": scaler.state_dict(), "model_config": model_config.to_dict(), "tokens_per_step": tokens_per_step,
            })
        bar.update(1 if max_steps else int(time.perf_counter() - start) - bar.n)
        if last:
            break
    bar.close()
    seconds = time.perf_counter() - start
    summary = RunSummary(run_dir, step, step * tokens_per_step, seconds, params, last_loss, val_loss, val_bpb,
                         tokens_per_s, mfu)
    if info.is_main:
        save_model_folder(run_dir / "model", model, tokenizer)
        summary.samples = _samples(model, tokenizer, config)
        rows = read_metrics(run_dir / "metrics.jsonl")
        start_row = start_evaluation(rows) if config.init_from is not None else None
        if start_row:
            summary.start_val_loss, summary.start_val_bpb = start_row["val_loss"], start_row["val_bpb"]
        plot_loss_curve(rows, run_dir / "loss.png", title=f"{run_dir.name}: {params / 1e6:.2f}M parameters")
        write_report(run_dir, summary, config, model_config, shards, rows)
    return summary


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


def _batch(shards: TokenShards, step: int, micro: int, accum: int, info: DistInfo, batch: int, seq_len: int, device: torch.device):
    window = batch * seq_len
    start = ((step * accum + micro) * info.world + info.rank) * window
    data = torch.from_numpy(shards.read("train", start, window + 1))
    x = data[:-1].view(batch, seq_len)
    y = data[1:].view(batch, seq_len)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _max_steps(config: TrainConfig, tokens_per_step: int) -> int | None:
    limits = [config.max_steps] if config.max_steps else []
    if config.max_tokens:
        limits.append(-(-config.max_tokens // tokens_per_step))
    return min(limits) if limits else None


def _progress(step: int, elapsed: float, max_steps: int | None, max_seconds: float | None) -> float:
    """How far through the budget the run is, in [0, 1]: steps when the budget is in steps or
    tokens, wall-clock when it is in time (whichever is further along when both are set)."""
    fractions = []
    if max_steps:
        fractions.append(step / max_steps)
    if max_seconds:
        fractions.append(elapsed / max_seconds)
    return min(1.0, max(fractions)) if fractions else 0.0


def _is_last(step: int, elapsed: float, max_steps: int | None, max_seconds: float | None) -> bool:
    return bool((max_steps and step >= max_steps) or (max_seconds and elapsed >= max_seconds))


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
