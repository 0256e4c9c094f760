"""scratchlm's model folder: what `pretrain` writes as RUN/model, `scratchlm import` writes,
`finetune classify` writes as its run folder, and a training checkpoint is (beside its state.pt).

    FOLDER/model.safetensors   weights (safetensors: loading them runs no code)
    FOLDER/config.json         the header below
    FOLDER/tokenizer.json      the tokenizer, in scratchlm's format (chat template in its metadata)
    FOLDER/chat_template.jinja the chat template as a file of its own, when the model has one

config.json is a versioned header, so a reader knows what it holds before it builds anything:

    {"format": "scratchlm-model", "format_version": 2,
     "kind": "language-model" | "classifier",
     "architecture": "<one line, scratchlm.model.info.architecture>",
     "tokenizer": "tokenizer.json",
     "model": {ModelConfig},
     "labels": [...], "pooling": "last" | "mean", "max_length": N,     <- classifiers only
     "quantization": {"method": "int8" | "int4", "group_size": N,    <- quantized models only
                      "layers": [names of the quantized linear layers]}}

A quantized model's folder (format_version 3, written by `scratchlm quantize`) stores each listed
layer as its quantized tensors (`scratchlm.model.quantize.quantized_tensors`: int8 rows and
scales, or int4 codes two to a byte and their (scale, zero) groups) and the rest in bfloat16;
it opens as the quantized model, ready to run. Float folders stay format_version 2, which
older readers take.

A checkpoint of a sharded run (FSDP2, tensor or pipeline parallel) holds `shards/`, each rank's
slices written by torch.distributed.checkpoint, in place of model.safetensors; it opens too, its
shards read whole (`read_shards`).

Older folders still load: a flat config.json (the ModelConfig's keys at the top level, a
language model) and the first classifier folder ("format": "scratchlm-classifier", weights in
classifier.safetensors, the config under "model_config"). Weights of format_version 1 (fused
`attn.qkv` and SwiGLU `mlp.up` tensors) load too: `upgrade_state_dict` splits them.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch import Tensor

from scratchlm.atomic_io import write_text_atomic, written_atomically
from scratchlm.config import POOLINGS
from scratchlm.errors import InputFileError
from scratchlm.model.classifier import SequenceClassifier, TextClassifier
from scratchlm.model.config import ModelConfig
from scratchlm.model.info import architecture
from scratchlm.model.model import GPT, allocate_on_cpu
from scratchlm.model.quantize import Int4Linear, Int8Linear, load_quantized_layers, quantization_of, quantized_tensors
from scratchlm.tokenizer import Tokenizer, load_tokenizer
from scratchlm.tokenizer.formats import read_json

WEIGHTS = "model.safetensors"
SHARDS = "shards"  # a sharded training checkpoint's weights (torch.distributed.checkpoint), in place of WEIGHTS
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"
FORMAT = "scratchlm-model"
# Raise it when a reader of this version could misread a newer folder. 2: separate q, k, v and
# SwiGLU gate, up projections (1 had them fused). 3: quantized weights (only quantized folders
# are written as 3).
FORMAT_VERSION = 3
FLOAT_FORMAT_VERSION = 2
OLD_CLASSIFIER_FORMAT = "scratchlm-classifier"  # the first classifier folders
OLD_CLASSIFIER_WEIGHTS = "classifier.safetensors"

ModelKind = Literal["language-model", "classifier"]
KINDS = ("language-model", "classifier")
M = TypeVar("M", bound=torch.nn.Module)


@dataclass
class FolderHeader:
    """What a model folder's config.json says it holds."""

    kind: ModelKind
    config: ModelConfig
    labels: list[str] | None = None  # classifiers: the class names, in head order
    pooling: str = "last"
    max_length: int | None = None  # classifiers: texts are cut to this many tokens
    weights: str = WEIGHTS
    tokenizer: str = TOKENIZER
    quantization: dict | None = None  # how the weights are quantized (scratchlm.model.quantize.quantization_of)


def model_header(config_path: Path) -> FolderHeader | None:
    """The header of a model folder's config.json; None when it is JSON but not ours (a Hugging
    Face config.json, a training run's config). A header ours but broken is an InputFileError."""
    data = read_json(config_path)
    if not isinstance(data, dict):
        return None
    if data.get("format") == FORMAT:
        return _versioned_header(data, config_path)
    if data.get("format") == OLD_CLASSIFIER_FORMAT:
        return _classifier_header(data, config_path, data.get("model_config"), OLD_CLASSIFIER_WEIGHTS)
    if "n_layer" in data and "n_embd" in data:  # the flat config.json before format_version 1
        return FolderHeader("language-model", ModelConfig.from_dict(data))
    return None


