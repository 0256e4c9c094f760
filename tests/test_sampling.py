import math
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from scratchlm.errors import ConfigError, ContextTooLongError
from scratchlm.model import GPT, get_preset
from scratchlm.model.model import KVCache
from scratchlm.model.sampling import (
    FINISHED,
    CompletionStream,
    SamplingConfig,
    Utf8StreamDecoder,
    apply_repetition_penalty,
    encode_prompt,
    filter_logits,
    fit_context,
    generate_text,
    generate_tokens,
    sample_next,
)
from scratchlm.model.sampling import MAX_NUM_SAMPLES, MAX_STOP_LENGTH, MAX_STOP_STRINGS, MAX_TEMPERATURE, MIN_TEMPERATURE, new_generator
from scratchlm.tokenizer.tokens import document_start  # what evaluation scores texts after
from scratchlm.tokenizer import Tokenizer, train_bpe

from conftest import TINY_TEXT as TRAIN_TEXT  # the text of conftest's `tokenizer` and `model`

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=20)


def steps_of(model, prompt_ids, config, eot_id=None) -> list[list[int]]:
    return list(generate_tokens(model, prompt_ids, config, eot_id))


def column(steps: list[list[int]], sample: int = 0) -> list[int]:
    return [step[sample] for step in steps]


def greedy_by_recomputation(model, prompt_ids: list[int], n: int) -> list[int]:
    """Reference: rerun the whole sequence without a cache for every new token."""
    seq = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt_ids) :]


