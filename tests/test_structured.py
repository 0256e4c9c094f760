"""Structured pruning and distillation (scratchlm/compress/structured.py, distill.py): a smaller
model that opens as any other, cut where the measured importance is lowest, and distillation
that brings it back towards the model it was cut from."""

import copy
import json

import pytest
import torch

from scratchlm.compress.distill import DistillConfig, distill, held_out_kl, kl_to_teacher
from scratchlm.compress.prune import calibration_tokens
from scratchlm.compress.structured import block_influence, prune_structure, width_to_keep
from scratchlm.errors import ConfigError
from scratchlm.interop import open_model
from scratchlm.model.folder import save_model_folder

from conftest import tiny_gpt


@pytest.fixture(scope="module")
def windows(corpus_tokenizer, embedded_sample):
    return calibration_tokens(corpus_tokenizer.encode_ordinary(embedded_sample), 96, 64)


@pytest.fixture(scope="module")
def teacher(corpus_tokenizer, windows):
    """A 4-block tiny model trained for 60 steps on the embedded sample: something to lose."""
    model = tiny_gpt(corpus_tokenizer, n_layer=4, block_size=64).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = windows[torch.randint(0, 80, (8,), generator=generator)]
        loss = model(batch[:, :-1], batch[:, 1:])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_kl_to_teacher_is_zero_for_the_same_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert float(kl_to_teacher(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_teacher(torch.zeros(2, 5, 11), logits)) > 0.01


def test_block_influence_finds_a_block_that_does_nothing(teacher, windows):
    model = copy.deepcopy(teacher)
    for layer in (model.blocks[2].attn.proj, model.blocks[2].mlp.down):
        torch.nn.init.zeros_(layer.weight)  # block 2 now adds nothing to the residual stream
    influence = block_influence(model, windows[:8])
    assert influence[2] == pytest.approx(0.0, abs=1e-9) and min(influence[:2] + influence[3:]) > 1e-4
    report = prune_structure(model, "depth", 0.25, windows[:8])
    assert report.removed_blocks == [2] and model.config.n_layer == 3 and len(model.blocks) == 3


def test_depth_pruning_without_the_idle_block_keeps_the_logits(teacher, windows):
    model = copy.deepcopy(teacher)
    for layer in (model.blocks[1].attn.proj, model.blocks[1].mlp.down):
        torch.nn.init.zeros_(layer.weight)
    before = model(windows[:2])[0]
    prune_structure(model, "depth", 0.25, windows[:8])
    assert torch.allclose(model(windows[:2])[0], before, atol=1e-5)


def test_width_pruning_keeps_the_strongest_channels_and_shrinks_every_mlp(teacher, windows):
    model = copy.deepcopy(teacher)
    hidden = model.config.hidden
    report = prune_structure(model, "width", 0.25, windows[:8])
    assert report.hidden_after == width_to_keep(hidden, 0.25) == model.config.mlp_hidden < hidden
    assert all(block.mlp.down.in_features == report.hidden_after == block.mlp.gate.out_features for block in model.blocks)
    assert report.params_after < report.params_before
    # Channels that never fire cost nothing when removed: zero some, cut exactly those.
    model = copy.deepcopy(teacher)
    dead = torch.arange(0, hidden, 4)  # a quarter of the channels
    for block in model.blocks:
        block.mlp.up.weight.data[dead] = 0
    before = model(windows[:2])[0]
    prune_structure(model, "width", len(dead) / hidden, windows[:8])
    if model.config.mlp_hidden == hidden - len(dead):
        assert torch.allclose(model(windows[:2])[0], before, atol=1e-5)


def test_width_to_keep_rounds_to_multiples_of_64():
    assert width_to_keep(1536, 0.25) == 1152
    assert width_to_keep(192, 0.25) == 128
    assert width_to_keep(100, 0.25) == 75


def test_a_pruned_and_distilled_model_beats_the_same_cut_without_distillation(teacher, windows):
    student = copy.deepcopy(teacher)
    prune_structure(student, "depth", 0.5, windows[:16])
    held_out = windows[80:]
    pruned = held_out_kl(student, teacher, held_out)
    result = distill(student, teacher, windows[:80], held_out, DistillConfig(steps=60, lr=2e-3), progress=False)
    distilled = held_out_kl(student, teacher, held_out)
    assert result.steps == 60
    assert distilled["val_kl"] < 0.7 * pruned["val_kl"]
    assert distilled["val_loss"] < pruned["val_loss"]  # and a better language model on text it did not train on


def test_the_prune_command_cuts_distils_and_writes_a_smaller_model_folder(cli, teacher, corpus_tokenizer, embedded_sample, tmp_path):
    save_model_folder(tmp_path / "teacher", teacher, corpus_tokenizer)
    (tmp_path / "text.txt").write_text(embedded_sample)
    result = cli("prune", tmp_path / "teacher", "--method", "depth", "--sparsity", "0.5", "--calibration", tmp_path / "text.txt",
                 "--sequences", "8", "--length", "64", "--distill", "20", "--distill-lr", "2e-3", "--out", tmp_path / "cut")
    assert result.status == 0, result.err
    report = json.loads((tmp_path / "cut" / "prune_report.json").read_text())
    assert len(report["removed_blocks"]) == 2 and report["distill_steps"] == 20
    assert report["held_out"]["distilled"]["val_kl"] < report["held_out"]["pruned"]["val_kl"]
    for name in ("metrics.jsonl", "loss.png", "report.md"):
        assert (tmp_path / "cut" / "distill" / name).is_file()
    model = open_model(tmp_path / "cut").model
    assert model.config.n_layer == 2 and len(model.blocks) == 2


@pytest.mark.parametrize("args, message", [
    (["--method", "wanda", "--distill", "10"], "--distill trains a structurally pruned model"),
    (["--method", "depth", "--pattern", "2:4"], "--pattern 2:4 is for magnitude and wanda"),
    (["--method", "depth", "--sparsity", "0.1"], "removes 0; it must remove at least one and keep one"),
])
def test_a_bad_structured_prune_is_one_line_and_writes_nothing(cli, model_folder, tmp_path, args, message):
    result = cli("prune", model_folder, *args, "--sequences", "2", "--length", "16", "--out", tmp_path / "cut")
    assert result.status == 2 and message in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "cut").exists()


def test_structured_settings_are_checked(teacher, windows):
    with pytest.raises(ConfigError, match="structured pruning method 'heads'"):
        prune_structure(copy.deepcopy(teacher), "heads", 0.25, windows[:2])
    with pytest.raises(ConfigError, match="needs calibration text"):
        prune_structure(copy.deepcopy(teacher), "width", 0.25, windows[:0])
