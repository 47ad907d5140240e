"""Speed and memory figures of a run: kept out of metrics/ on purpose.

A metrics file is committed and hashed in dvc.lock, so its bytes must be a function of the stage's
inputs (same commit, same numbers on every machine). Wall times, tokens/s, latencies, peak memory
and free ports are not: they go to logs/perf/<stage>.json (git-ignored, not a DVC output), where
`make pipeline` and the benchmarks read them.
"""

from __future__ import annotations

from pathlib import Path

from .io import write_json

PERF_DIR = Path("logs/perf")


def write_perf(stage: str, figures: dict, directory: str | Path | None = None) -> Path:
    path = Path(directory or PERF_DIR) / f"{stage}.json"
    try:
        write_json(path, figures)
    except OSError as exc:  # a log: never fail a stage over it
        print(f"[{stage}] note: could not write {path}: {exc}", flush=True)
    return path


def split(metrics: dict, volatile: set[str]) -> tuple[dict, dict]:
    """(the reproducible part, the machine- and load-dependent part) of a flat metrics dict."""
    return ({k: v for k, v in metrics.items() if k not in volatile},
            {k: v for k, v in metrics.items() if k in volatile})


def summary_lines(directory: str | Path | None = None) -> list[str]:
    """One line per stage that wrote timings, in pipeline order."""
    import json

    directory = Path(directory or PERF_DIR)
    lines = []
    for stage in ("preprocess", "train", "evaluate_base", "evaluate", "package", "deploy"):
        path = directory / f"{stage}.json"
        if not path.is_file():
            continue
        try:
            figures = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        shown = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines.append(f"{stage:10s} " + ", ".join(f"{k} {v:,}" for k, v in shown.items()))
    return lines


if __name__ == "__main__":
    lines = summary_lines()
    if lines:
        print("Timings of this run (logs/perf/*.json; not metrics: they vary by machine and load):")
        print("\n".join("  " + line for line in lines))
