"""LoRA: a fresh adapter changes nothing, training moves only A and B, merging keeps the logits,
the adapter file round-trips, and mistakes are named."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.finetune.config import DEFAULT_TARGETS, LoRAConfig
from scratchlm.finetune.lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from scratchlm.model import GPT, ModelConfig, get_preset

VOCAB = 97
LLAMA_TIED = get_preset("cpu-tiny").replace(vocab_size=VOCAB, block_size=32)  # tie_embeddings=True
GPT2_UNTIED = ModelConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=32, tie_embeddings=False)
ARCHITECTURES = {"llama-tied": LLAMA_TIED, "gpt2-bias-untied": GPT2_UNTIED}


def base_model(config: ModelConfig = LLAMA_TIED, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (4, 17), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train(model: nn.Module, steps: int = 8, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on one fixed batch, over the parameters that have requires_grad."""
    idx, targets = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def logits_of(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(batch(seed=2)[0])[0]


def trained_adapted_model(config: ModelConfig = LLAMA_TIED, lora: LoRAConfig | None = None) -> GPT:
    model = apply_lora(base_model(config), lora or LoRAConfig())
    train(model)
    return model


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fresh_adapter_leaves_logits_unchanged(name):
    model = base_model(ARCHITECTURES[name])
    before = logits_of(model)
    apply_lora(model, LoRAConfig())
    per_block = 7 if model.config.mlp == "swiglu" else 6  # q, k, v, proj, (gate,) up, down
    assert len(lora_layers(model)) == per_block * model.config.n_layer
    assert torch.equal(logits_of(model), before)


def test_only_adapters_are_trainable_and_counted():
    model = apply_lora(base_model(), LoRAConfig(rank=4))
    trainable, total = trainable_parameters(model)
    expected = sum(4 * (layer.base.in_features + layer.base.out_features) for _, layer in lora_layers(model))
    assert trainable == expected
    assert total == sum(p.numel() for p in base_model().parameters()) + expected
    assert {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}


def test_training_lowers_loss_and_changes_only_adapters():
    model = apply_lora(base_model(), LoRAConfig())
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {name: t.clone() for name, t in lora_state_dict(model).items()}
    losses = train(model)
    assert losses[-1] < losses[0] - 0.1
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), f"{name} changed"
    after = lora_state_dict(model)
    assert all(not torch.equal(after[name], before) for name, before in adapters.items())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_merged_model_gives_the_same_logits_as_the_adapted_one(name):
    config = ARCHITECTURES[name]
    model = trained_adapted_model(config)
    adapted = logits_of(model)
    assert not torch.allclose(adapted, logits_of(base_model(config)), atol=1e-3)  # the adapter did something
    merged = merge_lora(model)
    assert not lora_layers(merged) and all(type(m) is not LoRALinear for m in merged.modules())
    torch.testing.assert_close(logits_of(merged), adapted, atol=1e-5, rtol=0)
    # An ordinary model again: its weights load strictly into a fresh GPT of the same config.
    fresh = GPT(config).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(logits_of(fresh), adapted, atol=1e-5, rtol=0)


def test_tied_embedding_model_merges_correctly():
    model = trained_adapted_model(LLAMA_TIED)
    embedding = model.embed.weight.detach().clone()
    adapted = logits_of(model)
    merge_lora(model)
    assert model.head.weight is model.embed.weight  # still one matrix
    assert torch.equal(model.embed.weight, embedding)  # untouched: the head was not adapted
    torch.testing.assert_close(logits_of(model), adapted, atol=1e-5, rtol=0)


def test_adapting_a_tied_head_is_refused_and_leaves_the_model_alone():
    model = base_model(LLAMA_TIED)
    with pytest.raises(ConfigError, match="'head' shares its weight with 'embed'"):
        apply_lora(model, LoRAConfig(targets=("attn.q", "head")))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_untied_head_can_be_adapted_and_merged():
    model = trained_adapted_model(GPT2_UNTIED, LoRAConfig(targets=("head",)))
    assert [name for name, _ in lora_layers(model)] == ["head"]
    adapted = logits_of(model)
    torch.testing.assert_close(logits_of(merge_lora(model)), adapted, atol=1e-5, rtol=0)


def test_target_with_block_number_adapts_one_block():
    model = apply_lora(base_model(), LoRAConfig(targets=("0.attn.q",)))
    assert [name for name, _ in lora_layers(model)] == ["blocks.0.attn.q"]


def test_adapter_round_trip_gives_the_same_logits(tmp_path):
    config = LoRAConfig(rank=4, alpha=8, targets=("attn.q", "mlp.down"))
    model = trained_adapted_model(LLAMA_TIED, config)
    path = save_adapter(tmp_path / "adapter.safetensors", model, config)
    loaded = load_adapter(path, base_model(LLAMA_TIED))  # same base weights, no adapters yet
    assert torch.equal(logits_of(loaded), logits_of(model))
    # Into a model that already has the same adapters (e.g. to resume): overwritten, same logits.
    again = load_adapter(path, apply_lora(base_model(LLAMA_TIED), config))
    assert torch.equal(logits_of(again), logits_of(model))


