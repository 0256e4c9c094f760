"""Open any model a user can point at: a run folder, a model folder, a training checkpoint,
a GGUF file, or a Hugging Face checkpoint folder (`config.json` + safetensors)."""

from pathlib import Path
from typing import Literal

import torch

from scratchlm.devices import parse_device
from scratchlm.errors import InputFileError
from scratchlm.gguf_file import is_gguf_file
from scratchlm.model import GPT
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.formats import read_json

ModelKind = Literal["scratchlm", "gguf", "hf"]


def model_kind(path: str | Path) -> ModelKind:
    """What `path` holds, judged by content (GGUF magic, Hugging Face `model_type`), not name."""
    p = Path(path)
    if p.is_file():
        if is_gguf_file(p):
            return "gguf"
        raise InputFileError(f"{p}: not a GGUF file, and not a folder (give a run folder, a model folder, "
                             "a GGUF file or a Hugging Face checkpoint folder)")
    if not p.is_dir():
        raise InputFileError(f"{p}: no such file or folder")
    config = p / "config.json"
    if config.is_file():
        data = read_json(config)
        if isinstance(data, dict) and "model_type" in data:
            return "hf"
    return "scratchlm"


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", pattern: str | None = None) -> tuple[GPT, Tokenizer]:
    """The model (float32, eval mode, on `device`) and tokenizer at `path`, whatever its format.
    `pattern` overrides the pre-tokenizer of an imported tokenizer."""
    device = parse_device(str(device))
    kind = model_kind(path)
    if kind == "gguf":
        from scratchlm.interop.gguf import import_gguf

        model, tokenizer = import_gguf(path, pattern=pattern)
    elif kind == "hf":
        from scratchlm.interop.hf import import_hf

        model, tokenizer = import_hf(path, pattern=pattern)
    else:
        from scratchlm.model.folder import load_model

        return load_model(path, device)
    return model.to(device).eval(), tokenizer
