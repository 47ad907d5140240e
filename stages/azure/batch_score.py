"""Batch scoring driver for the Azure ML batch deployment: the same scoring logic as the online
endpoint (serve/score.py's init and run), applied to JSONL files.

Azure ML calls `init()` once per worker and `run(mini_batch)` with a list of input file paths
(azure.batch.mini_batch_size files). Each line of an input file is one request as the online
endpoint takes it ({"instruction": ..., "system": ..., "max_new_tokens": ...}, optionally "id").
Records are sent to serve.score.run in groups of BATCH_RECORDS_PER_CALL (azure.batch.records_per_call)
as {"requests": [...]}, so the engine batches them. Every input line yields one output line
(appended to azure.batch.output_file_name):
    {"file": "part-0.jsonl", "line": 3, "id": ..., "response": ..., "prompt_tokens": ...,
     "completion_tokens": ..., "finish_reason": ...}
or, for a line that is not valid JSON or that the endpoint rejects, {"file", "line", "id", "error"}.

This file is copied to the top of the endpoint code folder by stages.azure.batch, next to serve/.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# In the deployed code folder this file sits next to serve/; only there does its folder go on the
# import path (from the repository, stages/azure/ on sys.path would shadow other modules).
if (HERE / "serve").is_dir() and str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

score = None


def init() -> None:
    global score
    from serve import score as serve_score

    serve_score.init()
    score = serve_score


def _records_per_call() -> int:
    try:
        return max(1, int(os.environ.get("BATCH_RECORDS_PER_CALL", "16")))
    except ValueError:
        return 16


def _error_text(result) -> str:
    getter = getattr(result, "get_data", None)
    if getter is not None:
        try:
            body = json.loads(getter(as_text=True))
            return str(body.get("error", body))
        except (ValueError, AttributeError):
            return getter(as_text=True)
    return str(result)


def _call(items: list[dict]):
    """Answers for `items`: a list of dicts (same order) or None when the group was rejected."""
    result = score.run(json.dumps({"requests": items}))
    return result if isinstance(result, list) and len(result) == len(items) else None


def score_lines(name: str, lines: list[str], per_call: int) -> list[dict]:
    out: list[dict] = []
    pending: list[tuple[int, object, dict]] = []

    def flush() -> None:
        if not pending:
            return
        items = [request for _, _, request in pending]
        answers = _call(items)
        if answers is None:  # one bad record rejects the group: score one by one for exact errors
            answers = []
            for item in items:
                single = score.run(json.dumps(item))
                answers.append(single if isinstance(single, dict) else {"error": _error_text(single)})
        for (number, ident, _), answer in zip(pending, answers):
            out.append({"file": name, "line": number, "id": ident, **answer})
        pending.clear()

    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            out.append({"file": name, "line": number, "id": None, "error": f"invalid JSON line: {exc}"})
            continue
        ident = record.pop("id", None)
        request = {k: v for k, v in record.items() if k in ("instruction", "system", "max_new_tokens", "temperature")}
        pending.append((number, ident, request))
        if len(pending) >= per_call:
            flush()
    flush()
    out.sort(key=lambda row: row["line"])
    return out


def run(mini_batch) -> list[str]:
    per_call = _records_per_call()
    rows: list[str] = []
    for path in mini_batch:
        path = Path(path)
        lines = path.read_text(encoding="utf-8").splitlines()
        rows.extend(json.dumps(row, ensure_ascii=False) for row in score_lines(path.name, lines, per_call))
    return rows
