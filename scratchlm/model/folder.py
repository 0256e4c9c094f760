"""scratchlm's model folder: what `pretrain` writes as RUN/model and `scratchlm import` writes.

    FOLDER/model.safetensors   weights (safetensors: loading them runs no code)
    FOLDER/config.json         ModelConfig
    FOLDER/tokenizer.json      the tokenizer, in scratchlm's format (chat template in its metadata)
    FOLDER/chat_template.jinja the chat template as a file of its own, when the model has one
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_model as load_weights, save_model

from scratchlm.atomic_io import write_text_atomic, written_atomically
from scratchlm.errors import InputFileError
from scratchlm.model.config import ModelConfig
from scratchlm.model.model import GPT, allocate_on_cpu
from scratchlm.tokenizer import Tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
CHAT_TEMPLATE = "chat_template.jinja"


def is_model_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / WEIGHTS).is_file() and (p / "config.json").is_file() and _is_our_config(p / "config.json")


def _is_our_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "n_layer" in data and "n_embd" in data


def save_model_folder(folder: str | Path, model: GPT, tokenizer: Tokenizer) -> Path:
    """Write `model` and `tokenizer` into `folder` (created if needed); each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with written_atomically(folder / WEIGHTS) as tmp:
        save_model(model, str(tmp))
    write_text_atomic(folder / "config.json", json.dumps(model.config.to_dict(), indent=2) + "\n")
    tokenizer.save(folder / "tokenizer.json")
    template = tokenizer.metadata.get("chat_template")
    if template:
        write_text_atomic(folder / CHAT_TEMPLATE, template)
    return folder


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu", config: ModelConfig | None = None,
                      tokenizer_path: str | Path | None = None) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of a model folder. `config` and `tokenizer_path` stand in for a
    folder that holds only weights (a training checkpoint)."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise InputFileError(f"{folder}: no {WEIGHTS} here")
    if config is None:
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise InputFileError(f"{folder}: no config.json beside the weights")
        config = ModelConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    with torch.device("meta"):  # no random initialisation of weights about to be overwritten
        model = GPT(config)
    model = allocate_on_cpu(model)
    missing, unexpected = load_weights(model, str(folder / WEIGHTS), strict=False)
    if missing or unexpected:
        raise InputFileError(f"{folder}: weights do not match the model config ({sorted(missing or unexpected)[0]})")
    model.to(device).eval()
    return model, load_tokenizer(tokenizer_path or folder / "tokenizer.json")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """A trained model and its tokenizer from a run folder, its model folder or a checkpoint."""
    p = Path(path)
    if (p / "model" / WEIGHTS).is_file():
        p = p / "model"
    if not (p / WEIGHTS).is_file():
        raise InputFileError(f"{p}: no model here (expected a run folder, a model folder, a checkpoint folder, "
                             "a GGUF file or a Hugging Face checkpoint folder)")
    if (p / "config.json").is_file():
        return load_model_folder(p, device)
    # A checkpoint folder holds weights only; config and tokenizer live in its run. A run killed
    # before it wrote model/ still has the config in the checkpoint and the data's tokenizer.
    run = p.parent.parent
    if (run / "model" / "config.json").is_file():
        return load_model_folder(p, device, _config(run / "model" / "config.json"), run / "model" / "tokenizer.json")
    state = torch.load(p / "state.pt", map_location="cpu", weights_only=True)
    data = Path(json.loads((run / "config.json").read_text())["data"])
    return load_model_folder(p, device, ModelConfig.from_dict(state["model_config"]), data / "tokenizer.json")


def _config(path: Path) -> ModelConfig:
    return ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
