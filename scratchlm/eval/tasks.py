"""Task files: benchmarks as JSONL, one example per line (schema in docs/eval-tasks.md).

Three kinds cover most of what small language models are measured on:

    multiple_choice  {"context": str, "choices": [str, ...], "label": int}   HellaSwag, ARC, PIQA
    generation       {"prompt": str, "answer": str} or {..., "answers": [str, ...]}   SQuAD, completion
    classification   {"text": str, "label": str}                            sentiment, topic

The kind is read from the fields; an optional first line `{"task": {...}}` names the task and
sets options (`delimiter`, `max_new_tokens`, `stop`, `metrics`, `labels`, `template`). Every
example may carry an "id" (string or integer) and a "meta" value that is kept but not used.

Validation is strict and happens at load time, before any model runs: an evaluation that dies on
line 9,000 after an hour, or silently skips a typo'd field, is worse than one that refuses to
start. Every problem is reported as FILE:LINE and what is wrong.

Examples stay the dicts written in the file, so what a user wrote is what the predictions file
shows next to the model's answer.
"""

import difflib
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.errors import InputFileError
from scratchlm.eval.metrics import GENERATION_METRICS

BUILTIN_DIR = Path(__file__).with_name("builtin")
KINDS = ("multiple_choice", "generation", "classification")

# Fields an example of each kind must have, and may have.
_REQUIRED = {
    "multiple_choice": ("context", "choices", "label"),
    "generation": ("prompt",),  # plus exactly one of answer / answers
    "classification": ("text", "label"),
}
_FIELDS = {
    "multiple_choice": {"context", "choices", "label", "id", "meta"},
    "generation": {"prompt", "answer", "answers", "id", "meta"},
    "classification": {"text", "label", "id", "meta"},
}
# A field that only one kind has tells the kind ("label" is shared, so it tells nothing).
_KIND_OF_FIELD = {
    "context": "multiple_choice", "choices": "multiple_choice",
    "prompt": "generation", "answer": "generation", "answers": "generation",
    "text": "classification",
}

# Header options: shared ones, then each kind's, with their defaults.
_COMMON_OPTIONS = ("name", "kind", "description", "source", "metadata")
DEFAULTS: dict[str, dict[str, Any]] = {
    "multiple_choice": {"delimiter": " "},
    "generation": {"max_new_tokens": 32, "stop": ["\n"], "metrics": list(GENERATION_METRICS)},
    "classification": {"template": "{text}\nAnswer:"},  # "labels" defaults to the file's labels
}
_KIND_OPTIONS = {"multiple_choice": ("delimiter",), "generation": ("max_new_tokens", "stop", "metrics"),
                 "classification": ("labels", "template")}


@dataclass
class Task:
    """A loaded task. `settings` holds every option with defaults filled in (name, kind,
    description, and the kind's options); `examples` are the file's dicts, `lines` their line
    numbers in `source` (for messages that point at an example)."""

    name: str
    kind: str
    settings: dict[str, Any]
    examples: list[dict[str, Any]]
    source: Path | None = None
    lines: list[int] = field(default_factory=list)

    def where(self, index: int) -> str:
        """'FILE:LINE (id X)' of example `index`, for error messages."""
        line = self.lines[index] if index < len(self.lines) else None
        place = f"{self.source}:{line}" if self.source and line else f"example {index}"
        example_id = self.examples[index].get("id")
        return place + (f" (id {example_id!r})" if example_id is not None else "")


def references(example: dict[str, Any]) -> list[str]:
    """A generation example's acceptable answers, whichever of answer / answers it uses."""
    return list(example["answers"]) if "answers" in example else [example["answer"]]


