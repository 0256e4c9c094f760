"""Classification fine-tuning: a pretrained GPT body with a linear head on one pooled vector.

    texts -> tokens (+ end token) -> embedding -> blocks -> final norm -> pool -> linear -> label

The model is `SequenceClassifier` (scratchlm/model/classifier.py, where eval and serve open it
too): the language-model head is dropped; the pooled hidden state goes through a new `score`
layer with one output per label (Radford et al. 2018, section 3.3, classify from the last
token's state). Pooling is "last" (the last real token: under right padding and causal attention it has
seen the whole text and no padding) or "mean" (average of the real tokens, pads masked out).

What trains is chosen by `freeze`: "none" (everything), "embeddings" (all but the token and
position embeddings), or "all-but-last:N" (only the last N blocks, the final norm and the head:
transfer learning with the lower layers' features kept), or by `lora` (low-rank adapters on the
blocks' linear layers plus the head; scratchlm/finetune/lora.py).

    result = finetune_classifier("runs/base", "spam_train.jsonl", "runs/spam", ClassifyConfig())
    clf = load_classifier("runs/spam")               # scratchlm.model.folder
    clf.classify(["WIN a FREE cruise, reply now"])   # ['spam']

The run folder is a model folder (scratchlm/model/folder.py: model.safetensors, config.json with
kind "classifier", its labels, pooling and the base model's config, and tokenizer.json), so
`load_classifier`, `scratchlm eval` and `scratchlm serve` open it as it is; plus metrics.jsonl,
loss.png, report.md and results.json (held-out accuracy, macro F1 and confusion matrix before
and after training, trainable parameters, wall time).
"""

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.atomic_io import write_text_atomic
from scratchlm.errors import ConfigError
from scratchlm.eval.metrics import accuracy, confusion_matrix, macro_f1
from scratchlm.finetune.classify_data import (
    EncodedTexts,
    LabelledText,
    check_labels,
    encode_texts,
    label_names,
    load_labelled_texts,
    split_held_out,
)
from scratchlm.finetune.config import ClassifyConfig, LoRAConfig
from scratchlm.finetune.lora import merge_lora, save_adapter, trainable_parameters
from scratchlm.finetune.records import RecordReport
from scratchlm.finetune.trainer import (
    load_base,
    Batches,
    finetune_loop,
    load_splits,
    prepare_trainable,
    run_folder,
    shuffled_groups,
)
from scratchlm.model.classifier import SequenceClassifier, pad_right, predict
from scratchlm.model.folder import save_model_folder
from scratchlm.model.model import GPT
from scratchlm.train.distributed import DistInfo, process_group
from scratchlm.train.loop import LoopResult, Run, StepOutput
from scratchlm.train.metrics import MetricsLog, plot_loss_curve, read_metrics
from scratchlm.tokenizer import Tokenizer


# ---- evaluation ----------------------------------------------------------------------------
def evaluate(model: SequenceClassifier, data: EncodedTexts, labels: Sequence[str], pad_id: int, batch_size: int = 32) -> dict:
    """Accuracy, macro F1, the confusion matrix (rows: true label, columns: predicted, in
    `labels` order) and the mean cross-entropy on `data`."""
    predicted, logits = predict(model, data.ids, pad_id, batch_size)
    truth = data.labels
    loss = float(F.cross_entropy(logits, torch.tensor(truth, dtype=torch.long))) if truth else float("nan")
    guess_names, true_names = [labels[p] for p in predicted], [labels[t] for t in truth]
    return {
        "accuracy": accuracy(guess_names, true_names),
        "macro_f1": macro_f1(guess_names, true_names),
        "confusion": confusion_matrix(guess_names, true_names, labels),
        "loss": loss,
        "examples": len(truth),
    }


# ---- saving ------------------------------------------------------------------------------
def save_classifier(folder: str | Path, model: SequenceClassifier, tokenizer: Tokenizer, labels: Sequence[str],
                    max_length: int) -> Path:
    """Write the classifier as a model folder (`save_model_folder`, kind "classifier"). A model
    with LoRA adapters is saved merged, so loading needs no adapter code."""
    merge_lora(model)
    return save_model_folder(folder, model, tokenizer, labels=list(labels), max_length=max_length)


# ---- the whole run ---------------------------------------------------------------------------
@dataclass
class ClassifyResult:
    out: Path
    labels: list[str]
    before: dict
    after: dict
    trainable_params: int
    total_params: int
    train_seconds: float
    steps: int
    peak_memory_mb: float
    data: dict = field(default_factory=dict)  # counts: train, eval, rejected, truncated, dropped
    reports: list[RecordReport] = field(default_factory=list)
    start_memory_mb: float = 0.0  # held when training began (the model, the data): peak minus this is training's own