def _versioned_header(data: dict, where: Path) -> FolderHeader:
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputFileError(f"{where}: format_version must be a whole number >= 1, not {version!r}")
    if version > FORMAT_VERSION:
        raise InputFileError(f"{where}: model folder format_version {version} is newer than this scratchlm reads "
                             f"({FORMAT_VERSION}); upgrade scratchlm")
    kind = data.get("kind")
    if kind not in KINDS:
        raise InputFileError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    tokenizer = data.get("tokenizer", TOKENIZER)
    if not isinstance(tokenizer, str) or not tokenizer or Path(tokenizer).name != tokenizer:
        raise InputFileError(f"{where}: tokenizer must name a file in the folder, not {tokenizer!r}")
    if kind == "classifier":
        header = _classifier_header(data, where, data.get("model"), WEIGHTS)
    else:
        header = FolderHeader("language-model", _model_config(data.get("model"), where))
    header.tokenizer = tokenizer
    quantization = data.get("quantization")
    if quantization is not None and (kind != "language-model" or not isinstance(quantization, dict)):
        raise InputFileError(f"{where}: quantization must be an object, and only a language model's")
    header.quantization = quantization
    return header


def _classifier_header(data: dict, where: Path, config: object, weights: str) -> FolderHeader:
    labels, pooling, max_length = data.get("labels"), data.get("pooling", "last"), data.get("max_length")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise InputFileError(f"{where}: a classifier needs \"labels\", a list of at least two names")
    if pooling not in POOLINGS:
        raise InputFileError(f"{where}: pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    model_config = _model_config(config, where)
    if max_length is None:
        max_length = model_config.block_size
    if not isinstance(max_length, int) or not 2 <= max_length <= model_config.block_size:
        raise InputFileError(f"{where}: max_length must be a whole number from 2 to the context "
                             f"({model_config.block_size}), not {max_length!r}")
    return FolderHeader("classifier", model_config, list(labels), pooling, max_length, weights)


def _model_config(data: object, where: Path) -> ModelConfig:
    if not isinstance(data, dict):
        raise InputFileError(f"{where}: no model config (\"model\" must be an object of ModelConfig fields)")
    return ModelConfig.from_dict(data)


def save_model_folder(folder: str | Path, model: GPT | SequenceClassifier, tokenizer: Tokenizer, *,
                      labels: list[str] | None = None, max_length: int | None = None) -> Path:
    """Write `model` and `tokenizer` into `folder` (created if needed); each file atomically.
    A SequenceClassifier is saved with its `labels` (one per head output) and the `max_length`
    its texts are cut to."""
    folder = Path(folder)  # created by the first write, once the header is known to be right
    write_model_files(folder, model, tokenizer, labels=labels, max_length=max_length)
    with written_atomically(folder / WEIGHTS) as tmp:
        if quantization_of(model) is None:
            save_model(model, str(tmp))
        else:
            save_file(quantized_tensors(model), str(tmp))
    return folder


def write_model_files(folder: Path, model: GPT | SequenceClassifier, tokenizer: Tokenizer, *,
                      labels: list[str] | None = None, max_length: int | None = None) -> None:
    """Everything of a model folder but the weights, each file atomically (so synced to disk):
    config.json, tokenizer.json, and chat_template.jinja when the tokenizer has a template.
    Shared by `save_model_folder` and training checkpoints."""
    header = _header_dict(model, labels, max_length)
    write_text_atomic(folder / CONFIG, json.dumps(header, indent=2) + "\n")
    tokenizer.save(folder / TOKENIZER)
    template = tokenizer.metadata.get("chat_template")
    if template:
        write_text_atomic(folder / CHAT_TEMPLATE, template)


def describes(model: torch.nn.Module) -> bool:
    """Whether a model folder can hold `model` as it is: a GPT or a SequenceClassifier with
    exactly the tensors its config gives (not one carrying LoRA adapters, say, whose weights
    the header has no words for)."""
    if not isinstance(model, (GPT, SequenceClassifier)):
        return False
    with torch.device("meta"):  # only the tensor names are compared; nothing is allocated
        plain = GPT(model.config)
        if isinstance(model, SequenceClassifier):
            plain = SequenceClassifier(plain, model.score.out_features, model.pooling)
    return plain.state_dict().keys() == model.state_dict().keys()


def _header_dict(model: GPT | SequenceClassifier, labels: list[str] | None, max_length: int | None) -> dict:
    kind: ModelKind = "classifier" if isinstance(model, SequenceClassifier) else "language-model"
    quantization = quantization_of(model)
    header = {"format": FORMAT, "format_version": FLOAT_FORMAT_VERSION if quantization is None else FORMAT_VERSION,
              "kind": kind, "architecture": architecture(model.config), "tokenizer": TOKENIZER,
              "model": model.config.to_dict()}
    if quantization is not None:
        header["quantization"] = quantization
    if kind == "classifier":
        if labels is None or len(labels) != model.score.out_features:
            raise ValueError(f"a classifier with {model.score.out_features} outputs needs as many labels, not {labels!r}")
        header.update(labels=list(labels), pooling=model.pooling, max_length=max_length or model.config.block_size)
    elif labels is not None:
        raise ValueError("labels are for a classifier; this is a language model")
    return header


def read_folder_header(folder: Path) -> FolderHeader:
    """The header of the model folder `folder`; an InputFileError when it is not one."""
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise InputFileError(f"{folder}: no {CONFIG} beside the weights")
    header = model_header(config_path)
    if header is None:
        raise InputFileError(f"{config_path}: not a scratchlm model config")
    if not (folder / header.weights).is_file() and not (folder / SHARDS / ".metadata").is_file():
        raise InputFileError(f"{folder}: no {header.weights} here")
    return header


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu", config: ModelConfig | None = None,
                      tokenizer_path: str | Path | None = None) -> tuple[GPT, Tokenizer]:
    """The language model and tokenizer of a model folder. `config` and `tokenizer_path` stand
    in for a folder that holds only weights (a training checkpoint)."""
    folder = Path(folder)
    if config is None:
        header = read_folder_header(folder)
        if header.kind != "language-model":
            raise InputFileError(f"{folder}: holds a {header.kind}, not a language model")
        config, tokenizer_path = header.config, folder / header.tokenizer
        if header.quantization is not None:
            return _load_quantized(folder, header, device), load_tokenizer(tokenizer_path)
    elif not (folder / WEIGHTS).is_file():
        raise InputFileError(f"{folder}: no {WEIGHTS} here")
    model = _load_weights(_empty_gpt(config), folder / WEIGHTS)
    model.to(device).eval()
    return model, load_tokenizer(tokenizer_path or folder / TOKENIZER)


