"""Comparison with a reference metrics file, and the quality gate. No torch, no model: the deploy
step and CI run `python -m stages.evaluate gate` in a second.

A reference is a metrics file in this stage's format ({"tuned": {...}, ...}, e.g. the production
model's or main's) or a flat {metric: value} mapping, given as a path or as "REV:path", which is
read with `git show REV:path` (e.g. main:metrics/eval.json). Its per-record scores are read from
the file beside it (eval_records.json, same revision) and paired with this run's by record id:
a metric regresses only when it dropped by more than the tolerance AND the drop is significant
(stages/core/significance.py). Without per-record scores on either side the tolerance alone decides,
and the comparison says so; with different test sets nothing is comparable and nothing regresses.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from . import significance
from .params import EVAL_METRICS, LOWER_IS_BETTER, ConfigError, GateParams

NO_DIRECTION = ("length_ratio",)
RECORDS_NAME = "eval_records.json"


@dataclass
class Reference:
    tuned: dict                # the reference's tuned-model headline metrics
    source: str                # where they came from, for the reader
    records: dict | None       # its per-record file ({"test_set", "records"}), None when it has none
    test_hash: str | None = None


def _read_spec(spec: str, cwd: str | Path) -> tuple[str, str] | None:
    """(text, source) of a path or REV:path; None when neither exists."""
    path = Path(cwd) / spec
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(spec)
    if ":" not in spec:
        return None
    rev, _, rel = spec.partition(":")
    try:
        done = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"reference {spec!r}: cannot run git show: {exc}") from None
    if done.returncode != 0:
        raise ConfigError(f"reference {spec!r}: not a file, and git show failed: {done.stderr.strip()}")
    return done.stdout, f"git {rev}:{rel}"


def records_spec(spec: str) -> str:
    """The per-record file beside a metrics file: main:metrics/eval.json -> main:metrics/eval_records.json."""
    if ":" in spec and not Path(spec).exists():
        rev, _, rel = spec.partition(":")
        return f"{rev}:{PurePosixPath(rel).with_name(RECORDS_NAME)}"
    return str(Path(spec).with_name(RECORDS_NAME))


def load_records(spec: str, cwd: str | Path = ".") -> dict | None:
    """A per-record file (path or REV:path); None when it does not exist there."""
    try:
        found = _read_spec(spec, cwd)
    except ConfigError:
        return None
    if found is None:
        return None
    try:
        data = json.loads(found[0])
    except json.JSONDecodeError as exc:
        raise ConfigError(f"per-record scores {spec!r}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list) \
            or not all(isinstance(r, dict) and "id" in r for r in data["records"]):
        raise ConfigError(f"per-record scores {spec!r}: expected {{\"test_set\": ..., \"records\": "
                          "[{\"id\": ..., \"base\": {...}, \"tuned\": {...}}]}")
    return data


def load_reference(spec: str, cwd: str | Path = ".") -> Reference:
    """The reference's tuned-model metrics, where they came from, and its per-record scores if any."""
    found = _read_spec(spec, cwd)
    if found is None:
        raise ConfigError(f"reference {spec!r}: no such file (use a path or REV:path, e.g. main:metrics/eval.json)")
    text, source = found
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"reference {spec!r}: not valid JSON: {exc}") from None
    values = data.get("tuned", data) if isinstance(data, dict) else None
    if not isinstance(values, dict) or not any(k in EVAL_METRICS for k in values):
        raise ConfigError(f"reference {spec!r}: no metrics found (expected {{\"tuned\": {{\"rouge_l\": ...}}}} "
                          "or a flat {\"rouge_l\": ...} mapping)")
    test_hash = (data.get("test_set") or {}).get("hash") if isinstance(data.get("test_set"), dict) else None
    return Reference({k: v for k, v in values.items() if k in EVAL_METRICS}, source,
                     load_records(records_spec(spec), cwd), test_hash)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def compare(tuned: dict, reference: Reference, metrics: list[str], tolerance: float,
            records: dict | None = None, test_hash: str | None = None) -> dict:
    """Deltas (current - reference) for every shared metric, their paired tests when both sides have
    per-record scores, and which of `metrics` regress (beyond tolerance AND significant)."""
    test_hash = test_hash or ((records or {}).get("test_set") or {}).get("hash")
    ref_hash = reference.test_hash or ((reference.records or {}).get("test_set") or {}).get("hash")
    not_comparable = None
    if test_hash and ref_hash and test_hash != ref_hash:
        not_comparable = "the test sets differ (different test-set hash)"
    tests, note = {}, None
    if not_comparable is None and records and reference.records:
        not_comparable = significance.same_test_set(records, reference.records)
        if not_comparable is None:
            tests = significance.compare_records(records["records"], reference.records["records"], "tuned", "tuned",
                                                 tolerance=tolerance)
    elif not_comparable is None:
        missing = "this run" if not records else reference.source
        note = f"no per-record scores for {missing}: significance not tested, the tolerance alone decides"
    delta, regressions = {}, []
    for name in EVAL_METRICS:
        now, then = _number(tuned.get(name)), _number(reference.tuned.get(name))
        if now is None or then is None:
            continue
        delta[name] = round(now - then, 6)
        if not_comparable or name not in metrics or name in NO_DIRECTION:
            continue
        worse = (now - then) if name in LOWER_IS_BETTER else (then - now)
        if worse <= tolerance + 1e-12:
            continue
        test = tests.get(name)
        # Worse beyond tolerance on the headline AND a significant paired drop. For BLEU-4 the headline
        # is corpus BLEU and the test is on sentence BLEU. A metric without per-record scores
        # (val_loss) has only the tolerance.
        if test is None or (test["significant"] and significance.direction(name) * test["delta"] < 0):
            regressions.append(name)
    return {"source": reference.source, "tuned": {k: reference.tuned[k] for k in delta}, "delta": delta,
            "tolerance": tolerance, "comparable": not_comparable is None, "not_comparable": not_comparable,
            "note": note, "significance": tests, "regressions": regressions}


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
        paired = ((metrics.get("significance") or {}).get("tuned_vs_base") or {}).get(name)
        check("min_gain", name, round(improvement, 6), gain, improvement >= gain - 1e-12,
              f"{name} gain over base {improvement:+.4f} < required {gain:+g} (base {then:.4f}, tuned {now:.4f}"
              + (f"; tuned - base {significance.describe(name, paired)})" if paired else ")"))
    notes = []
    if comparison is not None:
        if comparison.get("not_comparable"):
            notes.append(f"not comparable with {comparison['source']}: {comparison['not_comparable']}; "
                         "no regression check against it")
        elif comparison.get("note"):
            notes.append(comparison["note"])
        for name in gate.regression_metrics if not comparison.get("not_comparable") else []:
            if name not in comparison["delta"]:
                continue
            d = comparison["delta"][name]
            test = (comparison.get("significance") or {}).get(name)
            bad = name in comparison["regressions"]
            checks.append({"check": "max_regression", "metric": name, "value": d, "threshold": gate.max_regression,
                           "passed": not bad, "verdict": _verdict(name, d, test, gate.max_regression, bad),
                           "ci": test.get("ci") if test else None, "p": test.get("p") if test else None})
            if bad:
                reasons.append(f"{name} regressed by {abs(d):.4f} vs {comparison['source']} "
                               f"(tolerance {gate.max_regression:g}"
                               + (f"; paired test {significance.describe(name, test)})" if test else
                                  "; no per-record scores, significance not tested)"))
    return {"passed": not reasons, "reasons": reasons, "checks": checks,
            "reference": comparison["source"] if comparison else None, "notes": notes}


