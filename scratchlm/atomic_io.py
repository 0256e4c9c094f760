"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

import os
import tempfile
from pathlib import Path

from scratchlm.errors import ScratchLMError


class OutputFileError(ScratchLMError):
    """An output path that cannot be written (a folder, a missing parent, no permission)."""


def _default_mode() -> int:
    """0o666 less the process umask: what `open()` would have given the file. mkstemp makes
    files 0o600, which would hide outputs from other users of a shared machine."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_writable_file(path: str | Path) -> Path:
    """Fail fast, before long work, on an output file path that cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise OutputFileError(f"{target}: is a folder; give a file name to write")
    parent = next((p for p in [target.parent, *target.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputFileError(f"{target}: cannot write here ({parent} is not a writable folder)")
    return target


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`."""
    target = check_writable_file(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputFileError(f"{target}: cannot write here ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_figure_atomic(fig, path: str | Path) -> Path:
    """Save a matplotlib figure atomically; the format follows the file's extension."""
    target = check_writable_file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{target.suffix}")
    try:
        fig.savefig(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
