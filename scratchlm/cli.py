"""The `scratchlm` command line: parse arguments, call the library, print the result.

Every command is a few lines around one public function; anything the CLI does, Python can do.
A `ScratchLMError` (a user mistake or bad input) is printed as one line and exits with 2.
"""

import argparse
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from scratchlm import __version__
from scratchlm.errors import ConfigError, InputFileError, ScratchLMError
from scratchlm.units import parse_bytes

EXIT_USER_ERROR = 2
MODEL_HELP = (
    "MODEL is a run folder, a model folder (from pretrain or import), a training checkpoint folder, "
    "a GGUF file or a Hugging Face checkpoint folder."
)


def _argument_type(parse):
    """Let argparse report a library parser's error as its usual one-line usage error."""

    def convert(value: str):
        try:
            return parse(value)
        except ScratchLMError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.run(args) or 0
    except ScratchLMError as exc:
        print(f"scratchlm: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("scratchlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `scratchlm ... | head` closed our stdout; not an error
        sys.stderr.close()
        return 0


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage mistake prints one line (what is wrong and where to look), like
    every other user error, instead of the whole usage block before it."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="scratchlm",
        description="Build a large language model from scratch: data, tokenizer, model, training, "
        "fine-tuning, evaluation and serving.",
    )
    parser.add_argument("--version", action="version", version=f"scratchlm {__version__}")
    stages = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_quickstart_command(stages)
    _add_tokenizer_commands(stages)
    _add_data_commands(stages)
    _add_model_commands(stages)
    _add_pretrain_command(stages)
    _add_generate_command(stages)
    _add_chat_command(stages)
    _add_serve_command(stages)
    _add_finetune_commands(stages)
    _add_interop_commands(stages)
    _add_eval_commands(stages)
    _add_plan_command(stages)
    _add_feedback_commands(stages)
    return parser


# ---- scratchlm quickstart -----------------------------------------------------------
def _add_quickstart_command(stages: argparse._SubParsersAction) -> None:
    qs = stages.add_parser(
        "quickstart",
        help="the whole path on the embedded corpus, in minutes on a CPU",
        description="Train a tokenizer on the embedded corpus (CPython's own documentation), tokenize it, "
        "pretrain a small Llama-style model within a wall-clock budget, evaluate it (validation loss and "
        "bits per byte), sample from it, and write a report. Under 10 minutes on 2 CPU cores.",
    )
    qs.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder (default: runs/quickstart)")
    qs.add_argument("--max-time", default=None, help="pretraining budget, e.g. 120s or 5m (default: the quickstart recipe's 300s)")
    qs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    qs.add_argument("--quiet", action="store_true", help="no progress bars")
    qs.set_defaults(run=_quickstart)


def _quickstart(args: argparse.Namespace) -> int:
    from scratchlm.quickstart import quickstart

    overrides = list(args.set) + ([f"max_time={args.max_time}"] if args.max_time else [])
    result = quickstart(args.out, overrides, progress=not args.quiet)
    run = result.run
    print()
    for n, sample in enumerate(run.samples, 1):
        print(f"--- sample {n} ---\n{sample.strip()}\n")
    print(f"validation: {run.val_loss:.4f} nats/token, {run.val_bpb:.4f} bits per byte "
          f"({run.params / 1e6:.2f}M parameters, {run.tokens:,} tokens, {run.tokens_per_s:,.0f} tokens/s)")
    print(f"done in {result.seconds:.0f}s. Everything is in {result.out}/:")
    print(f"  tokenizer  {result.tokenizer}")
    print(f"  shards     {result.shards}/")
    print(f"  model      {run.run_dir / 'model'}/")
    print(f"  report     {run.run_dir / 'report.md'}  (loss curve: {run.run_dir / 'loss.png'}, metrics: {run.run_dir / 'metrics.jsonl'})")
    print(f"next: scratchlm generate {run.run_dir} --prompt \"The \"")
    print(f"      scratchlm eval {run.run_dir}    (builtin tasks and held-out text; or compare it with SmolLM2: README)")
    print(f"      scratchlm serve {run.run_dir}   (OpenAI-compatible API at http://127.0.0.1:8000/v1, chat page at /)")
    print(f"      scratchlm finetune sft {run.run_dir} --data builtin:instructions_train --out {result.out / 'sft'}"
          "   (teach it to answer questions)")
    return 0


# ---- scratchlm data ... ---------------------------------------------------------------
def _add_data_commands(stages: argparse._SubParsersAction) -> None:
    data = stages.add_parser("data", help="turn text into token shards", description="Data preparation: turn text into token shards for pretraining.")
    cmds = data.add_subparsers(title="data commands", metavar="COMMAND", required=True)
    tok = cmds.add_parser(
        "tokenize",
        help="tokenize text files into train/val shards",
        description="Tokenize text files (each file a document, <|endoftext|> between documents) into "
        "memory-mapped shards with a manifest and a copy of the tokenizer. With 20 or more files, 10% of "
        "files go to validation by a hash of their name; with fewer, the last 10% of each file. With no "
        "--input, tokenizes the embedded corpus.",
    )
    tok.add_argument("--input", nargs="+", metavar="PATH", help="text files or directories (default: embedded corpus)")
    tok.add_argument("--tokenizer", required=True, type=Path, help="tokenizer file (scratchlm, tokenizer.json or .gguf)")
    tok.add_argument("--out", required=True, type=Path, help="output folder for shards")
    tok.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation (default: 0.1)")
    tok.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file (default: 16M)")
    tok.set_defaults(run=_data_tokenize)

    prep = cmds.add_parser(
        "prepare",
        help="clean, filter, deduplicate, mix and tokenize a corpus",
        description="The full data pipeline: read sources (text, JSONL, CSV, Parquet, HTML, Hugging Face "
        "datasets), repair and normalise text, apply quality filters (Gopher, C4, FineWeb rules), replace "
        "e-mail/IP/phone with placeholders, remove exact and near duplicates (MinHash LSH), split train/val "
        "by a hash of each document, mix sources by weight and tokenize into shards. Writes OUT/documents/ "
        "(kept documents), OUT/ledger/ (the fate of every input document), stats.json, report.md and, with "
        "a tokenizer, the shards and manifest.json that `scratchlm pretrain --data OUT` reads. Bad input is "
        "counted and reported, never fatal unless --strict. Run the same command again to resume an "
        "interrupted run: finished chunks are not redone. See docs/data.md for every config key.",
    )
    prep.add_argument("config", nargs="?", type=Path, help="TOML config with [[sources]] and stage tables (optional with --input)")
    prep.add_argument("--input", nargs="+", metavar="PATH", help="files, folders or glob patterns, read as one source named 'input' (replaces the config's sources)")
    prep.add_argument("--out", required=True, type=Path, help="output folder")
    prep.add_argument("--tokenizer", default=None, help="tokenizer file; without one, stop after writing the kept documents")
    prep.add_argument("--format", default=None, help="format of the --input files: auto, text, jsonl, csv, parquet, html (default: by extension)")
    prep.add_argument("--text-field", default=None, help="JSONL/CSV/Parquet field holding the text (default: text)")
    prep.add_argument("--languages", default=None, metavar="CODES", help="keep only these languages, comma-separated ISO 639-1 codes, e.g. en or en,fr (default: any)")
    prep.add_argument("--val-fraction", default=None, help="share of documents held out for validation (default: 0.01)")
    prep.add_argument("--workers", default=None, help="worker processes (default: every core)")
    prep.add_argument("--strict", action="store_true", help="stop at the first bad input (malformed line, binary file, undecodable bytes)")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key, e.g. filters.min_words=20 or minhash.threshold=0.7 (repeatable)")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(run=_data_prepare)


