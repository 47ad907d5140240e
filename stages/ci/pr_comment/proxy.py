"""Proxy section: the change run through the CPU default on both revisions, paired over the test records.

`python -m stages.ci.proxy` (prepare, run) leaves build/proxy/proxy.json and two worktrees,
build/proxy/base and build/proxy/head, each with its own metrics/eval.json and metrics/eval_records.json.
This section compares them with the same paired test and flags as the evaluation section (compare_eval),
under a heading that says it is a proxy: which model, what it can tell and what it cannot.
"""

from __future__ import annotations

from pathlib import Path

from .common import _cell, _load_json
from .evaluation import (NOISE_PATH, PREPROCESS_PATH, RECORDS_PATH, comparison_table, compare_eval, detectable_line,
                         noise_applies, verdict_lines)

EVAL_PATH = "metrics/eval.json"
SIDES = ("base", "head")


def _short(sha: str | None) -> str:
    return (sha or "?")[:7]


def read_proxy(build: Path) -> tuple[dict | None, dict, str | None]:
    """proxy.json and each side's evaluation files; a problem (a line) when there is nothing to compare."""
    info, problem = _load_json(build / "proxy.json")
    files: dict[str, dict] = {}
    if info is None:
        return None, files, problem
    runs = info.get("runs") if isinstance(info.get("runs"), dict) else None
    if runs is None:
        return info, files, "the proxy runs did not happen (python -m stages.ci.proxy run)"
    failed = [side for side in SIDES if not (runs.get(side) or {}).get("ok")]
    if failed:
        return info, files, (f"dvc repro publish_eval failed on the {' and '.join(failed)} side "
                             f"({', '.join(f'build/proxy/{s}.log' for s in failed)} in the job's artifact)")
    for side in SIDES:
        entry = {}
        for key, rel in (("eval", EVAL_PATH), ("records", RECORDS_PATH), ("preprocess", PREPROCESS_PATH),
                         ("noise", NOISE_PATH)):
            entry[key], _ = _load_json(build / side / rel)
        if entry["records"] is not None and not isinstance(entry["records"].get("records"), list):
            entry["records"] = None
        files[side] = entry
    missing = [side for side in SIDES if files[side]["eval"] is None]
    if missing:
        return info, files, f"no readable {EVAL_PATH} on the {' and '.join(missing)} side"
    return info, files, None


def proxy_comparison(info: dict, files: dict, regression_metrics, tolerance: float) -> dict | None:
    base, head = files["base"], files["head"]
    return compare_eval(head["eval"], head["records"], base["eval"], base["records"], "base (proxy)",
                        regression_metrics, tolerance, (head["preprocess"] or {}).get("data_hash"),
                        (base["preprocess"] or {}).get("data_hash"))


def proxy_gate(info: dict | None) -> tuple[list[str], float]:
    """The regression metrics and tolerance of the proxy's own params (the head side's)."""
    flat = ((info or {}).get("params") or {}).get("head") or {}
    metrics = flat.get("evaluate.gate.regression_metrics") or ["rouge_l", "bleu4", "bertscore_f1",
                                                                "semantic_similarity", "fact_recall"]
    tolerance = flat.get("evaluate.gate.max_regression")
    return list(metrics), 0.02 if not isinstance(tolerance, (int, float)) else float(tolerance)


def proxy_section(info: dict | None, files: dict, problem: str | None, base_label: str = "base") -> str:
    model = (info or {}).get("model") or "smollm2-135m"
    production = (info or {}).get("production_model") or "the production model"
    lines = [f"### Proxy verdict: the same change on `{_cell(model)}` (CPU), not on `{_cell(production)}`"]
    if info is None:
        lines.append(f"_No proxy run: {_cell(problem or 'build/proxy/proxy.json not found')}._")
        return "\n".join(lines)
    revs = info.get("revisions") or {}
    lines += [
        f"This job could not train `{_cell(production)}` (What CI ran says why), so the base branch "
        f"(`{_cell(base_label)}`, {_short((revs.get('base') or {}).get('sha'))}) and this PR "
        f"({_short((revs.get('head') or {}).get('sha'))}) both ran with the CPU default, `{_cell(model)}` "
        "(SmolLM2-135M-Instruct, a small pretrained Llama-architecture model), on the same data, on this runner, "
        "in this job.",
        "",
        "- **What it can tell:** the direction of a data or training-setting change on a small pretrained "
        "Llama-architecture model, paired over the same test records.",
        f"- **What it cannot tell:** the quality of `{_cell(production)}`, which is larger and trained with its own "
        "settings; and anything about the changed keys listed below as not applied. The real verdict comes "
        "from training it on Azure (train.yml, after the merge).",
    ]
    applied, not_applied = info.get("applied") or [], info.get("not_applied") or []
    if applied or not_applied:
        lines += ["", "| changed key | production | proxy |", "|---|---|---|"]
        lines += [f"| `{_cell(e['key'])}` | {_cell(e['production'])} | applied: {_cell(e['proxy'])} |" for e in applied]
        lines += [f"| `{_cell(e['key'])}` | {_cell(e['production'])} | ⚠️ not applied: {_cell(e['reason'])} |"
                  for e in not_applied]
    else:
        lines += ["", "No params key changed: the two sides differ by data or code only."]
    runs = info.get("runs") or {}
    if runs:
        parts = []
        for side in SIDES:
            run = runs.get(side) or {}
            ran, restored = run.get("ran") or [], run.get("restored") or []
            what = ", ".join(([f"ran {', '.join(ran)}"] if ran else [])
                             + ([f"restored {', '.join(restored)} from the run cache"] if restored else [])) \
                or "nothing ran (outputs up to date)"
            parts.append(f"{side}: `{_cell(str(run.get('command', 'dvc repro publish_eval')))}` "
                         f"{'ok' if run.get('ok') else 'FAILED'} in {run.get('seconds', '?')} s, {what}")
        lines += ["", "Runs: " + "; ".join(parts) + "."]
    lines.append("")
    if problem:
        lines.append(f"_No proxy comparison: {_cell(problem)}._")
        return "\n".join(lines)
    metrics, tolerance = proxy_gate(info)
    comparison = proxy_comparison(info, files, metrics, tolerance)
    if comparison is None:
        lines.append("_No proxy comparison: one side's metrics/eval.json has no tuned metrics._")
        return "\n".join(lines)
    head_label = "this PR (proxy)"
    noise = next((files[s]["noise"] for s in ("head", "base") if noise_applies(files[s]["noise"], model)), None)
    lines += verdict_lines(comparison, "base (proxy)", head_label)
    lines += comparison_table(comparison, files["head"]["eval"], noise, "base (proxy)", head_label)
    lines += ["", detectable_line(files["head"]["eval"], noise)]
    return "\n".join(lines)


def build_proxy_section(build: Path, base_label: str = "base") -> str:
    info, files, problem = read_proxy(Path(build))
    return proxy_section(info, files, problem, base_label)
