"""Reading documents out of the sources a pipeline config names.

A source is a set of files (paths, folders or glob patterns) in one format, or a Hugging Face
dataset. Reading streams: one document at a time, whatever the size of a file. Every record
the reader meets comes out as a `Document` or, when it cannot become one (malformed JSON on a
line, a missing field, a binary or empty file, a record over `max_document_bytes`), as a `ReadFailure` that says where and why, so
the pipeline's accounting covers bad input too. Document ids are `file` (a whole file),
`file:line` or `file:rowN`, or the record's own id field: stable across runs, so the ledger and
the report can name them; the source's name travels beside the id.

Formats (chosen by extension with `format = "auto"`):
- text (`.txt`, `.md`, anything unknown): one document per file, or per paragraph or line (then
  read line by line, so the file's size does not matter);
- jsonl (`.jsonl`, `.ndjson`, `.json` with one object per line): the `text_field` of each line;
- csv (`.csv`, `.tsv`): the `text_field` column;
- parquet (`.parquet`): the `text_field` column, read in record batches;
- html (`.html`, `.htm`): the main text, extracted later (in the worker processes) by trafilatura;
- hf: a `datasets.save_to_disk` folder, or a hub name where the machine is online.
A `.gz`, `.bz2` or `.xz` suffix on a text, jsonl, csv or html file is decompressed while reading.
"""

import bz2
import csv
import fnmatch
import glob
import gzip
import json
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Literal

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.text.reading import decode_text, expand_inputs
from scratchlm.units import parse_bytes

Format = Literal["auto", "text", "jsonl", "csv", "parquet", "html", "hf"]
_EXTENSIONS = {
    ".txt": "text", ".md": "text", ".rst": "text",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet",
    ".html": "html", ".htm": "html", ".xhtml": "html",
}  # fmt: skip
BINARY_PROBE_BYTES = 8192
# What reading a file can raise: a truncated or corrupt compressed file among them.
_READ_ERRORS = (OSError, EOFError, ValueError, lzma.LZMAError)


@dataclass(frozen=True)
class SourceConfig:
    """One input source of a pipeline. `weight` is its share of the training mixture (by bytes);
    leave it out on every source to keep the sources' natural proportions. `license`, `url` and
    `notes` say where the data came from and on what terms: they are copied into the shard
    manifest, `stats.json` and the report, for a model card to cite."""

    name: str
    paths: list[str] = field(default_factory=list)
    dataset: str | None = None  # Hugging Face: a save_to_disk folder or a hub name
    format: Format = "auto"
    text_field: str = "text"
    id_field: str | None = None
    text_unit: Literal["file", "paragraph", "line"] = "file"  # for text files
    html: bool = False  # the text field holds HTML (jsonl, csv, parquet, hf): extract the main text
    # A document over this is rejected (read:too_large) after reading at most this much of it:
    # one runaway record (a file with no line breaks, a gzip bomb) cannot exhaust memory.
    max_document_bytes: str = "8MB"
    weight: float | None = None
    split: str = "train"  # which split of a dataset with several
    streaming: bool = False  # hub datasets: stream instead of downloading whole
    url_field: str | None = None  # jsonl, csv, parquet, hf: each record's page URL (blocklist, domains)
    license: str | None = None  # e.g. "CC-BY-4.0" (an SPDX identifier where there is one)
    url: str | None = None  # where the data set is published
    notes: str | None = None  # anything a reader of the model card should know

    def __post_init__(self) -> None:
        where = f"source {self.name!r}"
        if not self.name or "/" in self.name:
            raise ConfigError(f"{where}: name must be non-empty and contain no '/'")
        if bool(self.paths) == bool(self.dataset):
            raise ConfigError(f"{where}: give either paths or dataset")
        if isinstance(self.paths, str) or not all(isinstance(p, str) for p in self.paths):
            raise ConfigError(f"{where}: paths must be a list of strings")
        if self.dataset and self.format not in ("auto", "hf"):
            raise ConfigError(f"{where}: a dataset source has format hf, not {self.format!r}")
        if self.paths and self.format == "hf":
            raise ConfigError(f"{where}: format hf reads a Hugging Face dataset: give dataset = FOLDER or NAME, not paths")
        if self.weight is not None and not self.weight > 0:
            raise ConfigError(f"{where}: weight must be positive, not {self.weight}")
        try:
            limit = parse_bytes(self.max_document_bytes)
        except ConfigError as exc:
            raise ConfigError(f"{where}: max_document_bytes: {exc}") from None
        if limit < 1:
            raise ConfigError(f"{where}: max_document_bytes must be positive, not {self.max_document_bytes!r}")

    @cached_property  # asked once per record
    def document_limit(self) -> int:
        """`max_document_bytes` in bytes."""
        return parse_bytes(self.max_document_bytes)