def _data_tokenize(args: argparse.Namespace) -> int:
    from scratchlm.data.shards import split_tokens
    from scratchlm.data.tokenize import tokenize_files
    from scratchlm.tokenizer import load_tokenizer

    manifest = tokenize_files(args.input, load_tokenizer(args.tokenizer), args.out, args.val_fraction, args.shard_tokens)
    counts = split_tokens(manifest)
    if manifest.get("undecodable_bytes"):
        print(f"scratchlm: warning: {manifest['undecodable_bytes']} undecodable bytes replaced with U+FFFD", file=sys.stderr)
    print(f"{counts['train']:,} train and {counts['val']:,} validation tokens ({manifest['dtype']}; validation: {manifest['split_rule']})")
    print(f"wrote {args.out}/")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from scratchlm.config import parse_overrides
    from scratchlm.data.prepare import load_prepare_config, prepare

    if args.config is None and not args.input:
        raise ConfigError("give a config file or --input PATHS")
    overrides = list(args.set)
    for flag, key in (("tokenizer", "tokenizer"), ("val_fraction", "val_fraction"), ("workers", "workers")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.strict:
        overrides.append("strict=true")
    settings = parse_overrides(overrides)
    if args.languages is not None:
        settings.setdefault("filters", {})["languages"] = [code.strip() for code in args.languages.split(",") if code.strip()]
    source = {key: value for key, value in (("format", args.format), ("text_field", args.text_field)) if value is not None}
    if source and not args.input:
        raise ConfigError("--format and --text-field apply to --input; set them on the [[sources]] of a config file")
    config = load_prepare_config(args.config, settings, args.input, source)
    result = prepare(config, args.out, progress=not args.quiet)
    stats = result.stats
    print(f"{stats['inputs']:,} documents: {stats['kept']:,} kept, {stats['rejected']:,} rejected, {stats['duplicates']:,} duplicates")
    if stats["read_issues"]["counts"]:
        counts = ", ".join(f"{n} {kind}" for kind, n in stats["read_issues"]["counts"].items())
        print(f"scratchlm: warning: input problems (see report.md): {counts}", file=sys.stderr)
    if not stats["kept"]:
        print("scratchlm: warning: no document was kept; see report.md for the rejection reasons", file=sys.stderr)
    if result.manifest:
        print(f"{stats['tokens']['train']:,} train and {stats['tokens']['val']:,} validation tokens")
        if stats["kept"] and not stats["tokens"]["val"]:
            print("scratchlm: warning: no validation split (val_fraction 0, or too few documents); pretrain needs one, or --val-text", file=sys.stderr)
    print(f"wrote {args.out}/ (report.md, stats.json, documents/, ledger/{', shards' if result.manifest else ''})")
    return 0


# ---- scratchlm model ... --------------------------------------------------------------
def _add_model_commands(stages: argparse._SubParsersAction) -> None:
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


# ---- scratchlm pretrain --------------------------------------------------------------
def _add_pretrain_command(stages: argparse._SubParsersAction) -> None:
    from scratchlm.train.config import builtin_recipes

    pre = stages.add_parser(
        "pretrain",
        help="train a model from scratch, or continue a trained one, on token shards",
        description="Pretrain a decoder-only transformer on token shards. Writes RUN/metrics.jsonl, loss.png, "
        "report.md, checkpoints/ and the final model/. With no --recipe, uses the default CPU recipe, which "
        "sizes the model to the time budget. With --init-from MODEL, continues pretraining a trained model on "
        "the shards (e.g. a domain corpus): its weights and architecture are the start, the shards must be made "
        "with its tokenizer, step 0 logs the validation loss before training, and the default recipe is "
        "continued-pretraining. Works unchanged under torchrun --nproc_per_node N (data parallel).",
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
    from scratchlm.train.config import load_train_config, resolve_recipe
    from scratchlm.train.loop import pretrain

    overrides = list(args.set)
    if args.max_time is not None:
        overrides += [f"max_time={args.max_time}", "max_steps=none"]
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if args.init_from is not None:
        overrides.append(f"init_from={args.init_from}")
    continued = any(item.split("=", 1)[0].strip() == "init_from" for item in overrides)
    recipe = args.recipe or ("continued-pretraining" if continued else None)
    config = load_train_config(resolve_recipe(recipe), overrides)
    summary = pretrain(args.data, args.out, config, val_text=args.val_text, resume=args.resume, progress=not args.quiet)
    if summary.start_val_bpb is not None:
        print(f"step 0 ({config.init_from}): val loss {summary.start_val_loss:.4f} nats/token, {summary.start_val_bpb:.4f} bits per byte")
    if summary.val_bpb is not None:
        print(f"step {summary.steps}: val loss {summary.val_loss:.4f} nats/token, {summary.val_bpb:.4f} bits per byte")
    print(f"wrote {summary.run_dir}/ (model/, report.md, loss.png, metrics.jsonl)")
    return 0


# ---- scratchlm generate ---------------------------------------------------------------
def _add_generate_command(stages: argparse._SubParsersAction) -> None:
    gen = stages.add_parser(
        "generate",
        help="sample text from a trained model",
        description="Sample continuations of a prompt (from --prompt or standard input), streaming tokens to "
        "the terminal as they are produced. " + MODEL_HELP,
    )
    gen.add_argument("model", type=Path, help="the model (see above)")
    gen.add_argument("--prompt", default=None, help="the prompt (default: read standard input; empty: start a new document)")
    _add_sampling_args(gen, temperature=0.8, max_new_tokens=200, max_new_tokens_help="tokens to generate per sample (default: 200)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop a sample at this string (repeatable)")
    gen.add_argument("--num-samples", type=int, default=1, help="independent samples (default: 1)")
    gen.add_argument("--truncate", action="store_true",
                     help="cut a prompt longer than the context from the left (default: refuse it)")
    _add_inference_args(gen)
    gen.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    from scratchlm.model.sampling import encode_prompt, fit_prompt, generate_text

    config = _sampling_config(args, stop=tuple(args.stop), num_samples=args.num_samples, truncate=args.truncate)
    model, tokenizer = _load_for_inference(args)
    prompt = args.prompt if args.prompt is not None else ("" if sys.stdin.isatty() else sys.stdin.read())
    ids = encode_prompt(tokenizer, prompt)
    kept = fit_prompt(ids, config, model.config.block_size)  # a prompt over the context fails before anything is printed
    if len(kept) < len(ids):
        print(f"note: the prompt has {len(ids)} tokens; the model sees its last {len(kept)} (--truncate)", file=sys.stderr)
    if config.num_samples == 1:  # stream as tokens arrive
        sys.stdout.write(prompt)
        generate_text(model, tokenizer, prompt, config, on_text=lambda _, piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        return 0
    for n, text in enumerate(generate_text(model, tokenizer, prompt, config), 1):
        print(f"--- sample {n} ---\n{prompt}{text}\n")
    return 0


def _add_inference_args(cmd: argparse.ArgumentParser) -> None:
    """Where and how `generate`, `chat` and `serve` run the model."""
    cmd.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="weights and activations (default: float32; bfloat16 halves the memory read per token)")
    cmd.add_argument("--quantize", default="none", choices=["none", "int8"],
                     help="int8: weight-only int8 matmuls on bfloat16 activations, the fastest on CPU (default: none)")


def _load_for_inference(args: argparse.Namespace):
    from scratchlm.interop import load_pretrained
    from scratchlm.model.quantize import prepare_for_inference

    model, tokenizer = load_pretrained(args.model, args.device)
    return prepare_for_inference(model, args.dtype, args.quantize), tokenizer


def _add_sampling_args(cmd: argparse.ArgumentParser, temperature: float, max_new_tokens: int | None, max_new_tokens_help: str) -> None:
    """The sampling flags `generate` and `chat` share: the fields of SamplingConfig."""
    cmd.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=max_new_tokens_help)
    cmd.add_argument("--temperature", type=float, default=temperature, help=f"0 for greedy; higher is more random (default: {temperature})")
    cmd.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    cmd.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens holding this probability mass")
    cmd.add_argument("--min-p", type=float, default=0.0,
                     help="drop tokens less likely than this fraction of the most likely one (default: 0.0, off)")
    cmd.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeating tokens (default: 1.0, off)")
    cmd.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")


def _sampling_config(args: argparse.Namespace, **fields):
    """SamplingConfig from the flags of `_add_sampling_args`; `fields` add or override."""
    from scratchlm.model.sampling import SamplingConfig

    flags = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
             "repetition_penalty": args.repetition_penalty, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    return SamplingConfig(**(flags | fields))


# ---- scratchlm chat -------------------------------------------------------------------
def _add_chat_command(stages: argparse._SubParsersAction) -> None:
    chat = stages.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Chat with a model in the terminal: replies stream as they are produced, the conversation "
        "is kept, and the model's own chat template renders it (ChatML for models trained here). When the "
        "conversation outgrows the context, the oldest exchanges are forgotten. Commands: /reset, /system TEXT, "
        "/help, /exit; Ctrl-C stops a reply. With standard input from a pipe, each line is a message (empty lines "
        "are skipped) and only the replies go to standard output; notices go to standard error. " + MODEL_HELP,
    )
    chat.add_argument("model", type=Path, help="the model (see above)")
    chat.add_argument("--system", default=None, metavar="TEXT", help="the system prompt (default: the chat template's own, if any)")
    _add_sampling_args(chat, temperature=0.7, max_new_tokens=None,
                       max_new_tokens_help="most tokens per reply (default: 512, at most half the model's context)")
    _add_inference_args(chat)
    chat.set_defaults(run=_chat)


