"""The decoder-only transformer: one file, every architecture in `ModelConfig`.

    tokens -> embedding (+ learned positions) -> n_layer x Block -> norm -> linear head -> logits
    Block:  x = x + Attention(norm(x));  x = x + MLP(norm(x))          (pre-norm, GPT-2 onward)

Attention runs through `scaled_dot_product_attention`, which picks FlashAttention or
memory-efficient kernels on GPUs. Generation keeps a preallocated `KVCache`, so each new token
costs one position, not a rerun of the prompt. The model is written for one device: parallelism,
compilation and activation checkpointing are applied from outside (`scratchlm/train/`).
"""

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchlm.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): LayerNorm without centring or bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32: under bf16 autocast the mean of squares loses too much precision.
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig, length: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, shape (length, head_dim / 2) (Su et al. 2021)."""
    half = config.head_dim // 2
    freqs = 1.0 / (config.rope_base ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + half]) by position-dependent angles: Hugging Face's layout,
    so Llama-family checkpoints load without permuting weights. x: (B, heads, T, head_dim);
    cos, sin: (B or 1, 1, T or more, head_dim / 2), of which the first T positions are used."""
    T = x.shape[2]
    cos, sin = cos[:, :, :T], sin[:, :, :T]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


@dataclass
class KVCache:
    """Keys and values of every layer, preallocated to `max_len` positions per row. Row b holds
    `lengths[b]` positions: the rows of one batch may be sequences of different lengths, each
    writing at its own next position (batched generation of prompts of several lengths)."""

    keys: list[Tensor]  # per layer: (batch, kv_heads, max_len, head_dim)
    values: list[Tensor]
    lengths: Tensor  # (batch,) int64

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (batch, config.kv_heads, max_len, config.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1 as a cache of their own that shares this one's memory, so a
        forward pass on a few rows (one prompt's prefill) writes into the whole batch's cache."""
        return KVCache([k[start:stop] for k in self.keys], [v[start:stop] for v in self.values], self.lengths[start:stop])

    def resized(self, max_len: int) -> "KVCache":
        """A cache of `max_len` positions per row holding this one's contents (which must fit)."""
        def grow(t: Tensor) -> Tensor:
            bigger = t.new_zeros(*t.shape[:2], max_len, t.shape[3])
            bigger[:, :, : t.shape[2]] = t[:, :, :max_len]
            return bigger
        return KVCache([grow(k) for k in self.keys], [grow(v) for v in self.values], self.lengths.clone())

    def copy_row(self, source: int, target: int) -> None:
        for tensor in (*self.keys, *self.values):
            tensor[target] = tensor[source]
        self.lengths[target] = self.lengths[source]

    def plan(self, length: int, limit: int) -> "CachedStep":
        """Where `length` new tokens per row go and which keys each sees, worked out once per
        forward pass for all layers. ValueError when a row would pass `limit` positions."""
        first, last = self.lengths.aminmax()
        first, last = int(first), int(last)
        span = last + length  # the longest row after the write
        if span > limit:
            raise ValueError(f"sequence of {span} tokens is longer than the context ({limit})")
        device = self.lengths.device
        if first == last:  # rows in step (one sequence, or samples of one prompt): plain slices
            positions = torch.arange(first, span, device=device)[None]
            mask = None  # one new token sees every key; a first chunk is plain causal
            if length > 1 and first > 0:  # a chunk after cached positions: query i sees keys 0 .. first + i
                mask = torch.ones(length, span, dtype=torch.bool, device=device).tril(diagonal=first)
            return CachedStep(self, positions, mask, span, first)
        positions = self.lengths[:, None] + torch.arange(length, device=device)
        # Row b's query at position p sees keys 0..p; the rest of the span is another row's
        # length (stale keys, padding) and stays hidden.
        mask = (torch.arange(span, device=device) <= positions[..., None])[:, None]
        return CachedStep(self, positions, mask, span, None)


@dataclass
class CachedStep:
    """One forward pass's use of the cache: positions (B or 1, T) of the new tokens, the mask
    (None: plain causal) and `start`, the common length of all rows when they are in step."""

    cache: KVCache
    positions: Tensor
    mask: Tensor | None
    span: int
    start: int | None

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (batch, kv_heads, T, head_dim) at the new positions; return the keys and
        values of the first `span` positions."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if self.start is not None:
            keys[:, :, self.start : self.span] = k
            values[:, :, self.start : self.span] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            keys[rows, :, self.positions] = k.transpose(1, 2)
            values[rows, :, self.positions] = v.transpose(1, 2)
        return keys[:, :, : self.span], values[:, :, : self.span]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        hd = config.head_dim
        # Separate projections (not one fused qkv): tensor parallelism splits each by heads, and
        # Hugging Face and GGUF checkpoints map one-to-one. Keys and values have kv_heads heads.
        self.q = nn.Linear(config.n_embd, config.n_head * hd, bias=config.bias)
        self.k = nn.Linear(config.n_embd, config.kv_heads * hd, bias=config.bias)
        self.v = nn.Linear(config.n_embd, config.kv_heads * hd, bias=config.bias)
        self.proj = nn.Linear(config.n_head * hd, config.n_embd, bias=config.bias)
        self.q_norm = make_norm(config, hd) if config.qk_norm else None
        self.k_norm = make_norm(config, hd) if config.qk_norm else None

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cached: "CachedStep | None", layer: int, mask: Tensor | None = None
    ) -> Tensor:
        cfg = self.config
        B, T, _ = x.shape
        hd = cfg.head_dim
        # Head counts come from the tensors, not the config: a tensor-parallel rank holds some heads.
        q = self.q(x).view(B, T, -1, hd).transpose(1, 2)
        k = self.k(x).view(B, T, -1, hd).transpose(1, 2)
        v = self.v(x).view(B, T, -1, hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        causal = mask is None and T > 1
        if cached is not None:
            k, v = cached.write(layer, k, v)
            mask, causal = cached.mask, cached.mask is None and T > 1 and cached.start == 0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=cfg.dropout if self.training else 0.0, enable_gqa=k.shape[1] != q.shape[1],
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        # SwiGLU's gate is a matrix of its own (not fused with up), as in Hugging Face's Llama.
        self.gate = nn.Linear(config.n_embd, config.hidden, bias=config.bias) if config.mlp == "swiglu" else None
        self.up = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.down = nn.Linear(config.hidden, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:  # SwiGLU (Shazeer 2020)
            return self.down(F.silu(self.gate(x)) * self.up(x))
        h = self.up(x)
        if self.kind == "relu2":  # squared ReLU (So et al. 2021), used by modded-nanoGPT
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return self.down(h)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cached: "CachedStep | None", layer: int, mask: Tensor | None = None
    ) -> Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), rope, cached, layer, mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_embed = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        if config.positions == "rope":
            cos, sin = rope_tables(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) for matrices and embeddings, zero biases, and the
        projections that write into the residual stream scaled by 1/sqrt(2 * n_layer), so the
        residual's variance does not grow with depth (Radford et al. 2019, section 2.3)."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() == 1:  # norm weights
                nn.init.ones_(param)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(param, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(param, mean=0.0, std=std)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        documents: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, vocab) and, given targets (B, T; -100 to
        ignore a position), the mean next-token cross-entropy in nats. With a cache, row b's
        tokens go at positions cache.lengths[b] onward, and its length grows by T. `last_only`
        computes logits (B, 1, vocab) for the last position: a long prompt's prefill would
        otherwise spend time and memory on vocab x T logits nobody reads. `documents` (B, T)
        numbers the documents packed into each row (fine-tuning on short examples): attention
        stays inside each document and positions restart at each, so a packed row trains as
        its documents would one by one.

        A pipeline stage (scratchlm/train/parallel.py) is a GPT with some parts dropped: without
        `embed` it takes hidden states (B, T, n_embd) for idx, without `head` it returns them."""
        B, T = idx.shape[:2]
        cached, start, mask = None, 0, None
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
            positions = torch.arange(T, device=idx.device)[None]
            if documents is not None:
                if documents.shape != idx.shape:
                    raise ValueError(f"documents has shape {tuple(documents.shape)}, the tokens {tuple(idx.shape)}")
                positions, mask, start = document_positions(documents), document_mask(documents), None
        else:
            if documents is not None:
                raise ValueError("packed documents are for training; generation with a cache takes one sequence per row")
            cached = cache.plan(T, min(self.config.block_size, cache.max_len))
            positions, start = cached.positions, cached.start
        x = idx
        if self.embed is not None:
            x = self.embed(idx)
            if self.pos_embed is not None:
                x = x + self.pos_embed(positions)
            x = self.drop(x)
        rope = None
        if self.config.positions == "rope" and start is not None:
            # (1, 1, positions from start on, head_dim / 2), broadcast over batch and heads; attention
            # takes as many as it has tokens (under sequence parallelism, more than this rank's T).
            rope = (self.rope_cos[start:][None, None], self.rope_sin[start:][None, None])
        elif self.config.positions == "rope":  # rows at different positions: (B, 1, T, head_dim / 2)
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        for layer, block in self.numbered_blocks():
            x = block(x, rope, cached, layer, mask)
        if cache is not None:
            cache.lengths += T
        if self.head is None:
            return x, None
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.norm(x))
        return logits, None if targets is None else self.loss(logits, targets)

    @staticmethod
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats over the targets that are not -100."""
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)

    def numbered_blocks(self) -> list[tuple[int, "Block"]]:
        """(layer number, block) pairs. A pipeline stage keeps its blocks in a ModuleDict keyed by
        layer number, so that their parameter names stay those of the whole model."""
        if isinstance(self.blocks, nn.ModuleDict):
            return [(int(name), block) for name, block in self.blocks.items()]
        return list(enumerate(self.blocks))

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        param = self.embed.weight
        return KVCache.empty(self.config, batch, max_len or self.config.block_size, param.device, param.dtype)


