"""Checkpoints: everything needed to continue a run exactly where it stopped.

    RUN/checkpoints/step_000200/model.safetensors   weights (safetensors: no code on load)
    RUN/checkpoints/step_000200/config.json         the model folder's header  } given the tokenizer,
    RUN/checkpoints/step_000200/tokenizer.json      its tokenizer              } for a plain model
    RUN/checkpoints/step_000200/state.pt            optimizer, step, data position, RNG states
    RUN/checkpoints/latest                          name of the newest complete checkpoint

So a checkpoint is a model folder plus state.pt: `open_model` opens it like any other. A module
the folder format cannot describe (one carrying LoRA adapters) is saved as weights only; so
were all checkpoints before, and `open_model` still finds their config and tokenizer in the run.

Writing survives a kill, a full disk and a power cut: a checkpoint is written into a temporary
folder, its files and the folder are fsynced, it is renamed to step_N and `checkpoints/` is
fsynced; then `latest` is replaced atomically and `checkpoints/` fsynced again. So step_N is
complete on disk or absent, and `latest` names a complete folder. A write that fails removes the
temporary folder and leaves the previous checkpoint as it was.

Resuming loads the checkpoint `latest` names. If that one is damaged (a truncated or unreadable
file, a garbage pointer), it falls back to the newest readable one and reports what it passed
over. A checkpoint of a different model is a mistake, not damage: that stops the resume.
`state.pt` holds only tensors and plain values and is read with `weights_only=True`.
"""

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model

from scratchlm.atomic_io import OutputFileError, fsync_file, fsync_folder, os_error_code, write_text_atomic
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.model.folder import SHARDS, describes, load_state_dict_upgraded, read_shards, write_model_files
from scratchlm.tokenizer import Tokenizer

KEEP = 2  # older checkpoints are deleted once a newer one is complete
STATE_KEYS = ("optimizer", "step", "elapsed", "rng_cpu", "rng_python", "model_config")  # what resume reads


def checkpoint_step(name: str) -> int | None:
    """N for a checkpoint folder named step_N; None for anything else (a temporary .step_N.tmp)."""
    digits = name.removeprefix("step_")
    return int(digits) if digits != name and digits.isascii() and digits.isdigit() else None