def _verdict(name: str, delta: float, test: dict | None, tolerance: float, regression: bool) -> str:
    if regression:
        return "regression"
    if test is None:
        return "within tolerance"
    return test["verdict"] if test["verdict"] != "regression" else "within tolerance"


# ---------------------------------------------------------------------------------------------------
# Why a run is not better than its base: the likely causes, from the run's own figures

FEW_STEPS = 40              # fewer optimizer steps than this rarely teach a model a dataset
TRUNCATED_RATE = 0.2        # a share of answers at max_new_tokens that makes every score suspect
LOOP_RATE = 0.1             # a share of degenerate tuned answers worth naming
SMALL_TEST = 50             # preprocess.min_test_records' default
UNDETECTABLE_ROUGE = 0.1    # a test split that cannot see a ROUGE-L change this large is too small


def likely_causes(metrics: dict, training: dict | None = None) -> list[str]:
    """The causes that apply, each with what to change, in the order worth checking. `training`: the
    adapter manifest (steps, length_rule); without it the step count is not judged."""
    causes = []
    tuned, base = metrics.get("tuned") or {}, metrics.get("base") or {}
    training = training or {}
    steps = training.get("steps")
    # an early stop is the validation loss saying that more steps did not help: not "few steps"
    if isinstance(steps, int) and steps < FEW_STEPS and not training.get("early_stopped"):
        causes.append(f"few steps: training ran {steps} optimizer steps ({training.get('length_rule', 'see metrics/train.json')}); "
                      f"raise train.min_steps (at least {FEW_STEPS}) or train.epochs")
    budget = metrics.get("answer_budget") or {}
    cut = _number(tuned.get("no_end_token_rate")) or 0.0
    if cut >= TRUNCATED_RATE:
        if str(budget.get("rule", "")).startswith("auto"):
            change = ("it is auto, 1.25 x the references' p95 length: tuned answers that much longer than the "
                      "references ramble or loop (see loops); if your answers vary a lot in length, raise "
                      "decoding.max_new_tokens_cap or set decoding.max_new_tokens to a number")
        else:
            change = "set decoding.max_new_tokens to auto (from the references' length) or raise it"
        causes.append(f"truncated answers: {cut:.0%} of tuned answers hit max_new_tokens "
                      f"({budget.get('max_new_tokens')}), so their scores are computed on cut text; {change}")
    loops = _number(tuned.get("degenerate_rate"))
    if loops is not None and loops >= LOOP_RATE:
        causes.append(f"loops: {loops:.0%} of tuned answers repeat themselves or stop mid-sentence (the report's "
                      "'Degenerate answers' lists them); a model that has not learned where answers end loops under "
                      "greedy decoding: check the step count and the learning rate")
    n = metrics.get("n_test") or 0
    detectable = ((metrics.get("significance") or {}).get("detectable_difference") or {}).get("rouge_l")
    if n < SMALL_TEST or (detectable is not None and detectable > UNDETECTABLE_ROUGE):
        what = f", and it can only detect ROUGE-L changes above about {detectable:.3f}" if detectable else ""
        causes.append(f"a small test split: {n} test records{what}; add records or raise preprocess.split.test")
    b_loss, t_loss = _number(base.get("val_loss")), _number(tuned.get("val_loss"))
    if t_loss is None and b_loss is not None or (t_loss is not None and b_loss is not None and t_loss > b_loss):
        causes.append(f"a learning rate that diverged: the tuned model's validation loss ({t_loss}) is above the "
                      f"base's ({b_loss}); lower train.learning_rate (halve it) and check the loss curve (dvc plots show)")
    return causes
