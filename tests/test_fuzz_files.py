"""Hostile files: every GGUF file or tokenizer.json a user can point a command at either loads or
is refused with a one-line `ScratchLMError` that names the file. Never a hang, a memory
blow-up, a crash or another exception's traceback.

Mutants of a small valid file (20 KB: a one-layer llama model and its tokenizer) are opened
in one subprocess under a memory and a per-file time limit (tests/open_files_under_limits.py).
Each mutant is made by `random.Random(SEED + n)`, so mutant n can be rebuilt on its own from its
number; a failure lists the numbers and what was done to each.
"""

import json
import random
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from gguf import GGUFReader

from scratchlm import gguf_file as gguf_layout
from scratchlm.errors import InputFileError, ScratchLMError
from scratchlm.gguf_file import check_gguf_layout
from scratchlm.interop.gguf import export_gguf, import_gguf
from scratchlm.model import GPT, ModelConfig
from scratchlm.tokenizer import load_tokenizer, save_hf_tokenizer, train_bpe
from conftest import finishes_within

SEED = 1234
GGUF_MUTANTS = 300
JSON_MUTANTS = 300
RUNNER = Path(__file__).with_name("open_files_under_limits.py")
# Far above what opening a file of a few KB needs, far below what a reader that believes a
# count of 2^62 asks for. Measured over all 600 mutants: the address space grew by at most 64 MB
# past the warmed-up process (one malloc arena; resident memory by under 1 MB).
MEMORY_ALLOWANCE = 1 << 30
# A hang detector, not a speed assertion (speed is measured in benchmarks/hostile_inputs.py): the
# slowest of the 600 mutants, loaded or refused, took 25 ms here, so a loaded CI machine stays
# three orders of magnitude below this bound, while a loop over 2^62 elements never ends.
SECONDS_PER_FILE = 60.0
TEXT = "The quick brown fox jumps over the lazy dog. Numbers 1 2 3, café, 日本語, emoji 🙂.\n" * 20


# ---- the valid files the mutants start from ----------------------------------------------
@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("originals")
    tokenizer = train_bpe([TEXT], vocab_size=280, workers=1, min_frequency=1)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                         mlp_hidden=32, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    torch.manual_seed(0)
    gguf_path = export_gguf(GPT(config), tokenizer, folder / "small.gguf", dtype="f16")
    json_path = save_hf_tokenizer(tokenizer, folder / "tokenizer.json")
    return {"gguf": gguf_path, "json": json_path}


def structural_ints(path: Path) -> list[list[tuple[int, int]]]:
    """(offset, size) of every unsigned integer in a GGUF file's header, one list per key or
    tensor: counts, string and array lengths, value types, dimensions, tensor types and offsets,
    and integer values such as block_count. Mutating these is what reaches the reader's loops
    and allocations, and the model's sizes."""
    reader = GGUFReader(path)
    base = reader.data.ctypes.data
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    found = []
    for field in fields:
        ints = []
        for part in field.parts:
            if part.dtype.kind == "u" and part.dtype.itemsize in (4, 8):
                start = part.ctypes.data - base
                ints += [(start + i * part.dtype.itemsize, part.dtype.itemsize) for i in range(part.size)]
        found.append(ints)
    return [ints for ints in found if ints]


# ---- mutations ---------------------------------------------------------------------------
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)


def interesting_ints(size: int, value: int) -> list[int]:
    top = 8 * size
    values = [0, 1, value - 1, value + 1, value * 2, 2 ** (top - 1) - 1, 2 ** (top - 1), 2**top - 1, 2**31, 2**16]
    if size == 8:
        values += [2**62, 2**32, 2**32 + value]
    return [v for v in values if 0 <= v < 2**top]


def mutate_bytes(data: bytearray, rng: random.Random, hot: int) -> str:
    """One blind mutation; positions fall in the first `hot` bytes (the header) 9 times in 10."""
    pos = rng.randrange(min(hot, len(data)) if rng.random() < 0.9 else len(data))
    kind = rng.choice(["flip", "byte", "truncate", "insert", "delete"])
    if kind == "flip":
        bit = rng.randrange(8)
        data[pos] ^= 1 << bit
        return f"flip bit {bit} of byte {pos}"
    if kind == "byte":
        value = rng.choice(INTERESTING_BYTES)
        data[pos] = value
        return f"byte {pos} = {value:#x}"
    if kind == "truncate":
        del data[pos:]
        return f"truncate to {pos} bytes"
    if kind == "insert":
        extra = bytes(rng.choice(INTERESTING_BYTES) for _ in range(rng.randint(1, 16)))
        data[pos:pos] = extra
        return f"insert {extra.hex()} at {pos}"
    n = rng.randint(1, 16)
    del data[pos : pos + n]
    return f"delete {n} bytes at {pos}"


