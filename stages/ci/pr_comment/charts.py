"""Charts section: loss curves and base-vs-tuned metrics as Mermaid blocks, and the same as PNGs."""

from __future__ import annotations

import csv
from pathlib import Path

from .common import _num, _num_str

CHART_METRICS = ("rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "fact_recall", "exact_match")


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
