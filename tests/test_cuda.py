"""The CUDA path, which the CPU suite cannot reach: FlashAttention under bf16 autocast, KV-cache
decoding on the GPU, pretraining with bf16 and torch.compile, FSDP2 on one GPU with sharded
checkpoints, fused AdamW. Run by benchmarks/gpu_check.sh (`pytest -m cuda`); skipped without a
GPU. Sized for seconds per test on one H100, compile included.

Tolerances come from bf16's 8-bit significand: one rounding is off by at most 2^-9 (about 0.2%)
of the value, and the few dozen roundings of a tiny model's forward and backward leave results
within a few percent of float32, while a broken kernel or layout is off by order one.
"""

import copy
from contextlib import nullcontext

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scratchlm.data.shards import TokenShards
from scratchlm.devices import peak_flops
from scratchlm.interop import open_model
from scratchlm.model import GPT, get_preset
from scratchlm.model.quantize import cast_for_inference
from scratchlm.model.sampling import SamplingConfig, generate_tokens
from scratchlm.tokenizer.tokens import token_byte_lengths
from scratchlm.train.config import load_train_config
from scratchlm.train.metrics import read_metrics
from scratchlm.train.optim import build_optimizer
from scratchlm.train.pretrain import evaluate, pretrain

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and a CUDA build of torch"),
]

DEVICE = torch.device("cuda")
CPU = torch.device("cpu")


