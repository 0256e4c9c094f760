"""A whole DPO run: preference pairs in, a preference-tuned model folder and its report out.

    result = finetune_dpo("runs/sft", "prefs.jsonl", "runs/dpo", DPOConfig(beta=0.1))

The pieces live in `dpo.py` (the loss, preference files, encoding, batches) and the loop in
`trainer.py` (the one fine-tuning loop); this module wires them into a run as `classify.py`
does for classification: data first (bad data fails before a model loads), the run folder, the
model, the reference log-probabilities, held-out measures before and after, and the files.

The reference is the model DPO's rewards are measured against: by default the starting model
itself. Its log-probabilities of every pair are computed once before training
(`precompute_reference`, the default), so only one model is in memory while training; with
LoRA that is exact too, since fresh adapters change no logit. `precompute_reference=False`
keeps a frozen reference model and scores each batch live, as TRL does by default.

The run folder holds model/ (a model folder: chat, serve, eval and a further fine-tuning run
open it), adapter.safetensors (with LoRA), metrics.jsonl, loss.png, results.json and report.md.
"""

import copy
import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from scratchlm.atomic_io import write_text_atomic
from scratchlm.errors import ConfigError
from scratchlm.finetune.config import DPOConfig, Truncate
from scratchlm.finetune.dpo import (
    EncodedPair,
    PreferenceExample,
    collate_preferences,
    dpo_loss,
    encode_preference,
    load_preferences,
    preference_logprobs,
)
from scratchlm.finetune.lora import trainable_parameters
from scratchlm.finetune.records import RecordReport
from scratchlm.finetune.sft_data import (
    IGNORE,
    EncodedExample,
    EncodeStats,
    check_truncation,
)
from scratchlm.finetune.trainer import (
    load_base,
    Batches,
    finetune_loop,
    model_device,
    prepare_trainable,
    run_folder,
    with_default_lr,
    save_finetuned,
    shuffled_groups,
    load_splits,
    write_loss_curve,
)
from scratchlm.model.model import GPT
from scratchlm.tokenizer.tokens import same_ids
from scratchlm.train.distributed import DistInfo, process_group
from scratchlm.train.loop import LoopResult, Run, StepOutput
from scratchlm.train.metrics import MetricsLog
from scratchlm.tokenizer import Tokenizer
from scratchlm.devices import autocast_dtype

FULL_LR, LORA_LR = 1e-4, 1e-3  # DPOConfig's lr by method; see its docstring in config.py
REPORT_PAIRS = 4  # held-out pairs shown in report.md with their margin after training


# ---- pairs as tokens -------------------------------------------------------------------------
@dataclass
class EncodedPairs:
    """The pairs of a file that fit, with the examples they came from (for the report) and the
    number of answer tokens per side (for the length-normalised preference)."""

    examples: list[PreferenceExample]
    pairs: list[EncodedPair]
    stats: EncodeStats

    def answer_tokens(self) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) scored tokens per pair, each (n,)."""
        def scored(side: EncodedExample) -> int:
            return sum(t != IGNORE for t in side.targets)

        return (torch.tensor([scored(p.chosen) for p in self.pairs], dtype=torch.float32),
                torch.tensor([scored(p.rejected) for p in self.pairs], dtype=torch.float32))


def encode_pairs(tokenizer: Tokenizer, examples: Sequence[PreferenceExample], block_size: int, truncate: Truncate,
                 name: str) -> EncodedPairs:
    """`dpo.encode_preference` over a data set, counting pairs kept whole, truncated and dropped;
    ConfigError when none fits."""
    check_truncation(block_size, truncate)
    kept: list[PreferenceExample] = []
    pairs: list[EncodedPair] = []
    stats = EncodeStats()
    for example in examples:
        pair = encode_preference(tokenizer, example, block_size, truncate)
        stats.count(None if pair is None else pair.chosen.truncated or pair.rejected.truncated)
        if pair is not None:
            kept.append(example)
            pairs.append(pair)
    if not pairs:
        hint = "" if truncate == "left" else " (--truncate left keeps pairs whose answers fit)"
        raise ConfigError(f"{name}: every pair is longer than --max-length {block_size} tokens and was dropped{hint}")
    return EncodedPairs(kept, pairs, stats)


# ---- scoring -------------------------------------------------------------------------------
@torch.no_grad()
def score_pairs(model: nn.Module, pairs: Sequence[EncodedPair], batch_size: int, pad_id: int,
                dtype: str = "auto") -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed answer log-probabilities of every pair, each (n,) float32 on the
    CPU, in eval mode and under the training run's autocast, so that a reference scored here and
    a policy scored in a training step agree before the first step."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    amp = autocast_dtype(device, dtype)
    chosen, rejected = [], []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = collate_preferences(pairs[start : start + batch_size], pad_id)
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                c, r = preference_logprobs(model, batch)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


@dataclass
class ReferenceLogprobs:
    """The reference's summed log-probabilities of each pair's chosen and rejected answer."""

    chosen: Tensor
    rejected: Tensor


def evaluate_preferences(model: nn.Module, data: EncodedPairs, reference: ReferenceLogprobs, config: DPOConfig,
                         pad_id: int) -> tuple[dict, Tensor]:
    """The held-out measures of `model` and its margin per pair. DPO's own (loss, reward
    accuracy, mean margin, mean chosen and rejected rewards) are relative to the reference, so
    they are 0 (loss log 2) while the policy is the reference; `logp_accuracy` (the fraction of
    pairs where the model gives the chosen answer the higher log-probability) and its per-token
    version `logp_accuracy_per_token` are the model's own preference, meaningful at any time."""
    chosen, rejected = score_pairs(model, data.pairs, config.batch_size, pad_id, config.dtype)
    out = dpo_loss(chosen, rejected, reference.chosen, reference.rejected, config.beta, config.label_smoothing)
    chosen_tokens, rejected_tokens = data.answer_tokens()
    measures = {
        "loss": out.loss.item(),
        "reward_accuracy": out.accuracy.item(),
        "margin": out.margins.mean().item(),
        "chosen_reward": out.chosen_rewards.mean().item(),
        "rejected_reward": out.rejected_rewards.mean().item(),
        "logp_accuracy": (chosen > rejected).float().mean().item(),
        "logp_accuracy_per_token": (chosen / chosen_tokens > rejected / rejected_tokens).float().mean().item(),
        "pairs": len(data.pairs),
    }
    return measures, out.margins


