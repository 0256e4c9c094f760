"""Memory and throughput of a training run on a GPU cluster, estimated before renting one.

For a model, a number of GPUs and a parallel layout (`Degrees`: dp_replicate x dp_shard x tp x
pp), the bytes each GPU holds during a training step:

- model states (AdamW): parameters, gradients and two moments. In "bf16" precision the optimizer
  keeps float32 parameters and reduces float32 gradients: with FSDP2 (dp_shard > 1) that is
  MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), so the float32 shards are divided
  by dp_shard and each GPU also holds the bf16 copies of the two largest units being gathered
  (the one computing and the one prefetched) and one unit's unsharded gradient. Without
  sharding (one GPU, DDP) it is autocast over float32 parameters, which caches a bf16 copy of
  every weight. DDP also keeps a second float32 copy of the gradients in its buckets.
- activations: what autograd saves for backward, per sequence, derived from our blocks (the
  per-layer accounting of Korthikanti et al. 2022, "Reducing Activation Recomputation", with
  their 5as/h attention-score term gone: scaled_dot_product_attention's flash and
  memory-efficient kernels save a logsumexp per query, not the T x T scores). Tensor parallelism
  is assumed to come with sequence parallelism (torchtitan's default), so every activation is
  split over tp. Pipelines run 1F1B: the first stage holds pp micro-batches in flight.

Throughput is the GPU's published bf16 peak x an assumed model FLOPs utilisation (MFU), since
it cannot be measured without the hardware.
"""

import math
from functools import cache
from dataclasses import dataclass

from scratchlm.errors import ConfigError
from scratchlm.model import ModelConfig, count_params, flops_per_token
from scratchlm.train.config import Degrees

PRECISIONS = ("bf16", "fp32")
GPUS_PER_NODE = 8  # HSDP shards inside a node and replicates across nodes; TP stays inside one
# Held back from each GPU's memory before anything fits: the CUDA context and NCCL buffers
# (about 1-2 GB) and the caching allocator's fragmentation (about a tenth).
RESERVED_BYTES = 2e9
RESERVED_FRACTION = 0.10


@dataclass(frozen=True)
class GpuMemory:
    """Bytes one GPU holds in a training step, for the busiest pipeline stage."""

    params: float
    grads: float
    optimizer: float
    activations_per_seq: float  # all layers' saved activations for one sequence
    checkpointed_per_seq: float  # the same with activation checkpointing (one block recomputed at a time)
    logits_workspace_per_seq: float  # the loss's gradient buffers at the start of backward, not saved tensors

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer

    def total(self, micro_batch: int, checkpointing: bool) -> float:
        per_seq = self.checkpointed_per_seq if checkpointing else self.activations_per_seq
        return self.states + micro_batch * (per_seq + self.logits_workspace_per_seq)


@dataclass(frozen=True)
class Layout:
    name: str  # DDP, FSDP, HSDP, FSDP+TP, ...
    degrees: Degrees
    memory: GpuMemory


def usable_bytes(gpu_memory: float) -> float:
    """What a training step may use of a GPU with `gpu_memory` bytes."""
    return gpu_memory * (1 - RESERVED_FRACTION) - RESERVED_BYTES


@cache
def _block_params(config: ModelConfig) -> int:
    """Parameters of one transformer block (all blocks are the same)."""
    return count_params(config.replace(n_layer=2)) - count_params(config.replace(n_layer=1))


def _final_norm(config: ModelConfig) -> int:
    return config.n_embd * (2 if config.norm == "layernorm" and config.bias else 1)


def _embedding_params(config: ModelConfig) -> int:
    return config.vocab_size * config.n_embd + (config.block_size * config.n_embd if config.positions == "learned" else 0)


def _head_params(config: ModelConfig) -> int:
    """The output layer and the final norm (the head's weight is the embedding's when tied)."""
    return config.vocab_size * config.n_embd + _final_norm(config)


