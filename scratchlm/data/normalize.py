"""Text normalisation: the first stage every document passes through.

Broken encodings are repaired with ftfy (mojibake such as "doesnâ€™t", HTML entities left in
plain text, C1 controls standing for Windows-1252 characters), then the text is put in a
Unicode normal form, control characters are removed and line endings and whitespace are made
regular. Normalising before the filters and deduplication means that two copies of a page that
differ only in encoding accidents or trailing spaces hash the same.
"""

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

import ftfy

from scratchlm.errors import ConfigError


@dataclass(frozen=True)
class NormalizeConfig:
    enabled: bool = True
    fix_encoding: bool = True  # ftfy: mojibake, HTML entities, C1 controls, surrogates
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_control: bool = True  # control characters other than tab and newline
    whitespace: bool = True  # \r\n and \r -> \n, no trailing spaces, at most one blank line in a row
    collapse_spaces: bool = False  # runs of spaces inside a line -> one space (off: code keeps its alignment)
    strip_gutenberg: bool = False  # a Project Gutenberg book -> the text between its START and END lines

    def __post_init__(self) -> None:
        if self.unicode_form not in ("NFC", "NFKC", "none"):
            raise ConfigError(f"normalize: unicode_form must be NFC, NFKC or none, not {self.unicode_form!r}")


# Quotes, dashes and full-width forms are kept: they carry meaning a model should learn, and
# ftfy's defaults would flatten curly quotes to ASCII.
_FTFY = ftfy.TextFixerConfig(uncurl_quotes=False, fix_character_width=False, normalization=None, explain=False)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")  # keeps \t and \n
_TRAILING = re.compile(r"[ \t\u00a0\u3000]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_SPACE_RUNS = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")
# "*** START OF THE PROJECT GUTENBERG EBOOK PRIDE AND PREJUDICE ***" (older books: "THIS").
_GUTENBERG_START = re.compile(r"^[ \t]*\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK[^\n]*\n", re.M | re.I)
_GUTENBERG_END = re.compile(r"^[ \t]*\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK", re.M | re.I)


MAX_PASSES = 4


def normalize_text(text: str, config: NormalizeConfig = NormalizeConfig()) -> str:
    """The normalised text. Passes repeat until nothing changes, because one repair can expose
    another (a C1 control turned into a quote can complete a mojibake sequence), and
    normalising twice must give what normalising once gave."""
    if not config.enabled:
        return text
    if config.strip_gutenberg:
        text = strip_gutenberg(text)
    for _ in range(MAX_PASSES):
        fixed = _normalize_once(text, config)
        if fixed == text:
            break
        text = fixed
    return text


def strip_gutenberg(text: str) -> str:
    """The book inside Project Gutenberg's header and licence: the text between its "*** START
    OF ..." and "*** END OF ..." lines; the text unchanged when it does not have both."""
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, start.end()) if start else None
    return text[start.end() : end.start()] if start and end else text


def _normalize_once(text: str, config: NormalizeConfig) -> str:
    if config.whitespace:
        # Line endings first: ftfy and the control-character rule would otherwise see \r.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Mojibake is never pure ASCII; ftfy has nothing to do on ASCII text but HTML entities and
    # terminal escapes, and skipping it there triples this stage's speed on English text.
    if config.fix_encoding and (not text.isascii() or "&" in text or "\x1b" in text):
        text = ftfy.fix_text(text, _FTFY)
    if config.unicode_form != "none":
        text = unicodedata.normalize(config.unicode_form, text)
    if config.strip_control:
        text = _CONTROL.sub("", text)
    if config.whitespace:
        text = _BLANK_RUNS.sub("\n\n", _TRAILING.sub("\n", text + "\n")).strip("\n")
        text = text.rstrip()
    if config.collapse_spaces:
        text = _SPACE_RUNS.sub(" ", text)
    return text