def checkpoint_folders(root: Path) -> list[Path]:
    """The step_N folders in `root`, oldest first. By number, not by name: names are padded to
    six digits, so as strings step_1000000 sorts before step_999999."""
    found = [(step, p) for p in root.glob("step_*") if p.is_dir() and (step := checkpoint_step(p.name)) is not None]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict, tokenizer: Tokenizer | None = None, *,
                    labels: list[str] | None = None, max_length: int | None = None) -> Path:
    """Write checkpoint `step` of the run in `run_dir` durably (see the module docstring) and
    return its folder. With `tokenizer`, and a model a model folder can hold, it is a model
    folder too (`labels` and `max_length` as for `save_model_folder`)."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    previous = _latest_name(root)
    for stale in root.glob(".step_*.tmp"):  # left by a write that was killed; it may hold the space we need
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
        fsync_file(tmp / "model.safetensors")
        if tokenizer is not None and describes(model):  # each file written atomically, so synced
            write_model_files(tmp, model, tokenizer, labels=labels, max_length=max_length)
        # Through a Python file: on a full disk torch's C++ writer then fails with the OSError as
        # context, which names the cause; given a path it says only "unexpected pos".
        with (tmp / "state.pt").open("wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_folder(tmp)
        shutil.rmtree(final, ignore_errors=True)  # a step_N left by a timeline the run abandoned on resume
        os.replace(tmp, final)
        fsync_folder(root)
        set_latest(final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        code = os_error_code(exc)
        if code is None:
            raise
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint was written"
        raise OutputFileError(f"{root}: {os.strerror(code).lower()} while writing checkpoint step {step}; {kept}") from None
    _rotate(root, step)
    return final


def set_latest(checkpoint: Path) -> None:
    """Point `latest` at `checkpoint`, durably (write_text_atomic fsyncs the folder after its rename)."""
    write_text_atomic(checkpoint.parent / "latest", checkpoint.name + "\n")


def _rotate(root: Path, step: int) -> None:
    """Keep the checkpoint of `step` and the KEEP - 1 before it. Folders of later steps go too:
    they belong to a timeline the run abandoned when it resumed from an earlier checkpoint."""
    folders = checkpoint_folders(root)
    older = [p for p in folders if checkpoint_step(p.name) < step]
    newer = [p for p in folders if checkpoint_step(p.name) > step]
    for old in older[: max(0, len(older) - (KEEP - 1))] + newer:
        shutil.rmtree(old, ignore_errors=True)


def _latest_name(root: Path) -> str | None:
    """The checkpoint name in `latest`, or None if it is missing or not a step_N name."""
    try:
        name = (root / "latest").read_bytes().decode("utf-8", "replace").strip()
    except OSError:
        return None
    return name if checkpoint_step(name) is not None else None


def resume_checkpoint(run_dir: Path, model: torch.nn.Module, model_config: dict,
                      optimizer: torch.optim.Optimizer | None = None, sharded: bool = False) -> tuple[Path, dict, list[str]]:
    """Load the checkpoint to resume from into `model` (and `optimizer`): the one `latest` names,
    or when it is damaged, the newest readable one. Returns its folder, its state, and one line
    for each damaged checkpoint (or pointer) passed over. A ConfigError (another model) is raised,
    not passed over. `sharded`: the model's weights are split across ranks (FSDP, tensor or
    pipeline parallel), which only a sharded checkpoint can be loaded into."""
    root = run_dir / "checkpoints"
    named = _latest_name(root)
    candidates = ([root / named] if named else []) + [p for p in reversed(checkpoint_folders(root)) if p.name != named]
    if not candidates:
        raise InputFileError(f"{run_dir}: nothing to resume (no checkpoint)")
    passed_over = [] if named else [f"{root / 'latest'}: {'not a checkpoint name' if (root / 'latest').exists() else 'missing'}"]
    for path in candidates:
        try:
            if (path / SHARDS).is_dir():
                return path, load_sharded_checkpoint(path, model, optimizer, model_config), passed_over
            if sharded:
                raise ConfigError(f"{path}: this checkpoint holds whole weights (saved without FSDP, tensor or pipeline "
                                  "parallelism); resume it in one process or under DDP (parallel.dp_shard = 1, tp = 1, pp = 1)")
            state = load_checkpoint(path, model, model_config)
            if optimizer is not None:
                load_optimizer_state(optimizer, state["optimizer"], path)
            return path, state, passed_over
        except InputFileError as exc:
            passed_over.append(str(exc))
    raise InputFileError(f"{run_dir}: no readable checkpoint to resume from ({'; '.join(passed_over)})")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, path: Path) -> None:
    try:
        optimizer.load_state_dict(state)
    except ValueError:  # torch's message is about parameter groups; the cause is the optimizer setting
        raise ConfigError(f"{path}: the saved optimizer state does not fit this run's optimizer; "
                          "resume with the settings the run started with") from None


def load_checkpoint(path: Path, model: torch.nn.Module, model_config: dict) -> dict:
    """Load weights into `model` and return the saved state, after checking the checkpoint was
    made for the same architecture (`model_config`, a ModelConfig as a dict). A damaged or
    incomplete checkpoint is an InputFileError; one of another model a ConfigError."""
    if not path.is_dir():
        raise InputFileError(f"{path}: no such checkpoint folder")
    if not (path / "model.safetensors").is_file():
        raise InputFileError(f"{path}: incomplete checkpoint (no model.safetensors)")
    state = _read_state(path, model_config)
    try:
        tensors = load_file(str(path / "model.safetensors"))
        # Checkpoints of format_version 1 hold fused qkv and gate|up tensors; they are split here.
        missing, unexpected = load_state_dict_upgraded(model, tensors)
    except Exception as exc:  # shape mismatch or a corrupt file
        raise InputFileError(f"{path}: checkpoint weights do not load ({_first_line(exc)})") from None
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        raise InputFileError(f"{path}: checkpoint does not fit this model (tensor {name!r} {'missing' if missing else 'unexpected'})")
    return state


def _first_line(exc: BaseException) -> str:
    """The first sentence of an error: torch's zip errors go on with advice about other causes."""
    return (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200]


