"""`scratchlm data prepare` against Hugging Face datatrove on the same corpus, same stages, same run.

    python benchmarks/planted_corpus.py --books ../shared/corpora/*.txt --size 36MB --out /tmp/scratchlm-datatrove/corpus.jsonl
    python3 -m venv /tmp/dtvenv && /tmp/dtvenv/bin/pip install "datatrove[processing]==0.10.1" "spacy>=3.8" orjson aiohttp "ray==RAY_VERSION"
    python benchmarks/datatrove_reference.py --corpus /tmp/scratchlm-datatrove/corpus.jsonl
        [--planted PATH] [--workers 1,2] [--executors local,ray] [--repeats 1]
        [--datatrove-python /tmp/dtvenv/bin/python] [--ray-address ADDR] [--scratchlm-executor auto]
        [--work DIR] [--out benchmarks/results/datatrove_reference.json]

RAY_VERSION is the one this project's venv has (`python -c "import ray; print(ray.__version__)"`).
Outside datatrove's `processing` extra it needs spacy (its English word tokenizer, used by its
filters and MinHash), orjson (its JSONL reader) and aiohttp (its bad-word filter resolves the
list's cache path through fsspec's HTTP filesystem).

Input: the corpus is cut into `--shards` JSONL files (default: the most workers asked for),
consecutive lines, in a folder both tools read: datatrove gives each task whole files, so one
file would leave all but one worker idle. Order is kept, so "the first of a cluster" is the same
document for both.

scratchlm: `scratchlm data prepare --input SHARDS --out OUT --set workers=N --set
sources.id_field=id --quiet`, plus the Ray executor for `ray` (`--executor ray`, or `--set
executor=ray` when only the config key exists, or skipped when neither does; `--scratchlm-executor`
forces one), with its default cleaning, filters and MinHash and no tokenizer. Each document's fate
is read from its ledger (OUT/ledger/*.jsonl).

datatrove, in its own venv (`--datatrove-python`), runs a pipeline this script writes
(WORK/datatrove_pipeline.py) with the settings scratchlm's config has at run time, so the two
agree even when scratchlm's defaults move:
  1. JsonlReader -> FTFYFormatter (scratchlm normalises with ftfy first) -> GopherRepetitionFilter
     -> GopherQualityFilter -> C4QualityFilter -> [C4BadWordsFilter, when scratchlm's bad_words is
     on] -> FineWebQualityFilter -> PIIFormatter (scratchlm redacts e-mail and IP addresses,
     and phone numbers, which datatrove has no step for) -> JsonlWriter (the survivors, uncompressed)
     -> MinhashDedupSignature; tasks = workers = N. The rule thresholds are scratchlm's
     `FilterConfig` values (which copy datatrove's defaults, and FineWeb's
     `filter_no_terminal_punct=False`). The bad-word list is scratchlm's shipped
     `wordlists/en.txt`, put where datatrove's cache looks for its download (no network needed;
     the same words on both sides).
  2. MinhashDedupBuckets: tasks = bands (datatrove needs tasks divisible by its buckets), workers = N.
  3. MinhashDedupCluster: 1 task.
  4. JsonlReader (the survivors) -> MinhashDedupFilter -> JsonlWriter; tasks = workers = N.
MinHash: word n-grams, bands x rows and seed as scratchlm's `MinHashConfig().lsh_params()` gives
(datatrove's `num_buckets` x `hashes_per_bucket`), datatrove's default 64-bit xxhash.
Executors: `LocalPipelineExecutor(tasks, workers)`; for `ray`, `RayPipelineExecutor` on a local
Ray started with N CPUs (or `--ray-address`). No language filter or tokenizer on either side.

Measured per (tool, executor, workers): wall seconds of the whole command (interpreter start,
imports and Ray start included, as a user waits for them), documents/s and MB/s of input, the
documents kept, and the recall of the planted pairs (planted_corpus.py): a pair counts as found
when both documents end in one duplicate cluster (so one of the two is removed). datatrove keeps
an arbitrary member of a cluster, scratchlm the first, so the copy is not always the one removed.
Recall is over the pairs both of whose documents passed the filters in that tool (reported
beside it), and again over the pairs that passed in every run, so that both tools are scored on
the same pairs; clusters are read back from datatrove's own files after the timed run
(survivors of step 1, the .dups pairs of step 2). "Unplanned removals": documents removed whose
cluster holds no planted partner of theirs (false positives, or genuine repeats in the text).

Differences that remain (see the rejection counts printed under the tables): datatrove's
filters count spaCy tokens, punctuation included, where scratchlm counts whitespace-separated
words, so its Gopher alpha-words rule rejects punctuation-heavy prose (dialogue, CPython's docs)
that scratchlm keeps, and its C4 sentence count differs; datatrove makes every LSH candidate a
duplicate, scratchlm verifies candidates against `minhash.threshold` (its `verify`), so pairs
below the threshold that LSH happens to catch count for datatrove only; datatrove shingles its
own simplified, spaCy-tokenized text, so its Jaccard of a pair differs a little from the one in
planted.json; scratchlm also removes exact copies by hash before MinHash and writes a ledger.

Results: a markdown table on stdout, and JSON (--out) with the machine, versions and commit.
"""

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from scratchlm.data.prepare import load_prepare_config
from provenance import git_commit

