import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.finetune.config import SFTConfig
from scratchlm.finetune.lora import load_adapter, merge_lora
from scratchlm.finetune.sft_data import encode_conversations
from scratchlm.finetune.sft_train import answer_loss, finetune_sft, sft_batches, sft_step
from scratchlm.finetune.trainer import finetune_loop, prepare_trainable, save_finetuned
from scratchlm.interop import open_model
from scratchlm.model.folder import save_model_folder

from conftest import tiny_gpt, tiny_tokenizer

QA = [
    ("What does len do?", "It returns the number of items."),
    ("What does sorted do?", "It returns a new sorted list."),
    ("What does abs do?", "It returns the absolute value."),
    ("What does print do?", "It writes text to the screen."),
    ("What does open do?", "It opens a file and returns it."),
    ("What does range do?", "It gives a sequence of numbers."),
]
TEXT = " ".join(f"{q} {a}" for q, a in QA) * 20


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(TEXT)


def conversations(repeat: int = 4) -> list[list[dict]]:
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA] * repeat


def write_jsonl(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps({"messages": r}) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train(model, tokenizer, config: SFTConfig):
    """`config`'s freezing or LoRA applied to `model`, then trained; returns the LoRA config."""
    examples, _ = encode_conversations(tokenizer, conversations(), 128)
    adapters = prepare_trainable(model, config)
    batches = sft_batches(examples, config, 128, 0, torch.device("cpu"))
    finetune_loop(model, batches, sft_step, config)
    return adapters


# ---- training --------------------------------------------------------------------------
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_few_steps_lower_the_answer_loss(tokenizer, packing, lora):
    model = tiny_gpt(tokenizer)
    examples, _ = encode_conversations(tokenizer, conversations(1), 128)
    before = answer_loss(model, examples, 0)["loss"]
    # LoRA trains far fewer numbers (on a random model, with the tied head left alone): it moves less.
    config = SFTConfig(lora=lora, lr=3e-2 if lora else 1e-2, max_steps=8, batch_size=4, packing=packing, warmup_fraction=0.0)
    train(model, tokenizer, config)
    after = answer_loss(model, examples, 0)["loss"]
    assert after < before - (0.15 if lora else 1.0)


def test_packed_and_padded_batches_give_the_same_loss(tokenizer):
    model = tiny_gpt(tokenizer)
    examples, _ = encode_conversations(tokenizer, conversations(1), 128)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for packing in (True, False):
        config = SFTConfig(batch_size=len(examples), packing=packing)
        (batch,) = list(sft_batches(examples, config, 128, 0, torch.device("cpu")).epoch(generator))
        with torch.no_grad():
            losses.append(float(sft_step(model, batch).loss))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert losses[0] == pytest.approx(answer_loss(model, examples, 0)["loss"], abs=1e-5)


def test_frozen_parameters_stay_bit_identical_under_all_but_last_1(tokenizer):
    model = tiny_gpt(tokenizer)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()
              if not name.startswith(("blocks.1.", "norm."))}
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith("blocks.1.")}
    train(model, tokenizer, SFTConfig(freeze="all-but-last:1", lr=1e-2, max_steps=3, batch_size=4))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in frozen.items())
    assert any(not torch.equal(params[name], value) for name, value in trained.items())


def test_lora_merged_model_gives_the_unmerged_logits(tokenizer):
    model = tiny_gpt(tokenizer)
    torch.manual_seed(1)
    train(model, tokenizer, SFTConfig(lora=True, lr=1e-2, max_steps=5, batch_size=4))
    idx = torch.randint(0, tokenizer.vocab_size, (2, 20))
    with torch.no_grad():
        unmerged, _ = model(idx)
        merge_lora(model)
        merged, _ = model(idx)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_config_rejects_bad_settings_and_a_max_length_over_the_context():
    with pytest.raises(ConfigError, match="truncate"):
        SFTConfig(truncate="right")
    with pytest.raises(ConfigError, match="val fraction"):
        SFTConfig(val_fraction=1.0)
    assert SFTConfig().context(1024) == 512 and SFTConfig().context(128) == 128
    with pytest.raises(ConfigError, match="longer than the model's context"):
        SFTConfig(max_length=256).context(128)


# ---- the whole run ---------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_saved_model_folder_gives_the_trained_models_logits(tokenizer, tmp_path, lora):
    model = tiny_gpt(tokenizer)
    config = SFTConfig(lora=lora, lr=1e-2, max_steps=5, batch_size=4)
    adapters = train(model, tokenizer, config)
    idx = torch.randint(0, tokenizer.vocab_size, (2, 16))
    with torch.no_grad():
        trained, _ = model(idx)  # with LoRA: the unmerged adapters
    save_finetuned(tmp_path, model, tokenizer, adapters)
    loaded = open_model(tmp_path / "model", kind="language-model").model
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], trained, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(trained, tiny_gpt(tokenizer)(idx)[0], atol=1e-3)
        if lora:
            from_adapter = load_adapter(tmp_path / "adapter.safetensors", tiny_gpt(tokenizer))
            torch.testing.assert_close(from_adapter(idx)[0], trained, atol=1e-5, rtol=1e-5)


