"""The `scratchlm` command line: parse arguments, call the library, print the result.

Every command is a few lines around one public function; anything the CLI does, Python can do.
Each stage's commands live in their own module, which adds its subparsers (`add_commands`) and
handlers that only read arguments and call the library. A `ScratchLMError` (a user mistake or
bad input) is printed as one line and exits with 2.
"""

import argparse
import sys
from collections.abc import Sequence

from scratchlm import __version__
from scratchlm.cli import compress, data, evaluate, feedback, finetune, interop, model, plan, quickstart, serve, tokenizer, train
from scratchlm.errors import ScratchLMError

EXIT_USER_ERROR = 2
# The order of `scratchlm --help`: the path from text to a served model, then the tools.
STAGES = (quickstart, tokenizer, data, model, train, serve, finetune, compress, interop, evaluate, plan, feedback)


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
    for stage in STAGES:
        stage.add_commands(stages)
    return parser
