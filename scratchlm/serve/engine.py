"""The serving engine: concurrent requests run as one batch on a background thread.

`Scheduler.submit` queues a prompt and returns a `Generation` at once; `submit_many` queues
several (a request's samples or prompts) all together or none. The scheduler's thread loops:
free the slots of cancelled generations, move waiting prompts into free slots of a `DecodeBatch`
(each prompt's prefill draws its first token), then one decode step for every running
generation. A request that arrives while others decode joins at the next step instead of
waiting for the batch to drain (continuous batching, Yu et al. 2022, "Orca"). A generation whose
client went away leaves the queue at once if it was waiting, and gives up its slot within one
step if it was running.

Each generation's text arrives as `TextEvent`s, through a thread-safe queue for plain threads or
an asyncio queue for an event loop (the HTTP server). Every generation gets a last event with a
finish reason, whatever happens: one whose admission fails ends with "error" alone; a decode step
that fails ends every running generation with "error" and the scheduler starts a fresh batch and
goes on serving. All model work happens on the one thread, so the model is never run by two
threads at once.
"""

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from scratchlm.errors import ConfigError, ScratchLMError
from scratchlm.model.sampling import (
    Completion,
    CompletionStream,
    DecodeBatch,
    SamplingConfig,
    TokenStep,
    check_vocabularies,
    fit_prompt,
    new_generator,
    settle,
)
from scratchlm.tokenizer import Tokenizer


log = logging.getLogger("scratchlm.serve")


class ServerBusyError(ScratchLMError):
    """The queue of waiting generations is full; try again later."""


@dataclass(frozen=True)
class TextEvent:
    text: str  # the next piece of text that is safe to show; may be empty
    completion_tokens: int  # tokens generated so far
    finish_reason: str | None = None  # the last event: "stop", "length", "cancelled" or "error"
    error: str | None = None  # what went wrong, when finish_reason is "error"


