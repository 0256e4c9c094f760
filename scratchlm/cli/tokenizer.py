"""scratchlm tokenizer train | encode | decode | stats | import | export."""

import argparse
import json
import sys
import time
from pathlib import Path

from scratchlm.cli.common import argument_type
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.units import parse_bytes, parse_vocab_size


def add_commands(stages: argparse._SubParsersAction) -> None:
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
    train.add_argument("--vocab-size", type=argument_type(parse_vocab_size), default="auto", help="total vocabulary: 256 bytes + merges + special tokens; fewer if the corpus runs out of pairs seen --min-frequency times; 'auto' (the default): one entry per 512 bytes of text, a power of two from 512 to 32768")
    train.add_argument("--out", required=True, type=Path, help="where to write the tokenizer (JSON)")
    train.add_argument("--pattern", default=None, help="pre-tokenization: a name, gpt4 (default), gpt2, llama3 or smollm, or a regex whose matches must cover all text")
    train.add_argument(
        "--special-tokens", nargs="*", metavar="TOKEN", default=None,
        help="special tokens, given the top ids (default: <|endoftext|> <|im_start|> <|im_end|>)",
    )
    train.add_argument("--min-frequency", type=int, default=2, help="stop when no pair occurs this often (default: 2)")
    train.add_argument("--max-bytes", type=argument_type(parse_bytes), default=None, help="read at most this much text, e.g. 50MB")
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
