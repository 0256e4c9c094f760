"""GPT-2's byte-to-unicode table.

Hugging Face `tokenizer.json` files and GGUF vocabularies store byte-level BPE tokens as strings
in which each byte is replaced by a printable character, so that spaces and control bytes stay
visible (space is 'Ġ', newline 'Ċ'). Our own files store the raw bytes; these two tables
translate between the two.
"""

from functools import cache


@cache
def byte_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character: printable Latin-1 bytes map to themselves and
    the rest to code points from 256 upward, in byte order (GPT-2's `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@cache
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def bytes_to_token_string(data: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


def token_string_to_bytes(token: str) -> bytes:
    """Inverse of `bytes_to_token_string`; raises KeyError on a character outside the table."""
    table = unicode_to_byte()
    return bytes(table[c] for c in token)
