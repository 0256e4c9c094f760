"""The lm-evaluation-harness adapter: hundreds of published benchmarks for any scratchlm model.

EleutherAI's harness (Gao et al., `lm_eval`) turns every task into three kinds of request, and
`ScratchLMEval` answers each with the scoring primitives of `scratchlm.eval.scoring`, so a task run
through the harness and the same task run by our own runner give the same numbers:

    loglikelihood          (context, continuation) -> (log p, is greedy)   split_context + score_continuations
    loglikelihood_rolling  (text,)                 -> log p of every token  rolling_token_nats after document_start
    generate_until         (context, gen_kwargs)   -> completion            generate_completions (greedy or sampled)

The harness is an optional dependency and slow to import, so it is imported only when used:
`scratchlm` imports without it, and `ScratchLMEval` (a subclass of the harness's `LM`, registered as
model "scratchlm") is created on first access of `scratchlm.eval.harness.ScratchLMEval`.

Task discovery: indexing the harness's built-in tasks (about 14,000 YAML files) takes seconds, so
`run_harness` first looks for the tasks in `include_path` alone and indexes the built-ins only when
a task is not there.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tqdm import tqdm

from scratchlm.errors import ConfigError, InputFileError, ScratchLMError, first_line
from scratchlm.eval.scoring import (
    generate_completions,
    rolling_token_nats,
    score_continuations,
    split_context,
)
from scratchlm.tokenizer.tokens import document_start
from scratchlm.model import GPT
from scratchlm.model.sampling import SamplingConfig
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.tokens import check_fits_model

MODEL_NAME = "scratchlm"  # the adapter's name in lm-eval's model registry
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until when a task names no limit
DEFAULT_SAMPLING_SEED = 1234  # lm-eval's default random seed, for sampled generations without one
_INSTALL_HINT = "the lm-evaluation-harness is not installed: pip install lm_eval"


def _lm_eval() -> Any:
    try:
        import lm_eval.api.model
        import lm_eval.api.registry
        import lm_eval.models.utils  # normalize_gen_kwargs
    except ImportError:
        raise ScratchLMError(_INSTALL_HINT) from None
    return lm_eval


# ---- generation settings -----------------------------------------------------------------------
_NO_OP_SETTINGS = {"num_beams": 1, "typical_p": 1.0, "num_return_sequences": 1}


def generation_config(gen_kwargs: dict, default_max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> SamplingConfig:
    """The `SamplingConfig` for lm-eval generation kwargs, normalised as the harness does
    (`max_new_tokens` and other aliases of `max_gen_toks`; `do_sample=False` means greedy).
    Settings that would change the output but that our sampler cannot honour (beam search, min-p)
    are refused rather than silently ignored, so a reported number never hides a different method.
    A chat model's end-of-turn token ends an answer without being named: generation stops at the
    tokenizer's end-of-sequence token."""
    lm_eval = _lm_eval()
    kwargs = dict(lm_eval.models.utils.normalize_gen_kwargs(dict(gen_kwargs), default_max_gen_toks))
    until = [s for s in kwargs.pop("until", []) if s]
    max_gen_toks = int(kwargs.pop("max_gen_toks"))
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0))
    top_k = kwargs.pop("top_k", None)
    top_p = float(kwargs.pop("top_p", 1.0))
    min_p = float(kwargs.pop("min_p", 0.0))
    repetition_penalty = float(kwargs.pop("repetition_penalty", 1.0))
    seed = kwargs.pop("seed", None)
    unsupported = {k: v for k, v in kwargs.items() if _NO_OP_SETTINGS.get(k, object()) != v}
    if unsupported:
        raise ConfigError(
            f"generation settings {unsupported} are not supported by the scratchlm adapter (supported: until, "
            "max_gen_toks, do_sample, temperature, top_k, top_p, min_p, repetition_penalty, seed)"
        )
    if not do_sample or temperature == 0.0:
        return SamplingConfig(temperature=0.0, max_new_tokens=max_gen_toks, stop=tuple(until), repetition_penalty=repetition_penalty, seed=0)
    return SamplingConfig(
        temperature=temperature, top_k=None if top_k is None else int(top_k), top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, max_new_tokens=max_gen_toks, stop=tuple(until),
        seed=DEFAULT_SAMPLING_SEED if seed is None else int(seed),
    )


