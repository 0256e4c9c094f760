"""GGUF import and export (scratchlm/interop/gguf.py), checked against the references: the `gguf`
package's dequantisation kernels and Hugging Face transformers' GGUF loader.

The slow part is SmolLM2-135M-Instruct (a real llama.cpp file) against transformers; everything
else runs on tiny models written here with GGUFWriter or `export_gguf`.
"""

import re

import numpy as np
import pytest
import regex
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.errors import ConfigError, InputFileError, ModelFormatError
from scratchlm.gguf_file import open_gguf
from scratchlm.interop import gguf as gguf_interop
from scratchlm.interop.gguf import (
    SUPPORTED_TYPES,
    config_from_gguf,
    export_gguf,
    import_gguf,
    tensor_slots,
    write_tokenizer_metadata,
)
from scratchlm.model import GPT, ModelConfig, get_preset
from scratchlm.model.sampling import FINISHED, SamplingConfig, generate_tokens
from scratchlm.tokenizer import Tokenizer, import_gguf_tokenizer
from scratchlm.tokenizer.pretokenize import GPT4_PATTERN, LLAMA3_PATTERN

from conftest import VARIED_TEXT

# `tokenizer`: conftest's, trained on TINY_TEXT with GPT-4's pattern, the default.

# One tiny model per GGUF family. Sizes that transformers' GGUF loader needs: Qwen3Config has
# no GGUF key for the head size and assumes 128; GPT2Config assumes 1024 positions and a 4x MLP.
FAMILIES = {
    "llama": ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                         positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, rope_base=500.0),
    "qwen3": ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=256, mlp_hidden=128,
                         positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True, tie_embeddings=False),
    "gpt2": ModelConfig(vocab_size=320, block_size=1024, n_layer=2, n_head=4, n_embd=64),
}

SMOLLM2_PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    VARIED_TEXT[:160],
]


def random_model(config: ModelConfig, seed: int = 0) -> GPT:
    """A model whose norm weights and biases are not the 1s and 0s of initialisation, so that a
    norm or bias loaded into the wrong place changes the logits."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def hf_model(path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


# ---- SmolLM2-135M-Instruct against transformers ---------------------------------------------
@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf, monkeypatch_module):
    """transformers' own reading of the same file, loaded once for the module (about 25 s)."""
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return hf_model(smollm2_gguf)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", SMOLLM2_PROMPTS, ids=["chat", "story", "code", "varied"])
def test_smollm2_logits_equal_transformers(smollm2, hf_smollm2, prompt):
    model, tok = smollm2
    ids = torch.tensor([tok.encode(prompt, allowed_special="all")])
    ours = logits(model, ids)
    with torch.no_grad():
        theirs = hf_smollm2(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max abs logit difference {diff:.3g} over {ids.shape[1]} positions")
    assert diff < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("prompt", SMOLLM2_PROMPTS[:2], ids=["chat", "story"])
def test_smollm2_greedy_generation_equals_transformers(smollm2, hf_smollm2, prompt):
    model, tok = smollm2
    ids = tok.encode(prompt, allowed_special="all")
    eos = tok.metadata["eos_token_id"]
    steps = generate_tokens(model, ids, SamplingConfig(temperature=0.0, max_new_tokens=20), eot_id=eos)
    ours = [t for [t] in steps if t != FINISHED]
    with torch.no_grad():
        out = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos, temperature=None, top_p=None, top_k=None)
    assert ours == out[0, len(ids):].tolist()
    assert len(ours) >= 5


@pytest.mark.slow
def test_smollm2_config_and_tokenizer_come_from_the_metadata(smollm2):
    model, tok = smollm2
    assert model.config.replace(norm_eps=1e-5) == get_preset("smollm2-135m")  # eps is float32 1e-5 in the file
    assert abs(model.config.norm_eps - 1e-5) < 1e-10
    assert model.head.weight is model.embed.weight  # no output.weight: tied
    assert not model.training and model.embed.weight.dtype == torch.float32
    assert tok.metadata["bos_token_id"] == 1 and tok.metadata["eos_token_id"] == 2
    assert "<|im_start|>" in tok.metadata["chat_template"]


# ---- every supported tensor type --------------------------------------------------------------
# Offsets of the float16 scale fields in one K-quant block (ggml-common.h's block_q*_K).
K_QUANT_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
QUANT_VOCAB = 320


