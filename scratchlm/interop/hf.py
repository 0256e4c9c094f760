"""Hugging Face checkpoints in and out: `import_hf` reads a transformers folder (config.json,
safetensors, tokenizer.json) into our `GPT`; `export_hf` writes a folder that transformers'
`AutoModelForCausalLM` and `AutoTokenizer` load and that gives the same logits.

The conversion is torchtitan's "state-dict adapter": a handful of small pure functions,

    config_from_hf(config.json)   -> (ModelConfig, family)      hf_config(ModelConfig)   -> config.json
    tensor_rules(config, family)  -> how each of our tensors is made of Hugging Face tensors
    from_hf_state_dict(...)       -> our tensors                to_hf_state_dict(model)  -> HF tensors

A rule says "this HF tensor = our named tensors concatenated along rows", transposed for
GPT-2's `Conv1D` (which stores (in, out)). Mostly one tensor each (our q, k, v and SwiGLU gate,
up projections are HF's q_proj, k_proj, v_proj, gate_proj, up_proj); GPT-2 fuses q|k|v as
c_attn. Rotary embeddings need no permutation: our RoPE rotates (x[i], x[i + half]) as
transformers does.

Families: `gpt2` (learned positions, LayerNorm, tanh GELU, biases), `llama` and `mistral`
(RoPE, RMSNorm, SwiGLU, grouped-query attention) and `qwen3` (Llama plus per-head RMSNorm of
queries and keys). Anything our single model file cannot reproduce exactly (scaled RoPE, sliding
windows that bite, partial biases, other activations) is refused with a one-line
`ModelFormatError` naming the file and the key: a checkpoint that loads but computes something
else is worse than one that does not load.

Safety: weights are read only from safetensors, tensor by tensor (`safe_open`), so a sharded
checkpoint never needs twice its size in memory; pickle checkpoints (`pytorch_model.bin`) are
refused, because unpickling can run arbitrary code.
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from scratchlm.devices import TORCH_DTYPES
from scratchlm.atomic_io import OutputFileError, default_mode, write_text_atomic
from scratchlm.errors import ConfigError, InputFileError, ModelFormatError
from scratchlm.model.config import ModelConfig
from scratchlm.model.model import GPT, allocate_on_cpu
from scratchlm.tokenizer import Tokenizer, import_hf_tokenizer, to_hf_tokenizer_json
from scratchlm.tokenizer.formats import read_json

IMPORT_FAMILIES = ("gpt2", "llama", "mistral", "qwen3")
EXPORT_FAMILIES = ("gpt2", "llama", "qwen3")
EXPORT_DTYPES = TORCH_DTYPES  # what safetensors files of Hugging Face models hold
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Model types we know and refuse, with the reason: more useful than "unknown model type".
REFUSED_FAMILIES = {
    "qwen2": "Qwen2 has biases on q/k/v but not on o_proj or the MLP, and scratchlm's bias flag is all-or-nothing",
    "gemma": "Gemma scales embeddings by sqrt(width) and uses (1 + weight) RMSNorm, which scratchlm does not",
    "gemma2": "Gemma 2 soft-caps logits and alternates sliding-window layers, which scratchlm does not",
    "phi3": "Phi-3 uses fused qkv/gate_up tensors with scaled RoPE variants scratchlm does not implement",
}

# transformers' defaults for keys a config.json may leave out (the config classes' defaults).
_DEFAULTS = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "tie_word_embeddings": True},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "max_position_embeddings": 4096 * 32,
                "rms_norm_eps": 1e-6, "sliding_window": 4096, "tie_word_embeddings": False},
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-6, "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 28,
              "tie_word_embeddings": False},
}
# All three compute tanh-approximated GELU (gelu_fast is the same formula, factored differently).
_GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_SILU = ("silu", "swish")

# Tensors that are not weights: GPT-2's causal-mask buffers and old Llama's cached RoPE frequencies.
_IGNORED_TENSORS = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq)$")


# ---- configuration ----------------------------------------------------------------------
def config_from_hf(data: dict, where: str = "config.json") -> tuple[ModelConfig, str]:
    """Our config and the family name for a Hugging Face `config.json`, or a `ModelFormatError`
    naming the key that asks for something we cannot compute exactly."""
    if not isinstance(data, dict):
        raise ModelFormatError(f"{where}: not a Hugging Face config (expected a JSON object)")
    family = data.get("model_type")
    if family in REFUSED_FAMILIES:
        raise ModelFormatError(f"{where}: model_type {family!r} is not supported: {REFUSED_FAMILIES[family]}")
    if family not in IMPORT_FAMILIES:
        raise ModelFormatError(f"{where}: model_type {family!r} is not supported; supported: {', '.join(IMPORT_FAMILIES)}")
    if data.get("quantization_config"):
        method = data["quantization_config"].get("quant_method", "?") if isinstance(data["quantization_config"], dict) else "?"
        raise ModelFormatError(f"{where}: key 'quantization_config' ({method}): quantized checkpoints are not supported; use a float one")
    values = _DEFAULTS[family] | {k: v for k, v in data.items() if v is not None or k in ("num_key_value_heads", "head_dim", "sliding_window")}
    try:
        config = _gpt2_config(values, where) if family == "gpt2" else _llama_config(values, family, where)
    except ConfigError as exc:  # an impossible shape (heads not dividing the width, ...)
        raise ModelFormatError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:  # a value of the wrong type, such as a string for a size
        raise ModelFormatError(f"{where}: malformed value ({type(exc).__name__}: {exc})") from None
    return config, family


def _gpt2_config(v: dict, where: str) -> ModelConfig:
    _require(v["activation_function"] in _GPT2_GELUS, where, "activation_function", v["activation_function"],
             f"scratchlm computes tanh GELU: {', '.join(_GPT2_GELUS)}")
    _require(v.get("scale_attn_weights", True), where, "scale_attn_weights", False, "attention is always scaled by 1/sqrt(head_dim)")
    _require(not v.get("scale_attn_by_inverse_layer_idx", False), where, "scale_attn_by_inverse_layer_idx", True, "no per-layer attention scaling")
    _require(not v.get("add_cross_attention", False), where, "add_cross_attention", True, "decoder-only models only")
    return ModelConfig(
        vocab_size=int(v["vocab_size"]), block_size=int(v.get("n_positions", v.get("n_ctx", 1024))),
        n_layer=int(v["n_layer"]), n_head=int(v["n_head"]), n_embd=int(v["n_embd"]),
        mlp_hidden=int(v["n_inner"]) if v.get("n_inner") else None,
        positions="learned", norm="layernorm", norm_eps=float(v["layer_norm_epsilon"]), mlp="gelu", bias=True,
        tie_embeddings=bool(v["tie_word_embeddings"]), init_std=float(v.get("initializer_range", 0.02)),
    )


def _llama_config(v: dict, family: str, where: str) -> ModelConfig:
    width, heads = int(v["hidden_size"]), int(v["num_attention_heads"])
    max_pos = int(v["max_position_embeddings"])
    _require(v.get("hidden_act", "silu") in _SILU, where, "hidden_act", v.get("hidden_act"), "scratchlm's SwiGLU uses silu")
    head_dim = v["head_dim"] if v["head_dim"] is not None else width // heads
    _require(head_dim * heads == width, where, "head_dim", head_dim,
             f"scratchlm needs head_dim = hidden_size / num_attention_heads = {width}/{heads}")
    attention_bias, mlp_bias = bool(v.get("attention_bias", False)), bool(v.get("mlp_bias", False))
    if family == "llama":  # both or neither: our `bias` flag covers q, k, v, o and the MLP together
        _require(attention_bias == mlp_bias, where, "attention_bias" if attention_bias else "mlp_bias", True,
                 "scratchlm's bias flag covers attention and MLP together")
    else:
        _require(not attention_bias, where, "attention_bias", True, f"{family} has no MLP biases, and scratchlm's bias flag covers both")
    window = v.get("sliding_window")
    if family == "qwen3":
        layer_types = v.get("layer_types") or []
        sliding_layers = "sliding_attention" in layer_types or int(v.get("max_window_layers", 28)) < int(v["num_hidden_layers"])
        uses_window = bool(v.get("use_sliding_window")) and sliding_layers
    else:
        uses_window = family == "mistral"
    # A window at least as long as the context never masks anything: such a model is plain attention.
    _require(not (uses_window and window is not None and int(window) < max_pos), where, "sliding_window", window,
             f"sliding-window attention shorter than the context ({max_pos})")
    return ModelConfig(
        vocab_size=int(v["vocab_size"]), block_size=max_pos, n_layer=int(v["num_hidden_layers"]), n_head=heads,
        n_kv_head=int(v["num_key_value_heads"]) if v["num_key_value_heads"] is not None else None,
        n_embd=width, mlp_hidden=int(v["intermediate_size"]), positions="rope", rope_base=_rope_theta(v, where),
        norm="rmsnorm", norm_eps=float(v["rms_norm_eps"]), mlp="swiglu", bias=attention_bias,
        tie_embeddings=bool(v["tie_word_embeddings"]), qk_norm=family == "qwen3", init_std=float(v.get("initializer_range", 0.02)),
    )


def _rope_theta(v: dict, where: str) -> float:
    """transformers 4 writes `rope_theta` and `rope_scaling`; transformers 5 writes
    `rope_parameters` = {rope_type, rope_theta, ...}. Accept both; refuse any scaling type."""
    theta = v.get("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):
        params = v.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ModelFormatError(f"{where}: key {key!r} is {params!r}, expected an object")
        kind = params.get("rope_type", params.get("type", "default"))
        _require(kind == "default", where, key, kind, "scratchlm implements plain RoPE only; scaling changes the model")
        theta = params.get("rope_theta", theta)
        if "partial_rotary_factor" in params:
            v = v | {"partial_rotary_factor": params["partial_rotary_factor"]}
    _require(float(v.get("partial_rotary_factor", 1.0)) == 1.0, where, "partial_rotary_factor", v.get("partial_rotary_factor"),
             "rotary embedding on part of each head")
    return float(theta if theta is not None else 10000.0)


def _require(ok: object, where: str, key: str, value: object, why: str) -> None:
    if not ok:
        raise ModelFormatError(f"{where}: key {key!r} = {value!r} is not supported ({why})")


def export_family(config: ModelConfig) -> str:
    """The Hugging Face architecture that computes exactly what `config` does, or a
    `ModelFormatError` naming the first feature that has no equivalent."""
    supported = "supported: gpt2 (learned positions, layernorm, gelu, bias), llama (rope, rmsnorm, swiglu), qwen3 (llama + qk_norm)"
    if config.mlp == "relu2":
        raise ModelFormatError(f"export: mlp 'relu2' has no Hugging Face equivalent; {supported}")
    if config.positions == "learned":
        problems = [
            (config.norm != "layernorm", f"norm {config.norm!r} with learned positions"),
            (config.mlp != "gelu", f"mlp {config.mlp!r} with learned positions"),
            (not config.bias, "bias false with learned positions (GPT-2 always has biases)"),
            (config.qk_norm, "qk_norm with learned positions"),
            (config.kv_heads != config.n_head, "grouped-query attention with learned positions"),
        ]
        family = "gpt2"
    else:
        problems = [
            (config.norm != "rmsnorm", f"norm {config.norm!r} with rotary positions"),
            (config.mlp != "swiglu", f"mlp {config.mlp!r} with rotary positions"),
            (config.qk_norm and config.bias, "qk_norm with biases (Qwen3 has no MLP biases)"),
        ]
        family = "qwen3" if config.qk_norm else "llama"
    for bad, what in problems:
        if bad:
            raise ModelFormatError(f"export: {what} has no Hugging Face equivalent; {supported}")
    return family


def hf_config(config: ModelConfig, family: str, dtype: str = "float32", token_ids: dict | None = None) -> dict:
    """`config.json` for `config` as Hugging Face `family`. Keys of both transformers 4
    (`rope_theta`, `torch_dtype`) and 5 (`rope_parameters`, `dtype`) are written, so either reads it."""
    ids = {k: v for k, v in (token_ids or {}).items() if v is not None}
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": config.vocab_size,
              "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std,
              "torch_dtype": dtype, "dtype": dtype, "use_cache": True, **ids}
    if family == "gpt2":
        return common | {
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": config.hidden, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        }
    llama = common | {
        "hidden_size": config.n_embd, "intermediate_size": config.hidden, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim,
        "hidden_act": "silu", "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "attention_bias": config.bias, "attention_dropout": 0.0,
    }
    if family == "llama":
        return llama | {"mlp_bias": config.bias, "pretraining_tp": 1}
    return llama | {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer,
                    "layer_types": ["full_attention"] * config.n_layer}


# ---- tensors ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorRule:
    """The Hugging Face tensor `hf` is our tensors `ours` stacked along rows (dim 0): one
    tensor, or GPT-2's c_attn holding q, k, v. `transposed`: the HF tensor is stored (in, out),
    as GPT-2's Conv1D does."""

    ours: tuple[str, ...]
    hf: str
    transposed: bool = False


