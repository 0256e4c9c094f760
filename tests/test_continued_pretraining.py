"""Continued pretraining (`init_from`): a run starts from a trained model's weights, logs the
loaded model's validation loss at step 0, learns a new domain faster than a fresh model,
refuses shards of another tokenizer or a changed architecture, and resumes from its checkpoint."""

import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scratchlm.cli import main
from scratchlm.data.shards import TokenShards
from scratchlm.data.tokenize import tokenize_files
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.interop import open_model
from scratchlm.model import get_preset
from scratchlm.tokenizer import train_bpe
from scratchlm.train.config import load_train_config
from scratchlm.train.pretrain import init_model_config, pretrain
from scratchlm.train.metrics import read_metrics

TINY = ["micro_batch=4", "samples=0", "log_every=1", "eval_every=1000", "eval_tokens=2048", "warmup_steps=2", "optimizer=adamw"]
# The continued run: 12 steps on 64-token windows of a model with a 128-token context.
CONTINUE = TINY + ["max_steps=12", "lr=3e-3", "seq_len=64", "checkpoint_every=6"]


def domain_text(notes: int = 700) -> str:
    """A small 'domain': clinical notes, a register the general corpus (Python docs) lacks."""
    rng = random.Random(0)
    drugs = ["aspirin", "ibuprofen", "metformin", "insulin", "warfarin", "amoxicillin"]
    findings = ["no change", "mild swelling", "a normal rhythm", "elevated pressure", "a small lesion"]
    organs = ["heart", "liver", "left knee", "lungs", "right kidney"]
    return "\n".join(
        f"Patient {rng.randint(100, 999)} was given {rng.choice([5, 10, 20, 50])} mg of {rng.choice(drugs)} "
        f"twice daily for {rng.randint(2, 14)} days; the {rng.choice(organs)} showed {rng.choice(findings)}."
        for _ in range(notes)
    ) + "\n"


@pytest.fixture(scope="module")
def root(embedded_sample, tmp_path_factory) -> Path:
    """General and domain shards made with one tokenizer, and a base model trained on the general ones."""
    root = tmp_path_factory.mktemp("cpt")
    (root / "general.txt").write_text(embedded_sample)
    (root / "domain.txt").write_text(domain_text())
    tokenizer = train_bpe([embedded_sample], 512, workers=1)
    tokenize_files([root / "general.txt"], tokenizer, root / "general")
    tokenize_files([root / "domain.txt"], tokenizer, root / "domain")
    base = load_train_config(None, TINY + ["model=cpu-tiny", "max_steps=40", "lr=1e-2"])
    pretrain(root / "general", root / "base", base, progress=False)
    return root


@pytest.fixture(scope="module")
def continued(root) -> Path:
    config = load_train_config(None, CONTINUE + [f"init_from={root / 'base' / 'model'}"])
    pretrain(root / "domain", root / "continued", config, progress=False)
    return root / "continued"


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run / "metrics.jsonl")]


def val_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]


def test_step_zero_logs_the_loaded_models_loss_on_the_validation_data(root, continued):
    first = read_metrics(continued / "metrics.jsonl")[0]
    assert first["step"] == 0 and set(first) == {"step", "val_loss", "val_bpb"}
    model = open_model(root / "base" / "model", kind="language-model").model
    shards = TokenShards.open(root / "domain")
    tokens = torch.from_numpy(shards.read("val", 0, min(shards.tokens("val"), 2049)))
    windows = (len(tokens) - 1) // 64
    x = tokens[: windows * 64].view(windows, 64)
    y = tokens[1 : windows * 64 + 1].view(windows, 64)
    with torch.no_grad():  # equal-sized windows: the mean over all tokens is the mean loss
        _, loss = model(x, y)
    assert first["val_loss"] == pytest.approx(loss.item(), abs=1e-4)
    report = (continued / "report.md").read_text()
    assert f"| started from | `{root / 'base' / 'model'}`" in report
    assert f"| validation loss at start | {first['val_loss']:.4f} nats/token" in report


def test_continued_run_beats_its_start_and_a_fresh_model_trained_as_long(root, continued):
    scratch = load_train_config(None, CONTINUE + ["model=cpu-tiny"])
    pretrain(root / "domain", root / "scratch", scratch, progress=False)
    start, end = val_rows(continued)[0], val_rows(continued)[-1]
    assert (start["step"], end["step"]) == (0, 12)
    assert end["val_loss"] < start["val_loss"] - 0.1
    assert end["val_loss"] < val_rows(root / "scratch")[-1]["val_loss"] - 0.1