# ---- the adapter -------------------------------------------------------------------------------
class _ScratchLMEvalMethods:
    """The body of `ScratchLMEval`; the class itself also derives from lm-eval's `LM`, which is
    imported only when the adapter is first used."""

    def __init__(
        self,
        pretrained: str | Path | None = None,
        model: GPT | None = None,
        tokenizer: Tokenizer | None = None,
        batch_size: int | str = 16,
        max_batch_size: int | None = None,
        device: str | None = None,
        truncate: bool = False,
        stride: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        progress: bool = True,
    ) -> None:
        """`pretrained`: any language model `scratchlm.interop.open_model` opens; or an already loaded
        `model` and `tokenizer`. `stride` is the sliding window's step for loglikelihood_rolling;
        None means the context length, lm-eval's own choice (each window predicts a fresh block).
        `max_batch_size` is accepted for the harness's command line and unused: the batch size is
        fixed, not searched."""
        super().__init__()  # lm_eval.api.model.LM
        if (pretrained is None) == (model is None) or (model is None) != (tokenizer is None):
            raise ConfigError("ScratchLMEval: give either pretrained=<path> or both model= and tokenizer=")
        if pretrained is not None:
            from scratchlm.interop import open_model

            opened = open_model(pretrained, device or "cpu", kind="language-model")
            model, tokenizer = opened.model, opened.tokenizer
        elif device is not None:
            model = model.to(device)
        assert model is not None and tokenizer is not None
        try:
            batch = int(batch_size)
        except (TypeError, ValueError):
            raise ConfigError(f"ScratchLMEval: batch_size must be a whole number, not {batch_size!r} (no 'auto' search)") from None
        if batch < 1:
            raise ConfigError(f"ScratchLMEval: batch_size must be >= 1, not {batch}")
        check_fits_model(tokenizer, model.config.vocab_size, "ScratchLMEval")
        self.model, self.tokenizer = model, tokenizer
        self.source = str(pretrained) if pretrained is not None else "in-memory model"
        self.batch_size, self.truncate, self.stride = batch, bool(truncate), stride
        self.max_gen_toks, self.progress = int(max_gen_toks), progress
        self.prefix = document_start(tokenizer)
        self._device = next(model.parameters()).device

    # lm-eval's three request types -------------------------------------------------------------
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [split_context(self.tokenizer, context, continuation, self.prefix) for context, continuation in (r.args for r in requests)]
        scores = score_continuations(
            self.model, pairs, batch_size=self.batch_size, truncate=self.truncate, progress=self.progress and not disable_tqdm
        )
        results = [(s.logprob, s.greedy) for s in scores]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document, every token scored: the document-start token
        comes first, and a document longer than the context is scored with a sliding window."""
        stride = self.stride or self.model.config.block_size
        results = []
        for request in tqdm(requests, unit="doc", desc="rolling", disable=not self.progress or disable_tqdm):
            (text,) = request.args
            tokens = self.prefix + self.tokenizer.encode_ordinary(text)
            nats = rolling_token_nats(self.model, tokens, stride=stride, batch_size=self.batch_size)
            result = -float(nats.sum())
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
            results.append(result)
        return results

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Completions, run in groups of requests with the same generation settings."""
        groups: dict[str, list[int]] = {}
        configs: dict[str, SamplingConfig] = {}
        for n, request in enumerate(requests):
            _, gen_kwargs = request.args
            key = repr(sorted(gen_kwargs.items()))
            if key not in configs:
                configs[key] = generation_config(gen_kwargs, self.max_gen_toks)
            groups.setdefault(key, []).append(n)
        results: list[str] = [""] * len(requests)
        for key, members in groups.items():
            prompts = [requests[n].args[0] for n in members]
            completions = generate_completions(
                self.model, self.tokenizer, prompts, configs[key], truncate=self.truncate,
                progress=self.progress and not disable_tqdm,
            )
            for n, completion in zip(members, completions):
                results[n] = completion
                self.cache_hook.add_partial("generate_until", requests[n].args, completion)
        return results

    # what lm-eval records about the model --------------------------------------------------------
    def get_model_info(self) -> dict:
        config = self.model.config
        return {
            "scratchlm_source": self.source,
            "block_size": config.block_size,
            "vocab_size": config.vocab_size,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name


@cache  # one class per process: lm-eval's model registry refuses a second class under the same name
def adapter_class() -> type:
    """`ScratchLMEval`: the adapter as a subclass of lm-eval's `LM`, registered as "scratchlm"."""
    lm_eval = _lm_eval()
    cls = type(
        "ScratchLMEval",
        (_ScratchLMEvalMethods, lm_eval.api.model.LM),
        {"__module__": __name__, "__doc__": "lm-evaluation-harness model backed by a scratchlm GPT; see the module docstring."},
    )
    return lm_eval.api.registry.register_model(MODEL_NAME)(cls)


def __getattr__(name: str) -> Any:
    # `from scratchlm.eval.harness import ScratchLMEval` imports lm-eval at that moment, not before.
    if name == "ScratchLMEval":
        return adapter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- running tasks -------------------------------------------------------------------------------
def task_manager(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """A TaskManager that knows every task in `tasks`, or a ScratchLMError naming the unknown ones.
    A task may also be given as the path of a task YAML file."""
    from lm_eval.tasks import TaskManager

    def unknown(manager: Any) -> list[str]:
        return [t for t in tasks if t not in manager.all_tasks and not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]

    if include_path is not None:
        if not Path(include_path).exists():
            raise ConfigError(f"{include_path}: no such task folder (include_path)")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if not unknown(local):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    missing = unknown(manager)
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise ConfigError(
            f"unknown lm-eval task {', '.join(hints)}; list the tasks with `lm-eval ls tasks`, "
            "or give include_path, a folder of task YAML files"
        )
    return manager


def run_harness(
    source_or_model: str | Path | tuple[GPT, Tokenizer] | Any,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
    truncate: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict:
    """Run lm-eval `tasks` on a model and return lm-eval's results dict (`results[task][metric]`,
    plus `configs`, `versions`, `n-shot`, `n-samples`, `config`).

    `source_or_model`: a path `open_model` opens, a (model, tokenizer) pair, or a
    `ScratchLMEval`. `device`: where a path's model is loaded (None: the CPU); a loaded model is
    moved there only when a device is named. `bootstrap_iters` is lm-eval's resampling count for
    the standard errors of metrics without a closed form (0 skips them; lm-eval's default is
    100,000). Values are lm-eval's own: an undefined standard error is "N/A" or nan."""
    _lm_eval()
    from lm_eval.evaluator import simple_evaluate

    if not tasks:
        raise ConfigError("no tasks given; name at least one lm-eval task")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 example per task, not {limit}")
    manager = task_manager(tasks, include_path)
    adapter = adapter_class()
    if isinstance(source_or_model, adapter):
        lm = source_or_model
    elif isinstance(source_or_model, tuple):
        model, tokenizer = source_or_model
        lm = adapter(model=model, tokenizer=tokenizer, batch_size=batch_size, device=device, truncate=truncate)
    else:
        lm = adapter(pretrained=source_or_model, batch_size=batch_size, device=device, truncate=truncate)
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"num_fewshot must be >= 0, not {num_fewshot}")
    try:
        return simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            bootstrap_iters=bootstrap_iters, log_samples=False, batch_size=batch_size, device=device,
        )
    except (ConnectionError, OSError) as exc:
        # The task library downloads its datasets from the Hugging Face hub (requests and
        # huggingface_hub errors are ConnectionError / OSError subclasses).
        raise InputFileError(f"lm-eval could not load a task's dataset ({first_line(exc)}); its task library needs the "
                             "network, or local task YAML files given with include_path") from None

