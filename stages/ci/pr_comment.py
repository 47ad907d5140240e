"""The one pull-request comment: what this change does to the model, before anyone merges it.

    python -m stages.ci.pr_comment --base main --out comment.md

Sections, in order: the quality-gate verdict; the tuned model's evaluation against the base branch's,
paired over test records (metrics/eval.json and metrics/eval_records.json of both revisions, read from
git): change, 95% interval, verdict and seed noise (metrics/noise_floor.json) per metric, and the
smallest difference the test split can detect; a metric is a regression only when it dropped by more
than the gate's tolerance AND the paired test is significant, and nothing is when the test sets differ;
the headline metrics of every DVC metrics file against the base branch (from
`dvc metrics diff <base> --json`; counters of removed records are "more is worse", data sizes and
token counts get no verdict; the full `dvc metrics diff <base> --md` table is folded below it), `dvc params diff <base> --md`, the loss curves and the base-vs-tuned
metrics as charts, a few answers that changed, and the estimated Azure time and cost of the
training run this pull request would trigger on merge.

Charts: GitHub renders Mermaid diagrams in comments but not images from workflow artifacts or
`data:` URIs, so the comment carries the charts as Mermaid `xychart-beta` blocks (they display
inline, for forks too) and writes matplotlib PNGs to --plots-dir, which ci.yml uploads as the
`pr-charts` artifact. With --image-base-url (a place where the PNGs are published) the comment
embeds the PNGs as well.

Every input is optional and read defensively: a missing or malformed file gives a line saying
what is missing, never a traceback, so the comment is posted even when a stage failed.
The first line is a hidden marker by which `stages.ci.github_comment` finds and updates the comment.
"""

from __future__ import annotations

import argparse
import csv
import html
import re
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "<!-- llama-finetune:pr-report -->"
# Paths whose change makes train.yml run on merge (keep in sync with .github/workflows/train.yml).
TRAIN_PATHS = ("data/", "params.yaml", "stages/", "dvc.yaml")
# GitHub rejects comments over 65,536 characters.
MAX_COMMENT_CHARS = 60_000
# Headline metrics: these evaluation metrics of the tuned and base model, plus every top-level
# number of the other metrics files (training loss, preprocessing counts).
HEADLINE_EVAL = ("rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "exact_match", "fact_recall",
                 "no_end_token_rate", "val_loss", "val_perplexity", "judge_score")
LOWER_IS_BETTER_WORDS = ("loss", "perplexity", "no_end_token_rate", "error", "missing", "rejected",
                         "dropped", "latency", "diff")
# Counters of records the data lost: more is worse, whatever the leaf is called (removed.too_long).
LOWER_IS_BETTER_PREFIXES = ("removed.", "rejected.", "dropped.")
# Properties of the data or the run, not quality: no verdict (tokens.max, splits.test, categories.hr).
NEUTRAL_PREFIXES = ("tokens.", "splits.", "categories.", "pii_found.", "speed.", "test_set.", "significance.",
                    "blank_lines", "test_facts_seen_in_train")
EVAL_FILES = ("eval.json", "eval_summary.json")
DIFF_TARGETS = ("metrics/preprocess.json", "metrics/train.json", "metrics/eval_summary.json", "metrics/package.json",
                "metrics/deploy.json")
