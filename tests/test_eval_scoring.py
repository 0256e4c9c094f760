"""Scoring primitives and language-modelling scores, checked against direct forward passes of a
tiny random model: equality properties do not need a trained one."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.data.shards import tokenize_documents
from scratchlm.errors import ConfigError, ContextTooLongError
from scratchlm.eval.language_modeling import LanguageModelScore, evaluate_shards, evaluate_text
from scratchlm.eval.scoring import (
    greedy_generate,
    rolling_token_nats,
    score_continuations,
    split_context,
)
from scratchlm.tokenizer.tokens import document_start
from scratchlm.model import GPT, get_preset
from scratchlm.tokenizer import Tokenizer, train_bpe

from conftest import TINY_TEXT as TRAIN_TEXT  # the text of conftest's `tokenizer`
from conftest import tiny_gpt

BLOCK = 16  # a short context, so that modest texts need many sliding windows


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    return tiny_gpt(tokenizer, block_size=BLOCK)


def ids_of(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode_ordinary(TRAIN_TEXT)
    assert len(ids) >= n
    return ids[:n]


@torch.no_grad()
def direct_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i + 1] | tokens[: i + 1]) for every i, from one unbatched forward pass."""
    logits, _ = model(torch.tensor([tokens[:-1]]))
    return F.log_softmax(logits[0].double(), -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


# ---- split_context / document_start -------------------------------------------------------
def test_document_start_is_bos_when_always_added_else_endoftext_else_bos_else_nothing(tokenizer):
    assert document_start(tokenizer) == [tokenizer.eot_id]
    always_bos = Tokenizer(tokenizer.ranks, tokenizer.special_tokens, tokenizer.pattern,
                           metadata={"bos_token_id": 7, "add_bos_token": True})
    assert document_start(always_bos) == [7]
    # SmolLM2: its "bos" <|im_start|> opens a chat turn, not a document; <|endoftext|> does.
    chat_bos = Tokenizer(tokenizer.ranks, tokenizer.special_tokens, tokenizer.pattern, metadata={"bos_token_id": 7})
    assert document_start(chat_bos) == [tokenizer.eot_id]
    assert document_start(Tokenizer(tokenizer.ranks, {}, tokenizer.pattern, metadata={"bos_token_id": 7})) == [7]
    no_specials = Tokenizer(tokenizer.ranks, {}, tokenizer.pattern)
    assert document_start(no_specials) == []


def test_split_context_moves_trailing_whitespace_to_the_continuation(tokenizer):
    assert split_context(tokenizer, "The quick brown ", "fox") == split_context(tokenizer, "The quick brown", " fox")
    ctx, cont = split_context(tokenizer, "The quick brown ", "fox")
    assert tokenizer.decode(cont) == " fox"
    assert ctx == tokenizer.encode_ordinary("The quick brown")


def test_split_context_tokenizes_the_continuation_as_running_text_with_the_prefix(tokenizer):
    prefix = [tokenizer.eot_id]
    ctx, cont = split_context(tokenizer, "A café in the old", " town serves", prefix)
    whole = tokenizer.encode_ordinary("A café in the old town serves")
    assert ctx == prefix + tokenizer.encode_ordinary("A café in the old")
    assert cont == whole[len(ctx) - 1 :]  # lm-eval's slice when the context's ids are a prefix of the whole's


def test_split_context_treats_special_token_strings_as_text(tokenizer):
    ctx, cont = split_context(tokenizer, "end of <|endoftext|>", " and <|im_end|>")
    assert tokenizer.eot_id not in ctx and tokenizer.special_tokens["<|im_end|>"] not in cont
    assert tokenizer.decode(ctx + cont) == "end of <|endoftext|> and <|im_end|>"


def test_split_context_falls_back_to_a_shared_token_boundary_when_a_token_straddles_it(tokenizer):
    # "fo" + "x": the whole text has the token for "fox" (or " fox"), which the context's
    # tokens do not end at; the split must not drop the straddling token.
    merged = next(t for t in tokenizer.ranks if len(t) >= 3 and t.isascii() and t.decode().strip().isalpha() and t[:1] != b" ")
    text = merged.decode()
    ctx, cont = split_context(tokenizer, text[:-1], text[-1:])
    assert cont, "the continuation must keep the straddling token"
    assert tokenizer.decode(ctx + cont) == text


@settings(max_examples=200, deadline=None)
@given(context=st.text(max_size=40), continuation=st.text(min_size=1, max_size=40))
def test_split_context_ids_decode_back_to_context_and_continuation(tokenizer, context, continuation):
    prefix = [tokenizer.eot_id]
    ctx, cont = split_context(tokenizer, context, continuation, prefix)
    assert ctx[: len(prefix)] == prefix
    assert tokenizer.decode(ctx[len(prefix) :] + cont) == context + continuation
    assert cont, "a non-empty continuation always keeps at least one token"


# ---- score_continuations --------------------------------------------------------------------
def some_requests(tokenizer) -> list[tuple[list[int], list[int]]]:
    prefix = document_start(tokenizer)
    pairs = [
        ("The quick", " brown fox"),
        ("A", " café"),
        ("Numbers 1 2", " 3 and"),
        ("The quick brown fox", " jumps"),
        ("emoji", " 🙂"),
    ]
    return [split_context(tokenizer, c, x, prefix) for c, x in pairs]


def test_batched_scores_equal_each_request_scored_alone(model, tokenizer):
    requests = some_requests(tokenizer)
    batched = score_continuations(model, requests, batch_size=3)
    alone = [score_continuations(model, [r], batch_size=1)[0] for r in requests]
    assert [s.tokens for s in batched] == [len(cont) for _, cont in requests]
    for b, a in zip(batched, alone):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
        assert b.greedy == a.greedy


def test_continuation_logprob_is_the_sum_of_its_tokens_log_probabilities(model, tokenizer):
    for ctx, cont in some_requests(tokenizer):
        expected = direct_logprobs(model, ctx + cont)[-len(cont) :].sum().item()
        (score,) = score_continuations(model, [(ctx, cont)])
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.logprob < 0


@torch.no_grad()
def test_greedy_flag_is_true_exactly_when_every_token_is_the_argmax(model, tokenizer):
    context = ids_of(tokenizer, 5)
    greedy_tail, seq = [], list(context)
    for _ in range(4):
        logits, _ = model(torch.tensor([seq]))
        greedy_tail.append(int(logits[0, -1].argmax()))
        seq.append(greedy_tail[-1])
    not_argmax = (greedy_tail[-1] + 1) % tokenizer.vocab_size
    scores = score_continuations(model, [(context, greedy_tail), (context, greedy_tail[:-1] + [not_argmax])])
    assert [s.greedy for s in scores] == [True, False]


# Shared contexts: each distinct context runs once into a KV cache that its continuations copy.
SHARED_BLOCK, SHARED_VOCAB = 16, 64
TINY_FAMILIES = {
    "llama": get_preset("cpu-tiny").replace(vocab_size=SHARED_VOCAB, block_size=SHARED_BLOCK, n_kv_head=2),
    "gpt2": get_preset("cpu-tiny").replace(vocab_size=SHARED_VOCAB, block_size=SHARED_BLOCK, positions="learned",
                                           norm="layernorm", mlp="gelu", bias=True),
}


@pytest.fixture(scope="module", params=sorted(TINY_FAMILIES))
def family_model(request) -> GPT:
    torch.manual_seed(3)
    return GPT(TINY_FAMILIES[request.param]).eval()


@torch.no_grad()
def score_alone(model, context: list[int], continuation: list[int]) -> tuple[float, bool, float]:
    """(log-probability, greedy, smallest |target logit - best other logit|) of one request from
    one forward pass of its last block_size + 1 tokens (the truncation rule)."""
    tokens = (context + continuation)[-(model.config.block_size + 1) :]
    logits = model(torch.tensor([tokens[:-1]]))[0][0, -len(continuation) :].double()
    target = torch.tensor(continuation)
    logprob = F.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()
    target_logit = logits.gather(-1, target[:, None])[:, 0]
    best_other = logits.scatter(-1, target[:, None], -math.inf).amax(-1)
    return logprob, bool((target_logit > best_other).all()), (target_logit - best_other).abs().min().item()


@st.composite
def shared_context_requests(draw) -> list[tuple[list[int], list[int]]]:
    """Requests whose contexts are cut from one token stream: several choices per context,
    contexts that are prefixes of one another or differ only in their last token, some longer
    than the model's context (truncated), of 1 to 2 * block_size tokens."""
    token = st.integers(0, SHARED_VOCAB - 1)
    stream = draw(st.lists(token, min_size=2 * SHARED_BLOCK, max_size=2 * SHARED_BLOCK))
    requests = []
    for _ in range(draw(st.integers(1, 4))):
        context = stream[: draw(st.integers(1, 2 * SHARED_BLOCK - 1))] + draw(st.lists(token, max_size=1))
        for _ in range(draw(st.integers(1, 5))):
            requests.append((context, draw(st.lists(token, min_size=1, max_size=SHARED_BLOCK // 2))))
    return draw(st.permutations(requests))


@settings(max_examples=100, deadline=None)
@given(requests=shared_context_requests(), batch_size=st.integers(1, 9))
def test_shared_context_scores_equal_each_request_run_alone(family_model, requests, batch_size):
    scores = score_continuations(family_model, requests, batch_size=batch_size, truncate=True)
    for (context, continuation), score in zip(requests, scores):
        logprob, greedy, margin = score_alone(family_model, context, continuation)
        assert score.tokens == len(continuation)
        # float32 logits differ from the lone pass by ~1e-6 (another attention kernel, summation
        # order, padding width); a sum of at most 8 log-probabilities stays far inside 1e-4.
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        if margin > 1e-4:  # a near-tie may fall either way within that error
            assert score.greedy == greedy


def test_a_shared_context_runs_once_and_each_choice_feeds_its_last_token_and_continuation(family_model):
    context = list(range(10))
    choices = [[20, 21, 22], [23], [24, 25], [26, 27]]
    fed = []
    hook = family_model.register_forward_pre_hook(lambda module, args: fed.append(tuple(args[0].shape)))
    try:
        score_continuations(family_model, [(context, c) for c in choices], batch_size=16)
    finally:
        hook.remove()
    assert fed == [(1, len(context) - 1), (len(choices), 3)]


def test_a_model_without_a_kv_cache_scores_a_whole_row_per_request(family_model):
    class Wrapped(torch.nn.Module):  # a module that is not a GPT: no cache to share a context through
        def __init__(self, gpt: GPT) -> None:
            super().__init__()
            self.gpt, self.config = gpt, gpt.config

        def forward(self, idx):
            return self.gpt(idx)

    requests = [(list(range(9)), [30, 31]), (list(range(9)), [32]), ([5, 6], [7, 8, 9])]
    scores = score_continuations(Wrapped(family_model), requests, batch_size=2)
    for score, (context, continuation) in zip(scores, requests):
        assert score.logprob == pytest.approx(score_alone(family_model, context, continuation)[0], abs=1e-4)


def test_empty_continuation_or_context_is_refused(model):
    with pytest.raises(ConfigError, match="continuation has no tokens"):
        score_continuations(model, [([1, 2], [])])
    with pytest.raises(ConfigError, match="context has no tokens"):
        score_continuations(model, [([], [1, 2])])


def test_too_long_request_is_refused_unless_truncate_keeps_the_last_block_size_tokens(model, tokenizer):
    ids = ids_of(tokenizer, BLOCK + 6)
    context, continuation = ids[:-3], ids[-3:]
    with pytest.raises(ContextTooLongError, match=f"needs {BLOCK + 5} tokens but the model's context is {BLOCK}; pass --truncate"):
        score_continuations(model, [(context, continuation)])
    (truncated,) = score_continuations(model, [(context, continuation)], truncate=True)
    (cropped,) = score_continuations(model, [(ids[-(BLOCK + 1) : -3], continuation)])
    assert truncated.logprob == pytest.approx(cropped.logprob, abs=1e-6)
    with pytest.raises(ContextTooLongError, match="continuation alone"):
        score_continuations(model, [(ids[:1], ids[1 : BLOCK + 2])], truncate=True)


def test_a_request_that_exactly_fills_the_context_is_scored(model, tokenizer):
    ids = ids_of(tokenizer, BLOCK + 1)  # BLOCK positions fed, the last token only predicted
    (score,) = score_continuations(model, [(ids[:1], ids[1:])])
    assert score.tokens == BLOCK and score.logprob == pytest.approx(direct_logprobs(model, ids).sum().item(), abs=1e-4)


def test_scoring_restores_training_mode(model, tokenizer):
    model.train()
    try:
        score_continuations(model, some_requests(tokenizer)[:1])
        rolling_token_nats(model, ids_of(tokenizer, 8))
        assert model.training
    finally:
        model.eval()


# ---- rolling_token_nats -----------------------------------------------------------------------
def test_text_shorter_than_the_context_is_one_forward_pass(model, tokenizer):
    ids = ids_of(tokenizer, BLOCK - 3)
    nats = rolling_token_nats(model, ids)
    assert nats.dtype == np.float64 and len(nats) == len(ids) - 1
    np.testing.assert_allclose(nats, -direct_logprobs(model, ids).numpy(), atol=1e-5)


def test_stride_equal_to_the_context_is_non_overlapping_windows(model, tokenizer):
    ids = ids_of(tokenizer, 3 * BLOCK + 5)
    nats = rolling_token_nats(model, ids, stride=BLOCK, batch_size=2)
    expected = []
    for start in range(0, len(ids) - 1, BLOCK):  # each window feeds BLOCK tokens and predicts the next BLOCK
        expected.extend((-direct_logprobs(model, ids[start : start + BLOCK + 1])).tolist())
    np.testing.assert_allclose(nats, expected, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 5, BLOCK // 2, BLOCK - 1])
def test_each_token_is_scored_once_with_the_context_of_its_first_window(model, tokenizer, stride):
    ids = ids_of(tokenizer, 2 * BLOCK + 7)
    nats = rolling_token_nats(model, ids, stride=stride, batch_size=3)
    assert len(nats) == len(ids) - 1
    for j in range(1, len(ids)):
        # Window k feeds ids[k*stride : k*stride + BLOCK]; the first that predicts token j.
        start = max(0, math.ceil((j - BLOCK) / stride)) * stride
        expected = -direct_logprobs(model, ids[start : j + 1])[-1].item()
        assert nats[j - 1] == pytest.approx(expected, abs=1e-5), f"token {j}"


def test_rolling_nats_do_not_depend_on_the_batch_size(model, tokenizer):
    ids = ids_of(tokenizer, 3 * BLOCK)
    np.testing.assert_allclose(
        rolling_token_nats(model, ids, stride=4, batch_size=1), rolling_token_nats(model, ids, stride=4, batch_size=7), atol=1e-5
    )


def test_rolling_nats_refuse_a_stride_outside_the_context(model):
    for stride in (0, BLOCK + 1):
        with pytest.raises(ConfigError, match="stride must be between 1"):
            rolling_token_nats(model, [1, 2, 3], stride=stride)
    assert len(rolling_token_nats(model, [1])) == 0


# ---- greedy_generate ----------------------------------------------------------------------------
@torch.no_grad()
def greedy_by_recomputation(model, prompt_ids: list[int], n: int) -> list[int]:
    seq = list(prompt_ids)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt_ids) :]


def test_greedy_generate_is_the_argmax_continuation_cut_at_a_stop_string(model, tokenizer):
    prompts = ["The quick", "café"]
    completions = greedy_generate(model, tokenizer, prompts, max_new_tokens=6)
    for prompt, completion in zip(prompts, completions):
        expected_ids = greedy_by_recomputation(model, tokenizer.encode(prompt), 6)
        if tokenizer.eot_id in expected_ids:
            expected_ids = expected_ids[: expected_ids.index(tokenizer.eot_id)]
        assert completion == tokenizer.decode(expected_ids)
    assert len(completions[0]) >= 4
    stop = completions[0][2:4]
    (cut,) = greedy_generate(model, tokenizer, prompts[:1], max_new_tokens=6, stop=[stop])
    assert cut == completions[0][: completions[0].index(stop)]


def test_greedy_generate_refuses_a_prompt_without_room_unless_truncate(model, tokenizer):
    prompt = tokenizer.decode(ids_of(tokenizer, BLOCK + 4))
    with pytest.raises(ContextTooLongError, match="pass --truncate"):
        greedy_generate(model, tokenizer, [prompt], max_new_tokens=4)
    (completion,) = greedy_generate(model, tokenizer, [prompt], max_new_tokens=4, truncate=True)
    assert isinstance(completion, str)


# ---- language-modelling scores ------------------------------------------------------------------
def test_language_model_score_units_follow_from_nats_tokens_and_bytes():
    score = LanguageModelScore(tokens=10, bytes=40, nats=20.0)
    assert score.perplexity == pytest.approx(math.exp(2.0))
    assert score.bits_per_token == pytest.approx(2.0 / math.log(2))
    assert score.bits_per_byte == pytest.approx(0.5 / math.log(2))
    assert json.loads(json.dumps(score.to_dict())) == pytest.approx(
        {"tokens": 10, "bytes": 40, "nats": 20.0, "perplexity": math.exp(2.0),
         "bits_per_token": 2.0 / math.log(2), "bits_per_byte": 0.5 / math.log(2)}
    )


def test_evaluate_text_scores_every_token_after_the_document_start(model, tokenizer):
    text = TRAIN_TEXT[:300]
    score = evaluate_text(model, tokenizer, text, stride=8)
    ids = tokenizer.encode_ordinary(text)
    assert score.tokens == len(ids) and score.bytes == len(text.encode())
    expected = rolling_token_nats(model, [tokenizer.eot_id] + ids, stride=8).sum()
    assert score.nats == pytest.approx(expected, rel=1e-9)


def test_bytes_scored_do_not_depend_on_the_tokenizer(tokenizer):
    text = TRAIN_TEXT[:500]
    other = train_bpe([TRAIN_TEXT], vocab_size=280, workers=1, min_frequency=1)
    torch.manual_seed(1)
    scores = [
        evaluate_text(GPT(get_preset("cpu-tiny").replace(vocab_size=tok.vocab_size, block_size=64)).eval(), tok, text)
        for tok in (tokenizer, other)
    ]
    assert scores[0].tokens != scores[1].tokens
    assert scores[0].bytes == scores[1].bytes == len(text.encode("utf-8"))


def test_evaluate_text_refuses_empty_text_and_a_tokenizer_larger_than_the_model(model, tokenizer):
    with pytest.raises(ConfigError, match="empty"):
        evaluate_text(model, tokenizer, "")
    small = GPT(get_preset("cpu-tiny").replace(vocab_size=100, block_size=BLOCK))
    with pytest.raises(ConfigError, match="not trained together"):
        evaluate_text(small, tokenizer, "hello")


# ---- shards -----------------------------------------------------------------------------------
VAL_DOCS = ["A café in the old town.", "The lazy dog sleeps. 🙂", "Numbers 1 2 3."]


@pytest.fixture(scope="module")
def shards(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    docs = [("train", "The quick brown fox jumps.")] + [("val", d) for d in VAL_DOCS]
    tokenize_documents(docs, tokenizer, folder, shard_tokens=7)  # several shard files per split
    tokenizer.save(folder / "tokenizer.json")
    return folder


def test_shard_score_counts_text_tokens_and_their_utf8_bytes(model, tokenizer, shards):
    score = evaluate_shards(model, tokenizer, shards, stride=4)
    stream = [t for d in VAL_DOCS for t in tokenizer.encode_ordinary(d) + [tokenizer.eot_id]]
    nats = rolling_token_nats(model, [tokenizer.eot_id] + stream, stride=4)
    is_text = np.array(stream) != tokenizer.eot_id
    assert score.tokens == is_text.sum() == sum(len(tokenizer.encode_ordinary(d)) for d in VAL_DOCS)
    assert score.bytes == sum(len(d.encode()) for d in VAL_DOCS)
    assert score.nats == pytest.approx(nats[is_text].sum(), rel=1e-9)


def test_shard_score_stops_at_max_tokens(model, tokenizer, shards):
    first = tokenizer.encode_ordinary(VAL_DOCS[0])
    score = evaluate_shards(model, tokenizer, shards, max_tokens=len(first))
    assert score.tokens == len(first) and score.bytes == len(VAL_DOCS[0].encode())
    assert score.nats == pytest.approx(evaluate_text(model, tokenizer, VAL_DOCS[0]).nats, rel=1e-6)


def test_shards_accept_an_equivalent_tokenizer_and_refuse_a_different_one(model, tokenizer, shards):
    renamed = Tokenizer(tokenizer.ranks, tokenizer.special_tokens, tokenizer.pattern, name="copy", metadata={"note": "x"})
    assert renamed.content_hash != tokenizer.content_hash
    assert evaluate_shards(model, renamed, shards).nats == pytest.approx(evaluate_shards(model, tokenizer, shards).nats)
    other = train_bpe(["something else entirely, with other merges"], vocab_size=280, workers=1, min_frequency=1)
    with pytest.raises(ConfigError, match="different tokenizer"):
        evaluate_shards(model, other, shards)
    with pytest.raises(ConfigError, match="split 'test' has no tokens"):
        evaluate_shards(model, tokenizer, shards, split="test")
