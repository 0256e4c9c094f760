"""The shared fine-tuning loop (scratchlm/finetune/trainer.py): what trains, the schedule,
accumulation, the stop on a non-finite loss, held-out splits and run folders."""

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from scratchlm.errors import ConfigError, TrainingError
from scratchlm.finetune.config import FinetuneConfig
from scratchlm.finetune.lora import lora_layers
from scratchlm.finetune.trainer import (
    Batches,
    default_lr,
    finetune_loop,
    load_splits,
    prepare_out,
    prepare_trainable,
    run_folder,
    shuffled_groups,
    split_off,
    total_steps,
    with_default_lr,
)
from scratchlm.model import GPT, get_preset
from scratchlm.train.loop import StepOutput

VOCAB = 64


def tiny_gpt(seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_preset("cpu-tiny").replace(vocab_size=VOCAB, block_size=32, **changes))


def copy_task(n: int = 32, length: int = 12) -> torch.Tensor:
    """Rows that repeat a short random pattern: a language model learns them in a few steps."""
    g = torch.Generator().manual_seed(1)
    pattern = torch.randint(0, VOCAB, (n, 3), generator=g)
    return pattern.repeat(1, length // 3 + 1)[:, : length + 1]


def lm_batches(rows: torch.Tensor, size: int) -> Batches:
    return Batches(lambda g: (rows[i] for i in shuffled_groups(len(rows), size, g)), math.ceil(len(rows) / size))


def lm_step(model: torch.nn.Module, batch: torch.Tensor) -> StepOutput:
    _, loss = model(batch[:, :-1], batch[:, 1:])
    return StepOutput(loss, {"targets": float(batch[:, 1:].numel())}, tokens=batch[:, 1:].numel())


def mean_loss(model: GPT, rows: torch.Tensor) -> float:
    with torch.no_grad():
        return model(rows[:, :-1], rows[:, 1:])[1].item()


def test_a_few_steps_lower_the_loss_and_log_every_step():
    model, rows = tiny_gpt(), copy_task()
    before = mean_loss(model, rows)
    logged = []
    config = FinetuneConfig(max_steps=20, batch_size=8, lr=1e-2)
    result = finetune_loop(model, lm_batches(rows, 8), lm_step, config, on_step=lambda n, row: logged.append((n, row)))
    assert result.steps == 20 and [n for n, _ in logged] == list(range(1, 21))
    assert {"loss", "lr", "grad_norm", "targets", "tokens_per_s", "tokens"} <= set(logged[0][1])
    assert logged[0][1]["targets"] == 8 * 12 and logged[-1][1]["tokens"] == 20 * 8 * 12
    assert mean_loss(model, rows) < before * 0.7
    assert not model.training  # left in eval mode for evaluation


def test_epochs_count_optimizer_steps_over_accumulated_batches():
    config = FinetuneConfig(epochs=3, grad_accum=2)
    assert total_steps(config, batches_per_epoch=5) == 8  # 15 batches, 2 a step, the last step partial
    assert total_steps(config, batches_per_epoch=5, world=2) == 4  # torchrun: 2 ranks x 2 batches a step
    assert total_steps(FinetuneConfig(max_steps=4), 100) == 4
    with pytest.raises(ConfigError, match="no batch"):
        total_steps(config, 0)


def gradients_at_first_step(model: GPT, batches: Batches, config: FinetuneConfig) -> dict[str, torch.Tensor]:
    """The gradients the optimizer sees at its first step (after accumulation and clipping)."""
    seen: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}

    def record(optimizer, _args, _kwargs):
        if not seen:
            seen.update({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None})

    handle = register_optimizer_step_pre_hook(record)
    try:
        finetune_loop(model, batches, lm_step, config)
    finally:
        handle.remove()
    return seen


def test_accumulating_two_half_batches_gives_the_same_gradient_as_one_whole_batch():
    rows = copy_task(n=8)
    in_order = lambda size: Batches(lambda g: (rows[i : i + size] for i in range(0, len(rows), size)), len(rows) // size)  # noqa: E731
    whole = gradients_at_first_step(tiny_gpt(), in_order(8), FinetuneConfig(max_steps=1, batch_size=8, lr=1e-2, warmup_fraction=0.0))
    halves = gradients_at_first_step(tiny_gpt(), in_order(4), FinetuneConfig(max_steps=1, grad_accum=2, lr=1e-2, warmup_fraction=0.0))
    assert whole.keys() == halves.keys() and whole
    # The two sum the same per-token terms in another order, so they differ by float32 rounding
    # of the tensor's largest terms, not of each element: a near-zero element can lose all its
    # relative precision. (Comparing weights after the step would amplify exactly those
    # elements: Adam's first update is lr * g / (|g| + eps), about lr * sign(g).)
    for name, grad in whole.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(halves[name], grad, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=name)


def test_freeze_keeps_the_lower_blocks_and_embeddings_bit_identical():
    model, rows = tiny_gpt(), copy_task()
    config = FinetuneConfig(freeze="all-but-last:1", max_steps=3, lr=1e-2)
    assert prepare_trainable(model, config) is None
    before = copy.deepcopy(model.state_dict())
    finetune_loop(model, lm_batches(rows, 8), lm_step, config)
    after = model.state_dict()
    frozen = [n for n in before if n.startswith(("embed.", "blocks.0.")) or (n.startswith("head.") and model.config.tie_embeddings)]
    trained = [n for n in before if n.startswith("blocks.1.") and n.endswith("weight")]
    assert frozen and trained
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trained)


