"""The per-document stages and the readers: normalisation, PII, mixing and split, sources."""

import gzip
import json
import shutil
import subprocess
import sys
import tracemalloc
import unicodedata

import numpy as np
import pytest
from hypothesis import given, strategies as st

from scratchlm.data.mix import is_validation, repeats, source_epochs
from scratchlm.data.normalize import NormalizeConfig, normalize_text
from scratchlm.data.pii import PIIConfig, redact_pii
from scratchlm.data.sources import Document, ReadFailure, ReadIssue, SourceConfig, read_source
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.text.reading import decode_text
from conftest import finishes_within


# ---- normalisation --------------------------------------------------------------------------
def test_normalize_repairs_mojibake_and_regularises_whitespace():
    broken = "The Mona Lisa doesnâ€™t have eyebrows.\r\n\r\n\r\n\r\nnext line   \x07bell\u200b here\t \n"
    assert normalize_text(broken) == "The Mona Lisa doesn’t have eyebrows.\n\nnext line   bell here"


def test_normalize_composes_unicode_and_keeps_curly_quotes_and_indentation():
    text = "cafe\u0301 “quoted”\n    indented code\n"
    assert normalize_text(text) == "caf\u00e9 “quoted”\n    indented code"
    assert normalize_text("ﬁ ①", NormalizeConfig(unicode_form="NFKC", fix_encoding=False)) == "fi 1"
    assert normalize_text(" a  b ", NormalizeConfig(enabled=False)) == " a  b "
    assert normalize_text("a    b", NormalizeConfig(collapse_spaces=True)) == "a b"


def test_normalize_can_strip_a_project_gutenberg_header_and_licence():
    book = (
        "The Project Gutenberg eBook of A Book\r\n\r\nTitle: A Book\r\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK A BOOK ***\r\n\r\nChapter 1\r\n\r\nIt was a dark night.\r\n"
        "    *** END OF THE PROJECT GUTENBERG EBOOK A BOOK ***\r\nSection 1. General Terms of Use\r\n"
    )
    assert normalize_text(book, NormalizeConfig(strip_gutenberg=True)) == "Chapter 1\n\nIt was a dark night."
    assert "Terms of Use" in normalize_text(book)  # off by default
    no_markers = "Chapter 1\n\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nno end line"
    assert normalize_text(no_markers, NormalizeConfig(strip_gutenberg=True)) == normalize_text(no_markers)


def test_normalize_rejects_an_unknown_unicode_form():
    with pytest.raises(ConfigError, match="unicode_form"):
        NormalizeConfig(unicode_form="NFX")


@given(st.text(st.characters(codec="utf-8"), max_size=200))
def test_normalize_is_idempotent_and_leaves_no_controls_or_carriage_returns(text):
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert "\r" not in once and not any(unicodedata.category(c) == "Cc" and c not in "\t\n" for c in once)
    assert unicodedata.is_normalized("NFC", once)


# ---- PII --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("write to jane.doe+lists@mail.example.co.uk today", "write to <EMAIL> today", "email"),
        ("ssh 192.168.10.254 now", "ssh <IP_ADDRESS> now", "ip"),
        ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 and fe80:0:0::1ff:fe23", "v6 <IP_ADDRESS> and <IP_ADDRESS>", "ip"),
        ("call (555) 010-9999 or +44 20 7946 0958.", "call <PHONE> or <PHONE>.", "phone"),
    ],
)
def test_pii_is_replaced_by_placeholders(text, expected, kind):
    redacted, counts = redact_pii(text)
    assert redacted == expected and counts[kind] == expected.count("<")


@pytest.mark.parametrize(
    "text",
    ["version 1.2.3.4.5 of the package", "999.1.1.1 is no address", "on 2024-01-15 at 12:30:45", "id 1234567890 and pi 3.14159",
     "slice x[1::2] and a::b", "ISBN 978-3-16-148410-0", "user@localhost has no domain"],
)  # fmt: skip
def test_pii_leaves_lookalikes_alone(text):
    assert redact_pii(text) == (text, {"email": 0, "ip": 0, "phone": 0})


def test_pii_kinds_can_be_switched_off():
    text = "mail a@b.org from 10.0.0.1"
    assert redact_pii(text, PIIConfig(email=""))[0] == "mail a@b.org from <IP_ADDRESS>"
    assert redact_pii(text, PIIConfig(enabled=False))[0] == text


EMAIL_ON_HOSTILE_TEXT = """
from scratchlm.data.pii import redact_pii
for text in ("%41" * 333_000 + "@", "a%" * 500_000 + "@", "a." * 500_000 + "@", "x@" + "a." * 500_000, "a@" * 500_000):
    assert redact_pii(text)[1]["email"] == 0
print("done")
"""