class ScriptedModel(nn.Module):
    """Draws scripts[row][n] as the n-th new token of each row, whatever it is fed (the last
    entry repeats), so text-layer tests control exactly which bytes arrive."""

    def __init__(self, scripts: list[list[int]], vocab_size: int, block_size: int = 128) -> None:
        super().__init__()
        self.config = get_preset("cpu-tiny").replace(vocab_size=vocab_size, block_size=block_size)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the sampler a device
        self.scripts = scripts
        self.fed_lengths: list[int] = []

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache.empty(self.config, batch, max_len or self.config.block_size, "cpu", torch.float32)

    def forward(self, idx, targets=None, cache=None, last_only=False):
        batch, length = idx.shape
        self.fed_lengths.append(length)
        n = len(self.fed_lengths) - 1  # index of the token this call's last position predicts
        cache.lengths += length
        logits = torch.zeros(batch, 1 if last_only else length, self.config.vocab_size)
        for row in range(batch):
            script = self.scripts[row % len(self.scripts)]
            logits[row, -1, script[min(n, len(script) - 1)]] = 10.0
        return logits, None


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte, so multi-byte characters are split across tokens."""
    return [tokenizer.ranks[bytes([b])] for b in text.encode("utf-8")]


# ---- the token layer -----------------------------------------------------------------------
def test_greedy_with_kv_cache_equals_argmax_of_full_recomputation(model, tokenizer):
    prompt = tokenizer.encode("The quick brown fox")
    assert column(steps_of(model, prompt, GREEDY)) == greedy_by_recomputation(model, prompt, 20)


def test_prompt_is_run_once_then_one_token_per_step(tokenizer):
    scripted = ScriptedModel([byte_tokens(tokenizer, "abcdef")], tokenizer.vocab_size)
    steps_of(scripted, [1, 2, 3, 4], SamplingConfig(temperature=0, max_new_tokens=6))
    assert scripted.fed_lengths == [4, 1, 1, 1, 1, 1]


def test_top_k_one_equals_greedy(model, tokenizer):
    prompt = tokenizer.encode("A café")
    top1 = SamplingConfig(temperature=1.3, top_k=1, max_new_tokens=20, seed=5)
    assert steps_of(model, prompt, top1) == steps_of(model, prompt, GREEDY)


def test_same_seed_gives_same_samples_and_other_seeds_differ(model, tokenizer):
    prompt = tokenizer.encode("The")
    config = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=1, num_samples=2)
    first = steps_of(model, prompt, config)
    assert first == steps_of(model, prompt, config)
    assert first != steps_of(model, prompt, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=2, num_samples=2))
    assert column(first, 0) != column(first, 1)  # samples of one batch are independent draws


def test_sample_that_draws_eot_is_finished_while_others_go_on(tokenizer):
    eot = tokenizer.eot_id
    scripted = ScriptedModel([[5, eot], [5, 6, 7, eot]], tokenizer.vocab_size)
    steps = steps_of(scripted, [1], SamplingConfig(temperature=0, max_new_tokens=10, num_samples=2), eot)
    assert steps == [[5, 5], [eot, 6], [FINISHED, 7], [FINISHED, eot]]


def test_generation_restores_the_models_training_mode(model, tokenizer):
    model.train()
    steps = generate_tokens(model, tokenizer.encode("The"), GREEDY)
    next(steps)
    assert not model.training
    steps.close()
    assert model.training
    model.eval()


def test_fit_context_crops_prompt_to_leave_room_but_keeps_half_the_context():
    assert fit_context(10, 128, 20) == (10, 20)  # fits: nothing changes
    assert fit_context(200, 128, 10) == (119, 10)  # 119 prompt + 10 new - 1 unfed = 128 positions
    assert fit_context(100, 128, 200) == (64, 65)  # the prompt keeps half; the cache fills after 65


def test_prompt_longer_than_context_is_refused_unless_truncation_is_asked(model, tokenizer):
    block = model.config.block_size
    prompt = (tokenizer.encode(TRAIN_TEXT) * 2)[: block + 50]
    with pytest.raises(ContextTooLongError, match=f"{block + 50} tokens.*context is {block}.*truncat"):
        generate_tokens(model, prompt, SamplingConfig(temperature=0, max_new_tokens=10))
    got = column(steps_of(model, prompt, SamplingConfig(temperature=0, max_new_tokens=10, truncate=True)))
    assert got == greedy_by_recomputation(model, prompt[-(block + 1 - 10) :], 10)


def test_generation_stops_when_the_cache_is_full(model, tokenizer):
    block = model.config.block_size
    prompt = (tokenizer.encode(TRAIN_TEXT) * 2)[:100]
    steps = steps_of(model, prompt, SamplingConfig(temperature=0, max_new_tokens=500))
    assert len(steps) == block + 1 - 100  # the prompt's 100 positions, then one per token but the last
    truncated = steps_of(model, prompt, SamplingConfig(temperature=0, max_new_tokens=500, truncate=True))
    assert len(truncated) == block + 1 - block // 2  # the prompt keeps half the context


def test_ids_past_the_vocab_limit_are_never_drawn_by_samples_sharing_a_prompt():
    # A model whose embedding table is padded past its tokenizer's vocabulary (pretraining pads
    # to a multiple of 64); the samples of one prompt share its prefill logits.
    torch.manual_seed(0)
    padded = GPT(get_preset("cpu-tiny").replace(vocab_size=320)).eval()
    config = SamplingConfig(temperature=MAX_TEMPERATURE, max_new_tokens=30, seed=0, num_samples=3)
    steps = list(generate_tokens(padded, [1, 2, 3], config, vocab_limit=260))
    drawn = [token for step in steps for token in step]
    assert len(drawn) == 3 * 30 and max(drawn) < 260


def test_empty_token_prompt_raises_config_error(model):
    with pytest.raises(ConfigError, match="prompt"):
        generate_tokens(model, [], GREEDY)


# ---- logits filters ------------------------------------------------------------------------
def test_temperature_divides_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert torch.allclose(filter_logits(logits, 0.5), logits / 0.5)
    assert torch.allclose(filter_logits(logits, 1.0), logits)


def test_temperature_zero_keeps_only_the_argmax():
    out = filter_logits(torch.tensor([[0.1, 3.0, -2.0]]), 0.0)
    assert out[0, 1] == 3.0 and torch.isinf(out[0, [0, 2]]).all()


def test_top_k_keeps_the_k_largest_logits():
    out = filter_logits(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 1.0, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, True, False]]


def test_top_p_keeps_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = probs.log()

    def kept(top_p: float) -> list[bool]:
        return torch.isfinite(filter_logits(logits, 1.0, top_p=top_p)).tolist()[0]

    assert kept(0.75) == [False, True, False, True, False]  # 0.5 + 0.3 = 0.8 >= 0.75
    assert kept(0.85) == [False, True, True, True, False]  # needs the 0.1 too
    assert kept(0.5) == [False, True, False, False, False]  # the top token alone reaches 0.5
    assert kept(0.01) == [False, True, False, False, False]  # the top token always stays
    assert kept(1.0) == [True] * 5


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, -4.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_repetition_penalty_steers_greedy_away_from_repeats(tokenizer):
    # Logits 10 for token 5 and 6 for token 6: once 5 is seen it drops to 5 and 6 wins; once
    # both are seen (5 and 3), 5 wins again.
    class TwoFavourites(ScriptedModel):
        def forward(self, idx, targets=None, cache=None, last_only=False):
            logits, _ = super().forward(idx, targets, cache, last_only)
            logits[:, -1, 6] = 6.0
            return logits, None

    scripted = TwoFavourites([[5]], tokenizer.vocab_size)
    config = SamplingConfig(temperature=0, repetition_penalty=2.0, max_new_tokens=3)
    assert column(steps_of(scripted, [1], config)) == [5, 6, 5]


def test_a_row_with_non_finite_logits_falls_back_to_its_most_likely_token_and_leaves_the_others_alone():
    torch.manual_seed(0)
    good = torch.randn(1, 50)
    bad = torch.full((4, 50), float("nan"))
    bad[1] = float("-inf")  # every token ruled out
    bad[2, 7] = float("inf")  # one logit overflowed: softmax gives nan
    bad[3, :10] = torch.arange(10.0)  # nan beyond the first ten: their best is 9
    logits = torch.cat([good, bad, good])
    configs = [SamplingConfig(temperature=1.0, top_k=10, top_p=0.9)] * 5 + [SamplingConfig(temperature=0.5)]
    configs[4] = SamplingConfig(temperature=0.0)  # a greedy row with nan logits: argmax must skip the nan
    together = [new_generator(torch.device("cpu"), seed) for seed in range(6)]
    alone = {row: new_generator(torch.device("cpu"), row) for row in (0, 5)}
    for _ in range(20):
        tokens = sample_next(logits, configs, together).tolist()
        assert tokens[1:5] == [0, 0, 7, 9]
        for row in (0, 5):  # draws exactly as if the bad rows were not there
            assert tokens[row] == int(sample_next(logits[row : row + 1], configs[row : row + 1], [alone[row]])[0])


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    logits = torch.randn(2, 30)
    assert torch.equal(filter_logits(logits, 1.0, top_k=10**30), logits)  # more than an int64 holds
    config = SamplingConfig(temperature=1.0, top_k=2**31 - 1, seed=3)
    reference = SamplingConfig(temperature=1.0, seed=3)
    draws = [sample_next(logits, [c] * 2, [new_generator(torch.device("cpu"), 3)] * 2).tolist() for c in (config, reference)]
    assert draws[0] == draws[1]


# ---- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("temperature", math.nan), ("temperature", 1e-40), ("temperature", MAX_TEMPERATURE * 2),
     ("top_k", -1), ("top_k", 10**30), ("top_k", True), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5),
     ("min_p", math.nan), ("repetition_penalty", 0.0), ("repetition_penalty", 1e-300), ("repetition_penalty", 1e300),
     ("frequency_penalty", math.nan), ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("num_samples", 0),
     ("num_samples", MAX_NUM_SAMPLES + 1), ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.5), ("stop", ("",)),
     ("stop", ("x",) * (MAX_STOP_STRINGS + 1)), ("stop", ("x" * (MAX_STOP_LENGTH + 1),)), ("stop_token_ids", (True,))],
)
def test_invalid_sampling_config_raises_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**{field: value})


def test_sampling_config_accepts_the_ends_of_every_range():
    SamplingConfig(temperature=MIN_TEMPERATURE, top_k=2**31 - 1, repetition_penalty=0.01, seed=2**64 - 1,
                   num_samples=MAX_NUM_SAMPLES, stop=("x" * MAX_STOP_LENGTH,) * MAX_STOP_STRINGS)
    SamplingConfig(temperature=MAX_TEMPERATURE, top_k=0, repetition_penalty=100.0, seed=-(2**63))


def test_logits_divided_by_the_smallest_temperature_stay_finite():
    # float32 logits as large as a model could produce without having diverged.
    logits = torch.tensor([[1e30, -1e30, 0.0]])
    assert torch.isfinite(filter_logits(logits, MIN_TEMPERATURE)).all()


def test_a_single_stop_string_is_not_split_into_characters():
    assert SamplingConfig(stop="\n\n").stop == ("\n\n",)


# ---- the text layer --------------------------------------------------------------------------
def test_utf8_stream_decoder_holds_the_bytes_of_a_split_character():
    data = "é日🙂".encode()
    decoder = Utf8StreamDecoder()
    pieces = [decoder.push(data[i : i + 1]) for i in range(len(data))]
    assert "".join(pieces) + decoder.flush() == "é日🙂"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["", "é", ""]


def test_utf8_stream_decoder_flush_marks_an_unfinished_character():
    decoder = Utf8StreamDecoder()
    assert decoder.push("日".encode()[:2]) == ""
    assert decoder.flush() == "\ufffd"


def test_streamed_pieces_concatenate_to_the_returned_text_without_replacement_chars(tokenizer):
    text = "café 日本語 🙂 brûlée"
    scripted = ScriptedModel([byte_tokens(tokenizer, text) + [tokenizer.eot_id]], tokenizer.vocab_size)
    pieces: list[str] = []
    out = generate_text(scripted, tokenizer, "A", SamplingConfig(temperature=0, max_new_tokens=100),
                        on_text=lambda i, p: pieces.append(p))
    assert out == [text]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_truncates_and_is_never_streamed(tokenizer):
    scripted = ScriptedModel([byte_tokens(tokenizer, "hello\n\nUser: more")], tokenizer.vocab_size)
    pieces: list[str] = []
    config = SamplingConfig(temperature=0, max_new_tokens=50, stop=("\n\nUser:",))
    out = generate_text(scripted, tokenizer, "A", config, on_text=lambda i, p: pieces.append(p))
    assert out == ["hello"]
    assert "".join(pieces) == "hello"
    assert len(scripted.fed_lengths) == len("hello\n\nUser:")  # generation ends at the stop string


def test_held_back_start_of_a_stop_string_is_released_when_it_does_not_complete():
    stream = CompletionStream(stops=("\n\nUser:",))
    assert stream.push(b"hi\n\n") == "hi"
    assert stream.push(b"Us") == ""
    assert stream.push(b"a") == "\n\nUsa"
    assert stream.push(b"\n") == ""
    assert stream.finish() == "\n"
    assert stream.text == "hi\n\nUsa\n" and not stream.stopped


def test_eot_ends_a_sample_and_is_not_part_of_its_text(tokenizer):
    scripted = ScriptedModel([byte_tokens(tokenizer, "ab") + [tokenizer.eot_id], byte_tokens(tokenizer, "abcd")],
                             tokenizer.vocab_size)
    out = generate_text(scripted, tokenizer, "x", SamplingConfig(temperature=0, max_new_tokens=4, num_samples=2))
    assert out == ["ab", "abcd"]


def test_generate_text_returns_one_completion_per_sample_without_the_prompt(model, tokenizer):
    config = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3, num_samples=3)
    out = generate_text(model, tokenizer, "The quick", config)
    assert len(out) == 3 and not any(o.startswith("The quick") for o in out)


def test_empty_prompt_starts_from_eot(tokenizer):
    assert encode_prompt(tokenizer, "") == [tokenizer.eot_id]


def test_empty_prompt_without_eot_raises_config_error():
    tokenizer = train_bpe(["abc abc"], vocab_size=260, workers=1, min_frequency=1, special_tokens=())
    with pytest.raises(ConfigError, match="empty"):
        encode_prompt(tokenizer, "")


def test_prompt_may_contain_special_tokens(tokenizer):
    assert encode_prompt(tokenizer, "<|endoftext|>") == [tokenizer.eot_id]


def _with_bos(tokenizer, add_bos_token: bool):
    """`tokenizer` as a Llama-3-style model's: <|im_start|> declared as BOS, added or not."""
    metadata = {"bos_token_id": tokenizer.special_tokens["<|im_start|>"], "add_bos_token": add_bos_token}
    return Tokenizer(tokenizer.ranks, tokenizer.special_tokens, tokenizer.pattern, metadata=metadata)


