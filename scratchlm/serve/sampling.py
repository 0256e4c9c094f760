"""Sampling: the one way `generate`, `chat` and the HTTP server turn a model into text.

Each step the logits of the last position go through, in this order (Hugging Face's order too):

    repetition penalty -> temperature -> top-k -> top-p -> draw (or argmax when temperature is 0)

`generate_tokens` is the token layer: it runs the prompt once (prefill) into a `KVCache` and then
feeds one token per step, so a step costs one position however long the prompt is. `num_samples`
completions of the same prompt run as the rows of one batch.

Finished samples: a sample that draws `eot_id` yields it once and is finished; in later steps its
slot holds `FINISHED` (-1). The generator ends when every sample is finished, when
`max_new_tokens` are out, or when the context is full.

Context: the model sees at most `block_size` positions. The prompt is cropped from the left to leave
room for `max_new_tokens`, but it keeps at least half the context (a reply to a prompt cut to a few
tokens is worthless); when the cache is then full, generation stops early. `fit_context` computes
both numbers.

`generate_text` is the text layer: it decodes tokens as they arrive, holds back bytes of a
character that is not complete yet and text that could be the start of a stop string, so what it
streams is exactly what it returns.
"""

import codecs
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from scratchlm.errors import ConfigError
from scratchlm.tokenizer import Tokenizer

