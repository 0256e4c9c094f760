"""scratchlm quantize | prune: make a trained model cheaper to run."""

import argparse
from pathlib import Path

from scratchlm.cli.common import MODEL_HELP


def add_commands(stages: argparse._SubParsersAction) -> None:
    qu = stages.add_parser(
        "quantize",
        help="quantize a model's linear layers to int8 or int4 and save it as a model folder",
        description="Round every linear layer's weights (attention, MLP and the output head; not the embedding "
        "table, which stays bfloat16) to int8 with a scale per output row, or to int4 with a scale and zero per "
        "group of --group-size weights along each row, and write a model folder to OUT that generate, chat, "
        "serve, eval, compare and export open as it is (export writes its dequantized weights). --method rtn "
        "rounds to nearest; --method gptq (int4) calibrates on text: each column's rounding error is moved onto "
        "the columns not yet rounded, as the calibration inputs weigh them (Frantar et al. 2022). int4 runs on "
        "the CPU kernel; int8 wherever PyTorch's weight-only int8 kernel does. " + MODEL_HELP,
    )
    qu.add_argument("model", help="the model to quantize (float weights)")
    qu.add_argument("--to", choices=["int8", "int4"], required=True, help="int8 (a quarter of float32's bytes) or int4 (an eighth)")
    qu.add_argument("--out", type=Path, required=True, help="the quantized model folder to write (new or empty)")
    qu.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                    help="rtn: round to nearest; gptq: int4 calibrated on --calibration text (default: rtn)")
    qu.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128, 256],
                    help="int4: weights per (scale, zero) group along each row; smaller is closer to float, larger "
                    "is smaller (default: 64)")
    qu.add_argument("--calibration", type=Path, default=None,
                    help="gptq: text file whose activations weigh the rounding errors (default: the embedded corpus)")
    qu.add_argument("--sequences", type=int, default=32, help="gptq: calibration sequences (default: 32)")
    qu.add_argument("--length", type=int, default=256, help="gptq: tokens per calibration sequence (default: 256)")
    qu.add_argument("--force", action="store_true", help="write into a non-empty --out")
    qu.set_defaults(run=_quantize)

    pr = stages.add_parser(
        "prune",
        help="prune a model: zero weights (magnitude, Wanda; unstructured or 2:4) or cut blocks or MLP channels",
        description="Unstructured (--method magnitude|wanda): zero the least important weights of every linear layer "
        "in the blocks (attention q, k, v, proj; MLP gate, up, down; not the embedding or the head); "
        "prune_report.json gives the sparsity each layer reached. magnitude: the smallest |W| of each layer. wanda "
        "(Sun et al. 2023): |W| times the norm of its input feature over calibration text, compared within each "
        "output row, block by block on the already pruned model; no weight is updated. --pattern 2:4 zeroes 2 of "
        "every 4 consecutive weights of a row (sparsity 0.5). The zeros are stored as zeros: the folder is as large "
        "and as fast as before, until a sparse kernel runs it. Structured (--method depth|width): a smaller model. "
        "depth removes the --sparsity share of blocks that turn the hidden state least (ShortGPT's Block Influence); "
        "width removes that share of every block's MLP channels, those with the weakest activations (rounded to "
        "a multiple of 64). --distill STEPS then trains the cut model to match the whole one's next-token "
        "distributions on the calibration text (KL divergence, through the training loop; run files in OUT/distill/). "
        "Either way OUT is an ordinary model folder. " + MODEL_HELP,
    )
    pr.add_argument("model", help="the model to prune")
    pr.add_argument("--out", type=Path, required=True, help="the pruned model folder to write")
    pr.add_argument("--method", choices=["magnitude", "wanda", "depth", "width"], default="wanda",
                    help="magnitude or wanda (zero weights), depth or width (remove blocks or MLP channels) (default: wanda)")
    pr.add_argument("--sparsity", type=float, default=None,
                    help="share to remove: of each layer's weights (magnitude, wanda; default 0.5), of the blocks "
                    "(depth) or of the MLP channels (width) (default 0.25)")
    pr.add_argument("--pattern", choices=["unstructured", "2:4"], default="unstructured",
                    help="magnitude, wanda: unstructured, or 2:4: 2 of every 4 consecutive weights (default: unstructured)")
    pr.add_argument("--calibration", type=Path, default=None,
                    help="text file whose activations measure importance, and that --distill trains on "
                    "(default: the embedded corpus)")
    pr.add_argument("--sequences", type=int, default=32, help="calibration sequences (default: 32)")
    pr.add_argument("--length", type=int, default=256, help="tokens per calibration sequence (default: 256)")
    pr.add_argument("--distill", type=int, default=0, metavar="STEPS",
                    help="depth, width: distil the cut model from the whole one for STEPS steps (default: 0, none)")
    pr.add_argument("--distill-lr", type=float, default=3e-4, help="distillation's peak learning rate (default: 3e-4)")
    pr.add_argument("--distill-batch", type=int, default=8, help="calibration windows per distillation step (default: 8)")
    pr.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    pr.add_argument("--force", action="store_true", help="write into a non-empty --out")
    pr.set_defaults(run=_prune)


def _prune(args: argparse.Namespace) -> int:
    from scratchlm.compress.distill import DistillConfig
    from scratchlm.compress.prune import prune_model
    from scratchlm.compress.structured import STRUCTURES, prune_structure_model
    from scratchlm.errors import ConfigError

    if args.method in STRUCTURES:
        if args.pattern != "unstructured":
            raise ConfigError(f"--pattern {args.pattern} is for magnitude and wanda; {args.method} removes whole {'blocks' if args.method == 'depth' else 'channels'}")
        distill = DistillConfig(args.distill, args.distill_lr, args.distill_batch) if args.distill else None
        cut = prune_structure_model(args.model, args.out, args.method, 0.25 if args.sparsity is None else args.sparsity,
                                    args.calibration, args.sequences, args.length, distill, args.device, args.force, note=print)
        print(f"{args.method}: {cut.params_before:,} -> {cut.params_after:,} parameters "
              f"({1 - cut.params_after / cut.params_before:.1%} fewer)")
        for stage, numbers in cut.held_out.items():
            print(f"held-out KL to the unpruned model, {stage}: {numbers['val_kl']:.4f} nats/token")
        print(f"wrote {args.out}/ (a model folder, prune_report.json{', distill/' if distill else ''})")
        return 0
    report = prune_model(args.model, args.out, args.method, 0.5 if args.sparsity is None else args.sparsity, args.pattern,
                         args.calibration, args.sequences, args.length, args.device, args.force, args.distill, note=print)
    print(f"{args.method} {args.pattern}: {report.sparsity:.2%} of the blocks' linear weights are zero "
          f"({min(report.layers.values()):.2%} to {max(report.layers.values()):.2%} per layer)")
    print(f"wrote {args.out}/ (a model folder, prune_report.json)")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from scratchlm.compress.quantize import quantize_model

    report = quantize_model(args.model, args.out, args.to, args.method, args.group_size, args.calibration,
                            args.sequences, args.length, args.force, note=print)
    kind = args.to if args.to == "int8" else f"int4 in groups of {report.group_size}"
    kept = f"; {', '.join(report.float_layers)} stay bfloat16 (the kernel packs 16 outputs at a time)" if report.float_layers else ""
    print(f"{args.method}: {report.layers} linear layers to {kind}{kept}")
    print(f"wrote {args.out}/ ({report.bytes / 1e6:.1f} MB of weights, in {report.seconds:.1f} s)")
    return 0
