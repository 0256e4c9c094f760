"""The `scratchlm tokenizer` commands as a user runs them: results, and one-line errors."""

import subprocess
import sys

import pytest

from scratchlm.cli import main
from scratchlm.tokenizer import Tokenizer


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scratchlm.cli", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tok.json"
    result = run("tokenizer", "train", "--vocab-size", "600", "--max-bytes", "200k", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "trained 600 tokens" in result.stdout and "embedded corpus" in result.stdout
    return out


def test_train_on_files_then_encode_decode_round_trip(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log.\n" * 50)
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "270", "--out", str(out), "--quiet", "--workers", "1"]) == 0
    assert Tokenizer.load(out).vocab_size == 270
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--text", "the cat sat"]) == 0
    ids = capsys.readouterr().out.strip()
    assert main(["tokenizer", "decode", "--tokenizer", str(out), "--ids", ids]) == 0
    assert capsys.readouterr().out == "the cat sat"


def test_encode_reads_stdin_and_decode_reads_stdin(trained):
    encoded = run("tokenizer", "encode", "--tokenizer", str(trained), stdin="Hello, world!")
    assert encoded.returncode == 0
    decoded = run("tokenizer", "decode", "--tokenizer", str(trained), stdin=encoded.stdout)
    assert decoded.stdout == "Hello, world!"


def test_stats_reports_bytes_per_token_and_vocab_use(trained, capsys):
    assert main(["tokenizer", "stats", "--tokenizer", str(trained), "--text", "the value of the expression", "--json"]) == 0
    import json

    stats = json.loads(capsys.readouterr().out)
    assert stats["text_bytes"] == 27 and 1 < stats["bytes_per_token"] < 27
    assert 0 < stats["vocab_used"] < 1 and len(stats["longest"]) == 10


def test_export_then_import_round_trip(trained, tmp_path, capsys):
    hf = tmp_path / "hf" / "tokenizer.json"
    assert main(["tokenizer", "export", "--tokenizer", str(trained), "--out", str(hf)]) == 0
    assert main(["tokenizer", "import", str(hf.parent), "--out", str(tmp_path / "back.json")]) == 0
    assert Tokenizer.load(tmp_path / "back.json").ranks == Tokenizer.load(trained).ranks


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["tokenizer", "train", "--input", "missing.txt", "--out", "x.json"], None, "missing.txt: no such file"),
        (["tokenizer", "train", "--vocab-size", "10", "--out", "x.json"], None, "vocab size 10 is too small"),
        (["tokenizer", "encode", "--tokenizer", "nope.json", "--text", "hi"], None, "nope.json: no such tokenizer file"),
        (["tokenizer", "decode", "--tokenizer", "TOK", "--ids", "1 two"], None, "'two' (item 2 of the input) is not a token id"),
        (["tokenizer", "decode", "--tokenizer", "TOK", "--ids", "99999"], None, "token id 99999 is not in the vocabulary"),
        (["tokenizer", "encode", "--tokenizer", "TOK"], "a <|endoftext|>", "special token '<|endoftext|>'"),
        (["tokenizer", "train", "--pattern", "([", "--out", "x.json"], None, "pattern '([' is neither"),
        (["tokenizer", "train", "--pattern", "GPT2", "--out", "x.json"], None, "unknown pattern name 'GPT2'"),
        (["tokenizer", "train", "--pattern", "\\w+", "--out", "x.json"], None, "characters would be lost"),
        (["tokenizer", "train", "--pattern", "\\X", "--out", "x.json"], None, "not supported by the encoder"),
        (["tokenizer", "train", "--out", "."], None, ".: is a folder"),
        (["tokenizer", "train", "--workers", "-1", "--out", "x.json"], None, "workers must be at least 1"),
        (["tokenizer", "train", "--min-frequency", "0", "--out", "x.json"], None, "min frequency must be at least 1"),
        (["tokenizer", "decode", "--tokenizer", "TOK", "--ids", "\u00b2"], None, "is not a token id"),
        (["tokenizer", "stats", "--tokenizer", "TOK", "--top", "-1", "--text", "x"], None, "--top must be 0 or more"),
        (["tokenizer", "export", "--tokenizer", "TOK", "--out", "."], None, "is a folder"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(trained, tmp_path, args, stdin, message):
    args = [str(trained) if a == "TOK" else a for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "scratchlm.cli", *args], input=stdin, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratchlm: error:") and message in lines[0], result.stderr


def test_bad_size_is_a_usage_error_without_traceback():
    result = run("tokenizer", "train", "--max-bytes", "lots", "--out", "x.json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'lots' is not a size" in result.stderr


def test_undecodable_input_warns_with_counts(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok ok ok \xff\xff ok ok\n" * 4)
    result = run("tokenizer", "train", "--input", str(bad), "--vocab-size", "262", "--out", str(tmp_path / "t.json"), "--quiet")
    assert result.returncode == 0
    assert "8 undecodable byte sequences replaced" in result.stderr


@pytest.mark.parametrize("command", [[], ["tokenizer"], ["tokenizer", "train"], ["tokenizer", "encode"], ["tokenizer", "stats"]])
def test_help_is_available_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: scratchlm" in capsys.readouterr().out


def test_non_utf8_stdin_is_replaced_with_a_warning(trained):
    result = subprocess.run(
        [sys.executable, "-m", "scratchlm.cli", "tokenizer", "stats", "--tokenizer", str(trained)],
        input=b"caf\xe9\n", capture_output=True,
    )
    assert result.returncode == 0 and b"1 undecodable byte sequences" in result.stderr


def test_special_as_text_encodes_the_string_as_plain_text(trained, capsys):
    assert main(["tokenizer", "encode", "--tokenizer", str(trained), "--text", "<|endoftext|>", "--special-as-text"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert len(ids) > 1 and Tokenizer.load(trained).decode(ids) == "<|endoftext|>"


def test_pattern_override_on_a_scratchlm_tokenizer(trained, tmp_path, capsys):
    assert main(["tokenizer", "import", str(trained), "--pattern", "gpt2", "--out", str(tmp_path / "g.json")]) == 0
    assert Tokenizer.load(tmp_path / "g.json").pattern.startswith("'s|'t")


def test_outputs_are_readable_by_others(trained):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(trained.stat().st_mode) == 0o666 & ~umask


def test_auto_vocab_size_grows_with_the_corpus():
    from scratchlm.tokenizer.train import auto_vocab_size

    # One entry per 512 bytes, a power of two: the small books of docs/benchmarks.md and the embedded corpus.
    assert [auto_vocab_size(n) for n in (0, 380_000, 670_000, 1_921_643, 10**10)] == [512, 512, 1024, 2048, 32768]


def test_vocab_size_auto_sizes_to_the_input_and_a_bad_value_is_a_usage_error(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a text with words {i * 7} and more words\n" for i in range(12000)))
    assert 2 * 512 * 512 < corpus.stat().st_size < 4 * 512 * 512  # room for 1024 entries, not 2048
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--input", str(corpus), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    assert Tokenizer.load(out).vocab_size == 1024
    result = run("tokenizer", "train", "--vocab-size", "big", "--out", str(tmp_path / "x.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "'big' is not a number or 'auto'" in result.stderr