FINISHED = -1  # a sample's slot in the steps after it drew the end-of-text token


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8  # 0: greedy (argmax), deterministic
    top_k: int | None = None  # keep the k most likely tokens; None or 0: off
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2019); 1.0: off
    repetition_penalty: float = 1.0  # CTRL's penalty (Keskar et al. 2019) on seen tokens; 1.0: off
    max_new_tokens: int = 200
    stop: tuple[str, ...] = ()  # a completion ends before the first of these strings
    seed: int | None = None  # None: a fresh random seed each call
    num_samples: int = 1

    def __post_init__(self) -> None:
        # A lone string would otherwise be read as one stop string per character.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        checks = [
            (math.isfinite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, not {self.temperature}"),
            (self.top_k is None or self.top_k >= 0, f"top_k must be >= 0 (0 or None: off), not {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], not {self.top_p}"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1.0: off), not {self.repetition_penalty}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, not {self.max_new_tokens}"),
            (all(isinstance(s, str) and s for s in stop), f"stop must be non-empty strings, not {stop!r}"),
            (self.num_samples >= 1, f"num_samples must be >= 1, not {self.num_samples}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"sampling: {message}")


# ---- logits -> next token ------------------------------------------------------------------
def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty: logits (B, V) of tokens where the bool mask `seen` (B, V) is
    True are divided by `penalty` if positive, multiplied if negative. Dividing alone would make
    a negative logit *more* likely; this always moves a seen token's probability down."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float = 1.0) -> Tensor:
    """Logits (B, V) scaled by 1 / temperature, with the tokens top-k and top-p rule out set to
    -inf. Top-p keeps the smallest set of most likely tokens whose probability reaches `top_p`
    (the top token always). Temperature 0 keeps only the argmax, so a draw is greedy."""
    if temperature == 0:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.argmax(-1, keepdim=True), True)
        return logits.masked_fill(~keep, float("-inf"))
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # A token goes when the more likely tokens before it already reach top_p; the top
        # token's preceding mass is 0, so it always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, seen: Tensor, config: SamplingConfig, generator: torch.Generator) -> Tensor:
    """One token id per row of logits (B, V), as the config says; `seen` (B, V) marks the
    tokens the repetition penalty applies to."""
    logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.temperature == 0:  # no draw: greedy output must not depend on the generator
        return logits.argmax(-1)
    probs = filter_logits(logits, config.temperature, config.top_k, config.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- tokens --------------------------------------------------------------------------------
def fit_context(prompt_len: int, block_size: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt tokens kept, new tokens possible) for a model with `block_size` positions.

    N new tokens need prompt + N - 1 positions: the last token drawn is never fed back. The
    prompt gives up its oldest tokens to make room for `max_new_tokens`, down to half the
    context; past that, the new tokens are fewer than asked."""
    keep = min(prompt_len, max(block_size + 1 - max_new_tokens, block_size // 2, 1))
    return keep, min(max_new_tokens, block_size + 1 - keep)


def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    config: SamplingConfig,
    eot_id: int | None = None,
    *,
    vocab_limit: int | None = None,
) -> Iterator[list[int]]:
    """Yield, per step, the new token id of each of `config.num_samples` samples (`FINISHED`
    for a sample that drew `eot_id` in an earlier step). Ids at or above `vocab_limit` are never
    drawn: a model's embedding table is often padded past its tokenizer's vocabulary.

    The model is put in eval mode for the run and its previous mode restored when the generator
    ends or is closed."""
    if not prompt_ids:
        raise ConfigError("sampling: the prompt has no tokens; give at least one (an empty text prompt starts from <|endoftext|>)")
    keep, steps = fit_context(len(prompt_ids), model.config.block_size, config.max_new_tokens)
    # Validation above runs at call time; the loop below only when the caller iterates.
    return _decode_steps(model, list(prompt_ids[len(prompt_ids) - keep :]), steps, config, eot_id, vocab_limit)


@torch.inference_mode()  # on a generator function, torch enters the mode around each step only
def _decode_steps(
    model: nn.Module, prompt: list[int], steps: int, config: SamplingConfig, eot_id: int | None, vocab_limit: int | None
) -> Iterator[list[int]]:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        batch = config.num_samples
        generator = torch.Generator(device=device)
        if config.seed is None:
            generator.seed()
        else:
            generator.manual_seed(config.seed)
        cache = model.new_cache(batch, len(prompt) + steps - 1)
        # Every row prefills the same prompt: simpler than copying one row's cache into the
        # batch, and num_samples is small.
        idx = torch.tensor(prompt, device=device).expand(batch, -1)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        seen: Tensor | None = None
        for step in range(steps):
            logits, _ = model(idx, cache=cache)
            logits = logits[:, -1].float()
            if vocab_limit is not None and vocab_limit < logits.size(-1):
                logits[:, vocab_limit:] = float("-inf")
            if seen is None:
                seen = torch.zeros_like(logits, dtype=torch.bool)
                seen[:, prompt] = True
            next_ids = sample_next(logits, seen, config, generator)
            seen.scatter_(1, next_ids[:, None], True)
            yield next_ids.masked_fill(done, FINISHED).tolist()
            if eot_id is not None:
                done |= next_ids == eot_id
                if bool(done.all()):
                    return
            idx = next_ids[:, None]
    finally:
        model.train(was_training)


# ---- text ----------------------------------------------------------------------------------
class Utf8StreamDecoder:
    """Bytes in, text out, without ever cutting a character: the bytes of a UTF-8 sequence that
    is not complete yet wait for the rest. Bytes that can never form a character become U+FFFD."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        """The text of any bytes still waiting (U+FFFD for an unfinished character)."""
        return self._decoder.decode(b"", final=True)


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in text[start:], or None."""
    hits = [at for s in stops if (at := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def partial_stop_len(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Length of the longest end of text[start:] that a stop string begins with: text that
    must not be shown yet, as the next token may complete the stop string."""
    longest = min(max((len(s) - 1 for s in stops), default=0), len(text) - start)
    for n in range(longest, 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


@dataclass
class CompletionStream:
    """The text of one sample as its tokens' bytes arrive. `push` and `finish` return the next
    piece that is safe to show; the pieces concatenate to `text`, which ends before the first
    stop string."""

    stops: tuple[str, ...] = ()
    text: str = ""
    stopped: bool = False  # a stop string was found
    finished: bool = False
    _shown: int = 0
    _decoder: Utf8StreamDecoder = field(default_factory=Utf8StreamDecoder)

    def push(self, data: bytes) -> str:
        if self.finished:
            return ""
        self.text += self._decoder.push(data)
        return self._release(final=False)

    def finish(self) -> str:
        """End of the sample: release the held-back text (it did not become a stop string)."""
        if self.finished:
            return ""
        self.text += self._decoder.flush()
        piece = self._release(final=True)
        self.finished = True
        return piece

    def _release(self, final: bool) -> str:
        # Shown text never holds the start of a stop string, so a match begins at _shown or later.
        at = find_stop(self.text, self.stops, self._shown)
        if at is not None:
            self.text, self.stopped, self.finished = self.text[:at], True, True
            end = at
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - partial_stop_len(self.text, self.stops, self._shown)
        piece, self._shown = self.text[self._shown : end], end
        return piece


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt, special tokens included. An empty prompt starts from
    <|endoftext|>, the token a model trained on concatenated documents sees before each one."""
    if prompt:
        return tokenizer.encode(prompt, allowed_special="all")
    if tokenizer.eot_id is None:
        raise ConfigError("sampling: the prompt is empty and the tokenizer has no <|endoftext|> token to start from; give a prompt")
    return [tokenizer.eot_id]


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    config: SamplingConfig,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Complete `prompt` `config.num_samples` times; return the completions without the prompt.
    `on_text(sample_index, piece)` receives each piece of text as soon as it is safe to show.
    A sample ends at the end-of-sequence token (`Tokenizer.eos_id`, not part of its text) or
    before its first stop string."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"sampling: the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}; "
            "they were not trained together"
        )
    eot_id = tokenizer.eos_id
    streams = [CompletionStream(config.stop) for _ in range(config.num_samples)]

    def show(index: int, piece: str) -> None:
        if piece and on_text is not None:
            on_text(index, piece)

    steps = generate_tokens(model, encode_prompt(tokenizer, prompt), config, eot_id, vocab_limit=tokenizer.vocab_size)
    try:
        for new_ids in steps:
            for index, (token, stream) in enumerate(zip(new_ids, streams)):
                if stream.finished or token == FINISHED:
                    continue
                if token == eot_id:
                    show(index, stream.finish())
                else:
                    show(index, stream.push(tokenizer.token_bytes(token)))
            if all(s.finished for s in streams):  # stop strings end samples the token layer knows nothing of
                break
    finally:
        steps.close()
    for index, stream in enumerate(streams):
        show(index, stream.finish())
    return [s.text for s in streams]
