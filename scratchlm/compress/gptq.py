"""GPTQ (Frantar et al. 2022): int4 weights calibrated on activations, not merely rounded.

Round-to-nearest rounds each weight on its own. GPTQ quantizes a layer's input columns one at a
time and, after each, moves the error it made onto the columns not yet quantized, in the
proportions that keep the layer's outputs on the calibration inputs X closest:

    H = X X^T (+ a little damping)                     what the inputs make of the error
    for each column i:  q_i = round(w_i);  e = (w_i - q_i) / [H^-1]_ii
                        w_j -= e [H^-1]_ij  for every later column j

with H^-1 taken through its Cholesky factor, as the paper does. Each group of `group_size`
columns gets its scale and zero (the same asymmetric 16-level grid as round-to-nearest int4,
`model/quantize.py`) from its weights as they stand when the group begins, so the result runs on
the same `Int4Linear` kernel. Blocks are quantized in order, each measured on the outputs of
the blocks already quantized.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from scratchlm.compress.prune import measure_inputs, prunable_layers
from scratchlm.errors import ConfigError
from scratchlm.model.model import GPT
from scratchlm.model.quantize import Int4Linear, cast_for_inference, check_int4, int4_fits, quantize_groups

DAMPING = 0.01  # of the mean diagonal of H: keeps H invertible when some inputs never vary


def gptq_codes(weight: Tensor, hessian: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """GPTQ int4 of `weight` (out, in) given H (in, in): codes (out, in) int32 in 0..15 and
    (in / group_size, out, 2) bfloat16 (scale, zero), as `quantize_groups` returns them."""
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMPING * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rows, cols = w.shape
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    scales_and_zeros = torch.zeros(cols // group_size, rows, 2, dtype=torch.bfloat16)
    for start in range(0, cols, group_size):  # one group at a time: its grid from its current weights
        stop = start + group_size
        block, block_inverse = w[:, start:stop], inverse[start:stop, start:stop]
        _, grid = quantize_groups(block.float(), group_size)
        scales_and_zeros[start // group_size] = grid[0]
        scale, zero = grid[0, :, 0].double(), grid[0, :, 1].double()
        errors = torch.zeros_like(block)
        for i in range(group_size):
            column = block[:, i]
            code = ((column - zero) / scale + 8).round().clamp(0, 15)
            codes[:, start + i] = code.to(torch.int32)
            error = (column - ((code - 8) * scale + zero)) / block_inverse[i, i]
            block[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, stop:] -= errors @ inverse[start:stop, stop:]
    return codes, scales_and_zeros


@torch.no_grad()
def quantize_int4_gptq(model: GPT, calibration: Tensor, group_size: int = 64, batch_size: int = 4,
                       on_block: Callable[[int, int], None] | None = None) -> GPT:
    """The model with every linear layer of its blocks GPTQ-quantized to int4 (and the head
    rounded to nearest), in bfloat16, on the CPU kernel of `Int4Linear` (a layer it cannot take,
    `int4_fits`, stays bfloat16). `calibration`: (N, T) token ids."""
    check_int4(model, group_size)
    if calibration.numel() == 0:
        raise ConfigError("GPTQ needs calibration text (its activations weigh the rounding errors)")
    model.eval()
    blocks = model.numbered_blocks()
    for done, (index, block) in enumerate(blocks, 1):
        layers = [(name, m) for name, m in prunable_layers(model) if name.startswith(f"blocks.{index}.") and int4_fits(m)]
        hessians = measure_inputs(model, block, [m for _, m in layers], calibration, batch_size, outer=True)
        for (name, linear), hessian in zip(layers, hessians):
            codes, grid = gptq_codes(linear.weight, hessian, group_size)
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, Int4Linear.from_codes(codes, grid, linear.bias, group_size))
        if on_block is not None:
            on_block(done, len(blocks))
    model = cast_for_inference(model, "bfloat16")  # embedding, norms; the int4 layers keep their buffers
    if isinstance(model.head, nn.Linear) and int4_fits(model.head):
        model.head = Int4Linear(model.head, group_size)
    return model
