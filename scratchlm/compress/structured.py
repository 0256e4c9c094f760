"""Structured pruning: a smaller model, not a sparser one. Whole blocks (depth) or MLP channels
(width) go, chosen by an importance measured on calibration text; what is left is an ordinary
model with fewer layers or a narrower MLP, smaller on disk and faster everywhere.

    depth   Block Influence (Men et al. 2024, "ShortGPT"): 1 - the mean cosine similarity
            between a block's input and output hidden states. A block that barely turns the
            residual stream does little; the lowest-scoring blocks are removed.
    width   each MLP channel's activation norm, the input of `mlp.down` over the calibration
            tokens (the activation-based importance of Minitron, Muralidharan et al. 2024). Each
            block keeps its own strongest channels, the same number in every block (one
            `mlp_hidden` in the config), rounded to a multiple of 64 so that int4 still fits.

Cuts this coarse cost quality that no weight update has yet restored: `scratchlm.compress.
distill` recovers most of it by distillation from the unpruned model.
"""

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from scratchlm.compress.distill import DistillConfig, distill, held_out_kl
from scratchlm.compress.prune import check_calibration_size, check_out_folder, measure_inputs, read_calibration
from scratchlm.errors import ConfigError
from scratchlm.model.model import GPT, count_params

STRUCTURES = ("depth", "width")


@dataclass
class StructuredReport:
    method: str
    requested: float
    params_before: int
    params_after: int
    removed_blocks: list[int] = field(default_factory=list)  # depth: original layer numbers
    importance: list[float] = field(default_factory=list)  # depth: each original block's influence
    hidden_before: int | None = None  # width: MLP channels per block
    hidden_after: int | None = None
    distill_steps: int = 0
    held_out: dict[str, dict[str, float]] = field(default_factory=dict)  # "pruned" / "distilled" -> val_kl, val_loss

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self) | {"reduction": round(1 - self.params_after / self.params_before, 4)}


def check_structure(method: str, sparsity: float) -> None:
    if method not in STRUCTURES:
        raise ConfigError(f"structured pruning method {method!r} is not one of {', '.join(STRUCTURES)}")
    if not 0.0 < sparsity < 1.0:
        raise ConfigError(f"sparsity must be between 0 and 1 (exclusive), not {sparsity}")


@torch.no_grad()
def block_influence(model: GPT, calibration: Tensor, batch_size: int = 4) -> list[float]:
    """Each block's Block Influence: 1 - mean over calibration tokens of cos(input, output)."""
    sums = [0.0] * len(model.blocks)
    count = 0

    def hook(index: int):
        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            cos = torch.nn.functional.cosine_similarity(args[0].double(), output.double(), dim=-1)
            sums[index] += float(cos.sum())
        return record

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(model.blocks)]
    device = model.embed.weight.device
    try:
        for start in range(0, calibration.shape[0], batch_size):
            batch = calibration[start : start + batch_size].to(device)
            model(batch)
            count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [1.0 - total / count for total in sums]


def drop_blocks(model: GPT, remove: list[int]) -> GPT:
    """`model` without the blocks numbered in `remove`, in place; the rest keep their order."""
    if not remove or len(set(remove)) >= len(model.blocks):
        raise ConfigError(f"depth pruning must remove at least one block and keep one, not {len(set(remove))} of {len(model.blocks)}")
    model.blocks = nn.ModuleList(block for i, block in enumerate(model.blocks) if i not in set(remove))
    model.config = model.config.replace(n_layer=len(model.blocks))
    return model


@torch.no_grad()
def channel_importance(model: GPT, calibration: Tensor, batch_size: int = 4) -> list[Tensor]:
    """Each block's MLP channels' activation norms: the square root of the sum over calibration
    tokens of the squared input of `mlp.down`."""
    downs = [block.mlp.down for block in model.blocks]
    squares = measure_inputs(model, model.blocks[-1], downs, calibration, batch_size)
    return [total.sqrt() for total in squares]


def width_to_keep(hidden: int, sparsity: float) -> int:
    """MLP channels left after removing `sparsity` of `hidden`: a multiple of 64 when the MLP is
    wide enough for one (int4's groups), at least one."""
    keep = hidden * (1 - sparsity)
    return max(64, round(keep / 64) * 64) if hidden >= 128 else max(1, round(keep))


@torch.no_grad()
def narrow_mlp(model: GPT, keep: list[Tensor]) -> GPT:
    """Every block's MLP cut to the channels `keep[i]` lists (block i's, all of one length), in place."""
    width = {len(k) for k in keep}
    if len(width) != 1:
        raise ValueError("every block must keep the same number of MLP channels")
    for block, channels in zip(model.blocks, keep):
        mlp = block.mlp
        channels = channels.sort().values.to(mlp.down.weight.device)
        for name in ("gate", "up"):
            layer = getattr(mlp, name, None)
            if layer is not None:
                setattr(mlp, name, _rows(layer, channels))
        mlp.down = _columns(mlp.down, channels)
    model.config = model.config.replace(mlp_hidden=width.pop())
    return model


