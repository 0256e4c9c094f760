"""`scratchlm data prepare`: sources in, clean deduplicated mixed token shards out.

The run has four phases, each leaving files in `OUT/work/` that let an interrupted run resume:

1. **clean** (parallel, per chunk of documents): read, extract HTML, normalise, filter, redact
   PII, and compute each survivor's exact hash and MinHash signature;
2. **deduplicate** (one process, over all chunks): exact copies by hash, then near copies by
   MinHash LSH; the first document of each cluster is kept;
3. **finish** (parallel, per chunk): split train/val by a hash of the text, write the kept
   documents and the ledger, tokenize;
4. **mix** (one process): write the training stream with each source repeated or sampled to
   its weight, in a seeded order of chunks, then the validation stream, the manifest, and the
   report.

Chunks are cut from the input stream at fixed document and byte counts, so a chunk's content
depends only on the inputs. Each chunk's outputs are written atomically, with a marker carrying
a fingerprint of everything that went into it; a resumed run skips every chunk whose marker
matches and redoes the rest, so changing a filter threshold redoes the cleaning while changing
the tokenizer only redoes the tokenizing.

Memory is bounded by the chunk size and the number of workers, plus, for deduplication,
about 8 bytes per document and 8 per LSH band; signatures stay on disk (memory-mapped).
"""

import dataclasses
import glob
import hashlib
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scratchlm import __version__
from scratchlm.atomic_io import write_bytes_atomic, write_text_atomic
from scratchlm.config import build, check_keys, load_toml, merge
from scratchlm.data.executors import EXECUTORS, Executor, make_executor
from scratchlm.data.dedup import (
    MinHashConfig, MinHasher, band_groups, band_hashes, bucket_pairs, clusters, exact_hash, merge_pairs, removal_curve, s_curve,
    shingle_hashes, verify_pairs,
)  # fmt: skip
from scratchlm.data.diversity import chunk_facts, diversity
from scratchlm.data.filters import FilterConfig, check_languages
from scratchlm.data.mix import is_validation, repeats, source_epochs
from scratchlm.data.normalize import NormalizeConfig
from scratchlm.data.pii import PIIConfig
from scratchlm.data.pipeline import Cleaner, CleaningConfig, StageCounts, clean_batch
from scratchlm.data.report import write_report
from scratchlm.data.shards import DEFAULT_SHARD_TOKENS, SPLITS, ShardWriter, token_dtype
from scratchlm.data.sources import ReadFailure, ReadIssue, SourceConfig, read_source, source_files, source_provenance
from scratchlm.errors import ConfigError, InputFileError
from scratchlm.units import parse_bytes

MAX_ISSUES_KEPT = 200


@dataclass(frozen=True)
class PrepareSettings:
    """The top-level keys of a prepare config."""

    tokenizer: str | None = None  # without one, stop after writing the kept documents
    val_fraction: float = 0.01
    seed: int = 0
    workers: int = 0  # 0: every core
    chunk_docs: int = 2000
    chunk_bytes: str = "16MB"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    train_bytes: str | None = None  # size of the training mixture; default: all kept train text
    exact_dedup: bool = True
    strict: bool = False  # any bad input (malformed line, binary file, bad bytes) stops the run
    executor: str = "local"  # local: this machine's cores; ray: a Ray cluster (results are the same)
    address: str | None = None  # the Ray cluster to join; none: start a local one for the run

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), not {self.val_fraction}")
        if self.chunk_docs < 1 or parse_bytes(self.chunk_bytes) < 1:
            raise ConfigError("chunk_docs and chunk_bytes must be positive")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, not {self.executor!r}")
        if self.address and self.executor != "ray":
            raise ConfigError("address (--address) is a Ray cluster's: it needs executor = \"ray\"")
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 (every core) or more, not {self.workers}")
        if self.shard_tokens < 1:
            raise ConfigError(f"shard_tokens must be positive, not {self.shard_tokens}")
        if self.train_bytes is not None and parse_bytes(self.train_bytes) < 1:
            raise ConfigError(f"train_bytes must be positive, not {self.train_bytes!r}")


@dataclass(frozen=True)
class PrepareConfig:
    settings: PrepareSettings = PrepareSettings()
    sources: tuple[SourceConfig, ...] = ()
    cleaning: CleaningConfig = CleaningConfig()
    minhash: MinHashConfig = MinHashConfig()

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("prepare: no sources (give --input PATHS, or [[sources]] tables in the config)")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"prepare: source names must be unique, got {', '.join(names)}")
        weighted = [s.name for s in self.sources if s.weight is not None]
        if weighted and len(weighted) != len(self.sources):
            missing = ", ".join(s.name for s in self.sources if s.weight is None)
            raise ConfigError(f"prepare: give a weight to every source or to none (no weight on: {missing})")