# The pipeline datatrove runs, written to WORK/datatrove_pipeline.py and run by its own Python
# with one argument, a JSON file of settings. It times each of its four steps.
DATATROVE_PIPELINE = r'''
import json
import os
import shutil
import sys
import time


def main(params):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (C4BadWordsFilter, C4QualityFilter, FineWebQualityFilter,
                                            GopherQualityFilter, GopherRepetitionFilter)
    from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    run, n = params["run"], params["workers"]
    filters = params["filters"]
    if filters.get("bad_words_file"):
        # C4BadWordsFilter downloads LDNOOBW's list into this cache path unless a copy is there
        # with its ".completed" marker (datatrove.io.cached_asset_path_or_download).
        from datatrove.io import strip_protocol
        from datatrove.pipeline.filters.c4_filters import _EN_BADWORDS_URL
        from huggingface_hub import cached_assets_path

        folder = cached_assets_path(library_name="datatrove", namespace="filters", subfolder="c4_badwords")
        path = os.path.join(folder, strip_protocol(_EN_BADWORDS_URL).replace("/", "_"))
        shutil.copyfile(filters["bad_words_file"], path)
        open(path + ".completed", "a").close()

    minhash = MinhashConfig(**params["minhash"])
    steps = [JsonlReader(params["input"], text_key="text", id_key="id")]
    if params["ftfy"]:
        steps.append(FTFYFormatter())
    if filters.get("gopher_repetition"):
        steps.append(GopherRepetitionFilter(**filters["gopher_repetition"]))
    if filters.get("gopher_quality"):
        steps.append(GopherQualityFilter(**filters["gopher_quality"]))
    if filters.get("c4"):
        steps.append(C4QualityFilter(**filters["c4"]))
    if filters.get("bad_words_file"):
        steps.append(C4BadWordsFilter(default_language="en"))
    if filters.get("fineweb"):
        steps.append(FineWebQualityFilter(**filters["fineweb"]))
    if params["pii"]:
        steps.append(PIIFormatter())
    steps += [JsonlWriter(f"{run}/filtered", output_filename="${rank}.jsonl", compression=None),
              MinhashDedupSignature(output_folder=f"{run}/signatures", config=minhash)]
    stages = [
        ("filter_and_signatures", steps, n),
        ("buckets", [MinhashDedupBuckets(input_folder=f"{run}/signatures", output_folder=f"{run}/buckets", config=minhash)],
         minhash.num_buckets),
        ("cluster", [MinhashDedupCluster(input_folder=f"{run}/buckets", output_folder=f"{run}/remove", config=minhash)], 1),
        ("dedup_filter", [JsonlReader(f"{run}/filtered", text_key="text", id_key="id"),
                          MinhashDedupFilter(input_folder=f"{run}/remove"),
                          JsonlWriter(f"{run}/output", output_filename="${rank}.jsonl", compression=None)], n),
    ]
    if params["executor"] == "ray":
        import ray
        from datatrove.executor.ray import RayPipelineExecutor as Executor

        if params["ray_address"]:
            ray.init(address=params["ray_address"], log_to_driver=False)
        else:
            ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
    else:
        Executor = LocalPipelineExecutor
    seconds = {}
    for name, pipeline, tasks in stages:
        start = time.perf_counter()
        Executor(pipeline=pipeline, tasks=tasks, workers=min(n, tasks), logging_dir=f"{run}/logs/{name}").run()
        seconds[name] = time.perf_counter() - start
    if params["executor"] == "ray":
        ray.shutdown()
    with open(f"{run}/stage_seconds.json", "w") as handle:
        json.dump(seconds, handle)


if __name__ == "__main__":  # datatrove's local executor starts workers with forkserver
    with open(sys.argv[1]) as handle:
        main(json.load(handle))
'''