def _chat(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from scratchlm.serve.chat import CHAT_SAMPLING, ChatSession, default_max_new_tokens, run_chat

    asked = args.max_new_tokens
    config = _sampling_config(args, max_new_tokens=CHAT_SAMPLING.max_new_tokens if asked is None else asked)  # fail before loading
    interactive = sys.stdin.isatty()
    if isinstance(sys.stdin, io.TextIOWrapper):  # a stray non-UTF-8 byte in a message is not worth a traceback
        sys.stdin.reconfigure(errors="replace")
    if interactive:
        print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = _load_for_inference(args)
    if asked is None:
        config = replace(config, max_new_tokens=default_max_new_tokens(model.config.block_size))
    session = ChatSession(tokenizer, system=args.system, config=config, limit_name="--max-new-tokens")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def notice(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if interactive:
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # not on Windows
            pass
        notice(f"{args.model.name}: context {model.config.block_size} tokens, replies up to {config.max_new_tokens} tokens.\n"
               "/help lists the commands; Ctrl-C stops a reply; /exit or Ctrl-D quits.")
        run_chat(session, model, _read_typed_line, write, notice)
    else:  # piped: no prompt, so standard output holds only the replies
        run_chat(session, model, _read_piped_line, write, notice, prompt="")
    return 0


def _read_typed_line(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:  # Ctrl-D: end the prompt's line, so the shell's prompt starts on its own
        print(file=sys.stderr)
        raise


def _read_piped_line(prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


# ---- scratchlm serve ------------------------------------------------------------------
def _add_serve_command(stages: argparse._SubParsersAction) -> None:
    srv = stages.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a web chat page",
        description="Serve a model over HTTP: the OpenAI API (GET /v1/models, POST /v1/completions, "
        "POST /v1/chat/completions, streaming or not), GET /health and a chat page at /. Concurrent requests "
        "are batched together. Binds 127.0.0.1 unless --host says otherwise; Ctrl-C stops. " + MODEL_HELP,
    )
    srv.add_argument("model", type=Path, help="the model (see above)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                     "only; 0.0.0.0 opens it to the network, use --api-key then)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0: any free port)")
    srv.add_argument("--api-key", default=None, metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on /v1/ routes (default: no key)")
    srv.add_argument("--max-batch", type=int, default=8, help="generations run together in one batch (default: 8)")
    srv.add_argument("--max-queue", type=int, default=256,
                     help="generations that may wait for a slot; past that, requests get 503 (default: 256)")
    srv.add_argument("--max-body", type=_argument_type(parse_bytes), default=None, metavar="SIZE",
                     help="largest request body, such as 4MiB; larger ones get 413 (default: 1 MiB, or 32 bytes per "
                     "token of the model's context if more: room for a chat that fills the context)")
    srv.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                     help="a host name the server also answers to on a loopback address, besides localhost, "
                     "127.0.0.1 and [::1]: the name a reverse proxy passes in Host (repeatable)")
    _add_inference_args(srv)
    srv.add_argument("--feedback", type=Path, default=None, metavar="PATH",
                     help="JSONL file the chat page's ratings and edits are appended to (default: feedback.jsonl)")
    srv.add_argument("--feedback-max-size", type=_argument_type(parse_bytes), default="256MiB", metavar="SIZE",
                     help="the feedback file's cap; when full, feedback gets 507 until it is moved away "
                     "(default: 256MiB)")
    srv.add_argument("--model-name", default=None, metavar="NAME",
                     help="the model's name in the API (default: the file or folder name of MODEL)")
    srv.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from scratchlm.serve.server import run_server

    run_server(args.model, args.host, args.port, max_batch=args.max_batch, max_queue=args.max_queue,
               api_key=args.api_key, device=args.device, dtype=args.dtype, quantize=args.quantize,
               feedback_path=args.feedback, model_name=args.model_name, max_body=args.max_body,
               allowed_hosts=args.allowed_host, feedback_max_bytes=args.feedback_max_size)
    return 0


# ---- scratchlm feedback select / build --------------------------------------------------
def _add_feedback_commands(stages: argparse._SubParsersAction) -> None:
    fb = stages.add_parser(
        "feedback",
        help="the human-feedback loop: pick what the model is unsure of, turn reviews into training data",
        description="select: answer a pool of prompts and write the answers the model is least sure of for review. "
        "build: turn reviewed files (and the web chat page's feedback.jsonl) into SFT and DPO data.",
    )
    steps = fb.add_subparsers(title="steps", metavar="STEP")
    sel = steps.add_parser(
        "select",
        help="score prompts by the model's uncertainty and write the most uncertain for review",
        description="Answer each prompt greedily and score the answer by the model's uncertainty: mean next-token "
        "entropy over its tokens (entropy), or one minus the mean gap between the two likeliest tokens (margin). "
        "The --top most uncertain go to --out (JSONL, or CSV when it ends in .csv) with empty `rating` and "
        "`edited` fields for a reviewer to fill in. " + MODEL_HELP,
    )
    sel.add_argument("model", type=Path, help="the model (see above)")
    sel.add_argument("--prompts", type=Path, required=True,
                     help='JSONL pool: {"prompt": text} or {"messages": [...]} a line, optional "id"')
    sel.add_argument("--out", type=Path, required=True, help="review file to write (.jsonl or .csv)")
    sel.add_argument("--top", type=int, default=20, help="how many to keep for review (default: 20)")
    sel.add_argument("--method", choices=["entropy", "margin"], default="entropy", help="uncertainty measure (default: entropy)")
    sel.add_argument("--max-new-tokens", type=int, default=64, help="length of each answer (default: 64)")
    sel.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    sel.set_defaults(run=_feedback_select)
    bld = steps.add_parser(
        "build",
        help="turn reviews into SFT conversations and DPO pairs",
        description="Read reviewed files from `feedback select` (JSONL or CSV) and the web chat page's feedback.jsonl. "
        "A reply rated up becomes an SFT conversation; an edited reply becomes an SFT conversation with the edit "
        "and a DPO pair (chosen: the edit, rejected: the model's reply); rated down without an edit, or not "
        "reviewed, is skipped and counted. The latest review of a reply wins.",
    )
    bld.add_argument("reviews", type=Path, nargs="+", help="reviewed files")
    bld.add_argument("--sft", type=Path, default=None, help='SFT JSONL to write ({"messages": [...]})')
    bld.add_argument("--dpo", type=Path, default=None, help='DPO JSONL to write ({"prompt", "chosen", "rejected"})')
    bld.set_defaults(run=_feedback_build)


def _feedback_select(args: argparse.Namespace) -> int:
    from scratchlm.atomic_io import check_writable_file
    from scratchlm.finetune.feedback import load_prompts, most_uncertain, score_prompts, write_review_file
    from scratchlm.interop import load_pretrained

    check_writable_file(args.out)
    prompts, report = load_prompts(args.prompts)
    print(report.summary(), file=sys.stderr)
    model, tokenizer = load_pretrained(args.model, args.device)
    candidates = score_prompts(model, tokenizer, prompts, args.method, args.max_new_tokens)
    chosen = most_uncertain(candidates, args.top)
    write_review_file(args.out, chosen)
    print(f"{len(chosen)} of {len(candidates)} answers for review -> {args.out} (fill in rating and/or edited, then: "
          f"scratchlm feedback build {args.out} --sft sft.jsonl --dpo dpo.jsonl)")
    return 0


def _feedback_build(args: argparse.Namespace) -> int:
    from scratchlm.finetune.feedback import build_datasets

    report = build_datasets(args.reviews, args.sft, args.dpo)
    print(report.summary())
    return 0


# ---- scratchlm finetune classify | sft | dpo --------------------------------------------
def _add_finetune_args(cmd: argparse.ArgumentParser, unit: str, lr: float | str, epochs: int, batch_size: int,
                       shipped: str) -> None:
    """MODEL, --data, --eval, --out and the settings every fine-tuning method shares
    (`scratchlm.finetune.trainer.FinetuneConfig`); each command adds its own after them."""
    from scratchlm.finetune.datasets import resolve_data_path, shipped_datasets

    cmd.add_argument("model", type=Path, help="the base model (see above)")
    data_path = _argument_type(resolve_data_path)
    cmd.add_argument("--data", required=True, type=data_path,
                     help="training records: a file, or builtin:NAME for a data set shipped with scratchlm "
                     f"({', '.join(n for n in shipped_datasets() if n.startswith(shipped))})")
    cmd.add_argument("--eval", type=data_path, default=None,
                     help="held-out records, a file or builtin:NAME (default: a seeded --val-fraction split of --data)")
    cmd.add_argument("--out", required=True, type=Path, help="run folder (must be empty unless --force)")
    cmd.add_argument("--freeze", default="none", metavar="WHAT",
                     help="none (train everything), embeddings, or all-but-last:N (only the last N blocks, the final norm "
                     "and an untied head) (default: none)")
    cmd.add_argument("--lora", action="store_true", help="train LoRA adapters instead, every base weight frozen")
    cmd.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default: 8)")
    cmd.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/rank (default: 16)")
    cmd.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default: 0)")
    cmd.add_argument("--lora-targets", default="auto",
                     help="comma-separated linear layers to adapt, by name suffix; auto: attn.qkv,attn.proj,mlp.up,mlp.down "
                     "plus the LM head when it is untied from the embedding, so a new end-of-turn token can be learnt "
                     "(default: auto)")
    cmd.add_argument("--epochs", type=int, default=epochs, help=f"passes over the training data (default: {epochs})")
    cmd.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    cmd.add_argument("--batch-size", type=int, default=batch_size, help=f"{unit} per batch (default: {batch_size})")
    cmd.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (default: 1)")
    # lr as text: the method's config picks the rate when --lr is not given (SFT: by full or LoRA); the text says how.
    lr_default = lr if isinstance(lr, str) else format(lr, "g")
    cmd.add_argument("--lr", type=float, default=None if isinstance(lr, str) else lr,
                     help=f"peak learning rate, after linear warmup, before cosine decay (default: {lr_default})")
    cmd.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default: 0)")
    cmd.add_argument("--warmup-fraction", type=float, default=0.1, help="share of the steps spent warming up (default: 0.1)")
    cmd.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 for none (default: 1.0)")
    cmd.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                     help="autocast precision; auto is bfloat16 on GPUs, float32 on CPU (default: auto)")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the split, new weights and the batch order (default: 0)")
    cmd.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    cmd.add_argument("--force", action="store_true", help="write into a non-empty --out")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")


