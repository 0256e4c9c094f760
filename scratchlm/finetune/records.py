"""Reading fine-tuning records: JSONL files line by line, messages checked the same way for
instruction data (`sft_data`) and preference data (`dpo`), and one report of what was kept and
what was rejected, by line number.

A bad line never stops loading: a data set of thousands of scraped records nearly always has a
few broken ones, and refusing the whole file would push users to delete lines blindly. Each is
listed with its line number and reason instead, so the data can be fixed rather than trained on
as a silent subset; only a file with nothing usable in it is an error.
"""

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from scratchlm.errors import InputFileError
from scratchlm.tokenizer.chat_template import ROLES

Message = dict[str, str]

# The chat templates' role names, each as itself; ShareGPT's speaker names mapped onto them.
MESSAGE_ROLES: dict[str, str] = {role: role for role in ROLES}
SHAREGPT_ROLES: dict[str, str] = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(ValueError):
    """A record that cannot be used; its message is the reason the report lists for its line."""


class RejectedLine(NamedTuple):
    """A line that was not used and why. A tuple, so `(3, "missing field 'output'")` compares
    equal to it."""

    line: int
    reason: str


def counted(n: int, noun: str) -> str:
    """'1 malformed line', '2 malformed lines'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass
class RecordReport:
    """What a loader did with each line of a file. `kept` and `rejected` hold line numbers;
    `superseded` and `without_pair` are for the web chat page's feedback file (an earlier record
    of a reply that a later one replaces; a rating with no edited answer) and stay empty for
    other files. `kind` names what a kept line is ("conversations", "pairs") for messages."""

    path: str
    kind: str = "records"
    kept: list[int] = field(default_factory=list)
    rejected: list[RejectedLine] = field(default_factory=list)
    superseded: list[int] = field(default_factory=list)
    without_pair: list[int] = field(default_factory=list)

    def reject(self, line: int, reason: str) -> None:
        self.rejected.append(RejectedLine(line, reason))

    def _details(self, limit: int) -> str:
        text = counted(len(self.rejected), "malformed line")
        if self.without_pair:
            text += f", {counted(len(self.without_pair), 'feedback record')} without an edited answer"
        if self.superseded:
            text += f", {counted(len(self.superseded), 'feedback record')} replaced by a later one"
        if self.rejected:
            shown = "; ".join(f"{self.path}:{r.line}: {r.reason}" for r in self.rejected[:limit])
            more = f"; ... {len(self.rejected) - limit} more" if len(self.rejected) > limit else ""
            text += f" ({shown}{more})"
        return text

    def summary(self, limit: int = 3) -> str:
        """One line for a log or the CLI: the counts, and the first rejections as file:line: reason."""
        return f"{self.path}: {len(self.kept)} {self.kind} kept, {self._details(limit)}"

    def require_some(self) -> None:
        """InputFileError when nothing was kept: training on an empty set would only fail later,
        further from the cause."""
        if not self.kept:
            raise InputFileError(f"{self.path}: no usable {self.kind}: {self._details(limit=1)}")


def read_jsonl(path: str | Path, report: RecordReport) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each JSON object line of a file, numbered from 1. Blank lines
    are skipped; a line that is not UTF-8, not JSON or not an object is put in `report.rejected`.
    A file that cannot be read raises InputFileError at once, not at the first `next()`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a folder; give a JSONL file, one record a line") from None
    except OSError as error:
        raise InputFileError(f"{path}: cannot read ({error.strerror or error})") from None
    return _objects(data, report)


def _objects(data: bytes, report: RecordReport) -> Iterator[tuple[int, dict]]:
    # Split on b"\n" rather than decoding the whole file, so one bad byte costs one line.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            report.reject(number, "not UTF-8 text")
            continue
        except json.JSONDecodeError as error:
            report.reject(number, f"not JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(record, dict):
            report.reject(number, f"not a JSON object (a {type(record).__name__})")
            continue
        yield number, record


def text_field(record: Mapping, key: str, required: bool = True) -> str:
    """`record[key]` as a string; "" for an absent optional field."""
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise RecordError(f"missing field {key!r}")
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} is {type(value).__name__}, not text")
    return value


def parse_messages(
    items: object, key: str, roles: Mapping[str, str] = MESSAGE_ROLES, role_key: str = "role", content_key: str = "content"
) -> list[Message]:
    """`items` (the value of field `key`) as messages {"role", "content"}: a non-empty list of
    objects whose `role_key` is one of `roles` (mapped to the template's role name: ShareGPT's
    "from"/"value" with SHAREGPT_ROLES) and whose `content_key` is text. Only shape is checked
    here; `check_conversation` checks what a conversation must say."""
    if not isinstance(items, list) or not items:
        raise RecordError(f"field {key!r} is not a non-empty list of messages")
    messages = []
    for n, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise RecordError(f"{key}[{n}] is not an object with {role_key!r} and {content_key!r}")
        role = item.get(role_key)
        if role not in roles:
            raise RecordError(f"{key}[{n}] has role {role!r}; expected one of {', '.join(sorted(roles))}")
        content = item.get(content_key)
        if not isinstance(content, str):
            raise RecordError(f"{key}[{n}] has no text {content_key!r}")
        messages.append({"role": roles[role], "content": content})
    return messages


def check_conversation(messages: Sequence[Message]) -> None:
    """The rules a conversation must follow to train on, for SFT and for each answer of a DPO
    pair (its prompt plus that answer): it ends with an assistant message (there is an answer to
    learn), a user message comes before the first assistant message (every answer answers
    something), and no user or assistant message is blank. A blank system message is allowed:
    "no instructions" is a legitimate system prompt."""
    if not messages:
        raise RecordError("no messages")
    if messages[-1]["role"] != "assistant":
        raise RecordError(f"last message is from the {messages[-1]['role']}, not the assistant: nothing to learn")
    for n, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise RecordError(f"empty answer (message {n})")
        if message["role"] == "user" and not message["content"].strip():
            raise RecordError(f"empty user message (message {n})")
    first_answer = next(n for n, m in enumerate(messages) if m["role"] == "assistant")
    if not any(m["role"] == "user" for m in messages[:first_answer]):
        raise RecordError("the assistant speaks before any user message")
