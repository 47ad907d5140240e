"""Plan section ("What CI ran"): per stage, whether the pull-request job took it from the remote/run cache,
ran it on the runner, or did not start it, and why (the JSON of `python -m stages.ci.plan`)."""

from __future__ import annotations

from .common import _cell

ICONS = {"cache": "♻️", "runner": "▶️", "not_started": "⏸️"}
WORDS = {"cache": "from the remote/run cache", "runner": "runs on the runner", "not_started": "not started here"}


def plan_section(plan: dict | None, problem: str | None = None) -> str:
    """The decisions of stages.ci.plan as the comment shows them; a line saying why when there is no plan."""
    lines = ["### What CI ran"]
    if not isinstance(plan, dict) or not isinstance(plan.get("stages"), list):
        lines.append(f"_No plan: {_cell(problem or 'stages.ci.plan did not run')}._")
        return "\n".join(lines)
    budget = plan.get("budget_minutes")
    lines.append(f"Model `{_cell(str(plan.get('model')))}` ({_cell(str(plan.get('method')))}). "
                 + ("Unchanged stages come from the DVC remote. " if plan.get("remote") else
                    "No DVC remote here: every stage needs running. ")
                 + (f"Training may take {budget:g} min of this runner's CPU by the project's estimate."
                    if isinstance(budget, (int, float)) else ""))
    lines += ["", "| stage | decision | why |", "|---|---|---|"]
    for entry in plan["stages"] + (plan.get("checks") or []):
        if not isinstance(entry, dict):
            continue
        decision = str(entry.get("decision"))
        name = entry.get("stage") or entry.get("check")
        lines.append(f"| {_cell(str(name))} | {ICONS.get(decision, '')} {WORDS.get(decision, _cell(decision))} | "
                     f"{_cell(str(entry.get('reason', '')))} |")
    targets = plan.get("targets") or []
    lines.append("\n" + (f"`dvc repro {'--pull --allow-missing ' if plan.get('remote') else ''}"
                         f"{' '.join(targets)}` ran the stages marked ▶️." if targets
                         else "No stage ran here: `dvc repro` was not started."))
    if plan.get("not_started"):
        lines.append("Metrics and answers of the stages not started here are the base branch's or missing below; "
                     "nothing in this comment comes from a model this job could not train.")
    if plan.get("proxy"):
        lines.append("The model's training or evaluation is not started here, so the same change ran through the "
                     "CPU default on the base branch and on this PR: the proxy verdict below.")
    return "\n".join(lines)
