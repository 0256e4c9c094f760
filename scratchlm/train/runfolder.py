"""The run folder's model and report.

    RUN/model/model.safetensors   final weights
    RUN/model/config.json         ModelConfig
    RUN/model/tokenizer.json      the tokenizer, in scratchlm's format
    RUN/report.md                 what ran, on what, how fast, how well, with samples

`load_model` accepts a run folder, its model folder, or a checkpoint folder.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_model as load_weights, save_model

from scratchlm.atomic_io import write_text_atomic
from scratchlm.errors import InputFileError
from scratchlm.model import GPT, ModelConfig
from scratchlm.tokenizer import Tokenizer, load_tokenizer


def save_model_folder(run_dir: Path, model: GPT, model_config: ModelConfig, tokenizer: Tokenizer) -> Path:
    folder = run_dir / "model"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    save_model(model, str(tmp))
    tmp.replace(folder / "model.safetensors")
    write_text_atomic(folder / "config.json", json.dumps(model_config.to_dict(), indent=2) + "\n")
    tokenizer.save(folder / "tokenizer.json")
    return folder


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """A trained model and its tokenizer from a run folder, model folder or checkpoint."""
    p = Path(path)
    if (p / "model" / "model.safetensors").is_file():
        p = p / "model"
    if not (p / "model.safetensors").is_file():
        raise InputFileError(f"{p}: no model here (expected a run folder, its model/ folder, or a checkpoint)")
    config_path = p / "config.json"
    tokenizer_path = p / "tokenizer.json"
    if not config_path.is_file():  # a checkpoint folder: config and tokenizer live in the run
        run = p.parent.parent
        config_path, tokenizer_path = run / "model" / "config.json", run / "model" / "tokenizer.json"
        if not config_path.is_file():
            state = torch.load(p / "state.pt", map_location="cpu", weights_only=True)
            config = ModelConfig.from_dict(state["model_config"])
            tokenizer_path = Path(json.loads((run / "config.json").read_text())["data"]) / "tokenizer.json"
            return _load(p, config, tokenizer_path, device)
    config = ModelConfig.from_dict(json.loads(config_path.read_text()))
    return _load(p, config, tokenizer_path, device)


def _load(folder: Path, config: ModelConfig, tokenizer_path: Path, device) -> tuple[GPT, Tokenizer]:
    model = GPT(config)
    missing, unexpected = load_weights(model, str(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise InputFileError(f"{folder}: weights do not match the model config ({sorted(missing or unexpected)[0]})")
    model.to(device).eval()
    return model, load_tokenizer(tokenizer_path)


def write_report(run_dir: Path, summary, config, model_config: ModelConfig, shards, rows: list[dict]) -> Path:
    import platform

    evals = [r for r in rows if "val_bpb" in r]
    best = min(evals, key=lambda r: r["val_bpb"]) if evals else None
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        "## Result",
        "",
        "| | |",
        "| --- | --- |",
        f"| final train loss | {summary.final_loss:.4f} nats/token |" if summary.final_loss is not None else "| final train loss | n/a |",
        f"| validation loss | {summary.val_loss:.4f} nats/token |" if summary.val_loss is not None else "| validation loss | n/a |",
        f"| validation bits per byte | {summary.val_bpb:.4f} |" if summary.val_bpb is not None else "| validation bits per byte | n/a |",
        f"| best validation bits per byte | {best['val_bpb']:.4f} (step {best['step']}) |" if best else "| best validation bits per byte | n/a |",
        f"| steps / tokens | {summary.steps:,} / {summary.tokens:,} |",
        f"| wall time | {summary.seconds:.1f} s |",
        f"| throughput | {summary.tokens_per_s:,.0f} tokens/s" + (f", MFU {summary.mfu:.1%}" if summary.mfu else "") + " |",
        "",
        "## Model",
        "",
        f"{summary.params:,} parameters: {model_config.n_layer} layers, width {model_config.n_embd}, "
        f"{model_config.n_head} heads ({model_config.kv_heads} key/value), context {model_config.block_size}, "
        f"{model_config.positions} positions, {model_config.norm}, {model_config.mlp}, vocab {model_config.vocab_size}.",
        "",
        "## Data",
        "",
        f"`{shards.path}`: {shards.tokens('train'):,} train tokens, {shards.tokens('val'):,} validation tokens.",
        "",
        "## Training",
        "",
        f"Recipe: `{json.dumps({k: v for k, v in config.to_dict().items() if v not in (None, {}, '')})}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "",
        "![loss curve](loss.png)",
        "",
        "## Samples",
        "",
    ]
    for n, sample in enumerate(summary.samples, 1):
        lines += [f"**Sample {n}**", "", "```text", sample.strip(), "```", ""]
    return write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
