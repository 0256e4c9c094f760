"""scratchlm plan: a model size and token count for a compute or time budget."""

import argparse


def add_commands(stages: argparse._SubParsersAction) -> None:
    pl = stages.add_parser(
        "plan",
        help="size a model for a compute or time budget, or lay one out on N GPUs",
        description="Chinchilla-style planning: for a budget of C training FLOPs, about N = sqrt(C/120) "
        "parameters trained on 20 N tokens is compute-optimal (C = 6 N D). With --time, C is this machine's "
        "measured training throughput times the budget. Suggests the closest preset and estimates its wall time. "
        "With --gpus N --model PRESET instead: the parallel layouts that fit on N GPUs and their memory per GPU.",
    )
    budget = pl.add_mutually_exclusive_group()
    budget.add_argument("--compute", type=float, help="training compute in FLOPs, e.g. 1e18")
    budget.add_argument("--time", help="wall-clock budget, e.g. 2m, 8h (measured on this machine)")
    pl.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: each preset's own)")
    pl.add_argument("--device", default="cpu", help="cpu or cuda: where to measure throughput (default: cpu)")
    cluster = pl.add_argument_group(
        "GPU cluster", "with --gpus instead of a budget: which parallel layouts of a model fit on N GPUs, the memory "
        "each GPU needs, and the estimated tokens/s and time to 20 tokens per parameter")
    cluster.add_argument("--gpus", type=int, help="number of GPUs")
    cluster.add_argument("--gpu", default="h100", help="GPU kind, for its bf16 peak FLOP/s (default: h100; e.g. a100, h200, l4)")
    cluster.add_argument("--gpu-memory", default="80GB", help="memory of each GPU, e.g. 80GB, 40GB (default: 80GB)")
    model = cluster.add_mutually_exclusive_group()
    model.add_argument("--model", help="a model preset, e.g. llama3-8b (see scratchlm model presets)")
    model.add_argument("--params", help="or a model size, e.g. 1B, 350M: a Llama-3-shaped model of about that size")
    cluster.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's context)")
    cluster.add_argument("--micro-batch", type=int, default=1, help="sequences per forward pass on each GPU (default: 1)")
    cluster.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation (default: 0.40)")
    cluster.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                         help="bf16 (mixed precision, float32 master weights; default) or fp32")
    pl.set_defaults(run=_plan)


_COUNT_SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _parse_count(value: str) -> float:
    """'1B' -> 1e9, '350M' -> 3.5e8, '8e9' -> 8e9."""
    text = value.strip().lower()
    number, suffix = (text[:-1], text[-1]) if text and text[-1] in _COUNT_SUFFIXES else (text, "")
    try:
        return float(number) * _COUNT_SUFFIXES[suffix]
    except ValueError:
        from scratchlm.errors import ConfigError

        raise ConfigError(f"--params {value!r} is not a count (examples: 1B, 350M, 8e9)") from None


def _plan(args: argparse.Namespace) -> int:
    from scratchlm.errors import ConfigError
    from scratchlm.train.plan import plan

    if args.gpus is not None:
        if args.compute is not None or args.time:
            raise ConfigError("plan: give a budget (--compute or --time) or a cluster (--gpus), not both")
        return _plan_cluster(args)
    if args.compute is None and not args.time:
        raise ConfigError("plan: give a budget (--compute FLOPs or --time DURATION) or a cluster (--gpus N --model PRESET)")
    from scratchlm.units import parse_duration

    result = plan(args.compute, parse_duration(args.time) if args.time else None, args.vocab_size, args.device)
    print(f"compute budget     {result.compute_flops:.3g} FLOPs" + (f" ({result.budget_flops_per_s / 1e9:.1f} GFLOP/s measured here on cpu-base)" if args.time and args.device == "cpu" else f" ({result.budget_flops_per_s / 1e9:.1f} GFLOP/s measured here on gpt2-124m)" if args.time else ""))
    print(f"compute-optimal    {result.optimal_params / 1e6:.2f}M parameters on {result.optimal_tokens / 1e6:.1f}M tokens (20 tokens per parameter)")
    print(f"closest preset     {result.preset} ({result.preset_params / 1e6:.2f}M parameters) -> {result.tokens_for_preset / 1e6:.1f}M tokens")
    if result.estimated_seconds is not None:
        print(f"estimated time     {result.estimated_seconds / 3600:.2f} h at {result.measured_flops_per_s / 1e9:.1f} GFLOP/s (measured for {result.probed_preset} on {args.device})")
    return 0


