"""The document stages as plain functions over batches: extract, normalise, filter, redact.

`clean_batch` takes the records of one chunk and returns the surviving documents, one ledger
entry per rejected record, and counters. It holds no state between calls, so any executor can
run it: the process pool of `prepare`, or a distributed engine (Ray Data's `map_batches`,
Spark's `mapPartitions`, Dask's `map_partitions`) calling it on its own partitions, followed by
the same global deduplication and tokenization.
"""

import time
from collections import Counter
from dataclasses import dataclass, field

from scratchlm.data.filters import FilterConfig, QualityFilter
from scratchlm.data.normalize import NormalizeConfig, normalize_text
from scratchlm.data.pii import PIIConfig, redact_pii
from scratchlm.data.sources import Document, ReadFailure

STAGES = ("read", "extract", "normalize", "filter", "pii", "exact_dedup", "near_dedup")
EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 240


@dataclass(frozen=True)
class CleaningConfig:
    normalize: NormalizeConfig = NormalizeConfig()
    filters: FilterConfig = FilterConfig()
    pii: PIIConfig = PIIConfig()


@dataclass
class StageCounts:
    """Documents and bytes that went into each stage, per source, and where they went."""

    entered: Counter = field(default_factory=Counter)  # (stage, source) -> documents
    entered_bytes: Counter = field(default_factory=Counter)  # (stage, source) -> UTF-8 bytes
    rejected: Counter = field(default_factory=Counter)  # (source, reason) -> documents
    rejected_bytes: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict]] = field(default_factory=dict)  # reason -> a few examples
    pii: Counter = field(default_factory=Counter)  # kind -> replacements
    seconds: Counter = field(default_factory=Counter)  # stage -> seconds spent

    def enter(self, stage: str, source: str, nbytes: int) -> None:
        self.entered[stage, source] += 1
        self.entered_bytes[stage, source] += nbytes

    def reject(self, source: str, reason: str, nbytes: int, doc_id: str, example: str) -> None:
        self.rejected[source, reason] += 1
        self.rejected_bytes[source, reason] += nbytes
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append({"id": doc_id, "text": example[:EXAMPLE_CHARS]})

    def to_json(self) -> dict:
        return {
            "entered": [[stage, source, n, self.entered_bytes[stage, source]] for (stage, source), n in self.entered.items()],
            "rejected": [[source, reason, n, self.rejected_bytes[source, reason]] for (source, reason), n in self.rejected.items()],
            "examples": self.examples,
            "pii": dict(self.pii),
            "seconds": dict(self.seconds),
        }

    @classmethod
    def from_json(cls, data: dict) -> "StageCounts":
        counts = cls()
        counts.merge_json(data)
        return counts

    def merge_json(self, data: dict) -> None:
        for stage, source, n, nbytes in data["entered"]:
            self.entered[stage, source] += n
            self.entered_bytes[stage, source] += nbytes
        for source, reason, n, nbytes in data["rejected"]:
            self.rejected[source, reason] += n
            self.rejected_bytes[source, reason] += nbytes
        for reason, shown in data["examples"].items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[: EXAMPLES_PER_REASON - len(mine)])
        self.pii.update(data["pii"])
        self.seconds.update(data["seconds"])


@dataclass
class Cleaner:
    """The configured stages, built once per worker process."""

    config: CleaningConfig
    quality: QualityFilter = field(init=False)

    def __post_init__(self) -> None:
        self.quality = QualityFilter(self.config.filters)


def extract_main_text(html: str) -> str:
    """The main text of a web page (article body, without navigation, ads and footers), by
    trafilatura: the extractor FineWeb chose after comparing several."""
    import trafilatura

    return trafilatura.extract(html, favor_precision=True, include_comments=False, include_tables=False, deduplicate=False) or ""


def clean_batch(records: list[Document | ReadFailure], cleaner: Cleaner, counts: StageCounts) -> tuple[list[Document], list[dict]]:
    """Run the per-document stages on one batch. Returns the survivors (text replaced by its
    cleaned form) and a ledger entry for every record that was rejected."""
    survivors: list[Document] = []
    ledger: list[dict] = []

    def reject(doc_id: str, source: str, stage: str, reason: str, text: str, nbytes: int, detail: str = "") -> None:
        counts.reject(source, reason, nbytes, doc_id, detail or text)
        entry = {"id": doc_id, "source": source, "status": "rejected", "stage": stage, "reason": reason}
        if detail:
            entry["detail"] = detail
        ledger.append(entry)

    for record in records:
        if isinstance(record, ReadFailure):
            counts.enter("read", record.source, record.nbytes)
            reject(record.id, record.source, "read", f"read:{record.issue}", "", record.nbytes, record.detail)
            continue
        doc, text = record, record.text
        nbytes = len(text.encode("utf-8", "surrogatepass"))
        counts.enter("read", doc.source, nbytes)
        if doc.html:
            start = time.perf_counter()
            counts.enter("extract", doc.source, nbytes)
            text = extract_main_text(text)
            counts.seconds["extract"] += time.perf_counter() - start
            if not text.strip():
                reject(doc.id, doc.source, "extract", "extract:no_main_text", doc.text, nbytes)
                continue
            nbytes = len(text.encode("utf-8", "surrogatepass"))
        start = time.perf_counter()
        counts.enter("normalize", doc.source, nbytes)
        text = normalize_text(text, cleaner.config.normalize)
        counts.seconds["normalize"] += time.perf_counter() - start
        if not text.strip():
            reject(doc.id, doc.source, "normalize", "normalize:empty", doc.text, nbytes)
            continue
        nbytes = len(text.encode("utf-8"))
        start = time.perf_counter()
        counts.enter("filter", doc.source, nbytes)
        text, reason = cleaner.quality(text, url=doc.url)
        counts.seconds["filter"] += time.perf_counter() - start
        if reason:
            reject(doc.id, doc.source, "filter", reason, text, nbytes)
            continue
        nbytes = len(text.encode("utf-8"))
        start = time.perf_counter()
        counts.enter("pii", doc.source, nbytes)
        text, found = redact_pii(text, cleaner.config.pii)
        counts.pii.update(found)
        counts.seconds["pii"] += time.perf_counter() - start
        survivors.append(Document(doc.id, doc.source, text, url=doc.url))
    return survivors, ledger
