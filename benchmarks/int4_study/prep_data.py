"""Turn the Project Gutenberg books (cp1252, CRLF, licence header/footer) into clean UTF-8 text.

    python benchmarks/int4_study/prep_data.py SRC_DIR OUT_DIR

Each book is decoded as cp1252 (strict: any undefined byte is an error), CRLF becomes LF, and
the text between the '*** START OF' and '*** END OF' marker lines is kept (the licence is the same
in every book, so it would otherwise leak from the training books into the held-out one).
"""
import sys
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for book in sorted(src.glob("pg*.txt")):
    raw = book.read_bytes()
    try:
        text = raw.decode("utf-8")
        enc = "utf-8"
    except UnicodeDecodeError:
        text = raw.decode("cp1252")
        enc = "cp1252"
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    lines = text.split("\n")
    start = next(i for i, l in enumerate(lines) if l.strip().startswith("*** START OF"))
    end = next(i for i, l in enumerate(lines) if l.strip().startswith("*** END OF"))
    body = "\n".join(lines[start + 1:end]).strip() + "\n"
    (out / book.name).write_text(body, encoding="utf-8")
    print(f"{book.name}: {enc}, {len(raw):,} bytes in, {len(body.encode()):,} UTF-8 bytes out, {len(body):,} chars")
