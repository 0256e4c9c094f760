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
from scratchlm.model.packed import pack_linears

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

    @classmethod
    def from_tensors(cls, weight: Tensor, scale: Tensor, bias: Tensor | None) -> "Int8Linear":
        """A layer of int8 rows and their scales as saved (`quantized_tensors`). Both are copied:
        the kernel reads them with aligned vector loads, and a tensor read from a file may sit at
        any offset of its buffer."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.register_buffer("weight", weight.to(torch.int8).clone())
        layer.register_buffer("scale", scale.to(torch.bfloat16).clone())
        layer.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)
        layer.out_features, layer.in_features = weight.shape
        return layer

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.scale.float()[:, None]

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

    def codes(self) -> Tensor:
        """The (out, in) int32 codes behind the kernel's packed layout, read back through the
        kernel itself (an identity matrix times codes, with scale 1 and code 8 worth 8, is exact),
        so no knowledge of that layout is needed."""
        groups = self.in_features // self.group_size
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(groups, self.out_features, 2).contiguous()
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, unit).T.round().to(torch.int32)

    def dequantized(self) -> Tensor:
        return dequantize_groups(self.codes(), self.scales_and_zeros)

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


def check_int4(model: GPT, group_size: int) -> None:
    """A ConfigError unless the int4 kernel can run `model`'s linear layers in groups of `group_size`."""
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size}")
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        raise ConfigError("int4 quantization needs a PyTorch with torch._weight_int4pack_mm_for_cpu (2.5 or newer)")
    if model.embed.weight.device.type != "cpu":
        raise ConfigError("int4 runs on the CPU kernel here; on a GPU use --quantize int8 or --dtype bfloat16")
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and int4_fits(layer) and layer.in_features % group_size:
            fitting = ", ".join(str(g) for g in GROUP_SIZES if layer.in_features % g == 0) or "none"
            raise ConfigError(f"int4 group size {group_size} does not divide the width {layer.in_features} of {name}; "
                              f"choose one of {fitting}")


def quantize_int4(model: GPT, group_size: int = 64) -> GPT:
    """Int4 weight-only linear layers (`Int4Linear`) in a bfloat16 model, in place, on the CPU.
    The embedding table stays bfloat16, so a tied head gets its own int4 copy; a layer the
    kernel cannot take (`int4_fits`) stays bfloat16."""
    check_int4(model, group_size)
    model = cast_for_inference(model, "bfloat16")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and int4_fits(child):
                setattr(module, name, Int4Linear(child, group_size))
    return model


def prepare_for_inference(model: GPT, dtype: str = "float32", quantize: str = "none", group_size: int = 64) -> GPT:
    """The model as `--dtype` and `--quantize` ask (int8 and int4 imply bfloat16 activations;
    `group_size` is int4's). A model opened quantized from its folder runs as it is. A float
    model on the CPU gets oneDNN's packed linear layers (`scratchlm.model.packed`): inference
    only, from here on."""
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantization {quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    done = quantization_of(model)
    if done is not None:  # a quantized model folder
        if quantize != "none":
            raise ConfigError(f"the model is already {done['method']}-quantized; leave out --quantize")
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"an {done['method']} model runs on bfloat16 activations; leave --dtype at float32 or bfloat16")
        return model
    if quantize != "none" and dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"{quantize} quantization runs on bfloat16 activations; leave --dtype at float32 or bfloat16")
    if quantize == "int8":
        return quantize_int8(model)
    if quantize == "int4":
        return quantize_int4(model, group_size)
    return pack_linears(cast_for_inference(model, dtype))



# A quantized model in a model folder (scratchlm/model/folder.py). The header's "quantization"
# entry says how to read it; the tensors are in a layout of our own, not a kernel's (the int4
# kernels pack differently by version and device), and are packed for the kernel when loaded.

QuantizedLinear = Int8Linear | Int4Linear


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}


def quantization_of(model: nn.Module) -> dict | None:
    """How `model` is quantized, as a model folder header records it: {"method": "int8" | "int4",
    "group_size": N (int4 only), "layers": [names of the quantized linear layers]}; None when
    no layer is."""
    layers = quantized_layers(model)
    if not layers:
        return None
    methods = {"int4" if isinstance(m, Int4Linear) else "int8" for m in layers.values()}
    group_sizes = {m.group_size for m in layers.values() if isinstance(m, Int4Linear)}
    if len(methods) > 1 or len(group_sizes) > 1:
        raise ConfigError("a model mixing int8 and int4 layers, or int4 group sizes, has no folder format")
    info: dict = {"method": methods.pop(), "layers": list(layers)}
    if group_sizes:
        info["group_size"] = group_sizes.pop()
    return info


