"""Inference in bfloat16 and with int8 weight-only matmuls: close to float32, and usable by the engine."""

import pytest
import torch

from scratchlm.errors import ConfigError
from scratchlm.model import GPT, get_preset
from scratchlm.model.sampling import SamplingConfig, generate_tokens
from scratchlm.model.quantize import Int8Linear, prepare_for_inference


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_preset("cpu-tiny").replace(vocab_size=128)).eval()


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    x = torch.randn(5, 64)
    quantized = Int8Linear(linear)
    assert quantized.weight.dtype == torch.int8 and quantized.scale.shape == (96,)
    error = (quantized(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert error < 0.03  # int8 rows (1/254 of each row's range) and bfloat16 activations


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", "none"), ("float32", "int8")])
def test_inference_modes_keep_logits_close_and_generate(dtype, quantize):
    reference, model = tiny(), prepare_for_inference(tiny(), dtype, quantize)
    idx = torch.randint(0, 128, (2, 20))
    want, _ = reference(idx)
    got, _ = model(idx)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
    assert model.rope_cos.dtype == torch.float32  # positions keep their precision
    steps = list(generate_tokens(model, [1, 2, 3], SamplingConfig(temperature=0.0, max_new_tokens=5)))
    assert len(steps) == 5


def test_int8_replaces_every_linear_layer_and_keeps_the_embedding():
    model = prepare_for_inference(tiny(), quantize="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.head, Int8Linear) and model.embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype, quantize, message", [("float64", "none", "float64"), ("float32", "int4", "int4"),
                                                       ("float16", "int8", "bfloat16")])
def test_unknown_modes_are_config_errors(dtype, quantize, message):
    with pytest.raises(ConfigError, match=message):
        prepare_for_inference(tiny(), dtype, quantize)
