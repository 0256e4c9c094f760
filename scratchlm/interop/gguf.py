"""GGUF files (llama.cpp's one-file model format) in and out: config, weights and tokenizer.

Three GGUF architectures map one-to-one onto `ModelConfig`; anything else is refused with a
message naming what was found, never loaded approximately:

    llama   rotary positions, RMSNorm, SwiGLU, no biases (SmolLM2, Llama 2/3 and the like)
    qwen3   llama plus an RMSNorm of queries and keys per head (our `qk_norm`)
    gpt2    learned positions, LayerNorm with bias, GELU (tanh), fused q|k|v matrix

Import reads `{arch}.*` metadata into a `ModelConfig`, checks every tensor's name, type and
shape, then dequantises one tensor at a time with the `gguf` package's reference numpy kernels
straight into the parameters of a model allocated without initial values (built on the `meta`
device, then `to_empty`). Memory holds the float32 model and one dequantised tensor, never a
second copy of the model, and no time goes into random values that would be overwritten
(random initialisation is 2.1 s of the 2.3 s it takes to build SmolLM2-135M on a CPU core).

Traps this module exists to get right:
- llama.cpp's converter permutes the rows of `attn_q` and `attn_k` in `llama` files, so that
  its interleaved rope, which rotates pairs (x[2i], x[2i+1]), computes what the Hugging Face
  half rotation, pairs (x[i], x[i + half]), computes on the original rows. Our rope is the half
  rotation, so import undoes the permutation and export redoes it, as transformers' GGUF loader
  does. `qwen3` files use llama.cpp's NEOX rope, which is the half rotation: no permutation.
- GGUF lists a tensor's dimensions fastest first ([in, out]); numpy and torch see (out, in).
  Messages quote shapes in GGUF order, as `gguf-dump` prints them.
- 1-D tensors (norms, biases) stay F32 in an f16 export, as llama.cpp's converter does: they
  are tiny, and half-precision norm weights only cost accuracy.

Tokenizer: import goes through `import_gguf_tokenizer`. Export writes byte-level BPE as
llama.cpp expects it: tokens in GPT-2's byte-to-unicode alphabet, token types (1 normal,
3 control for special tokens, 5 unused for ids the tokenizer does not use, padding the list to
the embedding's rows), the merge list, bos/eos ids and the chat template. A GGUF file cannot
carry a pre-tokenizer regex, only a name (`tokenizer.ggml.pre`) that picks one built into
llama.cpp. So a pattern with a llama.cpp name is written under it, and any other pattern is
refused: writing a wrong name would make llama.cpp split text differently from training, and
nothing would report it. GPT-4's pattern (the project's default) is written as `llama-bpe`
because it splits every text exactly as Llama 3's pattern does (see `llama_cpp_pre_name`).
"""

import math
import reprlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGUFReader, GGUFWriter, LlamaFileType, TokenType
from tqdm import tqdm

from scratchlm.atomic_io import check_writable_file, written_atomically
from scratchlm.errors import ConfigError, ModelFormatError
from scratchlm.gguf_file import gguf_value, open_gguf
from scratchlm.model import GPT, ModelConfig, count_params
from scratchlm.model.model import allocate_on_cpu
from scratchlm.tokenizer import Tokenizer, import_gguf_tokenizer
from scratchlm.tokenizer.bytelevel import bytes_to_token_string
from scratchlm.tokenizer.formats import GGUF_PRE_PATTERNS
from scratchlm.tokenizer.pretokenize import GPT4_PATTERN