_SECTIONS = {"normalize": NormalizeConfig, "filters": FilterConfig, "pii": PIIConfig, "minhash": MinHashConfig}


def load_prepare_config(
    path: str | Path | None = None, overrides: dict | None = None, inputs: list[str] | None = None, input_options: dict | None = None
) -> PrepareConfig:
    """A prepare config from a TOML file (or defaults), `--set` overrides and `--input` paths,
    which make one source named `input` (with `input_options` such as format or text_field)."""
    data = _relative_to(Path(path).parent, load_toml(path)) if path else {}
    where = str(path) if path else "prepare config"
    source_overrides = (overrides or {}).get("sources", {})
    data = merge(data, {k: v for k, v in (overrides or {}).items() if k != "sources"})
    sources = data.pop("sources", [])
    if inputs:
        sources = [{"name": "input", "paths": list(inputs), **(input_options or {}), **source_overrides}]
    elif source_overrides:
        raise ConfigError("--set sources.KEY=VALUE changes the --input source; for a config's sources, edit its [[sources]] tables")
    if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
        raise ConfigError(f"{where}: sources must be [[sources]] tables")
    sections = {name: data.pop(name, {}) for name in _SECTIONS}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: {name} must be a [{name}] table")
    check_keys(_TopLevel, data, where)
    return PrepareConfig(
        settings=build(PrepareSettings, data, where),
        sources=tuple(build(SourceConfig, s, f"{where}: sources[{n}]") for n, s in enumerate(sources)),
        cleaning=CleaningConfig(
            normalize=build(NormalizeConfig, sections["normalize"], f"{where}: [normalize]"),
            filters=build(FilterConfig, sections["filters"], f"{where}: [filters]"),
            pii=build(PIIConfig, sections["pii"], f"{where}: [pii]"),
        ),
        minhash=build(MinHashConfig, sections["minhash"], f"{where}: [minhash]"),
    )


def _relative_to(folder: Path, data: dict) -> dict:
    """Paths in a config file are relative to the file, not to where the command runs."""

    def resolve(value: str) -> str:
        return value if Path(value).is_absolute() else str(folder / value)

    if isinstance(data.get("tokenizer"), str):
        data["tokenizer"] = resolve(data["tokenizer"])
    filters = data.get("filters")
    for key in ("bad_words_file", "url_blocklist"):
        if isinstance(filters, dict) and isinstance(filters.get(key), str):
            filters[key] = resolve(filters[key])
    for source in data.get("sources", []) if isinstance(data.get("sources"), list) else []:
        if isinstance(source, dict):
            if isinstance(source.get("paths"), list):
                source["paths"] = [resolve(p) if isinstance(p, str) else p for p in source["paths"]]
            # A dataset is a hub name unless a folder of that name exists next to the config.
            if isinstance(source.get("dataset"), str) and (folder / source["dataset"]).exists():
                source["dataset"] = resolve(source["dataset"])
    return data


@dataclass(frozen=True)
class _TopLevel(PrepareSettings):
    """Every key a config file may hold at the top level, for the unknown-key check."""

    sources: list | None = None
    normalize: dict | None = None
    filters: dict | None = None
    pii: dict | None = None
    minhash: dict | None = None


@dataclass
class PrepareResult:
    out: Path
    stats: dict
    manifest: dict | None


# ---- fingerprints: what each phase's output depends on -------------------------------------
def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _input_state(sources: Iterable[SourceConfig]) -> list:
    """Names, sizes and modification times of the input files: a changed input invalidates
    the chunks made from it."""
    state = []
    for source in sources:
        if source.dataset:
            state.append([source.name, source.dataset])
            continue
        for path in source_files(source):
            info = path.stat()
            state.append([source.name, str(path), info.st_size, info.st_mtime_ns])
    return state


def _input_bytes(state: list) -> int | None:
    """Total size of the input files, from `_input_state`; None when a dataset is among them."""
    if any(len(entry) == 2 for entry in state):
        return None
    return sum(entry[2] for entry in state)


# Source keys that change nothing the clean phase does (weight acts in mixing, which always runs).
_PROVENANCE_KEYS = ("license", "url", "notes", "weight")


def _clean_fingerprint(config: PrepareConfig, state: list) -> str:
    sources = [{k: v for k, v in dataclasses.asdict(s).items() if k not in _PROVENANCE_KEYS} for s in config.sources]
    filters = config.cleaning.filters
    lists = [_file_digest(path) for path in (filters.bad_words_file, filters.url_blocklist) if path]
    return _digest([__version__, state, sources, dataclasses.asdict(config.cleaning), lists,
                    dataclasses.asdict(config.minhash), config.settings.chunk_docs, config.settings.chunk_bytes])  # fmt: skip


