"""Evaluation section: this revision's tuned model against the base branch's, paired over test records."""

from __future__ import annotations

from pathlib import Path

from .common import _cell, _fmt, _json_text, _load_json, _num, git_show
from .metrics import EVAL_FILES, MetricRow

RECORDS_PATH = "metrics/eval_records.json"
NOISE_PATH = "metrics/noise_floor.json"
PREPROCESS_PATH = "metrics/preprocess.json"
VERDICT_FLAGS = {"regression": "❌ regression", "worse within tolerance": "⚠️ worse (significant, within tolerance)",
                 "improvement": "✅ better (significant)", "within noise": "within noise", "no change": "",
                 "no direction": "changed (significant)"}


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
    else:
        lines += verdict_lines(comparison, base_label)
    if comparison is not None:
        lines += comparison_table(comparison, new, noise, base_label)
    lines += ["", detectable_line(new, noise)]
    return "\n".join(line for line in lines if line is not None)


def verdict_lines(comparison: dict, base_label: str, head_label: str = "this PR") -> list[str]:
    """The headline above the table: not comparable, or the regressions (or none)."""
    if not comparison["comparable"]:
        return [f"⚠️ **Not comparable:** {_cell(comparison['not_comparable'])}. The evaluation metrics of "
                f"`{base_label}` and {head_label} measure different test records, so no difference below is a "
                "regression or an improvement.", ""]
    regs = comparison["regressions"]
    lines = [f"**{len(regs)} regression(s):** " + ", ".join(f"`{m}`" for m in regs) if regs else
             f"No regression: no gated metric dropped by more than {comparison['tolerance']:g} with a "
             "significant paired test."]
    if comparison.get("note"):
        lines.append(f"_{_cell(comparison['note'])}._")
    return lines + [""]


def comparison_table(comparison: dict, new: dict | None, noise: dict | None, base_label: str,
                     head_label: str = "this PR") -> list[str]:
    """One row per metric: both sides, change, 95% paired interval, verdict, seed noise."""
    tests = comparison.get("significance") or {}
    lines = [f"| metric | {base_label} | {head_label} | change | 95% CI | verdict | seed noise |",
             "|---|---|---|---|---|---|---|"]
    now = (new or {}).get("tuned") or {}
    for metric, d in comparison["delta"].items():
        test = tests.get(metric)
        ci = test.get("ci") if test else None
        ci_text = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci and None not in ci else ""
        flag, _ = eval_flag(metric, comparison, comparison["tolerance"])
        lines.append(f"| `{metric}` | {_fmt(comparison['tuned'].get(metric))} | {_fmt(now.get(metric))} | "
                     f"{d:+.4f} | {ci_text} | {flag} | {_noise(noise, metric)} |")
    return lines


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
