"""scratchlm: build a large language model from scratch, end to end, on PyTorch."""

from scratchlm.errors import ScratchLMError

__version__ = "0.1.0"
__all__ = ["ScratchLMError", "__version__"]
