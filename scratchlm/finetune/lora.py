"""LoRA: low-rank adapters on chosen linear layers (Hu et al. 2021, arXiv:2106.09685).

A frozen weight W (out x in) gets a trainable update B @ A of rank r (A: r x in, B: out x r),
scaled by alpha / r:

    y = x W^T + b + dropout(x) A^T B^T * (alpha / r)

Only A and B train, so optimizer state and gradients shrink from out * in to r * (out + in)
numbers per layer, and the adapter file holds only A and B. `merge_lora` folds B @ A into W,
giving back a plain model of the original shape that runs as fast as the base.

    model = apply_lora(model, LoRAConfig(rank=8, targets=("attn.q", "attn.v")))
    ...train the parameters with requires_grad...
    save_adapter("adapter.safetensors", model, config)   # A and B only, config in the metadata
    model = merge_lora(model)                              # plain nn.Linear layers again

Targets are module-name suffixes: "attn.q" adapts every block's query projection, "0.attn.q"
only block 0's. The default targets (every linear layer of a block) may name a layer a model
lacks (a GELU MLP has no "mlp.gate"); a target given by the user that matches nothing is an
error. The head is not adapted by default: when it is tied to the token embedding
(`tie_embeddings`), one matrix serves both, and a merged update could not change one without
the other, so adapting a tied head is refused.
"""

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from scratchlm.atomic_io import written_atomically
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.finetune.config import DEFAULT_TARGETS, LoRAConfig

M = TypeVar("M", bound=nn.Module)

METADATA_KEY = "scratchlm_lora"  # the adapter file's metadata entry holding the LoRAConfig as JSON


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update B @ A scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        # A as nn.Linear initialises its weight (Kaiming-uniform, a = sqrt(5)), B zero: the update
        # B @ A starts at exactly zero, so a fresh adapter leaves the model's outputs unchanged
        # while B still receives a gradient on the first step (Hu et al. section 4.1).
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # Two thin matmuls (in -> rank -> out), never the full out x in matrix B @ A.
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    def delta_weight(self) -> Tensor:
        """B @ A * scale, (out, in), in float32: in bf16 the product would lose the small update."""
        return (self.lora_b.detach().float() @ self.lora_a.detach().float()) * self.scale

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (in place)."""
        with torch.no_grad():
            weight = self.base.weight
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The adapted layers of `model`, by module name, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def target_matches(name: str, target: str) -> bool:
    """Whether module `name` ("blocks.0.attn.q") is meant by `target` ("attn.q", "0.attn.q")."""
    return name == target or name.endswith("." + target)


def linear_layer_kinds(model: nn.Module) -> list[str]:
    """Names of the linear layers without the block number ("attn.q", "head"), each once: what
    an error lists as the valid targets."""
    kinds: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parts = name.split(".")
            last_index = max((i for i, part in enumerate(parts) if part.isdigit()), default=-1)
            kind = ".".join(parts[last_index + 1 :])
            if kind not in kinds:
                kinds.append(kind)
    return kinds


def _shared_weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> names of every module that holds it directly (two for a tied head)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(name)
    return owners


def plan_lora(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Linear]:
    """The linear layers `config.targets` selects, by name; the model is not changed. ConfigError
    for a target that matches nothing (naming the valid ones; the defaults need only match
    something between them), a model that already has adapters, and a layer whose weight is
    shared with another module (a tied head)."""
    existing = lora_layers(model)
    if existing:
        raise ConfigError(f"model already has LoRA adapters ({existing[0][0]}); merge them first or start from the base model")
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    chosen = {name: module for name, module in linears.items() if any(target_matches(name, t) for t in config.targets)}
    # The defaults name the layers of every MLP kind (a GELU MLP has no gate); a user's target
    # that matches nothing is a typo.
    unmatched = [t for t in config.targets if not any(target_matches(name, t) for name in linears)]
    if unmatched and (config.targets != DEFAULT_TARGETS or not chosen):
        raise ConfigError(f"LoRA config: target {unmatched[0]!r} matches no linear layer of the model "
                          f"(linear layers: {', '.join(linear_layer_kinds(model))})")
    owners = _shared_weight_owners(model)
    for name, module in chosen.items():
        others = [owner for owner in owners.get(id(module.weight), []) if owner != name]
        if others:
            raise ConfigError(f"LoRA config: {name!r} shares its weight with {others[0]!r} (tied embeddings), so a "
                              f"merged update would change both; leave it out of targets")
    return chosen


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: M, config: LoRAConfig) -> M:
    """Freeze every parameter of `model` and wrap the target linear layers in `LoRALinear`, in
    place; afterwards only the adapters' A and B have requires_grad. Returns `model`."""
    chosen = plan_lora(model, config)  # validates everything before the model changes
    model.requires_grad_(False)
    for name, linear in chosen.items():
        _replace_module(model, name, LoRALinear(linear, config.rank, config.alpha, config.dropout))
    return model


