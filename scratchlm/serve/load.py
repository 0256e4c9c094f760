"""Opening a model to answer with: the one loader `generate`, `chat` and `serve` share, so the
three run the same weights in the same precision."""

from pathlib import Path

from scratchlm.interop import open_model
from scratchlm.model.model import GPT
from scratchlm.model.quantize import prepare_for_inference
from scratchlm.tokenizer import Tokenizer


def load_for_inference(path: str | Path, device: str = "cpu", dtype: str = "float32",
                       quantize: str = "none", group_size: int = 64) -> tuple[GPT, Tokenizer]:
    """The model at `path` (any language model `open_model` opens) on `device`, cast to `dtype` or
    quantized (`scratchlm.model.quantize.prepare_for_inference`), and its tokenizer."""
    opened = open_model(path, device, kind="language-model")
    model, tokenizer = opened.model, opened.tokenizer
    return prepare_for_inference(model, dtype, quantize, group_size), tokenizer
