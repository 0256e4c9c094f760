"""Hugging Face checkpoints in and out, checked against transformers itself: a checkpoint made
by transformers imports with equal logits, and an export loads in transformers with equal
logits and an equal tokenizer. Tiny random models, offline."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open

from scratchlm.atomic_io import OutputFileError
from scratchlm.errors import ModelFormatError, ScratchLMError
from scratchlm.interop import open_model
from scratchlm.interop.hf import config_from_hf, export_hf, from_hf_state_dict, import_hf, to_hf_state_dict
from scratchlm.model import GPT, ModelConfig
from scratchlm.tokenizer import Tokenizer, save_hf_tokenizer, to_hf_tokenizer_json, train_bpe
from scratchlm.tokenizer.bytelevel import bytes_to_token_string
from scratchlm.tokenizer.formats import hf_tokenizer_from_dict

from conftest import VARIED_TEXT

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 320  # a little more than the tokenizer's 300 tokens: embeddings padded, as pretraining does
TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 64, "vocab_size": VOCAB, "rms_norm_eps": 1e-5}
GPT2_TINY = {"vocab_size": VOCAB, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "bos_token_id": 0, "eos_token_id": 0}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe([VARIED_TEXT * 3, "The quick brown fox jumps over the lazy dog. " * 20], vocab_size=300, workers=1, min_frequency=1)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn afresh, large enough that a misplaced tensor changes the logits
    far beyond the tolerance (default inits leave norms at 1 and biases at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def token_batch(seed: int = 1, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours: GPT, theirs, ids: torch.Tensor, tolerance: float = 1e-5) -> None:
    with torch.no_grad():
        expected = theirs(ids).logits
        got, _ = ours(ids)
    assert got.shape == expected.shape
    assert expected.abs().max() > 0.5  # the comparison is not between near-zero numbers
    assert (got - expected).abs().max().item() < tolerance


# ---- checkpoints made by transformers -------------------------------------------------------
def hf_model(kind: str):
    t = transformers
    makers = {
        "gpt2-tied": lambda: t.GPT2LMHeadModel(t.GPT2Config(**GPT2_TINY)),
        "gpt2-untied": lambda: t.GPT2LMHeadModel(t.GPT2Config(**GPT2_TINY, n_inner=40, activation_function="gelu_pytorch_tanh",
                                                              tie_word_embeddings=False)),
        "llama-gqa-tied": lambda: t.LlamaForCausalLM(t.LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=True,
                                                                   rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
        "llama-gqa-untied": lambda: t.LlamaForCausalLM(t.LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=False)),
        "llama-biases": lambda: t.LlamaForCausalLM(t.LlamaConfig(**TINY, num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=None)),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)),
    }
    torch.manual_seed(0)
    return randomize_(makers[kind]())


def stored_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as stored:
        return {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118 (not a dict)


def save_hf_folder(model, tokenizer: Tokenizer, folder, **save_options):
    model.save_pretrained(folder, **save_options)
    save_hf_tokenizer(tokenizer, folder / "tokenizer.json")
    return folder


@pytest.mark.parametrize("kind", ["gpt2-tied", "gpt2-untied", "llama-gqa-tied", "llama-gqa-untied", "llama-biases", "mistral", "qwen3"])
def test_imported_checkpoint_gives_transformers_logits(kind, tokenizer, tmp_path):
    theirs = hf_model(kind)
    ours, ours_tokenizer = import_hf(save_hf_folder(theirs, tokenizer, tmp_path), progress=False)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert ours.config.tie_embeddings == theirs.config.tie_word_embeddings
    assert ours_tokenizer.encode(VARIED_TEXT) == tokenizer.encode(VARIED_TEXT)
    assert_same_logits(ours, theirs, token_batch())


def test_sharded_checkpoint_imports_shard_by_shard(tokenizer, tmp_path):
    theirs = hf_model("llama-gqa-untied")
    save_hf_folder(theirs, tokenizer, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours, _ = import_hf(tmp_path, progress=False)
    assert_same_logits(ours, theirs, token_batch())


def test_open_model_opens_a_hugging_face_folder(tokenizer, tmp_path):
    theirs = hf_model("qwen3")
    ours = open_model(save_hf_folder(theirs, tokenizer, tmp_path), kind="language-model").model
    assert not ours.training
    assert_same_logits(ours, theirs, token_batch())


def test_bfloat16_checkpoint_is_upcast_to_float32(tokenizer, tmp_path):
    save_hf_folder(hf_model("qwen3").to(torch.bfloat16), tokenizer, tmp_path)
    ours, _ = import_hf(tmp_path, progress=False)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    embed = stored_tensors(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    assert embed.dtype == torch.bfloat16 and torch.equal(ours.embed.weight, embed.float())
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_same_logits(ours, reference, token_batch())


def test_import_reads_chat_template_and_special_token_ids(tokenizer, tmp_path):
    save_hf_folder(hf_model("qwen3"), tokenizer, tmp_path)
    im_end, eot = tokenizer.special_tokens["<|im_end|>"], tokenizer.special_tokens["<|endoftext|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>", "add_bos_token": False}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": eot, "eos_token_id": [im_end, eot]}))
    _, imported = import_hf(tmp_path, progress=False)
    assert imported.metadata["chat_template"] == CHATML
    assert (imported.metadata["bos_token_id"], imported.metadata["eos_token_id"]) == (eot, im_end)
    assert imported.metadata["eos_token_ids"] == [im_end, eot]
    assert imported.metadata["add_bos_token"] is False


def test_import_prefers_chat_template_file_and_falls_back_to_token_strings(tokenizer, tmp_path):
    save_hf_folder(hf_model("llama-gqa-tied"), tokenizer, tmp_path)
    (tmp_path / "generation_config.json").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("bos_token_id"), config.pop("eos_token_id")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}, "chat_template": "old"}))
    (tmp_path / "chat_template.jinja").write_text(CHATML)  # what transformers 5 writes
    _, imported = import_hf(tmp_path, progress=False)
    assert imported.metadata["chat_template"] == CHATML
    assert imported.metadata["eos_token_id"] == tokenizer.special_tokens["<|im_end|>"]
    assert "bos_token_id" not in imported.metadata


# ---- our models exported ---------------------------------------------------------------
OUR_FAMILIES = {
    "gpt2": (ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=32), "GPT2LMHeadModel"),
    "gpt2-untied": (ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=32, mlp_hidden=40, tie_embeddings=False), "GPT2LMHeadModel"),
    "llama": (ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, positions="rope", rope_base=500.0,
                          norm="rmsnorm", mlp="swiglu", bias=False), "LlamaForCausalLM"),
    "llama-biases": (ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=32, positions="rope", norm="rmsnorm",
                                 mlp="swiglu", bias=True, tie_embeddings=False), "LlamaForCausalLM"),
    # What the default CPU recipe trains: Llama-style with QK-norm and an untied head.
    "qk-norm": (ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, positions="rope", norm="rmsnorm",
                            mlp="swiglu", bias=False, qk_norm=True, tie_embeddings=False), "Qwen3ForCausalLM"),
}


def our_model(kind: str) -> GPT:
    torch.manual_seed(0)
    return randomize_(GPT(OUR_FAMILIES[kind][0]), seed=3)


@pytest.mark.parametrize("kind", list(OUR_FAMILIES))
def test_export_loads_in_transformers_with_equal_logits_and_tokens(kind, tokenizer, tmp_path):
    ours = our_model(kind)
    out = export_hf(ours, tokenizer, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == OUR_FAMILIES[kind][1]
    assert next(theirs.parameters()).dtype == torch.float32
    assert_same_logits(ours, theirs, token_batch(length=40))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode(VARIED_TEXT)
    assert hf_tokenizer(VARIED_TEXT)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == VARIED_TEXT
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.model_max_length == 64


def explicit(config: ModelConfig) -> ModelConfig:
    """None in n_kv_head and mlp_hidden means "derived"; an imported config states the values."""
    return config.replace(n_kv_head=config.kv_heads, mlp_hidden=config.hidden)


@pytest.mark.parametrize("kind", list(OUR_FAMILIES))
def test_round_trip_through_hugging_face_keeps_every_tensor(kind, tokenizer, tmp_path):
    ours = our_model(kind)
    back, back_tokenizer = import_hf(export_hf(ours, tokenizer, tmp_path / "hf"), progress=False)
    assert explicit(back.config) == explicit(ours.config)
    before, after = ours.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert back_tokenizer.ranks == tokenizer.ranks and back_tokenizer.special_tokens == tokenizer.special_tokens


def test_hugging_face_tensors_round_trip_through_our_names(tokenizer, tmp_path):
    save_hf_folder(hf_model("gpt2-untied"), tokenizer, tmp_path)
    ours, _ = import_hf(tmp_path, progress=False)
    original = stored_tensors(tmp_path / "model.safetensors")
    written = to_hf_state_dict(ours)
    assert written.keys() == original.keys()
    assert all(torch.equal(written[name], original[name]) for name in original)


def test_bfloat16_export_is_stored_in_bfloat16(tokenizer, tmp_path):
    ours = our_model("qk-norm")
    out = export_hf(ours, tokenizer, tmp_path / "hf", dtype="bfloat16")
    assert {tensor.dtype for tensor in stored_tensors(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    back, _ = import_hf(out, progress=False)
    assert_same_logits(back, theirs, token_batch())


def with_metadata(tokenizer: Tokenizer, **metadata) -> Tokenizer:
    return Tokenizer(tokenizer.ranks, tokenizer.special_tokens, tokenizer.pattern, tokenizer.name,
                     tokenizer.metadata | metadata, tokenizer.vocab_size)


def test_export_keeps_ids_of_a_vocabulary_with_special_tokens_first_and_a_missing_byte(tokenizer, tmp_path):
    """SmolLM2's layout: special tokens at ids 0..16 and a few control bytes with no token.
    transformers must give the specials their own ids and skip the missing byte, as we do."""
    data = to_hf_tokenizer_json(tokenizer)
    specials = {token: n for n, token in enumerate(tokenizer.special_tokens)}
    shift = len(specials)
    data["added_tokens"] = [entry | {"id": specials[entry["content"]]} for entry in data["added_tokens"]]
    ordinary = {token: i + shift for token, i in data["model"]["vocab"].items()
                if token not in specials and token != bytes_to_token_string(b"\x04")}
    data["model"]["vocab"] = specials | ordinary
    odd = hf_tokenizer_from_dict(data, "test")
    assert odd.special_tokens["<|endoftext|>"] == 0 and odd.ranks[b"\x04"] >= odd.vocab_size
    out = export_hf(our_model("llama"), odd, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "<|im_start|>user\n" + VARIED_TEXT + "\x04 control\x04byte<|im_end|>\n"
    assert hf_tokenizer(text)["input_ids"] == odd.encode(text, allowed_special="all")
    _, back = import_hf(out, progress=False)
    assert (back.ranks, back.special_tokens, back.vocab_size) == (odd.ranks, odd.special_tokens, odd.vocab_size)


def test_chat_template_and_stop_token_survive_export(tokenizer, tmp_path):
    chat = with_metadata(tokenizer, chat_template=CHATML, eos_token_id=tokenizer.special_tokens["<|im_end|>"])
    out = export_hf(our_model("qk-norm"), chat, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Hi there"}]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert hf_tokenizer.eos_token == "<|im_end|>"
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == chat.special_tokens["<|im_end|>"]
    _, back = import_hf(out, progress=False)
    assert back.metadata["chat_template"] == CHATML and back.metadata["eos_token_id"] == generation.eos_token_id


def test_bos_token_is_prepended_by_transformers_when_the_model_expects_it(tokenizer, tmp_path):
    bos = tokenizer.special_tokens["<|endoftext|>"]
    out = export_hf(our_model("llama"), with_metadata(tokenizer, add_bos_token=True, bos_token_id=bos), tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer("the fox")["input_ids"] == [bos, *tokenizer.encode("the fox")]
    _, back = import_hf(out, progress=False)
    assert back.metadata["add_bos_token"] is True and back.metadata["bos_token_id"] == bos


# ---- refusals ----------------------------------------------------------------------------
def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, ScratchLMError) and "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.fixture
def llama_folder(tokenizer, tmp_path):
    return save_hf_folder(hf_model("llama-gqa-tied"), tokenizer, tmp_path / "llama")


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize("changes, fragments", [
    ({"model_type": "bert"}, ("model_type 'bert'", "supported: gpt2, llama, mistral, qwen3")),
    ({"model_type": "qwen2"}, ("qwen2", "all-or-nothing")),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ("'rope_scaling'", "llama3")),
    ({"hidden_act": "gelu"}, ("'hidden_act'", "silu")),
    ({"head_dim": 16}, ("'head_dim'", "hidden_size / num_attention_heads")),
    ({"attention_bias": True}, ("'attention_bias'",)),
    ({"model_type": "mistral", "sliding_window": 16}, ("'sliding_window'", "sliding-window")),
])
def test_unrepresentable_config_is_refused_naming_the_key(llama_folder, changes, fragments):
    edit_config(llama_folder, **changes)
    with pytest.raises(ModelFormatError) as error:
        import_hf(llama_folder, progress=False)
    assert_one_line(error, "config.json", *fragments)


def test_mistral_window_as_long_as_the_context_is_plain_attention(llama_folder):
    edit_config(llama_folder, model_type="mistral", sliding_window=64)
    model, _ = import_hf(llama_folder, progress=False)
    assert model.config.block_size == 64


def test_pickle_only_checkpoint_is_refused_unread(llama_folder):
    (llama_folder / "model.safetensors").unlink()
    (llama_folder / "pytorch_model.bin").write_bytes(b"\x80\x04 would run code if unpickled")
    with pytest.raises(ModelFormatError) as error:
        import_hf(llama_folder, progress=False)
    assert_one_line(error, "pytorch_model.bin", "pickle", "safetensors")


def test_missing_tokenizer_json_is_refused(llama_folder):
    (llama_folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError) as error:
        import_hf(llama_folder, progress=False)
    assert_one_line(error, "tokenizer.json")


def test_missing_or_misshaped_tensor_is_named(llama_folder):
    config, family = config_from_hf(json.loads((llama_folder / "config.json").read_text()))
    assert family == "llama"
    tensors = stored_tensors(llama_folder / "model.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ModelFormatError) as error:
        from_hf_state_dict(config, "llama", missing)
    assert_one_line(error, "'model.layers.1.self_attn.k_proj.weight'", "missing")
    with pytest.raises(ModelFormatError) as error:
        from_hf_state_dict(config, "llama", tensors | {"model.norm.weight": torch.ones(31)})
    assert_one_line(error, "'model.norm.weight'", "(31,)", "(32,)")
    with pytest.raises(ModelFormatError) as error:
        from_hf_state_dict(config, "llama", tensors | {"model.layers.0.self_attn.extra.weight": torch.ones(1)})
    assert_one_line(error, "unexpected tensor 'model.layers.0.self_attn.extra.weight'")


def test_corrupt_safetensors_file_is_refused(llama_folder):
    (llama_folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ModelFormatError) as error:
        import_hf(llama_folder, progress=False)
    assert_one_line(error, "model.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize("changes, fragment", [
    ({"positions": "rope", "norm": "rmsnorm", "mlp": "relu2", "bias": False}, "mlp 'relu2' has no Hugging Face equivalent"),
    ({"norm": "rmsnorm"}, "norm 'rmsnorm' with learned positions"),
    ({"n_kv_head": 2}, "grouped-query attention with learned positions"),
    ({"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "bias": True}, "qk_norm with biases"),
])
def test_export_of_unrepresentable_model_is_refused_naming_the_feature(tokenizer, tmp_path, changes, fragment):
    model = GPT(OUR_FAMILIES["gpt2"][0].replace(**changes))
    with pytest.raises(ModelFormatError) as error:
        export_hf(model, tokenizer, tmp_path / "hf")
    assert_one_line(error, fragment, "supported:")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())


def test_export_never_writes_into_a_folder_with_files(tokenizer, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFileError) as error:
        export_hf(our_model("llama"), tokenizer, tmp_path / "hf")
    assert_one_line(error, "not an empty folder")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    export_hf(our_model("llama"), tokenizer, tmp_path / "empty")  # an empty folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hf"]  # no temporary folder left behind