def test_finetune_sft_splits_off_held_out_data_and_answers_its_prompts(tokenizer, tmp_path):
    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", conversations())
    config = SFTConfig(lr=1e-2, max_steps=8, batch_size=4, packing=False, val_fraction=0.25, samples=2, sample_tokens=8)
    result = finetune_sft(base, data, tmp_path / "run", config, progress=False)
    assert (result.data["train_conversations"], result.data["eval_conversations"]) == (18, 6)
    assert result.after["loss"] < result.before["loss"]
    assert result.after["perplexity"] == pytest.approx(math.exp(result.after["loss"]))
    assert [s["reference"] for s in result.samples] == [result.samples[0]["reference"], result.samples[1]["reference"]]
    assert len(result.samples) == 2 and all(isinstance(s["after"], str) for s in result.samples)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchlm.cli", "finetune", "sft", *args],
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow  # a fresh interpreter imports torch: seconds
def test_cli_sft_end_to_end_writes_the_run_folder_and_reports_bad_lines(tokenizer, tmp_path):
    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", conversations(), ("not json", '{"messages": [{"role": "user", "content": "hi"}]}'))
    held = write_jsonl(tmp_path / "eval.jsonl", conversations(1))
    out = tmp_path / "run"
    done = run_cli(str(base), "--data", str(data), "--eval", str(held), "--out", str(out), "--lora", "--lr", "1e-2",
                   "--max-steps", "5", "--batch-size", "4", "--samples", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    for name in ("model/model.safetensors", "metrics.jsonl", "loss.png", "report.md", "results.json", "adapter.safetensors"):
        assert (out / name).is_file(), name
    assert f"{data}:25: not JSON" in done.stdout and f"{data}:26:" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["rejected"] == 2 and results["steps"] == 5
    assert results["after"]["loss"] < results["before"]["loss"]
    report = (out / "report.md").read_text()
    assert "train.jsonl:25: not JSON" in report and "**reference:**" in report
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 5] and sum("loss" in r for r in rows) == 5


def test_cli_sft_bad_input_is_one_line_and_a_nonzero_exit(tokenizer, tmp_path, cli):
    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", conversations(1))
    missing = cli("finetune", "sft", str(base), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "a"))
    too_long = cli("finetune", "sft", str(base), "--data", str(data), "--out", str(tmp_path / "b"), "--max-length", "4096")
    garbage = cli("finetune", "sft", str(base), "--data", str(write_jsonl(tmp_path / "bad.jsonl", [], ("{", "[1]"))), "--out", str(tmp_path / "c"))
    for done, message in ((missing, "nope.jsonl"), (too_long, "--max-length 4096"), (garbage, "bad.jsonl")):
        assert done.status == 2 and done.err.count("\n") == 1 and message in done.err, done.err
    assert not any((tmp_path / name).exists() for name in "abc")  # a run that fails before training writes nothing
    with pytest.raises(InputFileError):
        finetune_sft(base, tmp_path / "nope.jsonl", tmp_path / "d", SFTConfig(), progress=False)


def training_rows(run: Path) -> dict[int, dict]:
    """Each logged step's numbers that do not depend on the clock."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in rows}


@pytest.mark.slow
def test_a_sigkilled_sft_run_resumes_to_the_same_losses_and_bit_identical_weights(tokenizer, tmp_path):
    from safetensors.torch import load_file

    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", conversations())
    # LoRA dropout draws random numbers every step: resuming must restore the RNG too.
    args = [str(base), "--data", str(data), "--lora", "--lora-dropout", "0.1", "--lr", "1e-2", "--max-steps", "8",
            "--batch-size", "4", "--samples", "0", "--checkpoint-every", "3", "--quiet"]
    assert run_cli(*args, "--out", str(tmp_path / "whole")).returncode == 0
    killed = subprocess.run([sys.executable, str(Path(__file__).with_name("killed_at_step.py")), "5", "finetune", "sft",
                             *args, "--out", str(tmp_path / "killed")], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "killed" / "model").exists() and (tmp_path / "killed" / "checkpoints" / "step_000003").is_dir()
    resumed = run_cli(*args, "--out", str(tmp_path / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert training_rows(tmp_path / "killed") == training_rows(tmp_path / "whole")
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    again = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)


def test_resuming_a_run_without_checkpoints_is_one_line(tokenizer, tmp_path, cli):
    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", conversations(1))
    (tmp_path / "run").mkdir()
    done = cli("finetune", "sft", base, "--data", data, "--out", tmp_path / "run", "--resume")
    assert done.status == 2 and done.err.count("\n") == 1 and "nothing to resume" in done.err, done.err
    assert "loading" not in done.out  # refused before the model is loaded
