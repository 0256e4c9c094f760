"""Models in other formats: GGUF files and Hugging Face checkpoints, in and out.

`open_model` is the one entry point that opens a model, whatever it is (a language model or a
classifier, in any format we read); the commands that generate or train text pass
kind="language-model". `detect_model` says what a path holds without loading it.
"""

from scratchlm.interop.load import Detected, OpenedModel, detect_model, open_model

__all__ = ["Detected", "OpenedModel", "detect_model", "open_model"]