def builtin_tasks() -> list[str]:
    """Names of the tasks shipped with scratchlm (scratchlm/eval/builtin/NAME.jsonl)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))


def resolve_task_path(path_or_name: str | Path) -> Path:
    """A file path as given, or the builtin task of that name."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = str(path_or_name)
    if name in builtin_tasks():
        return BUILTIN_DIR / f"{name}.jsonl"
    if path.exists():
        raise InputFileError(f"{path}: is a folder; give a task file (.jsonl) or a builtin task name")
    close = difflib.get_close_matches(name, builtin_tasks(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise InputFileError(
        f"{name}: no such task file or builtin task{hint} (builtin tasks: {', '.join(builtin_tasks()) or 'none'})"
    )


def load_task(path_or_name: str | Path) -> Task:
    """Read and validate a task file, or the builtin task of that name."""
    path = resolve_task_path(path_or_name)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_task(raw, path)


def parse_task(raw: bytes, path: Path) -> Task:
    """Validate the bytes of a task file named `path` (used in messages and for the default name)."""
    header: dict[str, Any] = {}
    header_line = 0
    examples: list[dict[str, Any]] = []
    lines: list[int] = []
    kind: str | None = None
    kind_from = ""  # where the kind was decided, for the mixed-kinds message
    for number, data in _numbered_lines(raw, path):
        obj = _parse_line(data, path, number)
        if set(obj) == {"task"}:
            if examples or header_line:
                raise InputFileError(f"{path}:{number}: a {{\"task\": ...}} header may only be the first line")
            header, header_line = _check_header(obj["task"], path, number), number
            if "kind" in header:
                kind, kind_from = header["kind"], f"the header (line {number}) says"
            continue
        line_kind = _example_kind(obj, path, number)
        if kind is None:
            kind, kind_from = line_kind, f"line {number} makes it"
        elif line_kind != kind:
            raise InputFileError(f"{path}:{number}: a {line_kind} example, but {kind_from} a {kind} task; "
                                 "one file holds one kind")
        _check_example(obj, kind, path, number)
        examples.append(obj)
        lines.append(number)
    if not examples:
        raise InputFileError(f"{path}: no examples (a task file has one JSON object per line)")
    assert kind is not None
    misplaced = [key for key in header if key not in _COMMON_OPTIONS and key not in _KIND_OPTIONS[kind]]
    if misplaced:
        raise InputFileError(f"{path}:{header_line}: header option {misplaced[0]!r} is for "
                             f"{_kind_of_option(misplaced[0])} tasks, and this is a {kind} task")
    settings = {"name": path.stem, "kind": kind, "description": "", **DEFAULTS[kind], **header}
    if kind == "classification":
        settings = _classification_settings(settings, examples, lines, path)
    if kind == "multiple_choice" and not settings["delimiter"]:
        _check_choices_nonempty_alone(examples, lines, path)
    _check_unique_ids(examples, lines, path)
    return Task(name=settings["name"], kind=kind, settings=settings, examples=examples, source=path, lines=lines)


# ---- lines ---------------------------------------------------------------------------------
def _numbered_lines(raw: bytes, path: Path):
    """(line number, text) of non-blank lines. Splits on "\\n" only: JSON strings may hold
    U+2028 and other characters that str.splitlines would treat as line ends."""
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM from Windows editors
        raw = raw[3:]
    for number, data in enumerate(raw.split(b"\n"), start=1):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputFileError(f"{path}:{number}: not UTF-8 (byte {exc.start + 1} of the line)") from None
        if text.strip():
            yield number, text


def _parse_line(text: str, path: Path, number: int) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise InputFileError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise InputFileError(f"{path}:{number}: expected a JSON object {{...}}, got {_json_type(obj)}")
    return obj


def _json_type(value: Any) -> str:
    names = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


# ---- examples ------------------------------------------------------------------------------
def _example_kind(obj: dict[str, Any], path: Path, number: int) -> str:
    kinds = {_KIND_OF_FIELD[key] for key in obj if key in _KIND_OF_FIELD}
    if len(kinds) == 1:
        return kinds.pop()
    if kinds:
        fields = ", ".join(sorted(key for key in obj if key in _KIND_OF_FIELD))
        raise InputFileError(f"{path}:{number}: fields of different kinds ({fields}); "
                             "use context+choices+label, prompt+answer(s), or text+label")
    unknown = [key for key in obj if key not in {"label", "id", "meta"}]
    hint = f" (unknown field {unknown[0]!r}{_did_you_mean(unknown[0], _KIND_OF_FIELD)})" if unknown else ""
    raise InputFileError(f"{path}:{number}: cannot tell the kind of example{hint}; a multiple_choice example has "
                         "context+choices+label, a generation one prompt+answer (or answers), a classification one text+label")


def _check_example(obj: dict[str, Any], kind: str, path: Path, number: int) -> None:
    where = f"{path}:{number}"
    for key in obj:
        if key not in _FIELDS[kind]:
            raise InputFileError(f"{where}: unknown field {key!r} for a {kind} example{_did_you_mean(key, _FIELDS[kind])}")
    for key in _REQUIRED[kind]:
        if key not in obj:
            raise InputFileError(f"{where}: missing field {key!r} (a {kind} example has {', '.join(_REQUIRED[kind])})")
    if "id" in obj and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int))):
        raise InputFileError(f"{where}: \"id\" must be a string or an integer, not {_json_type(obj['id'])}")
    if kind == "multiple_choice":
        _expect_str(obj, "context", where)
        choices = obj["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise InputFileError(f"{where}: \"choices\" must be a list of at least 2 strings")
        for n, choice in enumerate(choices):
            if not isinstance(choice, str):
                raise InputFileError(f"{where}: choice {n} must be a string, not {_json_type(choice)}")
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            raise InputFileError(f"{where}: \"label\" must be the index of the right choice (an integer), not {_json_type(label)}")
        if not 0 <= label < len(choices):
            raise InputFileError(f"{where}: \"label\" {label} is out of range for {len(choices)} choices (0 to {len(choices) - 1})")
    elif kind == "generation":
        _expect_str(obj, "prompt", where, nonempty=True)
        if ("answer" in obj) == ("answers" in obj):
            raise InputFileError(f"{where}: give exactly one of \"answer\" (a string) or \"answers\" (a list of strings)")
        if "answer" in obj:
            _expect_str(obj, "answer", where)
        else:
            answers = obj["answers"]
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise InputFileError(f"{where}: \"answers\" must be a non-empty list of strings")
    else:
        _expect_str(obj, "text", where)
        _expect_str(obj, "label", where, nonempty=True)


