"""Float linear layers for CPU inference, run by oneDNN on weights packed once at load.

PyTorch's default CPU matmul (MKL's) runs a matrix-vector product, which is what decoding one
token is, on one thread: on the 2-core AMD machine of docs/benchmarks.md it reads float32
weights at about 12 GB/s, a third of the memory bandwidth. oneDNN's linear kernel, given the
weight reordered into its blocked layout ahead of time (what `torch.compile`'s CPU backend does
when it freezes weights), uses every core and vectorises bfloat16: 2x float32's decode rate there,
3-4x bfloat16's, and 5-15% on the large products of a prefill or an evaluation batch.

`pack_linears(model)` swaps each `nn.Linear` for a `PackedLinear` holding only the packed copy,
so the model's memory does not grow (a tied head gets a packed copy of its own). The packed
layer is for inference only: no gradients, CPU only, and the model is not saved afterwards
(the commands that pack it only read from it). Where this PyTorch has no oneDNN, nothing is
swapped.
"""

from functools import cache

import torch
from torch import Tensor, nn


@cache
def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear kernels (x86 and most ARM builds do)."""
    try:
        probe = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), None)
        return torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), probe, None, "none", [], "").shape == (1, 2)
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """y = x W^T + b, with W in oneDNN's blocked layout; inputs in the weight's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        # No batch-size hint: one layout served batch 1, 8 and 960 rows as well as the best hint.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, packed=oneDNN"


def pack_linears(model: nn.Module) -> nn.Module:
    """Every float32 or bfloat16 `nn.Linear` of a CPU model replaced by a `PackedLinear`, in place;
    the model as it was where oneDNN is missing or the model is not on the CPU."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or not onednn_available():
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in (torch.float32, torch.bfloat16):
                setattr(module, name, PackedLinear(child))
    return model
