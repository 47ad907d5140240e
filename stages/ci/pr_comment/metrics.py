"""Metrics section: `dvc metrics diff <base>` headline rows with direction-aware verdicts, and the full table folded."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .common import _cell, _fmt, _num, _table_rows

# Headline metrics: these evaluation metrics of the tuned and base model, plus every top-level
# number of the other metrics files (training loss, preprocessing counts).
HEADLINE_EVAL = ("rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "exact_match", "fact_recall",
                 "no_end_token_rate", "degenerate_rate", "val_loss", "val_perplexity", "judge_score")
LOWER_IS_BETTER_WORDS = ("loss", "perplexity", "no_end_token_rate", "degenerate_rate", "error", "missing", "rejected",
                         "dropped", "latency", "diff")
# Counters of records the data lost: more is worse, whatever the leaf is called (removed.too_long).
LOWER_IS_BETTER_PREFIXES = ("removed.", "rejected.", "dropped.")
# Properties of the data or the run, not quality: no verdict (tokens.max, splits.test, categories.hr).
NEUTRAL_PREFIXES = ("tokens.", "splits.", "categories.", "pii_found.", "speed.", "test_set.", "significance.",
                    "blank_lines", "test_facts_seen_in_train")
EVAL_FILES = ("eval.json", "eval_summary.json")
DIFF_TARGETS = ("metrics/preprocess.json", "metrics/train.json", "metrics/eval_summary.json", "metrics/package.json",
                "metrics/deploy.json")
# A loss or perplexity moves in its 4th-5th digit when the same commit runs on another kind of CPU
# (tuned val loss 3.9272 on Intel vs 3.9257 on AMD Zen 4, docs/evaluation.md), and by much more between
# training seeds. Such a change is noise, not an improvement: a loss change within the seed noise
# (metrics/noise_floor.json, the sd of val_loss over seeds) or within LOSS_TOLERANCE of its value,
# whichever is larger, is "within noise". Perplexity is exp(loss), so its relative change is the loss change.
LOSS_TOLERANCE = 0.005
LOSS_WORDS = ("loss", "perplexity")
NEUTRAL_WORDS = ("seconds", "_s", "time", "tokens_per_s", "count", "records", "steps", "step", "epoch",
                 "length_ratio", "n_", "lr", "learning_rate", "memory", "peak", "params", "size",
                 "max_abs_logit", "tolerance")


def metric_direction(name: str) -> int:
    """+1 higher is better, -1 lower is better, 0 no judgement (times, counts, sizes)."""
    leaf = name.split(".")[-1].lower()
    if leaf in ("passed",):
        return 1
    if name.lower().startswith(LOWER_IS_BETTER_PREFIXES):
        return -1
    if name.lower().startswith(NEUTRAL_PREFIXES):
        return 0
    if any(w in leaf for w in LOWER_IS_BETTER_WORDS):
        return -1
    if any(leaf == w or leaf.startswith(w) or leaf.endswith(w) for w in NEUTRAL_WORDS):
        return 0
    return 1


@dataclass
class MetricRow:
    path: str
    name: str
    old: object
    new: object
    flag: str = ""
    regression: bool = False


def loss_noise(name: str, old: float, noise: dict | None) -> float:
    """How far a loss or perplexity metric may move and still be noise: the seed noise of the
    validation loss (metrics/noise_floor.json), or LOSS_TOLERANCE relative to the old value, whichever
    is larger. For a perplexity both are relative (exp(loss + d) / exp(loss) - 1 ~ d)."""
    entry = ((noise or {}).get("metrics") or {}).get("val_loss") if isinstance(noise, dict) else None
    sd = _num(entry.get("sd")) if isinstance(entry, dict) else None
    if "perplexity" in name.split(".")[-1].lower():
        return abs(old) * max(math.expm1(sd) if sd is not None else 0.0, LOSS_TOLERANCE)
    return max(sd if sd is not None else 0.0, abs(old) * LOSS_TOLERANCE)


def classify(name: str, old, new, regression_metrics: tuple[str, ...] | list[str], tolerance: float,
             noise: dict | None = None) -> tuple[str, bool]:
    """(flag, is_regression). A regression: a gated metric of the tuned model got worse by more
    than the gate's tolerance, or the gate went from passed to failed. A loss or perplexity change
    within its noise (loss_noise) is "within noise", neither better nor worse."""
    leaf = name.split(".")[-1]
    o, n = _num(old), _num(new)
    if name == "gate.passed":
        if new is False:
            return ("❌ gate fails" if old is not False else "❌ still failing"), old is not False
        return ("✅ gate passes" if old is not True else ""), False
    if old is None or new is None:
        return ("🆕 new" if old is None and new is not None else ("removed" if old is not None else "")), False
    if o is None or n is None or isinstance(old, bool) or isinstance(new, bool):
        return ("changed" if old != new else ""), False
    direction = metric_direction(name)
    change = (n - o) * direction
    if direction == 0 or abs(n - o) < 1e-12:
        return "", False
    gated = name.startswith("tuned.") and leaf in regression_metrics
    if any(w in leaf.lower() for w in LOSS_WORDS) and abs(n - o) <= loss_noise(name, o, noise) + 1e-12:
        return "within noise", False
    if change < 0:
        if gated and -change > tolerance + 1e-12:
            return f"❌ regression (> {tolerance:g})", True
        return "⚠️ worse", False
    return "✅ better", False


def is_headline(path: str, name: str) -> bool:
    parts = name.split(".")
    if Path(path).name in EVAL_FILES:
        return name == "gate.passed" or (len(parts) == 2 and parts[0] in ("tuned", "base") and parts[1] in HEADLINE_EVAL)
    return len(parts) <= 2


def metric_rows(diff: dict, regression_metrics=(), tolerance: float = 0.0, noise: dict | None = None) -> list[MetricRow]:
    """Rows from `dvc metrics diff --json` ({path: {metric: {old, new, diff}}}), flagged; `noise` is
    metrics/noise_floor.json, which sets how far a loss may move and still be noise."""
    rows = []
    if not isinstance(diff, dict):
        return rows
    for path, metrics in sorted(diff.items()):
        if not isinstance(metrics, dict):
            continue
        for name, change in sorted(metrics.items()):
            if not isinstance(change, dict):
                continue
            old, new = change.get("old"), change.get("new")
            flag, regression = classify(name, old, new, tuple(regression_metrics), tolerance, noise)
            rows.append(MetricRow(path, name, old, new, flag, regression))
    return rows


def compact_diff_table(raw_md: str) -> tuple[str, int]:
    """dvc's Markdown diff without its column padding and without the per-topic `.delta.` rows,
    which together push a default run's table past GitHub's comment size limit."""
    kept, dropped = [], 0
    for line in raw_md.strip().splitlines():
        if re.search(r"\|\s*by_[a-z_]+\.[^|]*\.delta\.", line):
            dropped += 1
            continue
        kept.append(re.sub(r" {2,}", " ", line) if not re.fullmatch(r"[|\-\s:]+", line) else re.sub(r"-{4,}", "---", line))
    return "\n".join(kept), dropped


def metrics_section(rows: list[MetricRow], base_label: str, raw_md: str | None, error: str | None) -> str:
    lines = [f"### Metrics vs `{base_label}`"]
    if error:
        lines.append(f"_`dvc metrics diff` failed: {_cell(error[:500])}_")
        return "\n".join(lines)
    headline = [r for r in rows if is_headline(r.path, r.name)]
    regressions = [r for r in rows if r.regression]
    if not rows:
        lines.append(f"No metric differs from `{base_label}`.")
    else:
        if regressions:
            lines.append(f"**{len(regressions)} regression(s):** " + ", ".join(f"`{r.name}`" for r in regressions))
        else:
            lines.append("No regression of a gated metric.")
        lines += ["", f"| file | metric | {base_label} | this PR | change | |", "|---|---|---|---|---|---|"]
        for r in headline:
            o, n = _num(r.old), _num(r.new)
            change = f"{n - o:+.4g}" if (o is not None and n is not None and not isinstance(r.new, bool)) else ""
            lines.append(f"| {_cell(r.path)} | `{r.name}` | {_fmt(r.old, r.name)} | {_fmt(r.new, r.name)} | {change} | {r.flag} |")
        if len(headline) < len(rows):
            lines.append(f"\n_{len(rows) - len(headline)} more metric(s) changed (per category, per split, speed): "
                         "see the full table below._")
    if _table_rows(raw_md):
        full, dropped = compact_diff_table(raw_md)
        note = (f"{dropped} per-topic `delta` row(s) left out (tuned minus base, derivable from the rows "
                "shown); reports/eval/report.md has the per-topic table.") if dropped else ""
        lines += ["", f"<details><summary><code>dvc metrics diff {base_label} --md</code></summary>", "",
                  full, "", note, "</details>"]
    return "\n".join(lines)
