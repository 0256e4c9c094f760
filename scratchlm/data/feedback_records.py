"""Feedback records (the web chat page's feedback.jsonl, review files): the rule every reader
shares. The page appends a new record each time a reply is rated or edited, so a reply's last
record is its current state and replaces the earlier ones. Serving writes these records and
fine-tuning reads them; the rule lives here, below both."""

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

Record = TypeVar("Record")


def reply_key(reply_id: object, record_id: object, where: str) -> str:
    """Which reply a record is about: its `reply_id`, else its own `id` (a record that stands
    alone), else `where` it was read (a file and line), so that such a record never merges."""
    return str(reply_id or record_id or where)


def latest_per_reply(records: Iterable[Record], key: Callable[[Record], Hashable]) -> tuple[list[Record], list[Record]]:
    """(the last record of each reply, in the order replies first appear; the records they
    replaced, in reading order)."""
    latest: dict[Hashable, Record] = {}
    replaced: list[Record] = []
    for record in records:
        k = key(record)
        if k in latest:
            replaced.append(latest[k])
        latest[k] = record
    return list(latest.values()), replaced
