"""`scratchlm plan --gpus`: presets, the memory model against measured tensors, layouts, throughput."""

import pytest
import torch

from scratchlm.errors import ConfigError
from scratchlm.model import GPT, PRESETS, ModelConfig, count_params, flops_per_token
from scratchlm.train.config import Degrees
from scratchlm.train.memory import gpu_memory, layer_activation_bytes, layouts, llama_shaped, tokens_per_second


@pytest.mark.parametrize("name, published", [
    ("llama3-8b", 8_030_261_248), ("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824),
])
def test_llama3_presets_have_the_published_parameter_counts(name, published):
    assert count_params(PRESETS[name]) == published


def test_gpt2_124m_has_the_published_count_with_its_unpadded_vocabulary():
    # 124,439,808 is GPT-2's own 50257-token vocabulary; the preset pads it to 50304 (+47 x 768).
    assert count_params(PRESETS["gpt2-124m"].replace(vocab_size=50257)) == 124_439_808
    assert count_params(PRESETS["gpt2-124m"]) == 124_439_808 + 47 * 768


# Small models of three kinds: Llama (RMSNorm, rotary, SwiGLU, GQA), GPT-2 (LayerNorm, learned
# positions, GELU, biases) and one with QK-norm and squared ReLU.
SMALL = {
    "cpu-base": PRESETS["cpu-base"],
    "gpt2-small-width": PRESETS["gpt2-124m"].replace(n_layer=4, n_head=4, n_embd=256, vocab_size=8192, block_size=256),
    "llama-gqa": PRESETS["llama-40m"].replace(n_layer=4, vocab_size=8192, block_size=256),
    "qk-relu2": ModelConfig(vocab_size=4096, block_size=128, n_layer=3, n_head=4, n_embd=128, mlp="relu2", qk_norm=True,
                            positions="rope", norm="rmsnorm", bias=False),
}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _saved_activation_bytes(model: GPT, idx: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the storages autograd saves for backward, each counted once, without the model's
    own parameters and buffers (which linear layers and rotary embeddings also save)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(idx[:, :-1], idx[:, 1:])
    return sum(storages.values()), loss


@pytest.mark.parametrize("name", SMALL)
def test_one_gpu_float32_estimate_matches_a_measured_training_step(name):
    config, micro_batch = SMALL[name], 2
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, config.vocab_size, (micro_batch, config.block_size + 1))
    saved, loss = _saved_activation_bytes(model, idx)
    loss.backward()
    optimizer.step()
    estimate = gpu_memory(config, Degrees(), config.block_size, precision="fp32")

    params = list(model.parameters())  # a tied head is one parameter, as in the estimate
    assert estimate.params == _tensor_bytes(params)
    assert estimate.grads == _tensor_bytes(p.grad for p in params)
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    assert estimate.optimizer == _tensor_bytes(moments)
    # The tolerance; the block formula is exact for the Llama blocks, LayerNorm models differ by a few %.
    assert estimate.activations_per_seq * micro_batch == pytest.approx(saved, rel=0.20)


def test_sharding_divides_model_states_and_tensor_parallelism_divides_activations():
    config = PRESETS["llama3.2-1b"]
    one = gpu_memory(config, Degrees(), 4096)
    fsdp = gpu_memory(config, Degrees(dp_shard=8), 4096)
    tp = gpu_memory(config, Degrees(dp_shard=4, tp=2), 4096)
    params = count_params(config)
    assert one.optimizer == 8 * params and fsdp.optimizer == 8 * params / 8
    assert fsdp.activations_per_seq == one.activations_per_seq
    assert tp.activations_per_seq == pytest.approx(one.activations_per_seq / 2)
    # Checkpointing keeps each block's bf16 input and recomputes one block's activations at a time.
    layer, L = layer_activation_bytes(config, 2), config.n_layer
    assert one.activations_per_seq - one.checkpointed_per_seq == 4096 * (L * layer - L * 2 * config.n_embd - layer)
    ddp = gpu_memory(config, Degrees(dp_replicate=8), 4096)
    assert ddp.grads == 2 * one.grads  # DDP's buckets are a second copy


def test_llama3_8b_layouts_on_8_h100s():
    config = PRESETS["llama3-8b"]
    found = {(row.name, row.degrees.tp, row.degrees.pp): row for row in layouts(config, 8)}
    for row in found.values():
        assert row.degrees.world == 8
        assert config.n_layer % row.degrees.pp == 0 and config.kv_heads % row.degrees.tp == 0
    usable = 0.9 * 80e9 - 2e9
    assert found[("DDP", 1, 1)].memory.total(1, True) > usable  # 16+ bytes per parameter is 128 GB
    assert found[("FSDP", 1, 1)].memory.total(1, True) < usable
    with pytest.raises(ConfigError, match="pp=3"):
        gpu_memory(config, Degrees(pp=3))


def test_tokens_per_second_is_peak_times_mfu_over_flops_per_token():
    config = PRESETS["llama3-8b"]
    assert tokens_per_second(config, 8, 989e12, 0.4) == pytest.approx(8 * 989e12 * 0.4 / flops_per_token(config))
    with pytest.raises(ConfigError, match="MFU"):
        tokens_per_second(config, 8, 989e12, 40)


def test_params_size_gives_a_llama_shape_of_about_that_size():
    assert count_params(llama_shaped(8e9)) == count_params(PRESETS["llama3-8b"])
    for target in (1e8, 1e9, 3e9):
        assert count_params(llama_shaped(target)) == pytest.approx(target, rel=0.10)


def test_plan_gpus_command(capsys):
    from scratchlm.cli import main

    assert main(["plan", "--gpus", "8", "--gpu-memory", "80GB", "--model", "llama3.2-1b", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "DDP" in out and "FSDP+TP" in out and "suggested          DDP" in out and "assumed MFU 0.40" in out
    for argv, message in [
        (["--model", "llama3-8b", "--compute", "1e20"], "not both"),
        (["--model", "llama3-8b", "--gpu", "tpu"], "unknown GPU 'tpu'"),
        ([], "--model PRESET or --params SIZE"),
        (["--params", "lots"], "is not a count"),
    ]:
        assert main(["plan", "--gpus", "8", *argv]) != 0
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory", "80"], "give the memory of one GPU with its unit"),
    (["--gpu-memory", "0GB"], "give the memory of one GPU with its unit"),
    (["--gpus", "0"], "--gpus must be at least 1"),
    (["--seq-len", "0"], "--seq-len must be at least 1"),
])
def test_cluster_plan_refuses_impossible_hardware_in_one_line(cli, args, message):
    base = {"--gpus": "8", "--gpu-memory": "80GB"}
    base.update(dict(zip(args[::2], args[1::2])))
    result = cli("plan", "--model", "llama3-8b", *[part for item in base.items() for part in item])
    assert result.status == 2 and message in result.err and "Traceback" not in result.err
