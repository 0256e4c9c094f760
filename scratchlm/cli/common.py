"""What several commands share: the MODEL help, argparse adapters, and the inference and
sampling flags of `generate`, `chat` and `serve`."""

import argparse

from scratchlm.errors import ScratchLMError

MODEL_HELP = (
    "MODEL is a run folder, a model folder (from pretrain or import), a training checkpoint folder, "
    "a GGUF file or a Hugging Face checkpoint folder."
)


def argument_type(parse):
    """Let argparse report a library parser's error as its usual one-line usage error."""

    def convert(value: str):
        try:
            return parse(value)
        except ScratchLMError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def add_inference_args(cmd: argparse.ArgumentParser) -> None:
    """Where and how `generate`, `chat` and `serve` run the model."""
    cmd.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="weights and activations (default: float32; bfloat16 halves the memory read per token)")
    cmd.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                     help="weight-only quantized matmuls on bfloat16 activations: int8 (per-row scales), or int4 "
                     "(groups of --group-size weights, round-to-nearest; CPU only), a quarter and an eighth of "
                     "float32's bytes (default: none)")
    cmd.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128, 256],
                     help="int4: weights per (scale, zero) group along each row; smaller is closer to float, "
                     "larger is smaller (default: 64)")


def add_sampling_args(cmd: argparse.ArgumentParser, temperature: float, max_new_tokens: int | None, max_new_tokens_help: str) -> None:
    """The sampling flags `generate` and `chat` share: the fields of SamplingConfig."""
    cmd.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=max_new_tokens_help)
    cmd.add_argument("--temperature", type=float, default=temperature, help=f"0 for greedy; higher is more random (default: {temperature})")
    cmd.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    cmd.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens holding this probability mass")
    cmd.add_argument("--min-p", type=float, default=0.0,
                     help="drop tokens less likely than this fraction of the most likely one (default: 0.0, off)")
    cmd.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeating tokens (default: 1.0, off)")
    cmd.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")


def sampling_config(args: argparse.Namespace, **fields):
    """SamplingConfig from the flags of `add_sampling_args`; `fields` add or override."""
    from scratchlm.model.sampling import SamplingConfig

    flags = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
             "repetition_penalty": args.repetition_penalty, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    return SamplingConfig(**(flags | fields))
