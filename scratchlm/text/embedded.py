"""The embedded default corpus: English prose that ships with every CPython.

* `pydoc_data.topics`: the language reference and tutorial-style help pages behind `help()`
  (about 465 kB of English).
* Docstrings of the pure-Python standard library, read with `ast` from the source files (no
  module is imported, so nothing runs).

Both exist offline on every machine with Python, so the quickstart and the tests need no
download. The text differs slightly between Python versions.
"""

import ast
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

# Packages whose sources are tests, vendored code or GUI demos rather than documented library.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}


def stdlib_source_files() -> list[Path]:
    """The standard library's .py files, sorted, without test suites or vendored packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    )


def pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def docstrings(source: str) -> Iterator[str]:
    """Module, class and function docstrings of one Python source, in file order."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 80:  # one-liners are mostly "Return x." and add little prose
                yield doc


def embedded_documents(max_bytes: int | None = None) -> Iterator[str]:
    """Documents of the embedded corpus: every pydoc topic, then stdlib docstrings, in a fixed
    order, stopping once `max_bytes` of UTF-8 have been yielded."""
    total = 0

    def budget_left() -> bool:
        return max_bytes is None or total < max_bytes

    for doc in pydoc_topics():
        if not budget_left():
            return
        total += len(doc.encode())
        yield doc
    for path in stdlib_source_files():
        for doc in docstrings(path.read_text(encoding="utf-8", errors="replace")):
            if not budget_left():
                return
            total += len(doc.encode())
            yield doc


def embedded_corpus_text(max_bytes: int | None = None) -> str:
    """The embedded corpus as one text, documents separated by blank lines."""
    return "\n\n".join(embedded_documents(max_bytes)) + "\n"
