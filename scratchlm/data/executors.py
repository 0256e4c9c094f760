"""Where the data pipeline's per-chunk work runs: this process, a local process pool, or Ray.

`prepare` hands an executor tasks `(function, *args)`; each runs as `function(state, *args)`,
where `state` is built once per worker process by `setup(*setup_args)` (the cleaner, the MinHash
hasher, the tokenizer) and reused for every task that process gets. Stages stay plain functions
over chunks; an executor only decides where they run. Every task writes its outputs atomically
and is a pure function of its arguments, so running one twice (a retry) changes nothing.

- `LocalExecutor`: one worker runs inline; more run in a `ProcessPoolExecutor`, kept for the
  whole run. A worker that dies (killed, out of memory) breaks the pool, and the run stops at
  once naming the stage.
- `RayExecutor`: Ray tasks on a cluster (`address`), or on a local Ray instance started for the
  run and stopped after it. Ray retries a task whose worker died, on another worker.

Both keep at most `2 * workers` tasks in flight, so a fast reader cannot fill memory with chunks
waiting for a worker.
"""

import logging
import os
import signal
import socket
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Protocol

from scratchlm.errors import ConfigError, ScratchLMError, first_line

Task = tuple  # (function, *args): called as function(state, *args)
EXECUTORS = ("local", "ray")


class WorkerDiedError(ScratchLMError):
    """A worker process died (killed, out of memory) and the run cannot go on."""


class Executor(Protocol):
    workers: int

    def run(self, tasks: Iterable[Task], on_done: Callable[[object], None], stage: str) -> None:
        """Run every task; `on_done(result)` for each, in the order the tasks were given."""

    def close(self) -> None:
        """Release the workers (and a Ray instance this executor started)."""


# A worker process builds its state once; a pool initializer or a Ray task can only leave it for
# later tasks in a module-level name. Keyed by the executor's token, so states never mix.
_STATES: dict[str, object] = {}


def _state(token: str, setup: Callable, setup_args: tuple) -> object:
    if token not in _STATES:
        _STATES.clear()
        _STATES[token] = setup(*setup_args)
    return _STATES[token]


def _init_local(token: str, setup: Callable, setup_args: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _state(token, setup, setup_args)


def _call(token: str, setup: Callable, setup_args: tuple, task: Task) -> object:
    function, *args = task
    return function(_state(token, setup, setup_args), *args)


class LocalExecutor:
    """Inline with one worker, else a pool of `workers` processes, started at the first `run`
    and kept for the next ones (the phases of a run) until `close`."""

    def __init__(self, workers: int, setup: Callable, setup_args: tuple):
        self.workers = workers
        self._setup = (uuid.uuid4().hex, setup, setup_args)
        self._pool: ProcessPoolExecutor | None = None

    def run(self, tasks: Iterable[Task], on_done: Callable[[object], None], stage: str) -> None:
        if self.workers == 1:
            for task in tasks:
                on_done(_call(*self._setup, task))
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, initializer=_init_local, initargs=self._setup)
        pending: deque[Future] = deque()
        try:
            for task in tasks:
                if len(pending) >= 2 * self.workers:
                    on_done(pending.popleft().result())
                pending.append(self._pool.submit(_call, *self._setup, task))
            while pending:
                on_done(pending.popleft().result())
        except BrokenProcessPool:
            self._abandon()
            raise WorkerDiedError(
                f"{stage}: a worker process died (killed, or out of memory?); run the same command again to resume "
                "from the last finished chunk"
            ) from None
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        if self._pool is not None:
            _stop(self._pool)
            self._pool = None

    def close(self) -> None:
        _STATES.pop(self._setup[0], None)  # the inline worker's state (a tokenizer) lives in this process
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop at once: no waiting for queued chunks (their outputs are atomic and redone on resume)."""
    processes = list((pool._processes or {}).values())  # the executor has no public terminate
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()


class RayExecutor:
    """Tasks on a Ray cluster. With no `address`, a local Ray instance with `workers` CPUs is
    started (and stopped by `close`); with one, the cluster's CPUs are the workers. A Ray
    instance already running in this process (`ray.init` by the caller) is used as it is.

    A task whose worker dies is retried up to `retries` times on another worker; an exception
    raised by a task is not retried (it is bad input or a bug, and would fail again)."""

    def __init__(self, workers: int, setup: Callable, setup_args: tuple, address: str | None = None, retries: int = 3):
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'scratchlm[ray]' (or 'ray[data]')") from None
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            # "local": a new instance even where `ray start` left a cluster that ray.init would join.
            options = {"address": address} if address else {"address": "local", "num_cpus": workers or os.cpu_count() or 1}
            if address:
                _check_reachable(address)
            try:
                ray.init(**options, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                         configure_logging=False)  # fmt: skip
            except (ConnectionError, ValueError, RuntimeError) as error:  # no cluster, a ray:// address without ray[client]
                raise ConfigError(f"--address {address}: cannot connect to a Ray cluster ({first_line(error)})") from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._setup = ray.put((uuid.uuid4().hex, setup, setup_args))
        self._remote = ray.remote(_ray_call).options(max_retries=retries, retry_exceptions=False)

    def run(self, tasks: Iterable[Task], on_done: Callable[[object], None], stage: str) -> None:
        ray = self._ray
        pending: deque = deque()
        try:
            for task in tasks:
                if len(pending) >= 2 * self.workers:
                    on_done(self._get(pending.popleft(), stage))
                pending.append(self._remote.remote(self._setup, task))
            while pending:
                on_done(self._get(pending.popleft(), stage))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def _get(self, ref, stage: str) -> object:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, BaseException):
                raise error.cause from None  # the task's own exception, e.g. bad input
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as error:
            raise WorkerDiedError(f"{stage}: a Ray worker died and the task failed after its retries ({type(error).__name__}); "
                                  "run the same command again to resume") from None  # fmt: skip

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


def _check_reachable(address: str, seconds: float = 10.0) -> None:
    """Fail in seconds when nothing answers at HOST:PORT (ray.init would retry for many minutes);
    `auto` and `local` are Ray's to resolve."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address in ("auto", "local") or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as error:
        raise ConfigError(f"--address {address}: nothing answers there ({error.strerror or error}); is the Ray head running?") from None


def _ray_call(setup: tuple, task: Task) -> object:
    return _call(*setup, task)


def make_executor(kind: str, workers: int, setup: Callable, setup_args: tuple, address: str | None = None) -> Executor:
    """The executor named by `--executor` (`local` or `ray`); `workers` 0 means every core."""
    if kind == "local":
        if address:
            raise ConfigError("--address needs --executor ray")
        return LocalExecutor(workers or os.cpu_count() or 1, setup, setup_args)
    if kind == "ray":
        return RayExecutor(workers, setup, setup_args, address)
    raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, not {kind!r}")
