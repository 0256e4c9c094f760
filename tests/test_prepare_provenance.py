"""Data you can vouch for: each source's licence, URL and notes travel into the manifest,
`stats.json` and the report; documents carry their page URL for the blocklist and the domain
counts; the diversity section adds up to what was kept."""

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scratchlm.data.prepare import PrepareResult, load_prepare_config, prepare
from scratchlm.data.sources import SourceConfig, read_source
from scratchlm.errors import ConfigError
from scratchlm.text.embedded import embedded_documents

# Only the bad-word check and the URL blocklist: the heuristic rule sets would reject most of
# the embedded corpus (code documentation) and blur what these tests count.
ONLY_VOUCHING = "[filters]\nbad_words = true\nc4 = false\ngopher_quality = false\ngopher_repetition = false\nfineweb = false\n"


@pytest.fixture(scope="module")
def run(corpus_tokenizer, tmp_path_factory) -> PrepareResult:
    """A two-source run: `web` (JSONL with page URLs, some on a blocklisted domain, one page
    with a listed bad word, one about Scunthorpe) and `books` (text files, no URLs)."""
    root = tmp_path_factory.mktemp("vouch")
    corpus_tokenizer.save(root / "tokenizer.json")
    docs = [d for d in embedded_documents() if len(d.split()) > 60 and "xxx" not in d.lower()][:120]
    pages = [{"text": d, "url": f"https://{'www.' if i % 2 else ''}site{i % 3}.example.org/{i}"} for i, d in enumerate(docs[:80])]
    pages[5]["url"] = "https://ads.tracker.example.com/page"  # a subdomain of a blocklisted domain
    pages[6]["url"] = "http://TRACKER.example.com:8080/x"  # the domain itself, in capitals, with a port
    pages[7]["text"] += "\nThe forum thread was full of porn links."  # a listed word
    pages[8]["text"] += "\nA classic walk from Scunthorpe to Cockermouth, with analysis of the passes."
    (root / "web.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pages))
    (root / "books").mkdir()
    for i, doc in enumerate(docs[80:]):
        (root / "books" / f"{i}.txt").write_text(doc)
    (root / "blocklist.txt").write_text("# ad networks\ntracker.example.com\n")
    (root / "data.toml").write_text(
        f'tokenizer = "{root / "tokenizer.json"}"\nval_fraction = 0.1\nworkers = 1\n'
        '[[sources]]\nname = "web"\npaths = ["web.jsonl"]\nurl_field = "url"\nweight = 0.6\n'
        'license = "ODC-BY-1.0"\nurl = "https://example.org/crawl"\nnotes = "a sample of a 2024 crawl"\n'
        '[[sources]]\nname = "books"\npaths = ["books"]\nweight = 0.4\n'
        'license = "PSF-2.0"\nurl = "https://docs.python.org/3/license.html"\nnotes = "Python documentation"\n'
        f'{ONLY_VOUCHING}url_blocklist = "{root / "blocklist.txt"}"\n'
    )
    return prepare(load_prepare_config(root / "data.toml"), root / "out", progress=False)


def ledger(out: Path) -> dict[str, dict]:
    return {row["id"]: row for path in sorted((out / "ledger").glob("*.jsonl")) for row in map(json.loads, path.open())}


def test_licence_url_and_notes_of_each_source_reach_manifest_stats_and_report(run):
    manifest = json.loads((run.out / "manifest.json").read_text())
    assert manifest["sources"] == [
        {"name": "web", "license": "ODC-BY-1.0", "url": "https://example.org/crawl", "notes": "a sample of a 2024 crawl", "weight": 0.6},
        {"name": "books", "license": "PSF-2.0", "url": "https://docs.python.org/3/license.html", "notes": "Python documentation", "weight": 0.4},
    ]
    stats = json.loads((run.out / "stats.json").read_text())
    assert {k: stats["sources"]["books"][k] for k in ("license", "url", "notes")} == {
        "license": "PSF-2.0", "url": "https://docs.python.org/3/license.html", "notes": "Python documentation"}  # fmt: skip
    report = (run.out / "report.md").read_text()
    assert "| web | ODC-BY-1.0 | https://example.org/crawl | 0.6 | a sample of a 2024 crawl |" in report
    assert "| books | PSF-2.0 |" in report


def test_an_unknown_source_key_is_still_an_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[[sources]]\nname = "a"\npaths = ["x"]\nlicence = "MIT"\n')
    with pytest.raises(ConfigError, match="unknown key 'licence'; did you mean 'license'"):
        load_prepare_config(config)


def test_blocklisted_domains_and_bad_words_are_rejected_with_their_reason(run):
    rows = ledger(run.out)
    web = str(run.out.parent / "web.jsonl")
    assert rows[f"{web}:6"]["reason"] == rows[f"{web}:7"]["reason"] == "url:blocklisted"
    assert rows[f"{web}:8"]["reason"] == "toxicity:bad_word"
    assert rows[f"{web}:9"]["status"] == "kept"  # Scunthorpe, classic, Cockermouth, analysis, passes
    assert run.stats["rejection_reasons"] == {"url:blocklisted": 2, "toxicity:bad_word": 1}
    assert run.stats["sources"]["web"]["rejected"]["url:blocklisted"]["documents"] == 2


def test_diversity_adds_up_to_the_kept_documents_and_is_plotted(run):
    diversity = run.stats["diversity"]
    kept = {name: sum(s["kept"].values()) for name, s in run.stats["sources"].items()}
    for name, group in [*diversity["sources"].items(), ("all", diversity["overall"])]:
        documents = sum(kept.values()) if name == "all" else kept[name]
        assert group["documents"] == documents
        # Every 8th document of each source in each chunk: at least an eighth, at most one more per chunk.
        assert documents / 8 <= sum(group["languages"].values()) <= documents / 8 + 2 * len(list((run.out / "ledger").glob("*.jsonl")))
        assert max(group["languages"], key=group["languages"].get) == "en"
        assert sum(n for _, _, n in group["length_bytes"]["histogram"]) == documents
        p = group["length_bytes"]["percentiles"]
        assert group["length_bytes"]["min"] <= p["p5"] <= p["p50"] <= p["p95"] <= group["length_bytes"]["max"]
    assert diversity["share_unit"] == "tokens"
    assert sum(g["share"] for g in diversity["sources"].values()) == pytest.approx(1.0)
    assert diversity["sources"]["web"]["share"] == pytest.approx(0.6, abs=0.05)
    web = diversity["sources"]["web"]["domains"]
    assert web["documents_with_url"] == kept["web"]
    assert {host for host, _ in web["top"]} <= {f"{w}site{i}.example.org" for w in ("", "www.") for i in range(3)}
    assert diversity["sources"]["books"]["domains"] == {"documents_with_url": 0, "top": []}
    assert (run.out / "diversity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](diversity.png)" in (run.out / "report.md").read_text()


def test_url_field_is_read_from_jsonl_csv_and_parquet(tmp_path):
    rows = [{"text": "first page", "link": "https://a.example/1"}, {"text": "second page", "link": None}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (tmp_path / "a.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "link"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.table({"text": [r["text"] for r in rows], "link": [r["link"] for r in rows]}), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        docs = list(read_source(SourceConfig(name="s", paths=[str(tmp_path / name)], url_field="link")))
        assert [d.url for d in docs] == ["https://a.example/1", None], name
    assert [d.url for d in read_source(SourceConfig(name="s", paths=[str(tmp_path / "a.jsonl")]))] == [None, None]


def test_provenance_edits_do_not_redo_cleaning_but_an_edited_blocklist_does(tmp_path):
    docs = [d for d in embedded_documents() if len(d.split()) > 60 and "xxx" not in d.lower()][:30]
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": d, "url": f"https://s{i % 3}.example.org/"}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "block.txt").write_text("nothing.example.net\n")

    def run_with(license_: str) -> PrepareResult:
        (tmp_path / "data.toml").write_text(
            f'workers = 1\nchunk_docs = 10\n[[sources]]\nname = "web"\npaths = ["web.jsonl"]\nurl_field = "url"\nlicense = "{license_}"\n'
            f'{ONLY_VOUCHING}url_blocklist = "block.txt"\n'  # relative to the config file
        )
        return prepare(load_prepare_config(tmp_path / "data.toml"), tmp_path / "out", progress=False)

    first = run_with("CC-BY-4.0")
    assert first.stats["kept"] == 30 and first.stats["chunks"]["cleaned_before"] == 0
    again = run_with("CC0-1.0")
    assert again.stats["chunks"]["cleaned_before"] == 3  # a licence changes no document
    assert json.loads((tmp_path / "out" / "documents" / "manifest.json").read_text())["sources"][0]["license"] == "CC0-1.0"
    (tmp_path / "block.txt").write_text("s1.example.org\n")  # same name, new content
    edited = run_with("CC0-1.0")
    assert edited.stats["chunks"]["cleaned_before"] == 0
    assert edited.stats["rejection_reasons"] == {"url:blocklisted": 10}