def _file_digest(path: str) -> str:
    """A word list or blocklist edited in place must redo the cleaning: its content counts, not its name."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as error:
        raise InputFileError(f"{path}: cannot read ({error.strerror})") from None


# ---- the worker side ---------------------------------------------------------------------
@dataclass
class _Worker:
    """What a worker process builds once and reuses for every chunk it is given."""

    config: PrepareConfig
    work: Path
    tokenizer_path: str | None
    cleaner: Cleaner = field(init=False)
    hasher: MinHasher = field(init=False)
    tokenizer: object = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.cleaner = Cleaner(self.config.cleaning)
        self.hasher = MinHasher(self.config.minhash)
        if self.tokenizer_path:
            from scratchlm.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_path)


def _chunk_path(work: Path, phase: str, index: int, suffix: str) -> Path:
    return work / phase / f"{index:06d}{suffix}"


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def _clean_chunk(worker: _Worker, index: int, records: list, fingerprint: str) -> dict:
    """Phase 1 on one chunk: survivors with their hashes and signatures, and the ledger of
    rejected records."""
    counts = StageCounts()
    survivors, rejected = clean_batch(records, worker.cleaner, counts)
    start = time.perf_counter()
    texts = [doc.text for doc in survivors]
    hashes = np.array([exact_hash(t) for t in texts], dtype=np.uint64)
    counts.seconds["exact_dedup"] += time.perf_counter() - start
    minhash = worker.config.minhash
    start = time.perf_counter()
    if minhash.enabled and texts:
        signatures = worker.hasher.signatures(texts)
        bands = band_hashes(signatures, *minhash.lsh_params())
    else:
        signatures = np.zeros((len(texts), 0), np.uint32)
        bands = np.zeros((len(texts), 0), np.uint64)
    counts.seconds["near_dedup"] += time.perf_counter() - start
    work = worker.work
    _write_jsonl(_chunk_path(work, "clean", index, ".docs.jsonl"), ({"id": d.id, "source": d.source, "text": d.text, "url": d.url} for d in survivors))
    _save_npz(
        _chunk_path(work, "clean", index, ".npz"),
        hashes=hashes, signatures=signatures, bands=bands,
        nbytes=np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
        ids=np.array([d.id for d in survivors], dtype=str), sources=np.array([d.source for d in survivors], dtype=str),
    )  # fmt: skip
    _write_jsonl(_chunk_path(work, "clean", index, ".rejected.jsonl"), rejected)
    marker = {"fingerprint": fingerprint, "records": len(records), "survivors": len(survivors), "counts": counts.to_json()}
    write_text_atomic(_chunk_path(work, "clean", index, ".json"), json.dumps(marker))
    return marker


def _finish_chunk(worker: _Worker, index: int, keep: np.ndarray, keeper_ids: dict[int, str], exact: np.ndarray, offset: int, fingerprint: str) -> dict:
    """Phase 3 on one chunk: split, kept documents, full ledger, tokens."""
    work, settings = worker.work, worker.config.settings
    docs = _read_jsonl(_chunk_path(work, "clean", index, ".docs.jsonl"))
    arrays = np.load(_chunk_path(work, "clean", index, ".npz"))
    val = is_validation(arrays["hashes"], settings.val_fraction, settings.seed)
    ledger = _read_jsonl(_chunk_path(work, "clean", index, ".rejected.jsonl"))
    kept: list[dict] = []
    for local, doc in enumerate(docs):
        keeper = int(keep[local])
        if keeper == offset + local:
            split = "val" if val[local] else "train"
            kept.append({"id": doc["id"], "source": doc["source"], "split": split, "text": doc["text"]})
            ledger.append({"id": doc["id"], "source": doc["source"], "status": "kept", "split": split})
        else:
            stage = "exact_dedup" if exact[local] else "near_dedup"
            ledger.append({"id": doc["id"], "source": doc["source"], "status": "duplicate", "stage": stage, "duplicate_of": keeper_ids[keeper]})
    out = work.parent
    _write_jsonl(out / "documents" / f"{index:06d}.jsonl", kept)
    _write_jsonl(out / "ledger" / f"{index:06d}.jsonl", ledger)
    summary: dict = {"fingerprint": fingerprint, "kept": Counter(), "kept_bytes": Counter(), "tokens": Counter()}
    for doc in kept:
        summary["kept"][f"{doc['source']}/{doc['split']}"] += 1
        summary["kept_bytes"][f"{doc['source']}/{doc['split']}"] += len(doc["text"].encode("utf-8"))
    if worker.tokenizer is not None:
        summary["tokens"] = _tokenize_chunk(worker, index, kept, arrays["hashes"][[int(keep[i]) == offset + i for i in range(len(docs))]])
    summary["diversity"] = chunk_facts((doc for local, doc in enumerate(docs) if int(keep[local]) == offset + local), worker.cleaner.quality.identify)
    write_text_atomic(_chunk_path(work, "finish", index, ".json"), json.dumps(summary))
    return summary


def _tokenize_chunk(worker: _Worker, index: int, kept: list[dict], hashes: np.ndarray) -> Counter:
    """Token ids of the kept documents, each followed by <|endoftext|>, per split, with the
    document boundaries, sources and hashes that mixing needs. Special-token strings inside a
    document are plain text: a corpus cannot inject control tokens."""
    tokenizer = worker.tokenizer
    dtype = token_dtype(tokenizer.vocab_size)
    arrays: dict[str, np.ndarray] = {}
    tokens: Counter = Counter()
    for split in SPLITS:
        rows = [(n, d) for n, d in enumerate(kept) if d["split"] == split]
        ids = [tokenizer.encode_ordinary(d["text"]) + [tokenizer.eot_id] for _, d in rows]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        arrays[f"{split}_tokens"] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays[f"{split}_sources"] = np.array([d["source"] for _, d in rows], dtype=str)
        arrays[f"{split}_hashes"] = hashes[[n for n, _ in rows]].astype(np.uint64) if rows else np.zeros(0, np.uint64)
        for (_, d), n in zip(rows, lengths):
            tokens[f"{d['source']}/{split}"] += int(n)
    _save_npz(_chunk_path(worker.work, "tokens", index, ".npz"), **arrays)
    return tokens


# ---- the run -----------------------------------------------------------------------------
def prepare(config: PrepareConfig, out: str | Path, progress: bool = True, executor: Executor | None = None) -> PrepareResult:
    """Run the whole pipeline into `out`; resumes a run interrupted there. The per-chunk work
    runs on `executor`, by default the one the settings name (`executor`, `workers`, `address`)."""
    out = Path(out)
    _check_output_folder(out, config.sources)
    work = out / "work"
    tokenizer = None
    if config.settings.tokenizer:
        from scratchlm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.settings.tokenizer)
        if tokenizer.eot_id is None:
            raise ConfigError(f"{config.settings.tokenizer}: the tokenizer has no <|endoftext|> token to separate documents")
    if config.cleaning.filters.enabled and config.cleaning.filters.languages:
        check_languages(config.cleaning.filters.languages)
    owned = executor is None
    if owned:
        settings = config.settings
        executor = make_executor(settings.executor, settings.workers, *worker_setup(config, out), settings.address)
    try:
        for folder in ("clean", "finish", "tokens"):
            (work / folder).mkdir(parents=True, exist_ok=True)
        return _run(config, out, tokenizer, executor, progress)
    finally:
        if owned:
            executor.close()


def worker_setup(config: PrepareConfig, out: str | Path) -> tuple[type, tuple]:
    """What an executor builds once in each worker process for a run into `out`: pass it to
    `make_executor` (or `LocalExecutor`, `RayExecutor`) to give `prepare` an executor of your own.

    The paths the workers open (the output folder, the tokenizer, word lists) are made absolute
    here: a Ray worker runs in the folder where its node was started, not in this one."""
    settings, filters = config.settings, config.cleaning.filters
    config = dataclasses.replace(
        config,
        settings=dataclasses.replace(settings, tokenizer=_absolute(settings.tokenizer)),
        cleaning=dataclasses.replace(config.cleaning, filters=dataclasses.replace(
            filters, bad_words_file=_absolute(filters.bad_words_file), url_blocklist=_absolute(filters.url_blocklist))),
    )  # fmt: skip
    return _Worker, (config, Path(out).absolute() / "work", config.settings.tokenizer)


def _absolute(path: str | None) -> str | None:
    return str(Path(path).absolute()) if path else path


def _run(config: PrepareConfig, out: Path, tokenizer, executor: Executor, progress: bool) -> PrepareResult:
    start_time = time.perf_counter()
    work = out / "work"
    timings: dict[str, float] = {}

    # Phase 1: clean
    phase_start = time.perf_counter()
    state = _input_state(config.sources)  # one walk of the input folders serves both
    fingerprint = _clean_fingerprint(config, state)
    issues: list[dict] = []
    issue_counts: Counter = Counter()
    total_bytes = _input_bytes(state)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="clean", disable=not progress, file=sys.stderr)
    chunk_count = 0
    resumed = 0

    def chunks() -> Iterator[tuple]:
        nonlocal chunk_count, resumed
        for index, records in enumerate(_read_chunks(config, issues, issue_counts, bar)):
            chunk_count = index + 1
            marker = _load_marker(_chunk_path(work, "clean", index, ".json"))
            if marker and marker["fingerprint"] == fingerprint:
                resumed += 1
            else:
                yield _clean_chunk, index, records, fingerprint

    executor.run(chunks(), lambda marker: None, "clean")
    if bar.total and bar.n < bar.total:  # it counted text, not the JSON, CSV or HTML around it
        bar.update(bar.total - bar.n)
    bar.close()
    _remove_stale(out, chunk_count)
    markers = {i: _load_marker(_chunk_path(work, "clean", i, ".json")) for i in range(chunk_count)}
    timings["clean"] = time.perf_counter() - phase_start

    # Phase 2: deduplicate
    phase_start = time.perf_counter()
    keeper, exact, dedup_stats = _deduplicate(config, work, markers, executor)
    dedup_digest = hashlib.sha256(keeper.tobytes()).hexdigest()[:16]
    timings["deduplicate"] = time.perf_counter() - phase_start

    # Phase 3: finish
    phase_start = time.perf_counter()
    finish_fp = _digest([fingerprint, dedup_digest, config.settings.val_fraction, config.settings.seed, tokenizer.content_hash if tokenizer else None])
    offsets = _chunk_offsets(markers)
    referenced = _keeper_ids(work, keeper, offsets)
    finished: dict[int, dict] = {}
    todo = []
    for index in range(chunk_count):
        marker = _load_marker(_chunk_path(work, "finish", index, ".json"))
        if marker and marker["fingerprint"] == finish_fp:
            finished[index] = marker
            continue
        lo, hi = offsets[index], offsets[index + 1]
        ids = {int(k): referenced[int(k)] for k in np.unique(keeper[lo:hi]) if int(k) in referenced}
        todo.append((_finish_chunk, index, keeper[lo:hi], ids, exact[lo:hi], int(lo), finish_fp))
    bar = tqdm(total=len(todo), unit="chunk", desc="finish", disable=not progress or not todo, file=sys.stderr)

    executor.run(todo, lambda summary: bar.update(1), "finish")
    bar.close()
    finished = {i: _load_marker(_chunk_path(work, "finish", i, ".json")) for i in range(chunk_count)}
    timings["finish"] = time.perf_counter() - phase_start

    # Phase 4: mix and write shards
    phase_start = time.perf_counter()
    kept_bytes = Counter()
    for marker in finished.values():
        kept_bytes.update(marker["kept_bytes"])
    train_bytes = {s.name: kept_bytes.get(f"{s.name}/train", 0) for s in config.sources}
    target = parse_bytes(config.settings.train_bytes) if config.settings.train_bytes else None
    epochs = source_epochs(train_bytes, {s.name: s.weight for s in config.sources}, target)
    manifest = None
    _remove_shards(out)  # shards of an earlier run must not outlive a change of documents
    if tokenizer is not None:
        manifest = _write_shards(out, work, tokenizer, chunk_count, epochs, config, progress)
    timings["mix"] = time.perf_counter() - phase_start
    timings["total"] = time.perf_counter() - start_time

    stats = _stats(config, markers, finished, dedup_stats, epochs, issues, issue_counts, manifest, timings, total_bytes)
    stats["chunks"] = {"total": chunk_count, "cleaned_before": resumed}
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    write_report(stats, out / "report.md")
    _write_documents_manifest(out, chunk_count, finished, config)
    return PrepareResult(out, stats, manifest)


def _check_output_folder(out: Path, sources: Iterable[SourceConfig]) -> None:
    """The output folder belongs to prepare: refuse a file, a folder holding other things (files
    there would be replaced), and a folder inside the inputs (a second run would read it)."""
    if out.exists() and not out.is_dir():
        raise InputFileError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not ((out / "work").is_dir() or (out / "stats.json").is_file()):
        raise InputFileError(f"{out}: folder is not empty and holds no earlier prepare run; give a new or empty folder")
    target = out.resolve()
    for source in sources:
        for pattern in source.paths:
            parts = Path(pattern).parts
            fixed = [p for p in itertools.takewhile(lambda part: not glob.has_magic(part), parts)]
            base = Path(*fixed) if fixed else Path(".")
            reads_below = len(fixed) == len(parts) and base.is_dir() or "**" in parts
            if reads_below and (target == base.resolve() or base.resolve() in target.parents):
                raise InputFileError(f"{out}: output folder is inside the input {pattern} (a second run would read it); put it elsewhere")


def _read_chunks(config: PrepareConfig, issues: list[dict], issue_counts: Counter, bar: tqdm) -> Iterator[list]:
    """The input records, cut into chunks at `chunk_docs` documents or `chunk_bytes` bytes.
    Read issues go to `issues`; under `strict`, any bad input stops the run."""
    settings = config.settings
    limit = parse_bytes(settings.chunk_bytes)
    chunk: list = []
    size = 0
    for source in config.sources:
        for record in read_source(source):
            if isinstance(record, ReadIssue):
                if settings.strict:
                    raise InputFileError(f"{record.where}: {record.issue.replace('_', ' ')} (--strict stops at bad input)")
                issue_counts[record.issue] += 1
                if len(issues) < MAX_ISSUES_KEPT:
                    issues.append(dataclasses.asdict(record))
                continue
            if isinstance(record, ReadFailure):
                if settings.strict:
                    raise InputFileError(f"{record.detail} (--strict stops at bad input)")
                nbytes = record.nbytes
            else:
                nbytes = len(record.text)
            bar.update(nbytes)
            chunk.append(record)
            size += nbytes
            if len(chunk) >= settings.chunk_docs or size >= limit:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def _load_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _remove_stale(out: Path, chunk_count: int) -> None:
    """Chunks past the end of the input, left by an earlier run over more input."""
    for folder in (out / "work" / "clean", out / "work" / "finish", out / "work" / "tokens", out / "documents", out / "ledger"):
        if folder.is_dir():
            for path in folder.iterdir():
                stem = path.name.split(".")[0]
                if stem.isdigit() and int(stem) >= chunk_count:
                    path.unlink()


def _deduplicate(config: PrepareConfig, work: Path, markers: dict[int, dict], executor: Executor) -> tuple[np.ndarray, np.ndarray, dict]:
    """keeper[i]: the global index of the document that document i is a copy of (itself when
    kept); exact[i]: whether it is an exact copy. Exact copies are found first, on the driver
    from 8-byte hashes; near copies among the remaining documents as large pipelines find them:
    band hashes shuffled by (band, hash range) to the workers, which pair the documents of each
    bucket; the candidate pairs verified (shingles computed on the workers, chunk by chunk);
    connected components by union-find on the driver, which holds only the pairs."""
    count = len(markers)
    hashes = np.concatenate([np.zeros(0, np.uint64)] + [_chunk_arrays(work, i, "hashes")[0] for i in range(count)])
    n = len(hashes)
    if config.settings.exact_dedup and n:
        _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        keeper = first[inverse].astype(np.int64)
    else:
        keeper = np.arange(n, dtype=np.int64)
    exact = keeper != np.arange(n)
    unique = np.flatnonzero(~exact)
    stats: dict = {"documents": int(n), "exact_duplicates": int(exact.sum()), "near_duplicates": 0}
    minhash = config.minhash
    if minhash.enabled and len(unique) > 1:
        bands_rows = minhash.lsh_params()
        stats["bands"], stats["rows"] = bands_rows
        stats["s_curve"] = s_curve(*bands_rows)
        stats["verify"] = minhash.verify
        stats["removal_curve"] = removal_curve(minhash)
        offsets = _chunk_offsets(markers)
        band_rows = _unique_rows(work, offsets, unique, "bands", np.uint64, bands_rows[0])
        partitions = max(1, -(-len(unique) // _GROUP_DOCUMENTS))
        groups: list[np.ndarray] = []
        executor.run(((_bucket_pairs, idx, h) for idx, h in band_groups(band_rows, partitions)), groups.append, "near_dedup")
        pairs = merge_pairs(groups, len(unique))
        del groups, band_rows
        stats["candidate_pairs"] = int(len(pairs))
        signatures = shingles = None
        if minhash.verify == "estimate":
            signatures = _unique_rows(work, offsets, unique, "signatures", np.uint32, minhash.num_perm, work / "signatures.npy")
        elif minhash.verify == "exact":
            shingles = _candidate_shingles(executor, offsets, unique, pairs)
        pairs = verify_pairs(pairs, minhash, signatures, shingles.__getitem__ if shingles is not None else None)
        stats["verified_pairs"] = int(len(pairs))
        if signatures is not None:
            del signatures
            (work / "signatures.npy").unlink()
        near = clusters(len(unique), pairs)
        near_global = unique[near]
        keeper[unique] = near_global
        keeper = keeper[keeper]  # an exact copy of a near duplicate points at the cluster's keeper
        stats["near_duplicates"] = int((near != np.arange(len(unique))).sum())
    sizes = np.bincount(np.bincount(keeper)) if n else np.zeros(0, np.int64)
    stats["cluster_sizes"] = {str(size): int(count) for size, count in enumerate(sizes) if size > 1 and count}
    return keeper, exact, stats


# Documents per band group of the near-dedup shuffle: a group's task holds 16 bytes per document.
_GROUP_DOCUMENTS = 1 << 22


def _chunk_arrays(work: Path, index: int, *names: str) -> list[np.ndarray]:
    with np.load(_chunk_path(work, "clean", index, ".npz")) as arrays:
        return [arrays[name] for name in names]


def _chunk_offsets(markers: dict[int, dict]) -> np.ndarray:
    """offsets[c]: the global index of chunk c's first surviving document; the last is the total."""
    return np.concatenate([[0], np.cumsum([markers[i]["survivors"] for i in range(len(markers))])]).astype(np.int64)


