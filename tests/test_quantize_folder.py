"""`scratchlm quantize` (scratchlm/compress/quantize.py) and quantized model folders: saved and
opened, they compute what quantizing in memory computes, and every command that runs a model
opens them."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.compress.gptq import quantize_int4_gptq
from scratchlm.compress.prune import read_calibration
from scratchlm.compress.quantize import quantize_model
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.interop import open_model
from scratchlm.model.folder import FORMAT_VERSION, load_model_folder, save_model_folder
from scratchlm.model.quantize import (Int4Linear, Int8Linear, dequantize, prepare_for_inference, quantization_of,
                                      quantize_groups)
from scratchlm.serve.load import load_for_inference

from conftest import tiny_gpt, tiny_tokenizer


@pytest.fixture(scope="module")
def tok16():
    """A vocabulary of 320 tokens, a multiple of 16, so that int4 packs the head too."""
    return tiny_tokenizer(vocab_size=320)


def logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


@given(rows=st.sampled_from([16, 32, 48]), groups=st.integers(1, 4), group_size=st.sampled_from([32, 64]),
       seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_int4_codes_read_back_through_the_kernel_are_the_codes_packed(rows, groups, group_size, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, groups * group_size), generator=generator, dtype=torch.int32)
    _, grid = quantize_groups(torch.randn(rows, groups * group_size, generator=generator), group_size)
    assert torch.equal(Int4Linear.from_codes(codes, grid, None, group_size).codes(), codes)


@pytest.mark.parametrize("quantize, tied", [("int8", True), ("int4", True), ("int4", False)])
def test_saved_and_opened_gives_the_logits_of_quantizing_in_memory(tok16, tmp_path, quantize, tied):
    model = prepare_for_inference(tiny_gpt(tok16, tie_embeddings=tied), quantize=quantize, group_size=32)
    save_model_folder(tmp_path / "q", model, tok16)
    opened, _ = load_model_folder(tmp_path / "q")
    ids = torch.randint(0, tok16.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(opened, ids), logits(model, ids))
    assert quantization_of(opened) == quantization_of(model)
    header = json.loads((tmp_path / "q" / "config.json").read_text())
    assert header["format_version"] == FORMAT_VERSION == 3
    assert header["quantization"]["method"] == quantize and "head" in header["quantization"]["layers"]
    kind = Int4Linear if quantize == "int4" else Int8Linear
    assert isinstance(opened.head, kind) and isinstance(opened.blocks[1].mlp.down, kind)
    assert opened.embed.weight.dtype == torch.bfloat16


def test_gptq_through_the_command_is_gptq_in_memory(tok16, tmp_path):
    model = tiny_gpt(tok16)
    save_model_folder(tmp_path / "float", model, tok16)
    (tmp_path / "calibration.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    report = quantize_model(tmp_path / "float", tmp_path / "q", "int4", "gptq", 32, tmp_path / "calibration.txt",
                            sequences=4, length=32)
    assert (report.method, report.group_size, report.layers) == ("gptq", 32, 2 * 7 + 1)
    tokens = read_calibration(tok16, tmp_path / "calibration.txt", 4, 32)
    in_memory = quantize_int4_gptq(copy.deepcopy(model), tokens, 32)
    opened = open_model(tmp_path / "q").model
    ids = torch.randint(0, tok16.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(opened, ids), logits(in_memory, ids))


def test_dequantized_weights_are_the_codes_times_their_scales(tok16):
    model = prepare_for_inference(tiny_gpt(tok16), quantize="int4", group_size=32)
    layer = model.blocks[0].mlp.up
    x = torch.randn(3, layer.in_features)
    want = layer(x.to(torch.bfloat16)).float()
    got = dequantize(model).blocks[0].mlp.up(x.to(torch.bfloat16).float())
    # The kernel sums bfloat16 products in float32 and rounds the result to bfloat16: within
    # half a bfloat16 step (2^-8 of the value) plus the float32 summation order.
    assert torch.allclose(got, want, rtol=2**-7, atol=1e-4)
    assert model.config.tie_embeddings is False  # the int4 head has weights of its own now


def test_every_command_opens_a_quantized_folder(cli, tok16, tmp_path):
    save_model_folder(tmp_path / "float", tiny_gpt(tok16), tok16)
    result = cli("quantize", tmp_path / "float", "--to", "int4", "--group-size", "32", "--out", tmp_path / "q")
    assert result.status == 0, result.err
    assert "15 linear layers to int4 in groups of 32" in result.out
    assert json.loads((tmp_path / "q" / "quantize_report.json").read_text())["bytes"] > 0
    result = cli("generate", tmp_path / "q", "--prompt", "The quick", "--max-new-tokens", "5", "--temperature", "0")
    assert result.status == 0, result.err
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 20)
    result = cli("eval", tmp_path / "q", "--text", tmp_path / "text.txt", "--out", tmp_path / "eval")
    assert result.status == 0, result.err
    bpb = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "bits/byte" in result.out and bpb
    result = cli("compare", tmp_path / "float", tmp_path / "q", "--text", tmp_path / "text.txt",
                 "--out", tmp_path / "compare")
    assert result.status == 0, result.err
    model, _ = load_for_inference(tmp_path / "q", dtype="bfloat16")  # what chat and serve run
    assert isinstance(model.blocks[0].attn.q, Int4Linear)
    for fmt, out in (("gguf", tmp_path / "q.gguf"), ("hf", tmp_path / "hf")):
        result = cli("export", tmp_path / "q", "--format", fmt, "--out", out)
        assert result.status == 0, result.err
        exported = open_model(out).model
        ids = torch.arange(20)[None]
        want = logits(dequantize(open_model(tmp_path / "q").model), ids)
        assert torch.allclose(logits(exported, ids), want, atol=1e-5, rtol=1e-5)  # float32 both


@pytest.mark.parametrize("args, message", [
    (["--to", "int4", "--group-size", "128"], "int4 group size 128 does not divide the width 64 of blocks.0.attn.q"),
    (["--to", "int8", "--method", "gptq"], "gptq writes int4"),
    (["--to", "int4", "--calibration", "x.txt"], "round-to-nearest uses no calibration text"),
    (["--to", "int4", "--method", "awq"], "argument --method: invalid choice: 'awq'"),
])
def test_a_bad_quantize_is_one_line_and_writes_nothing(cli, model_folder, tmp_path, args, message):
    result = cli("quantize", model_folder, *args, "--out", tmp_path / "q")
    assert result.status == 2 and result.err.startswith("scratchlm") and "error:" in result.err and message in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_a_quantized_model_is_not_quantized_again_trained_or_pruned(cli, model_folder, tmp_path):
    assert cli("quantize", model_folder, "--to", "int8", "--out", tmp_path / "q").status == 0
    again = cli("quantize", tmp_path / "q", "--to", "int4", "--out", tmp_path / "q2")
    assert again.status == 2 and "holds an int8-quantized model, and quantizing needs float weights" in again.err
    assert not (tmp_path / "q2").exists()
    pruned = cli("prune", tmp_path / "q", "--out", tmp_path / "p", "--method", "magnitude")
    assert pruned.status == 2 and "pruning needs float weights" in pruned.err
    generated = cli("generate", tmp_path / "q", "--prompt", "a", "--quantize", "int4")
    assert generated.status == 2 and "already int8-quantized; leave out --quantize" in generated.err
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"a{i}", "completion": "b"}) + "\n" for i in range(10)))
    tuned = cli("finetune", "sft", tmp_path / "q", "--data", tmp_path / "sft.jsonl", "--out", tmp_path / "ft")
    assert tuned.status == 2 and "fine-tuning needs float weights" in tuned.err


def test_a_quantized_folder_missing_a_tensor_is_a_clear_error(tok16, tmp_path):
    from safetensors.torch import load_file, save_file

    model = prepare_for_inference(tiny_gpt(tok16), quantize="int4", group_size=32)
    save_model_folder(tmp_path / "q", model, tok16)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    del tensors["blocks.1.mlp.gate.scales_and_zeros"]
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(InputFileError, match="no tensor blocks.1.mlp.gate.scales_and_zeros for quantized layer"):
        open_model(tmp_path / "q")


def test_int4_folders_open_on_the_cpu_only(tok16, tmp_path):
    save_model_folder(tmp_path / "q", prepare_for_inference(tiny_gpt(tok16), quantize="int4", group_size=32), tok16)
    with pytest.raises(InputFileError, match="runs on the CPU kernel here; open it with --device cpu"):
        load_model_folder(tmp_path / "q", device="meta")
    with pytest.raises(ConfigError, match="leave --dtype at float32 or bfloat16"):
        prepare_for_inference(open_model(tmp_path / "q").model, dtype="float16")