def test_shorter_windows_keep_the_models_context_and_untrained_position_rows(root, tmp_path):
    learned = load_train_config(None, TINY + ["model=cpu-tiny", "max_steps=2", "model_config.positions=learned"])
    pretrain(root / "general", tmp_path / "base", learned, progress=False)
    config = load_train_config(None, TINY + ["max_steps=2", "lr=1e-2", "seq_len=32", "weight_decay=0",
                                             f"init_from={tmp_path / 'base'}"])
    pretrain(root / "domain", tmp_path / "continued", config, progress=False)
    before, after = load_file(tmp_path / "base" / "model" / "model.safetensors"), load_file(tmp_path / "continued" / "model" / "model.safetensors")
    model = open_model(tmp_path / "continued", kind="language-model").model
    assert model.config.block_size == 128 and after["pos_embed.weight"].shape[0] == 128
    assert not torch.equal(after["pos_embed.weight"][:32], before["pos_embed.weight"][:32])
    assert torch.equal(after["pos_embed.weight"][32:], before["pos_embed.weight"][32:])


def test_shards_of_another_tokenizer_fail_in_one_line_that_gives_the_fixing_command(root, tmp_path, capsys):
    other = train_bpe([domain_text()], 300, workers=1)
    tokenize_files([root / "domain.txt"], other, tmp_path / "other")
    base = root / "base" / "model"

    def continue_on(data: Path | str, out: Path) -> int:
        return main(["pretrain", "--data", str(data), "--out", str(out), "--init-from", str(base), "--quiet",
                     "--max-steps", "1", *[item for s in TINY for item in ("--set", s)]])

    assert continue_on(tmp_path / "other", tmp_path / "run") == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "different tokenizer" in error and str(base) in error
    command = error.split("tokenize the corpus with the model's tokenizer: ")[1].split()
    assert command[:3] == ["scratchlm", "data", "tokenize"] and f"{base / 'tokenizer.json'}" in command
    # The command it gives, run on the corpus, makes shards the model accepts.
    assert main([str(root / "domain.txt") if part == "CORPUS" else part for part in command[1:]]) == 0
    assert continue_on(command[command.index("--out") + 1], tmp_path / "fixed-run") == 0


def test_init_from_refuses_another_architecture_but_takes_dropout(root):
    loaded = get_preset("cpu-tiny").replace(vocab_size=512)
    with_dropout = load_train_config(None, ["max_steps=1", "init_from=m", "model_config.dropout=0.1", "model_config.n_layer=2"])
    assert init_model_config(with_dropout, loaded) == loaded.replace(dropout=0.1)
    deeper = load_train_config(None, ["max_steps=1", "init_from=m", "model_config.n_layer=3"])
    with pytest.raises(ConfigError, match="model_config.n_layer=3 conflicts with init_from"):
        init_model_config(deeper, loaded)
    with pytest.raises(ConfigError, match="model='cpu-tiny' conflicts with init_from"):
        load_train_config(None, ["max_steps=1", "init_from=m", "model=cpu-tiny"])
    wider = load_train_config(None, TINY + ["max_steps=1", "model_config.n_embd=128", f"init_from={root / 'base'}"])
    with pytest.raises(ConfigError, match="model_config.n_embd"):
        pretrain(root / "domain", root / "refused", wider, progress=False)
    longer = load_train_config(None, TINY + ["max_steps=1", "seq_len=256", f"init_from={root / 'base'}"])
    with pytest.raises(ConfigError, match="seq_len 256 is longer than the context .* \\(128 tokens\\)"):
        pretrain(root / "domain", root / "refused", longer, progress=False)


def test_resume_continues_from_the_checkpoint_not_the_initial_weights(root, continued, tmp_path):
    interrupted = tmp_path / "interrupted"
    shutil.copytree(continued, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step_000012")  # as if killed after step 6's checkpoint
    (interrupted / "checkpoints" / "latest").write_text("step_000006\n")
    config = load_train_config(None, CONTINUE + [f"init_from={root / 'base' / 'model'}"])
    pretrain(root / "domain", interrupted, config, resume=True, progress=False)
    assert losses(interrupted) == losses(continued)
    a = load_file(continued / "model" / "model.safetensors")
    b = load_file(interrupted / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_init_model_is_an_input_error(root, tmp_path):
    config = load_train_config(None, TINY + ["max_steps=1", f"init_from={tmp_path / 'nothing'}"])
    with pytest.raises(InputFileError, match="no such file or folder"):
        pretrain(root / "domain", tmp_path / "run", config, progress=False)
