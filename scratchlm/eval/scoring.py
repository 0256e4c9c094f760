"""Scoring primitives: the only place evaluation code runs the model.

Three questions cover every benchmark:

- How likely is this continuation after this context? (`score_continuations`: multiple choice,
  lm-eval's `loglikelihood`.) Requests are sorted longest first, right-padded and run in
  batches; a causal model never lets a padded position change an earlier one, so a batch gives
  the numbers each request would give alone, and the longest batch runs first, so running out of
  memory happens at once rather than at the end. Multiple choice sends each context once per
  choice, so each distinct context of a batch runs once: its tokens but the last fill a KV cache
  row (no logits needed), copied for each of its continuations, and one more pass feeds every
  request its context's last token and its continuation. A model that cannot take a cache runs
  each request as one whole row. Log-softmax is taken only at the continuation's positions: a
  full float32 (batch, time, vocab) log-softmax of a 50k vocabulary is gigabytes.
- How surprising is each token of a long text? (`rolling_token_nats`: perplexity, bits per
  byte.) A text longer than the context is scored with a sliding window advancing by `stride`;
  each token is scored once, in the first window that holds it, which is the window where it
  has the most context (Hugging Face's "Perplexity of fixed-length models" guide). A window feeds
  `block_size` tokens and so predicts `block_size` targets.
- What does the model write? (`greedy_generate`, or `generate_completions` for sampled text,
  through the one sampling implementation in `scratchlm.model.sampling`.)

Tokens and text meet in `split_context`, which follows lm-evaluation-harness: trailing whitespace
of the context moves to the continuation, and the continuation is tokenized as part of the
running text, because "Paris" after "capital is" is the token " Paris", not "Paris".
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from scratchlm.errors import ConfigError, ContextTooLongError
from scratchlm.model import GPT, KVCache
from scratchlm.model.sampling import SamplingConfig, encode_prompt, generate_text
from scratchlm.tokenizer import Tokenizer


# ---- text -> tokens ------------------------------------------------------------------------
# `document_start` (the token scoring starts after) lives with the tokenizer, so that sampling
# starts generation from the same token; imported here for the runner and the harness.


def split_context(
    tokenizer: Tokenizer, context: str, continuation: str, prefix: Sequence[int] = ()
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for scoring `continuation` after `context`.

    As lm-evaluation-harness does: trailing whitespace of the context moves to the start of the
    continuation (BPE vocabularies attach a space to the word after it), and the continuation's
    ids are those of the whole text after the context's, so it is tokenized as in running text.
    Special-token strings in task text are text.

    One refinement: when a token of the whole text straddles the boundary (context "Answer:",
    continuation "A", and ":A" is one token), lm-eval's slice would drop or misalign tokens. Here
    the split falls at the last token boundary the two encodings share, so the ids always decode
    back to exactly `context + continuation`; in the usual case this is lm-eval's split."""
    stripped = context.rstrip()
    if stripped != context:
        continuation = context[len(stripped) :] + continuation
        context = stripped
    context_ids = tokenizer.encode_ordinary(context)
    whole = tokenizer.encode_ordinary(context + continuation)
    shared = 0
    for a, b in zip(context_ids, whole):
        if a != b:
            break
        shared += 1
    return list(prefix) + whole[:shared], whole[shared:]


# ---- continuation scores -------------------------------------------------------------------
@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum of natural-log probabilities of the continuation tokens
    greedy: bool  # every continuation token is the argmax at its position
    tokens: int  # number of continuation tokens


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _fit_request(context: Sequence[int], continuation: Sequence[int], block_size: int, truncate: bool, index: int) -> list[int]:
    """The tokens to run for one request: context + continuation, whose last token is never fed,
    so block_size + 1 tokens fit. Too long: an error, or the context loses its oldest tokens."""
    if not continuation:
        raise ConfigError(f"request {index}: the continuation has no tokens; there is nothing to score")
    if not context:
        raise ConfigError(
            f"request {index}: the context has no tokens, so the continuation's first token cannot be scored; "
            "give a context or a prefix (document_start)"
        )
    tokens = [*context, *continuation]
    needed = len(tokens) - 1
    if needed <= block_size:
        return tokens
    if not truncate:
        raise ContextTooLongError(
            f"request {index}: example needs {needed} tokens but the model's context is {block_size}; "
            f"pass --truncate to keep the last {block_size}"
        )
    if len(continuation) > block_size:
        raise ContextTooLongError(
            f"request {index}: the continuation alone has {len(continuation)} tokens but the model's context is "
            f"{block_size}; truncating the context cannot make it fit"
        )
    return tokens[-(block_size + 1) :]


