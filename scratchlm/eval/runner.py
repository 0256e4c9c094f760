"""Run tasks and language-modelling scores on a model, and write what came out.

`run_task` turns one task into model calls through `scratchlm.eval.scoring` and the metrics of
`scratchlm.eval.metrics`:

- multiple_choice: every choice is a continuation of the context (after the document-start
  token, as the model saw text in training). All choices of all examples go to one batched
  `score_continuations` call, which sorts them by length; a loop per example would run batches
  of four. `acc` picks the highest summed log-probability, `acc_norm` the highest per UTF-8
  byte of the scored continuation. lm-evaluation-harness normalises by characters; bytes are
  what bits per byte uses, and they keep the normalisation fair across scripts: a Chinese
  character is 3 bytes and typically more than one token, a Latin letter 1 byte, so per
  character a CJK answer would be penalised for being written in CJK.
- classification: a multiple choice over the labels, " " + label after the task's template.
  A classifier (a model folder of kind "classifier") instead reads each text as it was trained
  to, and its head picks the label; its labels are matched to the task's by name (exact, else
  ignoring case and surrounding spaces), and a label only one side has is named in the result's
  note. Tasks of the other kinds and the language-modelling scores need a language model:
  `evaluate_model` skips them for a classifier and says so (`EvalReport.skipped`).
- generation: greedy completions, compared with the references.

Every example gets a record (its fields, the prediction, the scores, whether it was right), so
a surprising number can be checked by reading the predictions file `save_report` writes.

`evaluate_model` runs several tasks and the language-modelling scores, and describes the model
and the run, so a results.json says what was measured, on what, and how fast.
"""

import json
import math
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scratchlm.atomic_io import write_text_atomic
from scratchlm.errors import ConfigError, InputFileError, ScratchLMError
from scratchlm.eval.language_modeling import LanguageModelScore, evaluate_shards, evaluate_text
from scratchlm.eval.metrics import accuracy, confusion_matrix, exact_match, generation_metrics, macro_f1, token_f1
from scratchlm.eval.scoring import ContinuationScore, greedy_generate, score_continuations, split_context
from scratchlm.tokenizer.tokens import document_start
from scratchlm.eval.tasks import Task, format_classification_prompt, load_task, references
from scratchlm.model import GPT, count_params
from scratchlm.model.classifier import TextClassifier
from scratchlm.model.info import architecture
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.tokens import check_fits_model

RESULTS_FILE = "results.json"
PREDICTIONS_PREFIX = "predictions-"