# ---- settings: scratchlm's config, said in datatrove's terms -------------------------------
def datatrove_settings(config) -> dict:
    """The datatrove steps and arguments equivalent to scratchlm's effective prepare config."""
    f = config.cleaning.filters
    languages = getattr(f, "languages", None)
    if f.enabled and languages:
        raise SystemExit("datatrove_reference: scratchlm's config filters by language; datatrove's LanguageFilter "
                         "needs fastText lid.176 downloaded. Compare without languages.")
    filters: dict = {}
    if f.enabled and f.gopher_repetition:
        filters["gopher_repetition"] = {
            "dup_line_frac": f.dup_line_frac, "dup_para_frac": f.dup_para_frac,
            "dup_line_char_frac": f.dup_line_char_frac, "dup_para_char_frac": f.dup_para_char_frac,
            "top_n_grams": [[n, getattr(f, f"top_{n}gram_char_frac")] for n in (2, 3, 4)],
            "dup_n_grams": [[n, getattr(f, f"dup_{n}gram_char_frac")] for n in range(5, 11)],
        }
    if f.enabled and f.gopher_quality:
        filters["gopher_quality"] = {
            "min_doc_words": f.min_words, "max_doc_words": f.max_words,
            "min_avg_word_length": f.min_mean_word_length, "max_avg_word_length": f.max_mean_word_length,
            "max_symbol_word_ratio": f.max_symbol_word_ratio, "max_bullet_lines_ratio": f.max_bullet_lines_ratio,
            "max_ellipsis_lines_ratio": f.max_ellipsis_lines_ratio,
            "max_non_alpha_words_ratio": f.min_alpha_words_ratio,  # a minimum despite datatrove's name
            "min_stop_words": f.min_stop_words,
        }
    if f.enabled and f.c4:
        filters["c4"] = {
            "split_paragraph": True, "remove_citations": f.c4_remove_citations,
            "filter_no_terminal_punct": f.c4_terminal_punct, "min_num_sentences": f.c4_min_sentences,
            "min_words_per_line": f.c4_min_words_per_line, "max_word_length": f.c4_max_word_length,
            "filter_lorem_ipsum": f.c4_lorem_ipsum, "filter_javascript": f.c4_drop_javascript_lines,
            "filter_curly_bracket": f.c4_curly_bracket, "filter_policy": f.c4_drop_policy_lines,
        }
    if f.enabled and f.fineweb:
        filters["fineweb"] = {
            "line_punct_thr": f.line_punct_thr, "short_line_thr": f.short_line_thr,
            "short_line_length": f.short_line_length, "char_duplicates_ratio": f.char_duplicates_ratio,
            "new_line_ratio": f.new_line_ratio,
        }
    if f.enabled and getattr(f, "bad_words", False):
        import scratchlm.data.filters as filters_module

        languages = tuple(getattr(f, "bad_words_languages", ("en",)))
        if languages != ("en",) or getattr(f, "bad_words_file", None):
            raise SystemExit(f"datatrove_reference: only the English bad-word list is mirrored, not {languages}")
        filters["bad_words_file"] = str(Path(filters_module.__file__).parent / "wordlists" / "en.txt")
    minhash = config.minhash
    if not minhash.enabled:
        raise SystemExit("datatrove_reference: scratchlm's MinHash is off; nothing to compare")
    bands, rows = minhash.lsh_params()
    return {
        "ftfy": config.cleaning.normalize.enabled and config.cleaning.normalize.fix_encoding,
        "pii": config.cleaning.pii.enabled,
        "filters": filters,
        "minhash": {"n_grams": minhash.ngram, "num_buckets": bands, "hashes_per_bucket": rows, "seed": minhash.seed},
        "scratchlm_minhash": dataclasses.asdict(minhash),
    }


