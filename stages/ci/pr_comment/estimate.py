"""Estimate section: whether merging triggers training, and the Azure time and cost of that run."""

from __future__ import annotations

from pathlib import Path

from .common import _cell, _fmt, _num

# Paths whose change makes train.yml run on merge (keep in sync with .github/workflows/train.yml).
TRAIN_PATHS = ("data/", "params.yaml", "stages/", "dvc.yaml")


def training_paths(files: list[str] | None) -> list[str] | None:
    """The changed files that make train.yml run on merge (None if unknown)."""
    if files is None:
        return None
    return [f for f in files if any(f == p or f.startswith(p) for p in TRAIN_PATHS)]


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