# ---- results -------------------------------------------------------------------------------
@dataclass
class TaskResult:
    task: str
    kind: str
    n: int  # examples evaluated
    metrics: dict[str, float]
    records: list[dict[str, Any]]  # one per example, in file order
    labels: list[str] | None = None  # classification: the label order of confusion_matrix
    confusion_matrix: list[list[int]] | None = None  # [true][predicted] counts
    seconds: float = 0.0
    source: str | None = None
    note: str | None = None  # something the reader must know to trust the numbers (labels that do not match)

    @property
    def examples_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-example records (those go to the predictions file)."""
        out: dict[str, Any] = {"kind": self.kind, "n": self.n, "metrics": dict(self.metrics),
                               "seconds": self.seconds, "examples_per_second": self.examples_per_second,
                               "source": self.source}
        if self.note is not None:
            out["note"] = self.note
        if self.labels is not None:
            out["labels"] = list(self.labels)
            out["confusion_matrix"] = [list(row) for row in self.confusion_matrix or []]
        return out


@dataclass
class LanguageModelResult:
    name: str  # "text" or "shards"
    source: str  # the file or folder scored ("<string>" for text given as a string)
    score: LanguageModelScore
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, **self.score.to_dict(), "seconds": self.seconds,
                "tokens_per_second": self.score.tokens / self.seconds if self.seconds > 0 else math.inf}


@dataclass
class EvalReport:
    model: dict[str, Any]  # describe_model(): parameters, config, tokenizer, device
    tasks: list[TaskResult] = field(default_factory=list)
    language_modeling: list[LanguageModelResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # batch_size, limit, truncate, stride
    skipped: dict[str, str] = field(default_factory=dict)  # what was asked for but not run, and why
    seconds: float = 0.0
    created: str = ""  # UTC time the evaluation finished, ISO 8601

    def to_dict(self) -> dict[str, Any]:
        import torch

        import scratchlm

        return {
            "created": self.created,
            "seconds": self.seconds,
            "model": self.model,
            "settings": self.settings,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "scratchlm": getattr(scratchlm, "__version__", None), "platform": platform.platform()},
            "language_modeling": {r.name: r.to_dict() for r in self.language_modeling},
            "tasks": {r.task: r.to_dict() for r in self.tasks},
            "skipped": dict(self.skipped),
        }

    def summary(self) -> str:
        """A few aligned lines a person reads at the end of a run."""
        lines = []
        for r in self.language_modeling:
            lines.append(f"{r.name:<28} bits/byte {r.score.bits_per_byte:.4f}  perplexity {r.score.perplexity:.2f}  "
                         f"({r.score.tokens:,} tokens, {r.seconds:.1f}s)")
        for r in self.tasks:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in r.metrics.items() if not k.endswith("_stderr"))
            lines.append(f"{r.task:<28} {shown}  ({r.n} examples, {r.examples_per_second:.1f}/s)")
            if r.note:
                lines.append(f"{'':<28} note: {r.note}")
        lines += [f"{name:<28} skipped: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


# ---- one task ------------------------------------------------------------------------------
def run_task(
    model: GPT | TextClassifier,
    tokenizer: Tokenizer,
    task: Task,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    truncate: bool = False,
    progress: bool = False,
) -> TaskResult:
    """Evaluate `model` on the first `limit` examples of `task` (all when None). A classifier
    runs classification tasks only."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, not {limit}")
    if isinstance(model, TextClassifier):
        return _run_classifier_task(model, task, limit, batch_size)
    check_fits_model(tokenizer, model.config.vocab_size)
    examples = task.examples[:limit]
    started = time.perf_counter()
    labels = matrix = None
    if task.kind == "multiple_choice":
        metrics, records = _multiple_choice(model, tokenizer, task, examples, batch_size, truncate, progress)
    elif task.kind == "classification":
        metrics, records, labels, matrix = _classification(model, tokenizer, task, examples, batch_size, truncate, progress)
    else:
        metrics, records = _generation(model, tokenizer, task, examples, truncate, progress)
    return TaskResult(task=task.name, kind=task.kind, n=len(examples), metrics=metrics, records=records,
                      labels=labels, confusion_matrix=matrix, seconds=time.perf_counter() - started,
                      source=str(task.source) if task.source else None)


