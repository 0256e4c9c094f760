"""Faster inference by reading fewer bytes: bfloat16 weights, or int8 weight-only matmuls.

Decoding one token at a time is a matrix-vector product per layer: the time goes into reading
the weights from memory, not into arithmetic. On the 2-core CPU of docs/benchmarks.md, float32
SmolLM2-135M reads about 540 MB per token; bfloat16 halves that, int8 quarters it.

- `cast_for_inference(model, "bfloat16")` converts parameters (the rotary tables stay float32:
  positions past 256 lose their angle's precision in bfloat16).
- `quantize_int8(model)` replaces every linear layer with `Int8Linear`: weights rounded to int8
  with one float scale per output row (absmax / 127), run by PyTorch's weight-only int8 kernel
  (`torch._weight_int8pack_mm`, the one gpt-fast and torchao use) on bfloat16 activations.

Both change the numbers a little: greedy text can part ways with float32's after a while.
"""

import torch
from torch import Tensor, nn

from scratchlm.devices import TORCH_DTYPES
from scratchlm.errors import ConfigError
from scratchlm.model.model import GPT, rope_tables

QUANTIZATIONS = ("none", "int8")


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times a per-row scale."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), self.weight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def cast_for_inference(model: GPT, dtype: str) -> GPT:
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"inference dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    model = model.to(TORCH_DTYPES[dtype])
    if model.config.positions == "rope":
        model.rope_cos, model.rope_sin = rope_tables(model.config, model.config.block_size, model.rope_cos.device)
    return model


def quantize_int8(model: GPT) -> GPT:
    """Int8 weight-only linear layers in a bfloat16 model, in place. The embedding table stays
    bfloat16 (a lookup reads one row; there is nothing to gain), so a tied head gets its own
    int8 copy."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise ConfigError("int8 quantization needs a PyTorch with torch._weight_int8pack_mm (2.3 or newer)")
    model = cast_for_inference(model, "bfloat16")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


def prepare_for_inference(model: GPT, dtype: str = "float32", quantize: str = "none") -> GPT:
    """The model as `--dtype` and `--quantize` ask (int8 implies bfloat16 activations)."""
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantization {quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantize == "int8":
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError("int8 quantization runs on bfloat16 activations; leave --dtype at float32 or bfloat16")
        return quantize_int8(model)
    return cast_for_inference(model, dtype)

