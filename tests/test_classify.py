import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.finetune.classify import (
    build_classifier,
    evaluate,
    finetune_classifier,
    save_classifier,
    train_classifier,
)
from scratchlm.finetune.classify_data import (
    EncodedTexts,
    LabelledText,
    check_labels,
    encode_texts,
    load_labelled_texts,
    split_held_out,
)
from scratchlm.finetune.config import ClassifyConfig, parse_freeze
from scratchlm.finetune.lora import lora_layers
from scratchlm.finetune.trainer import lr_factor
from scratchlm.model.classifier import SequenceClassifier, pad_right, pool_hidden, predict
from scratchlm.model.folder import load_classifier, save_model_folder

from conftest import tiny_gpt, tiny_tokenizer

DATA_DIR = Path(__file__).parents[1] / "scratchlm" / "finetune" / "data"
TEXT = ("win a free prize now, click the link. meeting moved to friday, see the notes on asyncio. "
        "urgent: claim your cash today! can you review my pull request? ") * 30


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(TEXT)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- data ------------------------------------------------------------------------------
def test_jsonl_malformed_lines_are_reported_with_their_numbers(tmp_path):
    path = write(tmp_path / "d.jsonl", "\n".join([
        '{"text": "hello there", "label": "ham"}',
        '{"text": "no label"}',
        "not json",
        "",
        '{"text": "", "label": "ham"}',
        '["a", "list"]',
        '{"text": "win now", "label": 1}',
    ]) + "\n")
    records, report = load_labelled_texts(path)
    assert [(r.text, r.label, r.line) for r in records] == [("hello there", "ham", 1), ("win now", "1", 7)]
    assert [line for line, _ in report.rejected] == [2, 3, 5, 6]
    assert "missing field 'label'" in report.rejected[0][1]
    assert f"{path}:3: not JSON" in report.summary()


def test_csv_needs_text_and_label_header_and_reports_bad_rows(tmp_path):
    path = write(tmp_path / "d.csv", 'label,text\nham,"hello, friend"\nspam\nspam,"multi\nline text"\nham,\n')
    records, report = load_labelled_texts(path)
    assert [(r.text, r.label) for r in records] == [("hello, friend", "ham"), ("multi\nline text", "spam")]
    assert report.rejected == [(3, "1 fields, the header has 2"), (6, "empty 'text'")]
    with pytest.raises(InputFileError, match=r"bad\.csv:1: the CSV header"):
        load_labelled_texts(write(tmp_path / "bad.csv", "message,class\nhi,ham\n"))


def test_a_file_without_a_usable_record_is_an_input_error(tmp_path):
    with pytest.raises(InputFileError, match="no usable"):
        load_labelled_texts(write(tmp_path / "d.jsonl", '{"text": "x"}\n'))


def test_eval_labels_missing_from_training_are_named():
    eval_records = [LabelledText("a", "ham", 1), LabelledText("b", "phishing", 4), LabelledText("c", "promo", 9)]
    with pytest.raises(ConfigError, match=r"'phishing' \(eval.jsonl:4\), 'promo' \(eval.jsonl:9\)"):
        check_labels(["ham", "spam"], eval_records, "eval.jsonl")
    check_labels(["ham", "spam"], eval_records[:1], "eval.jsonl")


def test_held_out_split_is_seeded_and_stratified():
    records = [LabelledText(f"t{i}", "spam" if i % 5 == 0 else "ham", i) for i in range(100)]
    train, held = split_held_out(records, 0.2, seed=3)
    assert (train, held) == split_held_out(records, 0.2, seed=3)
    assert sum(r.label == "spam" for r in held) == 4 and sum(r.label == "ham" for r in held) == 16
    assert {r.line for r in train}.isdisjoint(r.line for r in held) and len(train) + len(held) == 100


def test_long_texts_are_truncated_or_dropped_and_counted(tokenizer):
    texts, labels = ["win now", "meeting moved to friday, see the notes on asyncio " * 3], [0, 1]
    cut = encode_texts(tokenizer, texts, labels, max_length=8, long="truncate")
    assert cut.truncated == 1 and cut.dropped == 0 and max(len(i) for i in cut.ids) == 8
    assert cut.ids[1][-1] == tokenizer.eos_id  # the end token survives the cut: "last" pooling reads it
    dropped = encode_texts(tokenizer, texts, labels, max_length=8, long="drop")
    assert dropped.dropped == 1 and dropped.labels == [0]


# ---- the model -------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_does_not_change_a_texts_scores(tokenizer, pooling):
    model = SequenceClassifier(tiny_gpt(tokenizer), 3, pooling).eval()
    short, long = [5, 9, 12], [7, 8, 9, 10, 11, 12, 13]
    alone = model(torch.tensor([short]), torch.tensor([3]))
    idx, lengths = pad_right([short, long], pad_id=0)
    together = model(idx, lengths)
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-6)
    repadded = model(torch.tensor([short + [77, 88, 99, 1]]), torch.tensor([3]))  # different pad ids
    torch.testing.assert_close(repadded[0], alone[0], rtol=1e-5, atol=1e-6)


def test_last_pooling_reads_the_last_real_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    pooled = pool_hidden(hidden, torch.tensor([2, 4]), "last")
    assert torch.equal(pooled, torch.stack([hidden[0, 1], hidden[1, 3]]))
    mean = pool_hidden(hidden, torch.tensor([2, 4]), "mean")
    assert torch.equal(mean[0], hidden[0, :2].mean(0))


def test_parse_freeze_accepts_the_three_forms_and_names_bad_ones():
    assert str(parse_freeze("none")) == "none" and parse_freeze("all-but-last:1").last_blocks == 1
    for bad in ("everything", "all-but-last:x", "all-but-last"):
        with pytest.raises(ConfigError, match="freeze must be"):
            parse_freeze(bad)
    with pytest.raises(ConfigError, match="not both"):
        ClassifyConfig(lora=True, freeze="embeddings")


