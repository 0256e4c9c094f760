"""Sampling: the one way `generate`, `chat` and the HTTP server turn a model into text.

Each step the logits of each sequence's last position go through, in this order (Hugging Face's):

    repetition penalty -> frequency and presence penalties -> temperature -> top-k -> top-p
    -> min-p -> draw (or argmax when temperature is 0)

`SamplingConfig` bounds every setting (the MIN_/MAX_ constants), so no request can make these
numbers overflow; and should a row's probabilities still not be numbers (a diverged model), that
row takes its most likely token, and the other rows of the batch draw as if it were not there.

The token layer is `DecodeBatch`: up to `max_batch` sequences, each in a row (slot) of one
preallocated `KVCache`, each at its own length and with its own sampling settings. `add` runs a
prompt once (prefill) and draws its first token; `step` feeds every running sequence its last
token in one forward pass and draws the next. A sequence leaves its slot when it draws a stop
token or runs out of tokens or context, and a new prompt can take the slot at once: continuous
batching, used by `generate` for many prompts and by the HTTP server for concurrent requests.

Context: the model sees at most `block_size` positions. A prompt longer than that is an error,
unless `truncate` is set: then it keeps its end, as much as leaves room for `max_new_tokens` but
at least half the context (a reply to a prompt cut to a few tokens is worthless). When the cache
is full, the sequence ends with finish reason "length". `fit_context` computes both numbers.

The text layer (`CompletionStream`) decodes tokens as they arrive, holds back the bytes of a
character that is not complete yet and text that could be the start of a stop string, so what it
streams is exactly what it returns.
"""

import codecs
import numbers
import reprlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from scratchlm.errors import ConfigError, ContextTooLongError
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.tokens import check_fits_model, document_start, encode_text_start

FINISHED = -1  # a sample's slot in the steps after it drew a stop token (generate_tokens)


