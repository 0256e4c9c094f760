"""Models in other formats: GGUF files and Hugging Face checkpoints, in and out.

`open_model` is the one entry point that opens a model, whatever it is (a language model or a
classifier, in any format we read); `load_pretrained` is its language-model-only form, which
the commands that generate or train text call.
"""

from scratchlm.interop.load import OpenedModel, load_pretrained, model_format, model_kind, open_model

__all__ = ["OpenedModel", "load_pretrained", "model_format", "model_kind", "open_model"]