# ---- the reference ---------------------------------------------------------------------------
def load_reference(path: str | Path, tokenizer: Tokenizer, device: torch.device, block_size: int) -> GPT:
    """The reference model at `path`, frozen and in eval mode; ConfigError unless its tokenizer
    gives the same ids as the policy's (log-probabilities of different token sequences do not
    compare) and its context holds `block_size` tokens."""
    from scratchlm.interop import open_model

    opened = open_model(path, device, kind="language-model")
    reference, ref_tokenizer = opened.model, opened.tokenizer
    if not same_ids(tokenizer, ref_tokenizer):
        raise ConfigError(f"reference {path}: its tokenizer differs from the model's; DPO needs both to read the same token ids")
    if reference.config.block_size < block_size:
        raise ConfigError(f"reference {path}: its context ({reference.config.block_size}) is shorter than --max-length "
                          f"{block_size}; give a smaller --max-length")
    return reference.eval().requires_grad_(False)


# ---- training ------------------------------------------------------------------------------
def train_dpo(model: nn.Module, train: EncodedPairs, config: DPOConfig, pad_id: int,
              reference: ReferenceLogprobs | nn.Module, on_step=None, progress: bool = False,
              run: Run | None = None, metrics: MetricsLog | None = None) -> LoopResult:
    """The DPO loss of each batch of pairs, trained by the shared loop (`trainer.finetune_loop`,
    whose `run` and `metrics` these are). `reference` is either the precomputed log-probabilities
    of `train.pairs` (looked up by pair index) or a frozen model scored on each batch."""

    def epoch(generator: torch.Generator):
        for rows in shuffled_groups(len(train.pairs), config.batch_size, generator):
            yield rows, collate_preferences([train.pairs[i] for i in rows], pad_id)

    def step(policy: nn.Module, batch) -> StepOutput:
        rows, pairs = batch
        chosen, rejected = preference_logprobs(policy, pairs)
        if isinstance(reference, ReferenceLogprobs):
            ref_chosen, ref_rejected = reference.chosen[rows], reference.rejected[rows]
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = preference_logprobs(reference, pairs)
        out = dpo_loss(chosen, rejected, ref_chosen.to(chosen), ref_rejected.to(chosen), config.beta, config.label_smoothing)
        return StepOutput(out.loss, {"reward_accuracy": out.accuracy.item(), "margin": out.margins.mean().item(),
                                     "chosen_reward": out.chosen_rewards.mean().item(),
                                     "rejected_reward": out.rejected_rewards.mean().item()},
                          tokens=pairs.input_ids.numel())

    batches = Batches(epoch, math.ceil(len(train.pairs) / config.batch_size))
    return finetune_loop(model, batches, step, config, run, metrics, on_step=on_step, progress=progress, desc="dpo")


# ---- the whole run ---------------------------------------------------------------------------
@dataclass
class DPOResult:
    out: Path
    before: dict
    after: dict
    trainable_params: int
    total_params: int
    train_seconds: float
    steps: int
    peak_memory_mb: float
    data: dict = field(default_factory=dict)  # counts: train, eval, rejected, truncated, dropped; max_length
    reports: list[RecordReport] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)  # a few held-out pairs with their margin after training
    start_memory_mb: float = 0.0  # held when training began (the model, the data): peak minus this is training's own