def load_classifier(folder: str | Path, device: str | torch.device = "cpu") -> TextClassifier:
    """The classifier in the model folder `folder` (old classifier folders too)."""
    folder = Path(folder)
    header = read_folder_header(folder)
    if header.kind != "classifier":
        raise InputFileError(f"{folder}: holds a {header.kind}, not a classifier")
    assert header.labels is not None and header.max_length is not None  # a classifier header has both
    model = SequenceClassifier(_empty_gpt(header.config), len(header.labels), header.pooling)
    model = _load_weights(model, folder / header.weights)
    model.to(device).eval()
    return TextClassifier(model, load_tokenizer(folder / header.tokenizer), header.labels, header.max_length)


def _load_quantized(folder: Path, header: FolderHeader, device: str | torch.device) -> GPT:
    assert header.quantization is not None
    if header.quantization.get("method") == "int4" and torch.device(device).type != "cpu":
        raise InputFileError(f"{folder}: holds an int4 model, which runs on the CPU kernel here; open it with --device cpu")
    path = folder / header.weights
    with torch.device("meta"):  # the quantized layers come whole from the file; no float32 copy of them is made
        model = GPT(header.config)
    try:
        rest = load_quantized_layers(model, _read_safetensors(path), header.quantization)
    except ValueError as exc:
        raise InputFileError(f"{path}: {exc}") from None
    allocate_on_cpu(model, keep=(Int8Linear, Int4Linear))  # the rest (embedding, norms), in bfloat16
    missing, unexpected = load_state_dict_upgraded(model, rest)
    quantized = set(header.quantization["layers"])
    missing = [name for name in missing if name.rpartition(".")[0] not in quantized]  # loaded above
    if missing or unexpected:
        raise InputFileError(f"{path}: weights do not match the model config ({sorted(missing or unexpected)[0]})")
    return model.to(device).eval()


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InputFileError(f"{path}: not a safetensors file ({exc})") from None


def _empty_gpt(config: ModelConfig) -> GPT:
    with torch.device("meta"):  # no random initialisation of weights about to be overwritten
        model = GPT(config)
    return allocate_on_cpu(model)


