"""SFT and DPO on an imported model: SmolLM2-135M-Instruct from its GGUF file, with its own chat
template, tied head and 49152-token vocabulary. A few LoRA steps on a handful of examples, so
the whole file stays within seconds of loading the model."""

import json
import math

import pytest

from scratchlm.finetune.config import DPOConfig, SFTConfig
from scratchlm.finetune.dpo_train import finetune_dpo
from scratchlm.finetune.sft_train import finetune_sft
from scratchlm.interop import open_model

QA = [
    ("What does the Python module `shlex` do?", "A lexical analyzer class for simple shell-like syntaxes."),
    ("What does `json.dumps` do?", "Serialize obj to a JSON formatted str."),
    ("What is the Python module `heapq` for?", "Heap queue algorithm (a.k.a. priority queue)."),
    ("What does `math.gcd` do?", "Greatest Common Divisor."),
]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_lora_sft_on_smollm2_lowers_answer_loss_and_keeps_its_chat_template(smollm2_gguf, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                               for q, a in QA])
    config = SFTConfig(lora=True, lr=1e-3, max_steps=3, batch_size=4, max_length=64, samples=1, sample_tokens=8)
    result = finetune_sft(smollm2_gguf, data, tmp_path / "sft", config, eval_path=data, progress=False)
    assert result.after["loss"] < result.before["loss"]
    assert result.trainable_params < 0.05 * result.total_params  # adapters only: the tied head is not adapted
    tokenizer = open_model(result.model_dir, kind="language-model").tokenizer
    assert tokenizer.vocab_size == 49152 and "<|im_start|>" in tokenizer.metadata.get("chat_template", "")
    assert (tmp_path / "sft" / "adapter.safetensors").is_file()


def test_lora_dpo_on_smollm2_prefers_the_chosen_answers_it_trained_on(smollm2_gguf, tmp_path):
    pairs = [{"prompt": q, "chosen": a, "rejected": "I'm not sure; please check the documentation."} for q, a in QA]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    config = DPOConfig(lora=True, lr=1e-3, max_steps=3, batch_size=4, max_length=64)
    result = finetune_dpo(smollm2_gguf, data, tmp_path / "dpo", config, eval_path=data, progress=False)
    assert result.before["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy is the reference
    assert result.after["loss"] < math.log(2) and result.after["margin"] > 0
    assert result.after["reward_accuracy"] >= 0.75

