"""Request validation for the endpoint: every problem named by its field, never a crash.

Accepted bodies (JSON):

    {"instruction": str, "system"?: str, "max_new_tokens"?: int, "temperature"?: number}
    {"requests": [ <the object above>, ... ]}          (batch; answered with a JSON list)

A bad body raises RequestError, which the scoring script turns into HTTP 400 with
{"error": "<field>: <problem>; ...", "details": [{"field": ..., "message": ...}, ...]}.
Field names are JSON paths: "instruction", "requests[2].max_new_tokens", "body".

Errors are bounded and never echo the client: at most MAX_PROBLEMS problems are listed (the rest
are counted in "more_problems"), each message at most MAX_MESSAGE_CHARS characters. String
values and unknown keys are never repeated (they may hold personal data: a key can be an e-mail
address); unknown keys are counted, with the nearest allowed name as a hint. Numbers are shown,
shortened when long.

Degenerate but valid input: a temperature below GREEDY_BELOW (1e-300, 5e-324, ...) is greedy
decoding, as 0 is; dividing logits by it would overflow. Text that cannot be encoded as UTF-8 (a
lone UTF-16 surrogate such as "\ud800") is a 400 naming its field; JSON nested deeper than the
parser's recursion limit is a 400 for the body.

Pure standard library: token counting is passed in as a function.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from dataclasses import dataclass
from typing import Callable

FIELDS = ("instruction", "system", "max_new_tokens", "temperature")
BATCH_KEY = "requests"
MAX_PROBLEMS = 10
MAX_MESSAGE_CHARS = 200
# Sampling at a temperature this close to 0 is greedy decoding in all but name.
GREEDY_BELOW = 1e-3
# A token is rarely more than a few characters; a string this many times longer than the token
# limit is rejected before it is tokenised (so a megabyte body costs nothing).
MAX_CHARS_PER_TOKEN = 32


class RequestError(Exception):
    """A client error: the request is invalid. `problems` is a list of (field, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__(self.message)

    def shown(self) -> list[tuple[str, str]]:
        """The first MAX_PROBLEMS problems, each message cut to MAX_MESSAGE_CHARS."""
        return [(field[:MAX_MESSAGE_CHARS], _cut(message)) for field, message in self.problems[:MAX_PROBLEMS]]

    @property
    def message(self) -> str:
        text = "; ".join(f"{field}: {message}" for field, message in self.shown())
        more = len(self.problems) - MAX_PROBLEMS
        return f"{text}; and {more} more problem(s)" if more > 0 else text

    @property
    def fields(self) -> list[str]:
        return [field for field, _ in self.problems]

    def body(self) -> dict:
        body = {"error": self.message,
                "details": [{"field": field, "message": message} for field, message in self.shown()]}
        if len(self.problems) > MAX_PROBLEMS:
            body["more_problems"] = len(self.problems) - MAX_PROBLEMS
        return body


def _cut(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _number(value) -> str:
    """A client's number for a message: as is when short, else its start and its length."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}… ({len(text)} digits)"


@dataclass(frozen=True)
class Limits:
    max_new_tokens_default: int
    max_new_tokens_limit: int
    temperature_max: float
    max_batch_requests: int
    max_instruction_tokens: int
    max_system_tokens: int

    @classmethod
    def from_config(cls, config: dict) -> "Limits":
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class GenRequest:
    instruction: str
    system: str | None          # None: not given (the endpoint's default system prompt applies)
    max_new_tokens: int
    temperature: float


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def decode_body(raw) -> object:
    """The JSON value of a request body (str, bytes, or an already-parsed dict/list)."""
    if isinstance(raw, (dict, list)):
        return raw
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError([("body", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    if raw is None or not isinstance(raw, str):
        raise RequestError([("body", f"expected a JSON text, got {type(raw).__name__}")])
    if not raw.strip():
        raise RequestError([("body", 'empty request body; expected a JSON object such as {"instruction": "..."} '
                                     '(sent with Content-Type: application/json)')])
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise RequestError([("body", f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")]) from None
    except RecursionError:
        raise RequestError([("body", f"JSON nested too deeply (limit about {sys.getrecursionlimit()} levels)")]) from None
    except ValueError as exc:  # NaN/Infinity, an integer longer than Python converts
        raise RequestError([("body", f"malformed JSON: {exc}")]) from None


def _type_name(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _check_text(value, field: str, limit_tokens: int, count_tokens: Callable[[str], int],
                problems: list, required: bool) -> str | None:
    if not isinstance(value, str):
        problems.append((field, f"must be a string, got {_type_name(value)}"))
        return None
    bad = _unencodable_at(value)
    if bad is not None:
        problems.append((field, f"not valid Unicode: a lone UTF-16 surrogate at character {bad} "
                                "(a \\uD800-\\uDFFF escape without its pair)"))
        return None
    if required and not value.strip():
        problems.append((field, "must not be empty"))
        return None
    if len(value) > limit_tokens * MAX_CHARS_PER_TOKEN:
        problems.append((field, f"too long: {len(value)} characters (limit {limit_tokens} tokens)"))
        return None
    tokens = count_tokens(value) if value else 0
    if tokens > limit_tokens:
        problems.append((field, f"too long: {tokens} tokens (limit {limit_tokens})"))
        return None
    return value


def _unencodable_at(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return exc.start


def _unknown_keys(keys: list, where: str, allowed: tuple[str, ...]) -> tuple[str, str]:
    """One problem for all unknown keys, without repeating any of them (a key is client text)."""
    names = [key for key in keys if isinstance(key, str) and _unencodable_at(key) is None]
    hints = sorted({match for key in names[:100] for match in difflib.get_close_matches(key[:64], allowed, n=1)})
    hint = f"; did you mean {' or '.join(repr(h) for h in hints)}" if hints else ""
    count = f"{len(keys)} unknown field{'s' if len(keys) > 1 else ''}"
    return where, f"{count} (keys are not repeated){hint}; allowed: {', '.join(allowed)}"


def check_item(item, prefix: str, limits: Limits, count_tokens: Callable[[str], int],
               problems: list) -> GenRequest | None:
    """One request object; appends (field, message) problems and returns None if any."""
    def name(field: str) -> str:
        return f"{prefix}.{field}" if prefix else field

    if not isinstance(item, dict):
        problems.append((prefix or "body", f"must be a JSON object, got {_type_name(item)}"))
        return None
    before = len(problems)
    unknown = [key for key in item if key not in FIELDS]
    if unknown:
        problems.append(_unknown_keys(unknown, prefix or "body", FIELDS))

    instruction = None
    if "instruction" not in item or item["instruction"] is None:
        problems.append((name("instruction"), "is required"))
    else:
        instruction = _check_text(item["instruction"], name("instruction"), limits.max_instruction_tokens,
                                  count_tokens, problems, required=True)

    system = item.get("system")
    if system is not None:
        system = _check_text(system, name("system"), limits.max_system_tokens, count_tokens, problems,
                             required=False)

    max_new_tokens = item.get("max_new_tokens")
    if max_new_tokens is None:
        max_new_tokens = limits.max_new_tokens_default
    elif isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        problems.append((name("max_new_tokens"), f"must be an integer, got {_type_name(max_new_tokens)}"))
    elif not 1 <= max_new_tokens <= limits.max_new_tokens_limit:
        problems.append((name("max_new_tokens"),
                         f"must be between 1 and {limits.max_new_tokens_limit}, got {_number(max_new_tokens)}"))

    temperature = item.get("temperature")
    if temperature is None:
        temperature = 0.0
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        problems.append((name("temperature"), f"must be a number, got {_type_name(temperature)}"))
    elif not math.isfinite(temperature) or not 0 <= temperature <= limits.temperature_max:
        problems.append((name("temperature"),
                         f"must be between 0 and {limits.temperature_max:g}, got {_number(temperature)}"))
    elif temperature < GREEDY_BELOW:
        temperature = 0.0

    if len(problems) > before:
        return None
    return GenRequest(instruction=instruction, system=system, max_new_tokens=int(max_new_tokens),
                      temperature=float(temperature))


def parse_request(raw, limits: Limits, count_tokens: Callable[[str], int]) -> tuple[list[GenRequest], bool]:
    """(requests, is_batch) from a body; raises RequestError listing every problem."""
    body = decode_body(raw)
    problems: list[tuple[str, str]] = []
    if isinstance(body, dict) and BATCH_KEY in body:
        for key in body:
            if key in FIELDS:  # our own names can be repeated
                problems.append((key, f"not allowed beside '{BATCH_KEY}' (put it in each request)"))
        unknown = [key for key in body if key != BATCH_KEY and key not in FIELDS]
        if unknown:
            problems.append(_unknown_keys(unknown, "body", (BATCH_KEY,)))
        entries = body[BATCH_KEY]
        if not isinstance(entries, list):
            problems.append((BATCH_KEY, f"must be an array of request objects, got {_type_name(entries)}"))
        elif not entries:
            problems.append((BATCH_KEY, "must not be empty"))
        elif len(entries) > limits.max_batch_requests:
            problems.append((BATCH_KEY, f"too many requests: {len(entries)} (limit {limits.max_batch_requests})"))
        if problems:
            raise RequestError(problems)
        requests = [check_item(entry, f"{BATCH_KEY}[{i}]", limits, count_tokens, problems)
                    for i, entry in enumerate(entries)]
        if problems:
            raise RequestError(problems)
        return requests, True
    if not isinstance(body, dict):
        raise RequestError([("body", f'must be a JSON object such as {{"instruction": "..."}} or '
                                     f'{{"{BATCH_KEY}": [...]}}, got {_type_name(body)}')])
    request = check_item(body, "", limits, count_tokens, problems)
    if problems:
        raise RequestError(problems)
    return [request], False