def mutate_gguf(original: bytes, ints: list[list[tuple[int, int]]], hot: int, rng: random.Random) -> tuple[bytes, str]:
    """1 to 3 mutations: an integer of the header set to a value that breaks assumptions (2^62,
    all ones, off by one), in a key or tensor picked first so that the token list's thousands
    of lengths do not crowd out block_count; or a blind one."""
    data = bytearray(original)
    done = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            offset, size = rng.choice(rng.choice(ints))
            if offset + size > len(data):
                continue
            fmt = "<I" if size == 4 else "<Q"
            value = rng.choice(interesting_ints(size, struct.unpack_from(fmt, data, offset)[0]))
            struct.pack_into(fmt, data, offset, value)
            done.append(f"u{8 * size} at {offset} = {value}")
        else:
            done.append(mutate_bytes(data, rng, hot))
    return bytes(data), "; ".join(done)


# Values that a JSON reader or the code after it may not expect in place of any node. Strings
# starting with "<raw>" are written into the text as they are (not valid as a Python value).
HOSTILE_JSON_VALUES = [
    None, True, -1, 0, 2**31, 2**64, 1.5, "", "x", "\udcff", [], {}, [[]], {"": None}, ["a b"], [1, 2],
    "<raw>Infinity", "<raw>NaN", "<raw>1e400", "<raw>-1e400", "<raw>" + "9" * 5000,
    "<raw>" + "[" * 100_000 + "]" * 100_000,
]
PLACEHOLDER = "\x00hostile\x00"


HOSTILE_TOKENS = ["", "a b", "\udcff", "€", "<|endoftext|>", "Ġ" * 1000]


def _random_path(root: dict, rng: random.Random) -> list:
    """A path from the root to a random node: half the time inside the vocabulary or the merges,
    where most of the reading happens; deeper nodes preferred."""
    path: list = ["model", rng.choice(["vocab", "merges"])] if rng.random() < 0.5 else []
    node = root["model"][path[1]] if path else root
    while isinstance(node, (dict, list)) and node and rng.random() < 0.85:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        node = node[key]
    return path