def test_email_pattern_runs_in_linear_time_on_hostile_text():
    """1 MB texts built to make a backtracking pattern try a match at every position. Here they
    take about 0.1 s each; the pattern before this test took 4 s on 100 KB of `%41` and grows
    with the square of the length (minutes for 1 MB), so the 60 s cap is far from both."""
    run = subprocess.run([sys.executable, "-c", EMAIL_ON_HOSTILE_TEXT], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr


# ---- mixing and split -----------------------------------------------------------------------
def test_split_is_stable_and_close_to_the_fraction():
    hashes = np.random.default_rng(0).integers(0, 2**63, size=20_000, dtype=np.uint64)
    val = is_validation(hashes, 0.1, seed=0)
    assert np.array_equal(val, is_validation(hashes, 0.1, seed=0))
    assert val.mean() == pytest.approx(0.1, abs=0.01)
    assert not np.array_equal(val, is_validation(hashes, 0.1, seed=1))


def test_epochs_follow_weights_and_repeats_average_to_them():
    epochs = source_epochs({"web": 900, "books": 100}, {"web": 1, "books": 1})
    assert epochs == pytest.approx({"web": 500 / 900, "books": 5.0})
    assert source_epochs({"a": 10, "b": 30}, {"a": None, "b": None}) == {"a": 1.0, "b": 1.0}
    assert source_epochs({"a": 10, "b": 30}, {"a": None, "b": None}, train_bytes=80) == pytest.approx({"a": 2.0, "b": 2.0})
    hashes = np.arange(50_000, dtype=np.uint64)
    for share in (0.3, 1.0, 2.6):
        copies = repeats(hashes, share, seed=3)
        assert copies.mean() == pytest.approx(share, abs=0.02)
        assert set(np.unique(copies)) <= {int(share), int(share) + 1}


# ---- sources --------------------------------------------------------------------------------
def records(config: SourceConfig) -> list:
    return list(read_source(config))


def test_text_files_by_glob_paragraph_and_line(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond para\n")
    (tmp_path / "b.md").write_text("one\ntwo\n")
    (tmp_path / "skip.log").write_text("not matched")
    docs = records(SourceConfig("t", paths=[f"{tmp_path}/*.txt", f"{tmp_path}/*.md"], text_unit="paragraph"))
    assert [(d.id.split("/")[-1], d.text) for d in docs] == [("a.txt:1", "first para\nstill first"), ("a.txt:4", "second para\n"), ("b.md:1", "one\ntwo\n")]
    lines = records(SourceConfig("t", paths=[str(tmp_path / "b.md")], text_unit="line"))
    assert [(d.id.split(":")[-1], d.text) for d in lines] == [("1", "one"), ("2", "two")]


def test_jsonl_id_field_html_field_and_bad_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"url": "u1", "html": "<p>hi</p>"}\n[1, 2]\n{"url": "u3", "html": "caf\xe9"}\n')
    got = records(SourceConfig("j", paths=[str(path)], text_field="html", id_field="url", html=True))
    assert isinstance(got[0], Document) and got[0].id == "u1" and got[0].html
    assert isinstance(got[1], ReadFailure) and got[1].issue == "not_an_object" and got[1].detail.endswith("x.jsonl:2: not a JSON object")
    assert isinstance(got[2], ReadIssue) and got[2].where.endswith("x.jsonl:3")
    assert isinstance(got[3], Document) and got[3].text == "caf\ufffd"


def test_csv_with_a_missing_column_is_one_failure(tmp_path):
    (tmp_path / "x.csv").write_text("title,body\na,b\n")
    (failure,) = records(SourceConfig("c", paths=[str(tmp_path / "x.csv")]))
    assert failure.issue == "missing_field" and "no column 'text' (columns: title, body)" in failure.detail


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["alpha", "beta"]}),
                          "test": datasets.Dataset.from_dict({"text": ["gamma"]})}).save_to_disk(tmp_path / "ds")  # fmt: skip
    assert [d.text for d in records(SourceConfig("hf", dataset=str(tmp_path / "ds")))] == ["alpha", "beta"]
    assert [d.text for d in records(SourceConfig("hf", dataset=str(tmp_path / "ds"), split="test"))] == ["gamma"]
    with pytest.raises(ConfigError, match="no split 'dev'"):
        records(SourceConfig("hf", dataset=str(tmp_path / "ds"), split="dev"))