# ---- sharded checkpoints (FSDP, tensor and pipeline parallel) -------------------------------


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict, is_main: bool, tokenizer: Tokenizer | None = None, *,
                            whole: torch.nn.Module | None = None, labels: list[str] | None = None,
                            max_length: int | None = None) -> Path:
    """Every rank calls this. Each writes its own shards of the weights and optimizer state with
    torch.distributed.checkpoint into RUN/checkpoints/step_N/shards/ (one file per rank, plus
    .metadata: which slice of which tensor is where), so no rank ever holds the whole model; the
    main rank writes state.pt (step, RNG, data position) and, given the tokenizer and `whole`
    (the model's structure, e.g. on the meta device), the model folder's header, so that
    `open_model` opens the checkpoint (reading the shards whole), and commits the folder as
    `save_checkpoint` does. Loading reshards: a checkpoint saved on N ranks loads on M, or on one."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
    if is_main:
        for stale in root.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_sharded_state(model, optimizer), checkpoint_id=tmp / SHARDS, no_dist=not dist.is_initialized())
    if is_main:
        if tokenizer is not None and whole is not None and describes(whole):
            write_model_files(tmp, whole, tokenizer, labels=labels, max_length=max_length)
        with (tmp / "state.pt").open("wb") as handle:
            torch.save({**state, "optimizer": SHARDS}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_folder(tmp / SHARDS)
        fsync_folder(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_folder(root)
        set_latest(final)
        _rotate(root, step)
    _barrier()  # no rank goes on (and might resume or exit) before the checkpoint is committed
    return final


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Weights and optimizer state keyed by parameter name, each tensor as this rank's shard
    (a DTensor) where it is sharded: the layout-independent form DCP saves and reshards."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, get_model_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _initialise_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Make the optimizer create its state (AdamW's moments) without changing any weight: DCP
    loads into existing tensors, and a fresh optimizer has none yet. A step at learning rate 0
    on zero gradients; the loaded state then replaces what it made."""
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate


def load_sharded_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                            model_config: dict) -> dict:
    """Load a sharded checkpoint into `model` and `optimizer`, whatever their layout now (every
    rank calls it; one process without a process group loads it whole). Returns the saved state."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _read_state(path, model_config)
    if not (path / SHARDS / ".metadata").is_file():
        raise InputFileError(f"{path}: incomplete checkpoint (no {SHARDS}/.metadata)")
    if optimizer is not None:
        _initialise_optimizer_state(optimizer)
    target = _sharded_state(model, optimizer)
    read_shards(target, path / SHARDS)
    if optimizer is None:
        set_model_state_dict(model, target["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
    return state


def _read_state(path: Path, model_config: dict) -> dict:
    """state.pt of checkpoint `path`, checked to be a checkpoint state of the same model."""
    if not (path / "state.pt").is_file():
        raise InputFileError(f"{path}: incomplete checkpoint (no state.pt)")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise InputFileError(f"{path / 'state.pt'}: unreadable checkpoint state ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise InputFileError(f"{path / 'state.pt'}: not a checkpoint state (expected the keys {', '.join(STATE_KEYS)})")
    saved = state.get("model_config") or {}
    if saved != model_config:
        key = next((k for k in model_config if saved.get(k) != model_config[k]), "?")
        raise ConfigError(f"{path.parent.parent}: checkpoint was made with a different model ({key}: {saved.get(key)!r} vs {model_config.get(key)!r})")
    return state