def mutate_json(original: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A structural mutation (a node replaced by a hostile value, deleted or duplicated, a key
    renamed, two values swapped) or, one time in four, a blind mutation of the bytes."""
    if rng.random() < 1 / 4:
        data = bytearray(original)
        return bytes(data), mutate_bytes(data, rng, len(data))
    root = json.loads(original)
    path = _random_path(root, rng)
    if not path:
        return original[: len(original) // 2], "truncate to half"
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    action = rng.choice(["replace", "replace", "delete", "duplicate", "swap", "rename"])
    raw = None
    if action == "delete":
        del parent[key]
        what = f"delete {path}"
    elif action == "duplicate" and isinstance(parent, list):
        parent.insert(key, parent[key])
        what = f"duplicate {path}"
    elif action == "swap" and isinstance(parent, dict) and len(parent) > 1:
        other = rng.choice(list(parent))
        parent[key], parent[other] = parent[other], parent[key]
        what = f"swap values of {path} and {other!r}"
    elif action == "rename" and isinstance(parent, dict):
        new = rng.choice(HOSTILE_TOKENS)
        parent[new] = parent.pop(key)
        what = f"rename {path} to {new[:10]!r}"
    else:
        value = rng.choice(HOSTILE_JSON_VALUES)
        if isinstance(value, str) and value.startswith("<raw>"):
            raw, value = value[len("<raw>") :], PLACEHOLDER
        parent[key] = value
        what = f"set {path} = {(raw or repr(value))[:20]}"
    text = json.dumps(root, ensure_ascii=False)
    if raw is not None:
        text = text.replace(json.dumps(PLACEHOLDER), raw)
    return text.encode("utf-8", errors="surrogatepass"), what


# ---- running and judging ---------------------------------------------------------------
def open_under_limits(paths: list[Path], opener: str, warmup: Path) -> dict[str, dict]:
    """Outcome of opening each path in one subprocess; a path the process never reported on
    (it died or hung past its overall limit) gets outcome 'no result'."""
    spec = {"paths": [str(p) for p in paths], "opener": opener, "warmup": str(warmup),
            "seconds": SECONDS_PER_FILE, "memory_bytes": MEMORY_ALLOWANCE}
    try:
        done = subprocess.run([sys.executable, str(RUNNER)], input=json.dumps(spec), capture_output=True, text=True,
                              timeout=120 + 3 * SECONDS_PER_FILE, check=False)
        stdout, ending = done.stdout, f"exit status {done.returncode}: {done.stderr[-500:]}"
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout or b""  # bytes, whatever text=True says
        stdout, ending = partial.decode() if isinstance(partial, bytes) else partial, "timed out"
    results = {}
    for line in stdout.splitlines():
        record = json.loads(line)
        results[record.pop("path")] = record
    missing = [str(p) for p in paths if str(p) not in results]
    if missing:  # the first file not reported on is the one that killed the process
        results[missing[0]] = {"process": {"outcome": "no result", "message": ending}}
    return results


def problems(results: dict[str, dict]) -> list[str]:
    """What is wrong with each outcome: anything but loading or a one-line refusal naming the file."""
    found = []
    for path, by_opener in results.items():
        for opener, result in by_opener.items():
            message = result.get("message", "")
            if result["outcome"] == "refused" and "\n" not in message and path in message:
                continue
            if result["outcome"] != "loaded":
                found.append(f"{Path(path).name} ({opener}): {result['outcome']} {result.get('type', '')}: {message[:300]}")
    return found


def fuzz(originals: dict[str, Path], kind: str, count: int, make: Callable[[random.Random], tuple[bytes, str]],
         folder: Path) -> None:
    paths, descriptions = [], {}
    for n in range(count):
        data, description = make(random.Random(SEED + n))
        path = folder / f"mutant-{n:04d}.{kind}"
        path.write_bytes(data)
        paths.append(path)
        descriptions[path.name] = description
    results = open_under_limits(paths, "gguf" if kind == "gguf" else "tokenizer", originals[kind])
    bad = problems(results)
    explained = [f"{line}  [mutant: {descriptions[line.split(' ', 1)[0]]}]" for line in bad]
    assert not bad, f"{len(bad)} of {count} mutants not refused cleanly (seed {SEED} + mutant number):\n" + "\n".join(explained[:15])
    outcomes = [result["outcome"] for by_opener in results.values() for result in by_opener.values()]
    assert outcomes.count("refused") > count // 4, "the mutations hardly break anything: the fuzz tests nothing"


@pytest.mark.slow
def test_mutated_gguf_files_load_or_are_refused_in_one_line(originals, tmp_path):
    original = originals["gguf"].read_bytes()
    ints, hot = structural_ints(originals["gguf"]), GGUFReader(originals["gguf"]).data_offset
    fuzz(originals, "gguf", GGUF_MUTANTS, lambda rng: mutate_gguf(original, ints, hot, rng), tmp_path)


@pytest.mark.slow
def test_mutated_tokenizer_json_files_load_or_are_refused_in_one_line(originals, tmp_path):
    original = originals["json"].read_bytes()
    fuzz(originals, "json", JSON_MUTANTS, lambda rng: mutate_json(original, rng), tmp_path)


def test_the_unmutated_files_load(originals):
    """The refusals above come from the mutations, not from the originals."""
    model, tokenizer = import_gguf(originals["gguf"])
    assert load_tokenizer(originals["json"]).encode(TEXT) == tokenizer.encode(TEXT)


# ---- hand-made hostile GGUF files ----------------------------------------------------------
UINT8, INT32, UINT32, STRING, ARRAY, UINT64 = 0, 5, 4, 8, 9, 10


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def gguf_file(kvs: list[bytes] = (), tensors: list[bytes] = (), n_kv: int | None = None, n_tensors: int | None = None,
              tail: bytes = b"") -> bytes:
    """A GGUF v3 file from raw key/value and tensor-info records; the counts default to the
    number of records given."""
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    return header + b"".join(kvs) + b"".join(tensors) + tail


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def array(etype: int, count: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IQ", etype, count) + payload


def tensor_info(name: str, dims: list[int], ttype: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    return (gguf_string(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, offset))


# The file of the report: 73 bytes, an INT32 array that declares 2^62 elements. gguf-py looped
# over them for ever, its memory growing by about 90 MB/s.
ARRAY_OF_2_TO_THE_62 = gguf_file([kv("tokenizer.ggml.token_type", ARRAY, array(INT32, 2**62))])

HOSTILE_GGUF = {
    "array of 2^62 int32": (ARRAY_OF_2_TO_THE_62, r"array 'tokenizer.ggml.token_type' declares 4611686018427387904 elements"),
    "array of 2^62 strings": (gguf_file([kv("tokenizer.ggml.tokens", ARRAY, array(STRING, 2**62))]), r"declares 4611686018427387904 elements"),
    "string of 2^62 bytes in an array": (gguf_file([kv("tokenizer.ggml.tokens", ARRAY, array(STRING, 2, gguf_string("a") + struct.pack("<Q", 2**62)))]),
                                         r"string 1 of array 'tokenizer.ggml.tokens' .* runs past the end"),
    "key of 2^64 - 1 bytes": (gguf_file([struct.pack("<Q", 2**64 - 1) + b"abc" + bytes(16)]), r"metadata key 0 .* runs past the end"),
    "2^62 metadata keys": (gguf_file(n_kv=2**62), r"declares 4611686018427387904 metadata keys and 0 tensors"),
    "2^62 tensors": (gguf_file(n_tensors=2**62), r"declares 0 metadata keys and 4611686018427387904 tensors"),
    "array longer than any vocabulary": (gguf_file([kv("a", ARRAY, array(UINT8, 2**20 + 1, bytes(2**20 + 1)))]),
                                         r"array 'a' has 1048577 elements; at most 1048576 are supported"),
    "unknown value type": (gguf_file([kv("general.name", 13, b"x")]), r"metadata key 'general.name' has unknown value type 13"),
    "array of arrays": (gguf_file([kv("a", ARRAY, array(ARRAY, 1, array(UINT8, 0)))]), r"metadata key 'a' is an array of arrays"),
    "key that is not utf-8": (gguf_file([kv(b"\xff\xfe", UINT8, b"\x00")]), r"metadata key 0 \(at byte 32\) is not UTF-8"),
    "duplicate key": (gguf_file([kv("a", UINT8, b"\x00"), kv("a", UINT8, b"\x01")]), r"metadata key 'a' appears twice"),
    "key named like a header field": (gguf_file([kv("GGUF.version", UINT32, b"\x03\x00\x00\x00")]), r"metadata key 'GGUF.version' appears twice"),
    "alignment that is not a power of two": (gguf_file([kv("general.alignment", UINT32, struct.pack("<I", 24))]),
                                             r"general.alignment is 24; expected a power of two"),
    "alignment of another type": (gguf_file([kv("general.alignment", UINT64, struct.pack("<Q", 32))]),
                                  r"general.alignment has value type 10; expected UINT32 \(4\)"),
    "tensor of 5 dimensions": (gguf_file(tensors=[tensor_info("t", [1, 1, 1, 1, 1])]), r"tensor 't' has 5 dimensions; at most 4"),
    "tensor of 2^32 - 1 dimensions": (gguf_file(tensors=[tensor_info("t", [], n_dims=2**32 - 1)]), r"tensor 't' has 4294967295 dimensions"),
    "tensor of unknown type": (gguf_file(tensors=[tensor_info("t", [4], ttype=4)]), r"tensor 't' has unknown type 4"),
    "empty tensor dimension": (gguf_file(tensors=[tensor_info("t", [4, 0])]), r"tensor 't' has shape \[4, 0\]"),
    "tensor data past the end": (gguf_file(tensors=[tensor_info("t", [2**40, 2**20])]), r"tensor 't': its 4611686018427387904 bytes at byte"),
    "tensor offset past the end": (gguf_file(tensors=[tensor_info("t", [1], offset=2**63)]), r"tensor 't': its 4 bytes at byte"),
    "quantised rows not whole blocks": (gguf_file(tensors=[tensor_info("t", [33, 1], ttype=8)], tail=b"\x00" * 64),
                                        r"tensor 't' has rows of 33 values; Q8_0 stores blocks of 32"),
    "duplicate tensor": (gguf_file(tensors=[tensor_info("t", [1]), tensor_info("t", [1])], tail=b"\x00" * 64), r"tensor 't' appears twice"),
    "tensor name not utf-8": (gguf_file(tensors=[tensor_info("t", [1]).replace(b"t", b"\xff", 1)], tail=b"\x00" * 64),
                              r"the name of tensor 0 \(at byte 32\) is not UTF-8"),
    "version 1": (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), r"GGUF version 1 is not supported \(supported: 2, 3\)"),
    "header cut short": (b"GGUF\x03\x00\x00\x00\x00", r"ends inside its header"),
}


@pytest.mark.parametrize("opener", [import_gguf, load_tokenizer], ids=["model", "tokenizer"])
@pytest.mark.parametrize("case", HOSTILE_GGUF)
def test_hostile_gguf_layout_is_refused_in_one_line_naming_the_problem(case, opener, tmp_path):
    content, message = HOSTILE_GGUF[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(content)
    with finishes_within(SECONDS_PER_FILE), pytest.raises(ScratchLMError, match=message) as exc:
        opener(path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"{path}: ")


class ReaderConstructed(BaseException):
    """A BaseException, so that no `except Exception` in the code under test swallows it."""


@pytest.fixture
def no_gguf_reader(monkeypatch):
    """gguf-py's reader cannot be constructed: a file it would loop over must be refused first."""

    def refuse(self, *args, **kwargs):
        raise ReaderConstructed("gguf-py's GGUFReader was constructed before the layout check refused the file")

    monkeypatch.setattr(GGUFReader, "__init__", refuse)


@contextmanager
def counting_lines_of(module) -> Iterator[SimpleNamespace]:
    """Count the lines of `module` that run inside the block: a measure of work that, unlike a
    clock, is the same on every machine, so that "does not grow with N" can be asserted exactly."""
    counted = SimpleNamespace(lines=0)

    def count(frame, event, arg):
        if event == "line":
            counted.lines += 1
        return count

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: count if frame.f_code.co_filename == module.__file__ else None)
    try:
        yield counted
    finally:
        sys.settrace(previous)


