"""scratchlm import | export: models to and from Hugging Face and GGUF."""

import argparse
from pathlib import Path

from scratchlm.cli.common import MODEL_HELP


def add_commands(stages: argparse._SubParsersAction) -> None:
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
        "logits. --format gguf: one GGUF file (llama, qwen3 or gpt2 architecture; F32, F16, Q8_0 or Q4_0) for llama.cpp and the "
        "gguf package. " + MODEL_HELP,
    )
    exp.add_argument("model", type=Path, help="the model (see above)")
    exp.add_argument("--format", required=True, choices=["hf", "gguf"], help="hf (folder) or gguf (file)")
    exp.add_argument("--out", type=Path, required=True, help="folder (hf, new or empty) or file (gguf) to write")
    exp.add_argument("--dtype", default=None, help="hf: float32 (default), bfloat16 or float16; gguf: f32 (default), f16, or q8_0 / q4_0 "
                     "(GGML's block quantization of the matrices, bit for bit as llama.cpp's quantizer writes it)")
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
