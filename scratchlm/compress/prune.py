"""Unstructured and 2:4 pruning of a language model's linear layers: magnitude, and Wanda.

    magnitude   score |W|; the lowest scores of each layer are zeroed (the classic baseline)
    wanda       score |W_ij| * ||X_j||, X_j the j-th input feature over calibration tokens, compared
                within each output row (Sun et al. 2023, "A Simple and Effective Pruning Approach
                for Large Language Models"); no weight is updated

The pattern says which weights compete: `unstructured` zeroes `sparsity` of the group (Wanda:
each output row; magnitude: the whole layer); `2:4` zeroes the 2 lowest of every 4 consecutive
weights along a row, the pattern NVIDIA's sparse tensor cores run (sparsity is then 0.5).

Every linear layer of the blocks is pruned (attention q, k, v, proj; MLP gate, up, down); the
embedding and the head are not, as in the paper. Wanda prunes block by block: the inputs of
block i's layers are measured with blocks 0..i-1 already pruned, so each block sees the
activations it will get. The result is an ordinary model whose zeros are stored as zeros: the
same size on disk and the same speed, until a sparse kernel runs it.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from scratchlm.errors import ConfigError
from scratchlm.model.model import GPT
from scratchlm.model.quantize import require_float
from scratchlm.tokenizer import Tokenizer

METHODS = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4")


@dataclass
class PruneReport:
    method: str
    pattern: str
    requested: float
    layers: dict[str, float] = field(default_factory=dict)  # name -> fraction of its weights now zero
    zeros: dict[str, int] = field(default_factory=dict)  # name -> weights now zero
    sizes: dict[str, int] = field(default_factory=dict)  # name -> weights

    @property
    def sparsity(self) -> float:
        """Zeros over all the pruned layers' weights."""
        return sum(self.zeros.values()) / max(sum(self.sizes.values()), 1)

    def to_dict(self) -> dict:
        return {"method": self.method, "pattern": self.pattern, "requested_sparsity": self.requested,
                "sparsity": self.sparsity, "layers": self.layers}


def check_settings(method: str, pattern: str, sparsity: float) -> float:
    """The sparsity to reach (2:4 is always 0.5); a ConfigError for a bad setting."""
    if method not in METHODS:
        raise ConfigError(f"pruning method {method!r} is not one of {', '.join(METHODS)}")
    if pattern not in PATTERNS:
        raise ConfigError(f"pruning pattern {pattern!r} is not one of {', '.join(PATTERNS)}")
    if pattern == "2:4":
        return 0.5
    if not 0.0 < sparsity < 1.0:
        raise ConfigError(f"sparsity must be between 0 and 1 (exclusive), not {sparsity}")
    return sparsity


def prunable_layers(model: GPT) -> list[tuple[str, nn.Linear]]:
    """The linear layers of the blocks, in order."""
    return [(f"blocks.{i}.{name}", module) for i, block in model.numbered_blocks()
            for name, module in block.named_modules() if isinstance(module, nn.Linear)]


def prune_mask(scores: Tensor, pattern: str, sparsity: float, per_row: bool) -> Tensor:
    """True where a weight is kept: the highest scores of each comparison group. Ties are broken
    by position (a stable sort), so exactly the asked number is zeroed."""
    rows, cols = scores.shape
    if pattern == "2:4":
        if cols % 4:
            raise ConfigError(f"2:4 pruning needs layer widths divisible by 4, not {cols}")
        groups = scores.reshape(rows, cols // 4, 4)
        lowest = groups.argsort(dim=-1, stable=True)[..., :2]
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, lowest, False)
        return keep.reshape(rows, cols)
    flat = scores if per_row else scores.reshape(1, -1)
    count = int(flat.shape[1] * sparsity)
    lowest = flat.argsort(dim=-1, stable=True)[:, :count]
    keep = torch.ones_like(flat, dtype=torch.bool).scatter_(-1, lowest, False)
    return keep.reshape(rows, cols)


@torch.no_grad()
def prune(model: GPT, method: str = "wanda", sparsity: float = 0.5, pattern: str = "unstructured",
          calibration: Tensor | None = None, batch_size: int = 4,
          on_block: Callable[[int, int], None] | None = None) -> PruneReport:
    """Prune `model` in place and report the sparsity each layer reached. `calibration` (N, T)
    token ids feed Wanda's activation norms (magnitude needs none). `on_block(done, total)`
    follows the progress."""
    sparsity = check_settings(method, pattern, sparsity)
    if method == "wanda" and (calibration is None or calibration.numel() == 0):
        raise ConfigError("wanda pruning needs calibration text (its activations weigh the weights)")
    report = PruneReport(method, pattern, sparsity)
    was_training = model.training
    model.eval()
    blocks = model.numbered_blocks()
    for done, (index, block) in enumerate(blocks, 1):
        layers = [(name, m) for name, m in prunable_layers(model) if name.startswith(f"blocks.{index}.")]
        norms = None
        if method == "wanda":
            squares = measure_inputs(model, block, [m for _, m in layers], calibration, batch_size)
            norms = [total.sqrt().float().to(model.embed.weight.device) for total in squares]
        for (name, linear), norm in zip(layers, norms or [None] * len(layers)):
            weight = linear.weight
            scores = weight.abs().float() if norm is None else weight.abs().float() * norm[None, :]
            keep = prune_mask(scores, pattern, sparsity, per_row=method == "wanda")
            weight.mul_(keep.to(weight.dtype))
            report.zeros[name], report.sizes[name] = int((weight == 0).sum()), weight.numel()
            report.layers[name] = report.zeros[name] / weight.numel()
        if on_block is not None:
            on_block(done, len(blocks))
    model.train(was_training)
    return report