def layout_check_lines(path: Path, content: bytes) -> int:
    """Lines of scratchlm/gguf_file.py that `check_gguf_layout` runs on a file holding `content`."""
    path.write_bytes(content)
    with counting_lines_of(gguf_layout) as counted:
        try:
            check_gguf_layout(path)
        except InputFileError:
            pass
    assert counted.lines > 0, "nothing was counted: the comparisons using this would prove nothing"
    return counted.lines


def test_array_of_2_to_the_62_elements_is_refused_without_reading_it(tmp_path, no_gguf_reader):
    """The report's 73-byte file: refused from its size alone, before gguf-py's reader (which
    loops over the 2^62 elements) exists, with as much work as for an array of 2 elements."""
    path = tmp_path / "73.gguf"
    path.write_bytes(ARRAY_OF_2_TO_THE_62)
    assert len(ARRAY_OF_2_TO_THE_62) == 73
    with finishes_within(SECONDS_PER_FILE), pytest.raises(ScratchLMError, match="but only 0 bytes remain"):
        load_tokenizer(path)
    two = gguf_file([kv("tokenizer.ggml.token_type", ARRAY, array(INT32, 2))])
    lines = [layout_check_lines(tmp_path / f"{n}.gguf", content) for n, content in ((2**62, ARRAY_OF_2_TO_THE_62), (2, two))]
    assert lines[0] == lines[1], f"lines run for 2^62 and for 2 declared elements: {lines}"


