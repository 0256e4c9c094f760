"""Checkpoints survive what stops real runs: step counts past six digits, power cuts (fsync before
each rename), a damaged latest checkpoint (resume falls back to the one before), a torn last line
of metrics.jsonl, and a disk that fills up while a checkpoint is written. A checkpoint of a plain
model is a model folder that `open_model` opens; older weights-only checkpoints still open."""

import errno
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from scratchlm.atomic_io import OutputFileError
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.interop import open_model
from scratchlm.model.classifier import SequenceClassifier, TextClassifier
from scratchlm.train import checkpoint as checkpoint_module
from scratchlm.train.checkpoint import load_checkpoint, save_checkpoint
from scratchlm.train.config import load_train_config
from scratchlm.train.pretrain import pretrain
from scratchlm.train.metrics import MetricsLog, read_metrics

from conftest import tiny_gpt

TINY = ["model=cpu-tiny", "micro_batch=4", "samples=0", "log_every=1", "eval_every=1000", "eval_tokens=1024",
        "warmup_steps=2", "checkpoint_every=2", "max_steps=4"]
CONFIG = {"n_layer": 1}  # stands for a ModelConfig dict in the unit tests


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def small_state(step: int) -> dict:
    return {"optimizer": {}, "step": step, "elapsed": 0.0, "rng_cpu": torch.get_rng_state(), "rng_python": (3, (1,) * 625, None),
            "model_config": CONFIG}


