"""The `scratchlm` command line: parse arguments, call the library, print the result.

Every command is a few lines around one public function; anything the CLI does, Python can do.
A `ScratchLMError` (a user mistake or bad input) is printed as one line and exits with 2.
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from scratchlm import __version__
from scratchlm.errors import InputFileError, ScratchLMError
from scratchlm.units import parse_bytes

EXIT_USER_ERROR = 2


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchlm",
        description="Build a large language model from scratch: data, tokenizer, model, training, "
        "fine-tuning, evaluation and serving.",
    )
    parser.add_argument("--version", action="version", version=f"scratchlm {__version__}")
    stages = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_tokenizer_commands(stages)
    return parser


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
    train.add_argument("--input", nargs="+", metavar="PATH", help="text files or directories (default: embedded corpus)")
    train.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary: 256 bytes + merges + special tokens (default: 8192)")
    train.add_argument("--out", required=True, type=Path, help="where to write the tokenizer (JSON)")
    train.add_argument("--pattern", default="gpt4", help="pre-tokenization regex or a name: gpt4 (default), gpt2, llama3, smollm")
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
    encode.add_argument("--allow-special", action="store_true", help="encode special-token strings in the text as special tokens (otherwise they are an error)")
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
    from scratchlm.tokenizer.corpus import read_text

    if args.text is not None:
        return args.text
    if args.file is not None:
        text, bad = read_text(args.file)
        if bad:
            print(f"scratchlm: warning: {args.file}: {bad} undecodable bytes replaced with U+FFFD", file=sys.stderr)
        return text
    if sys.stdin.isatty():
        print("(reading text from standard input; end with Ctrl-D)", file=sys.stderr)
    return sys.stdin.read()


def _tokenizer_train(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import DEFAULT_SPECIAL_TOKENS, save_hf_tokenizer, train_tokenizer

    specials = DEFAULT_SPECIAL_TOKENS if args.special_tokens is None else tuple(args.special_tokens)
    start = time.perf_counter()
    tokenizer, report, read = train_tokenizer(
        args.input, args.vocab_size, pattern=args.pattern, special_tokens=specials,
        min_frequency=args.min_frequency, max_bytes=args.max_bytes, workers=args.workers, progress=not args.quiet,
    )
    seconds = time.perf_counter() - start
    if read.total_undecodable:
        worst = ", ".join(f"{f}: {n}" for f, n in sorted(read.undecodable_bytes.items(), key=lambda x: -x[1])[:3])
        print(f"scratchlm: warning: {read.total_undecodable} undecodable bytes replaced with U+FFFD ({worst})", file=sys.stderr)
    if report.stopped_early:
        print(f"scratchlm: warning: {report.stopped_early}", file=sys.stderr)
    tokenizer.save(args.out)
    source = f"{read.files} files" if args.input else "the embedded corpus"
    print(
        f"trained {tokenizer.vocab_size} tokens ({report.merges} merges, {len(specials)} special) on "
        f"{read.bytes_read / 1e6:.2f} MB from {source} ({report.distinct_chunks:,} distinct chunks) in {seconds:.1f}s"
    )
    print(f"wrote {args.out}")
    if args.hf_out:
        save_hf_tokenizer(tokenizer, args.hf_out)
        print(f"wrote {args.hf_out} (Hugging Face format)")
    return 0


def _tokenizer_encode(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    ids = tokenizer.encode(_read_text_arg(args), allowed_special="all" if args.allow_special else ())
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
        if not field.isdigit():
            raise InputFileError(f"{field!r} (item {n} of the input) is not a token id (a non-negative integer)")
        ids.append(int(field))
    sys.stdout.write(tokenizer.decode(ids))
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0


def _tokenizer_stats(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import load_tokenizer, tokenizer_stats

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


if __name__ == "__main__":
    sys.exit(main())