class _Measured(Exception):
    """Raised once the block being measured has run: the blocks after it need not."""


def measure_inputs(model: GPT, block: nn.Module, layers: list[nn.Linear], calibration: Tensor,
                   batch_size: int, outer: bool = False) -> list[Tensor]:
    """For each layer of `block`, the sum over every calibration token x of its input x * x per
    feature (in), or with `outer` of x x^T (in, in), in float64 on the CPU: from forward passes
    of the model as it is now (earlier blocks already pruned or quantized), stopped after `block`."""
    sums = [torch.zeros((m.in_features, m.in_features) if outer else m.in_features, dtype=torch.float64) for m in layers]

    def stop(module: nn.Module, args: tuple, output: Tensor) -> None:
        raise _Measured

    def hook(position: int):
        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
            sums[position] += x.T @ x if outer else (x * x).sum(dim=0)
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)] + [block.register_forward_hook(stop)]
    device = model.embed.weight.device
    try:
        for start in range(0, calibration.shape[0], batch_size):
            try:
                model(calibration[start : start + batch_size].to(device))
            except _Measured:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return sums


def calibration_tokens(ids: list[int], sequences: int, length: int) -> Tensor:
    """(sequences, length) windows cut from `ids` one after another; fewer when the text is short."""
    count = min(sequences, len(ids) // length)
    if count < 1:
        raise ConfigError(f"the calibration text has {len(ids)} tokens, fewer than one window of {length}")
    return torch.tensor(ids[: count * length], dtype=torch.long).reshape(count, length)


def check_out_folder(out: str | Path, force: bool) -> Path:
    """`out` as a Path, if it is new, empty, or `force` lets it be written into."""
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise ConfigError(f"{target} already exists and is not an empty folder; choose another --out or pass --force")
    return target


def check_calibration_size(sequences: int, length: int) -> None:
    if not (sequences >= 1 and length >= 2):
        raise ConfigError(f"calibration needs at least one sequence of 2 tokens, not {sequences} x {length}")


def read_calibration(tokenizer: Tokenizer, path: str | Path | None, sequences: int, length: int,
                     note: Callable[[str], None] | None = None) -> Tensor:
    """(sequences, length) token windows of the text file `path`, else of the embedded corpus
    (CPython's documentation); fewer when the text is short."""
    if path is not None:
        from scratchlm.text.reading import read_text

        text = read_text(path)[0]
    else:
        from scratchlm.text.embedded import embedded_corpus_text

        text = embedded_corpus_text(max_bytes=4 * sequences * length * 4)
    tokens = calibration_tokens(tokenizer.encode_ordinary(text), sequences, length)
    if note:
        note(f"calibration: {tokens.shape[0]} sequences of {tokens.shape[1]} tokens from {path or 'the embedded corpus'}")
    return tokens


def prune_model(model_path: str, out: str, method: str = "wanda", sparsity: float = 0.5, pattern: str = "unstructured",
                calibration: str | None = None, sequences: int = 32, length: int = 256, device: str = "cpu",
                force: bool = False, distill_steps: int = 0, note: Callable[[str], None] | None = None) -> PruneReport:
    """Prune the language model at `model_path` (anything `open_model` opens) and write it as a
    model folder `out`, with prune_report.json (the sparsity of every layer). Calibration text:
    the file `calibration`, else the embedded corpus (CPython's documentation)."""
    import json

    from scratchlm.atomic_io import write_text_atomic
    from scratchlm.interop import open_model
    from scratchlm.model.folder import save_model_folder

    sparsity = check_settings(method, pattern, sparsity)
    if distill_steps:
        raise ConfigError(f"--distill trains a structurally pruned model (depth, width); training would refill {method}'s zeros")
    target = check_out_folder(out, force)
    if method == "wanda":
        check_calibration_size(sequences, length)
    opened = open_model(model_path, device, kind="language-model")
    model, tokenizer = opened.model, opened.tokenizer
    require_float(model, model_path, "pruning")
    tokens = None
    if method == "wanda":
        tokens = read_calibration(tokenizer, calibration, sequences, min(length, model.config.block_size), note)
    report = prune(model, method, sparsity, pattern, tokens,
                   on_block=(lambda done, total: note(f"pruned block {done}/{total}")) if note else None)
    save_model_folder(target, model, tokenizer)
    write_text_atomic(target / "prune_report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    return report