class Generation:
    """One prompt's completion as it is produced. Iterate it (`for`, or `async for` when it was
    submitted with an event loop) for `TextEvent`s; the last has a finish_reason."""

    def __init__(self, prompt_ids: list[int], config: SamplingConfig, loop: asyncio.AbstractEventLoop | None,
                 on_cancel: Callable[["Generation"], None] | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.config = config
        self.prompt_tokens = len(prompt_ids)
        self.token_ids: list[int] = []
        self.stream = CompletionStream(config.stop)
        self._loop = loop
        self._events: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel
        self.finish_reason: str | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating (the client went away). A waiting generation leaves the queue now and
        ends with "cancelled"; a running one frees its slot at the scheduler's next step."""
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    def _emit(self, text: str, finish_reason: str | None = None, error: str | None = None) -> None:
        if finish_reason is not None:
            self.finish_reason = finish_reason
        event = TextEvent(text, len(self.token_ids), finish_reason, error)
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    def __iter__(self) -> Iterator[TextEvent]:
        if self._loop is not None:
            raise ConfigError("engine: this generation was submitted with an event loop; use `async for`")
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    async def _events_async(self) -> AsyncIterator[TextEvent]:
        while True:
            event = await self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[TextEvent]:
        if self._loop is None:
            raise ConfigError("engine: this generation was submitted without an event loop; use `for`")
        return self._events_async()

    def result(self) -> Completion:
        """Wait for the end; the whole completion (submitted without an event loop only)."""
        text = "".join(event.text for event in self)
        return Completion(text, self.token_ids, self.finish_reason or "error", self.prompt_tokens)


class Scheduler:
    """Runs generations for many callers on one model, batched. Thread-safe; `close` when done.

    At most `max_queue` generations wait for a slot; a request for more than that at once can
    never be queued (cap the samples per request below it)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 256) -> None:
        check_vocabularies(model, tokenizer)
        if max_batch < 1 or max_queue < 1:
            raise ConfigError(f"engine: max_batch and max_queue must be >= 1, not {max_batch} and {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        self._waiting: deque[Generation] = deque()
        self._running: dict[int, Generation] = {}
        self._wake = threading.Condition()
        self._closed = False
        self.peak_active = 0  # the most generations decoded in one step so far
        self._thread = threading.Thread(target=self._loop, name="scratchlm-scheduler", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, prompt_ids: Sequence[int], config: SamplingConfig, loop: asyncio.AbstractEventLoop | None = None) -> Generation:
        """Queue a prompt; its generation starts when a slot is free. Bad requests fail here,
        before they wait: a prompt that does not fit (ContextTooLongError), `num_samples` > 1
        (submit several generations instead), a full queue (ServerBusyError)."""
        return self.submit_many([(prompt_ids, config)], loop)[0]

    def submit_many(self, jobs: Sequence[tuple[Sequence[int], SamplingConfig]],
                    loop: asyncio.AbstractEventLoop | None = None) -> list[Generation]:
        """Queue several (prompt ids, config) jobs, all or none: each is checked as `submit`
        checks it, then all go in the queue at once, or ServerBusyError when they do not all fit
        (nothing is queued). More jobs than `max_queue` can never fit: a ConfigError."""
        if len(jobs) > self.max_queue:
            raise ConfigError(f"engine: {len(jobs)} generations at once is more than the queue holds (max_queue {self.max_queue})")
        for _, config in jobs:
            if config.num_samples != 1:
                raise ConfigError("engine: submit one generation per sample (num_samples must be 1)")
        block_size = self.model.config.block_size
        generations = [Generation(fit_prompt(ids, config, block_size), config, loop, self._withdraw) for ids, config in jobs]
        with self._wake:
            if self._closed:
                raise ServerBusyError("engine: the scheduler is closed")
            if len(self._waiting) + len(generations) > self.max_queue:
                raise ServerBusyError(f"engine: {len(self._waiting)} requests are already waiting, room for "
                                      f"{self.max_queue - len(self._waiting)} of {len(generations)}; try again later")
            self._waiting.extend(generations)
            self._wake.notify()
        return generations

    def close(self) -> None:
        """Stop the thread; unfinished generations end with finish_reason "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _withdraw(self, generation: Generation) -> None:
        """A cancelled generation that still waits leaves the queue and ends now; one already
        taken by the scheduler's thread ends there."""
        with self._wake:
            try:
                self._waiting.remove(generation)
            except ValueError:
                return
        generation._emit("", "cancelled")

    # ---- the scheduler's thread --------------------------------------------------------------
    def _loop(self) -> None:
        batch = DecodeBatch(self.model, self.max_batch, vocab_limit=self.tokenizer.vocab_size)
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._running:
                    self._wake.wait()
                if self._closed:
                    break
                admitted = []
                while self._waiting and len(admitted) < batch.free:
                    admitted.append(self._waiting.popleft())
            try:
                self._drop_cancelled(batch)
                for generation in admitted:
                    self._admit(batch, generation)
                if self._running:
                    self.peak_active = max(self.peak_active, len(self._running))
                    for step in batch.step():
                        self._deliver(batch, step)
            except Exception as error:  # a failed step leaves the running sequences unknown: end them all
                unfinished = [g for g in [*self._running.values(), *admitted] if g.finish_reason is None]
                self._fail(unfinished, error)  # those admitted this round too, if the failure came first
                self._running.clear()
                # Freeing the slots is enough to start afresh (a new sequence starts its cache
                # row at length 0), and allocates nothing that could fail again here.
                for slot in batch.active:
                    batch.remove(slot)
        with self._wake:
            leftovers = [*self._running.values(), *self._waiting]
            self._running.clear()
            self._waiting.clear()
        for generation in leftovers:
            generation._emit(generation.stream.finish(), "cancelled")

    def _drop_cancelled(self, batch: DecodeBatch) -> None:
        for slot, generation in list(self._running.items()):
            if generation.cancelled:
                batch.remove(slot)
                del self._running[slot]
                generation._emit("", "cancelled")

    def _admit(self, batch: DecodeBatch, generation: Generation) -> None:
        """Start a generation, or end it with "error" if that fails; the others are not touched
        (a failed `DecodeBatch.add` leaves the batch as it was)."""
        if generation.cancelled:
            generation._emit("", "cancelled")
            return
        try:
            generator = new_generator(batch.device, generation.config.seed)
            steps = batch.add(generation.prompt_ids, generation.config, self._eos, generator=generator)
        except Exception as error:
            self._fail([generation], error)
            return
        self._running[steps[0].slot] = generation
        self._deliver(batch, steps[0])

    @staticmethod
    def _fail(generations: list[Generation], error: Exception) -> None:
        """End the generations with finish_reason "error" and what went wrong: a ScratchLMError's
        message, else only the exception's type, as the server's `_unexpected_error` does (its
        text may name files); the log keeps the traceback."""
        message = str(error)
        if not isinstance(error, ScratchLMError):  # a bug or a device failure, not bad input
            log.error("engine: generation failed", exc_info=error)
            message = f"{type(error).__name__} (the server's log has the details)"
        for generation in generations:
            generation._emit("", "error", message)

    def _deliver(self, batch: DecodeBatch, step: TokenStep) -> None:
        generation = self._running[step.slot]
        if step.finish != "stop":
            generation.token_ids.append(step.token)
        piece, ended = settle(generation.stream, step, self.tokenizer)
        if ended and step.finish is None:  # a stop string
            batch.remove(step.slot)
        if ended:
            del self._running[step.slot]
        if piece or ended:
            generation._emit(piece, ended)