def _references(model: GPT, tokenizer: Tokenizer, train: EncodedPairs, held: EncodedPairs, config: DPOConfig,
                pad_id: int) -> tuple[ReferenceLogprobs | nn.Module, ReferenceLogprobs]:
    """What training compares against (the reference's log-probabilities of the training pairs,
    or with `precompute_reference` off a frozen reference model to score each batch) and the
    reference's log-probabilities of the held-out pairs. Called before any adapter or freeze
    touches `model`, so that the starting model is the default reference."""
    if config.reference:
        reference = load_reference(config.reference, tokenizer, model_device(model), config.context(model.config.block_size))
    else:
        reference = model
    held_ref = ReferenceLogprobs(*score_pairs(reference, held.pairs, config.batch_size, pad_id, config.dtype))
    if config.precompute_reference:
        # A loaded reference model is dropped on return: training holds one model only.
        return ReferenceLogprobs(*score_pairs(reference, train.pairs, config.batch_size, pad_id, config.dtype)), held_ref
    if reference is model:  # the policy is about to change: keep a frozen copy of where it started
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    return reference, held_ref


def finetune_dpo(model_path: str | Path, data: str | Path, out: str | Path, config: DPOConfig,
                 eval_path: str | Path | None = None, force: bool = False, progress: bool = True,
                 note: Callable[[str], None] | None = None, resume: bool = False) -> DPOResult:
    """Train the model at `model_path` (any language model `open_model` opens) by DPO on the
    preference pairs of `data`, measure it on `eval_path` or a held-out split before and after,
    and write the run folder `out`. `resume` continues the run in `out` from its latest
    checkpoint (`config.checkpoint_every`), with the same settings. Under torchrun each rank
    trains its share of every step (a live reference scores each rank's own batches), and rank
    0 writes the run folder."""
    with process_group(config.device, config.parallel) as info:
        return _finetune_dpo(model_path, data, out, config, eval_path, force, progress, note if info.is_main else None,
                             resume, info)


def _finetune_dpo(model_path: str | Path, data: str | Path, out: str | Path, config: DPOConfig,
                  eval_path: str | Path | None, force: bool, progress: bool, note: Callable[[str], None] | None,
                  resume: bool, info: DistInfo) -> DPOResult:
    out = Path(out)
    data, eval_path = Path(data), Path(eval_path) if eval_path is not None else None
    say = note or (lambda _: None)
    train_examples, held_examples, reports = load_splits(load_preferences, data, eval_path, config.val_fraction, config.seed)  # bad data fails before a model loads
    model, tokenizer, device = load_base(model_path, out, force, resume, config.device, reports, say, info)
    config = with_default_lr(config, FULL_LR, LORA_LR, model)
    block_size = config.context(model.config.block_size)
    train = encode_pairs(tokenizer, train_examples, block_size, config.truncate, str(data))
    held = encode_pairs(tokenizer, held_examples, block_size, config.truncate, str(eval_path or data))
    stats = (train.stats, held.stats)
    say(f"pairs: {len(train.pairs)} training, {len(held.pairs)} held-out fit {block_size} tokens; "
        f"{sum(s.truncated for s in stats)} truncated, {sum(s.dropped for s in stats)} dropped")
    say("scoring the pairs with the reference model")
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # any id: pads are never scored
    reference, held_ref = _references(model, tokenizer, train, held, config, pad_id)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # a precomputed reference model is gone; return its memory
    torch.manual_seed(config.seed)  # LoRA's A matrices
    lora = prepare_trainable(model, config)
    trainable, total = trainable_parameters(model)
    before, _ = evaluate_preferences(model, held, held_ref, config, pad_id)
    say(f"held-out before: log-prob accuracy {before['logp_accuracy']:.4f} (DPO loss log 2, rewards 0: the policy is the reference)")
    say(f"training {trainable:,} of {total:,} parameters ({config.method()}) at lr {config.lr:g}")
    with run_folder(out, force, resume, main=info.is_main):
        log = MetricsLog(out / "metrics.jsonl", enabled=info.is_main)
        if not resume:
            log.write(_val_row(0, before))
        trained = train_dpo(model, train, config, pad_id, reference, progress=progress,
                            run=Run(out, device, info, resume=resume, tokenizer=tokenizer), metrics=log)
        steps, seconds, peak, start_memory = trained.steps, trained.seconds, trained.peak_memory_mb, trained.start_memory_mb
        after, margins = evaluate_preferences(model, held, held_ref, config, pad_id)
        log.write(_val_row(steps, after))
        if info.is_main:
            save_finetuned(out, trained.model, tokenizer, lora)  # whole again under FSDP
            write_loss_curve(out, f"DPO: {out.name}")
        counts = {"train": len(train.pairs), "eval": len(held.pairs), "rejected": sum(len(r.rejected) for r in reports),
                  "max_length": block_size, "truncated": sum(s.truncated for s in stats), "dropped": sum(s.dropped for s in stats)}
        samples = [_sample(example, float(margin)) for example, margin in zip(held.examples[:REPORT_PAIRS], margins)]
        result = DPOResult(out, before, after, trainable, total, seconds, steps, peak, counts, reports, samples, start_memory)
        if info.is_main:
            write_text_atomic(out / "results.json", json.dumps(_results_dict(result, config, model_path), indent=2) + "\n")
            write_text_atomic(out / "report.md", dpo_report(result, config, model_path))
        return result