def _finetune_settings(args: argparse.Namespace) -> dict:
    """The shared `FinetuneConfig` fields from the arguments `_add_finetune_args` defined."""
    names = ("freeze", "lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "epochs", "max_steps",
             "batch_size", "grad_accum", "lr", "weight_decay", "warmup_fraction", "grad_clip", "dtype", "seed", "device")
    return {name: getattr(args, name) for name in names}


def _add_finetune_commands(stages: argparse._SubParsersAction) -> None:
    ft = stages.add_parser("finetune", help="fine-tune a model for a task",
                           description="Post-training: fine-tune a pretrained model for a task.")
    cmds = ft.add_subparsers(title="commands", metavar="COMMAND")
    cls = cmds.add_parser(
        "classify",
        help="train a text classifier on (text, label) records",
        description="Fine-tune MODEL as a text classifier: a linear head on the last token's (or the mean) hidden "
        "state, trained on a CSV (header text,label) or JSONL ({\"text\", \"label\"}) file. Reports held-out accuracy, "
        "macro F1 and the confusion matrix before and after, and writes OUT/classifier.safetensors, config.json, "
        "tokenizer.json, report.md, results.json, metrics.jsonl and loss.png. " + MODEL_HELP,
    )
    _add_finetune_args(cls, unit="texts", lr=1e-3, epochs=3, batch_size=16, shipped="spam_")
    cls.add_argument("--val-fraction", type=float, default=0.2, help="held-out share without --eval (default: 0.2)")
    cls.add_argument("--pooling", choices=["last", "mean"], default="last", help="last real token or mean of tokens (default: last)")
    cls.add_argument("--max-length", type=int, default=128, help="tokens per text, end token included (default: 128)")
    long = cls.add_mutually_exclusive_group()
    long.add_argument("--truncate", dest="long", action="store_const", const="truncate", help="cut longer texts (the default)")
    long.add_argument("--drop-long", dest="long", action="store_const", const="drop", help="leave longer texts out")
    cls.set_defaults(run=_finetune_classify, long="truncate")
    sft = cmds.add_parser(
        "sft",
        help="instruction-tune a model on conversations (SFT)",
        description="Fine-tune MODEL to follow instructions: next-token loss on the assistant's tokens only, the "
        "conversation rendered with the model's own chat template (ChatML for models trained here). --data and --eval "
        "are JSONL files, one record a line, in any of these shapes: {\"messages\": [{\"role\", \"content\"}]}, "
        "ShareGPT {\"conversations\": [{\"from\", \"value\"}]}, Alpaca {\"instruction\", \"input\", \"output\"}, "
        "{\"prompt\", \"completion\"}; malformed lines are skipped and reported by line number. Reports the held-out "
        "answer loss and perplexity before and after, and greedy answers to a few held-out prompts before and after. "
        "OUT holds model/ (the fine-tuned model, LoRA merged: a model folder that chat, serve, eval and export open), "
        "adapter.safetensors (with --lora), report.md, results.json, metrics.jsonl and loss.png. " + MODEL_HELP,
    )
    _add_finetune_args(sft, unit="rows of --max-length tokens (conversations with --no-packing)",
                       lr="5e-4, 2e-3 with --lora; a tenth of that for a model of 50M+ parameters", epochs=2, batch_size=8,
                       shipped="instructions_")  # SFTConfig's defaults
    sft.add_argument("--max-length", type=int, default=None,
                     help="row width and context: longer conversations are dropped or cut (default: min(512, the model's context))")
    sft.add_argument("--no-packing", dest="packing", action="store_false",
                     help="one conversation per row, padded, instead of packing several into each row (attention stays "
                     "inside each either way)")
    sft.add_argument("--truncate", choices=["drop", "left"], default="drop",
                     help="a conversation over --max-length: drop it, or cut its start, never its last answer (default: drop)")
    sft.add_argument("--val-fraction", type=float, default=0.1, help="held-out share without --eval (default: 0.1)")
    sft.add_argument("--samples", type=int, default=3, help="held-out prompts answered before and after, in the report (default: 3)")
    sft.set_defaults(run=_finetune_sft)
    dpo = cmds.add_parser(
        "dpo",
        help="align a model with preference pairs (DPO)",
        description="Train MODEL by direct preference optimisation (Rafailov et al. 2023) on pairs of a prompt, a "
        "chosen answer and a rejected one: the model learns to make chosen answers more likely, relative to a frozen "
        "reference (the starting model unless --reference), than rejected ones. --data and --eval are JSONL files, one "
        "pair a line: {\"prompt\": text, \"chosen\": text, \"rejected\": text}, with the prompt a string, a list of "
        "messages, or {\"messages\": [...]} instead, and each answer a string or a list of one assistant message "
        "(TRL's shape); the web chat page's feedback file (scratchlm serve) is read as it is: an edited reply is a "
        "pair (chosen = the edit, rejected = the model's reply), a rating alone is skipped, and only the latest record "
        "of each reply counts. Malformed lines (and pairs whose answers are the same) are skipped and reported by line "
        "number. Reports held-out DPO loss, reward accuracy, margin and rewards, and the model's own log-probability "
        "preference, before and after. OUT holds model/ (the tuned model, LoRA merged: a model folder that chat, "
        "serve, eval and export open), adapter.safetensors (with --lora), report.md, results.json, metrics.jsonl and "
        "loss.png. " + MODEL_HELP,
    )
    _add_finetune_args(dpo, unit="pairs", lr="1e-4, 1e-3 with --lora; a tenth of that for a model of 50M+ parameters", epochs=2, batch_size=8, shipped="preferences_")  # DPOConfig's defaults
    dpo.add_argument("--beta", type=float, default=0.1,
                     help="reward scale: how far the model may move from the reference; lower lets it move further (default: 0.1)")
    dpo.add_argument("--label-smoothing", type=float, default=0.0,
                     help="conservative DPO: the chance a pair's label is wrong, in [0, 0.5) (default: 0)")
    dpo.add_argument("--reference", default=None, metavar="MODEL",
                     help="the frozen reference model (same tokenizer) (default: MODEL itself, before training)")
    dpo.add_argument("--live-reference", dest="precompute_reference", action="store_false",
                     help="keep the reference model in memory and score each batch with it, instead of computing its "
                     "log-probabilities of every pair once before training (TRL's default; two models in memory)")
    dpo.add_argument("--max-length", type=int, default=None,
                     help="tokens per prompt and answer: longer pairs are dropped or cut (default: min(512, the model's context))")
    dpo.add_argument("--truncate", choices=["drop", "left"], default="drop",
                     help="a pair over --max-length: drop it, or cut its prompt's start in both answers, never an answer "
                     "(default: drop)")
    dpo.add_argument("--val-fraction", type=float, default=0.1, help="held-out share without --eval (default: 0.1)")
    dpo.set_defaults(run=_finetune_dpo)


