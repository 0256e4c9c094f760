"""scratchlm plan: a model size and token count for a compute or time budget."""

import argparse


def add_commands(stages: argparse._SubParsersAction) -> None:
    pl = stages.add_parser(
        "plan",
        help="size a model and token count for a compute or time budget",
        description="Chinchilla-style planning: for a budget of C training FLOPs, about N = sqrt(C/120) "
        "parameters trained on 20 N tokens is compute-optimal (C = 6 N D). With --time, C is this machine's "
        "measured training throughput times the budget. Suggests the closest preset and estimates its wall time.",
    )
    budget = pl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--compute", type=float, help="training compute in FLOPs, e.g. 1e18")
    budget.add_argument("--time", help="wall-clock budget, e.g. 2m, 8h (measured on this machine)")
    pl.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: each preset's own)")
    pl.add_argument("--device", default="cpu", help="cpu or cuda: where to measure throughput (default: cpu)")
    pl.set_defaults(run=_plan)


def _plan(args: argparse.Namespace) -> int:
    from scratchlm.train.plan import plan
    from scratchlm.units import parse_duration

    result = plan(args.compute, parse_duration(args.time) if args.time else None, args.vocab_size, args.device)
    print(f"compute budget     {result.compute_flops:.3g} FLOPs" + (f" ({result.budget_flops_per_s / 1e9:.1f} GFLOP/s measured here on cpu-base)" if args.time and args.device == "cpu" else f" ({result.budget_flops_per_s / 1e9:.1f} GFLOP/s measured here on gpt2-124m)" if args.time else ""))
    print(f"compute-optimal    {result.optimal_params / 1e6:.2f}M parameters on {result.optimal_tokens / 1e6:.1f}M tokens (20 tokens per parameter)")
    print(f"closest preset     {result.preset} ({result.preset_params / 1e6:.2f}M parameters) -> {result.tokens_for_preset / 1e6:.1f}M tokens")
    if result.estimated_seconds is not None:
        print(f"estimated time     {result.estimated_seconds / 3600:.2f} h at {result.measured_flops_per_s / 1e9:.1f} GFLOP/s (measured for {result.preset} on {args.device})")
    return 0
