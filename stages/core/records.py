"""Decisions about records: parsing and validation, normalisation, duplicates, PII and splits.

Pure functions over values; the preprocess stage does the file I/O around them.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import unicodedata
from dataclasses import dataclass, field

REQUIRED_FIELDS = ("system", "instruction", "output")
OPTIONAL_FIELDS = ("category",)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Problem:
    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


@dataclass
class Record:
    system: str
    instruction: str
    output: str
    category: str
    source: str
    line: int
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"system": self.system, "instruction": self.instruction, "output": self.output,
                "category": self.category}


class DataError(Exception):
    """Input data is unusable; carries every problem found, each with its line and reason."""

    def __init__(self, summary: str, problems: list[Problem] = ()):
        self.problems = list(problems)
        if not problems:  # a summary alone, not one ending in a colon and an empty list
            super().__init__(summary)
            return
        listed = "\n  ".join(str(p) for p in problems[:200])
        more = f"\n  ... and {len(problems) - 200} more" if len(problems) > 200 else ""
        super().__init__(f"{summary}:\n  {listed}{more}")


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text, split on "\n" only (and a "\r" before it): str.splitlines would
    also split on U+2028, U+2029, U+0085 and other characters that are valid inside JSON strings."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def parse_lines(text: str, source: str) -> tuple[list[Record], list[Problem], dict]:
    """Every valid record of a JSONL text and a problem for every invalid line.

    Accepts a UTF-8 BOM and CRLF line ends. Blank lines are not records; they are counted.
    """
    records, problems = [], []
    counts = {"lines": 0, "blank_lines": 0, "bom": int(text.startswith("\ufeff"))}
    for number, line in enumerate(jsonl_lines(text.lstrip("\ufeff")), start=1):
        counts["lines"] += 1
        if not line.strip():
            counts["blank_lines"] += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(source, number, f"malformed JSON: {exc.msg} at column {exc.colno}"))
            continue
        reason = record_problem(obj)
        if reason:
            problems.append(Problem(source, number, reason))
            continue
        extra = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS + OPTIONAL_FIELDS}
        records.append(Record(system=obj["system"], instruction=obj["instruction"], output=obj["output"],
                              category=obj.get("category") or "uncategorised", source=source,
                              line=number, extra=extra))
    return records, problems, counts


def record_problem(obj) -> str | None:
    """Why a parsed JSON value is not a valid record, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [name for name in REQUIRED_FIELDS if name not in obj]
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    for name in REQUIRED_FIELDS + OPTIONAL_FIELDS:
        if name in obj and not isinstance(obj[name], str):
            if name in OPTIONAL_FIELDS and obj[name] is None:
                continue
            return f"field '{name}' must be a string, got {type(obj[name]).__name__}"
        if name in REQUIRED_FIELDS and not obj[name].strip():
            return f"field '{name}' is empty"
    return None


_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFKC Unicode, no control characters, single spaces, at most one blank line, trimmed."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    # Whitespace of any kind (tabs included) becomes a space; other control/format characters
    # (zero-width spaces, BOMs, stray escapes) are removed.
    text = "".join(" " if ch.isspace() and ch != "\n" else ch for ch in text
                   if ch == "\n" or ch.isspace() or unicodedata.category(ch)[0] != "C")
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def normalize_record(record: Record) -> Record:
    record.system = normalize_text(record.system)
    record.instruction = " ".join(normalize_text(record.instruction).split())
    record.output = normalize_text(record.output)
    record.category = normalize_text(record.category) or "uncategorised"
    return record


_PUNCT = frozenset(string.punctuation + "¿¡“”‘’«»…")


def _meaningful(text: str, i: int) -> bool:
    """Whether the punctuation at text[i] carries meaning that near-duplicate matching must keep:
    C++ / C# / F# (+ or # after a letter, digit or +), version numbers (3.11 is not 3.1.1: a dot
    between digits) and .NET-style names (a dot that starts a word)."""
    ch, before = text[i], text[i - 1] if i else " "
    after = text[i + 1] if i + 1 < len(text) else " "
    if ch in "+#":
        return before.isalnum() or before in "+#"
    if ch == ".":
        return (before.isdigit() and after.isdigit()) or (before.isspace() and after.isalpha())
    return False


def question_key(instruction: str, near: bool = True) -> str:
    """The identity of a question: normalised text, or (near) also case, punctuation and spacing,
    keeping the symbols that change what is asked (C vs C++ vs C#, .NET, Python 3.11 vs 3.12)."""
    text = normalize_text(instruction)
    if near:
        text = text.casefold()
        text = "".join(ch for i, ch in enumerate(text) if ch not in _PUNCT or _meaningful(text, i))
        text = " ".join(text.split())
    return text


def answer_key(output: str) -> str:
    """The identity of an answer's fact, used to tell whether a test fact was seen in training."""
    return question_key(output, near=True)


def deduplicate(records: list[Record], near: bool = True) -> tuple[list[Record], list[tuple[Record, str]]]:
    """Keep the first record of each question; the others are returned with the reason.

    A later record asking the same question with a different answer is a conflict, reported as such
    because it usually means the data disagrees with itself.
    """
    first: dict[str, Record] = {}
    kept, removed = [], []
    for record in records:
        key = question_key(record.instruction, near=near)
        seen = first.get(key)
        if seen is None:
            first[key] = record
            kept.append(record)
            continue
        where = f"{seen.source}:{seen.line}"
        if answer_key(seen.output) != answer_key(record.output):
            removed.append((record, f"conflicting_duplicate: same question as {where} with a different answer"))
        elif seen.instruction == record.instruction and seen.output == record.output:
            removed.append((record, f"exact_duplicate: same as {where}"))
        else:
            removed.append((record, f"near_duplicate: same question as {where} up to case, punctuation or spacing"))
    return kept, removed


def split_of(key: str, fractions: dict[str, float], salt: str) -> str:
    """Deterministic split from a hash of the question key: stable when data is appended."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name in SPLITS:
        cumulative += fractions[name]
        if point < cumulative:
            return name
    return SPLITS[-1]


def content_hash(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
