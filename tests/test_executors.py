"""`data prepare` on its executors: the local process pool and Ray (a local 2-CPU Ray instance)
give the same documents, ledger, statistics and byte-identical shards; a Ray worker killed
mid-run is retried with nothing lost or doubled; a killed local worker stops the run at once,
naming the stage."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_prepare import documents, messy_corpus, read_ledger, tokenizer_path  # noqa: F401 (fixtures)

from scratchlm.data.executors import LocalExecutor, RayExecutor, WorkerDiedError, make_executor
from scratchlm.data.prepare import load_prepare_config, prepare, worker_setup
from scratchlm.errors import ConfigError

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def corpus(documents, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    messy_corpus(root, documents)
    return root


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance with 2 CPUs for the module; executors find it running and keep it."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, object_store_memory=200 << 20)
    # Ray workers cannot import this test module: send its functions (the fault wrapper) by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def config_for(corpus: Path, tokenizer_path: Path, **settings):
    overrides = {"tokenizer": str(tokenizer_path), "chunk_docs": "16", "workers": "2", **settings}
    return load_prepare_config(None, overrides, [str(corpus)])


def outputs(out: Path) -> dict[str, bytes]:
    """Every file a run leaves for its users, by path, except the timings."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and not rel.startswith("work/") and rel not in ("stats.json", "report.md"):
            files[rel] = path.read_bytes()
    return files


def comparable_stats(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    for key in ("stage_seconds", "phase_seconds", "config"):
        stats.pop(key)
    return stats


@pytest.fixture(scope="module")
def local_run(corpus, tokenizer_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    prepare(config_for(corpus, tokenizer_path), out, progress=False)
    return out


def kill_once(state, marker: str, function, *args):
    """The task wrapper of a fault: the first attempt at the second clean chunk kills its own
    worker process (SIGKILL: no cleanup, as the OOM killer or a lost node would)."""
    if function.__name__ == "_clean_chunk" and args[0] == 1:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return function(state, *args)


class Faulty:
    """An executor whose tasks run through `kill_once`."""

    def __init__(self, inner, marker: Path):
        self.inner, self.marker = inner, str(marker)
        self.workers = inner.workers

    def run(self, tasks, on_done, stage):
        self.inner.run(((kill_once, self.marker, *task) for task in tasks), on_done, stage)

    def close(self):
        self.inner.close()


@pytest.mark.slow
def test_ray_and_local_executors_give_identical_results(ray_cluster, local_run, corpus, tokenizer_path, tmp_path):
    out = tmp_path / "ray"
    result = prepare(config_for(corpus, tokenizer_path, executor="ray"), out, progress=False)
    assert result.stats["accounted"] and result.stats["duplicates"] >= 2
    assert outputs(out) == outputs(local_run)
    assert any(name.endswith(".bin") for name in outputs(out))
    assert comparable_stats(out) == comparable_stats(local_run)
    assert ray.is_initialized()  # a Ray instance the caller started is left running


@pytest.mark.slow
def test_a_ray_worker_killed_mid_run_is_retried_and_nothing_is_lost_or_doubled(ray_cluster, local_run, corpus, tokenizer_path, tmp_path):
    out = tmp_path / "ray"
    config = config_for(corpus, tokenizer_path, executor="ray")
    marker = tmp_path / "killed"
    executor = Faulty(RayExecutor(2, *worker_setup(config, out)), marker)
    result = prepare(config, out, progress=False, executor=executor)
    assert marker.exists()  # the fault happened
    ledger = read_ledger(out)
    assert len(ledger) == len({row["id"] for row in ledger}) == result.stats["inputs"]
    assert outputs(out) == outputs(local_run)


@pytest.mark.slow
def test_a_killed_local_worker_stops_the_run_naming_the_stage(corpus, tokenizer_path, tmp_path):
    config = config_for(corpus, tokenizer_path)
    out = tmp_path / "out"
    executor = Faulty(LocalExecutor(2, *worker_setup(config, out)), tmp_path / "killed")
    with pytest.raises(WorkerDiedError, match=r"^clean: a worker process died"):
        prepare(config, out, progress=False, executor=executor)
    # Run again: it resumes from the finished chunks and completes.
    assert prepare(config, out, progress=False).stats["accounted"]


def test_executor_settings_are_checked():
    with pytest.raises(ConfigError, match="executor must be one of"):
        load_prepare_config(None, {"executor": "spark"}, ["x"])
    with pytest.raises(ConfigError, match="needs executor"):
        load_prepare_config(None, {"address": "auto"}, ["x"])
    with pytest.raises(ConfigError, match="executor must be one of"):
        make_executor("dask", 1, dict, ())


def square(state, x):
    return state["base"] + x * x


def test_local_executor_returns_results_in_task_order_with_bounded_work_in_flight():
    for workers in (1, 2):
        executor = LocalExecutor(workers, dict, ({"base": 1},))
        results = []
        executor.run(((square, i) for i in range(20)), results.append, "test")
        executor.run(((square, i) for i in range(3)), results.append, "test")  # the same pool again
        executor.close()
        assert results == [1 + i * i for i in range(20)] + [1, 2, 5]


@pytest.mark.slow
def test_cli_runs_on_ray_and_matches_the_local_run(local_run, corpus, tokenizer_path, tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "scratchlm.cli", "data", "prepare", "--input", str(corpus), "--out", str(out),
               "--tokenizer", str(tokenizer_path), "--set", "chunk_docs=16", "--workers", "2", "--executor", "ray", "--quiet"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kept" in done.stdout
    assert outputs(out) == outputs(local_run)
    bad = subprocess.run([*command[:-1], "--executor", "local", "--address", "auto"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "needs executor" in bad.stderr


def test_worker_setup_makes_the_paths_workers_open_absolute(corpus_tokenizer, tmp_path, monkeypatch):
    # A Ray worker runs in the folder its node was started in: relative paths would miss.
    monkeypatch.chdir(tmp_path)
    corpus_tokenizer.save(tmp_path / "tok.json")
    (tmp_path / "block.txt").write_text("example.com\n")
    (tmp_path / "words.txt").write_text("frobnicate\n")
    overrides = {"tokenizer": "tok.json", "filters": {"url_blocklist": "block.txt", "bad_words_file": "words.txt"}}
    config = load_prepare_config(None, overrides, ["in.jsonl"])
    _, (worker_config, work, tokenizer) = worker_setup(config, "out")
    assert work == tmp_path / "out" / "work" and Path(tokenizer) == tmp_path / "tok.json"
    filters = worker_config.cleaning.filters
    assert Path(filters.url_blocklist) == tmp_path / "block.txt" and Path(filters.bad_words_file) == tmp_path / "words.txt"


def test_an_address_where_nothing_answers_fails_in_one_line_at_once(tmp_path):
    import socket

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    command = [sys.executable, "-m", "scratchlm.cli", "data", "prepare", "--input", str(tmp_path / "in.jsonl"),
               "--out", str(tmp_path / "out"), "--executor", "ray", "--address", f"127.0.0.1:{port}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "nothing answers there" in done.stderr
    assert not (tmp_path / "out").exists()
