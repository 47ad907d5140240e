"""Answers section: a few test answers that changed, as untrusted text."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass

from .common import _cell, _num


def parse_predictions(text: str | None) -> tuple[list[dict], int]:
    """Rows of predictions.jsonl that have an instruction; (rows, number of unreadable lines)."""
    rows, bad = [], 0
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("instruction"), str):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def answer_of(row: dict, who: str) -> str | None:
    """The base or tuned answer: {"tuned": {"answer": ...}} (evaluate stage) or "tuned_answer"/"tuned"."""
    value = row.get(who)
    if isinstance(value, dict):
        value = value.get("answer")
    if value is None:
        value = row.get(f"{who}_answer")
    return value if isinstance(value, str) else None


def score_of(row: dict, who: str, metric: str = "rouge_l") -> float | None:
    value = row.get(who)
    return _num(value.get(metric)) if isinstance(value, dict) else None


@dataclass
class AnswerChange:
    instruction: str
    reference: str | None
    base: str | None
    tuned: str | None
    before: str | None = None  # the tuned answer on the base branch, when known
    note: str = ""


def changed_answers(rows: list[dict], old_rows: list[dict] | None, limit: int = 5) -> list[AnswerChange]:
    """A few answers worth reading. With the base branch's predictions: tuned answers that
    changed since then. Without: where tuned differs from base, the biggest gains and the
    biggest losses (by ROUGE-L when recorded)."""
    if limit <= 0:
        return []
    picked: list[AnswerChange] = []
    if old_rows:
        before = {r["instruction"]: answer_of(r, "tuned") for r in old_rows}
        for row in rows:
            now = answer_of(row, "tuned")
            if row["instruction"] in before and before[row["instruction"]] != now:
                picked.append(AnswerChange(row["instruction"], row.get("reference"), answer_of(row, "base"), now,
                                           before[row["instruction"]], "changed since the base branch"))
        return picked[:limit]
    differing = [r for r in rows if answer_of(r, "tuned") != answer_of(r, "base")]

    def gain(r):
        t, b = score_of(r, "tuned"), score_of(r, "base")
        return (t - b) if t is not None and b is not None else 0.0

    differing.sort(key=gain, reverse=True)
    losses = [r for r in reversed(differing) if gain(r) < 0][: max(1, limit // 3)]
    gains = [r for r in differing if r not in losses][: limit - len(losses)]
    for row in gains + losses:
        g = gain(row)
        note = f"ROUGE-L {score_of(row, 'base'):.2f} → {score_of(row, 'tuned'):.2f}" if score_of(row, "tuned") is not None \
            and score_of(row, "base") is not None else ""
        picked.append(AnswerChange(row["instruction"], row.get("reference"), answer_of(row, "base"),
                                   answer_of(row, "tuned"), None, note + (" (worse than base)" if g < 0 else "")))
    return picked


def _quote(text: str | None, limit: int = 400) -> str:
    if text is None:
        return "_(none)_"
    text = text.strip() or "(empty)"
    if len(text) > limit:
        text = text[:limit] + "…"
    # Model output is untrusted: no HTML, no @mentions, no accidental tables.
    return html.escape(text.replace("\n", " "), quote=False).replace("@", "@\u200b")


def answers_section(changes: list[AnswerChange], total: int, bad_lines: int, source_note: str) -> str:
    lines = ["### Answers that changed"]
    if total == 0:
        lines.append("_No predictions (reports/eval/predictions.jsonl is missing or empty)._")
        return "\n".join(lines)
    lines.append(f"{len(changes)} of {total} test answers, {source_note}."
                 + (f" {bad_lines} unreadable line(s) skipped." if bad_lines else ""))
    for i, c in enumerate(changes, 1):
        summary = _quote(c.instruction, 120) + (f" — {_cell(c.note)}" if c.note else "")
        lines += ["", f"<details><summary>{i}. {summary}</summary>", "",
                  f"- **reference:** {_quote(c.reference)}",
                  f"- **base model:** {_quote(c.base)}"]
        if c.before is not None:
            lines.append(f"- **tuned, base branch:** {_quote(c.before)}")
        lines += [f"- **tuned, this PR:** {_quote(c.tuned)}", "", "</details>"]
    return "\n".join(lines)
