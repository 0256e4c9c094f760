"""scratchlm eval | compare | harness: measure models."""

import argparse
import json
from pathlib import Path

from scratchlm.cli.common import MODEL_HELP, split_list
from scratchlm.errors import ConfigError


def add_commands(stages: argparse._SubParsersAction) -> None:
    ev = stages.add_parser(
        "eval",
        help="measure a model: bits per byte, multiple choice, generation, classification",
        description="Evaluate a model. --text FILE: perplexity and bits per byte (sliding window); --shards DIR: the "
        "same on a shard folder's validation split; --tasks: JSONL task files (docs/eval-tasks.md) or builtin tasks. "
        "With none of these: the builtin tasks and the embedded corpus's held-out text, which works offline. Results "
        "go to results.json plus one predictions file per task, next to the model (MODEL/eval/, or STEM.eval/ beside "
        "a GGUF file) unless --out says otherwise. " + MODEL_HELP,
    )
    ev.add_argument("model", type=Path, nargs="?", help="the model (see above)")
    _add_eval_options(ev)
    ev.add_argument("--shards", type=Path, default=None, metavar="DIR", help="score the validation split of this shard folder")
    ev.add_argument("--out", type=Path, default=None, help="folder for results.json and predictions")
    ev.add_argument("--list-tasks", action="store_true", help="list the builtin tasks and exit")
    ev.set_defaults(run=_eval)

    cmp = stages.add_parser(
        "compare",
        help="evaluate several models on the same text and tasks, side by side",
        description="Evaluate each MODEL on the same text and tasks and print one table; write compare.md, "
        "compare.csv, a bar chart compare.png and results.json (every model's full report) into --out. Bits per byte compares "
        "models with different tokenizers; perplexity does not. With no --text/--tasks: the builtin tasks and the "
        "embedded corpus's held-out text. " + MODEL_HELP.replace("MODEL is", "Each MODEL is"),
    )
    cmp.add_argument("models", type=Path, nargs="+", metavar="MODEL", help="two or more models")
    _add_eval_options(cmp)
    cmp.add_argument("--labels", default=None, help="comma-separated names for the models in the table")
    cmp.add_argument("--out", type=Path, default=Path("compare"), help="output folder (default: ./compare)")
    cmp.set_defaults(run=_compare)

    hz = stages.add_parser(
        "harness",
        help="run lm-evaluation-harness tasks on a model",
        description="Run EleutherAI's lm-evaluation-harness on a model through scratchlm's adapter (model name "
        "'scratchlm': loglikelihood, loglikelihood_rolling, generate_until). Its task library downloads datasets, so "
        "it needs a network, or local task YAML files given with --include-path. Needs `pip install lm_eval`. "
        + MODEL_HELP,
    )
    hz.add_argument("model", type=Path, help="the model (see above)")
    hz.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (e.g. hellaswag,arc_easy)")
    hz.add_argument("--include-path", type=Path, default=None, help="folder of extra task YAML files")
    hz.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    hz.add_argument("--limit", type=int, default=None, help="use only the first N examples of each task")
    hz.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    hz.add_argument("--truncate", action="store_true", help="crop examples longer than the context from the left")
    hz.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    hz.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    hz.set_defaults(run=_harness)


def _add_eval_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--text", default=None, metavar="FILE",
                     help="score this text file: perplexity and bits per byte, with a sliding window")
    cmd.add_argument("--tasks", default=None, metavar="LIST",
                     help="comma-separated task files (.jsonl) or builtin task names; 'builtin' for all builtin tasks")
    cmd.add_argument("--stride", type=int, default=None,
                     help="sliding-window step in tokens for texts longer than the context (default: half the context)")
    cmd.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    cmd.add_argument("--limit", type=int, default=None, help="use only the first N examples of each task")
    cmd.add_argument("--truncate", action="store_true",
                     help="crop examples longer than the model's context from the left instead of stopping with an error")
    cmd.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                     help="weights and activations of a language model (default: float32); bfloat16 is about "
                          "twice as fast on CPUs with bfloat16 instructions and moves scores slightly")


def _eval_inputs(args: argparse.Namespace, shards: Path | None = None) -> tuple[list[str], str | Path | None]:
    """The tasks and text to evaluate: as given, or the offline default suite when nothing is."""
    from scratchlm.eval.suite import choose_suite

    tasks = split_list(args.tasks)
    if args.tasks is not None and not tasks:
        raise ConfigError("--tasks is empty; name task files or builtin tasks, or leave it out for the default suite")
    suite = choose_suite(tasks, Path(args.text) if args.text else None, shards)
    if suite.default:
        print("no --text, --shards or --tasks: using the builtin tasks and the embedded corpus's held-out text")
    return suite.tasks, suite.text


def _eval(args: argparse.Namespace) -> int:
    from scratchlm.atomic_io import check_writable_file
    from scratchlm.eval.runner import RESULTS_FILE, default_results_dir, evaluate_model, prepare_for_evaluation, save_report
    from scratchlm.eval.tasks import builtin_tasks, load_task
    from scratchlm.interop import open_model

    if args.list_tasks:
        for name in builtin_tasks():
            task = load_task(name)
            print(f"{name:<32} {task.kind:<16} {len(task.examples):>4} examples  {task.settings.get('description', '')}")
        return 0
    if args.model is None:
        raise ConfigError("eval: give a MODEL (or --list-tasks)")
    out = args.out or default_results_dir(args.model)
    check_writable_file(out / RESULTS_FILE)  # before the work, not after it
    opened = open_model(args.model, args.device)  # a language model or a classifier
    model, tokenizer = prepare_for_evaluation(opened.model, args.dtype), opened.tokenizer
    tasks, text = _eval_inputs(args, args.shards)
    report = evaluate_model(model, tokenizer, tasks=tasks, text=text, shards=args.shards, stride=args.stride,
                            batch_size=args.batch_size, limit=args.limit, truncate=args.truncate)
    print(report.summary())
    print(f"wrote {save_report(report, out)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from scratchlm.atomic_io import check_writable_file
    from scratchlm.eval.compare import check_comparison, compare_models, comparison_markdown, save_comparison

    check_writable_file(args.out / "compare.md")
    check_comparison(args.models, split_list(args.labels) or None)  # seconds before the default text is built
    tasks, text = _eval_inputs(args)
    comparison = compare_models(args.models, labels=split_list(args.labels) or None, tasks=tasks, text=text,
                                stride=args.stride, batch_size=args.batch_size, limit=args.limit,
                                truncate=args.truncate, device=args.device, dtype=args.dtype)
    print(comparison_markdown(comparison))
    written = save_comparison(comparison, args.out)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _harness(args: argparse.Namespace) -> int:
    from scratchlm.atomic_io import check_writable_file
    from scratchlm.eval.harness import run_harness

    if args.out:
        check_writable_file(args.out)
    results = run_harness(args.model, split_list(args.tasks), include_path=args.include_path, limit=args.limit,
                          num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
                          truncate=args.truncate)
    table = results.get("results", {})
    for task, metrics in table.items():
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        print(f"{task:<32} {shown}")
    if args.out:
        from scratchlm.atomic_io import write_text_atomic

        write_text_atomic(args.out, json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0
