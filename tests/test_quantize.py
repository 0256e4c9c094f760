"""Inference in bfloat16 and with int8 and int4 weight-only matmuls: close to float32, and usable by the engine."""

import pytest
import torch

from scratchlm.errors import ConfigError
from scratchlm.model import GPT, get_preset
from scratchlm.model.sampling import SamplingConfig, generate_tokens
from scratchlm.model.quantize import Int4Linear, Int8Linear, dequantize_groups, prepare_for_inference, quantize_groups


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


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", "none"), ("float32", "int8"), ("float32", "int4")])
def test_inference_modes_keep_logits_close_and_generate(dtype, quantize):
    reference, model = tiny(), prepare_for_inference(tiny(), dtype, quantize)
    idx = torch.randint(0, 128, (2, 20))
    want, _ = reference(idx)
    got, _ = model(idx)
    assert got.dtype == torch.bfloat16
    # int4 of a random (untrained) model: 16 levels per group of 64 put each weight within 1/30 of
    # its group's range; the logits of two layers move by a few percent of their largest value.
    assert (got.float() - want).abs().max() < (0.15 if quantize == "int4" else 0.05) * want.abs().max()
    assert model.rope_cos.dtype == torch.float32  # positions keep their precision
    steps = list(generate_tokens(model, [1, 2, 3], SamplingConfig(temperature=0.0, max_new_tokens=5)))
    assert len(steps) == 5


def test_int8_replaces_every_linear_layer_and_keeps_the_embedding():
    model = prepare_for_inference(tiny(), quantize="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.head, Int8Linear) and model.embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype, quantize, message", [("float64", "none", "float64"), ("float32", "int2", "int2"),
                                                       ("float16", "int8", "bfloat16"), ("float16", "int4", "bfloat16")])
def test_unknown_modes_are_config_errors(dtype, quantize, message):
    with pytest.raises(ConfigError, match=message):
        prepare_for_inference(tiny(), dtype, quantize)


def test_int4_groups_round_each_weight_to_the_nearest_of_16_levels():
    torch.manual_seed(0)
    weight = torch.randn(96, 128)
    codes, scales_and_zeros = quantize_groups(weight, 32)
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert scales_and_zeros.shape == (128 // 32, 96, 2) and scales_and_zeros.dtype == torch.bfloat16
    # Half a step of each group's range / 15, plus the bfloat16 rounding of scale and zero
    # (2^-9 relative, times the code's distance from 8, at most 8 steps).
    groups = weight.reshape(96, 4, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15)[..., None].expand_as(groups).reshape(96, 128)
    error = (dequantize_groups(codes, scales_and_zeros) - weight).abs()
    assert bool((error <= 0.5 * step + 2**-8 * (weight.abs() + 8 * step)).all())


def test_int4_linear_matches_its_dequantized_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    layer = Int4Linear(linear, 64)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 64 * 128 // 2  # two codes a byte
    codes, scales_and_zeros = quantize_groups(linear.weight.detach(), 64)
    x = torch.randn(5, 128)
    # The kernel multiplies bfloat16 activations by the same dequantized weights, in float32 sums.
    reference = x.to(torch.bfloat16).float() @ dequantize_groups(codes, scales_and_zeros).T + linear.bias.to(torch.bfloat16).float()
    got = layer(x)
    assert (got - reference).abs().max() <= 2e-2 * reference.abs().max()  # bfloat16 output (2^-8)


def test_int4_refuses_a_group_size_that_does_not_divide_the_width():
    with pytest.raises(ConfigError, match="group size 128 does not divide the width 64 .*choose one of 32, 64"):
        prepare_for_inference(tiny(), quantize="int4", group_size=128)


def test_int4_leaves_a_layer_the_kernel_cannot_pack_in_bfloat16():
    torch.manual_seed(0)
    model = prepare_for_inference(GPT(get_preset("cpu-tiny").replace(vocab_size=120)).eval(), quantize="int4")
    assert isinstance(model.head, torch.nn.Linear) and model.head.weight.dtype == torch.bfloat16  # 120 outputs
    assert isinstance(model.blocks[0].attn.q, Int4Linear)
    assert model(torch.randint(0, 120, (1, 8)))[0].shape == (1, 8, 120)
