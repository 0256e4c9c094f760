"""Batched generation and the scheduler: every sequence in a batch behaves as if it ran alone."""

import asyncio
import threading

import pytest
import torch

from scratchlm.errors import ConfigError, ContextTooLongError
from scratchlm.model import GPT, get_preset
from scratchlm.model.sampling import DecodeBatch, SamplingConfig, filter_logits, generate, generate_text
from scratchlm.tokenizer.chat_template import chat_stop_ids, render_chat
from scratchlm.serve.engine import Scheduler, ServerBusyError
from scratchlm.model.sampling import apply_frequency_penalties
from scratchlm.tokenizer import Tokenizer

from conftest import tiny_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "Crème brûlée, 日本語, emoji 🙂.\n") * 20
PROMPTS = ["The", "The quick brown fox jumps over", "Pack my box", "A", "🙂 emoji and more words here", "dog."]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Overrides conftest's: conftest's `model` then uses this one."""
    return tiny_tokenizer(TEXT)


def one_by_one(model, tokenizer, prompts, config):
    return [generate(model, tokenizer, [p], config, max_batch=1)[0] for p in prompts]


# ---- batched generation ------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_batched_greedy_generation_equals_one_by_one(model, tokenizer, max_batch):
    batched = generate(model, tokenizer, PROMPTS, GREEDY, max_batch=max_batch)
    alone = one_by_one(model, tokenizer, PROMPTS, GREEDY)
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.prompt_tokens for c in batched] == [len(tokenizer.encode(p)) for p in PROMPTS]


def test_each_sequence_stops_on_its_own_and_the_others_go_on(model, tokenizer):
    # The first prompt's first greedy token is its stop token: it ends at once; the rest run on.
    first = generate(model, tokenizer, [PROMPTS[0]], GREEDY)[0].token_ids[0]
    config = SamplingConfig(temperature=0.0, max_new_tokens=12, stop_token_ids=(first,))
    out = generate(model, tokenizer, PROMPTS[:3], config, max_batch=3)
    assert out[0].finish_reason == "stop" and out[0].token_ids == [] and out[0].text == ""
    for completion, alone in zip(out[1:], one_by_one(model, tokenizer, PROMPTS[1:3], config)):
        assert completion.token_ids == alone.token_ids


def test_streamed_pieces_of_a_batch_concatenate_to_each_completion(model, tokenizer):
    pieces: dict[int, list[str]] = {}
    config = SamplingConfig(temperature=1.0, max_new_tokens=30, seed=4, num_samples=2)
    out = generate(model, tokenizer, PROMPTS[:3], config, max_batch=4, on_text=lambda i, p: pieces.setdefault(i, []).append(p))
    assert len(out) == 6
    for index, completion in enumerate(out):
        assert "".join(pieces.get(index, [])) == completion.text
        assert "\ufffd" not in completion.text or "\ufffd" in tokenizer.decode(completion.token_ids)


def test_seeded_samples_do_not_depend_on_the_batch_they_ran_in(model, tokenizer):
    config = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=15, seed=11)
    together = generate(model, tokenizer, PROMPTS, config, max_batch=6)
    # Prompt n draws with seed + n whatever runs beside it.
    for n, prompt in enumerate(PROMPTS):
        alone = generate(model, tokenizer, [prompt], SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=15, seed=11 + n))
        assert together[n].token_ids == alone[0].token_ids


def test_stop_string_split_across_tokens_ends_only_its_own_sequence(model, tokenizer):
    reference = generate(model, tokenizer, PROMPTS[:2], GREEDY, max_batch=2)
    text = reference[0].text
    stop = text[3:6]  # three characters from inside the first completion, whatever its tokens
    assert len(stop) == 3
    config = SamplingConfig(temperature=0.0, max_new_tokens=12, stop=(stop,))
    pieces: list[str] = []
    out = generate(model, tokenizer, PROMPTS[:2], config, max_batch=2, on_text=lambda i, p: i == 0 and pieces.append(p))
    assert out[0].text == text[: text.index(stop)] and out[0].finish_reason == "stop"
    assert "".join(pieces) == out[0].text
    if stop not in reference[1].text:
        assert out[1].text == reference[1].text


def test_generation_stops_at_the_models_end_of_sequence_token(model, tokenizer):
    eos_first = generate(model, tokenizer, ["The"], GREEDY)[0].token_ids[0]
    chatty = Tokenizer(tokenizer.ranks, tokenizer.special_tokens, tokenizer.pattern, metadata={"eos_token_id": eos_first})
    assert chatty.eos_id == eos_first
    out = generate(model, chatty, ["The"], GREEDY)[0]
    assert (out.token_ids, out.text, out.finish_reason) == ([], "", "stop")


def test_finish_reason_is_length_when_tokens_or_context_run_out(model, tokenizer):
    assert generate(model, tokenizer, ["The"], GREEDY)[0].finish_reason == "length"
    block = model.config.block_size
    long_prompt = (tokenizer.encode(TEXT) * 2)[: block - 4]
    out = generate(model, tokenizer, [long_prompt], SamplingConfig(temperature=0.0, max_new_tokens=50))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5  # block + 1 - prompt


def test_a_prompt_over_the_context_is_refused_before_anything_runs(model, tokenizer):
    too_long = tokenizer.encode(TEXT)[: model.config.block_size + 1]
    with pytest.raises(ContextTooLongError, match="prompt 1: the prompt has"):
        generate(model, tokenizer, ["fine", too_long], GREEDY)


def test_decode_batch_refuses_more_sequences_than_free_slots(model):
    batch = DecodeBatch(model, max_batch=2)
    batch.add([1, 2, 3], GREEDY)
    with pytest.raises(ConfigError, match="free slots"):
        batch.add([1, 2], GREEDY, copies=2)


# ---- logits processing per row ----------------------------------------------------------------
def test_per_row_settings_equal_the_same_settings_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    temperature, top_k, top_p, min_p = torch.tensor([0.5, 1.0, 0.0]), torch.tensor([5, 0, 3]), torch.tensor([1.0, 0.8, 0.5]), torch.tensor([0.0, 0.1, 0.0])
    together = filter_logits(logits, temperature, top_k, top_p, min_p)
    for row in range(3):
        alone = filter_logits(logits[row : row + 1], float(temperature[row]), int(top_k[row]), float(top_p[row]), float(min_p[row]))
        torch.testing.assert_close(together[row : row + 1], alone)


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_top_probability():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), 1.0, min_p=0.2)).tolist()[0]
    assert kept == [True, True, True, False]  # 0.05 < 0.2 x 0.5


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0, 1, 3, 0]])
    out = apply_frequency_penalties(logits, counts, 0.5, 1.0)
    assert out.tolist() == [[0.0, -1.5, -2.5, 0.0]]


def test_frequency_penalty_stops_greedy_repeating_itself(model, tokenizer):
    plain = generate(model, tokenizer, ["The"], SamplingConfig(temperature=0.0, max_new_tokens=30))[0].token_ids
    penalised = generate(model, tokenizer, ["The"], SamplingConfig(temperature=0.0, max_new_tokens=30, frequency_penalty=2.0))[0].token_ids
    assert max(penalised.count(t) for t in set(penalised)) < max(plain.count(t) for t in set(plain))


# ---- the scheduler ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def endless_tokenizer(tokenizer) -> Tokenizer:
    """The tokenizer without its special tokens: no end-of-sequence token, and the ids past its
    vocabulary are never drawn, so a generation without stop ids or strings only ends at its
    length limit."""
    return Tokenizer(tokenizer.ranks, {}, tokenizer.pattern)


ENDLESS = SamplingConfig(temperature=1.0, max_new_tokens=100_000, truncate=True)  # ends only when the context is full


@pytest.fixture
def held_steps(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """(entered, release): each decode step sets `entered`, then waits for `release`. While held,
    the running generations cannot advance, so none can finish, and the scheduler admits nothing."""
    entered, release = threading.Event(), threading.Event()
    real_step = DecodeBatch.step

    def held(batch: DecodeBatch):
        entered.set()
        release.wait()
        return real_step(batch)

    monkeypatch.setattr(DecodeBatch, "step", held)
    return entered, release


def test_concurrent_submissions_are_batched_and_equal_generation_alone(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch=4)
    try:
        generations = scheduler.submit_many([(tokenizer.encode(p), GREEDY) for p in PROMPTS])
        results = [g.result() for g in generations]
    finally:
        scheduler.close()
    alone = one_by_one(model, tokenizer, PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == [a.token_ids for a in alone]
    assert [r.text for r in results] == [a.text for a in alone]
    assert scheduler.peak_active == 4  # queued together, so the first round fills every slot


def test_async_generation_streams_the_same_text(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch=2)

    async def run() -> tuple[list[str], str | None]:
        generation = scheduler.submit(tokenizer.encode("The quick"), GREEDY, loop=asyncio.get_running_loop())
        events = [event async for event in generation]
        return [e.text for e in events], events[-1].finish_reason

    try:
        texts, finish = asyncio.run(run())
    finally:
        scheduler.close()
    assert "".join(texts) == generate_text(model, tokenizer, "The quick", GREEDY)[0]
    assert finish == "length"


def test_cancelled_generation_frees_its_slot(model, endless_tokenizer, held_steps):
    entered, release = held_steps
    scheduler = Scheduler(model, endless_tokenizer, max_batch=1)
    try:
        endless = scheduler.submit(endless_tokenizer.encode("The"), ENDLESS)
        entered.wait()  # it holds the only slot and has drawn one token
        endless.cancel()
        release.set()
        assert [e.finish_reason for e in endless][-1] == "cancelled"
        follower = scheduler.submit(endless_tokenizer.encode("Pack"), GREEDY).result()  # the only slot is free again
        assert follower.finish_reason == "length" and scheduler.active == 0
    finally:
        release.set()
        scheduler.close()


def test_scheduler_refuses_bad_requests_at_submit(model, endless_tokenizer, held_steps):
    entered, release = held_steps
    scheduler = Scheduler(model, endless_tokenizer, max_batch=1, max_queue=1)
    try:
        with pytest.raises(ContextTooLongError):
            scheduler.submit([1] * (model.config.block_size + 1), GREEDY)
        with pytest.raises(ConfigError, match="num_samples"):
            scheduler.submit([1, 2], SamplingConfig(num_samples=2))
        with pytest.raises(ConfigError, match="no tokens"):
            scheduler.submit([], GREEDY)
        running = scheduler.submit([1], ENDLESS)
        entered.wait()  # it holds the only slot
        waiting = scheduler.submit([1], GREEDY)  # fills the queue
        with pytest.raises(ServerBusyError, match="waiting"):
            scheduler.submit([1], GREEDY)
        with pytest.raises(ConfigError, match="max_queue"):
            scheduler.submit_many([([1], GREEDY)] * 2)  # can never fit: a bad request, not a busy server
        running.cancel()
        waiting.cancel()
    finally:
        release.set()
        scheduler.close()


def test_close_ends_unfinished_generations_as_cancelled(model, endless_tokenizer, monkeypatch):
    monkeypatch.setattr(DecodeBatch, "step", lambda batch: [])  # nothing advances, so nothing finishes on its own
    scheduler = Scheduler(model, endless_tokenizer, max_batch=1)
    endless, queued = scheduler.submit_many([([1], ENDLESS), ([2], GREEDY)])
    scheduler.close()
    assert [e.finish_reason for e in endless][-1] == "cancelled"
    assert [e.finish_reason for e in queued][-1] == "cancelled"


def test_a_cancelled_waiting_generation_leaves_the_queue_at_once(model, endless_tokenizer, held_steps):
    entered, release = held_steps
    scheduler = Scheduler(model, endless_tokenizer, max_batch=1, max_queue=2)
    try:
        running = scheduler.submit([1], ENDLESS)
        entered.wait()  # the scheduler is held inside a step: only `cancel` can take a generation off the queue
        first, second = scheduler.submit_many([([2], GREEDY), ([3], GREEDY)])
        first.cancel()
        assert scheduler.waiting == 1
        assert [(e.text, e.finish_reason) for e in first] == [("", "cancelled")]  # already there: `cancel` sent it
        third = scheduler.submit([4], GREEDY)  # the cancelled one no longer takes a place
        assert scheduler.waiting == 2
        running.cancel()
        release.set()
        assert [g.result().finish_reason for g in (running, second, third)] == ["cancelled", "length", "length"]
    finally:
        release.set()
        scheduler.close()


def test_submit_many_queues_every_generation_or_none(model, endless_tokenizer, held_steps):
    entered, release = held_steps
    scheduler = Scheduler(model, endless_tokenizer, max_batch=1, max_queue=3)
    try:
        running = scheduler.submit([1], ENDLESS)
        entered.wait()
        scheduler.submit_many([([2], GREEDY)] * 2)
        with pytest.raises(ServerBusyError, match="waiting"):
            scheduler.submit_many([([3], GREEDY)] * 2)  # one place left for two
        assert scheduler.waiting == 2  # nothing of the refused request stays queued
        with pytest.raises(ContextTooLongError):  # checked whole before anything is queued
            scheduler.submit_many([([3], GREEDY), ([1] * (model.config.block_size + 1), GREEDY)])
        assert scheduler.waiting == 2
        last = scheduler.submit([3], GREEDY)
        running.cancel()
        release.set()
        assert last.result().finish_reason == "length"
    finally:
        release.set()
        scheduler.close()


def test_a_failing_admission_ends_only_its_generation_and_the_scheduler_keeps_serving(model, tokenizer, monkeypatch):
    real_add = DecodeBatch.add

    def add(batch, prompt_ids, *args, **kwargs):
        if list(prompt_ids) == [7, 7, 7]:
            raise RuntimeError("boom")  # not a ScratchLMError: a bug, or a failure of the device
        return real_add(batch, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(DecodeBatch, "add", add)
    scheduler = Scheduler(model, tokenizer, max_batch=2)
    try:
        prompt = tokenizer.encode(PROMPTS[1])
        # The good prompts on both sides of the bad one, all admitted in the same round.
        before, bad, after = scheduler.submit_many([(prompt, GREEDY), ([7, 7, 7], GREEDY), (prompt, GREEDY)])
        alone = one_by_one(model, tokenizer, [PROMPTS[1]], GREEDY)[0]
        assert before.result().token_ids == alone.token_ids and before.finish_reason == alone.finish_reason
        events = list(bad)
        assert events[-1].finish_reason == "error" and events[-1].error.startswith("RuntimeError")
        assert after.result().token_ids == alone.token_ids
        assert scheduler.submit(prompt, GREEDY).result().token_ids == alone.token_ids
    finally:
        scheduler.close()


@pytest.mark.parametrize(("error", "told"), [
    (RuntimeError("cannot read /srv/models/secret/weights.bin"), "RuntimeError (the server's log has the details)"),
    (ConfigError("prompt: too long for the context"), "prompt: too long for the context"),
])
def test_a_failure_tells_the_client_a_bugs_type_only_and_an_input_errors_message(model, tokenizer, monkeypatch,
                                                                                 error, told):
    # A bug's text may name files: only the log gets it (as the server's handler of unexpected errors).
    def add(batch, *args, **kwargs):
        raise error

    monkeypatch.setattr(DecodeBatch, "add", add)
    scheduler = Scheduler(model, tokenizer, max_batch=1)
    try:
        events = list(scheduler.submit(tokenizer.encode(PROMPTS[0]), GREEDY))
        assert events[-1].finish_reason == "error" and events[-1].error == told
    finally:
        scheduler.close()


def test_a_failing_step_ends_every_running_generation_with_an_error_and_the_scheduler_keeps_serving(model, tokenizer, monkeypatch):
    real_step = DecodeBatch.step
    failed = threading.Event()

    def step(batch):
        if not failed.is_set():
            failed.set()
            raise RuntimeError("device lost")
        return real_step(batch)

    monkeypatch.setattr(DecodeBatch, "step", step)
    scheduler = Scheduler(model, tokenizer, max_batch=2)
    try:
        first, second = scheduler.submit_many([(tokenizer.encode(p), GREEDY) for p in PROMPTS[:2]])
        for generation in (first, second):
            events = list(generation)
            assert events[-1].finish_reason == "error" and events[-1].error.startswith("RuntimeError")
        later = scheduler.submit(tokenizer.encode(PROMPTS[0]), GREEDY).result()
        assert later.token_ids == one_by_one(model, tokenizer, PROMPTS[:1], GREEDY)[0].token_ids
    finally:
        scheduler.close()


# ---- the real model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_batched_chat_equals_one_by_one_and_ends_at_its_end_of_turn(smollm2):
    model, tokenizer = smollm2
    questions = ["What is the capital of France?", "What is 2 + 2?"]
    prompts = [render_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    config = SamplingConfig(temperature=0.0, max_new_tokens=10, stop_token_ids=chat_stop_ids(tokenizer))
    batched = generate(model, tokenizer, prompts, config, max_batch=2)
    alone = one_by_one(model, tokenizer, prompts, config)
    assert [c.text for c in batched] == [c.text for c in alone]
    assert "Paris" in batched[0].text and batched[0].finish_reason == "stop"
    assert "<|im_end|>" not in batched[0].text


def test_the_cache_grows_as_sequences_lengthen_and_results_do_not_change(tokenizer):
    torch.manual_seed(0)
    model = GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size, block_size=400)).eval()
    prompt = (tokenizer.encode(TEXT) * 3)[:250]
    batch = DecodeBatch(model, max_batch=2)
    assert batch.cache.max_len == 256  # not the whole context up front
    out = generate(model, tokenizer, [prompt], SamplingConfig(temperature=0.0, max_new_tokens=20))[0].token_ids
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert out == seq[250:]