def test_adapter_file_holds_only_lora_tensors_and_the_config(tmp_path):
    config = LoRAConfig(rank=2, alpha=4, dropout=0.1)
    model = apply_lora(base_model(), config)
    path = save_adapter(tmp_path / "a.safetensors", model, config)
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    per_block = {f"{t}.{ab}" for t in DEFAULT_TARGETS for ab in ("lora_a", "lora_b")}
    assert keys == {f"blocks.{i}.{k}" for i in range(LLAMA_TIED.n_layer) for k in per_block}
    assert LoRAConfig.from_dict(json.loads(metadata["scratchlm_lora"])) == config


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"targets": ()}, "targets"),
        ({"targets": ("attn.q", "")}, "targets"),
    ],
)
def test_bad_config_is_refused_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"LoRA config: {field}"):
        LoRAConfig(**changes)


def test_config_reads_command_line_strings():
    config = LoRAConfig.from_dict({"rank": "4", "alpha": "8", "targets": "attn.q, mlp.up"})
    assert config == LoRAConfig(rank=4, alpha=8.0, targets=("attn.q", "mlp.up"))
    with pytest.raises(ConfigError, match="unknown key 'rnak'; did you mean 'rank'"):
        LoRAConfig.from_dict({"rnak": 4})


def test_target_matching_nothing_names_the_linear_layers():
    with pytest.raises(ConfigError, match=r"'attn\.qk' matches no linear layer .*attn\.q, attn\.k, attn\.v, attn\.proj, mlp\.gate, mlp\.up, mlp\.down, head"):
        apply_lora(base_model(), LoRAConfig(targets=("attn.qk",)))


def test_default_targets_skip_the_gate_a_gelu_mlp_lacks_but_a_named_one_is_an_error():
    model = apply_lora(base_model(GPT2_UNTIED), LoRAConfig())
    assert {name.split(".", 2)[2] for name, _ in lora_layers(model)} == set(DEFAULT_TARGETS) - {"mlp.gate"}
    with pytest.raises(ConfigError, match=r"'mlp\.gate' matches no linear layer"):
        apply_lora(base_model(GPT2_UNTIED), LoRAConfig(targets=("attn.q", "mlp.gate")))


def test_applying_twice_is_refused():
    model = apply_lora(base_model(), LoRAConfig())
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig())


def test_adapter_for_another_model_shape_names_the_tensor(tmp_path):
    config = LoRAConfig()
    path = save_adapter(tmp_path / "a.safetensors", apply_lora(base_model(), config), config)
    wider = base_model(LLAMA_TIED.replace(n_embd=128))
    with pytest.raises(ConfigError, match=r"tensor 'blocks\.0\.attn\.q\.lora_a' has shape \[8, 64\], this model needs \[8, 128\]"):
        load_adapter(path, wider)
    assert not lora_layers(wider)  # nothing applied on failure
    deeper = base_model(LLAMA_TIED.replace(n_layer=3))
    with pytest.raises(ConfigError, match=r"tensor 'blocks\.2\.attn\.q\.lora_a' is missing"):
        load_adapter(path, deeper)


def test_adapter_with_other_targets_or_rank_is_refused(tmp_path):
    config = LoRAConfig(targets=("attn.q",))
    path = save_adapter(tmp_path / "a.safetensors", apply_lora(base_model(), config), config)
    with pytest.raises(ConfigError, match="rank 4 and alpha 16.0, the LoRA config says rank 8"):
        load_adapter(path, apply_lora(base_model(), LoRAConfig(rank=4, targets=("attn.q",))))
    with pytest.raises(ConfigError, match=r"layer 'blocks\.0\.mlp\.up' is named by none of the LoRA config's targets \(attn\.q\)"):
        load_adapter(path, apply_lora(base_model(), LoRAConfig(targets=("mlp.up",))))
    extra = save_adapter(tmp_path / "b.safetensors", apply_lora(base_model(LLAMA_TIED.replace(n_layer=3)), config), config)
    with pytest.raises(ConfigError, match=r"tensor 'blocks\.2\.attn\.q\.lora_a' has no LoRA layer to go to"):
        load_adapter(extra, base_model())


def test_file_that_is_not_an_adapter_is_refused(tmp_path):
    plain = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(InputFileError, match="no LoRA config in its metadata"):
        load_adapter(plain, base_model())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InputFileError, match="not a safetensors file"):
        load_adapter(junk, base_model())
    with pytest.raises(InputFileError, match="no such adapter file"):
        load_adapter(tmp_path / "missing.safetensors", base_model())


def test_saving_needs_adapters_made_with_the_given_config(tmp_path):
    with pytest.raises(ConfigError, match="no LoRA adapters to save"):
        save_adapter(tmp_path / "a.safetensors", base_model(), LoRAConfig())
    model = apply_lora(base_model(), LoRAConfig(rank=4))
    with pytest.raises(ConfigError, match="rank 4"):
        save_adapter(tmp_path / "a.safetensors", model, LoRAConfig(rank=8))
    assert not (tmp_path / "a.safetensors").exists()


def test_dropout_touches_only_the_adapter_path_and_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=8, dropout=0.5)
    nn.init.normal_(layer.lora_b)
    x = torch.randn(32, 16)
    expected = x @ (layer.base.weight + layer.delta_weight()).T + layer.base.bias
    torch.testing.assert_close(layer.eval()(x), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(layer.train()(x), expected, atol=1e-3)
