"""scratchlm generate | chat | serve: a trained model answering, in the terminal or over HTTP."""

import argparse
import io
import sys
from pathlib import Path

from scratchlm.cli.common import MODEL_HELP, add_inference_args, add_sampling_args, argument_type, sampling_config
from scratchlm.units import parse_bytes


def add_commands(stages: argparse._SubParsersAction) -> None:
    _add_generate_command(stages)
    _add_chat_command(stages)
    _add_serve_command(stages)


def _add_generate_command(stages: argparse._SubParsersAction) -> None:
    gen = stages.add_parser(
        "generate",
        help="sample text from a trained model",
        description="Sample continuations of a prompt (from --prompt or standard input), streaming tokens to "
        "the terminal as they are produced. " + MODEL_HELP,
    )
    gen.add_argument("model", type=Path, help="the model (see above)")
    gen.add_argument("--prompt", default=None, help="the prompt (default: read standard input; empty: start a new document)")
    add_sampling_args(gen, temperature=0.8, max_new_tokens=200, max_new_tokens_help="tokens to generate per sample (default: 200)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop a sample at this string (repeatable)")
    gen.add_argument("--num-samples", type=int, default=1, help="independent samples (default: 1)")
    gen.add_argument("--truncate", action="store_true",
                     help="cut a prompt longer than the context from the left (default: refuse it)")
    add_inference_args(gen)
    gen.set_defaults(run=_generate)


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
    add_sampling_args(chat, temperature=0.7, max_new_tokens=None,
                       max_new_tokens_help="most tokens per reply (default: 512, at most half the model's context)")
    add_inference_args(chat)
    chat.set_defaults(run=_chat)


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
    srv.add_argument("--max-body", type=argument_type(parse_bytes), default=None, metavar="SIZE",
                     help="largest request body, such as 4MiB; larger ones get 413 (default: 1 MiB, or 32 bytes per "
                     "token of the model's context if more: room for a chat that fills the context)")
    srv.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                     help="a host name the server also answers to on a loopback address, besides localhost, "
                     "127.0.0.1 and [::1]: the name a reverse proxy passes in Host (repeatable)")
    add_inference_args(srv)
    srv.add_argument("--feedback", type=Path, default=None, metavar="PATH",
                     help="JSONL file the chat page's ratings and edits are appended to (default: feedback.jsonl)")
    srv.add_argument("--feedback-max-size", type=argument_type(parse_bytes), default="256MiB", metavar="SIZE",
                     help="the feedback file's cap; when full, feedback gets 507 until it is moved away "
                     "(default: 256MiB)")
    srv.add_argument("--model-name", default=None, metavar="NAME",
                     help="the model's name in the API (default: the file or folder name of MODEL)")
    srv.set_defaults(run=_serve)


def _generate(args: argparse.Namespace) -> int:
    from scratchlm.model.sampling import encode_prompt, fit_prompt, generate_text

    config = sampling_config(args, stop=tuple(args.stop), num_samples=args.num_samples, truncate=args.truncate)
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


def _load_for_inference(args: argparse.Namespace):
    from scratchlm.serve.load import load_for_inference

    return load_for_inference(args.model, args.device, args.dtype, args.quantize, args.group_size)


def _chat(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from scratchlm.serve.chat import CHAT_SAMPLING, ChatSession, default_max_new_tokens, run_chat

    asked = args.max_new_tokens
    config = sampling_config(args, max_new_tokens=CHAT_SAMPLING.max_new_tokens if asked is None else asked)  # fail before loading
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


def _serve(args: argparse.Namespace) -> int:
    from scratchlm.serve.server import run_server

    run_server(args.model, args.host, args.port, max_batch=args.max_batch, max_queue=args.max_queue,
               api_key=args.api_key, device=args.device, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size,
               feedback_path=args.feedback, model_name=args.model_name, max_body=args.max_body,
               allowed_hosts=args.allowed_host, feedback_max_bytes=args.feedback_max_size)
    return 0