def build_classifier(gpt: GPT, num_labels: int, config: ClassifyConfig) -> tuple[SequenceClassifier, LoRAConfig | None]:
    """The classifier on `gpt`'s body with `config`'s freezing or LoRA adapters applied."""
    model = SequenceClassifier(gpt, num_labels, config.pooling)
    lora = prepare_trainable(model, config)
    model.score.requires_grad_(True)  # the new head is not pretrained: it must train in full, under LoRA too
    return model, lora


def _load_splits(data: Path, eval_path: Path | None, config: ClassifyConfig):
    # Stratified by label: a rare label must not land only in the held-out part.
    train_records, eval_records, reports = load_splits(load_labelled_texts, data, eval_path, config.val_fraction,
                                                       config.seed, split=split_held_out)
    eval_name = str(eval_path) if eval_path is not None else f"{data} (held-out split)"
    labels = label_names(train_records)
    check_labels(labels, eval_records, eval_name)
    return train_records, eval_records, labels, reports


def _encode(tokenizer: Tokenizer, records: Sequence[LabelledText], labels: Sequence[str], config: ClassifyConfig, name: str) -> EncodedTexts:
    index = {label: n for n, label in enumerate(labels)}
    encoded = encode_texts(tokenizer, [r.text for r in records], [index[r.label] for r in records], config.max_length, config.long)
    if not encoded.ids:
        raise ConfigError(f"{name}: every text is longer than --max-length {config.max_length} and was dropped")
    return encoded


def train_classifier(model: SequenceClassifier, train: EncodedTexts, config: ClassifyConfig, pad_id: int,
                     on_step=None, progress: bool = False, run: Run | None = None,
                     metrics: MetricsLog | None = None) -> LoopResult:
    """Cross-entropy of the class scores, trained by the shared fine-tuning loop
    (`trainer.finetune_loop`, whose `run` and `metrics` these are); `on_step(n, row)` sees
    every step."""
    device = model.embed.weight.device
    labels = torch.tensor(train.labels, dtype=torch.long)

    def epoch(generator: torch.Generator):
        for rows in shuffled_groups(len(train.ids), config.batch_size, generator):
            idx, lengths = pad_right([train.ids[i] for i in rows], pad_id)
            yield idx.to(device), lengths.to(device), labels[rows].to(device)

    def step(classifier: nn.Module, batch) -> StepOutput:
        idx, lengths, truth = batch
        return StepOutput(F.cross_entropy(classifier(idx, lengths).float(), truth), tokens=int(lengths.sum()))

    batches = Batches(epoch, math.ceil(len(train.ids) / config.batch_size))
    return finetune_loop(model, batches, step, config, run, metrics, on_step=on_step, progress=progress, desc="classify")


def finetune_classifier(model_path: str | Path, data: str | Path, out: str | Path, config: ClassifyConfig,
                        eval_path: str | Path | None = None, force: bool = False, progress: bool = True,
                        note: Callable[[str], None] | None = None, resume: bool = False) -> ClassifyResult:
    """Fine-tune the model at `model_path` (any language model `open_model` opens) to classify the
    texts of `data`, evaluate on `eval_path` or a held-out split before and after, and write
    the run folder `out`. `resume` continues the run in `out` from its latest checkpoint
    (`config.checkpoint_every`), with the same settings. Under torchrun each rank trains its
    share of every step, and rank 0 writes the run folder."""
    with process_group(config.device, config.parallel) as info:
        return _finetune_classifier(model_path, data, out, config, eval_path, force, progress,
                                    note if info.is_main else None, resume, info)