# ---- FlashAttention ------------------------------------------------------------------------
def _loss_and_grads(model: GPT, x: torch.Tensor, backend: SDPBackend, amp: bool) -> tuple[float, dict[str, torch.Tensor], set[str]]:
    """Loss and gradients of one forward and backward with SDPA limited to `backend` (it raises
    "No available kernel" when that backend cannot run these inputs), and the SDPA ops that ran."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with sdpa_kernel(backend), torch.autocast(DEVICE.type, dtype=torch.bfloat16) if amp else nullcontext():
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
    ops = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}, ops


# Llama-shaped with grouped-query attention (enable_gqa), and GPT-2-shaped; head_dim 64.
FLASH_MODELS = {"llama": dict(n_kv_head=2), "gpt2": dict(positions="learned", norm="layernorm", mlp="gelu", bias=True)}


@pytest.mark.parametrize("family", sorted(FLASH_MODELS))
def test_flash_attention_runs_the_bf16_forward_and_backward_and_matches_float32(family):
    torch.manual_seed(0)
    config = get_preset("cpu-tiny").replace(vocab_size=512, block_size=256, n_embd=256, n_head=4, **FLASH_MODELS[family])
    model = GPT(config).to(DEVICE)
    x = torch.randint(0, 512, (4, 257), device=DEVICE)
    flash_loss, flash_grads, ops = _loss_and_grads(model, x, SDPBackend.FLASH_ATTENTION, amp=True)
    # The restriction alone passes a model that stopped calling SDPA: the flash ops must have run.
    assert any("flash_attention" in op and not op.endswith("backward") for op in ops), ops
    assert any("flash_attention" in op and op.endswith("backward") for op in ops), ops
    exact_loss, exact_grads, _ = _loss_and_grads(model, x, SDPBackend.MATH, amp=False)
    # Untrained, the loss is about ln(512) = 6.2 and bf16 logits move it by far less than 1%.
    assert flash_loss == pytest.approx(exact_loss, rel=1e-2)
    for name in ("blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.1.attn.v.weight", "blocks.1.attn.proj.weight"):
        # Relative to the gradient's size: bf16 roundings leave about 1%; wrong attention (not
        # causal, wrong scale, wrong heads) changes the gradient of q and k entirely.
        error = (flash_grads[name] - exact_grads[name]).norm() / exact_grads[name].norm()
        assert error < 0.05, (name, error.item())


# ---- KV-cache decoding ---------------------------------------------------------------------
def _greedy(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    config = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
    return [row[0] for row in generate_tokens(model, prompt, config)]


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-3), ("bfloat16", 0.15)])
def test_kv_cache_decoding_on_cuda_picks_the_tokens_float32_on_cpu_picks(dtype, tolerance):
    """300 new tokens: past the cache's first 256 positions, so it grows once on the GPU too. Each
    token the GPU picks must be a top token of CPU float32's full forward pass (no cache) at its
    position, within `tolerance` of the top logit: float32 GPU kernels differ from CPU ones by
    about 1e-5 of the logits' size, bf16 by a few times 2^-9 of it (logits here reach about 10);
    a stale or misplaced cache entry changes the argmax outright."""
    torch.manual_seed(0)
    # init_std 0.1: attention far from uniform and logits spread over several units, so that a
    # wrong token is far from the top and the check has teeth.
    config = get_preset("cpu-tiny").replace(vocab_size=512, block_size=512, init_std=0.1)
    reference = GPT(config).eval()
    prompt = torch.randint(0, 512, (10,)).tolist()
    model = cast_for_inference(copy.deepcopy(reference), dtype)
    tokens = _greedy(model.to(DEVICE), prompt, 300)
    assert len(tokens) == 300
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + tokens[:-1]]))[0][0, len(prompt) - 1 :]
    top = logits.max(dim=-1).values
    chosen = logits[torch.arange(300), torch.tensor(tokens)]
    shortfall = top - chosen
    assert shortfall.max().item() <= tolerance, (shortfall.argmax().item(), shortfall.max().item())
    # The top and the runner-up are mostly far apart: the tolerance does not accept anything.
    runner_up = logits.topk(2, dim=-1).values[:, 1]
    assert ((top - runner_up) > tolerance).float().mean() > 0.5


# ---- pretraining: bf16 and torch.compile, then FSDP2 on one GPU -----------------------------
# A constant learning rate after a short warmup (wsd without cooldown): the schedule then does
# not depend on max_steps, so a run cut at step 12 and resumed to 24 is the same run as one of 24.
STEPS, HALF = 24, 12
RUN = ["model=cpu-tiny", "micro_batch=8", "samples=0", "log_every=1", "eval_every=1000", "eval_tokens=4096",
       "lr=1e-2", "warmup_steps=2", "schedule=wsd", "cooldown_fraction=0", "checkpoint_every=1000",
       f"device={DEVICE.type}", "dtype=bfloat16"]


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def compiled_run(shards, tmp_path_factory):
    """A bf16 pretraining run on the GPU with torch.compile, through the real entry point."""
    out = tmp_path_factory.mktemp("compiled") / "run"
    summary = pretrain(shards, out, load_train_config(None, RUN + [f"max_steps={STEPS}", "compile=true"]), progress=False)
    return out, summary


def test_bf16_compiled_pretraining_lowers_the_loss_and_writes_a_loadable_model(compiled_run, shards):
    out, summary = compiled_run
    rows = read_metrics(out / "metrics.jsonl")
    loss = losses(out)
    assert list(loss) == list(range(1, STEPS + 1))
    assert loss[STEPS] < loss[1] - 0.7  # the CPU suite's float32 run of this size drops more than that
    if peak_flops(DEVICE) is not None:  # H100, H200, A100...: MFU is logged and a fraction
        mfus = [r["mfu"] for r in rows if "mfu" in r]
        assert len(mfus) == STEPS and all(0 < m < 1 for m in mfus)
    assert (out / "report.md").is_file() and (out / "loss.png").is_file()

    opened = open_model(out, DEVICE, kind="language-model")
    assert next(opened.model.parameters()).device.type == DEVICE.type
    # The saved weights are the trained ones: float32 on the GPU gives the run's last validation
    # loss (bf16 autocast there) within bf16's rounding, about 1% here.
    data = TokenShards.open(shards)
    val = data.read("val", 0, 4097)
    lengths = token_byte_lengths(opened.tokenizer, opened.model.config.vocab_size)
    val_loss, _ = evaluate(opened.model, val, opened.model.config.block_size, 8, lengths, DEVICE, None)
    assert val_loss == pytest.approx(summary.val_loss, rel=2e-2)
    assert val_loss < losses(out)[1] - 0.5  # trained: well below the untrained ln(512)


def test_fsdp2_on_one_gpu_trains_like_the_unsharded_run_and_resumes_from_its_shards(compiled_run, shards, tmp_path):
    reference, _ = compiled_run
    out = tmp_path / "fsdp"
    fsdp = RUN + ["parallel.dp_shard=-1"]
    pretrain(shards, out, load_train_config(None, fsdp + [f"max_steps={HALF}"]), progress=False)
    checkpoint = out / "checkpoints" / f"step_{HALF:06d}"
    assert (checkpoint / "shards" / ".metadata").is_file() and not (checkpoint / "model.safetensors").exists()
    assert "FSDP2" in (out / "report.md").read_text()

    pretrain(shards, out, load_train_config(None, fsdp + [f"max_steps={STEPS}"]), resume=True, progress=False)
    sharded, whole = losses(out), losses(reference)
    assert list(sharded) == list(range(1, STEPS + 1))
    # Not equal: the unsharded run is compiled (fused kernels round differently), and FSDP2
    # gathers the weights in bf16 where autocast casts them per matmul (norm gains stay float32
    # there). Those roundings, some 2^-9 each, grow over 24 Adam steps to a few hundredths of a
    # nat; a lost gradient, a shard not updated or a resume from fresh weights (the loss back
    # near 6.2 at step 13) moves the curve by tenths or more.
    for step in sharded:
        assert sharded[step] == pytest.approx(whole[step], abs=0.1), step
    assert (out / "model" / "model.safetensors").is_file()


# ---- the optimizer ---------------------------------------------------------------------------
def test_adamw_is_fused_on_cuda_and_steps_like_the_unfused_one():
    torch.manual_seed(0)
    model = GPT(get_preset("cpu-tiny").replace(vocab_size=512)).to(DEVICE)
    twin = GPT(model.config).to(DEVICE)
    twin.load_state_dict(model.state_dict())
    config = load_train_config(None, ["max_steps=1"])
    fused = build_optimizer(model, config, DEVICE)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(twin.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8,
                              weight_decay=0.0, foreach=False)
    x = torch.randint(0, 512, (2, 65), device=DEVICE)
    for m in (model, twin):
        m(x[:, :-1], x[:, 1:])[1].backward()
    # Weight decay on matrices only (build_optimizer's groups): compare on the undecayed norms,
    # and on a matrix once its decay is applied to the unfused copy by hand.
    before = [p.detach().clone() for p in model.parameters()]
    fused.step()
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    with torch.no_grad():
        for p in twin.parameters():
            if p.dim() >= 2:
                p.mul_(1 - config.lr * config.weight_decay)
    plain.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        # float32 throughout: the fused kernel differs in rounding only (~1e-7 of lr-sized steps).
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
