"""`scratchlm import` and `scratchlm export`: a model in any format we read, written as another."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.interop.load import detect_model, open_model
from scratchlm.model.folder import save_model_folder
from scratchlm.model.info import architecture
from scratchlm.model.model import count_params
from scratchlm.model.quantize import dequantize, quantization_of

ExportFormat = Literal["hf", "gguf"]
EXPORT_DTYPES = {"hf": ("float32", "bfloat16", "float16"), "gguf": ("f32", "f16", "q8_0", "q4_0")}


@dataclass(frozen=True)
class ConversionSummary:
    source: Path
    source_kind: str
    out: Path
    params: int
    description: str  # one line: layers, width, heads, positions, norm, MLP, vocab, context
    chat_template: bool
    seconds: float


def _check_new_output(out: Path) -> None:
    # Never mix a new model into a folder that already holds files: a stale tensor or template
    # left beside new weights would be loaded as part of the model.
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputFileError(f"{out}: already exists and is not an empty folder; choose a new output path")


def import_model(source: str | Path, out: str | Path, pattern: str | None = None) -> ConversionSummary:
    """Read a GGUF file, a Hugging Face folder (or any model we open) and write a scratchlm model
    folder: config.json, model.safetensors, tokenizer.json and chat_template.jinja."""
    start = time.perf_counter()
    source, out = Path(source), Path(out)
    kind = detect_model(source).format
    _check_new_output(out)
    opened = open_model(source, pattern=pattern, kind="language-model")
    model, tokenizer = opened.model, opened.tokenizer
    save_model_folder(out, model, tokenizer)
    return ConversionSummary(source, kind, out, count_params(model.config), f"{architecture(model.config)}, vocab {model.config.vocab_size}",
                             bool(tokenizer.metadata.get("chat_template")), time.perf_counter() - start)


def export_model(source: str | Path, fmt: ExportFormat, out: str | Path, dtype: str | None = None) -> ConversionSummary:
    """Write the model at `source` as a Hugging Face folder (`fmt="hf"`) or a GGUF file. A
    quantized model is written as the float weights its codes stand for (a tied head, quantized
    apart from the embedding, as an output matrix of its own)."""
    start = time.perf_counter()
    source, out = Path(source), Path(out)
    if fmt not in EXPORT_DTYPES:
        raise ConfigError(f"export: unknown format {fmt!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    dtype = dtype or EXPORT_DTYPES[fmt][0]
    if dtype not in EXPORT_DTYPES[fmt]:
        raise ConfigError(f"export: dtype {dtype!r} is not available for {fmt}; choose one of {', '.join(EXPORT_DTYPES[fmt])}")
    kind = detect_model(source).format
    if fmt == "hf":
        _check_new_output(out)
    elif out.is_dir():
        raise InputFileError(f"{out}: is a folder; a GGUF export is one file (e.g. {out / 'model.gguf'})")
    elif out.exists():
        raise InputFileError(f"{out}: already exists; choose a new output path")
    opened = open_model(source, kind="language-model")
    model, tokenizer = opened.model, opened.tokenizer
    if quantization_of(model) is not None:  # other tools read float weights (or quantize them again)
        model = dequantize(model)
    if fmt == "hf":
        from scratchlm.interop.hf import export_hf

        export_hf(model, tokenizer, out, dtype=dtype)
    else:
        from scratchlm.interop.gguf import export_gguf

        export_gguf(model, tokenizer, out, dtype=dtype)
    return ConversionSummary(source, kind, out, count_params(model.config), f"{architecture(model.config)}, vocab {model.config.vocab_size}",
                             bool(tokenizer.metadata.get("chat_template")), time.perf_counter() - start)
