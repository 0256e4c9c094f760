"""oneDNN's packed linear layers for CPU inference: the numbers of nn.Linear, in every shape the
model feeds them, and a prepared model that generates."""

import pytest
import torch

from scratchlm.model import GPT, get_preset
from scratchlm.model.packed import PackedLinear, onednn_available, pack_linears
from scratchlm.model.quantize import prepare_for_inference
from scratchlm.model.sampling import SamplingConfig, generate_tokens

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 7, 64), (5, 64), (2, 1, 64)])
def test_packed_linear_computes_what_the_linear_does(shape, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want, got = linear(x), PackedLinear(linear)(x)
    assert got.shape == want.shape
    # Another kernel sums the 64 products in another order: float32 rounding, ~1e-6 relative each.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_linear_in_bfloat16_matches_a_bfloat16_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(4, 64).to(torch.bfloat16)
    with torch.inference_mode():
        got = PackedLinear(linear)(x)
    want = x.float() @ linear.weight.float().T + linear.bias.float()
    assert got.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa: the rounded result is within 2^-8 of its size.
    assert ((got.float() - want).abs() <= 2**-7 * want.abs() + 0.02).all()


def test_a_non_contiguous_input_gives_the_same_result():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(4, 3, 64).transpose(0, 1)  # (3, 4, 64), not contiguous, like attention's output
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_prepared_model_runs_on_packed_layers_and_generates(dtype):
    config = get_preset("cpu-tiny").replace(vocab_size=128)
    torch.manual_seed(0)
    reference = GPT(config).eval()
    torch.manual_seed(0)
    model = prepare_for_inference(GPT(config).eval(), dtype)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [] and any(isinstance(m, PackedLinear) for m in model.modules())
    idx = torch.randint(0, 128, (2, 20))
    with torch.inference_mode():
        want, _ = reference.to(model.embed.weight.dtype)(idx)
        got, _ = model(idx)
    tolerance = 1e-4 if dtype == "float32" else 0.05
    assert (got.float() - want.float()).abs().max() <= tolerance * want.float().abs().max()
    steps = list(generate_tokens(model, [1, 2, 3], SamplingConfig(temperature=0.0, max_new_tokens=5)))
    assert len(steps) == 5


def test_models_off_the_cpu_or_in_training_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.to(torch.float16)  # a dtype the kernel is not used for here
    assert isinstance(pack_linears(model)[0], torch.nn.Linear)
