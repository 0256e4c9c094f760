"""`scratchlm import`, `export`, `eval` and `compare` as a user runs them: outputs on disk, and
one-line errors for bad input."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from scratchlm.cli import main
from scratchlm.eval.compare import TOKENIZER_NOTE, compare_models, model_labels
from scratchlm.interop import open_model
from scratchlm.model import GPT, get_preset
from scratchlm.model.folder import save_model_folder
from scratchlm.tokenizer import train_bpe

TEXT = (
    "The interpreter reads a line, evaluates it and prints the result. A loop repeats a block of "
    "statements while a condition holds. Functions return values to their callers.\n"
) * 30


def make_model_folder(path, vocab_size: int, seed: int):
    tokenizer = train_bpe([TEXT], vocab_size=vocab_size, workers=1, min_frequency=1)
    torch.manual_seed(seed)
    model = GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size, qk_norm=True, tie_embeddings=False)).eval()
    return save_model_folder(path, model, tokenizer)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_model_folder(root / "small-vocab", 300, 0), make_model_folder(root / "large-vocab", 400, 1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "held-out.txt"
    path.write_text(TEXT[:2000])
    return path


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("scratchlm: error: ") and err.count("\n") == 1, err
    return err


def test_eval_writes_results_and_predictions_next_to_the_model(models, text_file, capsys):
    folder = models[0]
    assert main(["eval", str(folder), "--text", str(text_file), "--tasks", "python-docs-cloze,python-docs-completion",
                 "--limit", "4", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "python-docs-cloze" in printed
    results = json.loads((folder / "eval" / "results.json").read_text())
    assert results["language_modeling"]["text"]["bytes"] == len(TEXT[:2000].encode())
    assert set(results["tasks"]) == {"python-docs-cloze", "python-docs-completion"}
    assert results["tasks"]["python-docs-cloze"]["n"] == 4
    predictions = (folder / "eval" / results["tasks"]["python-docs-completion"]["predictions"]).read_text().splitlines()
    assert len(predictions) == 4 and "prediction" in json.loads(predictions[0])


def test_imported_and_exported_model_scores_the_same_text_identically(models, text_file, tmp_path, capsys):
    folder = models[0]
    assert main(["export", str(folder), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert "chat template: none" in capsys.readouterr().out
    scores = []
    for source in (folder, tmp_path / "hf", tmp_path / "back"):
        assert main(["eval", str(source), "--text", str(text_file), "--out", str(tmp_path / f"eval-{source.name}")]) == 0
        scores.append(json.loads((tmp_path / f"eval-{source.name}" / "results.json").read_text())["language_modeling"]["text"])
    assert scores[0]["nats"] == pytest.approx(scores[1]["nats"], rel=1e-5) == pytest.approx(scores[2]["nats"], rel=1e-5)


def test_compare_writes_table_csv_chart_and_says_bits_per_byte_is_tokenizer_independent(models, text_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, models), "--text", str(text_file), "--tasks", "python-docs-real-or-shuffled",
                 "--limit", "6", "--truncate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| small-vocab |" in printed and "| large-vocab |" in printed and TOKENIZER_NOTE in printed
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [row["model"] for row in rows] == ["small-vocab", "large-vocab"]
    assert all(float(row["text bits/byte"]) > 0 for row in rows)
    assert rows[0]["vocab"] == "300" and int(rows[1]["vocab"]) > 300  # two different tokenizers
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in full["models"]] == ["small-vocab", "large-vocab"]


def test_compare_numbers_equal_each_models_own_evaluation(models, text_file):
    from scratchlm.eval.runner import evaluate_model

    comparison = compare_models(models, text=text_file, progress=False, log=lambda *_: None)
    for folder, row in zip(models, comparison.rows()):
        opened = open_model(folder, kind="language-model")
        model, tokenizer = opened.model, opened.tokenizer
        alone = evaluate_model(model, tokenizer, text=text_file, progress=False)
        assert row["text bits/byte"] == pytest.approx(alone.language_modeling[0].score.bits_per_byte, rel=1e-9)


def test_model_labels_name_run_folders_by_run_and_number_duplicates(tmp_path):
    (tmp_path / "run-a" / "model").mkdir(parents=True)
    gguf = tmp_path / "SmolLM2.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_labels([tmp_path / "run-a" / "model", gguf, tmp_path / "x", tmp_path / "x"]) == ["run-a", "SmolLM2", "x (1)", "x (2)"]


def test_malformed_task_line_is_one_line_error_naming_the_line(models, tmp_path, capsys):
    task = tmp_path / "bad.jsonl"
    task.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "a", "choices": ["b"\n')
    assert main(["eval", str(models[0]), "--tasks", str(task), "--out", str(tmp_path / "e")]) == 2
    assert "bad.jsonl:2" in error_line(capsys)


def test_example_longer_than_the_context_is_an_error_unless_truncate(models, tmp_path, capsys):
    task = tmp_path / "long.jsonl"
    task.write_text(json.dumps({"context": TEXT, "choices": [" yes", " no"], "label": 0}) + "\n")
    assert main(["eval", str(models[0]), "--tasks", str(task), "--out", str(tmp_path / "e")]) == 2
    assert "--truncate" in error_line(capsys)
    assert main(["eval", str(models[0]), "--tasks", str(task), "--out", str(tmp_path / "e"), "--truncate"]) == 0


@pytest.mark.parametrize("argv, expected", [
    (["compare", "ONLY"], "at least two models"),
    (["import", "MISSING.gguf", "--out", "OUT"], "MISSING.gguf: no such file or folder"),
    (["export", "MODEL", "--format", "gguf", "--out", "OUT", "--dtype", "q4_k"], "dtype 'q4_k' is not available for gguf"),
    (["eval"], "give a MODEL"),
])
def test_bad_arguments_are_one_line_errors(argv, expected, models, tmp_path, capsys):
    argv = [str(models[0]) if a in ("ONLY", "MODEL") else str(tmp_path / a) if a in ("OUT", "MISSING.gguf") else a for a in argv]
    assert main(argv) == 2
    assert expected in error_line(capsys)


def test_import_refuses_a_folder_that_already_holds_files(models, capsys):
    assert main(["import", str(models[0]), "--out", str(models[1])]) == 2
    assert "not an empty folder" in error_line(capsys)


@pytest.mark.slow
def test_smollm2_gguf_imports_and_generates_the_same_from_file_and_folder(smollm2_gguf, tmp_path):
    out = tmp_path / "smollm2"
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"

    def generate(source) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "scratchlm.cli", "generate", str(source), "--prompt", prompt,
                               "--temperature", "0", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=600)

    imported = subprocess.run([sys.executable, "-m", "scratchlm.cli", "import", str(smollm2_gguf), "--out", str(out)],
                              capture_output=True, text=True, timeout=600)
    assert imported.returncode == 0, imported.stderr
    assert "chat template: yes" in imported.stdout and (out / "chat_template.jinja").is_file()
    from_file, from_folder = generate(smollm2_gguf), generate(out)
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == from_folder.stdout and "Paris" in from_folder.stdout


def test_a_device_this_machine_lacks_is_a_one_line_error(models, capsys):
    device = "mps" if torch.cuda.is_available() else "cuda"
    assert main(["eval", str(models[0]), "--tasks", "python-docs-cloze", "--device", device]) == 2
    assert "not available here" in error_line(capsys)
    assert main(["generate", str(models[0]), "--prompt", "x", "--device", "tpu9"]) == 2
    assert "unknown device 'tpu9'" in error_line(capsys)


def test_text_that_is_not_utf8_is_refused_rather_than_scored(models, tmp_path, capsys):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["eval", str(models[0]), "--text", str(binary), "--out", str(tmp_path / "e")]) == 2
    assert "not UTF-8" in error_line(capsys)


def test_unwritable_output_and_missing_models_fail_before_any_work(models, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["eval", str(models[0]), "--out", str(a_file)]) == 2
    assert "cannot write here" in error_line(capsys)
    assert main(["compare", str(models[0]), str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "missing: no such file or folder" in error_line(capsys)
    assert not (tmp_path / "c").exists()


def test_gguf_export_refuses_to_overwrite_a_file(models, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(models[0]), "--format", "gguf", "--out", str(out)]) == 0
    assert main(["export", str(models[0]), "--format", "gguf", "--out", str(out)]) == 2
    assert "already exists" in error_line(capsys)


def test_eval_in_bfloat16_scores_close_to_float32_and_says_so(models, text_file, tmp_path):
    folder = models[0]
    bits = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["eval", str(folder), "--text", str(text_file), "--dtype", dtype, "--out", str(tmp_path / dtype)]) == 0
        results = json.loads((tmp_path / dtype / "results.json").read_text())
        assert results["model"]["dtype"] == dtype
        assert results["model"]["parameters"] == sum(p.numel() for p in open_model(folder).model.parameters())
        bits[dtype] = results["language_modeling"]["text"]["bits_per_byte"]
    # bfloat16 rounds weights and activations to 8 significant bits: a relative change of a few
    # parts in a thousand per layer, far below the bits per byte of an untrained model.
    assert bits["bfloat16"] == pytest.approx(bits["float32"], rel=0.02)
