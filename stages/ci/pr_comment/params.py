"""Params section: `dvc params diff <base> --md`, and the gate settings the other sections read from params.yaml."""

from __future__ import annotations

from pathlib import Path

from .common import _cell, _num, _table_rows


def params_section(raw_md: str | None, base_label: str, error: str | None) -> str:
    lines = [f"### Params vs `{base_label}` (`dvc params diff {base_label} --md`)"]
    if error:
        lines.append(f"_`dvc params diff` failed: {_cell(error[:500])}_")
    elif _table_rows(raw_md):
        lines.append(raw_md.strip())
    else:
        lines.append("No parameter changed.")
    return "\n".join(lines)


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
