"""Classification fine-tuning: a pretrained GPT body with a linear head on one pooled vector.

    texts -> tokens (+ end token) -> embedding -> blocks -> final norm -> pool -> linear -> label

The language-model head is dropped; the pooled hidden state goes through a new `score` layer
with one output per label (Radford et al. 2018, section 3.3, classify from the last token's
state). Pooling is "last" (the last real token: under right padding and causal attention it has
seen the whole text and no padding) or "mean" (average of the real tokens, pads masked out).

What trains is chosen by `freeze`: "none" (everything), "embeddings" (all but the token and
position embeddings), or "all-but-last:N" (only the last N blocks, the final norm and the head:
transfer learning with the lower layers' features kept), or by `lora` (low-rank adapters on the
blocks' linear layers plus the head; scratchlm/finetune/lora.py).

    result = finetune_classifier("runs/base", "spam_train.jsonl", "runs/spam", ClassifyConfig())
    clf = load_classifier("runs/spam")
    clf.classify(["WIN a FREE cruise, reply now"])   # ['spam']

The run folder holds classifier.safetensors and config.json (labels, pooling, the base model's
config) with tokenizer.json, so `load_classifier` needs nothing else; plus metrics.jsonl,
loss.png, report.md and results.json (held-out accuracy, macro F1 and confusion matrix before
and after training, trainable parameters, wall time).
"""

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from scratchlm.atomic_io import write_text_atomic, written_atomically
from scratchlm.devices import parse_device
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.eval.metrics import accuracy, confusion_matrix, macro_f1
from scratchlm.finetune.classify_data import (
    LONG_POLICIES,
    EncodedTexts,
    LabelledText,
    LongPolicy,
    check_labels,
    encode_texts,
    label_names,
    load_labelled_texts,
    pad_right,
    split_held_out,
)
from scratchlm.finetune.lora import LoRAConfig, merge_lora, save_adapter, trainable_parameters
from scratchlm.finetune.records import RecordReport
from scratchlm.finetune.trainer import (
    Batches,
    FinetuneConfig,
    StepOutput,
    finetune_loop,
    load_splits,
    check_out,
    prepare_trainable,
    run_folder,
    shuffled_groups,
)
from scratchlm.model.config import ModelConfig
from scratchlm.model.model import GPT, allocate_on_cpu
from scratchlm.tokenizer import Tokenizer, load_tokenizer

Pooling = Literal["last", "mean"]
POOLINGS = ("last", "mean")
WEIGHTS = "classifier.safetensors"
CONFIG = "config.json"
FORMAT = "scratchlm-classifier"  # config.json's "format": tells a classifier folder from a model folder


# ---- the model -------------------------------------------------------------------------
def pool_hidden(hidden: Tensor, lengths: Tensor, pooling: Pooling) -> Tensor:
    """(B, T, C) hidden states of right-padded rows with `lengths` real tokens -> (B, C)."""
    if pooling == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, lengths.to(hidden.device) - 1]
    if pooling == "mean":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        mask = (positions[None] < lengths.to(hidden.device)[:, None]).to(hidden.dtype)[..., None]
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")