def test_source_config_mistakes(tmp_path):
    with pytest.raises(ConfigError, match="either paths or dataset"):
        SourceConfig("s")
    with pytest.raises(ConfigError, match="weight must be positive"):
        SourceConfig("s", paths=["x"], weight=0)
    with pytest.raises(InputFileError, match="matches no files"):
        records(SourceConfig("s", paths=[f"{tmp_path}/*.nothing"]))
    (tmp_path / "ok.txt").write_text(json.dumps({"text": "x"}))
    assert records(SourceConfig("s", paths=[str(tmp_path / "ok.txt")], format="jsonl"))[0].text == "x"


def test_truncated_compressed_file_keeps_what_was_read_and_reports_the_rest(tmp_path):
    import gzip

    payload = gzip.compress("".join(json.dumps({"text": f"document {n} " * 50}) + "\n" for n in range(400)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(payload[: len(payload) // 2])
    got = records(SourceConfig("z", paths=[str(tmp_path / "cut.jsonl.gz")]))
    assert all(isinstance(r, Document) for r in got[:-1]) and len(got) > 10
    assert isinstance(got[-1], ReadFailure) and got[-1].issue == "unreadable_file" and "cannot read on from here" in got[-1].detail


def test_bom_json_arrays_crlf_paragraphs_and_other_compressions(tmp_path):
    import bz2
    import lzma

    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "array.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    (tmp_path / "crlf.txt").write_bytes(b"one\r\n\r\ntwo\r\n\r\nthree\r\n")
    (tmp_path / "x.jsonl.bz2").write_bytes(bz2.compress(b'{"text": "bz"}\n'))
    (tmp_path / "y.txt.xz").write_bytes(lzma.compress(b"xz text"))
    assert [d.text for d in records(SourceConfig("s", paths=[str(tmp_path / "bom.jsonl")]))] == ["first", "second"]
    assert [d.id.rsplit(":", 1)[1] for d in records(SourceConfig("s", paths=[str(tmp_path / "array.json")]))] == ["item0", "item1"]
    assert [d.text for d in records(SourceConfig("s", paths=[str(tmp_path / "crlf.txt")], text_unit="paragraph"))] == ["one", "two", "three\n"]
    assert [d.text for d in records(SourceConfig("s", paths=[str(tmp_path / "x.jsonl.bz2"), str(tmp_path / "y.txt.xz")]))] == ["bz", "xz text"]


def test_a_file_named_twice_is_read_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("alpha")
    got = records(SourceConfig("s", paths=[str(tmp_path), str(tmp_path / "sub" / "a.txt"), f"{tmp_path}/**/*"]))
    assert [d.text for d in got] == ["alpha"]


def test_format_hf_needs_a_dataset_and_a_source_needs_a_name():
    from scratchlm.config import build

    with pytest.raises(ConfigError, match="format hf reads a Hugging Face dataset"):
        SourceConfig("s", paths=["x.csv"], format="hf")
    with pytest.raises(ConfigError, match="sources\\[0\\]: missing key 'name'"):
        build(SourceConfig, {"paths": ["x"]}, "c.toml: sources[0]")
    with pytest.raises(ConfigError, match="must be a string"):
        build(PIIConfig, {"email": False}, "[pii]")


def bomb(path, megabytes: int = 200) -> None:
    """A gzip file of a JSON line holding `megabytes` MB of text, then a good line: it
    compresses about 1000 to 1."""
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(b'{"text": "')
        for _ in range(megabytes):
            handle.write(b"a" * 1_000_000)
        handle.write(b'"}\n{"text": "good"}\n')


def test_a_gzip_bomb_is_rejected_as_too_large_without_being_read_whole(tmp_path):
    bomb(tmp_path / "bomb.jsonl.gz")
    shutil.copy(tmp_path / "bomb.jsonl.gz", tmp_path / "bomb.txt.gz")  # the same bytes, read as one text
    tracemalloc.start()
    try:
        as_text = records(SourceConfig("t", paths=[str(tmp_path / "bomb.txt.gz")], max_document_bytes="64KiB"))
        as_lines = records(SourceConfig("j", paths=[str(tmp_path / "bomb.jsonl.gz")], max_document_bytes="64KiB"))
        as_paragraphs = records(SourceConfig("p", paths=[str(tmp_path / "bomb.txt.gz")], text_unit="paragraph", max_document_bytes="64KiB"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # reading either whole takes 200 MB; measured: under 1 MB
    (whole,) = as_text
    assert (whole.issue, whole.nbytes) == ("too_large", 65_537)  # read as far as one byte over the limit
    assert whole.detail == (f"{tmp_path}/bomb.txt.gz: more than 65,536 bytes (a text file is read whole; "
                            'text_unit = "paragraph" or "line" reads it in pieces), over max_document_bytes = 64KiB')
    too_long, good = as_lines
    assert (too_long.id, too_long.issue, too_long.nbytes) == (f"{tmp_path}/bomb.jsonl.gz:1", "too_large", 200_000_013)
    assert too_long.detail.endswith("bomb.jsonl.gz:1: a line of 200,000,013 bytes, over max_document_bytes = 64KiB")
    assert (good.id, good.text) == (f"{tmp_path}/bomb.jsonl.gz:2", "good")
    (paragraph,) = as_paragraphs  # its two lines make one paragraph, counted to the end, held to the limit
    assert (paragraph.id, paragraph.issue, paragraph.nbytes) == (f"{tmp_path}/bomb.txt.gz:1", "too_large", 200_000_030)


def test_every_reader_rejects_a_document_over_max_document_bytes_and_reads_on(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    long = "x" * 2000
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": long}) + "\n\n" + json.dumps({"text": "four"}) + "\n")
    (tmp_path / "b.csv").write_text(f"text\none\n{long}\n\nfour\n\"two\nlines\"\n")
    pq.write_table(pa.table({"text": ["one", long, "three"]}), tmp_path / "c.parquet")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "short"}, {"text": long}], indent=1))  # read whole, as one
    (tmp_path / "e.txt").write_text(long)
    got = records(SourceConfig("s", paths=[str(tmp_path / "*")], max_document_bytes="1KB"))
    outcome = [(r.id.split("/")[-1], r.issue if isinstance(r, ReadFailure) else r.text) for r in got]
    assert outcome == [("a.jsonl:1", "one"), ("a.jsonl:2", "too_large"), ("a.jsonl:4", "four"),
                       ("b.csv:2", "one"), ("b.csv:3", "too_large"), ("b.csv:5", "four"), ("b.csv:6", "two\nlines"),
                       ("c.parquet:row0", "one"), ("c.parquet:row1", "too_large"), ("c.parquet:row2", "three"),
                       ("d.json", "too_large"), ("e.txt", "too_large")]  # fmt: skip
    details = {r.id.split("/")[-1]: r.detail.split("/")[-1] for r in got if isinstance(r, ReadFailure)}
    assert details["c.parquet:row1"] == "c.parquet:row1: a text of 2,000 bytes, over max_document_bytes = 1KB"
    assert details["d.json"] == "d.json: a JSON array of more than 1,000 bytes (read whole: convert it to JSONL), over max_document_bytes = 1KB"


def split_the_old_way(path, text_unit: str) -> list:
    """What the text reader gave before it streamed: the whole file decoded and split at blank
    lines or line breaks, then the report of its undecodable bytes (which now comes after the
    documents, when their count is known)."""
    raw = path.read_bytes()
    text, bad = decode_text(raw)
    got = []
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    separator = "\n\n" if text_unit == "paragraph" else "\n"
    line = 1
    for part in text.split(separator):
        if part.strip():
            got.append((f"{path}:{line}", part))
        line += part.count("\n") + separator.count("\n")
    if bad:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
        got.append(("issue", f"{path}:{line}", f"{bad} undecodable bytes replaced with U+FFFD (first on line {line})"))
    return got


def outcomes(config: SourceConfig) -> list:
    return [("issue", r.where, r.detail) if isinstance(r, ReadIssue) else (r.id, r.text) for r in records(config)]


def test_paragraphs_and_lines_of_a_file_over_the_limit_are_each_held_to_it(tmp_path):
    paragraphs = [f"Paragraph {n}, line one.\r\nLine two of {n}." for n in range(1500)]
    paragraphs[700] = "x" * 5000  # the one paragraph (and line) over 1 KB
    text = "\r\n\r\n".join(paragraphs) + "\r\n"
    (tmp_path / "book.txt").write_text(text, newline="")
    (tmp_path / "book.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "whole.txt").write_text(text.replace("x" * 5000, "x"), newline="")  # read whole, the old way
    expected = split_the_old_way(tmp_path / "whole.txt", "paragraph")
    for name in ("book.txt", "book.txt.gz"):
        got = records(SourceConfig("b", paths=[str(tmp_path / name)], text_unit="paragraph", max_document_bytes="1KB"))
        assert len(text) > 50_000 and len(got) == 1500
        (failure,) = [r for r in got if isinstance(r, ReadFailure)]
        assert (failure.id, failure.issue, failure.nbytes) == (f"{tmp_path}/{name}:2101", "too_large", 5002)
        assert failure.detail == f"{tmp_path}/{name}:2101: a paragraph of 5,002 bytes, over max_document_bytes = 1KB"
        kept = [(r.id.split(":")[-1], r.text) for r in got if isinstance(r, Document)]
        assert kept == [(id.split(":")[-1], part) for id, part in expected if part != "x"]
    lines = records(SourceConfig("b", paths=[str(tmp_path / "book.txt")], text_unit="line", max_document_bytes="1KB"))
    (failure,) = [r for r in lines if isinstance(r, ReadFailure)]
    assert (failure.id.split("/")[-1], failure.nbytes) == ("book.txt:2101", 5002)
    assert failure.detail.endswith("book.txt:2101: a line of 5,002 bytes, over max_document_bytes = 1KB")
    kept = [(r.id.split(":")[-1], r.text) for r in lines if isinstance(r, Document)]
    assert kept == [(id.split(":")[-1], line) for id, line in split_the_old_way(tmp_path / "whole.txt", "line") if line != "x"]


@given(st.lists(st.sampled_from(["word", " ", "\t", "\n", "\n\n", "\r", "\r\n", "é", "\ufeff", "\xff", "\xe2\x82", "\ufffd"]), min_size=1, max_size=40),
       st.sampled_from(["paragraph", "line"]))
def test_paragraphs_and_lines_under_the_limit_are_those_of_splitting_the_whole_text(tmp_path_factory, pieces, text_unit):
    raw = b"".join(p.encode("latin-1") if p in ("\xff", "\xe2\x82") else p.encode() for p in pieces)
    if not raw.strip():
        return  # an empty file, refused before any splitting
    path = tmp_path_factory.mktemp("t") / "f.txt"
    path.write_bytes(raw)
    assert outcomes(SourceConfig("s", paths=[str(path)], text_unit=text_unit)) == split_the_old_way(path, text_unit)


def test_a_truncated_compressed_text_keeps_its_paragraphs_and_names_the_first_one_lost(tmp_path):
    payload = gzip.compress("".join(f"paragraph {n}\nsecond line {n}\n\n" for n in range(4000)).encode())
    (tmp_path / "cut.txt.gz").write_bytes(payload[: len(payload) // 2])
    got = records(SourceConfig("z", paths=[str(tmp_path / "cut.txt.gz")], text_unit="paragraph"))
    *kept, failure = got
    assert len(kept) > 100 and [d.id.split(":")[-1] for d in kept] == [str(1 + 3 * n) for n in range(len(kept))]
    assert (failure.issue, failure.id.split(":")[-1]) == ("unreadable_file", str(1 + 3 * len(kept)))
    assert "cannot read on from here" in failure.detail


def test_max_document_bytes_must_be_a_positive_size():
    with pytest.raises(ConfigError, match="source 's': max_document_bytes: 'lots' is not a size"):
        SourceConfig("s", paths=["x"], max_document_bytes="lots")
    with pytest.raises(ConfigError, match="source 's': max_document_bytes must be positive"):
        SourceConfig("s", paths=["x"], max_document_bytes="0")
    assert SourceConfig("s", paths=["x"]).document_limit == 8_000_000


def test_deeply_nested_json_is_a_malformed_line_not_a_crash(tmp_path):
    (tmp_path / "deep.jsonl").write_text(json.dumps({"text": "before"}) + "\n" + "[" * 100_000 + "\n" + json.dumps({"text": "after"}) + "\n")
    (tmp_path / "deep.json").write_text("[" * 100_000)  # a file starting with `[` is one JSON array
    before, deep, after, array = records(SourceConfig("s", paths=[str(tmp_path / "deep.jsonl"), str(tmp_path / "deep.json")]))
    assert (before.text, after.text) == ("before", "after")
    assert (deep.id, deep.issue, deep.detail) == (f"{tmp_path}/deep.jsonl:2", "malformed_json", f"{tmp_path}/deep.jsonl:2: malformed JSON (nested too deeply)")
    assert (array.issue, array.detail) == ("malformed_json", f"{tmp_path}/deep.json:1: malformed JSON array (nested too deeply)")


def test_symlink_loops_end_and_each_real_file_is_read_once(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.txt").write_text("beta")
    (root / "self").symlink_to(".")  # two loops: Python's own `**` lists paths exponentially
    (root / "sub" / "up").symlink_to("..")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.txt").write_text("gamma")
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    with finishes_within(60):
        by_glob = records(SourceConfig("s", paths=[f"{root}/**/*.txt"]))
        by_folder = records(SourceConfig("s", paths=[str(root)]))
    assert [d.text for d in by_glob] == ["alpha", "gamma", "beta"]  # `**` follows links to folders, each real folder once
    assert [d.text for d in by_folder] == ["alpha", "beta"]  # a folder walk does not follow links to folders