LOGITS_BUDGET_BYTES = 1 << 30  # one forward pass's float32 logits, (rows, width, vocab) * 4 bytes, and its KV cache


def _batches(
    items: Sequence, batch_size: int, shape_of, vocab_size: int, cache_bytes_per_position: int = 0, max_span: int | None = None
) -> Iterator[list]:
    """Consecutive batches of at most `batch_size` items, fewer when their logits and cache would
    pass `LOGITS_BUDGET_BYTES`: one 8192-token window of a 49k vocabulary is already 1.6 GB of
    logits, so a fixed batch size that suits short multiple-choice requests would exhaust memory
    on long windows. `shape_of(item)` is (cached, fed): positions already in the KV cache and
    positions the forward pass feeds. A batch is as wide as its widest item and its cache holds
    the most cached plus the most fed positions, which must not pass `max_span` (the model's
    context). Items come longest first, so the first batch is about the largest."""
    batch: list = []
    cached = fed = 0
    for item in items:
        item_cached, item_fed = shape_of(item)
        grown_cached, grown_fed = max(cached, item_cached), max(fed, item_fed)
        rows = len(batch) + 1
        per_row = max(grown_fed, 1) * vocab_size * 4 + (grown_cached + grown_fed) * cache_bytes_per_position
        too_big = rows > batch_size or rows * per_row > LOGITS_BUDGET_BYTES
        if batch and (too_big or (max_span is not None and grown_cached + grown_fed > max_span)):
            yield batch
            batch, (grown_cached, grown_fed) = [], (item_cached, item_fed)
        batch.append(item)
        cached, fed = grown_cached, grown_fed
    if batch:
        yield batch


def _takes_cache(model: torch.nn.Module) -> bool:
    """Whether `model` can run on a KV cache: a whole GPT (LoRA-wrapped or quantized layers
    included). Anything else, such as a pipeline stage without embedding or head, is scored a
    whole row per request."""
    return isinstance(model, GPT) and model.embed is not None and model.head is not None


