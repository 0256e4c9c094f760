"""Streaming text out of files for tokenizer training.

Files are read in blocks of about `block_bytes` that end at a line break, decoded as UTF-8
with replacement characters for undecodable bytes (counted, never fatal), so training on a
directory of any size holds only a few blocks in memory at once. Block boundaries depend only
on the files, never on the number of workers, so training is deterministic.
"""

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.errors import InputFileError

BLOCK_BYTES = 1 << 20
REPLACEMENT_UTF8 = "\ufffd".encode()


@dataclass
class ReadReport:
    """What reading the corpus saw; filled in while blocks are consumed."""

    files: int = 0
    bytes_read: int = 0
    undecodable_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_undecodable(self) -> int:
        return sum(self.undecodable_bytes.values())


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files named directly, plus every file under a named directory, in sorted order."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            # Hidden files and folders (.git, .cache) are not corpus text.
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise InputFileError(f"{path}: directory contains no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise InputFileError(f"{path}: not a regular file or folder")
        else:
            raise InputFileError(f"{path}: no such file or directory")
    if not files:
        raise InputFileError("no input files given")
    return files


def _decode_block(decoder: codecs.IncrementalDecoder, raw: bytes, final: bool) -> tuple[str, int]:
    """Decode one block and count the replacement characters that stand for bad bytes (a
    U+FFFD that was already in the file is not counted)."""
    text = decoder.decode(raw, final=final)
    return text, text.count("\ufffd") - raw.count(REPLACEMENT_UTF8)


def read_text_blocks(
    files: Iterable[Path],
    report: ReadReport,
    max_bytes: int | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> Iterator[str]:
    """Yield the text of `files` in blocks ending at line breaks, stopping after `max_bytes`."""
    for path in files:
        if max_bytes is not None and report.bytes_read >= max_bytes:
            return
        report.files += 1
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        carry = ""
        try:
            handle = path.open("rb")
        except OSError as exc:
            raise InputFileError(f"{path}: cannot read: {exc.strerror}") from None
        with handle:
            while True:
                want = block_bytes
                if max_bytes is not None:
                    want = min(want, max_bytes - report.bytes_read)
                raw = handle.read(want) if want > 0 else b""
                final = len(raw) < want or want <= 0
                report.bytes_read += len(raw)
                # At the --max-bytes limit the last character may be cut: drop its start
                # rather than report it as undecodable.
                budget_cut = max_bytes is not None and report.bytes_read >= max_bytes
                text, bad = _decode_block(decoder, raw, final and not budget_cut)
                if bad:
                    report.undecodable_bytes[str(path)] = report.undecodable_bytes.get(str(path), 0) + bad
                text = carry + text
                cut = text.rfind("\n") + 1 if not final else len(text)
                carry = text[cut:]
                if cut:
                    yield text[:cut]
                if final:
                    break


def read_text(path: str | Path) -> tuple[str, int]:
    """A whole text file and its count of undecodable bytes."""
    p = Path(path)
    if p.is_dir():
        raise InputFileError(f"{p}: is a folder, not a text file")
    if not p.is_file():
        raise InputFileError(f"{p}: no such file")
    return decode_text(p.read_bytes())


def decode_text(raw: bytes) -> tuple[str, int]:
    """UTF-8 text with U+FFFD for undecodable bytes, and how many replacements were made."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return _decode_block(decoder, raw, final=True)
