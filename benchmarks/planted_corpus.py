"""A JSONL corpus of book paragraphs with planted exact and near copies, for measuring dedup recall.

    python benchmarks/planted_corpus.py [--books BOOK.txt ...] [--size 36MB] [--seed 0]
        [--exact-share 0.05] [--near-share 0.10] [--buckets 0.5,0.6,0.7,0.8,0.9,1.0]
        [--out /tmp/scratchlm-datatrove/corpus.jsonl] [--planted PATH]

Writes `--out` ({"id", "text"} per line) and `planted.json` beside it (or `--planted`): every
planted pair (copy id, original id, kind, Jaccard) and the settings that made it. The same
arguments give the same bytes.

Text: the `--books` files (Project Gutenberg books are read as UTF-8, or as Windows-1252 when
they are not valid UTF-8, as pg84 is not; the Gutenberg header and licence are cut by
`normalize.strip_gutenberg`), or by default CPython's own prose, the values of
`pydoc_data.topics.topics`, so it runs on any machine. Paragraphs are the blocks between blank
lines, their hard-wrapped lines joined by spaces (a wrapped book line rarely ends in
punctuation, and FineWeb's `line_punct_ratio` rule would reject nearly every such document);
paragraphs of fewer than 3 words (chapter headings) are left out.

Base documents: consecutive paragraphs joined, separated by a blank line, until the document has
at least 60 words and 5 sentences and one of its paragraphs ends in . ! or ?, so that it
passes the Gopher (50 words) and C4 (5 sentences) minimums and FineWeb's `line_punct_ratio`
(which rejects a document whose lines nearly all end otherwise, as dialogue paragraphs ending
in a closing quote do) and reaches the deduplication stage. Once the text is used up, further
base documents are made of 5 to 12 sentences drawn at random from all of it, in paragraphs of 2
to 5, each paragraph's last sentence one that ends in . ! or ?: such documents share a sentence
now and then, which leaves their word-5-gram Jaccard near 0.1, far below any bucket, so no
unplanned near duplicates arise at the sizes used here. Past about 2.5 MB of three novels (or
0.4 MB of the default text), most base documents are of this second kind.

Planted copies, each of a different base document (so pairs do not overlap): `--exact-share` of
the base documents get an exact copy; `--near-share` of them a near copy, in equal numbers for
each Jaccard bucket [lo, hi) of `--buckets`. A near copy is its original with random word
edits (substitution by a word from the corpus vocabulary, deletion, insertion, swap of two
adjacent words; punctuation around a word stays), applied one at a time until the Jaccard
falls below a target drawn uniformly from the bucket; it is kept when it is still inside the
bucket, else the edits are drawn again (and after 20 tries another original is taken: a short
document cannot reach the 0.9-1.0 bucket, one edit already costs it 10 of its shingles).

Jaccard is that of the two texts' sets of word 5-grams with scratchlm's own definition of a word
(`scratchlm.data.dedup.words`: lowercase runs of Unicode word characters), computed exactly by
`scratchlm.data.dedup.exact_jaccard(a, b, 5)`, not estimated. It is measured on the texts as
written; scratchlm deduplicates them after cleaning (normalisation, C4 line rules), which
changed no pair's Jaccard on the three novels at 3 MB.

Order: all documents are shuffled, then any copy found before its original swaps places with
it, so that a keep-the-first deduplicator keeps the original.
"""

import argparse
import itertools
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.data.dedup import exact_jaccard
from scratchlm.data.normalize import strip_gutenberg
from scratchlm.units import parse_bytes

MIN_WORDS = 60
MIN_SENTENCES = 5
MIN_PARAGRAPH_WORDS = 3
TRIES_PER_ORIGINAL = 20
EDITS = ("substitute", "delete", "insert", "swap")

# A sentence ends at . ! or ?, possibly followed by a closing quote or bracket, then space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+")
_TERMINAL = re.compile(r"[.!?][\"'\u201d\u2019)\]]?$")
_TOKEN_PARTS = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)
_VOCAB_WORD = re.compile(r"^[a-z]{3,}$")


def read_book(path: Path) -> str:
    """A book's text: UTF-8, else Windows-1252 (older Gutenberg files), Gutenberg frame cut."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    return strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))


def default_texts() -> list[str]:
    """CPython's documentation topics (the text `help("TOPIC")` shows), in key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def paragraphs(text: str) -> list[str]:
    """Blocks between blank lines, each on one line, without the ones under 3 words."""
    found = []
    for block in re.split(r"\n[ \t]*\n", text):
        joined = " ".join(block.split())
        if len(joined.split()) >= MIN_PARAGRAPH_WORDS:
            found.append(joined)
    return found


def sentences(paragraph: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(paragraph) if s]