def _norm_activation(config: ModelConfig, act: int) -> float:
    """Bytes per token a norm saves: RMSNorm upcasts its input to float32 and saves it, then its
    output feeds the weight's multiply; LayerNorm saves its input (statistics are per token)."""
    h = config.n_embd
    return (4 * h + act * h) if config.norm == "rmsnorm" else act * h


def layer_activation_bytes(config: ModelConfig, act: int) -> float:
    """Bytes per token one block saves for backward, with activations of `act` bytes (2 for bf16,
    4 for float32); float32 where the model computes in float32 (norms, the logsumexp). Rotary
    embeddings save only their cos and sin tables, which all layers share."""
    h, kv, H = config.n_embd, config.kv_heads * config.head_dim, config.hidden
    total = 2 * _norm_activation(config, act)
    total += 3 * act * h  # the inputs of the qkv, output and MLP input projections
    total += act * (h + 2 * kv) + act * h + 4 * config.n_head  # attention: q, k, v, output, logsumexp
    if config.qk_norm:  # the per-head norms of q and k, like the block norms
        total += 4 * (h + kv) + act * (h + kv)
    total += act * (4 * H if config.mlp == "swiglu" else 2 * H)  # SwiGLU: gate|up, silu(gate), product
    if config.dropout > 0:  # one byte per element for each of the two residual dropout masks
        total += 2 * h
    return total


def _embedding_activation_bytes(config: ModelConfig) -> float:
    return 8  # the token ids (int64) the embedding's backward needs


def _head_activation_bytes(config: ModelConfig, act: int) -> float:
    """The final norm, the head's input and the loss's float32 log-softmax over the vocabulary."""
    return _norm_activation(config, act) + act * config.n_embd + 4 * config.vocab_size


def gpu_memory(
    config: ModelConfig, degrees: Degrees, seq_len: int | None = None, precision: str = "bf16"
) -> GpuMemory:
    """The busiest GPU's bytes for `config` laid out as `degrees` (the first or the last
    pipeline stage, whichever holds more)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    t, pp = degrees.tp, degrees.pp
    if config.n_layer % pp:
        raise ConfigError(f"pp={pp} does not divide the model's {config.n_layer} layers")
    seq = seq_len or config.block_size
    act = 2 if precision == "bf16" else 4
    block, embed, head = _block_params(config), _embedding_params(config), _head_params(config)
    layers = config.n_layer // pp
    # With one stage it holds everything, and a tied head is the embedding (counted once).
    if pp == 1:
        stages = [(embed + layers * block + (head if not config.tie_embeddings else _final_norm(config)), True, True)]
    else:  # a tied head needs its own copy on the last stage
        stages = [(embed + layers * block, True, False), (layers * block + head, False, True)]
    candidates = []
    for params, first, last in stages:
        units = [block] + ([embed] if first else []) + ([head] if last else [])
        in_flight = pp if first else 1  # 1F1B: stage s holds pp - s micro-batches
        saved = in_flight * layers * layer_activation_bytes(config, act)
        checkpointed = in_flight * layers * act * config.n_embd + layer_activation_bytes(config, act)
        edges = (_embedding_activation_bytes(config) if first else 0) + (_head_activation_bytes(config, act) if last else 0)
        workspace = (4 + act) * config.vocab_size if last else 0  # d(loss)/d(logits) in float32, then in `act`
        candidates.append(_states(params / t, max(units) / t, degrees, precision) + (
            seq * (saved + edges) / t, seq * (checkpointed + edges) / t, seq * workspace / t))
    best = max(candidates, key=lambda c: sum(c[:3]) + c[3])
    return GpuMemory(*best)


def _states(params: float, largest_unit: float, degrees: Degrees, precision: str) -> tuple[float, float, float]:
    """Parameters, gradients and AdamW moments of `params` parameters on one GPU."""
    shard = degrees.dp_shard
    weights, grads, moments = 4 * params / shard, 4 * params / shard, 8 * params / shard
    if shard > 1:  # FSDP2 gathers one unit while computing another, and holds one unit's unsharded gradient
        compute = 2 if precision == "bf16" else 4
        weights += 2 * compute * largest_unit
        grads += (compute + 4 if precision == "bf16" else 4) * largest_unit
    else:
        if precision == "bf16":  # autocast's cached bf16 copies of the float32 weights
            weights += 2 * params
        if degrees.dp_replicate > 1:  # DDP's gradient buckets
            grads += 4 * params
    return weights, grads, moments


def layouts(config: ModelConfig, gpus: int, seq_len: int | None = None, precision: str = "bf16") -> list[Layout]:
    """The sensible layouts of `gpus` GPUs: data parallel (DDP, FSDP, HSDP), and FSDP with tensor
    parallelism (tp in 2, 4, 8 dividing both head counts) and pipeline stages (pp dividing the
    layers), the model-parallel degrees kept inside a node of GPUS_PER_NODE."""
    if gpus < 1:
        raise ConfigError(f"the number of GPUs must be at least 1, not {gpus}")
    found: list[tuple[str, Degrees]] = []
    if gpus == 1:
        found.append(("one GPU", Degrees()))
    else:
        found += [("DDP", Degrees(dp_replicate=gpus)), ("FSDP", Degrees(dp_shard=gpus))]
        if gpus > GPUS_PER_NODE and gpus % GPUS_PER_NODE == 0:
            found.append(("HSDP", Degrees(dp_replicate=gpus // GPUS_PER_NODE, dp_shard=GPUS_PER_NODE)))
    for tp in (1, 2, 4, 8):
        if config.n_head % tp or config.kv_heads % tp:
            continue
        for pp in (1, 2, 4, 8):
            if (tp, pp) == (1, 1) or config.n_layer % pp or gpus % (tp * pp) or tp * pp > GPUS_PER_NODE:
                continue
            dp = gpus // (tp * pp)
            name = "+".join(["FSDP"] * (dp > 1) + ["TP"] * (tp > 1) + ["PP"] * (pp > 1))
            found.append((name, Degrees(dp_shard=dp, tp=tp, pp=pp)))
    return [Layout(name, d, gpu_memory(config, d, seq_len, precision)) for name, d in found]


def tokens_per_second(config: ModelConfig, gpus: int, peak_flops: float, mfu: float, seq_len: int | None = None) -> float:
    """Training tokens per second of `gpus` GPUs that each achieve `mfu` x `peak_flops`."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"MFU must be in (0, 1], not {mfu}")
    return peak_flops * mfu * gpus / flops_per_token(config, seq_len)