def _load_weights(model: M, path: Path) -> M:
    shards = path.parent / SHARDS
    if not path.is_file() and (shards / ".metadata").is_file():
        state = {"model": model.state_dict()}
        read_shards(state, shards)
        model.load_state_dict(state["model"])
        return model
    missing, unexpected = load_state_dict_upgraded(model, _read_safetensors(path))
    if missing or unexpected:
        raise InputFileError(f"{path}: weights do not match the model config ({sorted(missing or unexpected)[0]})")
    return model


def read_shards(state: dict, folder: Path) -> None:
    """Fill the tensors of `state` (e.g. {"model": model.state_dict()}) from the shards that the
    ranks of a sharded run wrote with torch.distributed.checkpoint into `folder`, resharded to
    the tensors' shapes: whole ones in one process, this rank's slices under torchrun."""
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    single = not dist.is_initialized()
    try:
        with warnings.catch_warnings():  # one process reading shards is the point, not an accident
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=folder, no_dist=single)
    except Exception as exc:  # a missing or truncated shard, or tensors of other shapes
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputFileError(f"{folder}: sharded weights do not load ({type(exc).__name__}: {first})") from None


def upgrade_state_dict(tensors: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """`tensors` under the names of format_version 2: format_version 1's fused `*.attn.qkv`
    split by rows into `attn.q`, `attn.k`, `attn.v`, and SwiGLU's fused `*.mlp.up` (gate rows,
    then up rows) into `mlp.gate` and `mlp.up`. Current names pass through; a fused tensor of
    the wrong size is kept as it is, so loading names it as unexpected."""
    hd = config.head_dim
    qkv_rows = {"q": config.n_head * hd, "k": config.kv_heads * hd, "v": config.kv_heads * hd}
    upgraded: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        module, _, kind = name.rpartition(".")  # kind: weight or bias
        parts: dict[str, int] | None = None
        if module.endswith("attn.qkv"):
            parts = qkv_rows
        elif config.mlp == "swiglu" and module.endswith("mlp.up") and f"{module[:-2]}gate.{kind}" not in tensors:
            parts = {"gate": config.hidden, "up": config.hidden}  # no gate beside it: the fused gate|up
        if parts is None or tensor.shape[0] != sum(parts.values()):
            upgraded[name] = tensor
            continue
        parent = module.rpartition(".")[0]
        for part, piece in zip(parts, tensor.split(list(parts.values()))):
            upgraded[f"{parent}.{part}.{kind}"] = piece
    return upgraded


def load_state_dict_upgraded(model: torch.nn.Module, tensors: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Load `tensors` (of any format_version, see `upgrade_state_dict`) into `model` (a GPT or a
    module holding one), not strictly; returns the names missing from and unexpected in
    `tensors`. A tied tensor (the head sharing the embedding's matrix) is saved under one name;
    its others are not missing."""
    gpt = next((m for m in model.modules() if isinstance(m, GPT)), None)
    if gpt is not None:
        tensors = upgrade_state_dict(tensors, gpt.config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    loaded_through_tie = {name for names in names_of.values() if any(n in tensors for n in names) for name in names}
    return [name for name in missing if name not in loaded_through_tie], list(unexpected)


def open_folder(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT | TextClassifier, Tokenizer, Path]:
    """What a run folder, a model folder or a checkpoint folder holds: (a language model or a
    classifier, its tokenizer, the folder the weights are in)."""
    p = Path(path)
    if (p / "model" / WEIGHTS).is_file():
        p = p / "model"
    config_path = p / CONFIG
    if config_path.is_file() and model_header(config_path) is not None:
        if read_folder_header(p).kind == "classifier":
            classifier = load_classifier(p, device)
            return classifier, classifier.tokenizer, p
        return (*load_model_folder(p, device), p)
    if not (p / WEIGHTS).is_file():
        raise InputFileError(f"{p}: no model here (expected a run folder, a model folder, a checkpoint folder, "
                             "a GGUF file or a Hugging Face checkpoint folder)")
    # A checkpoint written before checkpoints were model folders (or of a LoRA run) holds weights
    # only; config and tokenizer live in its run. A run killed before it wrote model/ still has
    # the config in the checkpoint and the data's tokenizer.
    run = p.parent.parent
    run_header = model_header(run / "model" / CONFIG) if (run / "model" / CONFIG).is_file() else None
    if run_header is not None:
        return (*load_model_folder(p, device, run_header.config, run / "model" / run_header.tokenizer), p)
    state = torch.load(p / "state.pt", map_location="cpu", weights_only=True)
    data = Path(json.loads((run / CONFIG).read_text())["data"])
    return (*load_model_folder(p, device, ModelConfig.from_dict(state["model_config"]), data / TOKENIZER), p)