def document_positions(documents: Tensor) -> Tensor:
    """(B, T) position of each token inside its document: 0 where a new document starts."""
    T = documents.shape[1]
    index = torch.arange(T, device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def document_mask(documents: Tensor) -> Tensor:
    """(B, 1, T, T) attention mask, True where query i may see key j: j <= i, same document.
    Every position sees itself, so no softmax row is empty."""
    T = documents.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]


M = TypeVar("M", bound=nn.Module)


def allocate_on_cpu(model: M, keep: tuple[type[nn.Module], ...] = ()) -> M:
    """A model built on the meta device (a GPT, or a module holding one: a classifier, LoRA),
    given CPU memory for its parameters but no values: for loaders that overwrite every
    parameter anyway (random initialisation of a large model costs seconds). Modules of the
    types in `keep` already hold real tensors and are left alone. `to_empty` gives each module
    a tensor of its own, so a tied head is tied again, and buffers come out as garbage, so the
    rotary tables are recomputed."""
    if keep:
        for module in model.modules():
            if not isinstance(module, keep):
                module.to_empty(device="cpu", recurse=False)
    else:
        model = model.to_empty(device="cpu")
    for gpt in [m for m in model.modules() if isinstance(m, GPT)]:
        config = gpt.config
        if config.tie_embeddings and isinstance(gpt.head, nn.Linear):  # (not a LoRA-wrapped head)
            gpt.head.weight = gpt.embed.weight
        if config.positions == "rope":
            gpt.rope_cos, gpt.rope_sin = rope_tables(config, config.block_size)
    return model


def count_params(config: ModelConfig, include_embeddings: bool = True) -> int:
    """Exact parameter count, from a model built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = GPT(config)
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    if not include_embeddings:
        total -= model.embed.weight.numel() + (model.pos_embed.weight.numel() if model.pos_embed is not None else 0)
    return total


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 per matmul parameter (forward 2, backward 4), the output layer
    included even when tied, plus attention scores and mixing, 12 * layers * width * context
    (Kaplan et al. 2020; PaLM appendix B)."""
    t = seq_len or config.block_size
    matmul_params = count_params(config, include_embeddings=False) + config.vocab_size * config.n_embd
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * t
