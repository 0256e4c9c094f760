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
from scratchlm.errors import ConfigError, InputFileError

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


def load_checkpoint(path: Path, model: torch.nn.Module, model_config: dict) -> dict:
    """Load weights into `model` and return the saved state, after checking the checkpoint was
    made for the same architecture (`model_config`, a ModelConfig as a dict)."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise InputFileError(f"{path / 'state.pt'}: unreadable checkpoint state ({type(exc).__name__})") from None
    saved = state.get("model_config") or {}
    if saved != model_config:
        key = next((k for k in model_config if saved.get(k) != model_config[k]), "?")
        raise ConfigError(f"{path.parent.parent}: checkpoint was made with a different model ({key}: {saved.get(key)!r} vs {model_config.get(key)!r})")
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except Exception as exc:  # shape mismatch or a corrupt file
        raise InputFileError(f"{path}: checkpoint weights do not load ({str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        raise InputFileError(f"{path}: checkpoint does not fit this model (tensor {name!r} {'missing' if missing else 'unexpected'})")
    return state
