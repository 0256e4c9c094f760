"""scratchlm model info: a preset's size, FLOPs and memory."""

import argparse


def add_commands(stages: argparse._SubParsersAction) -> None:
    model = stages.add_parser("model", help="inspect model presets", description="Model architectures and presets.")
    cmds = model.add_subparsers(title="model commands", metavar="COMMAND", required=True)
    info = cmds.add_parser(
        "info",
        help="parameters, FLOPs per token and memory of a preset",
        description="Print a preset's architecture, parameter count, training FLOPs per token and estimated "
        "training memory. With no preset, list all presets.",
    )
    info.add_argument("preset", nargs="?", help="preset name (omit to list all)")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a ModelConfig field")
    info.add_argument("--micro-batch", type=int, default=8, help="sequences per step, for the activation memory estimate (default: 8)")
    info.set_defaults(run=_model_info)


def _model_info(args: argparse.Namespace) -> int:
    from scratchlm.model import PRESETS
    from scratchlm.model.info import describe, memory_estimate

    if not args.preset:
        for name, config in PRESETS.items():
            print(describe(name, config, short=True))
        return 0
    from scratchlm.config import build, parse_overrides
    from scratchlm.model import ModelConfig, get_preset

    config = get_preset(args.preset)
    if args.set:
        config = build(ModelConfig, config.to_dict() | parse_overrides(args.set), f"--set for {args.preset}")
    print(describe(args.preset, config))
    for line in memory_estimate(config, args.micro_batch):
        print(line)
    return 0
