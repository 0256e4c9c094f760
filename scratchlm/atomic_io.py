"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

import errno
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from scratchlm.errors import ScratchLMError


class OutputFileError(ScratchLMError):
    """An output path that cannot be written (a folder, a missing parent, no permission)."""


def default_mode(folder: bool = False) -> int:
    """0o666 (0o777 for a folder) less the process umask: what `open()` or `mkdir()` would
    have given. mkstemp and mkdtemp make private files and folders, which would hide outputs
    from other users of a shared machine."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def check_writable_file(path: str | Path) -> Path:
    """Fail fast, before long work, on an output file path that cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise OutputFileError(f"{target}: is a folder; give a file name to write")
    parent = next((p for p in [target.parent, *target.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputFileError(f"{target}: cannot write here ({parent} is not a writable folder)")
    return target


def fsync_file(path: str | Path) -> None:
    """Flush a file written by a writer that does not sync (safetensors, an appended log). Without
    it a rename can reach the disk before the data does (ext4 and XFS delay allocation), and a
    power cut leaves the new name on an empty or zero-filled file."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_folder(path: str | Path) -> None:
    """Flush a folder's entries to disk, so that files created or renamed into it survive a power
    cut: fsync of a file does not cover its name. A no-op where folders cannot be opened
    (Windows, whose NTFS journals renames itself)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some network and FUSE file systems cannot sync a folder; nothing to do then
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def os_error_code(exc: BaseException | None) -> int | None:
    """The OS error behind a failed write, if there is one. torch.save raises a RuntimeError with
    the OSError as its context; safetensors (Rust) names it only in its text, '(os error 28)'."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        if isinstance(exc, Exception) and (found := re.search(r"\(os error (\d+)\)", str(exc))):
            return int(found[1])
        exc = exc.__cause__ or exc.__context__
    return None


def _raise_write_error(target: Path, exc: BaseException) -> NoReturn:
    """Re-raise a failed write: one line naming the file when the OS refused it (a full disk, a
    quota, an I/O error), the error itself otherwise (a bug, or the user's own error)."""
    code = None if isinstance(exc, ScratchLMError) else os_error_code(exc)
    if code is None:
        raise exc
    raise OutputFileError(f"{target}: {os.strerror(code).lower()} while writing it; the file is as it was") from None


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
        os.chmod(tmp, default_mode())
        os.replace(tmp, target)
        fsync_folder(target.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _raise_write_error(target, exc)
    return target


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def written_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for writers that open files by name (safetensors,
    GGUFWriter, matplotlib); when the block succeeds it is synced and renamed over `path`, when
    it fails it is removed."""
    target = check_writable_file(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    except OSError as exc:
        raise OutputFileError(f"{target}: cannot write here ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, target)
        fsync_folder(target.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_write_error(target, exc)


def save_figure_atomic(fig, path: str | Path) -> Path:
    """Save a pyplot figure atomically (the format follows the file's extension) and close it,
    saved or not: pyplot keeps every open figure in memory."""
    import matplotlib.pyplot as plt

    try:
        with written_atomically(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or None)
    finally:
        plt.close(fig)
    return Path(path)