def _finetune_classify(args: argparse.Namespace) -> int:
    from scratchlm.finetune.classify import ClassifyConfig, finetune_classifier

    config = ClassifyConfig(**_finetune_settings(args), pooling=args.pooling, max_length=args.max_length, long=args.long,
                            val_fraction=args.val_fraction)
    result = finetune_classifier(args.model, args.data, args.out, config, eval_path=args.eval, force=args.force,
                                 progress=not args.quiet, note=print)
    if result.data["truncated"] or result.data["dropped"]:
        print(f"texts over {config.max_length} tokens: {result.data['truncated']} truncated, {result.data['dropped']} dropped")
    print(f"trainable parameters: {result.trainable_params:,} of {result.total_params:,}; "
          f"{result.steps} steps in {result.train_seconds:.1f} s")
    scores = result.after
    print(f"held-out after: accuracy {scores['accuracy']:.4f}, macro F1 {scores['macro_f1']:.4f} ({scores['examples']} examples)")
    extra = ", adapter.safetensors" if config.lora else ""
    print(f"wrote {result.out}/ (classifier.safetensors, config.json, tokenizer.json, report.md, results.json, loss.png, "
          f"metrics.jsonl{extra})")
    return 0


def _finetune_sft(args: argparse.Namespace) -> int:
    from scratchlm.finetune.sft_train import SFTConfig, finetune_sft

    config = SFTConfig(**_finetune_settings(args), max_length=args.max_length, packing=args.packing, truncate=args.truncate,
                       val_fraction=args.val_fraction, samples=args.samples)
    result = finetune_sft(args.model, args.data, args.out, config, eval_path=args.eval, force=args.force,
                          progress=not args.quiet, note=print)
    print(f"{result.steps} steps in {result.train_seconds:.1f} s, peak memory {result.peak_memory_mb:,.0f} MB")
    print(f"held-out answer loss after: {result.after['loss']:.4f} (perplexity {result.after['perplexity']:.2f})")
    extra = ", adapter.safetensors" if config.lora else ""
    print(f"wrote {result.out}/ (report.md, results.json, loss.png, metrics.jsonl{extra}); the model: {result.model_dir}")
    return 0


