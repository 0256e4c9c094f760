"""Parallel layouts (scratchlm/train/parallel.py): the arithmetic of a layout, and on CPU with
gloo, that every layout trains what one process trains on the same global batch.

Why the tolerances: a layout sums the same numbers in another order (a gradient reduced across
ranks, a matmul split by columns or rows, a loss over vocab shards), so float32 results differ by
a few units in the last place of the values summed: about 1e-7 relative to the largest
gradient. 1e-5 of it is a margin of a hundred such units, and a real bug (a missing reduction, a
shard counted twice, gloo averaging wrongly, pytorch issue 162338) is off by a factor, not by
ulps. Losses are compared to 1e-5 nats the same way; metrics.jsonl rounds them to 1e-5.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchlm.errors import ConfigError
from scratchlm.train.config import Degrees, ParallelConfig, TrainConfig, load_train_config
from scratchlm.train.metrics import read_metrics
from scratchlm.train.parallel import stage_layers

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---- the arithmetic of a layout -----------------------------------------------------------
def test_defaults_are_data_parallel_over_every_process():
    assert ParallelConfig().degrees(1) == Degrees(1, 1, 1, 1)
    assert ParallelConfig().degrees(8) == Degrees(dp_replicate=8)


def test_minus_one_takes_the_processes_left_over():
    assert ParallelConfig(dp_shard=-1, tp=2).degrees(8) == Degrees(dp_replicate=1, dp_shard=4, tp=2)
    assert ParallelConfig(dp_shard=2, tp=2).degrees(8) == Degrees(dp_replicate=2, dp_shard=2, tp=2)
    assert ParallelConfig(pp=2, dp_shard=-1).degrees(2) == Degrees(dp_shard=1, pp=2)
    assert ParallelConfig(dp_shard=-1).fsdp  # FSDP2 even when the rest is one process


@pytest.mark.parametrize("parallel, world, message", [
    (ParallelConfig(tp=3), 4, "does not divide 4"),
    (ParallelConfig(dp_replicate=2, dp_shard=2), 8, "needs 4 processes, not 8"),
])
def test_a_layout_that_does_not_fit_the_processes_is_refused(parallel, world, message):
    with pytest.raises(ConfigError, match=message):
        parallel.degrees(world)


@pytest.mark.parametrize("settings, message", [
    ({"tp": 0}, "tp must be a positive whole number"),
    ({"pp": -1}, "pp must be a positive whole number"),
    ({"dp_shard": -2}, r"dp_shard must be a positive whole number or -1"),
    ({"pp_schedule": "zb"}, "pp_schedule must be"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**settings)


def test_ranks_of_a_tensor_parallel_group_and_a_pipeline_read_the_same_batch():
    # Mesh order (pp, dp_replicate, dp_shard, tp): rank = ((p * R + r) * S + s) * T + t.
    degrees = Degrees(dp_replicate=1, dp_shard=2, tp=2, pp=2)
    assert [degrees.dp_rank(rank) for rank in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]


def test_stages_split_the_layers_evenly_earlier_stages_taking_the_remainder():
    assert stage_layers(8, 2) == [range(0, 4), range(4, 8)]
    assert stage_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(ConfigError, match="pp=5 stages need at least as many layers"):
        stage_layers(4, 5)


def test_the_parallel_table_comes_from_toml_and_set(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("max_steps = 3\n[parallel]\ndp_shard = -1\n")
    config = load_train_config(recipe, ["parallel.tp=2"])
    assert (config.parallel.dp_shard, config.parallel.tp) == (-1, 2)
    with pytest.raises(ConfigError, match="^--set: parallel: unknown key 'tpp'; did you mean 'tp'"):
        load_train_config(recipe, ["parallel.tpp=2"])  # blamed on --set, not on the recipe
    with pytest.raises(ConfigError, match="^--set: parallel: dp_shard must be an integer, not 'two'"):
        load_train_config(recipe, ["parallel.dp_shard=two"])


def test_a_pipeline_micro_batch_that_does_not_split_is_refused_before_training():
    with pytest.raises(ConfigError, match="micro_batch 3 does not split into 2 pipeline micro-batches"):
        TrainConfig(max_steps=1, micro_batch=3, parallel=ParallelConfig(pp=2))


def test_a_fine_tuning_layout_that_does_not_fit_is_refused_before_the_model_loads(cli, tmp_path):
    result = cli("finetune", "sft", tmp_path / "no-such-model", "--data", tmp_path / "no-such.jsonl",
                 "--out", tmp_path / "out", "--set", "parallel.dp_shard=2")
    assert result.status == 2
    assert "does not divide 1 process" in result.err and "no-such" not in result.err


def test_muon_is_refused_where_weights_are_sharded():
    with pytest.raises(ConfigError, match="muon.*set optimizer = \"adamw\""):
        TrainConfig(max_steps=1, optimizer="muon", parallel=ParallelConfig(dp_shard=2))
    TrainConfig(max_steps=1, optimizer="muon", parallel=ParallelConfig(pp=2))  # whole matrices per stage


def test_a_layout_of_several_processes_without_torchrun_says_so(tiny_gpt_model):
    import torch

    from scratchlm.train.distributed import DistInfo
    from scratchlm.train.parallel import parallelize

    with pytest.raises(ConfigError, match="needs 2 processes; start it with torchrun"):
        parallelize(tiny_gpt_model, ParallelConfig(dp_replicate=1, tp=2), DistInfo(0, 2), torch.device("cpu"))


@pytest.fixture
def tiny_gpt_model(tokenizer):
    from conftest import tiny_gpt

    return tiny_gpt(tokenizer)


# ---- parity on gloo: one torchrun job per process count, every layout in it ------------------
def run_parity(tmp_path: Path, processes: int, layouts: list[str]) -> dict:
    out = tmp_path / f"parity{processes}"
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                           str(HERE / "parallel_parity.py"), str(out), *layouts],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)}


def check_parity(results: dict, layouts: list[str]) -> None:
    for rank, by_layout in results.items():
        assert sorted(by_layout) == sorted(layouts)
        for layout, r in by_layout.items():
            assert r["missing"] == [], (rank, layout)
            assert len(r["compared"]) >= 10, (rank, layout)  # a stage holds only its own layers
            assert r["max_grad_diff"] <= 1e-5 * r["max_grad"], (rank, layout, r["max_grad_diff"])
            assert r["losses"] == pytest.approx(r["one_process"], abs=1e-5), (rank, layout)


TWO = ["llama:dp_replicate=2", "llama:dp_shard=2", "llama:tp=2", "llama-qknorm:tp=2", "gpt2:tp=2", "gpt2:dp_shard=2",
       "llama-untied:pp=2", "llama-untied:pp=2,pp_schedule=gpipe"]
FOUR = ["llama:dp_shard=2,tp=2", "llama:dp_replicate=2,dp_shard=2", "llama:dp_replicate=2,tp=2",
        "llama-untied:pp=2,dp_shard=2", "llama-untied:pp=2,tp=2", "gpt2:dp_replicate=4"]


@pytest.mark.slow  # two processes import torch and train seven layouts (~15 s)
def test_every_two_process_layout_trains_like_one_process(tmp_path):
    check_parity(run_parity(tmp_path, 2, TWO), TWO)


@pytest.mark.slow  # four processes on two cores (~30 s)
def test_every_four_process_layout_trains_like_one_process(tmp_path):
    check_parity(run_parity(tmp_path, 4, FOUR), FOUR)


# ---- pretraining end to end: layouts, sharded checkpoints, resuming on another count -------
# A constant learning rate (wsd without cooldown, no warmup): the schedule then does not depend
# on max_steps, so a run cut at step 3 and resumed to 6 is the same run as one of 6 steps.
PRETRAIN = ["--recipe", "quickstart", "--quiet", "--set", "optimizer=adamw", "--set", "model=cpu-tiny",
            "--set", "micro_batch=2", "--set", "batch_tokens=512", "--set", "seq_len=64", "--set", "eval_every=3",
            "--set", "checkpoint_every=3", "--set", "samples=1", "--set", "sample_tokens=4", "--set", "warmup_steps=0",
            "--set", "schedule=wsd", "--set", "cooldown_fraction=0", "--set", "model_config.tie_embeddings=false",
            "--set", "model_config.qk_norm=false", "--set", "eval_tokens=1000", "--set", "log_every=1"]


def pretrain(shards: Path, out: Path, processes: int, *extra: str) -> None:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    done = subprocess.run([sys.executable, *launcher, "-m", "scratchlm.cli", "pretrain", "--data", str(shards),
                           "--out", str(out), *PRETRAIN, *extra], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def evaluations(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_bpb"] for r in read_metrics(run / "metrics.jsonl") if "val_bpb" in r}


@pytest.mark.slow  # six torchrun jobs of pretraining (~80 s)
def test_pretraining_under_each_layout_resumes_on_another_process_count(shards, tmp_path):
    pretrain(shards, tmp_path / "one", 1, "--max-steps", "6")
    reference = losses(tmp_path / "one")
    assert list(reference) == list(range(1, 7))

    # Sharded checkpoints: saved by 2 FSDP ranks, resumed by 1 process and by 4 FSDP ranks.
    pretrain(shards, tmp_path / "half", 2, "--max-steps", "3", "--set", "parallel.dp_shard=2")
    checkpoint = tmp_path / "half" / "checkpoints" / "step_000003"
    assert (checkpoint / "shards" / ".metadata").is_file() and not (checkpoint / "model.safetensors").exists()
    for processes in (1, 4):
        run = tmp_path / f"resumed-on-{processes}"
        shutil.copytree(tmp_path / "half", run)
        pretrain(shards, run, processes, "--max-steps", "6", "--resume",
                 *(["--set", "parallel.dp_shard=-1"] if processes > 1 else []))
        assert losses(run) == pytest.approx(reference, abs=2e-5), processes
        assert evaluations(run) == pytest.approx(evaluations(tmp_path / "one"), abs=2e-5)
        assert "| layout | " in (run / "report.md").read_text()

    # A sharded checkpoint is a model too: open_model reads its shards whole.
    from scratchlm.interop import open_model

    sharded = open_model(checkpoint, kind="language-model").model.state_dict()
    whole = open_model(tmp_path / "one" / "checkpoints" / "step_000003", kind="language-model").model.state_dict()
    assert sharded.keys() == whole.keys()
    for name in whole:
        assert torch.allclose(sharded[name], whole[name], atol=1e-5), name

    # Resuming with another number of tokens a step would be another run: refused.
    other = tmp_path / "other-batch"
    shutil.copytree(tmp_path / "half", other)
    done = subprocess.run([sys.executable, "-m", "scratchlm.cli", "pretrain", "--data", str(shards), "--out", str(other),
                           *PRETRAIN, "--max-steps", "6", "--resume", "--set", "batch_tokens=256"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 2 and "tokens_per_step = 512" in done.stderr and "Traceback" not in done.stderr

    # Tensor and pipeline parallel: the same run, and a whole model folder at the end.
    for layout in ("parallel.tp=2", "parallel.pp=2"):
        run = tmp_path / layout
        pretrain(shards, run, 2, "--max-steps", "6", "--set", layout)
        assert losses(run) == pytest.approx(reference, abs=2e-5), layout
        assert evaluations(run) == pytest.approx(evaluations(tmp_path / "one"), abs=2e-5), layout
        assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_checkpoint_with_whole_weights_is_not_resumed_into_a_sharded_layout(shards, tmp_path):
    pretrain(shards, tmp_path / "run", 1, "--max-steps", "3")
    done = subprocess.run([sys.executable, "-m", "scratchlm.cli", "pretrain", "--data", str(shards), "--out",
                           str(tmp_path / "run"), *PRETRAIN, "--max-steps", "6", "--resume", "--set", "parallel.dp_shard=-1"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 2
    assert "holds whole weights" in done.stderr and "Traceback" not in done.stderr
