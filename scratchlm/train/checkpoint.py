"""Checkpoints: everything needed to continue a run exactly where it stopped.

    RUN/checkpoints/step_000200/model.safetensors   weights (safetensors: no code on load)
    RUN/checkpoints/step_000200/state.pt            optimizer, step, data position, RNG states
    RUN/checkpoints/latest                          name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed when complete, then `latest` is
replaced atomically; a run killed mid-write leaves the previous checkpoint intact. `state.pt`
holds only tensors and plain values and is read with `weights_only=True`.
"""

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from scratchlm.atomic_io import write_text_atomic
from scratchlm.errors import InputFileError

KEEP = 2  # older checkpoints are deleted once a newer one is complete


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict) -> Path:
    root = run_dir / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict:
    """Load weights into `model` (strictly: names and shapes must match) and return the state."""
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise InputFileError(f"{path}: checkpoint does not fit this model ({str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise InputFileError(f"{path}: checkpoint does not fit this model (tensor {name!r} {'missing' if missing else 'unexpected'})")
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
