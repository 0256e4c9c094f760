"""`ModelConfig`: every architecture choice of the transformer, as plain data.

One dataclass covers the GPT-2 family (learned positions, LayerNorm, GELU, biases, tied
embeddings) and the Llama family (rotary positions, RMSNorm, SwiGLU, grouped-query attention,
no biases); a new family is a new preset, not a new class. Presets live in `presets.py`.
"""

import dataclasses
from dataclasses import dataclass
from typing import Literal

from scratchlm.config import build
from scratchlm.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50304
    block_size: int = 1024  # longest context the model is trained for
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # fewer than n_head: grouped-query attention; None: = n_head
    mlp_hidden: int | None = None  # None: 4 * n_embd, or for SwiGLU 8/3 * n_embd rounded up to 64
    positions: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    qk_norm: bool = False  # normalise queries and keys per head (stabilises large learning rates)
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        checks = [
            (self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"),
            (self.kv_heads > 0 and self.n_head % self.kv_heads == 0, f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"),
            (self.positions in ("learned", "rope"), f"positions must be 'learned' or 'rope', not {self.positions!r}"),
            (self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', not {self.norm!r}"),
            (self.mlp in ("gelu", "swiglu", "relu2"), f"mlp must be 'gelu', 'swiglu' or 'relu2', not {self.mlp!r}"),
            (self.positions != "rope" or self.head_dim % 2 == 0, "rotary positions need an even head size"),
            (min(self.vocab_size, self.block_size, self.n_layer) > 0, "vocab_size, block_size and n_layer must be positive"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), not {self.dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"model config: {message}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # same parameter count as a 4x GELU MLP (Shazeer 2020)
            return -(-8 * self.n_embd // 3 // 64) * 64
        return 4 * self.n_embd

    def replace(self, **changes) -> "ModelConfig":
        """A copy with `changes`; values may be strings from the command line ("6", "true")."""
        return build(ModelConfig, self.to_dict() | changes, "model config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return build(cls, data, "model config")
