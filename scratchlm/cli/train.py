"""scratchlm pretrain: train a model from scratch, or continue a trained one."""

import argparse
from pathlib import Path

from scratchlm.cli.common import MODEL_HELP


def add_commands(stages: argparse._SubParsersAction) -> None:
    from scratchlm.train.config import builtin_recipes

    pre = stages.add_parser(
        "pretrain",
        help="train a model from scratch, or continue a trained one, on token shards",
        description="Pretrain a decoder-only transformer on token shards. Writes RUN/metrics.jsonl, loss.png, "
        "report.md, checkpoints/ and the final model/. With no --recipe, uses the default CPU recipe, which "
        "sizes the model to the time budget. With --init-from MODEL, continues pretraining a trained model on "
        "the shards (e.g. a domain corpus): its weights and architecture are the start, the shards must be made "
        "with its tokenizer, step 0 logs the validation loss before training, and the default recipe is "
        "continued-pretraining. Works unchanged under torchrun --nproc_per_node N: data parallel (DDP) by default; "
        "FSDP2, tensor and pipeline parallelism with --set parallel.dp_shard=-1 / parallel.tp=2 / parallel.pp=2 "
        "(docs/training.md, docs/cluster.md).",
    )
    pre.add_argument("--data", required=True, type=Path, help="shard folder (from scratchlm data tokenize)")
    pre.add_argument("--out", required=True, type=Path, help="run folder")
    pre.add_argument("--recipe", default=None, help=f"TOML recipe file or built-in name ({', '.join(builtin_recipes())}; "
                     "default: cpu-default, or continued-pretraining with --init-from)")
    pre.add_argument("--init-from", default=None, metavar="MODEL", help="start from this model's weights and architecture "
                     "(continued pretraining; same as --set init_from=MODEL); the shards must be tokenized with its "
                     f"tokenizer, and seq_len may be at most its context. {MODEL_HELP}")
    pre.add_argument("--max-time", default=None, help="wall-clock budget, e.g. 120s, 10m (overrides the recipe)")
    pre.add_argument("--max-steps", type=int, default=None, help="step budget (overrides the recipe)")
    pre.add_argument("--val-text", type=Path, default=None, help="evaluate on this text file instead of the val split")
    pre.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any recipe key, e.g. lr=1e-3 or model_config.n_layer=6 (repeatable)")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(run=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    from scratchlm.train.config import load_train_config, pretrain_recipe
    from scratchlm.train.distributed import is_main_process
    from scratchlm.train.pretrain import pretrain

    overrides = list(args.set)
    if args.max_time is not None:
        overrides += [f"max_time={args.max_time}", "max_steps=none"]
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if args.init_from is not None:
        overrides.append(f"init_from={args.init_from}")
    config = load_train_config(pretrain_recipe(args.recipe, overrides), overrides)
    summary = pretrain(args.data, args.out, config, val_text=args.val_text, resume=args.resume, progress=not args.quiet)
    if not is_main_process():  # another rank of a torchrun job: rank 0 reports
        return 0
    if summary.start_val_bpb is not None:
        print(f"step 0 ({config.init_from}): val loss {summary.start_val_loss:.4f} nats/token, {summary.start_val_bpb:.4f} bits per byte")
    if summary.val_bpb is not None:
        print(f"step {summary.steps}: val loss {summary.val_loss:.4f} nats/token, {summary.val_bpb:.4f} bits per byte")
    print(f"wrote {summary.run_dir}/ (model/, report.md, loss.png, metrics.jsonl)")
    return 0