_LLAMA_WIDTHS = (512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192, 12288, 16384)


def llama_shaped(params: float, vocab_size: int = 128256, block_size: int = 8192) -> ModelConfig:
    """A Llama-3-shaped config of about `params` parameters: 128-wide heads (64 below width 1024)
    with up to 8 KV heads, an MLP 3.5x the width (rounded up to 256), rope_base 500000, and
    embeddings tied below 5B parameters as in Llama 3.2. Of the widths whose best depth comes
    within 10% of `params`, the one nearest Llama 3's 128 of width per layer wins."""
    if params < 1e7:
        raise ConfigError(f"--params {params:.3g} is too small for a GPU plan; use a preset such as cpu-small")

    def shape(width: int, layers: int) -> ModelConfig:
        head_dim = 64 if width < 1024 else 128
        return ModelConfig(
            vocab_size=vocab_size, block_size=block_size, n_layer=layers, n_head=width // head_dim,
            n_kv_head=math.gcd(width // head_dim, 8), n_embd=width, mlp_hidden=-(-int(3.5 * width) // 256) * 256,
            positions="rope", rope_base=500000.0, norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=params < 5e9,
        )

    candidates = []
    for width in _LLAMA_WIDTHS:
        one = shape(width, 1)
        block = _block_params(one)
        fixed = count_params(one) - block
        layers = max(1, round((params - fixed) / block))
        error = abs(math.log((fixed + layers * block) / params))
        candidates.append((error, abs(math.log(width / layers / 128)), width, layers))
    close = [c for c in candidates if c[0] < math.log(1.1)]
    _, _, width, layers = min(close, key=lambda c: c[1]) if close else min(candidates)
    return shape(width, layers)