def _expect_str(obj: dict[str, Any], key: str, where: str, nonempty: bool = False) -> None:
    value = obj[key]
    if not isinstance(value, str):
        raise InputFileError(f"{where}: \"{key}\" must be a string, not {_json_type(value)}")
    if nonempty and not value:
        raise InputFileError(f"{where}: \"{key}\" is empty")


def _check_choices_nonempty_alone(examples: list[dict], lines: list[int], path: Path) -> None:
    """With an empty delimiter an empty choice would be an empty continuation: nothing to score."""
    for example, number in zip(examples, lines):
        if "" in example["choices"]:
            raise InputFileError(f"{path}:{number}: choice {example['choices'].index('')} is empty, and the "
                                 "delimiter is \"\", so there is nothing to score")


def _check_unique_ids(examples: list[dict], lines: list[int], path: Path) -> None:
    seen: dict[Any, int] = {}
    for example, number in zip(examples, lines):
        if "id" in example:
            key = example["id"]
            if key in seen:
                raise InputFileError(f"{path}:{number}: id {key!r} was already used on line {seen[key]}")
            seen[key] = number


# ---- header --------------------------------------------------------------------------------
def _kind_of_option(key: str) -> str:
    return next(kind for kind, keys in _KIND_OPTIONS.items() if key in keys)


def _check_header(header: Any, path: Path, number: int) -> dict[str, Any]:
    where = f"{path}:{number}"
    if not isinstance(header, dict):
        raise InputFileError(f"{where}: \"task\" must be an object of settings, not {_json_type(header)}")
    valid = set(_COMMON_OPTIONS).union(*_KIND_OPTIONS.values())
    for key in header:
        if key not in valid:
            raise InputFileError(f"{where}: unknown header option {key!r}{_did_you_mean(key, valid)} "
                                 f"(options: {', '.join(sorted(valid))})")
    for key in ("name", "description", "source", "delimiter", "template"):
        if key in header and not isinstance(header[key], str):
            raise InputFileError(f"{where}: header option \"{key}\" must be a string, not {_json_type(header[key])}")
    if "name" in header and not header["name"].strip():
        raise InputFileError(f"{where}: header option \"name\" is empty")
    if "kind" in header and header["kind"] not in KINDS:
        raise InputFileError(f"{where}: unknown kind {header['kind']!r}{_did_you_mean(str(header['kind']), KINDS)} "
                             f"(kinds: {', '.join(KINDS)})")
    if "max_new_tokens" in header:
        value = header["max_new_tokens"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputFileError(f"{where}: \"max_new_tokens\" must be a positive integer, not {value!r}")
    if "stop" in header:
        stop = header["stop"]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise InputFileError(f"{where}: \"stop\" must be a list of non-empty strings (may be empty: [])")
    if "metrics" in header:
        metrics = header["metrics"]
        if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
            raise InputFileError(f"{where}: \"metrics\" must be a non-empty list of names from {', '.join(GENERATION_METRICS)}")
        for name in metrics:
            if name not in GENERATION_METRICS:
                raise InputFileError(f"{where}: unknown metric {name!r}{_did_you_mean(name, GENERATION_METRICS)} "
                                     f"(metrics: {', '.join(GENERATION_METRICS)})")
    if "labels" in header:
        labels = header["labels"]
        if (not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels)
                or len(set(labels)) != len(labels)):
            raise InputFileError(f"{where}: \"labels\" must be a list of at least 2 distinct non-empty strings")
    if "template" in header:
        _check_template(header["template"], where)
    return dict(header)


def _check_template(template: str, where: str) -> None:
    """A template is formatted with str.format(text=...): "{text}" must be in it and be the only
    field (write literal braces as {{ and }})."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise InputFileError(f"{where}: \"template\" is not a valid format string ({exc}); write literal braces as {{{{ }}}}") from None
    others = [name for name in fields if name != "text"]
    if others:
        raise InputFileError(f"{where}: \"template\" has field {{{others[0]}}}; the only field is {{text}}")
    if "text" not in fields:
        raise InputFileError(f"{where}: \"template\" must contain {{text}}, where each example's text goes")


def _classification_settings(settings: dict, examples: list[dict], lines: list[int], path: Path) -> dict:
    if "labels" in settings:
        labels = settings["labels"]
        for example, number in zip(examples, lines):
            if example["label"] not in labels:
                raise InputFileError(f"{path}:{number}: label {example['label']!r} is not one of the header's labels "
                                     f"{labels!r}{_did_you_mean(example['label'], labels)}")
        return settings
    labels = sorted({example["label"] for example in examples})
    if len(labels) < 2:
        raise InputFileError(f"{path}: every example has the label {labels[0]!r}; a classification needs at least 2 "
                             "labels (list them in the header: {\"task\": {\"labels\": [...]}})")
    return {**settings, "labels": labels}


def format_classification_prompt(task: Task, example: dict[str, Any]) -> str:
    return task.settings["template"].format(text=example["text"])