def _base_record(task: Task, index: int, example: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    if "id" in example:
        record["id"] = example["id"]
    if index < len(task.lines):
        record["line"] = task.lines[index]
    return record


def _stderr(p: float, n: int) -> float:
    """Standard error of an accuracy over n examples (lm-eval's sample estimate): how far apart
    two scores must be before the difference means something."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan


def _score_choices(
    model: GPT, tokenizer: Tokenizer, task: Task, items: Sequence[tuple[str, Sequence[str]]],
    batch_size: int, truncate: bool, progress: bool,
) -> list[list[tuple[ContinuationScore, int]]]:
    """(score, bytes scored) of every continuation of every (context, continuations) item, from
    one batched call."""
    prefix = document_start(tokenizer)
    requests, owners = [], []
    for index, (context, continuations) in enumerate(items):
        for continuation in continuations:
            requests.append(split_context(tokenizer, context, continuation, prefix))
            owners.append(index)
    scores = _located(task, owners, lambda: score_continuations(model, requests, batch_size=batch_size,
                                                                  truncate=truncate, progress=progress))
    out: list[list[tuple[ContinuationScore, int]]] = [[] for _ in items]
    for (_, continuation_ids), owner, score in zip(requests, owners, scores):
        out[owner].append((score, len(tokenizer.decode_bytes(continuation_ids))))
    return out


_REQUEST_INDEX = re.compile(r"^(?:request|prompt) (\d+): ")


def _located(task: Task, owners: Sequence[int], call):
    """Run `call`; a scoring error names the request index, which is turned into the task and
    the example's file:line, so a user can find the example that does not fit."""
    try:
        return call()
    except ScratchLMError as exc:
        message = str(exc)
        match = _REQUEST_INDEX.match(message)
        where = f"task {task.name!r}"
        if match and int(match.group(1)) < len(owners):
            where += f", example {task.where(owners[int(match.group(1))])}"
            message = message[match.end():]
        raise type(exc)(f"{where}: {message}") from None


def _multiple_choice(model, tokenizer, task, examples, batch_size, truncate, progress):
    delimiter = task.settings["delimiter"]
    items = [(ex["context"], [delimiter + choice for choice in ex["choices"]]) for ex in examples]
    scored = _score_choices(model, tokenizer, task, items, batch_size, truncate, progress)
    records = []
    for index, (example, choices) in enumerate(zip(examples, scored)):
        logprobs = [score.logprob for score, _ in choices]
        n_bytes = [size for _, size in choices]
        guess = _argmax(logprobs)
        guess_norm = _argmax([lp / size for lp, size in zip(logprobs, n_bytes)])
        records.append({
            **_base_record(task, index, example),
            "context": example["context"], "choices": example["choices"], "label": example["label"],
            "prediction": guess, "prediction_norm": guess_norm,
            "logprobs": logprobs, "bytes": n_bytes, "greedy": [score.greedy for score, _ in choices],
            "correct": guess == example["label"], "correct_norm": guess_norm == example["label"],
        })
    n = len(records)
    acc = sum(r["correct"] for r in records) / n
    acc_norm = sum(r["correct_norm"] for r in records) / n
    metrics = {"acc": acc, "acc_norm": acc_norm, "acc_stderr": _stderr(acc, n), "acc_norm_stderr": _stderr(acc_norm, n)}
    return metrics, records


def _classification(model, tokenizer, task, examples, batch_size, truncate, progress):
    labels = list(task.settings["labels"])
    items = [(format_classification_prompt(task, ex), [" " + label for label in labels]) for ex in examples]
    scored = _score_choices(model, tokenizer, task, items, batch_size, truncate, progress)
    records, predictions, truths = [], [], []
    for index, (example, (prompt, _), choices) in enumerate(zip(examples, items, scored)):
        logprobs = [score.logprob for score, _ in choices]
        prediction = labels[_argmax(logprobs)]
        predictions.append(prediction)
        truths.append(example["label"])
        records.append({
            **_base_record(task, index, example),
            "text": example["text"], "prompt": prompt, "label": example["label"], "prediction": prediction,
            "logprobs": dict(zip(labels, logprobs)), "correct": prediction == example["label"],
        })
    acc = accuracy(predictions, truths)
    metrics = {"accuracy": acc, "macro_f1": macro_f1(predictions, truths), "accuracy_stderr": _stderr(acc, len(truths))}
    return metrics, records, labels, confusion_matrix(predictions, truths, labels)


def _run_classifier_task(classifier: TextClassifier, task: Task, limit: int | None, batch_size: int) -> TaskResult:
    if task.kind != "classification":
        raise ConfigError(f"task {task.name!r} is a {task.kind} task, which needs a language model; "
                          "a classifier runs classification tasks only")
    examples = task.examples[:limit]
    started = time.perf_counter()
    labels = list(task.settings["labels"])
    mapping, note = _match_labels(task, classifier.labels, labels)
    probabilities = _located(task, range(len(examples)), lambda: classifier.probabilities(
        [ex["text"] for ex in examples], batch_size=batch_size))
    records, predictions, truths = [], [], []
    for index, (example, probs) in enumerate(zip(examples, probabilities)):
        # The head's most probable label among those the task knows: a label the task lacks
        # cannot be scored right or wrong.
        prediction = mapping[max(mapping, key=lambda ours: probs[ours])]
        predictions.append(prediction)
        truths.append(example["label"])
        records.append({
            **_base_record(task, index, example),
            "text": example["text"], "label": example["label"], "prediction": prediction,
            "probabilities": probs, "correct": prediction == example["label"],
        })
    acc = accuracy(predictions, truths)
    metrics = {"accuracy": acc, "macro_f1": macro_f1(predictions, truths), "accuracy_stderr": _stderr(acc, len(truths))}
    return TaskResult(task=task.name, kind=task.kind, n=len(examples), metrics=metrics, records=records,
                      labels=labels, confusion_matrix=confusion_matrix(predictions, truths, labels),
                      seconds=time.perf_counter() - started, source=str(task.source) if task.source else None, note=note)


def _label_key(label: str) -> str:
    return label.strip().casefold()


def _match_labels(task: Task, ours: Sequence[str], theirs: Sequence[str]) -> tuple[dict[str, str], str | None]:
    """({classifier label: task label}, a note naming the labels only one side has). Names match
    exactly, else ignoring case and surrounding spaces ("Spam" is "spam"); no label in common
    is a ConfigError, since every prediction would be meaningless."""
    exact = {label: label for label in ours if label in theirs}
    loose = {_label_key(label): label for label in theirs}
    mapping = {label: exact.get(label) or loose.get(_label_key(label)) for label in ours}
    mapping = {k: v for k, v in mapping.items() if v is not None}
    if not mapping:
        raise ConfigError(f"task {task.name!r}: its labels ({', '.join(theirs)}) share none with the classifier's "
                          f"({', '.join(ours)}); evaluate it on a task with the labels it was trained on")
    problems = []
    if unused := [label for label in ours if label not in mapping]:
        problems.append(f"the classifier's {', '.join(unused)} not in the task (never predicted)")
    if missing := [label for label in theirs if label not in mapping.values()]:
        problems.append(f"the task's {', '.join(missing)} not among the classifier's labels (always scored wrong)")
    return mapping, "label sets differ: " + "; ".join(problems) if problems else None


def _generation(model, tokenizer, task, examples, truncate, progress):
    prompts = [ex["prompt"] for ex in examples]
    refs = [references(ex) for ex in examples]
    predictions = _located(task, range(len(examples)), lambda: greedy_generate(
        model, tokenizer, prompts, max_new_tokens=task.settings["max_new_tokens"], stop=task.settings["stop"],
        truncate=truncate, progress=progress))
    records = []
    for index, (example, prediction, ref) in enumerate(zip(examples, predictions, refs)):
        em = exact_match(prediction.strip(), ref)
        records.append({
            **_base_record(task, index, example),
            "prompt": example["prompt"], "references": ref, "prediction": prediction,
            "exact_match": em, "f1": token_f1(prediction.strip(), ref), "correct": em == 1.0,
        })
    return generation_metrics(predictions, refs, task.settings["metrics"]), records


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on ties, so a result does not depend on the sort."""
    return max(range(len(values)), key=lambda n: (values[n], -n))


# ---- a whole evaluation --------------------------------------------------------------------
def prepare_for_evaluation(model: GPT | TextClassifier, dtype: str = "float32") -> GPT | TextClassifier:
    """A language model in `dtype`, on oneDNN's packed linear layers on a CPU
    (`scratchlm.model.quantize.prepare_for_inference`): evaluation only reads it. A classifier
    runs as it is, in float32."""
    if isinstance(model, TextClassifier):
        if dtype != "float32":
            raise ConfigError(f"--dtype {dtype} is for language models; a classifier is evaluated in float32")
        return model
    from scratchlm.model.quantize import prepare_for_inference

    return prepare_for_inference(model, dtype)


def describe_model(model: GPT | TextClassifier, tokenizer: Tokenizer) -> dict[str, Any]:
    """What the report says about the model: enough to tell two results apart."""
    extra = {}
    if isinstance(model, TextClassifier):
        extra = {"kind": "classifier", "labels": list(model.labels), "pooling": model.model.pooling,
                 "max_length": model.max_length}
        model = model.model
    config = model.config
    parameter = next(model.parameters(), None)
    return {
        **extra,
        "parameters": count_params(config),  # from the config: packed and quantized layers hold weights as buffers
        "summary": architecture(config),
        "config": config.to_dict(),
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.content_hash},
        "device": str(parameter.device) if parameter is not None else "cpu",
        "dtype": str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
    }


def evaluate_model(
    model: GPT | TextClassifier,
    tokenizer: Tokenizer,
    *,
    tasks: Sequence[str | Path] = (),
    text: str | Path | None = None,
    shards: str | Path | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    truncate: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Language-modelling scores of `text` (a Path is a file to read; a str is the text itself)
    and of the validation split of the token `shards` folder, then each task (file paths or
    builtin names). Every task file is read and checked before the model runs. A classifier
    runs the classification tasks; the rest is skipped and listed in `EvalReport.skipped`."""
    if isinstance(tasks, (str, Path)):
        tasks = [tasks]  # a lone name would otherwise be iterated letter by letter
    loaded = [load_task(t) for t in tasks]
    seen: dict[str, Task] = {}
    for task in loaded:
        if task.name in seen:
            raise ConfigError(f"two tasks are named {task.name!r} ({seen[task.name].source} and {task.source}); "
                              "give each its own \"name\" in the header")
        seen[task.name] = task
    if not loaded and text is None and shards is None:
        raise ConfigError("nothing to evaluate: give tasks, a text or a shards folder")
    skipped: dict[str, str] = {}
    if isinstance(model, TextClassifier):
        loaded, text, shards, skipped = _classifier_share(loaded, text, shards)
    started = time.perf_counter()
    lm_results = []
    if text is not None:
        content, source = _read_text(text)
        t0 = time.perf_counter()
        score = evaluate_text(model, tokenizer, content, stride=stride, batch_size=batch_size, progress=progress)
        lm_results.append(LanguageModelResult("text", source, score, time.perf_counter() - t0))
    if shards is not None:
        t0 = time.perf_counter()
        score = evaluate_shards(model, tokenizer, shards, stride=stride, batch_size=batch_size, progress=progress)
        lm_results.append(LanguageModelResult("shards", str(shards), score, time.perf_counter() - t0))
    results = [run_task(model, tokenizer, task, batch_size=batch_size, limit=limit, truncate=truncate, progress=progress)
               for task in loaded]
    return EvalReport(
        model=describe_model(model, tokenizer), tasks=results, language_modeling=lm_results,
        settings={"batch_size": batch_size, "limit": limit, "truncate": truncate, "stride": stride}, skipped=skipped,
        seconds=time.perf_counter() - started, created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _classifier_share(tasks: list[Task], text, shards) -> tuple[list[Task], None, None, dict[str, str]]:
    """The part of an evaluation a classifier can run (its classification tasks) and what is
    skipped, with why; nothing left to run is a ConfigError."""
    why = "needs a language model (this is a classifier)"
    skipped = {name: why for name, given in (("text", text), ("shards", shards)) if given is not None}
    skipped |= {task.name: f"a {task.kind} task {why}" for task in tasks if task.kind != "classification"}
    kept = [task for task in tasks if task.kind == "classification"]
    if not kept:
        raise ConfigError("a classifier runs classification tasks only, and none was given "
                          "(--tasks with a classification task file or builtin)")
    return kept, None, None, skipped


def _read_text(text: str | Path) -> tuple[str, str]:
    if isinstance(text, Path):
        from scratchlm.text.reading import read_text

        content, undecodable = read_text(text)
        if undecodable:
            # Replaced bytes would change the byte count that bits per byte divides by.
            raise InputFileError(f"{text}: {undecodable} bytes are not UTF-8 (a binary file, or another encoding); "
                                 "convert it to UTF-8 text first")
        return content, str(text)
    return text, "<string>"


# ---- writing -------------------------------------------------------------------------------
def default_results_dir(source: str | Path) -> Path:
    """Where results go when no folder is given: next to the model. A model or run folder gets
    FOLDER/eval/; a file (a GGUF) gets STEM.eval/ beside it, so two models in one folder do
    not overwrite each other's results."""
    p = Path(source)
    if p.is_dir() or (not p.exists() and not p.suffix):
        return p / "eval"
    return p.with_name(f"{p.stem}.eval")


def predictions_file_name(task_name: str) -> str:
    """A file name for a task's predictions; task names come from headers and may hold anything."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", task_name).strip("._") or "task"
    return f"{PREDICTIONS_PREFIX}{safe}.jsonl"


def save_report(report: EvalReport, out_dir: str | Path) -> Path:
    """Write out_dir/results.json and one predictions-TASK.jsonl per task; returns results.json.

    Each file is written atomically, predictions first and results.json last, so a results.json
    always has its predictions beside it. Predictions files of tasks not in this report (an
    earlier run's) are removed, so the folder describes one evaluation."""
    out = Path(out_dir)
    data = report.to_dict()
    written = set()
    for result in report.tasks:
        name = predictions_file_name(result.task)
        if name in written:  # two task names that differ only in characters a file name cannot hold
            name = predictions_file_name(f"{result.task}-{len(written)}")
        written.add(name)
        lines = "".join(json.dumps(json_ready(record), ensure_ascii=False, allow_nan=False) + "\n" for record in result.records)
        write_text_atomic(out / name, lines)
        data["tasks"][result.task]["predictions"] = name
    results = write_text_atomic(out / RESULTS_FILE, json.dumps(json_ready(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    for stale in out.glob(f"{PREDICTIONS_PREFIX}*.jsonl"):
        if stale.name not in written:
            stale.unlink()
    return results


def json_ready(value: Any) -> Any:
    """Non-finite floats (an infinite perplexity, the stderr of one example) become null: JSON
    has no NaN or Infinity, and strict parsers refuse the spellings Python writes."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
