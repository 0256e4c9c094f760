"""Pretraining end to end on tiny configs: it trains, logs, checkpoints, resumes exactly,
runs data-parallel, and refuses bad input with one line."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scratchlm.data.shards import TokenShards
from scratchlm.data.tokenize import tokenize_files
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.tokenizer import train_bpe
from scratchlm.train.config import load_train_config
from scratchlm.errors import TrainingError
from scratchlm.train.pretrain import pretrain
from scratchlm.train.metrics import read_metrics
from scratchlm.interop import open_model

TINY = ["model=cpu-tiny", "micro_batch=4", "samples=0", "log_every=1", "eval_every=5", "eval_tokens=2048", "warmup_steps=2"]


# `shards`: conftest's (the embedded sample, a 512-token tokenizer); copy it before changing it.


def open_lm(path):
    opened = open_model(path, kind="language-model")
    return opened.model, opened.tokenizer


def run_subprocess(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchlm.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def test_tokenize_writes_shards_with_a_tail_validation_split(shards):
    data = TokenShards.open(shards)
    manifest = data.manifest
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 512
    assert "last 10%" in manifest["split_rule"]
    train, val = data.tokens("train"), data.tokens("val")
    assert 0.07 < val / (train + val) < 0.13
    assert data.read("train", 0, 10).max() < 512
    assert (shards / "tokenizer.json").is_file()


def test_pretrain_lowers_loss_and_writes_the_run_folder(shards, tmp_path):
    config = load_train_config(None, TINY + ["max_steps=25", "lr=1e-2", "samples=2", "sample_tokens=20"])
    summary = pretrain(shards, tmp_path / "run", config, progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.7
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(rows[0])
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10, 15, 20, 25]
    assert all(0 < r["val_bpb"] < 10 for r in evals)
    for name in ("loss.png", "report.md", "config.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (tmp_path / "run" / name).is_file(), name
    report = (tmp_path / "run" / "report.md").read_text()
    assert "bits per byte" in report and "Sample 1" in report
    assert len(summary.samples) == 2
    model, tokenizer = open_lm(tmp_path / "run")
    assert tokenizer.vocab_size == 512 and model.config.vocab_size == 512


def test_bits_per_byte_is_loss_per_byte_in_bits(shards, tmp_path):
    from scratchlm.tokenizer.tokens import token_byte_lengths
    from scratchlm.train.pretrain import evaluate

    model, tokenizer = GPTFromScratch(shards)
    data = TokenShards.open(shards)
    tokens = data.read("val", 0, 1025)
    lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    loss, bpb = evaluate(model, tokens, 128, 4, lengths, torch.device("cpu"), None)
    targets = tokens[1:]
    specials = np.isin(targets, list(tokenizer.special_tokens.values()))
    # Untrained: about ln(vocab) nats on every token; bpb divides the non-special share by bytes.
    assert loss == pytest.approx(np.log(512), rel=0.1)
    expected = loss * (~specials).sum() / (np.log(2) * lengths[targets].sum())
    assert bpb == pytest.approx(expected, rel=0.05)


def GPTFromScratch(shards):
    from scratchlm.model import GPT, get_preset
    from scratchlm.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(shards / "tokenizer.json")
    return GPT(get_preset("cpu-tiny").replace(vocab_size=512)).eval(), tokenizer


KILLED_AT_STEP = Path(__file__).with_name("killed_at_step.py")


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_losses_and_weights(shards, tmp_path):
    args = ["pretrain", "--data", str(shards), "--quiet", "--set", "model=cpu-tiny", "--set", "micro_batch=8",
            "--set", "samples=0", "--set", "log_every=1", "--set", "eval_every=1000", "--set", "checkpoint_every=5",
            "--max-steps", "20"]
    whole = run_subprocess(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    # Killed right after logging step 13, between two checkpoints: the resume starts from step 10
    # and must drop the rows of steps 11 to 13 that it redoes.
    killed_dir = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(KILLED_AT_STEP), "13", *args, "--out", str(killed_dir)],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (killed_dir / "checkpoints" / "latest").read_text().strip() == "step_000010"
    assert max(r["step"] for r in read_metrics(killed_dir / "metrics.jsonl")) == 13
    resumed = run_subprocess(*args, "--out", str(killed_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses(killed_dir) == losses(tmp_path / "whole")
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(killed_dir / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # three fresh interpreters import torch, two of them as a process group
def test_data_parallel_on_two_processes_matches_one_process(shards, tmp_path):
    common = ["pretrain", "--data", str(shards), "--quiet", "--set", "model=cpu-tiny", "--set", "micro_batch=2",
              "--set", "batch_tokens=512", "--set", "samples=0", "--set", "log_every=1", "--set", "eval_every=1000",
              "--max-steps", "8"]
    single = run_subprocess(*common, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "scratchlm.cli", *common, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "one" / "config.json").read_text())["grad_accum"] == 2
    assert len(one) == len(two) == 8
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_nonfinite_losses_skip_steps_then_stop_the_run(shards, tmp_path, monkeypatch):
    from scratchlm.model import GPT

    real_forward = GPT.forward

    def poisoned(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        return logits, (loss * float("nan") if loss is not None else None)

    monkeypatch.setattr(GPT, "forward", poisoned)
    config = load_train_config(None, TINY + ["max_steps=20", "max_nonfinite=3"])
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row"):
        pretrain(shards, tmp_path / "run", config, progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["nonfinite"]) for r in rows] == [(1, True), (2, True), (3, True)]  # numbered as steps done


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "lr_max=1"], "unknown key 'lr_max'; did you mean 'lr'?"),
        (["--set", "lr=fast"], "lr must be a number"),
        (["--set", "model=gpt3"], "unknown model preset 'gpt3'"),
        (["--recipe", "nope"], "recipe 'nope' is neither a file nor a built-in recipe"),
        (["--set", "model_config.n_layers=3"], "model config: unknown key 'n_layers'; did you mean 'n_layer'?"),
        (["--val-text", "VALTEXT"], "fewer than one context window"),
        (["--set", "samples=100000"], "num_samples must be"),  # refused before training, not at its end
        (["--set", "sample_tokens=0"], "max_new_tokens must be"),
        (["--set", "samples=-1"], "samples must be >= 0"),
    ],
)
def test_pretrain_user_errors_are_one_line(shards, tmp_path, cli, extra, message):
    (tmp_path / "short.txt").write_text("too short")
    extra = [str(tmp_path / "short.txt") if e == "VALTEXT" else e for e in extra]
    result = cli("pretrain", "--data", shards, "--out", tmp_path / "run", "--max-steps", "2", *extra)
    assert result.status == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.err


def test_missing_shards_and_mismatched_tokenizer_are_refused(shards, tmp_path):
    config = load_train_config(None, TINY + ["max_steps=2"])
    with pytest.raises(InputFileError, match="no such shard folder"):
        pretrain(tmp_path / "nope", tmp_path / "run", config)
    other = tmp_path / "other"
    other.mkdir()
    for f in shards.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    train_bpe(["different text entirely"], 300, workers=1, min_frequency=1).save(other / "tokenizer.json")
    with pytest.raises(ConfigError, match="different tokenizer"):
        pretrain(other, tmp_path / "run", config)


def test_resume_with_a_different_model_is_refused(shards, tmp_path):
    pretrain(shards, tmp_path / "run", load_train_config(None, TINY + ["max_steps=2"]), progress=False)
    changed = load_train_config(None, TINY + ["max_steps=4", "model_config.n_layer=3"])
    with pytest.raises(ConfigError, match="different model \\(n_layer: 2 vs 3\\)"):
        pretrain(shards, tmp_path / "run", changed, resume=True, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        pretrain(shards, tmp_path / "run", changed, progress=False)


@pytest.mark.slow  # four fresh interpreters import torch
def test_generate_streams_a_continuation_from_a_run_folder(shards, tmp_path):
    pretrain(shards, tmp_path / "run", load_train_config(None, TINY + ["max_steps=3"]), progress=False)
    result = run_subprocess("generate", str(tmp_path / "run"), "--prompt", "The ", "--max-new-tokens", "15", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The ") and len(result.stdout) > 5
    again = run_subprocess("generate", str(tmp_path / "run"), "--prompt", "The ", "--max-new-tokens", "15", "--seed", "1")
    assert again.stdout == result.stdout
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 60  # longer than the tiny model's context
    refused = run_subprocess("generate", str(tmp_path / "run"), "--prompt", long_prompt, "--max-new-tokens", "5")
    assert refused.returncode == 2 and refused.stdout == ""  # nothing printed before the error
    assert refused.stderr.startswith("scratchlm: error:") and "--truncate" in refused.stderr and "Traceback" not in refused.stderr
    cut = run_subprocess("generate", str(tmp_path / "run"), "--prompt", long_prompt, "--max-new-tokens", "5", "--truncate")
    assert cut.returncode == 0 and "the model sees its last" in cut.stderr


@pytest.mark.slow  # a fresh interpreter, then 8 s of training
def test_quickstart_end_to_end_with_a_tiny_budget(tmp_path):
    result = run_subprocess("quickstart", "--out", str(tmp_path / "qs"), "--max-time", "8s", "--quiet",
                 "--set", "model=cpu-tiny", "--set", "eval_tokens=4096", "--set", "samples=1", "--set", "sample_tokens=20",
                 timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bits per byte" in result.stdout and "report" in result.stdout
    assert (tmp_path / "qs" / "run" / "report.md").is_file()
    assert (tmp_path / "qs" / "run" / "loss.png").is_file()


def test_activation_checkpointing_gives_the_same_losses(shards, tmp_path):
    plain = pretrain(shards, tmp_path / "plain", load_train_config(None, TINY + ["max_steps=4"]), progress=False)
    recomputed = pretrain(shards, tmp_path / "ckpt", load_train_config(None, TINY + ["max_steps=4", "activation_checkpointing=true"]), progress=False)
    a = [r["loss"] for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "ckpt" / "metrics.jsonl")]
    assert a == pytest.approx(b, abs=1e-5) and plain.steps == recomputed.steps == 4


def test_bfloat16_autocast_trains(shards, tmp_path):
    summary = pretrain(shards, tmp_path / "run", load_train_config(None, TINY + ["max_steps=6", "dtype=bfloat16", "lr=1e-2"]), progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert summary.val_bpb is not None


def test_learning_rate_warms_up_then_decays_to_the_floor():
    from scratchlm.train.optim import lr_at

    config = load_train_config(None, ["max_steps=100", "lr=1e-3", "warmup_steps=10", "min_lr_ratio=0.1"])
    assert lr_at(0, 0.0, config) == pytest.approx(1e-4)
    assert lr_at(9, 0.09, config) == pytest.approx(1e-3)
    assert lr_at(50, 0.5, config) == pytest.approx(0.55e-3)
    assert lr_at(100, 1.0, config) == pytest.approx(1e-4)
    wsd = load_train_config(None, ["max_steps=100", "lr=1e-3", "warmup_steps=0", "schedule=wsd", "cooldown_fraction=0.2"])
    assert lr_at(70, 0.7, wsd) == pytest.approx(1e-3)
    assert lr_at(90, 0.9, wsd) == pytest.approx(0.55e-3)


def test_plan_follows_chinchilla():
    from scratchlm.train.plan import plan

    result = plan(compute_flops=6 * 20 * (124e6) ** 2, probe=False)
    assert result.optimal_params == pytest.approx(124e6)
    assert result.optimal_tokens == pytest.approx(20 * 124e6)
    with pytest.raises(ConfigError, match="exactly one budget"):
        plan()


def test_muon_orthogonalizes_and_trains(shards, tmp_path):
    from scratchlm.train.optim import orthogonalize

    torch.manual_seed(0)
    singular = torch.linalg.svdvals(orthogonalize(torch.randn(48, 96)))
    assert singular.min() > 0.5 and singular.max() < 1.3
    pretrain(shards, tmp_path / "run", load_train_config(None, TINY + ["max_steps=12", "optimizer=muon"]), progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] - 0.5


def test_muon_stacks_matrices_of_one_shape_and_steps_as_one_matrix_at_a_time_would():
    from scratchlm.train.optim import Muon, orthogonalize

    torch.manual_seed(0)
    shapes = [(32, 32), (32, 32), (96, 32), (32, 96), (96, 32), (16, 48)]  # (96, 32) joins (32, 96)'s stack
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    expected = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    optimizer = Muon([{"params": params, "use_muon": True, "lr": 0.02, "momentum": 0.95}])
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        for i, g in enumerate(grads):  # the matrix-at-a-time algorithm, written out
            buffers[i].lerp_(g, 0.05)
            update = orthogonalize(g.lerp(buffers[i], 0.95))
            expected[i] += -0.02 * max(1.0, g.size(0) / g.size(1)) ** 0.5 * update
    for p, want in zip(params, expected):
        # Batched and single products sum in other orders: float32 rounding through 5 iterations.
        torch.testing.assert_close(p.detach(), want, rtol=1e-4, atol=1e-5)


def test_muons_adamw_groups_step_as_torchs_adamw_does():
    from scratchlm.train.optim import Muon

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(8, 4), (16,), (3, 5)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    muon = Muon([{"params": ours, "use_muon": False, "lr": 3e-3, "weight_decay": 0.1}], betas=(0.9, 0.95))
    adamw = torch.optim.AdamW(theirs, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        muon.step()
        adamw.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)  # same arithmetic, other order


def test_plan_command_suggests_a_preset_and_a_time(capsys):
    from scratchlm.cli import main

    assert main(["plan", "--compute", "1e15"]) == 0
    out = capsys.readouterr().out
    assert "closest preset     cpu-base" in out and "estimated time" in out


def test_trained_model_exports_to_transformers_with_the_same_logits(shards, tmp_path):
    """The default CPU recipe's architecture (QK-norm, untied head) after real training steps."""
    transformers = pytest.importorskip("transformers")
    from scratchlm.interop.convert import export_model

    config = load_train_config(None, TINY + ["max_steps=6", "optimizer=muon", "model_config.qk_norm=true",
                                             "model_config.tie_embeddings=false"])
    pretrain(shards, tmp_path / "run", config, progress=False)
    export_model(tmp_path / "run", "hf", tmp_path / "hf")
    ours, tokenizer = open_lm(tmp_path / "run")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("The value of an expression is computed from its operands.")])
    with torch.no_grad():
        difference = (ours(ids)[0] - theirs(ids).logits).abs().max().item()
    assert type(theirs).__name__ == "Qwen3ForCausalLM" and difference < 1e-4


