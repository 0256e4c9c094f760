"""GGUF files opened safely: every length and offset checked against the file's size before
gguf-py reads it, and any value read from it turned into a one-line `InputFileError`.

gguf-py's `GGUFReader` trusts the file. An array that declares 2^62 elements makes it loop (and
allocate) for ever: a 73-byte file once hung the loader while its memory grew by 90 MB/s. A
length past the end of the file surfaces as an IndexError deep inside numpy, a key that is not
UTF-8 as a UnicodeDecodeError. `check_gguf_layout` walks the same structure first (header,
metadata, tensor infos, tensor data) with `struct` over a memory map, and refuses a file whose
counts cannot fit in it. It stays cheap on real files: fixed-size arrays (SmolLM2's 49,152 token
types) are skipped by arithmetic, and a string array costs one length read per element (SmolLM2's
whole header: 0.03 s, against gguf-py's 3.5 s).

Layout (github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian unless the version
reads as byte-swapped: magic "GGUF", version u32, tensor count u64, key count u64; per key a
string (u64 length + UTF-8) and a value type u32 then the value (an array is element type u32,
count u64, elements); per tensor a name, n_dims u32 (at most GGML_MAX_DIMS = 4), dims u64 each,
type u32, offset u64 into the data section, which starts at the next multiple of
`general.alignment` (32 by default).
"""

from __future__ import annotations

import math
import mmap
import reprlib
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from scratchlm.errors import InputFileError, first_line

if TYPE_CHECKING:  # gguf-py takes 0.13 s to import: loaded only when a GGUF file is opened
    from gguf import GGUFReader

SUPPORTED_VERSIONS = (2, 3)  # gguf-py's; version 1 used 32-bit counts
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# The largest real vocabularies have about 262k tokens (Gemma 3). gguf-py keeps a numpy array
# per array element, about 0.7 KB: 2^20 one-byte elements (a 1 MB file) cost it 0.7 GB and 14 s
# (measured). A larger array is refused, however well it fits in the file.
MAX_ARRAY_LENGTH = 1 << 20
HEADER_BYTES = 24
# Value types (gguf-py's GGUFValueType, written out so that importing this module does not load
# gguf-py): fixed sizes in bytes; STRING and ARRAY have their own layout.
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, UINT32 = 8, 9, 4
# Smallest possible records, to reject impossible counts before looping over them: a key of
# an empty name and a one-byte value; a tensor of an empty name and no dimensions.
MIN_KV_BYTES = 8 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
RESERVED_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # gguf-py stores the header under these


