"""scratchlm prune: zero the least important weights of a model's linear layers."""

import argparse
from pathlib import Path

from scratchlm.cli.common import MODEL_HELP


def add_commands(stages: argparse._SubParsersAction) -> None:
    pr = stages.add_parser(
        "prune",
        help="prune a model's linear layers (magnitude or Wanda; unstructured or 2:4)",
        description="Zero the least important weights of every linear layer in the blocks (attention q, k, v, "
        "proj; MLP gate, up, down; not the embedding or the head) and write an ordinary model folder to OUT, "
        "with prune_report.json giving the sparsity each layer reached. magnitude: the smallest |W| of each "
        "layer. wanda (Sun et al. 2023): |W| times the norm of its input feature over calibration text, "
        "compared within each output row, block by block on the already pruned model; no weight is updated. "
        "--pattern 2:4 zeroes 2 of every 4 consecutive weights of a row (sparsity 0.5). The zeros are stored "
        "as zeros: the folder is as large and as fast as before, until a sparse kernel runs it. " + MODEL_HELP,
    )
    pr.add_argument("model", help="the model to prune")
    pr.add_argument("--out", type=Path, required=True, help="the pruned model folder to write")
    pr.add_argument("--method", choices=["magnitude", "wanda"], default="wanda", help="how weights are scored (default: wanda)")
    pr.add_argument("--sparsity", type=float, default=0.5, help="fraction of each layer's weights to zero, unstructured (default: 0.5)")
    pr.add_argument("--pattern", choices=["unstructured", "2:4"], default="unstructured",
                    help="unstructured, or 2:4: 2 of every 4 consecutive weights (default: unstructured)")
    pr.add_argument("--calibration", type=Path, default=None,
                    help="text file whose activations weigh the weights (wanda; default: the embedded corpus)")
    pr.add_argument("--sequences", type=int, default=32, help="calibration sequences (default: 32)")
    pr.add_argument("--length", type=int, default=256, help="tokens per calibration sequence (default: 256)")
    pr.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    pr.add_argument("--force", action="store_true", help="write into a non-empty --out")
    pr.set_defaults(run=_prune)


def _prune(args: argparse.Namespace) -> int:
    from scratchlm.compress.prune import prune_model

    report = prune_model(args.model, args.out, args.method, args.sparsity, args.pattern, args.calibration,
                         args.sequences, args.length, args.device, args.force, note=print)
    print(f"{args.method} {args.pattern}: {report.sparsity:.2%} of the blocks' linear weights are zero "
          f"({min(report.layers.values()):.2%} to {max(report.layers.values()):.2%} per layer)")
    print(f"wrote {args.out}/ (a model folder, prune_report.json)")
    return 0
