"""Pruning (scratchlm/compress/prune.py): exact sparsity and pattern, Wanda's scoring, the command."""

import json

import pytest
import torch

from scratchlm.compress.prune import calibration_tokens, prunable_layers, prune, prune_mask
from scratchlm.errors import ConfigError
from scratchlm.interop import open_model

from conftest import tiny_gpt


def test_2_4_keeps_exactly_two_of_every_four_weights_group_by_group():
    torch.manual_seed(0)
    keep = prune_mask(torch.rand(6, 16), "2:4", 0.5, per_row=True)
    assert bool((keep.reshape(6, 4, 4).sum(dim=-1) == 2).all())


def test_2_4_keeps_the_two_highest_scores_of_each_group():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 3.0, 1.0, 2.0, 0.0]])
    assert prune_mask(scores, "2:4", 0.5, per_row=True).tolist() == [[False, True, True, False, True, False, True, False]]


def test_unstructured_zeroes_exactly_the_asked_share_per_row_or_per_layer():
    scores = torch.ones(4, 10)  # all tied: the count must still be exact
    per_row = prune_mask(scores, "unstructured", 0.3, per_row=True)
    assert per_row.sum(dim=1).tolist() == [7, 7, 7, 7]
    per_layer = prune_mask(torch.arange(40.0).reshape(4, 10), "unstructured", 0.25, per_row=False)
    assert int((~per_layer).sum()) == 10 and not bool(per_layer[0].any())  # the 10 smallest are the first row


def test_wanda_keeps_small_weights_on_loud_inputs_that_magnitude_drops(tokenizer):
    model = tiny_gpt(tokenizer)
    layer = model.blocks[0].attn.q
    layer.weight.data = torch.ones_like(layer.weight)
    layer.weight.data[:, 0] = 0.1  # small weights on input feature 0 ...
    x = torch.ones(3, layer.in_features)
    x[:, 0] = 1000.0  # ... which carries by far the largest activations
    for method, kept in (("magnitude", False), ("wanda", True)):
        scores = layer.weight.abs() * (x.norm(dim=0) if method == "wanda" else 1)
        keep = prune_mask(scores, "unstructured", 0.5, per_row=method == "wanda")
        assert bool(keep[:, 0].all()) is kept, method


@pytest.mark.parametrize("method, pattern", [("magnitude", "unstructured"), ("wanda", "unstructured"), ("wanda", "2:4")])
def test_every_block_layer_reaches_the_asked_sparsity_and_the_rest_is_untouched(tokenizer, method, pattern):
    model = tiny_gpt(tokenizer)
    before = {name: p.clone() for name, p in model.named_parameters()}
    calibration = calibration_tokens(list(range(1, 200)) * 4, 4, 32)
    report = prune(model, method, 0.6, pattern, calibration)
    asked = 0.5 if pattern == "2:4" else 0.6
    layers = prunable_layers(model)
    assert sorted(report.layers) == sorted(name for name, _ in layers) and len(layers) == 2 * 7  # q k v proj gate up down
    for name, linear in layers:
        assert report.layers[name] == pytest.approx(asked, abs=1 / linear.in_features)
        kept = linear.weight != 0
        assert torch.equal(linear.weight[kept], before[f"{name}.weight"][kept])  # no weight is updated
    assert torch.equal(model.embed.weight, before["embed.weight"])


def test_wanda_needs_calibration_and_settings_are_checked(tokenizer):
    with pytest.raises(ConfigError, match="wanda pruning needs calibration text"):
        prune(tiny_gpt(tokenizer), "wanda", 0.5)
    with pytest.raises(ConfigError, match="sparsity must be between 0 and 1"):
        prune(tiny_gpt(tokenizer), "magnitude", 1.0)
    with pytest.raises(ConfigError, match="pruning method 'optimal'"):
        prune(tiny_gpt(tokenizer), "optimal", 0.5)
    with pytest.raises(ConfigError, match="fewer than one window of 64"):
        calibration_tokens([1, 2, 3], 4, 64)


def test_the_prune_command_writes_a_model_folder_that_opens(cli, model_folder, tmp_path):
    result = cli("prune", model_folder, "--out", tmp_path / "pruned", "--method", "wanda", "--pattern", "2:4",
                 "--sequences", "4", "--length", "32")
    assert result.status == 0, result.err
    assert "50.00% of the blocks' linear weights are zero" in result.out
    report = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert report["method"] == "wanda" and report["pattern"] == "2:4" and report["sparsity"] == pytest.approx(0.5)
    model = open_model(tmp_path / "pruned", kind="language-model").model
    assert float((model.blocks[0].mlp.down.weight == 0).float().mean()) == pytest.approx(0.5)


def test_a_bad_prune_is_one_line_and_writes_nothing(cli, model_folder, tmp_path):
    result = cli("prune", model_folder, "--out", tmp_path / "pruned", "--sparsity", "1.5", "--method", "magnitude")
    assert result.status == 2 and result.err.startswith("scratchlm: error: sparsity must be between 0 and 1")
    assert not (tmp_path / "pruned").exists()
