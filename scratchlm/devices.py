"""Where and in what precision work runs, decided in one place for every stage: device names
from the user ("auto", "cpu", "cuda", "cuda:1", "mps") checked before any work, the autocast
dtype, the distributed backend, the peak FLOP rate behind MFU, and peak memory."""

import re
import resource
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`parse_device`, with a bare "cuda" (or "auto" on a GPU machine) meaning this process's
    GPU under torchrun: one GPU per process, numbered by LOCAL_RANK."""
    device = parse_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


# The torch dtype of each precision a user may name (`scratchlm.config.PRECISIONS`, whose names
# live there so configs check them without importing torch); "auto" (a training or evaluation
# precision, not a storage one) is decided per device by `autocast_dtype`.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it; float32 on CPU by default, where bf16 matmuls
    are slower than fp32 on most processors. None means no autocast (float32)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return None if dtype == "float32" else TORCH_DTYPES[dtype]


# Published dense (no sparsity) bf16 tensor-core peaks, fp16 for the V100, which has no bf16.
# Matched as substrings of the CUDA device name in this order, so the more specific names come
# first ("H100 PCIe" before "H100", "L40S" before "L4", "A100" before "A10").
_PEAK_FLOPS = {
    "B200": 2250e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
    "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12,
}


@dataclass(frozen=True)
class PeakFlops:
    """The FLOP rate MFU is measured against, and where the figure comes from."""

    flops: float
    source: str  # "published dense bf16 peak of NVIDIA H100 ...", "measured float32 matmul rate ..."
    measured_dtype: str | None = None  # a CPU's: the dtype of the matmuls timed

    def raised_to(self, achieved: float) -> "PeakFlops":
        """A peak no lower than a rate the run itself reached: a CPU measured while something
        else ran reads low, and MFU must not pass 100% (measured again first, when quieter)."""
        if achieved <= self.flops:
            return self
        again = max(_measure_cpu_matmul_flops(self.measured_dtype), achieved) if self.measured_dtype else achieved
        return PeakFlops(again, self.source + ", measured again during the run", self.measured_dtype)


def peak_flops(device: torch.device, dtype: torch.dtype | None = None) -> float | None:
    """`device_peak(device, dtype).flops`, None where unknown."""
    found = device_peak(device, dtype)
    return found.flops if found else None


def device_peak(device: torch.device, dtype: torch.dtype | None = None) -> PeakFlops | None:
    """Dense bf16 peak of known GPUs, as published; on a CPU, this machine's matmul rate in the
    dtype training computes in (`dtype`, the autocast dtype; None is float32), measured as the
    best of several timings of 1024 x 1024 products, so a CPU 'MFU' is the share of what a
    large matmul reaches here. None for other devices and unknown GPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = next((v for k, v in _PEAK_FLOPS.items() if k in name), None)
        return PeakFlops(found, f"published dense bf16 peak of {name}") if found else None
    if device.type == "cpu":
        name = next((k for k, v in TORCH_DTYPES.items() if v == (dtype or torch.float32)), "float32")
        return PeakFlops(_cpu_matmul_flops(name), f"measured {name} matmul rate of this CPU (best of 5 timings)", name)
    return None


def named_gpu_peak_flops(name: str) -> float:
    """Dense bf16 peak of a GPU named by the user ("h100", "A100", "h100 pcie"), for planning
    a run on hardware this machine does not have."""
    found = next((v for k, v in _PEAK_FLOPS.items() if k.lower() == name.strip().lower()), None)
    if found is None:
        raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(k.lower() for k in _PEAK_FLOPS)}")
    return found


@cache
def _cpu_matmul_flops(dtype_name: str = "float32") -> float:
    return _measure_cpu_matmul_flops(dtype_name)


def _measure_cpu_matmul_flops(dtype_name: str) -> float:
    """Best of 5 timings of four 1024x1024 matmuls: the best is the least disturbed by whatever
    else the machine is doing."""
    a = torch.randn(1024, 1024).to(TORCH_DTYPES[dtype_name])
    a @ a
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        best = min(best, time.perf_counter() - start)
    return 4 * 2 * 1024**3 / best


def process_group_backend(device: torch.device) -> str:
    """NCCL for GPUs (`cuda` and `cuda:N` alike), gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def reset_peak_memory(device: torch.device) -> float:
    """Start measuring the peak from now, and return the memory in MB held now (the loaded
    model and what else the process holds before training): the GPU allocator's peak, or on
    Linux the process's peak resident set (writing 5 to /proc/self/clear_refs resets VmHWM),
    so that the peak of training is not the peak of loading a model (dequantising a GGUF file
    holds two copies)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak then counts from the process's start
        pass
    return _proc_status_mb("VmRSS") or peak_memory_mb(device)


def _proc_status_mb(key: str) -> float | None:
    """A memory figure of /proc/self/status in MB (Linux), or None."""
    try:
        found = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) / 2**10 if found else None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MB since `reset_peak_memory`: allocated tensors on a GPU; on a CPU the
    process's peak resident set, which also counts the loaded model, the Python interpreter and
    torch itself (VmHWM on Linux; elsewhere getrusage's peak since the process started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