# ---- input -----------------------------------------------------------------------------------
def write_shards(corpus: Path, folder: Path, shards: int) -> tuple[int, int]:
    """Cut the corpus into `shards` files of consecutive lines; (documents, bytes)."""
    lines = corpus.read_bytes().splitlines(keepends=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    per = -(-len(lines) // shards)
    for k in range(shards):
        (folder / f"{k:05d}.jsonl").write_bytes(b"".join(lines[k * per : (k + 1) * per]))
    return len(lines), corpus.stat().st_size


def read_ids(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line)["id"] for line in handle]


# ---- runs ------------------------------------------------------------------------------------
def scratchlm_executor_args(mode: str, executor: str, address: str | None, scratchlm: str) -> list[str] | None:
    """Arguments that put scratchlm on `executor`, or None when this checkout cannot."""
    if mode == "auto":
        help_text = subprocess.run([scratchlm, "data", "prepare", "--help"], capture_output=True, text=True).stdout
        from scratchlm.data.prepare import PrepareSettings

        has_key = "executor" in {f.name for f in dataclasses.fields(PrepareSettings)}
        mode = "flag" if "--executor" in help_text else "set" if has_key else "off"
    if mode == "flag":
        return ["--executor", executor] + (["--address", address] if address else [])
    if mode == "set":
        return ["--set", f"executor={executor}"] + (["--set", f"address={address}"] if address else [])
    return [] if executor == "local" else None


def run_scratchlm(scratchlm: str, shards: Path, run: Path, workers: int, executor_args: list[str]) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    command = [scratchlm, "data", "prepare", "--input", str(shards), "--out", str(run / "out"), "--set", f"workers={workers}",
               "--set", "sources.id_field=id", "--quiet", *executor_args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"scratchlm failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    stats = json.loads((run / "out" / "stats.json").read_text())
    status: dict[str, str] = {}
    keeper: dict[str, str] = {}
    for path in sorted((run / "out" / "ledger").glob("*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                entry = json.loads(line)
                status[entry["id"]] = entry["status"]
                if entry["status"] == "duplicate":
                    keeper[entry["id"]] = entry["duplicate_of"]
    reached = {i for i, s in status.items() if s != "rejected"}
    kept = {i for i, s in status.items() if s == "kept"}
    return {"wall_s": wall, "command": command, "phase_seconds": stats.get("phase_seconds"),
            "bands_rows": [stats["dedup"].get("bands"), stats["dedup"].get("rows")],
            "reached": reached, "kept": kept, "cluster": {i: keeper.get(i, i) for i in reached}}


def run_datatrove(python: str, script: Path, shards: Path, run: Path, workers: int, executor: str, address: str | None,
                  settings: dict) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    params = {"input": str(shards), "run": str(run), "workers": workers, "executor": executor, "ray_address": address,
              **{k: v for k, v in settings.items() if k != "scratchlm_minhash"}}
    (run / "params.json").write_text(json.dumps(params, indent=1))
    env = {**os.environ, "HF_ASSETS_CACHE": str(run / "hf_assets"), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with (run / "log.txt").open("w") as log:
        done = subprocess.run([python, str(script), str(run / "params.json")], stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (run / "log.txt").read_text(errors="replace")[-3000:]
        raise SystemExit(f"datatrove failed (log: {run / 'log.txt'}):\n{tail}")
    return {"wall_s": wall, "stage_seconds": json.loads((run / "stage_seconds.json").read_text()),
            "step_seconds": datatrove_step_seconds(run / "logs" / "filter_and_signatures" / "stats.json"),
            **datatrove_outcome(run, workers)}


def datatrove_step_seconds(path: Path) -> dict[str, float] | None:
    """datatrove's own timer of each step of step 1, summed over tasks. Its MinHash step times
    its whole loop, so it includes the steps before it, which feed it lazily."""
    if not path.is_file():
        return None

    def name(step: dict) -> str:  # "📖 - READER: 🐿 Jsonl" -> "READER Jsonl"
        return " ".join(step["name"].encode("ascii", "ignore").decode().replace("-", " ").replace(":", " ").split())

    return {name(step): step["time_stats"]["total"] for step in json.loads(path.read_text()) if "time_stats" in step}


def datatrove_outcome(run: Path, tasks: int) -> dict:
    """Which documents passed the filters and were kept, and the clusters from the .dups pairs."""
    filtered = sorted((run / "filtered").glob("*.jsonl"))
    if [p.name for p in filtered] != [f"{r:05d}.jsonl" for r in range(tasks)]:
        # Step 4 gives task r the r-th file; a task with no survivors writes none, and the .remove
        # indices of the tasks after it would then meet the wrong file.
        raise SystemExit(f"datatrove_reference: {run / 'filtered'} should hold one file per task; "
                         "use a larger corpus or fewer workers")
    by_position = {int(p.stem): read_ids(p) for p in filtered}
    reached = {i for ids in by_position.values() for i in ids}
    kept = {i for p in (run / "output").glob("*.jsonl") for i in read_ids(p)}
    parent = {i: i for i in reached}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for path in (run / "buckets").glob("*.dups"):
        data = path.read_bytes()
        for f1, d1, f2, d2 in struct.iter_unpack("<4I", data):
            a, b = root(by_position[f1][d1]), root(by_position[f2][d2])
            if a != b:
                parent[b] = a
    cluster = {i: root(i) for i in reached}
    sizes = Counter(cluster.values())
    removed = len(reached) - len(kept)
    expected = sum(size - 1 for size in sizes.values())
    if removed != expected:
        print(f"warning: datatrove removed {removed} documents, its clusters say {expected}", file=sys.stderr)
    return {"reached": reached, "kept": kept, "cluster": cluster}


# ---- recall ----------------------------------------------------------------------------------
def recall(outcome: dict, pairs: list[dict], buckets: list[str], only: set[int] | None = None) -> dict:
    """Per bucket: planted pairs, those whose two documents passed the filters (and are in
    `only`, indices into `pairs`, when given), and those found among them."""
    reached, cluster = outcome["reached"], outcome["cluster"]
    rows = {b: {"planted": 0, "both_reached": 0, "found": 0} for b in ["exact", *buckets]}
    for n, pair in enumerate(pairs):
        row = rows[pair["bucket"]]
        row["planted"] += 1
        copy, original = pair["copy"], pair["original"]
        if copy in reached and original in reached and (only is None or n in only):
            row["both_reached"] += 1
            row["found"] += cluster[copy] == cluster[original]
    for row in rows.values():
        row["recall"] = row["found"] / row["both_reached"] if row["both_reached"] else None
    return rows


def eligible(outcome: dict, pairs: list[dict]) -> set[int]:
    return {n for n, p in enumerate(pairs) if p["copy"] in outcome["reached"] and p["original"] in outcome["reached"]}


def unplanned_removals(outcome: dict, pairs: list[dict]) -> int:
    """Removed documents whose cluster holds no planted partner of theirs."""
    partners: dict[str, list[str]] = defaultdict(list)
    for pair in pairs:
        partners[pair["copy"]].append(pair["original"])
        partners[pair["original"]].append(pair["copy"])
    cluster = outcome["cluster"]
    return sum(1 for i in outcome["reached"] - outcome["kept"] if not any(cluster.get(p) == cluster[i] for p in partners[i]))


# ---- report ----------------------------------------------------------------------------------
def recall_table(rows: list[dict], cols: list[str], field: str) -> list[str]:
    lines = ["| tool | executor | workers | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        if r.get("skipped"):
            continue
        cells = []
        for c in cols:
            b = r[field][c]
            cells.append(f"{b['recall']:.1%} ({b['found']}/{b['both_reached']})" if b["both_reached"] else "n/a")
        lines.append(f"| {r['tool']} | {r['executor']} | {r['workers']} | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict], buckets: list[str]) -> str:
    lines = ["| tool | executor | workers | wall s | docs/s | MB/s | passed filters | kept | unplanned removals |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['tool']} | {r['executor']} | {r['workers']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['tool']} | {r['executor']} | {r['workers']} | {r['wall_s']:.1f} | {r['docs_per_s']:,.0f} | "
                     f"{r['mb_per_s']:.2f} | {r['passed_filters']:,} | {r['kept']:,} | {r['unplanned_removals']} |")
    cols = ["exact", *buckets]
    lines += ["", "Recall of planted pairs, found / pairs whose two documents passed that tool's filters:", ""]
    lines += recall_table(rows, cols, "recall")
    lines += ["", "The same over the pairs that passed the filters in every run above:", ""]
    lines += recall_table(rows, cols, "recall_common")
    seen = set()
    for r in rows:
        if not r.get("skipped") and r["tool"] not in seen:
            seen.add(r["tool"])
            top = ", ".join(f"{k} {v}" for k, v in sorted(r["rejections"].items(), key=lambda kv: -kv[1])[:6])
            lines.append(f"\n{r['tool']} rejected: {top}")
    return "\n".join(lines)


def rejections(tool: str, run: Path) -> dict[str, int]:
    """Documents each rule rejected: scratchlm's stats.json, datatrove's per-filter stats."""
    if tool == "scratchlm":
        return json.loads((run / "out" / "stats.json").read_text())["rejection_reasons"]
    found: dict[str, int] = {}
    for step in json.loads((run / "logs" / "filter_and_signatures" / "stats.json").read_text()):
        if "FILTER" in step["name"]:
            name = step["name"].encode("ascii", "ignore").decode().split(":")[-1].strip()
            for key, value in step["stats"].items():
                if key.startswith("dropped_"):
                    found[f"{name}:{key.removeprefix('dropped_')}"] = value if isinstance(value, int) else value["total"]
    return found


def version_of(python: str, package: str) -> str | None:
    """The installed version of `package` as `python` sees it (None when it lacks it); "python": its own."""
    code = ("import platform; print(platform.python_version())" if package == "python" else
            f"from importlib.metadata import version; print(version({package!r}))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="JSONL from planted_corpus.py")
    parser.add_argument("--planted", type=Path, default=None, help="its pairs (default: planted.json beside --corpus)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--executors", default="local,ray", help="comma-separated: local, ray")
    parser.add_argument("--tools", default="scratchlm,datatrove", help="comma-separated: scratchlm, datatrove")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration, tools taking turns; the median wall time counts")
    parser.add_argument("--shards", type=int, default=None, help="input files (default: the most workers asked for)")
    parser.add_argument("--datatrove-python", default="/tmp/dtvenv/bin/python")
    parser.add_argument("--scratchlm", default=str(Path(sys.executable).parent / "scratchlm"), help="the scratchlm command")
    parser.add_argument("--scratchlm-executor", choices=["auto", "flag", "set", "off"], default="auto",
                        help="how scratchlm is put on Ray: flag (--executor ray), set (--set executor=ray), off (skip its Ray runs), "
                             "auto (flag if `data prepare --help` lists it, else set if the config key exists, else off)")
    parser.add_argument("--ray-address", default=None, help="a running Ray cluster for both tools (default: each starts a local one)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scratchlm-datatrove/work"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/datatrove_reference.json"))
    args = parser.parse_args()
    workers_list = [int(w) for w in args.workers.split(",")]
    executors = args.executors.split(",")
    tools = args.tools.split(",")
    if not set(executors) <= {"local", "ray"} or not set(tools) <= {"scratchlm", "datatrove"}:
        parser.error("--executors takes local and ray, --tools scratchlm and datatrove")

    planted = json.loads((args.planted or args.corpus.parent / "planted.json").read_text())
    pairs = planted["pairs"]
    edges = planted["settings"]["buckets"]
    buckets = [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]
    shards = args.work / "input"
    documents, nbytes = write_shards(args.corpus, shards, args.shards or max(workers_list))
    config = load_prepare_config(None, {"sources": {"id_field": "id"}}, [str(shards)])  # what run_scratchlm runs
    settings = datatrove_settings(config)
    script = args.work / "datatrove_pipeline.py"
    script.write_text(DATATROVE_PIPELINE)

    runs: dict[tuple, list[dict]] = defaultdict(list)
    skipped: dict[tuple, str] = {}
    for repeat in range(args.repeats):
        for executor in executors:
            for workers in workers_list:
                for tool in tools:
                    key = (tool, executor, workers)
                    run = args.work / f"{tool}-{executor}-{workers}"
                    if tool == "scratchlm":
                        extra = scratchlm_executor_args(args.scratchlm_executor, executor, args.ray_address, args.scratchlm)
                        if extra is None:
                            skipped[key] = "this scratchlm has no Ray executor (see --scratchlm-executor)"
                            continue
                        result = run_scratchlm(args.scratchlm, shards, run, workers, extra)
                        if result["bands_rows"] != [settings["minhash"]["num_buckets"], settings["minhash"]["hashes_per_bucket"]]:
                            print(f"warning: scratchlm ran {result['bands_rows']} bands x rows, datatrove got "
                                  f"{settings['minhash']}", file=sys.stderr)
                    else:
                        result = run_datatrove(args.datatrove_python, script, shards, run, workers, executor,
                                               args.ray_address, settings)
                    runs[key].append(result)
                    print(f"[{repeat + 1}/{args.repeats}] {tool} {executor} workers={workers}: {result['wall_s']:.1f} s",
                          file=sys.stderr, flush=True)

    rows = []
    outcomes = {}
    for executor in executors:
        for workers in workers_list:
            for tool in tools:
                key = (tool, executor, workers)
                if key in skipped:
                    rows.append({"tool": tool, "executor": executor, "workers": workers, "skipped": skipped[key]})
                    continue
                results = runs[key]
                wall = statistics.median(r["wall_s"] for r in results)
                outcomes[key] = last = results[-1]
                row = {"tool": tool, "executor": executor, "workers": workers, "wall_s": wall,
                       "wall_s_each": [r["wall_s"] for r in results], "docs_per_s": documents / wall, "mb_per_s": nbytes / 1e6 / wall,
                       "passed_filters": len(last["reached"]), "kept": len(last["kept"]),
                       "removed_as_duplicates": len(last["reached"]) - len(last["kept"]),
                       "unplanned_removals": unplanned_removals(last, pairs), "recall": recall(last, pairs, buckets),
                       "rejections": rejections(tool, args.work / f"{tool}-{executor}-{workers}")}
                for extra in ("phase_seconds", "bands_rows", "stage_seconds", "step_seconds", "command"):
                    if extra in last:
                        row[extra] = last[extra]
                rows.append(row)
    common = set.intersection(*(eligible(o, pairs) for o in outcomes.values())) if outcomes else set()
    for row in rows:
        if not row.get("skipped"):
            row["recall_common"] = recall(outcomes[row["tool"], row["executor"], row["workers"]], pairs, buckets, common)
    table = markdown(rows, buckets)
    print(table)

    versions = {"python": platform.python_version(), "datatrove python": version_of(args.datatrove_python, "python"),
                "datatrove": version_of(args.datatrove_python, "datatrove"), "spacy": version_of(args.datatrove_python, "spacy"),
                "ray": version_of(sys.executable, "ray"), "ray (datatrove venv)": version_of(args.datatrove_python, "ray")}
    result = {
        "commit": git_commit(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "versions": versions,
        "corpus": {"path": str(args.corpus), "documents": documents, "bytes": nbytes, "shards": args.shards or max(workers_list),
                   "planted": planted["counts"], "settings": planted["settings"]},
        "datatrove_settings": settings,
        "repeats": args.repeats,
        "rows": rows,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