def _finetune_classifier(model_path: str | Path, data: str | Path, out: str | Path, config: ClassifyConfig,
                         eval_path: str | Path | None, force: bool, progress: bool, note: Callable[[str], None] | None,
                         resume: bool, info: DistInfo) -> ClassifyResult:
    out = Path(out)
    data, eval_path = Path(data), Path(eval_path) if eval_path is not None else None
    say = note or (lambda _: None)
    train_records, eval_records, labels, reports = _load_splits(data, eval_path, config)  # bad data fails before the model loads
    gpt, tokenizer, device = load_base(model_path, out, force, resume, config.device, reports, say, info)
    if config.max_length > gpt.config.block_size:
        raise ConfigError(f"--max-length {config.max_length} is longer than the model's context ({gpt.config.block_size})")
    train = _encode(tokenizer, train_records, labels, config, str(data))
    held = _encode(tokenizer, eval_records, labels, config, str(eval_path or data))
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # any id: pads are never read
    torch.manual_seed(config.seed)  # the head's initialisation and LoRA's A matrices
    model, lora = build_classifier(gpt, len(labels), config)
    trainable, total = trainable_parameters(model)
    before = evaluate(model, held, labels, pad_id)
    say(f"held-out before: accuracy {before['accuracy']:.4f}, macro F1 {before['macro_f1']:.4f} ({before['examples']} examples)")
    say(f"training {trainable:,} of {total:,} parameters ({config.method()}) at lr {config.lr:g}")
    with run_folder(out, force, resume, main=info.is_main):
        log = MetricsLog(out / "metrics.jsonl", enabled=info.is_main)
        if not resume:
            log.write({"step": 0, "val_loss": before["loss"], "val_accuracy": before["accuracy"]})
        trained = train_classifier(model, train, config, pad_id, progress=progress, metrics=log, run=Run(
            out, device, info, resume=resume, tokenizer=tokenizer, labels=labels, max_length=config.max_length))
        steps, seconds, peak, start_memory = trained.steps, trained.seconds, trained.peak_memory_mb, trained.start_memory_mb
        after = evaluate(model, held, labels, pad_id)
        log.write({"step": steps, "val_loss": after["loss"], "val_accuracy": after["accuracy"]})
        if info.is_main:
            model = trained.model  # whole again under FSDP
            if lora is not None:
                save_adapter(out / "adapter.safetensors", model, lora)
            save_classifier(out, model, tokenizer, labels, config.max_length)
            plot_loss_curve(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=f"classification fine-tuning: {out.name}")
        counts = {"train": len(train.ids), "eval": len(held.ids), "rejected": sum(len(r.rejected) for r in reports),
                  "truncated": train.truncated + held.truncated, "dropped": train.dropped + held.dropped}
        result = ClassifyResult(out, labels, before, after, trainable, total, seconds, steps, peak, counts, reports, start_memory)
        if info.is_main:
            write_text_atomic(out / "results.json", json.dumps(_results_dict(result, config, model_path), indent=2) + "\n")
            write_text_atomic(out / "report.md", classify_report(result, config, model_path))
        return result


def _results_dict(result: ClassifyResult, config: ClassifyConfig, model_path) -> dict:
    return {"model": str(model_path), "labels": result.labels, "before": result.before, "after": result.after,
            "trainable_params": result.trainable_params, "total_params": result.total_params,
            "train_seconds": result.train_seconds, "steps": result.steps, "peak_memory_mb": result.peak_memory_mb,
            "start_memory_mb": result.start_memory_mb, "data": result.data, "config": asdict(config)}


def classify_report(result: ClassifyResult, config: ClassifyConfig, model_path) -> str:
    """report.md: the before/after table, the confusion matrix after training, what trained."""
    method = config.method()
    b, a = result.before, result.after
    lines = [
        f"# Classification fine-tuning: {result.out.name}", "",
        (f"Base model `{model_path}`, {method}, pooling {config.pooling}; {result.steps} steps of "
         f"{config.batch_text('texts')} at lr {config.lr} in {result.train_seconds:.1f} s, peak memory "
         f"{result.peak_memory_mb:,.0f} MB ({result.start_memory_mb:,.0f} MB when training began)."), "",
        (f"Trainable parameters: {result.trainable_params:,} of {result.total_params:,} "
         f"({100 * result.trainable_params / max(result.total_params, 1):.2f}%)."), "",
        (f"Held-out set: {result.data['eval']} examples; training set: {result.data['train']}. Rejected lines: "
         f"{result.data['rejected']}; texts over {config.max_length} tokens truncated: {result.data['truncated']}, "
         f"dropped: {result.data['dropped']}."), "",
        "| | accuracy | macro F1 | loss |", "| --- | --- | --- | --- |",
        f"| before | {b['accuracy']:.4f} | {b['macro_f1']:.4f} | {b['loss']:.4f} |",
        f"| after | {a['accuracy']:.4f} | {a['macro_f1']:.4f} | {a['loss']:.4f} |", "",
        "Confusion matrix after training (rows: true label, columns: predicted):", "",
        "| true \\ predicted | " + " | ".join(result.labels) + " |",
        "| --- |" + " --- |" * len(result.labels),
    ]
    lines += [f"| {label} | " + " | ".join(str(c) for c in row) + " |" for label, row in zip(result.labels, a["confusion"])]
    for report in result.reports:
        if report.rejected:
            lines += ["", report.summary(limit=20)]
    return "\n".join(lines) + "\n"