def _plan_cluster(args: argparse.Namespace) -> int:
    from scratchlm.devices import named_gpu_peak_flops
    from scratchlm.errors import ConfigError
    from scratchlm.model import count_params, get_preset
    from scratchlm.train.memory import llama_shaped
    from scratchlm.train.plan import TOKENS_PER_PARAM, cluster_plan
    from scratchlm.units import parse_bytes

    if (args.model is None) == (args.params is None):
        raise ConfigError("plan --gpus: give the model as --model PRESET or --params SIZE")
    if args.model:
        config, what = get_preset(args.model), args.model
    else:
        config = llama_shaped(_parse_count(args.params))
        what = f"Llama-3-shaped ({config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, {config.kv_heads} KV heads, MLP {config.hidden})"
    if args.vocab_size:
        config = config.replace(vocab_size=args.vocab_size)
    memory = parse_bytes(args.gpu_memory)
    checks = [(args.gpus >= 1, f"--gpus must be at least 1, not {args.gpus}"),
              (memory >= 1e9 and not args.gpu_memory.strip().isdigit(),
               f"--gpu-memory {args.gpu_memory!r}: give the memory of one GPU with its unit, e.g. 80GB"),
              (args.seq_len is None or args.seq_len >= 1, f"--seq-len must be at least 1, not {args.seq_len}"),
              (args.micro_batch >= 1, f"--micro-batch must be at least 1, not {args.micro_batch}"),
              (0 < args.mfu <= 1, f"--mfu must be in (0, 1], not {args.mfu}")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    result = cluster_plan(config, args.gpus, memory, named_gpu_peak_flops(args.gpu), args.mfu,
                          args.seq_len, args.micro_batch, args.precision)
    gb = 1e9
    params = count_params(config)
    size = f"{params / 1e9:.3f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    print(f"model              {what}: {size} parameters, sequences of {result.seq_len} tokens")
    print(f"cluster            {args.gpus} x {args.gpu} with {parse_bytes(args.gpu_memory) / gb:.0f} GB; usable per GPU "
          f"{result.usable_bytes / gb:.1f} GB (10% and 2 GB held back for the CUDA context and fragmentation)")
    print(f"precision          {args.precision}: " + ("AdamW with float32 master weights, gradients and moments; bf16 "
          "compute (FSDP2 MixedPrecisionPolicy, or autocast without sharding)" if args.precision == "bf16" else "float32 throughout"))
    print(f"micro-batch        {args.micro_batch} sequence(s) per GPU; sizes in GB per GPU; AC = activation checkpointing")
    print()
    print(f"{'layout':<12} {'degrees':<30} {'params':>7} {'grads':>7} {'optim':>7} {'act/seq':>8} {'AC/seq':>7} "
          f"{'total':>7} {'AC tot':>7}  fits")
    for row in result.layouts:
        m = row.memory
        plain, checkpointed = m.total(args.micro_batch, False), m.total(args.micro_batch, True)
        fits = "yes" if plain <= result.usable_bytes else "with AC" if checkpointed <= result.usable_bytes else "no"
        print(f"{row.name:<12} {row.degrees.describe():<30} {m.params / gb:7.1f} {m.grads / gb:7.1f} {m.optimizer / gb:7.1f} "
              f"{m.activations_per_seq / gb:8.1f} {m.checkpointed_per_seq / gb:7.1f} {plain / gb:7.1f} {checkpointed / gb:7.1f}  {fits}")
    print()
    if result.suggested is not None:
        s = result.suggested
        fits_plain = s.memory.total(args.micro_batch, False) <= result.usable_bytes
        how = "" if fits_plain else " with activation checkpointing (--set activation_checkpointing=true)"
        print(f"suggested          {s.name} ({s.degrees.describe()}){how}: the least model parallelism that fits")
    else:
        print("suggested          none fits: use more GPUs, larger ones, or a shorter --seq-len")
    tokens = TOKENS_PER_PARAM * count_params(config)
    print(f"throughput         {result.tokens_per_s:,.0f} tokens/s ({args.gpus} x {named_gpu_peak_flops(args.gpu) / 1e12:.0f} "
          f"TFLOP/s bf16 peak x assumed MFU {args.mfu:.2f})")
    print(f"Chinchilla         {tokens / 1e9:.1f}B tokens (20 per parameter) in {tokens / result.tokens_per_s / 86400:.1f} days")
    return 0