def test_lora_trains_only_the_adapters():
    model, rows = tiny_gpt(), copy_task()
    config = FinetuneConfig(lora=True, lora_rank=2, lora_targets="attn.q", max_steps=3, lr=1e-2)
    lora = prepare_trainable(model, config)
    assert lora is not None and lora.rank == 2 and len(lora_layers(model)) == model.config.n_layer
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    finetune_loop(model, lm_batches(rows, 8), lm_step, config)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if n.endswith("lora_b"))


def test_a_non_finite_loss_stops_the_run_with_advice():
    model = tiny_gpt()

    def step(m, batch) -> StepOutput:
        return StepOutput(m(batch[:, :-1], batch[:, 1:])[1] * float("nan"))

    with pytest.raises(TrainingError, match="not finite for 2 steps in a row .step 2.; lower the learning rate"):
        finetune_loop(model, lm_batches(copy_task(), 8), step, FinetuneConfig(max_steps=2))


def test_nothing_to_train_is_a_config_error():
    model = tiny_gpt()
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        finetune_loop(model, lm_batches(copy_task(), 8), lm_step, FinetuneConfig(max_steps=1))


@pytest.mark.parametrize("changes, message", [
    ({"lr": 0.0}, "lr must be a positive number"),
    ({"grad_accum": 0}, "grad accum must be at least 1"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"freeze": "top"}, "freeze must be none, embeddings or all-but-last:N"),
    ({"lora": True, "freeze": "embeddings"}, "not both"),
    ({"lora": True, "lora_rank": 0}, "rank must be a positive integer"),
])
def test_bad_settings_are_named_before_any_model_loads(changes, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**changes)


def test_split_off_is_seeded_disjoint_and_complete():
    items = list(range(50))
    train, held = split_off(items, 0.2, seed=3)
    assert (train, held) == split_off(items, 0.2, seed=3)
    assert len(held) == 10 and sorted(train + held) == items and train == sorted(train)
    assert held != split_off(items, 0.2, seed=4)[1]
    with pytest.raises(ConfigError, match="leaves no held-out"):
        split_off([1, 2], 0.1, seed=0)


def test_prepare_out_refuses_a_used_folder_unless_forced(tmp_path):
    out = tmp_path / "run"
    prepare_out(out, force=False)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="not empty"):
        prepare_out(out, force=False)
    prepare_out(out, force=True)
    assert not (out / "metrics.jsonl").exists()


PEAK_AFTER_RESET = """
import torch
from scratchlm.devices import peak_memory_mb, reset_peak_memory
cpu = torch.device("cpu")
big = torch.ones(64 * 2**20)  # 256 MB, like a model loaded and then released
loaded = peak_memory_mb(cpu)
del big
reset_peak_memory(cpu)
print(loaded, peak_memory_mb(cpu))
"""


def test_peak_memory_counts_from_the_reset_not_from_loading():
    # In a fresh interpreter: in this one, earlier tests leave memory in allocator caches that
    # `del` does not hand back to the system, so the resident set need not drop.
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("resetting the peak resident set needs Linux's /proc/self/clear_refs")
    done = subprocess.run([sys.executable, "-c", PEAK_AFTER_RESET], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded, after = map(float, done.stdout.split())
    assert 10 < after < loaded - 200


def test_a_failed_run_removes_the_folder_it_created_but_not_one_it_was_given(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        with run_folder(new, force=False):
            (new / "metrics.jsonl").write_text('{"step": 0}\n')
            raise KeyboardInterrupt
    assert not new.exists()  # the same command can run again
    given = tmp_path / "given"
    given.mkdir()
    (given / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with run_folder(given, force=True):
            raise RuntimeError("training failed")
    assert (given / "notes.txt").read_text() == "mine"


def test_a_split_that_leaves_nothing_names_the_file_and_its_rejected_lines(tmp_path):
    from scratchlm.finetune.sft_data import load_instructions

    data = tmp_path / "few.jsonl"
    data.write_text('{"prompt": "Hi", "completion": "Hello."}\nnot json\n{"prompt": "Bye", "completion": ""}\n')
    with pytest.raises(ConfigError) as error:
        load_splits(load_instructions, data, None, 0.1, seed=0)
    message = str(error.value)
    assert f"{data}: 1 conversations kept, 2 malformed lines ({data}:2: not JSON" in message
    assert "1 usable record leaves no held-out" in message


def test_default_learning_rate_is_a_tenth_for_models_of_50m_parameters_or_more():
    assert default_lr(5e-4, 2e-3, use_lora=False, params=400_000) == 5e-4
    assert default_lr(5e-4, 2e-3, use_lora=True, params=400_000) == 2e-3
    assert default_lr(5e-4, 2e-3, use_lora=True, params=135_000_000) == pytest.approx(2e-4)
    model = tiny_gpt()
    assert with_default_lr(FinetuneConfig(lr=None, lora=True), 5e-4, 2e-3, model).lr == 2e-3
    assert with_default_lr(FinetuneConfig(lr=1e-5), 5e-4, 2e-3, model).lr == 1e-5  # the user's choice stands


def test_auto_lora_targets_adapt_an_untied_head_and_are_written_back():
    untied = tiny_gpt(tie_embeddings=False)
    config = FinetuneConfig(lora=True)
    lora = prepare_trainable(untied, config)
    assert "head" in lora.targets and config.lora_targets == ",".join(lora.targets)
    tied = tiny_gpt(tie_embeddings=True)
    assert "head" not in prepare_trainable(tied, FinetuneConfig(lora=True)).targets


def test_auto_lora_targets_leave_out_the_gate_a_gelu_mlp_lacks():
    config = FinetuneConfig(lora=True)
    lora = prepare_trainable(tiny_gpt(mlp="gelu", tie_embeddings=False), config)
    assert lora.targets == ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.up", "mlp.down", "head")