@pytest.mark.parametrize("vocab_size", [260, 1000])
def test_pretraining_with_a_vocabulary_that_is_not_a_multiple_of_64_writes_its_report_and_samples(embedded_sample, tmp_path, vocab_size):
    # The model's embedding table is padded to a multiple of 64, past the tokenizer's last id:
    # the end-of-run samples must draw only the tokenizer's ids, several samples at once.
    text = embedded_sample[:30_000]
    (tmp_path / "corpus.txt").write_text(text)
    tokenizer = train_bpe([text], vocab_size, workers=1)
    tokenize_files([tmp_path / "corpus.txt"], tokenizer, tmp_path / "shards")
    config = load_train_config(None, TINY + ["max_steps=2", "samples=2", "sample_tokens=20"])
    summary = pretrain(tmp_path / "shards", tmp_path / "run", config, progress=False)
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "loss.png").is_file()
    assert len(summary.samples) == 2 and "Sample 2" in (tmp_path / "run" / "report.md").read_text()
    model, loaded = open_lm(tmp_path / "run")
    assert loaded.vocab_size == vocab_size and model.config.vocab_size % 64 == 0 and model.config.vocab_size > vocab_size


@pytest.mark.parametrize(("device", "backend"), [("cuda", "nccl"), ("cuda:0", "nccl"), ("cuda:3", "nccl"), ("cpu", "gloo"), ("mps", "gloo")])
def test_every_gpu_device_name_gets_the_nccl_backend(device, backend):
    from scratchlm.devices import process_group_backend

    assert process_group_backend(torch.device(device)) == backend


