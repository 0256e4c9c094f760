"""Open any model a user can point at: a run folder, a model folder (a language model or a
classifier), a training checkpoint, a GGUF file, or a Hugging Face checkpoint folder
(`config.json` + safetensors). What a path holds is judged here once, by content (GGUF magic,
Hugging Face `model_type`, scratchlm's model folder header), never by name."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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


def model_format(path: str | Path) -> ModelFormat:
    """The format of what `path` holds, judged by content (GGUF magic, Hugging Face `model_type`)."""
    p = Path(path)
    if p.is_file():
        if is_gguf_file(p):
            return "gguf"
        raise InputFileError(f"{p}: not a GGUF file, and not a folder (give a run folder, a model folder, "
                             "a GGUF file or a Hugging Face checkpoint folder)")
    if not p.is_dir():
        raise InputFileError(f"{p}: no such file or folder")
    config = p / CONFIG
    if config.is_file():
        data = read_json(config)
        if isinstance(data, dict) and "model_type" in data:
            return "hf"
    return "scratchlm"


def model_kind(path: str | Path) -> ModelKind:
    """Whether `path` holds a language model or a classifier, from its header alone (nothing is
    loaded). GGUF files, Hugging Face folders and checkpoints are language models."""
    p = Path(path)
    if model_format(p) != "scratchlm":
        return "language-model"
    folder = p / "model" if (p / "model" / WEIGHTS).is_file() else p
    header = model_header(folder / CONFIG) if (folder / CONFIG).is_file() else None
    return header.kind if header is not None else "language-model"


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
               expect: ModelKind | None = None) -> OpenedModel:
    """The model (float32, eval mode, on `device`) and tokenizer at `path`, whatever its format.
    `pattern` overrides the pre-tokenizer of an imported tokenizer. With `expect`, a model of
    the other kind is a one-line InputFileError naming the path and what it holds."""
    p = Path(path)
    device = parse_device(str(device))
    fmt = model_format(p)
    if expect is not None and (held := model_kind(p)) != expect:
        raise InputFileError(f"{p}: holds a {held}, and this needs a {expect}")
    if fmt == "gguf":
        from scratchlm.interop.gguf import import_gguf

        model, tokenizer = import_gguf(p, pattern=pattern)
        return OpenedModel(model.to(device).eval(), tokenizer, "language-model", p, fmt)
    if fmt == "hf":
        from scratchlm.interop.hf import import_hf

        model, tokenizer = import_hf(p, pattern=pattern)
        return OpenedModel(model.to(device).eval(), tokenizer, "language-model", p, fmt)
    opened, tokenizer, _ = open_folder(p, device)
    kind: ModelKind = "classifier" if isinstance(opened, TextClassifier) else "language-model"
    return OpenedModel(opened, tokenizer, kind, p, fmt)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", pattern: str | None = None) -> tuple[GPT, Tokenizer]:
    """The language model and tokenizer at `path` (`open_model` with expect="language-model"):
    what every command that generates or trains text calls, so a classifier is refused in one line."""
    opened = open_model(path, device, pattern, expect="language-model")
    assert isinstance(opened.model, GPT)  # expect= refused anything else
    return opened.model, opened.tokenizer