SUPPORTED_ARCHITECTURES = ("llama", "qwen3", "gpt2")
# Types the `gguf` package dequantises and that hold model weights. Q8_K is an intermediate of
# llama.cpp's matmuls, never a stored weight; the i-quants and ternary types are left out.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)
EXPORT_DTYPES = ("f32", "f16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # weights per Q8_0 / Q4_0 block, along a row

# The ModelConfig choices each architecture fixes; the rest (sizes, heads, eps, rope base,
# tied head) are free.
ARCHITECTURE_FEATURES: dict[str, dict[str, object]] = {
    "llama": {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qk_norm": False},
    "qwen3": {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qk_norm": True},
    "gpt2": {"positions": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "qk_norm": False},
}
# The context is the one size no tensor bounds (gpt2's is its position table's rows), and building a
# rope model allocates rope tables: cos and sin of head_dim / 2 float32 per position, 4 x head_dim
# bytes, 512 B at head size 128, and half as much again while they are computed (see
# `build_bytes`; measured: 2^24 positions of head size 8 peak at 0.77 GB and take 2.2 s, a quarter
# of that at head size 64 takes 3.4 s). So at most 2^24 positions, beyond any released model
# (Llama 4 Scout's 10M is the longest): at that maximum, tables of head size 128 take 8 GiB (12 GiB
# and about 30 s while built). Without it a 20 KB file declaring 2^32 positions asked for a terabyte.
MAX_CONTEXT = 2**24
SUPPORTED_CONFIGS = (
    "llama (rope, rmsnorm, swiglu, no bias), qwen3 (the same with qk_norm), "
    "gpt2 (learned positions, layernorm, gelu, bias, no grouped-query attention)"
)


# ---- where each GGUF tensor lives in our model ---------------------------------------------
@dataclass(frozen=True)
class TensorSlot:
    """One GGUF tensor and its place in our model: a parameter, or several stacked by rows
    (gpt2 files keep queries, keys and values in one fused attn_qkv)."""

    gguf_name: str
    params: tuple[str, ...]
    rope_heads: int | None = None  # llama.cpp permutes these rows for its rope, over this many heads


def tensor_slots(config: ModelConfig, arch: str, tied: bool) -> list[TensorSlot]:
    """Every tensor of a GGUF file of architecture `arch` for `config`, in llama.cpp's order."""
    def slot(gguf_name: str, param: str, rope_heads: int | None = None) -> TensorSlot:
        return TensorSlot(gguf_name, (param,), rope_heads)

    slots = [slot("token_embd.weight", "embed.weight")]
    if arch == "gpt2":
        slots.append(slot("position_embd.weight", "pos_embed.weight"))
    for i in range(config.n_layer):
        blk, ours = f"blk.{i}.", f"blocks.{i}."
        if arch == "gpt2":
            pairs = [("attn_norm", ("norm1",)), ("attn_qkv", ("attn.q", "attn.k", "attn.v")), ("attn_output", ("attn.proj",)),
                     ("ffn_norm", ("norm2",)), ("ffn_up", ("mlp.up",)), ("ffn_down", ("mlp.down",))]
            slots += [TensorSlot(f"{blk}{g}.{kind}", tuple(f"{ours}{o}.{kind}" for o in os)) for g, os in pairs for kind in ("weight", "bias")]
            continue
        permuted = arch == "llama"
        slots += [
            slot(blk + "attn_norm.weight", ours + "norm1.weight"),
            slot(blk + "attn_q.weight", ours + "attn.q.weight", config.n_head if permuted else None),
            slot(blk + "attn_k.weight", ours + "attn.k.weight", config.kv_heads if permuted else None),
            slot(blk + "attn_v.weight", ours + "attn.v.weight"),
            slot(blk + "attn_output.weight", ours + "attn.proj.weight"),
        ]
        if arch == "qwen3":
            slots += [slot(blk + "attn_q_norm.weight", ours + "attn.q_norm.weight"),
                      slot(blk + "attn_k_norm.weight", ours + "attn.k_norm.weight")]
        slots += [
            slot(blk + "ffn_norm.weight", ours + "norm2.weight"),
            slot(blk + "ffn_gate.weight", ours + "mlp.gate.weight"),
            slot(blk + "ffn_up.weight", ours + "mlp.up.weight"),
            slot(blk + "ffn_down.weight", ours + "mlp.down.weight"),
        ]
    slots.append(slot("output_norm.weight", "norm.weight"))
    if arch == "gpt2":
        slots.append(slot("output_norm.bias", "norm.bias"))
    if not tied:
        slots.append(slot("output.weight", "head.weight"))
    return slots


def permute_for_llama_cpp(w, n_head: int):
    """Rows of a query/key matrix in half-rotation order -> llama.cpp's interleaved order
    (convert_hf_to_gguf.py's `permute`): within each head, row i of the first half and row i
    of the second half become rows 2i and 2i + 1. Works on numpy arrays and torch tensors."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_llama_cpp(w, n_head: int):
    """Inverse of `permute_for_llama_cpp`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _slot_shape(model: GPT, slot: TensorSlot) -> tuple[int, ...]:
    shapes = [tuple(model.get_parameter(p).shape) for p in slot.params]
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def _gguf_shape(numpy_shape) -> list[int]:
    """A shape as GGUF lists it: fastest dimension first."""
    return [int(d) for d in reversed(tuple(numpy_shape))]


def _numpy_shape(reader_tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tuple(reader_tensor.shape)))


# ---- import ----------------------------------------------------------------------------------
def import_gguf(path: str | Path, pattern: str | None = None, progress: bool = False) -> tuple[GPT, Tokenizer]:
    """The model (float32, eval mode, CPU) and tokenizer of a GGUF file of architecture llama,
    qwen3 or gpt2, with weights in any of `SUPPORTED_TYPES`. `pattern` overrides the
    pre-tokenizer named in the file (see `import_gguf_tokenizer`)."""
    p = Path(path)
    where = str(p)
    reader = open_gguf(p)
    arch = _architecture(reader, where)
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ModelFormatError(
                f"{where}: tensor {t.name} has quantisation type {t.tensor_type.name}; supported: {', '.join(SUPPORTED_TYPES)}"
            )
    config = config_from_gguf(reader, arch, where)
    slots = tensor_slots(config, arch, tied=config.tie_embeddings)
    _check_tensor_names(slots, tensors, arch, where)
    # The tokenizer before the weights: a vocabulary we cannot read fails in seconds, not after the load.
    tokenizer = import_gguf_tokenizer(p, pattern, reader=reader)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFormatError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids but token_embd.weight only {config.vocab_size} rows"
        )
    with torch.device("meta"):  # shapes without memory; parameters are allocated once all is checked
        model = GPT(config)
    for slot in slots:
        found, expected = _gguf_shape(_numpy_shape(tensors[slot.gguf_name])), _gguf_shape(_slot_shape(model, slot))
        if found != expected:
            raise ModelFormatError(f"{where}: tensor {slot.gguf_name} has shape {found}; expected {expected} for {arch} with this config")
    try:
        model = allocate_on_cpu(model)
    except (RuntimeError, MemoryError):  # torch's CPU allocator raises RuntimeError
        # A large model, or a context up to MAX_CONTEXT on a small machine.
        raise ModelFormatError(f"{where}: not enough memory to build this model: {count_params(config):,} parameters and "
                               f"context_length {config.block_size:,} need {build_bytes(config) / 2**30:.1f} GiB") from None
    with torch.no_grad():
        for slot in tqdm(slots, desc="import", unit="tensor", disable=not progress):
            _load_slot(model, slot, tensors[slot.gguf_name], where)
    return model.eval(), tokenizer


def build_bytes(config: ModelConfig) -> int:
    """Peak memory of building `config` in float32 for import: the parameters, and for rope the
    cos and sin tables (4 x head_dim bytes a position) plus the angles they are computed from
    (half as much again) and the positions (4 bytes each)."""
    rope = 6 * config.head_dim + 4 if config.positions == "rope" else 0
    return 4 * count_params(config) + rope * config.block_size


def _architecture(reader: GGUFReader, where: str) -> str:
    arch = gguf_value(reader, "general.architecture", where)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFormatError(f"{where}: architecture {reprlib.repr(arch)} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _value(reader: GGUFReader, key: str, where: str, default):
    value = gguf_value(reader, key, where)
    if value is None and default is None:
        raise ModelFormatError(f"{where}: metadata key {key} is missing")
    return default if value is None else value


def _int(reader: GGUFReader, key: str, where: str, default: int | None = None) -> int:
    """A size: every integer key we read counts something (layers, heads, widths, positions)."""
    value = _value(reader, key, where, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFormatError(f"{where}: metadata key {key} is {reprlib.repr(value)}; supported: one integer (the same for every layer)")
    if value < 1:
        raise ModelFormatError(f"{where}: metadata key {key} is {value}; expected a positive integer")
    return value


def _float(reader: GGUFReader, key: str, where: str, default: float | None = None,
           above: float = -math.inf, below: float = math.inf) -> float:
    """A finite number strictly between `above` and `below`: out of range (NaN included), a
    norm epsilon or rope base imports silently and the model generates garbage."""
    value = _value(reader, key, where, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelFormatError(f"{where}: metadata key {key} is {reprlib.repr(value)}; expected a number")
    value = float(value)
    if not (math.isfinite(value) and above < value < below):
        bounds = (f" above {above:g}" if above > -math.inf else "") + (f" and below {below:g}" if below < math.inf else "")
        raise ModelFormatError(f"{where}: metadata key {key} is {value}; expected a finite number{bounds}")
    return value


def config_from_gguf(reader: GGUFReader, arch: str, where: str) -> ModelConfig:
    """The `ModelConfig` that GGUF metadata `{arch}.*` describes; the vocabulary size is the
    embedding's row count and the head is tied when the file has no `output.weight`."""

    def key(name: str) -> str:
        return f"{arch}.{name}"

    n_embd = _int(reader, key("embedding_length"), where)
    n_head = _int(reader, key("attention.head_count"), where)
    n_kv_head = _int(reader, key("attention.head_count_kv"), where, default=n_head)
    if n_head <= 0 or n_embd % n_head:
        raise ModelFormatError(f"{where}: embedding_length {n_embd} is not a multiple of head_count {n_head}; "
                               "supported: head size = embedding_length / head_count")
    head_dim = n_embd // n_head
    sized_keys = ["attention.key_length", "attention.value_length"] + (["rope.dimension_count"] if arch != "gpt2" else [])
    for name in sized_keys:
        value = _int(reader, key(name), where, default=head_dim)
        if value != head_dim:
            raise ModelFormatError(f"{where}: {key(name)} is {value} but embedding_length / head_count is {head_dim}; "
                                   "supported: head size = embedding_length / head_count, rope over the whole head")
    _check_rope_scaling(reader, arch, where)
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ModelFormatError(f"{where}: tensor token_embd.weight is missing")
    if len(embed.shape) != 2:
        raise ModelFormatError(f"{where}: tensor token_embd.weight has shape {_gguf_shape(_numpy_shape(embed))}; expected 2 dimensions")
    n_layer = _int(reader, key("block_count"), where)
    if n_layer > len(reader.tensors):  # before anything builds a list of n_layer blocks
        raise ModelFormatError(f"{where}: {key('block_count')} is {n_layer} but the file holds only {len(reader.tensors)} tensors")
    context = _int(reader, key("context_length"), where)
    if context > MAX_CONTEXT:  # before anything allocates rope tables of this length
        raise ModelFormatError(f"{where}: metadata key {key('context_length')} is {context}; supported: at most "
                               f"{MAX_CONTEXT} positions (2^24, beyond any released model)")
    eps_key = "attention.layer_norm_epsilon" if arch == "gpt2" else "attention.layer_norm_rms_epsilon"
    features = ARCHITECTURE_FEATURES[arch]
    try:
        return ModelConfig(
            vocab_size=_numpy_shape(embed)[0],
            block_size=context,
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=n_kv_head if n_kv_head != n_head else None,
            n_embd=n_embd,
            mlp_hidden=_int(reader, key("feed_forward_length"), where),
            # Frequencies base^(-2i / head_dim) must fall from 1 towards 0 across the head; a base
            # of 1 or less makes them equal or growing.
            rope_base=_float(reader, key("rope.freq_base"), where, default=10000.0, above=1.0),
            # Epsilon keeps the norm finite on all-zero activations; released models use 1e-5 to
            # 1e-12, and one of 1 or more is no longer a guard but a change to the norm.
            norm_eps=_float(reader, key(eps_key), where, above=0.0, below=1.0),
            tie_embeddings=all(t.name != "output.weight" for t in reader.tensors),
            **features,
        )
    except ConfigError as exc:
        raise ModelFormatError(f"{where}: metadata describes an impossible model ({exc})") from None


def _check_rope_scaling(reader: GGUFReader, arch: str, where: str) -> None:
    """Context-extension schemes (linear, YaRN, Llama 3's rope_freqs) change the rotation
    angles; our rope has none, so only unscaled rope is accepted. Read as llama.cpp reads it:
    without a type, scaling is linear; the factor is `rope.scaling.factor`, else the older
    `rope.scale_linear`; every factor read must be a finite number."""
    type_key = f"{arch}.rope.scaling.type"
    kind = gguf_value(reader, type_key, where)
    legacy = _float(reader, f"{arch}.rope.scale_linear", where, default=1.0)
    factor = _float(reader, f"{arch}.rope.scaling.factor", where, default=legacy)
    if kind not in (None, "none", "linear") or (kind != "none" and factor != 1.0):
        shown = reprlib.repr(kind) if kind is not None else f"'linear' (no {type_key}: llama.cpp's default)"
        raise ModelFormatError(f"{where}: rope scaling {shown} with factor {factor} is not supported; "
                               "supported: none (or linear with factor 1)")


def _check_tensor_names(slots: list[TensorSlot], tensors: dict, arch: str, where: str) -> None:
    expected = {s.gguf_name for s in slots}
    missing = [s.gguf_name for s in slots if s.gguf_name not in tensors]
    if missing:
        raise ModelFormatError(f"{where}: tensor {missing[0]} is missing ({len(missing)} missing in all) for architecture {arch}")
    extra = [name for name in tensors if name not in expected]
    if extra:
        kinds = sorted({".".join("N" if part.isdigit() else part for part in s.gguf_name.split(".")) for s in slots})
        raise ModelFormatError(
            f"{where}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all); {arch} as supported has: {', '.join(kinds)}"
        )


def _load_slot(model: GPT, slot: TensorSlot, tensor, where: str) -> None:
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError) as exc:
        raise ModelFormatError(f"{where}: tensor {slot.gguf_name} ({tensor.tensor_type.name}) cannot be dequantised ({exc})") from None
    array = array.reshape(_numpy_shape(tensor))
    if slot.rope_heads is not None:
        array = unpermute_from_llama_cpp(array, slot.rope_heads)
    start = 0
    for name in slot.params:  # a fused GGUF tensor: each parameter takes its rows in turn
        target = model.get_parameter(name).detach().numpy()
        np.copyto(target, array[start : start + target.shape[0]])
        start += target.shape[0]


# ---- export ----------------------------------------------------------------------------------
def gguf_architecture(config: ModelConfig) -> str:
    """The GGUF architecture that computes what `config` computes. Positions pick the family
    (rope: llama or qwen3 by qk_norm; learned: gpt2); a choice the family does not have raises
    ModelFormatError naming it."""
    arch = "gpt2" if config.positions == "learned" else "qwen3" if config.qk_norm else "llama"
    wrong = [f"{name}={getattr(config, name)!r}" for name, value in ARCHITECTURE_FEATURES[arch].items() if getattr(config, name) != value]
    if arch == "gpt2" and config.kv_heads != config.n_head:
        wrong.append(f"n_kv_head={config.n_kv_head} (grouped-query attention)")
    if wrong:
        raise ModelFormatError(
            f"model config: {', '.join(wrong)} has no GGUF equivalent for a model with positions={config.positions!r} "
            f"(it would be GGUF {arch}); supported: {SUPPORTED_CONFIGS}"
        )
    return arch


def llama_cpp_pre_name(pattern: str) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a pre-tokenizer pattern.

    GPT-4's pattern is written as `llama-bpe`: it is Llama 3's with possessive quantifiers
    (`?+`, `++`), which never change a match here because what follows them cannot match what
    they would give back, and with `\\s*[\\r\\n]` for `\\s*[\\r\\n]+`, which match the same text:
    both end at the last newline of the whitespace run. test_interop_gguf checks the claim on
    generated text."""
    for name, known in GGUF_PRE_PATTERNS.items():
        if known == pattern:
            return name
    if pattern == GPT4_PATTERN:
        return "llama-bpe"
    raise ModelFormatError(
        f"tokenizer pattern {pattern!r} has no llama.cpp pre-tokenizer name (a GGUF file can only name one of those "
        "built into llama.cpp); supported patterns: gpt2, gpt4, llama3, smollm"
    )


def write_tokenizer_metadata(writer: GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Add `tokenizer`'s `tokenizer.ggml.*` keys to `writer`, its token list padded to the
    `vocab_size` rows of the model's embedding (ids the tokenizer does not use are `[PADi]`,
    type unused, as llama.cpp's converter writes them)."""
    if tokenizer.vocab_size > vocab_size:
        raise ModelFormatError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is only {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, i in tokenizer.ranks.items():
        if i < tokenizer.vocab_size:  # ids past it stand for bytes the vocabulary lacks (see Tokenizer)
            tokens[i], types[i] = bytes_to_token_string(token), int(TokenType.NORMAL)
    for text, i in tokenizer.special_tokens.items():
        tokens[i], types[i] = text, int(TokenType.CONTROL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(llama_cpp_pre_name(tokenizer.pattern))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{bytes_to_token_string(a)} {bytes_to_token_string(b)}" for a, b in tokenizer.merges()])
    meta = tokenizer.metadata
    # Without these keys llama.cpp assumes id 11 for both (its GPT-2 default); ours fall back to <|endoftext|>.
    bos, eos = meta.get("bos_token_id", tokenizer.eot_id), meta.get("eos_token_id", tokenizer.eot_id)
    if bos is not None:
        writer.add_bos_token_id(int(bos))
    if eos is not None:
        writer.add_eos_token_id(int(eos))
    writer.add_add_bos_token(bool(meta.get("add_bos_token", False)))
    if meta.get("chat_template"):
        writer.add_chat_template(meta["chat_template"])


def _add_model_metadata(writer: GGUFWriter, config: ModelConfig, arch: str, dtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type({"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": LlamaFileType.MOSTLY_Q4_0}.get(dtype, LlamaFileType.ALL_F32))
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.hidden)
    writer.add_head_count(config.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    # Stated, not left to be derived from width / heads: readers differ in what they assume
    # (transformers' GGUF reader takes 128 for qwen3 whatever the file says; see docs/interop.md).
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)


def _export_array(model: GPT, slot: TensorSlot, dtype: str) -> np.ndarray:
    w = torch.cat([model.get_parameter(p).detach() for p in slot.params])
    if slot.rope_heads is not None:
        w = permute_for_llama_cpp(w, slot.rope_heads)
    kind = _stored_as(dtype, tuple(w.shape), slot.gguf_name)
    if kind == "q8_0":
        return quantize_q8_0(w.to("cpu", torch.float32).numpy())
    if kind == "q4_0":
        return quantize_q4_0(w.to("cpu", torch.float32).numpy())
    return w.to("cpu", torch.float16 if kind == "f16" else torch.float32).contiguous().numpy()


# Tensors a 4-bit export keeps in Q8_0: the embedding table and the output head, which turn
# tokens into hidden states and hidden states into logits (a tied head is the table). llama.cpp's
# quantizer keeps them at 6 to 8 bits too (Q6_K by default; gguf-py writes no K-quant, so Q8_0).
KEPT_AT_8_BITS = ("token_embd.weight", "output.weight")


def _stored_as(dtype: str, shape: tuple[int, ...], name: str) -> str:
    """How the tensor `name` of `shape` is written in an export of `dtype`: matrices in that type
    (a quantized one needs rows of whole 32-weight blocks; a q4_0 export keeps KEPT_AT_8_BITS in
    q8_0), 1-D tensors (norms, biases) in f32, as llama.cpp's converter and quantizer do."""
    if len(shape) < 2 or dtype == "f32":
        return "f32"
    if dtype in ("q8_0", "q4_0") and shape[-1] % QUANT_BLOCK:
        return "f16"
    if dtype == "q4_0" and name in KEPT_AT_8_BITS:
        return "q8_0"
    return dtype


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """ggml's roundf, as its reference quantizer computes it in float32."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """GGML's Q8_0 of float32 rows (their length a multiple of 32), as bytes (rows, cols / 32 x
    34): per block of 32 weights a float16 scale d = max|x| / 127, then 32 int8 round(x / d).
    Bit for bit what ggml-quants.c (and gguf-py) write."""
    rows = w.shape[0]
    blocks = w.astype(np.float32).reshape(-1, QUANT_BLOCK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    codes = _round_half_away(blocks * inverse).astype(np.int8).view(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), codes], axis=1).reshape(rows, -1)


def quantize_q4_0(w: np.ndarray) -> np.ndarray:
    """GGML's Q4_0, as bytes (rows, cols / 32 x 18): per block a float16 d = m / -8, m the weight
    of largest magnitude (with its sign), and 32 codes trunc(x / d + 8.5) in 0..15, the first 16
    in the low nibbles and the last 16 in the high ones. Bit for bit ggml-quants.c's reference."""
    rows = w.shape[0]
    blocks = w.astype(np.float32).reshape(-1, QUANT_BLOCK)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1, keepdims=True), axis=-1)
    d = largest / np.float32(-8)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    codes = np.trunc(blocks * inverse + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    packed = codes[:, : QUANT_BLOCK // 2] | (codes[:, QUANT_BLOCK // 2 :] << np.uint8(4))
    return np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1).reshape(rows, -1)


def export_gguf(model: GPT, tokenizer: Tokenizer, path: str | Path, dtype: str = "f32", progress: bool = False) -> Path:
    """Write `model` and `tokenizer` as one GGUF file (architecture llama, qwen3 or gpt2, see
    `gguf_architecture`) that llama.cpp, transformers and `import_gguf` read. `dtype` "f16"
    stores matrices in half precision and 1-D tensors in float32. Tensors are converted and
    written one at a time; the file appears complete or not at all."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export: GGUF dtype {dtype!r} is not supported; choose one of {', '.join(EXPORT_DTYPES)}")
    config = model.config
    arch = gguf_architecture(config)
    llama_cpp_pre_name(tokenizer.pattern)  # refuse before writing anything
    target = check_writable_file(path)
    slots = tensor_slots(config, arch, tied=config.tie_embeddings)
    with written_atomically(target) as tmp:
        writer = GGUFWriter(tmp, arch)
        try:
            _add_model_metadata(writer, config, arch, dtype, name=target.stem)
            write_tokenizer_metadata(writer, tokenizer, config.vocab_size)
            # Header and tensor table first, then the data one tensor at a time: never a second
            # copy of the whole model in memory.
            for slot in slots:
                shape = _slot_shape(model, slot)
                kind = _stored_as(dtype, tuple(shape), slot.gguf_name)
                if kind in ("q8_0", "q4_0"):  # the table takes the bytes' shape with the type
                    per_block = 34 if kind == "q8_0" else 18
                    byte_shape = (*shape[:-1], shape[-1] // QUANT_BLOCK * per_block)
                    qtype = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else gguf.GGMLQuantizationType.Q4_0
                    writer.add_tensor_info(slot.gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                           raw_dtype=qtype)
                    continue
                item = np.dtype(np.float16 if kind == "f16" else np.float32)
                writer.add_tensor_info(slot.gguf_name, shape, item, int(np.prod(shape)) * item.itemsize)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for slot in tqdm(slots, desc="export", unit="tensor", disable=not progress):
                writer.write_tensor_data(_export_array(model, slot, dtype))
        finally:
            writer.close()
    return target