def count_sentences(paragraph: str) -> int:
    return len(sentences(paragraph))


def natural_documents(paras: list[str]) -> list[list[str]]:
    """Consecutive paragraphs, joined until a document has MIN_WORDS words, MIN_SENTENCES
    sentences and a paragraph ending in . ! or ?."""
    docs, current, words, count, ended = [], [], 0, 0, False
    for para in paras:
        current.append(para)
        words += len(para.split())
        count += count_sentences(para)
        ended = ended or para.endswith((".", "!", "?"))
        if words >= MIN_WORDS and count >= MIN_SENTENCES and ended:
            docs.append(current)
            current, words, count, ended = [], 0, 0, False
    return docs


def remixed_document(pool: list[str], ending: list[str], rng: random.Random) -> list[str]:
    """5-12 sentences drawn from the whole text, in paragraphs of 2-5 each closed by a sentence
    from `ending` (those ending in . ! or ?), with at least MIN_WORDS words."""
    want = rng.randint(MIN_SENTENCES, 12)
    paras: list[list[str]] = []
    count = words = 0
    while count < want or words < MIN_WORDS:
        size = rng.randint(2, 5)
        para = [rng.choice(pool) for _ in range(size - 1)] + [rng.choice(ending)]
        paras.append(para)
        count += size
        words += sum(len(s.split()) for s in para)
    return [" ".join(p) for p in paras]


# ---- near copies -------------------------------------------------------------------------
@dataclass
class NearCopy:
    text: str
    jaccard: float
    edits: dict[str, int] = field(default_factory=dict)


def _edit(paras: list[list[str]], vocabulary: list[str], rng: random.Random, kind: str) -> bool:
    """Apply one word edit in place; False when this kind cannot be applied where drawn."""
    lengths = [len(p) for p in paras]
    at = rng.randrange(sum(lengths))
    p = 0
    while at >= lengths[p]:
        at -= lengths[p]
        p += 1
    tokens = paras[p]
    lead, core, trail = _TOKEN_PARTS.match(tokens[at]).groups()
    if kind == "substitute":
        tokens[at] = lead + rng.choice(vocabulary) + trail
    elif kind == "insert":
        tokens.insert(at, rng.choice(vocabulary))
    elif kind == "delete":
        # A token that ends a sentence or is the paragraph's last word stays: the copy keeps its
        # sentence count, so it is not filtered where its original passes.
        if _TERMINAL.search(tokens[at]) or len(tokens) <= MIN_PARAGRAPH_WORDS:
            return False
        del tokens[at]
    else:  # swap the word parts of two neighbours, punctuation staying where it was
        if at + 1 >= len(tokens):
            return False
        lead2, core2, trail2 = _TOKEN_PARTS.match(tokens[at + 1]).groups()
        if not core or not core2 or core.lower() == core2.lower():
            return False
        tokens[at], tokens[at + 1] = lead + core2 + trail, lead2 + core + trail2
    return True


def near_copy(original: str, lo: float, hi: float, vocabulary: list[str], rng: random.Random) -> NearCopy | None:
    """A copy of `original` whose word-5-gram Jaccard with it lies in [lo, hi), or None."""
    for _ in range(TRIES_PER_ORIGINAL):
        target = rng.uniform(lo, hi)
        paras = [p.split(" ") for p in original.split("\n\n")]
        edits = dict.fromkeys(EDITS, 0)
        jaccard = 1.0
        while jaccard >= target:
            kind = rng.choice(EDITS)
            if not _edit(paras, vocabulary, rng, kind):
                continue
            edits[kind] += 1
            text = "\n\n".join(" ".join(p) for p in paras)
            jaccard = exact_jaccard(original, text, 5)
        if lo <= jaccard < hi:
            return NearCopy(text, jaccard, edits)
    return None


