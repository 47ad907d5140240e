"""Comparison with a reference metrics file, and the quality gate. No torch, no model: the deploy
step and CI run `python -m stages.evaluate gate` in a second.

A reference is a metrics file in this stage's format ({"tuned": {...}, ...}, e.g. the production
model's or main's) or a flat {metric: value} mapping, given as a path or as "REV:path", which is
read with `git show REV:path` (e.g. main:metrics/eval.json).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from .params import EVAL_METRICS, LOWER_IS_BETTER, ConfigError, GateParams

NO_DIRECTION = ("length_ratio",)


def load_reference(spec: str, cwd: str | Path = ".") -> tuple[dict, str]:
    """The reference's tuned-model metrics and a description of where they came from."""
    path = Path(cwd) / spec
    if path.is_file():
        text, source = path.read_text(encoding="utf-8"), str(spec)
    elif ":" in spec:
        rev, _, rel = spec.partition(":")
        try:
            done = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"reference {spec!r}: cannot run git show: {exc}") from None
        if done.returncode != 0:
            raise ConfigError(f"reference {spec!r}: not a file, and git show failed: {done.stderr.strip()}")
        text, source = done.stdout, f"git {rev}:{rel}"
    else:
        raise ConfigError(f"reference {spec!r}: no such file (use a path or REV:path, e.g. main:metrics/eval.json)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"reference {spec!r}: not valid JSON: {exc}") from None
    values = data.get("tuned", data) if isinstance(data, dict) else None
    if not isinstance(values, dict) or not any(k in EVAL_METRICS for k in values):
        raise ConfigError(f"reference {spec!r}: no metrics found (expected {{\"tuned\": {{\"rouge_l\": ...}}}} "
                          "or a flat {\"rouge_l\": ...} mapping)")
    return {k: v for k, v in values.items() if k in EVAL_METRICS}, source


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def compare(tuned: dict, reference: dict, source: str, metrics: list[str], tolerance: float) -> dict:
    """Deltas (current - reference) for every shared metric, and which of `metrics` regress."""
    delta, regressions = {}, []
    for name in EVAL_METRICS:
        now, then = _number(tuned.get(name)), _number(reference.get(name))
        if now is None or then is None:
            continue
        delta[name] = round(now - then, 6)
        if name in metrics and name not in NO_DIRECTION:
            worse = (now - then) if name in LOWER_IS_BETTER else (then - now)
            if worse > tolerance + 1e-12:
                regressions.append(name)
    return {"source": source, "tuned": {k: reference[k] for k in delta}, "delta": delta,
            "tolerance": tolerance, "regressions": regressions}


def evaluate_gate(metrics: dict, gate: GateParams, comparison: dict | None = None) -> dict:
    """{"passed", "reasons", "checks"} from the thresholds; every failing check gives one reason."""
    tuned, base = metrics.get("tuned") or {}, metrics.get("base") or {}
    checks, reasons = [], []

    def check(kind: str, name: str, value, threshold: float, ok: bool | None, reason: str):
        checks.append({"check": kind, "metric": name, "value": value, "threshold": threshold, "passed": bool(ok)})
        if not ok:
            reasons.append(reason)

    for name, minimum in gate.min_tuned.items():
        value = _number(tuned.get(name))
        check("min_tuned", name, value, minimum, value is not None and value >= minimum,
              f"tuned {name} is missing" if value is None else f"tuned {name} {value:.4f} < minimum {minimum:g}")
    for name, maximum in gate.max_tuned.items():
        value = _number(tuned.get(name))
        check("max_tuned", name, value, maximum, value is not None and value <= maximum,
              f"tuned {name} is missing" if value is None else f"tuned {name} {value:.4f} > maximum {maximum:g}")
    for name, gain in gate.min_gain.items():
        now, then = _number(tuned.get(name)), _number(base.get(name))
        if now is None or then is None:
            check("min_gain", name, None, gain, False, f"{name} is missing for the base or the tuned model")
            continue
        improvement = (then - now) if name in LOWER_IS_BETTER else (now - then)
        check("min_gain", name, round(improvement, 6), gain, improvement >= gain - 1e-12,
              f"{name} gain over base {improvement:+.4f} < required {gain:+g} (base {then:.4f}, tuned {now:.4f})")
    if comparison is not None:
        for name in gate.regression_metrics:
            if name not in comparison["delta"]:
                continue
            d = comparison["delta"][name]
            bad = name in comparison["regressions"]
            check("max_regression", name, d, gate.max_regression, not bad,
                  f"{name} regressed by {abs(d):.4f} vs {comparison['source']} "
                  f"(tolerance {gate.max_regression:g})")
    return {"passed": not reasons, "reasons": reasons, "checks": checks,
            "reference": comparison["source"] if comparison else None}
