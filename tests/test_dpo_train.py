import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchlm.cli import main
from scratchlm.errors import ConfigError
from scratchlm.finetune.config import DPOConfig
from scratchlm.finetune.dpo import PreferenceExample
from scratchlm.finetune.dpo_train import (
    ReferenceLogprobs,
    encode_pairs,
    evaluate_preferences,
    finetune_dpo,
    score_pairs,
    train_dpo,
)
from scratchlm.finetune.lora import lora_layers
from scratchlm.finetune.trainer import prepare_trainable
from scratchlm.model.folder import load_model_folder, save_model_folder
from scratchlm.serve.web import FeedbackRequest, PreferenceRecord
from scratchlm.tokenizer import train_bpe

from conftest import tiny_gpt, tiny_tokenizer

TEXT = (
    "The cat sat on the mat. Which animal sat on the mat? The cat did. A dog ran in the park.\n"
    "What colour is the sky? The sky is blue. Grass is green and the sun is bright.\n"
) * 20
PAIRS = [
    ("Which animal sat on the mat?", "The cat did.", "A dog ran in the park."),
    ("What colour is the sky?", "The sky is blue.", "Grass is green."),
    ("Where did the dog run?", "In the park.", "On the mat."),
    ("Is the sun bright?", "The sun is bright.", "The sky is green."),
    ("What colour is grass?", "Grass is green.", "The cat sat."),
    ("Which animal ran?", "A dog ran.", "The sun is blue."),
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(TEXT)


def examples() -> list[PreferenceExample]:
    return [PreferenceExample(({"role": "user", "content": p},), c, r) for p, c, r in PAIRS]


def write_pairs(path: Path, rows=PAIRS, extra: str = "") -> Path:
    lines = [json.dumps({"prompt": p, "chosen": c, "rejected": r}) for p, c, r in rows]
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def cli(*args, in_process: bool = True, capsys=None) -> subprocess.CompletedProcess:
    """`scratchlm finetune dpo ARGS --quiet`: in this process (fast: torch is imported once) or,
    to test the real command line once, as a subprocess."""
    argv = ["finetune", "dpo", *map(str, args), "--quiet"]
    if not in_process:
        return subprocess.run([sys.executable, "-m", "scratchlm.cli", *argv], capture_output=True, text=True, timeout=300,
                              check=False)
    code = main(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


# ---- training ------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True])
def test_a_few_steps_lower_the_loss_and_raise_reward_accuracy_on_the_training_pairs(tokenizer, lora):
    model = tiny_gpt(tokenizer)
    config = DPOConfig(lora=lora, lr=1e-2 if lora else 3e-3, max_steps=12, batch_size=6, warmup_fraction=0.0)
    data = encode_pairs(tokenizer, examples(), 128, "drop", "pairs")
    reference = ReferenceLogprobs(*score_pairs(model, data.pairs, 6, pad_id=0))
    prepare_trainable(model, config)
    before, _ = evaluate_preferences(model, data, reference, config, pad_id=0)
    assert before["loss"] == pytest.approx(math.log(2)) and before["reward_accuracy"] == 0.0
    assert train_dpo(model, data, config, 0, reference).steps == 12
    after, margins = evaluate_preferences(model, data, reference, config, pad_id=0)
    assert after["loss"] < math.log(2) - 0.1
    assert after["reward_accuracy"] == 1.0 and margins.min().item() > 0
    assert after["margin"] > 0 and after["chosen_reward"] > after["rejected_reward"]


def test_precomputed_and_live_reference_give_the_same_losses(tokenizer):
    data = encode_pairs(tokenizer, examples(), 128, "drop", "pairs")
    config = DPOConfig(lr=3e-3, max_steps=5, batch_size=3, seed=1)
    losses = {}
    for name in ("precomputed", "live"):
        model = tiny_gpt(tokenizer)
        reference = ReferenceLogprobs(*score_pairs(model, data.pairs, 3, pad_id=0))
        if name == "live":
            reference = tiny_gpt(tokenizer).requires_grad_(False)  # the same weights, kept as a model
        losses[name] = []
        train_dpo(model, data, config, 0, reference, on_step=lambda n, row, name=name: losses[name].append(row["loss"]))
    assert losses["precomputed"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses["live"] == pytest.approx(losses["precomputed"], abs=1e-4)


def test_frozen_parameters_stay_bit_identical(tokenizer, tmp_path):
    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    data = write_pairs(tmp_path / "p.jsonl", PAIRS * 2)
    result = finetune_dpo(base, data, tmp_path / "run", DPOConfig(freeze="all-but-last:1", max_steps=3, lr=1e-2),
                          progress=False)
    start, _ = load_model_folder(base)
    tuned, _ = load_model_folder(tmp_path / "run" / "model")
    assert torch.equal(tuned.embed.weight, start.embed.weight)
    for name, p in start.blocks[0].state_dict().items():
        assert torch.equal(tuned.blocks[0].state_dict()[name], p), name
    assert not torch.equal(tuned.blocks[1].mlp.up.weight, start.blocks[1].mlp.up.weight)
    assert 0 < result.trainable_params < result.total_params


def test_bad_settings_fail_before_any_model_loads(tokenizer, tmp_path):
    data = write_pairs(tmp_path / "p.jsonl")
    for settings in ({"beta": 0.0}, {"label_smoothing": 0.5}, {"truncate": "right"}, {"max_length": 1}):
        with pytest.raises(ConfigError):
            DPOConfig(**settings)
    with pytest.raises(ConfigError, match="longer than the model's context"):
        finetune_dpo(save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer), data, tmp_path / "run",
                     DPOConfig(max_length=4096), progress=False)


def test_a_reference_with_another_tokenizer_is_refused(tokenizer, tmp_path):
    other = train_bpe([TEXT.upper()], vocab_size=300, workers=1, min_frequency=1)
    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    ref = save_model_folder(tmp_path / "ref", tiny_gpt(other), other)
    with pytest.raises(ConfigError, match="tokenizer differs"):
        finetune_dpo(base, write_pairs(tmp_path / "p.jsonl"), tmp_path / "run", DPOConfig(reference=str(ref)), progress=False)


# ---- the command -----------------------------------------------------------------------------
@pytest.mark.slow  # end to end: load, score the reference, train, write the run folder
@pytest.mark.parametrize("lora", [False, True])
def test_cli_writes_the_run_folder(tokenizer, tmp_path, capsys, lora):
    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    data = write_pairs(tmp_path / "train.jsonl", PAIRS * 3, extra='{"prompt": "broken", "chosen": \n')
    held = write_pairs(tmp_path / "eval.jsonl", PAIRS[:3])
    out = tmp_path / "run"
    done = cli(base, "--data", data, "--eval", held, "--out", out, "--max-steps", "4", "--lr", "3e-3",
               *(["--lora"] if lora else []), in_process=lora, capsys=capsys)
    assert done.returncode == 0, done.stderr
    assert "train.jsonl:19: not JSON" in done.stdout
    for name in ("model/model.safetensors", "model/config.json", "model/tokenizer.json", "metrics.jsonl", "loss.png",
                 "report.md", "results.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter.safetensors").is_file() == lora
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and results["data"]["train"] == 18 and results["data"]["rejected"] == 1
    assert results["before"]["loss"] == pytest.approx(math.log(2)) and results["before"]["reward_accuracy"] == 0.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 4]
    assert {"loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward"} <= rows[1].keys()
    model, _ = load_model_folder(out / "model")
    assert not lora_layers(model)  # merged: an ordinary model folder


def test_cli_bad_input_is_one_line_and_non_zero(tokenizer, tmp_path, capsys):
    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    missing = cli(base, "--data", tmp_path / "absent.jsonl", "--out", tmp_path / "run", capsys=capsys)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "cannot read" in missing.stderr
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Q", "chosen": "same", "rejected": "same"}) + "\n")
    done = cli(base, "--data", same, "--out", tmp_path / "run", capsys=capsys)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "same.jsonl:1: chosen and rejected are the same" in done.stderr
    bad_beta = cli(base, "--data", same, "--out", tmp_path / "run", "--beta", "-1", capsys=capsys)
    assert bad_beta.returncode == 2 and "beta" in bad_beta.stderr and bad_beta.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing written before the data and settings were checked


def test_web_chat_feedback_trains_end_to_end(tokenizer, tmp_path, capsys):
    def record(reply_id, prompt, completion, rating=None, edited=None):
        request = FeedbackRequest.model_validate(
            {"reply_id": reply_id, "model": "tiny", "messages": [{"role": "user", "content": prompt}],
             "completion": completion, "rating": rating, "edited": edited})
        return PreferenceRecord.from_feedback(request, now=0).to_json_line()

    lines = [record(f"r{n}", p, r, rating="down") + record(f"r{n}", p, r, rating="down", edited=c)
             for n, (p, c, r) in enumerate(PAIRS)]
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(lines) + record("up", "Hi", "Hello.", rating="up"), encoding="utf-8")
    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    out = tmp_path / "run"
    done = cli(base, "--data", feedback, "--out", out, "--val-fraction", "0.34", "--max-steps", "3", capsys=capsys)
    assert done.returncode == 0, done.stderr
    assert "6 pairs kept" in done.stdout and "1 feedback record without an edited answer" in done.stdout
    assert "6 feedback records replaced by a later one" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["train"] == 4 and results["data"]["eval"] == 2
    assert (out / "model" / "model.safetensors").is_file()
