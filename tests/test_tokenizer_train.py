"""The BPE trainer: incremental merges equal the naive reference, deterministically."""

import pytest

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.tokenizer import DEFAULT_SPECIAL_TOKENS, train_bpe, train_bpe_reference, train_tokenizer
from scratchlm.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN, count_chunks, resolve_pattern
from scratchlm.tokenizer.train import TrainReport, learn_merges, merge_pair

SMALL_CORPORA = {
    "ties": "ab cd ef gh ab cd ef gh",  # every pair occurs equally often
    "repeats": "aaaaaaa aaaa aa a aaaaaaaaa bbbb abab abababab",  # overlapping (a, a) pairs
    "unicode": "héllo wörld 日本語 日本 héllo привет привет мир 🙂🙂🙂",
    "code": "for i in range(10):\n    print(i)\nfor j in range(20):\n    print(j, i)\n" * 3,
}


@pytest.mark.parametrize("name", SMALL_CORPORA)
@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
def test_incremental_trainer_learns_the_same_merges_as_reference(name, pattern):
    chunks = count_chunks(SMALL_CORPORA[name], pattern)
    assert learn_merges(chunks, 60, min_frequency=1) == train_bpe_reference(chunks, 60, min_frequency=1)


def test_incremental_trainer_matches_reference_on_real_prose(embedded_sample):
    chunks = count_chunks(embedded_sample[:60_000], GPT4_PATTERN)
    assert learn_merges(chunks, 150) == train_bpe_reference(chunks, 150)


def test_ties_are_broken_by_smallest_pair_of_ids():
    # (101,102), (99,100), (97,98) each occur twice: the smallest pair wins, not the first seen.
    merges = learn_merges(count_chunks("ef,cd,ab,ef,cd,ab", GPT2_PATTERN), 3, min_frequency=1)
    assert merges == [(97, 98), (99, 100), (101, 102)]


def test_training_is_deterministic_across_worker_counts(embedded_sample):
    blocks = [embedded_sample[i : i + 20_000] for i in range(0, len(embedded_sample), 20_000)]
    one = train_bpe(blocks, 600, workers=1)
    two = train_bpe(blocks, 600, workers=2)
    assert one.ranks == two.ranks and one.content_hash == two.content_hash


def test_special_tokens_take_the_top_ids():
    tok = train_bpe(["hello hello world world"], 265, special_tokens=DEFAULT_SPECIAL_TOKENS, workers=1, min_frequency=1)
    assert tok.vocab_size == 265
    assert sorted(tok.special_tokens.values()) == [262, 263, 264]
    assert tok.special_tokens["<|endoftext|>"] == 262


def test_merges_never_cross_chunk_boundaries():
    tok = train_bpe(["x. y. x. y. x. y. xx.yy."] * 50, 300, pattern=GPT2_PATTERN, workers=1, min_frequency=1)
    for token in tok.ranks:
        assert not (b"." in token and any(c in token for c in b"xy")), token


def test_special_token_strings_in_corpus_are_not_learned():
    tok = train_bpe(["a<|endoftext|>b" * 100], 300, workers=1, min_frequency=1)
    assert not any(b"|" in t and len(t) > 1 and b"end" in t for t in tok.ranks)


def test_min_frequency_stops_training_early_and_says_so():
    report = TrainReport()
    tok = train_bpe(["abc abd"], 400, workers=1, min_frequency=2, report=report)
    assert report.merges == 1  # only (a, b) occurs twice
    assert "only 1 of" in report.stopped_early
    assert tok.vocab_size == 256 + 1 + len(DEFAULT_SPECIAL_TOKENS)


def test_vocab_smaller_than_bytes_plus_specials_is_refused():
    with pytest.raises(ConfigError, match="at least 259"):
        train_bpe(["abc"], 258)


def test_empty_corpus_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputFileError, match="empty"):
        train_tokenizer([empty], 300, workers=1)


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(InputFileError, match="nope.txt"):
        train_tokenizer([tmp_path / "nope.txt"], 300)


def test_unknown_pattern_is_a_config_error():
    with pytest.raises(ConfigError, match="neither a known name"):
        resolve_pattern("(unclosed")


def test_train_from_directory_streams_all_files_and_respects_max_bytes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha beta gamma\n" * 100)
    (tmp_path / "sub" / "b.txt").write_text("delta epsilon\n" * 100)
    tok, report, read = train_tokenizer([tmp_path], 300, workers=1)
    assert read.files == 2 and read.bytes_read == 1700 + 1400
    _, _, capped = train_tokenizer([tmp_path], 300, workers=1, max_bytes=1000)
    assert capped.files == 1 and capped.bytes_read == 1000


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text \xff\xfe here, and a real \xef\xbf\xbd replacement char\n" * 3)
    tok, _, read = train_tokenizer([path], 300, workers=1, min_frequency=1)
    assert read.undecodable_bytes == {str(path): 6}


def test_merge_pair_replaces_left_to_right_without_overlap():
    assert merge_pair([1, 1, 1, 2, 1, 1], 1, 1, 9) == [9, 1, 2, 9]


def test_hidden_files_and_folders_are_not_corpus(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "index").write_bytes(b"\x00binary")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "a.txt").write_text("visible text\n")
    _, _, read = train_tokenizer([tmp_path], 260, workers=1, min_frequency=1)
    assert read.files == 1


def test_max_bytes_cutting_a_character_is_not_reported_as_undecodable(tmp_path):
    path = tmp_path / "utf.txt"
    path.write_bytes("aaaa\u00e9\u00e9\n".encode())
    _, _, read = train_tokenizer([path], 260, workers=1, min_frequency=1, max_bytes=5)
    assert read.total_undecodable == 0