def easy_set(n: int = 48) -> EncodedTexts:
    """Class 0 texts use tokens 10-19, class 1 tokens 20-29: separable by any model."""
    g = torch.Generator().manual_seed(0)
    ids, labels = [], []
    for i in range(n):
        label = i % 2
        length = int(torch.randint(3, 9, (1,), generator=g))
        ids.append((torch.randint(10, 20, (length,), generator=g) + 10 * label).tolist())
        labels.append(label)
    return EncodedTexts(ids, labels)


def test_freezing_leaves_frozen_parameters_bit_identical(tokenizer):
    config = ClassifyConfig(freeze="all-but-last:1", max_steps=3, batch_size=8, lr=1e-2)
    model, _ = build_classifier(tiny_gpt(tokenizer), 2, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_classifier(model, easy_set(), config, pad_id=0)
    after = dict(model.named_parameters())
    frozen = [n for n in before if n.startswith(("embed.", "blocks.0."))]
    trained = [n for n in before if n.startswith(("blocks.1.", "score.", "norm."))]
    assert frozen and trained
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trained if n.endswith("weight"))


def test_lora_trains_only_adapters_and_head(tokenizer):
    model, lora = build_classifier(tiny_gpt(tokenizer), 2, ClassifyConfig(lora=True, lora_rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora is not None and lora_layers(model)
    assert trainable == {n for n in trainable if "lora_" in n or n.startswith("score.")} and "score.weight" in trainable


@pytest.mark.parametrize("method", [{"freeze": "none"}, {"lora": True}])
def test_a_few_steps_lower_the_loss_and_raise_training_accuracy(tokenizer, method):
    data = easy_set()
    config = ClassifyConfig(max_steps=30, batch_size=16, lr=3e-3, **method)
    torch.manual_seed(0)
    model, _ = build_classifier(tiny_gpt(tokenizer), 2, config)
    before = evaluate(model, data, ["a", "b"], pad_id=0)
    losses = []
    train_classifier(model, data, config, pad_id=0, on_step=lambda n, row: losses.append(row["loss"]))
    after = evaluate(model, data, ["a", "b"], pad_id=0)
    assert len(losses) == 30 and after["loss"] < before["loss"] * 0.5
    assert after["accuracy"] == 1.0 and before["accuracy"] < 0.8


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 100, 0.1, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_save_and_load_give_the_same_predictions(tokenizer, tmp_path):
    config = ClassifyConfig(lora=True, lora_rank=2, max_steps=10, batch_size=16, lr=1e-2, pooling="mean")
    model, _ = build_classifier(tiny_gpt(tokenizer), 2, config)
    train_classifier(model, easy_set(), config, pad_id=0)
    texts = ["win a free prize now", "see the notes on asyncio", "urgent claim"]
    encoded = encode_texts(tokenizer, texts, [0, 0, 0], 64)
    expected, logits = predict(model, encoded.ids, pad_id=0)
    save_classifier(tmp_path / "clf", model, tokenizer, ["ham", "spam"], max_length=64)
    loaded = load_classifier(tmp_path / "clf")
    assert not lora_layers(loaded.model)  # saved merged
    assert loaded.classify(texts) == [["ham", "spam"][p] for p in expected]
    _, again = predict(loaded.model, encoded.ids, pad_id=0)
    torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-5)


def test_finetune_refuses_a_non_empty_out_and_mismatched_labels(tokenizer, tmp_path):
    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    train = write(tmp_path / "t.jsonl", "".join(json.dumps({"text": t, "label": l}) + "\n"
                                              for t, l in [("win now", "spam"), ("hi there", "ham")] * 8))
    bad_eval = write(tmp_path / "e.jsonl", '{"text": "hi", "label": "ham"}\n{"text": "x", "label": "promo"}\n')
    with pytest.raises(ConfigError, match=r"'promo' \(.*e\.jsonl:2\)"):
        finetune_classifier(base, train, tmp_path / "run", ClassifyConfig(), eval_path=bad_eval, progress=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        finetune_classifier(base, train, tmp_path / "run", ClassifyConfig(max_steps=1), progress=False)
    result = finetune_classifier(base, train, tmp_path / "run", ClassifyConfig(max_steps=2, val_fraction=0.25),
                                 force=True, progress=False)
    assert result.steps == 2 and result.data["eval"] == 4 and result.labels == ["ham", "spam"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "report.md", "results.json"):
        assert (tmp_path / "run" / name).is_file(), name


@pytest.mark.slow
def test_cli_classify_end_to_end_on_the_shipped_data(tokenizer, tmp_path):
    base = save_model_folder(tmp_path / "base", tiny_gpt(tokenizer), tokenizer)
    lines = (DATA_DIR / "spam_train.jsonl").read_text(encoding="utf-8").splitlines()
    train = write(tmp_path / "train.jsonl", "\n".join(lines[:200]) + "\nnot json\n")
    eval_lines = (DATA_DIR / "spam_eval.jsonl").read_text(encoding="utf-8").splitlines()
    held = write(tmp_path / "eval.jsonl", "\n".join(eval_lines[:100]) + "\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "scratchlm.cli", "finetune", "classify", str(base), "--data", str(train), "--eval", str(held),
           "--out", str(out), "--epochs", "4", "--lr", "3e-3", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "line 201" in done.stdout or "train.jsonl:201" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["after"]["accuracy"] > results["before"]["accuracy"] and results["after"]["accuracy"] > 0.8
    assert load_classifier(out).classify(["WINNER! Claim your cash prize at win-now.biz now!"]) == ["spam"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "not empty" in again.stderr
