"""scratchlm data tokenize | prepare: text into token shards."""

import argparse
import sys
from pathlib import Path

from scratchlm.errors import ConfigError


def add_commands(stages: argparse._SubParsersAction) -> None:
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
    prep.add_argument("--workers", default=None, help="worker processes (default: every core; with --executor ray and no --address, the CPUs of the local Ray instance)")
    prep.add_argument("--executor", default=None, choices=("local", "ray"), help="where the per-chunk work runs: local (a process pool on this machine, the default) or ray (a Ray cluster; results are the same)")
    prep.add_argument("--address", default=None, metavar="ADDR", help="with --executor ray: the Ray cluster to join (e.g. auto, or ray://head:10001); default: start a local Ray instance for the run and stop it after")
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
    for flag, key in (("tokenizer", "tokenizer"), ("val_fraction", "val_fraction"), ("workers", "workers"), ("executor", "executor"), ("address", "address")):
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