def _right_padded(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    idx = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for row, tokens in enumerate(rows):
        idx[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return idx.to(device)


def _shared_prefix_cache(model: GPT, prefixes: Sequence[Sequence[int]], sources: Sequence[int], fed_width: int) -> KVCache | None:
    """A KV cache with one row per prefix (run once, right-padded) followed by one row per
    entry of `sources`, a copy of that prefix's row; room for `fed_width` more positions.
    None when every prefix is empty: there is nothing to share."""
    longest = max(len(p) for p in prefixes)
    if longest == 0:
        return None
    n = len(prefixes)
    device = _model_device(model)
    cache = model.new_cache(n + len(sources), longest + fed_width)
    model(_right_padded(prefixes, device), cache=cache.rows(0, n), last_only=True)
    # The forward pass set every row's length to `longest`. A shorter row's keys past its own
    # length are the padding's: with its length set back, the mask of the next step hides them
    # (a query at position p sees keys 0..p) and that step's writes overwrite them.
    cache.lengths[:n] = torch.tensor([len(p) for p in prefixes], device=device)
    if sources:
        # KVCache.copy_row for many rows at once: one copy per tensor, not one per row and tensor.
        source = torch.tensor(sources, device=device)
        for tensor in (*cache.keys, *cache.values):
            tensor[n:] = tensor[source]
        cache.lengths[n:] = cache.lengths[source]
    return cache


@torch.no_grad()
def score_continuations(
    model: GPT,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    truncate: bool = False,
    progress: bool = False,
) -> list[ContinuationScore]:
    """Log-probability of each (context ids, continuation ids) request's continuation, in input
    order, and whether greedy decoding would have produced it. `batch_size` bounds the rows of
    the pass that scores continuations; requests that share a context share its one run."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, not {batch_size}")
    config = model.config
    # Validate every request before the first forward: a bad request found after an hour is worse.
    runs = [_fit_request(ctx, cont, config.block_size, truncate, n) for n, (ctx, cont) in enumerate(requests)]
    lengths = [len(cont) for _, cont in requests]
    # The shared part of a request is its (truncated) context but the last token, which is fed
    # with the continuation: its position predicts the continuation's first token, so the shared
    # run needs no logits at all. A model without a cache shares nothing: one group, the empty prefix.
    takes_cache = _takes_cache(model)
    shared = [tuple(tokens[: len(tokens) - n_cont - 1]) if takes_cache else () for tokens, n_cont in zip(runs, lengths)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for n, prefix in enumerate(shared):
        groups.setdefault(prefix, []).append(n)
    # Longest first, a group's requests next to each other: they share a batch, and a group that is
    # split over two batches runs its context in each.
    order = [
        n
        for members in sorted(groups.values(), key=lambda m: max(len(runs[n]) for n in m), reverse=True)
        for n in sorted(members, key=lambda n: len(runs[n]), reverse=True)
    ]
    cache_bytes = 2 * config.n_layer * config.kv_heads * config.head_dim * model.embed.weight.element_size() if takes_cache else 0
    results: list[ContinuationScore | None] = [None] * len(runs)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(runs), unit="req", desc="score", disable=not progress)
    try:
        for batch in _batches(order, batch_size, lambda n: (len(shared[n]), len(runs[n]) - 1 - len(shared[n])),
                              config.vocab_size, cache_bytes, config.block_size):
            # Cache rows: the first request of each distinct prefix (prefilled), then the others (copied).
            first_of: dict[tuple[int, ...], int] = {}
            for n in batch:
                first_of.setdefault(shared[n], n)
            prefixes = list(first_of)
            slot = {prefix: s for s, prefix in enumerate(prefixes)}
            leaders = set(first_of.values())
            batch = [*first_of.values(), *(n for n in batch if n not in leaders)]  # in cache row order
            fed = [runs[n][len(shared[n]) : -1] for n in batch]
            cache = _shared_prefix_cache(model, prefixes, [slot[shared[n]] for n in batch[len(prefixes) :]],
                                         max(len(f) for f in fed))
            idx = _right_padded(fed, device)
            logits, _ = model(idx) if cache is None else model(idx, cache=cache)
            # Gather every continuation position of the batch at once (one device sync per
            # batch, not per request); log-softmax runs on those rows only.
            rows, positions, targets = [], [], []
            for row, n in enumerate(batch):
                n_cont = lengths[n]
                first = len(fed[row]) - n_cont  # fed position that predicts the first continuation token
                rows += [row] * n_cont
                positions += range(first, first + n_cont)
                targets += runs[n][-n_cont:]
            owner = torch.tensor(rows, device=device)
            target = torch.tensor(targets, device=device)
            picked = logits[owner, torch.tensor(positions, device=device)].float()
            token_logprobs = F.log_softmax(picked, dim=-1).gather(-1, target[:, None])[:, 0]
            misses = (picked.argmax(-1) != target).to(torch.int64)
            totals = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, owner, token_logprobs.double())
            missed = torch.zeros(len(batch), dtype=torch.int64, device=device).index_add_(0, owner, misses)
            for n, total, miss in zip(batch, totals.tolist(), missed.tolist()):
                results[n] = ContinuationScore(logprob=total, greedy=miss == 0, tokens=lengths[n])
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


# ---- rolling log-likelihood ----------------------------------------------------------------
@dataclass(frozen=True)
class _Window:
    start: int  # index of the first token fed
    end: int  # one past the last token fed; targets are tokens[start + 1 : end + 1]
    first_scored: int  # index of the first target token this window scores


def _sliding_windows(n_tokens: int, block_size: int, stride: int) -> list[_Window]:
    """Windows over a text of `n_tokens` tokens; target j (1 <= j < n_tokens) is scored by the
    first window that holds it, i.e. the one where it has the most context."""
    windows: list[_Window] = []
    scored_until = 1  # targets below this index are done
    start = 0
    while scored_until < n_tokens:
        end = min(start + block_size, n_tokens - 1)
        windows.append(_Window(start, end, scored_until))
        scored_until = end + 1
        start += stride
    return windows


@torch.no_grad()
def rolling_token_nats(
    model: GPT, tokens: Sequence[int], *, stride: int | None = None, batch_size: int = 8, progress: bool = False
) -> np.ndarray:
    """Negative log-likelihood in nats of tokens[i + 1] given the tokens before it (within the
    window), for every i: a float64 array of len(tokens) - 1."""
    block_size = model.config.block_size
    stride = block_size // 2 if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ConfigError(f"stride must be between 1 and the model's context ({block_size}), not {stride}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, not {batch_size}")
    nats = np.zeros(max(len(tokens) - 1, 0), dtype=np.float64)
    windows = _sliding_windows(len(tokens), block_size, stride)
    if not windows:
        return nats
    device = _model_device(model)
    all_ids = torch.from_numpy(np.array(tokens, dtype=np.int64))  # a copy: shard streams may be read-only arrays
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(nats), unit="tok", unit_scale=True, desc="score", disable=not progress)
    try:
        for batch in _batches(windows, batch_size, lambda w: (0, w.end - w.start), model.config.vocab_size):
            width = max(w.end - w.start for w in batch)
            idx = torch.zeros(len(batch), width, dtype=torch.long)
            for row, w in enumerate(batch):
                idx[row, : w.end - w.start] = all_ids[w.start : w.end]
            logits, _ = model(idx.to(device))
            for row, w in enumerate(batch):
                # Target j is predicted at input position j - 1 - start.
                picked = logits[row, w.first_scored - 1 - w.start : w.end - w.start].float()
                targets = all_ids[w.first_scored : w.end + 1].to(device)
                token_nats = F.cross_entropy(picked, targets, reduction="none")
                nats[w.first_scored - 1 : w.end] = token_nats.double().cpu().numpy()
                bar.update(len(targets))
    finally:
        bar.close()
        model.train(was_training)
    return nats


# ---- generation ----------------------------------------------------------------------------
def generate_completions(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    config: SamplingConfig,
    *,
    truncate: bool = False,
    progress: bool = False,
) -> list[str]:
    """One completion of each prompt (without the prompt), cut before the first stop string or
    at <|endoftext|>, drawn as `config` says. With a seed, prompt n draws with seed + n: the run
    is reproducible, and a prompt repeated (lm-eval's `repeats`) still gets different samples.

    With `truncate`, a prompt too long to leave room for `max_new_tokens` loses its oldest
    tokens, as `scratchlm.model.sampling.fit_context` does (down to half the context; past that
    fewer tokens are generated); without it, such a prompt is an error before anything runs."""
    block_size = model.config.block_size
    if not truncate:
        for n, prompt in enumerate(prompts):
            # N new tokens need prompt + N - 1 positions: the last one drawn is never fed back.
            needed = len(encode_prompt(tokenizer, prompt)) + config.max_new_tokens - 1
            if needed > block_size:
                raise ContextTooLongError(
                    f"prompt {n}: example needs {needed} tokens (prompt and {config.max_new_tokens} new) but the "
                    f"model's context is {block_size}; pass --truncate to keep the last {block_size}"
                )
    completions = []
    for n, prompt in enumerate(tqdm(prompts, unit="prompt", desc="generate", disable=not progress)):
        seeded = replace(config, truncate=truncate, seed=None if config.seed is None else config.seed + n)
        completions.append(generate_text(model, tokenizer, prompt, seeded)[0])
    return completions


def greedy_generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    truncate: bool = False,
    progress: bool = False,
) -> list[str]:
    """Greedy (argmax) completion of each prompt; see `generate_completions`."""
    config = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop=tuple(stop), seed=0)
    return generate_completions(model, tokenizer, prompts, config, truncate=truncate, progress=progress)
