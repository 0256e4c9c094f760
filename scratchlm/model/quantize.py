"""Faster inference by reading fewer bytes: bfloat16 weights, or int8 or int4 weight-only matmuls.

Decoding one token at a time is a matrix-vector product per layer: the time goes into reading
the weights from memory, not into arithmetic. On the 2-core CPU of docs/benchmarks.md, float32
SmolLM2-135M reads about 540 MB per token; bfloat16 halves that, int8 quarters it.

- `cast_for_inference(model, "bfloat16")` converts parameters (the rotary tables stay float32:
  positions past 256 lose their angle's precision in bfloat16).
- `quantize_int8(model)` replaces every linear layer with `Int8Linear`: weights rounded to int8
  with one float scale per output row (absmax / 127), run by PyTorch's weight-only int8 kernel
  (`torch._weight_int8pack_mm`, the one gpt-fast and torchao use) on bfloat16 activations.
- `quantize_int4(model, group_size)` replaces them with `Int4Linear`: each run of `group_size`
  weights along a row rounded to 16 levels between its minimum and maximum (asymmetric
  round-to-nearest, a bfloat16 scale and offset per group), packed two to a byte and run by
  PyTorch's CPU int4 kernel (`torch._weight_int4pack_mm_for_cpu`). An eighth of float32's bytes.

Both change the numbers a little: greedy text can part ways with float32's after a while.
"""

import torch
from torch import Tensor, nn

from scratchlm.devices import TORCH_DTYPES
from scratchlm.errors import ConfigError
from scratchlm.model.model import GPT, rope_tables

QUANTIZATIONS = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel takes


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


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as 4-bit codes q in 0..15, one bfloat16 (scale, zero) per
    group of `group_size` inputs of each row: W ~ (q - 8) * scale + zero, where zero is the
    value of code 8. (PyTorch's packed layout and its zero in the float domain.)"""

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        if in_features % group_size:
            raise ConfigError(f"int4 group size {group_size} does not divide the width {in_features} of a linear layer; "
                              f"choose one of {', '.join(str(g) for g in GROUP_SIZES if in_features % g == 0) or 'none'}")
        codes, scales_and_zeros = quantize_groups(linear.weight.detach().float(), group_size)
        self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size

    @classmethod
    def from_codes(cls, codes: Tensor, scales_and_zeros: Tensor, bias: Tensor | None, group_size: int) -> "Int4Linear":
        """A layer of codes and (scale, zero) groups made elsewhere (GPTQ), in `quantize_groups`' layout."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        layer.register_buffer("scales_and_zeros", scales_and_zeros)
        layer.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        layer.out_features, layer.in_features = codes.shape
        layer.group_size = group_size
        return layer

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def quantize_groups(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Asymmetric round-to-nearest int4 of `weight` (out, in) in groups of `group_size` inputs:
    codes (out, in) int32 in 0..15, and (in / group_size, out, 2) bfloat16 (scale, zero) with
    weight ~ (code - 8) * scale + zero. The group's minimum and maximum are codes 0 and 15."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // group_size, group_size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    codes = ((groups - low) / scale).round().clamp(0, 15)
    zero = low + 8 * scale
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return codes.reshape(rows, cols).to(torch.int32), scales_and_zeros


def dequantize_groups(codes: Tensor, scales_and_zeros: Tensor) -> Tensor:
    """The float weights int4 codes and their (scale, zero) groups stand for (`quantize_groups`)."""
    rows, cols = codes.shape
    scale_zero = scales_and_zeros.float().transpose(0, 1)  # (out, groups, 2)
    groups = codes.float().reshape(rows, scale_zero.shape[1], -1)
    return ((groups - 8) * scale_zero[..., :1] + scale_zero[..., 1:]).reshape(rows, cols)


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


def int4_fits(linear: nn.Linear) -> bool:
    """Whether the int4 kernel takes the layer: its packing needs outputs in multiples of 16 (a
    head over an unpadded vocabulary of another size stays bfloat16)."""
    return linear.out_features % 16 == 0


def quantize_int4(model: GPT, group_size: int = 64) -> GPT:
    """Int4 weight-only linear layers (`Int4Linear`) in a bfloat16 model, in place, on the CPU.
    The embedding table stays bfloat16, so a tied head gets its own int4 copy; a layer the
    kernel cannot take (`int4_fits`) stays bfloat16."""
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size}")
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        raise ConfigError("int4 quantization needs a PyTorch with torch._weight_int4pack_mm_for_cpu (2.5 or newer)")
    if model.embed.weight.device.type != "cpu":
        raise ConfigError("int4 runs on the CPU kernel here; on a GPU use --quantize int8 or --dtype bfloat16")
    model = cast_for_inference(model, "bfloat16")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and int4_fits(child):
                setattr(module, name, Int4Linear(child, group_size))
    return model


def prepare_for_inference(model: GPT, dtype: str = "float32", quantize: str = "none", group_size: int = 64) -> GPT:
    """The model as `--dtype` and `--quantize` ask (int8 and int4 imply bfloat16 activations;
    `group_size` is int4's)."""
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantization {quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantize != "none" and dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"{quantize} quantization runs on bfloat16 activations; leave --dtype at float32 or bfloat16")
    if quantize == "int8":
        return quantize_int8(model)
    if quantize == "int4":
        return quantize_int4(model, group_size)
    return cast_for_inference(model, dtype)