def _rows(layer: nn.Linear, rows: Tensor) -> nn.Linear:
    cut = nn.Linear(layer.in_features, len(rows), bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype)
    cut.weight.copy_(layer.weight[rows])
    if layer.bias is not None:
        cut.bias.copy_(layer.bias[rows])
    return cut


def _columns(layer: nn.Linear, columns: Tensor) -> nn.Linear:
    cut = nn.Linear(len(columns), layer.out_features, bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype)
    cut.weight.copy_(layer.weight[:, columns])
    if layer.bias is not None:
        cut.bias.copy_(layer.bias)
    return cut


def prune_structure(model: GPT, method: str, sparsity: float, calibration: Tensor, batch_size: int = 4) -> StructuredReport:
    """Remove `sparsity` of `model`'s blocks (depth) or of its MLP channels (width), the least
    important on `calibration` (N, T) token ids, in place."""
    check_structure(method, sparsity)
    if calibration.numel() == 0:
        raise ConfigError(f"{method} pruning needs calibration text (its activations measure importance)")
    model.eval()
    report = StructuredReport(method, sparsity, count_params(model.config), 0)
    if method == "depth":
        influence = block_influence(model, calibration, batch_size)
        count = round(len(model.blocks) * sparsity)
        if not 1 <= count < len(model.blocks):
            raise ConfigError(f"depth pruning {sparsity:.0%} of {len(model.blocks)} blocks removes {count}; "
                              "it must remove at least one and keep one")
        report.importance = [round(x, 6) for x in influence]
        report.removed_blocks = sorted(sorted(range(len(influence)), key=influence.__getitem__)[:count])
        drop_blocks(model, report.removed_blocks)
    else:
        hidden = model.config.hidden
        kept = width_to_keep(hidden, sparsity)
        if kept >= hidden:
            raise ConfigError(f"width pruning {sparsity:.0%} of {hidden} MLP channels keeps all of them "
                              "(channels go in multiples of 64); ask for more")
        norms = channel_importance(model, calibration, batch_size)
        narrow_mlp(model, [norm.topk(kept).indices for norm in norms])
        report.hidden_before, report.hidden_after = hidden, kept
    report.params_after = count_params(model.config)  # the config follows every cut
    return report


DISTILL_WINDOWS = 4096  # at most this many windows of calibration text to distil on
HELD_OUT_WINDOWS = 16  # at most this many of them held out to measure the distillation


def prune_structure_model(model_path: str | Path, out: str | Path, method: str, sparsity: float = 0.25,
                          calibration: str | Path | None = None, sequences: int = 32, length: int = 256,
                          distill_config: DistillConfig | None = None, device: str = "cpu", force: bool = False,
                          note: Callable[[str], None] | None = None, progress: bool = True) -> StructuredReport:
    """Cut blocks (depth) or MLP channels (width) from the language model at `model_path`
    (anything `open_model` opens), measured on `sequences` windows of the calibration text (the
    file `calibration`, else the embedded corpus); with `distill_config`, distil the cut model
    from the whole one on up to DISTILL_WINDOWS windows of the same text, an eighth of them (at
    most HELD_OUT_WINDOWS) held out. Writes the model folder `out`, prune_report.json, and the distillation's run files in
    out/distill/."""
    from scratchlm.atomic_io import write_text_atomic
    from scratchlm.interop import open_model
    from scratchlm.model.folder import save_model_folder
    from scratchlm.model.quantize import require_float

    check_structure(method, sparsity)
    target = check_out_folder(out, force)
    check_calibration_size(sequences, length)
    opened = open_model(model_path, device, kind="language-model")
    model, tokenizer = opened.model, opened.tokenizer
    require_float(model, model_path, "pruning")
    length = min(length, model.config.block_size)
    windows = read_calibration(tokenizer, calibration, max(sequences, DISTILL_WINDOWS if distill_config else 0), length, note)
    teacher = copy.deepcopy(model) if distill_config else None
    report = prune_structure(model, method, sparsity, windows[:sequences])
    if note:
        what = (f"removed blocks {', '.join(map(str, report.removed_blocks))}" if method == "depth"
                else f"MLP channels {report.hidden_before} -> {report.hidden_after} per block")
        note(f"{method}: {what}; {report.params_before:,} -> {report.params_after:,} parameters")
    if teacher is not None and distill_config is not None:
        if windows.shape[0] < 2:
            raise ConfigError("distillation needs at least 2 windows of calibration text (one is held out)")
        held = min(HELD_OUT_WINDOWS, max(1, windows.shape[0] // 8))
        train, held_out = windows[:-held], windows[-held:]
        report.held_out["pruned"] = held_out_kl(model, teacher, held_out)
        model.requires_grad_(True)
        distill(model, teacher, train, held_out, distill_config, target / "distill", progress)
        report.held_out["distilled"] = held_out_kl(model, teacher, held_out)
        report.distill_steps = distill_config.steps
    save_model_folder(target, model, tokenizer)
    write_text_atomic(target / "prune_report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    return report