def test_generation_starts_where_evaluation_scores_from_for_a_model_that_adds_bos(tokenizer):
    bos_tokenizer = _with_bos(tokenizer, add_bos_token=True)
    bos = bos_tokenizer.special_tokens["<|im_start|>"]
    assert document_start(bos_tokenizer) == encode_prompt(bos_tokenizer, "") == [bos]
    assert encode_prompt(bos_tokenizer, "The quick") == [bos, *tokenizer.encode("The quick")]
    # a prompt that already opens with BOS (a rendered chat template) does not get a second one
    assert encode_prompt(bos_tokenizer, "<|im_start|>x") == [bos, *tokenizer.encode("x")]


def test_a_declared_bos_that_is_not_added_leaves_the_prompt_alone(tokenizer):
    plain = _with_bos(tokenizer, add_bos_token=False)
    assert document_start(plain) == encode_prompt(plain, "") == [tokenizer.eot_id]
    assert encode_prompt(plain, "The quick") == tokenizer.encode("The quick")


# ---- properties of the text layer ------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab \n\u00e9\u65e5\U0001f642")), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
    stops=st.lists(st.text(alphabet=st.sampled_from(list("ab\n\u00e9\U0001f642")), min_size=1, max_size=3), max_size=3),
)
def test_streamed_pieces_equal_the_text_cut_before_the_first_stop_string(text, cuts, stops):
    """Whatever byte boundaries the tokens fall on and whatever the stop strings, the pieces
    shown concatenate to the text up to the earliest stop string, and never hold U+FFFD."""
    data = text.encode()
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    stream = CompletionStream(tuple(stops))
    shown = [stream.push(data[a:b]) for a, b in zip(bounds, bounds[1:])]
    shown.append(stream.finish())
    hits = [text.find(s) for s in stops if s in text]
    expected = text[: min(hits)] if hits else text
    assert "".join(shown) == stream.text == expected
    assert "\ufffd" not in "".join(shown)
