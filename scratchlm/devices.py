"""Device names from the user ("auto", "cpu", "cuda", "cuda:1", "mps") checked before any work."""

import torch

from scratchlm.errors import ConfigError


def parse_device(name: str) -> torch.device:
    """`name` as a torch device; "auto" is CUDA when there is one, else CPU. A device this
    machine's torch cannot use is a one-line error, not a traceback from deep inside torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available here (no GPU, or a CPU-only build of torch)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: Apple's MPS backend is not available here")
    return device
