"""Personal information: e-mail addresses, IP addresses and phone numbers become placeholders.

The patterns aim at precision over recall, because a false positive damages ordinary text
(version numbers, dates, prices) while a missed address in a pretraining corpus is rare:
- e-mail: the usual local@domain.tld shape, matched in time linear in the text;
- IPv4: four dotted numbers, each 0-255, not part of a longer dotted run (so version strings
  like 1.2.3.4.5 are left alone); IPv6: eight groups, or a shortened form with `::` and at least two groups before
  it (so `::1` and Python slices like `x[1::2]` are left alone);
- phone: an optional +country code, then groups separated by spaces, dots or dashes, with at
  least 9 digits in all and the North-American or international group shapes; a bare run of
  digits is not a phone number (it could be an id, a price or a year).
"""

import re
from dataclasses import dataclass

# Linear time: the lookbehind refuses a start after any character of the local part, so a match
# is tried once per run of such characters, not at every position inside it. (Without `%` in
# it, each letter after a `%` was a start: 100 KB of percent-encoded text took 4 to 7 s.) In the
# domain each label must end at a dot, so the repeated group splits one way only.
_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?=\d)(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d]|\.\d)")
_H = r"[0-9A-Fa-f]{1,4}"
_IPV6 = re.compile(
    rf"(?<![\w:])(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{2,6}}:{_H}(?::{_H}){{0,4}})(?![\w:])"
)
_PHONE = re.compile(
    r"(?=[+(\d])(?<![\w+])"  # the lookahead first: most positions fail on one character
    r"(?:\+\d{1,3}[ .-]?)?"  # country code
    r"(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"  # area code, bracketed or followed by a separator
    r"\d{3,4}[ .-]\d{3,4}"
    r"(?![\w])"
)


@dataclass(frozen=True)
class PIIConfig:
    enabled: bool = True
    email: str = "<EMAIL>"  # the placeholder; an empty string switches that kind off
    ip: str = "<IP_ADDRESS>"
    phone: str = "<PHONE>"


def _phone_or_keep(placeholder: str, counts: dict[str, int]):
    def replace(match: re.Match) -> str:
        if sum(ch.isdigit() for ch in match.group()) < 9:
            return match.group()
        counts["phone"] += 1
        return placeholder

    return replace


def redact_pii(text: str, config: PIIConfig = PIIConfig()) -> tuple[str, dict[str, int]]:
    """The text with placeholders, and how many of each kind were replaced."""
    counts = {"email": 0, "ip": 0, "phone": 0}
    if not config.enabled:
        return text, counts
    if config.email and "@" in text:
        text, counts["email"] = _EMAIL.subn(config.email, text)
    if config.ip:
        text, v4 = _IPV4.subn(config.ip, text)
        text, v6 = _IPV6.subn(config.ip, text) if "::" in text or text.count(":") >= 7 else (text, 0)
        counts["ip"] = v4 + v6
    if config.phone:
        text = _PHONE.sub(_phone_or_keep(config.phone, counts), text)
    return text, counts
