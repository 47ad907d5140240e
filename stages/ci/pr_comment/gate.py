"""Quality-gate section: the verdict of metrics/eval.json and its reasons."""

from __future__ import annotations

from .common import _cell


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
