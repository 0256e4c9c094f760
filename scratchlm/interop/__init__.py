"""Models in other formats: GGUF files and Hugging Face checkpoints, in and out.

`load_pretrained` is the one entry point every command uses to open a model, whatever it is.
"""

from scratchlm.interop.load import load_pretrained, model_kind

__all__ = ["load_pretrained", "model_kind"]