def _val_row(step: int, measures: dict) -> dict:
    return {"step": step, "val_loss": measures["loss"], "val_reward_accuracy": measures["reward_accuracy"],
            "val_margin": measures["margin"], "val_logp_accuracy": measures["logp_accuracy"]}


def _sample(example: PreferenceExample, margin: float) -> dict:
    prompt = next((m["content"] for m in reversed(example.messages) if m["role"] == "user"), "")
    return {"source": example.source, "prompt": prompt, "chosen": example.chosen, "rejected": example.rejected, "margin": margin}


def _results_dict(result: DPOResult, config: DPOConfig, model_path) -> dict:
    return {"model": str(model_path), "before": result.before, "after": result.after,
            "trainable_params": result.trainable_params, "total_params": result.total_params,
            "train_seconds": result.train_seconds, "steps": result.steps, "peak_memory_mb": result.peak_memory_mb,
            "start_memory_mb": result.start_memory_mb,
            "data": result.data, "samples": result.samples, "config": asdict(config)}


def _short(text: str, limit: int = 80) -> str:
    """One line of at most `limit` characters, for a Markdown table cell."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


MEASURES = (
    ("loss", "DPO loss"),
    ("reward_accuracy", "reward accuracy"),
    ("margin", "mean margin"),
    ("chosen_reward", "mean chosen reward"),
    ("rejected_reward", "mean rejected reward"),
    ("logp_accuracy", "log-prob accuracy"),
    ("logp_accuracy_per_token", "log-prob accuracy per token"),
)


def dpo_report(result: DPOResult, config: DPOConfig, model_path) -> str:
    """report.md: what ran, the held-out measures before and after, a few pairs, the data counts."""
    b, a, d = result.before, result.after, result.data
    reference = f"`{config.reference}`" if config.reference else "the starting model"
    how = "precomputed once before training" if config.precompute_reference else "scored live on each batch"
    lines = [
        f"# DPO: {result.out.name}", "",
        (f"Base model `{model_path}`, {config.method()}; beta {config.beta:g}, label smoothing {config.label_smoothing:g}; "
         f"reference: {reference}, {how}. {result.steps} steps of {config.batch_text('pairs')} at lr {config.lr:g} "
         f"in {result.train_seconds:.1f} s; peak memory {result.peak_memory_mb:,.0f} MB ({result.start_memory_mb:,.0f} MB when training began)."), "",
        (f"Trainable parameters: {result.trainable_params:,} of {result.total_params:,} "
         f"({100 * result.trainable_params / max(result.total_params, 1):.2f}%)."), "",
        (f"Pairs: {d['train']} training, {d['eval']} held out. Rejected lines: {d['rejected']}; pairs over "
         f"{d['max_length']} tokens truncated at the prompt's start: {d['truncated']}, dropped: {d['dropped']}."), "",
        "| held-out measure | before | after |", "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {b[key]:.4f} | {a[key]:.4f} |" for key, name in MEASURES]
    lines += [
        "",
        ("Before training the policy is the reference, so every reward and margin is 0, reward accuracy 0 (a tie is "
         "not a preference) and the DPO loss log 2 = 0.6931, by construction. A reward is beta times how much more "
         "likely the policy makes an answer than the reference does; reward accuracy is the share of pairs whose "
         "chosen answer gained more than the rejected one. The log-prob accuracy is the model's own preference "
         "(chosen answer more likely than the rejected one; per token: by mean log-probability per answer token), "
         "meaningful before training too."), "",
        "Held-out pairs and their reward margin after training:", "",
        "| prompt | chosen | rejected | margin |", "| --- | --- | --- | --- |",
    ]
    lines += [f"| {_short(s['prompt'], 60)} | {_short(s['chosen'])} | {_short(s['rejected'])} | {s['margin']:+.3f} |"
              for s in result.samples]
    for report in result.reports:
        lines += ["", report.summary(limit=20)]
    return "\n".join(lines) + "\n"