def _finetune_dpo(args: argparse.Namespace) -> int:
    from scratchlm.finetune.dpo_train import DPOConfig, finetune_dpo

    config = DPOConfig(**_finetune_settings(args), beta=args.beta, label_smoothing=args.label_smoothing,
                       reference=args.reference, precompute_reference=args.precompute_reference,
                       max_length=args.max_length, truncate=args.truncate, val_fraction=args.val_fraction)
    result = finetune_dpo(args.model, args.data, args.out, config, eval_path=args.eval, force=args.force,
                          progress=not args.quiet, note=print)
    print(f"{result.steps} steps in {result.train_seconds:.1f} s, peak memory {result.peak_memory_mb:,.0f} MB")
    m = result.after
    print(f"held-out after: DPO loss {m['loss']:.4f}, reward accuracy {m['reward_accuracy']:.4f}, "
          f"margin {m['margin']:+.4f}, log-prob accuracy {m['logp_accuracy']:.4f}")
    extra = ", adapter.safetensors" if config.lora else ""
    print(f"wrote {result.out}/ (report.md, results.json, loss.png, metrics.jsonl{extra}); the model: {result.out / 'model'}")
    return 0


# ---- scratchlm import / export ----------------------------------------------------------
def _add_interop_commands(stages: argparse._SubParsersAction) -> None:
    imp = stages.add_parser(
        "import",
        help="turn a GGUF file or Hugging Face checkpoint into a scratchlm model folder",
        description="Read a pretrained model and write a scratchlm model folder (config.json, model.safetensors, "
        "tokenizer.json, chat_template.jinja). SOURCE is a GGUF file (Llama, Qwen3 or GPT-2 architecture; F32, F16, "
        "BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and K-quants are dequantised to float32) or a Hugging Face checkpoint "
        "folder (config.json + safetensors + tokenizer.json; GPT-2, Llama, Mistral, Qwen3). Every command also "
        "accepts SOURCE directly; importing once saves the conversion on each later load.",
    )
    imp.add_argument("source", type=Path, help="GGUF file or Hugging Face checkpoint folder")
    imp.add_argument("--out", type=Path, required=True, help="model folder to write (new or empty)")
    imp.add_argument("--pattern", default=None, help="override the tokenizer's pre-tokenizer regex (a name such as gpt2, or a regex)")
    imp.set_defaults(run=_import)

    exp = stages.add_parser(
        "export",
        help="write a model as a Hugging Face folder or a GGUF file",
        description="Write a model for other tools. --format hf: a folder that transformers' AutoModelForCausalLM "
        "and AutoTokenizer load (GPT-2, Llama or, for QK-norm models, Qwen3 architecture) and that gives the same "
        "logits. --format gguf: one GGUF file (llama, qwen3 or gpt2 architecture, F32 or F16) for llama.cpp and the "
        "gguf package. " + MODEL_HELP,
    )
    exp.add_argument("model", type=Path, help="the model (see above)")
    exp.add_argument("--format", required=True, choices=["hf", "gguf"], help="hf (folder) or gguf (file)")
    exp.add_argument("--out", type=Path, required=True, help="folder (hf, new or empty) or file (gguf) to write")
    exp.add_argument("--dtype", default=None, help="hf: float32 (default), bfloat16 or float16; gguf: f32 (default) or f16")
    exp.set_defaults(run=_export)


def _print_conversion(summary) -> None:
    print(f"read   {summary.source} ({summary.source_kind}): {summary.params:,} parameters, {summary.description}")
    print(f"chat template: {'yes' if summary.chat_template else 'none'}")
    print(f"wrote  {summary.out} in {summary.seconds:.1f} s")


def _import(args: argparse.Namespace) -> int:
    from scratchlm.interop.convert import import_model

    _print_conversion(import_model(args.source, args.out, pattern=args.pattern))
    return 0


def _export(args: argparse.Namespace) -> int:
    from scratchlm.interop.convert import export_model

    _print_conversion(export_model(args.model, args.format, args.out, dtype=args.dtype))
    return 0


# ---- scratchlm eval / compare / harness ------------------------------------------------
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


def _add_eval_commands(stages: argparse._SubParsersAction) -> None:
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