def tensor_rules(config: ModelConfig, family: str) -> list[TensorRule]:
    """Every tensor of our model for `config`, and where it lives in a `family` checkpoint."""
    rules: list[TensorRule] = []

    def add(ours: str | tuple[str, ...], hf: str, transposed: bool = False) -> None:
        rules.append(TensorRule((ours,) if isinstance(ours, str) else ours, hf, transposed))

    if family == "gpt2":
        t = "transformer."
        add("embed.weight", t + "wte.weight")
        add("pos_embed.weight", t + "wpe.weight")
        for i in range(config.n_layer):
            o, h = f"blocks.{i}.", f"{t}h.{i}."
            for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2")]:
                add(o + ours + ".weight", h + theirs + ".weight")
                add(o + ours + ".bias", h + theirs + ".bias")
            for ours_modules, theirs in [(("attn.q", "attn.k", "attn.v"), "attn.c_attn"), (("attn.proj",), "attn.c_proj"),
                                         (("mlp.up",), "mlp.c_fc"), (("mlp.down",), "mlp.c_proj")]:
                add(tuple(o + m + ".weight" for m in ours_modules), h + theirs + ".weight", transposed=True)
                add(tuple(o + m + ".bias" for m in ours_modules), h + theirs + ".bias")
        add("norm.weight", t + "ln_f.weight")
        add("norm.bias", t + "ln_f.bias")
    else:
        add("embed.weight", "model.embed_tokens.weight")
        for i in range(config.n_layer):
            o, h = f"blocks.{i}.", f"model.layers.{i}."
            a = h + "self_attn."
            add(o + "norm1.weight", h + "input_layernorm.weight")
            add(o + "norm2.weight", h + "post_attention_layernorm.weight")
            kinds = ("weight", "bias") if config.bias else ("weight",)
            for kind in kinds:
                for ours, theirs in [("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
                                     ("attn.proj", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"),
                                     ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj")]:
                    add(f"{o}{ours}.{kind}", f"{h}{theirs}.{kind}")
            if config.qk_norm:
                add(o + "attn.q_norm.weight", a + "q_norm.weight")
                add(o + "attn.k_norm.weight", a + "k_norm.weight")
        add("norm.weight", "model.norm.weight")
    if not config.tie_embeddings:
        add("head.weight", "lm_head.weight")
    return rules


def _parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return {name: tuple(p.shape) for name, p in GPT(config).named_parameters()}


def iter_from_hf(config: ModelConfig, family: str, tensors: Mapping[str, Tensor],
                 locate: Callable[[str], str] | None = None) -> Iterator[tuple[str, Tensor]]:
    """Our (name, float32 tensor) pairs, one at a time, read from `tensors` (HF names). Checks
    first that nothing is missing or left over, then each shape as it goes. `locate(name)`
    says which file holds a tensor, for messages."""
    locate = locate or (lambda name: "checkpoint")
    rules = tensor_rules(config, family)
    needed = {rule.hf for rule in rules}
    # GPT-2 checkpoints from the original release lack the "transformer." prefix.
    aliases = {name: name.removeprefix("transformer.") for name in needed if name not in tensors and family == "gpt2"}
    for name in needed:
        if name not in tensors and aliases.get(name) not in tensors:
            raise ModelFormatError(f"{locate(name)}: tensor {name!r} is missing (needed for this config.json)")
    used = needed | set(aliases.values())
    for name in tensors:
        tied_head = name == "lm_head.weight" and config.tie_embeddings  # some tied checkpoints store it anyway
        if name not in used and not tied_head and not _IGNORED_TENSORS.search(name):
            raise ModelFormatError(f"{locate(name)}: unexpected tensor {name!r}: not part of a {family} model scratchlm can represent")
    shapes = _parameter_shapes(config)
    for rule in rules:
        key = rule.hf if rule.hf in tensors else aliases[rule.hf]
        tensor = tensors[key]
        if not tensor.is_floating_point():
            raise ModelFormatError(f"{locate(key)}: tensor {key!r} has dtype {tensor.dtype}; only float tensors are supported")
        rows = [shapes[name][0] for name in rule.ours]
        ours = (sum(rows), *shapes[rule.ours[0]][1:])
        expected = ours[::-1] if rule.transposed else ours
        if tuple(tensor.shape) != expected:
            raise ModelFormatError(f"{locate(key)}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {expected} from config.json")
        tensor = (tensor.T if rule.transposed else tensor).float()
        for name, part in zip(rule.ours, tensor.split(rows, dim=0)):
            yield name, part.contiguous()


def from_hf_state_dict(config: ModelConfig, family: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict (float32, our names) from Hugging Face tensors of a `family` model."""
    return dict(iter_from_hf(config, family, tensors))


def to_hf_state_dict(model: GPT, family: str | None = None) -> dict[str, Tensor]:
    """The model's tensors under Hugging Face names (GPT-2's q, k, v fused, Conv1D transposed),
    each its own contiguous copy, as safetensors requires. A tied head is not written: that
    is what transformers expects of a model with tie_word_embeddings."""
    family = family or export_family(model.config)
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    for rule in tensor_rules(model.config, family):
        tensor = torch.cat([state[name].detach() for name in rule.ours], dim=0)  # GPT-2's c_attn: q|k|v
        out[rule.hf] = (tensor.T if rule.transposed else tensor).contiguous()  # cat copied: no tensor shares memory
    return out


class SafetensorsCheckpoint(Mapping):
    """The tensors of `model.safetensors` or of the shards listed in
    `model.safetensors.index.json`, read one at a time on access (never all at once)."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        from safetensors import SafetensorError, safe_open

        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if single.is_file():
            self._files = {folder / single.name: None}
        elif index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelFormatError(f"{index}: no 'weight_map' object listing the shards")
            self._files = {folder / name: None for name in sorted(set(weight_map.values()))}
        else:
            raise _no_weights_error(folder)
        self._where: dict[str, Path] = {}
        for path in self._files:
            if not path.is_file():
                raise ModelFormatError(f"{index}: lists shard {path.name}, which is missing")
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
            except (SafetensorError, OSError) as exc:
                raise ModelFormatError(f"{path}: not a readable safetensors file ({exc})") from None
            self._files[path] = handle
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                self._where[name] = path

    def __getitem__(self, name: str) -> Tensor:
        return self._files[self._where[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def locate(self, name: str) -> str:
        path = self._where.get(name)
        return str(path) if path else str(next(iter(self._files)).parent)


def _no_weights_error(folder: Path) -> ModelFormatError:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        return ModelFormatError(
            f"{folder}: only pickle weights ({pickles[0]}), which scratchlm refuses to load because unpickling can run "
            "arbitrary code; convert them once, where you trust the file, with transformers: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder) writes model.safetensors"
        )
    return ModelFormatError(f"{folder}: no model.safetensors or model.safetensors.index.json")


# ---- tokenizer --------------------------------------------------------------------------
def _optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputFileError(f"{path}: expected a JSON object")
    return data


def _token_string(value: object) -> str | None:
    """tokenizer_config.json stores a special token as a string or as an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    # transformers 5 writes the template to its own file; older versions into tokenizer_config.json.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


def _template_prepends_special(tokenizer_json: dict) -> bool:
    """Does the tokenizer.json post-processor put a special token (BOS) before the text?"""
    post = tokenizer_json.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            return bool(single) and "SpecialToken" in single[0]
    return False


def hf_tokenizer_metadata(folder: Path, tokenizer: Tokenizer, model_config: dict) -> dict:
    """What chat and generation need, gathered from the files transformers spreads it over:
    chat template, BOS/EOS/PAD ids (generation_config.json, then config.json, then the token
    strings of tokenizer_config.json) and whether a BOS token is prepended. When EOS is a list
    (Llama 3 Instruct stops on several tokens), `eos_token_id` is the first and
    `eos_token_ids` all of them."""
    tok_config = _optional_json(folder / "tokenizer_config.json")
    generation = _optional_json(folder / "generation_config.json")
    metadata: dict = {"source": folder.resolve().name}
    template = _chat_template(folder, tok_config)
    if template:
        metadata["chat_template"] = template
    for role in ("bos", "eos", "pad"):
        key = f"{role}_token_id"
        value = next((v for v in (generation.get(key), model_config.get(key)) if v is not None and v != []), None)
        if value is None:
            value = tokenizer.special_tokens.get(_token_string(tok_config.get(f"{role}_token")) or "")
        ids = [i for i in (value if isinstance(value, list) else [value]) if isinstance(i, int) and not isinstance(i, bool)]
        if len(ids) > 1:
            metadata[f"{key}s"] = ids
        if ids:
            metadata[key] = ids[0]
    add_bos = tok_config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _template_prepends_special(_optional_json(folder / "tokenizer.json"))
    metadata["add_bos_token"] = add_bos
    return metadata


def _import_tokenizer(folder: Path, pattern: str | None, model_config: dict) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        extra = [n for n in ("tokenizer.model", "vocab.json") if (folder / n).is_file()]
        found = f" (found {extra[0]}; only the fast-tokenizer file tokenizer.json is read)" if extra else ""
        raise ModelFormatError(f"{folder}: no tokenizer.json{found}; save it with AutoTokenizer.from_pretrained(...).save_pretrained(folder)")
    base = import_hf_tokenizer(path, pattern)
    metadata = base.metadata | hf_tokenizer_metadata(folder, base, model_config)
    return Tokenizer(base.ranks, base.special_tokens, base.pattern, base.name, metadata, base.vocab_size)


def hf_tokenizer_files(tokenizer: Tokenizer, block_size: int) -> tuple[dict, dict]:
    """`tokenizer.json` and `tokenizer_config.json` for `tokenizer`. BOS/EOS default to
    <|endoftext|>, the token our pretraining puts between documents (GPT-2's convention)."""
    ids = export_token_ids(tokenizer)
    names = {i: s for s, i in tokenizer.special_tokens.items()}
    tokenizer_json = to_hf_tokenizer_json(tokenizer)
    add_bos = bool(tokenizer.metadata.get("add_bos_token")) and ids["bos_token_id"] in names
    if add_bos:  # the model was trained with BOS first: let transformers add it as the original did
        bos = names[ids["bos_token_id"]]
        piece = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
        tokenizer_json["post_processor"] = {
            "type": "TemplateProcessing", "single": piece,
            "pair": piece + [{"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [ids["bos_token_id"]], "tokens": [bos]}},
        }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # would turn " ." into "." on decode: not what we encode
    }
    for role in ("bos", "eos", "pad"):
        token_id = ids.get(f"{role}_token_id")
        token_id = token_id[0] if isinstance(token_id, list) else token_id
        if token_id in names:
            config[f"{role}_token"] = names[token_id]
    if tokenizer.metadata.get("chat_template"):
        config["chat_template"] = tokenizer.metadata["chat_template"]
    return tokenizer_json, config


def export_token_ids(tokenizer: Tokenizer) -> dict:
    meta = tokenizer.metadata
    eot = tokenizer.eot_id
    return {
        "bos_token_id": meta.get("bos_token_id", eot),
        "eos_token_id": meta.get("eos_token_ids") or meta.get("eos_token_id", eot),
        "pad_token_id": meta.get("pad_token_id"),
    }


# ---- import -----------------------------------------------------------------------------
def import_hf(folder: str | Path, pattern: str | None = None, progress: bool = True) -> tuple[GPT, Tokenizer]:
    """The model (float32, eval mode, CPU) and tokenizer of a Hugging Face checkpoint folder:
    config.json, model.safetensors (or shards with model.safetensors.index.json) and
    tokenizer.json. `pattern` overrides the tokenizer's pre-tokenizer regex."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"{folder}: no such folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(f"{folder}: no config.json; not a Hugging Face checkpoint folder")
    data = read_json(config_path)
    config, family = config_from_hf(data, str(config_path))
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise _no_weights_error(folder)  # before the tokenizer: a pickle-only folder is the bigger problem
    tokenizer = _import_tokenizer(folder, pattern, data)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFormatError(f"{folder}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json key 'vocab_size' is {config.vocab_size}")
    with torch.device("meta"):
        model = GPT(config)
    model = allocate_on_cpu(model)
    params = dict(model.named_parameters())
    with ExitStack() as stack:
        tensors = SafetensorsCheckpoint(folder, stack)
        pairs = iter_from_hf(config, family, tensors, tensors.locate)
        bar = tqdm(pairs, total=sum(len(rule.ours) for rule in tensor_rules(config, family)), desc="loading weights", unit="tensor",
                   disable=not progress, delay=0.5)
        loaded = set()
        with torch.no_grad():
            for name, tensor in bar:
                params[name].copy_(tensor)
                loaded.add(name)
    if loaded != set(params):  # a parameter the rules do not know would keep uninitialised memory
        raise RuntimeError(f"bug: Hugging Face rules do not cover parameters {sorted(set(params) - loaded)}")
    return model.eval(), tokenizer


def export_hf(model: GPT, tokenizer: Tokenizer, out: str | Path, dtype: str = "float32") -> Path:
    """Write `model` and `tokenizer` as a Hugging Face folder at `out` (gpt2, llama or qwen3
    architecture, weights in `dtype`: float32, bfloat16 or float16).

    The folder is built under a hidden temporary name beside `out` and renamed into place only
    when complete, so a crash never leaves a half-written model that loads. `out` must not
    exist or be an empty folder: mixing a new export into old files could pair new weights
    with a stale config or shard that transformers would then load."""
    out = Path(out)
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export: dtype {dtype!r} is not supported; choose one of {', '.join(EXPORT_DTYPES)}")
    family = export_family(model.config)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ModelFormatError(f"export: the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size} embeddings")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputFileError(f"{out}: already exists and is not an empty folder; choose a new output path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise OutputFileError(f"{out}: cannot write here ({exc.strerror or exc})") from None
    try:
        _write_hf_folder(tmp, model, tokenizer, family, dtype)
        os.chmod(tmp, default_mode(folder=True))  # mkdtemp makes it private (0o700)
        os.replace(tmp, out)  # atomic; replaces `out` only if it is an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_hf_folder(folder: Path, model: GPT, tokenizer: Tokenizer, family: str, dtype: str) -> None:
    from safetensors.torch import save_file

    config = model.config
    tensors = {name: t.to(device="cpu", dtype=EXPORT_DTYPES[dtype]) for name, t in to_hf_state_dict(model, family).items()}
    weights = folder / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})  # transformers checks the "format" key
    with weights.open("rb") as handle:
        os.fsync(handle.fileno())
    ids = export_token_ids(tokenizer)
    tokenizer_json, tokenizer_config = hf_tokenizer_files(tokenizer, config.block_size)
    generation = {k: v for k, v in ids.items() if v is not None}
    files = {
        "config.json": hf_config(config, family, dtype, ids),
        "generation_config.json": generation,
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tokenizer_config,
    }
    for name, content in files.items():
        write_text_atomic(folder / name, json.dumps(content, indent=2, ensure_ascii=False) + "\n")
