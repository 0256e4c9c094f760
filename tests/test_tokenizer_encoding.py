"""Encoding and decoding: round trips, special tokens, partial UTF-8, files."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.errors import ScratchLMError, SpecialTokenInTextError
from scratchlm.tokenizer import Tokenizer, TokenizerFormatError, load_tokenizer, train_bpe
from scratchlm.tokenizer.pretokenize import GPT2_PATTERN, count_chunks

from conftest import VARIED_TEXT


@pytest.fixture(scope="module")
def tok(embedded_sample) -> Tokenizer:
    return train_bpe([embedded_sample, VARIED_TEXT], 1000, workers=1)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_decode_of_encode_is_identity_for_any_unicode(tok, text):
    assert tok.decode(tok.encode_ordinary(text)) == text


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.one_of(st.text(max_size=20), st.sampled_from(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))))
def test_round_trip_with_special_tokens_allowed(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text, allowed_special="all")
    assert tok.decode(ids) == text
    assert ids.count(tok.eot_id) == text.count("<|endoftext|>")


@settings(max_examples=100, deadline=None)
@given(text=st.text(min_size=1))
def test_decode_bytes_is_exact_and_partial_utf8_never_raises(tok, text):
    ids = tok.encode_ordinary(text)
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    for cut in range(len(ids)):
        tok.decode(ids[:cut])  # a prefix may end inside a character: replacement, no error


def test_partial_utf8_sequence_decodes_to_replacement_char(tok):
    emoji_ids = [tok.ranks[bytes([b])] for b in "🙂".encode()]
    assert tok.decode(emoji_ids[:2]) == "\ufffd"
    assert tok.decode_bytes(emoji_ids[:2]) == "🙂".encode()[:2]


def test_special_token_in_text_is_an_error_unless_allowed(tok):
    with pytest.raises(SpecialTokenInTextError, match="<\\|endoftext\\|>' at character 6"):
        tok.encode("hello <|endoftext|>")
    assert tok.encode("hello <|endoftext|>", allowed_special={"<|endoftext|>"})[-1] == tok.eot_id
    ordinary = tok.encode_ordinary("<|endoftext|>")
    assert tok.eot_id not in ordinary and tok.decode(ordinary) == "<|endoftext|>"
    with pytest.raises(ScratchLMError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_batch_encoding_matches_single_encoding_with_threads(tok, embedded_sample):
    texts = [embedded_sample[i : i + 3000] for i in range(0, 60_000, 3000)] + [VARIED_TEXT]
    single = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=1) == single
    assert tok.encode_batch(texts, num_threads=2) == single
    with pytest.raises(SpecialTokenInTextError, match="text 1"):
        tok.encode_batch(["fine", "not <|im_end|> fine"])


def test_encoding_follows_learned_merges():
    tok = train_bpe(["low lower lowest " * 20], 262, pattern=GPT2_PATTERN, workers=1, special_tokens=())
    # The first merges build "low" from its bytes; " low" and "lower" share them.
    assert tok.decode_bytes(tok.encode("low")) == b"low" and len(tok.encode("low")) == 1
    chunks = count_chunks("low lower lowest " * 20, GPT2_PATTERN)
    assert set(chunks) == {"low", " low", " lower", " lowest", " "}


def test_unknown_token_id_is_a_clear_error(tok):
    with pytest.raises(ScratchLMError, match="token id 999999 is not in the vocabulary"):
        tok.decode([999999])


def test_save_load_round_trip_keeps_everything(tok, tmp_path):
    path = tok.save(tmp_path / "tok.json")
    back = Tokenizer.load(path)
    assert back.ranks == tok.ranks and back.special_tokens == tok.special_tokens
    assert back.pattern == tok.pattern and back.content_hash == tok.content_hash
    assert back.encode(VARIED_TEXT) == tok.encode(VARIED_TEXT)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def test_corrupt_and_foreign_files_are_refused(tok, tmp_path):
    data = tok.to_dict()
    data["tokens"][300][1] = data["tokens"][301][1]  # tampered content: hash no longer matches
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerFormatError, match="hash does not match"):
        Tokenizer.load(tmp_path / "edited.json")
    good = json.dumps(tok.to_dict())
    (tmp_path / "cut.json").write_text(good[: len(good) // 2])
    with pytest.raises(TokenizerFormatError, match="cut.json"):
        load_tokenizer(tmp_path / "cut.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(TokenizerFormatError, match="neither a scratchlm tokenizer"):
        load_tokenizer(tmp_path / "other.json")
    data = tok.to_dict()
    data["version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerFormatError, match="version 99"):
        Tokenizer.load(tmp_path / "future.json")


def test_merges_are_recovered_from_ranks(tok):
    merges = tok.merges()
    assert len(merges) == len(tok.ranks) - 256
    for (left, right), (token, rank) in zip(merges, sorted(((t, r) for t, r in tok.ranks.items() if len(t) > 1), key=lambda x: x[1])):
        assert left + right == token
        assert tok.ranks[left] < rank and tok.ranks[right] < rank


def test_vocabulary_without_all_bytes_is_refused():
    with pytest.raises(TokenizerFormatError, match="single-byte tokens"):
        Tokenizer({b"a": 0}, {}, "gpt2")
