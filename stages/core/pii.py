"""PII patterns: found and redacted in training data (preprocess) and in answers (the endpoint).

Deliberately dependency-free: the endpoint's code folder ships this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# Card numbers: 13 to 19 digits, optionally grouped by spaces or dashes; confirmed by Luhn below.
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
# National-ID-like numbers: US SSN (123-45-6789), UK National Insurance (AB123456C).
NATIONAL_ID = re.compile(r"\b\d{3}-\d{2}-\d{4}\b|\b[A-CEGHJ-PR-TW-Z]{2}\d{6}[A-D]\b")
# Phone numbers: an optional +country code, then at least 9 digits in groups separated by
# spaces, dots, dashes or parentheses. Amounts ($2,500), years and ticket ids do not match.
PHONE = re.compile(r"(?<![\w$])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w%])")

ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

# RFC 2606 / RFC 6761 reserve these for documentation and tests: nobody's mailbox.
RESERVED_DOMAIN = re.compile(r"(?:^|\.)(?:example\.(?:com|org|net)|[^.]+\.(?:example|test|invalid|localhost))$"
                             r"|^(?:example|test|invalid|localhost)$", re.I)
# A URL; inside one, an address-like value of a message-id parameter (Usenet's selm=, msgid=...)
# or of a news: URL names a message, not a person.
URL = re.compile(r"\b(?:https?|ftp|news|nntp):(?://)?[^\s<>\"'()\[\]]+", re.I)
MESSAGE_ID_PARAM = re.compile(r"[?&;](?:selm|msgid|mid|message-?id|messageid|threadm|id)=[^&;#=]*$", re.I)

KINDS = (("email", EMAIL, "[EMAIL]"), ("card", CARD, "[CARD]"), ("id", NATIONAL_ID, "[ID]"),
         ("phone", PHONE, "[PHONE]"))


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def _luhn_ok(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _is_message_id(text: str, start: int) -> bool:
    """Whether the address at text[start] sits in a URL as a message id (news: URL or selm=...)."""
    for url in URL.finditer(text):
        if url.start() <= start < url.end():
            if url.group().lower().startswith(("news:", "nntp:")):
                return True
            return bool(MESSAGE_ID_PARAM.search(text[url.start():start]))
    return False


def _is_real(kind: str, text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    if kind == "email":
        return not RESERVED_DOMAIN.search(text.rsplit("@", 1)[1])
    if kind == "card":
        return 13 <= len(digits) <= 19 and _luhn_ok(digits)
    if kind == "phone":
        # An ISO date followed by a time has as many digits as a phone number.
        return len(digits) >= 9 and not ISO_DATE.search(text)
    return True


def find_pii(text: str) -> list[Finding]:
    """Non-overlapping PII spans in text, earliest first (emails win over phones inside them)."""
    findings: list[Finding] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern, _ in KINDS:
        for match in pattern.finditer(text):
            span = match.span()
            if any(span[0] < end and start < span[1] for start, end in taken):
                continue
            if kind == "email" and _is_message_id(text, span[0]):
                continue
            if _is_real(kind, match.group()):
                findings.append(Finding(kind, *span))
                taken.append(span)
    return sorted(findings, key=lambda f: f.start)


def redact(text: str) -> tuple[str, list[str]]:
    """Text with every PII span replaced by a placeholder, and the kinds that were found."""
    placeholders = {kind: placeholder for kind, _, placeholder in KINDS}
    findings = find_pii(text)
    for finding in reversed(findings):
        text = text[:finding.start] + placeholders[finding.kind] + text[finding.end:]
    return text, [f.kind for f in findings]