def _unique_rows(work: Path, offsets: np.ndarray, unique: np.ndarray, name: str, dtype, width: int, mapped: Path | None = None) -> np.ndarray:
    """Rows of a per-chunk array (band hashes, signatures) for the documents in `unique`, in
    order; in a memory-mapped file at `mapped` when given (signatures: 4 bytes per permutation)."""
    shape = (len(unique), width)
    out = np.lib.format.open_memmap(mapped, mode="w+", dtype=dtype, shape=shape) if mapped else np.empty(shape, dtype=dtype)
    row = 0
    for index in range(len(offsets) - 1):
        mine = unique[(unique >= offsets[index]) & (unique < offsets[index + 1])] - offsets[index]
        if len(mine):
            out[row : row + len(mine)] = _chunk_arrays(work, index, name)[0][mine]
        row += len(mine)
    return out


def _bucket_pairs(worker: "_Worker", indices: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    return bucket_pairs(indices, hashes)


def _candidate_shingles(executor: Executor, offsets: np.ndarray, unique: np.ndarray, pairs: np.ndarray) -> dict[int, np.ndarray]:
    """Shingle hashes of every document in a candidate pair (by its index in `unique`), computed
    on the workers from the cleaned chunks, each chunk read once."""
    needed = np.unique(pairs)
    chunk_of = np.searchsorted(offsets, unique[needed], side="right") - 1
    shingles: dict[int, np.ndarray] = {}
    tasks = ((_chunk_shingles, int(c), unique[needed[chunk_of == c]] - offsets[c], needed[chunk_of == c]) for c in np.unique(chunk_of))
    executor.run(tasks, shingles.update, "near_dedup")
    return shingles


def _chunk_shingles(worker: "_Worker", index: int, positions: np.ndarray, keys: np.ndarray) -> dict[int, np.ndarray]:
    docs = _read_jsonl(_chunk_path(worker.work, "clean", index, ".docs.jsonl"))
    ngram = worker.config.minhash.ngram
    return {int(key): shingle_hashes(docs[int(p)]["text"], ngram) for key, p in zip(keys, positions)}


def _keeper_ids(work: Path, keeper: np.ndarray, offsets: np.ndarray) -> dict[int, str]:
    """Ids of the documents that others are duplicates of, for the ledger."""
    wanted = np.unique(keeper[keeper != np.arange(len(keeper))])
    ids: dict[int, str] = {}
    for index in range(len(offsets) - 1):
        lo, hi = offsets[index], offsets[index + 1]
        mine = wanted[(wanted >= lo) & (wanted < hi)]
        if len(mine):
            chunk_ids = np.load(_chunk_path(work, "clean", index, ".npz"))["ids"]
            ids.update({int(k): str(chunk_ids[k - lo]) for k in mine})
    return ids


def _write_shards(out: Path, work: Path, tokenizer, chunk_count: int, epochs: dict[str, float], config: PrepareConfig, progress: bool) -> dict:
    """The training stream: `ceil(max epochs)` passes over the chunks, each in its own seeded
    order, each document written as many times as `repeats` says; then validation, in order."""
    writer = ShardWriter(out, tokenizer.vocab_size, config.settings.shard_tokens)
    passes = max(1, int(np.ceil(max(epochs.values(), default=1.0))))
    rng = np.random.default_rng(config.settings.seed)
    written: Counter = Counter()
    bar = tqdm(total=passes * chunk_count + chunk_count, unit="chunk", desc="mix", disable=not progress, file=sys.stderr)
    for epoch in range(passes):
        for index in rng.permutation(chunk_count):
            arrays = np.load(_chunk_path(work, "tokens", int(index), ".npz"))
            sources = arrays["train_sources"]
            copies = np.zeros(len(sources), dtype=np.int64)
            for name, share in epochs.items():
                mine = sources == name
                copies[mine] = repeats(arrays["train_hashes"][mine], share, config.settings.seed)
            _add_documents(writer, "train", arrays, copies > epoch, written)
            bar.update(1)
    for index in range(chunk_count):
        arrays = np.load(_chunk_path(work, "tokens", index, ".npz"))
        _add_documents(writer, "val", arrays, np.ones(len(arrays["val_sources"]), dtype=bool), written)
        bar.update(1)
    bar.close()
    tokenizer.save(out / "tokenizer.json")
    tokens_by_source: dict[str, dict[str, int]] = {}
    for (source, split), n in written.items():
        tokens_by_source.setdefault(source, {})[split] = n
    extra = {"source": "scratchlm data prepare", "split_rule": f"{config.settings.val_fraction:.2%} of documents, by a hash of their text",
             "epochs": epochs, "tokens_by_source": tokens_by_source, "sources": [source_provenance(s) for s in config.sources]}  # fmt: skip
    return writer.finish(tokenizer, extra)


def _add_documents(writer: ShardWriter, split: str, arrays, chosen: np.ndarray, written: Counter) -> None:
    if not chosen.any():
        return
    offsets = arrays[f"{split}_offsets"]
    tokens = arrays[f"{split}_tokens"]
    sources = arrays[f"{split}_sources"]
    pieces = [tokens[offsets[i] : offsets[i + 1]] for i in np.flatnonzero(chosen)]
    for i in np.flatnonzero(chosen):
        written[str(sources[i]), split] += int(offsets[i + 1] - offsets[i])
    writer.add(split, np.concatenate(pieces), documents=len(pieces))


def _remove_shards(out: Path) -> None:
    for split in SPLITS:
        for old in out.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"):
            old.unlink()
    for name in ("manifest.json", "tokenizer.json"):
        (out / name).unlink(missing_ok=True)


def _write_documents_manifest(out: Path, chunk_count: int, finished: dict[int, dict], config: PrepareConfig) -> None:
    files = [{"file": f"{i:06d}.jsonl", "documents": dict(finished[i]["kept"]), "bytes": dict(finished[i]["kept_bytes"])} for i in range(chunk_count)]
    manifest = {"format": "scratchlm-documents", "version": 1, "fields": ["id", "source", "split", "text"],
                "sources": [source_provenance(s) for s in config.sources], "files": files}  # fmt: skip
    write_text_atomic(out / "documents" / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def _stats(config, markers, finished, dedup, epochs, issues, issue_counts, manifest, timings, total_bytes) -> dict:
    counts = StageCounts()
    for marker in markers.values():
        counts.merge_json(marker["counts"])
    ledger: Counter = Counter()
    for marker in finished.values():
        for key, n in marker["kept"].items():
            ledger[key] += n
    inputs = sum(m["records"] for m in markers.values())
    kept = sum(ledger.values())
    rejected = sum(counts.rejected.values())
    duplicates = dedup["exact_duplicates"] + dedup["near_duplicates"]
    sources = {}
    for source in config.sources:
        name = source.name
        stages = {stage: {"documents": counts.entered[stage, name], "bytes": counts.entered_bytes[stage, name]} for stage in ("read", "extract", "normalize", "filter", "pii")}
        reasons = {reason: {"documents": n, "bytes": counts.rejected_bytes[s, reason]} for (s, reason), n in counts.rejected.items() if s == name}
        kept_docs = {split: ledger.get(f"{name}/{split}", 0) for split in SPLITS}
        kept_bytes = {split: sum(m["kept_bytes"].get(f"{name}/{split}", 0) for m in finished.values()) for split in SPLITS}
        tokens = {split: sum(m["tokens"].get(f"{name}/{split}", 0) for m in finished.values()) for split in SPLITS}
        written = manifest["tokens_by_source"].get(name, {}).get("train", 0) if manifest else None
        # Repeats are decided per document, so on a small source what was written can differ
        # from the target; both are reported.
        epochs_written = written / tokens["train"] if written is not None and tokens["train"] else None
        sources[name] = {"stages": stages, "rejected": reasons, "kept": kept_docs, "kept_bytes": kept_bytes, "tokens_once": tokens,
                         "weight": source.weight, "epochs": epochs.get(name), "epochs_written": epochs_written,
                         "license": source.license, "url": source.url, "notes": source.notes}  # fmt: skip
    reasons = Counter()
    for (_, reason), n in counts.rejected.items():
        reasons[reason] += n
    return {
        "inputs": inputs,
        "kept": kept,
        "rejected": rejected,
        "duplicates": duplicates,
        "accounted": inputs == kept + rejected + duplicates,
        "input_bytes": total_bytes,
        "sources": sources,
        "rejection_reasons": dict(reasons.most_common()),
        "examples": counts.examples,
        "pii_replaced": dict(counts.pii),
        "dedup": dedup,
        "read_issues": {"counts": dict(issue_counts), "first": issues},
        "stage_seconds": dict(counts.seconds),
        "phase_seconds": timings,
        "tokens": {split: sum(f["tokens"] for f in manifest["splits"][split]) for split in SPLITS} if manifest else None,
        "diversity": diversity((m.get("diversity") for m in finished.values()), sources, manifest),
        "config": {"settings": dataclasses.asdict(config.settings), "cleaning": dataclasses.asdict(config.cleaning),
                   "minhash": dataclasses.asdict(config.minhash), "sources": [dataclasses.asdict(s) for s in config.sources]},
    }  # fmt: skip