def _split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _eval_inputs(args: argparse.Namespace, shards: Path | None = None) -> tuple[list[str], str | Path | None]:
    """The tasks and text to evaluate: as given, or the offline default suite when nothing is."""
    from scratchlm.eval.suite import default_tasks, default_text

    tasks = _split_list(args.tasks)
    if args.tasks is not None and not tasks:
        raise ConfigError("--tasks is empty; name task files or builtin tasks, or leave it out for the default suite")
    if "builtin" in tasks:
        tasks = [t for t in tasks if t != "builtin"] + default_tasks()
    text = Path(args.text) if args.text else None
    if not tasks and text is None and shards is None:
        print("no --text, --shards or --tasks: using the builtin tasks and the embedded corpus's held-out text")
        return default_tasks(), default_text()
    return tasks, text


def _eval(args: argparse.Namespace) -> int:
    from scratchlm.atomic_io import check_writable_file
    from scratchlm.eval.runner import RESULTS_FILE, default_results_dir, evaluate_model, save_report
    from scratchlm.eval.tasks import builtin_tasks, load_task
    from scratchlm.interop import load_pretrained

    if args.list_tasks:
        for name in builtin_tasks():
            task = load_task(name)
            print(f"{name:<32} {task.kind:<16} {len(task.examples):>4} examples  {task.settings.get('description', '')}")
        return 0
    if args.model is None:
        raise ConfigError("eval: give a MODEL (or --list-tasks)")
    out = args.out or default_results_dir(args.model)
    check_writable_file(out / RESULTS_FILE)  # before the work, not after it
    model, tokenizer = load_pretrained(args.model, args.device)
    tasks, text = _eval_inputs(args, args.shards)
    report = evaluate_model(model, tokenizer, tasks=tasks, text=text, shards=args.shards, stride=args.stride,
                            batch_size=args.batch_size, limit=args.limit, truncate=args.truncate)
    print(report.summary())
    print(f"wrote {save_report(report, out)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from scratchlm.atomic_io import check_writable_file
    from scratchlm.eval.compare import compare_models, comparison_markdown, save_comparison

    check_writable_file(args.out / "compare.md")
    tasks, text = _eval_inputs(args)
    comparison = compare_models(args.models, labels=_split_list(args.labels) or None, tasks=tasks, text=text,
                                stride=args.stride, batch_size=args.batch_size, limit=args.limit,
                                truncate=args.truncate, device=args.device)
    print(comparison_markdown(comparison))
    written = save_comparison(comparison, args.out)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _harness(args: argparse.Namespace) -> int:
    from scratchlm.atomic_io import check_writable_file
    from scratchlm.eval.harness import run_harness

    if args.out:
        check_writable_file(args.out)
    results = run_harness(args.model, _split_list(args.tasks), include_path=args.include_path, limit=args.limit,
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


# ---- scratchlm tokenizer ... ------------------------------------------------------------
def _add_tokenizer_commands(stages: argparse._SubParsersAction) -> None:
    tok = stages.add_parser(
        "tokenizer",
        help="train, inspect, import and export byte-level BPE tokenizers",
        description="Byte-level BPE tokenizers: train one on your corpus, encode and decode text, "
        "print statistics, import Hugging Face or GGUF tokenizers, export to Hugging Face.",
    )
    cmds = tok.add_subparsers(title="tokenizer commands", metavar="COMMAND", required=True)

    train = cmds.add_parser(
        "train",
        help="learn a tokenizer from text files",
        description="Learn byte-level BPE merges from text files or directories (read as UTF-8 and "
        "streamed; undecodable bytes are replaced and counted). With no --input, trains on the "
        "embedded corpus (CPython's own documentation), which every machine has.",
    )
    train.add_argument("--input", nargs="+", metavar="PATH", help="text files or directories; hidden files and folders (.git) are skipped (default: embedded corpus)")
    train.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary: 256 bytes + merges + special tokens; fewer if the corpus runs out of pairs seen --min-frequency times (default: 8192)")
    train.add_argument("--out", required=True, type=Path, help="where to write the tokenizer (JSON)")
    train.add_argument("--pattern", default=None, help="pre-tokenization: a name, gpt4 (default), gpt2, llama3 or smollm, or a regex whose matches must cover all text")
    train.add_argument(
        "--special-tokens", nargs="*", metavar="TOKEN", default=None,
        help="special tokens, given the top ids (default: <|endoftext|> <|im_start|> <|im_end|>)",
    )
    train.add_argument("--min-frequency", type=int, default=2, help="stop when no pair occurs this often (default: 2)")
    train.add_argument("--max-bytes", type=_argument_type(parse_bytes), default=None, help="read at most this much text, e.g. 50MB")
    train.add_argument("--workers", type=int, default=None, help="processes for pre-tokenization (default: all cores)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--hf-out", type=Path, default=None, help="also write a Hugging Face tokenizer.json here")
    train.set_defaults(run=_tokenizer_train)

    encode = cmds.add_parser("encode", help="print the token ids of a text", description="Encode text (from --text, --file or standard input) to token ids.")
    _add_tokenizer_arg(encode)
    _add_text_args(encode)
    special = encode.add_mutually_exclusive_group()
    special.add_argument("--allow-special", action="store_true", help="encode special-token strings in the text as special tokens (by default they are an error)")
    special.add_argument("--special-as-text", action="store_true", help="encode special-token strings in the text as ordinary text")
    encode.add_argument("--show-tokens", action="store_true", help="print each token's text next to its id")
    encode.set_defaults(run=_tokenizer_encode)

    decode = cmds.add_parser("decode", help="print the text of token ids", description="Decode token ids (from --ids or standard input, separated by spaces, commas or newlines) to text.")
    _add_tokenizer_arg(decode)
    decode.add_argument("--ids", help='token ids, e.g. "15496 995"')
    decode.set_defaults(run=_tokenizer_decode)

    stats = cmds.add_parser(
        "stats",
        help="bytes per token, vocabulary use and longest tokens",
        description="How well a tokenizer fits a text: bytes per token, the share of the vocabulary the text uses, the longest tokens and the most frequent ones.",
    )
    _add_tokenizer_arg(stats)
    _add_text_args(stats)
    stats.add_argument("--top", type=int, default=10, help="how many longest / most frequent tokens to list (default: 10)")
    stats.add_argument("--json", action="store_true", help="print the figures as JSON")
    stats.set_defaults(run=_tokenizer_stats)

    imp = cmds.add_parser(
        "import",
        help="convert a Hugging Face tokenizer.json or a GGUF model's tokenizer",
        description="Read a byte-level BPE tokenizer from a Hugging Face tokenizer.json or a GGUF model file and write it in scratchlm's format.",
    )
    imp.add_argument("source", type=Path, help="tokenizer.json, a folder holding one, or a .gguf file")
    imp.add_argument("--out", required=True, type=Path, help="where to write the scratchlm tokenizer")
    imp.add_argument("--pattern", default=None, help="override the pre-tokenization regex (a name or a regex)")
    imp.set_defaults(run=_tokenizer_import)

    exp = cmds.add_parser("export", help="write a Hugging Face tokenizer.json", description="Write a tokenizer as a Hugging Face tokenizer.json that encodes exactly as scratchlm does.")
    _add_tokenizer_arg(exp)
    exp.add_argument("--format", choices=["hf"], default="hf", help="output format (hf: tokenizer.json)")
    exp.add_argument("--out", required=True, type=Path, help="output file")
    exp.set_defaults(run=_tokenizer_export)


def _add_tokenizer_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, type=Path, help="scratchlm tokenizer file, Hugging Face tokenizer.json, or .gguf model")


def _add_text_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="the text (default: read standard input)")
    source.add_argument("--file", type=Path, help="read the text from this file")


