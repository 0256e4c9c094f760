"""What `scratchlm model info` prints: size, compute and memory of a configuration."""

from scratchlm.model.config import ModelConfig
from scratchlm.model.model import count_params, flops_per_token


def architecture(config: ModelConfig) -> str:
    """One line: depth, width, heads, context and the family choices."""
    return (
        f"{config.n_layer} layers, width {config.n_embd}, {config.n_head} heads"
        + (f" ({config.kv_heads} kv)" if config.kv_heads != config.n_head else "")
        + f", ctx {config.block_size}, {config.positions}/{config.norm}/{config.mlp}"
        + ("/qk-norm" if config.qk_norm else "")
    )


def describe(name: str, config: ModelConfig, short: bool = False) -> str:
    params = count_params(config)
    flops = flops_per_token(config)
    arch = architecture(config)
    if short:
        return f"{name:<14} {params / 1e6:>9.1f}M params  {flops / 1e9:>7.2f} GFLOP/token  {arch}"
    return "\n".join([
        f"preset            {name}",
        f"architecture      {arch}, vocab {config.vocab_size}, bias {config.bias}, tied embeddings {config.tie_embeddings}",
        f"parameters        {params:,} ({count_params(config, include_embeddings=False):,} without embeddings)",
        f"training FLOPs    {flops / 1e9:.3f} GFLOP per token at context {config.block_size} (6N + attention)",
    ])


def memory_estimate(config: ModelConfig, micro_batch: int) -> list[str]:
    """Rough training memory: fp32 weights, gradients and AdamW's two moments (16 bytes per
    parameter), plus activations of about 34 * width bytes per token and layer in bf16
    (Korthikanti et al. 2022; fused attention stores no attention matrix)."""
    params = count_params(config)
    states = 16 * params
    tokens = micro_batch * config.block_size
    activations = config.n_layer * tokens * 34 * config.n_embd
    gib = 1024**3
    return [
        f"memory (training) weights+grads+AdamW {states / gib:.2f} GiB; activations for micro-batch {micro_batch} "
        f"{activations / gib:.2f} GiB (with activation checkpointing: much less)",
        f"memory (inference) weights {4 * params / gib:.2f} GiB fp32, {2 * params / gib:.2f} GiB bf16",
    ]