def require_float(model: nn.Module, path: object, what: str) -> None:
    """A one-line error when `model` (opened from `path`) is quantized and `what` needs float weights."""
    info = quantization_of(model)
    if info is not None:
        raise ConfigError(f"{path}: holds an {info['method']}-quantized model, and {what} needs float weights; "
                          "use the float model it was quantized from")


def quantized_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a model folder stores for a quantized `model`. An int8 layer: its rows
    ("weight", int8 (out, in)) and per-row scales ("scale"). An int4 layer: its codes two to a
    byte, the even input in the low nibble ("codes", uint8 (out, in / 2)), and its (scale, zero)
    groups ("scales_and_zeros", as `quantize_groups` returns them). Everything else as the model
    holds it; a tensor shared by two names (a tied head left unquantized) once."""
    layers = quantized_layers(model)
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] in layers or id(tensor.untyped_storage()) in seen:
            continue
        seen.add(id(tensor.untyped_storage()))
        tensors[name] = tensor.contiguous()
    for name, layer in layers.items():
        if isinstance(layer, Int4Linear):
            codes = layer.codes().to(torch.uint8)
            tensors[f"{name}.codes"] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
            tensors[f"{name}.scales_and_zeros"] = layer.scales_and_zeros.contiguous()
        else:
            tensors[f"{name}.weight"], tensors[f"{name}.scale"] = layer.weight, layer.scale
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach()
    return tensors


def load_quantized_layers(model: GPT, tensors: dict[str, Tensor], info: dict) -> dict[str, Tensor]:
    """Put the quantized layers `info` lists (a folder header's "quantization") into the float
    skeleton `model`, cast to bfloat16, from `tensors` (`quantized_tensors`' layout); returns the
    tensors left for the rest of the model. A missing or misshapen tensor is a ValueError."""
    method, group_size, names = info.get("method"), info.get("group_size"), info.get("layers")
    if method not in ("int8", "int4") or not isinstance(names, list):
        raise ValueError(f"quantization must give a method (int8 or int4) and a list of layers, not {info!r}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size!r}")
    cast_for_inference(model, "bfloat16")
    rest = dict(tensors)
    for name in names:
        try:
            linear = model.get_submodule(name)
        except (AttributeError, TypeError):
            linear = None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantized layer {name!r} is not a linear layer of this model")
        bias = rest.pop(f"{name}.bias", None)
        try:
            if method == "int4":
                packed = rest.pop(f"{name}.codes")
                codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)
                layer: QuantizedLinear = Int4Linear.from_codes(codes, rest.pop(f"{name}.scales_and_zeros"), bias, group_size)
                expected_grid = (linear.in_features // group_size, linear.out_features, 2)
                if tuple(layer.scales_and_zeros.shape) != expected_grid:
                    raise ValueError(f"{name}.scales_and_zeros has shape {tuple(layer.scales_and_zeros.shape)}, not {expected_grid}")
            else:
                layer = Int8Linear.from_tensors(rest.pop(f"{name}.weight"), rest.pop(f"{name}.scale"), bias)
        except KeyError as exc:
            raise ValueError(f"no tensor {exc.args[0]} for quantized layer {name}") from None
        if (layer.out_features, layer.in_features) != (linear.out_features, linear.in_features):
            raise ValueError(f"quantized layer {name} is {layer.out_features}x{layer.in_features}, "
                             f"not {linear.out_features}x{linear.in_features}")
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, layer)
    return rest


def dequantize(model: GPT) -> GPT:
    """A float32 model of the weights a quantized `model`'s codes stand for, in place: each
    quantized layer back to an nn.Linear. A tied head quantized apart from the embedding table
    computes with weights of its own, so the model is untied."""
    for name, layer in quantized_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight = nn.Parameter(layer.dequantized())
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().float())
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, linear)
    if model.config.tie_embeddings and model.head is not None and model.head.weight is not model.embed.weight:
        model.config = model.config.replace(tie_embeddings=False)
    return cast_for_inference(model, "float32")
