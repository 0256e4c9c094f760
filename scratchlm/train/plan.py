"""`scratchlm plan`: size a model and a token count for a compute or time budget, or lay a
model out on a GPU cluster (`cluster_plan`; the estimates are in `memory.py`).

Chinchilla (Hoffmann et al. 2022): for a training compute C = 6 N D FLOPs, loss is lowest near
D = 20 N tokens, so N = sqrt(C / 120) and D = 20 N. For a time budget, C comes from this
machine's measured training throughput: a few real optimizer steps of a candidate preset on
random tokens, timed after a warm-up step.
"""

import math
import time
from dataclasses import dataclass

import torch

from scratchlm.errors import ConfigError
from scratchlm.model import GPT, PRESETS, ModelConfig, count_params, flops_per_token
from scratchlm.train.memory import Layout, layouts, tokens_per_second, usable_bytes

TOKENS_PER_PARAM = 20.0
SINGLE_MACHINE_PARAMS = 2e9  # the largest preset `plan --compute/--time` suggests
PROBE_PARAMS = {"cpu": 2e8}  # the largest preset timed on this device; bigger ones through it


@dataclass
class Plan:
    compute_flops: float
    optimal_params: float
    optimal_tokens: float
    preset: str
    preset_params: int
    tokens_for_preset: float  # 20 x the preset's parameters
    measured_flops_per_s: float | None  # of the suggested preset
    estimated_seconds: float | None  # to train the preset on tokens_for_preset
    budget_flops_per_s: float | None = None  # the probe that turned a time budget into FLOPs
    probed_preset: str | None = None  # the preset whose training was timed for measured_flops_per_s


def measure_flops_per_s(config: ModelConfig, micro_batch: int = 8, steps: int = 3, device: str = "cpu") -> float:
    """Achieved training FLOP/s of `config` here: forward, backward and AdamW on random tokens."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seq = min(config.block_size, 256 if device == "cpu" else config.block_size)
    x = torch.randint(0, config.vocab_size, (micro_batch, seq + 1), device=device)

    def step() -> None:
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel selection
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return flops_per_token(config, seq) * micro_batch * seq / seconds


def closest_preset(params: float, vocab_size: int | None = None, candidates: list[str] | None = None) -> str:
    names = candidates or list(PRESETS)

    def size(name: str) -> int:
        config = PRESETS[name] if vocab_size is None else PRESETS[name].replace(vocab_size=vocab_size)
        return count_params(config)

    return min(names, key=lambda n: abs(math.log(size(n) / params)))


def plan(
    compute_flops: float | None = None,
    seconds: float | None = None,
    vocab_size: int | None = None,
    device: str = "cpu",
    probe: bool = True,
) -> Plan:
    """Plan for a compute budget in FLOPs, or a wall-clock budget (measured on `device`)."""
    if (compute_flops is None) == (seconds is None):
        raise ConfigError("give exactly one budget: compute (FLOPs) or time")
    # One machine's budget: the multi-GPU presets (Llama-3 8B) would be timed by a probe here.
    candidates = [name for name in PRESETS if count_params(PRESETS[name]) <= SINGLE_MACHINE_PARAMS]
    micro_batch = 2 if device == "cpu" else 8  # keeps a probe of a 100M+ model to seconds on a CPU
    rate = budget_rate = None
    if seconds is not None:  # a first probe on a mid-sized model for the device gives C
        guess = PRESETS["cpu-base" if device == "cpu" else "gpt2-124m"]
        guess = guess.replace(vocab_size=vocab_size) if vocab_size else guess
        rate = measure_flops_per_s(guess, micro_batch=micro_batch, device=device)
        compute_flops = rate * seconds
        budget_rate = rate
    n_opt = math.sqrt(compute_flops / (6 * TOKENS_PER_PARAM))
    preset = closest_preset(n_opt, vocab_size, candidates)
    config = PRESETS[preset].replace(vocab_size=vocab_size) if vocab_size else PRESETS[preset]
    params = count_params(config)
    tokens = TOKENS_PER_PARAM * params
    estimate, probed = None, preset
    if probe:
        # A preset too big to train here (AdamW needs 16 bytes a parameter) is timed through the
        # largest one that fits: FLOP/s changes little with size once matrices are large.
        limit = PROBE_PARAMS[device.split(":")[0]] if device.split(":")[0] in PROBE_PARAMS else SINGLE_MACHINE_PARAMS
        if params > limit:
            probed = max((n for n in candidates if count_params(PRESETS[n]) <= limit), key=lambda n: count_params(PRESETS[n]))
        probe_config = PRESETS[probed].replace(vocab_size=vocab_size) if vocab_size else PRESETS[probed]
        rate = measure_flops_per_s(probe_config, micro_batch=micro_batch, device=device)
        estimate = flops_per_token(config, min(config.block_size, 256 if device == "cpu" else config.block_size)) * tokens / rate
    return Plan(compute_flops, n_opt, TOKENS_PER_PARAM * n_opt, preset, params, tokens, rate, estimate, budget_rate, probed)


@dataclass
class ClusterPlan:
    seq_len: int
    usable_bytes: float  # per GPU, after the reserve for the CUDA context and fragmentation
    layouts: list[Layout]
    suggested: Layout | None  # the fitting layout with the least model parallelism
    tokens_per_s: float  # of the whole cluster, at the assumed MFU


def cluster_plan(
    config: ModelConfig, gpus: int, gpu_memory: float, peak_flops: float, mfu: float = 0.40,
    seq_len: int | None = None, micro_batch: int = 1, precision: str = "bf16",
) -> ClusterPlan:
    """Which layouts of `config` fit on `gpus` GPUs of `gpu_memory` bytes, and how fast they train."""
    seq = seq_len or config.block_size
    if not 0 < seq <= config.block_size:
        raise ConfigError(f"--seq-len {seq} must be between 1 and the model's context ({config.block_size})")
    if micro_batch < 1:
        raise ConfigError(f"--micro-batch must be at least 1, not {micro_batch}")
    usable = usable_bytes(gpu_memory)
    found = layouts(config, gpus, seq, precision)

    def cost(layout: Layout) -> tuple[int, bool, int]:
        # Model parallelism costs communication on every layer and checkpointing a third more
        # compute; among equals, DDP's simple all-reduce beats sharding.
        d = layout.degrees
        return d.tp * d.pp, layout.memory.total(micro_batch, False) > usable, d.dp_shard

    fitting = [row for row in found if row.memory.total(micro_batch, True) <= usable]
    suggested = min(fitting, key=cost) if fitting else None
    return ClusterPlan(seq, usable, found, suggested, tokens_per_second(config, gpus, peak_flops, mfu, seq))
