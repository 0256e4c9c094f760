"""Reading the training corpus in blocks: nothing lost, nothing changed, bad bytes counted."""

from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.text.embedded import docstrings, embedded_corpus_text
from scratchlm.text.reading import ReadReport, read_text_blocks
from scratchlm.units import parse_bytes


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs",)) | st.just("\n")), block=st.integers(1, 64))
def test_blocks_concatenate_to_the_file_whatever_the_block_size(tmp_path_factory, text, block):
    path = tmp_path_factory.mktemp("blocks") / "f.txt"
    path.write_bytes(text.encode())
    report = ReadReport()
    blocks = list(read_text_blocks([path], report, block_bytes=block))
    assert "".join(blocks) == text
    assert all(b.endswith("\n") for b in blocks[:-1])
    assert report.bytes_read == len(text.encode()) and report.total_undecodable == 0


def test_max_bytes_caps_what_is_read(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("line\n" * 1000)
    report = ReadReport()
    text = "".join(read_text_blocks([path], report, max_bytes=52, block_bytes=16))
    assert report.bytes_read == 52 and text == ("line\n" * 11)[:52]


def test_embedded_corpus_is_english_prose_and_respects_budget():
    text = embedded_corpus_text(max_bytes=50_000)
    assert 50_000 <= len(text.encode()) < 80_000
    assert " the " in text and "statement" in text


def test_docstrings_are_read_without_running_code():
    source = 'import sys\nsys.exit(1)\n"""' + "Module documentation. " * 5 + '"""\ndef f():\n    """' + "Explains f. " * 10 + '"""\n'
    assert [d.split()[0] for d in docstrings(source)] == ["Explains"]  # module docstring must come first to count


def test_parse_bytes_accepts_common_suffixes():
    assert parse_bytes("2500") == 2500
    assert parse_bytes("500k") == 500_000
    assert parse_bytes("10MB") == 10_000_000
    assert parse_bytes("1MiB") == 1 << 20