def quantised(rows: int, cols: int, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Random weights in `qtype`. The `gguf` package cannot quantise to K-quants, so those are
    random blocks whose float16 scales are set to small finite values."""
    if qtype.name not in K_QUANT_F16_FIELDS:
        return quantize(rng.normal(0.0, 0.05, (rows, cols)).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for offset in K_QUANT_F16_FIELDS[qtype.name]:
        scales = rng.uniform(2e-4, 1e-3, len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_quantised_llama(path, qtype: GGMLQuantizationType, tokenizer: Tokenizer, seed: int = 0) -> dict[str, np.ndarray]:
    """A one-layer llama file with every matrix in `qtype` (the stored q/k rows are in llama.cpp's
    permuted order, as any llama file's are) and norms in F32. Returns the stored tensors."""
    n_embd, n_head, n_kv, hidden = 256, 4, 2, 256  # rows of 256 values: K-quant blocks
    head = n_embd // n_head
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    for key, value in [("block_count", 1), ("context_length", 32), ("embedding_length", n_embd), ("feed_forward_length", hidden),
                       ("attention.head_count", n_head), ("attention.head_count_kv", n_kv), ("vocab_size", QUANT_VOCAB)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    write_tokenizer_metadata(writer, tokenizer, QUANT_VOCAB)
    matrices = {"token_embd.weight": (QUANT_VOCAB, n_embd), "blk.0.attn_q.weight": (n_embd, n_embd),
                "blk.0.attn_k.weight": (n_kv * head, n_embd), "blk.0.attn_v.weight": (n_kv * head, n_embd),
                "blk.0.attn_output.weight": (n_embd, n_embd), "blk.0.ffn_gate.weight": (hidden, n_embd),
                "blk.0.ffn_up.weight": (hidden, n_embd), "blk.0.ffn_down.weight": (n_embd, hidden)}
    stored = {name: quantised(*shape, qtype, rng) for name, shape in matrices.items()}
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        stored[name] = rng.uniform(0.5, 1.5, n_embd).astype(np.float32)
    for name, data in stored.items():
        writer.add_tensor(name, data, raw_dtype=qtype if data.ndim == 2 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def from_llama_cpp_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reference for the q/k row order, written from the definition rather than with reshapes:
    llama.cpp's row 2i of a head is Hugging Face's row i, its row 2i + 1 is row i + head/2."""
    head = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for i in range(head // 2):
            out[h * head + i] = w[h * head + 2 * i]
            out[h * head + head // 2 + i] = w[h * head + 2 * i + 1]
    return out


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_each_supported_type_imports_as_the_reference_dequantisation(type_name, tokenizer, tmp_path):
    qtype = GGMLQuantizationType[type_name]
    path = tmp_path / f"{type_name}.gguf"
    stored = write_quantised_llama(path, qtype, tokenizer)
    model, _ = import_gguf(path)
    ref = {name: dequantize(data, qtype if data.ndim == 2 else GGMLQuantizationType.F32) for name, data in stored.items()}
    assert all(np.isfinite(r).all() and np.abs(r).max() > 0 for r in ref.values())
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    np.testing.assert_array_equal(params["blocks.0.attn.q.weight"], from_llama_cpp_rows(ref["blk.0.attn_q.weight"], 4))
    np.testing.assert_array_equal(params["blocks.0.attn.k.weight"], from_llama_cpp_rows(ref["blk.0.attn_k.weight"], 2))
    for ours, theirs in [("blocks.0.attn.v.weight", "blk.0.attn_v.weight"), ("blocks.0.mlp.gate.weight", "blk.0.ffn_gate.weight"),
                         ("blocks.0.mlp.up.weight", "blk.0.ffn_up.weight"),("embed.weight", "token_embd.weight"), ("blocks.0.attn.proj.weight", "blk.0.attn_output.weight"),
                         ("blocks.0.mlp.down.weight", "blk.0.ffn_down.weight"), ("blocks.0.norm1.weight", "blk.0.attn_norm.weight"),
                         ("blocks.0.norm2.weight", "blk.0.ffn_norm.weight"), ("norm.weight", "output_norm.weight")]:
        np.testing.assert_array_equal(params[ours], ref[theirs])
    assert model.head.weight is model.embed.weight


@pytest.mark.slow
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "Q6_K"])
def test_quantised_file_gives_the_logits_of_transformers(type_name, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / f"{type_name}.gguf"
    write_quantised_llama(path, GGMLQuantizationType[type_name], tokenizer, seed=1)
    model, _ = import_gguf(path)
    ids = torch.randint(0, QUANT_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    theirs = hf_model(path)(ids).logits.detach()
    assert (logits(model, ids) - theirs).abs().max().item() < 1e-4


# ---- export ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_f32_export_then_import_gives_identical_logits(family, tokenizer, tmp_path):
    model = random_model(FAMILIES[family])
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    back, tok = import_gguf(path)
    # GGUF spells out the MLP width and stores eps as float32
    assert back.config == model.config.replace(mlp_hidden=model.config.hidden, norm_eps=float(np.float32(model.config.norm_eps)))
    ids = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(back, ids), logits(model, ids))  # rope: the q/k permutation round-trips
    assert tok.encode(VARIED_TEXT) == tokenizer.encode(VARIED_TEXT)
    assert tok.special_tokens == tokenizer.special_tokens and tok.vocab_size == tokenizer.vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_export_rounds_matrices_to_half_and_keeps_1d_tensors_f32(family, tokenizer, tmp_path):
    model = random_model(FAMILIES[family])
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f16")
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == family
    slots = tensor_slots(model.config, family, tied=model.config.tie_embeddings)
    assert [t.name for t in reader.tensors] == [s.gguf_name for s in slots]
    for t in reader.tensors:
        assert t.tensor_type.name == ("F16" if len(t.shape) == 2 else "F32"), t.name
    rounded = random_model(FAMILIES[family])
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    back, _ = import_gguf(path)
    ids = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(back, ids), logits(rounded, ids))
    assert (logits(back, ids) - logits(model, ids)).abs().max().item() < 1e-2


@given(rows=st.integers(1, 4), blocks=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), zero_block=st.booleans())
@settings(max_examples=60, deadline=None)
def test_our_q8_0_and_q4_0_are_bit_for_bit_gguf_pys(rows, blocks, seed, scale, zero_block):
    w = (np.random.default_rng(seed).standard_normal((rows, 32 * blocks)) * scale).astype(np.float32)
    if zero_block:
        w[0, :32] = 0  # a scale of zero: no division by it
    for ours, qtype in ((gguf_interop.quantize_q8_0, GGMLQuantizationType.Q8_0),
                        (gguf_interop.quantize_q4_0, GGMLQuantizationType.Q4_0)):
        assert np.array_equal(ours(w), quantize(w, qtype)), qtype.name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_export_reads_back_as_its_dequantized_weights(family, dtype, tokenizer, tmp_path):
    model = random_model(FAMILIES[family])
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype=dtype)
    qtype = GGMLQuantizationType.Q8_0 if dtype == "q8_0" else GGMLQuantizationType.Q4_0
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    rounded = random_model(FAMILIES[family])
    with torch.no_grad():  # what the file holds: matrices of whole 32-weight rows quantized, other matrices f16
        for name, p in rounded.named_parameters():
            kept = name in ("embed.weight", "head.weight")  # Q8_0 in a Q4_0 file, as llama.cpp keeps them
            if p.dim() == 2 and p.shape[1] % 32 == 0:
                kind = GGMLQuantizationType.Q8_0 if kept else qtype
                p.copy_(torch.from_numpy(dequantize(quantize(p.numpy(), kind), kind)).reshape(p.shape))
            elif p.dim() == 2:
                p.copy_(p.half().float())
    assert qtype in types.values() and all(t in (qtype, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F16,
                                                  GGMLQuantizationType.F32) for t in types.values())
    assert types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    back, _ = import_gguf(path)
    ids = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(back, ids), logits(rounded, ids))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_transformers_reads_our_quantized_export_as_we_do(dtype, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = export_gguf(random_model(FAMILIES["llama"]), tokenizer, tmp_path / "llama.gguf", dtype=dtype)
    ids = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(0))
    ours, _ = import_gguf(path)
    assert (logits(ours, ids) - hf_model(path)(ids).logits.detach()).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_our_export(family, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = random_model(FAMILIES[family])
    path = export_gguf(model, tokenizer, tmp_path / f"{family}.gguf")
    ids = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(0))
    theirs = hf_model(path)(ids).logits.detach()
    assert (logits(model, ids) - theirs).abs().max().item() < 1e-4


def test_export_is_atomic_and_leaves_no_temporary_file(tokenizer, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    with pytest.raises(ModelFormatError):
        export_gguf(random_model(FAMILIES["llama"].replace(mlp="relu2")), tokenizer, path)
    export_gguf(random_model(FAMILIES["llama"]), tokenizer, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert path.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_smollm2_tokenizer_survives_export(smollm2, tmp_path):
    _, tok = smollm2
    config = FAMILIES["llama"].replace(vocab_size=tok.vocab_size, n_layer=1)
    path = export_gguf(random_model(config), tok, tmp_path / "m.gguf")
    back = import_gguf_tokenizer(path)
    assert back.encode(VARIED_TEXT) == tok.encode(VARIED_TEXT)
    assert back.special_tokens == tok.special_tokens and back.pattern == tok.pattern
    for key in ("chat_template", "bos_token_id", "eos_token_id", "add_bos_token"):
        assert back.metadata[key] == tok.metadata[key]


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list(" \t\n\r\x0b\x0c\u00a0\u2028aZé日0123'sStLlVvDd.,!-_🙂")), max_size=40))
def test_gpt4_pattern_splits_text_exactly_as_llama3_pattern(text):
    """Why a GPT-4-pattern tokenizer may be written with llama.cpp's `llama-bpe` name."""
    assert regex.findall(GPT4_PATTERN, text) == regex.findall(LLAMA3_PATTERN, text)


def test_gpt4_pattern_splits_real_text_exactly_as_llama3_pattern(embedded_sample):
    for text in (embedded_sample, VARIED_TEXT):
        assert regex.findall(GPT4_PATTERN, text) == regex.findall(LLAMA3_PATTERN, text)


# ---- refusals --------------------------------------------------------------------------------
def rewrite_gguf(src, dst, arch: str | None = None, drop: tuple[str, ...] = (), add: dict | None = None,
                 keys: dict | None = None, drop_keys: tuple[str, ...] = (), retype: dict | None = None) -> None:
    """Copy a GGUF file with changes: another architecture name, tensors dropped or added
    ({name: (data, type)}), metadata keys set ({key: (value, GGUFValueType)}) or dropped,
    tensors given raw bytes of another type ({name: type})."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch or reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for key, (value, vtype) in (keys or {}).items():
        writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if t.name in drop:
            continue
        if t.name in (retype or {}):
            qtype = retype[t.name]
            block, size = GGML_QUANT_SIZES[qtype]
            rows, cols = (int(d) for d in reversed(t.shape))
            writer.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, (data, qtype) in (add or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def llama_file(tokenizer, tmp_path_factory):
    config = FAMILIES["llama"].replace(n_embd=256, n_head=4, n_kv_head=2, mlp_hidden=256, n_layer=1)
    return export_gguf(random_model(config), tokenizer, tmp_path_factory.mktemp("gguf") / "llama.gguf")


F32 = GGMLQuantizationType.F32
REFUSALS = {
    "architecture": (dict(arch="mamba"), r"architecture 'mamba' is not supported; supported: llama, qwen3, gpt2"),
    "quantisation": (dict(retype={"blk.0.attn_q.weight": GGMLQuantizationType.IQ2_XXS}),
                     r"tensor blk.0.attn_q.weight has quantisation type IQ2_XXS; supported: F32, F16, BF16, Q8_0"),
    "missing tensor": (dict(drop=("blk.0.ffn_up.weight",)), r"tensor blk.0.ffn_up.weight is missing"),
    "extra tensor": (dict(add={"rope_freqs.weight": (np.ones(32, np.float32), F32)}), r"unexpected tensor rope_freqs.weight"),
    "bias": (dict(add={"blk.0.attn_q.bias": (np.ones(256, np.float32), F32)}), r"unexpected tensor blk.0.attn_q.bias"),
    "shape": (dict(drop=("output_norm.weight",), add={"output_norm.weight": (np.ones(128, np.float32), F32)}),
              r"tensor output_norm.weight has shape \[128\]; expected \[256\]"),
    "rope scaling": (dict(keys={"llama.rope.scaling.type": ("yarn", GGUFValueType.STRING)}),
                     r"rope scaling 'yarn' with factor 1.0 is not supported; supported: none"),
    "rope factor": (dict(keys={"llama.rope.scaling.type": ("linear", GGUFValueType.STRING),
                               "llama.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32)}), r"rope scaling 'linear' with factor 4.0"),
    "head size": (dict(keys={"llama.attention.key_length": (128, GGUFValueType.UINT32)}),
                  r"llama.attention.key_length is 128 but embedding_length / head_count is 64"),
    "partial rope": (dict(keys={"llama.rope.dimension_count": (32, GGUFValueType.UINT32)}), r"llama.rope.dimension_count is 32"),
    "missing key": (dict(drop_keys=("llama.block_count",)), r"metadata key llama.block_count is missing"),
    # llama.cpp reads a factor without a type as linear scaling (its default type)
    "rope factor without type": (dict(keys={"llama.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32)}),
                                 r"rope scaling 'linear' \(no llama.rope.scaling.type: llama.cpp's default\) with factor 4.0"),
    "legacy rope factor": (dict(keys={"llama.rope.scale_linear": (2.0, GGUFValueType.FLOAT32)}), r"with factor 2.0 is not supported"),
}
# Each float key we read, out of its range: each once imported silently and generated garbage
# (a rope base of NaN or 0, an epsilon of -1 or inf).
FLOAT_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "-1": -1.0, "0": 0.0, "1": 1.0}
FLOAT_RANGES = {  # key -> (out-of-range values, what the message says is expected)
    "llama.rope.freq_base": (("nan", "inf", "-1", "0", "1"), "a finite number above 1"),
    "llama.attention.layer_norm_rms_epsilon": (("nan", "inf", "-inf", "-1", "0", "1"), "a finite number above 0 and below 1"),
    "llama.rope.scaling.factor": (("nan", "inf"), "a finite number"),
    "llama.rope.scale_linear": (("nan", "-inf"), "a finite number"),
}
REFUSALS |= {
    f"{key.removeprefix('llama.')}={shown}": (
        dict(keys={key: (FLOAT_VALUES[shown], GGUFValueType.FLOAT32)}),
        re.escape(f"metadata key {key} is {FLOAT_VALUES[shown]}; expected {expected}"),
    )
    for key, (values, expected) in FLOAT_RANGES.items() for shown in values
}


@pytest.mark.parametrize("case", REFUSALS)
def test_unsupported_files_are_refused_naming_the_problem(case, llama_file, tmp_path):
    changes, message = REFUSALS[case]
    path = tmp_path / "x.gguf"
    rewrite_gguf(llama_file, path, **changes)
    with pytest.raises(ModelFormatError, match=message) as exc:
        import_gguf(path)
    assert one_line(exc).startswith(f"{path}: ")


# Every integer key we read is a size. Out of range, each once escaped as another exception: a
# negative width as torch's RuntimeError, a block_count of 2^32 - 1 as a hang building 4 billion
# layers, a context_length of 2^32 - 1 as a request for a terabyte of rope tables.
SIZE_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "rope.dimension_count")
SIZE_VALUES = {"0": (0, GGUFValueType.UINT32), "-1": (-1, GGUFValueType.INT32), "2^32 - 1": (2**32 - 1, GGUFValueType.UINT32)}


SIZE_CASES = [(key, value) for key in SIZE_KEYS for value in SIZE_VALUES]


@pytest.mark.parametrize(("key", "value"), SIZE_CASES, ids=[f"{k}={v}" for k, v in SIZE_CASES])
def test_sizes_out_of_range_are_refused_in_one_line(key, value, llama_file, tmp_path):
    path = tmp_path / "x.gguf"
    rewrite_gguf(llama_file, path, keys={f"llama.{key}": SIZE_VALUES[value]})
    with pytest.raises(ModelFormatError) as exc:
        import_gguf(path)
    assert one_line(exc).startswith(f"{path}: ")


def test_context_beyond_the_maximum_is_refused_before_the_model_is_built(llama_file, tmp_path, monkeypatch):
    """No tensor bounds the context: a 20 KB file declaring 2^27 positions once spent 11.8 s and
    2.9 GB on rope tables before running out of memory. The refusal comes before any model exists."""
    path = tmp_path / "x.gguf"
    rewrite_gguf(llama_file, path, keys={"llama.context_length": (2**30, GGUFValueType.UINT32)})

    def no_model(config):
        raise AssertionError(f"a model of {config.block_size} positions was built")

    monkeypatch.setattr(gguf_interop, "GPT", no_model)
    monkeypatch.setattr(gguf_interop, "allocate_on_cpu", no_model)
    with pytest.raises(ModelFormatError, match=r"metadata key llama.context_length is 1073741824; supported: at most 16777216 ") as exc:
        import_gguf(path)
    assert one_line(exc).startswith(f"{path}: ")


def test_context_at_the_maximum_is_accepted(llama_file, tmp_path):
    path = tmp_path / "x.gguf"
    rewrite_gguf(llama_file, path, keys={"llama.context_length": (gguf_interop.MAX_CONTEXT, GGUFValueType.UINT32)})
    config = config_from_gguf(open_gguf(path), "llama", str(path))  # the config only: the tables would take 4 GiB
    assert config.block_size == 2**24


def test_a_model_that_does_not_fit_in_memory_is_refused_in_one_line(llama_file, monkeypatch):
    def out_of_memory(model):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(gguf_interop, "allocate_on_cpu", out_of_memory)
    with pytest.raises(ModelFormatError, match=r"not enough memory to build this model: [\d,]+ parameters and context_length 64 need [\d.]+ GiB$") as exc:
        import_gguf(llama_file)
    assert one_line(exc).startswith(f"{llama_file}: ")


def test_the_unchanged_copy_imports(llama_file, tmp_path):
    """The refusals above come from their change, not from `rewrite_gguf`."""
    rewrite_gguf(llama_file, tmp_path / "x.gguf")
    model, _ = import_gguf(tmp_path / "x.gguf")
    original, _ = import_gguf(llama_file)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(logits(model, ids), logits(original, ids))


def test_truncated_file_is_refused(llama_file, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(llama_file.read_bytes()[:-1000])
    with pytest.raises(InputFileError, match="truncated or corrupt") as exc:
        import_gguf(path)
    one_line(exc)


@pytest.mark.parametrize("content", [b"", b"not a model\n", b"PK\x03\x04zip"])
def test_file_that_is_not_gguf_is_refused(content, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(InputFileError, match="not a GGUF file") as exc:
        import_gguf(path)
    one_line(exc)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InputFileError, match="no such file"):
        import_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(mlp="relu2"), r"mlp='relu2' has no GGUF equivalent"),
        (dict(norm="layernorm"), r"norm='layernorm' has no GGUF equivalent"),
        (dict(bias=True), r"bias=True has no GGUF equivalent"),
        (dict(positions="learned"), r"norm='rmsnorm', mlp='swiglu', bias=False, .* has no GGUF equivalent .* gpt2"),
    ],
)
def test_export_refuses_configs_without_a_gguf_architecture(changes, message, tokenizer, tmp_path):
    model = GPT(FAMILIES["llama"].replace(**changes))
    with pytest.raises(ModelFormatError, match=message) as exc:
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert "supported: llama" in one_line(exc)
    assert not (tmp_path / "m.gguf").exists()


def test_export_refuses_gpt2_with_grouped_query_attention(tokenizer, tmp_path):
    with pytest.raises(ModelFormatError, match="grouped-query attention"):
        export_gguf(GPT(FAMILIES["gpt2"].replace(n_kv_head=2)), tokenizer, tmp_path / "m.gguf")


def test_export_refuses_a_pattern_llama_cpp_cannot_name(tokenizer, tmp_path):
    custom = Tokenizer(tokenizer.ranks, tokenizer.special_tokens, r"\S+|\s+", vocab_size=tokenizer.vocab_size)
    with pytest.raises(ModelFormatError, match="has no llama.cpp pre-tokenizer name") as exc:
        export_gguf(GPT(FAMILIES["llama"]), custom, tmp_path / "m.gguf")
    one_line(exc)


def test_export_refuses_a_tokenizer_larger_than_the_embedding(tokenizer, tmp_path):
    with pytest.raises(ModelFormatError, match="tokenizer has 300 ids but the model's vocab_size is only 256"):
        export_gguf(GPT(FAMILIES["llama"].replace(vocab_size=256)), tokenizer, tmp_path / "m.gguf")


def test_export_refuses_an_unknown_dtype(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="choose one of f32, f16, q8_0, q4_0"):
        export_gguf(GPT(FAMILIES["llama"]), tokenizer, tmp_path / "m.gguf", dtype="q4_k")
