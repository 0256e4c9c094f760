"""Open any model a user can point at: a run folder, a model folder (a language model or a
classifier), a training checkpoint, a GGUF file, or a Hugging Face checkpoint folder
(`config.json` + safetensors). What a path holds is judged here once, by content (GGUF magic,
Hugging Face `model_type`, scratchlm's model folder header), never by name."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from scratchlm.devices import parse_device
from scratchlm.errors import InputFileError
from scratchlm.gguf_file import is_gguf_file
from scratchlm.model import GPT
from scratchlm.model.classifier import TextClassifier
from scratchlm.model.folder import CONFIG, WEIGHTS, ModelKind, model_header, open_folder
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.formats import read_json

ModelFormat = Literal["scratchlm", "gguf", "hf"]


class Detected(NamedTuple):
    format: ModelFormat
    kind: ModelKind


def detect_model(path: str | Path) -> Detected:
    """The format and kind of what `path` holds, judged by content (GGUF magic, Hugging Face
    `model_type`, scratchlm's header) with nothing loaded. GGUF files, Hugging Face folders and
    weights-only checkpoints are language models."""
    p = Path(path)
    if p.is_file():
        if is_gguf_file(p):
            return Detected("gguf", "language-model")
        raise InputFileError(f"{p}: not a GGUF file, and not a folder (give a run folder, a model folder, "
                             "a GGUF file or a Hugging Face checkpoint folder)")
    if not p.is_dir():
        raise InputFileError(f"{p}: no such file or folder")
    config = p / CONFIG
    if config.is_file():
        data = read_json(config)
        if isinstance(data, dict) and "model_type" in data:
            return Detected("hf", "language-model")
    folder = p / "model" if (p / "model" / WEIGHTS).is_file() else p
    header = model_header(folder / CONFIG) if (folder / CONFIG).is_file() else None
    return Detected("scratchlm", header.kind if header is not None else "language-model")


@dataclass
class OpenedModel:
    """What `open_model` found: a language model (GPT) or a classifier (TextClassifier, with
    its label names), its tokenizer, and where it came from."""

    model: GPT | TextClassifier
    tokenizer: Tokenizer
    kind: ModelKind
    path: Path
    format: ModelFormat

    @property
    def labels(self) -> list[str] | None:
        return self.model.labels if isinstance(self.model, TextClassifier) else None


def open_model(path: str | Path, device: str | torch.device = "cpu", pattern: str | None = None,
               kind: ModelKind | None = None) -> OpenedModel:
    """The model (eval mode, on `device`; float32, or as quantized by `scratchlm quantize`) and tokenizer at `path`, whatever its format.
    `pattern` overrides the pre-tokenizer of an imported tokenizer. With `kind`, a model of the
    other kind is a one-line InputFileError naming the path and what it holds: every command
    that generates or trains text passes kind="language-model", so its `.model` is a GPT."""
    p = Path(path)
    device = parse_device(str(device))
    fmt, held = detect_model(p)
    if kind is not None and held != kind:
        raise InputFileError(f"{p}: holds a {held}, and this needs a {kind}")
    if fmt == "gguf":
        from scratchlm.interop.gguf import import_gguf

        model, tokenizer = import_gguf(p, pattern=pattern)
        return OpenedModel(model.to(device).eval(), tokenizer, "language-model", p, fmt)
    if fmt == "hf":
        from scratchlm.interop.hf import import_hf

        model, tokenizer = import_hf(p, pattern=pattern)
        return OpenedModel(model.to(device).eval(), tokenizer, "language-model", p, fmt)
    opened, tokenizer, _ = open_folder(p, device)
    return OpenedModel(opened, tokenizer, "classifier" if isinstance(opened, TextClassifier) else "language-model", p, fmt)

