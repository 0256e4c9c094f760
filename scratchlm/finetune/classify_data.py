"""Labelled texts for classification fine-tuning: CSV or JSONL files of (text, label) records,
a seeded held-out split, token ids fitted to a length limit, and right-padded batches.

    CSV:    a header naming `text` and `label` columns (others ignored), then one record a row
    JSONL:  {"text": "...", "label": "..."} per line (a number as label is read as its text)

A record that is not usable is skipped and reported with its line number rather than silently
dropped or fatal, so a user can fix the data and still see what a run trained on. Labels are
kept as strings; a model's classes are the training labels in sorted order, so the same data
always gives the same class numbering.
"""

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.finetune.config import LONG_POLICIES, LongPolicy
from scratchlm.finetune.records import RecordError, RecordReport, read_jsonl
from scratchlm.model.classifier import fit_ids  # the model layer's, which inference shares
from scratchlm.tokenizer import Tokenizer


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    line: int  # where it came from, for messages


def _check_record(text: object, label: object) -> tuple[str, str]:
    """(text, label) of a parsed record, or RecordError naming what is wrong."""
    if text is None:
        raise RecordError("missing field 'text'")
    if label is None:
        raise RecordError("missing field 'label'")
    if not isinstance(text, str):
        raise RecordError(f"'text' is {type(text).__name__}, not a string")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RecordError(f"'label' is {type(label).__name__}, not a string or integer")
    label = str(label).strip()
    if not text.strip():
        raise RecordError("empty 'text'")
    if not label:
        raise RecordError("empty 'label'")
    return text, label


def _jsonl_records(path: Path, report: RecordReport) -> list[LabelledText]:
    records = []
    for number, record in read_jsonl(path, report):
        try:
            text, label = _check_record(record.get("text"), record.get("label"))
        except RecordError as exc:
            report.reject(number, str(exc))
            continue
        records.append(LabelledText(text, label, number))
    return records


def _csv_records(path: Path, report: RecordReport) -> list[LabelledText]:
    try:
        handle = path.open(encoding="utf-8", newline="")
        with handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return []
            names = [name.strip().lower() for name in header]
            if "text" not in names or "label" not in names:
                raise InputFileError(f"{path}:1: the CSV header must name 'text' and 'label' columns, not {header!r}")
            text_at, label_at = names.index("text"), names.index("label")
            records = []
            for row in reader:
                number = reader.line_num
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    report.reject(number, f"{len(row)} fields, the header has {len(header)}")
                    continue
                try:
                    text, label = _check_record(row[text_at], row[label_at])
                except RecordError as exc:
                    report.reject(number, str(exc))
                    continue
                records.append(LabelledText(text, label, number))
            return records
    except UnicodeDecodeError:
        raise InputFileError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise InputFileError(f"{path}: not a valid CSV file ({exc})") from None


def load_labelled_texts(path: str | Path) -> tuple[list[LabelledText], RecordReport]:
    """The records of a CSV (by its .csv suffix) or JSONL file, and the report of rejected lines.
    InputFileError for a missing file, or one without a single usable record."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    report = RecordReport(str(path), kind="records")
    reader = _csv_records if path.suffix.lower() == ".csv" else _jsonl_records
    records = reader(path, report)
    report.kept = [r.line for r in records]
    report.require_some()
    return records, report


def label_names(records: Sequence[LabelledText]) -> list[str]:
    """The classes, sorted: the same data gives the same numbering on every run."""
    return sorted({r.label for r in records})


def check_labels(train_labels: Sequence[str], eval_records: Sequence[LabelledText], eval_name: str) -> None:
    """ConfigError naming the evaluation labels the training data never shows (the model has no
    class for them), with the first line of each; and for fewer than two training labels."""
    if len(set(train_labels)) < 2:
        raise ConfigError(f"classification needs at least two labels in the training data, found {sorted(set(train_labels))}")
    known = set(train_labels)
    unseen: dict[str, int] = {}
    for record in eval_records:
        if record.label not in known:
            unseen.setdefault(record.label, record.line)
    if unseen:
        named = ", ".join(f"{label!r} ({eval_name}:{line})" for label, line in sorted(unseen.items()))
        raise ConfigError(f"labels in the evaluation data that the training data does not have: {named}; "
                          f"training labels: {', '.join(sorted(known))}")


def split_held_out(records: Sequence[LabelledText], fraction: float, seed: int) -> tuple[list[LabelledText], list[LabelledText]]:
    """(train, held-out): a seeded split stratified by label, so every label keeps its share in
    both parts and a rare label cannot land only in the held-out part. Each label keeps at least
    one training example."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"val fraction must be between 0 and 1 (exclusive), not {fraction}")
    rng = random.Random(seed)
    train: list[LabelledText] = []
    held: list[LabelledText] = []
    for label in label_names(records):
        group = [r for r in records if r.label == label]
        rng.shuffle(group)
        n_held = min(round(len(group) * fraction), len(group) - 1)
        held += group[:n_held]
        train += group[n_held:]
    if not held:
        raise ConfigError(f"a val fraction of {fraction} of {len(records)} records leaves no held-out example; "
                          "give more data, a larger --val-fraction or an --eval file")
    rng.shuffle(train)
    held.sort(key=lambda r: r.line)
    return train, held


@dataclass
class EncodedTexts:
    """Token ids and class numbers, with how many texts were cut or left out for length."""

    ids: list[list[int]]
    labels: list[int]
    truncated: int = 0
    dropped: int = 0


def encode_texts(
    tokenizer: Tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int, long: LongPolicy = "truncate"
) -> EncodedTexts:
    """Token ids of each text (special-token strings read as plain text: user data must not
    inject control tokens), fitted to `max_length` positions: a longer one truncated (its
    beginning kept) or dropped, as `long` says, and counted."""
    if long not in LONG_POLICIES:
        raise ConfigError(f"long texts: {long!r} is not one of {', '.join(LONG_POLICIES)}")
    if max_length < 2:
        raise ConfigError(f"max length must be at least 2 tokens, not {max_length}")
    end_id = tokenizer.eos_id
    out = EncodedTexts([], [])
    for text, label in zip(texts, labels, strict=True):
        ids = tokenizer.encode_ordinary(text)
        fitted = fit_ids(ids, max_length, end_id)
        if len(fitted) < len(ids) + (end_id is not None):
            if long == "drop":
                out.dropped += 1
                continue
            out.truncated += 1
        out.ids.append(fitted)
        out.labels.append(label)
    return out
