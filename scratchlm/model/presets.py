"""Named model configurations. A preset is data: pick one by name and override any field.

`vocab_size` in a preset is the size of the tokenizer it was designed for; `pretrain` replaces
it with the vocabulary of the tokenizer actually used (rounded up to a multiple of 64, which
keeps matrix shapes friendly to GPU kernels).
"""

from scratchlm.errors import ConfigError
from scratchlm.model.config import ModelConfig

_GPT2 = dict(vocab_size=50304, block_size=1024, positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)
# Llama family as in Llama 2/3 and SmolLM: rotary positions, RMSNorm, SwiGLU, no biases.
_LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, rope_base=10000.0)

PRESETS: dict[str, ModelConfig] = {
    # GPT-2 (Radford et al. 2019); vocab 50257 padded to 50304.
    "gpt2-124m": ModelConfig(**_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": ModelConfig(**_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": ModelConfig(**_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1.5b": ModelConfig(**_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # A Llama-style ladder (tied embeddings, 32k vocab): each step 2.5-3x the parameters of the last.
    "llama-40m": ModelConfig(**_LLAMA, vocab_size=32768, block_size=2048, n_layer=8, n_head=8, n_kv_head=4, n_embd=512),
    "llama-100m": ModelConfig(**_LLAMA, vocab_size=32768, block_size=2048, n_layer=12, n_head=12, n_kv_head=4, n_embd=768),
    "llama-310m": ModelConfig(**_LLAMA, vocab_size=32768, block_size=2048, n_layer=24, n_head=16, n_kv_head=8, n_embd=1024),
    "llama-1b": ModelConfig(**{**_LLAMA, "rope_base": 500000.0}, vocab_size=32768, block_size=2048, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, mlp_hidden=8192),
    # SmolLM2-135M (Hugging Face), exactly: 30 layers, 9 heads in 3 groups, tied embeddings.
    "smollm2-135m": ModelConfig(
        **{**_LLAMA, "rope_base": 100000.0}, vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3,
        n_embd=576, mlp_hidden=1536, tie_embeddings=True,
    ),
    # Meta's Llama 3 shapes, exactly (128k-token vocabulary, 8 KV heads). The context is the
    # 8192 tokens of pretraining; the 3.2 models' 128k context also needs Llama 3.1's RoPE
    # frequency scaling, which ModelConfig does not have.
    "llama3.2-1b": ModelConfig(
        **{**_LLAMA, "rope_base": 500000.0}, vocab_size=128256, block_size=8192, n_layer=16, n_head=32, n_kv_head=8,
        n_embd=2048, mlp_hidden=8192, tie_embeddings=True,
    ),
    "llama3.2-3b": ModelConfig(
        **{**_LLAMA, "rope_base": 500000.0}, vocab_size=128256, block_size=8192, n_layer=28, n_head=24, n_kv_head=8,
        n_embd=3072, mlp_hidden=8192, tie_embeddings=True,
    ),
    "llama3-8b": ModelConfig(
        **{**_LLAMA, "rope_base": 500000.0}, vocab_size=128256, block_size=8192, n_layer=32, n_head=32, n_kv_head=8,
        n_embd=4096, mlp_hidden=14336, tie_embeddings=False,
    ),
    # Small Llama-style models that train in minutes on a laptop CPU.
    "cpu-tiny": ModelConfig(**_LLAMA, vocab_size=4096, block_size=128, n_layer=2, n_head=4, n_embd=64),
    "cpu-small": ModelConfig(**_LLAMA, vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "cpu-base": ModelConfig(**_LLAMA, vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=192),
    "cpu-large": ModelConfig(**_LLAMA, vocab_size=8192, block_size=512, n_layer=8, n_head=8, n_embd=256),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model preset {name!r}{hint} (presets: {', '.join(PRESETS)})") from None