def test_layout_check_skips_fixed_size_arrays_and_reads_only_string_lengths(tmp_path):
    """What keeps the check cheap on a real vocabulary (SmolLM2: 49,152 token types and 98,052
    strings; its timing is in benchmarks/hostile_inputs.py): a fixed-size array is skipped by
    arithmetic, whatever its length, and a string costs the same work whatever its length."""
    def fixed(n: int) -> bytes:
        return gguf_file([kv("tokenizer.ggml.token_type", ARRAY, array(UINT8, n, bytes(n)))])

    def strings(length: int) -> bytes:
        return gguf_file([kv("tokenizer.ggml.tokens", ARRAY, array(STRING, 100, gguf_string("x" * length) * 100))])

    lines = [layout_check_lines(tmp_path / f"fixed-{n}.gguf", fixed(n)) for n in (1, 2**20)]
    assert lines[0] == lines[1], f"lines run for a fixed-size array of 1 and of 2^20 elements: {lines}"
    lines = [layout_check_lines(tmp_path / f"strings-{n}.gguf", strings(n)) for n in (1, 10_000)]
    assert lines[0] == lines[1], f"lines run for 100 strings of 1 and of 10,000 bytes: {lines}"


def edited(original: Path, key: str, value: int | None = None, token: int | None = None) -> bytes:
    """`original` with the u32 value of metadata `key` set to `value`, or the first byte of
    token number `token` set to 0xFF (never valid in UTF-8)."""
    reader = GGUFReader(original)
    field = reader.fields[key]
    part = field.parts[-1] if token is None else field.parts[field.data[token]]
    offset = part.ctypes.data - reader.data.ctypes.data
    data = bytearray(original.read_bytes())
    if token is None:
        struct.pack_into("<I", data, offset, value)
    else:
        data[offset] = 0xFF
    return bytes(data)