def merge_lora(model: M) -> M:
    """Fold every adapter into its base weight and put the plain `nn.Linear` back, in place; the
    outputs are unchanged up to rounding, and `save_model_folder` then writes an ordinary model.
    Parameters stay frozen as `apply_lora` left them. A model without adapters is returned as is."""
    for name, layer in lora_layers(model):
        _replace_module(model, name, layer.merged())
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that will train, all parameters); a tied matrix counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters alone: "<layer>.lora_a" and "<layer>.lora_b" for every adapted layer."""
    tensors: dict[str, Tensor] = {}
    for name, layer in lora_layers(model):
        tensors[f"{name}.lora_a"] = layer.lora_a.detach()
        tensors[f"{name}.lora_b"] = layer.lora_b.detach()
    return tensors


def _check_matches_config(layers: list[tuple[str, LoRALinear]], config: LoRAConfig) -> None:
    """The adapters in a model were made with `config`: same rank and alpha (alpha decides how A
    and B are read, so a mismatch would silently scale the update) and a target naming each."""
    for name, layer in layers:
        if layer.rank != config.rank or layer.alpha != config.alpha:
            raise ConfigError(f"the model's LoRA layer {name!r} has rank {layer.rank} and alpha {layer.alpha}, "
                              f"the LoRA config says rank {config.rank} and alpha {config.alpha}")
        if not any(target_matches(name, t) for t in config.targets):
            raise ConfigError(f"the model's LoRA layer {name!r} is named by none of the LoRA config's targets "
                              f"({', '.join(config.targets)})")


def save_adapter(path: str | Path, model: nn.Module, config: LoRAConfig) -> Path:
    """Write the adapters of `model` (A and B only; a few MB where the model is GBs) as
    safetensors, atomically, with `config` as JSON in the file's metadata."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("model has no LoRA adapters to save; apply_lora first")
    _check_matches_config(layers, config)
    tensors = {key: value.cpu().contiguous() for key, value in lora_state_dict(model).items()}
    with written_atomically(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(config.to_dict())})
    return Path(path)


def read_adapter(path: str | Path) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """The config and tensors (on the CPU) of an adapter file written by `save_adapter`."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InputFileError(f"{path}: not a safetensors file ({exc})") from None
    if METADATA_KEY not in metadata:
        raise InputFileError(f"{path}: no LoRA config in its metadata; not an adapter written by save_adapter")
    try:
        data = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path}: LoRA config in the metadata is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputFileError(f"{path}: LoRA config in the metadata is not a JSON object")
    try:
        config = LoRAConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config, tensors


def _expected_shapes(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """Adapter tensor name -> shape, for the adapters `model` has or `config` would give it."""
    layers = lora_layers(model)
    if layers:
        return {key: tuple(value.shape) for key, value in lora_state_dict(model).items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, linear in plan_lora(model, config).items():
        shapes[f"{name}.lora_a"] = (config.rank, linear.in_features)
        shapes[f"{name}.lora_b"] = (linear.out_features, config.rank)
    return shapes


def _iter_mismatches(expected: dict[str, tuple[int, ...]], tensors: dict[str, Tensor]) -> Iterator[str]:
    """What does not fit, in the model's layer order (the file's order is alphabetical)."""
    for key, shape in expected.items():
        if key not in tensors:
            yield f"tensor {key!r} is missing from the adapter"
        elif tuple(tensors[key].shape) != shape:
            yield f"tensor {key!r} has shape {list(tensors[key].shape)}, this model needs {list(shape)}"
    for key in tensors:
        if key not in expected:
            yield f"tensor {key!r} has no LoRA layer to go to in this model"


def load_adapter(path: str | Path, model: M) -> M:
    """Load an adapter file into `model`, in place: a base model gets `apply_lora` with the file's
    config first; a model that already has adapters must have the same ones. Every tensor's name
    and shape is checked before the model changes (ConfigError naming the first that does not fit)."""
    config, tensors = read_adapter(path)
    layers = lora_layers(model)
    try:
        if layers:
            _check_matches_config(layers, config)
        expected = _expected_shapes(model, config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    problem = next(_iter_mismatches(expected, tensors), None)
    if problem is not None:
        raise ConfigError(f"{path}: {problem}")
    if not layers:
        apply_lora(model, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)  # copy_ converts to the parameter's device and dtype
    return model


__all__ = [
    "LoRALinear", "apply_lora", "linear_layer_kinds", "load_adapter", "lora_layers",
    "lora_state_dict", "merge_lora", "plan_lora", "read_adapter", "save_adapter", "target_matches", "trainable_parameters",
]