def _read_text_arg(args: argparse.Namespace) -> str:
    """The text of --text, --file or standard input, as valid Unicode: bytes that are not
    UTF-8 become U+FFFD, with a warning that counts them."""
    from scratchlm.text.reading import decode_text, read_text

    if args.text is not None:
        # Non-UTF-8 bytes in argv arrive as surrogate escapes; turn them back into bytes.
        text, bad = decode_text(args.text.encode("utf-8", "surrogateescape"))
        source = "--text"
    elif args.file is not None:
        text, bad = read_text(args.file)
        source = str(args.file)
    else:
        if sys.stdin.isatty():
            print("(reading text from standard input; end with Ctrl-D)", file=sys.stderr)
        text, bad = decode_text(sys.stdin.buffer.read())
        source = "standard input"
    if bad:
        print(f"scratchlm: warning: {source}: {bad} undecodable byte sequences replaced with U+FFFD", file=sys.stderr)
    return text


def _tokenizer_train(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import DEFAULT_SPECIAL_TOKENS, save_hf_tokenizer, train_tokenizer
    from scratchlm.tokenizer.pretokenize import DEFAULT_PATTERN_NAME

    from scratchlm.atomic_io import check_writable_file

    for path in (args.out, args.hf_out):
        if path is not None:
            check_writable_file(path)
    specials = DEFAULT_SPECIAL_TOKENS if args.special_tokens is None else tuple(args.special_tokens)
    start = time.perf_counter()
    tokenizer, report, read = train_tokenizer(
        args.input, args.vocab_size, pattern=args.pattern or DEFAULT_PATTERN_NAME, special_tokens=specials,
        min_frequency=args.min_frequency, max_bytes=args.max_bytes, workers=args.workers, progress=not args.quiet,
    )
    seconds = time.perf_counter() - start
    tokenizer.save(args.out)  # before any message: a closed pipe must not lose the result
    if args.hf_out:
        save_hf_tokenizer(tokenizer, args.hf_out)
    if read.total_undecodable:
        worst = ", ".join(f"{f}: {n}" for f, n in sorted(read.undecodable_bytes.items(), key=lambda x: -x[1])[:3])
        print(f"scratchlm: warning: {read.total_undecodable} undecodable byte sequences replaced with U+FFFD ({worst})", file=sys.stderr)
    if report.stopped_early:
        print(f"scratchlm: warning: {report.stopped_early}", file=sys.stderr)
    source = f"{read.files} files" if args.input else "the embedded corpus"
    print(
        f"trained {tokenizer.vocab_size} tokens ({report.merges} merges, {len(specials)} special) on "
        f"{read.bytes_read / 1e6:.2f} MB from {source} ({report.distinct_chunks:,} distinct chunks) in {seconds:.1f}s"
    )
    print(f"wrote {args.out}" + (f" and {args.hf_out} (Hugging Face format)" if args.hf_out else ""))
    return 0


def _tokenizer_encode(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    text = _read_text_arg(args)
    if args.special_as_text:
        ids = tokenizer.encode_ordinary(text)
    else:
        ids = tokenizer.encode(text, allowed_special="all" if args.allow_special else ())
    if args.show_tokens:
        for i in ids:
            print(f"{i}\t{tokenizer.token_bytes(i)!r}")
    else:
        print(" ".join(map(str, ids)))
    return 0


def _tokenizer_decode(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    raw = args.ids if args.ids is not None else sys.stdin.read()
    ids = []
    for n, field in enumerate(raw.replace(",", " ").split(), start=1):
        if not (field.isascii() and field.isdigit()):
            raise InputFileError(f"{field!r} (item {n} of the input) is not a token id (a non-negative integer)")
        ids.append(int(field))
    sys.stdout.write(tokenizer.decode(ids))
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0


def _tokenizer_stats(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import load_tokenizer, tokenizer_stats

    if args.top < 0:
        raise ConfigError(f"--top must be 0 or more, not {args.top}")
    tokenizer = load_tokenizer(args.tokenizer)
    stats = tokenizer_stats(tokenizer, _read_text_arg(args), top=args.top)
    if args.json:
        print(json.dumps({
            "text_bytes": stats.text_bytes, "tokens": stats.tokens, "bytes_per_token": round(stats.bytes_per_token, 4),
            "distinct_tokens": stats.distinct_tokens, "vocab_size": stats.vocab_size, "vocab_used": round(stats.vocab_used, 4),
            "longest": [[i, tokenizer.decode([i])] for i, _ in stats.longest],
            "most_common": [[i, tokenizer.decode([i]), c] for i, c in stats.most_common],
        }, ensure_ascii=False, indent=2))
        return 0
    print(f"tokenizer        {tokenizer.name} ({tokenizer.vocab_size} tokens, {len(tokenizer.special_tokens)} special)")
    print(f"text             {stats.text_bytes:,} bytes -> {stats.tokens:,} tokens")
    print(f"bytes per token  {stats.bytes_per_token:.3f}")
    print(f"vocab used       {stats.distinct_tokens:,} of {stats.vocab_size:,} ({stats.vocab_used:.1%})")
    print("longest tokens   " + "  ".join(_short(b.decode("utf-8", "replace")) for _, b in stats.longest))
    print("most frequent    " + "  ".join(f"{_short(tokenizer.decode([i]))}x{c}" for i, c in stats.most_common))
    return 0


def _short(text: str, limit: int = 24) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 1] + "…")


def _tokenizer_import(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.source, pattern=args.pattern)
    tokenizer.save(args.out)
    print(f"imported {tokenizer.vocab_size} tokens ({len(tokenizer.special_tokens)} special) from {args.source}")
    print(f"wrote {args.out}")
    return 0


def _tokenizer_export(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import load_tokenizer, save_hf_tokenizer

    save_hf_tokenizer(load_tokenizer(args.tokenizer), args.out)
    print(f"wrote {args.out}")
    return 0


# ---- scratchlm plan -------------------------------------------------------------------
def _add_plan_command(stages: argparse._SubParsersAction) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