def latest_of(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


# ---- rotation ------------------------------------------------------------------------------
def test_rotation_past_step_999999_keeps_the_newest_checkpoint(tmp_path):
    for step in (999_998, 999_999, 1_000_000):
        save_checkpoint(tmp_path, step, small_model(), small_state(step))
    folders = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert folders == ["step_1000000", "step_999999"]
    assert latest_of(tmp_path) == "step_1000000"
    assert load_checkpoint(tmp_path / "checkpoints" / "step_1000000", small_model(), CONFIG)["step"] == 1_000_000


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """After a resume from step 10 (step 20 was damaged), saving step 15 keeps 15 and 10 and
    drops the abandoned step 20, instead of keeping the two highest names."""
    for step in (10, 20):
        save_checkpoint(tmp_path, step, small_model(), small_state(step))
    save_checkpoint(tmp_path, 15, small_model(), small_state(15))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000010", "step_000015"]
    assert latest_of(tmp_path) == "step_000015"


# ---- durability ----------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="folders cannot be fsynced here (Windows)")
def test_checkpoint_files_and_folders_are_fsynced_before_and_after_each_rename(tmp_path, monkeypatch):
    """In order: the files and the temporary folder, the rename to step_N, the checkpoints
    folder, the rename of `latest`, the checkpoints folder again. Identified by inode, which a
    rename keeps."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (real_replace(a, b), events.append(("replace", Path(b).name)))[0])
    save_checkpoint(tmp_path, 7, small_model(), small_state(7))
    root = tmp_path / "checkpoints"
    final = root / "step_000007"
    inode = lambda path: ("fsync", path.stat().st_ino)  # noqa: E731
    rename, pointer = events.index(("replace", "step_000007")), events.index(("replace", "latest"))
    assert {inode(final / "model.safetensors"), inode(final / "state.pt"), inode(final)} <= set(events[:rename])
    assert inode(root) in events[rename:pointer]
    assert inode(root / "latest") in events[:pointer] and events[pointer + 1:] == [inode(root)]


# ---- a full disk ---------------------------------------------------------------------------
def torch_save_fills_the_disk(obj, f, *args, **kwargs):
    """What torch.save does on a full disk: its C++ writer fails after writing part of the file.
    Given a Python file, the file's OSError is the exception's context; given a path, there is
    no trace of the cause."""
    if isinstance(f, (str, os.PathLike)):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    try:
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904


def save_model_fills_the_disk(model, filename, *args, **kwargs):
    """What safetensors does on a full disk: a partial file and the errno only in the text."""
    Path(filename).write_bytes(b"\x10\x00\x00\x00partial")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def fsync_fills_the_disk(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(("target", "fake"), [
    (torch, ("save", torch_save_fills_the_disk)),
    (checkpoint_module, ("save_model", save_model_fills_the_disk)),
    (os, ("fsync", fsync_fills_the_disk)),
], ids=["torch.save", "safetensors", "fsync"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one_usable(tmp_path, monkeypatch, target, fake):
    save_checkpoint(tmp_path, 1, small_model(), small_state(1))
    root = tmp_path / "checkpoints"
    (root / ".step_000009.tmp").mkdir()  # left by a write that was killed
    (root / ".step_000009.tmp" / "state.pt").write_bytes(b"half")
    with monkeypatch.context() as patch:
        patch.setattr(target, *fake)
        with pytest.raises(OutputFileError) as failure:
            save_checkpoint(tmp_path, 2, small_model(), small_state(2))
    assert str(failure.value) == (f"{root}: no space left on device while writing checkpoint step 2; "
                                  "the previous checkpoint step_000001 is intact")
    assert latest_of(tmp_path) == "step_000001"
    assert load_checkpoint(root / "step_000001", small_model(), CONFIG)["step"] == 1
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]  # no half-written folder left
    save_checkpoint(tmp_path, 2, small_model(), small_state(2))  # once there is space again
    assert latest_of(tmp_path) == "step_000002"


def test_a_checkpoint_write_failing_for_another_reason_keeps_its_error_and_leaves_no_folder(tmp_path, monkeypatch):
    def buggy(*args, **kwargs):
        raise TypeError("cannot pickle 'generator' object")

    monkeypatch.setattr(torch, "save", buggy)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, small_model(), small_state(1))
    assert not list((tmp_path / "checkpoints").iterdir())


# ---- metrics.jsonl -------------------------------------------------------------------------
ROWS = [{"step": 1, "loss": 6.1}, {"step": 2, "loss": 5.9}, {"step": 3, "loss": 5.7}]


def write_log(path: Path, tail: bytes) -> Path:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS) + tail)
    return path


@pytest.mark.parametrize("tail", [b'{"step": 4, "lo', b"\x00" * 40, b'{"step": 4, "loss": 5.', b"\xe2\x82"],
                         ids=["cut-mid-row", "zero-filled", "cut-in-number", "cut-in-utf8"])
def test_a_torn_last_metrics_line_is_left_out_and_the_log_repaired_on_resume(tmp_path, tail):
    path = write_log(tmp_path / "metrics.jsonl", tail)
    assert read_metrics(path) == ROWS
    log = MetricsLog(path)
    log.truncate_after(2)
    log.write({"step": 3, "loss": 5.6})
    assert path.read_text().splitlines() == [json.dumps(r) for r in ROWS[:2]] + ['{"step": 3, "loss": 5.6}']


def test_a_complete_last_row_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS).rstrip("\n"))
    assert read_metrics(path) == ROWS
    log = MetricsLog(path)
    log.truncate_after(3)
    log.write({"step": 4})
    assert read_metrics(path) == [*ROWS, {"step": 4}]


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(InputFileError, match=f"^{path}:2: not a JSON line"):
        read_metrics(path)
    with pytest.raises(InputFileError, match=f"^{path}:2: "):
        MetricsLog(path).truncate_after(3)


def test_appending_metrics_to_an_unwritable_log_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()  # open(..., "a") fails with an OSError, as on a full disk
    with pytest.raises(OutputFileError, match="metrics.jsonl: cannot append metrics"):
        MetricsLog(tmp_path / "metrics.jsonl").write({"step": 1})


# ---- resume, end to end on a tiny run ------------------------------------------------------
# `shards`: conftest's, read-only; the runs below write only into their own folders.


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4; tests damage copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    pretrain(shards, run, load_train_config(None, TINY), progress=False)
    return run


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def steps_and_losses(run: Path) -> tuple[list[int], list[float]]:
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def assert_same_losses(run: Path, reference: Path) -> None:
    """The resumed steps redo the uninterrupted run's steps: same steps, once each, same losses
    (rounded to 5 decimals in the log; 1e-4 leaves room for float32 summation order)."""
    (steps, values), (reference_steps, reference_values) = steps_and_losses(run), steps_and_losses(reference)
    assert steps == reference_steps == [1, 2, 3, 4]
    assert values == pytest.approx(reference_values, abs=1e-4)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated-state": lambda ck: truncate(ck / "step_000004" / "state.pt"),
    "garbage-state": lambda ck: (ck / "step_000004" / "state.pt").write_bytes(random.Random(0).randbytes(64)),
    "truncated-weights": lambda ck: truncate(ck / "step_000004" / "model.safetensors"),
    "missing-weights": lambda ck: (ck / "step_000004" / "model.safetensors").unlink(),
    "missing-folder": lambda ck: shutil.rmtree(ck / "step_000004"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_falls_back_past_a_damaged_latest_checkpoint_and_says_so(finished_run, shards, tmp_path, capfd, damage):
    run = copy_run(finished_run, tmp_path)
    DAMAGES[damage](run / "checkpoints")
    pretrain(shards, run, load_train_config(None, TINY), resume=True, progress=False)
    warning = capfd.readouterr().err
    assert "scratchlm: warning:" in warning and "step_000004" in warning
    assert warning.rstrip().endswith(f"resuming from {run / 'checkpoints' / 'step_000002'}")
    assert_same_losses(run, finished_run)  # steps 3 and 4 redone from step 2
    assert latest_of(run) == "step_000004"
    assert load_checkpoint(run / "checkpoints" / "step_000004", _model_of(run), _config_of(run))["step"] == 4


def test_resume_with_a_garbage_latest_pointer_uses_the_newest_checkpoint(finished_run, shards, tmp_path, capfd):
    run = copy_run(finished_run, tmp_path)
    (run / "checkpoints" / "latest").write_bytes(b"\x00\x00\x00\x00")
    pretrain(shards, run, load_train_config(None, TINY), resume=True, progress=False)
    warning = capfd.readouterr().err
    assert "latest: not a checkpoint name" in warning and warning.rstrip().endswith("step_000004")
    assert latest_of(run) == "step_000004"


def test_resume_with_no_readable_checkpoint_is_one_line(finished_run, shards, tmp_path):
    run = copy_run(finished_run, tmp_path)
    truncate(run / "checkpoints" / "step_000004" / "state.pt")
    (run / "checkpoints" / "step_000002" / "state.pt").unlink()
    with pytest.raises(InputFileError, match="no readable checkpoint to resume from") as failure:
        pretrain(shards, run, load_train_config(None, TINY), resume=True, progress=False)
    assert "\n" not in str(failure.value) and "step_000004" in str(failure.value) and "step_000002" in str(failure.value)


def test_resume_does_not_fall_back_past_a_checkpoint_of_another_model(finished_run, shards, tmp_path):
    run = copy_run(finished_run, tmp_path)
    truncate(run / "checkpoints" / "step_000004" / "state.pt")
    with pytest.raises(ConfigError, match="different model \\(n_layer: 2 vs 3\\)"):
        pretrain(shards, run, load_train_config(None, [*TINY, "model_config.n_layer=3"]), resume=True, progress=False)


def test_resume_with_another_optimizer_is_one_line(finished_run, shards, tmp_path):
    run = copy_run(finished_run, tmp_path)
    with pytest.raises(ConfigError, match="optimizer state does not fit this run's optimizer"):
        pretrain(shards, run, load_train_config(None, [*TINY, "optimizer=muon"]), resume=True, progress=False)


def test_resume_after_a_torn_metrics_line_keeps_a_valid_log(finished_run, shards, tmp_path):
    run = copy_run(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_000004")
    (run / "checkpoints" / "latest").write_text("step_000002\n")
    with (run / "metrics.jsonl").open("ab") as log:
        log.write(b'{"step": 5, "loss": 4.')  # a kill mid-write after step 4's row
    pretrain(shards, run, load_train_config(None, TINY), resume=True, progress=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert_same_losses(run, finished_run)


def test_disk_full_at_a_checkpoint_stops_training_with_one_line_then_resumes(shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save, saves = torch.save, []

    def fills_at_the_second(obj, handle, *args, **kwargs):
        saves.append(obj["step"])
        return real_save(obj, handle, *args, **kwargs) if len(saves) == 1 else torch_save_fills_the_disk(obj, handle)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", fills_at_the_second)
        with pytest.raises(OutputFileError) as failure:
            pretrain(shards, run, load_train_config(None, TINY), progress=False)
    assert str(failure.value).endswith("no space left on device while writing checkpoint step 4; "
                                       "the previous checkpoint step_000002 is intact")
    summary = pretrain(shards, run, load_train_config(None, TINY), resume=True, progress=False)
    assert summary.steps == 4 and latest_of(run) == "step_000004"


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="folders cannot be fsynced here (Windows)")
def test_metrics_log_is_fsynced_before_each_checkpoint(shards, tmp_path, monkeypatch):
    run, synced = tmp_path / "run", []
    real_fsync, real_save = os.fsync, checkpoint_module.save_checkpoint
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd))[1])

    def save_checking_the_log(run_dir, step, *args, **kwargs):
        assert (run_dir / "metrics.jsonl").stat().st_ino in synced
        assert read_metrics(run_dir / "metrics.jsonl")[-1]["step"] == step
        synced.clear()
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr("scratchlm.train.loop.save_checkpoint", save_checking_the_log)
    pretrain(shards, run, load_train_config(None, TINY), progress=False)
    assert latest_of(run) == "step_000004"


def _model_of(run: Path) -> torch.nn.Module:
    from scratchlm.model import GPT, ModelConfig

    return GPT(ModelConfig.from_dict(_config_of(run)))


def _config_of(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["model"]


@pytest.mark.parametrize("writer", ["write_text_atomic", "save_figure_atomic"])
def test_a_full_disk_while_writing_an_output_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, writer):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scratchlm import atomic_io

    target = tmp_path / ("report.md" if writer == "write_text_atomic" else "loss.png")
    target.write_bytes(b"the old file")

    def full_disk(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_io.os, "fsync", full_disk)
    with pytest.raises(OutputFileError, match=r"(report\.md|loss\.png): no space left on device while writing it"):
        if writer == "write_text_atomic":
            atomic_io.write_text_atomic(target, "new text")
        else:
            atomic_io.save_figure_atomic(plt.figure(), target)
    assert target.read_bytes() == b"the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary file left


# ---- a checkpoint is a model folder --------------------------------------------------------
def ids_of(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("The quick brown fox, a café.")])


def test_a_language_model_checkpoint_opens_as_a_model_folder_with_the_same_logits(tokenizer, tmp_path):
    model = tiny_gpt(tokenizer, seed=3)
    folder = save_checkpoint(tmp_path, 5, model, small_state(5), tokenizer)
    opened = open_model(folder)
    assert (opened.kind, opened.format) == ("language-model", "scratchlm")
    assert json.loads((folder / "config.json").read_text())["format"] == "scratchlm-model"
    with torch.no_grad():  # same float32 weights, same CPU arithmetic: the same bits
        torch.testing.assert_close(opened.model(ids_of(tokenizer))[0], model(ids_of(tokenizer))[0], rtol=0, atol=0)
    assert load_checkpoint(folder, tiny_gpt(tokenizer), CONFIG)["step"] == 5  # and it still resumes


def test_a_classifier_checkpoint_opens_with_its_labels_and_max_length(tokenizer, tmp_path):
    classifier = SequenceClassifier(tiny_gpt(tokenizer, seed=4), 2).eval()
    folder = save_checkpoint(tmp_path, 2, classifier, small_state(2), tokenizer, labels=["ham", "spam"], max_length=16)
    opened = open_model(folder)
    assert opened.kind == "classifier" and opened.labels == ["ham", "spam"] and opened.model.max_length == 16
    texts = ["The quick brown fox jumps over the lazy dog. " * 4, "café"]
    expected = TextClassifier(classifier, tokenizer, ["ham", "spam"], 16).probabilities(texts)
    assert opened.model.probabilities(texts) == expected


def test_a_lora_checkpoint_stays_weights_only(tokenizer, tmp_path):
    """Adapter weights have no place in the folder header, so the checkpoint holds what resume
    needs and nothing that would claim to be a plain model."""
    from scratchlm.finetune.lora import LoRAConfig, apply_lora

    folder = save_checkpoint(tmp_path, 1, apply_lora(tiny_gpt(tokenizer), LoRAConfig(rank=2)), small_state(1), tokenizer)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "state.pt"]


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="folders cannot be fsynced here (Windows)")
def test_a_checkpoints_model_folder_files_are_fsynced_before_the_rename(tokenizer, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (real_replace(a, b), events.append(("replace", Path(b).name)))[0])
    final = save_checkpoint(tmp_path, 7, tiny_gpt(tokenizer), small_state(7), tokenizer)
    rename = events.index(("replace", "step_000007"))
    synced = {("fsync", (final / name).stat().st_ino) for name in ("config.json", "tokenizer.json", "model.safetensors", ".")}
    assert synced <= set(events[:rename])


@pytest.mark.slow
def test_a_pretraining_checkpoint_opens_like_the_final_model_and_old_ones_still_open(finished_run, tmp_path):
    """The last checkpoint (step 4, the end of the run) holds the model that wrote RUN/model.
    A checkpoint of before checkpoints were model folders (weights and state.pt) still opens:
    with the config and tokenizer of RUN/model, or, for a run killed before it wrote model/,
    the config in state.pt and the tokenizer of the run's data."""
    run = copy_run(finished_run, tmp_path)
    checkpoint = run / "checkpoints" / "step_000004"
    final = open_model(run)
    ids = ids_of(final.tokenizer)
    with torch.no_grad():
        expected = final.model(ids)[0]
        assert (checkpoint / "config.json").is_file() and (checkpoint / "tokenizer.json").is_file()
        torch.testing.assert_close(open_model(checkpoint).model(ids)[0], expected, rtol=0, atol=0)
        for name in ("config.json", "tokenizer.json"):
            (checkpoint / name).unlink()
        torch.testing.assert_close(open_model(checkpoint).model(ids)[0], expected, rtol=0, atol=0)
        shutil.rmtree(run / "model")
        old = open_model(checkpoint)
        assert old.tokenizer.encode("The quick brown fox") == final.tokenizer.encode("The quick brown fox")
        torch.testing.assert_close(old.model(ids)[0], expected, rtol=0, atol=0)