RECORDS_PATH = "metrics/eval_records.json"
NOISE_PATH = "metrics/noise_floor.json"
PREPROCESS_PATH = "metrics/preprocess.json"
VERDICT_FLAGS = {"regression": "❌ regression", "worse within tolerance": "⚠️ worse (significant, within tolerance)",
                 "improvement": "✅ better (significant)", "within noise": "within noise", "no change": "",
                 "no direction": "changed (significant)"}
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
CHART_METRICS = ("rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "fact_recall", "exact_match")


# ---------------------------------------------------------------------------------------------------
# git and DVC


def _run(cmd: list[str], cwd: str | Path) -> tuple[bool, str]:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return proc.returncode == 0, (proc.stdout if proc.returncode == 0 else (proc.stderr or proc.stdout)).strip()


def resolve_base(base: str, cwd: str | Path = ".") -> str | None:
    """`main` locally, else `origin/main` (what a pull-request checkout with fetch-depth 0 has)."""
    for candidate in (base, f"origin/{base}"):
        ok, _ = _run(["git", "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"], cwd)
        if ok:
            return candidate
    return None


def changed_files(base: str, cwd: str | Path = ".") -> list[str] | None:
    """Files this branch changes relative to its merge base with `base` (None if git cannot tell)."""
    ok, out = _run(["git", "diff", "--name-only", f"{base}...HEAD"], cwd)
    if not ok:
        return None
    ok2, dirty = _run(["git", "diff", "--name-only", "HEAD"], cwd)
    names = set(out.splitlines()) | (set(dirty.splitlines()) if ok2 else set())
    return sorted(n for n in names if n)


def training_paths(files: list[str] | None) -> list[str] | None:
    """The changed files that make train.yml run on merge (None if unknown)."""
    if files is None:
        return None
    return [f for f in files if any(f == p or f.startswith(p) for p in TRAIN_PATHS)]


def _table_rows(md: str | None) -> int:
    """Data rows of a markdown table printed by dvc (header and separator excluded)."""
    return max(0, sum(1 for line in (md or "").splitlines() if line.startswith("|")) - 2)


def dvc(args: list[str], cwd: str | Path = ".") -> tuple[bool, str]:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


def git_show(rev: str, path: str, cwd: str | Path = ".") -> str | None:
    ok, out = _run(["git", "show", f"{rev}:{path}"], cwd)
    return out if ok else None


def read_at_rev(rev: str, path: str, cwd: str | Path = ".") -> str | None:
    """A file as it was at `rev`: from git if tracked there, else from the local DVC cache via
    that revision's dvc.lock. Never from a remote: a comment must not wait on network credentials."""
    text = git_show(rev, path, cwd)
    return text if text is not None else read_from_dvc_cache(rev, path, cwd)


def read_from_dvc_cache(rev: str, path: str, cwd: str | Path = ".") -> str | None:
    import yaml

    lock_text = git_show(rev, "dvc.lock", cwd)
    if not lock_text:
        return None
    try:
        lock = yaml.safe_load(lock_text) or {}
    except yaml.YAMLError:
        return None
    ok, cache_dir = dvc(["cache", "dir"], cwd)
    if not ok or not cache_dir:
        return None
    files = Path(cache_dir.splitlines()[-1].strip())
    files = files if files.is_absolute() else Path(cwd) / files
    files = files / "files" / "md5"

    def blob(md5: str) -> Path:
        return files / md5[:2] / md5[2:]

    for stage in (lock.get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            out_path, md5 = str(out.get("path", "")), str(out.get("md5", ""))
            if not md5:
                continue
            try:
                if out_path == path:
                    return blob(md5).read_text(encoding="utf-8")
                if md5.endswith(".dir") and path.startswith(out_path.rstrip("/") + "/"):
                    rel = path[len(out_path.rstrip("/")) + 1:]
                    for entry in json.loads(blob(md5).read_text(encoding="utf-8")):
                        if entry.get("relpath") == rel and entry.get("md5"):
                            return blob(entry["md5"]).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
                return None
    return None


# ---------------------------------------------------------------------------------------------------
# metrics diff with regression flags


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


def _num(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


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


def _fmt(value, name: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        if name.split(".")[-1] == "passed" or name.endswith("_passed"):
            return "pass" if value else "fail"
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return _cell(str(value))


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


def _cell(text: str) -> str:
    return html.escape(text.replace("\n", " ").replace("|", "\\|"), quote=False)


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


def params_section(raw_md: str | None, base_label: str, error: str | None) -> str:
    lines = [f"### Params vs `{base_label}` (`dvc params diff {base_label} --md`)"]
    if error:
        lines.append(f"_`dvc params diff` failed: {_cell(error[:500])}_")
    elif _table_rows(raw_md):
        lines.append(raw_md.strip())
    else:
        lines.append("No parameter changed.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# evaluation: this revision's tuned model against the base branch's, paired over test records


def compare_eval(new: dict | None, new_records: dict | None, old: dict | None, old_records: dict | None,
                 base_label: str, regression_metrics, tolerance: float,
                 new_data_hash: str | None = None, old_data_hash: str | None = None) -> dict | None:
    """stages.core.gate.compare on the two revisions' eval.json and eval_records.json (None when either
    side has no tuned metrics). Test sets are compared by their hash; when neither eval file records
    one, the preprocess data hash stands in for it."""
    from stages.core.gate import Reference, compare

    if not isinstance(new, dict) or not isinstance(old, dict) or not isinstance(new.get("tuned"), dict) \
            or not isinstance(old.get("tuned"), dict):
        return None
    old_hash = (old.get("test_set") or {}).get("hash") if isinstance(old.get("test_set"), dict) else None
    new_hash = (new.get("test_set") or {}).get("hash") if isinstance(new.get("test_set"), dict) else None
    ref = Reference(old["tuned"], f"{base_label}:metrics/eval.json", old_records, old_hash)
    result = compare(new["tuned"], ref, list(regression_metrics), tolerance, new_records, new_hash)
    if result["comparable"] and not (old_hash and new_hash) and new_data_hash and old_data_hash \
            and new_data_hash != old_data_hash:
        result.update(comparable=False, regressions=[], significance={},
                      not_comparable="the data changed (metrics/preprocess.json data_hash differs)")
    return result


def _noise(noise: dict | None, metric: str) -> str:
    entry = ((noise or {}).get("metrics") or {}).get(metric) if isinstance(noise, dict) else None
    sd = _num(entry.get("sd")) if isinstance(entry, dict) else None
    return f"±{sd:.3f}" if sd is not None else ""


def eval_flag(metric: str, comparison: dict | None, tolerance: float) -> tuple[str, bool]:
    """(flag, is_regression) of a tuned metric from the paired comparison."""
    if comparison is None:
        return "", False
    if not comparison["comparable"]:
        return "not comparable", False
    if metric in comparison["regressions"]:
        test = (comparison.get("significance") or {}).get(metric)
        return (f"❌ regression (> {tolerance:g}, significant)" if test else
                f"❌ regression (> {tolerance:g}; significance not tested)"), True
    test = (comparison.get("significance") or {}).get(metric)
    if test is None:
        return "", False
    return VERDICT_FLAGS.get(test["verdict"], test["verdict"]), False


def evaluation_section(comparison: dict | None, new: dict | None, noise: dict | None, base_label: str,
                       problem: str | None = None) -> str:
    """The tuned model against the base branch's: change, 95% interval, verdict, seed noise; and the
    smallest difference this test split can detect."""
    lines = [f"### Evaluation vs `{base_label}` (tuned model, paired over the test records)"]
    if comparison is None:
        lines.append(f"_No comparison: {_cell(problem or 'metrics/eval.json is missing on one side')}._")
    elif not comparison["comparable"]:
        lines += [f"⚠️ **Not comparable:** {_cell(comparison['not_comparable'])}. The evaluation metrics of "
                  f"`{base_label}` and this PR measure different test records, so no difference below is a "
                  "regression or an improvement.", ""]
    else:
        regs = comparison["regressions"]
        lines.append(f"**{len(regs)} regression(s):** " + ", ".join(f"`{m}`" for m in regs) if regs else
                     f"No regression: no gated metric dropped by more than {comparison['tolerance']:g} with a "
                     "significant paired test.")
        if comparison.get("note"):
            lines.append(f"_{_cell(comparison['note'])}._")
        lines.append("")
    if comparison is not None:
        tests = comparison.get("significance") or {}
        lines += [f"| metric | {base_label} | this PR | change | 95% CI | verdict | seed noise |",
                  "|---|---|---|---|---|---|---|"]
        now = (new or {}).get("tuned") or {}
        for metric, d in comparison["delta"].items():
            test = tests.get(metric)
            ci = test.get("ci") if test else None
            ci_text = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci and None not in ci else ""
            flag, _ = eval_flag(metric, comparison, comparison["tolerance"])
            lines.append(f"| `{metric}` | {_fmt(comparison['tuned'].get(metric))} | {_fmt(now.get(metric))} | "
                         f"{d:+.4f} | {ci_text} | {flag} | {_noise(noise, metric)} |")
    lines += ["", detectable_line(new, noise)]
    return "\n".join(line for line in lines if line is not None)


def detectable_line(new: dict | None, noise: dict | None) -> str:
    sig = (new or {}).get("significance") if isinstance(new, dict) else None
    detectable = (sig or {}).get("detectable_difference") if isinstance(sig, dict) else None
    n = ((new or {}).get("test_set") or {}).get("n") if isinstance((new or {}).get("test_set"), dict) else None
    parts = []
    if isinstance(sig, dict) and isinstance(sig.get("warning"), str):
        parts.append(f"⚠️ **Small test split:** {_cell(sig['warning'])}")
    if isinstance(detectable, dict) and detectable:
        shown = ", ".join(f"{k} {_num(v):.3f}" for k, v in detectable.items()
                          if k in ("rouge_l", "bleu4", "bertscore_f1", "fact_recall") and _num(v) is not None)
        parts.append(f"Smallest difference {n or 'the'} test records can detect (paired, alpha 0.05, power 0.8): "
                     f"{shown}; smaller changes are usually reported as within noise (docs/evaluation.md).")
    if isinstance(noise, dict) and isinstance(noise.get("metrics"), dict):
        parts.append(f"Seed noise: standard deviation over {len(noise.get('seeds') or [])} training seeds "
                     f"(`{NOISE_PATH}`).")
    else:
        parts.append(f"Seed noise: not measured (`python -m stages.evaluate noise` writes `{NOISE_PATH}`).")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------
# gate


def gate_section(eval_metrics: dict | None, problem: str | None = None) -> str:
    lines = ["### Quality gate"]
    gate = eval_metrics.get("gate") if isinstance(eval_metrics, dict) else None
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        why = problem or "metrics/eval.json has no gate verdict"
        lines.append(f"⚪ **Not evaluated**: {_cell(why)} (the evaluate stage did not run or failed).")
        return "\n".join(lines)
    checks = gate.get("checks") if isinstance(gate.get("checks"), list) else []
    reasons = [str(r) for r in gate.get("reasons") or [] if r is not None]
    if gate["passed"]:
        lines.append(f"✅ **Passed**" + (f" ({len(checks)} checks)" if checks else "") +
                     ": this model may be promoted once trained on Azure.")
    else:
        lines.append(f"❌ **Failed**" + (f" ({len(reasons)} of {len(checks)} checks)" if checks else "") +
                     ": deploy.yml would refuse to promote this model.")
        lines += [f"- {_cell(r)}" for r in reasons] or ["- (no reason recorded)"]
    if gate.get("reference"):
        lines.append(f"\nCompared with `{_cell(str(gate['reference']))}`.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# answers


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


# ---------------------------------------------------------------------------------------------------
# estimate


def estimate_section(est: dict | None, error: str | None, triggers: list[str] | None) -> str:
    lines = ["### Azure training estimate"]
    if triggers:
        shown = ", ".join(f"`{_cell(f)}`" for f in triggers[:5]) + (f" and {len(triggers) - 5} more" if len(triggers) > 5 else "")
        lines.append(f"Merging this PR **triggers training** on Azure ML (train.yml watches "
                     + ", ".join(f"`{p}`" for p in TRAIN_PATHS) + f"; this PR changes {shown}).")
    elif triggers is not None:
        lines.append("Merging this PR triggers **no training** (it changes none of "
                     + ", ".join(f"`{p}`" for p in TRAIN_PATHS) + "); for a manual run:")
    if est is None:
        lines.append(f"_Estimate unavailable: {_cell(error or 'unknown reason')}_")
        return "\n".join(lines)
    hours = _num(est.get("hours"))
    cost = _num(est.get("cost_usd"))
    nodes = est.get("nodes", 1)
    duration = "?" if hours is None else (f"{hours * 60:.1f} min" if hours < 1 else f"{int(hours)} h {round((hours % 1) * 60)} min")
    lines += ["", "| | |", "|---|---|",
              f"| VM | {nodes} × `{_cell(str(est.get('vm_size', '?')))}` |",
              f"| tokens per epoch | {_fmt(est.get('tokens_per_epoch'))} |",
              f"| expected throughput | {_fmt(est.get('expected_tokens_per_s'))} tokens/s"
              + (f" ({_cell(str(est['throughput_basis']))})" if est.get("throughput_basis") else "") + " |",
              f"| time | {duration} |",
              f"| cost | {'unknown (no price for this VM size)' if cost is None else f'${cost:,.2f}'} |"]
    memory = est.get("memory")
    if isinstance(memory, dict) and _num(memory.get("total_gb")) is not None:
        fits = memory.get("fits")
        lines.append(f"| GPU memory | {memory['total_gb']:.1f} GiB of {memory.get('gpu_memory_gb', '?')} GiB"
                     + ("" if fits is None else (" (fits)" if fits else " (**does not fit**)")) + " |")
    return "\n".join(lines)


def compute_estimate(params_path: str | Path) -> tuple[dict | None, str | None]:
    """stages.core.estimate.estimate_training(params), imported lazily; (estimate, error)."""
    try:
        from stages.core.estimate import estimate_training
        from stages.core.params import load_params

        return estimate_training(load_params(params_path)), None
    except Exception as exc:  # noqa: BLE001 - the comment says why instead of failing
        return None, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------------
# charts


def read_curves(live_dir: str | Path) -> dict[str, list[tuple[float, float]]]:
    """dvclive TSVs (plots/metrics/**/*.tsv: step + value columns) -> {series: [(step, value)]}."""
    root = Path(live_dir) / "plots" / "metrics"
    curves: dict[str, list[tuple[float, float]]] = {}
    if not root.is_dir():
        return curves
    for tsv in sorted(root.rglob("*.tsv")):
        name = tsv.relative_to(root).with_suffix("").as_posix()
        points = []
        try:
            with tsv.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh, delimiter="\t"):
                    value_cols = [k for k in row if k not in ("step", "timestamp") and k is not None]
                    step, value = _num_str(row.get("step")), _num_str(row.get(value_cols[-1])) if value_cols else None
                    if step is not None and value is not None:
                        points.append((step, value))
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
        if points:
            curves[name] = points
    return curves


def _num_str(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _downsample(points: list[tuple[float, float]], n: int = 40) -> list[tuple[float, float]]:
    if len(points) <= n:
        return points
    idx = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [points[i] for i in idx]


def mermaid_curve(name: str, points: list[tuple[float, float]]) -> str:
    pts = _downsample(points)
    ys = [y for _, y in pts]
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    labels = ", ".join(f'"{int(x)}"' if float(x).is_integer() else f'"{x:g}"' for x, _ in pts)
    return "\n".join([
        "```mermaid", "xychart-beta", f'  title "{name} by step"', f"  x-axis [{labels}]",
        f'  y-axis "{name.split("/")[-1]}" {lo - pad:.4g} --> {hi + pad:.4g}',
        "  line [" + ", ".join(f"{y:.4g}" for y in ys) + "]", "```"])


def mermaid_metrics(eval_metrics: dict | None) -> str | None:
    if not isinstance(eval_metrics, dict):
        return None
    base, tuned = eval_metrics.get("base"), eval_metrics.get("tuned")
    if not isinstance(base, dict) or not isinstance(tuned, dict):
        return None
    names = [m for m in CHART_METRICS if _num(tuned.get(m)) is not None and _num(base.get(m)) is not None]
    if not names:
        return None
    return "\n".join([
        "```mermaid", "xychart-beta", '  title "tuned (bars) vs base (line)"',
        "  x-axis [" + ", ".join(f'"{m}"' for m in names) + "]",
        '  y-axis "score" 0 --> 1',
        "  bar [" + ", ".join(f"{_num(tuned[m]):.4g}" for m in names) + "]",
        "  line [" + ", ".join(f"{_num(base[m]):.4g}" for m in names) + "]", "```"])


def render_pngs(curves: dict, eval_metrics: dict | None, out_dir: str | Path) -> list[Path]:
    """loss.png (every curve) and metrics.png (base vs tuned); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if curves:
        loss = {k: v for k, v in curves.items() if "loss" in k} or curves
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for name, pts in loss.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                    markersize=3, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss" if any("loss" in k for k in loss) else "value")
        ax.set_title("Training curves")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "loss.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    base = eval_metrics.get("base") if isinstance(eval_metrics, dict) else None
    tuned = eval_metrics.get("tuned") if isinstance(eval_metrics, dict) else None
    if isinstance(base, dict) and isinstance(tuned, dict):
        names = [m for m in CHART_METRICS if _num(tuned.get(m)) is not None and _num(base.get(m)) is not None]
        if names:
            fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
            xs = range(len(names))
            ax.bar([x - 0.2 for x in xs], [_num(base[m]) for m in names], width=0.4, label="base")
            ax.bar([x + 0.2 for x in xs], [_num(tuned[m]) for m in names], width=0.4, label="tuned")
            ax.set_xticks(list(xs), names, rotation=20)
            ax.set_ylim(0, 1)
            ax.set_title("Evaluation: base vs tuned")
            ax.legend()
            fig.tight_layout()
            path = out / "metrics.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written


def charts_section(curves: dict, eval_metrics: dict | None, pngs: list[Path], image_base_url: str | None,
                   artifact_note: str | None) -> str:
    lines = ["### Charts"]
    if not curves and mermaid_metrics(eval_metrics) is None:
        lines.append("_No training curves (dvclive/train/plots/metrics) and no evaluation metrics to chart._")
        return "\n".join(lines)
    if image_base_url and pngs:
        lines += [f"![{p.stem}]({image_base_url.rstrip('/')}/{p.name})" for p in pngs]
    for name in sorted(curves, key=lambda k: ("loss" not in k, k))[:4]:
        lines += ["", mermaid_curve(name, curves[name])]
    chart = mermaid_metrics(eval_metrics)
    if chart:
        lines += ["", chart]
    if pngs and not image_base_url:
        lines.append("\nPNG versions (" + ", ".join(f"`{p.name}`" for p in pngs) + "): "
                     + (artifact_note or f"written to `{pngs[0].parent.as_posix()}/`") + ".")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# the comment


@dataclass
class Inputs:
    base_label: str
    head_label: str
    gate_md: str
    metrics_md: str
    params_md: str
    charts_md: str
    answers_md: str
    estimate_md: str
    notes: list[str] = field(default_factory=list)
    eval_md: str = ""


def build_comment(inp: Inputs) -> str:
    head = [MARKER, f"## 🦙 Pipeline report: `{inp.head_label}` vs `{inp.base_label}`"]
    if inp.notes:
        head += [""] + [f"> {_cell(n)}" for n in inp.notes]
    parts = ["\n".join(head), inp.gate_md, inp.eval_md, inp.metrics_md, inp.params_md, inp.charts_md, inp.answers_md,
             inp.estimate_md,
             "<sub>Built by <code>python -m stages.ci.pr_comment</code>; updated on every push.</sub>"]
    text = "\n\n".join(p for p in parts if p) + "\n"
    note = "\n\n_(section cut: the comment reached GitHub's size limit)_"
    while len(text) > MAX_COMMENT_CHARS:  # cut the longest section until the comment fits
        i = max(range(1, len(parts) - 1), key=lambda k: len(parts[k]))
        excess = len(text) - MAX_COMMENT_CHARS
        if len(parts[i]) <= 200 + len(note):
            text = text[:MAX_COMMENT_CHARS]
            break
        parts[i] = parts[i][: max(200, len(parts[i]) - excess - len(note) - 1)] + note
        text = "\n\n".join(p for p in parts if p) + "\n"
    return text


def _load_json(path: Path) -> tuple[dict | None, str | None]:
    if not path.is_file():
        return None, f"{path} not found"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path} is not valid JSON ({exc})"
    return (data, None) if isinstance(data, dict) else (None, f"{path} is not a JSON object")


def _gate_params(params_path: Path) -> tuple[list[str], float]:
    try:
        import yaml

        gate = ((yaml.safe_load(params_path.read_text()) or {}).get("evaluate") or {}).get("gate") or {}
    except Exception:  # noqa: BLE001 - defaults below
        gate = {}
    metrics = gate.get("regression_metrics") or ["rouge_l", "bleu4", "bertscore_f1", "semantic_similarity",
                                                 "fact_recall"]
    tolerance = _num(gate.get("max_regression"))
    return list(metrics), 0.02 if tolerance is None else tolerance


def _json_text(text: str | None) -> dict | None:
    try:
        data = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _eval_comparison(cwd: Path, base: str, base_label: str, metrics_path: str, eval_metrics: dict | None,
                     regression_metrics, tolerance: float) -> tuple[dict | None, str | None]:
    """This revision's evaluation against the base branch's, from files tracked in git on both sides."""
    old = _json_text(git_show(base, metrics_path, cwd))
    if old is None:
        return None, f"`{base_label}` has no readable {metrics_path}"
    if eval_metrics is None:
        return None, f"this revision has no readable {metrics_path}"
    records_rel = str(Path(metrics_path).with_name(Path(RECORDS_PATH).name))
    new_records, _ = _load_json(cwd / records_rel)
    old_records = _json_text(git_show(base, records_rel, cwd))
    if old_records is not None and not isinstance(old_records.get("records"), list):
        old_records = None
    if new_records is not None and not isinstance(new_records.get("records"), list):
        new_records = None
    new_pre, _ = _load_json(cwd / PREPROCESS_PATH)
    old_pre = _json_text(git_show(base, PREPROCESS_PATH, cwd))
    return compare_eval(eval_metrics, new_records, old, old_records, base_label, regression_metrics, tolerance,
                        (new_pre or {}).get("data_hash"), (old_pre or {}).get("data_hash")), None


def _noise_floor(cwd: Path, base: str) -> dict | None:
    """metrics/noise_floor.json of this revision, else the base branch's; None when it was measured
    for another base model than params.yaml's (another model's seed noise says nothing of this one)."""
    data, _ = _load_json(cwd / NOISE_PATH)
    data = data if data is not None else _json_text(git_show(base, NOISE_PATH, cwd))
    return data if noise_applies(data, _params_model(cwd)) else None


def noise_applies(noise: dict | None, model: str | None) -> bool:
    """A noise floor applies to the model it was measured for (its "model"; files written before the
    key existed were measured on the embedded model)."""
    return isinstance(noise, dict) and (noise.get("model") or "embedded") == (model or "embedded")


def _params_model(cwd: Path) -> str | None:
    try:
        import yaml

        return ((yaml.safe_load((cwd / "params.yaml").read_text(encoding="utf-8")) or {}).get("model") or {}).get("base")
    except (OSError, ValueError, AttributeError):
        return None


def apply_eval_flags(rows: list[MetricRow], comparison: dict | None, tolerance: float) -> None:
    """The tuned metrics of the evaluation files get the paired test's verdict instead of the plain
    tolerance rule; with different test sets, no evaluation row gets a verdict."""
    if comparison is None:
        return
    for row in rows:
        if Path(row.path).name not in EVAL_FILES or row.name == "gate.passed":
            continue
        parts = row.name.split(".")
        if not comparison["comparable"]:
            row.flag, row.regression = ("not comparable" if row.old is not None and row.new is not None
                                        else row.flag), False
        elif len(parts) == 2 and parts[0] == "tuned" and row.old is not None and row.new is not None:
            row.flag, row.regression = eval_flag(parts[1], comparison, tolerance)


def make_comment(args) -> tuple[str, list[Path]]:
    cwd = Path(args.repo)
    base = resolve_base(args.base, cwd)
    base_label = args.base if base is None else base
    ok, head = _run(["git", "rev-parse", "--short", "HEAD"], cwd)
    head_label = args.head_label or (head if ok else "workspace")
    notes = list(args.note or [])
    regression_metrics, tolerance = _gate_params(cwd / args.params)

    eval_metrics, eval_problem = _load_json(cwd / args.metrics)
    gate_md = gate_section(eval_metrics, eval_problem)
    comparison, eval_md = None, ""
    if base is not None:
        comparison, why = _eval_comparison(cwd, base, base_label, args.metrics, eval_metrics, regression_metrics,
                                           tolerance)
        eval_md = evaluation_section(comparison, eval_metrics, _noise_floor(cwd, base), base_label,
                                     why or eval_problem)

    if base is None:
        missing = f"base revision '{args.base}' not found (fetch it: git fetch origin {args.base})"
        metrics_md = metrics_section([], base_label, None, missing)
        params_md = params_section(None, base_label, missing)
    elif args.no_dvc:
        metrics_md = metrics_section([], base_label, None, "skipped (--no-dvc)")
        params_md = params_section(None, base_label, "skipped (--no-dvc)")
    else:
        # The stages' detail files are git-tracked outputs, not DVC metrics (so that `dvc metrics show`
        # stays a one-screen headline): name them as targets to diff them too.
        targets = ["--targets", *[t for t in DIFF_TARGETS if (cwd / t).is_file()]]
        ok_j, out_j = dvc(["metrics", "diff", base, "--json", *targets], cwd)
        ok_m, out_m = dvc(["metrics", "diff", base, "--md", *targets], cwd)
        rows = []
        if ok_j:
            try:
                rows = metric_rows(json.loads(out_j or "{}"), regression_metrics, tolerance, _noise_floor(cwd, base))
            except json.JSONDecodeError:
                ok_j, out_j = False, "unreadable JSON from dvc metrics diff"
        apply_eval_flags(rows, comparison, tolerance)
        metrics_md = metrics_section(rows, base_label, out_m if ok_m else None, None if ok_j else out_j)
        ok_p, out_p = dvc(["params", "diff", base, "--md"], cwd)
        params_md = params_section(out_p if ok_p else None, base_label, None if ok_p else out_p)

    curves = read_curves(cwd / args.live)
    pngs: list[Path] = []
    if args.plots_dir:
        try:
            pngs = render_pngs(curves, eval_metrics, cwd / args.plots_dir)
        except Exception as exc:  # noqa: BLE001 - charts are optional
            notes.append(f"PNG charts not rendered: {type(exc).__name__}: {exc}")
    artifact_note = None
    if os.environ.get("GITHUB_RUN_ID") and os.environ.get("GITHUB_REPOSITORY"):
        server = os.environ.get("GITHUB_SERVER_URL", "https://github.com")
        artifact_note = (f"artifact `{args.artifact_name}` of [this workflow run]({server}/"
                         f"{os.environ['GITHUB_REPOSITORY']}/actions/runs/{os.environ['GITHUB_RUN_ID']})")
    charts_md = charts_section(curves, eval_metrics, pngs, args.image_base_url, artifact_note)

    pred_text = None
    pred_path = cwd / args.predictions
    if pred_path.is_file():
        try:
            pred_text = pred_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            notes.append(f"{args.predictions} unreadable: {exc}")
    rows, bad = parse_predictions(pred_text)
    old_rows = None
    if rows and base is not None and not args.no_dvc:
        old_text = read_at_rev(base, args.predictions, cwd)
        old_rows = parse_predictions(old_text)[0] if old_text else None
    changes = changed_answers(rows, old_rows, args.max_answers)
    source = ("tuned answers that differ from the base branch's" if old_rows
              else "where the tuned model answers differently from the base model"
              + ("" if base is None else f" (`{base_label}`'s predictions are not in the DVC cache)"))
    answers_md = answers_section(changes, len(rows), bad, source)

    files = changed_files(base, cwd) if base else None
    if args.no_estimate:
        est, est_error = None, "skipped (--no-estimate)"
    else:
        est, est_error = compute_estimate(cwd / args.params)
    estimate_md = estimate_section(est, est_error, training_paths(files))

    comment = build_comment(Inputs(base_label, head_label, gate_md, metrics_md, params_md, charts_md,
                                   answers_md, estimate_md, notes, eval_md))
    return comment, pngs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ci.pr_comment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="branch or revision to compare with (origin/<base> also tried)")
    parser.add_argument("--out", default="-", help="file to write the comment to ('-' = stdout)")
    parser.add_argument("--repo", default=".", help="repository root")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--predictions", default="reports/eval/predictions.jsonl")
    parser.add_argument("--live", default="dvclive/train", help="dvclive folder of the train stage")
    parser.add_argument("--plots-dir", default="build/pr-comment", help="where PNG charts go ('' = none)")
    parser.add_argument("--image-base-url", default=None, help="URL where the PNGs are published (embeds them)")
    parser.add_argument("--artifact-name", default="pr-charts", help="name of the workflow artifact with the PNGs")
    parser.add_argument("--max-answers", type=int, default=5)
    parser.add_argument("--head-label", default=None, help="label of this change (default: short HEAD sha)")
    parser.add_argument("--note", action="append", help="a line to show at the top (repeatable), e.g. what CI skipped")
    parser.add_argument("--no-dvc", action="store_true", help="skip the dvc diff calls")
    parser.add_argument("--no-estimate", action="store_true", help="skip the Azure time and cost estimate")
    args = parser.parse_args(argv)
    comment, pngs = make_comment(args)
    if args.out == "-":
        sys.stdout.write(comment)
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(comment, encoding="utf-8")
        tmp.replace(out)
        print(f"[pr_comment] wrote {out} ({len(comment):,} characters)"
              + (f" and {len(pngs)} chart(s) in {pngs[0].parent}" if pngs else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