@dataclass
class Document:
    id: str
    source: str
    text: str
    html: bool = False  # text is raw HTML, to be extracted
    url: str | None = None  # the page the text came from, where the source names it (url_field)


@dataclass
class ReadFailure:
    """A record that could not become a document. It counts as an input, rejected at stage
    `read`; `issue` is the kind, `detail` says where."""

    id: str
    source: str
    issue: str
    detail: str
    nbytes: int = 0


@dataclass
class ReadIssue:
    """Something wrong with an input that did not cost a document (undecodable bytes replaced
    with U+FFFD). Reported; fatal under --strict."""

    source: str
    where: str
    issue: str
    detail: str


Record = Document | ReadFailure | ReadIssue


def source_provenance(config: SourceConfig) -> dict:
    """What a model card cites about a source: the `sources` entries of the shard manifest."""
    return {"name": config.name, "license": config.license, "url": config.url, "notes": config.notes, "weight": config.weight}


def source_files(config: SourceConfig) -> list[Path]:
    """The files of a file source, in a fixed order; glob patterns are expanded."""
    found: list[Path] = []
    for pattern in config.paths:
        if glob.has_magic(pattern):
            matches = sorted(m for m in _glob_files(pattern) if Path(m).is_file())
            if not matches:
                raise InputFileError(f"source {config.name!r}: pattern {pattern!r} matches no files")
            found.extend(expand_inputs(matches))
        else:
            found.extend(expand_inputs([pattern]))
    # A file named twice (a folder and a file in it, overlapping patterns) is read once.
    seen: set[Path] = set()
    return [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]


def _glob_files(pattern: str) -> list[str]:
    """What `glob.glob(pattern, recursive=True)` finds, except that `**` enters each real folder
    once. Python's `**` follows links to folders without end: a link to a parent folder makes it
    list paths until the OS refuses them, and two such links make that exponential."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)  # no `**`: each part goes one folder down, so it ends
    first_magic = next(n for n, part in enumerate(parts) if glob.has_magic(part))
    prefix = os.sep.join(parts[:first_magic]) or (os.sep if pattern.startswith(os.sep) else "")
    rest = tuple(part for part in parts[first_magic:] if part)
    root = prefix or os.curdir
    found = []
    for folder, files in _walk_each_folder_once(root, hidden=any(part.startswith(".") for part in rest)):
        inside = os.path.relpath(folder, root).split(os.sep)
        inside = [] if inside == [os.curdir] else inside
        found.extend(os.path.join(prefix, *inside, name) for name in files if _glob_matches((*inside, name), rest))
    return found


def _walk_each_folder_once(root: str, hidden: bool) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) under `root`, following links to folders but entering each real
    folder (device and inode) once, so a link loop ends; folders in sorted order, so which of two
    paths to a file comes first does not depend on the file system."""
    entered: set[tuple[int, int]] = set()
    for folder, folders, files in os.walk(root, followlinks=True):
        try:
            info = os.stat(folder)
        except OSError:  # gone or unreadable since it was listed: glob skips such folders too
            continue
        if (info.st_dev, info.st_ino) in entered:
            folders.clear()
            continue
        entered.add((info.st_dev, info.st_ino))
        folders[:] = sorted(f for f in folders if hidden or not f.startswith("."))
        yield folder, files