class SequenceClassifier(nn.Module):
    """Our GPT's embedding, blocks and final norm (its LM head left out), a pooling and a linear
    head to `num_labels` scores. The modules are taken from `gpt`, not copied."""

    def __init__(self, gpt: GPT, num_labels: int, pooling: Pooling = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        if num_labels < 2:
            raise ConfigError(f"a classifier needs at least two labels, not {num_labels}")
        self.config: ModelConfig = gpt.config
        self.pooling = pooling
        self.embed, self.pos_embed, self.drop = gpt.embed, gpt.pos_embed, gpt.drop
        self.blocks, self.norm = gpt.blocks, gpt.norm
        if self.config.positions == "rope":
            self.register_buffer("rope_cos", gpt.rope_cos, persistent=False)
            self.register_buffer("rope_sin", gpt.rope_sin, persistent=False)
        self.score = nn.Linear(self.config.n_embd, num_labels)
        # Small random weights, zero bias: the untrained head gives near-uniform class scores.
        device = self.embed.weight.device
        self.score.to(device)
        nn.init.normal_(self.score.weight, std=self.config.init_std)
        nn.init.zeros_(self.score.bias)

    def hidden(self, idx: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, C) final-norm hidden states: GPT.forward without the LM head
        (plain causal attention from position 0, no cache)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
        x = self.embed(idx)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=idx.device))[None]
        else:
            rope = (self.rope_cos[:T][None, None], self.rope_sin[:T][None, None])
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, None, layer)
        return self.norm(x)

    def forward(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """Class scores (B, num_labels) of right-padded rows with `lengths` real tokens."""
        return self.score(pool_hidden(self.hidden(idx), lengths, self.pooling))


# ---- settings ------------------------------------------------------------------------------
@dataclass
class ClassifyConfig(FinetuneConfig):
    """The shared fine-tuning settings (`trainer.FinetuneConfig`) plus the classifier's own."""

    pooling: Pooling = "last"
    max_length: int = 128
    long: LongPolicy = "truncate"  # a text longer than max_length: truncate or drop
    val_fraction: float = 0.2  # held-out share when no eval file is given

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.pooling in POOLINGS, f"pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}"),
            (self.long in LONG_POLICIES, f"long must be one of {', '.join(LONG_POLICIES)}, not {self.long!r}"),
            (self.max_length >= 2, f"max length must be at least 2, not {self.max_length}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


# ---- evaluation ----------------------------------------------------------------------------
@torch.no_grad()
def predict(model: SequenceClassifier, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32) -> tuple[list[int], Tensor]:
    """(predicted class numbers, logits (N, num_labels) on the CPU) for encoded texts."""
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    outputs = []
    try:
        for start in range(0, len(ids), batch_size):
            rows = range(start, min(start + batch_size, len(ids)))
            idx, lengths = pad_right([ids[i] for i in rows], pad_id)
            outputs.append(model(idx.to(device), lengths.to(device)).float().cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(outputs) if outputs else torch.empty(0, model.score.out_features)
    return logits.argmax(dim=-1).tolist(), logits


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


# ---- saving and loading --------------------------------------------------------------------
def save_classifier(folder: str | Path, model: SequenceClassifier, tokenizer: Tokenizer, labels: Sequence[str],
                    max_length: int) -> Path:
    """Write weights (safetensors), config.json and tokenizer.json into `folder`. A model with
    LoRA adapters is saved merged, so loading needs no adapter code."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merge_lora(model)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    with written_atomically(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    meta = {"format": FORMAT, "labels": list(labels), "pooling": model.pooling, "max_length": max_length,
            "model_config": model.config.to_dict()}
    write_text_atomic(folder / CONFIG, json.dumps(meta, indent=2) + "\n")
    tokenizer.save(folder / "tokenizer.json")
    return folder


@dataclass
class TextClassifier:
    """A loaded classifier: `classify(texts)` gives a label per text. Texts longer than
    `max_length` tokens are truncated (a classifier must answer for every text)."""

    model: SequenceClassifier
    tokenizer: Tokenizer
    labels: list[str]
    max_length: int
    pad_id: int = 0

    def classify(self, texts: Sequence[str], batch_size: int = 32) -> list[str]:
        encoded = encode_texts(self.tokenizer, texts, [0] * len(texts), self.max_length, "truncate")
        predicted, _ = predict(self.model, encoded.ids, self.pad_id, batch_size)
        return [self.labels[p] for p in predicted]


def load_classifier(folder: str | Path, device: str | torch.device = "cpu") -> TextClassifier:
    """The classifier `save_classifier` (or `finetune_classifier`) wrote into `folder`."""
    folder = Path(folder)
    config_path = folder / CONFIG
    if not (folder / WEIGHTS).is_file() or not config_path.is_file():
        raise InputFileError(f"{folder}: not a classifier folder (expected {WEIGHTS} and {CONFIG})")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{config_path}: not a JSON file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputFileError(f"{config_path}: not a classifier config (no \"format\": \"{FORMAT}\")")
    config = ModelConfig.from_dict(meta["model_config"])
    with torch.device("meta"):  # no random initialisation of weights about to be overwritten
        gpt = GPT(config)
    model = SequenceClassifier(allocate_on_cpu(gpt), len(meta["labels"]), meta["pooling"])
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise InputFileError(f"{folder / WEIGHTS}: not a safetensors file ({exc})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputFileError(f"{folder / WEIGHTS}: weights do not match the config ({min(missing or unexpected)})")
    model.to(parse_device(str(device))).eval()
    return TextClassifier(model, load_tokenizer(folder / "tokenizer.json"), list(meta["labels"]), int(meta["max_length"]))


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
    data: dict = field(default_factory=dict)  # counts: train, eval, rejected, truncated, dropped
    reports: list[RecordReport] = field(default_factory=list)


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
                     on_step=None, progress: bool = False) -> int:
    """Cross-entropy of the class scores, trained by the shared fine-tuning loop
    (`trainer.finetune_loop`); `on_step(n, row)` sees every step. Returns the steps taken."""
    device = model.embed.weight.device
    labels = torch.tensor(train.labels, dtype=torch.long)

    def epoch(generator: torch.Generator):
        for rows in shuffled_groups(len(train.ids), config.batch_size, generator):
            idx, lengths = pad_right([train.ids[i] for i in rows], pad_id)
            yield idx.to(device), lengths.to(device), labels[rows].to(device)

    def step(batch) -> StepOutput:
        idx, lengths, truth = batch
        return StepOutput(F.cross_entropy(model(idx, lengths).float(), truth))

    batches = Batches(epoch, math.ceil(len(train.ids) / config.batch_size))
    return finetune_loop(model, batches, step, config, on_step=on_step, progress=progress, desc="classify")


def finetune_classifier(model_path: str | Path, data: str | Path, out: str | Path, config: ClassifyConfig,
                        eval_path: str | Path | None = None, force: bool = False, progress: bool = True,
                        note: Callable[[str], None] | None = None) -> ClassifyResult:
    """Fine-tune the model at `model_path` (anything `load_pretrained` opens) to classify the
    texts of `data`, evaluate on `eval_path` or a held-out split before and after, and write
    the run folder `out`."""
    from scratchlm.interop import load_pretrained
    from scratchlm.train.metrics import MetricsLog, plot_loss_curve, read_metrics

    out = Path(out)
    data, eval_path = Path(data), Path(eval_path) if eval_path is not None else None
    say = note or (lambda _: None)
    train_records, eval_records, labels, reports = _load_splits(data, eval_path, config)  # bad data fails before the model loads
    for report in reports:
        say(report.summary())
    check_out(out, force)
    device = parse_device(config.device)
    say(f"loading {model_path}")
    gpt, tokenizer = load_pretrained(model_path, device)
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
    with run_folder(out, force):
        log = MetricsLog(out / "metrics.jsonl")
        log.write({"step": 0, "val_loss": before["loss"], "val_accuracy": before["accuracy"]})
        start = time.perf_counter()
        steps = train_classifier(model, train, config, pad_id, progress=progress,
                                 on_step=lambda n, row: log.write({"step": n, **row}))
        seconds = time.perf_counter() - start
        after = evaluate(model, held, labels, pad_id)
        log.write({"step": steps, "val_loss": after["loss"], "val_accuracy": after["accuracy"]})
        if lora is not None:
            save_adapter(out / "adapter.safetensors", model, lora)
        save_classifier(out, model, tokenizer, labels, config.max_length)
        plot_loss_curve(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=f"classification fine-tuning: {out.name}")
        counts = {"train": len(train.ids), "eval": len(held.ids), "rejected": sum(len(r.rejected) for r in reports),
                  "truncated": train.truncated + held.truncated, "dropped": train.dropped + held.dropped}
        result = ClassifyResult(out, labels, before, after, trainable, total, seconds, steps, counts, reports)
        write_text_atomic(out / "results.json", json.dumps(_results_dict(result, config, model_path), indent=2) + "\n")
        write_text_atomic(out / "report.md", classify_report(result, config, model_path))
        return result


def _results_dict(result: ClassifyResult, config: ClassifyConfig, model_path) -> dict:
    return {"model": str(model_path), "labels": result.labels, "before": result.before, "after": result.after,
            "trainable_params": result.trainable_params, "total_params": result.total_params,
            "train_seconds": result.train_seconds, "steps": result.steps, "data": result.data, "config": asdict(config)}


def classify_report(result: ClassifyResult, config: ClassifyConfig, model_path) -> str:
    """report.md: the before/after table, the confusion matrix after training, what trained."""
    method = config.method()
    b, a = result.before, result.after
    lines = [
        f"# Classification fine-tuning: {result.out.name}", "",
        (f"Base model `{model_path}`, {method}, pooling {config.pooling}; {result.steps} steps of "
         f"{config.batch_text('texts')} at lr {config.lr} in {result.train_seconds:.1f} s."), "",
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