def test_pretraining_joins_the_process_group_on_the_device_it_was_given(shards, tmp_path, monkeypatch):
    import scratchlm.train.distributed as distributed

    given = []

    class Joined(Exception):
        pass

    def join(device):
        given.append(device)
        raise Joined

    monkeypatch.setattr(distributed, "parse_device", lambda name: torch.device("cuda:0") if name == "cuda:0" else torch.device(name))
    monkeypatch.setattr(distributed, "init_distributed", join)
    with pytest.raises(Joined):
        pretrain(shards, tmp_path / "run", load_train_config(None, TINY + ["max_steps=1", "device=cuda:0"]))
    assert given == [torch.device("cuda:0")]  # was "cpu" (so gloo) for any name but "auto" and "cuda"


def test_mfu_never_reads_above_one_hundred_percent():
    """A CPU's peak is measured; measured while the machine was busy it reads low, and a run that
    then goes faster than it raises it (measuring again) rather than reporting MFU over 100%."""
    from scratchlm.devices import PeakFlops, device_peak

    peak = device_peak(torch.device("cpu"))
    assert peak.measured_dtype == "float32" and "measured float32" in peak.source and peak.flops > 0
    assert device_peak(torch.device("cpu"), torch.bfloat16).measured_dtype == "bfloat16"
    low = PeakFlops(1.0, "measured float32 matmul rate", "float32")  # as if measured under heavy load
    raised = low.raised_to(5.0)
    assert raised.flops >= 5.0 and "measured again" in raised.source
    assert PeakFlops(1e12, "published").raised_to(2e12).flops == 2e12  # no re-measuring a published figure
    assert low.raised_to(0.5) is low


def test_auto_model_grows_when_the_corpus_is_small_for_the_budget():
    from scratchlm.train.pretrain import SMALL_CORPUS_TOKENS_PER_SECOND, choose_model

    config = load_train_config(None, ["max_time=120s"])
    assert config.model == "auto"
    enough = choose_model(config, 2048, train_tokens=SMALL_CORPUS_TOKENS_PER_SECOND * 120)
    small = choose_model(config, 2048, train_tokens=SMALL_CORPUS_TOKENS_PER_SECOND * 120 - 1)
    assert (enough.n_layer, enough.n_embd) == (2, 64) and (small.n_layer, small.n_embd) == (4, 128)
    assert enough.block_size == small.block_size == 128  # cpu-small at cpu-tiny's context
    assert choose_model(config, 2048).n_layer == 2  # no corpus size given: the budget alone decides