def _glob_matches(names: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether path components `names` match pattern components `parts` as glob does: `**` is
    any number of folders, and a wildcard matches no hidden name (one starting with a dot)."""
    if not parts:
        return not names
    if parts[0] == "**" and len(parts) == 1:  # a final `**` is what lies inside a folder, not the folder
        return bool(names) and not any(name.startswith(".") for name in names)
    if parts[0] == "**":
        return _glob_matches(names, parts[1:]) or (bool(names) and not names[0].startswith(".") and _glob_matches(names[1:], parts))
    if not names or (names[0].startswith(".") and glob.has_magic(parts[0]) and not parts[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(names[0], parts[0]) and _glob_matches(names[1:], parts[1:])


def file_format(path: Path, config: SourceConfig) -> str:
    if config.format != "auto":
        return config.format
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".lzma"):
        suffixes = suffixes[:-1]
    return _EXTENSIONS.get(suffixes[-1] if suffixes else "", "text")


def read_source(config: SourceConfig) -> Iterator[Record]:
    if config.dataset:
        yield from _read_dataset(config)
        return
    for path in source_files(config):
        yield from read_file(path, config)


def read_file(path: Path, config: SourceConfig) -> Iterator[Record]:
    fmt = file_format(path, config)
    doc_id = str(path)
    if fmt == "parquet":
        yield from _read_parquet(path, config)
        return
    try:
        with _open(path) as handle:
            probe = handle.read(BINARY_PROBE_BYTES)
        if not probe.strip() and not _has_text_after(path, len(probe)):
            yield ReadFailure(doc_id, config.name, "empty_file", f"{path}: empty file", path.stat().st_size)
            return
    except _READ_ERRORS as exc:
        yield ReadFailure(doc_id, config.name, "unreadable_file", f"{path}: cannot read ({exc})")
        return
    if b"\x00" in probe:
        hint = "; UTF-16 text and zstd/zip archives are not supported, convert or decompress them first"
        yield ReadFailure(doc_id, config.name, "binary_file", f"{path}: binary data (NUL bytes){hint}", path.stat().st_size)
        return
    line = 0
    try:
        with _open(path) as handle:
            if fmt in ("jsonl", "csv"):
                # Line by line: a many-gigabyte JSONL file never sits in memory whole.
                for record in (_read_jsonl if fmt == "jsonl" else _read_csv)(path, handle, config):
                    line = _line_of(record, line)
                    yield record
                return
            if fmt == "text" and config.text_unit != "file":
                yield from _read_text_units(path, handle, config)
                return
            # One more byte than the limit tells an over-long file, and a gzip bomb stops there.
            raw = handle.read(config.document_limit + 1)
    except _READ_ERRORS as exc:
        # A truncated or corrupt compressed file: what was read before stays, the rest is lost.
        where = f"{path}:{line + 1}" if line else str(path)
        yield ReadFailure(where, config.name, "unreadable_file", f"{where}: cannot read on from here ({exc})")
        return
    if len(raw) > config.document_limit:
        hint = '; text_unit = "paragraph" or "line" reads it in pieces' if fmt == "text" else ""
        yield _too_large(config, doc_id, f"more than {config.document_limit:,} bytes (a {fmt} file is read whole{hint})", len(raw))
        return
    text, bad = decode_text(raw)
    if bad:
        line = raw[: _first_bad_byte(raw)].count(b"\n") + 1
        yield _undecodable(config, path, bad, line)
    yield Document(doc_id, config.name, text, html=fmt == "html")


def _undecodable(config: SourceConfig, path: Path, bad: int, line: int) -> ReadIssue:
    """The one report of a text file's undecodable bytes: how many, and the line of the first
    (counting line feeds only, as it always has)."""
    return ReadIssue(config.name, f"{path}:{line}", "undecodable_bytes", f"{bad} undecodable bytes replaced with U+FFFD (first on line {line})")


def _too_large(config: SourceConfig, where: str, what: str, nbytes: int) -> ReadFailure:
    return ReadFailure(where, config.name, "too_large", f"{where}: {what}, over max_document_bytes = {config.max_document_bytes}", nbytes)


def _lines_within(handle: BinaryIO, limit: int) -> Iterator[bytes | int]:
    """The lines of `handle` with their line breaks; a line of more than `limit` bytes comes out
    as its length instead. That line is skipped in pieces of at most `limit` + 1 bytes, never
    held whole, so a file without line breaks (or a gzip bomb) costs no more memory than that."""
    while line := handle.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n") and (line := handle.readline(limit + 1)):
            size += len(line)
        yield size


def _line_of(record: Record, previous: int) -> int:
    where = record.where if isinstance(record, ReadIssue) else record.id
    tail = where.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else previous


def _open(path: Path) -> BinaryIO:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix in (".xz", ".lzma"):
        return lzma.open(path, "rb")
    return path.open("rb")


def _has_text_after(path: Path, offset: int) -> bool:
    """Whether a file whose first block is blank holds anything else (a file of 8 KiB of
    spaces followed by text is not empty)."""
    with _open(path) as handle:
        handle.seek(offset)
        while block := handle.read(1 << 20):
            if block.strip():
                return True
    return False


def _first_bad_byte(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return len(raw)


def _read_text_units(path: Path, handle: BinaryIO, config: SourceConfig) -> Iterator[Record]:
    """The paragraphs (split at blank lines) or lines of a text file, read line by line, so that
    `max_document_bytes` applies to each of them, not to the file: a book collection or a
    Wikipedia dump of gigabytes is read holding one paragraph at a time. The documents and ids
    are those of splitting the whole text at "\\n\\n" (or "\\n") after turning "\\r\\n" and "\\r"
    into "\\n": `file:N`, N the unit's first line. A unit over the limit is rejected with its
    first line, and its text is not held past the limit; reading goes on after it."""
    limit = config.document_limit
    by_paragraph = config.text_unit == "paragraph"
    bad = first_bad = 0
    number = 0  # lines so far, a lone "\r" counted as a line break
    start, part, size = 1, [], 0  # the paragraph being gathered: first line, lines (None once over the limit), bytes
    failure = None
    try:
        for physical, raw in enumerate(_lines_within(handle, limit), 1):
            if isinstance(raw, int):
                lines = [(None, raw)]  # over the limit on its own: skipped, never held
            else:
                try:
                    text = raw.decode("utf-8")  # the usual case, and twice as fast as decode_text
                except UnicodeDecodeError:
                    text, replaced = decode_text(raw)  # a "\n" ends every bad sequence: as if decoded whole
                    bad, first_bad = bad + replaced, first_bad or physical
                lines = _break_lines(text, len(raw))
            for line, nbytes in lines:
                number += 1
                if not by_paragraph:
                    if line is None:
                        yield _too_large(config, f"{path}:{number}", f"a line of {nbytes:,} bytes", nbytes)
                    elif line.strip():
                        yield Document(f"{path}:{number}", config.name, line.removesuffix("\n"))
                elif line == "\n" and part != []:  # a blank line after a paragraph's first line ends it
                    yield from _paragraph(path, config, start, part, size, ended=True)
                    start, part, size = number + 1, [], 0
                else:
                    size += nbytes
                    if line is None or size > limit:
                        part = None  # over the limit: its bytes are counted on, its text no longer held
                    elif part is not None:
                        part.append(line)
    except _READ_ERRORS as exc:  # a truncated compressed file: what was read before stays
        where = f"{path}:{start if by_paragraph else number + 1}"
        failure = ReadFailure(where, config.name, "unreadable_file", f"{where}: cannot read on from here ({exc})")
    if by_paragraph and not failure:
        yield from _paragraph(path, config, start, part, size, ended=False)
    if bad:
        yield _undecodable(config, path, bad, first_bad)
    if failure:
        yield failure


def _break_lines(text: str, nbytes: int) -> list[tuple[str, int]]:
    """A line read up to "\\n" as the lines it holds once "\\r\\n" and a lone "\\r" break lines
    too, each ending in "\\n" (but a file's last) and with its size in bytes."""
    if "\r" not in text:
        return [(text, nbytes)]
    pieces = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = [piece + "\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    return [(line, len(line.encode())) for line in lines]


def _paragraph(path: Path, config: SourceConfig, start: int, part: list[str] | None, size: int, ended: bool) -> Iterator[Record]:
    """The document of a gathered paragraph, if it holds more than white space; `ended`: by a
    blank line, whose "\\n\\n" takes the last line's break."""
    where = f"{path}:{start}"
    if part is None:
        yield _too_large(config, where, f"a paragraph of {size:,} bytes", size)
        return
    text = "".join(part)
    text = text[:-1] if ended else text
    if text.strip():
        yield Document(where, config.name, text)


def _field_text(record: object, config: SourceConfig) -> tuple[str | None, str | None, str]:
    """(text, id, problem): the text field of a parsed record, or what is wrong with it."""
    if not isinstance(record, dict):
        return None, None, "not_an_object"
    if config.text_field not in record or record[config.text_field] is None:
        return None, None, "missing_field"
    text = record[config.text_field]
    if not isinstance(text, str):
        return None, None, "field_not_text"
    record_id = record.get(config.id_field) if config.id_field else None
    return text, None if record_id is None else str(record_id), ""


def _record(config: SourceConfig, where: str, record: object, nbytes: int) -> Record:
    text, record_id, problem = _field_text(record, config)
    doc_id = where
    if problem:
        shown = f"{config.text_field!r} missing" if problem == "missing_field" else f"{config.text_field!r} is not a string" if problem == "field_not_text" else "not a JSON object"
        return ReadFailure(doc_id, config.name, problem, f"{where}: {shown}", nbytes)
    if len(text) > config.document_limit // 4 and (size := len(text.encode("utf-8", "surrogatepass"))) > config.document_limit:
        # Parquet and dataset rows come whole from their readers: refused here, not read in pieces.
        return _too_large(config, where, f"a text of {size:,} bytes", size)
    if record_id is not None:
        doc_id = record_id
    url = record.get(config.url_field) if config.url_field else None
    return Document(doc_id, config.name, text, html=config.html, url=url if isinstance(url, str) and url else None)


def _read_jsonl(path: Path, handle: BinaryIO, config: SourceConfig) -> Iterator[Record]:
    limit = config.document_limit
    for number, line in enumerate(_lines_within(handle, limit), 1):
        where = f"{path}:{number}"
        if isinstance(line, int):
            yield _too_large(config, where, f"a line of {line:,} bytes", line)
            continue
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            if line.lstrip().startswith(b"["):
                yield from _read_json_array(path, line + handle.read(limit + 1 - len(line)), config)
                return
        if not line.strip():
            continue
        text, bad = decode_text(line)
        if bad:
            yield ReadIssue(config.name, where, "undecodable_bytes", f"{bad} undecodable bytes replaced with U+FFFD")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield ReadFailure(where, config.name, "malformed_json", f"{where}: malformed JSON ({exc.msg}; column {exc.colno})", len(line))
            continue
        except RecursionError:  # `[[[[...`: the parser recurses once per level
            yield ReadFailure(where, config.name, "malformed_json", f"{where}: malformed JSON (nested too deeply)", len(line))
            continue
        yield _record(config, where, record, len(line))


def _read_json_array(path: Path, raw: bytes, config: SourceConfig) -> Iterator[Record]:
    """A `.json` file holding one array of records, read whole (`raw` is at most the document
    limit and one byte: a bigger file is refused, JSONL is the format for big files)."""
    if len(raw) > config.document_limit:
        yield _too_large(config, str(path), f"a JSON array of more than {config.document_limit:,} bytes (read whole: convert it to JSONL)", len(raw))
        return
    text, bad = decode_text(raw)
    if bad:
        yield ReadIssue(config.name, str(path), "undecodable_bytes", f"{bad} undecodable bytes replaced with U+FFFD")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        yield ReadFailure(str(path), config.name, "malformed_json", f"{path}:{exc.lineno}: malformed JSON array ({exc.msg}; column {exc.colno})", len(raw))
        return
    except RecursionError:
        yield ReadFailure(str(path), config.name, "malformed_json", f"{path}:1: malformed JSON array (nested too deeply)", len(raw))
        return
    for index, record in enumerate(records):
        yield _record(config, f"{path}:item{index}", record, 0)


def _read_csv(path: Path, handle: BinaryIO, config: SourceConfig) -> Iterator[Record]:
    lines = _CsvLines(path, handle, config)
    delimiter = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    # Documents are long (the default 128 KiB cap would cut them), but a quoted field left open
    # must not gather the rest of the file: the field cap is the document limit.
    previous_cap = csv.field_size_limit(config.document_limit)
    try:
        yield from _csv_rows(path, csv.DictReader(lines, delimiter=delimiter), lines, config)
    finally:
        csv.field_size_limit(previous_cap)


class _CsvLines:
    """The decoded lines fed to the CSV reader, and what the reader cannot tell: the problems met
    on the way (`pending`), and the line the current row started on (the reader skips empty
    lines, so its line count names a row's last line, not its first)."""

    def __init__(self, path: Path, handle: BinaryIO, config: SourceConfig) -> None:
        self.path, self.handle, self.config = path, handle, config
        self.pending: list[ReadIssue | ReadFailure] = []
        self.row_start = 0  # 0 until a line with content arrives

    def __iter__(self) -> Iterator[str]:
        for number, raw in enumerate(_lines_within(self.handle, self.config.document_limit), 1):
            where = f"{self.path}:{number}"
            if isinstance(raw, int):
                self.pending.append(_too_large(self.config, where, f"a line of {raw:,} bytes", raw))
                raw = b"\n"  # an empty line in its place, which the reader skips
            elif not self.row_start and raw not in (b"\n", b"\r\n"):
                self.row_start = number
            text, bad = decode_text(raw)
            if bad:
                self.pending.append(ReadIssue(self.config.name, where, "undecodable_bytes", f"{bad} undecodable bytes replaced with U+FFFD"))
            yield text


def _csv_rows(path: Path, reader: csv.DictReader, lines: _CsvLines, config: SourceConfig) -> Iterator[Record]:
    try:
        fieldnames = reader.fieldnames
    except csv.Error as exc:
        yield ReadFailure(str(path), config.name, "malformed_csv", f"{path}:1: {exc}")
        return
    if fieldnames is None or config.text_field not in fieldnames:
        yield from lines.pending
        yield ReadFailure(str(path), config.name, "missing_field", f"{path}: no column {config.text_field!r} (columns: {', '.join(fieldnames or [])})")
        return
    while True:
        lines.row_start = 0
        try:
            row = next(reader)
        except StopIteration:
            yield from lines.pending
            return
        except csv.Error as exc:
            yield from lines.pending
            where = f"{path}:{lines.row_start or reader.line_num}"
            if "field limit" in str(exc):  # a field spanning lines, or a quote left open
                yield _too_large(config, where, f"a field of more than {config.document_limit:,} characters (the rest of the file is lost with it)", 0)
            else:
                yield ReadFailure(where, config.name, "malformed_csv", f"{where}: {exc}")
            return  # the reader cannot resynchronise after a broken quote
        yield from lines.pending
        lines.pending.clear()
        yield _record(config, f"{path}:{lines.row_start}", row, 0)


def _read_parquet(path: Path, config: SourceConfig) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for every kind of bad file
        yield ReadFailure(str(path), config.name, "malformed_parquet", f"{path}: not a readable Parquet file ({exc})")
        return
    names = table.schema_arrow.names
    if config.text_field not in names:
        yield ReadFailure(str(path), config.name, "missing_field", f"{path}: no column {config.text_field!r} (columns: {', '.join(names)})")
        return
    columns = list(dict.fromkeys(f for f in (config.text_field, config.id_field, config.url_field) if f and f in names))
    row = 0
    try:
        for batch in table.iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                yield _record(config, f"{path}:row{row}", record, 0)
                row += 1
    except Exception as exc:  # corrupt pages surface as pyarrow errors of several types
        yield ReadFailure(f"{path}:row{row}", config.name, "malformed_parquet", f"{path}: unreadable from row {row} on ({exc})")


def _read_dataset(config: SourceConfig) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"source {config.name!r}: Hugging Face datasets need the `datasets` package (pip install datasets)") from None
    name = config.dataset
    local = Path(name)
    if local.exists():
        try:
            loaded = datasets.load_from_disk(str(local))
        except (FileNotFoundError, ValueError) as exc:
            raise InputFileError(f"{local}: not a dataset saved with save_to_disk ({exc})") from None
    else:
        try:
            loaded = datasets.load_dataset(name, split=config.split, streaming=config.streaming)
        except Exception as exc:  # offline, unknown name, gated: the hub client has many error types
            raise InputFileError(f"source {config.name!r}: cannot load dataset {name!r} ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if config.split not in loaded:
            raise ConfigError(f"source {config.name!r}: dataset {name!r} has no split {config.split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[config.split]
    for row, record in enumerate(loaded):
        yield _record(config, f"{name}:row{row}", record, 0)
