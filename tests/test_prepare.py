"""`scratchlm data prepare` end to end: every input document accounted for, bad input reported
with file and line, resume without redoing finished chunks, mixture weights honoured, bounded
memory, and output that pretraining reads."""

import csv
import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scratchlm.data import pipeline, prepare as prepare_module
from scratchlm.text.embedded import embedded_documents
from scratchlm.data.prepare import load_prepare_config, prepare
from scratchlm.data.shards import TokenShards
from scratchlm.errors import ConfigError, InputFileError

NO_FILTERS = {"filters": {"enabled": "false"}}


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return [d for d in embedded_documents() if len(d.split()) > 60][:400]


@pytest.fixture(scope="module")
def tokenizer_path(corpus_tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    corpus_tokenizer.save(path)
    return path


def messy_corpus(root: Path, docs: list[str]) -> dict[str, int]:
    """Every kind of input, good and bad. Returns how many input documents each file holds."""
    (root / "txt").mkdir(parents=True)
    counts: dict[str, int] = {}
    for i, doc in enumerate(docs[:40]):
        (root / "txt" / f"{i:02d}.txt").write_text(doc)
    (root / "txt" / "copy.txt").write_text(docs[3])  # an exact copy
    words = docs[4].split()
    words[len(words) // 2] = "changed"
    (root / "txt" / "near.txt").write_text(" ".join(words))  # a near copy (one word, and whitespace)
    (root / "txt" / "empty.txt").write_text("")
    (root / "txt" / "binary.txt").write_bytes(b"\x00\x01\x02\x03 not text")
    (root / "txt" / "latin1.txt").write_bytes(docs[5].encode() + b"\n\xe9t\xe9 \xff\n")  # undecodable bytes
    lines = [json.dumps({"text": d}) for d in docs[40:80]]
    lines[3] = '{"text": "unterminated'  # malformed JSON on line 4
    lines[5] = json.dumps({"body": "no text field"})  # missing field on line 6
    lines[7] = json.dumps({"text": 42})  # not a string on line 8
    (root / "a.jsonl").write_text("\n".join(lines) + "\n\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps({"text": d}) + "\n" for d in docs[80:100])
    with (root / "c.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows([i, d] for i, d in enumerate(docs[100:120]))
    pq.write_table(pa.table({"text": docs[120:140]}), root / "d.parquet")
    (root / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    paragraphs = "".join(f"<p>{p}</p>" for p in docs[140].split("\n\n"))
    (root / "page.html").write_text(f"<html><body><nav>Home | About</nav><article>{paragraphs}</article><footer>(c) 2026</footer></body></html>")
    (root / "script.html").write_text("<html><body><script>var x = 1;</script></body></html>")  # no main text
    counts.update(txt=40 + 5, jsonl=40, gz=20, csv=20, parquet=20 + 1, html=2)
    return counts


def read_ledger(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((out / "ledger").glob("*.jsonl")) for line in path.open()]


@pytest.mark.slow  # the whole pipeline on a mixed corpus
def test_every_input_document_is_kept_rejected_or_a_duplicate(documents, tokenizer_path, tmp_path):
    counts = messy_corpus(tmp_path / "in", documents)
    config = load_prepare_config(None, {"tokenizer": str(tokenizer_path), "chunk_docs": "16", "workers": "2"}, [str(tmp_path / "in")])
    result = prepare(config, tmp_path / "out", progress=False)
    stats = result.stats
    ledger = read_ledger(tmp_path / "out")

    assert stats["inputs"] == sum(counts.values()) == len(ledger)
    assert stats["kept"] + stats["rejected"] + stats["duplicates"] == stats["inputs"] and stats["accounted"]
    status = Counter(entry["status"] for entry in ledger)
    assert status == {"kept": stats["kept"], "rejected": stats["rejected"], "duplicate": stats["duplicates"]}
    by_id = {entry["id"]: entry for entry in ledger}
    root = tmp_path / "in"
    assert by_id[f"{root}/a.jsonl:4"]["reason"] == "read:malformed_json" and "a.jsonl:4" in by_id[f"{root}/a.jsonl:4"]["detail"]
    assert by_id[f"{root}/a.jsonl:6"]["reason"] == "read:missing_field"
    assert by_id[f"{root}/a.jsonl:8"]["reason"] == "read:field_not_text"
    assert by_id[f"{root}/txt/empty.txt"]["reason"] == "read:empty_file"
    assert by_id[f"{root}/txt/binary.txt"]["reason"] == "read:binary_file"
    assert by_id[f"{root}/broken.parquet"]["reason"] == "read:malformed_parquet"
    assert by_id[f"{root}/script.html"]["reason"] == "extract:no_main_text"
    copy = by_id[f"{root}/txt/copy.txt"]
    assert (copy["status"], copy["stage"], copy["duplicate_of"]) == ("duplicate", "exact_dedup", f"{root}/txt/03.txt")
    assert stats["read_issues"]["counts"] == {"undecodable_bytes": 1}
    assert stats["read_issues"]["first"][0]["where"] == f"{root}/txt/latin1.txt:{documents[5].count(chr(10)) + 2}"

    kept = [json.loads(line) for path in sorted((tmp_path / "out" / "documents").glob("0*.jsonl")) for line in path.open()]
    assert len(kept) == stats["kept"] and {d["id"] for d in kept} == {e["id"] for e in ledger if e["status"] == "kept"}
    shards = TokenShards.open(tmp_path / "out")
    assert shards.manifest["documents"]["train"] + shards.manifest["documents"]["val"] == stats["kept"]
    assert shards.tokens("train") == stats["tokens"]["train"] > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "every input document is accounted for" in report and "read:malformed_json" in report


def test_near_copies_are_found_and_point_at_the_first_copy(documents, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    base = max(documents, key=len).split()  # long: one changed word leaves Jaccard near 0.98
    for n in range(3):
        words = list(base)
        words[5 + 7 * n] = "different"
        (root / f"{n}.txt").write_text(" ".join(words))
    (root / "other.txt").write_text(documents[11])
    assert len(base) > 400
    config = load_prepare_config(None, NO_FILTERS, [str(root)])
    stats = prepare(config, tmp_path / "out", progress=False).stats
    ledger = {Path(e["id"]).name: e for e in read_ledger(tmp_path / "out")}
    assert stats["dedup"]["near_duplicates"] == 2
    assert ledger["1.txt"]["duplicate_of"] == ledger["2.txt"]["duplicate_of"] == str(root / "0.txt")
    assert ledger["other.txt"]["status"] == ledger["0.txt"]["status"] == "kept"


def test_strict_mode_stops_at_the_first_bad_input_naming_file_and_line(documents, tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": documents[0]}) + "\n{oops\n")
    config = load_prepare_config(None, {"strict": "true"}, [str(tmp_path / "a.jsonl")])
    with pytest.raises(InputFileError, match=r"a\.jsonl:2: malformed JSON"):
        prepare(config, tmp_path / "out", progress=False)


def test_resume_redoes_only_unfinished_chunks_and_gives_the_same_shards(documents, tokenizer_path, tmp_path, monkeypatch):
    root = tmp_path / "in"
    root.mkdir()
    for i, doc in enumerate(documents[:60]):
        (root / f"{i:02d}.txt").write_text(doc)
    settings = {"tokenizer": str(tokenizer_path), "chunk_docs": "10", "workers": "1", "val_fraction": "0.2", **NO_FILTERS}
    config = load_prepare_config(None, settings, [str(root)])
    reference = prepare(config, tmp_path / "reference", progress=False)

    real_clean = pipeline.clean_batch
    calls = []

    def crash_on_fourth_chunk(records, cleaner, counts):
        calls.append(len(records))
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of the run
        return real_clean(records, cleaner, counts)

    monkeypatch.setattr(prepare_module, "clean_batch", crash_on_fourth_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    calls.clear()
    monkeypatch.setattr(prepare_module, "clean_batch", lambda *a: calls.append(1) or real_clean(*a))
    resumed = prepare(config, tmp_path / "out", progress=False)
    assert len(calls) == 3  # chunks 4, 5 and 6; the first three were finished before the crash
    for split in ("train", "val"):
        assert np.array_equal(TokenShards.open(tmp_path / "out").read(split, 0, resumed.stats["tokens"][split]),
                              TokenShards.open(tmp_path / "reference").read(split, 0, reference.stats["tokens"][split]))

    calls.clear()
    changed = load_prepare_config(None, {**settings, "val_fraction": "0.3"}, [str(root)])
    prepare(changed, tmp_path / "out", progress=False)
    assert calls == []  # a new split redoes the tokenizing, not the cleaning


def test_mixture_weights_are_honoured_with_epochs_reported(documents, tokenizer_path, tmp_path):
    for name, docs in (("a", documents[:100]), ("b", documents[100:200])):
        (tmp_path / name).mkdir()
        for i, doc in enumerate(docs):
            (tmp_path / name / f"{i}.txt").write_text(doc)
    config_file = tmp_path / "mix.toml"
    config_file.write_text(
        f'tokenizer = "{tokenizer_path}"\nval_fraction = 0\nworkers = 1\n'
        f'[[sources]]\nname = "a"\npaths = ["{tmp_path}/a/*.txt"]\nweight = 3\n'
        f'[[sources]]\nname = "b"\npaths = ["{tmp_path / "b"}"]\nweight = 1\n'
        "[filters]\nenabled = false\n[minhash]\nenabled = false\n"
    )
    result = prepare(load_prepare_config(config_file), tmp_path / "out", progress=False)
    sources = result.stats["sources"]
    bytes_a, bytes_b = sources["a"]["kept_bytes"]["train"], sources["b"]["kept_bytes"]["train"]
    assert sources["a"]["epochs"] == pytest.approx(0.75 * (bytes_a + bytes_b) / bytes_a)
    assert sources["b"]["epochs"] == pytest.approx(0.25 * (bytes_a + bytes_b) / bytes_b)
    tokens = result.manifest["tokens_by_source"]
    share = tokens["a"]["train"] / (tokens["a"]["train"] + tokens["b"]["train"])
    assert share == pytest.approx(0.75, abs=0.05)
    assert "epochs" in (tmp_path / "out" / "report.md").read_text()


def test_config_mistakes_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'val_fracton'; did you mean 'val_fraction'"):
        load_prepare_config(None, {"val_fracton": "0.1"}, ["x"])
    with pytest.raises(ConfigError, match=r"\[minhash\]: unknown key 'treshold'"):
        load_prepare_config(None, {"minhash": {"treshold": "0.7"}}, ["x"])
    with pytest.raises(ConfigError, match="weight to every source or to none"):
        cfg = tmp_path / "c.toml"
        cfg.write_text('[[sources]]\nname = "a"\npaths = ["x"]\nweight = 2\n[[sources]]\nname = "b"\npaths = ["y"]\n')
        load_prepare_config(cfg)
    with pytest.raises(ConfigError, match="no sources"):
        load_prepare_config(None, {})
    with pytest.raises(ConfigError, match="shard_tokens must be positive"):
        load_prepare_config(None, {"shard_tokens": "0"}, ["x"])
    with pytest.raises(ConfigError, match="changes the --input source"):
        cfg = tmp_path / "one.toml"
        cfg.write_text('[[sources]]\nname = "a"\npaths = ["x"]\n')
        load_prepare_config(cfg, {"sources": {"text_unit": "line"}})
    assert load_prepare_config(None, {"sources": {"text_unit": "line"}}, ["x"]).sources[0].text_unit == "line"
    with pytest.raises(ConfigError, match="'xx' not among the"):
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "a.txt").write_text("text")
        prepare(load_prepare_config(None, {"filters": {"languages": ["en", "xx"]}}, [str(tmp_path / "in")]), tmp_path / "out", progress=False)
    with pytest.raises(InputFileError, match="no such file or directory"):
        prepare(load_prepare_config(None, {}, [str(tmp_path / "missing")]), tmp_path / "out", progress=False)


def test_output_folder_rules_and_paths_relative_to_the_config(documents, tokenizer_path, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for i, doc in enumerate(documents[:30]):
        (root / f"{i}.txt").write_text(doc)
    (tmp_path / "data.toml").write_text('[[sources]]\nname = "docs"\npaths = ["in/*.txt"]\n[filters]\nenabled = false\n')
    config = load_prepare_config(tmp_path / "data.toml", {"tokenizer": str(tokenizer_path), "val_fraction": "0.2"})
    assert config.sources[0].paths == [f"{tmp_path}/in/*.txt"]
    prepare(config, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "manifest.json").is_file()
    # Run again without a tokenizer and with other documents: the old shards must not remain.
    smaller = load_prepare_config(tmp_path / "data.toml", {"filters": {"enabled": "true"}})
    prepare(smaller, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists() and not list((tmp_path / "out").glob("train_*.bin"))

    with pytest.raises(InputFileError, match="output folder is inside the input"):
        prepare(load_prepare_config(None, NO_FILTERS, [str(root)]), root / "prepared", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputFileError, match="not empty and holds no earlier prepare run"):
        prepare(config, tmp_path / "busy", progress=False)


def test_cli_runs_the_pipeline_and_pretraining_reads_its_shards(documents, tokenizer_path, tmp_path, cli):
    root = tmp_path / "in"
    root.mkdir()
    (root / "docs.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in documents[:200]))
    run = cli("data", "prepare", "--input", root, "--text-field", "content", "--out", tmp_path / "out",
              "--tokenizer", tokenizer_path, "--val-fraction", "0.1", "--set", "filters.enabled=false", "--quiet")
    assert run.status == 0, run.err
    assert "200 documents:" in run.out and "train and" in run.out
    train = cli("pretrain", "--data", tmp_path / "out", "--out", tmp_path / "run", "--max-steps", "2",
                "--set", "model=cpu-tiny", "--set", "micro_batch=2", "--set", "samples=0", "--set", "eval_tokens=512", "--quiet")
    assert train.status == 0, train.err

    bad = cli("data", "prepare", "--input", root, "--out", tmp_path / "o2", "--set", "minhash.num_perms=64")
    assert bad.status == 2 and bad.err.count("\n") == 1 and "did you mean 'num_perm'" in bad.err and "Traceback" not in bad.err


def test_cli_rejects_an_over_long_or_deeply_nested_line_naming_file_and_line(documents, tmp_path, cli):
    root = tmp_path / "in"
    root.mkdir()
    lines = [json.dumps({"text": documents[0]}), "[" * 100_000, json.dumps({"text": "x " * 150_000}), json.dumps({"text": documents[3]})]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    run = cli("data", "prepare", "--input", root, "--out", tmp_path / "out", "--set", "sources.max_document_bytes=200KB", "--quiet")
    assert run.status == 0, run.err
    ledger = {entry["id"].rsplit("/", 1)[-1]: entry for entry in read_ledger(tmp_path / "out")}
    assert list(ledger) == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3", "a.jsonl:4"]
    assert (ledger["a.jsonl:2"]["stage"], ledger["a.jsonl:2"]["reason"]) == ("read", "read:malformed_json")
    assert ledger["a.jsonl:2"]["detail"].endswith("a.jsonl:2: malformed JSON (nested too deeply)")
    assert (ledger["a.jsonl:3"]["stage"], ledger["a.jsonl:3"]["reason"]) == ("read", "read:too_large")
    assert ledger["a.jsonl:3"]["detail"].endswith("a.jsonl:3: a line of 300,013 bytes, over max_document_bytes = 200KB")
    assert ledger["a.jsonl:1"].get("stage") != "read" and ledger["a.jsonl:4"].get("stage") != "read"  # the lines around them are read

    bad = cli("data", "prepare", "--input", root, "--out", tmp_path / "o2", "--set", "sources.max_document_bytes=lots")
    assert bad.status == 2 and bad.err.count("\n") == 1 and "max_document_bytes: 'lots' is not a size" in bad.err and "Traceback" not in bad.err


MEMORY_PROBE = """
import resource, sys
from scratchlm.data.prepare import load_prepare_config, prepare
config = load_prepare_config(None, {"tokenizer": sys.argv[2], "workers": "1", "chunk_docs": "200", "filters": {"enabled": "false"},
                                    "normalize": {"enabled": "false"}}, [sys.argv[1]])
prepare(config, sys.argv[3], progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_memory_stays_bounded_as_the_corpus_grows(documents, tokenizer_path, tmp_path):
    """Peak memory on a 48 MB corpus is within 10 MiB of that on a 6 MB one (measured: under
    2 MiB more): memory does not grow with the input."""
    peaks = {}
    rng = np.random.default_rng(0)
    words = " ".join(documents).split()
    for megabytes in (6, 48):
        path = tmp_path / f"{megabytes}.jsonl"
        with path.open("w") as handle:
            written = 0
            while written < megabytes * 1_000_000:
                start = int(rng.integers(0, len(words) - 400))
                line = json.dumps({"text": " ".join(words[start : start + 300])}) + "\n"
                handle.write(line)
                written += len(line)
        probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(tokenizer_path), str(tmp_path / f"out{megabytes}")],
                               capture_output=True, text=True, timeout=600)  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        peaks[megabytes] = int(probe.stdout.split()[-1]) / 1024  # MiB
    assert peaks[48] - peaks[6] < 10, peaks  # a 10 MiB cap on growth, for 42 MB more input