class _Walk:
    """A read position over the file's bytes; every read checked against the end."""

    def __init__(self, data, where: str, order: str) -> None:
        self.data, self.where, self.order, self.pos = data, where, order, 0

    def fail(self, problem: str) -> InputFileError:
        return InputFileError(f"{self.where}: truncated or corrupt GGUF file: {problem}")

    def skip(self, n: int, what: str) -> int:
        start, left = self.pos, len(self.data) - self.pos
        if n > left:
            raise self.fail(f"{what} (at byte {start}) runs past the end of the file: {n} bytes needed, {left} left")
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from(self.order + "I", self.data, self.skip(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from(self.order + "Q", self.data, self.skip(8, what))[0]

    def text(self, what: str) -> str:
        n = self.u64(what)
        start = self.skip(n, what)
        try:
            return bytes(self.data[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} (at byte {start}) is not UTF-8") from None


def is_gguf_file(path: str | Path) -> bool:
    """Whether the file at `path` starts with GGUF's magic (judged by content, not name)."""
    try:
        with Path(path).open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror or exc})") from None


def check_gguf_layout(path: str | Path) -> None:
    """Refuse, with a one-line InputFileError naming `path` and the problem, a file that is not
    a GGUF file of a supported version or whose counts, lengths, types, dimensions and offsets
    do not fit in it. A file that passes can be given to gguf-py's GGUFReader."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: no such file")
    try:
        with p.open("rb") as handle:
            if p.stat().st_size < HEADER_BYTES:
                content = handle.read()
                _check_magic(content, str(p))
                raise InputFileError(f"{p}: truncated or corrupt GGUF file: it ends inside its header ({len(content)} bytes)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _check_layout(data, str(p))
    except OSError as exc:
        raise InputFileError(f"{p}: cannot read ({exc.strerror or exc})") from None


def _check_magic(data, where: str) -> None:
    magic = bytes(data[:4])
    if magic != b"GGUF":
        raise InputFileError(f"{where}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def _check_layout(data, where: str) -> None:
    _check_magic(data, where)
    # gguf-py's rule: a version whose low 16 bits are zero was written with the other byte order.
    order = ">" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF == 0 else "<"
    walk = _Walk(data, where, order)
    walk.skip(4, "magic")
    version = walk.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise InputFileError(f"{where}: GGUF version {version} is not supported (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors, n_kv = walk.u64("tensor count"), walk.u64("key count")
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > len(data) - walk.pos:
        raise walk.fail(f"it declares {n_kv} metadata keys and {n_tensors} tensors, more than its {len(data)} bytes can hold")
    alignment = DEFAULT_ALIGNMENT
    seen = set(RESERVED_KEYS)
    for i in range(n_kv):
        key = walk.text(f"metadata key {i}")
        if key in seen:
            raise walk.fail(f"metadata key {reprlib.repr(key)} appears twice")
        seen.add(key)
        vtype = walk.u32(f"the type of metadata key {reprlib.repr(key)}")
        start = walk.pos
        _skip_value(walk, key, vtype)
        if key == "general.alignment":
            if vtype != UINT32:
                raise walk.fail(f"general.alignment has value type {vtype}; expected UINT32 ({UINT32})")
            alignment = struct.unpack_from(order + "I", data, start)[0]
            if alignment == 0 or alignment & (alignment - 1):
                raise walk.fail(f"general.alignment is {alignment}; expected a power of two")
    tensors = _tensor_infos(walk, n_tensors)
    data_start = -(-walk.pos // alignment) * alignment
    for name, n_bytes, offset in tensors:
        if data_start + offset + n_bytes > len(data):
            raise walk.fail(f"tensor {reprlib.repr(name)}: its {n_bytes} bytes at byte {data_start + offset} run past the end "
                            f"of the file ({len(data)} bytes)")


def _skip_value(walk: _Walk, key: str, vtype: int) -> None:
    shown = reprlib.repr(key)
    if vtype in SCALAR_SIZES:
        walk.skip(SCALAR_SIZES[vtype], f"the value of metadata key {shown}")
    elif vtype == STRING:
        walk.text(f"the value of metadata key {shown}")
    elif vtype == ARRAY:
        _skip_array(walk, shown)
    else:
        raise walk.fail(f"metadata key {shown} has unknown value type {vtype}")


def _skip_array(walk: _Walk, shown: str) -> None:
    etype = walk.u32(f"the element type of array {shown}")
    count = walk.u64(f"the length of array {shown}")
    if etype == ARRAY:  # llama.cpp refuses them too; gguf-py would recurse once per level
        raise walk.fail(f"metadata key {shown} is an array of arrays (not supported)")
    if etype != STRING and etype not in SCALAR_SIZES:
        raise walk.fail(f"array {shown} has unknown element type {etype}")
    size = SCALAR_SIZES.get(etype, 8)  # a string is at least its 8-byte length
    left = len(walk.data) - walk.pos
    if count * size > left:
        what = "elements of at least 8 bytes" if etype == STRING else f"elements of {size} bytes"
        raise walk.fail(f"array {shown} declares {count} {what} but only {left} bytes remain (at byte {walk.pos})")
    if count > MAX_ARRAY_LENGTH:
        raise walk.fail(f"array {shown} has {count} elements; at most {MAX_ARRAY_LENGTH} are supported")
    if etype != STRING:
        walk.skip(count * size, f"array {shown}")
        return
    # The one loop over elements: each string's length, no decoding (done when a value is read).
    data, order, pos, end = walk.data, walk.order + "Q", walk.pos, len(walk.data)
    for j in range(count):
        if pos + 8 > end:
            walk.pos = pos
            walk.skip(8, f"string {j} of array {shown}")
        n = struct.unpack_from(order, data, pos)[0]
        if n > end - pos - 8:
            raise walk.fail(f"string {j} of array {shown} (at byte {pos}) runs past the end of the file: "
                            f"{n} bytes declared, {end - pos - 8} left")
        pos += 8 + n
    walk.pos = pos


def _tensor_infos(walk: _Walk, count: int) -> list[tuple[str, int, int]]:
    """(name, size in bytes, offset in the data section) of each tensor."""
    from gguf.constants import GGML_QUANT_SIZES

    sizes = {int(kind): (kind.name, *sizes) for kind, sizes in GGML_QUANT_SIZES.items()}
    infos, names = [], set()
    for i in range(count):
        name = walk.text(f"the name of tensor {i}")
        shown = reprlib.repr(name)
        if name in names:
            raise walk.fail(f"tensor {shown} appears twice")
        names.add(name)
        n_dims = walk.u32(f"the dimension count of tensor {shown}")
        if n_dims > MAX_DIMS:
            raise walk.fail(f"tensor {shown} has {n_dims} dimensions; at most {MAX_DIMS}")
        dims = struct.unpack_from(f"{walk.order}{n_dims}Q", walk.data, walk.skip(8 * n_dims, f"the shape of tensor {shown}"))
        ttype = walk.u32(f"the type of tensor {shown}")
        offset = walk.u64(f"the offset of tensor {shown}")
        if ttype not in sizes:
            raise walk.fail(f"tensor {shown} has unknown type {ttype}")
        type_name, block, type_size = sizes[ttype]
        if min(dims, default=1) < 1:
            raise walk.fail(f"tensor {shown} has shape {list(dims)}; every dimension must be at least 1")
        if dims and dims[0] % block:
            raise walk.fail(f"tensor {shown} has rows of {dims[0]} values; {type_name} stores blocks of {block}")
        infos.append((name, math.prod(dims) // block * type_size, offset))
    return infos


def open_gguf(path: str | Path) -> GGUFReader:
    """gguf-py's `GGUFReader` over `path` (memory-mapped: tensor data is read when touched),
    after `check_gguf_layout`. The one way this project opens a GGUF file."""
    from gguf import GGUFReader

    p = Path(path)
    check_gguf_layout(p)
    try:
        return GGUFReader(p)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error) as exc:
        # The layout check mirrors the reader's rules; this is the net for one it does not know.
        raise InputFileError(f"{p}: truncated or corrupt GGUF file ({type(exc).__name__}: {first_line(exc)})") from None


def gguf_value(reader: GGUFReader, key: str, where: str) -> object:
    """The value of metadata `key` as Python data (None if absent). Text is decoded only here,
    so a string that is not UTF-8 is refused naming its key."""
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except UnicodeDecodeError:
        raise InputFileError(f"{where}: metadata key {reprlib.repr(key)} holds text that is not UTF-8") from None


def gguf_metadata(reader: GGUFReader, where: str, prefix: str = "") -> dict[str, object]:
    """Every metadata key starting with `prefix`, with its value (see `gguf_value`)."""
    return {key: gguf_value(reader, key, where) for key in reader.fields if key.startswith(prefix)}