# ---- the corpus --------------------------------------------------------------------------
def build(texts: list[str], size: int, seed: int, exact_share: float, near_share: float,
          edges: list[float]) -> tuple[list[dict], list[dict], dict]:
    """(documents in file order, planted pairs, counts)."""
    rng = random.Random(seed)
    paras = [p for text in texts for p in paragraphs(text)]
    pool = [s for p in paras for s in sentences(p) if len(s.split()) >= MIN_PARAGRAPH_WORDS]
    ending = [s for s in pool if s.endswith((".", "!", "?"))]
    vocabulary = sorted({w.lower() for p in paras for w in p.split() if _VOCAB_WORD.match(w.lower())})
    if not ending or not vocabulary:
        raise SystemExit("planted_corpus: the given text has no usable sentences")

    # Base documents up to the share of the target size that is not planted copies (a JSON
    # line costs a few bytes more than its text: the sizes are of the lines).
    base_target = size / (1.0 + exact_share + near_share)
    base: list[str] = []
    natural = natural_documents(paras)
    total = 0
    for n in itertools.count():
        doc = "\n\n".join(natural[n] if n < len(natural) else remixed_document(pool, ending, rng))
        base.append(doc)
        total += len(json.dumps({"id": f"b{n:07d}", "text": doc}, ensure_ascii=False).encode()) + 1
        if total >= base_target:
            break
    counts = {"base": len(base), "natural": min(len(base), len(natural)), "remixed": max(0, len(base) - len(natural))}

    docs = [{"id": f"b{n:07d}", "text": text} for n, text in enumerate(base)]
    unused = list(range(len(base)))
    rng.shuffle(unused)
    pairs: list[dict] = []
    for n in range(round(exact_share * len(base))):
        original = docs[unused.pop()]
        copy = {"id": f"x{n:07d}", "text": original["text"]}
        docs.append(copy)
        pairs.append({"copy": copy["id"], "original": original["id"], "kind": "exact", "bucket": "exact",
                      "jaccard": exact_jaccard(original["text"], copy["text"], 5)})
    buckets = list(zip(edges, edges[1:]))
    per_bucket = round(near_share * len(base) / len(buckets))
    failed_originals = 0
    made = 0
    for lo, hi in buckets:
        done = 0
        while done < per_bucket:
            if not unused:
                raise SystemExit("planted_corpus: ran out of originals; lower --exact-share/--near-share")
            original = docs[unused.pop()]
            made_copy = near_copy(original["text"], lo, hi, vocabulary, rng)
            if made_copy is None:
                failed_originals += 1
                continue
            copy = {"id": f"n{made:07d}", "text": made_copy.text}
            docs.append(copy)
            pairs.append({"copy": copy["id"], "original": original["id"], "kind": "near", "bucket": f"{lo}-{hi}",
                          "jaccard": made_copy.jaccard, "edits": made_copy.edits})
            done += 1
            made += 1
    counts["exact_copies"] = sum(p["kind"] == "exact" for p in pairs)
    counts["near_copies"] = {f"{lo}-{hi}": sum(p["bucket"] == f"{lo}-{hi}" for p in pairs) for lo, hi in buckets}
    counts["originals_too_short_for_their_bucket"] = failed_originals

    rng.shuffle(docs)
    position = {d["id"]: i for i, d in enumerate(docs)}
    for pair in pairs:
        c, o = position[pair["copy"]], position[pair["original"]]
        if c < o:  # originals have one copy each and copies none: a swap breaks no other pair's order
            docs[c], docs[o] = docs[o], docs[c]
            position[pair["copy"]], position[pair["original"]] = o, c
    counts["documents"] = len(docs)
    return docs, pairs, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--books", type=Path, nargs="*", default=[], help="text files (default: pydoc_data.topics)")
    parser.add_argument("--size", default="36MB", help="size of the JSONL file (default: 36MB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact-share", type=float, default=0.05, help="exact copies, per base document")
    parser.add_argument("--near-share", type=float, default=0.10, help="near copies, per base document, split evenly over the buckets")
    parser.add_argument("--buckets", default="0.5,0.6,0.7,0.8,0.9,1.0", help="edges of the Jaccard buckets of near copies")
    parser.add_argument("--out", type=Path, default=Path("/tmp/scratchlm-datatrove/corpus.jsonl"))
    parser.add_argument("--planted", type=Path, default=None, help="pairs file (default: planted.json beside --out)")
    args = parser.parse_args()
    edges = [float(x) for x in args.buckets.split(",")]
    if len(edges) < 2 or edges != sorted(edges) or edges[0] <= 0 or edges[-1] > 1:
        parser.error("--buckets: at least two increasing edges in (0, 1]")

    texts = [read_book(p) for p in args.books] if args.books else default_texts()
    docs, pairs, counts = build(texts, parse_bytes(args.size), args.seed, args.exact_share, args.near_share, edges)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    planted = args.planted or args.out.parent / "planted.json"
    summary = {
        "corpus": str(args.out),
        "bytes": args.out.stat().st_size,
        "sources": [str(p) for p in args.books] or ["pydoc_data.topics"],
        "settings": {"size": args.size, "seed": args.seed, "exact_share": args.exact_share, "near_share": args.near_share,
                     "buckets": edges, "min_words": MIN_WORDS, "min_sentences": MIN_SENTENCES,
                     "jaccard": "scratchlm.data.dedup.exact_jaccard(original, copy, 5)"},
        "counts": counts,
    }
    planted.write_text(json.dumps({**summary, "pairs": pairs}, indent=1) + "\n")
    print(json.dumps({**summary, "planted": str(planted)}, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