# Bounds of the sampling settings. Each keeps every number the sampler computes finite and
# every allocation bounded, whatever a request asks (the HTTP server passes these through).
MIN_TEMPERATURE = 1e-6  # below it, besides 0: logits up to 1e30 divided by it stay finite in float32 (max 3.4e38)
MAX_TEMPERATURE = 100.0  # above it a typical logit spread (tens) is flattened to near-uniform noise
MAX_TOP_K = 2**31 - 1  # any larger k keeps the whole vocabulary anyway; torch.topk takes int64
# A penalty of 100 already turns a seen logit of 20 into 0.2, past what any sampler in use
# applies (1.1 to 1.5 typical); the range is symmetric in log scale so that 1 / p is allowed for p.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_NUM_SAMPLES = 256  # samples of one prompt run together: each takes a cache row and (V,) penalty rows
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_STOP_STRINGS = 16  # each token's text is checked against every one
MAX_STOP_LENGTH = 1000  # characters; text that could start a stop string is held back, up to this much


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # True is an int, not a count


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingConfig:
    """How to draw tokens. Every field is checked here, so a config that exists cannot make the
    sampler overflow or allocate without bound: a bad value is a ConfigError naming the field."""

    temperature: float = 0.8  # 0: greedy (argmax), deterministic; else in [MIN_TEMPERATURE, MAX_TEMPERATURE]
    top_k: int | None = None  # keep the k most likely tokens; None or 0: off
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2019); 1.0: off
    min_p: float = 0.0  # drop tokens less likely than min_p x the top token's probability; 0: off
    repetition_penalty: float = 1.0  # CTRL's penalty (Keskar et al. 2019) on prompt and generated tokens; 1.0: off
    frequency_penalty: float = 0.0  # OpenAI's: logit -= penalty x times generated so far; 0: off
    presence_penalty: float = 0.0  # OpenAI's: logit -= penalty once a token has been generated; 0: off
    max_new_tokens: int = 200  # no upper bound: the context ends every sequence anyway
    stop: tuple[str, ...] = ()  # a completion ends before the first of these strings
    stop_token_ids: tuple[int, ...] = ()  # ... or at one of these tokens (besides the model's end of sequence)
    seed: int | None = None  # None: a fresh random seed each call
    num_samples: int = 1
    truncate: bool = False  # a prompt longer than the context: False refuses it, True keeps its end

    def __post_init__(self) -> None:
        # A lone string would otherwise be read as one stop string per character.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

        def within(value: object, low: float, high: float) -> bool:  # False for nan, inf and non-numbers
            return _is_number(value) and low <= value <= high

        checks = [
            (self.temperature == 0 or within(self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE),
             f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], not {self.temperature}"),
            (self.top_k is None or (_is_int(self.top_k) and 0 <= self.top_k <= MAX_TOP_K),
             f"top_k must be an integer in [0, {MAX_TOP_K}] (0 or None: off), not {self.top_k!r}"),
            (within(self.top_p, 0, 1) and self.top_p > 0, f"top_p must be in (0, 1], not {self.top_p}"),
            (within(self.min_p, 0, 1), f"min_p must be in [0, 1], not {self.min_p}"),
            (within(self.repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
             f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1.0: off), "
             f"not {self.repetition_penalty}"),
            (within(self.frequency_penalty, -2, 2), f"frequency_penalty must be in [-2, 2], not {self.frequency_penalty}"),
            (within(self.presence_penalty, -2, 2), f"presence_penalty must be in [-2, 2], not {self.presence_penalty}"),
            (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, not {self.max_new_tokens!r}"),
            (len(stop) <= MAX_STOP_STRINGS, f"stop must hold at most {MAX_STOP_STRINGS} strings, not {len(stop)}"),
            (all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stop),
             f"stop must be non-empty strings of at most {MAX_STOP_LENGTH} characters, not {reprlib.repr(stop)}"),
            (all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be token ids (ints >= 0), not {reprlib.repr(self.stop_token_ids)}"),
            (self.seed is None or (_is_int(self.seed) and MIN_SEED <= self.seed <= MAX_SEED),
             f"seed must be an integer in [-2**63, 2**64 - 1], not {self.seed!r}"),
            (_is_int(self.num_samples) and 1 <= self.num_samples <= MAX_NUM_SAMPLES,
             f"num_samples must be an integer in [1, {MAX_NUM_SAMPLES}], not {self.num_samples!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"sampling: {message}")

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


# ---- logits -> next token ------------------------------------------------------------------
# Every function takes logits (B, V) and settings that are either one number for all rows or
# one per row (a batch mixes requests with different settings).
PerRow = float | Tensor


def _column(value: PerRow, logits: Tensor) -> Tensor:
    """A setting as a (B, 1) column matching logits (B, V)."""
    return torch.as_tensor(value, dtype=logits.dtype, device=logits.device).reshape(-1, 1).expand(logits.size(0), 1)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: PerRow) -> Tensor:
    """CTRL's repetition penalty: logits (B, V) of tokens where the bool mask `seen` (B, V) is
    True are divided by `penalty` if positive, multiplied if negative. Dividing alone would make
    a negative logit *more* likely; this always moves a seen token's probability down."""
    if isinstance(penalty, (int, float)) and penalty == 1.0:
        return logits
    penalty = _column(penalty, logits)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_penalties(logits: Tensor, counts: Tensor, frequency: PerRow, presence: PerRow) -> Tensor:
    """OpenAI's penalties: each token's logit minus frequency x (times it was generated) minus
    presence x (1 if it was generated at all). `counts` (B, V) counts the generated tokens."""
    counts = counts.to(logits.dtype)
    return logits - _column(frequency, logits) * counts - _column(presence, logits) * (counts > 0).to(logits.dtype)


def filter_logits(
    logits: Tensor, temperature: PerRow, top_k: int | Tensor | None = None, top_p: PerRow = 1.0, min_p: PerRow = 0.0
) -> Tensor:
    """Logits (B, V) scaled by 1 / temperature, with the tokens top-k, top-p and min-p rule out
    set to -inf. Top-p keeps the smallest set of most likely tokens whose probability reaches
    `top_p` (the top token always); min-p keeps the tokens at least `min_p` times as likely as
    the top one (Nguyen et al. 2024). Temperature 0 keeps only the argmax, so a draw is greedy."""
    vocab = logits.size(-1)
    temperature = _column(temperature, logits)
    greedy = temperature == 0
    logits = logits / torch.where(greedy, torch.ones_like(temperature), temperature)
    if isinstance(top_k, int):  # a k past the vocabulary keeps it all, and may not fit an int64
        top_k = min(top_k, vocab)
    ks = torch.as_tensor(0 if top_k is None else top_k, device=logits.device).reshape(-1).expand(logits.size(0))
    ks = torch.where((ks <= 0) | (ks >= vocab), vocab, ks)
    if bool((ks < vocab).any()):
        top = torch.topk(logits, int(ks.max()), dim=-1).values
        kth = top.gather(-1, (ks - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = _column(top_p, logits)
    if bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # A token goes when the more likely tokens before it already reach top_p; the top
        # token's preceding mass is 0, so it always stays. Rows at top_p = 1 drop nothing, even
        # where rounding makes the mass reach 1 before the end.
        drop_sorted = (probs.cumsum(-1) - probs >= top_p) & (top_p < 1)
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted), float("-inf"))
    min_p = _column(min_p, logits)
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if bool(greedy.any()):
        argmax = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.argmax(-1, keepdim=True), True)
        logits = logits.masked_fill(greedy & ~argmax, float("-inf"))
    return logits


def most_likely(logits: Tensor) -> Tensor:
    """The argmax of each row of logits (B, V), never a nan: torch's argmax takes nan for the
    largest value. A row with no number at all gives token 0."""
    return logits.nan_to_num(nan=float("-inf")).argmax(-1)


def sample_next(logits: Tensor, configs: Sequence[SamplingConfig], generators: Sequence[torch.Generator],
                seen: Tensor | None = None, counts: Tensor | None = None) -> Tensor:
    """One token id per row of logits (B, V), row b drawn as configs[b] says with generators[b].
    `seen` (B, V) marks prompt and generated tokens (repetition penalty); `counts` (B, V) counts
    generated tokens (frequency and presence penalties); both may be None when no row uses them.

    Rows are independent: a row whose probabilities are not numbers (a diverged model, logits
    that overflow) takes its most likely token instead of a draw, and cannot make the batch
    fail, nor change what the other rows draw."""
    def per_row(name: str) -> Tensor:
        return torch.tensor([getattr(c, name) for c in configs], dtype=logits.dtype, device=logits.device)

    if any(c.repetition_penalty != 1.0 for c in configs):
        logits = apply_repetition_penalty(logits, seen, per_row("repetition_penalty"))
    if any(c.frequency_penalty or c.presence_penalty for c in configs):
        logits = apply_frequency_penalties(logits, counts, per_row("frequency_penalty"), per_row("presence_penalty"))
    tokens = most_likely(logits)  # greedy rows: no draw, so their output never depends on a generator
    drawn = [row for row, c in enumerate(configs) if c.temperature > 0]
    if drawn:
        sub = [configs[row] for row in drawn]
        probs = filter_logits(
            logits[drawn], per_row("temperature")[drawn],
            torch.tensor([c.top_k or 0 for c in sub], device=logits.device),
            per_row("top_p")[drawn], per_row("min_p")[drawn],
        ).softmax(-1)
        # torch.multinomial refuses a nan, an inf or an all-zero row; softmax gives nan for both.
        drawable = torch.isfinite(probs).all(-1).tolist()
        for n, row in enumerate(drawn):  # each row its own generator: a seeded request draws the same whatever its batch
            if drawable[n]:
                tokens[row] = torch.multinomial(probs[n], 1, generator=generators[row])[0]
    return tokens


# ---- tokens --------------------------------------------------------------------------------
def fit_context(prompt_len: int, block_size: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt tokens kept, new tokens possible) for a model with `block_size` positions, when
    a prompt may be truncated.

    N new tokens need prompt + N - 1 positions: the last token drawn is never fed back. The
    prompt gives up its oldest tokens to make room for `max_new_tokens`, down to half the
    context; past that, the new tokens are fewer than asked."""
    keep = min(prompt_len, max(block_size + 1 - max_new_tokens, block_size // 2, 1))
    return keep, min(max_new_tokens, block_size + 1 - keep)


def fit_prompt(prompt_ids: Sequence[int], config: SamplingConfig, block_size: int) -> list[int]:
    """The prompt the model will see: all of it, or its end when it is too long and
    `config.truncate` allows cutting; else ContextTooLongError."""
    if not prompt_ids:
        raise ConfigError("sampling: the prompt has no tokens; give at least one (an empty text prompt starts from <|endoftext|>)")
    if config.truncate:
        keep, _ = fit_context(len(prompt_ids), block_size, config.max_new_tokens)
        return list(prompt_ids[len(prompt_ids) - keep :])
    if len(prompt_ids) > block_size:
        raise ContextTooLongError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context is {block_size}; "
            "shorten it, or allow truncation from the left (--truncate, truncate=True)"
        )
    return list(prompt_ids)


@dataclass(frozen=True)
class TokenStep:
    """A sequence's new token. `finish`: None while it goes on; "stop" when the token is a stop
    token (it ends the sequence and is not part of its text); "length" when the token was the
    last that `max_new_tokens` or the context allows."""

    slot: int
    token: int
    finish: str | None = None


@dataclass
class _Sequence:
    config: SamplingConfig
    generator: torch.Generator
    stop_ids: frozenset[int]
    length: int = 0  # positions in the cache
    next_input: int = 0
    generated: int = 0


def new_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class DecodeBatch:
    """Sequences decoding together, one per row (slot) of a preallocated KV cache.

    The model must be in eval mode. Free slots below the highest busy one ride along in each
    step with a dummy token (their lengths reset to 0, their keys never visible): cheaper than
    moving caches around, and new sequences take the lowest free slot. The cache starts short
    and doubles as the longest sequence needs, up to `max_len`: SmolLM2's full context of 8192
    positions would take 377 MB per slot before a single token."""

    def __init__(self, model: nn.Module, max_batch: int = 8, max_len: int | None = None, vocab_limit: int | None = None) -> None:
        if max_batch < 1:
            raise ConfigError(f"sampling: max_batch must be >= 1, not {max_batch}")
        self.model = model
        self.max_len = min(max_len or model.config.block_size, model.config.block_size)
        self.vocab_limit = vocab_limit
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(max_batch, min(self.max_len, 256))
        self.slots: list[_Sequence | None] = [None] * max_batch
        vocab = model.config.vocab_size
        self.seen = torch.zeros(max_batch, vocab, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(max_batch, vocab, dtype=torch.int32, device=self.device)

    @property
    def active(self) -> list[int]:
        return [slot for slot, seq in enumerate(self.slots) if seq is not None]

    @property
    def free(self) -> int:
        return self.slots.count(None)

    def add(
        self,
        prompt_ids: Sequence[int],
        config: SamplingConfig,
        stop_ids: Sequence[int] = (),
        copies: int = 1,
        generator: torch.Generator | None = None,
    ) -> list[TokenStep]:
        """Start `copies` sequences from one prompt (run once, its cache copied) and return
        their first tokens. Stop tokens: `stop_ids` and `config.stop_token_ids`. The copies
        share one generator (the config's seed, or `generator`). If it raises, the slots it
        took are free again and the running sequences are untouched."""
        prompt = fit_prompt(prompt_ids, config, self.max_len)
        slots = [slot for slot, seq in enumerate(self.slots) if seq is None][:copies]
        if len(slots) < copies:
            raise ConfigError(f"sampling: {copies} sequences do not fit the {self.free} free slots of the batch")
        generator = generator or new_generator(self.device, config.seed)
        try:
            return self._start(prompt, config, frozenset([*stop_ids, *config.stop_token_ids]), slots, generator)
        except BaseException:
            for slot in slots:
                self.slots[slot] = None
            raise

    def _start(self, prompt: list[int], config: SamplingConfig, stops: frozenset[int], slots: list[int],
               generator: torch.Generator) -> list[TokenStep]:
        first = slots[0]
        with torch.inference_mode():
            self._reserve(len(prompt))
            self.cache.lengths[first] = 0
            logits, _ = self.model(torch.tensor([prompt], device=self.device), cache=self.cache.rows(first, first + 1), last_only=True)
            for slot in slots[1:]:
                self.cache.copy_row(first, slot)
            prompt_tensor = torch.tensor(prompt, device=self.device)
            for slot in slots:
                self.slots[slot] = _Sequence(config, generator, stops, len(prompt))
                if config.uses_penalties:  # the token history only penalties read
                    self.seen[slot] = False
                    self.seen[slot, prompt_tensor] = True
                    self.counts[slot] = 0
            return self._draw(slots, logits[:, -1].float().expand(len(slots), -1))

    def step(self) -> list[TokenStep]:
        """Feed every running sequence its last token; return each one's next token."""
        active = self.active
        if not active:
            return []
        top = active[-1] + 1
        inputs = [seq.next_input if seq is not None else 0 for seq in self.slots[:top]]
        with torch.inference_mode():
            for slot in range(top):
                if self.slots[slot] is None:
                    self.cache.lengths[slot] = 0
            self._reserve(max(self.slots[slot].length for slot in active) + 1)
            logits, _ = self.model(torch.tensor(inputs, device=self.device)[:, None], cache=self.cache.rows(0, top))
            for slot in active:
                self.slots[slot].length += 1
            return self._draw(active, (logits[:, -1] if len(active) == top else logits[active, -1]).float())

    def _reserve(self, positions: int) -> None:
        if positions > self.cache.max_len:
            self.cache = self.cache.resized(min(self.max_len, max(positions, 2 * self.cache.max_len)))

    def remove(self, slot: int) -> None:
        """End a sequence early (a stop string, a cancelled request); its slot is free."""
        self.slots[slot] = None

    def _draw(self, slots: list[int], logits: Tensor) -> list[TokenStep]:
        # The ids past the tokenizer's vocabulary are cut off, not written over with -inf:
        # `logits` is a view of the model's output, expanded across copies of one prompt.
        vocab = logits.size(-1) if self.vocab_limit is None else min(self.vocab_limit, logits.size(-1))
        seqs = [self.slots[slot] for slot in slots]
        penalties = any(s.config.uses_penalties for s in seqs)
        tokens = sample_next(
            logits[:, :vocab], [s.config for s in seqs], [s.generator for s in seqs],
            self.seen[slots, :vocab] if penalties else None, self.counts[slots, :vocab] if penalties else None,
        ).tolist()
        steps = []
        for slot, seq, token in zip(slots, seqs, tokens):
            seq.generated += 1
            if seq.config.uses_penalties:
                self.seen[slot, token] = True
                self.counts[slot, token] += 1
            finish = None
            if token in seq.stop_ids:
                finish = "stop"
            elif seq.generated >= seq.config.max_new_tokens or seq.length >= self.max_len:
                finish = "length"
            if finish:
                self.slots[slot] = None
            else:
                seq.next_input = token
            steps.append(TokenStep(slot, token, finish))
        return steps


def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    config: SamplingConfig,
    eot_id: int | None = None,
    *,
    vocab_limit: int | None = None,
) -> Iterator[list[int]]:
    """Yield, per step, the new token id of each of `config.num_samples` samples of one prompt
    (`FINISHED` for a sample that drew `eot_id` or a stop token in an earlier step). Ids at or
    above `vocab_limit` are never drawn: a model's embedding table is often padded past its
    tokenizer's vocabulary.

    The model is put in eval mode for the run and its previous mode restored when the generator
    ends or is closed."""
    fit_prompt(prompt_ids, config, model.config.block_size)  # errors at call time, not at the first step
    return _token_steps(model, prompt_ids, config, eot_id, vocab_limit)


def _token_steps(
    model: nn.Module, prompt_ids: Sequence[int], config: SamplingConfig, eot_id: int | None, vocab_limit: int | None
) -> Iterator[list[int]]:
    was_training = model.training
    model.eval()
    try:
        batch = DecodeBatch(model, config.num_samples, vocab_limit=vocab_limit)
        new = batch.add(prompt_ids, config, [] if eot_id is None else [eot_id], copies=config.num_samples)
        while new:
            row = [FINISHED] * config.num_samples
            for step in new:
                row[step.slot] = step.token
            yield row
            new = batch.step()
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
    """Token ids of the prompt, special tokens included, after BOS for a model that always gets
    one (`encode_text_start`). An empty prompt is the document start alone (`document_start`:
    BOS, else <|endoftext|>), the same start evaluation scores texts from."""
    if prompt:
        return encode_text_start(tokenizer, prompt)
    start = document_start(tokenizer)
    if not start:
        raise ConfigError("sampling: the prompt is empty and the tokenizer has no <|endoftext|> token to start from; give a prompt")
    return start


@dataclass
class Completion:
    """One generated sequence: its text (without the prompt, cut before a stop string), its
    tokens (a stop token excluded), why it ended ("stop": a stop token or string; "length": out
    of tokens or context) and the number of prompt tokens the model saw."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


def check_vocabularies(model: nn.Module, tokenizer: Tokenizer) -> None:
    check_fits_model(tokenizer, model.config.vocab_size, "sampling")


def settle(stream: CompletionStream, step: TokenStep, tokenizer: Tokenizer) -> tuple[str, str | None]:
    """The text a token step releases, and how its sequence ended: None while it goes on,
    "stop" for a stop token (not text) or a stop string, "length" when out of tokens."""
    if step.finish == "stop":
        return stream.finish(), "stop"
    piece = stream.push(tokenizer.token_bytes(step.token))
    if stream.stopped:
        return piece, "stop"
    if step.finish:
        return piece + stream.finish(), step.finish
    return piece, None


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    config: SamplingConfig,
    *,
    max_batch: int = 8,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Completion]:
    """Complete each prompt (text, or token ids) `config.num_samples` times, up to `max_batch`
    sequences at once: a prompt starts as soon as a slot is free. Returns the completions in
    order, prompt by prompt, sample by sample; `on_text(index, piece)` receives each piece of text
    of completion `index` as soon as it is safe to show. A completion ends at the end-of-sequence
    token (`Tokenizer.eos_id`) or a stop token (neither part of its text), before its first stop
    string, or when `max_new_tokens` or the context run out. With a seed, prompt n draws with
    seed + n (modulo 2**64), so a prompt's samples do not depend on the others in the batch."""
    check_vocabularies(model, tokenizer)
    encoded = [encode_prompt(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    prompt_lengths = []
    for n, ids in enumerate(encoded):  # every error before anything runs
        try:
            prompt_lengths.append(len(fit_prompt(ids, config, model.config.block_size)))
        except ContextTooLongError as error:
            raise ContextTooLongError(f"prompt {n}: {error}") from None
    samples = config.num_samples
    streams = [CompletionStream(config.stop) for _ in range(len(encoded) * samples)]
    tokens: list[list[int]] = [[] for _ in streams]
    results: list[Completion | None] = [None] * len(streams)
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    batch_size = max(max_batch, samples)  # a prompt's samples start together
    owner: dict[int, int] = {}  # slot -> completion index

    def take(step: TokenStep, batch: DecodeBatch) -> None:
        index = owner[step.slot]
        if step.finish != "stop":
            tokens[index].append(step.token)
        piece, ended = settle(streams[index], step, tokenizer)
        if ended and step.finish is None:  # a stop string: the token layer does not know it ended
            batch.remove(step.slot)
        if piece and on_text is not None:
            on_text(index, piece)
        if ended:
            del owner[step.slot]
            results[index] = Completion(streams[index].text, tokens[index], ended, prompt_lengths[index // samples])

    was_training = model.training
    model.eval()
    try:
        batch = DecodeBatch(model, batch_size, vocab_limit=tokenizer.vocab_size)
        pending = list(range(len(encoded)))[::-1]
        while pending or owner:
            for step in batch.step():  # settle the running sequences first: their slots may free up
                take(step, batch)
            while pending and batch.free >= samples:
                n = pending.pop()
                seed = None if config.seed is None else (config.seed + n) % 2**64  # as manual_seed wraps a negative seed
                started = batch.add(encoded[n], config, eos, copies=samples, generator=new_generator(batch.device, seed))
                for k, step in enumerate(started):
                    owner[step.slot] = n * samples + k
                for step in started:
                    take(step, batch)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    config: SamplingConfig,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Complete `prompt` `config.num_samples` times; return the completions without the prompt.
    `on_text(sample_index, piece)` receives each piece of text as soon as it is safe to show.
    A sample ends at the end-of-sequence token (`Tokenizer.eos_id`, not part of its text), a
    stop token, or before its first stop string."""
    return [c.text for c in generate(model, tokenizer, [prompt], config, max_batch=config.num_samples, on_text=on_text)]