@pytest.mark.slow
def test_worst_mutants_found_are_refused_in_one_line(originals, tmp_path):
    """What the fuzz found in the code before, each rebuilt by hand: a hang while the memory grew,
    a hang building 4 billion layers, a terabyte allocation, and UnicodeDecodeError."""
    small = originals["gguf"]
    cases = {
        "73.gguf": (ARRAY_OF_2_TO_THE_62, r"array 'tokenizer.ggml.token_type' declares 4611686018427387904 elements"),
        "layers.gguf": (edited(small, "llama.block_count", 2**32 - 1), r"llama.block_count is 4294967295 but the file holds only 11 tensors"),
        "context.gguf": (edited(small, "llama.context_length", 2**32 - 1), r"llama.context_length is 4294967295; supported: at most 16777216 positions"),
        "token.gguf": (edited(small, "tokenizer.ggml.tokens", token=97), r"metadata key 'tokenizer.ggml.tokens' holds text that is not UTF-8"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    results = open_under_limits([tmp_path / name for name in cases], "gguf", small)
    assert not problems(results)
    for name, (_, message) in cases.items():
        assert re.search(message, results[str(tmp_path / name)]["model"]["message"]), results[str(tmp_path / name)]


@pytest.mark.slow  # a fresh interpreter per command
@pytest.mark.parametrize("command", [["import", "{path}", "--out", "{out}"], ["tokenizer", "import", "{path}", "--out", "{out}"]],
                         ids=["import", "tokenizer-import"])
def test_cli_refuses_the_73_byte_file_in_one_line_with_status_2(command, tmp_path):
    path = tmp_path / "73.gguf"
    path.write_bytes(ARRAY_OF_2_TO_THE_62)
    argv = [part.format(path=path, out=tmp_path / "out") for part in command]
    done = subprocess.run([sys.executable, "-m", "scratchlm.cli", *argv], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"scratchlm: error: {path}: "), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


# ---- the real file -----------------------------------------------------------------------
def test_layout_check_accepts_smollm2(smollm2_gguf):
    """SmolLM2-135M: 49,152 tokens and 48,900 merges as string arrays, 272 tensors; what the
    check costs on it is measured in benchmarks/hostile_inputs.py."""
    with finishes_within(SECONDS_PER_FILE):
        check_gguf_layout(smollm2_gguf)


def test_a_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, monkeypatch):
    import pathlib

    from scratchlm.interop.load import detect_model

    locked = tmp_path / "model.gguf"
    locked.write_bytes(b"GGUF")
    real_open = pathlib.Path.open

    def refuse(self, *args, **kwargs):  # as root a chmod 000 file is still readable: refuse here
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refuse)
    for opening in (detect_model, load_tokenizer):
        with pytest.raises(InputFileError, match=r"model\.gguf: cannot read \(Permission denied\)"):
            opening(locked)


@pytest.mark.parametrize("content", [b"\xff\xfe", b"{", b'{"model_type": ' + b"9" * 5000 + b"}", b"[" * 100_000])
def test_a_model_folders_unreadable_config_is_one_line_naming_it(tmp_path, content):
    from scratchlm.interop.load import detect_model

    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(InputFileError, match=r"config\.json: not a JSON file"):
        detect_model(tmp_path)
