"""Instruction SFT: train a pretrained model to answer, on conversations with a loss on the
assistant's tokens only.

    result = finetune_sft("runs/base", "instructions.jsonl", "runs/sft", SFTConfig(lora=True))
    # runs/sft/model is an ordinary model folder: scratchlm chat runs/sft/model

The pieces come from the rest of `scratchlm.finetune`: conversations are read and encoded with
the assistant-only loss mask by `sft_data` (one labels convention for SFT and DPO), batched by
packing several short examples into each row of `max_length` positions (attention kept inside
each example by `GPT.forward(..., documents=)`) or by right padding, and trained by the one
fine-tuning loop (`trainer.finetune_loop`) that classification and DPO use too; the loss is the
model's own next-token cross-entropy over the labelled tokens.

A run measures itself on held-out conversations (an eval file, or a seeded split of the
training file): the answer loss (token-weighted mean cross-entropy over the held-out answers'
labelled tokens) and its perplexity before and after, and greedy answers to a few held-out
prompts before and after, side by side with the reference, through the sampling function and
chat template rendering `scratchlm chat` uses. The run folder holds model/ (the fine-tuned model,
LoRA merged), adapter.safetensors (with LoRA), metrics.jsonl, loss.png, results.json, report.md.
"""

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from scratchlm.atomic_io import write_text_atomic
from scratchlm.errors import ConfigError
from scratchlm.finetune.config import SFTConfig
from scratchlm.finetune.dpo import sequence_logprobs
from scratchlm.finetune.feedback import prompt_text
from scratchlm.finetune.lora import trainable_parameters
from scratchlm.finetune.records import Message, RecordReport
from scratchlm.finetune.sft_data import (
    IGNORE,
    EncodedExample,
    EncodeStats,
    encode_conversations,
    load_instructions,
    pack_examples,
    pad_batch,
    stack_rows,
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
from scratchlm.train.distributed import DistInfo, process_group
from scratchlm.train.loop import Run, StepOutput
from scratchlm.train.metrics import MetricsLog
from scratchlm.tokenizer.chat_template import chat_stop_ids
from scratchlm.model.sampling import SamplingConfig, generate
from scratchlm.tokenizer import Tokenizer

FULL_LR = 5e-4  # SFTConfig's learning rate by method (see its docstring in config.py for the measurements)
LORA_LR = 2e-3


# ---- batches and the loss ------------------------------------------------------------------
def sft_batches(examples: Sequence[EncodedExample], config: SFTConfig, context: int, pad_id: int,
                device: torch.device) -> Batches[tuple[Tensor, ...]]:
    """The training set as batches of (idx, targets) or, packed, (idx, targets, doc_ids).
    Packed rows are built once, in the data's order, and shuffled as rows each epoch: the
    document mask makes a row's neighbours invisible to each other, so which examples share a
    row changes nothing but the padding."""
    if config.packing:
        rows = pack_examples(examples, context, pad_id)

        def packed(generator: torch.Generator):
            for group in shuffled_groups(len(rows), config.batch_size, generator):
                yield tuple(t.to(device) for t in stack_rows([rows[i] for i in group]))

        return Batches(packed, math.ceil(len(rows) / config.batch_size))

    def padded(generator: torch.Generator):
        for group in shuffled_groups(len(examples), config.batch_size, generator):
            yield tuple(t.to(device) for t in pad_batch([examples[i] for i in group], pad_id))

    return Batches(padded, math.ceil(len(examples) / config.batch_size))


def sft_step(model: GPT, batch: tuple[Tensor, ...]) -> StepOutput:
    """The model's own loss on a batch: mean cross-entropy over the labelled (assistant) tokens."""
    idx, targets, *docs = batch
    _, loss = model(idx, targets, documents=docs[0] if docs else None)
    return StepOutput(loss, {"answer_tokens": float((targets != IGNORE).sum())}, tokens=idx.numel())


@torch.no_grad()
def answer_loss(model: nn.Module, examples: Sequence[EncodedExample], pad_id: int, batch_size: int = 16) -> dict:
    """Token-weighted mean cross-entropy (nats) over the labelled tokens of `examples` and its
    perplexity exp(loss): every answer token counts once, so a long answer weighs more than a
    short one, as in training."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            idx, targets = pad_batch(examples[start : start + batch_size], pad_id)
            total -= float(sequence_logprobs(model, idx.to(device), targets.to(device)).sum())
            tokens += int((targets != IGNORE).sum())
    finally:
        model.train(was_training)
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": tokens,
            "examples": len(examples)}


# ---- side-by-side answers ------------------------------------------------------------------
def sample_answers(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Sequence[Message]], max_new_tokens: int) -> list[str]:
    """Greedy answers to conversations that end with a user message, rendered and stopped as
    `scratchlm chat` does (the model's chat template, its end-of-turn tokens); a model without a
    template continues the user's text."""
    if not prompts:
        return []
    texts = [prompt_text(tokenizer, list(messages)) for messages in prompts]
    config = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=chat_stop_ids(tokenizer),
                            truncate=True)
    return [c.text for c in generate(model, tokenizer, texts, config)]


# ---- the whole run ---------------------------------------------------------------------------
@dataclass
class SFTResult:
    out: Path
    before: dict  # held-out answer loss, perplexity, tokens, examples
    after: dict
    samples: list[dict]  # per held-out prompt: prompt (messages), reference, before, after
    trainable_params: int
    total_params: int
    train_seconds: float
    steps: int
    peak_memory_mb: float
    context: int
    data: dict = field(default_factory=dict)  # counts of conversations, examples, rows
    reports: list[RecordReport] = field(default_factory=list)
    start_memory_mb: float = 0.0  # held when training began (the model, the data): peak minus this is training's own

    @property
    def model_dir(self) -> Path:
        return self.out / "model"


def _encode(tokenizer: Tokenizer, conversations, context: int, config: SFTConfig, name: str) -> tuple[list[EncodedExample], EncodeStats]:
    examples, stats = encode_conversations(tokenizer, conversations, context, config.truncate)
    if not examples:
        raise ConfigError(f"{name}: every conversation is longer than the context of {context} tokens and was dropped; "
                          "raise --max-length or pass --truncate left")
    return examples, stats


def finetune_sft(model_path: str | Path, data: str | Path, out: str | Path, config: SFTConfig,
                 eval_path: str | Path | None = None, force: bool = False, progress: bool = True,
                 note: Callable[[str], None] | None = None, resume: bool = False) -> SFTResult:
    """Fine-tune the model at `model_path` (any language model `open_model` opens) on the
    conversations of `data`, measure it on `eval_path` or a held-out split before and after,
    and write the run folder `out` (see the module docstring). `resume` continues the run in
    `out` from its latest checkpoint (`config.checkpoint_every`), with the same settings.
    Under torchrun each rank trains its share of every step, and rank 0 writes the run folder."""
    with process_group(config.device, config.parallel) as info:
        return _finetune_sft(model_path, data, out, config, eval_path, force, progress, note if info.is_main else None,
                             resume, info)


def _finetune_sft(model_path: str | Path, data: str | Path, out: str | Path, config: SFTConfig,
                  eval_path: str | Path | None, force: bool, progress: bool, note: Callable[[str], None] | None,
                  resume: bool, info: DistInfo) -> SFTResult:
    out = Path(out)
    data, eval_path = Path(data), Path(eval_path) if eval_path is not None else None
    say = note or (lambda _: None)
    train_conv, held_conv, reports = load_splits(load_instructions, data, eval_path, config.val_fraction, config.seed)  # bad data fails before the model loads
    model, tokenizer, device = load_base(model_path, out, force, resume, config.device, reports, say, info)
    config = with_default_lr(config, FULL_LR, LORA_LR, model)
    context = config.context(model.config.block_size)
    train, train_stats = _encode(tokenizer, train_conv, context, config, str(data))
    held, held_stats = _encode(tokenizer, held_conv, context, config, str(eval_path or f"{data} (held-out split)"))
    say(f"conversations: {len(train)} training, {len(held)} held-out fit {context} tokens; "
        f"{train_stats.truncated + held_stats.truncated} truncated, {train_stats.dropped + held_stats.dropped} dropped")
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # any id: pads are never scored or attended to
    prompts = [conv[:-1] for conv in held_conv[: config.samples]]  # each ends with its reference answer
    before = answer_loss(model, held, pad_id, config.batch_size)
    say(f"held-out answer loss before: {before['loss']:.4f} (perplexity {before['perplexity']:.2f})")
    answers_before = sample_answers(model, tokenizer, prompts, config.sample_tokens) if info.is_main else []
    torch.manual_seed(config.seed)  # LoRA's A matrices
    lora = prepare_trainable(model, config)
    trainable, total = trainable_parameters(model)
    batches = sft_batches(train, config, context, pad_id, device)
    say(f"training {trainable:,} of {total:,} parameters ({config.method()}) at lr {config.lr:g}")
    latest: dict = {}

    def held_out(m: nn.Module) -> dict[str, float]:
        latest.update(answer_loss(m, held, pad_id, config.batch_size))
        return {"val_loss": latest["loss"]}

    with run_folder(out, force, resume, main=info.is_main):
        trained = finetune_loop(model, batches, sft_step, config, run=Run(out, device, info, resume=resume, tokenizer=tokenizer),
                                metrics=MetricsLog(out / "metrics.jsonl", enabled=info.is_main), evaluate=held_out,
                                progress=progress, desc="sft")
        after = dict(latest)  # the loop's evaluation at the end
        steps, seconds, peak, start_memory = trained.steps, trained.seconds, trained.peak_memory_mb, trained.start_memory_mb
        if info.is_main:
            model = trained.model  # whole again under FSDP
        answers_after = sample_answers(model, tokenizer, prompts, config.sample_tokens) if info.is_main else []
        if info.is_main:
            save_finetuned(out, model, tokenizer, lora)
            write_loss_curve(out, f"instruction SFT: {out.name}")
        samples = [{"prompt": list(p), "reference": conv[-1]["content"], "before": b, "after": a}
                   for p, conv, b, a in zip(prompts, held_conv, answers_before, answers_after)]
        counts = {
            "train_conversations": len(train_conv), "eval_conversations": len(held_conv),
            "rejected": sum(len(r.rejected) for r in reports),
            "train_examples": len(train), "eval_examples": len(held),
            "truncated": train_stats.truncated + held_stats.truncated, "dropped": train_stats.dropped + held_stats.dropped,
            "train_answer_tokens": sum(sum(t != IGNORE for t in e.targets) for e in train),
            "train_batches_per_epoch": batches.per_epoch,
        }
        result = SFTResult(out, before, after, samples, trainable, total, seconds, steps, peak, context, counts, reports, start_memory)
        if info.is_main:
            write_text_atomic(out / "results.json", json.dumps(_results_dict(result, config, model_path), indent=2) + "\n")
            write_text_atomic(out / "report.md", sft_report(result, config, model_path))
        return result


def _results_dict(result: SFTResult, config: SFTConfig, model_path) -> dict:
    return {"model": str(model_path), "model_dir": str(result.model_dir), "before": result.before, "after": result.after,
            "samples": result.samples, "trainable_params": result.trainable_params, "total_params": result.total_params,
            "train_seconds": result.train_seconds, "steps": result.steps, "peak_memory_mb": result.peak_memory_mb,
            "start_memory_mb": result.start_memory_mb,
            "context": result.context, "data": result.data,
            "rejected_lines": [{"file": r.path, "line": x.line, "reason": x.reason} for r in result.reports for x in r.rejected],
            "config": asdict(config)}


def _fenced(text: str) -> str:
    """`text` as a markdown code block whose fence no backtick run inside it can close."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text if text.strip() else '(empty)'}\n{fence}"


def sft_report(result: SFTResult, config: SFTConfig, model_path) -> str:
    """report.md: held-out answer loss before and after, the data, what trained, sample answers."""
    b, a, d = result.before, result.after, result.data
    batching = f"packed rows of {result.context} tokens" if config.packing else f"padded batches (context {result.context})"
    lines = [
        f"# Instruction SFT: {result.out.name}", "",
        (f"Base model `{model_path}`, {config.method()}; {result.steps} steps of {config.batch_text('rows' if config.packing else 'conversations')} "
         f"({batching}) at lr {config.lr:g} in {result.train_seconds:.1f} s, peak memory {result.peak_memory_mb:,.0f} MB ({result.start_memory_mb:,.0f} MB when training began)."), "",
        (f"Trainable parameters: {result.trainable_params:,} of {result.total_params:,} "
         f"({100 * result.trainable_params / max(result.total_params, 1):.2f}%)."), "",
        (f"Data: {d['train_conversations']} training and {d['eval_conversations']} held-out conversations; "
         f"{d['train_examples']} and {d['eval_examples']} fit the context ({d['train_answer_tokens']:,} answer tokens "
         f"to train on); over {result.context} tokens (--truncate {config.truncate}): {d['truncated']} cut at the start, "
         f"{d['dropped']} dropped; rejected lines: {d['rejected']}."), "",
        f"Held-out answer loss over {b['tokens']:,} answer tokens of {b['examples']} conversations:", "",
        "| | loss (nats/token) | perplexity |", "| --- | --- | --- |",
        f"| before | {b['loss']:.4f} | {b['perplexity']:.2f} |",
        f"| after | {a['loss']:.4f} | {a['perplexity']:.2f} |", "",
        f"The fine-tuned model: `{result.model_dir}` (a model folder for chat, serve, eval and export).",
    ]
    for report in result.reports:
        if report.rejected:
            lines += ["", report.summary(limit=20)]
    if result.samples:
        lines += ["", "## Held-out prompts, answered before and after (greedy)"]
    for n, sample in enumerate(result.samples, 1):
        lines += ["", f"### {n}", ""]
        for message in sample["prompt"]:
            lines += [f"**{message['role']}:**", "", _fenced(message["content"]), ""]
        for title, key in (("reference", "reference"), ("before", "before"), ("after", "after")):
            lines += [f"**{title}:**", "", _fenced(sample[key]), ""]
        lines.pop()
    return "\n".join(lines) + "\n"
